// One retrieval update on the CPU: out = Sep(beta * sim(K, x)) V, fused over bank tiles.
//
// Work is cut into tasks of (a block of queries) x (a split of the bank), run on torch's threads.
// A task streams its split in tiles of TILE memories: the tile's scores come from one BLAS call
// (dot, l2 as 2 x.k - ||k||^2) or a vectorised |x - k| loop (manhattan), weights are formed in
// place, and the tile's values are added with a second BLAS call. The extra memory is one
// (block x TILE) score buffer and one (block x dv) accumulator per task: O(B (dv + TILE)), never
// O(B M). Partial states of the splits are merged at the end:
//   softmax      running max m, sum l, accumulator rescaled by exp(m_old - m_new)
//   polynomial   relu(z)^n scaled by the running max of relu(z) (it cancels in the ratio)
//   entmax       (sparsemax = alpha 2) a candidate pass keeps, per query, the scores within 1 of
//                the running max of y = (alpha - 1) z (the support lies in y > max(y) - 1); the
//                threshold is solved exactly on them and the output gathered from the support
//                alone. Queries whose window holds more than `capacity` scores are finished by
//                Newton passes over the bank and a full output pass (see hen_fast/backends/torch_backend.py).
// Extremes: beta is never folded into the scores. Tiles hold similarities s (clamped to float's
// finite range, so that an overflowed similarity cannot meet inf - inf), and beta multiplies
// differences from the row maximum, beta (s - s_max) <= 0, which are finite or -inf, never NaN.
// Thresholds are relative to the row maximum (the support of entmax lies in (alpha - 1) beta
// (s - s_max) > -1), so beta up to 1e30 and scores far beyond float's range give the limit.
// The CPU kernel of the op hen_fast::retrieve_step (csrc/common/ops.h); the steps loop is Python's.
// Its last output, the threshold t that turns a score into a weight, is what
// retrieve_backward_cpu.cpp recomputes the weights from, relative to the row maximum s_max of the
// similarities: softmax p = exp(beta (s - s_max) - t) (t = log of the normaliser), polynomial
// p = relu(s)^n exp(-t) (beta cancels), entmax p = [(alpha - 1) beta (s - s_max) - t]_+^q.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/ops.h"
#include "hen_fast/codes.h"
#include "manhattan.h"
#include "parallel.h"

namespace hen_fast {
namespace {

// The codes of hen_fast/codes.py (generated header), under this file's short names.
constexpr int64_t kDot = codes::kSimilarityDot, kL2 = codes::kSimilarityL2,
                  kManhattan = codes::kSimilarityManhattan;
constexpr int64_t kSoftmax = codes::kSeparationSoftmax, kEntmax = codes::kSeparationEntmax;

constexpr int64_t kTile = 2048;         // 64 x 2048 floats = 512 KB (best of 512..2048 measured)
constexpr int64_t kQueryBlock = 64;     // queries per task
constexpr int64_t kMinSplit = 4096;     // memories per split at least
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();

// beta as it multiplies float tensors: past float's range it would become inf, and inf * 0 (the
// maximum's own difference) NaN; float's largest value gives the same limit, every other weight 0.
double float_beta(double beta) { return std::min(beta, static_cast<double>(kFloatMax)); }

struct Problem {
  at::Tensor x;       // (B, d) float32, contiguous
  at::Tensor x_scaled;  // x (dot) or 2 x (l2)
  at::Tensor keys;    // (M, d) any float dtype
  at::Tensor values;  // (M, dv) any float dtype
  at::Tensor norms;   // (M,) -||k||^2 in float32 for l2, else undefined
  double beta;
  int64_t similarity;
  int64_t separation;
  double alpha;
  double degree;
};

// sim for queries [r0, r1) against memories [m0, m1), into `scores` (rows x cols), clamped to
// float's finite range. p.x_scaled is x (dot) or 2 x (l2) and p.norms holds -||k||^2, so one
// BLAS call (addmm) writes them; beta is applied later, to differences from the row maximum.
void score_tile(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                at::Tensor& scores) {
  auto keys = p.keys.slice(0, m0, m1).to(at::kFloat).contiguous();
  if (p.similarity == kManhattan) {
    auto x = p.x.slice(0, r0, r1);
    manhattan_block(x.data_ptr<float>(), r1 - r0, keys.data_ptr<float>(), m1 - m0, x.size(1),
                    scores.data_ptr<float>(), scores.stride(0), -1.f);
  } else if (p.similarity == kL2) {
    at::addmm_out(scores, p.norms.slice(0, m0, m1).unsqueeze(0), p.x_scaled.slice(0, r0, r1),
                  keys.t());
  } else {
    at::mm_out(scores, p.x_scaled.slice(0, r0, r1), keys.t());
  }
  scores.clamp_(-kFloatMax, kFloatMax);  // keeps NaN: a NaN input reaches its outputs
}

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

// The splits of the bank, so that (query blocks x splits) gives every thread work.
int64_t split_count(int64_t query_blocks, int64_t num_memories) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + query_blocks - 1) / query_blocks);
  const int64_t most = std::max<int64_t>(1, num_memories / kMinSplit);
  return std::min(wanted, most);
}

