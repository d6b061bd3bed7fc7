// Standalone checker and benchmark of the sm90 main decode kernel (no Python, no XLA).
//
//   check_decode --prims      building blocks alone: TMA tile load, QK^T (SS), P.V (RS and SS)
//   check_decode [--quick]    correctness against a CPU float64 reference over many shapes
//   check_decode --bench      DESIGN §6 grid on b=128 (main kernel + this file's combine)
//     --only s_q,L,h_q,causal  one config;  --batch N  also N calls back to back;
//     --gap-us G [--no-pdl]     also each call of the batch timed alone after G us of idle GPU
//                               (the card's power cap: back-to-back calls run at a lower clock)
//     --energy N                board energy per call over N calls back to back (NVML)
//
// Data follow DESIGN §4: q and the cache ~ N(0,1)/10 clamped to [-1, 1]; cache slots past each
// length and all unused pages hold NaN; block tables are random permutations, entries past the
// used pages are invalid ids; lengths vary (zeros included). Outputs are poisoned with NaN before
// each launch, so an element the kernel failed to write fails the comparison. Split requests are
// merged on the host in float64 from o_accum / lse_accum, so the kernel's partials are checked
// directly. The scheduler records are built on the host with the semantics of params.h.
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
#include <string>
#include <thread>
#include <vector>

#include "kernels/params.h"
#include "kernels/sm90/decode/dense/blocks.cuh"
#include "kernels/sm90/decode/dense/launch.h"
#include "board_energy.h"

using namespace jax_flashmla;

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, \
                  #x);                                                                      \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

// ------------------------------------------------------------------ small host helpers

static uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
static float bf2f(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static constexpr uint16_t kBfNaN = 0x7fc0;

static void wait_or_die(cudaStream_t stream, double seconds, const char* what) {
  auto t0 = std::chrono::steady_clock::now();
  while (true) {
    cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      std::printf("CUDA error %s while running %s\n", cudaGetErrorString(e), what);
      std::exit(2);
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > seconds) {
      std::printf("HANG: %s did not finish in %.0f s\n", what, seconds);
      std::fflush(stdout);
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

template <typename F>
static void parallel_for(int n, F f) {
  int nt = std::max(1u, std::thread::hardware_concurrency());
  nt = std::min(nt, std::max(n, 1));
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t) {
    th.emplace_back([&, t] {
      for (int i = t; i < n; i += nt) f(i);
    });
  }
  for (auto& x : th) x.join();
}

// ------------------------------------------------------------------ host scheduler
// The semantics of params.h / SchedRecord (the same greedy walk as src/kernels/sched.cu): costs
// sched_cost_pages(len) + kFixedOverheadBlocks per request, payload ceil(total / parts) + overhead,
// requests filled in order, the last part takes whatever is left.
static void host_sched(const std::vector<int>& lens, int parts, std::vector<SchedRecord>& recs,
                       std::vector<int>& num_splits, int overhead = kFixedOverheadBlocks) {
  const int b = static_cast<int>(lens.size());
  const int64_t ov = overhead;
  int64_t total = 0;
  for (int i = 0; i < b; ++i) total += sched_cost_pages(lens[i], b) + ov;
  const int64_t payload = (total + parts - 1) / parts + ov;
  recs.assign(parts, SchedRecord{b, 0, 0, 0, 0, {0, 0, 0}});
  num_splits.assign(b + 1, 0);
  int part = 0;
  bool open = false;
  int64_t remaining = 0;
  SchedRecord cur{};
  for (int req = 0; req < b; ++req) {
    const int64_t pages = sched_cost_pages(lens[req], b);
    int64_t done = 0;
    int split = 0;
    while (true) {
      if (!open) {
        open = true;
        remaining = payload;
        cur = SchedRecord{req, static_cast<int>(done), req, 0, split, {0, 0, 0}};
      }
      const int64_t left = pages - done;
      if (part == parts - 1 || remaining >= left + ov) {
        remaining -= left + ov;
        cur.end_req = req;
        cur.end_block = static_cast<int>(pages);
        break;
      }
      const int64_t take = remaining - ov;
      if (take > 0) {
        done += take;
        cur.end_req = req;
        cur.end_block = static_cast<int>(done);
        ++split;
      }
      recs[part++] = cur;
      open = false;
    }
    num_splits[req + 1] = num_splits[req] + split + 1;
  }
  if (open) recs[part++] = cur;
}

// ------------------------------------------------------------------ a problem instance

struct Case {
  std::string name;
  int b = 1, s_q = 1, h_q = 16, h_kv = 1;
  bool causal = false;
  std::vector<int> lens;
  int max_blocks = 0;    // 0: enough for the longest length, plus one invalid column
  int parts = 0;         // 0: max(num_SMs / h_kv / num_m_blocks, 1)
  bool bad_ids = false;  // put out-of-range ids inside used pages
  float scale = 0.f;     // 0: 576^-0.5
  uint64_t seed = 1;
};

struct Problem {
  Case c;
  int g, q_rows, m_blocks, parts, max_blocks, num_blocks;
  std::vector<uint16_t> q, kv;
  std::vector<int> bt, lens;
  std::vector<SchedRecord> recs;
  std::vector<int> num_splits;
  float scale;
  // device
  void *d_q = nullptr, *d_kv = nullptr, *d_out = nullptr;
  int *d_bt = nullptr, *d_lens = nullptr, *d_ns = nullptr;
  SchedRecord* d_recs = nullptr;
  float *d_lse = nullptr, *d_lse_acc = nullptr, *d_o_acc = nullptr;
  DecodeParams params{};
  size_t n_out, n_lse, n_acc_rows;

  void free_dev() {
    cudaFree(d_q);
    cudaFree(d_kv);
    cudaFree(d_out);
    cudaFree(d_bt);
    cudaFree(d_lens);
    cudaFree(d_ns);
    cudaFree(d_recs);
    cudaFree(d_lse);
    cudaFree(d_lse_acc);
    cudaFree(d_o_acc);
  }
};

static int num_sms() {
  static int n = [] {
    int dev = 0, v = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

static void build(Problem& P, const Case& c) {
  P.c = c;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto rnd = [&] { return f2bf(std::min(1.f, std::max(-1.f, nd(rng) / 10.f))); };
  const int b = c.b;
  P.g = c.h_q / c.h_kv;
  P.q_rows = c.s_q * P.g;
  P.m_blocks = (P.q_rows + kBlockM - 1) / kBlockM;
  P.parts = c.parts > 0 ? c.parts : std::max(num_sms() / c.h_kv / P.m_blocks, 1);
  P.lens = c.lens;
  int max_pages = 1;
  for (int L : c.lens) max_pages = std::max(max_pages, (std::max(L, 0) + 63) / 64);
  P.max_blocks = c.max_blocks > 0 ? c.max_blocks : max_pages + 1;
  std::vector<int> used(b);
  int total_used = 0;
  for (int i = 0; i < b; ++i) {
    const int L = effective_len(c.lens[i], P.max_blocks);
    used[i] = (L + 63) / 64;
    total_used += used[i];
  }
  const int extra = 3;  // unused, NaN-filled pages
  P.num_blocks = total_used + extra;
  std::vector<int> perm(P.num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  P.bt.assign(static_cast<size_t>(b) * P.max_blocks, 0);
  int next = 0;
  for (int i = 0; i < b; ++i) {
    for (int j = 0; j < P.max_blocks; ++j) {
      int v;
      if (j < used[i]) {
        v = perm[next++];
      } else {
        v = (j % 2) ? 2147480000 : -5;  // never dereferenced
      }
      P.bt[static_cast<size_t>(i) * P.max_blocks + j] = v;
    }
  }
  if (c.bad_ids) {
    for (int i = 0; i < b; ++i) {
      if (used[i] >= 2) P.bt[static_cast<size_t>(i) * P.max_blocks + used[i] / 2] = P.num_blocks + 7;
      if (used[i] >= 4 && i % 2) P.bt[static_cast<size_t>(i) * P.max_blocks + 0] = -3;
    }
  }
  const size_t row = static_cast<size_t>(c.h_kv) * kHeadDimK;
  P.kv.resize(static_cast<size_t>(P.num_blocks) * 64 * row);
  for (auto& x : P.kv) x = rnd();
  // NaN everywhere nobody may read: pages not referenced and slots past each length.
  std::vector<char> page_used(P.num_blocks, 0);
  for (int i = 0; i < b; ++i) {
    const int L = effective_len(c.lens[i], P.max_blocks);
    for (int j = 0; j < used[i]; ++j) {
      const int id = P.bt[static_cast<size_t>(i) * P.max_blocks + j];
      if (id < 0 || id >= P.num_blocks) continue;
      page_used[id] = 1;
      for (int t = 0; t < 64; ++t) {
        if (j * 64 + t >= L) {
          std::fill_n(P.kv.begin() + (static_cast<size_t>(id) * 64 + t) * row, row, kBfNaN);
        }
      }
    }
  }
  for (int id = 0; id < P.num_blocks; ++id) {
    if (!page_used[id]) {
      std::fill_n(P.kv.begin() + static_cast<size_t>(id) * 64 * row, 64 * row, kBfNaN);
    }
  }
  P.q.resize(static_cast<size_t>(b) * c.s_q * c.h_q * kHeadDimK);
  for (auto& x : P.q) x = rnd();
  P.scale = c.scale > 0.f ? c.scale : 1.f / std::sqrt(576.f);
  host_sched(c.lens, P.parts, P.recs, P.num_splits);

  P.n_out = static_cast<size_t>(b) * c.s_q * c.h_q * kHeadDimV;
  P.n_lse = static_cast<size_t>(b) * c.h_q * c.s_q;
  P.n_acc_rows = static_cast<size_t>(b + P.parts) * c.h_kv * P.q_rows;
  CK(cudaMalloc(&P.d_q, P.q.size() * 2));
  CK(cudaMalloc(&P.d_kv, P.kv.size() * 2));
  CK(cudaMalloc(&P.d_out, P.n_out * 2));
  CK(cudaMalloc(&P.d_bt, P.bt.size() * 4 + 4));
  CK(cudaMalloc(&P.d_lens, b * 4));
  CK(cudaMalloc(&P.d_ns, (b + 1) * 4));
  CK(cudaMalloc(&P.d_recs, P.parts * sizeof(SchedRecord)));
  CK(cudaMalloc(&P.d_lse, P.n_lse * 4));
  CK(cudaMalloc(&P.d_lse_acc, P.n_acc_rows * 4));
  CK(cudaMalloc(&P.d_o_acc, P.n_acc_rows * kHeadDimV * 4));
  CK(cudaMemcpy(P.d_q, P.q.data(), P.q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_kv, P.kv.data(), P.kv.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_bt, P.bt.data(), P.bt.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_lens, c.lens.data(), b * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_ns, P.num_splits.data(), (b + 1) * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_recs, P.recs.data(), P.parts * sizeof(SchedRecord), cudaMemcpyHostToDevice));

  DecodeParams& p = P.params;
  p.q = P.d_q;
  p.k_cache = P.d_kv;
  p.block_table = P.d_bt;
  p.seqlens = P.d_lens;
  p.sched = P.d_recs;
  p.num_splits = P.d_ns;
  p.out = P.d_out;
  p.lse = P.d_lse;
  p.lse_accum = P.d_lse_acc;
  p.o_accum = P.d_o_acc;
  p.b = b;
  p.s_q = c.s_q;
  p.h_q = c.h_q;
  p.h_kv = c.h_kv;
  p.g = P.g;
  p.q_rows = P.q_rows;
  p.num_m_blocks = P.m_blocks;
  p.num_blocks = P.num_blocks;
  p.max_blocks = P.max_blocks;
  p.num_sm_parts = P.parts;
  p.scale = P.scale;
  p.scale_log2 = P.scale * 1.4426950408889634f;
  p.causal = c.causal;
}

// ------------------------------------------------------------------ reference and comparison

// out [b, s_q, h_q, 512] and lse [b, h_q, s_q] in float64 (DESIGN §4).
static void reference(const Problem& P, std::vector<double>& out, std::vector<double>& lse) {
  const Case& c = P.c;
  out.assign(P.n_out, 0.0);
  lse.assign(P.n_lse, 0.0);
  const size_t row = static_cast<size_t>(c.h_kv) * kHeadDimK;
  const int rows = c.b * c.s_q * c.h_q;
  parallel_for(rows, [&](int idx) {
    const int head = idx % c.h_q;
    const int s = (idx / c.h_q) % c.s_q;
    const int bi = idx / (c.h_q * c.s_q);
    const int hk = head / P.g;
    const int L = effective_len(c.lens[bi], P.max_blocks);
    int vis = c.causal ? std::min(L, L - c.s_q + s + 1) : L;
    vis = std::max(vis, 0);
    const uint16_t* q = P.q.data() + static_cast<size_t>(idx) * kHeadDimK;
    double qd[kHeadDimK];
    for (int d = 0; d < kHeadDimK; ++d) qd[d] = bf2f(q[d]);
    std::vector<double> sc;
    std::vector<const uint16_t*> kp;
    for (int t = 0; t < vis; ++t) {
      const int id = P.bt[static_cast<size_t>(bi) * P.max_blocks + t / 64];
      if (id < 0 || id >= P.num_blocks) continue;
      const uint16_t* k = P.kv.data() + (static_cast<size_t>(id) * 64 + t % 64) * row +
                          static_cast<size_t>(hk) * kHeadDimK;
      double acc = 0;
      for (int d = 0; d < kHeadDimK; ++d) acc += qd[d] * bf2f(k[d]);
      sc.push_back(acc * P.scale);
      kp.push_back(k);
    }
    double* o = out.data() + static_cast<size_t>(idx) * kHeadDimV;
    double& l = lse[(static_cast<size_t>(bi) * c.h_q + head) * c.s_q + s];
    if (sc.empty()) {
      l = INFINITY;
      return;
    }
    const double m = *std::max_element(sc.begin(), sc.end());
    double sum = 0;
    for (size_t t = 0; t < sc.size(); ++t) {
      const double e = std::exp(sc[t] - m);
      sum += e;
      for (int d = 0; d < kHeadDimV; ++d) o[d] += e * bf2f(kp[t][d]);
    }
    for (int d = 0; d < kHeadDimV; ++d) o[d] /= sum;
    l = m + std::log(sum);
  });
}

// What a full decode call returns: unsplit requests straight from out/lse, split ones merged
// here in float64 from the kernel's partials (log2-domain lse_accum, normalised o_accum).
static void assemble(const Problem& P, std::vector<double>& out, std::vector<double>& lse,
                     std::vector<char>& is_split) {
  const Case& c = P.c;
  std::vector<uint16_t> o_bf(P.n_out);
  std::vector<float> l_f(P.n_lse), lacc(P.n_acc_rows), oacc(P.n_acc_rows * kHeadDimV);
  CK(cudaMemcpy(o_bf.data(), P.d_out, P.n_out * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(l_f.data(), P.d_lse, P.n_lse * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lacc.data(), P.d_lse_acc, P.n_acc_rows * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(oacc.data(), P.d_o_acc, oacc.size() * 4, cudaMemcpyDeviceToHost));
  out.resize(P.n_out);
  lse.resize(P.n_lse);
  is_split.assign(c.b, 0);
  for (size_t i = 0; i < P.n_out; ++i) out[i] = bf2f(o_bf[i]);
  for (size_t i = 0; i < P.n_lse; ++i) lse[i] = l_f[i];
  for (int bi = 0; bi < c.b; ++bi) {
    const int n = P.num_splits[bi + 1] - P.num_splits[bi];
    if (n <= 1) continue;
    is_split[bi] = 1;
    for (int hk = 0; hk < c.h_kv; ++hk) {
      for (int r = 0; r < P.q_rows; ++r) {
        auto at = [&](int j) {
          return (static_cast<size_t>(P.num_splits[bi] + j) * c.h_kv + hk) * P.q_rows + r;
        };
        double mx = -INFINITY;
        for (int j = 0; j < n; ++j) mx = std::max(mx, static_cast<double>(lacc[at(j)]));
        bool nan = false;
        for (int j = 0; j < n; ++j) nan |= std::isnan(lacc[at(j)]);
        const int s = r / P.g, head = hk * P.g + r % P.g;
        double* o = out.data() + ((static_cast<size_t>(bi) * c.s_q + s) * c.h_q + head) * kHeadDimV;
        double& l = lse[(static_cast<size_t>(bi) * c.h_q + head) * c.s_q + s];
        if (nan) {
          for (int d = 0; d < kHeadDimV; ++d) o[d] = NAN;
          l = NAN;
          continue;
        }
        if (mx == -INFINITY) {
          for (int d = 0; d < kHeadDimV; ++d) o[d] = 0;
          l = INFINITY;
          continue;
        }
        double sum = 0;
        for (int j = 0; j < n; ++j) sum += std::exp2(lacc[at(j)] - mx);
        const double tot = std::log2(sum) + mx;
        for (int d = 0; d < kHeadDimV; ++d) o[d] = 0;
        for (int j = 0; j < n; ++j) {
          const double w = std::exp2(lacc[at(j)] - tot);
          if (w == 0) continue;
          const float* src = oacc.data() + at(j) * kHeadDimV;
          for (int d = 0; d < kHeadDimV; ++d) o[d] += w * src[d];
        }
        l = tot * std::log(2.0);
      }
    }
  }
}

struct CmpResult {
  size_t fails = 0, first_fail = 0;
  double max_abs = 0, cos_diff = 0;
};

static CmpResult compare(const std::vector<double>& got, const std::vector<double>& ref,
                         double abs_tol, double rel_tol) {
  CmpResult r;
  double sab = 0, snorm = 0;
  bool first = true;
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = ref[i];
    bool ok;
    if (!std::isfinite(a) || !std::isfinite(b)) {
      ok = (std::isnan(a) && std::isnan(b)) || (a == b);
    } else {
      const double err = std::fabs(a - b);
      r.max_abs = std::max(r.max_abs, err);
      ok = err <= abs_tol || err <= rel_tol * std::fabs(b);
      sab += a * b;
      snorm += a * a + b * b;
    }
    if (!ok) {
      if (first) r.first_fail = i;
      first = false;
      ++r.fails;
    }
  }
  r.cos_diff = snorm > 0 ? 1.0 - 2.0 * sab / snorm : 0.0;
  return r;
}

static bool run_case(const Case& c, bool verbose) {
  Problem P;
  build(P, c);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  CK(cudaMemsetAsync(P.d_out, 0xff, P.n_out * 2, st));
  CK(cudaMemsetAsync(P.d_lse, 0xff, P.n_lse * 4, st));
  CK(cudaMemsetAsync(P.d_lse_acc, 0xff, P.n_acc_rows * 4, st));
  CK(cudaMemsetAsync(P.d_o_acc, 0xff, P.n_acc_rows * kHeadDimV * 4, st));
  CK(launch_dense_decode_sm90(P.params, st));
  CK(cudaGetLastError());
  wait_or_die(st, 20.0, c.name.c_str());
  std::vector<double> ro, rl, go, gl;
  std::vector<char> split;
  reference(P, ro, rl);
  assemble(P, go, gl, split);
  const CmpResult co = compare(go, ro, 8e-4, 2.01 / 128);
  const CmpResult cl = compare(gl, rl, 1e-6, 8.01 / 65536);
  const bool ok = co.fails == 0 && cl.fails == 0 && co.cos_diff <= 5e-6;
  int nsplit = 0;
  for (char s : split) nsplit += s;
  std::printf("%-4s %-30s b=%d s_q=%d h_q=%3d h_kv=%d causal=%d parts=%3d split_reqs=%d | "
              "out maxabs %.2e fails %zu cos %.1e | lse maxabs %.2e fails %zu\n",
              ok ? "PASS" : "FAIL", c.name.c_str(), c.b, c.s_q, c.h_q, c.h_kv, c.causal, P.parts,
              nsplit, co.max_abs, co.fails,
              co.cos_diff, cl.max_abs, cl.fails);
  if (!ok && verbose) {
    // Where it fails: per request, per (token, head) row, first few elements.
    int shown = 0;
    for (size_t i = 0; i < go.size() && shown < 6; ++i) {
      const double a = go[i], b = ro[i];
      const bool bad = (!std::isfinite(a) || !std::isfinite(b))
                           ? !((std::isnan(a) && std::isnan(b)) || a == b)
                           : !(std::fabs(a - b) <= 8e-4 || std::fabs(a - b) <= 2.01 / 128 * std::fabs(b));
      if (!bad) continue;
      const int d = i % kHeadDimV, head = (i / kHeadDimV) % c.h_q,
                s = (i / kHeadDimV / c.h_q) % c.s_q, bi = i / kHeadDimV / c.h_q / c.s_q;
      std::printf("     out[b=%d s=%d h=%d d=%d] got %.6f ref %.6f (len %d, split %d)\n", bi, s,
                  head, d, a, b, c.lens[bi], split[bi]);
      ++shown;
    }
    for (int bi = 0; bi < c.b; ++bi) {
      size_t bad_el = 0;
      const size_t n = static_cast<size_t>(c.s_q) * c.h_q * kHeadDimV;
      for (size_t i = bi * n; i < (bi + 1) * n; ++i) {
        const double a = go[i], b = ro[i];
        const bool bad = (!std::isfinite(a) || !std::isfinite(b))
                             ? !((std::isnan(a) && std::isnan(b)) || a == b)
                             : !(std::fabs(a - b) <= 8e-4 || std::fabs(a - b) <= 2.01 / 128 * std::fabs(b));
        bad_el += bad;
      }
      int bad_lse = 0;
      for (int h = 0; h < c.h_q; ++h)
        for (int s = 0; s < c.s_q; ++s) {
          const size_t k = (static_cast<size_t>(bi) * c.h_q + h) * c.s_q + s;
          const double a = gl[k], b = rl[k];
          const bool bad = (!std::isfinite(a) || !std::isfinite(b))
                               ? !((std::isnan(a) && std::isnan(b)) || a == b)
                               : !(std::fabs(a - b) <= 1e-6 || std::fabs(a - b) <= 8.01 / 65536 * std::fabs(b));
          if (bad && bad_lse < 2)
            std::printf("     lse[b=%d h=%d s=%d] got %.6f ref %.6f\n", bi, h, s, a, b);
          bad_lse += bad;
        }
      if (bad_el || bad_lse)
        std::printf("     request %d (len %d, splits %d): %zu bad out, %d bad lse\n", bi, c.lens[bi],
                    P.num_splits[bi + 1] - P.num_splits[bi], bad_el, bad_lse);
    }
  }
  P.free_dev();
  CK(cudaStreamDestroy(st));
  return ok;
}

static std::vector<int> rand_lens(int b, int lo, int hi, uint64_t seed, bool zero) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(lo, hi);
  std::vector<int> v(b);
  for (auto& x : v) x = u(rng);
  if (zero && b > 1) v[1] = 0;
  return v;
}

static int run_correctness(bool quick) {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  {
    Case c;
    c.name = "basic h16 split";
    c.b = 4;
    c.lens = {300, 64, 1, 130};
    add(c);
    c.name = "basic h16 two parts";
    c.parts = 2;
    add(c);
    c.name = "basic h16 one part";
    c.parts = 1;
    add(c);
  }
  const int hq_hkv[][2] = {{1, 1}, {3, 1}, {16, 1}, {16, 2}, {64, 1}, {64, 2}, {128, 1}, {128, 2}};
  uint64_t seed = 100;
  for (auto& hh : hq_hkv) {
    for (int variant = 0; variant < 3; ++variant) {
      Case c;
      c.h_q = hh[0];
      c.h_kv = hh[1];
      c.s_q = variant == 0 ? 1 : 2;
      c.causal = variant == 2;
      c.b = 5;
      c.lens = rand_lens(c.b, 0, 700, seed, true);
      c.parts = (variant == 1) ? 7 : 0;
      c.seed = seed++;
      if (variant == 2) c.scale = 1.5f / std::sqrt(192.f);
      c.name = "grid h" + std::to_string(c.h_q) + "/" + std::to_string(c.h_kv) + " v" +
               std::to_string(variant);
      add(c);
      if (quick) break;
    }
  }
  {
    Case c;
    c.name = "s_q=4 causal h16 short lens";
    c.s_q = 4;
    c.causal = true;
    c.b = 6;
    c.lens = {1, 2, 3, 4, 65, 129};
    c.seed = 7;
    add(c);
    c.name = "s_q=4 causal h128/2";
    c.h_q = 128;
    c.h_kv = 2;
    c.lens = {3, 70, 200, 0, 64, 511};
    c.seed = 8;
    add(c);
    c.name = "s_q=3 noncausal h64";
    c.s_q = 3;
    c.causal = false;
    c.h_q = 64;
    c.h_kv = 1;
    c.seed = 9;
    add(c);
  }
  {
    Case c;
    c.name = "long h128 s2 causal";
    c.h_q = 128;
    c.s_q = 2;
    c.causal = true;
    c.b = 3;
    c.lens = {4096, 3000, 5000};
    c.seed = 11;
    add(c);
    c.name = "long h16 s1";
    c.h_q = 16;
    c.s_q = 1;
    c.causal = false;
    c.b = 4;
    c.lens = {8000, 1, 4097, 6000};
    c.parts = 0;
    c.seed = 12;
    add(c);
    c.name = "long h16 s1 few parts";
    c.parts = 3;
    add(c);
    c.name = "long h16 s2 causal (32 rows)";
    c.s_q = 2;
    c.causal = true;
    c.parts = 0;
    c.seed = 15;
    add(c);
  }
  {
    Case c;
    c.name = "clamped lengths";
    c.b = 6;
    c.lens = {500, -5, 100, 192, 193, 2000000000};
    c.max_blocks = 3;
    c.seed = 13;
    add(c);
    c.name = "bad page ids";
    c.b = 5;
    c.lens = {600, 300, 900, 257, 1000};
    c.max_blocks = 0;
    c.bad_ids = true;
    c.seed = 14;
    add(c);
    c.h_q = 64;
    c.s_q = 2;
    c.causal = true;
    c.name = "bad page ids h64 causal";
    add(c);
    Case z;
    z.name = "all zero lengths";
    z.b = 3;
    z.lens = {0, 0, 0};
    z.h_q = 64;
    z.s_q = 2;
    z.causal = true;
    add(z);
    z.name = "odd/even page counts";
    z.b = 8;
    z.lens = {64, 128, 192, 256, 63, 127, 191, 255};
    z.h_q = 16;
    z.s_q = 1;
    z.causal = false;
    z.parts = 5;
    add(z);
  }
  int fails = 0;
  for (auto& c : cases) fails += run_case(c, true) ? 0 : 1;
  std::printf("correctness: %zu passed, %d failed\n", cases.size() - fails, fails);
  return fails == 0 ? 0 : 1;
}

// ------------------------------------------------------------------ building-block test

using sm90::WideTraits;

__global__ void __launch_bounds__(256, 1)
    prims_kernel(const __grid_constant__ CUtensorMap tmap, const __grid_constant__ DecodeParams p,
                 int kv_id, int hk, float* out_s, float* out_o_rs, float* out_o_ss) {
  using namespace sm90;
  using TT = WideTraits;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + TT::kPageBytes, sP = base + 2 * TT::kPageBytes;
  const uint32_t bars = base + 2 * TT::kPageBytes + 2 * TT::kTileBytes;
  const int wg = threadIdx.x / 128, tid_wg = threadIdx.x % 128, lane = threadIdx.x % 32;
  const int r0 = (tid_wg / 32) * 16 + lane / 4, q4 = lane % 4;
  if (threadIdx.x == 0) {
    for (int t = 0; t < 9; ++t) mbar_init(bars + 8 * t, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    PageInfo pi;
    pi.kv_id = kv_id;
    pi.loaded = true;
    load_page_tiles(&tmap, sK, bars, pi, hk, 0, 9, -1, l2_evict_first_policy());
  }
  load_q(p, sQ, 0, 0, 0);
  fence_proxy_async_smem();
  __syncthreads();
  float s[32];
  qk_page(s, sQ, sK, bars, 0);
  wgmma_wait<0>();
  reg_fence(s);
  if (wg == 0) {
    for (int k = 0; k < 8; ++k)
      for (int j = 0; j < 2; ++j) {
        out_s[r0 * 64 + 8 * k + 2 * q4 + j] = s[4 * k + j];
        out_s[(r0 + 8) * 64 + 8 * k + 2 * q4 + j] = s[4 * k + 2 + j];
      }
  }
  uint32_t a[16];
  pack_p(s, a);
  float o[128];
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  reg_fence(o);
  pv_rs(o, a, sK, wg * 4);
  wgmma_wait<0>();
  reg_fence(o);
  const int col0 = wg * 256 + 2 * q4;
  for (int k = 0; k < 32; ++k)
    for (int j = 0; j < 2; ++j) {
      out_o_rs[r0 * 512 + col0 + 8 * k + j] = o[4 * k + j];
      out_o_rs[(r0 + 8) * 512 + col0 + 8 * k + j] = o[4 * k + 2 + j];
    }
  store_p(sP + wg * TT::kTileBytes, a, r0, q4);
  fence_proxy_async_smem();
  named_bar_sync(3 + wg, 128);
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  reg_fence(o);
  pv_ss(o, sP + wg * TT::kTileBytes, sK, wg * 4);
  wgmma_wait<0>();
  reg_fence(o);
  for (int k = 0; k < 32; ++k)
    for (int j = 0; j < 2; ++j) {
      out_o_ss[r0 * 512 + col0 + 8 * k + j] = o[4 * k + j];
      out_o_ss[(r0 + 8) * 512 + col0 + 8 * k + j] = o[4 * k + 2 + j];
    }
}

static int run_prims() {
  // One page (id 3 of 5, kv head 1 of 2) against a 64-row Q block (48 real rows).
  Case c;
  c.b = 1;
  c.s_q = 1;
  c.h_q = 96;  // g = 48 rows for kv head 0; the test reads kv head `hk` of the page
  c.h_kv = 2;
  c.lens = {64 * 4};
  c.seed = 5;
  Problem P;
  build(P, c);
  const int kv_id = P.bt[2], hk = 1;
  float *d_s, *d_ors, *d_oss;
  CK(cudaMalloc(&d_s, 64 * 64 * 4));
  CK(cudaMalloc(&d_ors, 64 * 512 * 4));
  CK(cudaMalloc(&d_oss, 64 * 512 * 4));
  CUtensorMap map;
  CK(make_kcache_tensor_map_sm90(&map, P.params));
  const int smem = 2 * WideTraits::kPageBytes + 2 * WideTraits::kTileBytes + 128 + 1024;
  CK(cudaFuncSetAttribute(prims_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  prims_kernel<<<1, 256, smem>>>(map, P.params, kv_id, hk, d_s, d_ors, d_oss);
  CK(cudaGetLastError());
  wait_or_die(0, 10.0, "prims_kernel");
  std::vector<float> S(64 * 64), Ors(64 * 512), Oss(64 * 512);
  CK(cudaMemcpy(S.data(), d_s, S.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(Ors.data(), d_ors, Ors.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(Oss.data(), d_oss, Oss.size() * 4, cudaMemcpyDeviceToHost));
  // Q rows r < 48 are heads 0..47 of token 0 (kv head 0's group); rows >= 48 are zero.
  const size_t krow = static_cast<size_t>(c.h_kv) * kHeadDimK;
  auto kval = [&](int t, int d) {
    return static_cast<double>(bf2f(P.kv[(static_cast<size_t>(kv_id) * 64 + t) * krow +
                                         static_cast<size_t>(hk) * kHeadDimK + d]));
  };
  double es = 0, ns = 0, ers = 0, nrs = 0, ess = 0, nss = 0;
  int bad_s = -1;
  for (int r = 0; r < 64; ++r) {
    std::vector<double> pr(64);
    for (int t = 0; t < 64; ++t) {
      double acc = 0;
      if (r < P.q_rows)
        for (int d = 0; d < kHeadDimK; ++d) acc += bf2f(P.q[static_cast<size_t>(r) * kHeadDimK + d]) * kval(t, d);
      const double e = std::fabs(acc - S[r * 64 + t]);
      if (e > 1e-3 + 1e-2 * std::fabs(acc) && bad_s < 0) bad_s = r * 64 + t;
      es += e * e;
      ns += acc * acc;
      pr[t] = bf2f(f2bf(S[r * 64 + t]));  // the kernel rounds its own S to bf16
    }
    for (int d = 0; d < kHeadDimV; ++d) {
      double acc = 0;
      for (int t = 0; t < 64; ++t) acc += pr[t] * kval(t, d);
      ers += (acc - Ors[r * 512 + d]) * (acc - Ors[r * 512 + d]);
      ess += (acc - Oss[r * 512 + d]) * (acc - Oss[r * 512 + d]);
      nrs += acc * acc;
      nss += acc * acc;
    }
  }
  const double rs = std::sqrt(es / std::max(ns, 1e-30)), rrs = std::sqrt(ers / std::max(nrs, 1e-30)),
               rss = std::sqrt(ess / std::max(nss, 1e-30));
  const bool ok = rs < 1e-4 && rrs < 1e-4 && rss < 1e-4;
  std::printf("%s prims: QK^T rel err %.2e, P.V (RS) rel err %.2e, P.V (SS) rel err %.2e\n",
              ok ? "PASS" : "FAIL", rs, rrs, rss);
  if (bad_s >= 0) {
    const int r = bad_s / 64, t = bad_s % 64;
    std::printf("     first bad S[%d][%d] = %f; S row %d: ", r, t, S[bad_s], r);
    for (int i = 0; i < 8; ++i) std::printf("%.4f ", S[r * 64 + i]);
    std::printf("\n");
  }
  if (!ok) {
    std::printf("     O_rs[0][0..7]: ");
    for (int i = 0; i < 8; ++i) std::printf("%.4f ", Ors[i]);
    std::printf("\n     O_ss[0][0..7]: ");
    for (int i = 0; i < 8; ++i) std::printf("%.4f ", Oss[i]);
    std::printf("\n");
  }
  P.free_dev();
  return ok ? 0 : 1;
}

// ------------------------------------------------------------------ benchmark

// Merges split rows (one warp per (request, kv head, row)); a simple stand-in for combine.cu so
// that timed calls include the merge. Waits on the main kernel with griddepcontrol.wait (PDL).
__global__ void __launch_bounds__(128) bench_combine_kernel(const __grid_constant__ DecodeParams p) {
  pdl_wait_for_primary();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = blockIdx.x * 4 + warp, hk = blockIdx.y, bi = blockIdx.z;
  if (r >= p.q_rows) return;
  const int first = p.num_splits[bi], n = p.num_splits[bi + 1] - first;
  if (n <= 1) return;
  auto at = [&](int j) { return (static_cast<size_t>(first + j) * p.h_kv + hk) * p.q_rows + r; };
  float mx = -INFINITY;
  for (int j = lane; j < n; j += 32) mx = fmaxf(mx, p.lse_accum[at(j)]);
  for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
  if (mx != -INFINITY)
    for (int j = lane; j < n; j += 32) sum += exp2f(p.lse_accum[at(j)] - mx);
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float tot = sum > 0.f ? log2f(sum) + mx : INFINITY;
  float acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  if (sum > 0.f) {
    for (int j = 0; j < n; ++j) {
      const float w = exp2f(p.lse_accum[at(j)] - tot);
      const float4* src = reinterpret_cast<const float4*>(p.o_accum + at(j) * kHeadDimV);
      for (int v = 0; v < 4; ++v) {
        const float4 x = src[lane + 32 * v];
        acc[4 * v + 0] += w * x.x;
        acc[4 * v + 1] += w * x.y;
        acc[4 * v + 2] += w * x.z;
        acc[4 * v + 3] += w * x.w;
      }
    }
  }
  const int s = r / p.g, head = hk * p.g + r % p.g;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) +
                       ((static_cast<size_t>(bi) * p.s_q + s) * p.h_q + head) * kHeadDimV;
  for (int v = 0; v < 4; ++v)
    for (int e = 0; e < 4; ++e) out[4 * (lane + 32 * v) + e] = __float2bfloat16(acc[4 * v + e]);
  if (lane == 0)
    p.lse[(static_cast<size_t>(bi) * p.h_q + head) * p.s_q + s] =
        sum > 0.f ? tot * 0.69314718f : INFINITY;
}

static cudaError_t launch_bench_combine(const DecodeParams& p, cudaStream_t st) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((p.q_rows + 3) / 4, p.h_kv, p.b);
  cfg.blockDim = dim3(128);
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, bench_combine_kernel, p);
}

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

static bool g_skip_bw = false;

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct BenchOpts {
  const char* json = nullptr;
  bool corners = false;      // only h_q=16/s_q=1 and h_q=128/s_q=2 (non-causal)
  int only[4] = {0, 0, 0, -1};  // s_q, L, h_q, causal of a single config (ncu)
  int overhead = kFixedOverheadBlocks;
  int reps = 20;
  int batch = 0;  // also time this many calls launched back to back
  int gap_us = -1;    // >= 0: time each call of the batch alone, after this long an idle GPU
  bool no_pdl = false;  // batch launches without programmatic dependent launch
  int energy_calls = 0;  // > 0: board energy per call over this many calls back to back
};

// Occupies the stream for `us` microseconds without touching memory (an idle gap between calls).
__global__ void idle_kernel(unsigned us) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < 1000ull * us);
}

#if defined(JFM_TIMING)
// Per-part timing of the last main-kernel launch (built with -DJFM_TIMING; grid x = y = 1 here):
// start skew, how the parts' end times spread, and a least-squares fit of each part's duration
// to its pages and chunks, i.e. what a chunk switch really costs in pages.
static void print_cta_timing(const std::vector<int>& lens, const std::vector<SchedRecord>& recs,
                             int max_blocks) {
  const int parts = static_cast<int>(recs.size());
  std::vector<unsigned long long> t(2 * parts);
  CK(read_cta_times_sm90(t.data(), t.size()));
  std::vector<unsigned long long> mk(16 * parts);  // slot 15: the part's SM
  CK(read_cta_marks_sm90(mk.data(), mk.size()));
  {  // the first request switch of each CTA that has one (JFM_MARK): medians of the intervals
    std::vector<double> d[8];
    for (int i = 0; i < parts; ++i) {
      const unsigned long long* m = &mk[16 * i];
      bool ok = true;  // marks of this launch (inside the CTA's span) and in order
      for (int k = 0; k < 10; ++k) {
        ok = ok && m[k] >= t[2 * i] && m[k] <= t[2 * i + 1] && (k == 0 || m[k - 1] <= m[k]);
      }
      if (!ok) continue;
      d[0].push_back((m[1] - m[0]) * 0.5e-3);  // one pair, steady state
      d[1].push_back((m[3] - m[2]) * 1e-3);    // last pair of the first request
      d[2].push_back((m[7] - m[3]) * 1e-3);    // epilogue, of which:
      d[3].push_back((m[4] - m[3]) * 1e-3);    //   both groups' row sums exchanged
      d[4].push_back((m[5] - m[4]) * 1e-3);    //   split count read
      d[5].push_back((m[6] - m[5]) * 1e-3);    //   output written
      d[6].push_back((m[8] - m[7]) * 1e-3);    // next request's setup (Q, row max)
      d[7].push_back((m[9] - m[8]) * 1e-3);    // its first pair
    }
    auto med = [](std::vector<double> v) {
      if (v.empty()) return -1.0;
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::printf("  switch (%zu CTAs, median us): pair %.2f | last pair %.2f | epilogue %.2f "
                "(sums %.2f, split count %.2f, stores %.2f) | setup %.2f | first pair %.2f\n",
                d[0].size(), med(d[0]), med(d[1]), med(d[2]), med(d[3]), med(d[4]), med(d[5]),
                med(d[6]), med(d[7]));
  }
  unsigned long long t0 = ~0ull, t1 = 0;
  for (int i = 0; i < parts; ++i) t0 = std::min(t0, t[2 * i]), t1 = std::max(t1, t[2 * i + 1]);
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
    const double st = (t[2 * i] - t0) * 1e-3, en = (t[2 * i + 1] - t0) * 1e-3;
    starts.push_back(st);
    ends.push_back(en);
    if (dump) {
      std::fprintf(dump, "%d %llu %.0f %.0f %.3f %.3f\n", i, mk[16 * i + 15], pages, chunks, st, en);
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
    for (int a = 0; a < 3; ++a)
      for (int c = 0; c < 3; ++c) m[a][c] = c == k ? atb[a] : ata[a][c];
    coef[k] = det(m) / d;
  }
  if (dump) std::fclose(dump);
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
  auto q = [](const std::vector<double>& v, double f) { return v[static_cast<size_t>(f * (v.size() - 1))]; };
  std::printf("  timing: span %.1f us | start max %.1f us | end min %.1f p10 %.1f median %.1f "
              "p90 %.1f max %.1f us | fit: %.3f us/page, %.2f us/chunk (%.1f pages), %.1f us fixed\n",
              (t1 - t0) * 1e-3, starts.back(), ends.front(), q(ends, 0.1), q(ends, 0.5),
              q(ends, 0.9), ends.back(), coef[0], coef[1], coef[0] > 0 ? coef[1] / coef[0] : 0.0,
              coef[2]);
}
#endif

static int run_bench(const BenchOpts& o) {
  const char* json_path = o.json;
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
  cudaEvent_t e0, e1, e2;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventCreate(&e2));

  if (!g_skip_bw) {  // read bandwidth of this card on the same buffer: the memory ceiling
    uint32_t* sink;
    CK(cudaMalloc(&sink, 4));
    const size_t n = cap_pages * 64 * row * 2 / 16;
    std::vector<float> t;
    for (int it = 0; it < 6; ++it) {
      CK(cudaEventRecord(e0, st));
      read_bw_kernel<<<num_sms() * 8, 512, 0, st>>>(reinterpret_cast<const uint4*>(d_kv), n, sink);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (it > 0) t.push_back(ms);
    }
    std::printf("read-only stream over %.2f GB: %.2f TB/s (median of 5)\n", n * 16 / 1e9,
                n * 16 / (median(t) * 1e-3) / 1e12);
    CK(cudaFree(sink));
  }

  FILE* js = json_path ? std::fopen(json_path, "w") : nullptr;
  if (js) std::fprintf(js, "[\n");
  bool first_json = true;
  std::printf("sched overhead %d pages/chunk, %d timed calls per config\n", o.overhead, o.reps);
  std::printf("%-5s %-6s %-5s %-6s %-8s %-7s %-10s %-10s %-8s %s\n", "s_q", "L", "h_q",
              "causal", "meanlen", "splits", "call_us", "main_us", "TB/s", "TFLOPS");
  std::mt19937_64 rng(2024);
  for (int s_q : {1, 2}) {
    for (int L : Ls) {
      for (int h_q : {16, 64, 128}) {
        for (int causal : {0, 1}) {
          if (causal && s_q == 1) continue;
          if (o.only[3] >= 0 &&
              (s_q != o.only[0] || L != o.only[1] || h_q != o.only[2] || causal != o.only[3]))
            continue;
          if (o.corners && !((h_q == 16 && s_q == 1) || (h_q == 128 && s_q == 2 && !causal)))
            continue;
          // lengths ~ N(L, L/2) clipped >= s_q
          std::normal_distribution<double> nd(L, L / 2.0);
          std::vector<int> lens(b);
          double mean = 0;
          int maxp = 1;
          for (auto& x : lens) {
            x = std::max(s_q, static_cast<int>(std::llround(nd(rng))));
            mean += x;
            maxp = std::max(maxp, (x + 63) / 64);
          }
          mean /= b;
          size_t need = 0;
          for (int x : lens) need += (x + 63) / 64;
          if (need > cap_pages) {
            std::printf("skip L=%d: %zu pages > capacity\n", L, need);
            continue;
          }
          std::vector<int> perm(cap_pages);
          std::iota(perm.begin(), perm.end(), 0);
          std::shuffle(perm.begin(), perm.end(), rng);
          const int max_blocks = maxp;
          std::vector<int> bt(static_cast<size_t>(b) * max_blocks, 2147480000);
          size_t nx = 0;
          for (int i = 0; i < b; ++i)
            for (int j = 0; j < (lens[i] + 63) / 64; ++j) bt[static_cast<size_t>(i) * max_blocks + j] = perm[nx++];
          const int g = h_q / h_kv, q_rows = s_q * g, mb = (q_rows + 63) / 64;
          const int parts = std::max(num_sms() / h_kv / mb, 1);
          std::vector<SchedRecord> recs;
          std::vector<int> ns;
          host_sched(lens, parts, recs, ns, o.overhead);
          int *d_bt, *d_lens, *d_ns;
          SchedRecord* d_recs;
          void* d_out;
          float *d_lse, *d_lacc, *d_oacc;
          const size_t acc_rows = static_cast<size_t>(b + parts) * h_kv * q_rows;
          CK(cudaMalloc(&d_bt, bt.size() * 4));
          CK(cudaMalloc(&d_lens, b * 4));
          CK(cudaMalloc(&d_ns, (b + 1) * 4));
          CK(cudaMalloc(&d_recs, parts * sizeof(SchedRecord)));
          CK(cudaMalloc(&d_out, static_cast<size_t>(b) * s_q * h_q * kHeadDimV * 2));
          CK(cudaMalloc(&d_lse, static_cast<size_t>(b) * s_q * h_q * 4));
          CK(cudaMalloc(&d_lacc, acc_rows * 4));
          CK(cudaMalloc(&d_oacc, acc_rows * kHeadDimV * 4));
          CK(cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(d_lens, lens.data(), b * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(d_ns, ns.data(), (b + 1) * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(d_recs, recs.data(), parts * sizeof(SchedRecord), cudaMemcpyHostToDevice));
          DecodeParams p{};
          p.q = d_q;
          p.k_cache = d_kv;
          p.block_table = d_bt;
          p.seqlens = d_lens;
          p.sched = d_recs;
          p.num_splits = d_ns;
          p.out = d_out;
          p.lse = d_lse;
          p.lse_accum = d_lacc;
          p.o_accum = d_oacc;
          p.b = b;
          p.s_q = s_q;
          p.h_q = h_q;
          p.h_kv = h_kv;
          p.g = g;
          p.q_rows = q_rows;
          p.num_m_blocks = mb;
          p.num_blocks = static_cast<int>(cap_pages);
          p.max_blocks = max_blocks;
          p.num_sm_parts = parts;
          p.scale = 1.f / std::sqrt(576.f);
          p.scale_log2 = p.scale * 1.4426950408889634f;
          p.causal = causal;
          std::vector<float> t_call, t_main;
          for (int it = 0; it < o.reps + 3; ++it) {
            CK(cudaEventRecord(e0, st));
            CK(launch_dense_decode_sm90(p, st));
            CK(cudaEventRecord(e1, st));
            CK(launch_bench_combine(p, st));
            CK(cudaEventRecord(e2, st));
            wait_or_die(st, 20.0, "bench call");
            float a, c;
            CK(cudaEventElapsedTime(&a, e0, e1));
            CK(cudaEventElapsedTime(&c, e0, e2));
            if (it >= 3) {
              t_main.push_back(a);
              t_call.push_back(c);
            }
          }
#if defined(JFM_TIMING)
          print_cta_timing(lens, recs, max_blocks);
#endif
          // ms for n calls launched back to back, as the layers of a model: no host sync between.
          auto back_to_back_ms = [&](int n, double limit_s, const char* what) {
            CK(cudaEventRecord(e0, st));
            for (int it = 0; it < n; ++it) {
              CK(launch_dense_decode_sm90(p, st));
              CK(launch_bench_combine(p, st));
            }
            CK(cudaEventRecord(e2, st));
            wait_or_die(st, limit_s, what);
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e2));
            return ms;
          };
          if (o.batch > 0) {
            std::vector<float> t_batch;
            for (int rep = 0; rep < 4; ++rep) {
              const float c = back_to_back_ms(o.batch, 60.0, "bench batch");
              if (rep > 0) t_batch.push_back(c / o.batch);
            }
            std::printf("  %d calls back to back: %.1f us per call\n", o.batch,
                        median(t_batch) * 1e3);
          }
          if (o.energy_calls > 0) {  // joules per call under sustained load (NVML counter, mJ)
            unsigned long long mj0 = 0, mj1 = 0;
            CK(cudaStreamSynchronize(st));
            const bool have0 = board_energy_mj(&mj0);
            const float ms = back_to_back_ms(o.energy_calls, 120.0, "bench energy");
            if (have0 && board_energy_mj(&mj1)) {
              const double j = (mj1 - mj0) * 1e-3;
              std::printf("  energy: %d calls back to back, %.1f us per call, %.2f mJ per call, "
                          "%.0f W\n", o.energy_calls, ms * 1e3 / o.energy_calls,
                          j * 1e3 / o.energy_calls, j / (ms * 1e-3));
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
                CK(launch_dense_decode_sm90(p, st, !o.no_pdl));
                CK(launch_bench_combine(p, st));
                CK(cudaEventRecord(ev[2 * it + 1], st));
              }
              wait_or_die(st, 60.0, "bench each");
              for (int it = 0; it < o.batch; ++it) {
                float c;
                CK(cudaEventElapsedTime(&c, ev[2 * it], ev[2 * it + 1]));
                if (rep > 0) t_each.push_back(c);
              }
            }
            std::printf("  %d calls, gap %d us, pdl %d: median %.1f us, first %.1f, last %.1f\n",
                        o.batch, o.gap_us, !o.no_pdl, median(t_each) * 1e3, t_each[0] * 1e3,
                        t_each.back() * 1e3);
            for (auto& e : ev) cudaEventDestroy(e);
          }
          const double tc = median(t_call) * 1e-3, tm = median(t_main) * 1e-3;
          const double bytes = b * (s_q * h_q * 576.0 * 2 + mean * h_kv * 576.0 * 2 + s_q * h_q * 512.0 * 2);
          const double flops = static_cast<double>(b) * h_q * s_q * (2.0 * 576 + 2.0 * 512) * mean;
          std::printf("%-5d %-6d %-5d %-6d %-8.0f %-7d %-10.1f %-10.1f %-8.3f %-8.1f\n", s_q, L,
                      h_q, causal, mean, ns[b] - b, tc * 1e6, tm * 1e6, bytes / tc / 1e12,
                      flops / tc / 1e12);
          if (js) {
            std::fprintf(js,
                         "%s  {\"s_q\": %d, \"L\": %d, \"h_q\": %d, \"causal\": %d, \"mean_len\": "
                         "%.1f, \"extra_splits\": %d, \"call_us\": %.2f, \"main_us\": %.2f, "
                         "\"TBps\": %.4f, \"TFLOPS\": %.2f, \"overhead\": %d}",
                         first_json ? "" : ",\n", s_q, L, h_q, causal, mean, ns[b] - b, tc * 1e6,
                         tm * 1e6, bytes / tc / 1e12, flops / tc / 1e12, o.overhead);
            first_json = false;
          }
          cudaFree(d_bt);
          cudaFree(d_lens);
          cudaFree(d_ns);
          cudaFree(d_recs);
          cudaFree(d_out);
          cudaFree(d_lse);
          cudaFree(d_lacc);
          cudaFree(d_oacc);
        }
      }
    }
  }
  if (js) {
    std::fprintf(js, "\n]\n");
    std::fclose(js);
  }
  CK(cudaFree(d_kv));
  CK(cudaFree(d_q));
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && !std::strcmp(argv[1], "--noop")) return 0;  // "does this binary run here?"
  bool prims = false, bench = false, quick = false, skip_bw = false;
  BenchOpts bo;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--prims")) prims = true;
    else if (!std::strcmp(argv[i], "--bench")) bench = true;
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--corners")) bo.corners = true;
    else if (!std::strcmp(argv[i], "--no-bw")) skip_bw = true;
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) bo.json = argv[++i];
    else if (!std::strcmp(argv[i], "--overhead") && i + 1 < argc) bo.overhead = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) bo.reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) bo.batch = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--gap-us") && i + 1 < argc) bo.gap_us = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--no-pdl")) bo.no_pdl = true;
    else if (!std::strcmp(argv[i], "--energy") && i + 1 < argc) bo.energy_calls = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      if (std::sscanf(argv[++i], "%d,%d,%d,%d", &bo.only[0], &bo.only[1], &bo.only[2],
                      &bo.only[3]) != 4) {
        std::printf("--only takes s_q,L,h_q,causal\n");
        return 2;
      }
    }
  }
  g_skip_bw = skip_bw;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, sm_%d%d\n", prop.name, prop.multiProcessorCount, prop.major,
              prop.minor);
  if (prims) return run_prims();
  if (bench) return run_bench(bo);
  return run_correctness(quick);
}
