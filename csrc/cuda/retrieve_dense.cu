// Dense passes over the bank: softmax and polynomial updates (one pass, split over the bank,
// then a combine kernel), the output pass of the sparse fallback, and the statistics passes
// (softmax support counts, Newton sums of the sparse fallback).
//
// Per (query block, split) the dense pass keeps, for each query, a running max m, a running sum
// l and a float32 accumulator over the value columns:
//   softmax     scores are beta log2(e) sim, weights exp2(z - m), rescaled by exp2(m_old - m)
//   polynomial  scores beta sim, weights (relu(z) / m)^n with m the running max of relu(z),
//               rescaled by (m_old / m)^n (the scale cancels in the ratio, nothing overflows)
//   entmax out  weights [y - tau]_+^(1/(alpha-1)) with tau given, no rescaling
// The combine kernel merges the splits: L = sum_s l_s w_s, out = sum_s acc_s w_s / L with
// w_s = exp2(m_s - max m) (softmax) or (m_s / max m)^n (polynomial).

#include <algorithm>
#include <climits>

#include "retrieve_kernels.cuh"

namespace hen_fast {
namespace cuda {
namespace {

constexpr float kInf = __builtin_huge_valf();

struct QueryState {
  float max[kQueries], sum[kQueries], scale[kQueries], best[kQueries], tau[kQueries];
  float top[kQueries];  // kEntmaxOutput: the row's maximum similarity (tau is relative to it)
  float pz[kQueries], pa[kQueries];
  int64_t index[kQueries], count[kQueries];
};

// Warp `q` turns its query's scores in z_s into weights and updates the query's running state.
template <int MODE>
__device__ __forceinline__ void weigh_tile(const PassArgs& a, QueryState& s, int q,
                                           int64_t tile_start, int rows, float* __restrict__ z_s) {
  const int lane = threadIdx.x % 32;
  float* __restrict__ zq = z_s + q * kTile;
  float best = -kInf;
  int best_row = INT_MAX;
  for (int r = lane; r < rows; r += 32) {
    if (zq[r] > best) {
      best = zq[r];
      best_row = r;
    }
  }
  warp_argmax(best, best_row);
  const float old_max = s.max[q];
  float new_max = old_max, scale = 1.f, sum = 0.f, pz = 0.f, pa = 0.f;
  int count = 0;
  if (MODE == kSoftmax) {
    // Similarities: a.scale (beta log2 e) multiplies differences from the running max only.
    new_max = fmaxf(old_max, best);
    scale = exp2f(a.scale * (old_max - new_max));  // 0 on the first tile (old_max = -inf)
    for (int r = lane; r < rows; r += 32) {
      const float w = exp2f(a.scale * (zq[r] - new_max));
      zq[r] = w;
      sum += w;
    }
  } else if (MODE == kPolynomial) {
    // relu(beta s)^n normalised: beta cancels, the similarities are used as they are.
    new_max = fmaxf(old_max, best);  // old_max >= 0: the running max of relu(z)
    const float divisor = new_max > 0.f ? new_max : 1.f;
    scale = power(old_max / divisor, a.degree);
    for (int r = lane; r < rows; r += 32) {
      const float z = zq[r];
      count += z > 0.f;
      const float w = power(fmaxf(z, 0.f) / divisor, a.degree);
      zq[r] = w;
      sum += w;
    }
  } else {
    // y = (alpha - 1) beta (s - s_max) and tau, both relative to the row maximum.
    const float tau = s.tau[q], exponent = static_cast<float>(1.0 / (a.alpha - 1.0));
    const float alpha = static_cast<float>(a.alpha), top = s.top[q];
    for (int r = lane; r < rows; r += 32) {
      const float y = a.scale * (zq[r] - top), excess = y - tau;
      const float w = excess > 0.f ? power(excess, exponent) : 0.f;
      zq[r] = w;
      sum += w;
      count += w > 0.f;
      pz += w * y;
      pa += power(w, alpha);
    }
    pz = warp_sum(pz);
    pa = warp_sum(pa);
  }
  sum = warp_sum(sum);
  count = warp_sum(count);
  __syncwarp();  // every lane has read s.max[q] before lane 0 rewrites it
  if (lane == 0) {
    s.scale[q] = scale;
    s.sum[q] = s.sum[q] * scale + sum;
    s.max[q] = new_max;
    s.count[q] += count;
    s.pz[q] += pz;
    s.pa[q] += pa;
    if (best > s.best[q]) {  // strict: an earlier tile keeps a tie
      s.best[q] = best;
      s.index[q] = tile_start + best_row;
    }
  }
}

// Loads the value columns [col0, col0 + unit) of bank row m as float32, zero past the slab.
template <typename T>
__device__ __forceinline__ void load_values(const PassArgs& a, int64_t m, int col0, int unit,
                                            float (&v)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  const T* __restrict__ row = static_cast<const T*>(a.values) + m * a.value_stride;
  if (unit == kVec && col0 + kVec <= a.value_dim) {
    load16(row + col0, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int c = col0 + i;
    v[i] = (i < unit && c < a.value_dim) ? to_float(row[c]) : 0.f;
  }
}

template <typename T, int SIM, int MODE>
__global__ void __launch_bounds__(kThreads) dense_pass_kernel(const PassArgs a) {
  constexpr int kVec = Vec<T>::kSize;
  extern __shared__ float4 shared_f4[];
  float* x_s = reinterpret_cast<float*>(shared_f4);
  float* z_s = x_s + kQueries * query_stride(a.dim);
  float* acc_s = z_s + kQueries * kTile;
  __shared__ QueryState s;
  __shared__ int any_flagged;
  const BlockRange b = block_range(a);
  const int tid = threadIdx.x, warp = tid / 32;
  if (MODE == kEntmaxOutput) {  // the fallback's output pass: only blocks with a flagged row
    if (tid == 0) {
      int any = 0;
      for (int q = 0; q < b.nq; ++q) any |= a.row_flag[b.q0 + q];
      any_flagged = any;
    }
    __syncthreads();
    if (!any_flagged) return;
  }
  if (tid < kQueries) {
    s.max[tid] = MODE == kSoftmax ? -kInf : 0.f;
    s.sum[tid] = 0.f;
    s.scale[tid] = 1.f;
    s.best[tid] = -kInf;
    s.index[tid] = INT64_MAX;
    s.count[tid] = 0;
    s.pz[tid] = 0.f;
    s.pa[tid] = 0.f;
    s.tau[tid] = (MODE == kEntmaxOutput && tid < b.nq) ? a.tau[b.q0 + tid] : 0.f;
    s.top[tid] = (MODE == kEntmaxOutput && tid < b.nq)
                     ? static_cast<float>(a.y_max64[b.q0 + tid]) : 0.f;
  }
  load_queries(a, b, x_s);
  for (int i = tid; i < kQueries * a.value_dim; i += kThreads) acc_s[i] = 0.f;
  // Value columns: thread = (group, chunk); a chunk is one 16-byte piece (unit columns), and the
  // groups take every groups-th row of a tile, so each value element is read once per block.
  const int unit = a.values_aligned ? kVec : 1;
  const int chunks = (a.value_dim + unit - 1) / unit;  // <= kThreads (max_value_slab)
  const int groups = kThreads / chunks;
  const int group = tid / chunks, col0 = (tid % chunks) * unit;
  float acc[kQueries][kVec];
#pragma unroll
  for (int q = 0; q < kQueries; ++q) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[q][i] = 0.f;
  }
  __syncthreads();
  for (int64_t tile_start = b.m_begin; tile_start < b.m_end; tile_start += kTile) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTile), b.m_end - tile_start));
    score_tile<T, SIM>(a, x_s, tile_start, rows, z_s);
    __syncthreads();
    if (warp < b.nq) {
      weigh_tile<MODE>(a, s, warp, tile_start, rows, z_s);
    } else {  // absent query: zero weights
      for (int r = tid % 32; r < rows; r += 32) z_s[warp * kTile + r] = 0.f;
    }
    __syncthreads();
    if (group < groups) {
#pragma unroll
      for (int q = 0; q < kQueries; ++q) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[q][i] *= s.scale[q];
      }
      for (int r = group; r < rows; r += groups) {
        float v[kVec];
        load_values<T>(a, tile_start + r, col0, unit, v);
#pragma unroll
        for (int q = 0; q < kQueries; ++q) {
          const float w = z_s[q * kTile + r];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[q][i] = fmaf(w, v[i], acc[q][i]);
        }
      }
    }
    __syncthreads();
  }
  // Groups add their accumulators in a fixed order: the result does not depend on scheduling.
  for (int turn = 0; turn < groups; ++turn) {
    if (group == turn) {
#pragma unroll
      for (int q = 0; q < kQueries; ++q) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const int c = col0 + i;
          if (q < b.nq && i < unit && c < a.value_dim) acc_s[q * a.value_dim + c] += acc[q][i];
        }
      }
    }
    __syncthreads();
  }
  const int64_t base = static_cast<int64_t>(blockIdx.y) * a.rows + b.q0;  // [split][row]
  if (tid < b.nq) {
    a.part_max[base + tid] = s.max[tid];
    a.part_sum[base + tid] = s.sum[tid];
    a.part_best[base + tid] = s.best[tid];
    a.part_index[base + tid] = s.index[tid];
    a.part_count[base + tid] = s.count[tid];
    if (MODE == kEntmaxOutput) {
      a.part_pz[base + tid] = s.pz[tid];
      a.part_pa[base + tid] = s.pa[tid];
    }
  }
  for (int i = tid; i < b.nq * a.value_dim; i += kThreads) {
    const int q = i / a.value_dim, c = i - q * a.value_dim;
    a.part_acc[(base + q) * a.value_pitch + a.value_offset + c] = acc_s[i];
  }
}

