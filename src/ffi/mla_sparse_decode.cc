// FFI handler "jax_flashmla_mla_sparse_decode_v1": token-sparse MLA decode over an FP8 cache
// (DeepSeek-V3.2; jax_flashmla/sparse.py), the sm90 sparse kernel + the sparse combine.
//
// Operands                                      Results
//   q                   BF16[b, s_q, h_q, 576]     out        BF16[b, s_q, h_q, 512]
//   k_cache             U8[nb, bs, 1, 656]         lse        F32[b, h_q, s_q]
//                       (F8E4M3FN accepted too)    lse_accum  F32[b * s_q + P, 1, h_q]
//   indices             S32[b, s_q, topk]          o_accum    F32[b * s_q + P, 1, h_q, 512]
//   req_lens            S32[b * s_q]
//   attn_sink           F32[h_q]                   (-inf: no sink)
//   tile_scheduler_metadata S32[P, 8]
//   num_splits          S32[b * s_q + 1]
// Attribute: softmax_scale (f32).
// req_lens[i * s_q + s] is the number of index slots query token (i, s) uses (Python passes
// clip(topk_length[i], 0, topk)); the records are get_mla_metadata's for those lengths, with
// h_q query rows and one KV head. lse_accum / o_accum are the split-KV partials (results, not
// scratch: XLA frees scratch before the kernels run).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi/ffi_helpers.h"
#include "ffi/handlers.h"
#include "kernels/launch.h"
#include "kernels/params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {
namespace {

constexpr const char* kTarget = kMlaSparseDecodeTarget;

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument(std::string(kTarget) + ": " + message);
}

