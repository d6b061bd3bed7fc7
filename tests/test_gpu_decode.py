"""GPU tier: the CUDA kernels against the pure-JAX reference and the float64 oracle.

Runs only on a Hopper GPU with the CUDA extension built (see conftest.py). The grid is FlashMLA's
correctness grid: b x s_q x mean length x (h_q, h_kv) x varlen x causal, sampled so that every
(s_q, h_q, h_kv, causal) combination gets several cases (480 in all), with NaN-poisoned unused
slots, permuted page tables and zero-length rows throughout. The decode tests run in bfloat16 and
float16 (the kernels take both; float16 keeps 3 more mantissa bits, so the same tolerances hold).
"""

import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla
from mla_cases import check_decode, make_case, oracle

pytestmark = pytest.mark.gpu

DTYPES = [pytest.param(ml_dtypes.bfloat16, id="bf16"), pytest.param(np.float16, id="f16")]

HEAD_PAIRS = [(h_q, h_kv) for h_kv in (1, 2, 3, 8) for h_q in (1, 3, 9, 63, 64, 126, 128)
              if h_q % h_kv == 0]
CASES_PER_COMBO = 5


def _grid():
  rng = np.random.default_rng(2026)
  others = list(itertools.product((1, 2, 6, 64), (20, 140, 4096), (False, True)))
  cases = []
  for s_q, (h_q, h_kv), causal in itertools.product((1, 2, 4), HEAD_PAIRS, (False, True)):
    for i in rng.choice(len(others), CASES_PER_COMBO, replace=False):
      b, mean_len, varlen = others[i]
      cases.append((b, s_q, mean_len, h_q, h_kv, varlen, causal))
  return cases


GRID = _grid()


def _both(case, metadata=None, num_sms=None):
  """The kernel and the reference on the same device, in one compiled program."""

  def fn(q, k, bt, lens):
    kernel = jax_flashmla.flash_mla_with_kvcache(
        q, k, bt, lens, metadata=metadata, softmax_scale=case.softmax_scale,
        causal=case.causal, implementation="cuda", num_sms=num_sms)
    ref = jax_flashmla.flash_mla_with_kvcache(
        q, k, bt, lens, softmax_scale=case.softmax_scale, causal=case.causal,
        implementation="xla")
    return kernel, ref

  (out, lse), (ref_out, ref_lse) = jax.jit(fn)(*case.args())
  return (np.asarray(out, np.float32), np.asarray(lse), np.asarray(ref_out, np.float32),
          np.asarray(ref_lse))


def test_grid_has_the_promised_coverage():
  assert len(GRID) >= 400
  combos = {(s_q, h_q, h_kv, causal) for _, s_q, _, h_q, h_kv, _, causal in GRID}
  assert len(combos) == 3 * len(HEAD_PAIRS) * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s_q,mean_len,h_q,h_kv,varlen,causal", GRID)
