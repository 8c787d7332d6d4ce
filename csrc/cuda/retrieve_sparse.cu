// Sparse separations (sparsemax = entmax with alpha 2, entmax any alpha in (1, 2]) with exact
// thresholds, in the candidate-buffer form:
//
// Everything is relative to the row maximum: with s the similarity (score_tile) and a.scale =
// (alpha - 1) beta, y = a.scale (s - s_max) <= 0 in double, never NaN, and tau in [-1, 0). So
// beta up to 1e30 and scores beyond float's range give the limit; tau64 and the float tau the
// output pass reads are relative, y_max64 is the row's maximum similarity s_max.
// 1. candidate pass: per (query block, split) a running max of s, and every s whose y relative
//    to the running max is above -1 appended to the query's buffer (atomic slot). The
//    support lies in y > -1 and a split's running max is at most the row's, so the
//    buffer holds the whole support unless it overflows.
// 2. threshold kernel (one block per query): merges the argmax, keeps the window y > -1,
//    sorts it (bitonic, in shared memory, ties by memory index so the result is deterministic),
//    solves tau exactly (closed forms for alpha 2 and 1.5, Newton from the left otherwise), and
//    forms the output from the support rows alone.
// 3. rows whose buffer (or window) overflowed keep that tau, a lower bound of the true one, as
//    the start of Newton passes over the whole bank (stats pass + newton step, driven by the
//    host), then an output pass over the bank (retrieve_dense.cu, kEntmaxOutput).

#include <cfloat>
#include <climits>

#include "retrieve_kernels.cuh"

namespace hen_fast {
namespace cuda {
namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr int kNewtonIterations = 100;

template <typename T, int SIM>
__global__ void __launch_bounds__(kThreads) candidate_pass_kernel(const PassArgs a) {
  extern __shared__ float4 shared_f4[];
  float* x_s = reinterpret_cast<float*>(shared_f4);
  float* z_s = x_s + kQueries * query_stride(a.dim);
  __shared__ float best_s[kQueries];
  __shared__ int64_t index_s[kQueries];
  const BlockRange b = block_range(a);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid < kQueries) {
    best_s[tid] = -kInf;
    index_s[tid] = INT64_MAX;
  }
  load_queries(a, b, x_s);
  __syncthreads();
  const int64_t row = b.q0 + warp;
  for (int64_t tile_start = b.m_begin; tile_start < b.m_end; tile_start += kTile) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTile), b.m_end - tile_start));
    score_tile<T, SIM>(a, x_s, tile_start, rows, z_s);
    __syncthreads();
    if (warp < b.nq) {
      const float* zq = z_s + warp * kTile;
      float best = -kInf;
      int best_row = INT_MAX;
      for (int r = lane; r < rows; r += 32) {
        if (zq[r] > best) {
          best = zq[r];
          best_row = r;
        }
      }
      warp_argmax(best, best_row);
      const float old_best = best_s[warp];
      const double running_max = fmaxf(old_best, best);
      for (int r = lane; r < rows; r += 32) {
        if (a.scale * (static_cast<double>(zq[r]) - running_max) > -1.0) {
          const int slot = atomicAdd(a.cand_count + row, 1);
          if (slot < a.capacity) {
            a.cand_y[row * a.capacity + slot] = zq[r];
            a.cand_index[row * a.capacity + slot] = static_cast<int>(tile_start + r);
          }
        }
      }
      __syncwarp();  // every lane has read best_s before lane 0 rewrites it
      if (lane == 0 && best > old_best) {  // strict: an earlier tile keeps a tie
        best_s[warp] = best;
        index_s[warp] = tile_start + best_row;
      }
    }
    __syncthreads();
  }
  const int64_t base = static_cast<int64_t>(blockIdx.y) * a.rows + b.q0;
  if (tid < b.nq) {
    a.part_best[base + tid] = best_s[tid];
    a.part_index[base + tid] = index_s[tid];
  }
}

// True when entry (y1, i1) comes before (y2, i2): larger y first, then smaller memory index.
__device__ __forceinline__ bool comes_first(float y1, int i1, float y2, int i2) {
  return y1 > y2 || (y1 == y2 && i1 < i2);
}

// Sorts n (a power of 2) entries in shared memory by comes_first; every thread calls it.
__device__ void bitonic_sort(float* y, int* index, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const bool swap = (i & k) == 0 ? comes_first(y[partner], index[partner], y[i], index[i])
                                         : comes_first(y[i], index[i], y[partner], index[partner]);
          if (swap) {
            const float ty = y[i];
            y[i] = y[partner];
            y[partner] = ty;
            const int ti = index[i];
            index[i] = index[partner];
            index[partner] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
}

__device__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];  // fixed order: deterministic
  __syncthreads();
  return total;
}

