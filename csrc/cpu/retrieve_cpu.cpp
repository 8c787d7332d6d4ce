// One retrieval update on the CPU: out = Sep(beta * sim(K, x)) V, fused over bank tiles.
//
// Work is cut into tasks of (a block of queries) x (a split of the bank), run by at::parallel_for.
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
//                Newton passes over the bank and a full output pass (see hen_fast/reference.py).
// The CPU kernel of the op hen_fast::retrieve_step (csrc/common/ops.h); the steps loop is Python's.
// Its last output, the threshold t that turns a score into a weight (softmax and polynomial: the
// log-normaliser; entmax: tau), is what retrieve_backward_cpu.cpp recomputes the weights from.

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

struct Problem {
  at::Tensor x;       // (B, d) float32, contiguous
  at::Tensor x_scaled;  // beta x (dot) or 2 beta x (l2)
  at::Tensor keys;    // (M, d) any float dtype
  at::Tensor values;  // (M, dv) any float dtype
  at::Tensor norms;   // (M,) -beta ||k||^2 in float32 for l2, else undefined
  double beta;
  int64_t similarity;
  int64_t separation;
  double alpha;
  double degree;
};

// beta * sim for queries [r0, r1) against memories [m0, m1), into `scores` (rows x cols). The
// scale is folded into the operands: p.x_scaled is beta x (dot) or 2 beta x (l2), and p.norms
// holds -beta ||k||^2, so one BLAS call (addmm) writes the finished scores.
void score_tile(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                at::Tensor& scores) {
  auto keys = p.keys.slice(0, m0, m1).to(at::kFloat).contiguous();
  if (p.similarity == kManhattan) {
    auto x = p.x.slice(0, r0, r1);
    manhattan_block(x.data_ptr<float>(), r1 - r0, keys.data_ptr<float>(), m1 - m0, x.size(1),
                    scores.data_ptr<float>(), scores.stride(0), static_cast<float>(-p.beta));
  } else if (p.similarity == kL2) {
    at::addmm_out(scores, p.norms.slice(0, m0, m1).unsqueeze(0), p.x_scaled.slice(0, r0, r1),
                  keys.t());
  } else {
    at::mm_out(scores, p.x_scaled.slice(0, r0, r1), keys.t());
  }
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
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
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
        new_max = at::maximum(running_max, std::get<0>(z.max(1)));
        rescale = (running_max - new_max).exp_();
        z.sub_(new_max.unsqueeze(1)).exp_();  // z now holds the weights
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
    weight = (part.max - row_max).exp();
  } else {
    weight = (part.max / at::where(row_max > 0, row_max, at::ones_like(row_max))).pow(p.degree);
  }
  auto total = (part.sum * weight).sum(1);
  auto out = (part.acc * weight.unsqueeze(2)).sum(1);
  at::Tensor lse;
  if (softmax) {
    out.div_(total.unsqueeze(1));
    lse = row_max.squeeze(1) + total.log();
  } else {
    auto nonzero = total > 0;
    out = at::where(nonzero.unsqueeze(1), out / at::where(nonzero, total, at::ones_like(total))
                                                     .unsqueeze(1), at::zeros_like(out));
    lse = at::where(nonzero, row_max.squeeze(1).log() * p.degree + total.log(),
                    at::full_like(total, kNegInf));
  }
  auto support = part.count.sum(1);
  if (softmax && want_info) {
    // p > 1e-6  <=>  z > lse + log(1e-6): a counting pass over the bank.
    auto threshold = (lse + std::log(1e-6)).unsqueeze(1);
    Tasks again(rows, num_memories);
    auto counts = at::zeros({rows, again.splits}, at::kLong);
    for_each_task(again, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1,
                                                 int64_t m0, int64_t m1) {
      for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
        counts.select(1, task % again.splits).slice(0, r0, r1)
            .add_((z > threshold.slice(0, r0, r1)).sum(1));
      });
    });
    support = counts.sum(1);
  }
  return {out, support, argmax, lse, lse.clone()};
}

double power(double base, double exponent) {
  return base > 0 ? (exponent == 1.0 ? base : std::pow(base, exponent)) : 0.0;
}

