// The producer of the sparse decode kernel (kernel.cuh): warpgroup 2 gathers the cache rows a
// block of 64 index slots names into a block buffer, in the layout the dense kernels' TMA loads
// and FP8 dequantization produce (9 swizzled 64x64 bf16 tiles: 0..7 the latent columns, 8 RoPE),
// and says which of the 64 keys exist in a bit mask beside the buffer.
//
// Threads: warp w of the group owns the block's tokens 16w .. 16w + 15. Lane l reads the index
// of token 16w + l % 16 (lanes 16..31 repeat 0..15), so a ballot gives the warp's 16 validity
// bits. For the row data, 8 lanes share one token and each reads one 16-byte chunk of a
// 128-byte span: lane l holds tokens 16w + 4k + l / 8 (k = 0..3), chunk l % 8. Quarter q of the
// row (fp8 columns 128q .. 128q + 127, one scale) is one 16-byte piece per (lane, k) plus the
// token's scale, dequantized by the exact ALU path of the dense FP8 kernels (dequant_quarter,
// fp8_cache.cuh: one warp vote per quarter) into bf16 tiles 2q and 2q + 1. RoPE (64 bf16 =
// 128 bytes, already bf16) goes straight into tile 8 with cp.async.
//
// The fp8 bytes: once the buffer is free, every lane cp.asyncs its 16 raw chunks of the block into
// the buffer's own tiles 4..7 (raw quarter q in tile 4 + q, unswizzled, as the dense kernels' TMA
// puts it: token t at byte 128 t), one commit group per quarter, so the whole block (42 KiB) is
// in flight at once with no registers held; each token's 16 bytes of scales go with quarter 0
// into a 1 KiB area per buffer (SparseTraits::kOffGatherScales). Then, quarter by quarter as its
// group lands, each lane reads back exactly the chunks it copied and dequantizes them in place
// (dequant_page's order: quarters 0, 1 -> tiles 0..3; 2 -> tiles 4, 5 over raw quarters 0, 1;
// 3 -> tiles 6, 7 over raw quarters 2, 3). A token's 128-byte raw row and its bf16 tile rows are
// the same bytes and belong to the same 8 lanes of one warp, so a __syncwarp between the reads
// and the stores of quarters 2 and 3 is all the in-place order needs. A missing row is zero
// bytes times a zero-filled scale: +0, and it does not make the warp "wide".
//
// The indices: the producer walks its record's blocks with a BlockCursor and loads each lane's
// index two blocks ahead (kernel.cuh), so that neither the block's own copies nor the L2
// prefetch of the next block's rows wait for an index load (in v1.2 those two dependent global
// loads were ~30% of the producer's stall samples).
//
// A slot at or past the request's key count, or with an index outside [0, num_tokens), is no
// key: nothing of it is read, its rows are written as zeros (so P.V never multiplies a stale NaN)
// and its mask bit is 0, which the consumers turn into a -inf score.
#pragma once

#include <cstdint>

#include "kernels/common/split_kv.cuh"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/fp8_cache.cuh"
#include "kernels/sm90/decode/sparse/traits.h"
#include "kernels/sm90/ptx.cuh"
#include "kernels/sm90/tile_geometry.h"

namespace jax_flashmla {
namespace sm90 {

// Waits until at most N of this thread's cp.async groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The shared-memory places of one producer lane (token tok0 + 4k, fp8 chunk c of
// each quarter), as offsets from the buffer, so that the whole block needs a few registers: with
// tok0 % 8 < 4 (tok0 = 16 w + l / 8), row tok0 + 4k has swizzle phase t + 4 (k & 1), t = tok0 % 4,
// and fp8 chunk c of quarter q is bf16 chunks 2 (c % 4) + h (h = 0, 1) of tile 2q + c / 4, stored
// in the order of fp8_lane(c) (odd tile: h = 1 first). So dequant_quarter's two addresses for
// (k, q) are st[k & 1][0], st[k & 1][1] (first, second store) + 1024 (k >> 1) + 16384 q, the same
// bytes as Fp8Lane's first / second chunk through swizzled_offset. (Computed once, kept across
// blocks.)
struct StagedLane {
  uint32_t st[2][2];  // row tok0 + 4p (p = 0, 1) in tile c / 4: [p][0] first store, [p][1] second
  uint32_t raw;       // raw quarter 0's chunk c of row tok0 (tile 4: unswizzled)
  uint32_t rope[2];   // chunk c of row tok0 + 4p in tile 8
};

__device__ __forceinline__ StagedLane staged_lane(int tok0, int chunk) {
  StagedLane a;
  const uint32_t t = tok0 & 3;
  const uint32_t c2 = 2 * (chunk & 3);
  const uint32_t odd = chunk >> 2;  // the tile within the quarter's pair: odd stores h = 1 first
#pragma unroll
  for (int p = 0; p < 2; ++p) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      a.st[p][s] = odd * kTileBytes + (tok0 + 4 * p) * kTileRowBytes +
                   (((c2 + (s ^ odd)) ^ (t + 4 * p)) << 4);
    }
    a.rope[p] = 8 * kTileBytes + (tok0 + 4 * p) * kTileRowBytes + ((chunk ^ (t + 4 * p)) << 4);
  }
  a.raw = Fp8Layout::kRawOffset + tok0 * Fp8Layout::kLatentBoxBytes + chunk * 16;
  return a;
}

