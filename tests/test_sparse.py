"""The token-sparse decode (issue 22, DeepSeek-V3.2) on the CPU: its pure-JAX path against an
independent float64 oracle, against the dense decode, through FlashMLA's call, and under jit,
vmap, export and sharding; its errors and its fallback warning.

The oracle loops over rows and tokens, reading the FP8 bytes with `mla_cases.np_dequantize`; the
caches are built with `mla_cases.np_quantize`, and every slot no used, valid index names holds
garbage bytes (NaN codes and NaN scales), so a read of one shows up as NaN.
"""

import pathlib
import re
import textwrap
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

import jax_flashmla
from jax_flashmla import KernelFallbackWarning, _extension, shapes
from jax_flashmla.sparse import flash_mla_sparse_decode
from mla_cases import (LSE_TOL, OUT_TOL, PAGE, check_close, check_decode, fp8_case, make_case,
                       np_dequantize, np_quantize)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCALE = 576**-0.5
INVALID = (-1, -7, -2**31, 2**31 - 1)  # with num_blocks * block_size itself, added per case


def sparse_oracle(q, k8, indices, topk_length=None, attn_sink=None, scale=SCALE):
  """float64, written from the contract: a loop over rows and query tokens."""
  q = np.asarray(q).astype(np.float64)
  rows = np.asarray(k8).reshape(-1, 656)
  n = rows.shape[0]
  b, s_q, h_q, _ = q.shape
  topk = indices.shape[2]
  out = np.zeros((b, s_q, h_q, 512))
  lse = np.full((b, h_q, s_q), np.inf)
  for i in range(b):
    k = topk if topk_length is None else int(np.clip(topk_length[i], 0, topk))
    for s in range(s_q):
      ids = [int(x) for x in indices[i, s, :k] if 0 <= x < n]  # duplicates stay
      if not ids:
        continue
      keys = np_dequantize(rows[ids])  # [t, 576]
      scores = q[i, s] @ keys.T * scale  # [h_q, t]
      m = scores.max(axis=-1, keepdims=True)
      p = np.exp(scores - m)
      l = p.sum(axis=-1)
      o = p @ keys[:, :512] / l[:, None]
      row_lse = np.log(l) + m[:, 0]
      if attn_sink is not None:
        with np.errstate(over="ignore"):
          o = o / (1.0 + np.exp(np.asarray(attn_sink, np.float64) - row_lse))[:, None]
      out[i, s], lse[i, :, s] = o, row_lse
  return out, lse


def garbage_rows(rng, shape):
  g = rng.integers(0, 256, shape + (656,), dtype=np.uint8)
  g[..., :512:5] = 0x7F  # NaN codes
  g[..., 512:528] = np.frombuffer(np.full(4, np.nan, "<f4").tobytes(), np.uint8)  # NaN scales
  return g


