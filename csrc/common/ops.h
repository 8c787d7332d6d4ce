// The contract of every hen_fast op: its schema (declared here once) and the C++ type of its
// kernels. Every implementation includes this header and is declared through the op's function
// type below, so a kernel whose signature drifts from its op (a CUDA binding returning four
// tensors where the op returns five) does not compile: its definition conflicts with the
// declaration here. register.cpp registers the schemas and the kernels from these declarations;
// torch then checks at load time that each function type matches its schema string, which the
// CPU tests exercise (tests/test_extension.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace hen_fast {

// ---- hen_fast::retrieve_step: one retrieval update, out = Sep(beta * sim(K, x)) V. ----
// `threshold` t is what turns a score into a weight, relative to the row maximum s_max of the
// similarities s (beta never multiplies s itself, only s - s_max, so beta up to 1e30 stays
// finite): softmax p = exp(beta (s - s_max) - t), polynomial p = relu(s)^n exp(-t) (beta
// cancels), entmax p = [(alpha - 1) beta (s - s_max) - t]_+^(1 / (alpha - 1)) (t = tau in
// [-1, 0)). The backward op recomputes s_max and the weights from it. `lse` is the energy's
// smooth maximum in absolute units (+-inf where it lies beyond float's range).
inline constexpr const char* kRetrieveStepSchema =
    "retrieve_step(Tensor x, Tensor keys, Tensor? sq_norms, Tensor values, float beta, "
    "int similarity, int separation, float alpha, float degree, int capacity, bool want_info) "
    "-> (Tensor out, Tensor support, Tensor argmax, Tensor lse, Tensor threshold)";
using RetrieveStepResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using RetrieveStepFn = RetrieveStepResult(
    const at::Tensor& x, const at::Tensor& keys, const std::optional<at::Tensor>& sq_norms,
    const at::Tensor& values, double beta, int64_t similarity, int64_t separation, double alpha,
    double degree, int64_t capacity, bool want_info);

// ---- hen_fast::retrieve_step_backward: gradients of retrieve_step's `out`. ----
inline constexpr const char* kRetrieveStepBackwardSchema =
    "retrieve_step_backward(Tensor grad_out, Tensor x, Tensor keys, Tensor? sq_norms, "
    "Tensor values, Tensor out, Tensor threshold, float beta, int similarity, int separation, "
    "float alpha, float degree) -> (Tensor grad_x, Tensor grad_keys, Tensor grad_values)";
using RetrieveStepBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using RetrieveStepBackwardFn = RetrieveStepBackwardResult(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& keys,
    const std::optional<at::Tensor>& sq_norms, const at::Tensor& values, const at::Tensor& out,
    const at::Tensor& threshold, double beta, int64_t similarity, int64_t separation,
    double alpha, double degree);

// ---- hen_fast::sketch_filter: the rows of an indexed bank whose sketch bound passes a cut. ----
// For each query b and bank row i the bound coords[b] . sketch[:, i] + rest[b] * residual[i]
// (- sq_norms[i] when given) is held to query b's cut, which starts at cut[b]; a row above it is
// scored, x[b] . keys[i] (- sq_norms[i]), and the cut rises to that score less gap[b] when that
// is higher. `rows` are the bank rows (ascending) that passed for at least one query (a NaN
// bound passes), `counts` how many passed for each query, `cut_used` each query's highest cut.
// With limit >= 0 the op may stop once a query passed more than `limit` rows, or passes them at a
// pace that will (more than limit / 4 ahead of limit times the share of rows read): that query's
// count is then above `limit`, and rows and counts are incomplete. The sketch is float16.
inline constexpr const char* kSketchFilterSchema =
    "sketch_filter(Tensor x, Tensor keys, Tensor? sq_norms, Tensor coords, Tensor rest, "
    "Tensor sketch, Tensor residual, Tensor cut, Tensor gap, int limit) "
    "-> (Tensor rows, Tensor counts, Tensor cut_used)";
using SketchFilterResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using SketchFilterFn = SketchFilterResult(const at::Tensor& x, const at::Tensor& keys,
                                          const std::optional<at::Tensor>& sq_norms,
                                          const at::Tensor& coords, const at::Tensor& rest,
                                          const at::Tensor& sketch, const at::Tensor& residual,
                                          const at::Tensor& cut, const at::Tensor& gap,
                                          int64_t limit);

// ---- The kernels (csrc/cpu, csrc/cuda). ----
RetrieveStepFn retrieve_step_cpu;
RetrieveStepBackwardFn retrieve_step_backward_cpu;
SketchFilterFn sketch_filter_cpu;
#ifdef HEN_FAST_WITH_CUDA
RetrieveStepFn retrieve_step_cuda;
#endif

}  // namespace hen_fast
