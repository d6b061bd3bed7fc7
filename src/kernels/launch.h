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

// The last step of launch_decode (common/combine.cu): merges the partial rows of split requests
// into out / lse. It waits for the decode kernel with griddepcontrol.wait, so it may be launched
// as a programmatic dependent of it.
cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream,
                           bool programmatic_dependent);

}  // namespace jax_flashmla
