// hen_fast::sketch_filter (CPU): the rows of an indexed bank whose sketch bound passes each
// query's cut, in one read of the sketch, the cut rising as the rows that pass are scored
// (hen_fast/sketch_filter.py says what it is for, csrc/common/ops.h what each argument is).
//
// The bound of query b on row i is  coords[b] . sketch[:, i] + rest[b] * residual[i]
// (- sq_norms[i] for l2): p float16 numbers and one float32 per row instead of d. The sketch is
// stored (p, M), a column per row, so a block of rows is p contiguous runs: the products
// vectorise over rows (one multiply-add per row and coordinate) instead of M short dot
// products, and a block stays in cache while every query reads it. A row that passes is
// scored exactly (its key row read),
// and the cut becomes max(cut, best score - gap): the caller's own cut usually comes from a few
// rows, and the best row is found within the first rows that pass, after which few do. The
// best score is shared by the threads (an atomic maximum), so every range of the bank gains
// from what any has found; which rows pass can therefore vary from run to run (always a
// superset of those above the final cut).

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/ops.h"
#include "onepass.h"
#include "parallel.h"

namespace hen_fast {
namespace {

// Rows per block: a block's bounds (4 KB) and marks stay in L1 while each query's products run.
constexpr int64_t kBlockRows = 1024;
// Floats between two queries' bounds of a block: a line more than the block, so that the
// queries' bounds at one row do not share L1 sets (4 KB apart they would, for eight queries).
constexpr int64_t kBoundStride = kBlockRows + 16;
// Blocks per task: enough tasks to balance two to a few dozen threads.
constexpr int64_t kTaskBlocks = 8;

// One query's bounds over rows [begin, begin + count) start as its rest term: bound[i] for row
// begin + i. The sketch is float16 (half the bytes of the pass, which is memory-bound), widened
// in registers: F16C / AVX-512 conversions where the CPU has them (or HEN_FAST_CPU_ISA asks),
// else c10::Half's.
void bounds_init(const float* residual, const float* sq_norms, float rest, int64_t begin,
                 int64_t count, float* bound) {
  const float* res = residual + begin;
  if (sq_norms != nullptr) {
    const float* norms = sq_norms + begin;
    for (int64_t i = 0; i < count; ++i) bound[i] = rest * res[i] - norms[i];
  } else {
    for (int64_t i = 0; i < count; ++i) bound[i] = rest * res[i];
  }
}

// Where the coordinates go into the bounds: the block's rows for every query of the call,
// query q's bounds at bound + q * kBoundStride (already holding its rest term).
struct BlockBounds {
  const float* coords;  // (queries, dims)
  int64_t queries, dims;
  const c10::Half* sketch;  // column of the block's first row
  int64_t stride;           // between the sketch's rows (coordinates)
  int64_t count;            // rows in the block
  float* bound;
};

// The SIMD loops add, for G queries at once over R vectors of rows, every coordinate into
// accumulators held in registers (G * R <= 8), and store them once: each float16 vector is
// widened once for the G queries, and there are G * R independent multiply-add chains to
// cover their latency. A pass per query and coordinate over the bounds in L1 instead ran
// load-store bound (p = 32 over 1e6 rows: 5.0 ms for one query, 16 ms for eight). Each row is
// summed in the same order (its rest term, then coordinates 0..p-1) by fused multiply-adds, or
// in the tail by a multiply and an add, a rounding the query's margin covers.
//
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), a self-initialised variable that
// -Wmaybe-uninitialized reports wherever they are inlined (as in onepass.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int G, int R>
__attribute__((target("avx512f"))) int64_t rows_avx512(const BlockBounds& b, int64_t q0,
                                                       int64_t i) {
  constexpr int64_t kRun = 16 * R;
  for (; i + kRun <= b.count; i += kRun) {
    __m512 acc[G][R];
    #pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[g][r] = _mm512_loadu_ps(b.bound + (q0 + g) * kBoundStride + i + 16 * r);
      }
    }
    for (int64_t j = 0; j < b.dims; ++j) {
      __m512 w[R];
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const c10::Half* at = b.sketch + j * b.stride + i + 16 * r;
        w[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
      }
      #pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m512 c = _mm512_set1_ps(b.coords[(q0 + g) * b.dims + j]);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[g][r] = _mm512_fmadd_ps(c, w[r], acc[g][r]);
      }
    }
    #pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(b.bound + (q0 + g) * kBoundStride + i + 16 * r, acc[g][r]);
      }
    }
  }
  return i;
}
#pragma GCC diagnostic pop

