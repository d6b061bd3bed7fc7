// Reading the FP8 cache (params.h: 656-byte rows) into the dense kernels' bf16 page buffers, so
// that everything after the load (the wgmma code, softmax, masking, epilogues) is the bf16 path
// unchanged. A kernel instantiated with Fp8TensorMaps instead of one CUtensorMap reads this
// format.
//
// A page buffer is 9 swizzled 64x64 bf16 tiles: 0..7 the latent columns, 8 the RoPE columns.
// For an FP8 page the copy engine (TMA) writes
//   - the RoPE columns, already bf16, straight into tile 8 with the 128-byte swizzle, on tile
//     barrier 8 ("rope");
//   - the 512 fp8 latent bytes of the 64 tokens, unswizzled, as four quarters of [64 tokens][128
//     bytes] (8 KiB, columns 128q..128q+127) into the space of tiles 4 + q, and the tokens' 4
//     float scales into a 1 KiB area of the buffer's own, all on tile barrier 0 ("raw").
// Then the warpgroup that scores the page dequantizes it in place (dequant_page), in three steps
// that never overwrite bytes still to be read:
//   1. quarters 0, 1 -> tiles 0..3 (no overlap);                               group barrier
//   2. quarter 2     -> tiles 4, 5 (the space of quarters 0, 1);                group barrier
//   3. quarter 3     -> tiles 6, 7: tile 6 is quarter 2's space; tile 7 is quarter 3's own, but
//      a token's 128 raw bytes and its tile-7 row are the same 128 bytes, read and written by
//      the same 8 lanes of one warp, so a __syncwarp between the load and the store suffices.
// value = fp8 * scale is exact in bf16 (the scales are powers of two), so the tiles hold exactly
// the dequantized cache.
//
// The kernels' tile groups map onto the two FP8 loads: a group that includes tile 4 (the V
// tiles 4..7 are the last of a page to be released) loads "raw", a group that includes tile 8
// loads "rope", any other group loads nothing: its tiles are written by dequant_page.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <type_traits>

#include "kernels/common/device_utils.cuh"
#include "kernels/common/split_kv.cuh"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/traits.h"
#include "kernels/sm90/ptx.cuh"
#include "kernels/sm90/tile_geometry.h"

namespace jax_flashmla {
namespace sm90 {

// The three views of an FP8 cache [num_blocks, 64, h_kv, 656] the kernels load through
// (launch.cu encodes them): the latent bytes, the scales as float32, the RoPE part as bf16.
struct Fp8TensorMaps {
  CUtensorMap latent;  // uint8,   box 128 x 1 head x 64 tokens x 1 page, no swizzle
  CUtensorMap scales;  // float32, box   4 x 1 x 64 x 1 (16 bytes of each row)
  CUtensorMap rope;    // bf16,    box  64 x 1 x 64 x 1, 128-byte swizzle (a bf16 tile)
};

template <class Maps>
inline constexpr bool kIsFp8Maps = std::is_same_v<Maps, Fp8TensorMaps>;

struct Fp8Layout {
  static constexpr int kLatentBoxBytes = 128;                         // one box: 128 columns
  static constexpr int kRawOffset = 4 * kTileBytes;                   // quarter q in tile 4 + q
  static constexpr int kRawQuarterBytes = kPageSize * kLatentBoxBytes;  // 8 KiB
  static constexpr int kScaleBytes = DenseTraits::kFp8ScaleAreaBytes;   // 1 KiB per page
  static constexpr uint32_t kRawTxBytes = 4 * kRawQuarterBytes + kScaleBytes;
  static constexpr int kRawBar = 0;   // tile barrier the raw bytes and scales arrive on
  static constexpr int kRopeBar = 8;  // tile barrier of the RoPE tile
};
static_assert(Fp8Layout::kRawQuarterBytes == kTileBytes && kFp8TileCols == 128,
              "a raw quarter fills one tile's space and has one scale");
static_assert(kFp8RopeOffset % 16 == 0 && kFp8ScaleOffset % 16 == 0 && kFp8RowBytes % 16 == 0,
              "TMA needs 16-byte aligned rows and boxes");

// ------------------------------------------------------------------ loads

__device__ __forceinline__ void prefetch_maps(const CUtensorMap* map) { prefetch_tensormap(map); }
__device__ __forceinline__ void prefetch_maps(const Fp8TensorMaps* maps) {
  prefetch_tensormap(&maps->latent);
  prefetch_tensormap(&maps->scales);
  prefetch_tensormap(&maps->rope);
}

// Starts the loads of tile group `tile_mask` of an FP8 page `pi` (see the header) into buffer
// s_buf and its scale area s_scales. (blocks.cuh has the bf16 twin.)
__device__ __forceinline__ void load_group(const Fp8TensorMaps* maps, uint32_t s_buf,
                                           uint32_t s_scales, uint32_t bars, const PageInfo& pi,
                                           int hk, uint32_t tile_mask, uint64_t policy) {
  using L = Fp8Layout;
  if (!pi.loaded) return;
  const bool raw = (tile_mask >> 4) & 1u;
  const bool rope = (tile_mask >> 8) & 1u;
  const uint32_t raw_bar = bars + 8 * L::kRawBar;
  const uint32_t rope_bar = bars + 8 * L::kRopeBar;
  if (raw) mbar_arrive_expect_tx(raw_bar, L::kRawTxBytes);
  if (rope) mbar_arrive_expect_tx(rope_bar, kTileBytes);
  if (raw) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      tma_load_4d(s_buf + L::kRawOffset + q * L::kRawQuarterBytes, &maps->latent, raw_bar,
                  q * L::kLatentBoxBytes, hk, 0, pi.kv_id, policy);
    }
    tma_load_4d(s_scales, &maps->scales, raw_bar, kFp8ScaleOffset / 4, hk, 0, pi.kv_id, policy);
  }
  if (rope) {
    tma_load_4d(s_buf + 8 * kTileBytes, &maps->rope, rope_bar, kFp8RopeOffset / 2, hk, 0,
                pi.kv_id, policy);
  }
}

