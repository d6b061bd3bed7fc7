// Plain structs that cross from the FFI handlers (host) to the kernels (device).
//
// Layout contract (all row-major, contiguous):
//   q            [b, s_q, h_q, 576]          E
//   k_cache      [num_blocks, 64, h_kv, 576] E      (V is columns 0..511 of the same rows)
//                or, in the FP8 format (CacheFormat::kFp8), [num_blocks, 64, h_kv, 656] bytes,
//                rows laid out as described at kFp8RowBytes below; then E is bf16
//   block_table  [b, max_blocks]             int32
//   seqlens      [b]                         int32
//   sched        [num_sm_parts]              SchedRecord (8 int32 each)
//   num_splits   [b + 1]                     int32  exclusive prefix sum of splits per request
//   out          [b, s_q, h_q, 512]          E
//   lse          [b, h_q, s_q]               float32, natural log, +inf for empty rows
//   lse_accum    [b + num_sm_parts, h_kv, q_rows]       float32, log2 domain, -inf if empty
//   o_accum      [b + num_sm_parts, h_kv, q_rows, 512]  float32, already divided by the row sum
// E, the element type, is bf16 or f16 (DecodeParams::elem_type), the same for q, k_cache and out.
//
// Heads sharing one KV head are folded with the query tokens into "query rows":
//   g = h_q / h_kv, q_rows = s_q * g, row r = s * g + j  <->  (token s, head hk * g + j).
// Rows are tiled by kBlockM; the grid is (num_m_blocks, h_kv, num_sm_parts).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JFM_HOST_DEVICE __host__ __device__
#else
#define JFM_HOST_DEVICE
#endif

namespace jax_flashmla {

constexpr int kHeadDimK = 576;   // 512 latent + 64 RoPE
constexpr int kHeadDimV = 512;   // V = first 512 columns of K
constexpr int kPageSize = 64;    // tokens per KV page; also the N tile of the kernels
constexpr int kBlockM = 64;      // query rows per CTA (the wgmma M)
constexpr int kFixedOverheadBlocks = 5;  // scheduler's per-request cost, in pages
constexpr int kMaxSplits = 160;  // combine handles up to this many splits of one request

// The FP8 cache row (DeepSeek-V3.2's layout, as FlashMLA's sparse decode reads it), per token and
// kv head: bytes [0, 512) the 512 latent values as float8_e4m3fn, in four tiles of 128 columns;
// [512, 528) four float32 scales, one per tile (powers of two, so value = fp8 * scale is exact in
// bf16); [528, 656) the 64 RoPE columns as bf16, not quantized.
constexpr int kFp8RowBytes = 656;
constexpr int kFp8ScaleOffset = 512;
constexpr int kFp8RopeOffset = 528;
constexpr int kFp8TileCols = 128;
constexpr int kFp8NumScales = kHeadDimV / kFp8TileCols;  // 4

// One CTA's ("sm part's") share of the work, written by the scheduler kernel.
// The part covers requests begin_req..end_req (inclusive). Its pages are
//   begin_req: [begin_block, begin_req == end_req ? end_block : pages(begin_req))
//   middle   : [0, pages(req))
//   end_req  : [0, end_block)
// where pages(i) = max(ceil(len_i / 64), 1) counts a zero-length row as one (empty) page.
// A part with no work has begin_req >= b. The chunk of begin_req is split number
// begin_split of that request; chunks of the other requests are split number 0.
// len_fingerprint: the lengths the part was scheduled for (len_fingerprint_term below); 0 in a
// part with no work. pad is 0.
struct SchedRecord {
  int32_t begin_req;
  int32_t begin_block;
  int32_t end_req;
  int32_t end_block;
  int32_t begin_split;
  int32_t len_fingerprint;
  int32_t pad[2];
};
static_assert(sizeof(SchedRecord) == 8 * sizeof(int32_t), "records are [num_sm_parts, 8] int32");

// A record's len_fingerprint is the sum over its requests i in [begin_req, end_req] of
// len_fingerprint_term(seqlens[i], i), in wrapping uint32 arithmetic, stored as the int32 with the
// same bits; len_i is the raw length the scheduler read (not clamped). Records are computed once
// per step and reused by every layer, so records made for other lengths (another step's, another
// batch's) are an easy mistake, and the kernels would silently compute wrong rows from them. So
// each decode CTA recomputes the sum from the call's seqlens over the requests it walks,
// [begin_req, min(end_req, b - 1)], and if it differs writes NaN into every row it writes: out
// and lse of unsplit requests, lse_accum and o_accum of split ones (the combine turns a NaN
// partial into a NaN row), empty rows included. The odd weights 2i + 1 make the sum depend on
// which request has which length (swapping the lengths of requests i and j changes it by
// 2 (len_i - len_j)(i - j), not 0 unless that product of differences is a multiple of 2^31); the
// + 1 makes a zero length count.
JFM_HOST_DEVICE inline uint32_t len_fingerprint_term(int32_t len, int32_t i) {
  return (static_cast<uint32_t>(len) + 1u) * (2u * static_cast<uint32_t>(i) + 1u);
}

struct SchedParams {
  const int32_t* seqlens;   // [b]
  SchedRecord* sched;       // [num_sm_parts]
  int32_t* num_splits;      // [b + 1]
  int b;
  int max_blocks;           // block-table columns: lengths are clamped to max_blocks * 64
  int num_sm_parts;
};

// The element type of q, k_cache and out. The kernels are instantiated for each; what differs is
// the wgmma operand type, the rounding of P and of the output, and the TMA descriptor's type.
enum class ElemType : uint8_t { kBF16 = 0, kF16 = 1 };

// The layout of k_cache's rows: 576 elements of elem_type, or the 656-byte FP8 row above (read
// with elem_type bf16: the kernels dequantize it into bf16 tiles and run the bf16 path).
enum class CacheFormat : uint8_t { kRows = 0, kFp8 = 1 };

struct DecodeParams {
  const void* q;            // elem_type
  const void* k_cache;      // elem_type rows, or FP8 rows (cache_format)
  const int32_t* block_table;
  const int32_t* seqlens;
  const SchedRecord* sched;
  const int32_t* num_splits;
  void* out;                // elem_type
  float* lse;
  float* lse_accum;
  float* o_accum;

