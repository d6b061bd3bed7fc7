// Split-KV MLA decode on CUDA cores, fp32 math: the correct-first kernel that defines what the
// fast sm90/ kernel must reproduce. It shares the fast kernel's grid and work split:
//
//   grid (num_m_blocks, h_kv, num_sm_parts); CTA (m_block, hk, part) handles query rows
//   m_block*64 .. +63 of KV head hk for every (request, page range) chunk of sched[part].
//
// Per chunk: Q (64 x 576 bf16) is staged in shared memory once; then each KV page (64 tokens x
// 576, V = its first 512 columns) is staged and consumed by an online softmax in the log2
// domain. Warp w owns rows w*8 .. w*8+7 for the whole chunk, so row max and sums never leave the
// warp: lane l computes scores for keys l and l+32 and accumulates output columns l*8 .. l*8+7 and
// 256 + l*8 .. +7 (128 fp32 accumulators per thread).
#include <cuda_bf16.h>
#include <math_constants.h>

#include <cstdint>

#include "kernels/common/device_utils.cuh"
#include "kernels/kernel_registry.h"
#include "kernels/params.h"

namespace jax_flashmla {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBlockM / kWarps;  // 8
constexpr int kVecElems = 8;                    // bf16 per 16-byte vector
constexpr int kVecsPerRowK = kHeadDimK / kVecElems;  // 72
constexpr int kColsPerLaneHalf = kHeadDimV / 2 / 32;  // 8: output columns per lane per half
// K rows in shared memory are padded by 16 bytes: the row stride becomes 292 words (4 mod 32), so
// the 8 lanes of a 16-byte-load phase that read 8 consecutive rows hit disjoint banks.
constexpr int kSmemKStride = kHeadDimK + kVecElems;

static_assert(kRowsPerWarp * kWarps == kBlockM, "every row of the M block has one warp");
static_assert(kColsPerLaneHalf == kVecElems, "a lane's output half-row is one 16-byte vector");

struct alignas(16) SharedStorage {
  __nv_bfloat16 q[kBlockM * kHeadDimK];           // 72 KiB; reads are warp broadcasts
  __nv_bfloat16 k[kPageSize * kSmemKStride];      // 73 KiB; one KV page, V = first 512 cols
  float p[kWarps][kPageSize][kRowsPerWarp];       // 16 KiB; softmax numerators, [key][row]
};

// Online-softmax state of one warp's rows, per lane. m is warp-uniform; l holds this lane's
// partial row sums (the lanes' shares are added once, in the epilogue).
struct RowState {
  float m[kRowsPerWarp];
  float l[kRowsPerWarp];
  float acc[kRowsPerWarp][2 * kColsPerLaneHalf];
};

__device__ __forceinline__ void stage_q(SharedStorage& smem, const DecodeParams& p, int bi,
                                        int hk, int row0) {
  const __nv_bfloat16* q = static_cast<const __nv_bfloat16*>(p.q);
  for (int v = threadIdx.x; v < kBlockM * kVecsPerRowK; v += kThreads) {
    const int i = v / kVecsPerRowK;
    const int col = (v % kVecsPerRowK) * kVecElems;
    const int r = row0 + i;
    const bool valid = r < p.q_rows;
    const __nv_bfloat16* src = q;
    if (valid) {
      const int s = r / p.g;
      const int h = hk * p.g + r % p.g;
      src = q + ((static_cast<int64_t>(bi) * p.s_q + s) * p.h_q + h) * kHeadDimK + col;
    }
    cp_async_16_or_zero(&smem.q[i * kHeadDimK + col], src, valid);
  }
}

// Stages the first `num_tokens` rows of a page; the rest are zero-filled without reading memory,
// so whatever the cache holds past a sequence's end (NaN included) never reaches K or V.
__device__ __forceinline__ void stage_page(SharedStorage& smem, const DecodeParams& p,
                                           int64_t page_id, int hk, int num_tokens) {
  const __nv_bfloat16* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  for (int v = threadIdx.x; v < kPageSize * kVecsPerRowK; v += kThreads) {
    const int t = v / kVecsPerRowK;
    const int col = (v % kVecsPerRowK) * kVecElems;
    const bool valid = t < num_tokens;
    const __nv_bfloat16* src = k_cache;
    if (valid) {
      src = k_cache + ((page_id * kPageSize + t) * p.h_kv + hk) * kHeadDimK + col;
    }
    cp_async_16_or_zero(&smem.k[t * kSmemKStride + col], src, valid);
  }
}

// One page of the online softmax for this warp's rows. `key_end[i]` is the exclusive end of the
// keys row i may see (sequence end, pulled in by the causal mask); keys at or past it, and all
// keys of an unusable page, are masked by selecting, never by adding, so NaN cannot leak.
__device__ __forceinline__ void consume_page(SharedStorage& smem, const DecodeParams& p,
                                             RowState& st, const int (&key_end)[kRowsPerWarp],
                                             int page_first_key, bool page_usable) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const __nv_bfloat16* q_rows = &smem.q[warp * kRowsPerWarp * kHeadDimK];
  const __nv_bfloat16* k_row0 = &smem.k[lane * kSmemKStride];
  const __nv_bfloat16* k_row1 = &smem.k[(lane + 32) * kSmemKStride];

