// The few-query softmax pass, included once per instruction set by few_queries.cpp (inside a
// namespace of its own and a `#pragma GCC target` region), so that one build carries AVX-512,
// AVX2 and portable machine code of the same source and picks one at run time.
//
// One pass over a bank split reads each key row once for all queries (at most kFewQueries): a
// tile of kRows keys is scored against every query while it sits in L1, the tile's weights are
// formed with a vectorised exp, and the tile's value rows are added to the accumulators while
// they are still in cache (the same rows when values are the keys). Running state per query:
// maximum similarity, sum of weights, accumulator, and the first index of the maximum. Only
// plain loops over raw pointers here: nothing from ATen, whose inline code carries no target.

namespace {

// e^x for x <= 0 (or -inf), float32, within a few ulp: x = n ln2 + r with |r| <= ln2 / 2, a
// degree-6 polynomial for e^r, and 2^n from the exponent bits. Below -87.3 the result is 0 (no
// subnormals): against the largest weight of a row, exactly 1, that is below float32's epsilon.
static inline float exp_nonpositive(float x) {
  x = x < -88.f ? -88.f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t exponent = static_cast<int32_t>(n) + 127;
  const int32_t bits = (exponent > 0 ? exponent : 0) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return exponent > 0 ? p * scale : 0.f;
}

// Row `row` of a bank of dtype KIND as float32 into `out` (a copy only when it is not float32).
template <int KIND>
static inline const float* row_as_float(const void* base, int64_t stride, int64_t row, int64_t n,
                                        float* out) {
  if (KIND == kKindFloat32) return static_cast<const float*>(base) + row * stride;
  const uint16_t* src = static_cast<const uint16_t*>(base) + row * stride;
  if (KIND == kKindBFloat16) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      const uint32_t bits = static_cast<uint32_t>(src[t]) << 16;
      __builtin_memcpy(out + t, &bits, sizeof(float));
    }
  } else {
    for (int64_t t = 0; t < n; ++t) out[t] = half_to_float(src[t]);
  }
  return out;
}

// Similarities of `count` queries (count <= 4, query rows `d` apart) to one key row.
template <int SIM>
static inline void score_row(const float* x, int64_t count, const float* k, int64_t d, float norm,
                             float* s, int64_t s_stride) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const float *x0 = x, *x1 = x + (count > 1 ? d : 0), *x2 = x + (count > 2 ? 2 * d : 0),
              *x3 = x + (count > 3 ? 3 * d : 0);
  if (SIM == kSimManhattan) {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t t = 0; t < d; ++t) {
      s0 += __builtin_fabsf(x0[t] - k[t]);
      s1 += __builtin_fabsf(x1[t] - k[t]);
      s2 += __builtin_fabsf(x2[t] - k[t]);
      s3 += __builtin_fabsf(x3[t] - k[t]);
    }
  } else {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t t = 0; t < d; ++t) {
      s0 += x0[t] * k[t];
      s1 += x1[t] * k[t];
      s2 += x2[t] * k[t];
      s3 += x3[t] * k[t];
    }
  }
  const float sums[4] = {s0, s1, s2, s3};
  for (int64_t q = 0; q < count; ++q) {
    // l2 as 2 x.k - ||k||^2 (the row's -||x||^2 cancels in softmax); manhattan -sum |x - k|.
    float v = SIM == kSimManhattan ? -sums[q] : (SIM == kSimL2 ? 2.f * sums[q] + norm : sums[q]);
    // Clamped to float's finite range (NaN stays NaN: the caller never sends NaN queries).
    v = v > kMaxFloat ? kMaxFloat : (v < -kMaxFloat ? -kMaxFloat : v);
    s[q * s_stride] = v;
  }
}

