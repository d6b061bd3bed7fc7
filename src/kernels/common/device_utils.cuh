// Small device helpers shared by every kernel: the combine in this folder and the sm90 kernels
// (whose PTX wrappers for Hopper-only instructions live in sm90/ptx.cuh). Device-only; include
// from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace jax_flashmla {

// Finite sentinels of the online softmax (log2 domain). A row max starts at kInitMax, and masked
// scores never raise it, so exp2(score - max) of a masked or empty tile is exp2(finite) and no
// (-inf) - (-inf) = NaN can arise.
constexpr float kInitMax = -1e30f;
constexpr float kLn2 = 0.693147180559945309f;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The element types of q, k_cache and out (ElemType in params.h) as the CUDA types the kernels
// are instantiated with, and the conversions the kernels make into them, both round to nearest
// even: P for the P.V wgmma (P <= 2^8 by the lazy max: no f16 overflow) and the output rows.
//   pack2(lo, hi)  two floats -> two elements in a 32-bit word, lo in the low half
//   bits(x)        one float -> the element's 16 bits
template <class E>
struct ElemOps;

template <>
struct ElemOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ uint16_t bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <>
struct ElemOps<__half> {
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ uint16_t bits(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

// 16-byte global -> shared copy that bypasses registers, to a shared-memory address. With
// src_bytes = 0 nothing is read from global memory and the 16 shared bytes are zero-filled, which
// is how rows past a sequence end become zeros without touching the cache slots that hold them.
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* gmem_src,
                                            uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_16_or_zero(void* smem_dst, const void* gmem_src,
                                                    bool valid) {
  cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst)), gmem_src,
              valid ? 16u : 0u);
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Programmatic dependent launch (sm_90+). The primary kernel lets its dependent start launching;
// the dependent waits until the primary has finished and its writes are visible. Both are no-ops
// when the launch was not programmatic.
__device__ __forceinline__ void pdl_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}
__device__ __forceinline__ void pdl_wait_for_primary() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

}  // namespace jax_flashmla
