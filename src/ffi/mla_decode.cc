// FFI handler "jax_flashmla_mla_decode_v1": paged MLA decode (split-KV kernel + combine).
//
// Operands                                    Results
//   q                     E[b, s_q, h_q, 576]        out       E[b, s_q, h_q, 512]
//   k_cache               E[nb, 64, h_kv, 576]       lse       F32[b, h_q, s_q]
//                      or U8[nb, 64, h_kv, 656]  (FP8 rows, params.h; F8E4M3FN accepted too)
//   block_table           S32[b, max_blocks]         lse_accum F32[b + P, h_kv, q_rows]
//   cache_seqlens         S32[b]                     o_accum   F32[b + P, h_kv, q_rows, 512]
//   tile_scheduler_metadata S32[P, 8]
//   num_splits            S32[b + 1]
// Attributes: softmax_scale (f32), causal (pred). q_rows = s_q * h_q / h_kv.
// E is BF16 or F16, the same for q, k_cache and out; with an FP8 cache (recognised by its byte
// dtype) E is BF16. The three are decoded as untyped buffers and their dtypes checked here, so
// that the target name (and programs exported before F16 and FP8 existed) stays the same.
//
// lse_accum / o_accum are the split-KV partials. They are results rather than scratch because
// XLA's scratch memory is released when the handler returns, before the kernels have run.
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

constexpr const char* kTarget = kMlaDecodeTarget;
constexpr int64_t kMaxGridYZ = 65535;

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument(std::string(kTarget) + ": " + message);
}

