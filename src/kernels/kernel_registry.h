// How decode.cu (the launch policy) talks to the kernels of this folder: each kernel's .cu file
// exports a function that describes the launch it wants for given params, and decode.cu owns the
// rest (one-time function attributes, stream order, programmatic dependent launch). A future
// kernel plugs in by exporting one more of these.
#pragma once

#include <cuda_runtime.h>

#include "kernels/params.h"

namespace jax_flashmla {

// Every kernel here takes `const DecodeParams` by value as its only argument.
struct KernelLaunch {
  const void* func;  // the __global__ function
  dim3 grid;
  dim3 block;
  int smem_bytes;    // dynamic shared memory; > 48 KiB needs the opt-in attribute
};

// Split-KV decode on CUDA cores (decode_simt.cu): grid (num_m_blocks, h_kv, num_sm_parts).
KernelLaunch decode_simt_launch(const DecodeParams& params);

// Merge of split rows into out/lse (combine.cu). Waits for the decode kernel with
// griddepcontrol.wait, so it may be launched as a programmatic dependent of it.
KernelLaunch combine_launch(const DecodeParams& params);

}  // namespace jax_flashmla
