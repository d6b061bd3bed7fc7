// Kernel timing of the shipped decode path (no Python, no XLA), over the benchmark grid of
// DESIGN §6: b = 128 requests, h_kv = 1, mean lengths 4K..32K (lengths ~ N(L, L/2)), s_q 1 and 2,
// h_q 16/64/128, causal for s_q = 2. Per config, the median over --reps of
//   call_us  one launch_decode (the dense kernel the policy picks, then the combine: PDL as in
//            the library), after the shipped scheduler has run once;
//   main_us  the same dense decode kernel alone (launch_dense_decode_sm90 with decode_policy());
// and the bandwidth and FLOP rates they imply.
//
//   bench_kernels [--corners | --only s_q,L,h_q,causal] [--reps N] [--no-bw] [--json FILE]
//     --batch N                also N calls back to back, as the layers of a model
//     --gap-us G               with --batch: also each call of the batch timed alone after G us
//                              of idle GPU (the card's power cap: back-to-back calls run at a
//                              lower clock)
//     --no-pdl                 every launch without programmatic dependent launch (sets
//                              JAX_FLASHMLA_DISABLE_PDL for the process)
//     --energy N               board energy per call over N calls back to back (NVML)
//   bench_kernels --floor [--reps N] [--no-pdl]
//                            the per-call floor: an empty batch (b=3, lengths 0, h_q=64) and two
//                            tiny ones, timed on the host and on the GPU (run_floor below)
//
// bench_kernels_timing (the same file, built with JFM_TIMING) also prints, per config, how the
// parts of the last decode launch start and end (common/cta_timing.cuh), and with
// JFM_TIMING_DUMP=FILE appends one line per part for parts_by_sm.py.
// Both are built by CMake with JAX_FLASHMLA_BUILD_TOOLS=ON (cmake/Tools.cmake).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "board_energy.h"
#include "kernels/common/cta_timing.cuh"  // kCtaTimingFields
#include "kernels/common/launch_utils.h"
#include "kernels/launch.h"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/launch.h"
#include "problem.h"

using namespace jax_flashmla;