  // S = Q K^T for keys (lane, lane + 32), 576-deep, 8 dims per step.
  float score[kRowsPerWarp][2];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) score[i][0] = score[i][1] = 0.f;
#pragma unroll 2
  for (int d = 0; d < kHeadDimK; d += kVecElems) {
    float k0[kVecElems], k1[kVecElems];
    unpack_bf16x8(*reinterpret_cast<const uint4*>(k_row0 + d), k0);
    unpack_bf16x8(*reinterpret_cast<const uint4*>(k_row1 + d), k1);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      float qv[kVecElems];
      unpack_bf16x8(*reinterpret_cast<const uint4*>(q_rows + i * kHeadDimK + d), qv);
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) {
        score[i][0] = fmaf(qv[e], k0[e], score[i][0]);
        score[i][1] = fmaf(qv[e], k1[e], score[i][1]);
      }
    }
  }

  // Online softmax, log2 domain: x = s * scale * log2(e).
  const int key0 = page_first_key + lane;
  const int key1 = key0 + 32;
  float(*p_out)[kRowsPerWarp] = smem.p[warp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const bool valid0 = page_usable && key0 < key_end[i];
    const bool valid1 = page_usable && key1 < key_end[i];
    const float x0 = score[i][0] * p.scale_log2;
    const float x1 = score[i][1] * p.scale_log2;
    const float tile_max = warp_max(fmaxf(valid0 ? x0 : kInitMax, valid1 ? x1 : kInitMax));
    const float m_new = fmaxf(st.m[i], tile_max);
    const float rescale = exp2f(st.m[i] - m_new);
    const float p0 = valid0 ? exp2f(x0 - m_new) : 0.f;
    const float p1 = valid1 ? exp2f(x1 - m_new) : 0.f;
    st.m[i] = m_new;
    st.l[i] = st.l[i] * rescale + (p0 + p1);
#pragma unroll
    for (int c = 0; c < 2 * kColsPerLaneHalf; ++c) st.acc[i][c] *= rescale;
    p_out[lane][i] = p0;
    p_out[lane + 32][i] = p1;
  }
  __syncwarp();

  // O += P V over the page's 64 keys; V rows of masked keys are zeros or carry p = 0.
  const __nv_bfloat16* v_lo = &smem.k[lane * kColsPerLaneHalf];
  const __nv_bfloat16* v_hi = v_lo + kHeadDimV / 2;
#pragma unroll 2
  for (int key = 0; key < kPageSize; ++key) {
    float v[2 * kColsPerLaneHalf];
    unpack_bf16x8(*reinterpret_cast<const uint4*>(v_lo + key * kSmemKStride), &v[0]);
    unpack_bf16x8(*reinterpret_cast<const uint4*>(v_hi + key * kSmemKStride), &v[kVecElems]);
    const float4 pa = *reinterpret_cast<const float4*>(&p_out[key][0]);
    const float4 pb = *reinterpret_cast<const float4*>(&p_out[key][4]);
    const float pk[kRowsPerWarp] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
      for (int c = 0; c < 2 * kColsPerLaneHalf; ++c) st.acc[i][c] = fmaf(pk[i], v[c], st.acc[i][c]);
    }
  }
  __syncwarp();  // p_out is rewritten by the next page
}

