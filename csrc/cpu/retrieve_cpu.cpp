// One retrieval update on the CPU: out = Sep(beta * sim(K, x)) V, the CPU kernel of the op
// hen_fast::retrieve_step (csrc/common/ops.h); the steps loop is Python's.
//
// Two paths (retrieve_cpu.h): few queries go to the one-pass kernel (onepass_step.cpp), which
// reads each bank row once for all of them; the others to the tiled passes here. Their work is
// cut into tasks of (a block of queries) x (a split of the bank), run on torch's threads. A task
// streams its split in tiles of kTile memories: the tile's scores come from one BLAS call (dot,
// l2 as 2 x.k - ||k||^2) or a vectorised |x - k| loop (manhattan), weights are formed in place,
// and the tile's values are added with a second BLAS call. The extra memory is one (block x
// kTile) score buffer and one (block x dv) accumulator per task: O(B (dv + kTile)), never O(B M).
// Partial states of the splits are merged at the end:
//   softmax      running max m, sum l, accumulator rescaled by exp(m_old - m_new)
//   polynomial   relu(z)^n scaled by the running max of relu(z) (it cancels in the ratio)
//   entmax       (sparsemax = alpha 2) a candidate pass keeps, per query, the scores within 1 of
//                the running max of y = (alpha - 1) z; sparse_finish.cpp solves the threshold
//                exactly and gathers the output from the support.
// Extremes: beta is never folded into the scores. Tiles hold similarities s (clamped to float's
// finite range, so that an overflowed similarity cannot meet inf - inf), and beta multiplies
// differences from the row maximum, beta (s - s_max) <= 0, which are finite or -inf, never NaN.
// The last output, the threshold t that turns a score into a weight, is what
// retrieve_backward_cpu.cpp recomputes the weights from, relative to the row maximum s_max of the
// similarities: softmax p = exp(beta (s - s_max) - t) (t = log of the normaliser), polynomial
// p = relu(s)^n exp(-t) (beta cancels), entmax p = [(alpha - 1) beta (s - s_max) - t]_+^q.

#include "retrieve_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/ops.h"
#include "manhattan.h"
#include "onepass.h"

namespace hen_fast {
namespace cpu {

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

namespace {

// The splits of the bank, so that (query blocks x splits) gives every thread work.
int64_t split_count(int64_t query_blocks, int64_t num_memories) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + query_blocks - 1) / query_blocks);
  const int64_t most = std::max<int64_t>(1, num_memories / kMinSplit);
  return std::min(wanted, most);
}

}  // namespace

Tasks::Tasks(int64_t num_rows, int64_t num_memories) {
  blocks = (num_rows + kQueryBlock - 1) / kQueryBlock;
  splits = split_count(blocks, num_memories);
  split_size = (num_memories + splits - 1) / splits;
}

void count_support(const Problem& p, const std::vector<int64_t>& rows, const at::Tensor& threshold,
                   at::Tensor row_max, at::Tensor support) {
  const int64_t num_rows = p.x.size(0), num_memories = p.keys.size(0);
  Tasks tasks(num_rows, num_memories);
  std::vector<char> wanted(num_rows, 0);
  std::vector<char> block_has(tasks.blocks, 0);
  for (int64_t r : rows) {
    wanted[r] = 1;
    block_has[r / kQueryBlock] = 1;
  }
  auto maxima = at::full({num_rows, tasks.splits}, kNegInf, at::kFloat);
  auto counts = at::zeros({num_rows, tasks.splits}, at::kLong);
  for (int pass = row_max.defined() ? 1 : 0; pass < 2; ++pass) {
    if (pass == 1 && !row_max.defined()) row_max = std::get<0>(maxima.max(1, /*keepdim=*/true));
    // p > 1e-6  <=>  beta (s - s_max) > t + log(1e-6).
    auto cut = (threshold + std::log(kSupportWeight)).unsqueeze(1);
    for_each_task(tasks, num_rows, num_memories, [&](int64_t task, int64_t r0, int64_t r1,
                                                     int64_t m0, int64_t m1) {
      if (!block_has[r0 / kQueryBlock]) return;
      const int64_t split = task % tasks.splits;
      for_each_tile(p, r0, r1, m0, m1, [&](at::Tensor& z, int64_t, int64_t) {
        if (pass == 0) {
          auto m = maxima.select(1, split).slice(0, r0, r1);
          m.copy_(at::maximum(m, std::get<0>(z.max(1))));
        } else {
          z.sub_(row_max.slice(0, r0, r1)).mul_(float_beta(p.beta));
          counts.select(1, split).slice(0, r0, r1).add_((z > cut.slice(0, r0, r1)).sum(1));
        }
      });
    });
  }
  auto total = counts.sum(1);
  const int64_t* totals = total.data_ptr<int64_t>();
  int64_t* supports = support.data_ptr<int64_t>();
  for (int64_t r : rows) supports[r] = totals[r];
}

