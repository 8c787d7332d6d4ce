// The few-query one-pass kernel. onepass.cpp includes this file once per instruction set, inside
// namespace isa_<name> and a `#pragma GCC target` region, with HEN_FAST_LANES (floats per vector)
// and HEN_FAST_ISA_AVX512 / HEN_FAST_ISA_AVX2 set; GCC vector types make one source serve every
// width. Nothing from ATen or the standard library's code here (see onepass.h).
//
// The bank range is read once, in blocks of kBlock rows. A block's key rows (and value rows,
// unless the values are the keys) are copied, converted to float32, into zero-padded buffers in
// L1; then every group of queries is scored against the block and updates its state:
//   scores    the group's queries share each vector (q queries x g = lanes / q components):
//             per component block t, one load of the packed queries and one broadcast of the
//             key's g components per key, fused multiply-add; a butterfly over the g lanes
//             finishes the dot products (no per-row horizontal sum). kBlock independent
//             accumulators keep both FMA ports busy.
//   argmax    running maximum and its first index (strictly greater: ties keep the first).
//   window    similarities within 1 / window_scale of the running maximum are appended to the
//             query's list (the sparse separations' candidates, softmax's support count).
//   softmax   online: running max m, sum l, the accumulator rescaled by exp(beta (m_old -
//             m_new)) when m grows; the block's weights exp(beta (s - m)) times the value rows,
//             which are still in L1. Blocks whose weights all underflow (large beta) skip it.

constexpr int kLanes = HEN_FAST_LANES;
// Keys per block: one score accumulator each, all in registers (AVX-512 has 32, the others 16).
constexpr int kBlock = kLanes == 16 ? 16 : 8;
// Rows whose products are formed in one sweep, and value vectors accumulated at a time.
constexpr int kPassRows = 8;
constexpr int kValueVectors = kLanes == 16 ? 8 : 4;
// Blocks whose weights and values are summed apart before joining the running sums (64
// memories: the error of the sum then stays at or below the BLAS tiles' on 20k-row banks).
constexpr int64_t kFlushBlocks = 64 / kBlock;
// How far ahead the rows are prefetched, in blocks.
constexpr int64_t kPrefetchBlocks = 1;

typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IVec __attribute__((vector_size(4 * kLanes)));
typedef uint32_t UVec __attribute__((vector_size(4 * kLanes)));
typedef uint16_t HVec __attribute__((vector_size(2 * kLanes)));

constexpr float kFloatMax = 3.40282347e+38f;
constexpr float kInf = __builtin_inff();

static inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof v); }
// (Vec{} + x would add 0 to x first: without -ffast-math, -0 + 0 is not -0.)
static inline Vec splat(float x) {
#if defined(HEN_FAST_ISA_AVX512)
  return (Vec)_mm512_set1_ps(x);
#elif defined(HEN_FAST_ISA_AVX2)
  return (Vec)_mm256_set1_ps(x);
#else
  return (Vec)_mm_set1_ps(x);
#endif
}
static inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
static inline Vec vabs(Vec a) { return (Vec)((IVec)a & 0x7fffffff); }
static inline bool any(IVec m) {
#if defined(HEN_FAST_ISA_AVX512)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif defined(HEN_FAST_ISA_AVX2)
  return _mm256_movemask_ps((__m256)m) != 0;
#else
  return _mm_movemask_ps((__m128)m) != 0;
#endif
}

// Lane (q, g) <- p[g] for g < G, the same G floats for every q: a broadcast from memory that
// reads exactly those floats (rows are read in place, up to the bank's last element).
template <int G>
static inline Vec broadcast(const float* p) {
  if constexpr (G == kLanes) {
    return load(p);
  } else if constexpr (G == 1) {
    return splat(*p);
  } else {
#if defined(HEN_FAST_ISA_AVX512)
    if constexpr (G == 2) {
      double pair;
      __builtin_memcpy(&pair, p, sizeof pair);
      return (Vec)_mm512_set1_pd(pair);
    } else if constexpr (G == 4) {
      return (Vec)_mm512_broadcast_f32x4(_mm_loadu_ps(p));
    } else {
      return (Vec)_mm512_broadcast_f32x8(_mm256_loadu_ps(p));
    }
#elif defined(HEN_FAST_ISA_AVX2)
    if constexpr (G == 2) {
      return (Vec)_mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(p)));
    } else {
      return (Vec)_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
    }