__global__ void fill_bf16_kernel(uint16_t* x, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    // Sum of four uniforms ~ roughly normal; scaled to about N(0, 0.1^2).
    float s = 0.f;
    for (int k = 0; k < 4; ++k) s += static_cast<float>((h >> (16 * k)) & 0xffff) / 65535.f;
    const float v = (s - 2.f) * 0.173f;
    const __nv_bfloat16 b = __float2bfloat16(v);
    x[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

__global__ void read_bw_kernel(const uint4* x, size_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(x + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

// Occupies the stream for `us` microseconds without touching memory (an idle gap between calls).
__global__ void idle_kernel(unsigned us) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < 1000ull * us);
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct BenchOpts {
  const char* json = nullptr;
  bool corners = false;          // only h_q=16/s_q=1 and h_q=128/s_q=2 (non-causal)
  int only[4] = {0, 0, 0, -1};   // s_q, L, h_q, causal of a single config (ncu)
  bool skip_bw = false;          // no read-bandwidth probe first
  int reps = 20;
  int batch = 0;                 // also time this many calls launched back to back
  int gap_us = -1;               // >= 0: time each call of the batch alone, after this long idle
  bool no_pdl = false;
  int energy_calls = 0;          // > 0: board energy per call over this many calls back to back
  bool floor = false;            // the per-call floor instead of the grid
};

#if defined(JFM_TIMING)
// Per-part timing of the last decode launch (grid x = y = 1 here): start skew, how the parts'
// end times spread, and a least-squares fit of each part's duration to its pages and chunks,
// i.e. what a chunk switch really costs in pages.
static void print_cta_timing(const std::vector<int>& lens, const std::vector<SchedRecord>& recs,
                             int max_blocks) {
  const int parts = static_cast<int>(recs.size());
  std::vector<unsigned long long> t(kCtaTimingFields * parts);  // start, end, SM per part
  CK(read_cta_timing_sm90(t.data(), parts));
  auto start = [&](int i) { return t[kCtaTimingFields * i]; };
  auto end = [&](int i) { return t[kCtaTimingFields * i + 1]; };
  unsigned long long t0 = ~0ull, t1 = 0;
  for (int i = 0; i < parts; ++i) t0 = std::min(t0, start(i)), t1 = std::max(t1, end(i));
  std::vector<double> starts, ends, xs[2], durs;
  double ata[3][3] = {}, atb[3] = {};
  // JFM_TIMING_DUMP=FILE appends one line per part (part, SM, pages, chunks, start and end in
  // us), to tell parts that ran slow from parts that were given more work.
  const char* dump_path = std::getenv("JFM_TIMING_DUMP");
  FILE* dump = dump_path ? std::fopen(dump_path, "a") : nullptr;
  if (dump) std::fprintf(dump, "# launch of %d parts\n", parts);
  for (int i = 0; i < parts; ++i) {
    const SchedRecord& r = recs[i];
    double pages = 0, chunks = 0;
    const int b = static_cast<int>(lens.size());
    for (int req = std::max(r.begin_req, 0); req <= std::min(r.end_req, b - 1); ++req) {
      const int len = effective_len(lens[req], max_blocks);
      const int np = std::max((len + 63) / 64, 1);
      const int pb = req == r.begin_req ? std::min(std::max(r.begin_block, 0), np) : 0;
      const int pe = req == r.end_req ? std::min(r.end_block, np) : np;
      if (pb < pe) pages += pe - pb, chunks += 1;
    }
    const double st = (start(i) - t0) * 1e-3, en = (end(i) - t0) * 1e-3;
    starts.push_back(st);
    ends.push_back(en);
    if (dump) {
      std::fprintf(dump, "%d %llu %.0f %.0f %.3f %.3f\n", i, t[kCtaTimingFields * i + 2], pages,
                   chunks, st, en);
    }
    if (chunks == 0) continue;
    xs[0].push_back(pages);
    xs[1].push_back(chunks);
    durs.push_back(en - st);
    const double x[3] = {pages, chunks, 1.0};
    for (int a = 0; a < 3; ++a) {
      for (int c = 0; c < 3; ++c) ata[a][c] += x[a] * x[c];
      atb[a] += x[a] * (en - st);
    }
  }
  if (dump) std::fclose(dump);
  // 3x3 solve by Cramer's rule.
  auto det = [](double m[3][3]) {
    return m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) -
           m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) +
           m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
  };
  double coef[3] = {0, 0, 0};
  const double d = det(ata);
  for (int k = 0; k < 3 && d != 0; ++k) {
    double m[3][3];
    for (int a = 0; a < 3; ++a) {
      for (int c = 0; c < 3; ++c) m[a][c] = c == k ? atb[a] : ata[a][c];
    }
    coef[k] = det(m) / d;
  }
  // What the fit leaves unexplained: parts that ran slower or faster than their work says.
  double ss = 0, worst = 0;
  for (size_t i = 0; i < durs.size(); ++i) {
    const double r = durs[i] - (coef[0] * xs[0][i] + coef[1] * xs[1][i] + coef[2]);
    ss += r * r;
    worst = std::max(worst, std::fabs(r));
  }
  std::printf("  residual of the fit: rms %.1f us, worst %.1f us over %zu parts\n",
              durs.empty() ? 0.0 : std::sqrt(ss / durs.size()), worst, durs.size());
  std::sort(starts.begin(), starts.end());
  std::sort(ends.begin(), ends.end());
  auto q = [](const std::vector<double>& v, double f) {
    return v[static_cast<size_t>(f * (v.size() - 1))];
  };
  std::printf("  timing: span %.1f us | start max %.1f us | end min %.1f p10 %.1f median %.1f "
              "p90 %.1f max %.1f us | fit: %.3f us/page, %.2f us/chunk (%.1f pages), "
              "%.1f us fixed\n",
              (t1 - t0) * 1e-3, starts.back(), ends.front(), q(ends, 0.1), q(ends, 0.5),
              q(ends, 0.9), ends.back(), coef[0], coef[1], coef[0] > 0 ? coef[1] / coef[0] : 0.0,
              coef[2]);
}
#endif

// Read bandwidth of this card over `bytes` of the cache buffer: the memory ceiling.
static void print_read_bandwidth(const void* buf, size_t bytes, cudaStream_t st) {
  uint32_t* sink;
  CK(cudaMalloc(&sink, 4));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const size_t n = bytes / 16;
  std::vector<float> t;
  for (int it = 0; it < 6; ++it) {
    CK(cudaEventRecord(e0, st));
    read_bw_kernel<<<num_sms() * 8, 512, 0, st>>>(static_cast<const uint4*>(buf), n, sink);
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (it > 0) t.push_back(ms);
  }
  std::printf("read-only stream over %.2f GB: %.2f TB/s (median of 5)\n", n * 16 / 1e9,
              n * 16 / (median(t) * 1e-3) / 1e12);
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  CK(cudaFree(sink));
}

// The timed calls of one config, whose scheduler has run: the medians of a call and of the
// decode kernel alone (ms), then the --batch, --energy and --gap-us figures, printed.
static void time_config(const BenchOpts& o, const DecodeParams& p, cudaStream_t st,
                        float* call_ms, float* main_ms) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  // ms for `n` launches of `launch` back to back, as the layers of a model: no host sync between.
  auto timed_ms = [&](int n, double limit_s, const char* what, auto launch) {
    CK(cudaEventRecord(e0, st));
    for (int it = 0; it < n; ++it) CK(launch());
    CK(cudaEventRecord(e1, st));
    wait_or_die(st, limit_s, what);
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms;
  };
  auto call = [&] { return launch_decode(p, st); };
  // The kernel launch_decode runs (wide or narrow, with or without PDL), alone.
  const DecodePolicy& policy = decode_policy();
  auto decode_only = [&] {
    return launch_dense_decode_sm90(p, st, policy.pdl, policy.allow_narrow);
  };
  std::vector<float> t_call, t_main;
  for (int it = 0; it < o.reps + 3; ++it) {  // the first 3 warm up
    const float c = timed_ms(1, 20.0, "bench call", call);
    const float m = timed_ms(1, 20.0, "bench decode kernel", decode_only);
    if (it >= 3) {
      t_call.push_back(c);
      t_main.push_back(m);
    }
  }
  *call_ms = median(t_call);
  *main_ms = median(t_main);
  if (o.batch > 0) {
    std::vector<float> t_batch;
    for (int rep = 0; rep < 4; ++rep) {
      const float ms = timed_ms(o.batch, 60.0, "bench batch", call);
      if (rep > 0) t_batch.push_back(ms / o.batch);
    }
    std::printf("  %d calls back to back: %.1f us per call\n", o.batch, median(t_batch) * 1e3);
  }
  if (o.energy_calls > 0) {  // joules per call under sustained load (NVML counter, mJ)
    unsigned long long mj0 = 0, mj1 = 0;
    CK(cudaStreamSynchronize(st));
    const bool have0 = board_energy_mj(&mj0);
    const float ms = timed_ms(o.energy_calls, 120.0, "bench energy", call);
    if (have0 && board_energy_mj(&mj1)) {
      const double j = (mj1 - mj0) * 1e-3;
      std::printf("  energy: %d calls back to back, %.1f us per call, %.2f mJ per call, %.0f W\n",
                  o.energy_calls, ms * 1e3 / o.energy_calls, j * 1e3 / o.energy_calls,
                  j / (ms * 1e-3));
    } else {
      std::printf("  energy: NVML energy counter unavailable\n");
    }
  }
  if (o.batch > 0 && o.gap_us >= 0) {  // each call on its own events, idle gap before
    std::vector<cudaEvent_t> ev(2 * o.batch);
    for (auto& e : ev) CK(cudaEventCreate(&e));
    std::vector<float> t_each;
    for (int rep = 0; rep < 2; ++rep) {
      for (int it = 0; it < o.batch; ++it) {
        if (o.gap_us > 0) idle_kernel<<<1, 32, 0, st>>>(o.gap_us);
        CK(cudaEventRecord(ev[2 * it], st));
        CK(call());
        CK(cudaEventRecord(ev[2 * it + 1], st));
      }
      wait_or_die(st, 60.0, "bench each");
      for (int it = 0; it < o.batch; ++it) {
        float c;
        CK(cudaEventElapsedTime(&c, ev[2 * it], ev[2 * it + 1]));
        if (rep > 0) t_each.push_back(c);
      }
    }
    std::printf("  %d calls, gap %d us, pdl %d: median %.1f us, first %.1f, last %.1f\n", o.batch,
                o.gap_us, policy.pdl, median(t_each) * 1e3, t_each[0] * 1e3,
                t_each.back() * 1e3);
    for (auto& e : ev) CK(cudaEventDestroy(e));
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
}

static int run_bench(const BenchOpts& o) {
  const int b = 128, h_kv = 1;
  const int Ls[] = {4096, 8192, 16384, 32768};
  // Capacity for the largest mean length (lengths ~ N(L, L/2) -> ~1.02 L on average after
  // clipping; 1.25x leaves room).
  const size_t cap_pages = static_cast<size_t>(b) * (32768 / 64) * 5 / 4 + 1024;
  const size_t row = static_cast<size_t>(h_kv) * kHeadDimK;
  uint16_t* d_kv;
  CK(cudaMalloc(&d_kv, cap_pages * 64 * row * 2));
  fill_bf16_kernel<<<4096, 256>>>(d_kv, cap_pages * 64 * row, 1234);
  CK(cudaGetLastError());
  const size_t max_q = static_cast<size_t>(b) * 2 * 128 * kHeadDimK;
  uint16_t* d_q;
  CK(cudaMalloc(&d_q, max_q * 2));
  fill_bf16_kernel<<<1024, 256>>>(d_q, max_q, 99);
  CK(cudaDeviceSynchronize());
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  if (!o.skip_bw) print_read_bandwidth(d_kv, cap_pages * 64 * row * 2, st);

  FILE* js = o.json ? std::fopen(o.json, "w") : nullptr;
  if (js) std::fprintf(js, "[\n");
  bool first_json = true;
  std::printf("sched overhead %d pages/chunk, %d timed calls per config\n", kFixedOverheadBlocks,
              o.reps);
  std::printf("%-5s %-6s %-5s %-6s %-8s %-7s %-10s %-10s %-8s %s\n", "s_q", "L", "h_q",
              "causal", "meanlen", "splits", "call_us", "main_us", "TB/s", "TFLOPS");
  std::mt19937_64 rng(2024);
  for (int s_q : {1, 2}) {
    for (int L : Ls) {
      for (int h_q : {16, 64, 128}) {
        for (int causal : {0, 1}) {
          if (causal && s_q == 1) continue;
          if (o.only[3] >= 0 &&
              (s_q != o.only[0] || L != o.only[1] || h_q != o.only[2] || causal != o.only[3])) {
            continue;
          }
          if (o.corners && !((h_q == 16 && s_q == 1) || (h_q == 128 && s_q == 2 && !causal))) {
            continue;
          }
          // lengths ~ N(L, L/2) clipped >= s_q
          std::normal_distribution<double> nd(L, L / 2.0);
          std::vector<int> lens(b);
          double mean = 0;
          int max_blocks = 1;
          size_t need = 0;
          for (auto& x : lens) {
            x = std::max(s_q, static_cast<int>(std::llround(nd(rng))));
            mean += x;
            max_blocks = std::max(max_blocks, (x + 63) / 64);
            need += (x + 63) / 64;
          }
          mean /= b;
          if (need > cap_pages) {
            std::printf("skip L=%d: %zu pages > capacity\n", L, need);
            continue;
          }
          std::vector<int> perm(cap_pages);
          std::iota(perm.begin(), perm.end(), 0);
          std::shuffle(perm.begin(), perm.end(), rng);
          std::vector<int> bt(static_cast<size_t>(b) * max_blocks, 2147480000);
          size_t nx = 0;
          for (int i = 0; i < b; ++i) {
            for (int j = 0; j < (lens[i] + 63) / 64; ++j) {
              bt[static_cast<size_t>(i) * max_blocks + j] = perm[nx++];
            }
          }
          CallShape shape;
          shape.b = b;
          shape.s_q = s_q;
          shape.h_q = h_q;
          shape.h_kv = h_kv;
          shape.causal = causal;
          shape.scale = 1.f / std::sqrt(576.f);
          DecodeCall call;
          call.init(d_q, d_kv, static_cast<int>(cap_pages), bt, max_blocks, lens, shape);
          call.schedule(st);
          float call_ms, main_ms;
          time_config(o, call.p, st, &call_ms, &main_ms);
#if defined(JFM_TIMING)
          print_cta_timing(lens, call.recs, max_blocks);
#endif
          const int extra_splits = call.num_splits[b] - b;
          const double tc = call_ms * 1e-3, tm = main_ms * 1e-3;
          const double bytes =
              b * (s_q * h_q * 576.0 * 2 + mean * h_kv * 576.0 * 2 + s_q * h_q * 512.0 * 2);
          const double flops = static_cast<double>(b) * h_q * s_q * (2.0 * 576 + 2.0 * 512) * mean;
          std::printf("%-5d %-6d %-5d %-6d %-8.0f %-7d %-10.1f %-10.1f %-8.3f %-8.1f\n", s_q, L,
                      h_q, causal, mean, extra_splits, tc * 1e6, tm * 1e6, bytes / tc / 1e12,
                      flops / tc / 1e12);
          if (js) {
            std::fprintf(js,
                         "%s  {\"s_q\": %d, \"L\": %d, \"h_q\": %d, \"causal\": %d, \"mean_len\": "
                         "%.1f, \"extra_splits\": %d, \"call_us\": %.2f, \"main_us\": %.2f, "
                         "\"TBps\": %.4f, \"TFLOPS\": %.2f, \"overhead\": %d}",
                         first_json ? "" : ",\n", s_q, L, h_q, causal, mean, extra_splits,
                         tc * 1e6, tm * 1e6, bytes / tc / 1e12, flops / tc / 1e12,
                         kFixedOverheadBlocks);
            first_json = false;
          }
          call.free();
        }
      }
    }
  }
  if (js) {
    std::fprintf(js, "\n]\n");
    std::fclose(js);
  }
  CK(cudaStreamDestroy(st));
  CK(cudaFree(d_kv));
  CK(cudaFree(d_q));
  return 0;
}

// ------------------------------------------------------------------ --floor

__global__ void empty_kernel() {}

// Host microseconds per call of launch() over batches of n calls without a sync (the batch is
// waited for afterwards, untimed): the median over `reps` batches.
template <class Launch>
static double host_us_per_call(int n, int reps, cudaStream_t st, Launch launch) {
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) CK(launch());
    const auto t1 = std::chrono::steady_clock::now();
    wait_or_die(st, 20.0, "floor batch");
    t.push_back(std::chrono::duration<float, std::micro>(t1 - t0).count() / n);
  }
  return median(t);
}

