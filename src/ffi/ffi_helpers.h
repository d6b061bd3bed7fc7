// Helpers shared by the XLA FFI handlers: turning CUDA errors and shape mismatches into
// ffi::Error values, which XLA reports to Python as an XlaRuntimeError carrying our message.
//
// Background for readers new to XLA FFI: a handler is a plain C++ function whose typed arguments
// (buffers, attributes, the CUDA stream) are decoded by XLA from the custom call. Dtype and rank
// of each Buffer<dtype, rank> are checked during decoding, before our code runs; the relations
// between dimensions are ours to check, which is what CheckDims is for.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {
namespace ffi = ::xla::ffi;

// Success, or an Internal error naming the step and CUDA's description of what went wrong.
inline ffi::Error CudaStatusToError(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + " failed: " +
                              cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(dims[i]);
  }
  return text + "]";
}

// InvalidArgument naming the buffer, the shape it must have, and the shape it has.
inline ffi::Error CheckDims(const char* target, const char* name, ffi::Span<const int64_t> got,
                            std::initializer_list<int64_t> expected) {
  bool same = got.size() == expected.size();
  for (size_t i = 0; same && i < got.size(); ++i) same = got[i] == expected.begin()[i];
  if (same) return ffi::Error::Success();
  std::string want = "[";
  for (auto it = expected.begin(); it != expected.end(); ++it) {
    if (it != expected.begin()) want += ", ";
    want += std::to_string(*it);
  }
  want += "]";
  return ffi::Error::InvalidArgument(std::string(target) + ": " + name + " must have shape " +
                                     want + ", got " + DimsToString(got));
}

// The name XLA gives a dtype in its messages (the FFI enum's names), for the ones a caller might
// pass; any other by number.
inline std::string DataTypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::PRED: return "PRED";
    case ffi::DataType::S8: return "S8";
    case ffi::DataType::S16: return "S16";
    case ffi::DataType::S32: return "S32";
    case ffi::DataType::S64: return "S64";
    case ffi::DataType::U8: return "U8";
    case ffi::DataType::U16: return "U16";
    case ffi::DataType::U32: return "U32";
    case ffi::DataType::U64: return "U64";
    case ffi::DataType::F16: return "F16";
    case ffi::DataType::F32: return "F32";
    case ffi::DataType::F64: return "F64";
    case ffi::DataType::BF16: return "BF16";
    case ffi::DataType::F8E4M3FN: return "F8E4M3FN";
    case ffi::DataType::F8E5M2: return "F8E5M2";
    default: return "dtype #" + std::to_string(static_cast<int>(dtype));
  }
}

// InvalidArgument naming the buffer, the dtype it must have (q's), and the dtype it has.
inline ffi::Error CheckDtypeOfQ(const char* target, const char* name, ffi::DataType got,
                                ffi::DataType q_dtype) {
  if (got == q_dtype) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(target) + ": " + name + " must have dtype " +
                                     DataTypeName(q_dtype) + " (the dtype of q), got " +
                                     DataTypeName(got));
}

// For untyped buffers (AnyBuffer), whose rank XLA does not check: InvalidArgument naming the
// buffer, the rank it must have and the shape it has.
inline ffi::Error CheckRank(const char* target, const char* name, ffi::Span<const int64_t> got,
                            size_t rank) {
  if (got.size() == rank) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(target) + ": " + name + " must have rank " +
                                     std::to_string(rank) + ", got shape " + DimsToString(got));
}

// Kernel parameters are int32; reject sizes that would not fit rather than wrap.
inline bool FitsInt32(int64_t value) {
  return value >= 0 && value <= std::numeric_limits<int32_t>::max();
}

}  // namespace jax_flashmla

// Returns from the enclosing handler if `expr` (an ffi::Error) is a failure.
#define JFM_RETURN_IF_ERROR(expr)                    \
  do {                                               \
    ::xla::ffi::Error jfm_error_ = (expr);           \
    if (jfm_error_.failure()) return jfm_error_;     \
  } while (0)
