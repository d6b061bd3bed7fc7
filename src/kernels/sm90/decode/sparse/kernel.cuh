// The sm90 token-sparse decode kernel (DeepSeek-V3.2's sparse attention over the FP8 cache;
// params.h's SparseDecodeParams says what it computes and on which folded problem).
//
// One CTA of 384 threads per (64-head block, sm part), walking the (request, block range) chunks
// of its scheduler record, where a request is one query token and a "block" is 64 consecutive
// slots of its index list. Roles:
//   WG0, WG1  consumers: the wide dense kernel's seesaw (wide.cuh) on pairs of blocks, block a
//             in buffer 0 and block b in buffer 1: WG0 scores a and does O[:, :256], WG1 scores
//             b and does O[:, 256:], P passes through the buffers' tile 8, the running max
//             through shared memory. Heads past h_q (h_q not a multiple of 64) are zero Q rows
//             whose results are dropped.
//   WG2       producer (gather.cuh): fills each buffer with the dequantized rows of one block and
//             writes its validity mask; no MMA.
//
// Barriers between them: per buffer i a `full[i]` mbarrier (128 arrivals: every producer thread,
// after its writes and a proxy fence) and an `empty[i]` mbarrier (2 arrivals: one per consumer
// warpgroup, by its leader once all its warps have finished reading the buffer, where the wide
// kernel refills). Both sides walk the same sequence of fills: for each request of the record,
// for each pair (page, page + 1) of its chunk [pb, pe), block `page` into buffer 0 and, if
// page + 1 < pe, block page + 1 into buffer 1. Each side counts the fills of each buffer (n):
//   producer: fill n of buffer i waits empty[i] phase (n - 1) & 1 (none for n = 0), writes,
//             arrives on full[i] (phase n & 1 completes with the 128th arrival);
//   consumers: wait full[i] phase n & 1 before the first read of fill n (both warpgroups: the
//             one that does not score the block reads its V tiles too), arrive on empty[i]
//             after the last read, then n += 1.
// The producer can run at most one fill ahead per buffer (fill n + 1 needs release n, which
// needs both consumers past fill n), so a parity never names a phase two behind. Walk-through:
//   - one block (len <= 64): buffer 0 only; WG1 skips its QK^T and P.V of b, waits full[0] for
//     the V of a, and both release buffer 0; buffer 1's count does not move.
//   - an odd number of blocks: every pair but the last is as usual; the last is the one-block
//     case. The next request (or chunk) starts a new pair at buffer 0, on both sides alike.
//   - blocks with no valid key (all indices invalid, past the length, an empty request's
//     single block): filled (zeros) and consumed like any other: their mask is 0, every score
//     -inf, P = 0, the running max unchanged; phases move as for any block.
//   - a request split across parts: each CTA walks only its record's chunk [pb, pe) of it,
//     producer and consumers from the same record and req_lens, and writes the split partial.
#pragma once

#include "kernels/common/cta_timing.cuh"
#include "kernels/sm90/decode/dense/blocks.cuh"
#include "kernels/sm90/decode/dense/wide.cuh"
#include "kernels/sm90/decode/sparse/gather.cuh"
#include "kernels/sm90/decode/sparse/traits.h"

namespace jax_flashmla {
namespace sm90 {

// Scores of keys whose mask bit is 0 selected to -inf, then the row maxima (log2 domain), as
// mask_and_row_max. Fragment entry s[4k + j] / s[4k + 2 + j] is key 8k + 2 q4 + j.
__device__ __forceinline__ void mask_bits_and_row_max(float (&s)[32], float scale_log2,
                                                      uint64_t mask, int q4, float (&mx)[2]) {
  if (mask != ~0ull) {
    const uint64_t m = mask >> (2 * q4);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool keep = (m >> (8 * k + j)) & 1ull;
        s[4 * k + j] = keep ? s[4 * k + j] : -INFINITY;
        s[4 * k + 2 + j] = keep ? s[4 * k + 2 + j] : -INFINITY;
      }
    }
  }
  row_max(s, mx);
  mx[0] *= scale_log2;
  mx[1] *= scale_log2;
}

