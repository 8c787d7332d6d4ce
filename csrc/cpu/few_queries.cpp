// Runtime dispatch of the few-query pass (few_queries.h): the kernel source is compiled three
// times, for AVX-512, AVX2 + FMA and the x86-64 baseline, and the best the CPU supports runs
// (HEN_FAST_CPU_ISA=avx512|avx2|generic picks a lower one, for tests and measurements).

#include "few_queries.h"

#include <cstdlib>
#include <cstring>
#include <limits>

#include "hen_fast/codes.h"

namespace hen_fast {
namespace {

constexpr int64_t kRows = 32;  // keys scored per tile: 32 x d floats stay in L1
constexpr int64_t kMaxDimBuffer = kFewQueryMaxDim;
constexpr int64_t kSimDot = codes::kSimilarityDot, kSimL2 = codes::kSimilarityL2,
                  kSimManhattan = codes::kSimilarityManhattan;
constexpr float kMaxFloat = std::numeric_limits<float>::max();
constexpr float kInfinity = std::numeric_limits<float>::infinity();

// IEEE half to float (normal, subnormal, inf, NaN), without F16C so every build can run it.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace isa_avx512 {
#include "few_queries_kernel.h"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "few_queries_kernel.h"
}  // namespace isa_avx2
#pragma GCC pop_options

namespace isa_generic {
#include "few_queries_kernel.h"
}  // namespace isa_generic

namespace {

enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kGeneric;
}

// Read at every call (a getenv is nothing beside a pass over a bank), so tests can switch.
Isa chosen_isa() {
  static const Isa best = best_isa();
  const char* wanted = std::getenv("HEN_FAST_CPU_ISA");
  if (wanted == nullptr || *wanted == '\0') return best;
  Isa asked = best;
  if (std::strcmp(wanted, "generic") == 0) asked = kGeneric;
  if (std::strcmp(wanted, "avx2") == 0) asked = kAvx2;
  if (std::strcmp(wanted, "avx512") == 0) asked = kAvx512;
  return asked < best ? asked : best;  // never more than the CPU has
}

}  // namespace

bool few_query_pass_applies(int64_t rows, int64_t dim, int64_t value_dim) {
  return rows <= kFewQueries && dim <= kFewQueryMaxDim && value_dim <= kFewQueryMaxDim;
}

void few_query_softmax_pass(const FewQueryArgs& args, int64_t m0, int64_t m1,
                            FewQueryState& state) {
  switch (chosen_isa()) {
    case kAvx512: isa_avx512::pass(args, m0, m1, state); break;
    case kAvx2: isa_avx2::pass(args, m0, m1, state); break;
    default: isa_generic::pass(args, m0, m1, state);
  }
}

void few_query_scores(const FewQueryArgs& args, int64_t m0, int64_t m1, float* out,
                      int64_t out_stride) {
  switch (chosen_isa()) {
    case kAvx512: isa_avx512::scores(args, m0, m1, out, out_stride); break;
    case kAvx2: isa_avx2::scores(args, m0, m1, out, out_stride); break;
    default: isa_generic::scores(args, m0, m1, out, out_stride);
  }
}

const char* few_query_isa() {
  switch (chosen_isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace hen_fast

// For the Python side (tests, hen-fast bench): which instruction set the CPU kernel runs with.
extern "C" __attribute__((visibility("default"))) const char* hen_fast_cpu_isa() {
  return hen_fast::few_query_isa();
}
