// sparsemax / entmax (sparsemax = alpha 2) on the CPU, from the candidate windows that a first
// pass over the bank kept (the tiled candidate pass of retrieve_cpu.cpp or the one-pass kernel):
// the support lies in y = (alpha - 1) beta (s - s_max) > -1, so the threshold tau is solved
// exactly on the window and the output gathered from the support rows alone. Queries whose window
// outgrew the buffer are finished by Newton passes over the bank and a full output pass (see
// hen_fast/backends/torch_backend.py). Thresholds are relative to the row maximum, so beta up to
// 1e30 and scores far beyond float's range give the limit.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "retrieve_cpu.h"

namespace hen_fast {
namespace cpu {
namespace {

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

// Wide supports: Newton passes over the bank for some rows, from thresholds known to lie at or
// below the true ones, then a full output pass. Writes those rows of out, support, lse and tau.
// The passes score with the tiled passes' tasks (query blocks, splits and tiles as in
// retrieve_cpu.cpp) and skip blocks without a wide row: a product over other rows may round
// differently, and at large beta one ulp of a score is far more than the support's width, so
// every pass must see the same bits. When the window came from other scores (`same_scores`
// false), the rows' maxima are first recomputed from these, and Newton starts at tau = -1.
void finish_wide_rows(const Problem& p, const std::vector<int64_t>& wide,
                      std::vector<double>& s_max, bool same_scores, at::Tensor out,
                      at::Tensor support, at::Tensor lse, at::Tensor tau_out) {
  const int64_t rows = p.x.size(0), num_memories = p.keys.size(0), dv = p.values.size(1);
  const int64_t count = static_cast<int64_t>(wide.size());
  const double alpha = p.alpha, q = 1.0 / (alpha - 1.0), scale = (alpha - 1.0) * p.beta;
  const Tasks tasks(rows, num_memories);
  std::vector<int64_t> slot(rows, -1);  // row -> position in `wide`
  std::vector<char> block_has(tasks.blocks, 0);
  for (int64_t k = 0; k < count; ++k) {
    slot[wide[k]] = k;
    block_has[wide[k] / kQueryBlock] = 1;
  }
  double* taus = tau_out.data_ptr<double>();
  std::vector<double> tau(count), y_top(count, 0.0);
  for (int64_t k = 0; k < count; ++k) tau[k] = same_scores ? taus[wide[k]] : -1.0;
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
  if (!same_scores) {
    std::vector<float> split_max(tasks.splits * count, kNegInf);
    visit([&](int64_t split, int64_t k, const float* zs, int64_t t0, int64_t t1) {
      float& m = split_max[split * count + k];
      for (int64_t j = 0; j < t1 - t0; ++j) m = std::max(m, zs[j]);
    });
    for (int64_t k = 0; k < count; ++k) {
      float m = kNegInf;
      for (int64_t split = 0; split < tasks.splits; ++split) {
        m = std::max(m, split_max[split * count + k]);
      }
      s_max[wide[k]] = m;
    }
  }
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

}  // namespace

RetrieveStepResult finish_sparse(const Problem& p, Candidates& candidates, const at::Tensor& top,
                                 const at::Tensor& argmax, bool same_scores) {
  const int64_t rows = p.x.size(0), dv = p.values.size(1);
  const double alpha = p.alpha, q = 1.0 / (alpha - 1.0), scale = (alpha - 1.0) * p.beta;
  auto out = at::zeros({rows, dv}, at::kFloat);
  auto support = at::zeros({rows}, at::kLong);
  auto lse = at::zeros({rows}, at::kFloat);
  auto tau = at::zeros({rows}, at::kDouble);
  const auto top_f = top.contiguous();
  const float* tops = top_f.data_ptr<float>();
  double* taus = tau.data_ptr<double>();
  int64_t* supports = support.data_ptr<int64_t>();
  float* lses = lse.data_ptr<float>();
  std::vector<double> s_max(rows);
  // Rows whose window fit: exact threshold on the candidates, output from the support alone.
  parallel_tasks(0, rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      s_max[r] = tops[r];
      std::vector<std::pair<double, int64_t>> window;
      for (const auto& entry : candidates.rows[r]) {
        const double y = relative_y(entry.first, s_max[r], scale);
        if (y > -1.0) window.emplace_back(y, entry.second);
      }
      // Descending, ties by index: the same order whatever order the candidates came in.
      std::sort(window.begin(), window.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      std::vector<double> y(window.size());
      for (size_t k = 0; k < window.size(); ++k) y[k] = window[k].first;
      const double threshold = sorted_threshold(y, alpha);
      taus[r] = threshold;
      if (candidates.overflow[r]) continue;
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
    if (candidates.overflow[r]) wide.push_back(r);
  }
  if (!wide.empty()) finish_wide_rows(p, wide, s_max, same_scores, out, support, lse, tau);
  return {out, support, argmax, lse, tau.to(at::kFloat)};
}

}  // namespace cpu
}  // namespace hen_fast
