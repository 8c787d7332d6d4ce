// The few-query path of hen_fast::retrieve_step on the CPU: the bank is read once for all queries
// by the one-pass kernel (onepass.h), split into ranges over torch's threads, and the ranges'
// states are merged exactly here: softmax by their maxima (log-sum-exp weights), the argmax by
// the first index of the largest similarity, the candidate windows by concatenation (then
// sparse_finish.cpp). Softmax's support count (return_info) comes from a window too: a weight
// above 1e-6 needs beta (s - s_max) > log(1e-6).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "onepass.h"
#include "retrieve_cpu.h"

namespace hen_fast {
namespace cpu {
namespace {

constexpr int64_t kMinSplitRows = 16384;  // memories per thread's range at least
// softmax's support window (return_info) per query and range: wider supports are counted by a
// pass of the tiled kernel instead, so the window's memory stays small.
constexpr int64_t kSupportWindow = 1024;

std::optional<onepass::Kind> kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return onepass::kFloat32;
    case at::kBFloat16: return onepass::kBFloat16;
    case at::kHalf: return onepass::kFloat16;
    default: return std::nullopt;
  }
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Queries up to which the one-pass kernel takes a call, from a sweep on 2 cores of an AVX-512
// machine without AMX (python benchmarks/crossover_cpu.py; d = 128, M = 1e5-1e6, B = 1-4096, every
// similarity, softmax / sparsemax / entmax, fp32 and bf16 banks). With AVX2 or AVX-512 it was the
// faster path at every B: packed queries reach about 80% of the FMA peak while the tiled path's
// BLAS products, score pass and value product reach less (onepass / tiled time 0.4-0.6 at B = 1,
// 0.55-0.65 at B = 256-4096; AVX2 0.82 at B = 256). The plain SSE2 build loses from 8 queries on.
int64_t most_queries(onepass::Isa isa) {
  if (isa == onepass::kGeneric) return 4;
  return std::numeric_limits<int64_t>::max();
}

// The states of every (range, group), in flat arrays; a range's groups are consecutive.
struct States {
  std::vector<float> max, sum, best, floor, acc;
  std::vector<int64_t> index, window_count;
  std::unique_ptr<float[]> window_score;  // uninitialised: only counted entries are read
  std::unique_ptr<int64_t[]> window_index;
  std::vector<uint8_t> overflow;
  std::vector<onepass::GroupState> views;
  States(int64_t ranges, int64_t groups, int64_t lanes, int64_t per_vector, int64_t acc_floats,
         int64_t capacity, bool window)
      : max(ranges * groups * lanes, kNegInf),
        sum(ranges * groups * 3 * lanes, 0.f),
        best(ranges * groups * lanes, kNegInf),
        floor(ranges * groups * lanes, kNegInf),
        acc(ranges * groups * 3 * acc_floats, 0.f),
        index(ranges * groups * per_vector, 0),
        window_count(ranges * groups * per_vector, 0),
        overflow(ranges * groups * per_vector, 0) {
    const int64_t slots = window ? ranges * groups * per_vector * capacity : 0;
    window_score.reset(new float[slots]);
    window_index.reset(new int64_t[slots]);
    for (int64_t k = 0; k < ranges * groups; ++k) {
      const int64_t at = k * per_vector;
      views.push_back({max.data() + k * lanes, sum.data() + k * 3 * lanes, best.data() + k * lanes,
                       floor.data() + k * lanes,
                       index.data() + at, acc.data() + k * 3 * acc_floats,
                       window ? window_score.get() + at * capacity : nullptr,
                       window ? window_index.get() + at * capacity : nullptr,
                       window_count.data() + at, overflow.data() + at});
    }
  }
};

}  // namespace

std::optional<RetrieveStepResult> onepass_step(const Problem& p, int64_t capacity, bool want_info,
                                               bool forced) {
  const at::Tensor &keys = p.keys, &values = p.values;
  const auto key_kind = kind_of(keys), value_kind = kind_of(values);
  const bool unit_columns = (keys.size(1) <= 1 || keys.stride(1) == 1) &&
                            (values.size(1) <= 1 || values.stride(1) == 1);
  if (p.separation != kSoftmax && p.separation != kEntmax) return std::nullopt;  // polynomial
  if (!key_kind || !value_kind || !unit_columns) return std::nullopt;
  const char* isa_error = nullptr;
  const onepass::Isa isa = onepass::isa_for_call(&isa_error);
  TORCH_CHECK(isa_error == nullptr, isa_error);
  const int64_t rows = p.x.size(0), dim = p.x.size(1), dv = values.size(1);
  const int64_t num_memories = keys.size(0);
  if (!forced && rows > most_queries(isa)) return std::nullopt;

  // Queries per vector: the fewest lanes that hold them all, at most a vector's width.
  const int64_t lanes = onepass::lanes(isa);
  int64_t per_vector = 1;
  while (per_vector < std::min(rows, lanes)) per_vector *= 2;
  const int64_t width = lanes / per_vector;  // components per query and vector
  const int64_t groups = (rows + per_vector - 1) / per_vector;
  const bool values_are_keys = values.data_ptr() == keys.data_ptr() &&
                               values.scalar_type() == keys.scalar_type() && dv == dim &&
                               values.stride(0) == keys.stride(0);
  const int64_t dim_pad = round_up(std::max<int64_t>(dim, 1), lanes);
  const int64_t value_dim_pad = values_are_keys ? dim_pad : round_up(std::max<int64_t>(dv, 1), lanes);
  const int64_t vectors = dim_pad / width;

  // The queries, packed: lane (q, g) of vector t holds x[q][t * width + g].
  std::vector<float> packed(groups * vectors * lanes, 0.f);
  const float* x = p.x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t group = r / per_vector, q = r % per_vector;
    for (int64_t c = 0; c < dim; ++c) {
      packed[(group * vectors + c / width) * lanes + q * width + c % width] = x[r * dim + c];
    }
  }
  std::vector<onepass::Group> group_list;
  for (int64_t g = 0; g < groups; ++g) {
    group_list.push_back({static_cast<int>(per_vector),
                          static_cast<int>(std::min(per_vector, rows - g * per_vector)),
                          packed.data() + g * vectors * lanes});
  }