// tau of sum_k [y_k - tau]_+^q = 1 on the sorted window y[0..n) (n >= 1), every thread calls it.
// Newton from the left on h(tau) = ||[y - tau]_+||_q, as hen_fast/numerics.py.
__device__ double newton_threshold(const float* y, int n, double alpha, double* scratch) {
  const double q = 1.0 / (alpha - 1.0);
  double tau = static_cast<double>(y[0]) - 1.0;
  for (int iteration = 0; iteration < kNewtonIterations; ++iteration) {
    const double span = y[0] - tau;
    double sum_q = 0.0, sum_q1 = 0.0;
    for (int k = threadIdx.x; k < n; k += kThreads) {
      const double r = fmax(0.0, y[k] - tau) / span;
      if (r > 0.0) {
        sum_q += power(r, q);
        sum_q1 += power(r, q - 1.0);
      }
    }
    sum_q = block_sum(sum_q, scratch);
    sum_q1 = block_sum(sum_q1, scratch);
    const double norm = pow(sum_q, 1.0 / q);
    const double step = fmax(0.0, (span * norm - 1.0) / (norm / sum_q * sum_q1));
    tau += step;
    if (!(step > 4 * DBL_EPSILON * fmax(fabs(tau), span))) break;  // same on every thread
  }
  return tau;
}

// Closed forms for alpha 2 (sparsemax) and 1.5 over the sorted window, one thread.
__device__ double sorted_threshold(const float* y, int n, double alpha) {
  double sum = 0.0, sum_sq = 0.0, tau = static_cast<double>(y[0]) - 1.0;
  for (int k = 1; k <= n; ++k) {
    const double yk = y[k - 1];
    sum += yk;
    sum_sq += yk * yk;
    double candidate;
    if (alpha == 2.0) {
      candidate = (sum - 1.0) / k;
    } else {
      const double mean = sum / k, spread = sum_sq - k * mean * mean;
      candidate = mean - sqrt(fmax(0.0, (1.0 - spread) / k));
    }
    if (candidate < yk) {
      tau = candidate;
    } else {
      break;
    }
  }
  return tau;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) threshold_kernel(const PassArgs a, const Outputs o,
                                                             int* row_flag, double* tau64,
                                                             double* y_max64) {
  __shared__ float window_y[kWindow];
  __shared__ int window_index[kWindow];
  __shared__ double scratch[kWarps];
  __shared__ int kept_s;
  __shared__ float y_max_s;
  __shared__ double tau_s, total_s;
  __shared__ int support_s;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const double alpha = a.alpha;
  if (tid == 0) {
    float best = -kInf;
    int64_t index = INT64_MAX;
    for (int s = 0; s < a.splits; ++s) {
      const float v = a.part_best[s * a.rows + row];
      const int64_t i = a.part_index[s * a.rows + row];
      if (v > best || (v == best && i < index)) {
        best = v;
        index = i;
      }
    }
    o.argmax[row] = index;
    y_max_s = best;
    kept_s = 0;
  }
  __syncthreads();
  const double s_max = y_max_s;
  const int count = a.cand_count[row];
  const int stored = min(count, a.capacity);
  for (int i = tid; i < stored; i += kThreads) {
    const double y = a.scale * (static_cast<double>(a.cand_y[row * a.capacity + i]) - s_max);
    if (y > -1.0) {
      const int slot = atomicAdd(&kept_s, 1);
      if (slot < kWindow) {
        window_y[slot] = static_cast<float>(y);
        window_index[slot] = a.cand_index[row * a.capacity + i];
      }
    }
  }
  __syncthreads();
  const int kept = min(kept_s, kWindow);
  // A window that lost entries gives a tau at or below the true one: the Newton fallback's start.
  const bool overflow = count > a.capacity || kept_s > kWindow;
  int padded = 1;
  while (padded < kept) padded <<= 1;
  for (int i = kept + tid; i < padded; i += kThreads) {
    window_y[i] = -kInf;
    window_index[i] = INT_MAX;
  }
  __syncthreads();
  bitonic_sort(window_y, window_index, padded);
  double tau;
  if (kept == 0) {
    tau = -1.0;
  } else if (alpha == 2.0 || alpha == 1.5) {
    if (tid == 0) tau_s = sorted_threshold(window_y, kept, alpha);
    __syncthreads();
    tau = tau_s;
  } else {
    tau = newton_threshold(window_y, kept, alpha, scratch);
  }
  if (tid == 0) {
    row_flag[row] = overflow ? 1 : 0;
    tau64[row] = tau;
    y_max64[row] = s_max;
  }
  if (overflow) return;  // uniform: every thread computed the same flag
  // The support is a prefix of the sorted window. Weights overwrite the scores in place.
  if (tid == 0) {
    const double q = 1.0 / (alpha - 1.0);
    double total = 0.0, pz = 0.0, pa = 0.0;
    int k = 0;
    for (; k < kept; ++k) {
      const double y = window_y[k];
      const double weight = y > tau ? power(y - tau, q) : 0.0;
      if (weight <= 0.0) break;
      window_y[k] = static_cast<float>(weight);
      total += weight;
      pz += weight * y / (alpha - 1.0);
      pa += pow(weight, alpha);
    }
    support_s = k;
    total_s = total;
    o.support[row] = k;
    // <p, z> = beta s_max + <p, y> / (alpha - 1), beta = a.scale / (alpha - 1).
    o.lse[row] = static_cast<float>(a.scale / (alpha - 1.0) * s_max + pz / total +
                                    (1.0 - pa / pow(total, alpha)) / (alpha * (alpha - 1.0)));
  }
  __syncthreads();
  const int support = support_s;
  const float total = static_cast<float>(total_s);
  const T* __restrict__ values = static_cast<const T*>(a.values);
  for (int c = tid; c < a.value_dim; c += kThreads) {
    float v = 0.f;
    for (int k = 0; k < support; ++k) {
      v = fmaf(window_y[k], to_float(values[window_index[k] * a.value_stride + c]), v);
    }
    o.out[row * a.value_dim + c] = v / total;
  }
}

