// Tile shapes and shared-memory plans of the sm90 dense decode kernels, in one place: what both
// kernels share (DenseTraits), then each kernel's plan (WideTraits, NarrowTraits<N>).
#pragma once

#include <cstdint>

#include "kernels/params.h"
#include "kernels/sm90/tile_geometry.h"

namespace jax_flashmla {
namespace sm90 {

struct DenseTraits {
  // Two warpgroups, no producer warpgroup: both kernels launch with the same block.
  static constexpr int kThreads = 256;
  static constexpr int kWarpgroupThreads = 128;

  // A KV page (64 tokens x 576) and a query block are 9 tiles of 64 columns (tile_geometry.h).
  static constexpr int kNumKTiles = kHeadDimK / kTileCols;    // 9: a K page / the Q block
  static constexpr int kNumVTiles = kHeadDimV / kTileCols;    // 8: V = the first 8 K tiles
  static constexpr int kPageBytes = kNumKTiles * kTileBytes;  // 72 KiB

  static constexpr float kRowMaxInit = -1e30f;  // finite, so exp2(m_old - m_new) is never NaN
  // The running row max moves only when a page's max exceeds it by more than this (log2 domain),
  // so P = 2^(S - m) stays at most 2^8: exact enough in bf16, far from overflow in fp32.
  static constexpr float kMaxSlack = 8.f;

  // FP8 cache: the scales of one page buffer (64 tokens x 4 floats), beside the buffer.
  static constexpr int kFp8ScaleAreaBytes = kPageSize * kFp8NumScales * 4;
};

static_assert(kBlockM == kTileRows && kPageSize == kTileRows,
              "the kernels are written for 64-row tiles");

// The wide kernel (wide.cuh): 64 query rows on wgmma's M.
struct WideTraits : DenseTraits {
  static constexpr int kVColsPerWarpgroup = kHeadDimV / 2;  // each warpgroup owns 256 output columns

  // Shared memory, offsets from a 1024-byte aligned base.
  //   sQ   : the 64 x 576 query block (9 tiles)
  //   sK[2]: two KV pages (a pair); K tile 8 (the RoPE columns) of each page is reused to hold
  //          the 64 x 64 bf16 P of that page once its QK^T is done (V only needs tiles 0..7).
  //   small: the shared running row max, the two per-pair rescale vectors, the row-sum exchange,
  //          and one mbarrier per K tile of each buffer.
  static constexpr int kOffQ = 0;
  static constexpr int kOffK0 = kOffQ + kPageBytes;
  static constexpr int kOffK1 = kOffK0 + kPageBytes;
  static constexpr int kOffRowMax = kOffK1 + kPageBytes;   // float[64]
  static constexpr int kOffScale0 = kOffRowMax + 256;      // float[64]
  static constexpr int kOffScale1 = kOffScale0 + 256;      // float[64]
  static constexpr int kOffRowSum = kOffScale1 + 256;      // float[2][64]
  static constexpr int kOffBars = kOffRowSum + 512;        // uint64[2][9]: tile loaded ("full")
  static constexpr int kSmemUsed = kOffBars + 2 * kNumKTiles * 8;
  static constexpr int kSmemBytes = kSmemUsed + 1024;      // slack to align the base to 1024
  // FP8 cache (fp8_cache.cuh): each buffer's 64 x 4 float scales after the rest.
  // (TMA writes it: 128-byte aligned.)
  static constexpr int kOffFp8Scales = (kSmemUsed + 127) / 128 * 128;  // float[2][64][4]
  static constexpr int kSmemBytesFp8 = kOffFp8Scales + 2 * kFp8ScaleAreaBytes + 1024;

  // The P tile of page buffer i lives in K tile kPTile of that buffer.
  static constexpr int kPTile = 8;

