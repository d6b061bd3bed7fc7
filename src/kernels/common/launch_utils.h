// The one way the library launches a kernel: cudaLaunchKernelEx, optionally as a programmatic
// dependent launch (PDL), after the kernel's one-time opt-in to large dynamic shared memory.
// Every launcher (sched.cu, combine.cu, sm90/decode/*/launch.cu) goes through launch_kernel, so
// launch attributes and per-device setup are written once.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>

namespace jax_flashmla {

// A per-device setup step (a kernel's shared-memory opt-in) that runs once per process and device,
// thread-safely, and remembers its result. Function attributes are per device context, and XLA may
// run handlers for different devices on different host threads; the device is the caller's current
// one (never switched). Keeps driver calls that need not repeat off the per-call host path: with
// one visible device (the usual process per GPU) the current device is 0 without asking.
class PerDeviceOnce {
 public:
  template <typename Fn>
  cudaError_t run(Fn&& fn) {
    int device = 0;
    if (!single_device()) {
      const cudaError_t err = cudaGetDevice(&device);
      if (err != cudaSuccess) return err;
    }
    if (device < 0 || device >= kMaxDevices) return fn();  // unusual; just redo the step
    std::call_once(flags_[device], [&] { results_[device] = fn(); });
    return results_[device];
  }

 private:
  static bool single_device() {
    static const bool single = [] {
      int count = 0;
      return cudaGetDeviceCount(&count) == cudaSuccess && count == 1;
    }();
    return single;
  }

  static constexpr int kMaxDevices = 64;
  std::once_flag flags_[kMaxDevices];
  cudaError_t results_[kMaxDevices] = {};
};

struct LaunchShape {
  dim3 grid;
  dim3 block;
  // Dynamic shared memory. Must be the same on every launch of a kernel: above 48 KiB the
  // kernel is opted in to it once per device, and never again.
  int smem_bytes = 0;
};

// Launches kKernel(args...) on `stream`. With programmatic_dependent the launch may begin before
// the previous kernel on the stream has finished (its setup overlaps that kernel's tail); the
// kernel must then wait (griddepcontrol.wait, pdl_wait_for_primary) before reading anything the
// previous kernel writes. The kernel is a template argument so that each kernel has its own
// once-per-device opt-in.
template <auto kKernel, typename... Args>
cudaError_t launch_kernel(const LaunchShape& shape, bool programmatic_dependent,
                          cudaStream_t stream, Args&&... args) {
  constexpr int kDefaultSmemLimit = 48 * 1024;
  if (shape.smem_bytes > kDefaultSmemLimit) {
    static PerDeviceOnce smem_opt_in;
    const cudaError_t err = smem_opt_in.run([&] {
      return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  shape.smem_bytes);
    });
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = static_cast<size_t>(shape.smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = programmatic_dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kKernel, std::forward<Args>(args)...);
}

}  // namespace jax_flashmla
