// Building blocks of the sm90 dense decode kernels (thread positions, the start of a part, loads,
// softmax pieces, the wgmma sequences), kept apart from the kernels so tests can exercise them
// one at a time. What a CTA makes of its scheduler record is common/split_kv.cuh.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/common/split_kv.cuh"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/fp8_cache.cuh"
#include "kernels/sm90/decode/dense/traits.h"
#include "kernels/sm90/ptx.cuh"
#include "kernels/sm90/tile_geometry.h"
#include "kernels/sm90/wgmma_ops.cuh"

namespace jax_flashmla {
namespace sm90 {

// What both kernels share (page layout, thread counts, softmax constants); each kernel adds its
// own plan (WideTraits, NarrowTraits<N>).
using T = DenseTraits;

// ------------------------------------------------------------------ threads

// Where a thread sits in the CTA of both kernels: two warpgroups of four warps.
struct ThreadPos {
  int wg;       // warpgroup, read through a shuffle so that the compiler knows it is warp-uniform
  int tid_wg;   // thread in the warpgroup
  int warp_wg;  // warp in the warpgroup
  int lane;
};

__device__ __forceinline__ ThreadPos thread_pos() {
  ThreadPos t;
  t.wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / T::kWarpgroupThreads, 0);
  t.tid_wg = threadIdx.x % T::kWarpgroupThreads;
  t.warp_wg = t.tid_wg / 32;
  t.lane = threadIdx.x % 32;
  return t;
}

// ------------------------------------------------------------------ work

// The start both kernels share (all threads): tile barriers initialised, the tensor map
// prefetched, then, after the previous kernel (PDL), this part's record. False if the record has
// no work, or is one no scheduler writes (the records are a run-time input): never index the
// batch with a negative request.
// Maps: the cache's tensor map(s), CUtensorMap or Fp8TensorMaps.
template <class Maps>
__device__ __forceinline__ bool start_part(const Maps* maps, const DecodeParams& p,
                                           uint32_t bars, int part, SchedRecord& rec) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2 * T::kNumKTiles; ++i) mbar_init(bars + 8 * i, 1);
    fence_mbar_init();
    prefetch_maps(maps);
  }
  __syncthreads();
  // Everything above may overlap the previous kernel (PDL); reads of its outputs may not.
  pdl_wait_for_primary();
  rec = p.sched[part];
  return rec.begin_req < p.b && rec.begin_req >= 0;
}

// ------------------------------------------------------------------ loads

// Starts the loads of the K tiles in `tile_mask` of one page into a buffer: expects their bytes
// on the tile barriers and issues the copies.
__device__ __forceinline__ void expect_group(uint32_t bars, const PageInfo& pi,
                                             uint32_t tile_mask) {
  if (!pi.loaded) return;
#pragma unroll
  for (int t = 0; t < T::kNumKTiles; ++t) {
    if ((tile_mask >> t) & 1u) mbar_arrive_expect_tx(bars + 8 * t, kTileBytes);
  }
}

__device__ __forceinline__ void issue_group(const CUtensorMap* tmap, uint32_t s_buf,
                                            uint32_t bars, const PageInfo& pi, int hk,
                                            uint32_t tile_mask, uint64_t policy) {
  if (!pi.loaded) return;
#pragma unroll
  for (int t = 0; t < T::kNumKTiles; ++t) {
    if ((tile_mask >> t) & 1u) {
      tma_load_4d(s_buf + t * kTileBytes, tmap, bars + 8 * t, t * kTileCols, hk, 0,
                  pi.kv_id, policy);
    }
  }
}

// Starts the loads of the K tiles in `tile_mask` of a bf16 page into a buffer (the FP8 twin is
// in fp8_cache.cuh; the scale area is the FP8 form's only).
__device__ __forceinline__ void load_group(const CUtensorMap* map, uint32_t s_buf, uint32_t,
                                           uint32_t bars, const PageInfo& pi, int hk,
                                           uint32_t tile_mask, uint64_t policy) {
  expect_group(bars, pi, tile_mask);
  issue_group(map, s_buf, bars, pi, hk, tile_mask, policy);
}

