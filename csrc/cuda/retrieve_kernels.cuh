// Device helpers shared by the CUDA retrieval passes: 16-byte bank loads, warp reductions, and
// the score tile every pass starts from.
//
// Layout of a pass: grid (query blocks, bank splits), kThreads threads. A block copies its
// kQueries queries into shared memory as float32 once, then streams its split of the bank in
// tiles of kTile rows. For a tile, each warp takes whole bank rows: its lanes read a row in
// 16-byte pieces (float4, or 8 halves / bfloat16s), each piece serving all kQueries queries, and
// one butterfly reduction (__shfl_xor_sync) per query finishes the row's scores. Query blocks of
// one split are neighbours in the grid, so blocks sharing a split read its rows from L2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "retrieve_cuda.h"

namespace hen_fast {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == kQueries, "the weighing steps give each query its own warp");
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

// Loads 16 bytes at p (16-byte aligned) as float32s.
__device__ __forceinline__ void load16(const float* __restrict__ p, float (&out)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ void load16(const __half* __restrict__ p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(pairs[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* __restrict__ p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(pairs[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The warp's largest value and, among equal ones, the smallest index (the first occurrence).
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, value, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other > value || (other == value && other_index < index)) {
      value = other;
      index = other_index;
    }
  }
}

// base^exponent for base >= 0, with the common exponents exact and cheap (powf's 0^0 = 1 kept).
__device__ __forceinline__ float power(float base, float exponent) {
  if (exponent == 1.f) return base;
  if (exponent == 2.f) return base * base;
  return powf(base, exponent);
}
__device__ __forceinline__ double power(double base, double exponent) {
  if (exponent == 1.0) return base;
  if (exponent == 2.0) return base * base;
  return pow(base, exponent);
}

// Row stride of the queries in shared memory: a multiple of 8 floats keeps every 16-byte piece
// aligned.
__host__ __device__ __forceinline__ int query_stride(int dim) { return (dim + 7) / 8 * 8; }

struct BlockRange {
  int q0;  // first query of the block
  int nq;  // queries in the block (<= kQueries)
  int64_t m_begin, m_end;  // the block's split of the bank
};

__device__ __forceinline__ BlockRange block_range(const PassArgs& a) {
  BlockRange b;
  b.q0 = static_cast<int>(blockIdx.x) * kQueries;
  b.nq = static_cast<int>(min(static_cast<int64_t>(kQueries), a.rows - b.q0));
  b.m_begin = static_cast<int64_t>(blockIdx.y) * a.split_size;
  b.m_end = max(b.m_begin, min(b.m_begin + a.split_size, a.num_memories));
  return b;
}

// x_s[q * ldx + t] = x[q0 + q][t]; zero for padding columns and for absent queries.
__device__ __forceinline__ void load_queries(const PassArgs& a, const BlockRange& b,
                                             float* __restrict__ x_s) {
  const int ldx = query_stride(a.dim);
  for (int i = threadIdx.x; i < kQueries * ldx; i += kThreads) {
    const int q = i / ldx, t = i - q * ldx;
    x_s[i] = (q < b.nq && t < a.dim) ? a.x[static_cast<int64_t>(b.q0 + q) * a.dim + t] : 0.f;
  }
}

// v clamped to [-FLT_MAX, FLT_MAX]; NaN stays NaN (comparisons with it are false).
__device__ __forceinline__ float clamp_finite(float v) {
  constexpr float kMax = 3.402823466e+38f;
  return v > kMax ? kMax : (v < -kMax ? -kMax : v);
}

template <int SIM>
__device__ __forceinline__ float term(float x, float k) {
  if (SIM == kManhattan) return fabsf(x - k);
  return x * k;
}

// z_s[q * kTile + r] = similarity of query q to bank row tile_start + r (l2: 2 x.k - ||k||^2),
// for r < rows and every q < kQueries (absent queries score their zero rows). One warp per bank
// row. The similarity is clamped to float's finite range (NaN stays NaN) and a.scale is NOT
// applied: the passes multiply differences from the row maximum by it, a.scale (s - s_max) <= 0,
// which is finite or -inf, never NaN, so beta up to 1e30 and scores beyond float's range give
// the limit (the memories whose similarity overflowed tie at FLT_MAX).
template <typename T, int SIM>
__device__ __forceinline__ void score_tile(const PassArgs& a, const float* __restrict__ x_s,
                                           int64_t tile_start, int rows, float* __restrict__ z_s) {
  constexpr int kVec = Vec<T>::kSize;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dim = a.dim, ldx = query_stride(dim);
  // Misaligned rows read element by element; aligned ones in 16-byte pieces plus a scalar tail.
  const int dim_vec = a.keys_aligned ? dim - dim % kVec : 0;
  const T* __restrict__ keys = static_cast<const T*>(a.keys);
  for (int r = warp; r < rows; r += kWarps) {
    const int64_t m = tile_start + r;
    const T* __restrict__ key = keys + m * a.key_stride;
    float part[kQueries];
#pragma unroll
    for (int q = 0; q < kQueries; ++q) part[q] = 0.f;
    for (int t0 = lane * kVec; t0 < dim_vec; t0 += 32 * kVec) {
      float k[kVec];
      load16(key + t0, k);
#pragma unroll
      for (int q = 0; q < kQueries; ++q) {
        const float4* xq = reinterpret_cast<const float4*>(x_s + q * ldx + t0);
#pragma unroll
        for (int h = 0; h < kVec / 4; ++h) {
          const float4 xv = xq[h];
          part[q] += term<SIM>(xv.x, k[4 * h]) + term<SIM>(xv.y, k[4 * h + 1]) +
                     term<SIM>(xv.z, k[4 * h + 2]) + term<SIM>(xv.w, k[4 * h + 3]);
        }
      }
    }
    for (int t = dim_vec + lane; t < dim; t += 32) {
      const float k = to_float(key[t]);
#pragma unroll
      for (int q = 0; q < kQueries; ++q) part[q] += term<SIM>(x_s[q * ldx + t], k);
    }
    float mine = 0.f;  // lane q keeps query q's total
#pragma unroll
    for (int q = 0; q < kQueries; ++q) {
      const float total = warp_sum(part[q]);
      if (lane == q) mine = total;
    }
    if (lane < kQueries) {
      float score;
      if (SIM == kDot) {
        score = mine;
      } else if (SIM == kL2) {
        score = 2.f * mine - a.sq_norms[m];
      } else {
        score = -mine;
      }
      z_s[lane * kTile + r] = clamp_finite(score);
    }
  }
}

// Runs body(T, SIM) for the runtime dtype and similarity codes; returns its cudaError_t.
#define HEN_FAST_DISPATCH(dtype, similarity, ...)                               \
  [&]() -> cudaError_t {                                                        \
    switch ((dtype) * kSimilarityCount + (similarity)) {                        \
      case kFloat32 * kSimilarityCount + kDot: {                                \
        using T = float; constexpr int SIM = kDot; __VA_ARGS__ }                \
      case kFloat32 * kSimilarityCount + kL2: {                                 \
        using T = float; constexpr int SIM = kL2; __VA_ARGS__ }                 \
      case kFloat32 * kSimilarityCount + kManhattan: {                          \
        using T = float; constexpr int SIM = kManhattan; __VA_ARGS__ }          \
      case kFloat16 * kSimilarityCount + kDot: {                                \
        using T = __half; constexpr int SIM = kDot; __VA_ARGS__ }               \
      case kFloat16 * kSimilarityCount + kL2: {                                 \
        using T = __half; constexpr int SIM = kL2; __VA_ARGS__ }                \
      case kFloat16 * kSimilarityCount + kManhattan: {                          \
        using T = __half; constexpr int SIM = kManhattan; __VA_ARGS__ }         \
      case kBFloat16 * kSimilarityCount + kDot: {                               \
        using T = __nv_bfloat16; constexpr int SIM = kDot; __VA_ARGS__ }        \
      case kBFloat16 * kSimilarityCount + kL2: {                                \
        using T = __nv_bfloat16; constexpr int SIM = kL2; __VA_ARGS__ }         \
      case kBFloat16 * kSimilarityCount + kManhattan: {                         \
        using T = __nv_bfloat16; constexpr int SIM = kManhattan; __VA_ARGS__ }  \
      default: return cudaErrorInvalidValue;                                    \
    }                                                                           \
  }()

// Dynamic shared memory above the 48 KB default needs an opt-in per kernel.
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace cuda
}  // namespace hen_fast
