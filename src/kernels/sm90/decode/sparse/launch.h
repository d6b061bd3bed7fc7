// Host entry of the sm90 token-sparse decode kernel (kernel.cuh) over an FP8 cache. It writes the
// final output of unsplit requests and the fp32 partials of split ones; the sparse combine
// (common/combine.cu) must run after it for those.
#pragma once

#include <cuda_runtime.h>

#include "kernels/params.h"

namespace jax_flashmla {

// Launches the kernel on `stream` with grid (ceil(h_q / 64), 1, num_sm_parts), 384 threads and
// SparseTraits::kSmemBytes of dynamic shared memory. With programmatic_dependent it is a
// programmatic dependent launch; it waits (griddepcontrol.wait) before reading any input.
cudaError_t launch_sparse_decode_sm90(const SparseDecodeParams& params, cudaStream_t stream,
                                      bool programmatic_dependent);

}  // namespace jax_flashmla
