// Backward of one retrieval update on the CPU: gradients of out = p(z) V, z = beta * sim(x, K),
// for the queries x, the keys K and the values V, recomputing the weights tile by tile.
//
// The forward (retrieve_cpu.cpp) saves per query one number, the threshold t that turns a
// similarity s into its weight, relative to the row maximum s_max (recomputed here by a max pass
// with this file's own tiling, so that both passes see the same bits): p = exp(beta (s - s_max)
// - t) (softmax), p = relu(s)^n exp(-t) (polynomial: beta cancels), p = [(alpha - 1) beta
// (s - s_max) - t]_+^q, q = 1 / (alpha - 1) (entmax and sparsemax). Nothing here overflows to NaN
// at beta = 1e30: at the limit (one memory with all the weight) the score gradient is exactly 0,
// and among exact ties (sparse separations) it is beta times a finite number (inf beyond float).
// With dp = dout V^T every separation's score gradient has the form
//   dz = g (dp - c),   c per query,
//   softmax      g = p,                 c = sum_j p_j dp_j = dout . out
//   polynomial   g = n p / z  (z > 0),  c = dout . out
//   entmax       g = p^(2 - alpha) = [(alpha - 1) z - t]_+^(q - 1) (the support's indicator for
//                sparsemax), c = sum_j g_j dp_j / sum_j g_j (the threshold moves with the scores)
// and then dx = dz dz/dx, dK = dz^T dz/dK, dV = p^T dout. c needs a pass over the bank for entmax
// (sum g V), otherwise it is free. The main pass runs tasks of (query group) x (bank split): each
// task streams its split in tiles and its group in blocks, with one (block x tile) score buffer;
// dx is summed over per-split partials and dK, dV over per-group partials, so no two tasks write
// one element and the extra memory is O(splits B d + groups M (d + dv)), never O(B M).
// The CPU kernel of the op hen_fast::retrieve_step_backward (csrc/common/ops.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../common/ops.h"
#include "hen_fast/codes.h"
#include "manhattan.h"
#include "parallel.h"