namespace {

// Per (row, split) partial states; tasks write disjoint slices.
struct Partials {
  at::Tensor max, sum, acc, best, index, count;
  Partials(int64_t rows, int64_t splits, int64_t dv, float initial_max) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    max = at::full({rows, splits}, initial_max, f);
    sum = at::zeros({rows, splits}, f);
    acc = at::zeros({rows, splits, dv}, f);
    best = at::full({rows, splits}, kNegInf, f);
    index = at::zeros({rows, splits}, at::kLong);
    count = at::zeros({rows, splits}, at::kLong);
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

// Softmax and polynomial: one pass.
RetrieveStepResult smooth_step(const Problem& p, bool want_info) {
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
    std::vector<int64_t> all(rows);
    for (int64_t r = 0; r < rows; ++r) all[r] = r;
    count_support(p, all, threshold, row_max, support);
  }
  return {out, support, argmax, lse.to(at::kFloat), threshold};
}

// sparsemax / entmax: the candidate pass; sparse_finish.cpp does the rest.
RetrieveStepResult sparse_step(const Problem& p, int64_t capacity) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const double scale = (p.alpha - 1.0) * p.beta;
  Tasks tasks(rows, num_memories);
  Partials part(rows, tasks.splits, dv, kNegInf);
  // Candidates per (task, row in block): (similarity, memory index). A full list is compacted
  // against the running maximum and the floor its own threshold sets (onepass::sparse_floor);
  // one that stays three quarters full marks the row as overflowing.
  std::vector<std::vector<std::pair<float, int64_t>>> kept(tasks.count() * kQueryBlock);
  std::vector<char> task_overflow(tasks.count() * kQueryBlock, 0);  // one writer per slot
  std::vector<float> floors(tasks.count() * kQueryBlock, kNegInf);
  auto compact = [&](int64_t slot, double running_max) {
    auto& list = kept[slot];
    std::vector<float> scores(list.size());
    for (size_t e = 0; e < list.size(); ++e) scores[e] = list[e].first;
    if (scale <= kFloatMax) {
      floors[slot] = std::max(floors[slot], onepass::sparse_floor(
          scores.data(), static_cast<int64_t>(scores.size()), static_cast<float>(running_max),
          scale, p.alpha));
    }
    size_t count = 0;
    for (const auto& entry : list) {
      if (entry.first > floors[slot] && relative_y(entry.first, running_max, scale) > -1.0) {
        list[count++] = entry;
      }
    }
    list.resize(count);
    if (4 * static_cast<int64_t>(count) > 3 * capacity) task_overflow[slot] = 1;
  };
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
        const int64_t slot = task * kQueryBlock + i;
        auto& list = kept[slot];
        const double running_max = running[i * running_stride];
        for (int64_t j = 0; j < t1 - t0; ++j) {
          const float s = zs[i * stride + j];
          // In the window of the running maximum, (alpha - 1) beta (s - max) > -1, and above
          // the floor.
          if (task_overflow[slot] || !(s > floors[slot]) ||
              !(relative_y(s, running_max, scale) > -1.0)) {
            continue;
          }
          if (static_cast<int64_t>(list.size()) == capacity) compact(slot, running_max);
          if (task_overflow[slot] || !(s > floors[slot])) continue;
          list.emplace_back(s, t0 + j);
        }
      }
    });
  });
  auto [top, argmax] = merge_argmax(part.best, part.index);
  Candidates candidates(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t block = r / kQueryBlock;
    for (int64_t split = 0; split < tasks.splits; ++split) {
      const int64_t slot = (block * tasks.splits + split) * kQueryBlock + r % kQueryBlock;
      candidates.overflow[r] |= task_overflow[slot];
      auto& list = candidates.rows[r];
      list.insert(list.end(), kept[slot].begin(), kept[slot].end());
    }
  }
  return finish_sparse(p, candidates, top, argmax, /*same_scores=*/true);
}

