// Torch binding of the CUDA kernels: hen_fast::retrieve_step for CUDA tensors, declared through
// the op's function type in csrc/common/ops.h (same arguments, same five outputs as the CPU
// kernel) and registered by csrc/common/register.cpp. Compiled only in the CUDA build. It checks
// the tensors, allocates the partial buffers on the tensors' device, and launches the passes of
// retrieve_dense.cu / retrieve_sparse.cu on the current stream.
//
// Any number of queries works: the grid has one block per 8 queries, each reading the bank once
// (blocks of one split share it through L2). The kernels are built for few queries (B <= 64);
// more run correctly but slower than the Triton backend's tensor-core tiles.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../common/ops.h"
#include "retrieve_cuda.h"

namespace hen_fast {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kSoftmaxSupportEps = 1e-6;  // hen_fast.numerics.SOFTMAX_SUPPORT_EPS
constexpr int kNewtonIterations = 100;
constexpr int64_t kSeparationSoftmax = codes::kSeparationSoftmax;
constexpr int64_t kSeparationEntmax = codes::kSeparationEntmax;

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "retrieve_step (CUDA): ", what, " failed: ",
              cudaGetErrorString(error));
}

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::kFloat32;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    default:
      TORCH_CHECK(false, "retrieve_step (CUDA): ", name,
                  " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

// The kernels read rows with a unit column stride and any row stride.
at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

// 16-byte loads need a 16-byte aligned base and row stride.
bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(0) == 1 || (t.stride(0) * t.element_size()) % 16 == 0);
}

struct Partials {
  at::Tensor max, sum, best, index, count, pz, pa, acc;
  Partials(int64_t splits, int64_t rows, int64_t value_dim, const at::TensorOptions& f32) {
    max = at::empty({splits, rows}, f32);
    sum = at::empty({splits, rows}, f32);
    best = at::empty({splits, rows}, f32);
    index = at::empty({splits, rows}, f32.dtype(at::kLong));
    count = at::empty({splits, rows}, f32.dtype(at::kLong));
    pz = at::empty({splits, rows}, f32);
    pa = at::empty({splits, rows}, f32);
    acc = at::empty({splits, rows, value_dim}, f32);
  }
  void attach(cuda::PassArgs& a) const {
    a.part_max = max.data_ptr<float>();
    a.part_sum = sum.data_ptr<float>();
    a.part_best = best.data_ptr<float>();
    a.part_index = index.data_ptr<int64_t>();
    a.part_count = count.data_ptr<int64_t>();
    a.part_pz = pz.data_ptr<float>();
    a.part_pa = pa.data_ptr<float>();
    a.part_acc = acc.data_ptr<float>();
  }
};

// A dense pass over the bank, in slabs of value columns when they are more than one launch
// accumulates (each slab scores the bank again), then the combine kernel.
void dense_update(cuda::PassArgs a, int mode, const at::Tensor& values, const Partials& part,
                  const cuda::Outputs& outputs, cudaStream_t stream) {
  part.attach(a);
  const int64_t value_dim = values.size(1);
  const int64_t slab = cuda::max_value_slab(a.dtype, a.values_aligned);
  a.value_pitch = static_cast<int>(value_dim);
  for (int64_t c0 = 0; c0 < value_dim; c0 += slab) {
    // c0 is a multiple of 256 16-byte pieces: the slab stays 16-byte aligned.
    a.values = static_cast<const char*>(values.data_ptr()) + c0 * values.element_size();
    a.value_dim = static_cast<int>(std::min(slab, value_dim - c0));
    a.value_offset = static_cast<int>(c0);
    check_launch(cuda::launch_dense_pass(a, mode, stream), "dense pass");
  }
  a.values = values.data_ptr();
  a.value_dim = static_cast<int>(value_dim);
  a.value_offset = 0;
  check_launch(cuda::launch_combine(a, mode, outputs, stream), "combine");
}

}  // namespace

