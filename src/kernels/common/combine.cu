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
// kernel and are skipped. The sparse decode has its own instantiation of the same merge, with its
// sink (combine_sparse_kernel, below).
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

// ------------------------------------------------------------------ the sparse decode's combine
// The same merge for the sparse decode's folded problem (params.h, SparseDecodeParams): request
// bi is query token bi % s_q of batch row bi / s_q, its rows are the h_q heads, out is bf16, and
// lse is [batch, h_q, s_q]. The sink joins the merge: with sigma = attn_sink[h] * log2(e) and
// L = log2 sum_j 2^lse_j, the weights are 2^(lse_j - L') with
// L' = log2(2^L + 2^sigma) = max(L, sigma) + log2(1 + 2^-|L - sigma|), which scales out by
// 2^L / (2^L + 2^sigma); the lse written is L (unchanged by the sink). A +inf sink gives out = 0,
// a -inf one changes nothing. A separate kernel, so that combine_kernel's code stays as it was.

__device__ __forceinline__ void store_sparse_row(const SparseDecodeParams& sp, int64_t bi, int h,
                                                 const float (&acc)[kColChunks][4], float lse) {
  const DecodeParams& p = sp.base;
  const int lane = threadIdx.x % 32;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + (bi * p.h_q + h) * kHeadDimV;
#pragma unroll
  for (int c = 0; c < kColChunks; ++c) {
    uint2 packed;
    packed.x = ElemOps<__nv_bfloat16>::pack2(acc[c][0], acc[c][1]);
    packed.y = ElemOps<__nv_bfloat16>::pack2(acc[c][2], acc[c][3]);
    *reinterpret_cast<uint2*>(out + c * 128 + lane * 4) = packed;
  }
  if (lane == 0) p.lse[((bi / sp.s_q) * p.h_q + h) * sp.s_q + bi % sp.s_q] = lse;
}

__device__ __forceinline__ void store_sparse_nan_row(const SparseDecodeParams& sp, int64_t bi,
                                                     int h) {
  float nan_row[kColChunks][4];
#pragma unroll
  for (int c = 0; c < kColChunks; ++c) {
    nan_row[c][0] = nan_row[c][1] = nan_row[c][2] = nan_row[c][3] = CUDART_NAN_F;
  }
  store_sparse_row(sp, bi, h, nan_row, CUDART_NAN_F);
}

__global__ void __launch_bounds__(kThreads) combine_sparse_kernel(const SparseDecodeParams sp) {
  __shared__ float s_weights[kWarps][kMaxSplits];
  pdl_wait_for_primary();  // as combine_kernel: every CTA waits for the decode kernel

  const DecodeParams& p = sp.base;  // folded: h_kv = 1, q_rows = h_q
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t num_rows = static_cast<int64_t>(p.b) * p.q_rows;
  const int64_t num_slots = static_cast<int64_t>(p.b) + p.num_sm_parts;
  float* weights = s_weights[warp];

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < num_rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t bi = row / p.q_rows;
    const int h = static_cast<int>(row % p.q_rows);
    const int split_begin = p.num_splits[bi];
    const int n = p.num_splits[bi + 1] - split_begin;
    if (n <= 1) continue;  // finished by the decode kernel, sink included

    float acc[kColChunks][4] = {};
    if (split_begin < 0 || n > kMaxSplits || split_begin + static_cast<int64_t>(n) > num_slots) {
      store_sparse_nan_row(sp, bi, h);
      continue;
    }
    // Partial row (split j) lives at [split_begin + j, 0, h] of lse_accum / o_accum.
    const int64_t first = static_cast<int64_t>(split_begin) * p.q_rows + h;
    float lse_j[kSplitsPerLane];
    float lse_max = -CUDART_INF_F;
    bool lane_nan = false;
#pragma unroll
    for (int k = 0; k < kSplitsPerLane; ++k) {
      const int j = k * 32 + lane;
      lse_j[k] = j < n ? p.lse_accum[first + j * p.q_rows] : -CUDART_INF_F;
      lse_max = fmaxf(lse_max, lse_j[k]);
      lane_nan |= isnan(lse_j[k]);
    }
    lse_max = warp_max(lse_max);
    if (__any_sync(0xffffffffu, lane_nan)) {
      store_sparse_nan_row(sp, bi, h);
      continue;
    }
    if (lse_max == -CUDART_INF_F) {  // no key in any split: out 0, lse +inf, whatever the sink
      store_sparse_row(sp, bi, h, acc, CUDART_INF_F);
      continue;
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kSplitsPerLane; ++k) sum += exp2f(lse_j[k] - lse_max);
    const float lse_total = lse_max + log2f(warp_sum(sum));
    const float sigma = sp.attn_sink[h] * 1.4426950408889634f;
    const float lse_norm = fmaxf(lse_total, sigma) + log2f(1.f + exp2f(-fabsf(lse_total - sigma)));
#pragma unroll
    for (int k = 0; k < kSplitsPerLane; ++k) {
      const int j = k * 32 + lane;
      if (j < n) weights[j] = exp2f(lse_j[k] - lse_norm);
    }
    __syncwarp();
    const float* o = p.o_accum + first * kHeadDimV + lane * 4;
    for (int j = 0; j < n; ++j) {
      const float w = weights[j];
      const float* oj = o + static_cast<int64_t>(j) * p.q_rows * kHeadDimV;
#pragma unroll
      for (int c = 0; c < kColChunks; ++c) {
        const float4 v = *reinterpret_cast<const float4*>(oj + c * 128);
        acc[c][0] = fmaf(w, v.x, acc[c][0]);
        acc[c][1] = fmaf(w, v.y, acc[c][1]);
        acc[c][2] = fmaf(w, v.z, acc[c][2]);
        acc[c][3] = fmaf(w, v.w, acc[c][3]);
      }
    }
    __syncwarp();
    store_sparse_row(sp, bi, h, acc, lse_total * kLn2);
  }
}

}  // namespace

cudaError_t launch_sparse_combine(const SparseDecodeParams& params, cudaStream_t stream,
                                  bool programmatic_dependent) {
  const DecodeParams& p = params.base;
  int64_t blocks = (static_cast<int64_t>(p.b) * p.q_rows + kWarps - 1) / kWarps;
  if (blocks > kMaxGrid) blocks = kMaxGrid;
  if (blocks < 1) blocks = 1;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(blocks));
  shape.block = dim3(kThreads);
  shape.smem_bytes = 0;  // the weights are static shared memory
  return launch_kernel<combine_sparse_kernel>(shape, programmatic_dependent, stream, params);
}

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