__global__ void newton_step_kernel(const PassArgs a, int* row_done, double* tau64, float* tau) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.rows || !a.row_flag[row] || row_done[row]) return;
  double sum_q = 0.0, sum_q1 = 0.0;
  for (int s = 0; s < a.splits; ++s) {
    sum_q += a.part_sums[2 * (s * a.rows + row)];
    sum_q1 += a.part_sums[2 * (s * a.rows + row) + 1];
  }
  const double q = 1.0 / (static_cast<double>(a.alpha) - 1.0);
  const double old_tau = tau64[row], span = -old_tau;  // relative: the maximum is y = 0
  const double norm = pow(sum_q, 1.0 / q);
  double step = (span * norm - 1.0) / (norm / sum_q * sum_q1);
  if (!(step > 0.0)) step = 0.0;  // NaN too
  const double new_tau = old_tau + step;
  tau64[row] = new_tau;
  tau[row] = static_cast<float>(new_tau);
  // The bank's sums come from float32 scores: stop at float32's resolution, as the CPU kernel.
  if (step <= 16 * static_cast<double>(FLT_EPSILON) * fmax(fabs(new_tau), span)) row_done[row] = 1;
}

template <typename T, int SIM>
cudaError_t launch_candidates(const PassArgs& a, cudaStream_t stream) {
  const size_t bytes =
      sizeof(float) * (static_cast<size_t>(kQueries) * (query_stride(a.dim) + kTile));
  auto kernel = candidate_pass_kernel<T, SIM>;
  cudaError_t error = allow_shared_memory(kernel, bytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>((a.rows + kQueries - 1) / kQueries),
                  static_cast<unsigned>(a.splits));
  kernel<<<grid, kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_candidate_pass(const PassArgs& a, cudaStream_t stream) {
  if (a.dim > kMaxDim || a.rows < 1 || a.capacity < 1) return cudaErrorInvalidValue;
  return HEN_FAST_DISPATCH(a.dtype, a.similarity, { return launch_candidates<T, SIM>(a, stream); });
}

cudaError_t launch_threshold(const PassArgs& a, const Outputs& outputs, int* row_flag,
                             double* tau64, double* y_max64, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows));
  switch (a.dtype) {
    case kFloat32:
      threshold_kernel<float><<<grid, kThreads, 0, stream>>>(a, outputs, row_flag, tau64, y_max64);
      break;
    case kFloat16:
      threshold_kernel<__half><<<grid, kThreads, 0, stream>>>(a, outputs, row_flag, tau64,
                                                              y_max64);
      break;
    case kBFloat16:
      threshold_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a, outputs, row_flag, tau64,
                                                                     y_max64);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_newton_step(const PassArgs& a, int* row_done, double* tau64, float* tau,
                               cudaStream_t stream) {
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((a.rows + threads - 1) / threads));
  newton_step_kernel<<<grid, threads, 0, stream>>>(a, row_done, tau64, tau);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace hen_fast