// tau with sum_i [y_i - tau]_+^q = 1 for y sorted descending: closed forms for sparsemax and
// alpha 1.5, Newton from the left on h(tau) = ||[y - tau]_+||_q otherwise (as the reference).
// An overflowing row's window may have lost its entries: then max(y) - 1, a valid lower bound.
double sorted_threshold(const std::vector<double>& y, double alpha, double y_max) {
  if (y.empty()) return y_max - 1.0;
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

// Wide supports: Newton passes over the bank for some rows, from thresholds known to lie at or
// below the true ones, then a full output pass. Writes those rows of out, support and lse.
void finish_wide_rows(const Problem& whole, const at::Tensor& which, at::Tensor tau_start,
                      const at::Tensor& y_max, at::Tensor out, at::Tensor support,
                      at::Tensor lse, at::Tensor tau_out) {
  Problem p = whole;
  p.x = whole.x.index_select(0, which).contiguous();
  p.x_scaled = whole.x_scaled.index_select(0, which).contiguous();
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const double alpha = p.alpha, q = 1.0 / (alpha - 1.0);
  Tasks tasks(rows, num_memories);
  auto tau = tau_start.clone();
  for (int iteration = 0; iteration < 100; ++iteration) {
    auto sum_q = at::zeros({rows, tasks.splits}, at::kDouble);
    auto sum_q1 = at::zeros({rows, tasks.splits}, at::kDouble);
    auto span = (y_max - tau).unsqueeze(1);
    for_each_task(tasks, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1, int64_t m0,
                                                 int64_t m1) {
      const int64_t split = task % tasks.splits;
      for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
        auto ratio = ((z.to(at::kDouble) * (alpha - 1.0) - tau.slice(0, r0, r1).unsqueeze(1))
                          .clamp_min_(0.0) / span.slice(0, r0, r1));
        sum_q.select(1, split).slice(0, r0, r1).add_(ratio.pow(q).sum(1));
        auto inner = q == 1.0 ? (ratio > 0).to(at::kDouble) : ratio.pow(q - 1.0);
        sum_q1.select(1, split).slice(0, r0, r1).add_(inner.sum(1));
      });
    });
    auto s_q = sum_q.sum(1), s_q1 = sum_q1.sum(1);
    auto norm = s_q.pow(1.0 / q);
    auto step = ((span.squeeze(1) * norm - 1.0) / (norm / s_q * s_q1)).nan_to_num(0.0)
                    .clamp_min(0.0);
    tau.add_(step);
    const double eps = 16 * std::numeric_limits<float>::epsilon();
    if ((step <= eps * at::maximum(tau.abs(), span.squeeze(1))).all().item<bool>()) break;
  }
  Partials part(rows, tasks.splits, dv, 0.f);
  auto tau_f = tau.to(at::kFloat);
  for_each_task(tasks, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1, int64_t m0,
                                               int64_t m1) {
    const int64_t split = task % tasks.splits;
    for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
      auto weights = (z * static_cast<float>(alpha - 1.0) -
                      tau_f.slice(0, r0, r1).unsqueeze(1)).clamp_min_(0.0);
      if (q != 1.0) weights.pow_(q);
      part.acc.select(1, split).slice(0, r0, r1)
          .addmm_(weights, p.values.slice(0, t0, t1).to(at::kFloat));
      part.sum.select(1, split).slice(0, r0, r1).add_(weights.sum(1));
      part.count.select(1, split).slice(0, r0, r1).add_((weights > 0).sum(1));
      part.pz.select(1, split).slice(0, r0, r1).add_((weights * z).sum(1));
      part.pa.select(1, split).slice(0, r0, r1).add_(weights.pow(alpha).sum(1));
    });
  });
  auto total = part.sum.sum(1);
  tau_out.index_copy_(0, which, tau);
  out.index_copy_(0, which, part.acc.sum(1) / total.unsqueeze(1));
  support.index_copy_(0, which, part.count.sum(1));
  lse.index_copy_(0, which, part.pz.sum(1) / total +
                                (1.0 - part.pa.sum(1) / total.pow(alpha)) /
                                    (alpha * (alpha - 1.0)));
}