// One block per row: merges the splits' partial states into out, support, argmax and lse.
template <int MODE>
__global__ void __launch_bounds__(kThreads) combine_kernel(const PassArgs a, const Outputs o) {
  extern __shared__ float split_weight[];  // [splits]
  __shared__ float total_s;
  const int64_t row = blockIdx.x;
  if (a.row_flag != nullptr && !a.row_flag[row]) return;
  const int splits = a.splits;
  const int64_t rows = a.rows;
  float top = MODE == kSoftmax ? -kInf : 0.f;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, a.part_max[s * rows + row]);
  const float divisor = top > 0.f ? top : 1.f;
  for (int s = threadIdx.x; s < splits; s += kThreads) {
    const float m = a.part_max[s * rows + row];
    split_weight[s] = MODE == kSoftmax       ? exp2f(a.scale * (m - top))
                      : MODE == kPolynomial ? power(m / divisor, a.degree)
                                            : 1.f;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f, pz = 0.f, pa = 0.f, best = -kInf;
    int64_t count = 0, index = INT64_MAX;
    for (int s = 0; s < splits; ++s) {
      const int64_t slot = s * rows + row;
      total += a.part_sum[slot] * split_weight[s];
      count += a.part_count[slot];
      const float b = a.part_best[slot];
      if (b > best || (b == best && a.part_index[slot] < index)) {
        best = b;
        index = a.part_index[slot];
      }
      if (MODE == kEntmaxOutput) {
        pz += a.part_pz[slot];
        pa += a.part_pa[slot];
      }
    }
    float lse;
    // In double: beta s_max may lie beyond float's range (then lse is +-inf, never NaN).
    if (MODE == kSoftmax) {
      lse = static_cast<float>((static_cast<double>(a.scale) * top + log2(total)) * kLn2);
    } else if (MODE == kPolynomial) {
      lse = total > 0.f ? static_cast<float>(a.degree * (log(static_cast<double>(top)) +
                                                         log(static_cast<double>(a.scale))) +
                                             log(static_cast<double>(total)))
                        : -kInf;
    } else {
      // <p, z> = beta s_max + <p, y> / (alpha - 1), beta = a.scale / (alpha - 1).
      const double alpha = a.alpha;
      lse = static_cast<float>(a.scale / (alpha - 1.0) * a.y_max64[row] +
                               pz / (alpha - 1.0) / total +
                               (1.0 - pa / pow(total, alpha)) / (alpha * (alpha - 1.0)));
    }
    total_s = total;
    o.support[row] = count;
    o.argmax[row] = index;
    o.lse[row] = lse;
    if (o.row_max != nullptr) o.row_max[row] = top;
    if (o.threshold != nullptr && MODE != kEntmaxOutput) {
      // total = sum exp2(scale (s - top)) = sum exp(beta (s - s_max)) for softmax, and
      // sum (relu(s) / top)^n for polynomial.
      o.threshold[row] = MODE == kSoftmax ? static_cast<float>(log(static_cast<double>(total)))
                         : total > 0.f
                             ? static_cast<float>(a.degree * log(static_cast<double>(top)) +
                                                  log(static_cast<double>(total)))
                             : -kInf;
    }
  }
  __syncthreads();
  const float total = total_s;
  for (int c = threadIdx.x; c < a.value_dim; c += kThreads) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) {
      v = fmaf(a.part_acc[(s * rows + row) * a.value_pitch + c], split_weight[s], v);
    }
    // A polynomial row whose scores are all <= 0 has no weight at all: a zero output.
    o.out[row * a.value_dim + c] = total > 0.f ? v / total : 0.f;
  }
}

