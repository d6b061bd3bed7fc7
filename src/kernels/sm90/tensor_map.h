// Host side of TMA: the driver's cuTensorMapEncodeTiled, which builds the descriptors (each
// kernel family encodes its own: its tensor's shape, box and swizzle).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

namespace jax_flashmla {
namespace sm90 {

// Found through the runtime once per process, so that we need not link libcuda; null if the
// driver does not have it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

}  // namespace sm90
}  // namespace jax_flashmla
