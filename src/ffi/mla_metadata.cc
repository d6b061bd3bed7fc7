// FFI handler "jax_flashmla_mla_metadata_v1": runs the split-KV scheduler on the device.
//
//   seqlens                  S32[b]             cache lengths (read on the device only)
//   -> tile_scheduler_metadata S32[P, 8]        one SchedRecord per sm part (P = num_sm_parts,
//                                               chosen by the caller and read from this shape)
//   -> num_splits            S32[b + 1]         exclusive prefix sum of splits per request
//
// No host sync and no host read of device data, so XLA may capture it in a CUDA graph.
#include <cuda_runtime.h>

#include <cstdint>

#include "ffi/ffi_helpers.h"
#include "ffi/handlers.h"
#include "kernels/launch.h"
#include "kernels/params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {
namespace {

ffi::Error MlaMetadataImpl(cudaStream_t stream, ffi::Buffer<ffi::S32, 1> seqlens,
                           ffi::ResultBuffer<ffi::S32, 2> sched,
                           ffi::ResultBuffer<ffi::S32, 1> num_splits) {
  constexpr const char* kTarget = kMlaMetadataTarget;
  const int64_t b = seqlens.dimensions()[0];
  const int64_t num_sm_parts = sched->dimensions()[0];
  if (num_sm_parts < 1 || num_sm_parts > kMaxSplits) {
    return ffi::Error::InvalidArgument(
        std::string(kTarget) + ": tile_scheduler_metadata must have 1.." +
        std::to_string(kMaxSplits) + " rows (num_sm_parts), got " +
        DimsToString(sched->dimensions()));
  }
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "tile_scheduler_metadata", sched->dimensions(),
                                {num_sm_parts, 8}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "num_splits", num_splits->dimensions(), {b + 1}));
  if (!FitsInt32(b + 1)) {
    return ffi::Error::InvalidArgument(std::string(kTarget) + ": batch " + std::to_string(b) +
                                       " does not fit in int32");
  }

  SchedParams params;
  params.seqlens = seqlens.typed_data();
  params.sched = reinterpret_cast<SchedRecord*>(sched->typed_data());
  params.num_splits = num_splits->typed_data();
  params.b = static_cast<int>(b);
  params.max_blocks = 0;  // unused: the scheduler does not clamp lengths (see sched.cu)
  params.num_sm_parts = static_cast<int>(num_sm_parts);
  // Runs even for b == 0 (a 1-CTA grid): num_splits[0] and every record are still written.
  return CudaStatusToError(launch_sched(params, stream), "mla_metadata scheduler launch");
}

}  // namespace

// XLA decodes the call frame against this binding: context first, then operands (Arg) and
// results (Ret) in order; BufferR<rank><dtype> spellings keep commas out of the macro argument.
// kCmdBufferCompatible lets XLA record the call into CUDA graphs, which is sound because the
// launched work depends only on shapes.
XLA_FFI_DEFINE_HANDLER(kMlaMetadata, MlaMetadataImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::BufferR1<ffi::S32>>()   // seqlens
                           .Ret<ffi::BufferR2<ffi::S32>>()   // tile_scheduler_metadata
                           .Ret<ffi::BufferR1<ffi::S32>>(),  // num_splits
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_Handler* MlaMetadataHandler() { return kMlaMetadata; }

}  // namespace jax_flashmla
