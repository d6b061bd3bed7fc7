// The wide sm90 dense decode kernel: TMA-fed, wgmma-based, two consumer warpgroups, query rows
// on wgmma's M (64 per CTA). Shapes with at most 32 query rows per kv head run narrow.cuh.
//
// One CTA per (m block, kv head, sm part) walks the (request, page range) chunks of its
// SchedRecord. Pages are consumed in pairs: page a sits in buffer 0, page b in buffer 1.
// Warpgroup 0 (WG0) owns output columns 0..255 and computes S_a = Q K_a^T; warpgroup 1 (WG1)
// owns columns 256..511 and computes S_b = Q K_b^T. Both need both P tiles, so P is passed
// through shared memory, and both must rescale their half of O by the same running row max, which
// lives in shared memory. Per pair (log2 domain, m = running max before the pair):
//
//   WG0: m0 = max(m, rowmax S_a), s0 = 2^(m - m0), P_a = 2^(S_a - m0)         -> smem, arrive P0
//        O_L = O_L * s0 + P_a V_a[:, :256]            (P_a from registers)
//   WG1: (sync P0)  O_R = O_R * s0 + P_a V_a[:, 256:]  (P_a from smem; runs while WG1 does:)
//        m1 = max(m0, rowmax S_b), s1 = 2^(m0 - m1), P_b = 2^(S_b - m1)        -> smem, arrive P1
//        O_R = O_R * s1 + P_b V_b[:, 256:]            (P_b from registers)
//   WG0: (sync P1)  O_L = O_L * s1 + P_b V_b[:, :256]  (P_b from smem)
//
// so each warpgroup does one 64x64x576 QK^T and two 64x256x64 P.V per pair, and one group's
// softmax runs on the CUDA cores while the other's wgmmas run (the "seesaw" idea of FlashMLA's
// 2025 Hopper kernel, see docs/20250422-new-kernel-deep-dive.md there). Each warpgroup keeps its
// own partial row sum; they are added in the epilogue.
//
// The running max is lazy (lazy_max): it moves only when a page's max passes it by a factor
// over 2^8, so on most pairs s0 = s1 = 1 and the O rescales are skipped (P may reach 2^8).
//
// Buffer reuse. Each K page is 9 TMA tiles of 64x64, each tile on its own mbarrier. V is tiles
// 0..7 read MN-major; tile 8 (RoPE) is free once the page's QK^T is done and holds that page's P.
// A tile is refilled (with the next pair's page) by the warpgroup that reads it last:
//   buffer 0: tiles 0..3 by WG0 after O_L += P_a V_a; tiles 4..8 by WG1 after O_R += P_a V_a
//   buffer 1: tiles 0..3, 8 by WG0 after O_L += P_b V_b; tiles 4..7 by WG1 after O_R += P_b V_b
// Pages of the next pair may belong to the next request of the chunk list, so loads run ahead
// across request boundaries.
//
// Masking: a page is loaded only if its id is in [0, num_blocks) and some row of the m block can
// see one of its keys; otherwise it is skipped by both groups (P = 0). Scores are masked (selected
// to -inf) only on pages that reach past the first row's visible length; V rows past the length
// are zeroed in shared memory before P.V (unused cache slots may hold NaN, and 0 * NaN = NaN).
#pragma once

#include "kernels/common/cta_timing.cuh"
#include "kernels/sm90/decode/dense/blocks.cuh"

