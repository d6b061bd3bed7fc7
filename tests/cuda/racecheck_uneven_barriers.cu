// Why compute-sanitizer's racecheck reports races in decode_narrow_kernel: a race-free
// program that racecheck (CUDA 13, H200) flags the same way.
//
//   compute-sanitizer --tool racecheck build/tools/racecheck_uneven_barriers
// (built by CMake with JAX_FLASHMLA_BUILD_TOOLS=ON, see benchmarks/cuda/run_device.sh)
//
// Each warpgroup loops over its own named barrier (ids 1 and 2, 128 threads), then the whole
// block exchanges values across __syncthreads. Every shared access is ordered by a barrier.
// With both groups passing the same number of named-barrier phases, racecheck reports nothing;
// when group 1 passes more phases than group 0 (the narrow kernel's groups walk their own page
// sequences, so their counts differ), or when three warps only arrive at a barrier the fourth
// waits on, it reports races between accesses that a __syncthreads separates (session 6:
// `uneven` at the lines after the loop, `arrive` also inside it; `even`: 0. That run used a
// scratch copy of this program, the same kernel with other names).
#include <cstdio>

__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

template <bool kArrive, int kExtraPhasesGroup1>
__global__ void pattern(float* out, int iters) {
  __shared__ float red[2 * 64];
  __shared__ float all[32];
  const int warp = threadIdx.x / 32 % 4, wg = threadIdx.x / 128, lane = threadIdx.x % 32;
  float acc = 0.f;
  for (int round = 0; round < 3; ++round) {
    for (int it = 0; it < iters + kExtraPhasesGroup1 * wg; ++it) {
      if (lane < 4) red[wg * 64 + warp * 16 + lane] = it + lane;
      bar_sync(1 + wg, 128);
      acc += red[wg * 64 + (warp + 1) % 4 * 16 + lane % 4];
      bar_sync(1 + wg, 128);  // the reads above are done before the next writes
      if (kArrive && warp != 0) {
        bar_arrive(3 + wg, 128);
      } else {
        bar_sync(3 + wg, 128);
      }
    }
    if (lane < 4) all[wg * 16 + warp * 4 + lane] = acc;
    __syncthreads();
    acc += all[threadIdx.x * 7 % 32];
    __syncthreads();
  }
  out[threadIdx.x] = acc;
}

int main() {
  float* d = nullptr;
  cudaMalloc(&d, 256 * sizeof(float));
  pattern<false, 0><<<4, 256>>>(d, 5);
  std::printf("even: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  pattern<false, 3><<<4, 256>>>(d, 5);
  std::printf("uneven: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  pattern<true, 0><<<4, 256>>>(d, 5);
  std::printf("arrive: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  cudaFree(d);
  return 0;
}
