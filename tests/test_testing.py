"""jax_flashmla.testing: FlashMLA's comparison and the live-data allowance for P's rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import testing


def test_compare_counts_what_fails_and_passes_what_is_close():
  want = np.linspace(-1, 1, 64).reshape(4, 16)
  got = want + 5e-4  # within abs_tol everywhere
  assert testing.compare(got, want, **testing.OUT_TOL).passed
  got[1, 3] += 0.1
  report = testing.compare(got, want, **testing.OUT_TOL)
  assert not report.passed and int(report.out_of_tolerance) == 1
  assert report.worst_got == got[1, 3]
  nan = want.copy()
  nan[0, 0] = np.nan
  assert int(testing.compare(want, nan, **testing.OUT_TOL).nan) == 1


def test_the_scale_allowance_accepts_rounding_of_large_values_only():
  want = np.full((2, 1, 1, 8), 0.3)
  got = want + 0.008  # P's bf16 rounding on a row whose V reaches 4 can reach 2^-8 * 4 = 0.016
  scale = np.array([[4.0] * 8, [0.1] * 8])[:, None, None]
  plain = testing.compare(got, want, **testing.OUT_TOL)
  live = testing.compare(got, want, **testing.OUT_TOL, scale=scale,
                         scale_tol=testing.p_rounding_tol(jnp.bfloat16))
  assert int(plain.out_of_tolerance) == 16
  # Row 0 attends to values of 4 (bound 2^-6 * 4 = 0.0625): passes; row 1's are 0.1: fails.
  assert int(live.out_of_tolerance) == 8
  jitted = jax.jit(lambda g, w, s: testing.compare(
      g, w, **testing.OUT_TOL, scale=s, scale_tol=testing.p_rounding_tol(jnp.bfloat16)))
  assert int(jitted(jnp.asarray(got), jnp.asarray(want), jnp.asarray(scale)).out_of_tolerance) == 8


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_p_rounding_tol_is_four_unit_roundoffs(dtype):
  unit_roundoff = float(jnp.finfo(dtype).eps) / 2
  assert testing.p_rounding_tol(dtype) == pytest.approx(4 * unit_roundoff)


def test_value_bound_sees_only_the_keys_a_row_attends_to():
  k = np.zeros((4, 64, 1, 576), np.float32)
  k[0, :10, 0, :512] = 2.0
  k[0, 10:, 0, :512] = np.nan  # past row 0's length: must not count
  k[1, :, 0, 5] = -7.0         # page 1 belongs to row 1
  k[3, :, 0, :512] = 100.0     # never referenced by a valid id
  block_table = np.array([[0, -1], [1, 3]], np.int32)
  lens = np.array([10, 64], np.int32)
  bound = np.asarray(testing.value_bound(jnp.asarray(k), jnp.asarray(block_table),
                                         jnp.asarray(lens)))
  assert bound.shape == (2, 512)
  np.testing.assert_array_equal(bound[0], np.full(512, 2.0))
  assert bound[1, 5] == 7.0 and bound[1, 0] == 0.0


def _with_kernel_rounding(q, k_cache, block_table, lens, scale):
  """The pure-JAX decode (s_q = 1) with the kernels' one extra rounding: P to bf16 before P·V,
  row sums from the unrounded P, out rounded to bf16."""
  b, _, h_q, d = q.shape
  num_blocks, page = k_cache.shape[:2]
  t = block_table.shape[1] * page
  kv = jnp.take(k_cache, block_table, axis=0).reshape(b, t, d).astype(jnp.float32)
  ok = jnp.arange(t)[None] < lens[:, None]
  kv = jnp.where(ok[..., None], kv, 0.0)
  s = jnp.einsum("bhd,btd->bht", q[:, 0].astype(jnp.float32), kv,
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(ok[:, None], s, -jnp.inf)
  p = jnp.exp(s - s.max(-1, keepdims=True))
  p_rounded = p.astype(jnp.bfloat16).astype(jnp.float32)
  o = jnp.einsum("bht,btv->bhv", p_rounded, kv[..., :512], precision=jax.lax.Precision.HIGHEST)
  return (o / p.sum(-1, keepdims=True))[:, None].astype(jnp.bfloat16)


def test_live_values_need_the_allowance_and_it_suffices():
  """A cache whose values reach several units, as a model's do (the demo's reach 4-5): rounding
  P to bf16 alone puts elements outside FlashMLA's absolute tolerance, and inside the allowance
  with room to spare."""
  from jax_flashmla.reference import flash_mla_reference
  key = jax.random.key(0)
  kq, kk = jax.random.split(key)
  b, pages = 4, 4
  q = jax.random.normal(kq, (b, 1, 16, 576)).astype(jnp.bfloat16)
  k_cache = (1.5 * jax.random.normal(kk, (b * pages, 64, 1, 576))).astype(jnp.bfloat16)
  block_table = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
  lens = jnp.asarray([256, 200, 77, 3], jnp.int32)
  scale = 192 ** -0.5
  want, _ = flash_mla_reference(q, k_cache, block_table, lens, softmax_scale=scale)
  got = _with_kernel_rounding(q, k_cache[:, :, 0], block_table, lens, scale)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  bound = np.asarray(testing.value_bound(k_cache, block_table, lens))[:, None, None]
  tol = testing.p_rounding_tol(jnp.bfloat16)
  assert int(testing.compare(got, want, **testing.OUT_TOL).out_of_tolerance) > 0
  assert testing.compare(got, want, **testing.OUT_TOL, scale=bound, scale_tol=tol).passed
  assert np.max(np.abs(got - want) / (tol * bound)) < 0.75
