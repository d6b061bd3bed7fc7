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
#include "kernels/sm90/decode/dense/fp8_bits.h"
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

// The dequantization runs on the ALU and the FMA pipe only (fp8_bits.h: PRMT, SHF, LOP3 per two
// values, then one mul.bf16x2), in fewer issue slots than the conversion instructions
// (cvt.f16x2.e4m3x2, cvt.f32.f16, cvt.bf16x2.f32), which also issue at a quarter rate on sm_90.
// (Measured: the same speed either way, benchmarks/NOTES.md v4.0b.) The bf16 bits of value *
// 2^-120 times the factor scale * 2^120, a power of two, give value * scale exactly. That factor
// leaves bf16's range for scales of 2^8 and above (a tile amax of 2^8 * 448 or more), where it is
// applied as two bf16 factors (fp8_wide_factors); a warp takes that path for a whole quarter
// when any of its lanes' four tiles needs it (or has a NaN or infinite scale), which is rare.
// Then the results are those of the per-tile rule: a lane whose tile fits multiplies once more,
// by 1, which changes no bf16 value (subnormals included; a NaN stays the same NaN).
// A NaN or infinite scale (quantize_kv writes NaN for a tile that held NaN or inf) makes the
// whole tile NaN, as dequantize_kv does. Only the scale's exponent field is read: zero,
// subnormal or non-power-of-two scales (garbage in unused slots) give some finite factors; the
// kernels never let such rows reach another. (The e4m3 NaN codes 0x7F / 0xFF read as +-480 *
// scale here; quantize_kv writes them only in tiles whose scale is NaN.)

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// a times the bf16 in the high half of b, in both halves (ptxas folds the {h, h} into HMUL2's
// .H1_H1 operand).
__device__ __forceinline__ uint32_t bf16x2_mul_hi(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("{\n .reg .b16 l, h;\n .reg .b32 f;\n mov.b32 {l, h}, %2;\n mov.b32 f, {h, h};\n"
      " mul.rn.bf16x2 %0, %1, f;\n}\n"
      : "=r"(d)
      : "r"(a), "r"(b));
  return d;
}

// What a lane does with its 16 values (one 16-byte chunk c of a token's 128-byte quarter, fp8
// columns 128q + 16c ..): they are two 16-byte bf16 chunks 2(c % 4), 2(c % 4) + 1 of one row of
// tile 2q + c / 4. Lanes of odd tiles store the second chunk first, so that the 8 lanes of a
// token, writing chunks 0, 2, 4, 6 of one tile and 1, 3, 5, 7 of the next, hit 8 different bank
// groups; their selectors pick the second half of the 16 bytes for the first store. All of it
// depends on c alone: the same for every unit and page.
struct Fp8Lane {
  uint32_t sel01, sel23;  // prmt selectors of the first-stored chunk's pairs (fp8_bits.h)
  int tile;               // 0, 1: tile 2q + tile
  int first, second;      // the chunks, in the tile's row, of the first and second store
};
__device__ __forceinline__ Fp8Lane fp8_lane(int c) {
  const int tile = c >> 2;
  const int chunk = 2 * (c & 3);
  const uint32_t other = tile ? kFp8SelOther : 0u;
  return {kFp8SelPair01 + other, kFp8SelPair23 + other, tile, chunk + tile, chunk + 1 - tile};
}

// 16 fp8 values (bytes of v, lowest first) -> the bf16 bits times 2^-120 of the lane's first and
// second store (see Fp8Lane).
__device__ __forceinline__ void e4m3x16_bits(const uint4& v, const Fp8Lane& l, uint4& first,
                                             uint4& second) {
  first = make_uint4(e4m3x2_to_bf16x2_bits(v.x, v.z, l.sel01),
                     e4m3x2_to_bf16x2_bits(v.x, v.z, l.sel23),
                     e4m3x2_to_bf16x2_bits(v.y, v.w, l.sel01),
                     e4m3x2_to_bf16x2_bits(v.y, v.w, l.sel23));
  second = make_uint4(e4m3x2_to_bf16x2_bits(v.z, v.x, l.sel01),
                      e4m3x2_to_bf16x2_bits(v.z, v.x, l.sel23),
                      e4m3x2_to_bf16x2_bits(v.w, v.y, l.sel01),
                      e4m3x2_to_bf16x2_bits(v.w, v.y, l.sel23));
}

