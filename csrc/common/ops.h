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

// ---- The kernels (csrc/cpu, csrc/cuda). ----
RetrieveStepFn retrieve_step_cpu;
RetrieveStepBackwardFn retrieve_step_backward_cpu;
#ifdef HEN_FAST_WITH_CUDA
RetrieveStepFn retrieve_step_cuda;
#endif

}  // namespace hen_fast
