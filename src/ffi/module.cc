// The compiled half of jax_flashmla: a nanobind module, jax_flashmla._ext, that hands the FFI
// handlers to Python. It does not register anything itself; the Python package calls
// jax.ffi.register_ffi_target(name, capsule, platform="CUDA") for each entry of registrations().
//
// Built without CUDA (JAX_FLASHMLA_WITH_CUDA undefined) the module still imports, exports no
// handlers, and says so in build_info(), so the pure-JAX path and its tests work everywhere.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>  // std::string <-> str

#include <cstdint>
#include <string>

#include "ffi/handlers.h"
#include "kernels/params.h"
#include "xla/ffi/api/c_api.h"

#ifdef JAX_FLASHMLA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace nb = nanobind;

namespace {

nb::dict Registrations() {
  nb::dict handlers;
#ifdef JAX_FLASHMLA_WITH_CUDA
  // jax.ffi.register_ffi_target accepts a PyCapsule holding the handler's function pointer.
  handlers[jax_flashmla::kMlaMetadataTarget] =
      nb::capsule(reinterpret_cast<void*>(jax_flashmla::MlaMetadataHandler()));
  handlers[jax_flashmla::kMlaDecodeTarget] =
      nb::capsule(reinterpret_cast<void*>(jax_flashmla::MlaDecodeHandler()));
  handlers[jax_flashmla::kMlaSparseDecodeTarget] =
      nb::capsule(reinterpret_cast<void*>(jax_flashmla::MlaSparseDecodeHandler()));
#endif
  return handlers;
}

nb::dict BuildInfo() {
  nb::dict info;
#ifdef JAX_FLASHMLA_WITH_CUDA
  info["cuda"] = true;
  // CUDART_VERSION is major * 1000 + minor * 10 of the toolkit we compiled and linked against.
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_archs"] = JAX_FLASHMLA_CUDA_ARCHS;
  // The element types of q, k_cache and out the kernels are built for (ElemType in params.h),
  // by their JAX names.
  nb::list dtypes;
  dtypes.append("bfloat16");
  dtypes.append("float16");
  info["kernel_dtypes"] = dtypes;
  // The cache formats the kernels read (CacheFormat in params.h): rows of q's dtype, FP8 rows.
  nb::list formats;
  formats.append("bf16");
  formats.append("fp8");
  info["kv_formats"] = formats;
  // The operations with kernels, by FFI target (the pure-JAX path serves the others).
  nb::list targets;
  targets.append(jax_flashmla::kMlaMetadataTarget);
  targets.append(jax_flashmla::kMlaDecodeTarget);
  targets.append(jax_flashmla::kMlaSparseDecodeTarget);
  info["kernel_targets"] = targets;
#else
  info["cuda"] = false;
  info["cuda_version"] = nb::none();
  info["cuda_archs"] = "";
#endif
  // The FFI API version our handlers declare; XLA refuses handlers newer than itself.
  info["xla_ffi_api"] =
      std::to_string(XLA_FFI_API_MAJOR) + "." + std::to_string(XLA_FFI_API_MINOR);
  info["jaxlib_headers"] = JAX_FLASHMLA_JAXLIB_VERSION;
  return info;
}

// The layout facts the Python package must agree with, read from their C++ sources of truth
// (params.h, handlers.h) so that a test can compare. Plain C++: present without CUDA too.
nb::dict Constants() {
  namespace jfm = jax_flashmla;
  nb::dict c;
  c["head_dim_k"] = jfm::kHeadDimK;
  c["head_dim_v"] = jfm::kHeadDimV;
  c["page_size"] = jfm::kPageSize;
  c["block_m"] = jfm::kBlockM;
  c["max_sm_parts"] = jfm::kMaxSplits;
  c["sched_record_ints"] = static_cast<int>(sizeof(jfm::SchedRecord) / sizeof(int32_t));
  c["fixed_overhead_blocks"] = jfm::kFixedOverheadBlocks;
  c["metadata_target"] = jfm::kMlaMetadataTarget;
  c["decode_target"] = jfm::kMlaDecodeTarget;
  c["sparse_decode_target"] = jfm::kMlaSparseDecodeTarget;
  c["fp8_row_bytes"] = jfm::kFp8RowBytes;
  c["fp8_scale_offset"] = jfm::kFp8ScaleOffset;
  c["fp8_rope_offset"] = jfm::kFp8RopeOffset;
  c["fp8_tile_cols"] = jfm::kFp8TileCols;
  return c;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "jax_flashmla compiled extension: XLA FFI handlers for paged MLA decode.";
  m.def("registrations", &Registrations,
        "Dict of XLA FFI target name -> PyCapsule handler (empty without CUDA).");
  m.def("build_info", &BuildInfo,
        "Dict describing this build: cuda, cuda_version, cuda_archs, kernel_dtypes (CUDA "
        "builds), kv_formats (CUDA builds), kernel_targets (CUDA builds), xla_ffi_api, "
        "jaxlib_headers.");
  m.def("constants", &Constants,
        "Dict of the layout constants the kernels are built with: head_dim_k, head_dim_v, "
        "page_size, block_m, max_sm_parts, sched_record_ints, fixed_overhead_blocks, "
        "metadata_target, decode_target, sparse_decode_target, fp8_row_bytes, fp8_scale_offset, fp8_rope_offset, "
        "fp8_tile_cols.");
}