// ------------------------------------------------------------------ dequantization

// The dequantization runs on the ALU and the FMA pipe only, in about half the issue slots of the
// conversion instructions (cvt.f16x2.e4m3x2, cvt.f32.f16, cvt.bf16x2.f32), which also issue at a
// quarter rate on sm_90. (Measured: the same speed either way, benchmarks/NOTES.md v4.0b; what
// bounds the FP8 kernels is how few pages each group has in flight, not this arithmetic.)
// An e4m3 byte b = s eeee mmm read as the bf16 bits s<<15 | eeeemmm<<4 is b's value times 2^-120,
// exactly (e4m3 subnormals land on bf16 subnormals, which the bf16 multiply keeps); multiplying
// by scale * 2^120, a power of two, restores value * scale exactly. That factor leaves bf16's
// range for scales above 2^7 (a tile amax above 57344), so it is applied as two bf16 factors
// (Fp8Factors), the second 1 in all but such tiles.
struct Fp8Factors {
  uint32_t f1;  // bf16x2 (both halves equal): 2^min(k, 127), k = log2(scale) + 120
  uint32_t f2;  // bf16x2: 2^(k - min(k, 127)), 1 unless scale > 2^7
};

// The factors of a tile's scale, from its float32 bits, for the finite, normal powers of two the
// format stores. A NaN or infinite scale (quantize_kv writes NaN for a tile that held NaN or inf)
// makes the whole tile NaN, as dequantize_kv does. Other values are not the format's (zero,
// subnormal, not a power of two: garbage in unused slots) and give some finite factors; the
// kernels never let such rows reach another. (The e4m3 NaN codes 0x7F / 0xFF read as +-480 *
// scale here; quantize_kv writes them only in tiles whose scale is NaN.)
__device__ __forceinline__ Fp8Factors fp8_factors(float scale) {
  const uint32_t e = (__float_as_uint(scale) >> 23) & 0xFFu;  // biased exponent of the scale
  const uint32_t k = e + 120u;                                 // biased exponent of scale * 2^120
  const uint32_t e1 = min(k, 254u);
  const uint32_t e2 = k - e1 + 127u;
  const uint32_t f1 = e == 0xFFu ? 0x7FC07FC0u : (e1 << 7) * 0x00010001u;  // NaN or the factor
  return {f1, e == 0xFFu ? 0x3F803F80u : (e2 << 7) * 0x00010001u};
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Bytes [0, b, 0, b'] -> the bf16x2 bits of (b, b') times 2^-120 (see above).
__device__ __forceinline__ uint32_t e4m3x2_bits_to_bf16x2(uint32_t t) {
  return (t & 0x80008000u) | ((t & 0x7F007F00u) >> 4);
}

// Four e4m3 values (bytes of w, lowest first) times the tile's scale, as two bf16x2 words.
// `wide` says whether some lane of the warp has a second factor other than 1 (warp-uniform).
__device__ __forceinline__ uint2 dequant4(uint32_t w, const Fp8Factors& f, bool wide) {
  uint32_t lo = e4m3x2_bits_to_bf16x2(__byte_perm(w, 0, 0x1404));  // bytes 0, 1
  uint32_t hi = e4m3x2_bits_to_bf16x2(__byte_perm(w, 0, 0x3424));  // bytes 2, 3
  lo = bf16x2_mul(lo, f.f1);
  hi = bf16x2_mul(hi, f.f1);
  if (wide) {
    lo = bf16x2_mul(lo, f.f2);
    hi = bf16x2_mul(hi, f.f2);
  }
  return make_uint2(lo, hi);
}

// 16 fp8 columns [col, col + 16) of token `tok` (col a multiple of 16), dequantized into the
// page buffer's bf16 tiles: two 16-byte chunks of one tile row. Threads whose tile is odd store
// the second chunk first, so that 8 threads writing chunks 0, 2, 4, 6 of one tile and of the next
// hit 8 different bank groups.
__device__ __forceinline__ void store_dequant16(uint32_t s_buf, int tok, int col, uint4 v,
                                                float sc) {
  const Fp8Factors f = fp8_factors(sc);
  const bool wide = __any_sync(0xffffffffu, f.f2 != 0x3F803F80u);  // a factor 2^(k-127) != 1
  const uint2 a = dequant4(v.x, f, wide), b = dequant4(v.y, f, wide);
  const uint2 c = dequant4(v.z, f, wide), d = dequant4(v.w, f, wide);
  const int tile = col / kTileCols;
  const int chunk = (col % kTileCols) / 8;
  const uint32_t row = s_buf + tile * kTileBytes;
  const uint4 lo = make_uint4(a.x, a.y, b.x, b.y), hi = make_uint4(c.x, c.y, d.x, d.y);
  if (tile & 1) {
    st_shared_v4(row + swizzled_offset(tok, chunk + 1), hi);
    st_shared_v4(row + swizzled_offset(tok, chunk), lo);
  } else {
    st_shared_v4(row + swizzled_offset(tok, chunk), lo);
    st_shared_v4(row + swizzled_offset(tok, chunk + 1), hi);
  }
}

// Dequantizes the FP8 page in buffer s_buf into its bf16 tiles 0..7 (see the header), by one
// warpgroup (tid 0..127, named barrier `bar`), once its raw and RoPE loads of the given phase
// have landed; ends with the tiles fenced for wgmma and the group synced. (Waiting for the RoPE
// tile too is what lets the wide kernel's WG1 overwrite tiles 0..3 of buffer 1: WG0 issues that
// load only after its last read of them.) Slots past a sequence's length are dequantized like
// any other (garbage stays garbage); the kernels mask their scores and zero their V rows
// afterwards, as for bf16.
__device__ __forceinline__ void dequant_page(uint32_t s_buf, uint32_t s_scales, uint32_t bars,
                                             uint32_t phase, int tid, int bar) {
  using L = Fp8Layout;
  constexpr int kThreads = DenseTraits::kWarpgroupThreads;
  constexpr int kUnits = kPageSize * L::kLatentBoxBytes / 16 / kThreads;  // 4 per quarter
  mbar_wait(bars + 8 * L::kRawBar, phase);
  mbar_wait(bars + 8 * L::kRopeBar, phase);
  // Unit k of a quarter: token u / 8, 16-byte chunk u % 8 (8 lanes read one token's 128 bytes).
  // The quarter's loads are all issued before the first store: one shared-memory latency per
  // quarter, not one per unit (this warp is often the only one its scheduler has).
  auto quarter = [&](int q, bool in_place) {
    const uint32_t raw = s_buf + L::kRawOffset + q * L::kRawQuarterBytes;
    uint4 v[kUnits];
    float sc[kUnits];
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int u = tid + kThreads * k;
      const int tok = u >> 3, c = u & 7;
      v[k] = ld_shared_v4(raw + tok * L::kLatentBoxBytes + c * 16);
      sc[k] = ld_shared_f32(s_scales + (tok * kFp8NumScales + q) * 4);
    }
    if (in_place) __syncwarp();  // each token's 8 lanes have read what they overwrite
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int u = tid + kThreads * k;
      store_dequant16(s_buf, u >> 3, L::kLatentBoxBytes * q + 16 * (u & 7), v[k], sc[k]);
    }
  };
  quarter(0, false);
  quarter(1, false);
  named_bar_sync(bar, kThreads);  // quarters 0, 1 read: tiles 4, 5 may be written
  quarter(2, false);
  named_bar_sync(bar, kThreads);  // quarter 2 read: tile 6 may be written
  quarter(3, true);
  fence_proxy_async_smem();
  named_bar_sync(bar, kThreads);
}

}  // namespace sm90
}  // namespace jax_flashmla
