// The XLA FFI handlers this module exports, by custom-call target name. module.cc wraps each
// pointer in a PyCapsule for jax.ffi.register_ffi_target; the names are a contract with the
// Python package (versioned: a changed signature gets a new name, old ones stay registered).
// No CUDA here: module.cc includes this in CPU-only builds too, for constants().
#pragma once

#include "xla/ffi/api/c_api.h"

namespace jax_flashmla {

inline constexpr char kMlaMetadataTarget[] = "jax_flashmla_mla_metadata_v1";
inline constexpr char kMlaDecodeTarget[] = "jax_flashmla_mla_decode_v1";
inline constexpr char kMlaSparseDecodeTarget[] = "jax_flashmla_mla_sparse_decode_v1";

XLA_FFI_Handler* MlaMetadataHandler();  // mla_metadata.cc
XLA_FFI_Handler* MlaDecodeHandler();    // mla_decode.cc
XLA_FFI_Handler* MlaSparseDecodeHandler();  // mla_sparse_decode.cc

}  // namespace jax_flashmla
