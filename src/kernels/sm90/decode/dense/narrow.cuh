// The narrow sm90 dense decode kernel, for narrow query blocks: at most N = 16 or 32 query rows
// per kv head, e.g. h_q=16 with s_q=1 (the memory-bound decode of DeepSeek-style models) or
// s_q=2.
//
// The wide kernel (wide.cuh) puts query rows on wgmma's M, which is 64; with 16 rows, 3/4
// of its tensor work and Q reads go to zero rows (with 32, half), and that power is taken from a
// card that already runs at its power cap while it streams the cache. Here keys are M and query
// rows are N:
//   S^T  = K Q^T     64 keys x N rows: 9 tiles x 4 k-steps of m64nNk16, both operands K-major
//   O^T += V^T P^T   512 columns x N rows: 8 column blocks x 4 k-steps; V^T is the K tile as
//                    stored, read MN-major, and P^T is written to shared memory K-major
// O^T is 4N fp32 registers per thread, so each warpgroup owns all 512 columns and one page buffer:
// WG w takes pages pb + w, pb + w + 2, ... of each request with its own running max and sums, and
// the two halves are merged once per request through shared memory (the Q tiles' space, free by
// then, one 256-column half at a time). Nothing passes between the groups inside the page loop,
// and each group refills its buffer as soon as its P.V is done.
//
// A row max of S is a column max of S^T: over the thread's two keys, the eight lanes that share
// its columns (shuffles), then the group's four warps (shared memory, one named barrier).
// Masking, skipped pages and the V rows past the length follow the wide kernel.
#pragma once

#include "kernels/common/cta_timing.cuh"
#include "kernels/sm90/decode/dense/blocks.cuh"

namespace jax_flashmla {
namespace sm90 {

// One k16 step of S^T = K Q^T (both K-major) and of O^T += V^T P^T (V^T MN-major), for N = 16, 32
// and operands of element type E.
template <class E>
__device__ __forceinline__ void mma_kq(float (&d)[8], uint64_t a, uint64_t b, int scale_d) {
  wgmma_m64n16k16_ss<E>(d, a, b, scale_d);
}
template <class E>
__device__ __forceinline__ void mma_kq(float (&d)[16], uint64_t a, uint64_t b, int scale_d) {
  wgmma_m64n32k16_ss<E>(d, a, b, scale_d);
}
template <class E>
__device__ __forceinline__ void mma_vp(float (&d)[8], uint64_t a, uint64_t b) {
  wgmma_m64n16k16_ss_ta<E>(d, a, b, 1);
}
template <class E>
__device__ __forceinline__ void mma_vp(float (&d)[16], uint64_t a, uint64_t b) {
  wgmma_m64n32k16_ss_ta<E>(d, a, b, 1);
}

// Rows 0..N-1 of the query block of (request bi, kv head hk) into sQ, tile t at t * N * 128 bytes;
// rows past q_rows are zero. All 256 threads. (Raw 16-bit elements: any element type.)
template <class NT>
__device__ __forceinline__ void load_q_narrow(const DecodeParams& p, uint32_t sQ, int bi, int hk) {
  constexpr int kChunksPerRow = kHeadDimK / 8;  // 72 x 16 bytes
  constexpr int kChunks = NT::kRows * kChunksPerRow;
  constexpr int kIters = (kChunks + NT::kThreads - 1) / NT::kThreads;
  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  uint4 v[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = threadIdx.x + it * NT::kThreads;
    const int row = i / kChunksPerRow;
    v[it] = make_uint4(0, 0, 0, 0);
    if (i < kChunks && row < p.q_rows) {
      const int s = row / p.g;
      const int j = row - s * p.g;
      const size_t off = ((static_cast<size_t>(bi) * p.s_q + s) * p.h_q + hk * p.g + j) * kHeadDimK +
                         (i % kChunksPerRow) * 8;
      v[it] = __ldg(reinterpret_cast<const uint4*>(q + off));
    }
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = threadIdx.x + it * NT::kThreads;
    if (i < kChunks) {
      const int row = i / kChunksPerRow;
      const int c = i % kChunksPerRow;
      st_shared_v4(sQ + (c / 8) * NT::kQTileBytes + swizzled_offset(row, c % 8), v[it]);
    }
  }
}

// The first page of warpgroup w's sequence at or after request `req`: page pb + w of the first
// chunk that has one. Returns false if none.
__device__ __forceinline__ bool first_page_from(const DecodeParams& p, const SchedRecord& rec,
                                                int req, int w, PageInfo& out) {
  const int last = min(rec.end_req, p.b - 1);
  for (int r = req; r <= last; ++r) {
    const ReqCtx c = make_req(p, rec, r, 0);
    if (c.pb + w < c.pe) {
      out = make_page(p, c, c.pb + w);
      return true;
    }
  }
  return false;
}

// S^T = K Q^T for one page buffer.
template <class NT, class E, bool kWait>
__device__ __forceinline__ void qk_narrow(float (&s)[NT::kAcc], uint32_t sQ, uint32_t s_buf,
                                          uint32_t bars, uint32_t phase) {
  qk_tiles<0, NT::kQTileBytes, kWait>(sQ, s_buf, bars, phase, [&](uint64_t q, uint64_t k, int sd) {
    mma_kq<E>(s, k, q, sd);
  });
}

// O^T += V^T P^T: column block mb is V tile mb read MN-major; P^T (16 x 64 keys) from s_p.
// Two commit groups (tiles 0..3, 4..7), so the first half of the buffer can be refilled while
// the second is still read.
template <class NT, class E>
__device__ __forceinline__ void pv_narrow(float (&o)[8][NT::kAcc], uint32_t s_p, uint32_t s_buf) {
  const uint64_t dv = make_desc_sw128(s_buf, kDescMnMajorLbo, kDescSbo);
  const uint64_t dp = make_desc_sw128(s_p, kDescKMajorLbo, kDescSbo);
  wgmma_fence();
#pragma unroll
  for (int mb = 0; mb < T::kNumVTiles; ++mb) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      mma_vp<E>(o[mb], desc_advance(dv, mb * kTileBytes + kk * kKStepMnMajor),
             desc_advance(dp, kk * kKStepKMajor));
    }
    if (mb == 3 || mb == 7) wgmma_commit();
  }
}

