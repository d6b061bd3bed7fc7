// What reading the memory corner's bytes costs on this card with no attention work at all: the
// floor under the decode kernel's memory-bound figures. Read-only kernels over the bytes of one
// decode call (b = 128 requests of mean length L, 64-token pages of 576 bf16 = 73,728 bytes,
// visited in a random page order as a block table does):
//   ldg      plain 16-byte loads, eight in flight per thread, 2048 threads per SM;
//   static   the decode kernel's pattern without its compute: one CTA per SM, each streaming an
//            equal share of the pages by bulk copy (cp.async.bulk) into `stages` page buffers;
//   dynamic  the same, but each CTA claims its next page from a global counter, so parts end
//            together whatever each SM's pace (the best any split of the work could do);
//   tma9     static, with the decode kernel's loads: nine 64x64 tiles per page through its TMA
//            descriptor (128-byte swizzle, L2 promotion 256 B), instead of one 72 KiB bulk copy;
//   tma9-p128, tma9-pnone  the same with L2 promotion 128 B / none;
//   tma72    the same smem layout from 72 boxes of 8 rows x 64 columns, issued 8 rows at a time
//            (all nine tiles of rows 8g..8g+7, i.e. 9 KiB of contiguous cache, then the next 8).
// Each is timed cold (20 calls after 1 s idle) and back to back under the board's power cap
// (--calls N, default 600), with the board's energy per call (NVML).
//
//   read_floor --len 8192 [--stages 2] [--hold-ns 0] [--calls 600]
// (built by CMake with JAX_FLASHMLA_BUILD_TOOLS=ON; STEPS=floor benchmarks/cuda/run_device.sh)
// (benchmarks/NOTES.md, v3.6, has what it found.)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "board_energy.h"
#include "kernels/sm90/ptx.cuh"
#include "kernels/sm90/tensor_map.h"

using namespace jax_flashmla::sm90;

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

constexpr int kPageBytes = 64 * 576 * 2;
constexpr int kMaxStages = 3;

__global__ void read_ldg(const uint4* __restrict__ p, size_t n16, unsigned* sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + 7 * stride < n16; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads live
}

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
      "[%0], [%1], %2, [%3], %4;" ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}

// One thread per page buffer (lane 0 of warp w owns buffer w, as each warpgroup of the narrow
// decode kernel owns one), each with its own page sequence; the rest of the decode kernel's work
// is left out, except that a buffer can be held `hold` clocks after its page arrives, as the
// kernel holds it for the page's compute. `boxes`: 0 loads a page by one bulk copy, 9 by its
// nine tiles and 72 by 8-row boxes, the last two through `tmap`. `counter` null: CTA i streams
// pages [i n / P, (i + 1) n / P) of `order`, buffer w every stages-th of them from the w-th; else
// each buffer claims pages one at a time (the counter is zeroed before each launch).
__global__ void __launch_bounds__(32 * kMaxStages, 1)
    read_pages(const __grid_constant__ CUtensorMap tmap, int boxes,
               const uint8_t* __restrict__ cache, const int* __restrict__ order, int n_pages,
               long long hold, unsigned* counter, unsigned* sink) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t bars[kMaxStages];
  // 1 KiB aligned, as the 128-byte swizzle of the tile loads needs.
  uint8_t* smem = smem_raw + (((smem_u32(smem_raw) + 1023u) & ~1023u) - smem_u32(smem_raw));
  const int w = threadIdx.x / 32;
  const int stages = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    mbar_init(smem_u32(bars + w), 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x % 32 != 0) return;
  const uint32_t buf = smem_u32(smem) + w * kPageBytes;
  const uint32_t bar = smem_u32(bars + w);
  const uint64_t policy = l2_evict_first_policy();
  const int P = gridDim.x;
  int next = static_cast<int>(static_cast<int64_t>(blockIdx.x) * n_pages / P) + w;
  const int end = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * n_pages / P);
  auto claim = [&]() -> int {
    if (counter) {
      const unsigned c = atomicAdd(counter, 1u);
      return c < static_cast<unsigned>(n_pages) ? static_cast<int>(c) : -1;
    }
    const int page = next < end ? next : -1;
    next += stages;
    return page;
  };
  // The next claim is made one page ahead, so a counter's latency overlaps the buffer's wait.
  int ahead = claim();
  unsigned acc = 0;
  for (uint32_t phase = 0;; phase ^= 1u) {
    const int page = ahead;
    if (page < 0) break;
    ahead = claim();
    mbar_arrive_expect_tx(bar, kPageBytes);
    if (boxes == 9) {
      for (int t = 0; t < 9; ++t) {
        tma_load_4d(buf + t * 64 * 128, &tmap, bar, t * 64, 0, 0, order[page], policy);
      }
    } else if (boxes == 72) {
      for (int g = 0; g < 8; ++g) {
        for (int t = 0; t < 9; ++t) {
          tma_load_4d(buf + t * 64 * 128 + g * 1024, &tmap, bar, t * 64, 0, 8 * g, order[page],
                      policy);
        }
      }
    } else {
      bulk_load(buf, cache + static_cast<size_t>(order[page]) * kPageBytes, kPageBytes, bar,
                policy);
    }
    mbar_wait(bar, phase);
    acc ^= smem[w * kPageBytes + (page & 1023)];
    const long long t0 = clock64();
    while (clock64() - t0 < hold) {
    }
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

// The decode kernel's view of the cache (sm90/decode/dense/launch.cu), with a box of `rows`
// tokens and the given L2 promotion.
static CUtensorMap cache_map(void* cache, int n_pages, int rows, CUtensorMapL2promotion promo) {
  const auto encode = tensor_map_encode_fn();
  if (encode == nullptr) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
    std::exit(1);
  }
  const cuuint64_t dims[4] = {576, 1, 64, static_cast<cuuint64_t>(n_pages)};
  const cuuint64_t strides[3] = {1152, 1152, 1152 * 64};
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(rows), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, cache, dims, strides, box, elem_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, promo,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed\n");
    std::exit(1);
  }
  return map;
}

