// Standalone checker of the shipped decode path (no Python, no XLA): the scheduler, the sm90 dense
// decode kernels and the combine, called through the library's own launchers (launch_sched,
// launch_decode), against a float64 host reference.
//
//   check_decode [--quick]    correctness over many shapes (--quick: fewer head configurations),
//                             the scheduler's records and their length fingerprints included
//   check_decode --prims      the building blocks alone: TMA tile load, QK^T (SS), P.V (RS, SS),
//                             in bf16 and in f16
//   check_decode --noop       exits 0: "does this binary run here?"
//
// Built by CMake with JAX_FLASHMLA_BUILD_TOOLS=ON (cmake/Tools.cmake), also as check_decode_wd
// (JFM_WATCHDOG: a stuck barrier wait traps and says where). JAX_FLASHMLA_DECODE_KERNEL=wide in
// the environment checks the wide kernel on every shape, as it does for the library.
//
// Data follow DESIGN §4: q and the cache ~ N(0,1)/10 clamped to [-1, 1]; cache slots past each
// length and all unused pages hold NaN; block tables are random permutations, entries past the
// used pages are invalid ids; lengths vary (zeros included). Outputs and partials are poisoned
// with NaN before each call, so an element the kernels failed to write fails the comparison.
// Cases run in bf16 unless their name says f16 (q, k_cache and out in float16); the reference
// reads the element type's values.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
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

#include "kernels/common/launch_utils.h"
#include "kernels/launch.h"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/blocks.cuh"
#include "kernels/sm90/decode/dense/launch.h"
#include "problem.h"

using namespace jax_flashmla;

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

// The kernels' element types on the host: bits <-> float, round to nearest even.
static uint16_t to_elem(ElemType e, float f) {
  return e == ElemType::kF16 ? __half_as_ushort(__float2half_rn(f)) : f2bf(f);
}
static float from_elem(ElemType e, uint16_t h) {
  return e == ElemType::kF16 ? __half2float(__ushort_as_half(h)) : bf2f(h);
}
static uint16_t elem_nan(ElemType e) { return e == ElemType::kF16 ? 0x7e00 : 0x7fc0; }
static const char* elem_name(ElemType e) { return e == ElemType::kF16 ? "f16" : "bf16"; }

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
  ElemType elem = ElemType::kBF16;  // of q, k_cache and out
  // Stale records: the scheduler runs on these lengths, the decode on `lens`. The requests of
  // every part whose len_fingerprint then differs must come out NaN, the others right.
  std::vector<int> sched_lens;
};

// A case's data on the host and the device, and its decode call.
struct Problem {
  Case c;
  int g, q_rows, max_blocks, num_blocks;
  float scale;
  std::vector<uint16_t> q, kv;
  std::vector<int> bt;
  void *d_q = nullptr, *d_kv = nullptr;
  DecodeCall call;

  void free_dev() {
    call.free();
    cudaFree(d_q);
    cudaFree(d_kv);
  }
};

static void build(Problem& P, const Case& c) {
  P.c = c;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto rnd = [&] { return to_elem(c.elem, std::min(1.f, std::max(-1.f, nd(rng) / 10.f))); };
  const uint16_t nan = elem_nan(c.elem);
  const int b = c.b;
  P.g = c.h_q / c.h_kv;
  P.q_rows = c.s_q * P.g;
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
          std::fill_n(P.kv.begin() + (static_cast<size_t>(id) * 64 + t) * row, row, nan);
        }
      }
    }
  }
  for (int id = 0; id < P.num_blocks; ++id) {
    if (!page_used[id]) {
      std::fill_n(P.kv.begin() + static_cast<size_t>(id) * 64 * row, 64 * row, nan);
    }
  }
  P.q.resize(static_cast<size_t>(b) * c.s_q * c.h_q * kHeadDimK);
  for (auto& x : P.q) x = rnd();
  P.scale = c.scale > 0.f ? c.scale : 1.f / std::sqrt(576.f);

  CK(cudaMalloc(&P.d_q, P.q.size() * 2));
  CK(cudaMalloc(&P.d_kv, P.kv.size() * 2));
  CK(cudaMemcpy(P.d_q, P.q.data(), P.q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_kv, P.kv.data(), P.kv.size() * 2, cudaMemcpyHostToDevice));
  CallShape shape;
  shape.b = b;
  shape.s_q = c.s_q;
  shape.h_q = c.h_q;
  shape.h_kv = c.h_kv;
  shape.causal = c.causal;
  shape.scale = P.scale;
  shape.parts = c.parts;
  shape.elem = c.elem;
  P.call.init(P.d_q, P.d_kv, P.num_blocks, P.bt, P.max_blocks, c.lens, shape);
}