// Raw quarter Q of this lane's rows read back from tile 4 + Q of the buffer (once its group has
// landed: waited for here) and dequantized into tiles 2Q, 2Q + 1 by the dense kernels'
// dequant_quarter (one wide vote for the quarter), with the scales the token's chunk-0 lane
// copied to s_scale_row (16 bytes per token, 64 bytes per k, in group 0). `lane` is
// fp8_lane(chunk): only its prmt selectors are used here (the addresses are a's).
template <int Q>
__device__ __forceinline__ void dequant_staged_quarter(uint32_t s_buf, uint32_t s_scale_row,
                                                       const StagedLane& a, const Fp8Lane& lane) {
  cp_async_wait_group<3 - Q>();  // groups are quarters 0, 1, 2, 3 (+ RoPE), oldest first
  // Quarter 0: the scales were copied by another lane of the token; its wait above, then this
  // barrier, make them visible. Quarter 2 overwrites raw quarters 0, 1 (tiles 4, 5), quarter 3
  // raw quarters 2, 3 (tiles 6, 7): the token's other 7 lanes (this warp's) must have read those
  // bytes first, so quarters 2, 3 have dequant_quarter put a barrier between the reads (the raw
  // loads below) and the stores.
  if (Q == 0) __syncwarp();
  uint4 v[4];
  uint32_t field[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = ld_shared_v4(s_buf + a.raw + Q * Fp8Layout::kRawQuarterBytes +
                        4 * k * Fp8Layout::kLatentBoxBytes);
    field[k] = fp8_scale_field(__float_as_uint(ld_shared_f32(s_scale_row + 64 * k + 4 * Q)));
  }
  dequant_quarter(
      v, field, lane,
      [&](int k) {
        const uint32_t base = s_buf + (k >> 1) * 8 * kTileRowBytes + Q * 2 * kTileBytes;
        return make_uint2(base + a.st[k & 1][0], base + a.st[k & 1][1]);
      },
      Q >= 2);
}

// Where the producer is in its record's walk: block `page` of request `req`'s chunk [pb, pe), in
// the consumers' order (kernel.cuh); req > the record's last request: past the end.
struct BlockCursor {
  int req;
  int page, pb, pe;
  int n_keys;  // slots [0, n_keys) of the request's index list are used
};

// The first block of the first request from `req` on whose chunk is not empty (the consumers'
// loop runs no block for an empty chunk, so the producer fills none).
__device__ __forceinline__ BlockCursor cursor_from(const SparseDecodeParams& sp,
                                                   const SchedRecord& rec, int req, int last_req) {
  BlockCursor u{last_req + 1, 0, 0, 0, 0};
  for (; req <= last_req; ++req) {
    const ReqCtx c = make_req(sp.base, rec, req, 0);  // the m block only moves vis_min
    if (c.pb < c.pe) {
      u = BlockCursor{req, c.pb, c.pb, c.pe, min(c.len, sp.topk)};
      break;
    }
  }
  return u;
}

__device__ __forceinline__ BlockCursor cursor_next(const SparseDecodeParams& sp,
                                                   const SchedRecord& rec, BlockCursor u,
                                                   int last_req) {
  if (u.req > last_req) return u;
  if (u.page + 1 < u.pe) {
    ++u.page;
    return u;
  }
  return cursor_from(sp, rec, u.req + 1, last_req);
}

// The index in slot `slot` (0..63) of the cursor's block, or -1 past the end, past the request's
// key count (so the caller checks only the range of the cache).
__device__ __forceinline__ int32_t slot_index(const SparseDecodeParams& sp, const BlockCursor& u,
                                              int last_req, int slot) {
  const int s = u.page * kPageSize + slot;
  if (u.req > last_req || s >= u.n_keys) return -1;
  return __ldg(sp.indices + static_cast<size_t>(u.req) * sp.topk + s);
}