def make_sparse(rng, b, s_q, h_q, block_size, num_blocks, topk, *, lengths=None, sink=None,
                invalid=0.2, dup=0.2):
  """q, the FP8 cache, indices, topk_length and attn_sink of one case (NumPy).

  Indices come from half of the slots (never the first or last, which clipped invalid indices
  would read); every slot that no used, valid index names is garbage.
  """
  n = num_blocks * block_size
  rows = np.clip(rng.standard_normal((num_blocks, block_size, 1, 576)) / 10, -1, 1)
  k8 = np_quantize(rows.astype(ml_dtypes.bfloat16))
  pool = rng.permutation(np.arange(1, n - 1))[: max(1, (n - 2) // 2)] if n > 2 else np.arange(n)
  indices = rng.choice(pool, (b, s_q, topk)).astype(np.int32)
  bad = rng.random(indices.shape) < invalid
  indices[bad] = rng.choice(np.array(INVALID + (n,), np.int64), bad.sum()).astype(np.int32)
  if topk > 1:  # a later index repeating an earlier one
    rep = rng.random(indices.shape[:2]) < dup
    indices[..., 1][rep] = indices[..., 0][rep]
  q = np.clip(rng.standard_normal((b, s_q, h_q, 576)) / 10, -1, 1).astype(ml_dtypes.bfloat16)
  if lengths == "partial":  # out of range on both sides too (clipped), and an empty row
    topk_length = rng.integers(-2, topk + 3, b).astype(np.int32)
    topk_length[0] = 0 if b > 1 else topk_length[0]
  elif lengths == "full":
    topk_length = np.full(b, topk, np.int32)
  elif lengths == "zero":
    topk_length = np.zeros(b, np.int32)
  else:
    topk_length = None
  if sink == "finite":
    attn_sink = (rng.standard_normal(h_q) * 2).astype(np.float32)
  elif sink == "mixed":  # finite, +inf, -inf across the heads
    attn_sink = np.resize(np.float32([0.5, np.inf, -np.inf, 3.0]), h_q)
  else:
    attn_sink = None
  used = np.zeros(n, bool)
  k_used = topk if topk_length is None else np.clip(topk_length, 0, topk)
  for i in range(b):
    ids = indices[i, :, : k_used[i] if topk_length is not None else topk].ravel()
    used[ids[(ids >= 0) & (ids < n)]] = True
  flat = k8.reshape(n, 656)
  flat[~used] = garbage_rows(rng, (int((~used).sum()),))
  return q, flat.reshape(k8.shape), indices, topk_length, attn_sink


def _jnp(*xs):
  return tuple(None if x is None else jnp.asarray(x) for x in xs)


ORACLE_CASES = [  # b, s_q, h_q, block_size, num_blocks, topk, lengths, sink
    (1, 1, 16, 64, 4, 64, None, None),
    (4, 3, 16, 1, 300, 32, "partial", "finite"),
    (4, 1, 64, 2, 150, 48, "full", "mixed"),
    (1, 3, 128, 69, 5, 96, "partial", "mixed"),
    (4, 3, 64, 64, 6, 128, "partial", None),
    (4, 1, 128, 69, 3, 64, None, "finite"),
    (1, 1, 64, 1, 70, 16, "zero", "mixed"),
    (4, 3, 16, 2, 40, 8, "partial", "mixed"),
]


@pytest.mark.parametrize("b,s_q,h_q,block_size,num_blocks,topk,lengths,sink", ORACLE_CASES)
def test_sparse_decode_matches_the_float64_oracle(b, s_q, h_q, block_size, num_blocks, topk,
                                                  lengths, sink):
  rng = np.random.default_rng(b * 1000 + h_q + block_size + topk)
  q, k8, idx, tl, snk = make_sparse(rng, b, s_q, h_q, block_size, num_blocks, topk,
                                    lengths=lengths, sink=sink)
  want = sparse_oracle(q, k8, idx, tl, snk)
  fn = jax.jit(lambda q, k, i, t, s: flash_mla_sparse_decode(
      q, k, i, topk_length=t, attn_sink=s, implementation="xla"))
  out, lse = fn(*_jnp(q, k8, idx, tl, snk))
  assert out.dtype == jnp.bfloat16 and out.shape == (b, s_q, h_q, 512)
  assert lse.dtype == jnp.float32 and lse.shape == (b, h_q, s_q)
  check_decode(out, lse, *want)
  # FlashMLA's dtype for the same bytes gives the same result.
  k_f8 = jax.lax.bitcast_convert_type(jnp.asarray(k8), jnp.float8_e4m3fn)
  out8, lse8 = fn(*_jnp(q), k_f8, *_jnp(idx, tl, snk))
  np.testing.assert_array_equal(np.asarray(out8, np.float32), np.asarray(out, np.float32))
  np.testing.assert_array_equal(lse8, lse)


def test_the_oracle_cases_cover_what_they_claim():
  # Guards the case builder: garbage exists, invalid and duplicated indices occur.
  rng = np.random.default_rng(0)
  q, k8, idx, tl, _ = make_sparse(rng, 4, 3, 16, 2, 40, 8, lengths="partial")
  n = 80
  assert np.isnan(np_dequantize(k8.reshape(n, 656))).any(axis=-1).sum() >= n // 2
  assert ((idx < 0) | (idx >= n)).any()
  assert (idx[..., 0] == idx[..., 1]).any() and tl[0] == 0


def test_special_rows_exactly():
  """No valid index (all invalid, topk_length 0, or a negative one): out 0 and lse +inf, also
  with a +inf sink; a -inf sink changes nothing; a +inf sink zeroes out and keeps lse."""
  rng = np.random.default_rng(1)
  q, k8, idx, _, _ = make_sparse(rng, 4, 2, 16, 64, 3, 16, invalid=0.0)
  n = 3 * 64
  idx[0] = -1
  idx[1, 0] = np.int32(n)
  idx[1, 1] = np.int32(2**31 - 1)
  idx[1, :, 2:] = -5
  tl = np.int32([16, 16, 0, -3])
  args = _jnp(q, k8, idx, tl)
  base_out, base_lse = flash_mla_sparse_decode(*args[:3], topk_length=args[3])
  sinks = {s: flash_mla_sparse_decode(*args[:3], topk_length=args[3],
                                      attn_sink=jnp.full((16,), s, jnp.float32))
           for s in (np.inf, -np.inf, 0.0)}
  for out, lse in [(base_out, base_lse)] + list(sinks.values()):
    assert not np.isnan(np.asarray(out, np.float32)).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.asarray(out, np.float32)[[0, 1, 2, 3]], 0.0)
    np.testing.assert_array_equal(lse, np.inf)
  # Every row above is empty; now one that is not.
  idx[1, 0, 0] = 5
  args = _jnp(q, k8, idx, tl)
  out, lse = flash_mla_sparse_decode(*args[:3], topk_length=args[3])
  assert np.isfinite(lse[1, :, 0]).all() and np.isinf(lse[1, :, 1]).all()
  o_inf, l_inf = flash_mla_sparse_decode(*args[:3], topk_length=args[3],
                                         attn_sink=jnp.full((16,), np.inf, jnp.float32))
  o_neg, l_neg = flash_mla_sparse_decode(*args[:3], topk_length=args[3],
                                         attn_sink=jnp.full((16,), -np.inf, jnp.float32))
  np.testing.assert_array_equal(np.asarray(o_inf, np.float32), 0.0)
  np.testing.assert_array_equal(l_inf, lse)
  np.testing.assert_array_equal(np.asarray(o_neg, np.float32), np.asarray(out, np.float32))
  np.testing.assert_array_equal(l_neg, lse)


def test_duplicated_indices_count_each_time():
  """A key named twice weighs twice: [a, a, b] is not [a, b]."""
  rng = np.random.default_rng(2)
  q, k8, _, _, _ = make_sparse(rng, 1, 1, 16, 4, 8, 3)
  a, b_ = 3, 17
  twice = jnp.asarray([[[a, a, b_]]], jnp.int32)
  once = jnp.asarray([[[a, b_, -1]]], jnp.int32)
  got = flash_mla_sparse_decode(*_jnp(q, k8), twice)
  check_decode(*got, *sparse_oracle(q, k8, np.asarray(twice)))
  other = flash_mla_sparse_decode(*_jnp(q, k8), once)
  assert not np.allclose(got[1], other[1])  # a's weight doubled


def test_only_slots_that_used_valid_indices_name_are_read():
  """Slots named only past topk_length, or through invalid indices clipped into range, hold
  NaN garbage; nothing of it reaches the output."""
  rng = np.random.default_rng(3)
  q, k8, _, _, _ = make_sparse(rng, 2, 1, 16, 64, 2, 8, invalid=0.0)
  flat = k8.reshape(128, 656)
  flat[:] = garbage_rows(rng, (128,))
  flat[10] = np_quantize(np.full(576, 0.25, ml_dtypes.bfloat16))
  idx = np.full((2, 1, 8), 20, np.int32)  # slot 20 is garbage, used only past topk_length
  idx[:, :, 0] = 10
  idx[1, :, 1:4] = (-1, 128, 2**31 - 1)  # clipped to slots 0 and 127: garbage
  tl = np.int32([1, 4])
  dec = lambda idx: flash_mla_sparse_decode(*_jnp(q, flat.reshape(k8.shape), idx),
                                            topk_length=jnp.asarray(tl))
  out, lse = dec(idx)
  assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(lse).all()
  check_decode(out, lse, *sparse_oracle(q, flat, idx, tl))
  # A used, valid index to a garbage slot does read it (NaN propagates, as in the dense path).
  idx[0, 0, 0] = 20
  out, _ = dec(idx)
  assert np.isnan(np.asarray(out, np.float32)[0]).all()
  assert np.isfinite(np.asarray(out, np.float32)[1]).all()


@pytest.mark.parametrize("s_q", [1, 2])
def test_every_token_as_indices_equals_the_dense_decode(s_q):
  """Each row's tokens `0 … len-1` through its block table, padded with -1: the dense decode
  over the same FP8 cache (pure-JAX path)."""
  case = make_case(np.random.default_rng(4 + s_q), 4, s_q, 150, 64, 1, zero_rows=0.25)
  k8, _ = fp8_case(case)
  b, max_blocks = case.block_table.shape
  topk = max_blocks * PAGE
  indices = np.full((b, s_q, topk), -1, np.int32)
  for i in range(b):
    t = np.arange(case.cache_seqlens[i])
    indices[i, :, : t.size] = case.block_table[i, t // PAGE] * PAGE + t % PAGE
  q, _, bt, lens = case.args()
  dense = jax_flashmla.flash_mla_with_kvcache(q, jnp.asarray(k8), bt, lens,
                                              softmax_scale=case.softmax_scale,
                                              implementation="xla")
  sparse = flash_mla_sparse_decode(q, jnp.asarray(k8), jnp.asarray(indices),
                                   softmax_scale=case.softmax_scale, implementation="xla")
  assert np.isinf(dense[1]).any()  # the zero-length rows are there
  check_close("out", np.asarray(sparse[0], np.float32), np.asarray(dense[0], np.float32),
              **OUT_TOL)
  check_close("lse", sparse[1], np.asarray(dense[1], np.float64), **LSE_TOL)


def test_flashmla_style_call_through_flash_mla_with_kvcache():
  rng = np.random.default_rng(5)
  q, k8, idx, tl, snk = _jnp(*make_sparse(rng, 4, 2, 16, 64, 4, 32, lengths="partial",
                                          sink="finite"))
  want = flash_mla_sparse_decode(q, k8, idx, topk_length=tl, attn_sink=snk, softmax_scale=0.1)
  k_f8 = jax.lax.bitcast_convert_type(k8, jnp.float8_e4m3fn)  # as FlashMLA holds it
  # FlashMLA's positional order: q, k_cache, block_table, cache_seqlens, head_dim_v, (metadata),
  # softmax_scale, causal, is_fp8_kvcache.
  got = jax.jit(lambda q, k, i, t, s: jax_flashmla.flash_mla_with_kvcache(
      q, k, None, None, 512, None, 0.1, False, is_fp8_kvcache=True, indices=i, topk_length=t,
      attn_sink=s))(q, k_f8, idx, tl, snk)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _good():
  return dict(q=jnp.zeros((2, 3, 16, 576), jnp.bfloat16), k_cache=jnp.zeros((4, 5, 1, 656),
                                                                            jnp.uint8),
              indices=jnp.zeros((2, 3, 8), jnp.int32), topk_length=jnp.zeros((2,), jnp.int32),
              attn_sink=jnp.zeros((16,), jnp.float32))


ERRORS = [
    ("q", jnp.zeros((2, 3, 16), jnp.bfloat16), ValueError, r"^q: expected rank 4"),
    ("q", jnp.zeros((2, 3, 16, 576), jnp.float16), TypeError, r"^q: expected dtype bfloat16"),
    ("q", jnp.zeros((2, 3, 16, 512), jnp.bfloat16), ValueError, r"^q: expected head dim 576"),
    ("q", [[1.0]], TypeError, r"^q: expected a jax.Array.*jnp.asarray"),
    ("k_cache", jnp.zeros((4, 5, 656), jnp.uint8), ValueError, r"^k_cache: expected rank 4"),
    ("k_cache", jnp.zeros((4, 5, 1, 576), jnp.bfloat16), TypeError,
     r"^k_cache: expected dtype uint8 or float8_e4m3fn .*got bfloat16"),
    ("k_cache", jnp.zeros((4, 5, 1, 576), jnp.uint8), ValueError,
     r"^k_cache: expected 656 bytes per row .*got 576"),
    ("k_cache", jnp.zeros((4, 5, 2, 656), jnp.uint8), ValueError,
     r"^k_cache: expected 1 KV head .*got 2"),
    ("k_cache", jnp.zeros((4, 0, 1, 656), jnp.uint8), ValueError,
     r"^k_cache: expected a known block_size >= 1"),
    ("indices", jnp.zeros((2, 3), jnp.int32), ValueError, r"^indices: expected rank 3"),
    ("indices", jnp.zeros((2, 3, 8), jnp.uint32), TypeError, r"^indices: expected dtype int32"),
    ("indices", jnp.zeros((3, 3, 8), jnp.int32), ValueError,
     r"^indices: expected shape \(2, 3, topk\) .*got \(3, 3, 8\)"),
    ("indices", jnp.zeros((2, 1, 8), jnp.int32), ValueError, r"^indices: expected shape \(2, 3"),
    ("indices", jnp.zeros((2, 3, 0), jnp.int32), ValueError,
     r"^indices: expected a known topk >= 1"),
    ("topk_length", jnp.zeros((3,), jnp.int32), ValueError,
     r"^topk_length: expected shape \(2,\) .*got \(3,\)"),
    ("topk_length", jnp.zeros((2,), jnp.float32), TypeError, r"^topk_length: expected dtype int32"),
    ("attn_sink", jnp.zeros((8,), jnp.float32), ValueError,
     r"^attn_sink: expected shape \(16,\) .*got \(8,\)"),
    ("attn_sink", jnp.zeros((16,), jnp.bfloat16), TypeError,
     r"^attn_sink: expected dtype float32, got bfloat16"),
]


@pytest.mark.parametrize("name,value,exc,match", ERRORS)
def test_errors_name_the_argument(name, value, exc, match):
  args = dict(_good(), **{name: value})
  with pytest.raises(exc, match=match):
    jax.jit(lambda **kw: flash_mla_sparse_decode(**kw)).trace(**args)


def test_static_and_implementation_errors():
  a = _good()
  dec = lambda **kw: flash_mla_sparse_decode(a["q"], a["k_cache"], a["indices"], **kw)
  # The kernel exists now: 'cuda' is refused only where it cannot run (this CPU).
  with pytest.raises(ValueError, match=r"implementation='cuda' needs an NVIDIA Hopper GPU"):
    dec(implementation="cuda")
  with pytest.raises(ValueError, match=r"^implementation: expected one of"):
    dec(implementation="triton")
  with pytest.raises(ValueError, match=r"^softmax_scale: expected a finite positive float"):
    dec(softmax_scale=-1.0)
  with pytest.raises(NotImplementedError, match=r"inference-only"):
    jax.grad(lambda q: flash_mla_sparse_decode(q, a["k_cache"], a["indices"])[1].sum())(a["q"])


def test_flash_mla_with_kvcache_sparse_argument_errors():
  a = _good()
  q, k, idx = a["q"], a["k_cache"], a["indices"]
  dec = jax_flashmla.flash_mla_with_kvcache
  bt, lens = jnp.zeros((2, 1), jnp.int32), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"^block_table: expected None with indices"):
    dec(q, k, bt, None, indices=idx)
  with pytest.raises(ValueError, match=r"^cache_seqlens: expected None with indices"):
    dec(q, k, None, lens, indices=idx)
  with pytest.raises(ValueError, match=r"^causal: expected False with indices"):
    dec(q, k, None, None, causal=True, indices=idx)
  # metadata is forwarded now (the sparse decode's records; see the metadata tests below), and
  # checked there: this pair is for 2 requests, the call has b * s_q = 6.
  with pytest.raises(ValueError, match=r"^metadata: expected num_splits of shape \(7,\)"):
    dec(q, k, None, None, metadata=(jnp.zeros((1, 8), jnp.int32), jnp.zeros((3,), jnp.int32)),
        indices=idx)
  with pytest.raises(ValueError, match=r"^num_sms: expected None with indices"):
    dec(q, k, None, None, num_sms=132, indices=idx)
  with pytest.raises(ValueError, match=r"^is_fp8_kvcache: expected True or None with indices"):
    dec(q, k, None, None, is_fp8_kvcache=False, indices=idx)
  with pytest.raises(ValueError, match=r"^num_pools: expected 1 with indices"):
    dec(q, k, None, None, num_pools=2, indices=idx)
  with pytest.raises(ValueError, match=r"^head_dim_v: expected 512"):
    dec(q, k, None, None, 576, indices=idx)
  with pytest.raises(ValueError, match=r"^topk_length: expected None without indices"):
    dec(q, k, bt, lens, topk_length=a["topk_length"])
  with pytest.raises(ValueError, match=r"^attn_sink: expected None without indices"):
    dec(q, k, bt, lens, attn_sink=a["attn_sink"])
  with pytest.raises(TypeError, match=r"^indices: expected dtype int32"):
    dec(q, k, None, None, indices=idx.astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# Transformations
# ------------------------------------------------------------------------------------------------

def _lanes(seed, n=3):
  rng = np.random.default_rng(seed)
  cases = [make_sparse(rng, 2, 2, 16, 3, 30, 12, lengths="partial", sink="finite")
           for _ in range(n)]
  return [jnp.stack([jnp.asarray(c[j]) for c in cases]) for j in range(5)]


@pytest.mark.parametrize("mapped", ["q", "q,indices,topk_length", "all", "k_cache,indices",
                                    "attn_sink"])
def test_vmap_matches_the_loop(mapped):
  stacked = _lanes(6)
  names = ("q", "k_cache", "indices", "topk_length", "attn_sink")
  mapped = names if mapped == "all" else tuple(mapped.split(","))
  args = [x if name in mapped else x[0] for name, x in zip(names, stacked)]
  axes = [0 if name in mapped else None for name in names]
  fn = lambda q, k, i, t, s: flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s)
  out, lse = jax.jit(jax.vmap(fn, in_axes=axes))(*args)
  for lane in range(3):
    lane_args = [x[lane] if a == 0 else x for x, a in zip(args, axes)]
    want = sparse_oracle(*(np.asarray(x) for x in lane_args))
    check_decode(out[lane], lse[lane], *want)
    o, l = fn(*lane_args)
    check_close("out", np.asarray(out[lane], np.float32), np.asarray(o, np.float32), **OUT_TOL)
    check_close("lse", lse[lane], np.asarray(l, np.float64), **LSE_TOL)


def test_vmap_on_a_non_leading_axis():
  q, k, i, t, s = _lanes(7)
  fn = lambda q, i: flash_mla_sparse_decode(q, k[0], i, topk_length=t[0], attn_sink=s[0])
  out, lse = jax.vmap(fn, in_axes=(1, 2), out_axes=(2, 0))(jnp.moveaxis(q, 0, 1),
                                                           jnp.moveaxis(i, 0, 2))
  for lane in range(3):
    o, l = fn(q[lane], i[lane])
    check_close("out", np.asarray(out[:, :, lane], np.float32), np.asarray(o, np.float32),
                **OUT_TOL)
    check_close("lse", lse[lane], np.asarray(l, np.float64), **LSE_TOL)


def _symbolic_fn():
  return jax.jit(lambda q, k, i, t: flash_mla_sparse_decode(q, k, i, topk_length=t))


def _symbolic_args():
  b, n = export.symbolic_shape("b, n")
  return (jax.ShapeDtypeStruct((b, 2, 16, 576), jnp.bfloat16),
          jax.ShapeDtypeStruct((n, 64, 1, 656), jnp.uint8),
          jax.ShapeDtypeStruct((b, 2, 24), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))


def test_export_with_a_symbolic_batch_runs_any_batch():
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    exp = export.export(_symbolic_fn(), platforms=("cpu",))(*_symbolic_args())
  assert not [w for w in record if issubclass(w.category, KernelFallbackWarning)]
  exp = export.deserialize(exp.serialize())
  assert "custom_call @jax_flashmla" not in exp.mlir_module()
  for b, num_blocks in ((1, 3), (5, 4)):
    q, k8, idx, tl, _ = make_sparse(np.random.default_rng(b), b, 2, 16, 64, num_blocks, 24,
                                    lengths="partial")
    check_decode(*exp.call(*_jnp(q, k8, idx, tl)), *sparse_oracle(q, k8, idx, tl))


def _fallback_messages(record):
  return {str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)}