#else
    Vec v;
    for (int i = 0; i < kLanes; ++i) v[i] = p[i % G];
    return v;
#endif
  }
}

// Lane i <- lane i ^ S.
using LaneList = std::make_integer_sequence<int, kLanes>;
template <int S, int... I>
static inline Vec swap_lanes(Vec v, std::integer_sequence<int, I...>) {
  return __builtin_shuffle(v, IVec{(I ^ S)...});
}

// Every lane of a group of G consecutive lanes <- the group's sum (a butterfly).
template <int G>
static inline Vec group_sum(Vec v) {
  if constexpr (G >= 2) v += swap_lanes<1>(v, LaneList{});
  if constexpr (G >= 4) v += swap_lanes<2>(v, LaneList{});
  if constexpr (G >= 8) v += swap_lanes<4>(v, LaneList{});
  if constexpr (G >= 16) v += swap_lanes<8>(v, LaneList{});
  return v;
}

// Every lane <- the largest lane (NaN lanes lose to numbers).
static inline Vec all_max(Vec v) {
  if constexpr (kLanes >= 2) v = vmax(v, swap_lanes<1>(v, LaneList{}));
  if constexpr (kLanes >= 4) v = vmax(v, swap_lanes<2>(v, LaneList{}));
  if constexpr (kLanes >= 8) v = vmax(v, swap_lanes<4>(v, LaneList{}));
  if constexpr (kLanes >= 16) v = vmax(v, swap_lanes<8>(v, LaneList{}));
  return v;
}

// Row sums of kLanes vectors in one vector: lane j <- the sum of v[j]'s lanes. The level of
// width W adds vectors j and j + W half-and-half (lanes whose bit W is clear from the first,
// the others from the second; a blend plus a swap of halves), so kLanes - 1 additions and
// 2 (kLanes - 1) shuffles do the work of kLanes butterflies (2 kLanes log2(kLanes) steps), and
// lane j ends up holding row j.
template <int W, int... I>
static inline Vec merge_rows(Vec a, Vec b, std::integer_sequence<int, I...>) {
  const Vec same = __builtin_shuffle(a, b, IVec{((I % (2 * W)) < W ? I : kLanes + I)...});
  const Vec other = __builtin_shuffle(a, b, IVec{((I % (2 * W)) < W ? I + W : kLanes + I - W)...});
  return same + other;
}
template <int W>
static inline void merge_level(Vec* v) {
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) v[j] = merge_rows<W>(v[j], v[j + W], LaneList{});
}
static inline Vec row_sums(Vec* v) {
  if constexpr (kLanes >= 16) merge_level<8>(v);
  if constexpr (kLanes >= 8) merge_level<4>(v);
  if constexpr (kLanes >= 4) merge_level<2>(v);
  merge_level<1>(v);
  return v[0];
}

// e^x for x <= 0 (or -inf; NaN stays NaN), float32 within a few ulp: x = n ln2 + r, |r| <=
// ln2 / 2, a degree-6 polynomial for e^r, 2^n from the exponent bits. Below -87.3 it is 0: next
// to the largest weight of a row, exactly 1, that is under float32's epsilon.
static inline Vec exp_nonpositive(Vec x) {
  const Vec clamped = x < -88.f ? splat(-88.f) : x;
  const Vec round = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (clamped * 1.44269504088896341f + round) - round;
  const Vec r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IVec exponent = __builtin_convertvector(n, IVec) + 127;
  const Vec scale = (Vec)((exponent > 0 ? exponent : 0) << 23);
  const Vec result = exponent > 0 ? p * scale : splat(0.f);
  return x != x ? x : result;
}

// IEEE half to float, in software (the baseline has no F16C).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float value;
  __builtin_memcpy(&value, &bits, sizeof value);
  return value;
}