struct Tasks {
  int64_t blocks, splits, split_size;
  Tasks(int64_t num_rows, int64_t num_memories) {
    blocks = (num_rows + kQueryBlock - 1) / kQueryBlock;
    splits = split_count(blocks, num_memories);
    split_size = (num_memories + splits - 1) / splits;
  }
  int64_t count() const { return blocks * splits; }
};

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

// Per (row, split) partial states; tasks write disjoint slices.
struct Partials {
  at::Tensor max, sum, acc, best, index, count, pz, pa;
  Partials(int64_t rows, int64_t splits, int64_t dv, float initial_max) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    max = at::full({rows, splits}, initial_max, f);
    sum = at::zeros({rows, splits}, f);
    acc = at::zeros({rows, splits, dv}, f);
    best = at::full({rows, splits}, kNegInf, f);
    index = at::zeros({rows, splits}, at::kLong);
    count = at::zeros({rows, splits}, at::kLong);
    pz = at::zeros({rows, splits}, f);
    pa = at::zeros({rows, splits}, f);
  }
};

// The row's max score and its first index, from per-split (max, first index).
std::tuple<at::Tensor, at::Tensor> merge_argmax(const at::Tensor& best, const at::Tensor& index) {
  auto top = std::get<0>(best.max(1));
  auto candidates = at::where(best == top.unsqueeze(1), index,
                              at::full_like(index, std::numeric_limits<int64_t>::max()));
  return {top, std::get<0>(candidates.min(1))};
}

// Keeps the running (max, first index) of a tile's raw scores.
void track_argmax(const at::Tensor& scores, int64_t m0, at::Tensor best, at::Tensor index) {
  auto [tile_best, tile_index] = scores.max(1);
  auto better = tile_best > best;
  index.copy_(at::where(better, tile_index + m0, index));
  best.copy_(at::where(better, tile_best, best));
}

using StepOutputs = RetrieveStepResult;  // csrc/common/ops.h