namespace jax_flashmla {
namespace sm90 {

// ------------------------------------------------------------------ the kernel

// Run by a whole warpgroup once all its warps have finished with tile group (buffer, warpgroup)
// of the current pair: the leader starts the next page's tiles of it (FP8: its loads of them,
// fp8_cache.cuh).
template <class Maps>
__device__ __forceinline__ void refill(bool leader, const Maps* maps, uint32_t s_buf,
                                       uint32_t s_scales, uint32_t bars, const PageInfo& next,
                                       int hk, uint32_t mask, uint64_t policy) {
  if (leader) load_group(maps, s_buf, s_scales, bars, next, hk, mask, policy);
}

// Hands this group's new running row max m and the scale sc that moved its sums onto it to the
// other warpgroup through shared memory (lane 0 of each quad: the quad shares its two rows),
// then signals `bar`.
__device__ __forceinline__ void publish_max(float* s_row_max, float* s_scale, int r0, int q4,
                                            const float (&m)[2], const float (&sc)[2], int bar) {
  __syncwarp();  // the quad's other lanes have read the row max we overwrite
  if (q4 == 0) {
    s_row_max[r0] = m[0];
    s_row_max[r0 + 8] = m[1];
    s_scale[r0] = sc[0];
    s_scale[r0 + 8] = sc[1];
  }
  named_bar_arrive(bar, WideTraits::kThreads);
}

// O[:, half] += P V[:, half] for the group's own page, with P from registers (a): O first moved
// to the new row max (scales sc), V rows past the length zeroed in tiles [tile0, tile0 + 4).
template <class E>
__device__ __forceinline__ void pv_own_page(float (&o)[128], const float (&sc)[2],
                                            const uint32_t (&a)[16], uint32_t s_buf, int tile0,
                                            int n_valid, int tid_wg, int group_bar) {
  rescale_o(o, sc);
  zero_tail_v_rows(s_buf, tile0, n_valid, tid_wg, group_bar);
  reg_fence(o);
  pv_rs<E>(o, a, s_buf, tile0);
}

// O[:, half] += P V[:, half] for the page the other warpgroup scored, with its P from the
// buffer's P tile: this group's O is first moved to the new row max (scales sc), then its V
// tiles [tile0, tile0 + 4) of the page are awaited (FP8: the other group dequantized them before
// it published P) and rows past the length zeroed.
template <class E, bool kWait>
__device__ __forceinline__ void pv_other_page(float (&o)[128], const float (&sc)[2],
                                              uint32_t s_buf, uint32_t bars, uint32_t phase,
                                              int tile0, int n_valid, int tid_wg, int group_bar) {
  rescale_o(o, sc);
  if (kWait) {
    for (int t = tile0; t < tile0 + 4; ++t) mbar_wait(bars + 8 * t, phase);
  }
  zero_tail_v_rows(s_buf, tile0, n_valid, tid_wg, group_bar);
  reg_fence(o);
  pv_ss<E>(o, s_buf + WideTraits::kPTile * kTileBytes, s_buf, tile0);
}

// E: the element type of q, k_cache and out (__nv_bfloat16 or __half). Maps: CUtensorMap for a
// cache of E rows, Fp8TensorMaps for the FP8 cache (E = bf16; fp8_cache.cuh).
template <class E, class Maps = CUtensorMap>
__global__ void __launch_bounds__(WideTraits::kThreads, 1)
    decode_wide_kernel(const __grid_constant__ Maps tmap_k,
                       const __grid_constant__ DecodeParams p) {
  using W = WideTraits;
  constexpr bool kFp8 = kIsFp8Maps<Maps>;
  JFM_CTA_TIMING();
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sQ = base + W::kOffQ;
  const uint32_t sK[2] = {base + W::kOffK0, base + W::kOffK1};
  const uint32_t bars[2] = {base + W::kOffBars, base + W::kOffBars + 8 * W::kNumKTiles};
  const uint32_t s_scales[2] = {base + W::kOffFp8Scales,
                                base + W::kOffFp8Scales + W::kFp8ScaleAreaBytes};  // FP8 only
  float* s_row_max = reinterpret_cast<float*>(smem + W::kOffRowMax);
  float* s_scale0 = reinterpret_cast<float*>(smem + W::kOffScale0);
  float* s_scale1 = reinterpret_cast<float*>(smem + W::kOffScale1);
  float* s_row_sum = reinterpret_cast<float*>(smem + W::kOffRowSum);

  const int m_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int part = blockIdx.z;
  const auto [wg, tid_wg, warp_wg, lane] = thread_pos();
  const int r0 = warp_wg * 16 + lane / 4;  // this thread's rows: r0 and r0 + 8
  const int q4 = lane % 4;                 // column pair within each 8-column chunk
  const bool leader = tid_wg == 0;

  SchedRecord rec;
  if (!start_part(&tmap_k, p, base + W::kOffBars, part, rec)) return;

  const uint64_t policy = leader ? l2_evict_first_policy() : 0;

  // Prologue: start the loads of the first pair.
  {
    ReqCtx c;
    if (first_chunk_from(p, rec, m_block, rec.begin_req, c) && leader) {
      const PageInfo pa = make_page(p, c, c.pb);
      const PageInfo pb = make_page(p, c, c.pb + 1);
      if constexpr (kFp8) {
        load_group(&tmap_k, sK[0], s_scales[0], bars[0], pa, hk, W::group_tiles(0, wg), policy);
        load_group(&tmap_k, sK[1], s_scales[1], bars[1], pb, hk, W::group_tiles(1, wg), policy);
      } else {  // the order the bf16 kernels were tuned with: both expects, then the copies
        expect_group(bars[0], pa, W::group_tiles(0, wg));
        expect_group(bars[1], pb, W::group_tiles(1, wg));
        issue_group(&tmap_k, sK[0], bars[0], pa, hk, W::group_tiles(0, wg), policy);
        issue_group(&tmap_k, sK[1], bars[1], pb, hk, W::group_tiles(1, wg), policy);
      }
    }
  }

  // Records made for other lengths give NaN rows (split_kv.cuh), checked while the first pair's
  // loads are in flight and applied in each request's epilogue.
  const bool stale = stale_record(p, rec);

  uint32_t phase[2] = {0, 0};
  bool q_prefetched = false;  // sQ already holds (copies in flight of) this request's Q
  const int last_req = min(rec.end_req, p.b - 1);

  for (int req = rec.begin_req; req <= last_req; ++req) {
    const ReqCtx c = make_req(p, rec, req, m_block);
    const int vis_r0 = visible_keys(p, c.len, m_block * kBlockM + r0);
    const int vis_r1 = visible_keys(p, c.len, m_block * kBlockM + r0 + 8);

    if (q_prefetched) {
      if (wg == 1) cp_async_wait_all();  // WG1 started these copies in the last pair
    } else {
      load_q(p, sQ, c.bi, hk, m_block);
    }
    if (threadIdx.x < kBlockM) s_row_max[threadIdx.x] = W::kRowMaxInit;
    fence_proxy_async_smem();
    __syncthreads();

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float row_sum[2] = {0.f, 0.f};

    for (int page = c.pb; page < c.pe; page += 2) {
      const bool prefetch_next_q = page + 2 >= c.pe && req < last_req;
      const PageInfo pa = make_page(p, c, page);
      const PageInfo pb = make_page(p, c, page + 1);  // not loaded if page + 1 >= pe
      // The pair after this one (maybe in a later request): refilled into the buffers below.
      PageInfo na, nb;
      na.loaded = false;
      nb.loaded = false;
      if (page + 2 < c.pe) {
        na = make_page(p, c, page + 2);
        nb = make_page(p, c, page + 3);
      } else {
        ReqCtx nc;
        if (first_chunk_from(p, rec, m_block, req + 1, nc)) {
          na = make_page(p, nc, nc.pb);
          nb = make_page(p, nc, nc.pb + 1);
        }
      }

      float s[32];
      uint32_t a[16];
      if (wg == 0) {
        // ---------------- WG0: page a ----------------
        float m_old[2] = {s_row_max[r0], s_row_max[r0 + 8]};
        float m_new[2], sc0[2], psum[2] = {0.f, 0.f};
        if (pa.loaded) {
          if constexpr (kFp8) {
            dequant_page(sK[0], s_scales[0], bars[0], phase[0], tid_wg, W::kBarWg0);
          }
          qk_page<E, 0, !kFp8>(s, sQ, sK[0], bars[0], phase[0]);
          wgmma_wait<0>();
          reg_fence(s);
          float mx[2];
          mask_and_row_max(s, p.scale_log2, pa.need_mask, page * kPageSize + 2 * q4, vis_r0, vis_r1,
                           mx);
          m_new[0] = lazy_max(m_old[0], mx[0]);
          m_new[1] = lazy_max(m_old[1], mx[1]);
          exp_rows(s, p.scale_log2, m_new, psum);
          pack_p<E>(s, a);
          store_p(sK[0] + W::kPTile * kTileBytes, a, r0, q4);
          fence_proxy_async_smem();
        } else {
          m_new[0] = m_old[0];
          m_new[1] = m_old[1];
        }
        sc0[0] = max_scale(m_old[0], m_new[0]);
        sc0[1] = max_scale(m_old[1], m_new[1]);
        publish_max(s_row_max, s_scale0, r0, q4, m_new, sc0, W::kBarP0Ready);

        row_sum[0] = row_sum[0] * sc0[0] + psum[0];
        row_sum[1] = row_sum[1] * sc0[1] + psum[1];
        if (pa.loaded) pv_own_page<E>(o, sc0, a, sK[0], 0, pa.n_valid, tid_wg, W::kBarWg0);
        // That was WG0's last read of buffer 0 (tiles 0..3). WG0 has nothing to do until WG1's
        // P1 arrives, so wait for it here and refill those tiles as early as possible.
        wgmma_wait<0>();
        reg_fence(o);
        // wait_group covers only the calling warp's share: all four warps must be done reading
        // before the leader lets TMA overwrite the tiles.
        named_bar_sync(W::kBarWg0, W::kWarpgroupThreads);
        refill(leader, &tmap_k, sK[0], s_scales[0], bars[0], na, hk, W::group_tiles(0, 0),
               policy);

        named_bar_sync(W::kBarP1Ready, W::kThreads);
        const float sc1[2] = {s_scale1[r0], s_scale1[r0 + 8]};
        row_sum[0] *= sc1[0];
        row_sum[1] *= sc1[1];
        if (pb.loaded) {
          pv_other_page<E, !kFp8>(o, sc1, sK[1], bars[1], phase[1], 0, pb.n_valid, tid_wg,
                                  W::kBarWg0);
          wgmma_wait<0>();
          reg_fence(o);
        }
        named_bar_sync(W::kBarWg0, W::kWarpgroupThreads);
        refill(leader, &tmap_k, sK[1], s_scales[1], bars[1], nb, hk, W::group_tiles(1, 0),
               policy);
      } else {
        // ---------------- WG1: page b ----------------
        float mx[2] = {-INFINITY, -INFINITY};
        if (pb.loaded) {
          // Tiles 4..7 first: WG1 refilled them (after its P_b V_b) before WG0 refilled the rest.
          if constexpr (kFp8) {
            dequant_page(sK[1], s_scales[1], bars[1], phase[1], tid_wg, W::kBarWg1);
          }
          qk_page<E, 4, !kFp8>(s, sQ, sK[1], bars[1], phase[1]);
          wgmma_wait<0>();
          reg_fence(s);
          mask_and_row_max(s, p.scale_log2, pb.need_mask, (page + 1) * kPageSize + 2 * q4, vis_r0,
                           vis_r1, mx);
        }
        named_bar_sync(W::kBarP0Ready, W::kThreads);
        const float m0[2] = {s_row_max[r0], s_row_max[r0 + 8]};
        const float sc0[2] = {s_scale0[r0], s_scale0[r0 + 8]};
        row_sum[0] *= sc0[0];
        row_sum[1] *= sc0[1];
        if (pa.loaded) {
          pv_other_page<E, !kFp8>(o, sc0, sK[0], bars[0], phase[0], 4, pa.n_valid, tid_wg,
                                  W::kBarWg1);
        }
        // softmax of page b while P_a V_a runs
        const float m1[2] = {lazy_max(m0[0], mx[0]), lazy_max(m0[1], mx[1])};
        const float sc1[2] = {max_scale(m0[0], m1[0]), max_scale(m0[1], m1[1])};
        float psum[2] = {0.f, 0.f};
        if (pb.loaded) {
          exp_rows(s, p.scale_log2, m1, psum);
          pack_p<E>(s, a);
          store_p(sK[1] + W::kPTile * kTileBytes, a, r0, q4);
          fence_proxy_async_smem();
        }
        publish_max(s_row_max, s_scale1, r0, q4, m1, sc1, W::kBarP1Ready);
        wgmma_wait<0>();
        reg_fence(o);
        named_bar_sync(W::kBarWg1, W::kWarpgroupThreads);
        refill(leader, &tmap_k, sK[0], s_scales[0], bars[0], na, hk, W::group_tiles(0, 1),
               policy);
        row_sum[0] = row_sum[0] * sc1[0] + psum[0];
        row_sum[1] = row_sum[1] * sc1[1] + psum[1];
        if (pb.loaded) pv_own_page<E>(o, sc1, a, sK[1], 4, pb.n_valid, tid_wg, W::kBarWg1);
        // Both QK^T of the request's last pair are done (WG0's before P0, ours before that):
        // start copying the next request's Q into sQ while the last P.V runs.
        if (prefetch_next_q) prefetch_q_async(p, sQ, req + 1, hk, m_block, tid_wg);
        if (pb.loaded) {
          wgmma_wait<0>();
          reg_fence(o);
        }
        named_bar_sync(W::kBarWg1, W::kWarpgroupThreads);
        refill(leader, &tmap_k, sK[1], s_scales[1], bars[1], nb, hk, W::group_tiles(1, 1),
               policy);
      }
      if (pa.loaded) phase[0] ^= 1u;
      if (pb.loaded) phase[1] ^= 1u;
    }

    if (req == last_req) pdl_launch_dependents();

    // ---------------- epilogue: combine the two groups' row sums, write this request ----------
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 1);
      row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);
    }
    if (q4 == 0) {
      s_row_sum[wg * kBlockM + r0] = row_sum[0];
      s_row_sum[wg * kBlockM + r0 + 8] = row_sum[1];
    }
    __syncthreads();