// Writes one chunk's rows: final bf16 out + natural-log lse when the request is not split, else
// fp32 partials (already divided by the row sum) + log2-domain lse for the combine kernel.
__device__ __forceinline__ void store_chunk(const DecodeParams& p, const RowState& st, int bi,
                                            int hk, int row0, int split_idx) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int split_begin = p.num_splits[bi];
  const int num_splits = p.num_splits[bi + 1] - split_begin;
  const int64_t slot = static_cast<int64_t>(split_begin) + split_idx;
  const bool is_split = num_splits > 1;
  // Metadata that does not match these shapes must not make us write out of bounds.
  if (is_split && (slot < 0 || slot >= static_cast<int64_t>(p.b) + p.num_sm_parts)) return;

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = row0 + warp * kRowsPerWarp + i;
    const float l = warp_sum(st.l[i]);
    if (r >= p.q_rows) continue;
    // l == 0: nothing attended. A NaN l (NaN in q or in live cache rows) is left to propagate,
    // as it does in the reference.
    const bool empty = l == 0.f;
    const float inv_l = empty ? 0.f : 1.f / l;
    const float lse_log2 = st.m[i] + log2f(l);
    if (!is_split) {
      const int s = r / p.g;
      const int h = hk * p.g + r % p.g;
      __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) +
                           ((static_cast<int64_t>(bi) * p.s_q + s) * p.h_q + h) * kHeadDimV;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* a = &st.acc[i][half * kColsPerLaneHalf];
        uint4 packed;
        packed.x = pack_bf16x2(a[0] * inv_l, a[1] * inv_l);
        packed.y = pack_bf16x2(a[2] * inv_l, a[3] * inv_l);
        packed.z = pack_bf16x2(a[4] * inv_l, a[5] * inv_l);
        packed.w = pack_bf16x2(a[6] * inv_l, a[7] * inv_l);
        *reinterpret_cast<uint4*>(out + half * (kHeadDimV / 2) + lane * kColsPerLaneHalf) = packed;
      }
      if (lane == 0) {
        p.lse[(static_cast<int64_t>(bi) * p.h_q + h) * p.s_q + s] =
            empty ? CUDART_INF_F : lse_log2 * kLn2;
      }
    } else {
      const int64_t row = (slot * p.h_kv + hk) * p.q_rows + r;
      float* o = p.o_accum + row * kHeadDimV;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* a = &st.acc[i][half * kColsPerLaneHalf];
        float* dst = o + half * (kHeadDimV / 2) + lane * kColsPerLaneHalf;
        reinterpret_cast<float4*>(dst)[0] =
            make_float4(a[0] * inv_l, a[1] * inv_l, a[2] * inv_l, a[3] * inv_l);
        reinterpret_cast<float4*>(dst)[1] =
            make_float4(a[4] * inv_l, a[5] * inv_l, a[6] * inv_l, a[7] * inv_l);
      }
      if (lane == 0) p.lse_accum[row] = empty ? -CUDART_INF_F : lse_log2;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) decode_simt_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int m_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int part = blockIdx.z;
  const int row0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32;

  const SchedRecord rec = p.sched[part];
  // Records come from another call; clamp them so stale or foreign metadata cannot fault.
  const int first_req = rec.begin_req < 0 ? p.b : rec.begin_req;
  const int last_req = min(rec.end_req, p.b - 1);

  for (int bi = first_req; bi <= last_req; ++bi) {
    const int len = effective_len(p.seqlens[bi], p.max_blocks);
    const int len_pages = (len + kPageSize - 1) / kPageSize;
    const int page_begin = bi == first_req ? max(rec.begin_block, 0) : 0;
    const int page_end = bi == last_req && rec.end_req == last_req
                             ? min(rec.end_block, len_pages)
                             : len_pages;
    const int split_idx = bi == first_req ? rec.begin_split : 0;

    // Exclusive key end of each of this warp's rows: token s of s_q sees keys [0, len-s_q+s].
    int key_end[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = row0 + warp * kRowsPerWarp + i;
      key_end[i] = p.causal ? len - p.s_q + 1 + min(r, p.q_rows - 1) / p.g : len;
    }

    RowState st;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      st.m[i] = kInitMax;
      st.l[i] = 0.f;
#pragma unroll
      for (int c = 0; c < 2 * kColsPerLaneHalf; ++c) st.acc[i][c] = 0.f;
    }

    if (page_begin < page_end) stage_q(smem, p, bi, hk, row0);  // waited on with the first page
    for (int page = page_begin; page < page_end; ++page) {
      // Only pages below ceil(len / 64) get here, so table entries past the last used page are
      // never read; ids outside the cache are never dereferenced and their keys are masked.
      const int64_t page_id = p.block_table[static_cast<int64_t>(bi) * p.max_blocks + page];
      const bool usable = page_id >= 0 && page_id < p.num_blocks;
      const int num_tokens = usable ? min(kPageSize, len - page * kPageSize) : 0;
      __syncthreads();  // the previous page's P V is done with smem.k
      stage_page(smem, p, usable ? page_id : 0, hk, num_tokens);
      cp_async_wait_all();
      __syncthreads();
      consume_page(smem, p, st, key_end, page * kPageSize, usable);
    }
    store_chunk(p, st, bi, hk, row0, split_idx);
    __syncthreads();  // smem.q is restaged for the next request
  }
  // Let the combine kernel start launching; it still waits for this grid to finish.
  pdl_launch_dependents();
}

}  // namespace

KernelLaunch decode_simt_launch(const DecodeParams& params) {
  KernelLaunch launch;
  launch.func = reinterpret_cast<const void*>(&decode_simt_kernel);
  launch.grid = dim3(params.num_m_blocks, params.h_kv, params.num_sm_parts);
  launch.block = dim3(kThreads);
  launch.smem_bytes = static_cast<int>(sizeof(SharedStorage));
  return launch;
}

}  // namespace jax_flashmla
