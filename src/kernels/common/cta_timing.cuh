// The kernels' only instrumentation hook. A kernel names JFM_CTA_TIMING() once, as its first
// statement. In the timing build of the tools (JFM_TIMING defined; benchmarks/cuda's
// bench_kernels_timing) thread 0 of each CTA then records, on the global timer, when the CTA
// started and when it returned (on every return path), and which SM ran it: to see how evenly
// the scheduler's parts finish. In every other build the hook is empty and the kernels compile
// as if it were not there.
#pragma once

#if defined(JFM_TIMING)
#include <cuda_runtime.h>

#include <cstddef>

namespace jax_flashmla {

constexpr int kTimedCtas = 65536;    // CTAs past this (CTA-linear index) are not recorded
constexpr int kCtaTimingFields = 3;  // per CTA: start ns, end ns, SM id

// One copy per translation unit (the kernels are not device-linked): read it back with
// read_cta_timing from the .cu file that launches the kernels.
static __device__ unsigned long long g_cta_timing[kCtaTimingFields * kTimedCtas];

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");  // an ordering point
  return t;
}

// Records the start when constructed and the end when the kernel returns.
class CtaTimer {
 public:
  __device__ CtaTimer() {
    if (recorded()) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      slot()[0] = global_timer_ns();
      slot()[2] = sm;
    }
  }
  __device__ ~CtaTimer() {
    if (recorded()) slot()[1] = global_timer_ns();
  }

 private:
  __device__ static unsigned cta() {
    return (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  }
  __device__ static bool recorded() { return threadIdx.x == 0 && cta() < kTimedCtas; }
  __device__ static unsigned long long* slot() { return g_cta_timing + kCtaTimingFields * cta(); }
};

// (start, end, SM) of CTAs 0..ctas-1 of the last launch, from this translation unit's copy.
static inline cudaError_t read_cta_timing(unsigned long long* host, size_t ctas) {
  return cudaMemcpyFromSymbol(host, g_cta_timing, ctas * kCtaTimingFields * sizeof(*host));
}

}  // namespace jax_flashmla

#define JFM_CTA_TIMING() ::jax_flashmla::CtaTimer jfm_cta_timer_
#else
#define JFM_CTA_TIMING()
#endif
