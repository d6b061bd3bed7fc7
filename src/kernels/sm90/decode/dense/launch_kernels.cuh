// The kernel choice of the sm90 dense decode, shared by the launchers of the two cache formats
// (launch.cu: rows of bf16 / f16; launch_fp8.cu: FP8 rows), which instantiate it in separate
// compilation units so that the kernels build in parallel.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "kernels/common/launch_utils.h"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/narrow.cuh"
#include "kernels/sm90/decode/dense/wide.cuh"

namespace jax_flashmla {
namespace sm90 {

// The kernel for these shapes, instantiated for element type E and cache maps Maps (one
// CUtensorMap, or Fp8TensorMaps), on its grid.
template <class E, class Maps>
cudaError_t launch_dense(const Maps& maps, const DecodeParams& params, cudaStream_t stream,
                         bool programmatic_dependent, bool allow_narrow) {
  constexpr bool kFp8 = kIsFp8Maps<Maps>;
  LaunchShape shape;
  shape.grid = dim3(params.num_m_blocks, params.h_kv, params.num_sm_parts);
  shape.block = dim3(DenseTraits::kThreads);  // the same for all three kernels
  // At most 16 or 32 query rows per kv head: the transposed kernel (narrow.cuh).
  if (allow_narrow && params.q_rows <= 16) {
    using NT = NarrowTraits<16>;
    shape.smem_bytes = kFp8 ? NT::kSmemBytesFp8 : NT::kSmemBytes;
    return launch_kernel<decode_narrow_kernel<16, E, Maps>>(shape, programmatic_dependent,
                                                            stream, maps, params);
  }
  if (allow_narrow && params.q_rows <= 32) {
    using NT = NarrowTraits<32>;
    shape.smem_bytes = kFp8 ? NT::kSmemBytesFp8 : NT::kSmemBytes;
    return launch_kernel<decode_narrow_kernel<32, E, Maps>>(shape, programmatic_dependent,
                                                            stream, maps, params);
  }
  shape.smem_bytes = kFp8 ? WideTraits::kSmemBytesFp8 : WideTraits::kSmemBytes;
  return launch_kernel<decode_wide_kernel<E, Maps>>(shape, programmatic_dependent, stream, maps,
                                                    params);
}

}  // namespace sm90
}  // namespace jax_flashmla