def test_kernel_matches_reference(b, s_q, mean_len, h_q, h_kv, varlen, causal, dtype):
  rng = np.random.default_rng(hash((b, s_q, mean_len, h_q, h_kv, varlen, causal)) % 2**32)
  case = make_case(rng, b, s_q, mean_len, h_q, h_kv, varlen=varlen, causal=causal,
                   zero_rows=0.1 if b > 2 else 0.0, dtype=dtype)
  out, lse, ref_out, ref_lse = _both(case)
  check_decode(out, lse, ref_out, ref_lse)
  if b * s_q * h_q * mean_len <= 64 * 4096:  # the float64 oracle is slow; check the small ones
    check_decode(out, lse, *oracle(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv", [(16, 1), (64, 1), (128, 1), (128, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_batch_128_with_half_the_rows_empty(h_q, h_kv, causal, dtype):
  rng = np.random.default_rng(h_q * 10 + causal)
  case = make_case(rng, 128, 2, 4096, h_q, h_kv, causal=causal, zero_rows=0.5, dtype=dtype)
  out, lse, ref_out, ref_lse = _both(case)
  check_decode(out, lse, ref_out, ref_lse)
  empty = case.cache_seqlens == 0
  assert empty.any() and np.all(out[empty] == 0) and np.all(np.isposinf(lse[empty]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.02, 0.15, -0.05])
@pytest.mark.parametrize("s_q,h_q", [(2, 128), (1, 16), (2, 16)])  # wide, narrow<16>, narrow<32>
def test_scores_that_drift_along_the_sequence(s_q, h_q, slope, dtype):
  """The kernels' running row max is lazy: it moves only when a page's max passes it by more than
  a factor 2^8. Scores that climb along the sequence move it every few pages (0.02 per key, ~1.8
  in log2 per page) or on every page (0.15); falling ones (-0.05) move it only at the rare spikes
  of +30, which make it jump far past the slack."""
  rng = np.random.default_rng(int(slope * 100) + 7 * h_q + s_q)
  case = make_case(rng, 8, s_q, 1500, h_q, 1, causal=True, dtype=dtype)
  rope = 512  # a RoPE column: V is the first 512, so only the scores change
  case.q[..., rope] = 1.0
  k = case.k_cache.astype(np.float32)
  for i, n in enumerate(case.cache_seqlens):
    pos = np.arange(n)
    offset = slope * pos + 30.0 * (rng.random(n) < 0.01)
    for j in range(-(-n // 64)):
      keys = pos[j * 64:(j + 1) * 64]
      k[case.block_table[i, j], :len(keys), :, rope] = (offset[keys] / case.softmax_scale)[:, None]
  case.k_cache = k.astype(case.k_cache.dtype)
  out, lse, ref_out, ref_lse = _both(case)
  check_decode(out, lse, ref_out, ref_lse)
  check_decode(out, lse, *oracle(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sms", [1, 3, 132, 1000])
def test_any_number_of_splits(num_sms, dtype):
  """Few parts (long chunks) and many (num_sms=1000 is capped at 160 parts, the most the
  combine merges; one request is then split across all of them)."""
  rng = np.random.default_rng(num_sms)
  case = make_case(rng, 3, 1, 3000, 16, 1, zero_rows=0.0, dtype=dtype)
  out, lse, ref_out, ref_lse = _both(case, num_sms=num_sms)
  check_decode(out, lse, ref_out, ref_lse)


def test_gpu_scheduler_matches_the_jax_scheduler():
  rng = np.random.default_rng(11)
  for b, parts in [(1, 1), (3, 7), (64, 66), (128, 132), (128, 33), (5, 132)]:
    lens = np.maximum(rng.normal(4096, 2048, b), 0).astype(np.int32)
    lens[rng.random(b) < 0.2] = 0
    if b == 5:
      lens[:3] = [2**31 - 1, -4, 2**31 - 1]
    lens = jnp.asarray(lens)
    got = jax_flashmla.get_mla_metadata(lens, 64, 1, num_sms=parts, implementation="cuda")
    want = jax_flashmla.get_mla_metadata(lens, 64, 1, num_sms=parts, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got.tile_scheduler_metadata),
                                  np.asarray(want.tile_scheduler_metadata))
    np.testing.assert_array_equal(np.asarray(got.num_splits), np.asarray(want.num_splits))


def test_hostile_values_stay_in_their_rows():
  rng = np.random.default_rng(5)
  case = make_case(rng, 6, 2, 300, 16, 1, varlen=False, causal=True)
  clean_out, clean_lse, _, _ = _both(case)
  case.cache_seqlens[1] = 2**31 - 1               # past capacity: clamped
  case.cache_seqlens[2] = -3                      # negative: empty
  case.block_table[3, 1] = -1                     # bad page ids: masked
  case.block_table[4, 0] = case.k_cache.shape[0]
  case.block_table[5, 2] = 2**31 - 1
  out, lse, ref_out, ref_lse = _both(case)
  rows = [0, 2, 3, 4, 5]  # row 1 reads its own poisoned slots now
  check_decode(out[rows], lse[rows], ref_out[rows], ref_lse[rows])
  # Row 0 may be split differently now (the schedule changed), so compare within tolerance.
  check_decode(out[[0]], lse[[0]], clean_out[[0]], clean_lse[[0]])
  assert np.all(out[2] == 0) and np.all(np.isposinf(lse[2]))


def test_vmap_runs_the_kernel():
  rng = np.random.default_rng(6)
  cases = [make_case(rng, 2, 1, 200, 16, 1, varlen=False) for _ in range(2)]
  q = jnp.stack([jnp.asarray(c.q) for c in cases])
  c = cases[0]
  fn = lambda q: jax_flashmla.flash_mla_with_kvcache(q, *c.args()[1:], implementation="cuda")
  out, lse = jax.jit(jax.vmap(fn))(q)
  for lane, lc in enumerate(cases):
    lc.k_cache, lc.block_table, lc.cache_seqlens = c.k_cache, c.block_table, c.cache_seqlens
    check_decode(out[lane], lse[lane], *oracle(lc))


def test_exported_program_runs():
  from jax import export

  case = make_case(np.random.default_rng(8), 4, 2, 500, 64, 1, causal=True)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, causal=True,
                                                              implementation="cuda"))
  exp = export.export(fn, disabled_checks=jax_flashmla.DISABLE_JAX_EXPORT_CHECKS)(*case.args())
  out, lse = export.deserialize(exp.serialize()).call(*case.args())
  want_out, want_lse = fn(*case.args())
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


def test_export_for_cpu_and_cuda_runs_the_kernels_here():
  """A two-platform export with a symbolic batch: the cuda branch holds the kernels, and on the
  GPU it gives the same result as the kernels called directly."""
  from jax import export

  b, m = export.symbolic_shape("b, m")
  case = make_case(np.random.default_rng(12), 5, 2, 500, 16, 1, causal=True)
  specs = (jax.ShapeDtypeStruct((b, 2, 16, 576), jnp.bfloat16),
           jax.ShapeDtypeStruct(case.k_cache.shape, jnp.bfloat16),
           jax.ShapeDtypeStruct((b, m), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, causal=True))
  exp = export.export(fn, platforms=("cpu", "cuda"),
                      disabled_checks=jax_flashmla.DISABLE_JAX_EXPORT_CHECKS)(*specs)
  exp = export.deserialize(exp.serialize())
  assert "jax_flashmla_mla_decode_v1" in exp.mlir_module()
  out, lse = exp.call(*case.args())
  want_out, want_lse = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
      *a, causal=True, implementation="cuda"))(*case.args())
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_implementation_runs_the_kernels_silently(dtype):
  case = make_case(np.random.default_rng(13), 3, 1, 300, 16, 1, dtype=dtype)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a))
  with warnings.catch_warnings():
    warnings.simplefilter("error", jax_flashmla.KernelFallbackWarning)
    text = fn.lower(*case.args()).as_text()
    out, lse = fn(*case.args())
  assert "jax_flashmla_mla_decode_v1" in text
  check_decode(out, lse, *oracle(case))