// Per (split, row): the count of scores a.scale s above a.threshold[row] (softmax support), or
// the Newton sums of the sparse fallback, sum r^q and sum_{r>0} r^(q-1) with r = [y - tau]_+ /
// (-tau), y = a.scale (s - s_max) and tau relative to the row maximum s_max = a.y_max64[row].
template <typename T, int SIM, int MODE>
__global__ void __launch_bounds__(kThreads) stats_pass_kernel(const PassArgs a) {
  extern __shared__ float4 shared_f4[];
  float* x_s = reinterpret_cast<float*>(shared_f4);
  float* z_s = x_s + kQueries * query_stride(a.dim);
  __shared__ int active_s[kQueries];
  __shared__ int any_active;
  const BlockRange b = block_range(a);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid < kQueries) {
    const int row = b.q0 + tid;
    active_s[tid] = tid < b.nq && (MODE == kCountAbove || (a.row_flag[row] && !a.row_done[row]));
  }
  __syncthreads();
  if (tid == 0) {
    int any = 0;
    for (int q = 0; q < kQueries; ++q) any |= active_s[q];
    any_active = any;
  }
  load_queries(a, b, x_s);
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.y) * a.rows + b.q0;
  if (!any_active) {
    if (tid < b.nq) {
      if (MODE == kCountAbove) a.part_count[base + tid] = 0;
      else a.part_sums[2 * (base + tid)] = a.part_sums[2 * (base + tid) + 1] = 0.0;
    }
    return;
  }
  const bool active = active_s[warp];
  const int row = b.q0 + warp;
  const float threshold = (MODE == kCountAbove && active) ? a.threshold[row] : 0.f;
  const float row_max = (MODE == kCountAbove && active) ? a.row_max[row] : 0.f;
  const double tau = (MODE == kNewtonSums && active) ? a.tau64[row] : 0.0;
  const double span = (MODE == kNewtonSums && active) ? -tau : 1.0;
  const double top = (MODE == kNewtonSums && active) ? a.y_max64[row] : 0.0;
  const double exponent = 1.0 / (static_cast<double>(a.alpha) - 1.0);
  int64_t count = 0;
  double sum_q = 0.0, sum_q1 = 0.0;
  for (int64_t tile_start = b.m_begin; tile_start < b.m_end; tile_start += kTile) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTile), b.m_end - tile_start));
    score_tile<T, SIM>(a, x_s, tile_start, rows, z_s);
    __syncthreads();
    if (active) {
      for (int r = lane; r < rows; r += 32) {
        const float z = z_s[warp * kTile + r];
        if (MODE == kCountAbove) {
          count += a.scale * (z - row_max) > threshold;
        } else {
          const double y = static_cast<double>(a.scale) * (static_cast<double>(z) - top);
          const double ratio = fmax(y - tau, 0.0) / span;
          if (ratio > 0.0) {
            sum_q += power(ratio, exponent);
            sum_q1 += power(ratio, exponent - 1.0);
          }
        }
      }
    }
    __syncthreads();
  }
  count = warp_sum(count);
  sum_q = warp_sum(sum_q);
  sum_q1 = warp_sum(sum_q1);
  if (lane == 0 && warp < b.nq) {
    if (MODE == kCountAbove) {
      a.part_count[base + warp] = count;
    } else {
      a.part_sums[2 * (base + warp)] = sum_q;
      a.part_sums[2 * (base + warp) + 1] = sum_q1;
    }
  }
}