template <int SIM, int KIND>
static void softmax_pass(const FewQueryArgs& a, int64_t m0, int64_t m1, FewQueryState& st) {
  const int64_t B = a.rows, d = a.dim, dv = a.value_dim;
  const bool same = a.values == a.keys && a.value_stride == a.key_stride;
  float key_buffer[kRows * kMaxDimBuffer];
  float value_buffer[kMaxDimBuffer];
  float scores[kFewQueries * kRows];
  for (int64_t t0 = m0; t0 < m1; t0 += kRows) {
    const int64_t n = t0 + kRows < m1 ? kRows : m1 - t0;
    const float* keys[kRows];
    for (int64_t j = 0; j < n; ++j) {
      keys[j] = row_as_float<KIND>(a.keys, a.key_stride, t0 + j, d, key_buffer + j * d);
      const float norm = SIM == kSimL2 ? a.neg_norms[t0 + j] : 0.f;
      for (int64_t q = 0; q < B; q += 4) {
        score_row<SIM>(a.x + q * d, B - q < 4 ? B - q : 4, keys[j], d, norm, scores + q * kRows + j,
                       kRows);
      }
    }
    for (int64_t q = 0; q < B; ++q) {
      float* s = scores + q * kRows;
      float tile_max = -kInfinity;
      int64_t tile_index = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (s[j] > tile_max) {  // strict: the first index of the maximum
          tile_max = s[j];
          tile_index = j;
        }
      }
      if (tile_max > st.best[q]) {
        st.best[q] = tile_max;
        st.index[q] = t0 + tile_index;
      }
      if (tile_max > st.max[q]) {
        // -inf before the first tile: exp gives 0 and the zero state stays zero.
        const float rescale = exp_nonpositive(static_cast<float>(a.beta * (st.max[q] - tile_max)));
        st.sum[q] *= rescale;
        float* acc = st.acc + q * dv;
#pragma omp simd
        for (int64_t c = 0; c < dv; ++c) acc[c] *= rescale;
        st.max[q] = tile_max;
      }
      // beta past float's range would make 0 * inf = NaN at the maximum: float's largest value
      // gives the same limit (every other weight 0).
      const float top = st.max[q], beta = a.beta < kMaxFloat ? static_cast<float>(a.beta) : kMaxFloat;
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        // beta on the difference from the maximum: <= 0, finite or -inf, never beta * s.
        const float w = exp_nonpositive(beta * (s[j] - top));
        s[j] = w;
        total += w;
      }
      st.sum[q] += total;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* v =
          same ? keys[j] : row_as_float<KIND>(a.values, a.value_stride, t0 + j, dv, value_buffer);
      for (int64_t q = 0; q < B; ++q) {
        const float w = scores[q * kRows + j];
        if (w == 0.f) continue;  // large beta: most weights underflow
        float* acc = st.acc + q * dv;
#pragma omp simd
        for (int64_t c = 0; c < dv; ++c) acc[c] += w * v[c];
      }
    }
  }
}

// Clamped similarities of every query to memories [m0, m1), query q's at out[q * out_stride + j].
template <int SIM, int KIND>
static void scores_only(const FewQueryArgs& a, int64_t m0, int64_t m1, float* out,
                        int64_t out_stride) {
  const int64_t B = a.rows, d = a.dim;
  float key_buffer[kMaxDimBuffer];
  for (int64_t m = m0; m < m1; ++m) {
    const float* k = row_as_float<KIND>(a.keys, a.key_stride, m, d, key_buffer);
    const float norm = SIM == kSimL2 ? a.neg_norms[m] : 0.f;
    for (int64_t q = 0; q < B; q += 4) {
      score_row<SIM>(a.x + q * d, B - q < 4 ? B - q : 4, k, d, norm, out + q * out_stride + (m - m0),
                     out_stride);
    }
  }
}

template <int KIND>
static void scores_for(const FewQueryArgs& a, int64_t m0, int64_t m1, float* out,
                       int64_t out_stride) {
  if (a.similarity == kSimDot) scores_only<kSimDot, KIND>(a, m0, m1, out, out_stride);
  else if (a.similarity == kSimL2) scores_only<kSimL2, KIND>(a, m0, m1, out, out_stride);
  else scores_only<kSimManhattan, KIND>(a, m0, m1, out, out_stride);
}

static void run_scores(const FewQueryArgs& a, int64_t m0, int64_t m1, float* out,
                       int64_t out_stride) {
  if (a.kind == kKindFloat32) scores_for<kKindFloat32>(a, m0, m1, out, out_stride);
  else if (a.kind == kKindBFloat16) scores_for<kKindBFloat16>(a, m0, m1, out, out_stride);
  else scores_for<kKindFloat16>(a, m0, m1, out, out_stride);
}

template <int KIND>
static void softmax_pass_for(const FewQueryArgs& a, int64_t m0, int64_t m1, FewQueryState& st) {
  if (a.similarity == kSimDot) softmax_pass<kSimDot, KIND>(a, m0, m1, st);
  else if (a.similarity == kSimL2) softmax_pass<kSimL2, KIND>(a, m0, m1, st);
  else softmax_pass<kSimManhattan, KIND>(a, m0, m1, st);
}

static void run(const FewQueryArgs& a, int64_t m0, int64_t m1, FewQueryState& st) {
  if (a.kind == kKindFloat32) softmax_pass_for<kKindFloat32>(a, m0, m1, st);
  else if (a.kind == kKindBFloat16) softmax_pass_for<kKindBFloat16>(a, m0, m1, st);
  else softmax_pass_for<kKindFloat16>(a, m0, m1, st);
}

}  // namespace

// This instruction set's entry points (few_queries.cpp dispatches to them).
void pass(const FewQueryArgs& a, int64_t m0, int64_t m1, FewQueryState& st) { run(a, m0, m1, st); }
void scores(const FewQueryArgs& a, int64_t m0, int64_t m1, float* out, int64_t stride) {
  run_scores(a, m0, m1, out, stride);
}
