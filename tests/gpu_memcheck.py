"""Hostile-value cases for compute-sanitizer (not a pytest module; run it under the sanitizer):

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck --error-exitcode 1 \
        --kernel-name kns=_kernel python3 -P tests/gpu_memcheck.py

The platform allocator gives every buffer its own allocation, so an out-of-bounds access is not
hidden inside XLA's memory pool; `kns=_kernel` instruments our kernels (decode_wide_kernel,
decode_narrow_kernel, combine_kernel, sched_kernel) and leaves XLA's own alone. Exits non-zero
if a kept row differs from the reference.

Hand-made scheduler records (negative request indices, split indices and prefix sums past the
partial buffers, ...) are values no trace can see too; the kernels' outputs for them are
undefined, but they must not touch memory outside their buffers. Run them on their own (an
out-of-bounds write without the sanitizer may corrupt the process):

    ... python3 -P tests/gpu_memcheck.py --hostile-metadata

`--fp8` runs every mode on the FP8 cache instead (`quantize_kv` of the same rows: the NaN slots
become NaN scales and codes, and pages no row uses get random bytes), through the FP8 kernels:

    ... python3 -P tests/gpu_memcheck.py --fp8 [--hostile-metadata | --config NAME]

`--sparse` runs the token-sparse decode (decode_sparse_fp8_kernel, combine_sparse_kernel) on
hostile indices (negative, INT32_MIN/MAX, the slot count itself, the last slot), topk_length out
of range both ways, duplicates, sinks, block sizes 1..576, batches split across parts and not:

    ... python3 -P tests/gpu_memcheck.py --sparse

For racecheck and synccheck, one decode call on a small (64 query rows: the wide kernel), a narrow
(16 rows), a narrow32 (32 rows) or a large configuration:

    ... compute-sanitizer --tool racecheck ... python3 -P tests/gpu_memcheck.py --config small

On `--config narrow` and `narrow32`, racecheck reports races across __syncthreads in the narrow
kernel's epilogue. They are the tool's: it misses barriers once the two warpgroups have passed
different numbers of their own named-barrier phases, which that kernel does by design
(tests/cuda/racecheck_uneven_barriers.cu shows it on a race-free program).
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jax_flashmla  # noqa: E402
from mla_cases import check_decode, make_case  # noqa: E402


FP8 = "--fp8" in sys.argv


def case_args(case):
  """The case's arguments; with --fp8 its cache quantized, unused pages random bytes."""
  q, k, bt, lens = case.args()
  if FP8:
    k = np.array(jax_flashmla.quantize_kv(k))
    used = np.zeros(k.shape[0], bool)
    bt_np = np.asarray(bt)
    used[bt_np[(bt_np >= 0) & (bt_np < k.shape[0])]] = True
    rng = np.random.default_rng(7)
    k[~used] = rng.integers(0, 256, k[~used].shape, dtype=np.uint8)
    k = jax.numpy.asarray(k)
  return q, k, bt, lens


def run(case, **kw):
  def fn(*a):
    return (jax_flashmla.flash_mla_with_kvcache(*a, causal=case.causal, implementation="cuda",
                                                **kw),
            jax_flashmla.flash_mla_with_kvcache(*a, causal=case.causal, implementation="xla"))
  (out, lse), (ref_out, ref_lse) = jax.jit(fn)(*case_args(case))
  return [np.asarray(x, np.float32) for x in (out, lse, ref_out, ref_lse)]


def main():
  rng = np.random.default_rng(0)
  for s_q in (4, 2, 1):  # 64 query rows: the wide kernel; 32 and 16: the narrow one's two forms
    case = make_case(rng, 8, s_q, 300, 16, 1, causal=s_q > 1, zero_rows=0.2)
    case.cache_seqlens[1] = 2**31 - 1
    case.cache_seqlens[2] = -7
    case.block_table[3, 0] = -1
    case.block_table[4, 1] = case.k_cache.shape[0]
    case.block_table[5, 2] = 2**31 - 1
    rows = [0, 2, 3, 4, 5, 6, 7]
    for kw in ({}, {"num_sms": 1}, {"num_sms": 1000}):
      out, lse, ref_out, ref_lse = run(case, **kw)
      check_decode(out[rows], lse[rows], ref_out[rows], ref_lse[rows])
  big = make_case(rng, 64, 1, 2000, 128, 1, zero_rows=0.3)
  check_decode(*run(big))
  print(f"memcheck cases ok{' (FP8 cache)' if FP8 else ''}")


