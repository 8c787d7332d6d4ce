// Host interface of the CUDA retrieval kernels: plain pointers, sizes and a stream, no torch.
// retrieve_cuda.cpp (the torch binding) fills a PassArgs and calls the launchers below; the .cu
// files implement them. Every launcher checks its launch and returns the CUDA error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "hen_fast/codes.h"  // generated from hen_fast/codes.py (setup.py)

namespace hen_fast {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// The similarity codes of hen_fast/codes.py, under the kernels' short names.
constexpr int kDot = codes::kSimilarityDot;
constexpr int kL2 = codes::kSimilarityL2;
constexpr int kManhattan = codes::kSimilarityManhattan;
constexpr int kSimilarityCount = codes::kSimilarityCount;
// kEntmaxOutput: the output pass of the sparse fallback, weights [y - tau]_+^q with tau given.
enum DenseMode : int { kSoftmax = 0, kPolynomial = 1, kEntmaxOutput = 2 };
enum StatsMode : int { kCountAbove = 0, kNewtonSums = 1 };

// Queries per thread block, bank rows per tile, threads per block. The few-query regime: every
// block holds its kQueries queries in shared memory and reads each bank row once for all of them.
constexpr int kQueries = 8;
constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kMaxDim = 2048;     // x in shared memory: kQueries * kMaxDim floats (64 KB)
constexpr int kWindow = 2048;     // candidate window sorted in shared memory per query

// One pass over the bank for `rows` queries, split into `splits` ranges of `split_size` rows.
// Unused pointers may be null. Partial outputs are indexed [split][row] (acc: [split][row][col]).
struct PassArgs {
  // Inputs.
  const float* x = nullptr;  // (rows, dim) float32, contiguous
  int64_t rows = 0;
  const void* keys = nullptr;  // (num_memories, dim), row stride key_stride, unit column stride
  int64_t key_stride = 0;
  const void* values = nullptr;  // (num_memories, value_dim) slab, row stride value_stride
  int64_t value_stride = 0;
  const float* sq_norms = nullptr;  // (num_memories,) ||k||^2, l2 only
  int64_t num_memories = 0;
  int dim = 0;
  int value_dim = 0;     // columns of this launch's value slab (<= max_value_slab)
  int value_offset = 0;  // first column of the slab in the partial accumulator
  int value_pitch = 0;   // columns of the partial accumulator
  int dtype = kFloat32;  // keys and values
  int similarity = kDot;
  bool keys_aligned = false;    // 16-byte loads allowed: base and row stride 16-byte aligned
  bool values_aligned = false;
  // Scores are scale * x.k (dot), scale * (2 x.k - ||k||^2) (l2), -scale * sum|x - k| (manhattan).
  float scale = 1.f;
  int splits = 1;
  int64_t split_size = 0;
  // Separation parameters.
  float degree = 1.f;            // polynomial
  double alpha = 2.0;            // entmax (scores are y = (alpha - 1) beta sim)
  const float* tau = nullptr;    // kEntmaxOutput: per row
  const int* row_flag = nullptr;  // kEntmaxOutput, kNewtonSums: rows to compute (others skipped)
  const int* row_done = nullptr;  // kNewtonSums: rows already converged
  const double* tau64 = nullptr;  // kNewtonSums
  const double* y_max64 = nullptr;
  // kCountAbove: per row, counts scale (s - row_max) > threshold (base-2 units relative to the
  // row's largest similarity, so nothing overflows at beta up to 1e30)
  const float* threshold = nullptr;
  const float* row_max = nullptr;
  // Partial outputs.
  float* part_max = nullptr;
  float* part_sum = nullptr;
  float* part_acc = nullptr;
  float* part_best = nullptr;
  int64_t* part_index = nullptr;
  int64_t* part_count = nullptr;
  float* part_pz = nullptr;  // kEntmaxOutput: sum p y / (alpha - 1)
  float* part_pa = nullptr;  // kEntmaxOutput: sum p^alpha
  double* part_sums = nullptr;  // kNewtonSums: [split][row][2]
  // Candidate buffers (sparse candidate pass).
  float* cand_y = nullptr;  // (rows, capacity)
  int* cand_index = nullptr;
  int* cand_count = nullptr;  // (rows,), zeroed before the pass
  int capacity = 0;
};

// Final outputs of one update.
struct Outputs {
  float* out = nullptr;  // (rows, value_dim) float32
  int64_t* support = nullptr;
  int64_t* argmax = nullptr;
  float* lse = nullptr;
  // softmax and polynomial only (entmax's tau comes from the threshold kernel and Newton): the
  // log-normaliser relative to the row maximum s_max of the similarities, as the CPU kernel
  // returns it (csrc/common/ops.h): softmax log sum exp(beta (s - s_max)), polynomial
  // log sum relu(s)^n.
  float* threshold = nullptr;
  float* row_max = nullptr;  // softmax, when given: the row's largest similarity s_max
};

// Splits so that (query blocks x splits) fills the device's SMs twice over.
void plan_splits(int64_t rows, int64_t num_memories, int device, int* splits,
                 int64_t* split_size);
// Columns of values one dense launch accumulates (256 threads x one 16-byte chunk each).
int max_value_slab(int dtype, bool values_aligned);

cudaError_t launch_dense_pass(const PassArgs& args, int mode, cudaStream_t stream);
// Merges the dense partials of every split into the outputs (rows with row_flag set only, when
// row_flag is given). value_dim here is the full value width.
cudaError_t launch_combine(const PassArgs& args, int mode, const Outputs& outputs,
                           cudaStream_t stream);
cudaError_t launch_stats_pass(const PassArgs& args, int mode, cudaStream_t stream);

// Sparse separations (retrieve_sparse.cu).
cudaError_t launch_candidate_pass(const PassArgs& args, cudaStream_t stream);
// Per row: argmax, exact tau on the candidate window; rows whose window fit get their out,
// support and lse written (gathering support rows only); the others get row_flag = 1 and tau64,
// y_max64 as the start of the Newton fallback.
cudaError_t launch_threshold(const PassArgs& args, const Outputs& outputs, int* row_flag,
                             double* tau64, double* y_max64, cudaStream_t stream);
// One Newton step per flagged, unconverged row from part_sums; marks converged rows in row_done
// and writes tau (float) for the output pass.
cudaError_t launch_newton_step(const PassArgs& args, int* row_done, double* tau64, float* tau,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace hen_fast