    const int split_begin = __ldg(p.num_splits + c.bi);
    const bool split = __ldg(p.num_splits + c.bi + 1) - split_begin > 1;
    // Partial slot of this chunk; one outside [0, b + parts) only comes from hand-made records
    // and is dropped rather than written out of bounds.
    const int64_t slot =
        static_cast<int64_t>(split_begin) + ((req == rec.begin_req) ? rec.begin_split : 0);
    const bool slot_ok = slot >= 0 && slot < static_cast<int64_t>(p.b) + p.num_sm_parts;
    const int col0 = wg * W::kVColsPerWarpgroup + 2 * q4;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r0 + 8 * i;
      const int row = m_block * kBlockM + r;
      const float l = s_row_sum[r] + s_row_sum[kBlockM + r];
      const float m = s_row_max[r];
      // A stale record's rows are NaN, empty ones too (0 * NaN is NaN).
      const float inv = stale ? NAN : (l > 0.f ? 1.f / l : 0.f);
      if (row < p.q_rows) {
        if (!split) {
          const int s_tok = row / p.g;
          const int head = hk * p.g + (row - s_tok * p.g);
          E* out = static_cast<E*>(p.out) +
                   ((static_cast<size_t>(c.bi) * p.s_q + s_tok) * p.h_q + head) * kHeadDimV;
#pragma unroll
          for (int k = 0; k < 32; ++k) {
            const uint32_t v =
                ElemOps<E>::pack2(o[4 * k + 2 * i] * inv, o[4 * k + 2 * i + 1] * inv);
            *reinterpret_cast<uint32_t*>(out + col0 + 8 * k) = v;
          }
          if (wg == 0 && q4 == 0) {
            p.lse[(static_cast<size_t>(c.bi) * p.h_q + head) * p.s_q + s_tok] =
                stale ? NAN : (l > 0.f ? (m + __log2f(l)) * 0.69314718055994530942f : INFINITY);
          }
        } else if (slot_ok) {
          const size_t idx = (static_cast<size_t>(slot) * p.h_kv + hk) * p.q_rows + row;
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
    __syncthreads();  // sQ, the row max and the row sums are rewritten by the next request
    q_prefetched = c.pb < c.pe && req < last_req;
  }
}

}  // namespace sm90
}  // namespace jax_flashmla