size_t pass_shared_bytes(const PassArgs& a, bool with_values) {
  return sizeof(float) * (static_cast<size_t>(kQueries) * query_stride(a.dim) +
                          static_cast<size_t>(kQueries) * kTile +
                          (with_values ? static_cast<size_t>(kQueries) * a.value_dim : 0));
}

dim3 pass_grid(const PassArgs& a) {
  return dim3(static_cast<unsigned>((a.rows + kQueries - 1) / kQueries),
              static_cast<unsigned>(a.splits));
}

template <typename T, int SIM, int MODE>
cudaError_t launch_dense(const PassArgs& a, cudaStream_t stream) {
  const size_t bytes = pass_shared_bytes(a, true);
  auto kernel = dense_pass_kernel<T, SIM, MODE>;
  cudaError_t error = allow_shared_memory(kernel, bytes);
  if (error != cudaSuccess) return error;
  kernel<<<pass_grid(a), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int SIM, int MODE>
cudaError_t launch_stats(const PassArgs& a, cudaStream_t stream) {
  const size_t bytes = pass_shared_bytes(a, false);
  auto kernel = stats_pass_kernel<T, SIM, MODE>;
  cudaError_t error = allow_shared_memory(kernel, bytes);
  if (error != cudaSuccess) return error;
  kernel<<<pass_grid(a), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

void plan_splits(int64_t rows, int64_t num_memories, int device, int* splits,
                 int64_t* split_size) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();  // clear it: a guess of the SM count only costs speed
    sms = 108;
  }
  const int64_t blocks = (rows + kQueries - 1) / kQueries;
  const int64_t wanted = (2 * sms + blocks - 1) / blocks;
  const int64_t most = num_memories / (4 * kTile);  // every split at least 4 tiles
  int64_t count = std::max<int64_t>(1, std::min(wanted, most));
  const int64_t size = (num_memories + count - 1) / count;
  count = (num_memories + size - 1) / size;  // no empty split
  *splits = static_cast<int>(count);
  *split_size = size;
}