def test_export_for_cuda_runs_the_kernel_or_says_why_not():
  """Exported for (cpu, cuda): the cuda branch calls the kernel, with no warning; an extension
  built before the kernel falls back to pure JAX and warns (the build decides which)."""
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    exp = export.export(_symbolic_fn(), platforms=("cpu", "cuda"),
                        disabled_checks=jax_flashmla.DISABLE_JAX_EXPORT_CHECKS)(*_symbolic_args())
  if _extension.has_sparse_kernel():
    assert not _fallback_messages(record)
    assert "custom_call @jax_flashmla_mla_sparse_decode_v1" in exp.mlir_module()
  else:
    [message] = _fallback_messages(record)
    assert "no sparse kernel" in message and "implementation='xla'" in message
    assert "custom_call @jax_flashmla" not in exp.mlir_module()
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    exp = export.export(jax.jit(lambda q, k, i, t: flash_mla_sparse_decode(
        q, k, i, topk_length=t, implementation="xla")), platforms=("cpu", "cuda"))(
            *_symbolic_args())
  assert not _fallback_messages(record)
  assert "custom_call @jax_flashmla" not in exp.mlir_module()


class _FakeGpu:
  def __init__(self, compute_capability):
    self.compute_capability = compute_capability
    self.device_kind = f"sm {compute_capability}"


