// at::parallel_for for the CPU ops, whose tasks call ATen ops (shared by retrieve_cpu.cpp and
// retrieve_backward_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace hen_fast {
namespace {

// Runs fn(begin, end) over [begin, end) on torch's threads, each worker under the caller's
// thread-local state. The op runs below the autograd layer, which the dispatcher records per
// thread: on an OpenMP worker without it, an ATen op on a tensor that requires grad would try to
// record autograd (and out= ops refuse), and grad mode and inference mode would be lost too.
template <typename Fn>
void parallel_tasks(int64_t begin, int64_t end, const Fn& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard guard(state);
    fn(first, last);
  });
}

}  // namespace
}  // namespace hen_fast
