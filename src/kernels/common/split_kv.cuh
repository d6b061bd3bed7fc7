// What a CTA of a split-KV decode kernel makes of its SchedRecord, whatever the kernel family:
// each (request, page range) chunk as the CTA's query rows see it, and per page of the paged
// cache whether it is read, whether some of its keys are masked, and how many are valid. These
// are params.h's value rules (lengths clamped, page ids outside the cache never dereferenced,
// causal visibility) on the device. Device-only; include from .cu files.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace jax_flashmla {

// One request's chunk as seen by this CTA's m block.
struct ReqCtx {
  int bi;        // request index
  int len;       // effective length
  int vis_min;   // keys visible to the m block's first row (the smallest)
  int vis_req;   // keys visible to the request's last row (the largest over all m blocks):
                 // the load decision uses it
  int pb, pe;    // page range [pb, pe) of this chunk
};

struct PageInfo {
  int kv_id;       // physical page
  bool loaded;     // fetched and used (valid id, some key visible)
  bool need_mask;  // some (row, key) of the page is masked
  int n_valid;     // keys of the page below the length (the slots past it may hold NaN)
};

__device__ __forceinline__ int visible_keys(const DecodeParams& p, int len, int row) {
  // Row r = s * g + j belongs to query token s; causal rows see keys [0, len - s_q + s].
  int vis = len;
  if (p.causal) {
    const int s = row / p.g;
    vis = min(len, len - p.s_q + s + 1);
  }
  return max(vis, 0);
}

__device__ __forceinline__ ReqCtx make_req(const DecodeParams& p, const SchedRecord& rec, int req,
                                           int m_block) {
  ReqCtx c;
  c.bi = req;
  c.len = effective_len(__ldg(p.seqlens + req), p.max_blocks);
  c.vis_min = visible_keys(p, c.len, m_block * kBlockM);
  c.vis_req = visible_keys(p, c.len, p.q_rows - 1);
  // The scheduler charges unclamped lengths, so its page ranges may reach past the effective
  // length: clamp them (pages there would be fully masked anyway).
  const int pages = max((c.len + kPageSize - 1) / kPageSize, 1);
  c.pb = (req == rec.begin_req) ? min(max(rec.begin_block, 0), pages) : 0;
  c.pe = (req == rec.end_req) ? min(rec.end_block, pages) : pages;
  return c;
}

__device__ __forceinline__ PageInfo make_page(const DecodeParams& p, const ReqCtx& c, int page) {
  PageInfo pi;
  pi.kv_id = -1;
  if (page >= 0 && page < c.pe && page < p.max_blocks) {
    pi.kv_id = __ldg(p.block_table + static_cast<size_t>(c.bi) * p.max_blocks + page);
  }
  const int start = page * kPageSize;
  pi.loaded = page >= 0 && page < c.pe && pi.kv_id >= 0 && pi.kv_id < p.num_blocks &&
              start < c.vis_req;
  pi.need_mask = start + kPageSize > c.vis_min;
  pi.n_valid = min(kPageSize, c.len - start);
  return pi;
}

// Whether the record was scheduled for other lengths than this call's: its len_fingerprint
// against the one recomputed from seqlens over the requests the CTA walks (params.h). If so, the
// CTA writes NaN into every row it writes. Each warp computes it for itself (no barrier), its
// lanes taking the requests 32 at a time; the result is the same in every thread. Call it with
// the whole warp, on a record whose begin_req is in [0, b).
__device__ __forceinline__ bool stale_record(const DecodeParams& p, const SchedRecord& rec) {
  const int last = min(rec.end_req, p.b - 1);
  uint32_t sum = 0;
#pragma unroll 1  // one trip unless the part holds more than 32 requests
  for (int i = rec.begin_req + static_cast<int>(threadIdx.x % 32); i <= last; i += 32) {
    sum += len_fingerprint_term(__ldg(p.seqlens + i), i);
  }
  return __reduce_add_sync(0xffffffffu, sum) != static_cast<uint32_t>(rec.len_fingerprint);
}

// The first non-empty chunk at or after request `req`; returns false if none.
__device__ __forceinline__ bool first_chunk_from(const DecodeParams& p, const SchedRecord& rec,
                                                 int m_block, int req, ReqCtx& out) {
  const int last = min(rec.end_req, p.b - 1);
  for (int r = req; r <= last; ++r) {
    ReqCtx c = make_req(p, rec, r, m_block);
    if (c.pb < c.pe) {
      out = c;
      return true;
    }
  }
  return false;
}

}  // namespace jax_flashmla