// ------------------------------------------------------------------ reference and comparison

// out [b, s_q, h_q, 512] and lse [b, h_q, s_q] in float64 (DESIGN §4), from the values of the
// case's element type.
static void reference(const Problem& P, std::vector<double>& out, std::vector<double>& lse) {
  const Case& c = P.c;
  out.assign(P.call.n_out, 0.0);
  lse.assign(P.call.n_lse, 0.0);
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
    for (int d = 0; d < kHeadDimK; ++d) qd[d] = from_elem(c.elem, q[d]);
    std::vector<double> sc;
    std::vector<const uint16_t*> kp;
    for (int t = 0; t < vis; ++t) {
      const int id = P.bt[static_cast<size_t>(bi) * P.max_blocks + t / 64];
      if (id < 0 || id >= P.num_blocks) continue;
      const uint16_t* k = P.kv.data() + (static_cast<size_t>(id) * 64 + t % 64) * row +
                          static_cast<size_t>(hk) * kHeadDimK;
      double acc = 0;
      for (int d = 0; d < kHeadDimK; ++d) acc += qd[d] * from_elem(c.elem, k[d]);
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
      for (int d = 0; d < kHeadDimV; ++d) o[d] += e * from_elem(c.elem, kp[t][d]);
    }
    for (int d = 0; d < kHeadDimV; ++d) o[d] /= sum;
    l = m + std::log(sum);
  });
}

// What a full decode call returns: unsplit requests straight from out/lse, split ones merged

// Within tolerance, or the same non-finite value (NaN where the reference has NaN, inf for inf).
static bool element_ok(double got, double ref, double abs_tol, double rel_tol) {
  if (!std::isfinite(got) || !std::isfinite(ref)) {
    return (std::isnan(got) && std::isnan(ref)) || got == ref;
  }
  const double err = std::fabs(got - ref);
  return err <= abs_tol || err <= rel_tol * std::fabs(ref);
}

// out: bf16 rounding of the result (2^-8 relative) plus accumulation; lse: fp32.
constexpr double kOutAbs = 8e-4, kOutRel = 2.01 / 128, kLseAbs = 1e-6, kLseRel = 8.01 / 65536;

struct CmpResult {
  size_t fails = 0;
  double max_abs = 0, cos_diff = 0;
};

static CmpResult compare(const std::vector<double>& got, const std::vector<double>& ref,
                         double abs_tol, double rel_tol) {
  CmpResult r;
  double sab = 0, snorm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = ref[i];
    if (std::isfinite(a) && std::isfinite(b)) {
      r.max_abs = std::max(r.max_abs, std::fabs(a - b));
      sab += a * b;
      snorm += a * a + b * b;
    }
    r.fails += !element_ok(a, b, abs_tol, rel_tol);
  }
  r.cos_diff = snorm > 0 ? 1.0 - 2.0 * sab / snorm : 0.0;
  return r;
}

// Where a failing case fails: its first bad elements, then per request the bad counts.
static void print_failures(const Problem& P, const std::vector<double>& go,
                           const std::vector<double>& gl, const std::vector<double>& ro,
                           const std::vector<double>& rl) {
  const Case& c = P.c;
  const std::vector<int>& ns = P.call.num_splits;
  int shown = 0;
  for (size_t i = 0; i < go.size() && shown < 6; ++i) {
    if (element_ok(go[i], ro[i], kOutAbs, kOutRel)) continue;
    const int d = i % kHeadDimV, head = (i / kHeadDimV) % c.h_q,
              s = (i / kHeadDimV / c.h_q) % c.s_q, bi = i / kHeadDimV / c.h_q / c.s_q;
    std::printf("     out[b=%d s=%d h=%d d=%d] got %.6f ref %.6f (len %d, splits %d)\n", bi, s,
                head, d, go[i], ro[i], c.lens[bi], ns[bi + 1] - ns[bi]);
    ++shown;
  }
  const size_t per_req = static_cast<size_t>(c.s_q) * c.h_q * kHeadDimV;
  for (int bi = 0; bi < c.b; ++bi) {
    size_t bad_out = 0;
    for (size_t i = bi * per_req; i < (bi + 1) * per_req; ++i) {
      bad_out += !element_ok(go[i], ro[i], kOutAbs, kOutRel);
    }
    int bad_lse = 0;
    for (int h = 0; h < c.h_q; ++h) {
      for (int s = 0; s < c.s_q; ++s) {
        const size_t k = (static_cast<size_t>(bi) * c.h_q + h) * c.s_q + s;
        if (element_ok(gl[k], rl[k], kLseAbs, kLseRel)) continue;
        if (bad_lse++ < 2) {
          std::printf("     lse[b=%d h=%d s=%d] got %.6f ref %.6f\n", bi, h, s, gl[k], rl[k]);
        }
      }
    }
    if (bad_out || bad_lse) {
      std::printf("     request %d (len %d, splits %d): %zu bad out, %d bad lse\n", bi,
                  c.lens[bi], ns[bi + 1] - ns[bi], bad_out, bad_lse);
    }
  }
}