template <int G, int R>
__attribute__((target("avx2,fma,f16c"))) int64_t rows_avx2(const BlockBounds& b, int64_t q0,
                                                           int64_t i) {
  constexpr int64_t kRun = 8 * R;
  for (; i + kRun <= b.count; i += kRun) {
    __m256 acc[G][R];
    #pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[g][r] = _mm256_loadu_ps(b.bound + (q0 + g) * kBoundStride + i + 8 * r);
      }
    }
    for (int64_t j = 0; j < b.dims; ++j) {
      __m256 w[R];
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const c10::Half* at = b.sketch + j * b.stride + i + 8 * r;
        w[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
      }
      #pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m256 c = _mm256_set1_ps(b.coords[(q0 + g) * b.dims + j]);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[g][r] = _mm256_fmadd_ps(c, w[r], acc[g][r]);
      }
    }
    #pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(b.bound + (q0 + g) * kBoundStride + i + 8 * r, acc[g][r]);
      }
    }
  }
  return i;
}

// Rows from i on, one at a time (the SIMD loops' tail, and the loop without SIMD).
void rows_scalar(const BlockBounds& b, int64_t q0, int64_t queries, int64_t i) {
  for (int64_t q = q0; q < q0 + queries; ++q) {
    float* bound = b.bound + q * kBoundStride;
    for (int64_t row = i; row < b.count; ++row) {
      for (int64_t j = 0; j < b.dims; ++j) {
        bound[row] += b.coords[q * b.dims + j] * static_cast<float>(b.sketch[j * b.stride + row]);
      }
    }
  }
}

// Every query's bounds on the block: groups of 8, 4, 2 queries, then one (over 4 vectors of
// rows, so that a lone query has four chains too), then the rows left one by one.
template <int64_t (*Rows8)(const BlockBounds&, int64_t, int64_t),
          int64_t (*Rows4)(const BlockBounds&, int64_t, int64_t),
          int64_t (*Rows2)(const BlockBounds&, int64_t, int64_t),
          int64_t (*Rows1)(const BlockBounds&, int64_t, int64_t)>
void bounds_simd(const BlockBounds& b) {
  int64_t q = 0;
  auto group = [&](int64_t size, int64_t (*rows)(const BlockBounds&, int64_t, int64_t)) {
    for (; q + size <= b.queries; q += size) rows_scalar(b, q, size, rows(b, q, 0));
  };
  group(8, Rows8);
  group(4, Rows4);
  group(2, Rows2);
  group(1, Rows1);
}

void bounds_avx512(const BlockBounds& b) {
  bounds_simd<rows_avx512<8, 1>, rows_avx512<4, 2>, rows_avx512<2, 2>, rows_avx512<1, 4>>(b);
}

void bounds_avx2(const BlockBounds& b) {
  bounds_simd<rows_avx2<8, 1>, rows_avx2<4, 2>, rows_avx2<2, 2>, rows_avx2<1, 4>>(b);
}

void bounds_generic(const BlockBounds& b) { rows_scalar(b, 0, b.queries, 0); }

using BoundsFn = void (*)(const BlockBounds&);

// The bounds loop for the instruction set of this call: the CPU's widest, or the narrower one
// HEN_FAST_CPU_ISA asks for (as the one-pass kernel reads it, so tests run every variant).
BoundsFn bounds_for_call() {
  const char* error = nullptr;
  const onepass::Isa isa = onepass::isa_for_call(&error);
  TORCH_CHECK(error == nullptr, "sketch_filter: ", error);
  if (isa == onepass::kAvx512) return bounds_avx512;
  if (isa == onepass::kAvx2) return bounds_avx2;
  return bounds_generic;
}