// n elements of a bank row of dtype `kind` into `out` as float32 (the padding after them stays).
static inline void row_to_float(const void* base, int64_t stride, int64_t row, Kind kind,
                                int64_t n, float* out) {
  if (kind == kFloat32) {
    __builtin_memcpy(out, static_cast<const float*>(base) + row * stride, n * sizeof(float));
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + row * stride;
  int64_t t = 0;
  if (kind == kBFloat16) {
    for (; t + kLanes <= n; t += kLanes) {
      HVec h;
      __builtin_memcpy(&h, src + t, sizeof h);
      store(out + t, (Vec)(__builtin_convertvector(h, UVec) << 16));
    }
    for (; t < n; ++t) {
      const uint32_t bits = static_cast<uint32_t>(src[t]) << 16;
      __builtin_memcpy(out + t, &bits, sizeof(float));
    }
    return;
  }
#if defined(HEN_FAST_ISA_AVX512)
  for (; t + 16 <= n; t += 16) {
    _mm512_storeu_ps(out + t, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + t))));
  }
#elif defined(HEN_FAST_ISA_AVX2)
  for (; t + 8 <= n; t += 8) {
    _mm256_storeu_ps(out + t,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + t))));
  }
#endif
  for (; t < n; ++t) out[t] = half_to_float(src[t]);
}

// Asks for the cache lines of rows ahead of their use, a few at a time from inside the score
// loop. A block's scores read its rows interleaved (a line of each row in turn), a pattern the
// hardware prefetcher follows late; and a burst of prefetches at the block's start would wait
// for fill buffers as demand loads do. Spread over the loop, the next blocks arrive while this
// one computes (measured: 2x on a bank in DRAM at 16 queries).
struct Prefetcher {
  // The keys' rows, then the values' when they are other rows: [next, end) each. Plain scalars,
  // not arrays, so that a copy lives in registers through the score loop.
  const char *key_next = nullptr, *key_end = nullptr, *value_next = nullptr, *value_end = nullptr;
  // per_step lines every `every` calls of step(): about the memory's pace, since a faster burst
  // fills the line fill buffers and then stalls like demand loads.
  int per_step = 1, every = 1, tick = 0;

  void pace(int64_t lines, int64_t steps) {
    every = lines >= steps ? 1 : static_cast<int>(steps / lines);
    per_step = lines >= steps ? static_cast<int>((lines + steps - 1) / steps) : 1;
  }
  // Rows [first, first + n) of a bank, as one range when they lie (almost) back to back; sparse
  // rows are left to the hardware.
  static void range(const void* base, int64_t stride_bytes, int64_t row_bytes, int64_t first,
                    int64_t n, const char*& next, const char*& end) {
    next = end = nullptr;
    if (stride_bytes > 2 * row_bytes) return;
    next = static_cast<const char*>(base) + first * stride_bytes;
    end = next + (n - 1) * stride_bytes + row_bytes;
  }
  inline void step() {
    if (++tick < every) return;
    tick = 0;
    for (int k = 0; k < per_step; ++k) {
      if (key_next < key_end) {
        __builtin_prefetch(key_next, 0, 3);
        key_next += 64;
      } else if (value_next < value_end) {
        __builtin_prefetch(value_next, 0, 3);
        value_next += 64;
      } else {
        return;
      }
    }
  }
};

// Where a block's rows live: the bank's own float32 rows or converted copies, kBlock rows of
// `stride` floats each.
struct Block {
  const float* keys;
  const float* values;
  int64_t key_stride, value_stride;
  int64_t first, rows;  // memory index of row 0; valid rows (the rest are zero)
  Prefetcher* prefetch;  // the rows ahead, asked for during the first group's scores
};

// Multiplies the running sums (each of the three parts) by `rescale`.
static inline void rescale_state(GroupState& st, int64_t vectors, Vec rescale) {
  for (int part = 0; part < 3; ++part) {
    float* sum = st.sum + part * kLanes;
    float* acc = st.acc + part * vectors * kLanes;
    store(sum, load(sum) * rescale);
    for (int64_t c = 0; c < vectors; ++c) store(acc + c * kLanes, load(acc + c * kLanes) * rescale);
  }
}

