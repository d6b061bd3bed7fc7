"""The pure-JAX reference (the `xla` implementation) against the float64 oracle."""

import itertools

import jax
import numpy as np
import pytest

import jax_flashmla
from mla_cases import check_decode, make_case, oracle

HEADS = [(1, 1), (3, 1), (16, 1), (64, 1), (128, 1), (16, 2), (64, 2)]


@pytest.mark.parametrize("s_q,causal", [(1, False), (2, False), (2, True), (4, True)])
@pytest.mark.parametrize("h_q,h_kv", HEADS)
def test_reference_matches_oracle(s_q, causal, h_q, h_kv):
  rng = np.random.default_rng(hash((s_q, causal, h_q, h_kv)) % 2**32)
  case = make_case(rng, b=3, s_q=s_q, mean_len=150, h_q=h_q, h_kv=h_kv, causal=causal,
                   zero_rows=0.3)
  out, lse = jax.jit(jax_flashmla.flash_mla_reference, static_argnames=("softmax_scale", "causal"))(
      *case.args(), softmax_scale=case.softmax_scale, causal=causal)
  check_decode(out, lse, *oracle(case))


@pytest.mark.parametrize("mean_len", [1, 63, 64, 65, 128, 129])
def test_page_edges_and_model_scale(mean_len):
  rng = np.random.default_rng(mean_len)
  scale = 192**-0.5 * 1.3  # DeepSeek-style scale with a YaRN factor
  case = make_case(rng, b=4, s_q=2, mean_len=mean_len, h_q=8, h_kv=1, varlen=False,
                   causal=True, softmax_scale=scale)
  out, lse = jax_flashmla.flash_mla_with_kvcache(*case.args(), softmax_scale=scale, causal=True,
                                                 implementation="xla")
  check_decode(out, lse, *oracle(case))


def test_empty_rows_give_zero_and_inf():
  rng = np.random.default_rng(1)
  case = make_case(rng, b=4, s_q=3, mean_len=100, h_q=4, h_kv=1, causal=True)
  case.cache_seqlens[:] = [0, 1, 2, 3]  # with s_q=3 causal: token s sees len - 3 + s + 1 keys
  out, lse = jax_flashmla.flash_mla_with_kvcache(*case.args(), causal=True, implementation="xla")
  out, lse = np.asarray(out, np.float32), np.asarray(lse)
  assert np.all(out[0] == 0) and np.all(np.isposinf(lse[0]))
  assert np.all(np.isposinf(lse[1][:, :2])) and np.all(np.isfinite(lse[1][:, 2]))
  assert np.all(out[1, :2] == 0)
  check_decode(out, lse, *oracle(case))


def test_hostile_values_are_contained():
  """Lengths past capacity are clamped, negative lengths are empty, bad page ids are masked,
  and none of it changes the other rows."""
  rng = np.random.default_rng(2)
  case = make_case(rng, b=4, s_q=1, mean_len=130, h_q=4, h_kv=1, varlen=False)
  good_out, good_lse = oracle(case)
  case.cache_seqlens[1] = 2**31 - 1
  case.cache_seqlens[2] = -5
  case.block_table[3, 1] = -1
  out, lse = jax_flashmla.flash_mla_with_kvcache(*case.args(), implementation="xla")
  out, lse = np.asarray(out, np.float32), np.asarray(lse)
  want_out, want_lse = oracle(case)
  # Row 1 now claims its poisoned slots; what it reads there is its own garbage.
  rows = [0, 2, 3]
  check_decode(out[rows], lse[rows], want_out[rows], want_lse[rows])
  check_decode(out[[0]], lse[[0]], good_out[[0]], good_lse[[0]])
  assert np.all(np.isposinf(lse[2])) and np.all(out[2] == 0)
  assert np.all(np.isfinite(lse[3]))