  const bool sparse = p.separation == kEntmax;
  if (!sparse) capacity = std::min(capacity, kSupportWindow);
  const double window_scale = sparse ? (p.alpha - 1.0) * p.beta
                                     : (want_info ? p.beta / -std::log(kSupportWeight) : 0.0);
  onepass::Args args{};
  args.keys = keys.data_ptr();
  args.key_stride = keys.stride(0);
  args.key_kind = *key_kind;
  args.values = values.data_ptr();
  args.value_stride = values.stride(0);
  args.value_kind = *value_kind;
  args.values_are_keys = values_are_keys;
  args.neg_norms = p.similarity == kL2 ? p.norms.data_ptr<float>() : nullptr;
  args.dim = dim;
  args.value_dim = dv;
  args.dim_pad = dim_pad;
  args.value_dim_pad = value_dim_pad;
  args.similarity = p.similarity;
  args.accumulate = !sparse;
  args.beta = static_cast<float>(float_beta(p.beta));
  args.window_scale = static_cast<float>(std::min(window_scale, static_cast<double>(kFloatMax)));
  args.alpha = sparse && window_scale <= kFloatMax ? p.alpha : 0.0;
  args.capacity = capacity;
  args.groups = group_list.data();
  args.num_groups = static_cast<int>(groups);

