// The few-query one-pass kernel (onepass_kernel.h), compiled three times: for AVX-512, for AVX2
// with FMA and F16C, and for the x86-64 baseline (SSE2). One build serves every x86 machine;
// the widest set the CPU runs is chosen at each call (HEN_FAST_CPU_ISA asks for a narrower one).

#include "onepass.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "hen_fast/codes.h"




namespace hen_fast {
namespace onepass {
namespace {
constexpr int64_t kSimDot = codes::kSimilarityDot, kSimL2 = codes::kSimilarityL2,
                  kSimManhattan = codes::kSimilarityManhattan;
}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), a self-initialised variable that
// -Wmaybe-uninitialized reports wherever they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace isa_avx512 {
#define HEN_FAST_LANES 16
#define HEN_FAST_ISA_AVX512
#include "onepass_kernel.h"
#undef HEN_FAST_ISA_AVX512
#undef HEN_FAST_LANES
}  // namespace isa_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define HEN_FAST_LANES 8
#define HEN_FAST_ISA_AVX2
#include "onepass_kernel.h"
#undef HEN_FAST_ISA_AVX2
#undef HEN_FAST_LANES
}  // namespace isa_avx2
#pragma GCC pop_options

namespace isa_generic {
#define HEN_FAST_LANES 4
#include "onepass_kernel.h"
#undef HEN_FAST_LANES
}  // namespace isa_generic

namespace {

Isa widest_isa() {
  __builtin_cpu_init();
  // libgcc's checks include the OS's support for the wider registers (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    // F16C comes with every AVX2 CPU; the feature name is not known to every libgcc.
    return kAvx2;
  }
  return kGeneric;
}

}  // namespace

const char* isa_name(Isa isa) {
  return isa == kAvx512 ? "avx512" : (isa == kAvx2 ? "avx2" : "generic");
}

int lanes(Isa isa) { return isa == kAvx512 ? 16 : (isa == kAvx2 ? 8 : 4); }

// Read at every call (one getenv beside a pass over a bank), so tests can switch.
Isa isa_for_call(const char** error) {
  static const Isa widest = widest_isa();
  *error = nullptr;
  const char* asked = std::getenv("HEN_FAST_CPU_ISA");
  if (asked == nullptr || *asked == '\0' || std::strcmp(asked, "auto") == 0) return widest;
  for (Isa isa : {kGeneric, kAvx2, kAvx512}) {
    if (std::strcmp(asked, isa_name(isa)) != 0) continue;
    if (isa > widest) {
      *error = "HEN_FAST_CPU_ISA asks for an instruction set this CPU does not run";
      return widest;
    }
    return isa;
  }
  *error = "HEN_FAST_CPU_ISA must be auto, avx512, avx2 or generic";
  return widest;
}

// Bisection on sum_e [y_e - tau]_+^(1 / (alpha - 1)) = 1 over y = scale (s - best) in [-1, 0],
// keeping its lower end, widened by 1e-5 as the windows are (the finish solves tau exactly on
// what is kept). Plain scalar code: it runs once per compaction of a full window.
float sparse_floor(const float* scores, int64_t count, float best, double scale, double alpha) {
  const double q = 1.0 / (alpha - 1.0);
  auto mass = [&](double tau) {
    double total = 0;
    for (int64_t e = 0; e < count; ++e) {
      const double r = (static_cast<double>(scores[e]) - best) * scale - tau;
      if (r > 0) total += q == 1.0 ? r : (q == 2.0 ? r * r : std::pow(r, q));
    }
    return total;
  };
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  double lo = -1.0, hi = 0.0;
  if (!(mass(lo) >= 1.0)) return kNegInf;
  for (int iteration = 0; iteration < 32; ++iteration) {
    const double mid = 0.5 * (lo + hi);
    (mass(mid) >= 1.0 ? lo : hi) = mid;
  }
  double floor = best + (lo - 1e-5) / scale;
  // Below best, strictly (at beta 1e30 the offset is lost in best's ulp), and rounded down.
  if (!(floor < best)) floor = std::nextafter(static_cast<double>(best), -1.0 / 0.0);
  float rounded = static_cast<float>(floor);
  if (rounded > floor) rounded = std::nextafter(rounded, kNegInf);
  return rounded;
}

int64_t scratch_floats(Isa isa, const Args& args) {
  switch (isa) {
    case kAvx512: return isa_avx512::scratch_floats(args);
    case kAvx2: return isa_avx2::scratch_floats(args);
    default: return isa_generic::scratch_floats(args);
  }
}

void pass(Isa isa, const Args& args, int64_t m0, int64_t m1, GroupState* states,
          float* scratch) {
  switch (isa) {
    case kAvx512: return isa_avx512::pass(args, m0, m1, states, scratch);
    case kAvx2: return isa_avx2::pass(args, m0, m1, states, scratch);
    default: return isa_generic::pass(args, m0, m1, states, scratch);
  }
}

}  // namespace onepass
}  // namespace hen_fast