// GPU microseconds per call: events around n calls enqueued back to back, median over reps.
template <class Launch>
static double stream_us_per_call(int n, int reps, cudaStream_t st, Launch launch) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(e0, st));
    for (int i = 0; i < n; ++i) CK(launch());
    CK(cudaEventRecord(e1, st));
    wait_or_die(st, 20.0, "floor stream");
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3f / n);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return median(t);
}

// The calls captured into one CUDA graph (`calls` decode calls), then replayed `replays` times back
// to back: GPU microseconds per decode call, median over reps. With many calls in the graph the
// host is out of the picture; with one call per graph it is FlashMLA's way of timing (its kit
// replays a graph of one call).
static double graph_us_per_call(int calls, int replays, int reps, cudaStream_t st,
                                const DecodeParams& p) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) CK(launch_decode(p, st));
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  CK(cudaGraphLaunch(exec, st));  // warm-up (uploads the graph)
  wait_or_die(st, 20.0, "floor graph");
  const double us =
      stream_us_per_call(replays, reps, st, [&] { return cudaGraphLaunch(exec, st); });
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  return us / calls;
}

// The per-call floor (issue: an empty batch inside a jitted 20-layer program costs 12-17 us per
// decode call, FlashMLA's CUDA-graph replay of its two kernels 6.3). Per case, in microseconds:
//   host       host time of one launch_decode (the shipped path: a descriptor encode, two
//              cudaLaunchKernelEx), calls enqueued without a sync
//   encode     make_kcache_tensor_map_sm90 alone (cuTensorMapEncodeTiled)
//   graph      GPU time per call, host excluded: N calls captured in one CUDA graph, replayed
//   graph1     a graph of one call replayed N times back to back (FlashMLA's kit's method)
//   stream     events around N plain calls back to back: max(host, GPU) per call
// and, once, the same host and stream times for an empty kernel (one launch: the runtime's own
// floor, of which a call makes two).
static int run_floor(const BenchOpts& o) {
  struct FloorCase {
    const char* name;
    int b, len, h_q;
  };
  const FloorCase cases[] = {{"b=3 len 0 h_q=64 (empty)", 3, 0, 64},
                             {"b=1 len 256 h_q=16", 1, 256, 16},
                             {"b=16 len 512 h_q=128", 16, 512, 128}};
  const int n = 200;  // calls per batch
  const int reps = std::max(o.reps, 3);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  const DecodePolicy& policy = decode_policy();

  LaunchShape empty_shape;
  empty_shape.grid = dim3(1);
  empty_shape.block = dim3(32);
  auto empty = [&] { return launch_kernel<empty_kernel>(empty_shape, false, st); };
  for (int i = 0; i < 100; ++i) CK(empty());
  wait_or_die(st, 20.0, "empty kernel");
  std::printf("floor: %d calls per batch, median of %d batches, pdl %d\n", n, reps, policy.pdl);
  std::printf("empty kernel, one cudaLaunchKernelEx: host %.2f us, stream %.2f us per launch\n",
              host_us_per_call(n, reps, st, empty), stream_us_per_call(n, reps, st, empty));
  std::printf("%-26s %-9s %-12s %7s %7s %7s %7s %7s\n", "case", "kernel", "grid", "host", "encode",
              "graph", "graph1", "stream");

  for (const FloorCase& fc : cases) {
    const int pages = std::max((fc.len + 63) / 64, 1);
    const int num_blocks = fc.b * pages + 1;
    const size_t kv_elems = static_cast<size_t>(num_blocks) * 64 * kHeadDimK;
    const size_t q_elems = static_cast<size_t>(fc.b) * fc.h_q * kHeadDimK;
    uint16_t *d_kv, *d_q;
    CK(cudaMalloc(&d_kv, kv_elems * 2));
    CK(cudaMalloc(&d_q, q_elems * 2));
    fill_bf16_kernel<<<256, 256>>>(d_kv, kv_elems, 7);
    fill_bf16_kernel<<<256, 256>>>(d_q, q_elems, 8);
    CK(cudaGetLastError());
    std::vector<int> bt(static_cast<size_t>(fc.b) * pages);
    std::iota(bt.begin(), bt.end(), 0);
    std::vector<int> lens(fc.b, fc.len);
    CallShape shape;
    shape.b = fc.b;
    shape.h_q = fc.h_q;
    shape.scale = 1.f / std::sqrt(576.f);
    DecodeCall call;
    call.init(d_q, d_kv, num_blocks, bt, pages, lens, shape);
    call.schedule(st);
    const DecodeParams& p = call.p;
    const char* kernel = !policy.allow_narrow || p.q_rows > 32 ? "wide"
                         : p.q_rows > 16                      ? "narrow32"
                                                              : "narrow16";
    char grid[32];
    std::snprintf(grid, sizeof(grid), "%dx%dx%d", p.num_m_blocks, p.h_kv, p.num_sm_parts);

    auto decode = [&] { return launch_decode(p, st); };
    for (int i = 0; i < 50; ++i) CK(decode());  // warm-up: the shared-memory opt-ins
    wait_or_die(st, 20.0, "floor warm-up");
    CUtensorMap map;
    const double host = host_us_per_call(n, reps, st, decode);
    const double encode = host_us_per_call(n, reps, st, [&] {
      return make_kcache_tensor_map_sm90(&map, p);
    });
    const double graph = graph_us_per_call(n, 5, reps, st, p);
    const double graph1 = graph_us_per_call(1, n, reps, st, p);
    const double stream = stream_us_per_call(n, reps, st, decode);
    std::printf("%-26s %-9s %-12s %7.2f %7.2f %7.2f %7.2f %7.2f\n", fc.name, kernel, grid, host,
                encode, graph, graph1, stream);
    call.free();
    CK(cudaFree(d_kv));
    CK(cudaFree(d_q));
  }
  CK(cudaStreamDestroy(st));
  return 0;
}