// Softmax and polynomial: one pass.
StepOutputs smooth_step(const Problem& p, bool want_info) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const bool softmax = p.separation == kSoftmax;
  Tasks tasks(rows, num_memories);
  Partials part(rows, tasks.splits, dv, softmax ? kNegInf : 0.f);
  for_each_task(tasks, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1, int64_t m0,
                                               int64_t m1) {
    const int64_t split = task % tasks.splits;
    auto running_max = part.max.select(1, split).slice(0, r0, r1);
    auto running_sum = part.sum.select(1, split).slice(0, r0, r1);
    auto acc = part.acc.select(1, split).slice(0, r0, r1);
    auto count = part.count.select(1, split).slice(0, r0, r1);
    auto best = part.best.select(1, split).slice(0, r0, r1);
    auto index = part.index.select(1, split).slice(0, r0, r1);
    for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
      track_argmax(z, t0, best, index);
      at::Tensor new_max, rescale;
      if (softmax) {
        // new_max is finite (clamped scores), so no -inf - -inf: the first tile rescales by 0.
        new_max = at::maximum(running_max, std::get<0>(z.max(1)));
        rescale = (running_max - new_max).mul_(float_beta(p.beta)).exp_();
        z.sub_(new_max.unsqueeze(1)).mul_(float_beta(p.beta)).exp_();  // z: the weights
      } else {
        count.add_((z > 0).sum(1));
        z.clamp_min_(0.0);
        new_max = at::maximum(running_max, std::get<0>(z.max(1)));
        auto divisor = at::where(new_max > 0, new_max, at::ones_like(new_max));
        rescale = (running_max / divisor).pow_(p.degree);
        z.div_(divisor.unsqueeze(1)).pow_(p.degree);
      }
      running_sum.mul_(rescale).add_(z.sum(1));
      acc.mul_(rescale.unsqueeze(1));
      acc.addmm_(z, p.values.slice(0, t0, t1).to(at::kFloat));
      running_max.copy_(new_max);
    });
  });
  auto [top, argmax] = merge_argmax(part.best, part.index);
  auto row_max = std::get<0>(part.max.max(1, /*keepdim=*/true));
  at::Tensor weight;
  if (softmax) {
    weight = (part.max - row_max).mul_(float_beta(p.beta)).exp_();
  } else {
    weight = (part.max / at::where(row_max > 0, row_max, at::ones_like(row_max))).pow(p.degree);
  }
  auto total = (part.sum * weight).sum(1);
  auto out = (part.acc * weight.unsqueeze(2)).sum(1);
  // lse in float64 (beta s_max may be far beyond float's range), the threshold relative.
  at::Tensor lse, threshold;
  if (softmax) {
    out.div_(total.unsqueeze(1));
    threshold = total.log();
    lse = row_max.squeeze(1).to(at::kDouble) * p.beta + threshold.to(at::kDouble);
  } else {
    auto nonzero = total > 0;
    out = at::where(nonzero.unsqueeze(1), out / at::where(nonzero, total, at::ones_like(total))
                                                     .unsqueeze(1), at::zeros_like(out));
    threshold = at::where(nonzero, row_max.squeeze(1).log() * p.degree + total.log(),
                          at::full_like(total, kNegInf));
    lse = threshold.to(at::kDouble) + p.degree * std::log(p.beta);
  }
  auto support = part.count.sum(1);
  if (softmax && want_info) {
    // p > 1e-6  <=>  beta (s - s_max) > t + log(1e-6): a counting pass over the bank.
    auto cut = (threshold + std::log(1e-6)).unsqueeze(1);
    Tasks again(rows, num_memories);
    auto counts = at::zeros({rows, again.splits}, at::kLong);
    for_each_task(again, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1,
                                                 int64_t m0, int64_t m1) {
      for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
        z.sub_(row_max.slice(0, r0, r1)).mul_(float_beta(p.beta));
        counts.select(1, task % again.splits).slice(0, r0, r1)
            .add_((z > cut.slice(0, r0, r1)).sum(1));
      });
    });
    support = counts.sum(1);
  }
  return {out, support, argmax, lse.to(at::kFloat), threshold};
}

double power(double base, double exponent) {
  return base > 0 ? (exponent == 1.0 ? base : std::pow(base, exponent)) : 0.0;
}

// tau with sum_i [y_i - tau]_+^q = 1 for y sorted descending and relative to the row maximum
// (y_0 = 0, every y in (-1, 0]): closed forms for sparsemax and alpha 1.5, Newton from the left
// on h(tau) = ||[y - tau]_+||_q otherwise (as the reference). Relative, nothing cancels however
// large beta or the scores are. An overflowing row's window may have lost its entries: then -1,
// a valid lower bound.
double sorted_threshold(const std::vector<double>& y, double alpha) {
  if (y.empty()) return -1.0;
  const double q = 1.0 / (alpha - 1.0);
  if (alpha == 2.0 || alpha == 1.5) {
    double sum = 0, sum_sq = 0, tau = y[0] - 1.0;
    for (size_t k = 1; k <= y.size(); ++k) {
      sum += y[k - 1];
      sum_sq += y[k - 1] * y[k - 1];
      double candidate;
      if (alpha == 2.0) {
        candidate = (sum - 1.0) / k;
      } else {
        const double mean = sum / k, spread = sum_sq - k * mean * mean;
        candidate = mean - std::sqrt(std::max(0.0, (1.0 - spread) / k));
      }
      if (candidate < y[k - 1]) tau = candidate; else break;
    }
    return tau;
  }
  double tau = y[0] - 1.0;
  for (int iteration = 0; iteration < 100; ++iteration) {
    const double span = y[0] - tau;
    double sum_q = 0, sum_q1 = 0;
    for (double v : y) {
      const double r = std::max(0.0, v - tau) / span;
      if (r <= 0) break;  // sorted: the rest are below tau
      sum_q += power(r, q);
      sum_q1 += power(r, q - 1.0);
    }
    const double norm = std::pow(sum_q, 1.0 / q);
    const double step = std::max(0.0, (span * norm - 1.0) / (norm / sum_q * sum_q1));
    tau += step;
    if (step <= 4 * std::numeric_limits<double>::epsilon() * std::max(std::fabs(tau), span)) break;
  }
  return tau;
}