// acc[c] += sum_j weight(j) * (the G value components of vector c of row j), kValueVectors
// accumulators at a time (independent chains for both FMA ports) over kPassRows rows at a time
// (their pointers stay in registers).
template <int G, typename Weight>
static inline void add_values(const Block& blk, float* acc, int64_t vectors, const Weight& weight) {
  const int64_t vs = blk.value_stride;
#pragma GCC unroll 2
  for (int h = 0; h < kBlock; h += kPassRows) {
    const float* v = blk.values + h * vs;
    int64_t c = 0;
    for (; c + kValueVectors <= vectors; c += kValueVectors) {
      Vec sums[kValueVectors];
#pragma GCC unroll 8
      for (int i = 0; i < kValueVectors; ++i) sums[i] = load(acc + (c + i) * kLanes);
#pragma GCC unroll 8
      for (int j = 0; j < kPassRows; ++j) {
        const Vec w = weight(h + j);
#pragma GCC unroll 8
        for (int i = 0; i < kValueVectors; ++i) {
          sums[i] += w * broadcast<G>(v + j * vs + (c + i) * G);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < kValueVectors; ++i) store(acc + (c + i) * kLanes, sums[i]);
    }
    for (; c < vectors; ++c) {
      Vec sum = load(acc + c * kLanes);
#pragma GCC unroll 8
      for (int j = 0; j < kPassRows; ++j) sum += weight(h + j) * broadcast<G>(v + j * vs + c * G);
      store(acc + c * kLanes, sum);
    }
  }
}

// Appends similarity s of memory `index` to query q's window (lanes [lane, lane + G) of the
// state). A full window first drops the entries the running maximum (`best`, q's) has since left
// behind and, for the sparse separations, raises the floor to the window's own threshold and
// drops what lies at or below it, so a bank whose best rows come last or whose window is far
// wider than its support does not overflow; a window that stays (three quarters) full overflows.
static inline void keep(const Args& a, GroupState& st, int q, int lane, int G, float s,
                        int64_t index, float best) {
  int64_t& count = st.window_count[q];
  if (count == a.capacity && !st.overflow[q]) {
    float* scores = st.window_score + q * a.capacity;
    int64_t* indices = st.window_index + q * a.capacity;
    float floor = st.floor[lane];
    if (a.alpha > 1.0) {
      const float raised = sparse_floor(scores, count, best, a.window_scale, a.alpha);
      if (raised > floor) {
        floor = raised;
        for (int g = 0; g < G; ++g) st.floor[lane + g] = floor;
      }
    }
    int64_t kept = 0;
    for (int64_t e = 0; e < count; ++e) {
      if ((scores[e] - best) * a.window_scale > -1.f - 1e-5f && scores[e] > floor) {
        scores[kept] = scores[e];
        indices[kept++] = indices[e];
      }
    }
    count = kept;
    // Freeing under a quarter would make each later append compact again: overflow instead.
    if (4 * kept > 3 * a.capacity) st.overflow[q] = 1;
    if (!(s > floor)) return;
  }
  if (st.overflow[q]) return;
  if (count < a.capacity) {
    st.window_score[q * a.capacity + count] = s;
    st.window_index[q * a.capacity + count] = index;
    ++count;
  } else {
    st.overflow[q] = 1;
  }
}

// Finishes a similarity: l2's 2 x.k - ||k||^2, manhattan's sign, clamped to float's finite
// range (NaN stays NaN). `norms`: -||k||^2 of the rows, as the lanes need them.
template <int64_t SIM>
static inline Vec finish(Vec v, Vec norms) {
  if constexpr (SIM == kSimL2) v = 2.f * v + norms;
  if constexpr (SIM == kSimManhattan) v = -v;
  return v > kFloatMax ? splat(kFloatMax) : (v < -kFloatMax ? splat(-kFloatMax) : v);
}

template <int... I>
static inline IVec lane_numbers(std::integer_sequence<int, I...>) {
  return IVec{I...};
}

// The rest of a block for one query (a group of per_vector 1): the kBlock = kLanes row
// similarities go into one vector, so the weights take one exp instead of one per row.
template <int64_t SIM>
static void single_query_block(const Args& a, const Block& blk, GroupState& st, Vec* s) {
  Vec norms = splat(0.f);
  if constexpr (SIM == kSimL2) {
    if (blk.rows == kLanes) {
      norms = load(a.neg_norms + blk.first);
    } else {
      for (int j = 0; j < blk.rows; ++j) norms[j] = a.neg_norms[blk.first + j];
    }
  }
  Vec z = finish<SIM>(row_sums(s), norms);
  z = lane_numbers(LaneList{}) < static_cast<int>(blk.rows) ? z : splat(-kInf);
  const Vec top = all_max(z);
  const float block_max = top[0];
  if (block_max > st.best[0]) {
    for (int j = 0; j < blk.rows; ++j) {
      if (z[j] == block_max) {  // the first index of the block's maximum
        st.index[0] = blk.first + j;
        break;
      }
    }
    store(st.best, top);
  }
  if (a.window_scale > 0.f) {
    const IVec kept = ((z - st.best[0]) * a.window_scale > -1.f - 1e-5f) & (z > st.floor[0]);
    if (any(kept)) {
      for (int j = 0; j < blk.rows; ++j) {
        // (The floor is read again: an earlier row's compaction may have raised it.)
        if (kept[j] && z[j] > st.floor[0]) {
          keep(a, st, 0, 0, kLanes, z[j], blk.first + j, st.best[0]);
        }
      }
    }
  }
  if (!a.accumulate) return;
  const int64_t vectors = a.value_dim_pad / kLanes;
  const float old_max = st.max[0];
  const float new_max = block_max > old_max ? block_max : old_max;
  if (new_max > old_max) {
    rescale_state(st, vectors, exp_nonpositive(splat(a.beta * (old_max - new_max))));
    store(st.max, splat(new_max));
  }
  const Vec w = exp_nonpositive(a.beta * (z - new_max));
  float* chunk_sum = st.sum + 2 * kLanes;
  store(chunk_sum, load(chunk_sum) + group_sum<kLanes>(w));
  if (!any(w != 0.f)) return;  // large beta: the block's weights all underflow
  float weights[kLanes];
  store(weights, w);
  add_values<kLanes>(blk, st.acc + 2 * vectors * kLanes, vectors,
                     [&](int j) { return splat(weights[j]); });
}

// One group's update for one block: Q queries per vector, G = kLanes / Q components each.
template <int Q, int64_t SIM>
static void group_block(const Args& a, const Group& group, const Block& blk, GroupState& st) {
  constexpr int G = kLanes / Q;
  Vec s[kBlock];
#pragma GCC unroll 16
  for (int j = 0; j < kBlock; ++j) s[j] = splat(0.f);
  const float* xp = group.xp;
  // A copy, so that its state lives in registers through the loop (through the pointer, every
  // step would wait on the last one's stores).
  Prefetcher prefetch = blk.prefetch != nullptr ? *blk.prefetch : Prefetcher{};
  // Component by component over kPassRows rows at a time (their pointers stay in registers),
  // one load of the packed queries serving them all; the rows are read interleaved, which the
  // prefetcher's steps make up for.
#pragma GCC unroll 2
  for (int h = 0; h < kBlock; h += kPassRows) {
    const float* keys = blk.keys + h * blk.key_stride;
    for (int64_t t = 0; t < a.dim_pad / G; ++t) {
      const Vec x = load(xp + t * kLanes);
      prefetch.step();
#pragma GCC unroll 8
      for (int j = 0; j < kPassRows; ++j) {
        const Vec k = broadcast<G>(keys + j * blk.key_stride + t * G);
        if constexpr (SIM == kSimManhattan) {
          s[h + j] += vabs(x - k);
        } else {
          s[h + j] += x * k;
        }
      }
    }
  }
  if constexpr (Q == 1 && kBlock == kLanes) {
    return single_query_block<SIM>(a, blk, st, s);
  }
  Vec block_max = splat(-kInf);
#pragma GCC unroll 16
  for (int j = 0; j < kBlock; ++j) {
    const float norm = SIM == kSimL2 ? a.neg_norms[blk.first + (j < blk.rows ? j : 0)] : 0.f;
    s[j] = j < blk.rows ? finish<SIM>(group_sum<G>(s[j]), splat(norm)) : splat(-kInf);
    block_max = vmax(block_max, s[j]);
  }
  const Vec best = load(st.best);
  const IVec improved = block_max > best;
  if (any(improved)) {
    for (int q = 0; q < group.rows; ++q) {
      const int lane = q * G;
      if (!improved[lane]) continue;
      for (int j = 0; j < blk.rows; ++j) {
        if (s[j][lane] == block_max[lane]) {  // the first index of the block's maximum
          st.index[q] = blk.first + j;
          break;
        }
      }
    }
    store(st.best, improved ? block_max : best);
  }
  if (a.window_scale > 0.f) {
    const Vec top = load(st.best);
    for (int j = 0; j < blk.rows; ++j) {
      // A little wider than the window: the exact threshold filters again.
      const IVec kept = ((s[j] - top) * a.window_scale > -1.f - 1e-5f) & (s[j] > load(st.floor));
      if (!any(kept)) continue;
      for (int q = 0; q < group.rows; ++q) {
        // (The floor is read again: an earlier row's compaction may have raised it.)
        if (kept[q * G] && s[j][q * G] > st.floor[q * G]) {
          keep(a, st, q, q * G, G, s[j][q * G], blk.first + j, top[q * G]);
        }
      }
    }
  }
  if (!a.accumulate) return;
  const Vec old_max = load(st.max);
  const Vec new_max = vmax(old_max, block_max);
  const int64_t vectors = a.value_dim_pad / G;
  if (any(new_max > old_max)) {
    // -inf before the first block: exp gives 0 and the zero state stays zero.
    rescale_state(st, vectors, exp_nonpositive(a.beta * (old_max - new_max)));
    store(st.max, new_max);
  }
  float* chunk_sum = st.sum + 2 * kLanes;
  Vec total = load(chunk_sum);
  IVec nonzero = IVec{};
#pragma GCC unroll 16
  for (int j = 0; j < kBlock; ++j) {
    // beta on the difference from the maximum: <= 0, finite or -inf, never beta * s.
    s[j] = exp_nonpositive(a.beta * (s[j] - new_max));
    total += s[j];
    nonzero |= s[j] != 0.f;
  }
  store(chunk_sum, total);
  if (!any(nonzero)) return;  // large beta: the block's weights all underflow
  add_values<G>(blk, st.acc + 2 * vectors * kLanes, vectors, [&](int j) { return s[j]; });
}

// Adds the chunk sums (the last kFlushBlocks blocks) to the running ones with Kahan's
// compensation: a running sum over a million memories in float32 would otherwise lose ~1e-4.
// `last`: the compensation goes into the result.
static void flush(const Args& a, const Group& group, GroupState& st, bool last) {
  const int64_t vectors = a.value_dim_pad / (kLanes / group.per_vector);
  auto add = [&](float* total, int64_t count) {
    float* comp = total + count * kLanes;
    float* chunk = comp + count * kLanes;
    for (int64_t c = 0; c < count; ++c) {
      const Vec sum = load(total + c * kLanes), y = load(chunk + c * kLanes) - load(comp + c * kLanes);
      const Vec t = sum + y;
      const Vec lost = (t - sum) - y;
      store(total + c * kLanes, last ? t - lost : t);
      store(comp + c * kLanes, last ? splat(0.f) : lost);
      store(chunk + c * kLanes, splat(0.f));
    }
  };
  add(st.sum, 1);
  add(st.acc, vectors);
}

template <int64_t SIM>
static void group_block_for(const Args& a, const Group& group, const Block& blk,
                            GroupState& st) {
  switch (group.per_vector) {
    case 1: return group_block<1, SIM>(a, group, blk, st);
    case 2: return group_block<2, SIM>(a, group, blk, st);
    case 4: return group_block<4, SIM>(a, group, blk, st);
#if HEN_FAST_LANES >= 8
    case 8: return group_block<8, SIM>(a, group, blk, st);
#endif
#if HEN_FAST_LANES >= 16
    case 16: return group_block<16, SIM>(a, group, blk, st);
#endif
    default: return;  // onepass.cpp packs only the sizes above
  }
}

static int64_t scratch_floats(const Args& a) {
  return kBlock * a.dim_pad + (a.values_are_keys ? 0 : kBlock * a.value_dim_pad);
}

static void pass(const Args& a, int64_t m0, int64_t m1, GroupState* states, float* scratch) {
  float* key_buffer = scratch;
  float* value_buffer = a.values_are_keys ? key_buffer : scratch + kBlock * a.dim_pad;
  // Full blocks of float32 rows whose length is a multiple of the vector are read in place (the
  // broadcasts load exactly the floats they use); the others are converted into the buffers.
  const bool keys_in_place = a.key_kind == kFloat32 && a.dim == a.dim_pad;
  const bool values_in_place = a.values_are_keys ? keys_in_place
                                                 : a.value_kind == kFloat32 && a.value_dim == a.value_dim_pad;
  __builtin_memset(scratch, 0, scratch_floats(a) * sizeof(float));
  const float* keys = static_cast<const float*>(a.keys);
  const float* values = static_cast<const float*>(a.values);
  const int64_t key_size = a.key_kind == kFloat32 ? 4 : 2, value_size = a.value_kind == kFloat32 ? 4 : 2;
  const bool fetch_values = a.accumulate && !a.values_are_keys;
  // Lines of a block over the score loop's iterations (the first group's).
  const int64_t lines = kBlock * ((a.dim * key_size + 63) / 64 +
                                  (fetch_values ? (a.value_dim * value_size + 63) / 64 : 0));
  const int64_t steps = (a.dim_pad / (kLanes / a.groups[0].per_vector)) * (kBlock / kPassRows);
  Prefetcher fetch;
  fetch.pace(lines, steps);
  for (int64_t b0 = m0; b0 < m1; b0 += kBlock) {
    const int64_t rows = m1 - b0 < kBlock ? m1 - b0 : kBlock;
    const bool full = rows == kBlock;
    Block blk{key_buffer, a.values_are_keys ? key_buffer : value_buffer, a.dim_pad,
              a.values_are_keys ? a.dim_pad : a.value_dim_pad, b0, rows, nullptr};
    const int64_t ahead = b0 + kPrefetchBlocks * kBlock;
    fetch.key_next = fetch.key_end = fetch.value_next = fetch.value_end = nullptr;
    fetch.tick = 0;
    if (ahead < m1) {
      const int64_t n = m1 - ahead < kBlock ? m1 - ahead : kBlock;
      Prefetcher::range(a.keys, a.key_stride * key_size, a.dim * key_size, ahead, n, fetch.key_next,
                        fetch.key_end);
      if (fetch_values) {
        Prefetcher::range(a.values, a.value_stride * value_size, a.value_dim * value_size, ahead,
                          n, fetch.value_next, fetch.value_end);
      }
    }
    if (!full) {  // the range's last block: rows past its end must be zero
      __builtin_memset(key_buffer, 0, kBlock * a.dim_pad * sizeof(float));
      if (!a.values_are_keys) __builtin_memset(value_buffer, 0, kBlock * a.value_dim_pad * sizeof(float));
    }
    if (full && keys_in_place) {
      blk.keys = keys + b0 * a.key_stride;
      blk.key_stride = a.key_stride;
    } else {
      for (int64_t j = 0; j < rows; ++j) {
        row_to_float(a.keys, a.key_stride, b0 + j, a.key_kind, a.dim, key_buffer + j * a.dim_pad);
      }
    }
    if (a.values_are_keys) {
      blk.values = blk.keys;
      blk.value_stride = blk.key_stride;
    } else if (a.accumulate && full && values_in_place) {
      blk.values = values + b0 * a.value_stride;
      blk.value_stride = a.value_stride;
    } else if (a.accumulate) {
      for (int64_t j = 0; j < rows; ++j) {
        row_to_float(a.values, a.value_stride, b0 + j, a.value_kind, a.value_dim,
                     value_buffer + j * a.value_dim_pad);
      }
    }
    const bool flush_now = a.accumulate && ((b0 - m0) / kBlock + 1) % kFlushBlocks == 0;
    for (int g = 0; g < a.num_groups; ++g) {
      blk.prefetch = g == 0 ? &fetch : nullptr;
      if (a.similarity == kSimDot) group_block_for<kSimDot>(a, a.groups[g], blk, states[g]);
      else if (a.similarity == kSimL2) group_block_for<kSimL2>(a, a.groups[g], blk, states[g]);
      else group_block_for<kSimManhattan>(a, a.groups[g], blk, states[g]);
      if (flush_now) flush(a, a.groups[g], states[g], false);
    }
  }
  for (int g = 0; g < a.num_groups && a.accumulate; ++g) flush(a, a.groups[g], states[g], true);
}
