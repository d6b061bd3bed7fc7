// The plan of the sm90 token-sparse decode kernel (kernel.cuh): threads, registers, shared
// memory, barriers. The tiles are the dense kernels' (a 64-slot block of a request's index list is
// laid out exactly like a dense page: 9 swizzled 64x64 bf16 tiles), so the wgmma code is theirs.
#pragma once

#include <cstdint>

#include "kernels/params.h"
#include "kernels/sm90/decode/dense/traits.h"
#include "kernels/sm90/tile_geometry.h"

namespace jax_flashmla {
namespace sm90 {

struct SparseTraits : DenseTraits {
  // WG0 and WG1 are the wide kernel's two consumers (seesaw over pairs of blocks); WG2 gathers.
  static constexpr int kConsumerThreads = 2 * kWarpgroupThreads;  // 256
  static constexpr int kThreads = 3 * kWarpgroupThreads;          // 384
  static constexpr int kProducerWg = 2;

  // Registers after setmaxnreg. A warpgroup's 128 threads share 65536 / 128 = 512 per thread
  // slot across the three groups, less a granule the allocator keeps: 2 * consumer + producer
  // <= 504. The kernel starts at 65536 / 384 rounded down to a multiple of 8 (168). Measured
  // with ptxas (CUDA 13.0): the consumers need no spill from 208 up; at 224 / 56 and 216 / 72 the
  // producer spills its loop state. At 88 the producer (gather.cuh: no loaded bytes held in
  // registers, its shared addresses as 6 per-lane offsets, gather_block at one call site in
  // kernel.cuh; written the obvious way ptxas hoists ~40 address values per buffer and spills
  // 56-64 bytes) spills one register, in the last quarter's two-factor dequant path, taken only
  // for scales >= 2^8 or non-finite ones.
  static constexpr int kConsumerRegs = 208;
  static constexpr int kProducerRegs = 88;
  static_assert(2 * kConsumerRegs + kProducerRegs <= 504, "register budget of a 384-thread CTA");
  static_assert(kConsumerRegs % 8 == 0 && kProducerRegs % 8 == 0, "setmaxnreg takes multiples of 8");

  static constexpr int kVColsPerWarpgroup = kHeadDimV / 2;
  static constexpr int kPTile = 8;  // P of a block overwrites its RoPE tile, as in the wide kernel

  // Shared memory, offsets from a 1024-byte aligned base.
  static constexpr int kOffQ = 0;                              // 9 Q tiles
  static constexpr int kOffK0 = kOffQ + kPageBytes;            // block buffer 0 (9 tiles)
  static constexpr int kOffK1 = kOffK0 + kPageBytes;           // block buffer 1
  static constexpr int kOffRowMax = kOffK1 + kPageBytes;       // float[64]
  static constexpr int kOffScale0 = kOffRowMax + 256;          // float[64]
  static constexpr int kOffScale1 = kOffScale0 + 256;          // float[64]
  static constexpr int kOffRowSum = kOffScale1 + 256;          // float[2][64]
  static constexpr int kOffMask = kOffRowSum + 512;            // uint64[2]: valid keys per buffer
  static constexpr int kOffBars = kOffMask + 16;               // uint64[4]: full[2], empty[2]
  // Per buffer, the 64 gathered rows' scales (16 bytes each), staged by the producer's cp.async
  // (gather.cuh, staged path) and read only by it; released with the buffer.
  static constexpr int kGatherScaleBytes = kPageSize * 16;
  static constexpr int kOffGatherScales = kOffBars + 4 * 8;   // 2 x 1 KiB
  static constexpr int kSmemUsed = kOffGatherScales + 2 * kGatherScaleBytes;
  static constexpr int kSmemBytes = kSmemUsed + 1024;          // slack to align the base

  // mbarriers (offsets from kOffBars).
  static constexpr int kBarFull = 0;    // + 8 * buffer: the block is in the buffer (128 arrivals)
  static constexpr int kBarEmpty = 16;  // + 8 * buffer: both consumers are done with it (2)
  static constexpr int kFullArrivals = kWarpgroupThreads;
  static constexpr int kEmptyArrivals = 2;

  // Named barriers (0 is __syncthreads, used only before the roles split).
  static constexpr int kBarP0Ready = 1;    // WG0 -> WG1, as WideTraits
  static constexpr int kBarP1Ready = 2;    // WG1 -> WG0
  static constexpr int kBarWg0 = 3;
  static constexpr int kBarWg1 = 4;
  static constexpr int kBarConsumers = 5;  // WG0 + WG1 (256): the wide kernel's __syncthreads
};

static_assert(SparseTraits::kSmemBytes <= 227 * 1024, "sparse kernel: shared memory plan too large");
static_assert(SparseTraits::kOffK0 % kSwizzleAtomBytes == 0 &&
                  SparseTraits::kOffK1 % kSwizzleAtomBytes == 0,
              "swizzled tiles need 1 KiB alignment");
static_assert(SparseTraits::kOffBars % 8 == 0 && SparseTraits::kOffMask % 8 == 0, "");
static_assert(SparseTraits::kOffGatherScales % 16 == 0, "cp.async needs 16-byte aligned targets");

}  // namespace sm90
}  // namespace jax_flashmla
