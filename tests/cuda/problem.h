// Host helpers shared by the standalone checker (tests/cuda/check_decode.cu) and the kernel
// benchmark (benchmarks/cuda/bench_kernels.cu): CUDA error checks, a stream wait that reports a
// hang instead of hanging, and one decode call as the library makes it: the device buffers the
// FFI handler gets from XLA, the DecodeParams that describe them, and the scheduler records from
// the shipped scheduler (launch_sched). Both tools then call the shipped launchers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "kernels/launch.h"
#include "kernels/params.h"

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, \
                  #x);                                                                      \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

namespace jax_flashmla {

// Waits for `stream`; a CUDA error exits with status 2, and work still running after `seconds`
// exits with status 3 ("HANG"; run_device.sh then reruns the watchdog build).
inline void wait_or_die(cudaStream_t stream, double seconds, const char* what) {
  const auto t0 = std::chrono::steady_clock::now();
  while (true) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      std::printf("CUDA error %s while running %s\n", cudaGetErrorString(e), what);
      std::exit(2);
    }
    const double dt =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > seconds) {
      std::printf("HANG: %s did not finish in %.0f s\n", what, seconds);
      std::fflush(stdout);
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

inline int num_sms() {
  static const int n = [] {
    int dev = 0, v = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

// The sizes of a decode call that are not read from a buffer.
struct CallShape {
  int b = 1, s_q = 1, h_q = 16, h_kv = 1;
  bool causal = false;
  float scale = 0.f;  // softmax scale
  int parts = 0;      // num_sm_parts; 0: max(num_SMs / h_kv / num_m_blocks, 1), one wave
  ElemType elem = ElemType::kBF16;  // of q, k_cache and out
};

// One decode call over a query block and a paged cache the caller owns on the device:
// q [b, s_q, h_q, 576] and k_cache [num_blocks, 64, h_kv, 576], bf16 or f16 (CallShape::elem).
struct DecodeCall {
  DecodeParams p{};
  std::vector<SchedRecord> recs;  // host copies, after schedule()
  std::vector<int> num_splits;
  size_t n_out = 0, n_lse = 0, n_acc_rows = 0;  // elements of out, lse, rows of the partials

  // Allocates the other buffers, uploads the block table [b, max_blocks] and lengths [b], and
  // fills p as the FFI handler does.
  void init(const void* d_q, const void* d_kv, int num_blocks, const std::vector<int>& block_table,
            int max_blocks, const std::vector<int>& lens, const CallShape& s) {
    const int g = s.h_q / s.h_kv;
    const int q_rows = s.s_q * g;
    const int m_blocks = (q_rows + kBlockM - 1) / kBlockM;
    const int parts = s.parts > 0 ? s.parts : std::max(num_sms() / s.h_kv / m_blocks, 1);
    n_out = static_cast<size_t>(s.b) * s.s_q * s.h_q * kHeadDimV;
    n_lse = static_cast<size_t>(s.b) * s.h_q * s.s_q;
    n_acc_rows = static_cast<size_t>(s.b + parts) * s.h_kv * q_rows;
    int *bt, *seqlens, *splits;
    SchedRecord* sched;
    void* out;
    float *lse, *lse_accum, *o_accum;
    CK(cudaMalloc(&bt, block_table.size() * 4 + 4));
    CK(cudaMalloc(&seqlens, s.b * 4));
    CK(cudaMalloc(&splits, (s.b + 1) * 4));
    CK(cudaMalloc(&sched, parts * sizeof(SchedRecord)));
    CK(cudaMalloc(&out, n_out * 2));
    CK(cudaMalloc(&lse, n_lse * 4));
    CK(cudaMalloc(&lse_accum, n_acc_rows * 4));
    CK(cudaMalloc(&o_accum, n_acc_rows * kHeadDimV * 4));
    CK(cudaMemcpy(bt, block_table.data(), block_table.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(seqlens, lens.data(), s.b * 4, cudaMemcpyHostToDevice));
    p.q = d_q;
    p.k_cache = d_kv;
    p.block_table = bt;
    p.seqlens = seqlens;
    p.sched = sched;
    p.num_splits = splits;
    p.out = out;
    p.lse = lse;
    p.lse_accum = lse_accum;
    p.o_accum = o_accum;
    p.b = s.b;
    p.s_q = s.s_q;
    p.h_q = s.h_q;
    p.h_kv = s.h_kv;
    p.g = g;
    p.q_rows = q_rows;
    p.num_m_blocks = m_blocks;
    p.num_blocks = num_blocks;
    p.max_blocks = max_blocks;
    p.num_sm_parts = parts;
    p.scale = s.scale;
    p.scale_log2 = s.scale * 1.4426950408889634f;  // log2(e)
    p.causal = s.causal;
    p.elem_type = s.elem;
  }

  // The shipped scheduler on `stream` (as the metadata handler runs it); then the records and
  // num_splits are copied back for the tools' reports.
  void schedule(cudaStream_t stream) {
    SchedParams sp;
    sp.seqlens = p.seqlens;
    sp.sched = const_cast<SchedRecord*>(p.sched);
    sp.num_splits = const_cast<int32_t*>(p.num_splits);
    sp.b = p.b;
    sp.max_blocks = 0;  // unused by the scheduler, as in the handler
    sp.num_sm_parts = p.num_sm_parts;
    CK(launch_sched(sp, stream));
    wait_or_die(stream, 10.0, "launch_sched");
    recs.resize(p.num_sm_parts);
    num_splits.resize(p.b + 1);
    CK(cudaMemcpy(recs.data(), p.sched, recs.size() * sizeof(SchedRecord),
                  cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(num_splits.data(), p.num_splits, num_splits.size() * 4,
                  cudaMemcpyDeviceToHost));
  }

  // NaN into every output and partial, so that an element no kernel writes fails a comparison.
  void poison(cudaStream_t stream) const {
    CK(cudaMemsetAsync(p.out, 0xff, n_out * 2, stream));
    CK(cudaMemsetAsync(p.lse, 0xff, n_lse * 4, stream));
    CK(cudaMemsetAsync(p.lse_accum, 0xff, n_acc_rows * 4, stream));
    CK(cudaMemsetAsync(p.o_accum, 0xff, n_acc_rows * kHeadDimV * 4, stream));
  }

  void free() {
    cudaFree(const_cast<int32_t*>(p.block_table));
    cudaFree(const_cast<int32_t*>(p.seqlens));
    cudaFree(const_cast<int32_t*>(p.num_splits));
    cudaFree(const_cast<SchedRecord*>(p.sched));
    cudaFree(p.out);
    cudaFree(p.lse);
    cudaFree(p.lse_accum);
    cudaFree(p.o_accum);
  }
};

}  // namespace jax_flashmla