  const int64_t threads = at::get_num_threads();
  const int64_t ranges =
      std::max<int64_t>(1, std::min<int64_t>(threads, num_memories / kMinSplitRows));
  const int64_t range_size = (num_memories + ranges - 1) / ranges;
  const int64_t acc_floats = (value_dim_pad / width) * lanes;
  States states(ranges, groups, lanes, per_vector, acc_floats, capacity, window_scale > 0);
  const int64_t scratch = onepass::scratch_floats(isa, args);
  parallel_tasks(0, ranges, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(scratch);
    for (int64_t range = begin; range < end; ++range) {
      const int64_t m0 = range * range_size, m1 = std::min(num_memories, m0 + range_size);
      if (m0 < m1) onepass::pass(isa, args, m0, m1, states.views.data() + range * groups,
                                 buffer.data());
    }
  });

  // Merge the ranges, in bank order (a tie keeps the earlier range's index).
  auto argmax = at::zeros({rows}, at::kLong);
  auto top = at::full({rows}, kNegInf, at::kFloat);
  int64_t* argmaxes = argmax.data_ptr<int64_t>();
  float* tops = top.data_ptr<float>();
  auto lane_of = [&](int64_t range, int64_t r) {  // (state index, lane) of row r in a range
    return std::make_pair(range * groups + r / per_vector, (r % per_vector) * width);
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t range = 0; range < ranges; ++range) {
      const auto [k, lane] = lane_of(range, r);
      if (states.best[k * lanes + lane] > tops[r]) {
        tops[r] = states.best[k * lanes + lane];
        argmaxes[r] = states.index[k * per_vector + r % per_vector];
      }
    }
  }
  if (sparse) {
    Candidates candidates(rows);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t range = 0; range < ranges; ++range) {
        const auto [k, lane] = lane_of(range, r);
        const int64_t slot = k * per_vector + r % per_vector;
        candidates.overflow[r] |= states.overflow[slot];
        for (int64_t e = 0; e < states.window_count[slot]; ++e) {
          candidates.rows[r].emplace_back(states.window_score[slot * capacity + e],
                                          states.window_index[slot * capacity + e]);
        }
      }
    }
    return finish_sparse(p, candidates, top, argmax, /*same_scores=*/false);
  }

  auto out = at::empty({rows, dv}, at::kFloat);
  auto threshold = at::empty({rows}, at::kFloat);
  auto lse = at::empty({rows}, at::kFloat);
  auto support = at::zeros({rows}, at::kLong);
  float* outs = out.data_ptr<float>();
  float* thresholds = threshold.data_ptr<float>();
  float* lses = lse.data_ptr<float>();
  int64_t* supports = support.data_ptr<int64_t>();
  const double beta = float_beta(p.beta);
  std::vector<int64_t> uncounted;
  std::vector<double> weight(ranges), acc(dv);
  for (int64_t r = 0; r < rows; ++r) {
    float row_max = kNegInf;
    for (int64_t range = 0; range < ranges; ++range) {
      const auto [k, lane] = lane_of(range, r);
      row_max = std::max(row_max, states.max[k * lanes + lane]);
    }
    double total = 0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t range = 0; range < ranges; ++range) {
      const auto [k, lane] = lane_of(range, r);
      const float m = states.max[k * lanes + lane];
      // A range's state is relative to its own maximum; -inf (no memory) weighs nothing.
      const double w = m == kNegInf ? 0.0 : std::exp(beta * (static_cast<double>(m) - row_max));
      total += w * states.sum[k * 3 * lanes + lane];
      const float* a = states.acc.data() + k * 3 * acc_floats;
      for (int64_t c = 0; c < dv; ++c) acc[c] += w * a[(c / width) * lanes + lane + c % width];
    }
    if (row_max == kNegInf) total = std::numeric_limits<double>::quiet_NaN();  // NaN query
    for (int64_t c = 0; c < dv; ++c) outs[r * dv + c] = static_cast<float>(acc[c] / total);
    thresholds[r] = static_cast<float>(std::log(total));
    // In float64: beta s_max may lie far beyond float's range.
    lses[r] = static_cast<float>(p.beta * row_max + std::log(total));
    if (!want_info) continue;
    // Counted from the ranges' windows in place (no copy: the window is the memory this
    // path holds beyond its tiles).
    const double cut = std::log(total) + std::log(kSupportWeight);
    bool overflow = false;
    int64_t count = 0;
    for (int64_t range = 0; range < ranges; ++range) {
      const auto [k, lane] = lane_of(range, r);
      const int64_t slot = k * per_vector + r % per_vector;
      overflow |= states.overflow[slot] != 0;
      const float* scores = states.window_score.get() + slot * capacity;
      for (int64_t e = 0; e < states.window_count[slot]; ++e) {
        count += beta * (static_cast<double>(scores[e]) - row_max) > cut;
      }
    }
    if (overflow) {
      uncounted.push_back(r);
    } else {
      supports[r] = count;
    }
  }
  if (!uncounted.empty()) count_support(p, uncounted, threshold, at::Tensor(), support);
  return RetrieveStepResult{out, support, argmax, lse, threshold};
}

}  // namespace cpu
}  // namespace hen_fast