// Queries per call of the one-pass kernel: its state is a few KB per query (more with a sparse
// window), so that at most tens of MB are held, and a slice's bank read is shared by enough
// queries that the FMAs, not the read, bound it.
constexpr int64_t kOnePassQueries = 1024;

RetrieveStepResult concatenated(const std::vector<RetrieveStepResult>& slices) {
  std::vector<at::Tensor> out, support, argmax, lse, threshold;
  for (const auto& slice : slices) {
    out.push_back(std::get<0>(slice));
    support.push_back(std::get<1>(slice));
    argmax.push_back(std::get<2>(slice));
    lse.push_back(std::get<3>(slice));
    threshold.push_back(std::get<4>(slice));
  }
  return {at::cat(out), at::cat(support), at::cat(argmax), at::cat(lse), at::cat(threshold)};
}

// Which path serves the call: HEN_FAST_CPU_PATH=onepass or tiled forces one (tests,
// measurements; onepass where it applies), otherwise onepass_step decides.
enum class Path { kAuto, kOnePass, kTiled };

Path path_for_call() {
  const char* asked = std::getenv("HEN_FAST_CPU_PATH");
  if (asked == nullptr || *asked == '\0' || std::strcmp(asked, "auto") == 0) return Path::kAuto;
  if (std::strcmp(asked, "onepass") == 0) return Path::kOnePass;
  if (std::strcmp(asked, "tiled") == 0) return Path::kTiled;
  TORCH_CHECK(false, "HEN_FAST_CPU_PATH must be auto, onepass or tiled, got '", asked, "'");
}

}  // namespace
}  // namespace cpu

// Registered by csrc/common/register.cpp as hen_fast::retrieve_step (CPU).
RetrieveStepResult retrieve_step_cpu(
    const at::Tensor& x, const at::Tensor& keys, const std::optional<at::Tensor>& sq_norms,
    const at::Tensor& values, double beta, int64_t similarity, int64_t separation, double alpha,
    double degree, int64_t capacity, bool want_info) {
  using namespace cpu;
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
  capacity = std::max<int64_t>(1, capacity);
  const Path path = path_for_call();
  if (path != Path::kTiled) {
    // The one-pass state (values accumulated, candidate windows) grows with the queries: many
    // are taken kOnePassQueries at a time, each slice reading the bank once for all of its own.
    const int64_t rows = p.x.size(0);
    std::vector<RetrieveStepResult> slices;
    bool complete = false;
    for (int64_t start = 0; !complete; start += kOnePassQueries) {
      Problem slice = p;
      const int64_t end = std::min(rows, start + kOnePassQueries);
      slice.x = p.x.slice(0, start, end);
      slice.x_scaled = p.x_scaled.slice(0, start, end);
      auto result = onepass_step(slice, capacity, want_info, path == Path::kOnePass);
      if (!result.has_value()) break;  // declined: the tiled path takes the whole call
      slices.push_back(std::move(*result));
      complete = end == rows;
    }
    if (complete) return slices.size() == 1 ? slices.front() : concatenated(slices);
  }
  if (separation == kEntmax) return sparse_step(p, capacity);
  return smooth_step(p, want_info);
}

}  // namespace hen_fast
