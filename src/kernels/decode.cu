// launch_decode: the launch policy of a decode call. The split-KV kernel runs first; the combine
// kernel follows on the same stream as a programmatic dependent launch (PDL), so its launch
// latency hides behind the decode kernel's tail while griddepcontrol.wait inside it keeps the
// data dependency exact.
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

#include "kernels/common/launch_utils.h"
#include "kernels/kernel_registry.h"
#include "kernels/launch.h"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/launch.h"

namespace jax_flashmla {
namespace {

// PDL (on both launches) can be switched off (JAX_FLASHMLA_DISABLE_PDL=1) to rule it out when
// debugging or timing; the kernels are correct either way.
bool use_pdl() {
  static const bool enabled = std::getenv("JAX_FLASHMLA_DISABLE_PDL") == nullptr;
  return enabled;
}

cudaError_t launch_kernel(const KernelLaunch& k, const DecodeParams& params, cudaStream_t stream,
                          bool programmatic_dependent) {
  cudaLaunchConfig_t config = {};
  config.gridDim = k.grid;
  config.blockDim = k.block;
  config.dynamicSmemBytes = static_cast<size_t>(k.smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (programmatic_dependent) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  void* args[] = {const_cast<DecodeParams*>(&params)};
  return cudaLaunchKernelExC(&config, k.func, args);
}

// JAX_FLASHMLA_DECODE_KERNEL selects a kernel for cross-checks and A/B runs: "simt" the CUDA-core
// kernel (an independent implementation of the same contract), "wide" the sm90 wide kernel for
// every shape (no narrow kernel for <= 32 query rows). Unset: the sm90 kernels' own choice.
bool kernel_is(const char* name) {
  static const std::string choice = [] {
    const char* v = std::getenv("JAX_FLASHMLA_DECODE_KERNEL");
    return std::string(v != nullptr ? v : "");
  }();
  return choice == name;
}

cudaError_t launch_simt(const DecodeParams& params, cudaStream_t stream) {
  const KernelLaunch decode = decode_simt_launch(params);
  static PerDeviceOnce decode_smem_opt_in;
  cudaError_t err = decode_smem_opt_in.run([&] {
    return cudaFuncSetAttribute(decode.func, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                decode.smem_bytes);
  });
  if (err != cudaSuccess) return err;
  return launch_kernel(decode, params, stream, /*programmatic_dependent=*/false);
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  const bool allow_narrow = !kernel_is("wide");
  cudaError_t err = kernel_is("simt")
                        ? launch_simt(params, stream)
                        : launch_decode_main_sm90(params, stream, use_pdl(), allow_narrow);
  if (err != cudaSuccess) return err;
  err = launch_kernel(combine_launch(params), params, stream, use_pdl());
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace jax_flashmla