// Fills buffer s_buf with one block (one producer warpgroup; warp, lane within it). `id` is the
// index of this lane's slot of the block (warp * 16 + lane % 16; -1: no key there) and `next_id`
// that of the block after it, whose row goes into L2 now. `fills` counts this buffer's earlier
// fills: fill n (n >= 1) first waits for the consumers to release fill n - 1 (phase (n - 1) & 1
// of `empty`); every fill ends with all 128 threads arriving on `full`, completing its phase
// n & 1.
__device__ __forceinline__ void gather_block(const SparseDecodeParams& sp, int32_t id,
                                             int32_t next_id, uint32_t s_buf, uint32_t s_mask,
                                             uint32_t s_scales, uint32_t full, uint32_t empty,
                                             uint32_t& fills, int warp, int lane) {
  const uint8_t* cache = static_cast<const uint8_t*>(sp.base.k_cache);

  // 1. This block's validity bits and the rows of this lane's four tokens.
  const bool valid = id >= 0 && id < sp.num_tokens;
  const uint32_t bits = __ballot_sync(0xffffffffu, valid) & 0xFFFFu;
  id = valid ? id : -1;
  int32_t rows[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) rows[k] = __shfl_sync(0xffffffffu, id, 4 * k + (lane >> 3));
  const int tok0 = warp * 16 + (lane >> 3);
  const int chunk = lane & 7;

  // 2. Wait until the consumers have released the buffer (and, for fill n >= 1 of it, its
  // scale area: the consumers released fill n - 1 after every producer thread was done with it).
  if (fills > 0) mbar_wait(empty, (fills - 1) & 1u);

  // 3. The whole block in flight, no registers held: group 0 = the rows' scales (16 bytes per
  // token, by its chunk-0 lane) and raw quarter 0, groups 1..3 = raw quarters 1..3, RoPE into
  // tile 8 with the last; zero-filled for missing rows. Then each quarter is dequantized as its
  // group lands, while the later ones are still in flight.
  const StagedLane a = staged_lane(tok0, chunk);
  const uint32_t s_scale_row = s_scales + tok0 * 16;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool ok = rows[k] >= 0;
      const uint8_t* row = cache + static_cast<size_t>(ok ? rows[k] : 0) * kFp8RowBytes;
      if (q == 0 && chunk == 0) {
        cp_async_16(s_scale_row + 64 * k, row + kFp8ScaleOffset, ok ? 16u : 0u);
      }
      cp_async_16(s_buf + a.raw + q * Fp8Layout::kRawQuarterBytes +
                      4 * k * Fp8Layout::kLatentBoxBytes,
                  row + q * kFp8TileCols + chunk * 16, ok ? 16u : 0u);
      if (q == 3) {
        cp_async_16(s_buf + a.rope[k & 1] + (k >> 1) * 8 * kTileRowBytes,
                    row + kFp8RopeOffset + chunk * 16, ok ? 16u : 0u);
      }
    }
    cp_async_commit();
  }
  // 4. The next block's rows into L2 (one block ahead, so that its copies hit L2; after this
  // block's copies, which are on the critical path). A 656-byte row starts at a 16-byte
  // boundary, so lines at offsets 0, 128, .., 640 cover it: each of a token's two lanes (l,
  // l + 16) takes three.
  if (next_id >= 0 && next_id < sp.num_tokens) {
    const uint8_t* row = cache + static_cast<size_t>(next_id) * kFp8RowBytes + (lane >> 4) * 384;
#pragma unroll
    for (int j = 0; j < 3; ++j) prefetch_l2_line(row + 128 * j);
  }
  const Fp8Lane lane_map = fp8_lane(chunk);
  dequant_staged_quarter<0>(s_buf, s_scale_row, a, lane_map);
  dequant_staged_quarter<1>(s_buf, s_scale_row, a, lane_map);
  dequant_staged_quarter<2>(s_buf, s_scale_row, a, lane_map);
  dequant_staged_quarter<3>(s_buf, s_scale_row, a, lane_map);  // waits for every group, RoPE's too

  // 5. Publish: mask bits, every write visible to wgmma (async proxy), then arrive.
  if (lane == 0) st_shared_u16(s_mask + 2 * warp, static_cast<uint16_t>(bits));
  fence_proxy_async_smem();
  mbar_arrive(full);
  ++fills;
}

}  // namespace sm90
}  // namespace jax_flashmla
