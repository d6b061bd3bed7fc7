// The one shared-memory tile of the sm90 kernels: 64 rows x 64 bf16 columns, i.e. 64 rows of
// 128 bytes, stored with the 128-byte swizzle: 16-byte chunk c of row r sits at chunk position
// c ^ (r % 8) of its row. That is what TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and what a
// wgmma descriptor with layout type 1 (make_desc_sw128 in ptx.cuh) reads. Every tile of the
// kernels (KV pages, Q blocks, P, P^T) has this layout; a tile of N < 64 rows (the narrow
// kernel's Q and P^T tiles) is the same with N rows. The swizzle repeats every 8 rows (1 KiB),
// so tiles start at 1 KiB boundaries.
#pragma once

#include "kernels/params.h"  // JFM_HOST_DEVICE

namespace jax_flashmla {
namespace sm90 {

constexpr int kTileRows = 64;
constexpr int kTileCols = 64;                           // bf16 columns
constexpr int kTileRowBytes = kTileCols * 2;            // 128: the width of the swizzle
constexpr int kTileBytes = kTileRows * kTileRowBytes;   // 8 KiB
constexpr int kChunkBytes = 16;                         // the unit the swizzle permutes
constexpr int kSwizzleAtomBytes = 8 * kTileRowBytes;    // 1 KiB: 8 rows, the swizzle's period

// Byte offset, inside a tile, of 16-byte chunk `chunk` (0..7) of row `row`. (chunk % 8 rather
// than chunk: the same value, and the form the kernels' machine code was built from; with a bare
// argument the compiler orders the XOR's operands the other way.)
JFM_HOST_DEVICE constexpr int swizzled_offset(int row, int chunk) {
  return row * kTileRowBytes + (((chunk % 8) ^ (row % 8)) << 4);
}

// Strides of the wgmma descriptors of such tiles (make_desc_sw128(addr, lbo, sbo)), in bytes.
// K-major operand (a row holds 64 consecutive K elements): consecutive 8-row groups are
// kSwizzleAtomBytes apart (SBO); LBO is unused by the 128-byte swizzle (any value; 1 unit).
constexpr int kDescKMajorLbo = 16;
constexpr int kDescSbo = kSwizzleAtomBytes;
// MN-major operand (a tile read transposed, e.g. V: a row holds 64 consecutive MN elements,
// rows run along K): the next 64 MN elements are the next tile (LBO), 8-row K groups as above.
constexpr int kDescMnMajorLbo = kTileBytes;
// Where the next k16 step (16 bf16 of K) starts: 32 bytes along a K-major row, 16 rows further
// down an MN-major tile. desc_advance adds these (and whole tiles) to a descriptor.
constexpr int kKStepKMajor = 16 * 2;
constexpr int kKStepMnMajor = 16 * kTileRowBytes;

static_assert(kTileBytes == kTileRows * kTileRowBytes && kTileRowBytes == 128,
              "the 128-byte swizzle spans exactly one tile row");

}  // namespace sm90
}  // namespace jax_flashmla