// y = (alpha - 1) beta (s - s_max) in double: <= 0, finite for clamped similarities.
inline double relative_y(float s, double s_max, double scale) {
  return scale * (static_cast<double>(s) - s_max);
}

// Wide supports: Newton passes over the bank for some rows, from thresholds known to lie at or
// below the true ones, then a full output pass. Writes those rows of out, support, lse and tau.
// The passes run the first pass's tasks (same query blocks, splits and tiles) and skip blocks
// without a wide row: a product over other rows may round differently, and at large beta one
// ulp of a score is far more than the support's width, so the scores must be the same bits.
void finish_wide_rows(const Problem& p, const Tasks& tasks, const std::vector<int64_t>& wide,
                      const std::vector<double>& s_max, at::Tensor out, at::Tensor support,
                      at::Tensor lse, at::Tensor tau_out) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const int64_t count = static_cast<int64_t>(wide.size());
  const double alpha = p.alpha, q = 1.0 / (alpha - 1.0), scale = (alpha - 1.0) * p.beta;
  std::vector<int64_t> slot(rows, -1);  // row -> position in `wide`
  std::vector<char> block_has(tasks.blocks, 0);
  for (int64_t k = 0; k < count; ++k) {
    slot[wide[k]] = k;
    block_has[wide[k] / kQueryBlock] = 1;
  }
  double* taus = tau_out.data_ptr<double>();
  std::vector<double> tau(count), y_top(count, 0.0);
  for (int64_t k = 0; k < count; ++k) tau[k] = taus[wide[k]];
  // Per (split, wide row) partial sums; one writer per slot.
  auto visit = [&](const auto& fn) {
    for_each_task(tasks, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1, int64_t m0,
                                                 int64_t m1) {
      if (!block_has[r0 / kQueryBlock]) return;
      const int64_t split = task % tasks.splits;
      for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
        const float* zs = z.data_ptr<float>();
        for (int64_t i = 0; i < r1 - r0; ++i) {
          const int64_t k = slot[r0 + i];
          if (k >= 0) fn(split, k, zs + i * z.stride(0), t0, t1);
        }
      });
    });
  };
  std::vector<char> done(count, 0);
  for (int iteration = 0; iteration < 100; ++iteration) {
    std::vector<double> sum_q(tasks.splits * count, 0.0), sum_q1(tasks.splits * count, 0.0);
    visit([&](int64_t split, int64_t k, const float* zs, int64_t t0, int64_t t1) {
      if (done[k]) return;
      const double span = -tau[k];
      double a = 0, b = 0;
      for (int64_t j = 0; j < t1 - t0; ++j) {
        const double r = (relative_y(zs[j], s_max[wide[k]], scale) - tau[k]) / span;
        if (r > 0) {
          a += power(r, q);
          b += q == 1.0 ? 1.0 : power(r, q - 1.0);
        }
      }
      sum_q[split * count + k] += a;
      sum_q1[split * count + k] += b;
    });
    bool all_done = true;
    const double eps = 16 * std::numeric_limits<float>::epsilon();
    for (int64_t k = 0; k < count; ++k) {
      if (done[k]) continue;
      double a = 0, b = 0;
      for (int64_t split = 0; split < tasks.splits; ++split) {
        a += sum_q[split * count + k];
        b += sum_q1[split * count + k];
      }
      const double span = -tau[k], norm = std::pow(a, 1.0 / q);
      double step = (span * norm - 1.0) / (norm / a * b);
      step = std::isnan(step) ? 0.0 : std::max(0.0, step);
      tau[k] += step;
      // tau is relative to the maximum, in [-1, 0): an absolute stopping rule.
      if (step <= eps * std::max(std::fabs(tau[k]), span)) done[k] = 1; else all_done = false;
    }
    if (all_done) break;
  }
  // The output pass: per (split, wide row) accumulators in double.
  std::vector<double> acc(tasks.splits * count * dv, 0.0), total(tasks.splits * count, 0.0),
      dot_py(tasks.splits * count, 0.0), sum_pa(tasks.splits * count, 0.0);
  std::vector<int64_t> used(tasks.splits * count, 0);
  visit([&](int64_t split, int64_t k, const float* zs, int64_t t0, int64_t t1) {
    const int64_t at_k = split * count + k;
    auto weights = at::zeros({t1 - t0}, at::kFloat);
    float* w = weights.data_ptr<float>();
    bool any = false;
    for (int64_t j = 0; j < t1 - t0; ++j) {
      const double y = relative_y(zs[j], s_max[wide[k]], scale);
      const double weight = power(y - tau[k], q);
      if (weight <= 0) continue;
      w[j] = static_cast<float>(weight);
      any = true;
      total[at_k] += weight;
      dot_py[at_k] += weight * y;
      sum_pa[at_k] += std::pow(weight, alpha);
      ++used[at_k];
    }
    if (!any) return;
    // The tile's value rows in one matrix-vector product (a wide support spans most of them).
    auto row = at::mv(p.values.slice(0, t0, t1).to(at::kFloat).t(), weights);
    const float* r = row.data_ptr<float>();
    double* a = acc.data() + at_k * dv;
    for (int64_t c = 0; c < dv; ++c) a[c] += r[c];
  });
  auto out_rows = at::zeros({count, dv}, at::kDouble);
  double* o = out_rows.data_ptr<double>();
  int64_t* supports = support.data_ptr<int64_t>();
  float* lses = lse.data_ptr<float>();
  for (int64_t k = 0; k < count; ++k) {
    double t = 0, py = 0, pa = 0;
    int64_t n = 0;
    for (int64_t split = 0; split < tasks.splits; ++split) {
      const int64_t at_k = split * count + k;
      t += total[at_k];
      py += dot_py[at_k];
      pa += sum_pa[at_k];
      n += used[at_k];
      for (int64_t c = 0; c < dv; ++c) o[k * dv + c] += acc[at_k * dv + c];
    }
    for (int64_t c = 0; c < dv; ++c) o[k * dv + c] /= t;
    const int64_t r = wide[k];
    taus[r] = tau[k];
    supports[r] = n;
    lses[r] = static_cast<float>(p.beta * s_max[r] + py / (t * (alpha - 1.0)) +
                                 (1.0 - pa / std::pow(t, alpha)) / (alpha * (alpha - 1.0)));
  }
  out.index_copy_(0, at::tensor(wide, at::kLong), out_rows.to(at::kFloat));
}

