// Split-KV tile scheduler: packs (request, page range) chunks onto num_sm_parts CTAs so each gets
// about the same number of pages, charging kFixedOverheadBlocks extra pages per chunk for its
// prologue/epilogue so that many short requests are not piled onto one CTA.
//
// One warp does everything on the device (no host sync, so it can be captured in a CUDA graph):
//   1. total = sum over requests of (pages_i + overhead), a warp reduction;
//   2. payload = ceil(total / P) + overhead pages per part;
//   3. a greedy walk over requests in order fills part after part. The walk is sequential by
//      nature, so all 32 lanes run it in lockstep on the same values (lengths are loaded 32 at a
//      time, coalesced, and broadcast with shuffles); lane 0 does the stores. Each record's
//      len_fingerprint (params.h) is summed on the way, as requests join its part.
#include <cstdint>

#include "kernels/common/launch_utils.h"
#include "kernels/launch.h"
#include "kernels/params.h"

namespace jax_flashmla {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Pages the scheduler charges for a request: sched_cost_pages (params.h), the same rule as the
// pure-JAX reference, so both produce identical records. Lengths are not clamped to the block
// table's capacity here (the scheduler does not see it; the decode kernel clamps when it reads
// pages), and the sums are int64 anyway so no length can overflow them.
__device__ __forceinline__ int64_t sched_pages(int32_t len, int b) {
  return sched_cost_pages(len, b);
}

__device__ __forceinline__ int64_t warp_sum_i64(int64_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ void store_record(SchedRecord* dst, int begin_req, int begin_block,
                                             int end_req, int end_block, int begin_split,
                                             uint32_t len_fingerprint) {
  dst->begin_req = begin_req;
  dst->begin_block = begin_block;
  dst->end_req = end_req;
  dst->end_block = end_block;
  dst->begin_split = begin_split;
  dst->len_fingerprint = static_cast<int32_t>(len_fingerprint);
  dst->pad[0] = dst->pad[1] = 0;
}

__global__ void __launch_bounds__(kWarpSize, 1) sched_kernel(const SchedParams params) {
  const int lane = threadIdx.x;
  const int b = params.b;
  const int num_parts = params.num_sm_parts;
  const int64_t overhead = kFixedOverheadBlocks;

  int64_t lane_total = 0;
  for (int i = lane; i < b; i += kWarpSize) {
    lane_total += sched_pages(params.seqlens[i], b) + overhead;
  }
  const int64_t total = warp_sum_i64(lane_total);
  const int64_t payload = (total + num_parts - 1) / num_parts + overhead;

  // Walk state; identical in every lane.
  int part = 0;              // part being filled
  bool part_open = false;    // has `part` taken anything yet?
  int64_t remaining = 0;     // budget left in `part`, in pages (overheads included)
  int rec_begin_req = 0, rec_begin_block = 0, rec_begin_split = 0;
  int rec_end_req = 0, rec_end_block = 0;
  uint32_t rec_fingerprint = 0;  // of requests rec_begin_req..rec_end_req
  int32_t splits_prefix = 0;     // splits of all requests finished so far

  if (lane == 0) params.num_splits[0] = 0;

  for (int base = 0; base < b; base += kWarpSize) {
    const int lane_req = base + lane;
    const int32_t lane_len = lane_req < b ? params.seqlens[lane_req] : 0;
    const int64_t lane_pages = lane_req < b ? sched_pages(lane_len, b) : 0;
    const uint32_t lane_term = len_fingerprint_term(lane_len, lane_req);
    const int count = min(kWarpSize, b - base);
    for (int j = 0; j < count; ++j) {
      const int req = base + j;
      const int64_t pages = __shfl_sync(kFullMask, lane_pages, j);
      const uint32_t term = __shfl_sync(kFullMask, lane_term, j);
      int64_t done = 0;  // pages of `req` already given to earlier parts
      int split = 0;     // split index of req's next chunk
      while (true) {
        if (!part_open) {
          part_open = true;
          remaining = payload;
          rec_begin_req = req;
          rec_begin_block = static_cast<int>(done);
          rec_begin_split = split;
          rec_fingerprint = 0;
        }
        const int64_t left = pages - done;
        // The last part takes whatever is left, so every page is scheduled exactly once.
        if (part == num_parts - 1 || remaining >= left + overhead) {
          remaining -= left + overhead;
          rec_end_req = req;
          rec_end_block = static_cast<int>(pages);
          rec_fingerprint += term;  // (a part meets each request once: it joins here or below)
          break;  // req finished inside this part; the part stays open for the next request
        }
        // req does not fit: take what the budget allows (if anything beyond the overhead), close
        // the part, and let req continue as its next split in the next part. A freshly opened
        // part always takes >= 1 page (payload > overhead), so this loop always progresses.
        const int64_t take = remaining - overhead;
        if (take > 0) {
          done += take;
          rec_end_req = req;
          rec_end_block = static_cast<int>(done);
          rec_fingerprint += term;
          ++split;
        }
        if (lane == 0) {
          store_record(&params.sched[part], rec_begin_req, rec_begin_block, rec_end_req,
                       rec_end_block, rec_begin_split, rec_fingerprint);
        }
        ++part;
        part_open = false;
      }
      splits_prefix += split + 1;
      if (lane == 0) params.num_splits[req + 1] = splits_prefix;
    }
  }
  if (part_open) {
    if (lane == 0) {
      store_record(&params.sched[part], rec_begin_req, rec_begin_block, rec_end_req,
                   rec_end_block, rec_begin_split, rec_fingerprint);
    }
    ++part;
  }
  // Parts left without work start past the last request, so the decode kernel skips them.
  for (int p = part + lane; p < num_parts; p += kWarpSize) {
    store_record(&params.sched[p], b, 0, 0, 0, 0, 0);
  }
}

}  // namespace

cudaError_t launch_sched(const SchedParams& params, cudaStream_t stream) {
  if (params.num_sm_parts <= 0 || params.b < 0) return cudaErrorInvalidValue;
  LaunchShape shape;
  shape.grid = dim3(1);
  shape.block = dim3(kWarpSize);
  return launch_kernel<sched_kernel>(shape, /*programmatic_dependent=*/false, stream, params);
}

}  // namespace jax_flashmla
