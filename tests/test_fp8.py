"""The FP8 cache on the CPU: the quantizer's bytes, the decode over FP8 rows (pure-JAX path)
against the float64 oracle, its lowering, vmap, sharding, the paged cache and the errors.

The bytes are checked against `mla_cases.np_quantize`, an independent NumPy construction of
DeepSeek-V3.2's layout; the decode against `mla_cases.oracle` over `np_dequantize` of the same
bytes. The kernels' side is tests/test_gpu_fp8.py.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla import PagedKVCache, dequantize_kv, quantize_kv
from mla_cases import (check_decode, fp8_case, make_case, np_dequantize, np_pow2_scale,
                       np_quantize, oracle)


def _rows(rng, shape, kind):
  x = rng.standard_normal(shape).astype(np.float32)
  if kind == "small":
    x *= 1e-3
  elif kind == "large":
    x *= 300.0
  elif kind == "outliers":  # a few values 1e3-1e4 times the rest in some tiles
    mask = rng.random(shape) < 0.003
    x = np.where(mask, x * rng.uniform(1e3, 1e4, shape), x)
  elif kind == "zero_tiles":
    x[..., 128:256] = 0.0
    x[..., 384:512] = 0.0
  elif kind == "tiny":  # below the smallest scale's subnormals: codes round to 0 or subnormal
    x *= 1e-7
  elif kind == "negative":
    x = -np.abs(x)
  return x.astype(ml_dtypes.bfloat16)


KINDS = ["normal", "small", "large", "outliers", "zero_tiles", "tiny", "negative"]


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_kv_matches_the_bytes_built_in_numpy(kind):
  rows = _rows(np.random.default_rng(KINDS.index(kind)), (3, 64, 2, 576), kind)
  got = np.asarray(quantize_kv(jnp.asarray(rows)))
  assert got.dtype == np.uint8 and got.shape == (3, 64, 2, 656)
  np.testing.assert_array_equal(got, np_quantize(rows))


def test_scales_are_powers_of_two_with_the_floor():
  rows = _rows(np.random.default_rng(1), (5, 576), "zero_tiles")
  scale = np.asarray(quantize_kv(jnp.asarray(rows)))[..., 512:528].copy().view("<f4")
  mant, _ = np.frexp(scale)
  assert (mant == 0.5).all()
  # All-zero tiles get the floor: 2^ceil(log2(1e-4)) = 2^-13.
  assert (scale[:, 1] == 2.0**-13).all() and (scale[:, 3] == 2.0**-13).all()
  # Spot values of the exponent rule: amax 448 -> 1, 448.5 -> 2, 896 -> 2, 1e-9 -> 2^-13.
  np.testing.assert_array_equal(np_pow2_scale(np.float32([448, 448.5, 896, 1e-9])),
                                np.float32([1, 2, 2, 2.0**-13]))


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_kv_is_the_formats_values_and_within_e4m3_rounding(kind):
  rows = _rows(np.random.default_rng(10 + KINDS.index(kind)), (4, 64, 1, 576), kind)
  fp8 = quantize_kv(jnp.asarray(rows))
  got = np.asarray(dequantize_kv(fp8)).astype(np.float64)
  np.testing.assert_array_equal(got, np_dequantize(np.asarray(fp8)))
  x = rows.astype(np.float64)
  np.testing.assert_array_equal(got[..., 512:], x[..., 512:])  # RoPE: stored as is
  # e4m3 keeps 3 mantissa bits: the error is at most half a step, 2^-4 relative, or half the
  # smallest subnormal step (2^-10 of the scale) for the smallest values.
  scale = np.repeat(np.asarray(fp8)[..., 512:528].copy().view("<f4"), 128, axis=-1)
  err = np.abs(got[..., :512] - x[..., :512])
  assert (err <= np.maximum(np.abs(x[..., :512]) * 2.0**-4, scale * 2.0**-10)).all()


def test_quantizer_under_jit_and_vmap_and_float8_bytes():
  rows = jnp.asarray(_rows(np.random.default_rng(3), (2, 5, 576), "normal"))
  want = quantize_kv(rows)
  np.testing.assert_array_equal(jax.jit(quantize_kv)(rows), want)
  np.testing.assert_array_equal(jax.vmap(quantize_kv)(rows), want)
  as_f8 = jax.lax.bitcast_convert_type(want, jnp.float8_e4m3fn)  # FlashMLA's dtype, same bytes
  np.testing.assert_array_equal(dequantize_kv(as_f8), dequantize_kv(want))
  np.testing.assert_array_equal(jax.vmap(dequantize_kv)(want), dequantize_kv(want))


def test_quantizer_exports_with_a_symbolic_batch():
  from jax import export  # noqa: PLC0415

  b, = export.symbolic_shape("b")
  exp = export.export(jax.jit(quantize_kv))(jax.ShapeDtypeStruct((b, 64, 1, 576), jnp.bfloat16))
  rows = jnp.asarray(_rows(np.random.default_rng(4), (3, 64, 1, 576), "normal"))
  np.testing.assert_array_equal(exp.call(rows), np_quantize(np.asarray(rows)))


def test_quantizer_errors_name_the_argument():
  with pytest.raises(ValueError, match=r"rows: expected a last dim of 576"):
    quantize_kv(jnp.zeros((2, 512), jnp.bfloat16))
  with pytest.raises(TypeError, match=r"rows: expected a float dtype"):
    quantize_kv(jnp.zeros((2, 576), jnp.int32))
  with pytest.raises(ValueError, match=r"fp8_rows: expected a last dim of 656"):
    dequantize_kv(jnp.zeros((2, 576), jnp.uint8))
  with pytest.raises(TypeError, match=r"fp8_rows: expected dtype uint8 or float8_e4m3fn"):
    dequantize_kv(jnp.zeros((2, 656), jnp.bfloat16))


# ------------------------------------------------------------------------------------------------
# The decode over FP8 rows
# ------------------------------------------------------------------------------------------------

DECODE_CASES = [  # b, s_q, mean_len, h_q, h_kv, causal, zero_rows
    (4, 1, 300, 16, 1, False, 0.25),
    (3, 2, 200, 16, 1, True, 0.0),
    (2, 4, 130, 8, 2, True, 0.5),
    (5, 1, 70, 64, 1, False, 0.2),
]


def _decode(q, k, bt, lens, case, **kw):
  return jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, softmax_scale=case.softmax_scale,
                                             causal=case.causal, **kw)


@pytest.mark.parametrize("b,s_q,mean_len,h_q,h_kv,causal,zero_rows", DECODE_CASES)
def test_decode_over_fp8_rows_matches_the_oracle_over_the_dequantized_rows(
    b, s_q, mean_len, h_q, h_kv, causal, zero_rows):
  rng = np.random.default_rng(b * 100 + h_q)
  case = make_case(rng, b, s_q, mean_len, h_q, h_kv, causal=causal, zero_rows=zero_rows)
  k8, deq_case = fp8_case(case)
  q, _, bt, lens = case.args()
  out, lse = _decode(q, jnp.asarray(k8), bt, lens, case, implementation="xla")
  check_decode(out, lse, *oracle(deq_case))
  # FlashMLA's dtype for the same bytes, and its flag, give the same result.
  out8, lse8 = _decode(q, jax.lax.bitcast_convert_type(jnp.asarray(k8), jnp.float8_e4m3fn), bt,
                       lens, case, implementation="xla", is_fp8_kvcache=True)
  np.testing.assert_array_equal(np.asarray(out8, np.float32), np.asarray(out, np.float32))
  np.testing.assert_array_equal(lse8, lse)


def test_fp8_decode_errors_name_the_argument():
  q = jnp.zeros((2, 1, 16, 576), jnp.bfloat16)
  k8 = jnp.zeros((4, 64, 1, 656), jnp.uint8)
  bt = jnp.zeros((2, 2), jnp.int32)
  lens = jnp.zeros((2,), jnp.int32)
  dec = jax_flashmla.flash_mla_with_kvcache
  with pytest.raises(TypeError, match=r"q: expected dtype bfloat16 with an FP8 cache"):
    dec(q.astype(jnp.float16), k8, bt, lens)
  with pytest.raises(ValueError, match=r"k_cache: expected 656 bytes per row"):
    dec(q, jnp.zeros((4, 64, 1, 576), jnp.uint8), bt, lens)
  with pytest.raises(ValueError, match=r"k_cache: is_fp8_kvcache=True expects uint8"):
    dec(q, jnp.zeros((4, 64, 1, 576), jnp.bfloat16), bt, lens, is_fp8_kvcache=True)
  with pytest.raises(ValueError, match=r"k_cache: is_fp8_kvcache=False expects"):
    dec(q, k8, bt, lens, is_fp8_kvcache=False)
  with pytest.raises(TypeError, match=r"is_fp8_kvcache: expected a static Python bool"):
    dec(q, k8, bt, lens, is_fp8_kvcache="yes")


def test_fp8_cuda_lowering_passes_the_bytes_to_the_same_target():
  args = (jnp.zeros((2, 2, 16, 576), jnp.bfloat16), jnp.zeros((8, 64, 1, 656), jnp.uint8),
          jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32))
  fn = lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, causal=True, implementation="cuda",
                                                      num_sms=132)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  decode = [line for line in text.splitlines() if "@jax_flashmla_mla_decode_v1" in line]
  assert len(decode) == 1
  assert re.search(r"tensor<8x64x1x656xui8>", decode[0]), decode[0]
  assert re.search(r"->\s*\(tensor<2x2x16x512xbf16>", decode[0]), decode[0]
  # float8_e4m3fn caches reach the kernels as the same bytes (a bitcast, no copy).
  as_f8 = (args[0], jnp.zeros((8, 64, 1, 656), jnp.float8_e4m3fn)) + args[2:]
  text8 = jax.jit(fn).trace(*as_f8).lower(lowering_platforms=("cuda",)).as_text()
  assert "tensor<8x64x1x656xui8>" in [l for l in text8.splitlines()
                                      if "@jax_flashmla_mla_decode_v1" in l][0]


def test_fp8_decode_exports_with_a_symbolic_batch():
  """The gathered rows then have a symbolic leading dim; dequantizing them must still lower."""
  from jax import export
  b, = export.symbolic_shape("b")
  args = (jax.ShapeDtypeStruct((b, 1, 16, 576), jnp.bfloat16),
          jax.ShapeDtypeStruct((12, 64, 1, 656), jnp.uint8),
          jax.ShapeDtypeStruct((b, 4), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, num_sms=8,
                                                              implementation="xla"))
  exp = export.export(fn, platforms=("cpu",))(*args)
  case = make_case(np.random.default_rng(9), 3, 1, 150, 16, 1, zero_rows=0.3, spare_pages=0)
  k8, deq_case = fp8_case(case)
  q, _, bt, lens = case.args()
  pad = lambda x, n, value: np.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1),
                                   constant_values=value)
  k8 = pad(k8, 12, 0x7F)  # 12 pages, whatever this case needs
  bt = pad(np.asarray(bt).T, 4, -1).T
  check_decode(*exp.call(q, jnp.asarray(k8), jnp.asarray(bt), lens), *oracle(deq_case))


def test_fp8_decode_under_vmap_matches_the_loop():
  rng = np.random.default_rng(5)
  case = make_case(rng, 3, 1, 150, 16, 1, zero_rows=0.3)
  k8, _ = fp8_case(case)
  q, _, bt, lens = case.args()
  qs = jnp.stack([q, q * 0.5, -q])
  fn = lambda q: _decode(q, jnp.asarray(k8), bt, lens, case, implementation="xla")
  out, lse = jax.vmap(fn)(qs)
  for i in range(3):
    o, l = fn(qs[i])
    np.testing.assert_allclose(np.asarray(out[i], np.float32), np.asarray(o, np.float32))
    np.testing.assert_allclose(lse[i], l)


def test_fp8_decode_sharded_over_batch_and_heads_matches_one_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(6)
  case = make_case(rng, 4, 2, 150, 16, 1, causal=True, zero_rows=0.25)
  k8, deq_case = fp8_case(case)
  q, _, bt, lens = case.args()
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "heads"))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(q, P("batch", None, "heads")), put(jnp.asarray(k8), P()),
          put(bt, P("batch")), put(lens, P("batch")))
  md = jax_flashmla.get_mla_metadata(lens, 2 * 16, 1, implementation="xla")
  out, lse = jax.jit(lambda *a: _decode(*a, case, metadata=md, implementation="xla"))(*args)
  check_decode(out, lse, *oracle(deq_case))


def test_paged_cache_fp8_write_quantizes_in_place_and_decodes_like_its_dequantized_twin():
  rng = np.random.default_rng(7)
  cache = PagedKVCache.create(batch_size=2, max_seq_len=256, kv_format="fp8")
  assert (cache.kv_format, cache.head_dim, cache.bytes_per_token) == ("fp8", 576, 656)
  assert cache.pages.dtype == jnp.uint8 and cache.query_dtype == jnp.bfloat16
  twin = PagedKVCache.create(batch_size=2, max_seq_len=256)
  assert (twin.kv_format, twin.bytes_per_token) == ("bf16", 1152)
  write = jax.jit(PagedKVCache.write, donate_argnums=0)
  for s_new in (70, 1, 3):
    rows = jnp.asarray(rng.standard_normal((2, s_new, 1, 576)).astype(ml_dtypes.bfloat16))
    cache = write(cache, rows, jnp.asarray([s_new, max(s_new - 1, 0)], jnp.int32))
    twin = twin.write(dequantize_kv(quantize_kv(rows)),
                      jnp.asarray([s_new, max(s_new - 1, 0)], jnp.int32))
  np.testing.assert_array_equal(cache.lengths, twin.lengths)
  # Every stored row holds the quantizer's bytes of its bf16 twin's values.
  for i in range(2):
    for t in range(int(cache.lengths[i])):
      page, slot = int(cache.block_table[i, t // 64]), t % 64
      np.testing.assert_array_equal(dequantize_kv(cache.pages[page, slot]),
                                    twin.pages[page, slot])
  q = jnp.asarray(rng.standard_normal((2, 2, 16, 576)).astype(ml_dtypes.bfloat16))
  got = jax_flashmla.mla_decode(q, cache, implementation="xla")
  want = jax_flashmla.mla_decode(q, twin, implementation="xla")
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
  np.testing.assert_array_equal(got[1], want[1])


def test_paged_cache_create_refuses_unknown_formats():
  with pytest.raises(ValueError, match=r"kv_format: expected one of 'bf16', 'fp8', got 'int8'"):
    PagedKVCache.create(batch_size=1, max_seq_len=64, kv_format="int8")
  with pytest.raises(ValueError, match=r"head_dim: expected 576 with kv_format='fp8'"):
    PagedKVCache.create(batch_size=1, max_seq_len=64, head_dim=128, kv_format="fp8")


def test_mla_layer_runs_on_an_fp8_cache():
  nnx = pytest.importorskip("flax.nnx")
  from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention
  config = MLAConfig(hidden_size=64, num_heads=2)
  layer = MultiHeadLatentAttention(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                   param_dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 5, 64)), jnp.bfloat16)
  outs = []
  for kv_format in ("bf16", "fp8"):
    cache = PagedKVCache.create(batch_size=2, max_seq_len=128, kv_format=kv_format)
    y, cache = layer(x, cache, implementation="xla")
    assert cache.kv_format == kv_format and cache.lengths.tolist() == [5, 5]
    outs.append(np.asarray(y, np.float32))
  assert np.isfinite(outs[1]).all()
  cos = (outs[0] * outs[1]).sum() / np.linalg.norm(outs[0]) / np.linalg.norm(outs[1])
  assert cos > 0.99  # the same layer; only the cache's rounding differs
