// Registers the hen_fast ops with the dispatcher, from an explicit call instead of static
// initializers. TORCH_LIBRARY's initializers run inside dlopen, where an exception (a schema
// clash, a kernel whose C++ type does not match its schema) can only terminate the process.
// Here hen_fast/backends/cpu.py loads the library with ctypes and calls the functions below; a
// failure comes back as a message, what the failed call registered is dropped again, and the
// Python side falls back to the torch backend.
//
// Two steps, so that a broken CUDA binding costs only the cuda backend:
//   hen_fast_register_ops       the schemas (ops.h) and the CPU kernels, all or nothing
//   hen_fast_register_cuda_ops  the CUDA kernels (CUDA builds only), after the first succeeded
// Each returns nullptr on success or the error message (static storage, valid for the process).
// Calling one again returns its first outcome: registration happens once per process.

#include <torch/library.h>

#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ops.h"

#define HEN_FAST_EXPORT extern "C" __attribute__((visibility("default")))

namespace hen_fast {
namespace {

using Libraries = std::vector<std::unique_ptr<torch::Library>>;

std::unique_ptr<torch::Library> library(torch::Library::Kind kind,
                                        std::optional<c10::DispatchKey> key, uint32_t line) {
  return std::make_unique<torch::Library>(kind, "hen_fast", key, __FILE__, line);
}

Libraries core_libraries() {
  Libraries made;
  made.push_back(library(torch::Library::DEF, std::nullopt, __LINE__));
  made.back()->def(kRetrieveStepSchema);
  made.back()->def(kRetrieveStepBackwardSchema);
  made.back()->def(kSketchFilterSchema);
  made.push_back(library(torch::Library::IMPL, c10::DispatchKey::CPU, __LINE__));
  made.back()->impl("retrieve_step", static_cast<RetrieveStepFn*>(&retrieve_step_cpu));
  made.back()->impl("retrieve_step_backward",
                    static_cast<RetrieveStepBackwardFn*>(&retrieve_step_backward_cpu));
  made.back()->impl("sketch_filter", static_cast<SketchFilterFn*>(&sketch_filter_cpu));
  return made;
}

#ifdef HEN_FAST_WITH_CUDA
Libraries cuda_libraries() {
  Libraries made;
  made.push_back(library(torch::Library::IMPL, c10::DispatchKey::CUDA, __LINE__));
  made.back()->impl("retrieve_step", static_cast<RetrieveStepFn*>(&retrieve_step_cuda));
  return made;
}
#endif

// One registration step, run once: on success its libraries live for the rest of the process
// (deliberately never destroyed, so process exit has no ordering question); on failure the
// libraries made so far are destroyed inside make() as the exception unwinds, which removes
// their registrations, and the message is kept.
class Step {
 public:
  template <typename Make>
  const char* run(Make make) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!ran_) {
      ran_ = true;
      try {
        kept_ = new Libraries(make());
      } catch (const c10::Error& error) {  // the dispatcher's message, without its C++ backtrace
        failed_ = true;
        message_ = error.what_without_backtrace();
      } catch (const std::exception& error) {
        failed_ = true;
        message_ = error.what();
      } catch (...) {
        failed_ = true;
        message_ = "unknown C++ exception";
      }
    }
    return failed_ ? message_.c_str() : nullptr;
  }

 private:
  std::mutex mutex_;
  bool ran_ = false, failed_ = false;
  std::string message_;
  Libraries* kept_ = nullptr;
};

Step& core_step() {
  static Step step;
  return step;
}

}  // namespace
}  // namespace hen_fast

HEN_FAST_EXPORT const char* hen_fast_register_ops() {
  return hen_fast::core_step().run(hen_fast::core_libraries);
}

#ifdef HEN_FAST_WITH_CUDA
HEN_FAST_EXPORT const char* hen_fast_register_cuda_ops() {
  static hen_fast::Step step;
  if (const char* failed = hen_fast::core_step().run(hen_fast::core_libraries)) return failed;
  return step.run(hen_fast::cuda_libraries);
}
#endif