// Both consumer warpgroups (tid 0..255) start copying the 64 x 576 query block of request bi
// (heads m_block * 64 ..; zeros past q_rows) into sQ with cp.async, in load_q's layout: no
// registers held, where load_q's register staging would spill under kConsumerRegs. The caller
// runs cp_async_wait_all() and fence_proxy_async_smem() in the same threads, then a consumer
// barrier, before wgmma reads sQ.
__device__ __forceinline__ void load_q_async(const DecodeParams& p, uint32_t sQ, int bi,
                                             int m_block, int tid) {
  constexpr int kChunksPerRow = kHeadDimK / 8;  // 72 x 16 bytes
  constexpr int kIters = kBlockM * kChunksPerRow / SparseTraits::kConsumerThreads;  // 18
  static_assert(kBlockM * kChunksPerRow % SparseTraits::kConsumerThreads == 0, "");
  const uint16_t* q = static_cast<const uint16_t*>(p.q);
#pragma unroll 2
  for (int it = 0; it < kIters; ++it) {
    const int i = tid + it * SparseTraits::kConsumerThreads;
    const int row = i / kChunksPerRow;
    const int c = i % kChunksPerRow;
    const int r = m_block * kBlockM + row;
    const bool ok = r < p.q_rows;
    const uint16_t* src = ok ? q + (static_cast<size_t>(bi) * p.q_rows + r) * kHeadDimK + c * 8 : q;
    cp_async_16(sQ + (c / 8) * kTileBytes + swizzled_offset(row, c % 8), src, ok ? 16u : 0u);
  }
  cp_async_commit();
}

__device__ __forceinline__ uint64_t ld_shared_u64(uint32_t addr) {
  uint64_t v;
  asm volatile("ld.shared.u64 %0, [%1];\n" : "=l"(v) : "r"(addr) : "memory");
  return v;
}

// A consumer warpgroup is done reading a buffer: all four warps past their reads, then the
// leader's arrival.
__device__ __forceinline__ void release_buffer(bool leader, uint32_t empty, int group_bar) {
  named_bar_sync(group_bar, SparseTraits::kWarpgroupThreads);
  if (leader) mbar_arrive(empty);
}

