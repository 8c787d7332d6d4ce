// The parts of the CPU kernel of hen_fast::retrieve_step (csrc/common/ops.h), shared by its files:
//   retrieve_cpu.cpp    the op: the path for the call, the tiled passes (BLAS score tiles)
//   onepass_step.cpp    the few-query path: one read of the bank for all queries (onepass.h)
//   sparse_finish.cpp   sparsemax / entmax from candidate windows: the exact threshold, the
//                       output from the support rows, Newton passes when a window overflowed
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../common/ops.h"
#include "hen_fast/codes.h"
#include "parallel.h"

namespace hen_fast {
namespace cpu {

// The codes of hen_fast/codes.py (generated header), under short names.
constexpr int64_t kDot = codes::kSimilarityDot, kL2 = codes::kSimilarityL2,
                  kManhattan = codes::kSimilarityManhattan;
constexpr int64_t kSoftmax = codes::kSeparationSoftmax, kEntmax = codes::kSeparationEntmax;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();
// softmax's support counts weights above this (hen_fast/numerics.py's definition).
constexpr double kSupportWeight = 1e-6;

// beta as it multiplies float tensors: past float's range it would become inf, and inf * 0 (the
// maximum's own difference) NaN; float's largest value gives the same limit, every other weight 0.
inline double float_beta(double beta) { return std::min(beta, static_cast<double>(kFloatMax)); }

struct Problem {
  at::Tensor x;         // (B, d) float32, contiguous
  at::Tensor x_scaled;  // x (dot) or 2 x (l2): the tiled passes' score operand
  at::Tensor keys;      // (M, d) any float dtype
  at::Tensor values;    // (M, dv) any float dtype
  at::Tensor norms;     // (M,) -||k||^2 in float32 for l2, else undefined
  double beta;
  int64_t similarity;
  int64_t separation;
  double alpha;
  double degree;
};

// Candidate similarities per query: (s, memory index), in any order, possibly with entries that
// the final maximum leaves outside the window; `overflow` marks a query whose window outgrew the
// buffer (its list is then incomplete).
struct Candidates {
  std::vector<std::vector<std::pair<float, int64_t>>> rows;
  std::vector<char> overflow;
  explicit Candidates(int64_t num_rows) : rows(num_rows), overflow(num_rows, 0) {}
};

// sparsemax / entmax from candidates, given each row's maximum similarity `top` (float32) and
// its first index. `same_scores`: the candidates' similarities are the tiled passes' bits
// (rows that overflowed then continue from the window's threshold; otherwise their maximum is
// recomputed by the tiled passes first, since one ulp of a score is far more than a support's
// width at large beta).
RetrieveStepResult finish_sparse(const Problem& p, Candidates& candidates, const at::Tensor& top,
                                 const at::Tensor& argmax, bool same_scores);

// softmax's support (weights > 1e-6) of `rows`, by the tiled passes: a count of
// beta (s - s_max) > threshold + log(1e-6), threshold the log-normaliser. `row_max` (B, 1):
// s_max from the tiled passes' own scores, or undefined: then a first pass computes it (the
// caller's maximum from other scores may differ by an ulp, which is much at large beta).
// Writes support[rows].
void count_support(const Problem& p, const std::vector<int64_t>& rows, const at::Tensor& threshold,
                   at::Tensor row_max, at::Tensor support);

// y = (alpha - 1) beta (s - s_max) in double: <= 0, finite for clamped similarities.
inline double relative_y(float s, double s_max, double scale) {
  return scale * (static_cast<double>(s) - s_max);
}

// The few-query path: nullopt when it does not apply to the call (onepass_step.cpp says when).
std::optional<RetrieveStepResult> onepass_step(const Problem& p, int64_t capacity, bool want_info,
                                               bool forced);

// The tiled passes (retrieve_cpu.cpp): tasks of (query block) x (bank split), scores by BLAS.
constexpr int64_t kTile = 2048;      // 64 x 2048 floats = 512 KB (best of 512..2048 measured)
constexpr int64_t kQueryBlock = 64;  // queries per task
constexpr int64_t kMinSplit = 4096;  // memories per split at least

struct Tasks {
  int64_t blocks, splits, split_size;
  Tasks(int64_t num_rows, int64_t num_memories);
  int64_t count() const { return blocks * splits; }
};

// sim for queries [r0, r1) against memories [m0, m1), into `scores` (rows x cols), clamped to
// float's finite range. p.x_scaled is x (dot) or 2 x (l2) and p.norms holds -||k||^2, so one
// BLAS call (addmm) writes them; beta is applied later, to differences from the row maximum.
void score_tile(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                at::Tensor& scores);

// Runs fn(z, t0, t1) on the finished scores of each tile [t0, t1) of memories [m0, m1) for
// queries [r0, r1); one (rows x kTile) buffer serves every tile.
template <typename Fn>
void for_each_tile(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                   const Fn& fn) {
  auto scores = at::empty({r1 - r0, kTile}, at::kFloat);
  for (int64_t t0 = m0; t0 < m1; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, m1);
    auto z = scores.narrow(1, 0, t1 - t0);
    score_tile(p, r0, r1, t0, t1, z);
    fn(z, t0, t1);
  }
}

// Runs fn(task, r0, r1, m0, m1) for every (query block, bank split) in parallel.
template <typename Fn>
void for_each_task(const Tasks& tasks, int64_t num_rows, int64_t num_memories, const Fn& fn) {
  parallel_tasks(0, tasks.count(), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / tasks.splits, split = task % tasks.splits;
      const int64_t r0 = block * kQueryBlock, r1 = std::min(r0 + kQueryBlock, num_rows);
      const int64_t m0 = split * tasks.split_size;
      const int64_t m1 = std::min(m0 + tasks.split_size, num_memories);
      if (m0 < m1) fn(task, r0, r1, m0, m1);
    }
  });
}

}  // namespace cpu
}  // namespace hen_fast