// Used by the building-block test: all nine tiles of one page.
__device__ __forceinline__ void load_page_tiles(const CUtensorMap* tmap, uint32_t s_buf,
                                                uint32_t bars, const PageInfo& pi, int hk, int t0,
                                                int t1, int extra, uint64_t policy) {
  uint32_t mask = 0;
  for (int t = t0; t < t1; ++t) mask |= 1u << t;
  if (extra >= 0) mask |= 1u << extra;
  expect_group(bars, pi, mask);
  issue_group(tmap, s_buf, bars, pi, hk, mask, policy);
}

// All 256 threads copy the 64 x 576 query block of (request, kv head, m block) into sQ in the
// swizzled tile layout; rows past q_rows are zero. (Raw 16-bit elements: any element type.)
__device__ __forceinline__ void load_q(const DecodeParams& p, uint32_t sQ, int bi, int hk,
                                       int m_block) {
  constexpr int kChunksPerRow = kHeadDimK / 8;                      // 72 x 16 bytes
  constexpr int kIters = kBlockM * kChunksPerRow / T::kThreads;     // 18
  static_assert(kBlockM * kChunksPerRow % T::kThreads == 0, "");
  const uint16_t* q = static_cast<const uint16_t*>(p.q);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint4 v[kIters / 2];
#pragma unroll
    for (int it = 0; it < kIters / 2; ++it) {
      const int i = threadIdx.x + (half * (kIters / 2) + it) * T::kThreads;
      const int row = i / kChunksPerRow;
      const int c = i % kChunksPerRow;
      const int r = m_block * kBlockM + row;
      v[it] = make_uint4(0, 0, 0, 0);
      if (r < p.q_rows) {
        const int s = r / p.g;
        const int j = r - s * p.g;
        const size_t off =
            ((static_cast<size_t>(bi) * p.s_q + s) * p.h_q + hk * p.g + j) * kHeadDimK + c * 8;
        v[it] = __ldg(reinterpret_cast<const uint4*>(q + off));
      }
    }
#pragma unroll
    for (int it = 0; it < kIters / 2; ++it) {
      const int i = threadIdx.x + (half * (kIters / 2) + it) * T::kThreads;
      const int row = i / kChunksPerRow;
      const int c = i % kChunksPerRow;
      const uint32_t dst = sQ + (c / 8) * kTileBytes + swizzled_offset(row, c % 8);
      st_shared_v4(dst, v[it]);
    }
  }
}

// One warpgroup starts copying the query block of request `bi` into sQ with cp.async (zeros
// for rows past q_rows); the same layout as load_q. The caller later runs cp_async_wait_all()
// and fence_proxy_async_smem() in the same threads, then a CTA barrier, before wgmma reads sQ.
__device__ __forceinline__ void prefetch_q_async(const DecodeParams& p, uint32_t sQ, int bi,
                                                 int hk, int m_block, int tid_wg) {
  constexpr int kChunksPerRow = kHeadDimK / 8;
  constexpr int kIters = kBlockM * kChunksPerRow / T::kWarpgroupThreads;  // 36
  static_assert(kBlockM * kChunksPerRow % T::kWarpgroupThreads == 0, "");
  const uint16_t* q = static_cast<const uint16_t*>(p.q);
#pragma unroll 4
  for (int it = 0; it < kIters; ++it) {
    const int i = tid_wg + it * T::kWarpgroupThreads;
    const int row = i / kChunksPerRow;
    const int c = i % kChunksPerRow;
    const int r = m_block * kBlockM + row;
    const uint16_t* src = q;
    uint32_t bytes = 0;
    if (r < p.q_rows) {
      const int s = r / p.g;
      const int j = r - s * p.g;
      src = q + ((static_cast<size_t>(bi) * p.s_q + s) * p.h_q + hk * p.g + j) * kHeadDimK + c * 8;
      bytes = 16;
    }
    cp_async_16(sQ + (c / 8) * kTileBytes + swizzled_offset(row, c % 8), src, bytes);
  }
  cp_async_commit();
}

// ------------------------------------------------------------------ math pieces