// How many bounds are above the cut (NaN counts as above: never skipped); branch-free, so that
// it vectorises. Most blocks have none once the cut has risen, and skip the scalar pass.
__attribute__((target_clones("avx512f", "avx2", "default")))
int64_t count_above(const float* bound, float cut, int64_t count) {
  int64_t above = 0;
  for (int64_t i = 0; i < count; ++i) above += !(bound[i] <= cut);
  return above;
}

// x . k in float32, in 16 running sums (a fixed-width inner loop the compiler vectorises).
template <typename Key>
float row_dot(const float* x, const Key* key, int64_t dim) {
  float sums[16] = {0.0f};
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    for (int l = 0; l < 16; ++l) sums[l] += x[j + l] * static_cast<float>(key[j + l]);
  }
  for (; j < dim; ++j) sums[j & 15] += x[j] * static_cast<float>(key[j]);
  float total = 0.0f;
  for (float s : sums) total += s;
  return total;
}

void atomic_max(std::atomic<float>& target, float value) {
  float seen = target.load(std::memory_order_relaxed);
  while (value > seen && !target.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

struct TaskResult {
  std::vector<int64_t> rows;
};

struct Problem {
  int64_t queries, dims, dim, rows, sketch_stride, key_stride, limit;
  const float *x, *coords, *rest, *cut, *gap;
  const c10::Half* sketch;
  const float *residual, *sq_norms;
};

// Asks for the sketch of the block of rows from `begin` (the next one) while this one is
// computed: the bounds loops read p columns at once, 32 to 128 bytes of each per run of rows,
// more streams than the hardware prefetchers follow (eight queries ran at 8 GB/s of sketch).
void prefetch_block(const Problem& pb, int64_t begin) {
  if (begin >= pb.rows) return;
  const int64_t count = std::min(kBlockRows, pb.rows - begin);
  constexpr int64_t kLine = 64 / sizeof(c10::Half);
  for (int64_t j = 0; j < pb.dims; ++j) {
    const c10::Half* column = pb.sketch + j * pb.sketch_stride + begin;
    for (int64_t i = 0; i < count; i += kLine) __builtin_prefetch(column + i, 0, 2);
  }
}

template <typename Key>
SketchFilterResult run(const Problem& pb, const Key* keys, const at::TensorOptions& options) {
  const int64_t blocks = (pb.rows + kBlockRows - 1) / kBlockRows;
  const int64_t tasks = (blocks + kTaskBlocks - 1) / kTaskBlocks;
  std::vector<TaskResult> results(static_cast<size_t>(tasks));
  // Per query, the highest cut any row has given (max(cut, score - gap)), shared by the tasks.
  std::vector<std::atomic<float>> cuts(static_cast<size_t>(pb.queries));
  for (int64_t q = 0; q < pb.queries; ++q) cuts[static_cast<size_t>(q)].store(pb.cut[q]);
  // Rows passed per query so far, over all tasks: once one query passes more than `limit`, or
  // passes rows at a pace that will (more than limit / 4 ahead of `limit` times the share of the
  // bank read: a query with a fifth of the bank inside its cut is found after about 2% of it,
  // not after it has scored `limit` rows), the caller scans instead, and every task stops.
  std::vector<std::atomic<int64_t>> passed(static_cast<size_t>(pb.queries));
  for (auto& count : passed) count.store(0);
  std::atomic<int64_t> processed{0};
  std::atomic<int64_t> stopped_by{-1};
  const BoundsFn bounds = bounds_for_call();
  parallel_tasks(0, tasks, [&](int64_t first, int64_t last) {
    std::vector<float> bounds_of_block(static_cast<size_t>(pb.queries * kBoundStride));
    std::vector<uint8_t> mark(kBlockRows);
    for (int64_t task = first; task < last; ++task) {
      TaskResult& result = results[static_cast<size_t>(task)];
      const int64_t end_block = std::min(blocks, (task + 1) * kTaskBlocks);
      for (int64_t block = task * kTaskBlocks; block < end_block; ++block) {
        if (stopped_by.load(std::memory_order_relaxed) >= 0) return;
        const int64_t begin = block * kBlockRows, count = std::min(kBlockRows, pb.rows - begin);
        prefetch_block(pb, begin + kBlockRows);
        bool any = false;
        for (int64_t q = 0; q < pb.queries; ++q) {
          bounds_init(pb.residual, pb.sq_norms, pb.rest[q], begin, count,
                      bounds_of_block.data() + q * kBoundStride);
        }
        bounds({pb.coords, pb.queries, pb.dims, pb.sketch + begin, pb.sketch_stride, count,
                bounds_of_block.data()});
        for (int64_t q = 0; q < pb.queries; ++q) {
          const float* bound = bounds_of_block.data() + q * kBoundStride;
          std::atomic<float>& shared = cuts[static_cast<size_t>(q)];
          float cut = shared.load(std::memory_order_relaxed);
          if (count_above(bound, cut, count) == 0) continue;
          if (!any) std::fill(mark.begin(), mark.begin() + count, uint8_t{0});
          any = true;
          const float* xq = pb.x + q * pb.dim;
          int64_t above = 0;
          for (int64_t i = 0; i < count; ++i) {
            if (bound[i] <= cut) continue;  // the cut may have risen
            const int64_t row = begin + i;
            float score = row_dot(xq, keys + row * pb.key_stride, pb.dim);
            if (pb.sq_norms != nullptr) score -= pb.sq_norms[row];
            mark[static_cast<size_t>(i)] = 1;
            ++above;
            const float raised = score - pb.gap[q];
            if (raised > cut) {
              atomic_max(shared, raised);
              cut = shared.load(std::memory_order_relaxed);
            }
          }
          const int64_t total =
              passed[static_cast<size_t>(q)].fetch_add(above, std::memory_order_relaxed) + above;
          const double read = static_cast<double>(processed.load(std::memory_order_relaxed) +
                                                  count) / static_cast<double>(pb.rows);
          const double pace = static_cast<double>(pb.limit) * (read + 0.25);
          if (pb.limit >= 0 && (total > pb.limit || static_cast<double>(total) > pace)) {
            int64_t none = -1;
            stopped_by.compare_exchange_strong(none, q, std::memory_order_relaxed);
          }
        }
        processed.fetch_add(count, std::memory_order_relaxed);
        if (!any) continue;
        for (int64_t i = 0; i < count; ++i) {
          if (mark[static_cast<size_t>(i)]) result.rows.push_back(begin + i);
        }
      }
    }
  });

  int64_t total = 0;
  for (const TaskResult& result : results) total += static_cast<int64_t>(result.rows.size());
  at::Tensor out_rows = at::empty({total}, options.dtype(at::kLong));
  at::Tensor out_counts = at::empty({pb.queries}, options.dtype(at::kLong));
  at::Tensor out_cut = at::empty({pb.queries}, options.dtype(at::kFloat));
  int64_t* rows_p = out_rows.data_ptr<int64_t>();
  int64_t* counts_p = out_counts.data_ptr<int64_t>();
  for (const TaskResult& result : results) {
    rows_p = std::copy(result.rows.begin(), result.rows.end(), rows_p);
  }
  float* cut_p = out_cut.data_ptr<float>();
  for (int64_t q = 0; q < pb.queries; ++q) {
    counts_p[q] = passed[static_cast<size_t>(q)].load();
    cut_p[q] = cuts[static_cast<size_t>(q)].load();
  }
  // A stop shows as a count above the limit, whatever stopped it.
  const int64_t stopper = stopped_by.load();
  if (stopper >= 0) counts_p[stopper] = std::max(counts_p[stopper], pb.limit + 1);
  return {out_rows, out_counts, out_cut};
}

}  // namespace

SketchFilterResult sketch_filter_cpu(const at::Tensor& x, const at::Tensor& keys,
                                     const std::optional<at::Tensor>& sq_norms,
                                     const at::Tensor& coords, const at::Tensor& rest,
                                     const at::Tensor& sketch, const at::Tensor& residual,
                                     const at::Tensor& cut, const at::Tensor& gap,
                                     int64_t limit) {
  TORCH_CHECK(x.dim() == 2 && keys.dim() == 2 && coords.dim() == 2 && sketch.dim() == 2 &&
                  rest.dim() == 1 && residual.dim() == 1 && cut.dim() == 1 && gap.dim() == 1,
              "sketch_filter: x (B, d), keys (M, d), coords (B, p), rest (B,), sketch (p, M), "
              "residual (M,), cut (B,), gap (B,)");
  const int64_t queries = x.size(0), dim = x.size(1), rows = keys.size(0);
  TORCH_CHECK(keys.size(1) == dim, "sketch_filter: keys have ", keys.size(1), " columns, x ",
              dim);
  TORCH_CHECK(coords.size(0) == queries && rest.size(0) == queries && cut.size(0) == queries &&
                  gap.size(0) == queries,
              "sketch_filter: coords, rest, cut and gap need one entry per query");
  TORCH_CHECK(sketch.size(0) == coords.size(1) && sketch.size(1) == rows &&
                  residual.size(0) == rows,
              "sketch_filter: sketch must be (p, M) and residual (M,) for M = ", rows);
  for (const at::Tensor* t : {&x, &coords, &rest, &residual, &cut, &gap}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "sketch_filter: x, coords, rest, residual, cut and gap must be float32 on the "
                "CPU");
  }
  TORCH_CHECK(sketch.scalar_type() == at::kHalf && sketch.device().is_cpu(),
              "sketch_filter: sketch must be float16 on the CPU");
  TORCH_CHECK(keys.device().is_cpu() && (keys.scalar_type() == at::kFloat ||
                                         keys.scalar_type() == at::kBFloat16 ||
                                         keys.scalar_type() == at::kHalf),
              "sketch_filter: keys must be float32, bfloat16 or float16 on the CPU");
  TORCH_CHECK(sketch.stride(1) == 1 && (rows == 0 || sketch.stride(0) >= rows),
              "sketch_filter: sketch rows must be contiguous");
  TORCH_CHECK(keys.stride(1) == 1 || dim <= 1, "sketch_filter: keys need unit column stride");
  const at::Tensor x_c = x.contiguous(), coords_c = coords.contiguous(), rest_c = rest.contiguous(),
                   residual_c = residual.contiguous(), cut_c = cut.contiguous(),
                   gap_c = gap.contiguous();
  at::Tensor norms_c;
  if (sq_norms.has_value()) {
    TORCH_CHECK(sq_norms->dim() == 1 && sq_norms->size(0) == rows &&
                    sq_norms->scalar_type() == at::kFloat && sq_norms->device().is_cpu(),
                "sketch_filter: sq_norms must be float32 (M,) on the CPU");
    norms_c = sq_norms->contiguous();
  }
  Problem pb{queries, coords.size(1), dim, rows, sketch.stride(0), keys.stride(0), limit,
             x_c.data_ptr<float>(), coords_c.data_ptr<float>(), rest_c.data_ptr<float>(),
             cut_c.data_ptr<float>(), gap_c.data_ptr<float>(), sketch.data_ptr<c10::Half>(),
             residual_c.data_ptr<float>(), norms_c.defined() ? norms_c.data_ptr<float>() : nullptr};
  const at::TensorOptions options = x.options();
  switch (keys.scalar_type()) {
    case at::kBFloat16:
      return run(pb, keys.data_ptr<c10::BFloat16>(), options);
    case at::kHalf:
      return run(pb, keys.data_ptr<c10::Half>(), options);
    default:
      return run(pb, keys.data_ptr<float>(), options);
  }
}

}  // namespace hen_fast
