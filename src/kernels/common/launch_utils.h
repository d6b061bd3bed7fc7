// A per-device setup step (a kernel's shared-memory opt-in) that runs once per process and device,
// thread-safely, and remembers its result. Function attributes are per device context, and XLA may
// run handlers for different devices on different host threads; the device is the caller's current
// one (never switched). Keeps driver calls that need not repeat off the per-call host path.
#pragma once

#include <cuda_runtime.h>

#include <mutex>

namespace jax_flashmla {

class PerDeviceOnce {
 public:
  template <typename Fn>
  cudaError_t run(Fn&& fn) {
    int device = 0;
    const cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < 0 || device >= kMaxDevices) return fn();  // unusual; just redo the step
    std::call_once(flags_[device], [&] { results_[device] = fn(); });
    return results_[device];
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::once_flag flags_[kMaxDevices];
  cudaError_t results_[kMaxDevices] = {};
};

}  // namespace jax_flashmla