RetrieveStepResult retrieve_step_cuda(
    const at::Tensor& x_in, const at::Tensor& keys_in, const std::optional<at::Tensor>& sq_norms,
    const at::Tensor& values_in, double beta, int64_t similarity, int64_t separation, double alpha,
    double degree, int64_t capacity, bool want_info) {
  TORCH_CHECK(x_in.dim() == 2 && keys_in.dim() == 2 && values_in.dim() == 2,
              "retrieve_step (CUDA): x, keys and values must be 2-D");
  TORCH_CHECK(x_in.size(1) == keys_in.size(1) && keys_in.size(0) == values_in.size(0),
              "retrieve_step (CUDA): shapes do not match: x ", x_in.sizes(), ", keys ",
              keys_in.sizes(), ", values ", values_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "retrieve_step (CUDA): x must be float32");
  TORCH_CHECK(x_in.is_cuda() && keys_in.device() == x_in.device() &&
                  values_in.device() == x_in.device(),
              "retrieve_step (CUDA): x, keys and values must be on one CUDA device");
  TORCH_CHECK(keys_in.scalar_type() == values_in.scalar_type(),
              "retrieve_step (CUDA): keys and values must have one dtype, got ",
              keys_in.scalar_type(), " and ", values_in.scalar_type());
  const int dtype = dtype_code(keys_in, "keys");
  const int64_t rows = x_in.size(0), dim = x_in.size(1), num_memories = keys_in.size(0);
  const int64_t value_dim = values_in.size(1);
  TORCH_CHECK(dim >= 1 && dim <= cuda::kMaxDim, "retrieve_step (CUDA): the dimension d must be in "
              "[1, ", cuda::kMaxDim, "], got ", dim);
  TORCH_CHECK(num_memories >= 1 && num_memories < INT_MAX,
              "retrieve_step (CUDA): the bank must hold 1 to 2^31 - 2 memories, got ",
              num_memories);
  TORCH_CHECK(value_dim >= 1 && value_dim < INT_MAX, "retrieve_step (CUDA): values must have "
              "at least one column");
  TORCH_CHECK(similarity >= 0 && similarity < cuda::kSimilarityCount,
              "retrieve_step (CUDA): unknown similarity code ", similarity);
  TORCH_CHECK(separation >= 0 && separation < codes::kSeparationCount,
              "retrieve_step (CUDA): unknown separation code ", separation);
  TORCH_CHECK(separation != kSeparationEntmax || (alpha > 1.0 && alpha <= 2.0),
              "retrieve_step (CUDA): alpha must be in (1, 2], got ", alpha);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto f32 = x_in.options().dtype(at::kFloat);
  const auto i64 = x_in.options().dtype(at::kLong);
  auto out = at::empty({rows, value_dim}, f32);
  auto support = at::empty({rows}, i64);
  auto argmax = at::empty({rows}, i64);
  auto lse = at::empty({rows}, f32);
  if (rows == 0) return {out, support, argmax, lse, at::empty({rows}, f32)};

  const auto x = x_in.contiguous();
  const auto keys = unit_column_stride(keys_in);
  const auto values = unit_column_stride(values_in);
  at::Tensor norms;
  if (similarity == cuda::kL2) {
    norms = sq_norms.has_value() ? sq_norms->to(at::kFloat).contiguous()
                                 : keys.to(at::kFloat).pow(2).sum(1);
    TORCH_CHECK(norms.numel() == num_memories && norms.device() == x.device(),
                "retrieve_step (CUDA): sq_norms must hold one float per memory, on x's device");
  }

  cuda::PassArgs a;
  a.x = x.data_ptr<float>();
  a.rows = rows;
  a.keys = keys.data_ptr();
  a.key_stride = keys.stride(0);
  a.values = values.data_ptr();
  a.value_stride = values.stride(0);
  a.sq_norms = norms.defined() ? norms.data_ptr<float>() : nullptr;
  a.num_memories = num_memories;
  a.dim = static_cast<int>(dim);
  a.value_dim = static_cast<int>(value_dim);
  a.value_pitch = static_cast<int>(value_dim);
  a.dtype = dtype;
  a.similarity = static_cast<int>(similarity);
  a.keys_aligned = aligned16(keys);
  a.values_aligned = aligned16(values);
  a.degree = static_cast<float>(degree);
  a.alpha = alpha;
  cuda::plan_splits(rows, num_memories, x.get_device(), &a.splits, &a.split_size);
  cuda::Outputs outputs{out.data_ptr<float>(), support.data_ptr<int64_t>(),
                        argmax.data_ptr<int64_t>(), lse.data_ptr<float>()};

  if (separation != kSeparationEntmax) {
    const bool softmax = separation == kSeparationSoftmax;
    // Softmax works in base 2: beta log2(e) is folded into the scores, exp2 forms the weights.
    a.scale = static_cast<float>(softmax ? beta * kLog2e : beta);
    // The threshold of softmax and polynomial is their log-normaliser relative to the row
    // maximum, as the CPU kernel returns it (csrc/common/ops.h).
    const auto threshold = at::empty({rows}, f32);
    const auto row_max = at::empty({rows}, f32);
    outputs.threshold = threshold.data_ptr<float>();
    outputs.row_max = row_max.data_ptr<float>();
    const Partials part(a.splits, rows, value_dim, f32);
    dense_update(a, softmax ? cuda::kSoftmax : cuda::kPolynomial, values, part, outputs, stream);
    if (softmax && want_info) {
      // p > eps  <=>  beta (s - s_max) > t + log(eps): a counting pass, in the kernels' base-2
      // units, relative to the row maximum.
      const auto cut = ((threshold + std::log(kSoftmaxSupportEps)) * kLog2e).contiguous();
      const auto counts = at::empty({a.splits, rows}, i64);
      a.threshold = cut.data_ptr<float>();
      a.row_max = row_max.data_ptr<float>();
      a.part_count = counts.data_ptr<int64_t>();
      check_launch(cuda::launch_stats_pass(a, cuda::kCountAbove, stream), "support count");
      support.copy_(counts.sum(0));
    }
    return {out, support, argmax, lse, threshold};
  }

  // Sparse: scores y = (alpha - 1) beta sim.
  a.scale = static_cast<float>((alpha - 1.0) * beta);
  a.capacity = static_cast<int>(std::min<int64_t>(std::max<int64_t>(capacity, 1), INT_MAX / 2));
  const auto cand_y = at::empty({rows, a.capacity}, f32);
  const auto cand_index = at::empty({rows, a.capacity}, x.options().dtype(at::kInt));
  const auto cand_count = at::zeros({rows}, x.options().dtype(at::kInt));
  const auto best = at::empty({a.splits, rows}, f32);
  const auto best_index = at::empty({a.splits, rows}, i64);
  a.cand_y = cand_y.data_ptr<float>();
  a.cand_index = cand_index.data_ptr<int>();
  a.cand_count = cand_count.data_ptr<int>();
  a.part_best = best.data_ptr<float>();
  a.part_index = best_index.data_ptr<int64_t>();
  check_launch(cuda::launch_candidate_pass(a, stream), "candidate pass");
  const auto flag = at::empty({rows}, x.options().dtype(at::kInt));
  const auto tau64 = at::empty({rows}, x.options().dtype(at::kDouble));
  const auto y_max64 = at::empty({rows}, x.options().dtype(at::kDouble));
  check_launch(cuda::launch_threshold(a, outputs, flag.data_ptr<int>(), tau64.data_ptr<double>(),
                                      y_max64.data_ptr<double>(), stream),
               "threshold");
  // The one host round trip of a sparse step: did any row's candidates overflow?
  // Entmax's threshold is tau, in float32 (as the CPU kernel): the threshold kernel wrote every
  // row's, the Newton steps below refine the flagged rows' in place.
  if (!flag.any().item<bool>()) return {out, support, argmax, lse, tau64.to(at::kFloat)};

  // Newton passes over the whole bank for the flagged rows, from their window's tau.
  const auto done = at::zeros({rows}, x.options().dtype(at::kInt));
  const auto tau = at::empty({rows}, f32);
  const auto sums = at::empty({a.splits, rows, 2}, x.options().dtype(at::kDouble));
  a.row_flag = flag.data_ptr<int>();
  a.row_done = done.data_ptr<int>();
  a.tau64 = tau64.data_ptr<double>();
  a.y_max64 = y_max64.data_ptr<double>();
  a.part_sums = sums.data_ptr<double>();
  for (int iteration = 0; iteration < kNewtonIterations; ++iteration) {
    check_launch(cuda::launch_stats_pass(a, cuda::kNewtonSums, stream), "Newton sums");
    check_launch(cuda::launch_newton_step(a, done.data_ptr<int>(), tau64.data_ptr<double>(),
                                          tau.data_ptr<float>(), stream),
                 "Newton step");
    if (!flag.gt(done).any().item<bool>()) break;
  }
  a.tau = tau.data_ptr<float>();
  const Partials part(a.splits, rows, value_dim, f32);
  dense_update(a, cuda::kEntmaxOutput, values, part, outputs, stream);  // flagged rows only
  return {out, support, argmax, lse, tau64.to(at::kFloat)};
}

}  // namespace hen_fast