@pytest.mark.parametrize("cc,kernel", [("9.0", True), ("9.0", False), ("8.0", True)])
def test_a_simulated_gpu_runs_the_kernel_only_on_a_hopper(monkeypatch, cc, kernel):
  """A Hopper runs the kernel; a Hopper whose extension lacks it warns and runs pure JAX; any
  other GPU runs pure JAX without a word."""
  gpu = _FakeGpu(cc)
  monkeypatch.setattr(_extension, "local_gpus", lambda: [gpu])
  monkeypatch.setattr(_extension, "local_hopper_gpus", lambda: [gpu] if cc == "9.0" else [])
  monkeypatch.setattr(_extension, "has_sparse_kernel", lambda: kernel)
  if _extension.kernels_missing_reason() is not None:
    pytest.skip(f"needs an extension with the dense kernels: {_extension.kernels_missing_reason()}")
  a = _good()
  fn = jax.jit(lambda q, k, i: flash_mla_sparse_decode(q, k, i))
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    text = fn.trace(a["q"], a["k_cache"], a["indices"]).lower(
        lowering_platforms=("cuda",)).as_text()
  hopper = cc == "9.0"
  assert bool(_fallback_messages(record)) == (hopper and not kernel)
  assert ("custom_call @jax_flashmla_mla_sparse_decode_v1" in text) == (hopper and kernel)


# ------------------------------------------------------------------------------------------------
# The kernel's CUDA lowering, produced on this CPU (no GPU needed)
# ------------------------------------------------------------------------------------------------