int max_value_slab(int dtype, bool values_aligned) {
  const int unit = values_aligned ? (dtype == kFloat32 ? 4 : 8) : 1;
  return kThreads * unit;
}

cudaError_t launch_dense_pass(const PassArgs& a, int mode, cudaStream_t stream) {
  if (a.dim > kMaxDim || a.value_dim > max_value_slab(a.dtype, a.values_aligned) ||
      a.value_dim < 1 || a.rows < 1) {
    return cudaErrorInvalidValue;
  }
  return HEN_FAST_DISPATCH(a.dtype, a.similarity, {
    switch (mode) {
      case kSoftmax: return launch_dense<T, SIM, kSoftmax>(a, stream);
      case kPolynomial: return launch_dense<T, SIM, kPolynomial>(a, stream);
      case kEntmaxOutput: return launch_dense<T, SIM, kEntmaxOutput>(a, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

cudaError_t launch_combine(const PassArgs& a, int mode, const Outputs& outputs,
                           cudaStream_t stream) {
  const size_t bytes = sizeof(float) * a.splits;
  const dim3 grid(static_cast<unsigned>(a.rows));
  switch (mode) {
    case kSoftmax: combine_kernel<kSoftmax><<<grid, kThreads, bytes, stream>>>(a, outputs); break;
    case kPolynomial:
      combine_kernel<kPolynomial><<<grid, kThreads, bytes, stream>>>(a, outputs);
      break;
    case kEntmaxOutput:
      combine_kernel<kEntmaxOutput><<<grid, kThreads, bytes, stream>>>(a, outputs);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_stats_pass(const PassArgs& a, int mode, cudaStream_t stream) {
  if (a.dim > kMaxDim || a.rows < 1) return cudaErrorInvalidValue;
  return HEN_FAST_DISPATCH(a.dtype, a.similarity, {
    return mode == kCountAbove ? launch_stats<T, SIM, kCountAbove>(a, stream)
                               : launch_stats<T, SIM, kNewtonSums>(a, stream);
  });
}

}  // namespace cuda
}  // namespace hen_fast
