"""Numerically hard inputs: large magnitudes, all-equal scores, one dominating key.

Each case is built on `make_case` (permuted pages, NaN in every slot no row reads) with q and
the keys rewritten so the scores take a chosen shape:

- large magnitudes: scores `q·k·scale` spread over about [-T, T], T = 20, 80 (DeepSeek-sized
  logits) and 120 (past float32's exp() range, e^88.7: only the running maximum keeps it
  finite), so the softmax is dominated by a few keys;
- all-equal scores: q = 0 (every score 0: out is the mean of V, lse = log n), or every key the
  same row with a score of 80 or -120 (out is that V row, lse = score + log n; at -120 every
  exp() underflows unless the maximum is subtracted, and the row must not look empty);
- one dominating key: one key scores 80 while the rest score about 0 (at the first key, at a
  page edge, at the last key, hidden from earlier tokens by the causal mask, or just past the
  length, where it must not count at all).

CPU tier: the xla path against the float64 oracle, docs/design.md tolerances (f32 lse, bf16 out),
inf/NaN exactly where the oracle has them (nowhere, here). GPU tier (marked gpu): the kernels
against the xla path and the oracle, on rows long enough to be split.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_flashmla
from mla_cases import D, DV, OUT_TOL, PAGE, check_close, check_decode, make_case, oracle

SCALE = D**-0.5  # 1/24: a score of T needs q·k = 24·T


def key_slots(case, i, positions):
  """(page, slot) of key positions of row i."""
  positions = np.asarray(positions)
  return case.block_table[i, positions // PAGE], positions % PAGE


def set_keys(case, i, positions, rows):
  """k_cache rows (all KV heads) of key positions of row i."""
  pages, slots = key_slots(case, i, positions)
  case.k_cache[pages, slots] = np.asarray(rows, np.float32).astype(case.k_cache.dtype)


def base_case(rng, b, s_q, n, h_q, h_kv, causal):
  return make_case(rng, b, s_q, n, h_q, h_kv, varlen=False, causal=causal, softmax_scale=SCALE)


def large_magnitude_case(rng, b, s_q, n, h_q, h_kv, causal, target):
  """q = c·u (c in [-1, 1] per row/token/head, 1 for head 0), k_t = β(ρ_t·u + 0.3·noise) with
  ρ_t uniform in [-1, 1] and β = target/24: scores ≈ target·c·ρ_t, up to about ±target."""
  case = base_case(rng, b, s_q, n, h_q, h_kv, causal)
  u = rng.choice([-1.0, 1.0], size=D)
  c = rng.uniform(-1, 1, size=(b, s_q, h_q, 1))
  c[:, :, 0] = 1.0
  case.q = (c * u).astype(case.q.dtype)
  beta = target / (D * SCALE)
  for i in range(b):
    rho = rng.uniform(-1, 1, size=(n, 1, 1))
    rows = beta * (rho * u + 0.3 * rng.standard_normal((n, h_kv, D)))
    set_keys(case, i, np.arange(n), rows)
  return case


def equal_scores_case(rng, b, s_q, n, h_q, h_kv, causal, kind, target=80.0):
  case = base_case(rng, b, s_q, n, h_q, h_kv, causal)
  if kind == "zero_q":  # every score exactly 0
    case.q = np.zeros_like(case.q)
  else:  # every key of a row the same row: every score the same (large) value
    u = rng.choice([-1.0, 1.0], size=D)
    case.q = np.broadcast_to(u, case.q.shape).astype(case.q.dtype)
    for i in range(b):
      row = target / (D * SCALE) * u + np.zeros((h_kv, D))
      set_keys(case, i, np.arange(n), np.broadcast_to(row, (n, h_kv, D)))
  return case


def dominating_key_case(rng, b, s_q, n, h_q, h_kv, causal, position, target=80.0):
  """q = u for every head; keys ~ N(0, 0.1²) (scores ~ N(0, 0.1²)) except one key
  target/24·u + noise at `position` (negative: counted from the end; n: just past the
  length, in the slot that holds NaN otherwise), scoring about `target`."""
  case = base_case(rng, b, s_q, n, h_q, h_kv, causal)
  u = rng.choice([-1.0, 1.0], size=D)
  case.q = np.broadcast_to(u, case.q.shape).astype(case.q.dtype)
  pos = position % n if position < n else position
  for i in range(b):
    row = target / (D * SCALE) * u + 0.1 * rng.standard_normal((h_kv, D))
    set_keys(case, i, [pos], row[None])
  return case


def scores_range(case):
  """(min, max) of q·k·scale over the keys each row reads, in float64."""
  q = case.q.astype(np.float64)
  lo, hi = np.inf, -np.inf
  for i in range(q.shape[0]):
    pages, slots = key_slots(case, i, np.arange(case.cache_seqlens[i]))
    k = case.k_cache[pages, slots].astype(np.float64)  # [n, h_kv, D]
    g = q.shape[2] // k.shape[1]
    s = np.einsum("shd,nhd->shn", q[i], np.repeat(k, g, axis=1)) * case.softmax_scale
    lo, hi = min(lo, s.min()), max(hi, s.max())
  return lo, hi


def run(case, implementation, **kw):
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
      *a, softmax_scale=case.softmax_scale, causal=case.causal, implementation=implementation,
      **kw))
  out, lse = fn(*case.args())
  return np.asarray(out, np.float32), np.asarray(lse)


def check_against_oracle(case, out, lse):
  want_out, want_lse = oracle(case)
  assert np.isfinite(want_out).all() and np.isfinite(want_lse).all(), "the oracle: not finite"
  assert np.isfinite(out).all(), f"out: {np.count_nonzero(~np.isfinite(out))} inf/NaN values"
  assert np.isfinite(lse).all(), f"lse: inf/NaN at {np.argwhere(~np.isfinite(lse))[:5].tolist()}"
  check_decode(out, lse, want_out, want_lse)
  return want_out, want_lse


# ------------------------------------------------------------------------------------------------
# CPU tier: the xla path against the float64 oracle
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [20.0, 80.0, 120.0])
@pytest.mark.parametrize("s_q,causal,h_q,h_kv", [(1, False, 8, 1), (2, True, 6, 2)])
def test_large_magnitudes(target, s_q, causal, h_q, h_kv):
  rng = np.random.default_rng(int(target) * 10 + s_q)
  case = large_magnitude_case(rng, 3, s_q, 150, h_q, h_kv, causal, target)
  lo, hi = scores_range(case)
  assert 0.8 * target < hi < 1.3 * target and -1.3 * target < lo < -0.8 * target
  out, lse = run(case, "xla")
  _, want_lse = check_against_oracle(case, out, lse)
  assert want_lse[:, 0].max() > 0.8 * target  # head 0 has the top score: lse is about it


@pytest.mark.parametrize("n", [1, 64, 200])
def test_all_scores_zero(n):
  case = equal_scores_case(np.random.default_rng(n), 2, 2, n, 4, 1, False, "zero_q")
  out, lse = run(case, "xla")
  check_against_oracle(case, out, lse)
  np.testing.assert_allclose(lse, np.log(n), rtol=8.01 / 65536, atol=1e-6)
  for i in range(2):  # out is the mean of the row's V
    pages, slots = key_slots(case, i, np.arange(n))
    mean_v = case.k_cache[pages, slots, 0, :DV].astype(np.float64).mean(axis=0)
    check_close("out", out[i], np.broadcast_to(mean_v, out[i].shape), **OUT_TOL)


@pytest.mark.parametrize("target", [80.0, -120.0])
@pytest.mark.parametrize("n,causal", [(1, False), (65, False), (200, False), (2, True),
                                      (65, True), (200, True)])
def test_all_scores_equal_and_large(n, causal, target):
  case = equal_scores_case(np.random.default_rng(n + causal), 2, 2, n, 4, 1, causal,
                           "same_key", target)
  lo, hi = scores_range(case)
  assert hi - lo < 1e-9 and abs(lo - target) < 0.1 * abs(target)
  out, lse = run(case, "xla")
  check_against_oracle(case, out, lse)
  visible = n - (1 - np.arange(2)) * causal  # keys seen by tokens 0 and 1
  np.testing.assert_allclose(lse, np.broadcast_to(lo + np.log(visible), lse.shape),
                             rtol=8.01 / 65536, atol=1e-6)
  v = case.k_cache[case.block_table[0, 0], 0, 0, :DV].astype(np.float32)
  np.testing.assert_array_equal(out[0], np.broadcast_to(v, out[0].shape))


@pytest.mark.parametrize("position", [0, 63, 64, -1])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_one_dominating_key(position, s_q, causal):
  n = 130
  case = dominating_key_case(np.random.default_rng(position % 7 + s_q), 2, s_q, n, 4, 1, causal,
                             position)
  out, lse = run(case, "xla")
  check_against_oracle(case, out, lse)
  hidden = causal and position == -1  # the last key is hidden from token 0
  seen_by_all = lse[:, :, -1]
  assert np.all(seen_by_all > 75)
  if hidden:
    assert np.all(lse[:, :, 0] < 10)
  else:
    assert np.all(lse > 75)


def test_dominating_key_past_the_length_is_ignored():
  case = dominating_key_case(np.random.default_rng(5), 2, 2, 130, 4, 1, True, position=130)
  out, lse = run(case, "xla")
  check_against_oracle(case, out, lse)
  assert np.all(lse < 10)  # nothing scores 80 among the 130 keys


# ------------------------------------------------------------------------------------------------
# GPU tier: the kernels against the xla path and the oracle, on rows long enough to be split
# ------------------------------------------------------------------------------------------------

def check_kernel(case, num_sms=None):
  out, lse = run(case, "cuda", num_sms=num_sms)
  ref_out, ref_lse = run(case, "xla")
  assert np.isfinite(out).all() and np.isfinite(lse).all()
  check_decode(out, lse, ref_out, ref_lse)
  check_against_oracle(case, out, lse)


@pytest.mark.gpu
@pytest.mark.parametrize("num_sms", [None, 1, 1000])
@pytest.mark.parametrize("target", [20.0, 80.0, 120.0])
@pytest.mark.parametrize("s_q,causal,h_q,h_kv", [(1, False, 16, 1), (2, True, 128, 1),
                                                 (2, False, 64, 2)])
def test_kernel_large_magnitudes(num_sms, target, s_q, causal, h_q, h_kv):
  rng = np.random.default_rng(int(target) + s_q * 100 + h_q)
  check_kernel(large_magnitude_case(rng, 4, s_q, 1500, h_q, h_kv, causal, target), num_sms)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,target", [("zero_q", 0.0), ("same_key", 80.0),
                                         ("same_key", -120.0)])
@pytest.mark.parametrize("n", [2, 64, 2000])
@pytest.mark.parametrize("num_sms", [None, 1000])
def test_kernel_equal_scores(kind, target, n, num_sms):
  case = equal_scores_case(np.random.default_rng(n), 3, 2, n, 64, 1, True, kind, target)
  check_kernel(case, num_sms)


@pytest.mark.gpu
@pytest.mark.parametrize("position", [0, 63, 64, 1000, -1, "past"])
@pytest.mark.parametrize("num_sms", [None, 1000])
def test_kernel_one_dominating_key(position, num_sms):
  n = 1500
  case = dominating_key_case(np.random.default_rng(7), 3, 2, n, 64, 1, True,
                             n if position == "past" else position)
  check_kernel(case, num_sms)
