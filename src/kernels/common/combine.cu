// Combine: merges the fp32 partial rows of split requests into the final out (bf16 or f16) and lse.
//
// For a row with splits j = 0..n-1 (partial output o_j, already divided by its own row sum, and
// log2-domain lse_j), the exact merge is
//   L = max_j lse_j + log2(sum_j 2^(lse_j - max_j lse_j)),   out = sum_j 2^(lse_j - L) * o_j,
// and the final lse is L * ln 2. Empty splits carry lse_j = -inf and weigh nothing; a row whose
// splits are all empty gets out = 0, lse = +inf.
//
// One warp per (request, kv head, query row); rows are enumerated in the partials' own
// [b, h_kv, q_rows] order with a grid-stride loop on gridDim.x only, so huge b * s_q * h_q never
// meets the 65535 limit of gridDim.y/z. Rows of unsplit requests were finished by the decode
// kernel and are skipped.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

#include "kernels/common/device_utils.cuh"
#include "kernels/common/launch_utils.h"
#include "kernels/launch.h"
#include "kernels/params.h"

namespace jax_flashmla {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSplitsPerLane = (kMaxSplits + 31) / 32;  // lse values each lane holds
constexpr int kColChunks = kHeadDimV / (32 * 4);        // float4 column chunks per lane: 4
constexpr int64_t kMaxGrid = 1 << 20;                   // CTAs; the loop strides past it

// Row r of (request bi, kv head hk): out in the element type E, and the lse.
template <class E>
__device__ __forceinline__ void store_out_row(const DecodeParams& p, int64_t bi, int hk, int r,
                                              const float (&acc)[kColChunks][4], float lse) {
  const int lane = threadIdx.x % 32;
  const int s = r / p.g;
  const int h = hk * p.g + r % p.g;
  E* out = static_cast<E*>(p.out) + ((bi * p.s_q + s) * p.h_q + h) * kHeadDimV;
#pragma unroll
  for (int c = 0; c < kColChunks; ++c) {
    uint2 packed;
    packed.x = ElemOps<E>::pack2(acc[c][0], acc[c][1]);
    packed.y = ElemOps<E>::pack2(acc[c][2], acc[c][3]);
    *reinterpret_cast<uint2*>(out + c * 128 + lane * 4) = packed;
  }
  if (lane == 0) p.lse[(bi * p.h_q + h) * p.s_q + s] = lse;
}

template <class E>
__device__ __forceinline__ void store_nan_row(const DecodeParams& p, int64_t bi, int hk, int r) {
  float nan_row[kColChunks][4];
#pragma unroll
  for (int c = 0; c < kColChunks; ++c) {
    nan_row[c][0] = nan_row[c][1] = nan_row[c][2] = nan_row[c][3] = CUDART_NAN_F;
  }
  store_out_row<E>(p, bi, hk, r, nan_row, CUDART_NAN_F);
}

// E: the element type of out (__nv_bfloat16 or __half).
template <class E>
__global__ void __launch_bounds__(kThreads) combine_kernel(const DecodeParams p) {
  __shared__ float s_weights[kWarps][kMaxSplits];
  // Every CTA waits for the decode kernel, even one with nothing to merge: the kernel after us on
  // the stream then cannot overtake the decode kernel's final writes.
  pdl_wait_for_primary();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows_per_req = static_cast<int64_t>(p.h_kv) * p.q_rows;
  const int64_t num_rows = static_cast<int64_t>(p.b) * rows_per_req;
  const int64_t num_slots = static_cast<int64_t>(p.b) + p.num_sm_parts;
  float* weights = s_weights[warp];

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < num_rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t bi = row / rows_per_req;
    const int hk = static_cast<int>((row / p.q_rows) % p.h_kv);
    const int r = static_cast<int>(row % p.q_rows);
    const int split_begin = p.num_splits[bi];
    const int n = p.num_splits[bi + 1] - split_begin;
    if (n <= 1) continue;  // finished by the decode kernel

    float acc[kColChunks][4] = {};
    if (split_begin < 0 || n > kMaxSplits || split_begin + static_cast<int64_t>(n) > num_slots) {
      store_nan_row<E>(p, bi, hk, r);  // metadata from other shapes: never read out of bounds
      continue;
    }

    // Partial row (split j) lives at [(split_begin + j), hk, r] of lse_accum / o_accum.
    const int64_t first = (static_cast<int64_t>(split_begin) * p.h_kv + hk) * p.q_rows + r;
    const int64_t split_stride = rows_per_req;

    float lse_j[kSplitsPerLane];
    float lse_max = -CUDART_INF_F;
    bool lane_nan = false;
#pragma unroll
    for (int k = 0; k < kSplitsPerLane; ++k) {
      const int j = k * 32 + lane;
      lse_j[k] = j < n ? p.lse_accum[first + j * split_stride] : -CUDART_INF_F;
      lse_max = fmaxf(lse_max, lse_j[k]);
      lane_nan |= isnan(lse_j[k]);
    }
    lse_max = warp_max(lse_max);
    // fmaxf skips NaN; a NaN partial (NaN in q or in live cache rows) must still reach the
    // output, as it does in the reference, rather than be mistaken for an empty split.
    if (__any_sync(0xffffffffu, lane_nan)) {
      store_nan_row<E>(p, bi, hk, r);
      continue;
    }

    if (lse_max == -CUDART_INF_F) {  // every split empty
      store_out_row<E>(p, bi, hk, r, acc, CUDART_INF_F);
      continue;
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kSplitsPerLane; ++k) sum += exp2f(lse_j[k] - lse_max);
    const float lse_total = lse_max + log2f(warp_sum(sum));

#pragma unroll
    for (int k = 0; k < kSplitsPerLane; ++k) {
      const int j = k * 32 + lane;
      if (j < n) weights[j] = exp2f(lse_j[k] - lse_total);
    }
    __syncwarp();

    const float* o = p.o_accum + first * kHeadDimV + lane * 4;
    for (int j = 0; j < n; ++j) {
      const float w = weights[j];  // 0 for an empty split, whose partial row is zeros
      const float* oj = o + j * split_stride * kHeadDimV;
#pragma unroll
      for (int c = 0; c < kColChunks; ++c) {
        const float4 v = *reinterpret_cast<const float4*>(oj + c * 128);
        acc[c][0] = fmaf(w, v.x, acc[c][0]);
        acc[c][1] = fmaf(w, v.y, acc[c][1]);
        acc[c][2] = fmaf(w, v.z, acc[c][2]);
        acc[c][3] = fmaf(w, v.w, acc[c][3]);
      }
    }
    __syncwarp();  // weights are rewritten for the warp's next row
    store_out_row<E>(p, bi, hk, r, acc, lse_total * kLn2);
  }
}

}  // namespace

cudaError_t launch_combine(const DecodeParams& params, cudaStream_t stream,
                           bool programmatic_dependent) {
  const int64_t num_rows = static_cast<int64_t>(params.b) * params.h_kv * params.q_rows;
  int64_t blocks = (num_rows + kWarps - 1) / kWarps;
  if (blocks > kMaxGrid) blocks = kMaxGrid;
  if (blocks < 1) blocks = 1;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(blocks));
  shape.block = dim3(kThreads);
  shape.smem_bytes = 0;  // the weights are static shared memory
  switch (params.elem_type) {
    case ElemType::kBF16:
      return launch_kernel<combine_kernel<__nv_bfloat16>>(shape, programmatic_dependent, stream,
                                                          params);
    case ElemType::kF16:
      return launch_kernel<combine_kernel<__half>>(shape, programmatic_dependent, stream,
                                                   params);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_flashmla
