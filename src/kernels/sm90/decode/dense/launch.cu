// Host side of the sm90 dense decode kernels (wide and narrow) over a cache of bf16 / f16 rows: the
// TMA descriptor of the paged cache and the launch (an FP8 cache goes to launch_fp8.cu).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/sm90/decode/dense/launch.h"
#include "kernels/sm90/decode/dense/launch_kernels.cuh"
#include "kernels/sm90/tensor_map.h"

namespace jax_flashmla {

// k_cache [num_blocks, 64, h_kv, 576] (bf16 or f16) viewed as a 4-D tensor, innermost first:
// (576 columns, h_kv, 64 tokens, num_blocks); one box is 64 columns x 1 head x 64 tokens x 1
// page, i.e. one 64x64 tile of a page, written to shared memory with the 128-byte swizzle.
// Coordinates past num_blocks (never issued by the kernel) would read as zeros.
// L2 promotion is 128 B, the width of a tile row. Measured (benchmarks/cuda/read_floor.cu, H200): the
// nine tile loads per page stream 4.16 TB/s with 256-byte promotion and 4.51 with 128 or none,
// as fast as one bulk copy per page. Presumably each 256-byte fill around a 128-byte tile row
// (a head's row is 1152 bytes) brings in half of another tile, which the evict-first stream
// then reads from DRAM again.
cudaError_t make_kcache_tensor_map_sm90(CUtensorMap* map, const DecodeParams& p) {
  CUtensorMapDataType type;
  switch (p.elem_type) {
    case ElemType::kBF16:
      type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
      break;
    case ElemType::kF16:
      type = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
      break;
    default:
      return cudaErrorInvalidValue;
  }
  auto encode = sm90::tensor_map_encode_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(kHeadDimK) * 2;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(kHeadDimK),
                              static_cast<cuuint64_t>(p.h_kv),
                              static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(p.num_blocks > 0 ? p.num_blocks : 1)};
  // strides[i] is the byte stride of dimension i + 1.
  const cuuint64_t strides[3] = {row_bytes, row_bytes * p.h_kv, row_bytes * p.h_kv * kPageSize};
  const cuuint32_t box[4] = {sm90::kTileCols, 1, static_cast<cuuint32_t>(kPageSize), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUresult r = encode(map, type, 4, const_cast<void*>(p.k_cache), dims, strides, box,
                      elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

#if defined(JFM_TIMING)
cudaError_t read_cta_timing_sm90(unsigned long long* host, size_t ctas) {
  return read_cta_timing(host, ctas);  // this file's copy: the one the kernels above write
}
#endif


cudaError_t launch_dense_decode_sm90(const DecodeParams& params, cudaStream_t stream,
                                     bool programmatic_dependent, bool allow_narrow) {
  if (params.b <= 0 || params.num_sm_parts <= 0 || params.num_m_blocks <= 0 || params.h_kv <= 0) {
    return cudaSuccess;  // nothing to do
  }
  if (params.cache_format == CacheFormat::kFp8) {
    return launch_dense_decode_fp8_sm90(params, stream, programmatic_dependent, allow_narrow);
  }
  // Encoded on every call: it costs ~0.1 us of the host's ~8 us per call (bench_kernels --floor,
  // H200), and a call's floor is GPU time (benchmarks/NOTES.md, v3.8).
  CUtensorMap map;
  const cudaError_t err = make_kcache_tensor_map_sm90(&map, params);
  if (err != cudaSuccess) return err;
  switch (params.elem_type) {
    case ElemType::kBF16:
      return sm90::launch_dense<__nv_bfloat16>(map, params, stream, programmatic_dependent,
                                               allow_narrow);
    case ElemType::kF16:
      return sm90::launch_dense<__half>(map, params, stream, programmatic_dependent,
                                        allow_narrow);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_flashmla