// Row max of the thread's two rows, reduced over the quad that shares them.
__device__ __forceinline__ void row_max(const float (&s)[32], float (&mx)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < 8; ++k) m = fmaxf(m, fmaxf(s[4 * k + 2 * i], s[4 * k + 2 * i + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    mx[i] = m;
  }
}

// Raw scores S (fp32 QK^T fragment): masked keys selected to -inf, and the row maxima in the
// log2 domain. The scale is left to exp_rows' FMA (scale > 0, so the scaled max is the max of
// the scaled scores); a separate scaling pass cost 3% at the compute corner.
__device__ __forceinline__ void mask_and_row_max(float (&s)[32], float scale_log2, bool need_mask,
                                                 int tok0, int vis0, int vis1, float (&mx)[2]) {
  if (need_mask) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = tok0 + 8 * k + j;
        s[4 * k + j] = t < vis0 ? s[4 * k + j] : -INFINITY;
        s[4 * k + 2 + j] = t < vis1 ? s[4 * k + 2 + j] : -INFINITY;
      }
    }
  }
  row_max(s, mx);
  mx[0] *= scale_log2;
  mx[1] *= scale_log2;
}

// s <- 2^(s * scale_log2 - m) in place; returns this thread's partial row sums.
__device__ __forceinline__ void exp_rows(float (&s)[32], float scale_log2, const float (&m)[2],
                                         float (&sum)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float e = fast_exp2(fmaf(s[4 * k + 2 * i + j], scale_log2, -m[i]));
        s[4 * k + 2 * i + j] = e;
        acc += e;
      }
    }
    sum[i] = acc;
  }
}

// The new running max after a page whose row max is mx: kept unless mx passes it by more than
// kMaxSlack. Most pages then leave every row's max, and so its scale, unchanged, and the O rescale
// (256 multiplies per thread and pair, ~6% of the compute corner's time) is skipped. The lazy
// max is FlashAttention-4's conditional rescaling.
__device__ __forceinline__ float lazy_max(float m_old, float mx) {
  return mx > m_old + T::kMaxSlack ? mx : m_old;
}

// The factor that moves sums kept against m_old onto m_new: exactly 1 when the max stayed.
__device__ __forceinline__ float max_scale(float m_old, float m_new) {
  return m_new == m_old ? 1.f : fast_exp2(m_old - m_new);
}

// O rows times their scales, skipped by a warp whose scales are all 1. Call it only inside a
// block that then issues its P.V wgmma unconditionally: with this branch in front of a
// conditional wgmma, ptxas serializes every wgmma of the kernel (C7515, a WARPGROUP.DEPBAR after
// each HGMMA). A page that is not loaded leaves the max unchanged, so skipping it there is exact.
__device__ __forceinline__ void rescale_o(float (&o)[128], const float (&sc)[2]) {
  if (!__any_sync(0xffffffffu, sc[0] != 1.f || sc[1] != 1.f)) return;
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    o[4 * k + 0] *= sc[0];
    o[4 * k + 1] *= sc[0];
    o[4 * k + 2] *= sc[1];
    o[4 * k + 3] *= sc[1];
  }
}

// P rounded to the element type E. The QK^T accumulator layout is the A-operand register layout
// of the next wgmma: k-step kk (keys 16kk..16kk+15) uses accumulator chunks 2kk and 2kk+1.
template <class E>
__device__ __forceinline__ void pack_p(const float (&s)[32], uint32_t (&a)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) a[i] = ElemOps<E>::pack2(s[2 * i], s[2 * i + 1]);
}

// Writes P (packed elements) into a swizzled 64x64 tile: the K-major A operand of an SS wgmma.
__device__ __forceinline__ void store_p(uint32_t s_tile, const uint32_t (&a)[16], int r0, int q4) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    // Row r0 + 8 has the same chunk position: the swizzle repeats every 8 rows.
    const uint32_t at = s_tile + swizzled_offset(r0, k) + q4 * 4;
    st_shared_u32(at, a[2 * k]);
    st_shared_u32(at + 8 * kTileRowBytes, a[2 * k + 1]);
  }
}

// Zeroes rows n_valid..63 of four V tiles [tile0, tile0 + 4) of a page buffer (one warpgroup).
__device__ __forceinline__ void zero_v_rows(uint32_t s_buf, int tile0, int n_valid, int tid_wg) {
  const int rows = kPageSize - n_valid;
  const int total = rows * 4 * 8;
  for (int i = tid_wg; i < total; i += T::kWarpgroupThreads) {
    const int ch = i & 7;
    const int rest = i >> 3;
    const int row = n_valid + rest % rows;
    const int tile = tile0 + rest / rows;
    st_shared_zero16(s_buf + tile * kTileBytes + row * kTileRowBytes + ch * kChunkBytes);
  }
}

