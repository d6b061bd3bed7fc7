// The producer of the sparse decode kernel (kernel.cuh): warpgroup 2 gathers the cache rows a
// block of 64 index slots names into a block buffer, in the layout the dense kernels' TMA loads
// and FP8 dequantization produce (9 swizzled 64x64 bf16 tiles: 0..7 the latent columns, 8 RoPE),
// and says which of the 64 keys exist in a bit mask beside the buffer.
//
// Threads: warp w of the group owns the block's tokens 16w .. 16w + 15. Lane l reads the index
// of token 16w + l % 16 (lanes 16..31 repeat 0..15), so a ballot gives the warp's 16 validity
// bits. For the row data, 8 lanes share one token and each reads one 16-byte chunk of a
// 128-byte span: lane l holds tokens 16w + 4k + l / 8 (k = 0..3), chunk l % 8. Quarter q of the
// row (fp8 columns 128q .. 128q + 127, one scale) is one 16-byte load per (lane, k) plus the
// token's scale, dequantized by the exact ALU path of the dense FP8 kernels (dequant_quarter)
// into bf16 tiles 2q and 2q + 1. Quarter 0's loads are issued before waiting for the buffer;
// the others one after another (the producer has kProducerRegs registers: no room for two
// quarters in flight; the L2 prefetch of the next block is what keeps the loads short). RoPE (64 bf16 = 128 bytes, already bf16) goes straight into tile 8 with cp.async.
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

// One producer thread's view of a block: the four cache rows it reads (-1: none).
struct GatherRows {
  int32_t id[4];
};

// Quarter q of this lane's four rows into registers (zeros and scale 1 for missing rows).
__device__ __forceinline__ void gather_quarter(const uint8_t* cache, const GatherRows& rows,
                                               int q, int chunk, uint4 (&v)[4], float (&sc)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = make_uint4(0, 0, 0, 0);
    sc[k] = 1.f;
    if (rows.id[k] >= 0) {
      const uint8_t* row = cache + static_cast<size_t>(rows.id[k]) * kFp8RowBytes;
      v[k] = ld_global_nc_v4(row + q * kFp8TileCols + chunk * 16);
      sc[k] = ld_global_nc_f32(row + kFp8ScaleOffset + 4 * q);
    }
  }
}

// Quarter q of this lane's rows, dequantized into the buffer's tiles 2q, 2q + 1.
__device__ __forceinline__ void store_quarter(uint32_t s_buf, int tok0, int q, const Fp8Lane& lane,
                                              const uint4 (&v)[4], const float (&sc)[4]) {
  uint32_t field[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) field[k] = fp8_scale_field(__float_as_uint(sc[k]));
  const uint32_t tile = s_buf + (2 * q + lane.tile) * kTileBytes;
  dequant_quarter(
      v, field, lane,
      [&](int k) {
        return make_uint2(tile + swizzled_offset(tok0 + 4 * k, lane.first),
                          tile + swizzled_offset(tok0 + 4 * k, lane.second));
      },
      false);
}

// Fills buffer s_buf with block `page` of request chunk c (one producer warpgroup; warp, lane
// within it). `fills` counts this buffer's earlier fills: fill n (n >= 1) first waits for the
// consumers to release fill n - 1 (phase (n - 1) & 1 of `empty`); every fill ends with all 128
// threads arriving on `full`, completing its phase n & 1.
__device__ __forceinline__ void gather_block(const SparseDecodeParams& sp, const ReqCtx& c,
                                             int page, uint32_t s_buf, uint32_t s_mask,
                                             uint32_t full, uint32_t empty, uint32_t& fills,
                                             int warp, int lane) {
  const uint8_t* cache = static_cast<const uint8_t*>(sp.base.k_cache);
  const int32_t* idx = sp.indices + static_cast<size_t>(c.bi) * sp.topk;
  const int n_keys = min(c.len, sp.topk);  // slots [0, n_keys) of the request are used

  // 1. The indices and validity bits of the warp's 16 tokens.
  const int slot = page * kPageSize + warp * 16 + (lane & 15);
  int32_t id = -1;
  if (slot < n_keys) id = __ldg(idx + slot);
  const bool valid = slot < n_keys && id >= 0 && id < sp.num_tokens;
  const uint32_t bits = __ballot_sync(0xffffffffu, valid) & 0xFFFFu;
  id = valid ? id : -1;
  GatherRows rows;
#pragma unroll
  for (int k = 0; k < 4; ++k) rows.id[k] = __shfl_sync(0xffffffffu, id, 4 * k + (lane >> 3));
  const int tok0 = warp * 16 + (lane >> 3);
  const int chunk = lane & 7;
  const Fp8Lane lane_map = fp8_lane(chunk);

  // 2. The next block of the request into L2, so that its loads (issued only once this block
  // is written) hit L2.
  if (page + 1 < c.pe && lane < 16) {
    const int next = slot + kPageSize;
    if (next < n_keys) {
      const int32_t nid = __ldg(idx + next);
      if (nid >= 0 && nid < sp.num_tokens) {
        prefetch_l2_bulk(cache + static_cast<size_t>(nid) * kFp8RowBytes, kFp8RowBytes);
      }
    }
  }

  // 3. Quarter 0 in flight, then wait until the consumers have released the buffer.
  uint4 v[4];
  float sc[4];
  gather_quarter(cache, rows, 0, chunk, v, sc);
  if (fills > 0) mbar_wait(empty, (fills - 1) & 1u);

  // 4. RoPE into tile 8 (zero-filled for missing rows), then the latent quarters.
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool ok = rows.id[k] >= 0;
    const uint8_t* src =
        ok ? cache + static_cast<size_t>(rows.id[k]) * kFp8RowBytes + kFp8RopeOffset + chunk * 16
           : cache;
    cp_async_16(s_buf + 8 * kTileBytes + swizzled_offset(tok0 + 4 * k, chunk), src,
                ok ? 16u : 0u);
  }
  cp_async_commit();
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (q > 0) gather_quarter(cache, rows, q, chunk, v, sc);
    store_quarter(s_buf, tok0, q, lane_map, v, sc);
  }

  // 5. Publish: mask bits, every write visible to wgmma (async proxy), then arrive.
  if (lane == 0) st_shared_u16(s_mask + 2 * warp, static_cast<uint16_t>(bits));
  cp_async_wait_all();
  fence_proxy_async_smem();
  mbar_arrive(full);
  ++fills;
}

}  // namespace sm90
}  // namespace jax_flashmla