// The len_fingerprint of a record over lengths `lens` (params.h), as the kernels recompute it:
// over [begin_req, min(end_req, b - 1)].
static uint32_t fingerprint(const SchedRecord& r, const std::vector<int>& lens) {
  uint32_t sum = 0;
  const int last = std::min(r.end_req, static_cast<int>(lens.size()) - 1);
  for (int i = r.begin_req; i <= last; ++i) sum += len_fingerprint_term(lens[i], i);
  return sum;
}

// The scheduler's records carry the fingerprint of the lengths it read (0 in parts without
// work) and zero padding. Prints and returns false otherwise.
static bool records_ok(const DecodeCall& call, const std::vector<int>& lens) {
  bool ok = true;
  for (size_t k = 0; k < call.recs.size(); ++k) {
    const SchedRecord& r = call.recs[k];
    const bool work = r.begin_req >= 0 && r.begin_req < call.p.b;
    const uint32_t want = work ? fingerprint(r, lens) : 0u;
    if (static_cast<uint32_t>(r.len_fingerprint) != want || r.pad[0] != 0 || r.pad[1] != 0) {
      std::printf("     record %zu [%d %d %d %d %d | %d %d %d]: len_fingerprint should be %d\n", k,
                  r.begin_req, r.begin_block, r.end_req, r.end_block, r.begin_split,
                  r.len_fingerprint, r.pad[0], r.pad[1], static_cast<int32_t>(want));
      ok = false;
    }
  }
  return ok;
}

