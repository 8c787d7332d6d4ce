// The few-query softmax pass of the CPU kernel (few_queries.cpp): one read of a bank split for all
// of at most kFewQueries queries, compiled for AVX-512, AVX2 and portable x86 and chosen at run
// time from the CPU's features.
#pragma once

#include <cstdint>

namespace hen_fast {

constexpr int64_t kFewQueries = 16;     // the pass serves batches up to this many queries
constexpr int64_t kFewQueryMaxDim = 1024;  // and d, dv up to this (its row buffers)

// Bank dtypes the pass reads (keys and values of one dtype).
enum FewQueryKind : int { kKindFloat32 = 0, kKindBFloat16 = 1, kKindFloat16 = 2 };

struct FewQueryArgs {
  const float* x;  // (rows, dim) float32, contiguous, finite
  int64_t rows, dim;
  const void* keys;  // (M, dim) of `kind`, rows key_stride apart, unit column stride
  int64_t key_stride;
  const void* values;  // (M, value_dim) of `kind`
  int64_t value_stride, value_dim;
  const float* neg_norms;  // -||k||^2 for l2, else unused
  int kind;
  int64_t similarity;  // the codes of hen_fast/codes.py
  double beta;
};

// Running softmax state of each query over the memories passed so far: max similarity, sum of
// exp(beta (s - max)), the (rows, value_dim) accumulator, and the first index of the maximum.
struct FewQueryState {
  float* max;
  float* sum;
  float* acc;
  float* best;
  int64_t* index;
};

// Whether the pass serves these shapes and dtypes (else the tiled BLAS path does).
bool few_query_pass_applies(int64_t rows, int64_t dim, int64_t value_dim);

// Adds memories [m0, m1) to `state`.
void few_query_softmax_pass(const FewQueryArgs& args, int64_t m0, int64_t m1,
                            FewQueryState& state);

// The clamped similarities of every query to memories [m0, m1) (l2 as 2 x.k - ||k||^2,
// manhattan negated), query q's at out[q * out_stride + (m - m0)]; values are not read.
void few_query_scores(const FewQueryArgs& args, int64_t m0, int64_t m1, float* out,
                      int64_t out_stride);

// The instruction set the pass runs with: "avx512", "avx2" or "generic" (the best this CPU has,
// or HEN_FAST_CPU_ISA when it names one the CPU has).
const char* few_query_isa();

}  // namespace hen_fast
