// Small device helpers shared by every kernel: the combine in this folder and the sm90 kernels
// (whose PTX wrappers for Hopper-only instructions live in sm90/ptx.cuh). Device-only; include
// from .cu files.
#pragma once

#include <cuda_bf16.h>
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

// Two bf16 packed in a 32-bit word -> two floats (exact: bf16 is the top half of an fp32).
__device__ __forceinline__ float bf16_lo(uint32_t packed) { return __uint_as_float(packed << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t packed) {
  return __uint_as_float(packed & 0xffff0000u);
}

// Eight bf16 held in one 16-byte vector -> eight floats f[0..7].
__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float* f) {
  f[0] = bf16_lo(v.x);
  f[1] = bf16_hi(v.x);
  f[2] = bf16_lo(v.y);
  f[3] = bf16_hi(v.y);
  f[4] = bf16_lo(v.z);
  f[5] = bf16_hi(v.z);
  f[6] = bf16_lo(v.w);
  f[7] = bf16_hi(v.w);
}

// Two floats -> two bf16 (round to nearest even) packed in a 32-bit word.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

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
