"""vmap over every mix of mapped and unmapped operands equals a loop over the lanes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from mla_cases import make_case

LANES = 3


def _lanes(s_q=2, h_q=4, h_kv=2, causal=True):
  rng = np.random.default_rng(7)
  cases = [make_case(rng, b=2, s_q=s_q, mean_len=80, h_q=h_q, h_kv=h_kv, causal=causal,
                     varlen=False) for _ in range(LANES)]
  # Same pool shapes in every lane so they can be stacked.
  shape = max(c.k_cache.shape[0] for c in cases)
  for c in cases:
    pad = shape - c.k_cache.shape[0]
    c.k_cache = np.concatenate([c.k_cache, np.full((pad,) + c.k_cache.shape[1:], np.nan,
                                                   c.k_cache.dtype)])
  cases[1].cache_seqlens[0] = 0
  return cases


def _decode(q, k, bt, lens, md=None, causal=True):
  return jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, metadata=md, causal=causal,
                                             num_sms=4)


@pytest.mark.parametrize("mapped", [m for m in itertools.product([0, None], repeat=4)
                                    if any(x is not None for x in m)])
def test_vmap_matches_loop(mapped):
  cases = _lanes()
  stacked = [np.stack([c.args()[i] for c in cases]) for i in range(4)]
  args = [s if m is not None else np.asarray(cases[0].args()[i])
          for i, (s, m) in enumerate(zip(stacked, mapped))]
  got_out, got_lse = jax.jit(jax.vmap(_decode, in_axes=mapped))(*args)
  for lane in range(LANES):
    lane_args = [a[lane] if m is not None else a for a, m in zip(args, mapped)]
    want_out, want_lse = jax.jit(_decode)(*lane_args)
    np.testing.assert_allclose(np.asarray(got_lse[lane]), np.asarray(want_lse), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_out[lane], np.float32),
                               np.asarray(want_out, np.float32), rtol=0, atol=2**-9)


def test_vmap_over_q_alone_folds_into_heads():
  cases = _lanes()
  q = np.stack([c.q for c in cases])
  c = cases[0]
  jaxpr = jax.make_jaxpr(jax.vmap(_decode, in_axes=(0, None, None, None)))(
      q, c.k_cache, c.block_table, c.cache_seqlens)
  eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "jax_flashmla_mla_decode"]
  assert len(eqns) == 1
  assert eqns[0].invars[0].aval.shape == (2, 2, LANES * 4, 576)


def test_vmap_with_mapped_metadata():
  cases = _lanes()
  lens = np.stack([c.cache_seqlens for c in cases])
  bt = np.stack([c.block_table for c in cases])
  q = np.stack([c.q for c in cases])
  k = cases[0].k_cache

  def step(q, bt, lens):
    md = jax_flashmla.get_mla_metadata(lens, 4, 2, num_sms=4)
    return _decode(q, k, bt, lens, md)

  got = jax.jit(jax.vmap(step))(q, bt, lens)
  for lane in range(LANES):
    want = jax.jit(step)(q[lane], bt[lane], lens[lane])
    np.testing.assert_allclose(np.asarray(got[1][lane]), np.asarray(want[1]), rtol=1e-6)