  int b, s_q, h_q, h_kv;
  int g;                    // h_q / h_kv
  int q_rows;               // s_q * g
  int num_m_blocks;         // ceil(q_rows / kBlockM)
  int num_blocks;           // pages in k_cache
  int max_blocks;           // block_table columns
  int num_sm_parts;
  float scale;              // softmax scale
  float scale_log2;         // scale * log2(e)
  bool causal;
  ElemType elem_type;       // one byte, in what was the tail padding: no offset moved
  CacheFormat cache_format; // likewise
};

// The token-sparse decode over an FP8 cache (DeepSeek-V3.2; jax_flashmla/sparse.py), which
// reuses the dense machinery on a *folded* problem. Query token s of batch row i is request
// r = i * s_q + s, whose keys are the cache rows indices[i, s, j] for the index slots
// j < req_lens[r] (the caller passes clip(topk_length[i], 0, topk)); a block of 64 index slots
// plays the part of a page. `base` describes that folded problem: b = batch * s_q requests,
// s_q = 1, h_kv = 1, g = q_rows = h_q, seqlens = req_lens, max_blocks = ceil(topk / 64),
// num_blocks and block_table unused, cache_format kFp8. q [b, s_q, h_q, 576] and
// out [b, s_q, h_q, 512] are the same memory as [b * s_q, 1, h_q, .], so their indexing, the
// scheduler records and the split partials are the dense ones; only lse [b, h_q, s_q] is indexed
// with the real s_q.
//   indices    [batch, s_q, topk]  int32: token slots page * block_size + offset
//   attn_sink  [h_q]               float32, natural-log logits, -inf = no sink
// Value rules: a slot at or past min(req_lens[r], topk) or an index outside [0, num_tokens) is no
// key (its row is never read); duplicates are keys as often as they appear; a row with no key
// gets out = 0 and lse = +inf. The sink scales out by exp(lse) / (exp(lse) + exp(sink)) and
// leaves lse alone.
struct SparseDecodeParams {
  DecodeParams base;
  const int32_t* indices;
  const float* attn_sink;
  int topk;
  int s_q;                  // query tokens per batch row (base.s_q is 1)
  int32_t num_tokens;       // num_blocks * block_size: rows of the cache
};

// Run-time value rules shared by every kernel and by the pure-JAX reference, so that values no
// trace can check never fault and never leak between rows:
//  - a length is clamped to [0, max_blocks * 64];
//  - a page id outside [0, num_blocks) is never dereferenced: its 64 keys are masked;
//  - with causal and s_q > 1, row token s sees keys [0, len - s_q + s]; a row that sees no key
//    gets out = 0 and lse = +inf.
JFM_HOST_DEVICE inline int effective_len(int len, int max_blocks) {
  const int cap = max_blocks * kPageSize;
  return len < 0 ? 0 : (len > cap ? cap : len);
}

// Scheduler cost of request i in pages: max(ceil(max(len, 0) / 64), 1), capped at
// INT32_MAX / b - kFixedOverheadBlocks so that the total over the batch fits in int32 whatever
// lengths arrive. The cap never truncates real work: the decode call requires
// b * (max_blocks + 5) < 2^31, and effective lengths never exceed max_blocks pages.
// Totals: payload = ceil(total / parts) + kFixedOverheadBlocks, computed as
// total / parts + (total % parts != 0) so nothing overflows.
JFM_HOST_DEVICE inline int sched_cost_pages(int len, int b) {
  const int pages = len <= 0 ? 1 : len / kPageSize + (len % kPageSize != 0);
  const int cap = 2147483647 / b - kFixedOverheadBlocks;
  return pages < cap ? pages : cap;
}

}  // namespace jax_flashmla