__global__ void __launch_bounds__(SparseTraits::kThreads, 1)
    decode_sparse_fp8_kernel(const __grid_constant__ SparseDecodeParams sp) {
  using W = SparseTraits;
  using E = __nv_bfloat16;
  const DecodeParams& p = sp.base;
  JFM_CTA_TIMING();
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sQ = base + W::kOffQ;
  const uint32_t sK[2] = {base + W::kOffK0, base + W::kOffK1};
  const uint32_t s_mask = base + W::kOffMask;  // uint64 per buffer
  const uint32_t full[2] = {base + W::kOffBars + W::kBarFull,
                            base + W::kOffBars + W::kBarFull + 8};
  const uint32_t empty[2] = {base + W::kOffBars + W::kBarEmpty,
                             base + W::kOffBars + W::kBarEmpty + 8};
  float* s_row_max = reinterpret_cast<float*>(smem + W::kOffRowMax);
  float* s_scale0 = reinterpret_cast<float*>(smem + W::kOffScale0);
  float* s_scale1 = reinterpret_cast<float*>(smem + W::kOffScale1);
  float* s_row_sum = reinterpret_cast<float*>(smem + W::kOffRowSum);

  const int m_block = blockIdx.x;
  const int part = blockIdx.z;
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / W::kWarpgroupThreads, 0);
  const int tid_wg = threadIdx.x % W::kWarpgroupThreads;
  const int warp_wg = tid_wg / 32;
  const int lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      mbar_init(full[i], W::kFullArrivals);
      mbar_init(empty[i], W::kEmptyArrivals);
    }
    fence_mbar_init();
  }
  __syncthreads();  // the last CTA-wide barrier: the producer runs on its own from here
  pdl_wait_for_primary();
  const SchedRecord rec = p.sched[part];
  if (!(rec.begin_req < p.b && rec.begin_req >= 0)) return;
  const int last_req = min(rec.end_req, p.b - 1);

  // ================================ producer ================================
  if (wg == W::kProducerWg) {
    setmaxnreg_dec<W::kProducerRegs>();
    // Fills in the consumers' order: per request, per block of its chunk, buffer (page - pb) & 1.
    // Each lane's index is loaded two blocks ahead (cursor `ahead`), so it has landed when its
    // block's L2 prefetch (one block ahead) and its copies need it. One gather_block call site
    // with the buffer chosen at run time: inlined twice with constant buffers, ptxas keeps two
    // sets of per-thread shared addresses live, and 88 registers do not hold both.
    const int slot = warp_wg * 16 + (lane & 15);
    BlockCursor cur = cursor_from(sp, rec, rec.begin_req, last_req);
    const BlockCursor second = cursor_next(sp, rec, cur, last_req);
    BlockCursor ahead = cursor_next(sp, rec, second, last_req);
    int32_t id0 = slot_index(sp, cur, last_req, slot);
    int32_t id1 = slot_index(sp, second, last_req, slot);
    uint32_t fills0 = 0, fills1 = 0;
    while (cur.req <= last_req) {
      const int32_t id2 = slot_index(sp, ahead, last_req, slot);
      const uint32_t i = (cur.page - cur.pb) & 1;
      uint32_t n = i ? fills1 : fills0;
      gather_block(sp, id0, id1, sK[0] + i * W::kPageBytes, s_mask + 8 * i,
                   base + W::kOffGatherScales + i * W::kGatherScaleBytes, full[0] + 8 * i,
                   empty[0] + 8 * i, n, warp_wg, lane);
      fills0 = i ? fills0 : n;
      fills1 = i ? n : fills1;
      cur = cursor_next(sp, rec, cur, last_req);
      ahead = cursor_next(sp, rec, ahead, last_req);
      id0 = id1;
      id1 = id2;
    }
    return;
  }

  // ================================ consumers ===============================
  setmaxnreg_inc<W::kConsumerRegs>();
  const int r0 = warp_wg * 16 + lane / 4;  // this thread's rows: r0 and r0 + 8
  const int q4 = lane % 4;
  const bool leader = tid_wg == 0;
  const bool stale = stale_record(p, rec);

  uint32_t phase[2] = {0, 0};  // parity of each buffer's next fill
  bool q_prefetched = false;

  for (int req = rec.begin_req; req <= last_req; ++req) {
    const ReqCtx c = make_req(p, rec, req, m_block);

    if (!q_prefetched) load_q_async(p, sQ, c.bi, m_block, threadIdx.x);
    cp_async_wait_all();  // ours, or (WG1) those of the last pair's prefetch_q_async
    if (threadIdx.x < kBlockM) s_row_max[threadIdx.x] = W::kRowMaxInit;
    fence_proxy_async_smem();
    named_bar_sync(W::kBarConsumers, W::kConsumerThreads);

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float row_sum[2] = {0.f, 0.f};

    for (int page = c.pb; page < c.pe; page += 2) {
      const bool prefetch_next_q = page + 2 >= c.pe && req < last_req;
      const bool has_b = page + 1 < c.pe;
      float s[32];
      uint32_t a[16];
      if (wg == 0) {
        // ---------------- WG0: block a ----------------
        const float m_old[2] = {s_row_max[r0], s_row_max[r0 + 8]};
        float m_new[2], sc0[2], psum[2] = {0.f, 0.f};
        mbar_wait(full[0], phase[0]);
        const uint64_t mask = ld_shared_u64(s_mask);
        qk_page<E, 0, false>(s, sQ, sK[0], 0, 0);
        wgmma_wait<0>();
        reg_fence(s);
        float mx[2];
        mask_bits_and_row_max(s, p.scale_log2, mask, q4, mx);
        m_new[0] = lazy_max(m_old[0], mx[0]);
        m_new[1] = lazy_max(m_old[1], mx[1]);
        exp_rows(s, p.scale_log2, m_new, psum);
        pack_p<E>(s, a);
        store_p(sK[0] + W::kPTile * kTileBytes, a, r0, q4);
        fence_proxy_async_smem();
        sc0[0] = max_scale(m_old[0], m_new[0]);
        sc0[1] = max_scale(m_old[1], m_new[1]);
        publish_max(s_row_max, s_scale0, r0, q4, m_new, sc0, W::kBarP0Ready);

        row_sum[0] = row_sum[0] * sc0[0] + psum[0];
        row_sum[1] = row_sum[1] * sc0[1] + psum[1];
        rescale_o(o, sc0);
        reg_fence(o);
        pv_rs<E>(o, a, sK[0], 0);
        wgmma_wait<0>();
        reg_fence(o);
        release_buffer(leader, empty[0], W::kBarWg0);

        named_bar_sync(W::kBarP1Ready, W::kConsumerThreads);
        const float sc1[2] = {s_scale1[r0], s_scale1[r0 + 8]};
        row_sum[0] *= sc1[0];
        row_sum[1] *= sc1[1];
        if (has_b) {
          rescale_o(o, sc1);
          mbar_wait(full[1], phase[1]);  // WG1 saw it complete; this orders our reads after it
          reg_fence(o);
          pv_ss<E>(o, sK[1] + W::kPTile * kTileBytes, sK[1], 0);
          wgmma_wait<0>();
          reg_fence(o);
          release_buffer(leader, empty[1], W::kBarWg0);
        }
      } else {
        // ---------------- WG1: block b ----------------
        float mx[2] = {-INFINITY, -INFINITY};
        if (has_b) {
          mbar_wait(full[1], phase[1]);
          const uint64_t mask = ld_shared_u64(s_mask + 8);
          qk_page<E, 0, false>(s, sQ, sK[1], 0, 0);
          wgmma_wait<0>();
          reg_fence(s);
          mask_bits_and_row_max(s, p.scale_log2, mask, q4, mx);
        }
        named_bar_sync(W::kBarP0Ready, W::kConsumerThreads);
        const float m0[2] = {s_row_max[r0], s_row_max[r0 + 8]};
        const float sc0[2] = {s_scale0[r0], s_scale0[r0 + 8]};
        row_sum[0] *= sc0[0];
        row_sum[1] *= sc0[1];
        rescale_o(o, sc0);
        mbar_wait(full[0], phase[0]);
        reg_fence(o);
        pv_ss<E>(o, sK[0] + W::kPTile * kTileBytes, sK[0], 4);
        // softmax of block b while P_a V_a runs
        const float m1[2] = {lazy_max(m0[0], mx[0]), lazy_max(m0[1], mx[1])};
        const float sc1[2] = {max_scale(m0[0], m1[0]), max_scale(m0[1], m1[1])};
        float psum[2] = {0.f, 0.f};
        if (has_b) {
          exp_rows(s, p.scale_log2, m1, psum);
          pack_p<E>(s, a);
          store_p(sK[1] + W::kPTile * kTileBytes, a, r0, q4);
          fence_proxy_async_smem();
        }
        publish_max(s_row_max, s_scale1, r0, q4, m1, sc1, W::kBarP1Ready);
        wgmma_wait<0>();
        reg_fence(o);
        release_buffer(leader, empty[0], W::kBarWg1);
        row_sum[0] = row_sum[0] * sc1[0] + psum[0];
        row_sum[1] = row_sum[1] * sc1[1] + psum[1];
        if (has_b) {
          rescale_o(o, sc1);
          reg_fence(o);
          pv_rs<E>(o, a, sK[1], 4);
        }
        // Both QK^T of the request's last pair are done (WG0's before P0, ours before that):
        // start copying the next request's Q into sQ while the last P.V runs.
        if (prefetch_next_q) prefetch_q_async(p, sQ, req + 1, 0, m_block, tid_wg);
        if (has_b) {
          wgmma_wait<0>();
          reg_fence(o);
          release_buffer(leader, empty[1], W::kBarWg1);
        }
      }
      phase[0] ^= 1u;
      if (has_b) phase[1] ^= 1u;
    }

    if (req == last_req) pdl_launch_dependents();

    // ---------------- epilogue: both groups' row sums, this request's rows ----------------
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 1);
      row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);
    }
    if (q4 == 0) {
      s_row_sum[wg * kBlockM + r0] = row_sum[0];
      s_row_sum[wg * kBlockM + r0 + 8] = row_sum[1];
    }
    named_bar_sync(W::kBarConsumers, W::kConsumerThreads);

    const int split_begin = __ldg(p.num_splits + c.bi);
    const bool split = __ldg(p.num_splits + c.bi + 1) - split_begin > 1;
    const int64_t slot =
        static_cast<int64_t>(split_begin) + ((req == rec.begin_req) ? rec.begin_split : 0);
    const bool slot_ok = slot >= 0 && slot < static_cast<int64_t>(p.b) + p.num_sm_parts;
    const int col0 = wg * W::kVColsPerWarpgroup + 2 * q4;
    const int batch_row = c.bi / sp.s_q;
    const int token = c.bi - batch_row * sp.s_q;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r0 + 8 * i;
      const int head = m_block * kBlockM + r;  // g = h_q, one token per request: row = head
      const float l = s_row_sum[r] + s_row_sum[kBlockM + r];
      const float m = s_row_max[r];
      if (head < p.q_rows) {
        if (!split) {
          // The sink: out * exp(lse) / (exp(lse) + exp(sink)) = o / (l + 2^(sink log2 e - m)).
          const float sink2 = __ldg(sp.attn_sink + head) * 1.4426950408889634f;
          const float inv = stale ? NAN : (l > 0.f ? 1.f / (l + exp2f(sink2 - m)) : 0.f);
          E* out = static_cast<E*>(p.out) + (static_cast<size_t>(c.bi) * p.h_q + head) * kHeadDimV;
#pragma unroll
          for (int k = 0; k < 32; ++k) {
            const uint32_t v =
                ElemOps<E>::pack2(o[4 * k + 2 * i] * inv, o[4 * k + 2 * i + 1] * inv);
            *reinterpret_cast<uint32_t*>(out + col0 + 8 * k) = v;
          }
          if (wg == 0 && q4 == 0) {
            p.lse[(static_cast<size_t>(batch_row) * p.h_q + head) * sp.s_q + token] =
                stale ? NAN : (l > 0.f ? (m + __log2f(l)) * 0.69314718055994530942f : INFINITY);
          }
        } else if (slot_ok) {
          // Split: the partial as the dense kernels write it; the combine applies the sink.
          const float inv = stale ? NAN : (l > 0.f ? 1.f / l : 0.f);
          const size_t idx = static_cast<size_t>(slot) * p.q_rows + head;
          float* oacc = p.o_accum + idx * kHeadDimV;
#pragma unroll
          for (int k = 0; k < 32; ++k) {
            *reinterpret_cast<float2*>(oacc + col0 + 8 * k) =
                make_float2(o[4 * k + 2 * i] * inv, o[4 * k + 2 * i + 1] * inv);
          }
          if (wg == 0 && q4 == 0) {
            p.lse_accum[idx] = stale ? NAN : (l > 0.f ? m + __log2f(l) : -INFINITY);
          }
        }
      }
    }
    named_bar_sync(W::kBarConsumers, W::kConsumerThreads);  // sQ, row max, sums reused next
    q_prefetched = c.pb < c.pe && req < last_req;
  }
}

}  // namespace sm90
}  // namespace jax_flashmla
