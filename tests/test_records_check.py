"""Scheduler records that do not belong to the call are loud on every platform.

Each record carries a fingerprint of the lengths of the requests it covers (`pad[0]` of
`SchedRecord`); a decode whose `cache_seqlens` give another fingerprint returns NaN `out` and
`lse` rows for that record's requests: the pure-JAX path here, the kernels in the GPU tier
(the same assertions). Records for other shapes raise while tracing (test_errors.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.reference import mla_metadata_reference, stale_requests
from mla_cases import check_decode, make_case, oracle

INT32_MAX = 2**31 - 1


def fingerprint(lens, begin, end) -> int:
  """The documented formula with Python ints: Σ (uint32(len_i) + 1)(2i + 1) mod 2**32, as int32."""
  total = sum(((int(lens[i]) % 2**32) + 1) * (2 * i + 1) for i in range(begin, end + 1)) % 2**32
  return total - 2**32 if total >= 2**31 else total


def expected_stale(records, lens) -> np.ndarray:
  """Requests covered by a record whose fingerprint the lengths do not reproduce."""
  b = len(lens)
  stale = np.zeros(b, bool)
  for begin, _, end, _, _, fp, *_ in np.asarray(records):
    if 0 <= begin < b and fingerprint(lens, begin, end) != fp:
      stale[begin: end + 1] = True
  return stale


@pytest.mark.parametrize("lens,parts", [
    ([100, 10, 0, 5000, -3], 4),
    ([INT32_MAX, -7, 0, INT32_MAX, 5], 8),   # wrapping arithmetic, raw (unclamped) lengths
    (list(range(0, 64 * 300, 64)), 7),
    ([1], 3),                               # parts without work
])
def test_records_carry_the_fingerprint_of_their_lengths(lens, parts):
  lens = np.asarray(lens, np.int32)
  records, _ = mla_metadata_reference(jnp.asarray(lens), parts)
  records = np.asarray(records)
  for begin, _, end, _, _, fp, pad1, pad2 in records:
    want = fingerprint(lens, begin, end) if begin < len(lens) else 0
    assert (fp, pad1, pad2) == (want, 0, 0), records
  assert not np.asarray(stale_requests(jnp.asarray(records), jnp.asarray(lens))).any()


@pytest.fixture
def case():
  # 4 rows of different lengths; 8 SMs and 16 rows per KV head give 8 parts.
  case = make_case(np.random.default_rng(30), b=4, s_q=2, mean_len=300, h_q=8, h_kv=1,
                   causal=True)
  assert len(set(case.cache_seqlens.tolist())) == 4, case.cache_seqlens
  return case


def decode(case, metadata, implementation=None):
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
      *a, metadata=metadata, causal=True, softmax_scale=case.softmax_scale,
      implementation=implementation))
  out, lse = fn(*case.args())
  return np.asarray(out, np.float32), np.asarray(lse)


def metadata_for(lens, implementation=None):
  return jax_flashmla.get_mla_metadata(jnp.asarray(lens, jnp.int32), 16, 1, num_sms=8,
                                       implementation=implementation)


def check_stale_rows(case, md, implementation=None):
  """NaN in exactly the rows of the records whose fingerprint fails; the rest is right."""
  out, lse = decode(case, md, implementation)
  stale = expected_stale(md.tile_scheduler_metadata, case.cache_seqlens)
  assert stale.any(), "the test needs records that do not match"
  assert np.isnan(out[stale]).all() and np.isnan(lse[stale]).all()
  assert not np.isnan(out[~stale]).any() and not np.isnan(lse[~stale]).any()
  want_out, want_lse = oracle(case)
  check_decode(out[~stale], lse[~stale], want_out[~stale], want_lse[~stale])
  return stale


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_records_of_permuted_lengths_give_nan_rows(case, implementation):
  """The issue's case: the lengths of a 4-row batch permuted (the same pages in all, so the
  split of work looks plausible), records computed before the permutation."""
  md = metadata_for(case.cache_seqlens[[3, 2, 1, 0]])
  stale = check_stale_rows(case, md, implementation)
  assert stale.all()  # every part's fingerprint changes here


def test_records_of_the_previous_step_give_nan_rows(case):
  """Records computed from the lengths before the step's tokens were written."""
  md = metadata_for(case.cache_seqlens - 2)
  check_stale_rows(case, md)


def test_only_the_records_that_changed_poison(case):
  """One row's length changed: the records that cover it poison their requests, the others
  are trusted."""
  lens = case.cache_seqlens.copy()
  lens[3] += 1
  md = metadata_for(lens)
  stale = check_stale_rows(case, md)
  assert stale[3] and not stale.all()


def test_records_of_these_lengths_are_not_poisoned(case):
  md = metadata_for(case.cache_seqlens)
  out, lse = decode(case, md)
  check_decode(out, lse, *oracle(case))
  out, lse = decode(case, (md.tile_scheduler_metadata, md.num_splits))  # a pair: the same
  check_decode(out, lse, *oracle(case))


def test_eager_and_vmapped_calls_check_too(case):
  md = metadata_for(case.cache_seqlens[[3, 2, 1, 0]])
  out, lse = jax_flashmla.flash_mla_with_kvcache(*case.args(), metadata=md, causal=True)
  assert np.isnan(np.asarray(lse)).all()
  # vmap over q alone keeps the records (more heads over the same cache): still checked.
  q = jnp.stack([case.args()[0]] * 2)
  out, lse = jax.vmap(lambda q: jax_flashmla.flash_mla_with_kvcache(
      q, *case.args()[1:], metadata=md, causal=True))(q)
  assert np.isnan(np.asarray(lse)).all()


# ------------------------------------------------------------------------------------------------
# GPU tier: the kernels apply the same rule (their scheduler writes the same fingerprints)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", ["cuda", "xla"])
def test_kernels_poison_the_same_rows(case, scheduler):
  md = metadata_for(case.cache_seqlens[[3, 2, 1, 0]], implementation=scheduler)
  stale = check_stale_rows(case, md, implementation="cuda")
  assert stale.all()
  lens = case.cache_seqlens.copy()
  lens[3] += 1
  md = metadata_for(lens, implementation=scheduler)
  kernel = decode(case, md, "cuda")
  reference = decode(case, md, "xla")
  for got, want in zip(kernel, reference):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  check_stale_rows(case, md, implementation="cuda")