def _cuda_calls(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return re.findall(r"stablehlo\.custom_call @(\w+)\(.*?\{(.*?)\}\s*:\s*\((.*?)\)\s*->\s*"
                    r"\((.*?)\)", text)


def _needs_kernel():
  if not _extension.has_sparse_kernel():
    pytest.skip("the extension has no sparse kernel (built before it, or without CUDA)")


KERNEL_SHAPES = [  # b, s_q, h_q, block_size, num_blocks, topk
    (2, 1, 64, 64, 8, 64),
    (4, 3, 128, 69, 10, 200),
    (3, 2, 16, 2, 40, 33),
    (1, 1, 32, 576, 2, 2048),
]


@pytest.mark.parametrize("b,s_q,h_q,block_size,num_blocks,topk", KERNEL_SHAPES)
@pytest.mark.parametrize("implementation", [None, "cuda"])
def test_cuda_lowering_calls_the_kernel_with_its_operands(b, s_q, h_q, block_size, num_blocks,
                                                          topk, implementation):
  _needs_kernel()
  args = (jnp.zeros((b, s_q, h_q, 576), jnp.bfloat16),
          jnp.zeros((num_blocks, block_size, 1, 656), jnp.float8_e4m3fn),
          jnp.zeros((b, s_q, topk), jnp.int32), jnp.zeros((b,), jnp.int32),
          jnp.zeros((h_q,), jnp.float32))
  fn = lambda q, k, i, t, s: flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s,
                                                     softmax_scale=0.125,
                                                     implementation=implementation)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    calls = _cuda_calls(fn, *args)
  assert not _fallback_messages(record)
  assert [c[0] for c in calls] == ["jax_flashmla_mla_metadata_v1",
                                   "jax_flashmla_mla_sparse_decode_v1"]
  (_, _, meta_in, meta_out), (_, attrs, ins, outs) = calls
  r = b * s_q  # one request per query token
  parts = min(132 // -(-h_q // 64), 160)  # the dense formula: h_q rows, one KV head, 132 SMs
  assert meta_in == f"tensor<{r}xi32>"
  assert meta_out.split(", ") == [f"tensor<{parts}x8xi32>", f"tensor<{r + 1}xi32>"]
  assert ins.split(", ") == [
      f"tensor<{b}x{s_q}x{h_q}x576xbf16>", f"tensor<{num_blocks}x{block_size}x1x656xui8>",
      f"tensor<{b}x{s_q}x{topk}xi32>", f"tensor<{r}xi32>", f"tensor<{h_q}xf32>",
      f"tensor<{parts}x8xi32>", f"tensor<{r + 1}xi32>"]
  assert outs.split(", ") == [
      f"tensor<{b}x{s_q}x{h_q}x512xbf16>", f"tensor<{b}x{h_q}x{s_q}xf32>",
      f"tensor<{r + parts}x1x{h_q}xf32>", f"tensor<{r + parts}x1x{h_q}x512xf32>"]
  assert "softmax_scale = 1.250000e-01 : f32" in attrs


def test_request_lengths_repeat_the_clipped_topk_length_per_token():
  from jax_flashmla.sparse import sparse_request_lengths
  got = sparse_request_lengths(jnp.int32([5, -2, 99, 0]), 40, 3)
  np.testing.assert_array_equal(got, [5, 5, 5, 0, 0, 0, 40, 40, 40, 0, 0, 0])


def test_cuda_lowering_under_vmap_folds_the_lanes_into_the_batch():
  _needs_kernel()
  q, k, i, t, s = _lanes(9)  # 3 lanes of b = 2, s_q = 2, h_q = 16, topk = 12
  fn = jax.vmap(lambda q, i, t: flash_mla_sparse_decode(q, k[0], i, topk_length=t,
                                                        attn_sink=s[0]))
  calls = _cuda_calls(fn, q, i, t)
  assert [c[0] for c in calls] == ["jax_flashmla_mla_metadata_v1",
                                   "jax_flashmla_mla_sparse_decode_v1"]
  assert calls[1][2].split(", ")[:4] == ["tensor<6x2x16x576xbf16>", "tensor<30x3x1x656xui8>",
                                         "tensor<6x2x12xi32>", "tensor<12xi32>"]


def test_metadata_is_computed_per_call_from_the_call_lengths():
  """Two decodes with different topk_length: each gets the records of its own lengths."""
  _needs_kernel()
  a = _good()
  def two(q, k, i, t):
    o1, _ = flash_mla_sparse_decode(q, k, i, topk_length=t)
    o2, _ = flash_mla_sparse_decode(q, k, i, topk_length=t // 2)
    return o1, o2
  names = [c[0] for c in _cuda_calls(two, a["q"], a["k_cache"], a["indices"], a["topk_length"])]
  assert names.count("jax_flashmla_mla_metadata_v1") == 2
  assert names.count("jax_flashmla_mla_sparse_decode_v1") == 2


def test_build_info_lists_the_sparse_target():
  info = jax_flashmla.build_info()
  if not info.get("cuda"):
    pytest.skip("a build without CUDA lists no kernels")
  assert "jax_flashmla_mla_sparse_decode_v1" in info["kernel_targets"]


# ------------------------------------------------------------------------------------------------
# Sharding on 8 CPU devices
# ------------------------------------------------------------------------------------------------

LAYOUTS = {  # mesh shape, q's spec (batch, heads)
    "batch": ((8, 1), ("batch", None)),
    "heads": ((1, 8), (None, "heads")),
    "both": ((2, 4), ("batch", "heads")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_over_batch_and_heads_equals_one_device(layout):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  shape, (batch, heads) = LAYOUTS[layout]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("batch", "heads"))
  rng = np.random.default_rng(8)
  host = make_sparse(rng, 8, 2, 16, 64, 5, 40, lengths="partial", sink="mixed")
  args = _jnp(*host)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  sharded = (put(args[0], P(batch, None, heads)), put(args[1], P()), put(args[2], P(batch)),
             put(args[3], P(batch)), put(args[4], P(heads)))
  fn = jax.jit(lambda q, k, i, t, s: flash_mla_sparse_decode(q, k, i, topk_length=t,
                                                             attn_sink=s))
  out, lse = fn(*sharded)
  # Each device computed its own part: the results stay split the way q was.
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(batch, None, heads)), 4)
  assert lse.sharding.is_equivalent_to(NamedSharding(mesh, P(batch, heads)), 3)
  hlo = fn.lower(*sharded).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo), \
      "the sharded decode moved data between devices"
  want_out, want_lse = fn(*args)  # one device (XLA may round differently per shape: ulps)
  check_close("out", np.asarray(out, np.float32), np.asarray(want_out, np.float32), **OUT_TOL)
  check_close("lse", lse, np.asarray(want_lse, np.float64), **LSE_TOL)
  check_decode(out, lse, *sparse_oracle(*host))


def test_a_cache_split_on_its_blocks_is_refused():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 CPU devices")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  a = _good()
  k = jax.device_put(jnp.zeros((8, 5, 1, 656), jnp.uint8), NamedSharding(mesh, P("x")))
  fn = jax.jit(lambda q, k, i: flash_mla_sparse_decode(q, k, i))
  # The partitioner's callback raises; JAX may wrap it in its runtime error.
  with pytest.raises(Exception, match=r"k_cache must be replicated"):
    fn(a["q"], k, a["indices"])


