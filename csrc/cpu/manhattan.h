// Manhattan scores on the CPU, shared by the forward (retrieve_cpu.cpp) and backward
// (retrieve_backward_cpu.cpp) ops: each includes it into its own anonymous namespace.
#pragma once

#include <cmath>
#include <cstdint>

namespace hen_fast {
namespace {

// scale * sum_t |x_t - k_t| for a block of queries against a block of keys, four queries at a
// time so each key element loaded serves four accumulators. Compiled for AVX2 and a portable default,
// chosen at run time.
__attribute__((target_clones("avx2", "default")))
void manhattan_block(const float* xs, int64_t rows, const float* ks, int64_t cols, int64_t d,
                     float* out, int64_t out_stride, float scale) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const float *x0 = xs + i * d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
    for (int64_t j = 0; j < cols; ++j) {
      const float* k = ks + j * d;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t t = 0; t < d; ++t) {
        s0 += std::fabs(x0[t] - k[t]);
        s1 += std::fabs(x1[t] - k[t]);
        s2 += std::fabs(x2[t] - k[t]);
        s3 += std::fabs(x3[t] - k[t]);
      }
      out[i * out_stride + j] = scale * s0;
      out[(i + 1) * out_stride + j] = scale * s1;
      out[(i + 2) * out_stride + j] = scale * s2;
      out[(i + 3) * out_stride + j] = scale * s3;
    }
  }
  for (; i < rows; ++i) {
    const float* xi = xs + i * d;
    for (int64_t j = 0; j < cols; ++j) {
      const float* k = ks + j * d;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < d; ++t) sum += std::fabs(xi[t] - k[t]);
      out[i * out_stride + j] = scale * sum;
    }
  }
}

}  // namespace
}  // namespace hen_fast