StepOutputs sparse_step(const Problem& p, int64_t capacity) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const double alpha = p.alpha, q = 1.0 / (alpha - 1.0), scale = (alpha - 1.0) * p.beta;
  Tasks tasks(rows, num_memories);
  Partials part(rows, tasks.splits, dv, kNegInf);
  // Candidates per (task, row in block): (similarity, memory index); a task that would keep more
  // than `capacity` for a row marks the row as overflowing.
  std::vector<std::vector<std::pair<float, int64_t>>> kept(tasks.count() * kQueryBlock);
  std::vector<char> task_overflow(tasks.count() * kQueryBlock, 0);  // one writer per slot
  for_each_task(tasks, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1, int64_t m0,
                                               int64_t m1) {
    const int64_t split = task % tasks.splits;
    auto best = part.best.select(1, split).slice(0, r0, r1);
    auto index = part.index.select(1, split).slice(0, r0, r1);
    for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
      track_argmax(z, t0, best, index);  // best stays the running max of s
      const float* zs = z.data_ptr<float>();
      const float* running = best.data_ptr<float>();  // a column of part.best: strided
      const int64_t stride = z.stride(0), running_stride = best.stride(0);
      for (int64_t i = 0; i < r1 - r0; ++i) {
        auto& list = kept[task * kQueryBlock + i];
        const double running_max = running[i * running_stride];
        for (int64_t j = 0; j < t1 - t0; ++j) {
          const float s = zs[i * stride + j];
          // In the window of the running maximum: (alpha - 1) beta (s - max) > -1.
          if (relative_y(s, running_max, scale) > -1.0) {
            if (static_cast<int64_t>(list.size()) < capacity) list.emplace_back(s, t0 + j);
            else task_overflow[task * kQueryBlock + i] = 1;
          }
        }
      }
    });
  });
  auto [top, argmax] = merge_argmax(part.best, part.index);
  auto out = at::zeros({rows, dv}, at::kFloat);
  auto support = at::zeros({rows}, at::kLong);
  auto lse = at::zeros({rows}, at::kFloat);
  auto tau = at::zeros({rows}, at::kDouble);
  const float* tops = top.data_ptr<float>();
  double* taus = tau.data_ptr<double>();
  int64_t* supports = support.data_ptr<int64_t>();
  float* lses = lse.data_ptr<float>();
  std::vector<char> overflow(rows, 0);
  std::vector<double> s_max(rows);
  // Rows whose window fit: exact threshold on the candidates, output from the support alone.
  parallel_tasks(0, rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      s_max[r] = tops[r];
      std::vector<std::pair<double, int64_t>> window;
      const int64_t block = r / kQueryBlock;
      for (int64_t split = 0; split < tasks.splits; ++split) {
        const int64_t slot = (block * tasks.splits + split) * kQueryBlock + r % kQueryBlock;
        overflow[r] |= task_overflow[slot];
        for (const auto& entry : kept[slot]) {
          const double y = relative_y(entry.first, s_max[r], scale);
          if (y > -1.0) window.emplace_back(y, entry.second);
        }
      }
      std::sort(window.begin(), window.end(),
                [](const auto& a, const auto& b) { return a.first > b.first; });
      std::vector<double> y(window.size());
      for (size_t k = 0; k < window.size(); ++k) y[k] = window[k].first;
      const double threshold = sorted_threshold(y, alpha);
      taus[r] = threshold;
      if (overflow[r]) continue;
      double total = 0, dot_py = 0, sum_pa = 0;
      int64_t count = 0;
      std::vector<int64_t> rows_used;
      std::vector<float> weights;
      for (size_t k = 0; k < window.size(); ++k) {
        const double weight = power(y[k] - threshold, q);
        if (weight <= 0) break;
        rows_used.push_back(window[k].second);
        weights.push_back(static_cast<float>(weight));
        total += weight;
        dot_py += weight * y[k];
        sum_pa += std::pow(weight, alpha);
        ++count;
      }
      if (count == 0) {  // a NaN query: no score compares, nothing in the window
        out[r].fill_(std::numeric_limits<float>::quiet_NaN());
        lses[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      // Only the support's value rows are read: one gather and one matrix-vector product.
      auto used = p.values.index_select(0, at::tensor(rows_used, at::kLong)).to(at::kFloat);
      auto row_out = out[r];
      row_out.copy_(at::mv(used.t(), at::tensor(weights, at::kFloat)));
      row_out.div_(total);
      supports[r] = count;
      // Energy <p, z> + Tsallis entropy, <p, z> = beta s_max + <p, y> / (alpha - 1).
      lses[r] = static_cast<float>(p.beta * s_max[r] + dot_py / (total * (alpha - 1.0)) +
                                   (1.0 - sum_pa / std::pow(total, alpha)) /
                                       (alpha * (alpha - 1.0)));
    }
  });
  std::vector<int64_t> wide;
  for (int64_t r = 0; r < rows; ++r) {
    if (overflow[r]) wide.push_back(r);
  }
  if (!wide.empty()) finish_wide_rows(p, tasks, wide, s_max, out, support, lse, tau);
  return {out, support, argmax, lse, tau.to(at::kFloat)};
}

}  // namespace