  // Tile groups of a page buffer, each refilled by the warpgroup that reads it last:
  // (buffer, warpgroup) -> bit mask of K tiles. Buffer 0: 0-3 | 4-8; buffer 1: 0-3,8 | 4-7.
  JFM_HOST_DEVICE static constexpr uint32_t group_tiles(int buffer, int wg) {
    return buffer == 0 ? (wg == 0 ? 0x00Fu : 0x1F0u) : (wg == 0 ? 0x10Fu : 0x0F0u);
  }

  // Named barriers (0 is __syncthreads).
  static constexpr int kBarP0Ready = 1;   // WG0 -> WG1: row max m0, scale s0, P0 in smem
  static constexpr int kBarP1Ready = 2;   // WG1 -> WG0: row max m1, scale s1, P1 in smem
  static constexpr int kBarWg0 = 3;       // WG0 internal (after zeroing V rows)
  static constexpr int kBarWg1 = 4;       // WG1 internal
};

static_assert(WideTraits::kSmemBytesFp8 <= 227 * 1024, "shared memory plan too large");

// The narrow kernel (narrow.cuh): N = 16 or 32 query rows on wgmma's N.
template <int kRows_>
struct NarrowTraits : DenseTraits {
  static constexpr int kRows = kRows_;  // query rows per CTA: N of every wgmma
  static_assert(kRows == 16 || kRows == 32, "narrow kernel: N is 16 or 32");
  static constexpr int kAcc = kRows / 2;          // fp32 registers of one m64nNk16 accumulator
  static constexpr int kThreadRows = kRows / 4;   // query rows a thread holds (k = 2j + e below)
  static constexpr int kQTileBytes = kRows * kTileRowBytes;  // N rows x 64 bf16, swizzled
  static constexpr int kOStride = 260;  // floats per row of the merge area (256 columns): fragment
                                        // stores of the 4 column pairs of a quad hit distinct banks

  // Shared memory, offsets from a 1024-byte aligned base.
  static constexpr int kOffQ = 0;    // 9 Q tiles; in the epilogue, float[N][260] (merge area)
  static constexpr int kOffK = kOffQ + kNumKTiles * kQTileBytes;           // 2 page buffers
  static constexpr int kOffP = kOffK + 2 * kPageBytes;                     // 2 x P^T (N x 64)
  static constexpr int kOffRed = kOffP + 2 * kQTileBytes;                  // float[2][4][N]
  static constexpr int kOffSum = kOffRed + 2 * 4 * kRows * 4;              // float[2][4][N]
  static constexpr int kOffMax = kOffSum + 2 * 4 * kRows * 4;              // float[2][N]
  static constexpr int kOffFinal = kOffMax + 2 * kRows * 4;                // float[2][N]: m, l
  static constexpr int kOffBars = kOffFinal + 2 * kRows * 4;               // uint64[2][9]
  static constexpr int kOffStale = kOffBars + 2 * kNumKTiles * 8;          // int32: stale record
  static constexpr int kSmemBytes = kOffStale + 16 + 1024;
  // FP8 cache (fp8_cache.cuh): each group's 64 x 4 float scales after the rest.
  static constexpr int kOffFp8Scales = (kOffStale + 16 + 127) / 128 * 128;  // float[2][64][4]
  static constexpr int kSmemBytesFp8 = kOffFp8Scales + 2 * kFp8ScaleAreaBytes + 1024;
  static_assert(kSmemBytesFp8 <= 227 * 1024, "narrow kernel: shared memory plan too large");
  static_assert(kOffK % kSwizzleAtomBytes == 0 && kOffP % kSwizzleAtomBytes == 0,
                "swizzled tiles need 1 KiB");
  static_assert(kRows * kOStride * 4 <= kOffK - kOffQ, "merge area must fit in the Q tiles");

  // The named barrier of warpgroup w's four warps (0 is __syncthreads).
  JFM_HOST_DEVICE static constexpr int bar_group(int w) { return 1 + w; }
};

}  // namespace sm90
}  // namespace jax_flashmla