def test_float32_on_the_gpu_falls_back_with_a_warning():
  case = make_case(np.random.default_rng(14), 3, 1, 300, 16, 1, dtype=np.float32)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a))
  with pytest.warns(jax_flashmla.KernelFallbackWarning, match=r"dtype float32: the kernels "
                                                              r"take bfloat16 or float16"):
    text = fn.lower(*case.args()).as_text()
  assert "jax_flashmla_mla_decode_v1" not in text


_GRAPH_SCRIPT = textwrap.dedent(r"""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, TESTS_DIR)
    import jax_flashmla
    from mla_cases import check_decode, make_case, oracle
    case = make_case(np.random.default_rng(9), 8, 2, 700, 64, 1, causal=True, zero_rows=0.2)

    @jax.jit
    def layers(q, k, bt, lens):
      md = jax_flashmla.get_mla_metadata(lens, 128, 1)
      outs = [jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, metadata=md, causal=True,
                                                  implementation="cuda") for _ in range(4)]
      return outs[0][0], outs[0][1], sum(o[0].astype(jnp.float32) for o in outs)

    import re
    hlo = layers.lower(*case.args()).compile().as_text()
    # Older XLA forms command buffers on the HLO (computations named command_buffer*); newer
    # XLA forms them from the thunk sequence, invisible here. Where the HLO shows them, ours
    # must be inside.
    blocks = re.findall(r"\n(%?command_buffer[^\n]*\{\n.*?\n\})", hlo, re.S)
    if blocks:
      assert any("jax_flashmla_mla_decode_v1" in b for b in blocks), hlo[-6000:]
    print("hlo command buffers:", len(blocks))
    for _ in range(3):  # replays of the captured graph
      out, lse, total = layers(*case.args())
    check_decode(out, lse, *oracle(case))
    np.testing.assert_allclose(np.asarray(total), 4 * np.asarray(out, np.float32), rtol=1e-6)
    print("graph ok")
""")


def test_inside_cuda_graphs():
  """XLA command buffers (CUDA graphs) capture our handlers: they are marked compatible."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,"
                      "CUSTOM_CALL --xla_gpu_graph_min_graph_size=1")
  script = _GRAPH_SCRIPT.replace("TESTS_DIR", repr(os.path.dirname(__file__)))
  # -P: import the installed package, not the source folder that is the working directory.
  res = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0 and "graph ok" in res.stdout, res.stderr[-4000:]


_KERNEL_CHOICE_SCRIPT = textwrap.dedent(r"""
    import sys
    import jax, numpy as np
    sys.path.insert(0, TESTS_DIR)
    import jax_flashmla
    from mla_cases import check_decode, make_case, oracle
    # 16 and 32 query rows per kv head (the default path's narrow kernel), then 128 (wide).
    for s_q, h_q, h_kv in ((1, 16, 1), (1, 128, 8), (2, 16, 1), (2, 128, 8), (2, 64, 1)):
      case = make_case(np.random.default_rng(10 + s_q * h_q), 6, s_q, 700, h_q, h_kv,
                       causal=s_q > 1, zero_rows=0.2)
      fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
          *a, softmax_scale=case.softmax_scale, causal=case.causal, implementation=IMPL))
      out, lse = fn(*case.args())
      check_decode(out, lse, *oracle(case))
    print("kernel choice ok")
""")


def test_wide_kernel_chosen_by_environment():
  """JAX_FLASHMLA_DECODE_KERNEL=wide (read once per process) runs the wide kernel for every shape,
  for A/B runs; it must be right on the shapes the default sends to the narrow kernel too."""
  env = dict(os.environ, JAX_FLASHMLA_DECODE_KERNEL="wide")
  script = (_KERNEL_CHOICE_SCRIPT.replace("TESTS_DIR", repr(os.path.dirname(__file__)))
            .replace("IMPL", repr("cuda")))
  res = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0 and "kernel choice ok" in res.stdout, res.stderr[-4000:]