// One case through the shipped path: launch_sched, then launch_decode (the dense kernel the
// policy picks, then the combine), as the two FFI handlers run them.
static bool run_case(const Case& c, bool verbose) {
  Problem P;
  build(P, c);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  const bool stale_case = !c.sched_lens.empty();
  const std::vector<int>& sched_lens = stale_case ? c.sched_lens : c.lens;
  int32_t* d_lens = const_cast<int32_t*>(P.call.p.seqlens);
  if (stale_case) {
    CK(cudaMemcpy(d_lens, sched_lens.data(), c.b * 4, cudaMemcpyHostToDevice));
  }
  P.call.schedule(st);
  const bool recs_ok = records_ok(P.call, sched_lens);
  // Requests covered by a part whose fingerprint no longer matches: NaN rows expected.
  std::vector<char> stale_req(c.b, 0);
  if (stale_case) {
    CK(cudaMemcpy(d_lens, c.lens.data(), c.b * 4, cudaMemcpyHostToDevice));
    for (const SchedRecord& r : P.call.recs) {
      if (r.begin_req < 0 || r.begin_req >= c.b) continue;
      if (fingerprint(r, c.lens) == static_cast<uint32_t>(r.len_fingerprint)) continue;
      for (int i = r.begin_req; i <= std::min(r.end_req, c.b - 1); ++i) stale_req[i] = 1;
    }
  }
  P.call.poison(st);
  CK(launch_decode(P.call.p, st));
  wait_or_die(st, 20.0, c.name.c_str());

  std::vector<uint16_t> out_e(P.call.n_out);
  std::vector<float> lse_f(P.call.n_lse);
  CK(cudaMemcpy(out_e.data(), P.call.p.out, out_e.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse_f.data(), P.call.p.lse, lse_f.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<double> go(out_e.size()), gl(lse_f.begin(), lse_f.end()), ro, rl;
  for (size_t i = 0; i < out_e.size(); ++i) go[i] = from_elem(c.elem, out_e[i]);
  reference(P, ro, rl);
  int n_stale = 0;
  for (int bi = 0; bi < c.b; ++bi) {
    if (!stale_req[bi]) continue;
    ++n_stale;
    const size_t per_req = static_cast<size_t>(c.s_q) * c.h_q;
    std::fill_n(ro.begin() + bi * per_req * kHeadDimV, per_req * kHeadDimV, NAN);
    std::fill_n(rl.begin() + bi * per_req, per_req, NAN);  // lse [b, h_q, s_q]
  }
  // A stale case must have both kinds of requests to test anything.
  const bool stale_ok = !stale_case || (n_stale > 0 && n_stale < c.b);
  const CmpResult co = compare(go, ro, kOutAbs, kOutRel);
  const CmpResult cl = compare(gl, rl, kLseAbs, kLseRel);
  const bool ok =
      co.fails == 0 && cl.fails == 0 && co.cos_diff <= 5e-6 && recs_ok && stale_ok;
  int split_reqs = 0;
  const std::vector<int>& ns = P.call.num_splits;
  for (int bi = 0; bi < c.b; ++bi) split_reqs += ns[bi + 1] - ns[bi] > 1;
  std::printf("%-4s %-30s b=%d s_q=%d h_q=%3d h_kv=%d causal=%d parts=%3d split_reqs=%d | "
              "out maxabs %.2e fails %zu cos %.1e | lse maxabs %.2e fails %zu\n",
              ok ? "PASS" : "FAIL", c.name.c_str(), c.b, c.s_q, c.h_q, c.h_kv, c.causal,
              P.call.p.num_sm_parts, split_reqs, co.max_abs, co.fails, co.cos_diff, cl.max_abs,
              cl.fails);
  if (stale_case) {
    std::printf("     stale records: NaN expected in %d of %d requests:", n_stale, c.b);
    for (int bi = 0; bi < c.b; ++bi) {
      if (stale_req[bi]) std::printf(" %d", bi);
    }
    std::printf("\n");
  }
  if (!ok && verbose) print_failures(P, go, gl, ro, rl);
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
  {
    // Records scheduled for other lengths: the lengths of requests 1 and 2 (request 1 is empty,
    // so request 2 becomes an empty row of a stale part) and of 7 and 9 swapped after scheduling,
    // over 5 parts so that some requests are split. Each kernel form, and the f16 copy below.
    const int shapes[][4] = {{1, 16, 1, 0}, {2, 16, 1, 1}, {2, 64, 1, 0}, {1, 128, 2, 0}};
    for (auto& sh : shapes) {
      Case c;
      c.s_q = sh[0];
      c.h_q = sh[1];
      c.h_kv = sh[2];
      c.causal = sh[3] != 0;
      c.b = 12;
      c.parts = 5;
      c.sched_lens = rand_lens(c.b, 0, 700, 31, true);
      c.lens = c.sched_lens;
      std::swap(c.lens[1], c.lens[2]);
      std::swap(c.lens[7], c.lens[9]);
      c.seed = 31;
      c.name = "stale records h" + std::to_string(c.h_q) + "/" + std::to_string(c.h_kv) +
               " s_q=" + std::to_string(c.s_q);
      add(c);
    }
  }
  // float16: the f16 instantiations (wide, narrow<16>, narrow<32>, the combine) on copies of
  // cases that reach each of them, split requests and empty rows included.
  const char* f16_cases[] = {
      "basic h16 split",     "long h16 s1",             "long h16 s2 causal (32 rows)",
      "long h128 s2 causal", "s_q=4 causal h128/2",     "bad page ids h64 causal",
      "all zero lengths",    "stale records h16/1 s_q=2"};
  for (const char* name : f16_cases) {
    for (size_t i = 0, n = cases.size(); i < n; ++i) {
      if (cases[i].name != name) continue;
      Case c = cases[i];
      c.name += " f16";
      c.elem = ElemType::kF16;
      add(c);
    }
  }
  int fails = 0;
  for (auto& c : cases) fails += run_case(c, true) ? 0 : 1;
  std::printf("correctness: %zu passed, %d failed\n", cases.size() - fails, fails);
  return fails == 0 ? 0 : 1;
}

// ------------------------------------------------------------------ building-block test

// E: the element type of the page, Q and P (the wgmma operands).
template <class E>
__global__ void __launch_bounds__(256, 1)
    prims_kernel(const __grid_constant__ CUtensorMap tmap, const __grid_constant__ DecodeParams p,
                 int kv_id, int hk, float* out_s, float* out_o_rs, float* out_o_ss) {
  using namespace sm90;
  using TT = DenseTraits;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + TT::kPageBytes, sP = base + 2 * TT::kPageBytes;
  const uint32_t bars = base + 2 * TT::kPageBytes + 2 * kTileBytes;
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
  qk_page<E>(s, sQ, sK, bars, 0);
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
  pack_p<E>(s, a);
  float o[128];
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  reg_fence(o);
  pv_rs<E>(o, a, sK, wg * 4);
  wgmma_wait<0>();
  reg_fence(o);
  const int col0 = wg * 256 + 2 * q4;
  for (int k = 0; k < 32; ++k)
    for (int j = 0; j < 2; ++j) {
      out_o_rs[r0 * 512 + col0 + 8 * k + j] = o[4 * k + j];
      out_o_rs[(r0 + 8) * 512 + col0 + 8 * k + j] = o[4 * k + 2 + j];
    }
  store_p(sP + wg * kTileBytes, a, r0, q4);
  fence_proxy_async_smem();
  named_bar_sync(3 + wg, 128);
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  reg_fence(o);
  pv_ss<E>(o, sP + wg * kTileBytes, sK, wg * 4);
  wgmma_wait<0>();
  reg_fence(o);
  for (int k = 0; k < 32; ++k)
    for (int j = 0; j < 2; ++j) {
      out_o_ss[r0 * 512 + col0 + 8 * k + j] = o[4 * k + j];
      out_o_ss[(r0 + 8) * 512 + col0 + 8 * k + j] = o[4 * k + 2 + j];
    }
}

static int run_prims(ElemType elem) {
  // One page (id 3 of 5, kv head 1 of 2) against a 64-row Q block (48 real rows).
  Case c;
  c.elem = elem;
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
  CK(make_kcache_tensor_map_sm90(&map, P.call.p));
  LaunchShape shape;
  shape.grid = dim3(1);
  shape.block = dim3(256);
  shape.smem_bytes = 2 * sm90::DenseTraits::kPageBytes + 2 * sm90::kTileBytes + 128 + 1024;
  if (elem == ElemType::kF16) {
    CK(launch_kernel<prims_kernel<__half>>(shape, false, nullptr, map, P.call.p, kv_id, hk, d_s,
                                           d_ors, d_oss));
  } else {
    CK(launch_kernel<prims_kernel<__nv_bfloat16>>(shape, false, nullptr, map, P.call.p, kv_id, hk,
                                                  d_s, d_ors, d_oss));
  }
  wait_or_die(nullptr, 10.0, "prims_kernel");
  std::vector<float> S(64 * 64), Ors(64 * 512), Oss(64 * 512);
  CK(cudaMemcpy(S.data(), d_s, S.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(Ors.data(), d_ors, Ors.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(Oss.data(), d_oss, Oss.size() * 4, cudaMemcpyDeviceToHost));
  // Q rows r < 48 are heads 0..47 of token 0 (kv head 0's group); rows >= 48 are zero.
  const size_t krow = static_cast<size_t>(c.h_kv) * kHeadDimK;
  auto kval = [&](int t, int d) {
    return static_cast<double>(from_elem(elem, P.kv[(static_cast<size_t>(kv_id) * 64 + t) * krow +
                                                    static_cast<size_t>(hk) * kHeadDimK + d]));
  };
  double es = 0, ns = 0, ers = 0, nrs = 0, ess = 0, nss = 0;
  int bad_s = -1;
  for (int r = 0; r < 64; ++r) {
    std::vector<double> pr(64);
    for (int t = 0; t < 64; ++t) {
      double acc = 0;
      if (r < P.q_rows)
        for (int d = 0; d < kHeadDimK; ++d) {
          acc += from_elem(elem, P.q[static_cast<size_t>(r) * kHeadDimK + d]) * kval(t, d);
        }
      const double e = std::fabs(acc - S[r * 64 + t]);
      if (e > 1e-3 + 1e-2 * std::fabs(acc) && bad_s < 0) bad_s = r * 64 + t;
      es += e * e;
      ns += acc * acc;
      pr[t] = from_elem(elem, to_elem(elem, S[r * 64 + t]));  // the kernel rounds its own S
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
  std::printf("%s prims %s: QK^T rel err %.2e, P.V (RS) rel err %.2e, P.V (SS) rel err %.2e\n",
              ok ? "PASS" : "FAIL", elem_name(elem), rs, rrs, rss);
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

int main(int argc, char** argv) {
  bool prims = false, quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--noop")) return 0;
    if (!std::strcmp(argv[i], "--prims")) {
      prims = true;
    } else if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else {
      std::printf("usage: %s [--quick | --prims | --noop]  (timing: bench_kernels)\n", argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, sm_%d%d\n", prop.name, prop.multiProcessorCount, prop.major,
              prop.minor);
  if (prims) {
    const int bf16 = run_prims(ElemType::kBF16);
    const int f16 = run_prims(ElemType::kF16);
    return bf16 | f16;
  }
  return run_correctness(quick);
}