// Run by a whole warpgroup once each warp's last read of some tiles of its buffer has retired:
// all four warps meet, then the leader starts the next page's tiles (FP8: its loads of them,
// fp8_cache.cuh). (Letting three warps only arrive, so that just the leader's warp waits,
// measured the same speed.)
template <class Maps>
__device__ __forceinline__ void release_tiles(int bar, bool leader, const Maps* maps,
                                              uint32_t s_buf, uint32_t s_scales, uint32_t bars,
                                              const PageInfo& next, int hk, uint32_t mask,
                                              uint64_t policy) {
  named_bar_sync(bar, T::kWarpgroupThreads);
  if (leader) load_group(maps, s_buf, s_scales, bars, next, hk, mask, policy);
}

// Fragment coordinates (m64nN accumulator, register 4j + 2i + e of a thread): M index
// 16 * warp + lane / 4 + 8i (a key of S^T, a column of O^T), N index 8j + 2 * (lane % 4) + e
// (a query row). The thread's N/4 query rows are indexed k = 2j + e below.
__device__ __forceinline__ int frag_row(int q4, int k) { return 8 * (k >> 1) + 2 * q4 + (k & 1); }

// kRows: N, 16 or 32; E: the element type of q, k_cache and out (__nv_bfloat16 or __half);
// Maps: CUtensorMap for a cache of E rows, Fp8TensorMaps for the FP8 cache (E = bf16).
template <int kRows, class E, class Maps = CUtensorMap>
__global__ void __launch_bounds__(T::kThreads, 1)
    decode_narrow_kernel(const __grid_constant__ Maps tmap_k,
                         const __grid_constant__ DecodeParams p) {
  using NT = NarrowTraits<kRows>;
  constexpr bool kFp8 = kIsFp8Maps<Maps>;
  constexpr int kAcc = NT::kAcc;
  constexpr int kThreadRows = NT::kThreadRows;
  JFM_CTA_TIMING();
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - smem_u32(smem_raw));

  const int hk = blockIdx.y;
  const int part = blockIdx.z;
  const auto [wg, tid_wg, warp_wg, lane] = thread_pos();
  const int q4 = lane % 4;
  const int key_lo = 16 * warp_wg + lane / 4;  // this thread's keys of a page: key_lo, key_lo + 8
  const bool leader = tid_wg == 0;

  const uint32_t sQ = base + NT::kOffQ;
  const uint32_t s_buf = base + NT::kOffK + wg * T::kPageBytes;
  const uint32_t s_p = base + NT::kOffP + wg * NT::kQTileBytes;
  const uint32_t bars = base + NT::kOffBars + wg * 8 * T::kNumKTiles;
  const uint32_t s_scales = base + NT::kOffFp8Scales + wg * T::kFp8ScaleAreaBytes;  // FP8 only
  float* s_red = reinterpret_cast<float*>(smem + NT::kOffRed) + wg * 4 * NT::kRows;
  float* s_sum = reinterpret_cast<float*>(smem + NT::kOffSum);
  float* s_max = reinterpret_cast<float*>(smem + NT::kOffMax);
  float* s_final = reinterpret_cast<float*>(smem + NT::kOffFinal);
  float* s_o = reinterpret_cast<float*>(smem + NT::kOffQ);  // the merge area, in the epilogue

  SchedRecord rec;
  if (!start_part(&tmap_k, p, base + NT::kOffBars, part, rec)) return;
  const uint64_t policy = leader ? l2_evict_first_policy() : 0;
  constexpr uint32_t kAllTiles = (1u << T::kNumKTiles) - 1;

  if (leader) {  // each group starts the first page of its own sequence
    PageInfo first;
    if (first_page_from(p, rec, rec.begin_req, wg, first)) {
      load_group(&tmap_k, s_buf, s_scales, bars, first, hk, kAllTiles, policy);
    }
  }

  // Records made for other lengths give NaN rows (split_kv.cuh), checked while the first pages'
  // loads are in flight and applied in each request's epilogue. The flag waits in shared memory
  // (published by the request's first barrier): a register held across the page loop costs
  // N = 32 a spill in the tools' instrumented builds.
  volatile int* s_stale = reinterpret_cast<volatile int*>(smem + NT::kOffStale);
  {
    const bool stale = stale_record(p, rec);
    if (threadIdx.x == 0) *s_stale = stale;
  }

  uint32_t phase = 0;
  const int last_req = min(rec.end_req, p.b - 1);
  for (int req = rec.begin_req; req <= last_req; ++req) {
    const ReqCtx c = make_req(p, rec, req, 0);
    load_q_narrow<NT>(p, sQ, c.bi, hk);
    fence_proxy_async_smem();
    __syncthreads();

    int vis[kThreadRows];
#pragma unroll
    for (int k = 0; k < kThreadRows; ++k) vis[k] = visible_keys(p, c.len, frag_row(q4, k));
    float o[8][kAcc];
#pragma unroll
    for (int mb = 0; mb < 8; ++mb) {
#pragma unroll
      for (int r = 0; r < kAcc; ++r) o[mb][r] = 0.f;
    }
    float m_run[kThreadRows], l_run[kThreadRows];
#pragma unroll
    for (int k = 0; k < kThreadRows; ++k) {
      m_run[k] = T::kRowMaxInit;
      l_run[k] = 0.f;
    }

    for (int page = c.pb + wg; page < c.pe; page += 2) {
      const PageInfo pi = make_page(p, c, page);
      // The group's next page (maybe in a later request): the leader refills the buffer with it
      // as this page's last reads of each tile group retire (RoPE tile after S^T, then V halves).
      PageInfo next;
      next.loaded = false;
      if (leader) {
        if (page + 2 < c.pe) {
          next = make_page(p, c, page + 2);
        } else {
          first_page_from(p, rec, req + 1, wg, next);
        }
      }
      if (!pi.loaded) {  // no load was issued for this page: the buffer is free already
        if (leader) load_group(&tmap_k, s_buf, s_scales, bars, next, hk, kAllTiles, policy);
      } else {
        if constexpr (kFp8) {
          dequant_page(s_buf, s_scales, bars, phase, tid_wg, NT::bar_group(wg));
        }
        float s[kAcc];
        qk_narrow<NT, E, !kFp8>(s, sQ, s_buf, bars, phase);
        wgmma_wait<0>();
        reg_fence(s);
        if (pi.need_mask) {
          const int key0 = page * kPageSize + key_lo;
#pragma unroll
          for (int r = 0; r < kAcc; ++r) {
            const int key = key0 + 8 * ((r >> 1) & 1);
            s[r] = key < vis[2 * (r >> 2) + (r & 1)] ? s[r] : -INFINITY;
          }
        }
        // Column max over the page's 64 keys: thread, lanes of the same quad position, warps.
        float mx[kThreadRows];
#pragma unroll
        for (int k = 0; k < kThreadRows; ++k) {
          const int r = 4 * (k >> 1) + (k & 1);
          float m = fmaxf(s[r], s[r + 2]);
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
          mx[k] = m;
        }
        // (s_red is rewritten by the next page only after this page's second group barrier,
        // which every warp reaches after its reads below.)
        float* red = s_red;
        if (lane < 4) {
#pragma unroll
          for (int k = 0; k < kThreadRows; ++k) red[warp_wg * NT::kRows + frag_row(q4, k)] = mx[k];
        }
        named_bar_sync(NT::bar_group(wg), T::kWarpgroupThreads);
        // Every warp's S^T wgmmas have retired: the RoPE tile is free.
        if (leader) load_group(&tmap_k, s_buf, s_scales, bars, next, hk, 1u << 8, policy);
        float m_new[kThreadRows], sc[kThreadRows], psum[kThreadRows];
#pragma unroll
        for (int k = 0; k < kThreadRows; ++k) {
          float m = red[frag_row(q4, k)];
#pragma unroll
          for (int w = 1; w < 4; ++w) m = fmaxf(m, red[w * NT::kRows + frag_row(q4, k)]);
          m_new[k] = lazy_max(m_run[k], m * p.scale_log2);
          sc[k] = max_scale(m_run[k], m_new[k]);
          m_run[k] = m_new[k];
          psum[k] = 0.f;
        }
#pragma unroll
        for (int r = 0; r < kAcc; ++r) {
          const int k = 2 * (r >> 2) + (r & 1);
          s[r] = fast_exp2(fmaf(s[r], p.scale_log2, -m_new[k]));
          psum[k] += s[r];
        }
#pragma unroll
        for (int k = 0; k < kThreadRows; ++k) l_run[k] = l_run[k] * sc[k] + psum[k];
        bool moved = false;
#pragma unroll
        for (int k = 0; k < kThreadRows; ++k) moved |= sc[k] != 1.f;
        if (__any_sync(0xffffffffu, moved)) {  // see rescale_o
#pragma unroll
          for (int mb = 0; mb < 8; ++mb) {
#pragma unroll
            for (int r = 0; r < kAcc; ++r) o[mb][r] *= sc[2 * (r >> 2) + (r & 1)];
          }
        }
        // P^T (elements E) into the group's K-major N x 64 tile: row = query row, column = key.
#pragma unroll
        for (int r = 0; r < kAcc; ++r) {
          const int n = frag_row(q4, 2 * (r >> 2) + (r & 1));
          const int key = key_lo + 8 * ((r >> 1) & 1);
          st_shared_u16(s_p + swizzled_offset(n, key >> 3) + (key & 7) * 2,
                        ElemOps<E>::bits(s[r]));
        }
        if (pi.n_valid < kPageSize) {
          zero_v_rows(s_buf, 0, pi.n_valid, tid_wg);
          zero_v_rows(s_buf, 4, pi.n_valid, tid_wg);
        }
        fence_proxy_async_smem();
        named_bar_sync(NT::bar_group(wg), T::kWarpgroupThreads);
        for (int mb = 0; mb < 8; ++mb) reg_fence(o[mb]);
        pv_narrow<NT, E>(o, s_p, s_buf);
        wgmma_wait<1>();
        for (int mb = 0; mb < 4; ++mb) reg_fence(o[mb]);
        release_tiles(NT::bar_group(wg), leader, &tmap_k, s_buf, s_scales, bars, next, hk, 0x0Fu,
                      policy);
        wgmma_wait<0>();
        for (int mb = 4; mb < 8; ++mb) reg_fence(o[mb]);
        release_tiles(NT::bar_group(wg), leader, &tmap_k, s_buf, s_scales, bars, next, hk, 0xF0u,
                      policy);
        phase ^= 1u;
      }
    }

    if (req == last_req) pdl_launch_dependents();

    // ---------------- epilogue: merge the two groups' (max, sum, O^T), write this request ----
    // (The split count first: its latency then overlaps the merge.)
    const int split_begin = __ldg(p.num_splits + c.bi);
    const bool split = __ldg(p.num_splits + c.bi + 1) - split_begin > 1;
    const bool stale = *s_stale != 0;
#pragma unroll
    for (int k = 0; k < kThreadRows; ++k) {
      l_run[k] += __shfl_xor_sync(0xffffffffu, l_run[k], 4);
      l_run[k] += __shfl_xor_sync(0xffffffffu, l_run[k], 8);
      l_run[k] += __shfl_xor_sync(0xffffffffu, l_run[k], 16);
    }
    if (lane < 4) {
#pragma unroll
      for (int k = 0; k < kThreadRows; ++k) {
        s_sum[(wg * 4 + warp_wg) * NT::kRows + frag_row(q4, k)] = l_run[k];
        if (warp_wg == 0) s_max[wg * NT::kRows + frag_row(q4, k)] = m_run[k];
      }
    }
    // Past this barrier both groups' S^T wgmmas have retired: the Q tiles hold the merge area.
    __syncthreads();
    if (threadIdx.x < NT::kRows) {
      const int n = threadIdx.x;
      const float m = fmaxf(s_max[n], s_max[NT::kRows + n]);
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        float lw = 0.f;
#pragma unroll
        for (int wp = 0; wp < 4; ++wp) lw += s_sum[(w * 4 + wp) * NT::kRows + n];
        l += lw * fast_exp2(s_max[w * NT::kRows + n] - m);
      }
      s_final[n] = m;
      s_final[NT::kRows + n] = l;
    }
    float f[kThreadRows];
