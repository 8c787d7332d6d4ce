// The few-query one-pass kernel's interface (onepass.cpp): plain types only, so that the kernel
// source, compiled once per instruction set under `#pragma GCC target`, includes nothing from
// ATen (whose inline functions carry no target and would be emitted with AVX-512 code in them).
#pragma once

#include <cstdint>

namespace hen_fast {
namespace onepass {

// Instruction sets the kernel is built for, widest last (AMX tiles are not used: a CPU that has
// them runs the AVX-512 build).
enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
enum Kind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Floats per vector register: 16 (AVX-512), 8 (AVX2), 4 (SSE2, the x86-64 baseline).
int lanes(Isa isa);
// The widest set this CPU runs; HEN_FAST_CPU_ISA=avx512|avx2|generic asks for a narrower one
// (tests, measurements); a wider one than the CPU has is refused with the reason in `error`.
Isa isa_for_call(const char** error);
const char* isa_name(Isa isa);

// A group of queries packed for the vector lanes: `per_vector` queries (a power of two dividing
// the lane count) share a vector, each over lanes / per_vector consecutive components, so a key
// element loaded once serves every query of the group. xp holds dim_pad / (lanes / per_vector)
// vectors: lane (q, g) of vector t is x[q][t * (lanes / per_vector) + g], zero beyond the
// group's rows and beyond dim.
struct Group {
  int per_vector;
  int rows;
  const float* xp;
};

// The running state of one group over one bank range. Lanes (q, g) hold query q's value,
// replicated over g. The caller allocates and initialises it (max -inf, sum 0, best -inf,
// floor -inf, acc 0, counts 0).
struct GroupState {
  float* max;      // lanes: running maximum similarity (softmax)
  float* sum;      // 3 x lanes: sum of exp(beta (s - max)); its compensation; the open chunk's
  float* best;     // lanes: running maximum similarity (argmax and the candidate window)
  float* floor;    // lanes: similarities at or below are outside the sparse support (-inf: not
                   // known yet); raised when a full window is compacted
  int64_t* index;  // per query: first index of `best`
  float* acc;      // 3 x value_dim_pad / (lanes / per_vector) vectors, laid out as xp: the
                   // weighted values, their compensation, the open chunk's (as sum)
  float* window_score;     // per query: capacity similarities kept in the window
  int64_t* window_index;   // their memory indices
  int64_t* window_count;   // per query
  uint8_t* overflow;       // per query: the window held more than capacity
};

struct Args {
  const void* keys;
  int64_t key_stride;  // elements between rows; elements within a row are contiguous
  Kind key_kind;
  const void* values;
  int64_t value_stride;
  Kind value_kind;
  bool values_are_keys;    // the same rows: each is read once
  const float* neg_norms;  // l2: -||k||^2 per memory
  int64_t dim, value_dim, dim_pad, value_dim_pad;  // *_pad: multiples of the lane count
  int64_t similarity;      // hen_fast/codes.py
  bool accumulate;         // online softmax (weights and values); else scores only
  float beta;              // at most float's largest value
  // The window: similarities s with (s - best) * window_scale > -1 - 1e-5 are kept (0: none).
  float window_scale;
  // sparsemax / entmax: alpha, from which a full window's own threshold raises the floor (0: no
  // floor, as for softmax's support count or a window_scale clamped to float's range).
  double alpha;
  int64_t capacity;
  const Group* groups;
  int num_groups;
};

// The floor a full candidate window sets for sparsemax / entmax, in similarity units: the
// threshold of the window's own entries is at or below the bank's (taking in more memories only
// raises it), so a similarity at or below the floor never enters the support. -inf when the
// window does not reach mass 1 within 1 / scale of `best` (best - 1 / scale is then all that is
// known). scale = (alpha - 1) beta; both the one-pass and the tiled candidate passes use it.
float sparse_floor(const float* scores, int64_t count, float best, double scale, double alpha);

// Floats of scratch memory one call of `pass` needs.
int64_t scratch_floats(Isa isa, const Args& args);
// One pass over memories [m0, m1) for every group; states[g] is group g's state.
void pass(Isa isa, const Args& args, int64_t m0, int64_t m1, GroupState* states, float* scratch);

}  // namespace onepass
}  // namespace hen_fast