int main(int argc, char** argv) {
  int len = 8192, stages = 2, calls = 600, hold_ns = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--len") && i + 1 < argc) len = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--stages") && i + 1 < argc) stages = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--calls") && i + 1 < argc) calls = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--hold-ns") && i + 1 < argc) hold_ns = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--len L] [--stages 1..3] [--calls N] [--hold-ns H]\n",
                   argv[0]);
      return 2;
    }
  }
  if (stages < 1 || stages > kMaxStages || len < 64 || calls < 1) return 2;
  const int n_pages = 128 * (len / 64);
  const size_t bytes = static_cast<size_t>(n_pages) * kPageBytes;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));

  uint8_t* cache;
  int* order;
  unsigned *counter, *sink;
  CK(cudaMalloc(&cache, bytes));
  CK(cudaMemset(cache, 0x3c, bytes));
  std::vector<int> h_order(n_pages);
  std::iota(h_order.begin(), h_order.end(), 0);
  std::shuffle(h_order.begin(), h_order.end(), std::mt19937(0));
  CK(cudaMalloc(&order, n_pages * sizeof(int)));
  CK(cudaMemcpy(order, h_order.data(), n_pages * sizeof(int), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&counter, sizeof(unsigned)));
  CK(cudaMalloc(&sink, sizeof(unsigned)));
  const int smem = stages * kPageBytes + 1024;
  const CUtensorMap maps[4] = {
      cache_map(cache, n_pages, 64, CU_TENSOR_MAP_L2_PROMOTION_L2_256B),
      cache_map(cache, n_pages, 64, CU_TENSOR_MAP_L2_PROMOTION_L2_128B),
      cache_map(cache, n_pages, 64, CU_TENSOR_MAP_L2_PROMOTION_NONE),
      cache_map(cache, n_pages, 8, CU_TENSOR_MAP_L2_PROMOTION_L2_256B)};
  int clock_khz = 0;
  CK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const long long hold = static_cast<long long>(hold_ns) * clock_khz / 1000000;
  CK(cudaFuncSetAttribute(read_pages, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  std::printf("# %d pages (%.3f GB, b=128, mean length %d), %d SMs, %d page buffers per CTA, "
              "each held %d ns (at the base clock) after its page arrives\n",
              n_pages, bytes * 1e-9, len, sms, stages, hold_ns);
  const char* names[] = {"ldg", "static", "dynamic", "tma9", "tma9-p128", "tma9-pnone", "tma72"};
  for (int k = 0; k < 7; ++k) {
    const bool dynamic = k == 2;
    auto launch = [&] {
      if (k == 0) {
        read_ldg<<<sms * 8, 256, 0, st>>>(reinterpret_cast<const uint4*>(cache), bytes / 16, sink);
      } else {
        if (dynamic) CK(cudaMemsetAsync(counter, 0, sizeof(unsigned), st));
        read_pages<<<sms, 32 * stages, smem, st>>>(maps[k < 3 ? 0 : k - 3],
                                                   k < 3 ? 0 : k == 6 ? 72 : 9, cache, order,
                                                   n_pages, hold, dynamic ? counter : nullptr,
                                                   sink);
      }
      CK(cudaGetLastError());
    };
    auto timed_ms = [&](int n) {
      CK(cudaEventRecord(e0, st));
      for (int i = 0; i < n; ++i) launch();
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      return ms / n;
    };
    timed_ms(3);  // warm-up
    std::this_thread::sleep_for(std::chrono::seconds(1));
    const float cold = timed_ms(20);
    unsigned long long mj0 = 0, mj1 = 0;
    const bool have0 = board_energy_mj(&mj0);
    const float hot = timed_ms(calls);
    const bool have1 = have0 && board_energy_mj(&mj1);
    std::printf("%-11s cold %8.1f us (%.2f TB/s)   %d back to back %8.1f us (%.2f TB/s)", names[k],
                cold * 1e3, bytes / (cold * 1e-3) * 1e-12, calls, hot * 1e3,
                bytes / (hot * 1e-3) * 1e-12);
    if (have1) {
      const double j = (mj1 - mj0) * 1e-3;
      std::printf("   %.1f mJ per call, %.0f W", j * 1e3 / calls, j / (hot * 1e-3 * calls));
    }
    std::printf("\n");
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  return 0;
}