// Before P.V reads a short page: its V rows past the length zeroed in this warpgroup's four tiles
// (unused cache slots may hold NaN, and 0 * NaN = NaN), fenced for wgmma, and the group synced.
__device__ __forceinline__ void zero_tail_v_rows(uint32_t s_buf, int tile0, int n_valid,
                                                 int tid_wg, int group_bar) {
  if (n_valid < kPageSize) {
    zero_v_rows(s_buf, tile0, n_valid, tid_wg);
    fence_proxy_async_smem();
    named_bar_sync(group_bar, T::kWarpgroupThreads);
  }
}

// Q K^T (or K Q^T) over one page buffer, 9 tiles x 4 k-steps, waiting on each K tile's barrier:
// mma(q, k, scale_d) issues one k16 step given the descriptors of the Q and K slices (both
// K-major; Q tiles are kQTileBytes apart). The V tiles are taken from kFirstTile on (wrapping),
// the RoPE tile last.
// kWait = false: the tiles are known to be in place (FP8 pages, dequantized by this group).
template <int kFirstTile, int kQTileBytes, bool kWait = true, class Mma>
__device__ __forceinline__ void qk_tiles(uint32_t sQ, uint32_t s_buf, uint32_t bars,
                                         uint32_t phase, Mma mma) {
  const uint64_t dq = make_desc_sw128(sQ, kDescKMajorLbo, kDescSbo);
  const uint64_t dk = make_desc_sw128(s_buf, kDescKMajorLbo, kDescSbo);
  wgmma_fence();
#pragma unroll
  for (int i = 0; i < T::kNumKTiles; ++i) {
    const int t = i < T::kNumVTiles ? (i + kFirstTile) % T::kNumVTiles : i;
    if (kWait) mbar_wait(bars + 8 * t, phase);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma(desc_advance(dq, t * kQTileBytes + kk * kKStepKMajor),
          desc_advance(dk, t * kTileBytes + kk * kKStepKMajor), (i | kk) != 0 ? 1 : 0);
    }
  }
  wgmma_commit();
}

// S = Q K^T for one page buffer of elements E. The V tiles are taken from kFirstTile on: the
// order in which the warpgroups refilled them.
template <class E, int kFirstTile = 0, bool kWait = true>
__device__ __forceinline__ void qk_page(float (&s)[32], uint32_t sQ, uint32_t s_buf,
                                        uint32_t bars, uint32_t phase) {
  qk_tiles<kFirstTile, kTileBytes, kWait>(sQ, s_buf, bars, phase, [&](uint64_t q, uint64_t k, int sd) {
    wgmma_m64n64k16_ss<E>(s, q, k, sd);
  });
}

// O[:, half] += P V[:, half] with P from registers; V = tiles [tile0, tile0 + 4) read MN-major.
template <class E>
__device__ __forceinline__ void pv_rs(float (&o)[128], const uint32_t (&a)[16], uint32_t s_buf,
                                      int tile0) {
  const uint64_t dv = make_desc_sw128(s_buf + tile0 * kTileBytes, kDescMnMajorLbo, kDescSbo);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t ak[4] = {a[4 * kk], a[4 * kk + 1], a[4 * kk + 2], a[4 * kk + 3]};
    wgmma_m64n256k16_rs_tb<E>(o, ak, desc_advance(dv, kk * kKStepMnMajor));
  }
  wgmma_commit();
}

// O[:, half] += P V[:, half] with P from the swizzled smem tile s_p.
template <class E>
__device__ __forceinline__ void pv_ss(float (&o)[128], uint32_t s_p, uint32_t s_buf, int tile0) {
  const uint64_t dp = make_desc_sw128(s_p, kDescKMajorLbo, kDescSbo);
  const uint64_t dv = make_desc_sw128(s_buf + tile0 * kTileBytes, kDescMnMajorLbo, kDescSbo);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wgmma_m64n256k16_ss_tb<E>(o, desc_advance(dp, kk * kKStepKMajor),
                           desc_advance(dv, kk * kKStepMnMajor), 1);
  }
  wgmma_commit();
}

}  // namespace sm90
}  // namespace jax_flashmla
