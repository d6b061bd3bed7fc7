// Host side of the sm90 token-sparse decode kernel: its launch (no tensor maps: the producer
// warpgroup gathers rows with plain loads).
#include <cuda_runtime.h>

#include "kernels/common/launch_utils.h"
#include "kernels/sm90/decode/sparse/kernel.cuh"
#include "kernels/sm90/decode/sparse/launch.h"

namespace jax_flashmla {

cudaError_t launch_sparse_decode_sm90(const SparseDecodeParams& params, cudaStream_t stream,
                                      bool programmatic_dependent) {
  const DecodeParams& p = params.base;
  if (p.b <= 0 || p.num_sm_parts <= 0 || p.num_m_blocks <= 0) return cudaSuccess;
  if (p.elem_type != ElemType::kBF16 || p.cache_format != CacheFormat::kFp8 || p.h_kv != 1 ||
      p.s_q != 1 || p.g != p.q_rows || params.topk < 1 || params.s_q < 1) {
    return cudaErrorInvalidValue;
  }
  LaunchShape shape;
  shape.grid = dim3(p.num_m_blocks, 1, p.num_sm_parts);
  shape.block = dim3(sm90::SparseTraits::kThreads);
  shape.smem_bytes = sm90::SparseTraits::kSmemBytes;
  return launch_kernel<sm90::decode_sparse_fp8_kernel>(shape, programmatic_dependent, stream,
                                                       params);
}

}  // namespace jax_flashmla