#pragma unroll
    for (int k = 0; k < kThreadRows; ++k) {
      const int n = frag_row(q4, k);
      f[k] = fast_exp2(m_run[k] - fmaxf(s_max[n], s_max[NT::kRows + n]));
    }
    const int64_t slot =
        static_cast<int64_t>(split_begin) + ((req == rec.begin_req) ? rec.begin_split : 0);
    const bool slot_ok = slot >= 0 && slot < static_cast<int64_t>(p.b) + p.num_sm_parts;

    // This group's share of half h of O^T, scaled to the merged row max, into the merge area:
    // stored (WG1) or added to what is there (WG0).
    auto merge_half = [&](int h, bool add) {
#pragma unroll
      for (int mb = 4 * h; mb < 4 * h + 4; ++mb) {
#pragma unroll
        for (int r = 0; r < kAcc; ++r) {
          const int k = 2 * (r >> 2) + (r & 1);
          const int col = 64 * (mb - 4 * h) + key_lo + 8 * ((r >> 1) & 1);
          float* dst = s_o + frag_row(q4, k) * NT::kOStride + col;
          const float v = o[mb][r] * f[k];
          *dst = add ? *dst + v : v;
        }
      }
    };
    // One 256-column half of O^T at a time: WG1 stores its share, WG0 adds its own, all write.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (wg == 1) merge_half(h, false);
      __syncthreads();
      if (wg == 0) merge_half(h, true);
      __syncthreads();
      // Coalesced: 4 consecutive columns of one row per thread and step.
      for (int i = threadIdx.x; i < NT::kRows * 64; i += NT::kThreads) {
        const int n = i / 64;
        const int col_h = (i % 64) * 4;
        const int col = 256 * h + col_h;
        if (n >= p.q_rows) break;
        const float m = s_final[n];
        const float l = s_final[NT::kRows + n];
        // A stale record's rows are NaN, empty ones too (0 * NaN is NaN).
        const float inv = stale ? NAN : (l > 0.f ? 1.f / l : 0.f);
        const float4 v = *reinterpret_cast<const float4*>(s_o + n * NT::kOStride + col_h);
        const int s_tok = n / p.g;
        const int head = hk * p.g + (n - s_tok * p.g);
        if (!split) {
          E* out = static_cast<E*>(p.out) +
                   ((static_cast<size_t>(c.bi) * p.s_q + s_tok) * p.h_q + head) * kHeadDimV;
          *reinterpret_cast<uint2*>(out + col) = make_uint2(
              ElemOps<E>::pack2(v.x * inv, v.y * inv), ElemOps<E>::pack2(v.z * inv, v.w * inv));
          if (col == 0) {
            p.lse[(static_cast<size_t>(c.bi) * p.h_q + head) * p.s_q + s_tok] =
                stale ? NAN : (l > 0.f ? (m + __log2f(l)) * 0.69314718055994530942f : INFINITY);
          }
        } else if (slot_ok) {
          const size_t idx = (static_cast<size_t>(slot) * p.h_kv + hk) * p.q_rows + n;
          *reinterpret_cast<float4*>(p.o_accum + idx * kHeadDimV + col) =
              make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
          if (col == 0) p.lse_accum[idx] = stale ? NAN : (l > 0.f ? m + __log2f(l) : -INFINITY);
        }
      }
      __syncthreads();  // the merge area is rewritten by the next half, sQ by the next request
    }
  }
}

}  // namespace sm90
}  // namespace jax_flashmla