def sparse():
  import ml_dtypes  # noqa: PLC0415
  import test_sparse as ts  # noqa: PLC0415
  from jax_flashmla.sparse import flash_mla_sparse_decode  # noqa: PLC0415

  rng = np.random.default_rng(4)
  int_min, int_max = -(2**31), 2**31 - 1
  cases = [  # b, s_q, h_q, block_size, num_blocks, topk
      (4, 3, 16, 1, 300, 70), (4, 1, 64, 2, 150, 130), (74, 1, 128, 69, 8, 64),
      (4, 3, 128, 64, 6, 200), (2, 2, 64, 576, 2, 64), (1, 1, 32, 64, 4, 1)]
  for b, s_q, h_q, bs, nb, topk in cases:
    q, k8, idx, tl, snk = ts.make_sparse(rng, b, s_q, h_q, bs, nb, topk, lengths="partial",
                                         sink="mixed", invalid=0.4, dup=0.3)
    n = nb * bs
    flat = k8.reshape(n, 656)
    row = np.clip(rng.standard_normal((1, 1, 1, 576)) / 10, -1, 1).astype(ml_dtypes.bfloat16)
    flat[n - 1] = ts.np_quantize(row).reshape(656)  # the very last slot, holding data
    idx[0, 0, 0] = n - 1
    idx[-1, -1, -1] = int_max
    if b > 1:  # row 1 now uses every index slot: the slots they name get data (a NaN key would
      tl[1] = int_max  # make the row's answer NaN on one path and "no key" on the other)
      tl[-1] = int_min
      ids = idx[1][(idx[1] >= 0) & (idx[1] < n)]
      rows = np.clip(rng.standard_normal((len(ids), 1, 1, 576)) / 10, -1, 1)
      flat[ids] = ts.np_quantize(rows.astype(ml_dtypes.bfloat16)).reshape(-1, 656)
    def fn(q, k, i, t, s):
      return tuple(flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s,
                                           implementation=impl) for impl in ("cuda", "xla"))
    (out, lse), (ref_out, ref_lse) = jax.jit(fn)(*ts._jnp(q, flat.reshape(k8.shape), idx, tl,
                                                          snk))
    check_decode(out, lse, ref_out, ref_lse)
    print(f"sparse case ok: b={b} s_q={s_q} h_q={h_q} block_size={bs} topk={topk}", flush=True)
  print("memcheck sparse cases ok")


def hostile_metadata_variants(lens, q_rows, parts):
  """(name, tile_scheduler_metadata, num_splits) with records no scheduler would write."""
  md = jax_flashmla.get_mla_metadata(lens, q_rows, 1, num_sms=parts, implementation="xla")
  sched0, splits0 = np.asarray(md.tile_scheduler_metadata), np.asarray(md.num_splits)
  b = splits0.shape[0] - 1
  int_min, int_max = -(2**31), 2**31 - 1
  rng = np.random.default_rng(1)

  def sched_with(col, value):
    sched = sched0.copy()
    sched[:, col] = value
    return sched

  yield "begin_req -1", sched_with(0, -1), splits0
  yield "begin_req INT32_MIN", sched_with(0, int_min), splits0
  yield "end_req INT32_MAX", sched_with(2, int_max), splits0
  yield "begin_block -5", sched_with(1, -5), splits0
  yield "begin_block INT32_MAX", sched_with(1, int_max), splits0
  yield "end_block INT32_MAX", sched_with(3, int_max), splits0
  # Every request "split in two", so the decode kernel writes partials (indexed by the prefix
  # sums and begin_split) and the combine reads them.
  two = (2 * np.arange(b + 1)).astype(np.int32)
  yield "every request split in two", sched0, two
  yield "begin_split 10**6", sched_with(4, 10**6), two
  yield "begin_split -10**6", sched_with(4, -(10**6)), two
  yield "num_splits past the partials", sched0, (splits0 * 1000).astype(np.int32)
  yield "num_splits negative", sched0, (-(10**6) + 2 * np.arange(b + 1)).astype(np.int32)
  yield "num_splits decreasing", sched0, splits0[::-1].copy()
  for k in range(4):
    yield (f"random records {k}", rng.integers(int_min, int_max, sched0.shape, np.int32),
           rng.integers(int_min, int_max, splits0.shape, np.int32))


def hostile_metadata():
  rng = np.random.default_rng(2)
  for s_q in (4, 2, 1):  # the wide kernel and the narrow one's two forms
    case = make_case(rng, 8, s_q, 300, 16, 1, causal=True, zero_rows=0.2)
    q, k, bt, lens = case_args(case)
    for parts in (1, 8):
      for name, sched, num_splits in hostile_metadata_variants(lens, 16 * s_q, parts):
        out, lse = jax_flashmla.flash_mla_with_kvcache(
            q, k, bt, lens, metadata=(jax.numpy.asarray(sched), jax.numpy.asarray(num_splits)),
            causal=True, implementation="cuda")
        np.asarray(out), np.asarray(lse)  # wait for the kernels
        print(f"hostile metadata ran: {name} (s_q={s_q}, {parts} parts)", flush=True)
  print("hostile metadata cases ran (outputs undefined; the sanitizer judges memory)")


def one_config(name):
  rng = np.random.default_rng(3)
  if name == "small":  # splits, causal, empty rows, a partial last page
    case = make_case(rng, 8, 4, 300, 16, 1, causal=True, zero_rows=0.2)
    kw = {"num_sms": 16}
  elif name in ("narrow", "narrow32"):  # the same for the narrow kernel, N = 16 and 32
    case = make_case(rng, 8, 1 if name == "narrow" else 2, 300, 16, 1, causal=name == "narrow32",
                     zero_rows=0.2)
    kw = {"num_sms": 16}
  else:  # four m blocks per request, many pages, the GPU's own part count
    case = make_case(rng, 64, 2, 4096, 128, 1, causal=False, zero_rows=0.1)
    kw = {}
  check_decode(*run(case, **kw))
  print(f"config {name} ok")


if __name__ == "__main__":
  argv = sys.argv[1:]
  if "--sparse" in argv:
    sparse()
  elif "--hostile-metadata" in argv:
    hostile_metadata()
  elif "--config" in argv:
    one_config(argv[argv.index("--config") + 1])
  else:
    main()