// Registered by csrc/common/register.cpp as hen_fast::retrieve_step (CPU).
RetrieveStepResult retrieve_step_cpu(
    const at::Tensor& x, const at::Tensor& keys, const std::optional<at::Tensor>& sq_norms,
    const at::Tensor& values, double beta, int64_t similarity, int64_t separation, double alpha,
    double degree, int64_t capacity, bool want_info) {
  TORCH_CHECK(x.dim() == 2 && keys.dim() == 2 && values.dim() == 2, "retrieve_step: 2-D inputs");
  TORCH_CHECK(x.size(1) == keys.size(1) && keys.size(0) == values.size(0),
              "retrieve_step: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "retrieve_step: queries must be float32");
  Problem p{x.contiguous(), at::Tensor(), keys, values, at::Tensor(), beta, similarity,
            separation, alpha, degree};
  p.x_scaled = similarity == kL2 ? p.x * 2.0 : p.x;
  if (similarity == kL2) {
    auto norms = sq_norms.has_value() ? sq_norms->to(at::kFloat) : keys.to(at::kFloat).pow(2).sum(1);
    p.norms = norms.neg().contiguous();
  }
  if (separation == kEntmax) return sparse_step(p, std::max<int64_t>(1, capacity));
  return smooth_step(p, want_info);
}

}  // namespace hen_fast