StepOutputs sparse_step(const Problem& p, int64_t capacity) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const double alpha = p.alpha, q = 1.0 / (alpha - 1.0);
  Tasks tasks(rows, num_memories);
  Partials part(rows, tasks.splits, dv, kNegInf);
  // Candidates per (task, row in block): (y, memory index); a task that would keep more than
  // `capacity` for a row marks the row as overflowing.
  std::vector<std::vector<std::pair<float, int64_t>>> kept(tasks.count() * kQueryBlock);
  std::vector<char> task_overflow(tasks.count() * kQueryBlock, 0);  // one writer per slot
  for_each_task(tasks, rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1, int64_t m0,
                                               int64_t m1) {
    const int64_t split = task % tasks.splits;
    auto best = part.best.select(1, split).slice(0, r0, r1);
    auto index = part.index.select(1, split).slice(0, r0, r1);
    for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t t0, int64_t t1) {
      track_argmax(z, t0, best, index);  // best stays the running max of z
      const float* zs = z.data_ptr<float>();
      const float* running = best.data_ptr<float>();  // a column of part.best: strided
      const int64_t stride = z.stride(0), running_stride = best.stride(0);
      for (int64_t i = 0; i < r1 - r0; ++i) {
        auto& list = kept[task * kQueryBlock + i];
        const float floor_y =
            static_cast<float>((alpha - 1.0) * running[i * running_stride] - 1.0);
        for (int64_t j = 0; j < t1 - t0; ++j) {
          const float y = static_cast<float>((alpha - 1.0) * zs[i * stride + j]);
          if (y > floor_y) {
            if (static_cast<int64_t>(list.size()) < capacity) list.emplace_back(y, t0 + j);
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
  // Rows whose window fit: exact threshold on the candidates, output from the support alone.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double y_max = (alpha - 1.0) * tops[r];
      std::vector<std::pair<float, int64_t>> window;
      const int64_t block = r / kQueryBlock;
      for (int64_t split = 0; split < tasks.splits; ++split) {
        const int64_t slot = (block * tasks.splits + split) * kQueryBlock + r % kQueryBlock;
        overflow[r] |= task_overflow[slot];
        for (const auto& entry : kept[slot]) {
          if (entry.first > y_max - 1.0) window.push_back(entry);
        }
      }
      std::sort(window.begin(), window.end(),
                [](const auto& a, const auto& b) { return a.first > b.first; });
      std::vector<double> y(window.size());
      for (size_t k = 0; k < window.size(); ++k) y[k] = window[k].first;
      const double threshold = sorted_threshold(y, alpha, y_max);
      taus[r] = threshold;
      if (overflow[r]) continue;
      double total = 0, dot_pz = 0, sum_pa = 0;
      int64_t count = 0;
      std::vector<int64_t> rows_used;
      std::vector<float> weights;
      for (size_t k = 0; k < window.size(); ++k) {
        const double weight = power(y[k] - threshold, q);
        if (weight <= 0) break;
        rows_used.push_back(window[k].second);
        weights.push_back(static_cast<float>(weight));
        total += weight;
        dot_pz += weight * y[k] / (alpha - 1.0);
        sum_pa += std::pow(weight, alpha);
        ++count;
      }
      // Only the support's value rows are read: one gather and one matrix-vector product.
      auto used = p.values.index_select(0, at::tensor(rows_used, at::kLong)).to(at::kFloat);
      auto row_out = out[r];
      row_out.copy_(at::mv(used.t(), at::tensor(weights, at::kFloat)));
      row_out.div_(total);
      supports[r] = count;
      lses[r] = static_cast<float>(dot_pz / total + (1.0 - sum_pa / std::pow(total, alpha)) /
                                                      (alpha * (alpha - 1.0)));
    }
  });
  std::vector<int64_t> wide;
  for (int64_t r = 0; r < rows; ++r) {
    if (overflow[r]) wide.push_back(r);
  }
  if (!wide.empty()) {
    auto which = at::tensor(wide, at::kLong);
    finish_wide_rows(p, which, tau.index_select(0, which),
                     top.index_select(0, which).to(at::kDouble) * (alpha - 1.0), out, support,
                     lse, tau);
  }
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
  p.x_scaled = p.x * (similarity == kL2 ? 2.0 * beta : beta);
  if (similarity == kL2) {
    auto norms = sq_norms.has_value() ? sq_norms->to(at::kFloat) : keys.to(at::kFloat).pow(2).sum(1);
    p.norms = (norms * -beta).contiguous();
  }
  if (separation == kEntmax) return sparse_step(p, std::max<int64_t>(1, capacity));
  return smooth_step(p, want_info);
}

}  // namespace hen_fast