ffi::Error MlaDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                         ffi::Buffer<ffi::S32, 2> block_table,
                         ffi::Buffer<ffi::S32, 1> cache_seqlens,
                         ffi::Buffer<ffi::S32, 2> sched, ffi::Buffer<ffi::S32, 1> num_splits,
                         ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32, 3> lse,
                         ffi::ResultBuffer<ffi::F32, 3> lse_accum,
                         ffi::ResultBuffer<ffi::F32, 4> o_accum, float softmax_scale,
                         bool causal) {
  // The untyped buffers' dtypes and ranks (XLA checks the typed ones while decoding).
  ElemType elem_type;
  switch (q.element_type()) {
    case ffi::DataType::BF16:
      elem_type = ElemType::kBF16;
      break;
    case ffi::DataType::F16:
      elem_type = ElemType::kF16;
      break;
    default:
      return Invalid("q must have dtype BF16 or F16, got " + DataTypeName(q.element_type()));
  }
  // A byte cache holds FP8 rows; the kernels read them against a bf16 query.
  const bool fp8 = k_cache.element_type() == ffi::DataType::U8 ||
                   k_cache.element_type() == ffi::DataType::F8E4M3FN;
  if (fp8 && elem_type != ElemType::kBF16) {
    return Invalid("q must have dtype BF16 with an FP8 cache, got " +
                   DataTypeName(q.element_type()));
  }
  if (!fp8) {
    JFM_RETURN_IF_ERROR(
        CheckDtypeOfQ(kTarget, "k_cache", k_cache.element_type(), q.element_type()));
  }
  JFM_RETURN_IF_ERROR(CheckDtypeOfQ(kTarget, "out", out->element_type(), q.element_type()));
  JFM_RETURN_IF_ERROR(CheckRank(kTarget, "q", q.dimensions(), 4));
  JFM_RETURN_IF_ERROR(CheckRank(kTarget, "k_cache", k_cache.dimensions(), 4));
  JFM_RETURN_IF_ERROR(CheckRank(kTarget, "out", out->dimensions(), 4));

  // Sizes are read from q, k_cache, block_table and the metadata; everything else must agree.
  const auto q_dims = q.dimensions();
  const int64_t b = q_dims[0], s_q = q_dims[1], h_q = q_dims[2];
  const auto k_dims = k_cache.dimensions();
  const int64_t num_blocks = k_dims[0], h_kv = k_dims[2];
  const int64_t max_blocks = block_table.dimensions()[1];
  const int64_t num_sm_parts = sched.dimensions()[0];

  if (h_kv < 1 || h_kv > kMaxGridYZ) {
    return Invalid("k_cache must have 1.." + std::to_string(kMaxGridYZ) +
                   " kv heads (dim 2), got " + DimsToString(k_dims));
  }
  if (h_q % h_kv != 0) {
    return Invalid("h_q (" + std::to_string(h_q) + ") must be a multiple of h_kv (" +
                   std::to_string(h_kv) + ")");
  }
  if (num_sm_parts < 1 || num_sm_parts > kMaxSplits) {
    return Invalid("tile_scheduler_metadata must have 1.." + std::to_string(kMaxSplits) +
                   " rows (num_sm_parts), got " + DimsToString(sched.dimensions()));
  }
  const int64_t g = h_q / h_kv;
  const int64_t q_rows = s_q * g;
  const int64_t slots = b + num_sm_parts;

  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "q", q_dims, {b, s_q, h_q, kHeadDimK}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "k_cache", k_dims, {num_blocks, kPageSize, h_kv,
                                                             fp8 ? kFp8RowBytes : kHeadDimK}));
  JFM_RETURN_IF_ERROR(
      CheckDims(kTarget, "block_table", block_table.dimensions(), {b, max_blocks}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "cache_seqlens", cache_seqlens.dimensions(), {b}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "tile_scheduler_metadata", sched.dimensions(),
                                {num_sm_parts, 8}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "num_splits", num_splits.dimensions(), {b + 1}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "out", out->dimensions(), {b, s_q, h_q, kHeadDimV}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "lse", lse->dimensions(), {b, h_q, s_q}));
  JFM_RETURN_IF_ERROR(
      CheckDims(kTarget, "lse_accum", lse_accum->dimensions(), {slots, h_kv, q_rows}));
  JFM_RETURN_IF_ERROR(CheckDims(kTarget, "o_accum", o_accum->dimensions(),
                                {slots, h_kv, q_rows, kHeadDimV}));

  // The kernels index with int32 sizes (and int64 offsets).
  // b * (max_blocks + 5) < 2^31 is what keeps the scheduler's capped page costs exact
  // (sched_cost_pages in params.h).
  if (!FitsInt32(slots + 1) || !FitsInt32(s_q) || !FitsInt32(h_q) || !FitsInt32(q_rows) ||
      !FitsInt32(num_blocks) || !FitsInt32(max_blocks * kPageSize) ||
      !FitsInt32(b * (max_blocks + kFixedOverheadBlocks))) {
    return Invalid("sizes exceed int32 (b + num_sm_parts, s_q, h_q, s_q * h_q / h_kv, "
                   "num_blocks, max_blocks * 64 and b * (max_blocks + 5) must fit); got q " +
                   DimsToString(q_dims) + ", k_cache " + DimsToString(k_dims) +
                   ", block_table " + DimsToString(block_table.dimensions()));
  }
  // Nothing to compute: launching would mean an empty grid.
  if (b == 0 || q_rows == 0) return ffi::Error::Success();

  DecodeParams params;
  params.q = q.untyped_data();
  params.k_cache = k_cache.untyped_data();
  params.block_table = block_table.typed_data();
  params.seqlens = cache_seqlens.typed_data();
  params.sched = reinterpret_cast<const SchedRecord*>(sched.typed_data());
  params.num_splits = num_splits.typed_data();
  params.out = out->untyped_data();
  params.lse = lse->typed_data();
  params.lse_accum = lse_accum->typed_data();
  params.o_accum = o_accum->typed_data();
  params.b = static_cast<int>(b);
  params.s_q = static_cast<int>(s_q);
  params.h_q = static_cast<int>(h_q);
  params.h_kv = static_cast<int>(h_kv);
  params.g = static_cast<int>(g);
  params.q_rows = static_cast<int>(q_rows);
  params.num_m_blocks = static_cast<int>((q_rows + kBlockM - 1) / kBlockM);
  params.num_blocks = static_cast<int>(num_blocks);
  params.max_blocks = static_cast<int>(max_blocks);
  params.num_sm_parts = static_cast<int>(num_sm_parts);
  params.scale = softmax_scale;
  params.scale_log2 = softmax_scale * 1.4426950408889634f;  // log2(e)
  params.causal = causal;
  params.elem_type = elem_type;
  params.cache_format = fp8 ? CacheFormat::kFp8 : CacheFormat::kRows;
  return CudaStatusToError(launch_decode(params, stream), "mla_decode kernel launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kMlaDecode, MlaDecodeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()            // q: BF16 or F16
                           .Arg<ffi::AnyBuffer>()            // k_cache: q's dtype, or FP8 rows
                           .Arg<ffi::BufferR2<ffi::S32>>()   // block_table
                           .Arg<ffi::BufferR1<ffi::S32>>()   // cache_seqlens
                           .Arg<ffi::BufferR2<ffi::S32>>()   // tile_scheduler_metadata
                           .Arg<ffi::BufferR1<ffi::S32>>()   // num_splits
                           .Ret<ffi::AnyBuffer>()            // out: q's dtype
                           .Ret<ffi::BufferR3<ffi::F32>>()   // lse
                           .Ret<ffi::BufferR3<ffi::F32>>()   // lse_accum
                           .Ret<ffi::BufferR4<ffi::F32>>()   // o_accum
                           .Attr<float>("softmax_scale")
                           .Attr<bool>("causal"),
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_Handler* MlaDecodeHandler() { return kMlaDecode; }

}  // namespace jax_flashmla