namespace hen_fast {
namespace {

// The codes of retrieve_cpu.cpp and hen_fast/backends/cpu.py.
// The codes of hen_fast/codes.py (generated header), under this file's short names.
constexpr int64_t kL2 = codes::kSimilarityL2, kManhattan = codes::kSimilarityManhattan;
constexpr int64_t kSoftmax = codes::kSeparationSoftmax, kPolynomial = codes::kSeparationPolynomial,
                  kEntmax = codes::kSeparationEntmax;

constexpr int64_t kTile = 1024;
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kMinSplit = 2048;

struct Problem {
  at::Tensor x;          // (B, d) float32, contiguous
  at::Tensor x_scaled;   // x (dot) or 2 x (l2): the forward's score operand
  at::Tensor keys;       // (M, d) any float dtype
  at::Tensor values;     // (M, dv) any float dtype
  at::Tensor norms;      // (M,) -||k||^2 in float32 for l2
  at::Tensor s_max;      // (B,) float32: the row maximum of the similarities
  at::Tensor grad_out;   // (B, dv) float32, contiguous
  at::Tensor threshold;  // (B,) float32
  at::Tensor shift;      // (B,) float32: c
  double beta;
  int64_t similarity;
  int64_t separation;
  double alpha;
  double degree;
};

// Similarities of queries [r0, r1) against the float32 key tile `keys` (memories [m0, m1)),
// clamped to float's finite range as in the forward.
at::Tensor score_tile(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                      const at::Tensor& keys) {
  at::Tensor s;
  if (p.similarity == kManhattan) {
    s = at::empty({r1 - r0, m1 - m0}, at::kFloat);
    manhattan_block(p.x.data_ptr<float>() + r0 * p.x.size(1), r1 - r0, keys.data_ptr<float>(),
                     m1 - m0, p.x.size(1), s.data_ptr<float>(), s.stride(0), -1.f);
  } else if (p.similarity == kL2) {
    s = at::addmm(p.norms.slice(0, m0, m1).unsqueeze(0), p.x_scaled.slice(0, r0, r1), keys.t());
  } else {
    s = at::mm(p.x_scaled.slice(0, r0, r1), keys.t());
  }
  const float big = std::numeric_limits<float>::max();
  return s.clamp_(-big, big);
}

// (p, g) of a similarity tile for queries [r0, r1) (see the header for g, the derivative of p
// with respect to the score z = beta s).
std::tuple<at::Tensor, at::Tensor> weights_and_slopes(const Problem& p, const at::Tensor& s,
                                                      int64_t r0, int64_t r1) {
  auto t = p.threshold.slice(0, r0, r1).unsqueeze(1);
  if (p.separation == kSoftmax) {
    auto s_max = p.s_max.slice(0, r0, r1).unsqueeze(1);
    auto weights = (s - s_max).mul_(p.beta).sub_(t).exp_();
    return {weights, weights};
  }
  const auto& z = s;  // polynomial: relu(beta s)^n normalised does not depend on beta
  if (p.separation == kPolynomial) {
    // A row with no positive score has t = -inf and zero weights: t = +inf gives exp(-inf) = 0.
    auto safe_t = at::where(at::isinf(t), at::full_like(t, std::numeric_limits<float>::infinity()), t);
    auto positive = z > 0;
    auto log_r = at::where(positive, z, at::ones_like(z)).log_();
    auto weights = at::where(positive, (log_r * p.degree - safe_t).exp_(), at::zeros_like(z));
    // g = n p / z = n relu(s)^(n - 1) exp(-t) / beta.
    auto slopes = at::where(positive,
                            (log_r * (p.degree - 1.0) - safe_t).exp_() * (p.degree / p.beta),
                            at::zeros_like(z));
    return {weights, slopes};
  }
  const double q = 1.0 / (p.alpha - 1.0);
  auto s_max = p.s_max.slice(0, r0, r1).unsqueeze(1);
  auto excess = (s - s_max).mul_((p.alpha - 1.0) * p.beta).sub_(t).clamp_min_(0.0);
  if (q == 1.0) return {excess, (excess > 0).to(at::kFloat)};
  return {excess.pow(q), excess.pow(q - 1.0)};
}

// The splits of the bank and the groups of queries, so that groups x splits gives every thread
// work, splits first (they keep the dx partials small).
struct Grid {
  int64_t splits, split_size, groups, group_size;
  Grid(int64_t rows, int64_t num_memories) {
    const int64_t wanted = 2 * at::get_num_threads();
    splits = std::max<int64_t>(1, std::min(wanted, num_memories / kMinSplit));
    split_size = (num_memories + splits - 1) / splits;
    const int64_t blocks = (rows + kQueryBlock - 1) / kQueryBlock;
    groups = std::max<int64_t>(1, std::min((wanted + splits - 1) / splits, blocks));
    group_size = ((blocks + groups - 1) / groups) * kQueryBlock;
  }
};

// Runs fn(group, split, r0, r1, m0, m1, keys, values) for every (query block, bank tile), the
// tiles of one (group, split) task in order on one thread; keys and values arrive as float32.
template <typename Fn>
void for_each_tile(const Problem& p, const Grid& grid, const Fn& fn) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0);
  parallel_tasks(0, grid.groups * grid.splits, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / grid.splits, split = task % grid.splits;
      const int64_t g0 = group * grid.group_size, g1 = std::min(g0 + grid.group_size, rows);
      const int64_t s0 = split * grid.split_size;
      const int64_t s1 = std::min(s0 + grid.split_size, num_memories);
      for (int64_t m0 = s0; m0 < s1; m0 += kTile) {
        const int64_t m1 = std::min(m0 + kTile, s1);
        auto keys = p.keys.slice(0, m0, m1).to(at::kFloat).contiguous();
        auto values = p.values.slice(0, m0, m1).to(at::kFloat);
        for (int64_t r0 = g0; r0 < g1; r0 += kQueryBlock) {
          const int64_t r1 = std::min(r0 + kQueryBlock, g1);
          fn(group, split, r0, r1, m0, m1, keys, values);
        }
      }
    }
  });
}

// The row maximum of the similarities, by a pass with the same tiles as the others.
at::Tensor row_max(const Problem& p) {
  const int64_t rows = p.x.size(0);
  Grid grid(rows, p.keys.size(0));
  auto best = at::full({grid.splits, rows}, -std::numeric_limits<float>::infinity(), at::kFloat);
  for_each_tile(p, grid, [&](int64_t, int64_t split, int64_t r0, int64_t r1, int64_t m0,
                             int64_t m1, const at::Tensor& keys, const at::Tensor&) {
    auto slice = best[split].slice(0, r0, r1);
    slice.copy_(at::maximum(slice, std::get<0>(score_tile(p, r0, r1, m0, m1, keys).max(1))));
  });
  return std::get<0>(best.max(0)).contiguous();
}

// c for entmax: sum_j g_j dp_j / sum_j g_j = dout . (sum_j g_j v_j) / sum_j g_j.
at::Tensor entmax_shift(const Problem& p) {
  const int64_t rows = p.x.size(0), dv = p.values.size(1);
  Grid grid(rows, p.keys.size(0));
  auto acc = at::zeros({grid.splits, rows, dv}, at::kFloat);
  auto total = at::zeros({grid.splits, rows}, at::kFloat);
  for_each_tile(p, grid, [&](int64_t, int64_t split, int64_t r0, int64_t r1, int64_t m0,
                             int64_t m1, const at::Tensor& keys, const at::Tensor& values) {
    auto z = score_tile(p, r0, r1, m0, m1, keys);
    auto slopes = std::get<1>(weights_and_slopes(p, z, r0, r1));
    acc[split].slice(0, r0, r1).addmm_(slopes, values);
    total[split].slice(0, r0, r1).add_(slopes.sum(1));
  });
  return (acc.sum(0) * p.grad_out).sum(1) / total.sum(0);
}