static int usage(const char* argv0) {
  std::printf("usage: %s [--corners | --only s_q,L,h_q,causal] [--reps N] [--no-bw] "
              "[--json FILE] [--batch N [--gap-us G]] [--no-pdl] [--energy N] [--noop]\n"
              "       %s --floor [--reps N] [--no-pdl]\n",
              argv0, argv0);
  return 2;
}

int main(int argc, char** argv) {
  BenchOpts o;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    const bool has_value = i + 1 < argc;
    if (!std::strcmp(a, "--noop")) return 0;  // "does this binary run here?"
    if (!std::strcmp(a, "--corners")) {
      o.corners = true;
    } else if (!std::strcmp(a, "--no-bw")) {
      o.skip_bw = true;
    } else if (!std::strcmp(a, "--no-pdl")) {
      o.no_pdl = true;
    } else if (!std::strcmp(a, "--floor")) {
      o.floor = true;
    } else if (!std::strcmp(a, "--json") && has_value) {
      o.json = argv[++i];
    } else if (!std::strcmp(a, "--reps") && has_value) {
      o.reps = std::atoi(argv[++i]);
    } else if (!std::strcmp(a, "--batch") && has_value) {
      o.batch = std::atoi(argv[++i]);
    } else if (!std::strcmp(a, "--gap-us") && has_value) {
      o.gap_us = std::atoi(argv[++i]);
    } else if (!std::strcmp(a, "--energy") && has_value) {
      o.energy_calls = std::atoi(argv[++i]);
    } else if (!std::strcmp(a, "--only") && has_value) {
      if (std::sscanf(argv[++i], "%d,%d,%d,%d", &o.only[0], &o.only[1], &o.only[2],
                      &o.only[3]) != 4) {
        return usage(argv[0]);
      }
    } else {
      return usage(argv[0]);
    }
  }
  if (o.reps < 1) return usage(argv[0]);
  // decode_policy() reads this once, at the first call: every launch then goes without PDL.
  if (o.no_pdl) setenv("JAX_FLASHMLA_DISABLE_PDL", "1", 1);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, sm_%d%d\n", prop.name, prop.multiProcessorCount, prop.major,
              prop.minor);
  return o.floor ? run_floor(o) : run_bench(o);
}
