// Tile shapes and the shared-memory plan of the wide sm90 dense decode kernel, in one place.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace jax_flashmla {
namespace sm90 {

struct WideTraits {
  static constexpr int kThreads = 256;        // two consumer warpgroups, no producer warpgroup
  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kVColsPerWarpgroup = kHeadDimV / 2;  // each warpgroup owns 256 output columns

  // A "tile" is 64 rows x 64 bf16 columns = 64 rows of 128 bytes, stored with the 128-byte swizzle
  // (16-byte chunk index XOR row % 8), which is what TMA writes and what wgmma descriptors read.
  static constexpr int kTileCols = 64;
  static constexpr int kTileBytes = 64 * 128;
  static constexpr int kNumKTiles = kHeadDimK / kTileCols;  // 9: a K page / the Q block
  static constexpr int kNumVTiles = kHeadDimV / kTileCols;  // 8: V = the first 8 K tiles
  static constexpr int kPageBytes = kNumKTiles * kTileBytes;  // 72 KiB

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

  static constexpr float kRowMaxInit = -1e30f;  // finite, so exp2(m_old - m_new) is never NaN
  // The running row max moves only when a page's max exceeds it by more than this (log2 domain),
  // so P = 2^(S - m) stays at most 2^8: exact enough in bf16, far from overflow in fp32.
  static constexpr float kMaxSlack = 8.f;
};

static_assert(WideTraits::kSmemBytes <= 227 * 1024, "shared memory plan too large");
static_assert(kBlockM == 64 && kPageSize == 64, "the kernel is written for 64-row tiles");

}  // namespace sm90
}  // namespace jax_flashmla