def test_readme_sparse_example_runs():
  # The block sits in a list item: indented fences.
  blocks = re.findall(r"^( *)```python\n(.*?)^\1```$", (ROOT / "README.md").read_text(),
                      re.S | re.M)
  [block] = [textwrap.dedent(b) for _, b in blocks if "flash_mla_sparse_decode" in b]
  namespace = {"__name__": "readme_sparse", "jax": jax, "jnp": jnp, "jax_flashmla": jax_flashmla}
  exec(compile(block, "README.md sparse block", "exec"), namespace)
  out, lse = namespace["out"], namespace["lse"]
  assert out.shape == (2, 1, 64, 512) and lse.shape == (2, 64, 1)
  md = namespace["md"]  # the step's records, for these shapes
  assert isinstance(md, jax_flashmla.MLAMetadata) and md.topk == 128
  assert md.num_splits.shape == (3,)
  # A zero cache and zero queries: every score is 0, so lse = log(number of tokens used).
  np.testing.assert_allclose(lse[:, 0, 0], np.log([128, 7]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Scheduler records computed once per step (get_sparse_mla_metadata, metadata=)
# ------------------------------------------------------------------------------------------------

def _same(got, want):
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("lengths", ["partial", None])
@pytest.mark.parametrize("s_q", [1, 3])
def test_get_sparse_mla_metadata_schedules_one_request_per_query_token(lengths, s_q):
  from jax_flashmla.reference import mla_metadata_reference
  from jax_flashmla.sparse import sparse_request_lengths
  rng = np.random.default_rng(20)
  b, h_q, topk = 5, 128, 40
  tl = None if lengths is None else jnp.asarray(rng.integers(-3, 50, b), jnp.int32)
  md = jax_flashmla.get_sparse_mla_metadata(tl, batch=None if tl is not None else b, s_q=s_q,
                                            h_q=h_q, topk=topk, num_sms=100)
  assert (md.num_sms, md.num_q_tokens_per_head_k, md.num_heads_k, md.topk) == (100, h_q, 1, topk)
  parts = 50  # 128 query rows: two row blocks of 64, so 100 SMs // 2
  assert md.tile_scheduler_metadata.shape == (parts, 8)
  assert md.num_splits.shape == (b * s_q + 1,)
  # Request i * s_q + s has length clip(topk_length[i], 0, topk), topk without topk_length.
  used = np.full(b, topk) if tl is None else np.clip(np.asarray(tl), 0, topk)
  lens = jnp.asarray(np.repeat(used, s_q), jnp.int32)
  np.testing.assert_array_equal(sparse_request_lengths(
      jnp.asarray(used, jnp.int32), topk, s_q), lens)
  want_sched, want_splits = mla_metadata_reference(lens, parts)
  np.testing.assert_array_equal(md.tile_scheduler_metadata, want_sched)
  np.testing.assert_array_equal(md.num_splits, want_splits)


@pytest.mark.parametrize("lengths,sink", [("partial", "finite"), (None, None), ("full", "mixed")])
def test_metadata_gives_the_results_of_a_call_without_it(lengths, sink):
  rng = np.random.default_rng(21)
  b, s_q, h_q, topk = 4, 2, 16, 32
  q, k8, idx, tl, snk = _jnp(*make_sparse(rng, b, s_q, h_q, 64, 4, topk, lengths=lengths,
                                          sink=sink))
  want = flash_mla_sparse_decode(q, k8, idx, topk_length=tl, attn_sink=snk)
  check_decode(*want, *sparse_oracle(*(None if x is None else np.asarray(x) for x in
                                       (q, k8, idx, tl, snk))))
  md = jax_flashmla.get_sparse_mla_metadata(tl, batch=b, s_q=s_q, h_q=h_q, topk=topk)
  _same(flash_mla_sparse_decode(q, k8, idx, topk_length=tl, attn_sink=snk, metadata=md), want)
  # Under jit, the records an argument (computed once per step, outside the layers).
  step = jax.jit(lambda q, k, i, t, s, md: flash_mla_sparse_decode(q, k, i, topk_length=t,
                                                                     attn_sink=s, metadata=md))
  _same(step(q, k8, idx, tl, snk, md), want)
  # The pair of its arrays, as FlashMLA's tuple.
  pair = (md.tile_scheduler_metadata, md.num_splits)
  _same(flash_mla_sparse_decode(q, k8, idx, topk_length=tl, attn_sink=snk, metadata=pair), want)


def test_flashmla_sparse_call_with_scheduler_metadata_ports():
  """FlashMLA's `flash_mla_with_kvcache(q, k, None, None, 512, sched_meta, None,
  is_fp8_kvcache=True, indices=...)`, sched_meta computed once for every layer."""
  rng = np.random.default_rng(22)
  b, s_q, h_q, topk = 3, 2, 64, 24
  layers = [_jnp(*make_sparse(rng, b, s_q, h_q, 2, 60, topk, lengths="partial", sink="finite"))
            for _ in range(2)]
  tl = layers[0][3]
  layers = [(q, jax.lax.bitcast_convert_type(k, jnp.float8_e4m3fn), i, tl, s)
            for q, k, i, _, s in layers]

  @jax.jit
  def step(layers, tl):
    sched_meta = jax_flashmla.get_sparse_mla_metadata(tl, s_q=s_q, h_q=h_q, topk=topk)
    return [jax_flashmla.flash_mla_with_kvcache(q, k, None, None, 512, sched_meta, None,
                                                is_fp8_kvcache=True, indices=i, topk_length=tl,
                                                attn_sink=s) for q, k, i, _, s in layers]

  for got, (q, k, i, t, s) in zip(step(layers, tl), layers, strict=True):
    _same(got, flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s))


def test_records_of_other_lengths_give_nan_rows_as_the_kernel_does():
  """The kernel checks each record's length fingerprint against the call's request lengths;
  the pure-JAX path given records repeats the check, so a stale schedule shows on the CPU."""
  from jax_flashmla.reference import stale_requests
  from jax_flashmla.sparse import sparse_request_lengths
  rng = np.random.default_rng(23)
  b, s_q, h_q, topk = 8, 2, 16, 64
  q, k8, idx, tl, _ = _jnp(*make_sparse(rng, b, s_q, h_q, 64, 8, topk, lengths="partial"))
  want = flash_mla_sparse_decode(q, k8, idx, topk_length=tl)
  other = tl.at[3].set(jnp.where(jnp.clip(tl[3], 0, topk) == 5, 6, 5))  # one row's length
  md = jax_flashmla.get_sparse_mla_metadata(other, s_q=s_q, h_q=h_q, topk=topk, num_sms=4)
  stale = np.asarray(stale_requests(md.tile_scheduler_metadata,
                                    sparse_request_lengths(tl, topk, s_q))).reshape(b, s_q)
  assert stale[3].all() and not stale.all()  # the changed row's record, not every record
  out, lse = flash_mla_sparse_decode(q, k8, idx, topk_length=tl, metadata=md)
  out = np.asarray(out, np.float32)
  assert np.isnan(out[stale]).all() and np.isnan(np.asarray(lse).transpose(0, 2, 1)[stale]).all()
  fresh = ~stale
  np.testing.assert_array_equal(out[fresh], np.asarray(want[0], np.float32)[fresh])
  # Records of no topk_length (every slot) are stale wherever a row uses fewer.
  md_full = jax_flashmla.get_sparse_mla_metadata(None, batch=b, s_q=s_q, h_q=h_q, topk=topk,
                                                 num_sms=4)
  _, lse = flash_mla_sparse_decode(q, k8, idx, topk_length=tl, metadata=md_full)
  assert np.isnan(lse).any()


def _metadata_case():
  a = _good()  # b = 2, s_q = 3, h_q = 16, topk = 8
  return a, jax_flashmla.get_sparse_mla_metadata(a["topk_length"], s_q=3, h_q=16, topk=8)


METADATA_ERRORS = [
    ("h_q", lambda tl: jax_flashmla.get_sparse_mla_metadata(tl, s_q=3, h_q=128, topk=8),
     ValueError, r"^metadata: expected records for this call's h_q=16 query heads .*and "
                 r"topk=8, got metadata computed with h_q=128.*get_sparse_mla_metadata\("),
    ("topk", lambda tl: jax_flashmla.get_sparse_mla_metadata(tl, s_q=3, h_q=16, topk=9),
     ValueError, r"^metadata: expected .*topk=8, got .*topk=9"),
    ("s_q", lambda tl: jax_flashmla.get_sparse_mla_metadata(tl, s_q=1, h_q=16, topk=8),
     ValueError, r"^metadata: expected num_splits of shape \(7,\) \(b \* s_q \+ 1 = 2 \* 3 \+ 1"
                 r".*got \(3,\)"),
    ("batch", lambda tl: jax_flashmla.get_sparse_mla_metadata(None, batch=3, s_q=3, h_q=16,
                                                              topk=8),
     ValueError, r"^metadata: expected num_splits of shape \(7,\).*got \(10,\)"),
    ("dense", lambda tl: jax_flashmla.get_mla_metadata(jnp.zeros((6,), jnp.int32), 16, 1),
     ValueError, r"^metadata: expected the sparse decode's records .*got the dense decode's"),
    ("pair_batch", lambda tl: (jnp.zeros((4, 8), jnp.int32), jnp.zeros((3,), jnp.int32)),
     ValueError, r"^metadata: expected num_splits of shape \(7,\)"),
    ("pair_dtype", lambda tl: (jnp.zeros((4, 8), jnp.uint32), jnp.zeros((7,), jnp.int32)),
     TypeError, r"^tile_scheduler_metadata: expected dtype int32"),
    ("pair_width", lambda tl: (jnp.zeros((4, 7), jnp.int32), jnp.zeros((7,), jnp.int32)),
     ValueError, r"^tile_scheduler_metadata: expected shape \[num_sm_parts, 8\]"),
    ("triple", lambda tl: (jnp.zeros((4, 8), jnp.int32),) * 3, TypeError,
     r"^metadata: expected MLAMetadata, a \(tile_scheduler_metadata, num_splits\) pair or None, "
     r"got tuple of length 3"),
]


@pytest.mark.parametrize("name,make,exc,match", METADATA_ERRORS,
                         ids=[e[0] for e in METADATA_ERRORS])
def test_metadata_for_other_shapes_is_refused_at_trace_time(name, make, exc, match):
  a, _ = _metadata_case()
  md = make(a["topk_length"])
  fn = jax.jit(lambda q, k, i, t, md: flash_mla_sparse_decode(q, k, i, topk_length=t,
                                                                metadata=md))
  with pytest.raises(exc, match=match):
    fn.trace(a["q"], a["k_cache"], a["indices"], a["topk_length"], md)
  # Through FlashMLA's call the same.
  with pytest.raises(exc, match=match):
    jax_flashmla.flash_mla_with_kvcache(a["q"], a["k_cache"], None, None, 512, md,
                                        indices=a["indices"], topk_length=a["topk_length"])


def test_the_right_metadata_is_accepted_where_the_wrong_is_refused():
  """The other side of the error table: the records of these very shapes pass every check."""
  a, md = _metadata_case()
  fn = jax.jit(lambda q, k, i, t, md: flash_mla_sparse_decode(q, k, i, topk_length=t,
                                                                metadata=md))
  out = fn.trace(a["q"], a["k_cache"], a["indices"], a["topk_length"], md).out_info
  assert out[0].shape == (2, 3, 16, 512) and out[1].shape == (2, 16, 3)


def test_the_dense_decode_refuses_the_sparse_records():
  lens = jnp.zeros((6,), jnp.int32)
  md = jax_flashmla.get_sparse_mla_metadata(None, batch=6, s_q=1, h_q=16, topk=8)
  # Shaped like the dense records of this call (6 requests, 16 rows, one KV head) all the same.
  assert md.num_splits.shape == (7,) and md.num_q_tokens_per_head_k == 16
  with pytest.raises(ValueError, match=r"^metadata: expected the dense decode's records "
                                       r"\(get_mla_metadata\(cache_seqlens, 16, 1\)\), got the "
                                       r"sparse decode's"):
    jax_flashmla.flash_mla_with_kvcache(jnp.zeros((6, 1, 16, 576), jnp.bfloat16),
                                        jnp.zeros((2, 64, 1, 576), jnp.bfloat16),
                                        jnp.zeros((6, 1), jnp.int32), lens, metadata=md)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(topk_length=None, s_q=1, h_q=16, topk=8), ValueError,
     r"^batch: expected the batch size \(a static int\) when topk_length is None, got None"),
    (dict(topk_length=jnp.zeros((2,), jnp.int32), batch=3, s_q=1, h_q=16, topk=8), ValueError,
     r"^batch: expected topk_length's batch 2 \(or None\), got 3"),
    (dict(topk_length=jnp.zeros((2,), jnp.float32), s_q=1, h_q=16, topk=8), TypeError,
     r"^topk_length: expected dtype int32, got float32"),
    (dict(topk_length=jnp.zeros((2, 1), jnp.int32), s_q=1, h_q=16, topk=8), ValueError,
     r"^topk_length: expected shape \[b\] with b >= 1, got shape \(2, 1\)"),
    (dict(topk_length=[3, 4], s_q=1, h_q=16, topk=8), TypeError,
     r"^topk_length: expected a jax.Array .*jnp.asarray"),
    (dict(topk_length=None, batch=2, s_q=1, h_q=16, topk=0), ValueError,
     r"^topk: expected a static int >= 1, got 0"),
    (dict(topk_length=None, batch=2, s_q=1.0, h_q=16, topk=8), TypeError,
     r"^s_q: expected a static int >= 1, got float"),
    (dict(topk_length=None, batch=2, s_q=1, h_q=16, topk=8, implementation="tpu"), ValueError,
     r"^implementation: expected one of"),
])
def test_get_sparse_mla_metadata_errors_name_the_argument(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jax_flashmla.get_sparse_mla_metadata(**kwargs)


def test_vmap_with_metadata_matches_the_loop():
  q, k, i, t, s = _lanes(24)  # 3 lanes of b = 2, s_q = 2, h_q = 16, topk = 12
  md = jax_flashmla.get_sparse_mla_metadata(t[0], s_q=2, h_q=16, topk=12)

  def lane(q, i, t, s):
    return flash_mla_sparse_decode(q, k[0], i, topk_length=t, attn_sink=s, metadata=md)

  # The records are lane 0's; each lane is decoded with records of its own lengths (folded into
  # the batch, or one lane at a time for a sink per lane), so none of them is stale.
  for axes, fixed in (((0, 0, 0, None), s[0]), ((0, 0, 0, 0), None)):
    args = (q, i, t, s if fixed is None else fixed)
    out, lse = jax.jit(jax.vmap(lane, in_axes=axes))(*args)
    for n in range(3):
      want = flash_mla_sparse_decode(q[n], k[0], i[n], topk_length=t[n],
                                     attn_sink=s[n] if fixed is None else fixed)
      _same((out[n], lse[n]), want)


# The CUDA lowering with and without records, produced on this CPU: with implementation="cuda"
# and no GPU attached the lowering emits the FFI calls whatever the build (it only names them).

def _needs_cuda_lowering():
  if _extension.local_gpus() and (_extension.kernels_unavailable_reason() is not None or
                                  not _extension.has_sparse_kernel()):
    pytest.skip("a GPU is attached that cannot run the sparse kernel")


def _names(calls):
  return [c[0] for c in calls]


SCHED, SPARSE = "jax_flashmla_mla_metadata_v1", "jax_flashmla_mla_sparse_decode_v1"


def test_cuda_lowering_with_metadata_passes_the_records_to_the_kernel():
  _needs_cuda_lowering()
  a, md = _metadata_case()
  md = jax_flashmla.get_sparse_mla_metadata(a["topk_length"], s_q=3, h_q=16, topk=8, num_sms=77)
  fn = lambda q, k, i, t, md: flash_mla_sparse_decode(q, k, i, topk_length=t, metadata=md,
                                                      implementation="cuda")
  args = (a["q"], a["k_cache"], a["indices"], a["topk_length"])
  with_md = _cuda_calls(fn, *args, md)
  assert _names(with_md) == [SPARSE]  # no scheduler: the records are the argument's
  ins = with_md[0][2].split(", ")
  assert ins[3:] == ["tensor<6xi32>", "tensor<16xf32>", "tensor<77x8xi32>", "tensor<7xi32>"]
  without = _cuda_calls(fn, *args, None)
  assert _names(without) == [SCHED, SPARSE]  # 132 SMs with no GPU attached
  assert without[1][2].split(", ")[5:] == ["tensor<132x8xi32>", "tensor<7xi32>"]


def test_cuda_lowering_schedules_a_step_once_for_every_layer():
  _needs_cuda_lowering()
  a, _ = _metadata_case()

  def step(q, k, i, t, *, shared):
    md = (jax_flashmla.get_sparse_mla_metadata(t, s_q=3, h_q=16, topk=8, implementation="cuda")
          if shared else None)
    return [flash_mla_sparse_decode(q, k, i + n, topk_length=t, metadata=md,
                                    implementation="cuda") for n in range(3)]

  args = (a["q"], a["k_cache"], a["indices"], a["topk_length"])
  shared = _names(_cuda_calls(lambda *x: step(*x, shared=True), *args))
  assert shared.count(SCHED) == 1 and shared.count(SPARSE) == 3
  per_call = _names(_cuda_calls(lambda *x: step(*x, shared=False), *args))
  assert per_call.count(SCHED) == 3 and per_call.count(SPARSE) == 3


def test_cuda_lowering_under_vmap_schedules_the_folded_batch():
  _needs_cuda_lowering()
  q, k, i, t, s = _lanes(25)  # 3 lanes of b = 2, s_q = 2, h_q = 16, topk = 12
  md = jax_flashmla.get_sparse_mla_metadata(t[0], s_q=2, h_q=16, topk=12, num_sms=90)
  fn = jax.vmap(lambda q, i, t: flash_mla_sparse_decode(q, k[0], i, topk_length=t,
                                                        attn_sink=s[0], metadata=md,
                                                        implementation="cuda"))
  calls = _cuda_calls(fn, q, i, t)
  # The records are for 4 requests; the kernel decodes 3 lanes * 4: scheduled in the call, for
  # the metadata's SM count.
  assert _names(calls) == [SCHED, SPARSE]
  assert calls[0][2] == "tensor<12xi32>"
  assert calls[0][3].split(", ") == ["tensor<90x8xi32>", "tensor<13xi32>"]


def _sharded_shapes(mesh, spec_q, spec_t, spec_s, *, b=8, s_q=2, h_q=64, topk=16, parts=33):
  from jax.sharding import NamedSharding, PartitionSpec as P
  at = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype,
                                                       sharding=NamedSharding(mesh, spec))
  return [at((b, s_q, h_q, 576), jnp.bfloat16, spec_q), at((4, 64, 1, 656), jnp.uint8, P()),
          at((b, s_q, topk), jnp.int32, spec_t), at((b,), jnp.int32, spec_t),
          at((h_q,), jnp.float32, spec_s), at((parts, 8), jnp.int32, P()),
          at((b * s_q + 1,), jnp.int32, P())]


