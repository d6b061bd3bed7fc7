// Host side of the sm90 dense decode over an FP8 cache (params.h's 656-byte rows): the three TMA
// descriptors of the cache (fp8_cache.cuh says what each loads) and the launch of the kernels
// instantiated for them. The kernel choice is the bf16 one (launch_kernels.cuh).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/sm90/decode/dense/launch.h"
#include "kernels/sm90/decode/dense/launch_kernels.cuh"
#include "kernels/sm90/tensor_map.h"

namespace jax_flashmla {
namespace {

// k_cache [num_blocks, 64, h_kv, 656] bytes seen as a 4-D tensor of `elem_bytes`-wide elements,
// innermost first: (656 / elem_bytes, h_kv, 64 tokens, num_blocks); every box is one page's
// 64 tokens of one head and `box_cols` columns.
cudaError_t encode_fp8_view(CUtensorMap* map, const DecodeParams& p, CUtensorMapDataType type,
                            int elem_bytes, int box_cols, CUtensorMapSwizzle swizzle,
                            CUtensorMapL2promotion promotion) {
  auto encode = sm90::tensor_map_encode_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t row_bytes = kFp8RowBytes;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(kFp8RowBytes / elem_bytes),
                              static_cast<cuuint64_t>(p.h_kv),
                              static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(p.num_blocks > 0 ? p.num_blocks : 1)};
  // strides[i] is the byte stride of dimension i + 1.
  const cuuint64_t strides[3] = {row_bytes, row_bytes * p.h_kv, row_bytes * p.h_kv * kPageSize};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), 1,
                             static_cast<cuuint32_t>(kPageSize), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, type, 4, const_cast<void*>(p.k_cache), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promotion,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t make_fp8_tensor_maps(sm90::Fp8TensorMaps* maps, const DecodeParams& p) {
  using L = sm90::Fp8Layout;
  cudaError_t err = encode_fp8_view(&maps->latent, p, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                    L::kLatentBoxBytes, CU_TENSOR_MAP_SWIZZLE_NONE,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  if (err != cudaSuccess) return err;
  err = encode_fp8_view(&maps->scales, p, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, kFp8NumScales,
                        CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE);
  if (err != cudaSuccess) return err;
  return encode_fp8_view(&maps->rope, p, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, sm90::kTileCols,
                         CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
}

}  // namespace

cudaError_t launch_dense_decode_fp8_sm90(const DecodeParams& params, cudaStream_t stream,
                                         bool programmatic_dependent, bool allow_narrow) {
  if (params.elem_type != ElemType::kBF16) return cudaErrorInvalidValue;
  sm90::Fp8TensorMaps maps;
  const cudaError_t err = make_fp8_tensor_maps(&maps, params);
  if (err != cudaSuccess) return err;
  return sm90::launch_dense<__nv_bfloat16>(maps, params, stream, programmatic_dependent,
                                           allow_narrow);
}

}  // namespace jax_flashmla