__device__ __forceinline__ uint4 bf16x8_mul(uint4 a, uint32_t f) {
  return make_uint4(bf16x2_mul(a.x, f), bf16x2_mul(a.y, f), bf16x2_mul(a.z, f),
                    bf16x2_mul(a.w, f));
}
__device__ __forceinline__ uint4 bf16x8_mul_hi(uint4 a, uint32_t f) {
  return make_uint4(bf16x2_mul_hi(a.x, f), bf16x2_mul_hi(a.y, f), bf16x2_mul_hi(a.z, f),
                    bf16x2_mul_hi(a.w, f));
}

// One quarter of one lane: 4 units of 16 values v[k] with their scales' fields (fp8_scale_field),
// dequantized and stored at addr(k) (uint2: the first and the second store's shared address).
// `sync`: a __syncwarp between the last read of the warp's raw bytes and the first store.
template <class Addr>
__device__ __forceinline__ void dequant_quarter(const uint4 (&v)[4], const uint32_t (&field)[4],
                                                const Fp8Lane& lane, Addr addr, bool sync) {
  const uint32_t top = max(max(field[0], field[1]), max(field[2], field[3]));
  const bool wide = __any_sync(0xffffffffu, top >= kFp8WideField);
  if (sync) __syncwarp();  // each token's 8 lanes have read what they overwrite
  if (!wide) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t f = fp8_narrow_factor(field[k]);
      uint4 a, b;
      e4m3x16_bits(v[k], lane, a, b);
      const uint2 at = addr(k);
      st_shared_v4(at.x, bf16x8_mul_hi(a, f));
      st_shared_v4(at.y, bf16x8_mul_hi(b, f));
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const Fp8Factors f = fp8_wide_factors(field[k]);
      uint4 a, b;
      e4m3x16_bits(v[k], lane, a, b);
      const uint2 at = addr(k);
      st_shared_v4(at.x, bf16x8_mul(bf16x8_mul(a, f.f1), f.f2));
      st_shared_v4(at.y, bf16x8_mul(bf16x8_mul(b, f.f1), f.f2));
    }
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
  constexpr int kUnitRows = kThreads / 8;  // 16: tokens between a lane's units
  static_assert(kUnits == 4 && kUnitRows % 8 == 0, "a lane's units share the swizzle phase");
  mbar_wait(bars + 8 * L::kRawBar, phase);
  mbar_wait(bars + 8 * L::kRopeBar, phase);
  // Unit k of a quarter: token tid / 8 + 16k, 16-byte chunk tid % 8 (8 lanes read one token's
  // 128 bytes). The addresses are the lane's base plus constants.
  const uint32_t t = static_cast<uint32_t>(tid);
  const int row = static_cast<int>(t >> 3);
  const Fp8Lane lane = fp8_lane(static_cast<int>(t & 7u));
  const uint32_t raw = s_buf + L::kRawOffset + 16 * t;
  const uint32_t scales = s_scales + row * kFp8NumScales * 4;
  const uint32_t st0 = s_buf + lane.tile * kTileBytes + swizzled_offset(row, lane.first);
  const uint32_t st1 = s_buf + lane.tile * kTileBytes + swizzled_offset(row, lane.second);
  // The quarter's loads are all issued before the first store: one shared-memory latency per
  // quarter, not one per unit (this warp is often the only one its scheduler has).
  auto quarter = [&](int q, bool in_place) {
    uint4 v[kUnits];
    uint32_t field[kUnits];
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      v[k] = ld_shared_v4(raw + q * L::kRawQuarterBytes + k * kUnitRows * L::kLatentBoxBytes);
      field[k] = fp8_scale_field(
          __float_as_uint(ld_shared_f32(scales + (k * kUnitRows * kFp8NumScales + q) * 4)));
    }
    const uint32_t tiles = 2 * q * kTileBytes;
    dequant_quarter(
        v, field, lane,
        [&](int k) {
          const uint32_t rows = k * kUnitRows * kTileRowBytes;
          return make_uint2(st0 + tiles + rows, st1 + tiles + rows);
        },
        in_place);
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