@pytest.mark.parametrize("layout", ["unsplit", "batch", "heads", "both"])
def test_partition_uses_the_records_only_where_the_batch_is_whole(layout):
  """The per-device computation the partitioner gets, lowered for 'cuda': the global batch's
  records where nothing is split, and each device's own schedule (for the metadata's SM count)
  where the batch or the heads are split, as the dense decode's plan does."""
  _needs_cuda_lowering()
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import Mesh, PartitionSpec as P
  from jax_flashmla import sparse
  mesh_shape, batch, heads = {"unsplit": ((1, 8), None, None), "batch": ((8, 1), "dp", None),
                              "heads": ((1, 8), None, "tp"), "both": ((2, 4), "dp", "tp")}[layout]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("dp", "tp"))
  shapes_in = _sharded_shapes(mesh, P(batch, None, heads), P(batch), P(heads))
  config = sparse.SparseConfig(0.1, "cuda", 90)
  _, lower, results, arg_shardings = sparse._partition(config, mesh, shapes_in, None)
  kb, kh = mesh.shape["dp"] if batch else 1, mesh.shape["tp"] if heads else 1
  assert [tuple(s.spec) for s in arg_shardings[5:]] == [(), ()]  # the records: replicated
  local = [jax.ShapeDtypeStruct(s.shard_shape(x.shape), x.dtype)
           for x, s in zip(shapes_in, arg_shardings)]
  assert local[0].shape == (8 // kb, 2, 64 // kh, 576)
  calls = _cuda_calls(lower, *local)
  if layout == "unsplit":
    assert _names(calls) == [SPARSE]
    assert calls[0][2].split(", ")[5:] == ["tensor<33x8xi32>", "tensor<17xi32>"]
  else:
    requests = 8 // kb * 2
    parts = shapes.num_sm_parts_for(90, 64 // kh, 1)
    assert _names(calls) == [SCHED, SPARSE]
    assert calls[0][2] == f"tensor<{requests}xi32>"
    assert calls[1][2].split(", ")[5:] == [f"tensor<{parts}x8xi32>",
                                           f"tensor<{requests + 1}xi32>"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_with_metadata_equals_one_device(layout):
  """The metadata of the whole batch, computed once in the step from the sharded lengths: the
  results of one device, and nothing moves between devices (each device schedules its own part,
  so XLA drops the whole-batch records and the gather of the lengths they would need)."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  shape, (batch, heads) = LAYOUTS[layout]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("batch", "heads"))
  host = make_sparse(np.random.default_rng(26), 8, 2, 16, 64, 5, 40, lengths="partial",
                     sink="mixed")
  args = _jnp(*host)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  sharded = (put(args[0], P(batch, None, heads)), put(args[1], P()), put(args[2], P(batch)),
             put(args[3], P(batch)), put(args[4], P(heads)))

  @jax.jit
  def step(q, k, i, t, s):
    md = jax_flashmla.get_sparse_mla_metadata(t, s_q=2, h_q=16, topk=40)
    return flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s, metadata=md)

  out, lse = step(*sharded)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(batch, None, heads)), 4)
  hlo = step.lower(*sharded).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo), \
      "the sharded decode moved data between devices"
  want = flash_mla_sparse_decode(*args[:3], topk_length=args[3], attn_sink=args[4])
  check_close("out", np.asarray(out, np.float32), np.asarray(want[0], np.float32), **OUT_TOL)
  check_close("lse", lse, np.asarray(want[1], np.float64), **LSE_TOL)
  check_decode(out, lse, *sparse_oracle(*host))


def test_a_batch_split_schedules_each_device_from_its_own_lengths():
  """Given records are for the global batch; split, each device schedules its own lengths. So
  records of other lengths, NaN on one device, do not reach a split decode."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
  q, k8, idx, tl, _ = _jnp(*make_sparse(np.random.default_rng(27), 8, 1, 16, 64, 5, 40,
                                        lengths="partial"))
  stale_md = jax_flashmla.get_sparse_mla_metadata(tl + 1, s_q=1, h_q=16, topk=40)
  fn = jax.jit(lambda q, k, i, t, md: flash_mla_sparse_decode(q, k, i, topk_length=t,
                                                                metadata=md))
  assert np.isnan(fn(q, k8, idx, tl, stale_md)[1]).any()  # one device: the records are used
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  out, lse = fn(put(q, P("batch")), k8, put(idx, P("batch")), put(tl, P("batch")), stale_md)
  want = flash_mla_sparse_decode(q, k8, idx, topk_length=tl)  # XLA may round per shape: ulps
  check_close("out", np.asarray(out, np.float32), np.asarray(want[0], np.float32), **OUT_TOL)
  check_close("lse", lse, np.asarray(want[1], np.float64), **LSE_TOL)


def test_export_with_metadata_and_a_symbolic_batch():
  """A step exported once for any batch: its records computed once for its layers; the CPU
  program runs any batch, and the 'cuda' branch schedules once and decodes twice."""
  def step(q, k, i, t):
    md = jax_flashmla.get_sparse_mla_metadata(t, s_q=2, h_q=16, topk=24)
    o1, _ = flash_mla_sparse_decode(q, k, i, topk_length=t, metadata=md)
    o2, l2 = flash_mla_sparse_decode(q, k, jnp.flip(i, 2), topk_length=t, metadata=md)
    return o1, o2, l2

  exp = export.export(jax.jit(step), platforms=("cpu",))(*_symbolic_args())
  exp = export.deserialize(exp.serialize())
  for b in (1, 5):
    q, k8, idx, tl, _ = make_sparse(np.random.default_rng(b), b, 2, 16, 64, 3, 24,
                                    lengths="partial")
    o1, o2, l2 = exp.call(*_jnp(q, k8, idx, tl))
    check_close("out", np.asarray(o1, np.float32), sparse_oracle(q, k8, idx, tl)[0], **OUT_TOL)
    check_decode(o2, l2, *sparse_oracle(q, k8, np.flip(idx, 2), tl))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", KernelFallbackWarning)
    exp = export.export(jax.jit(step), platforms=("cpu", "cuda"),
                        disabled_checks=jax_flashmla.DISABLE_JAX_EXPORT_CHECKS)(*_symbolic_args())
  text = exp.mlir_module()
  if _extension.kernels_missing_reason() is None:  # a build with the CUDA kernels
    assert text.count("custom_call @jax_flashmla_mla_metadata_v1") == 1
  if _extension.has_sparse_kernel():
    assert text.count("custom_call @jax_flashmla_mla_sparse_decode_v1") == 2
