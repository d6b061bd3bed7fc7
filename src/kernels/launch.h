// Host-callable launchers for the device code. They know nothing of XLA: the FFI handlers in
// src/ffi/ fill the params structs and call launch_sched / launch_decode on XLA's stream.
#pragma once

#include <cuda_runtime.h>

#include "kernels/params.h"

namespace jax_flashmla {

// Scheduler: reads seqlens on the device, writes sched[num_sm_parts] and num_splits[b + 1].
cudaError_t launch_sched(const SchedParams& params, cudaStream_t stream);

// Split-KV decode followed by the combine of split rows; both on `stream` (decode.cu).
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream);

// Token-sparse decode over an FP8 cache (params.h, SparseDecodeParams): the sm90 sparse kernel,
// then the sparse combine of split rows (which applies the sink to them); both on `stream`.
cudaError_t launch_sparse_decode(const SparseDecodeParams& params, cudaStream_t stream);

// The switches launch_decode follows, read from the environment once per process (the tools
// use them too, to time the kernel launch_decode would run):
//   JAX_FLASHMLA_DISABLE_PDL set        pdl = false: no programmatic dependent launches, to rule
//                                       PDL out when debugging or timing (correct either way);
//   JAX_FLASHMLA_DECODE_KERNEL=wide     allow_narrow = false: the wide kernel for every shape,
//                                       for A/B runs against the narrow kernel.
struct DecodePolicy {
  bool pdl;
  bool allow_narrow;
};
const DecodePolicy& decode_policy();

// The last step of launch_decode (common/combine.cu): merges the partial rows of split requests
// into out / lse. It waits for the decode kernel with griddepcontrol.wait, so it may be launched
// as a programmatic dependent of it.
cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream,
                           bool programmatic_dependent);

// The sparse decode's combine (common/combine.cu): as launch_combine on the folded problem, with
// the lse indexed by the real s_q and the sink applied to the merged rows.
cudaError_t launch_sparse_combine(const SparseDecodeParams& params, cudaStream_t stream,
                                  bool programmatic_dependent);

}  // namespace jax_flashmla