// dx += -beta dz sign(x - k) and dK += beta dz^T sign(x - k), skipping zero score gradients
// (most of them for sparse separations).
void manhattan_grads(const Problem& p, const at::Tensor& dz, int64_t r0, int64_t r1,
                     const at::Tensor& keys, float* grad_x, float* grad_keys) {
  const int64_t d = p.x.size(1), cols = keys.size(0);
  const float beta = static_cast<float>(p.beta);
  const float* xs = p.x.data_ptr<float>();
  const float* ks = keys.data_ptr<float>();
  auto dz_c = dz.contiguous();
  const float* dzs = dz_c.data_ptr<float>();
  for (int64_t i = 0; i < r1 - r0; ++i) {
    const float* xi = xs + (r0 + i) * d;
    float* gxi = grad_x + i * d;
    for (int64_t j = 0; j < cols; ++j) {
      const float w = beta * dzs[i * cols + j];
      if (w == 0.f) continue;
      const float* kj = ks + j * d;
      float* gkj = grad_keys + j * d;
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) {
        const float sign = static_cast<float>((xi[t] > kj[t]) - (xi[t] < kj[t]));
        gxi[t] -= w * sign;
        gkj[t] += w * sign;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_pass(const Problem& p) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0);
  const int64_t d = p.x.size(1), dv = p.values.size(1);
  Grid grid(rows, num_memories);
  auto grad_x = at::zeros({grid.splits, rows, d}, at::kFloat);
  auto grad_keys = at::zeros({grid.groups, num_memories, d}, at::kFloat);
  auto grad_values = at::zeros({grid.groups, num_memories, dv}, at::kFloat);
  const double scale = p.similarity == kL2 ? 2.0 * p.beta : p.beta;
  for_each_tile(p, grid, [&](int64_t group, int64_t split, int64_t r0, int64_t r1, int64_t m0,
                             int64_t m1, const at::Tensor& keys, const at::Tensor& values) {
    auto z = score_tile(p, r0, r1, m0, m1, keys);
    auto [weights, slopes] = weights_and_slopes(p, z, r0, r1);
    auto grad_out = p.grad_out.slice(0, r0, r1);
    auto gx = grad_x[split].slice(0, r0, r1);
    auto gk = grad_keys[group].slice(0, m0, m1);
    grad_values[group].slice(0, m0, m1).addmm_(weights.t(), grad_out);
    auto dz = at::mm(grad_out, values.t())  // dp
                  .sub_(p.shift.slice(0, r0, r1).unsqueeze(1))
                  .mul_(slopes);
    if (p.similarity == kManhattan) {
      manhattan_grads(p, dz, r0, r1, keys, gx.data_ptr<float>(), gk.data_ptr<float>());
      return;
    }
    gx.addmm_(dz, keys, 1.0, scale);
    gk.addmm_(dz.t(), p.x.slice(0, r0, r1), 1.0, scale);
    if (p.similarity == kL2) {  // d(-||k||^2)/dk = -2k
      gk.sub_(keys * (dz.sum(0) * static_cast<float>(scale)).unsqueeze(1));
    }
  });
  return {grad_x.sum(0), grad_keys.sum(0), grad_values.sum(0)};
}

}  // namespace

// Registered by csrc/common/register.cpp as hen_fast::retrieve_step_backward (CPU).
RetrieveStepBackwardResult retrieve_step_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& keys,
    const std::optional<at::Tensor>& sq_norms, const at::Tensor& values, const at::Tensor& out,
    const at::Tensor& threshold, double beta, int64_t similarity, int64_t separation,
    double alpha, double degree) {
  TORCH_CHECK(x.dim() == 2 && keys.dim() == 2 && values.dim() == 2 && grad_out.dim() == 2,
              "retrieve_step_backward: 2-D inputs");
  TORCH_CHECK(x.size(1) == keys.size(1) && keys.size(0) == values.size(0) &&
                  grad_out.size(0) == x.size(0) && grad_out.size(1) == values.size(1) &&
                  out.sizes() == grad_out.sizes() && threshold.numel() == x.size(0),
              "retrieve_step_backward: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "retrieve_step_backward: queries must be float32");
  Problem p{x.contiguous(), at::Tensor(), keys, values, at::Tensor(), at::Tensor(),
            grad_out.to(at::kFloat).contiguous(), threshold.to(at::kFloat).contiguous(),
            at::Tensor(), beta, similarity, separation, alpha, degree};
  p.x_scaled = similarity == kL2 ? p.x * 2.0 : p.x;
  if (similarity == kL2) {
    auto norms = sq_norms.has_value() ? sq_norms->to(at::kFloat) : keys.to(at::kFloat).pow(2).sum(1);
    p.norms = norms.neg().contiguous();
  }
  if (separation != kPolynomial) p.s_max = row_max(p);
  p.shift = separation == kEntmax ? entmax_shift(p) : (p.grad_out * out.to(at::kFloat)).sum(1);
  auto [grad_x, grad_keys, grad_values] = backward_pass(p);
  return {grad_x, grad_keys, grad_values};
}

}  // namespace hen_fast
