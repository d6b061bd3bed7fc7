// Host side of TMA: the driver's cuTensorMapEncodeTiled, which builds the descriptors (each
// kernel family encodes its own: its tensor's shape, box and swizzle), and a per-thread cache of
// encoded descriptors.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace jax_flashmla {
namespace sm90 {

// Found through the runtime once per process, so that we need not link libcuda; null if the
// driver does not have it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// Encoded descriptors, kept per host thread so that a decode loop, which passes the same few
// tensors (one cache per layer) call after call, encodes each once instead of on every call
// (bench_kernels --floor times both). A key must hold everything the encode reads: then a hit is
// exactly what encoding would give. Descriptors go to kernels by value, so reusing one is safe
// under CUDA-graph capture too. Use one thread_local instance per kind of descriptor.
//
// Lookups start at the slot after the last hit (layers come in the same order every step); a
// miss encodes into the next free slot, or over a pseudo-random one when all kSlots are taken
// (random, not least recently used: more tensors than slots, visited in a cycle, then still hit
// about kSlots / tensors of the time instead of never).
template <int kSlots>
class TensorMapCache {
 public:
  struct Key {
    const void* base;  // global address
    uint64_t shape;    // the rest of what the encode reads, packed by the caller
    bool operator==(const Key& o) const { return base == o.base && shape == o.shape; }
  };

  // The descriptor for `key`: cached, or made by encode(CUtensorMap*) -> cudaError_t (a failed
  // encode is returned and not cached).
  template <class Encode>
  cudaError_t get(const Key& key, Encode&& encode, const CUtensorMap** map) {
    for (int i = 0; i < filled_; ++i) {
      int slot = hint_ + i;
      if (slot >= filled_) slot -= filled_;
      if (keys_[slot] == key) {
        hint_ = slot + 1 < filled_ ? slot + 1 : 0;
        *map = &maps_[slot];
        return cudaSuccess;
      }
    }
    CUtensorMap encoded;
    const cudaError_t err = encode(&encoded);
    if (err != cudaSuccess) return err;
    int slot = filled_;
    if (filled_ == kSlots) {
      rng_ = rng_ * 1664525u + 1013904223u;  // an LCG: its high bits are random enough here
      slot = static_cast<int>((rng_ >> 16) % kSlots);
    }
    maps_[slot] = encoded;
    keys_[slot] = key;
    if (slot == filled_) ++filled_;
    hint_ = slot + 1 < filled_ ? slot + 1 : 0;
    *map = &maps_[slot];
    return cudaSuccess;
  }

 private:
  // All zero at first, so that a thread_local instance needs no initialisation image.
  CUtensorMap maps_[kSlots];
  Key keys_[kSlots];
  int filled_ = 0;  // slots [0, filled_) hold valid entries
  int hint_ = 0;
  uint32_t rng_ = 0;
};

}  // namespace sm90
}  // namespace jax_flashmla