ffi::Error MlaSparseDecodeImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16, 4> q,
                               ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32, 3> indices,
                               ffi::Buffer<ffi::S32, 1> req_lens,
                               ffi::Buffer<ffi::F32, 1> attn_sink,
                               ffi::Buffer<ffi::S32, 2> sched,
                               ffi::Buffer<ffi::S32, 1> num_splits,
                               ffi::ResultBuffer<ffi::BF16, 4> out,
                               ffi::ResultBuffer<ffi::F32, 3> lse,
                               ffi::ResultBuffer<ffi::F32, 3> lse_accum,
                               ffi::ResultBuffer<ffi::F32, 4> o_accum, float softmax_scale) {
  if (k_cache.element_type() != ffi::DataType::U8 &&
      k_cache.element_type() != ffi::DataType::F8E4M3FN) {
    return Invalid("k_cache must have dtype U8 or F8E4M3FN (FP8 rows of 656 bytes), got " +
                   DataTypeName(k_cache.element_type()));
  }
  JFM_RETURN_IF_ERROR(CheckRank(kTarget, "k_cache", k_cache.dimensions(), 4));

  const auto q_dims = q.dimensions();
  const int64_t b = q_dims[0], s_q = q_dims[1], h_q = q_dims[2];
  const auto k_dims = k_cache.dimensions();
  const int64_t num_blocks = k_dims[0], block_size = k_dims[1];
  const int64_t topk = indices.dimensions()[2];
  const int64_t num_sm_parts = sched.dimensions()[0];
  const int64_t requests = b * s_q;
  const int64_t slots = requests + num_sm_parts;

  if (num_sm_parts < 1 || num_sm_parts > kMaxSplits) {
    return Invalid("tile_scheduler_metadata must have 1.." + std::to_string(kMaxSplits) +
                   " rows (num_sm_parts), got " + DimsToString(sched.dimensions()));
  }
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "q", q_dims, {b, s_q, h_q, kHeadDimK}));
  JFM_RETURN_IF_ERROR(
      CheckDims(kTarget, "k_cache", k_dims, {num_blocks, block_size, 1, kFp8RowBytes}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "indices", indices.dimensions(), {b, s_q, topk}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "req_lens", req_lens.dimensions(), {requests}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "attn_sink", attn_sink.dimensions(), {h_q}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "tile_scheduler_metadata", sched.dimensions(),
                                {num_sm_parts, 8}));
  JFM_RETURN_IF_ERROR(
      CheckDims(kTarget, "num_splits", num_splits.dimensions(), {requests + 1}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "out", out->dimensions(), {b, s_q, h_q, kHeadDimV}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "lse", lse->dimensions(), {b, h_q, s_q}));
  JFM_RETURN_IF_ERROR(
      CheckDims(kTarget, "lse_accum", lse_accum->dimensions(), {slots, 1, h_q}));
  JFM_RETURN_IF_ERROR(
      CheckDims(kTarget, "o_accum", o_accum->dimensions(), {slots, 1, h_q, kHeadDimV}));

  // The kernels index with int32 sizes (and int64 offsets). The scheduler's page costs stay
  // exact while requests * (blocks per request + 5) fits (sched_cost_pages, params.h).
  const int64_t max_blocks = (topk + kPageSize - 1) / kPageSize;
  if (!FitsInt32(slots + 1) || !FitsInt32(h_q) || !FitsInt32(topk) ||
      !FitsInt32(num_blocks * block_size) || !FitsInt32(max_blocks * kPageSize) ||
      !FitsInt32(requests * (max_blocks + kFixedOverheadBlocks))) {
    return Invalid("sizes exceed int32 (b * s_q + num_sm_parts, h_q, topk, "
                   "num_blocks * block_size and b * s_q * (ceil(topk / 64) + 5) must fit); got "
                   "q " + DimsToString(q_dims) + ", k_cache " + DimsToString(k_dims) +
                   ", indices " + DimsToString(indices.dimensions()));
  }
  if (requests == 0 || h_q == 0) return ffi::Error::Success();

  SparseDecodeParams params;
  DecodeParams& p = params.base;
  p.q = q.typed_data();
  p.k_cache = k_cache.untyped_data();
  p.block_table = nullptr;
  p.seqlens = req_lens.typed_data();
  p.sched = reinterpret_cast<const SchedRecord*>(sched.typed_data());
  p.num_splits = num_splits.typed_data();
  p.out = out->typed_data();
  p.lse = lse->typed_data();
  p.lse_accum = lse_accum->typed_data();
  p.o_accum = o_accum->typed_data();
  p.b = static_cast<int>(requests);
  p.s_q = 1;
  p.h_q = static_cast<int>(h_q);
  p.h_kv = 1;
  p.g = static_cast<int>(h_q);
  p.q_rows = static_cast<int>(h_q);
  p.num_m_blocks = static_cast<int>((h_q + kBlockM - 1) / kBlockM);
  p.num_blocks = static_cast<int>(num_blocks);
  p.max_blocks = static_cast<int>(max_blocks);
  p.num_sm_parts = static_cast<int>(num_sm_parts);
  p.scale = softmax_scale;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;  // log2(e)
  p.causal = false;
  p.elem_type = ElemType::kBF16;
  p.cache_format = CacheFormat::kFp8;
  params.indices = indices.typed_data();
  params.attn_sink = attn_sink.typed_data();
  params.topk = static_cast<int>(topk);
  params.s_q = static_cast<int>(s_q);
  params.num_tokens = static_cast<int32_t>(num_blocks * block_size);
  return CudaStatusToError(launch_sparse_decode(params, stream), "mla_sparse_decode kernel launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kMlaSparseDecode, MlaSparseDecodeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::BufferR4<ffi::BF16>>()  // q
                           .Arg<ffi::AnyBuffer>()            // k_cache: U8 or F8E4M3FN rows
                           .Arg<ffi::BufferR3<ffi::S32>>()   // indices
                           .Arg<ffi::BufferR1<ffi::S32>>()   // req_lens
                           .Arg<ffi::BufferR1<ffi::F32>>()   // attn_sink
                           .Arg<ffi::BufferR2<ffi::S32>>()   // tile_scheduler_metadata
                           .Arg<ffi::BufferR1<ffi::S32>>()   // num_splits
                           .Ret<ffi::BufferR4<ffi::BF16>>()  // out
                           .Ret<ffi::BufferR3<ffi::F32>>()   // lse
                           .Ret<ffi::BufferR3<ffi::F32>>()   // lse_accum
                           .Ret<ffi::BufferR4<ffi::F32>>()   // o_accum
                           .Attr<float>("softmax_scale"),
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_Handler* MlaSparseDecodeHandler() { return kMlaSparseDecode; }

}  // namespace jax_flashmla
