"""Values no trace can see: their defined behaviour, and the opt-in check that reports them.

Behaviour (README, reference.py, params.h): a length above `max_blocks * 64` is clamped to it, a
negative length is 0, a page id outside `[0, num_blocks)` (or its pool) is masked, and the other
rows of the batch are untouched. `validate_decode_inputs` / `check_decode_values` report each
such value with its row, column and value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jax_flashmla
from mla_cases import INVALID_PAGE, check_decode, make_case, oracle

INT32_MAX = 2**31 - 1


@pytest.fixture
def case():
  # 4 rows of 130 tokens: 3 pages each, block table [4, 3], capacity 192.
  return make_case(np.random.default_rng(21), b=4, s_q=2, mean_len=130, h_q=4, h_kv=1,
                   varlen=False, causal=True)


def decode(case, **kw):
  out, lse = jax_flashmla.flash_mla_with_kvcache(*case.args(), causal=case.causal,
                                                 implementation="xla", **kw)
  return np.asarray(out, np.float32), np.asarray(lse)


# ------------------------------------------------------------------------------------------------
# Defined behaviour
# ------------------------------------------------------------------------------------------------

def test_length_above_capacity_is_clamped(case):
  case.cache_seqlens[1] = case.block_table.shape[1] * 64
  last_page = case.block_table[1, 2]  # its NaN-poisoned slots 2..63 become keys: fill them
  case.k_cache[last_page] = np.random.default_rng(0).standard_normal(
      case.k_cache[last_page].shape).astype(case.k_cache.dtype) / 10
  want = decode(case)
  for too_long in (193, 1000, INT32_MAX):
    case.cache_seqlens[1] = too_long
    got = decode(case)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  check_decode(*got, *oracle(case))


@pytest.mark.parametrize("negative", [-1, -64, -INT32_MAX - 1])
def test_negative_length_is_empty(case, negative):
  case.cache_seqlens[2] = negative
  out, lse = decode(case)
  assert np.all(out[2] == 0) and np.all(np.isposinf(lse[2]))
  check_decode(out, lse, *oracle(case))


@pytest.mark.parametrize("bad_id", [-1, "num_blocks", INT32_MAX, -INT32_MAX - 1])
@pytest.mark.parametrize("column", [0, 2])
def test_page_outside_the_cache_is_masked(case, bad_id, column):
  num_blocks = case.k_cache.shape[0]
  case.block_table[3, column] = num_blocks if bad_id == "num_blocks" else bad_id
  out, lse = decode(case)
  check_decode(out, lse, *oracle(case))  # the oracle masks the 64 keys of that page
  assert np.all(np.isfinite(lse[3]))


def test_other_rows_are_untouched(case):
  """Every hostile value at once, in rows 1-3: row 0 is bit for bit what it was."""
  clean_out, clean_lse = decode(case)
  case.cache_seqlens[1] = INT32_MAX
  case.cache_seqlens[2] = -5
  case.block_table[3, :] = [-1, case.k_cache.shape[0], INT32_MAX]
  out, lse = decode(case)
  np.testing.assert_array_equal(out[0], clean_out[0])
  np.testing.assert_array_equal(lse[0], clean_lse[0])
  check_decode(out[[0, 2, 3]], lse[[0, 2, 3]], *[x[[0, 2, 3]] for x in oracle(case)])
  assert np.all(np.isposinf(lse[3]))  # every page of row 3 masked: nothing to attend


# ------------------------------------------------------------------------------------------------
# validate_decode_inputs (eager)
# ------------------------------------------------------------------------------------------------

def validate(case, metadata=None, **kw):
  _, k, bt, lens = case.args()
  jax_flashmla.validate_decode_inputs(k, bt, lens, metadata, **kw)


def test_valid_inputs_pass(case):
  validate(case)
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens), 8, 1, num_sms=6)
  validate(case, md)
  validate(case, (md.tile_scheduler_metadata, md.num_splits))


def test_entries_past_the_used_pages_are_not_checked():
  case = make_case(np.random.default_rng(3), b=3, s_q=1, mean_len=100, h_q=2, h_kv=1)
  assert (case.block_table == INVALID_PAGE).any()  # varlen rows leave unused columns
  case.cache_seqlens[0] = 0
  case.block_table[0, :] = -1  # an empty row uses no page
  validate(case)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.cache_seqlens.__setitem__(2, -3),
     r"cache_seqlens\[2\]: expected a length >= 0, got -3"),
    (lambda c: c.cache_seqlens.__setitem__(1, 193),
     r"cache_seqlens\[1\]: expected a length <= 192 \(the block table's 3 pages of 64\), got 193"),
    (lambda c: c.cache_seqlens.__setitem__(0, INT32_MAX),
     rf"cache_seqlens\[0\]: expected a length <= 192 .*got {INT32_MAX}"),
    (lambda c: c.block_table.__setitem__((3, 1), -1),
     (r"block_table\[3, 1\]: expected a page id in \[0, 15\) \(a page the row's length 130 "
      r"uses\), got -1")),
    (lambda c: c.block_table.__setitem__((2, 2), 15),
     r"block_table\[2, 2\]: expected a page id in \[0, 15\) .*got 15"),
    (lambda c: c.block_table.__setitem__((0, 0), INT32_MAX),
     rf"block_table\[0, 0\]: expected a page id in \[0, 15\) .*got {INT32_MAX}"),
], ids=["negative_length", "length_past_capacity", "length_int32_max", "page_minus_1",
        "page_num_blocks", "page_int32_max"])
def test_bad_value_is_reported(case, edit, message):
  assert case.k_cache.shape[0] == 15 and case.block_table.shape == (4, 3)
  edit(case)
  with pytest.raises(ValueError, match=message):
    validate(case)


def test_the_first_offending_row_is_reported(case):
  case.block_table[2, 0] = -1
  case.block_table[1, 2] = -7
  case.block_table[3, 0] = 99
  with pytest.raises(ValueError, match=r"block_table\[1, 2\]: .*got -7"):
    validate(case)
  case.cache_seqlens[3] = -1  # lengths are checked before pages
  with pytest.raises(ValueError, match=r"cache_seqlens\[3\]"):
    validate(case)


def test_a_page_past_a_shorter_length_is_not_reported(case):
  case.block_table[1, 2] = -1
  case.cache_seqlens[1] = 128  # two pages: column 2 is not used
  validate(case)
  case.cache_seqlens[1] = 129
  with pytest.raises(ValueError, match=r"block_table\[1, 2\].*length 129"):
    validate(case)


def test_pool_local_ids(case):
  case.k_cache = np.concatenate([case.k_cache, case.k_cache[:1]])  # 16 pages: 2 pools of 8
  case.block_table[:] = np.arange(12).reshape(4, 3) % 8
  validate(case, num_pools=2)
  case.block_table[2, 1] = 8  # valid in the whole cache, not in a pool of 8
  with pytest.raises(ValueError, match=r"block_table\[2, 1\]: expected a pool-local page id in "
                                       r"\[0, 8\) .*got 8"):
    validate(case, num_pools=2)


def test_pools_must_divide_the_batch_and_the_pages(case):
  with pytest.raises(ValueError, match=r"num_pools: expected a divisor of both the batch \(4, "
                                       r"from block_table\) and the pages \(15, num_blocks\).* "
                                       r"got num_pools=2"):
    validate(case, num_pools=2)  # 15 pages


def test_stale_metadata_is_reported(case):
  """Records computed before the step's lengths grew (the kernels would drop the new page)."""
  old = jnp.asarray(case.cache_seqlens - 10)  # 120: two pages, the lengths now need three
  md = jax_flashmla.get_mla_metadata(old, 8, 1, num_sms=6)
  with pytest.raises(ValueError, match=r"metadata: expected records computed for these "
                                       r"cache_seqlens, got tile_scheduler_metadata\[\d\] "
                                       r"\(requests \d to \d\) with the length fingerprint "
                                       r"-?\d+ where these lengths give -?\d+: the decode "
                                       r"returns NaN rows for its requests, starting at 0"):
    validate(case, md)


def test_permuted_lengths_are_reported(case):
  """The same lengths in another order: the same pages per part, but not the same rows."""
  case.cache_seqlens[:] = [130, 70, 10, 190]
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens[::-1].copy()), 8, 1,
                                     num_sms=6)
  with pytest.raises(ValueError, match=r"length fingerprint .* NaN rows"):
    validate(case, md)


def test_a_wrong_num_splits_is_reported(case):
  """num_splits carries no fingerprint (the decode does not check it); the eager check
  compares it with the schedule."""
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens), 8, 1, num_sms=6)
  with pytest.raises(ValueError, match=r"got num_splits\[1\] = 7 instead of"):
    validate(case, (md.tile_scheduler_metadata, md.num_splits.at[1].set(7)))


def test_hand_made_records_are_reported(case):
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens), 8, 1, num_sms=6)
  sched = md.tile_scheduler_metadata.at[0, 0].set(-1)  # a negative request index
  with pytest.raises(ValueError, match=r"tile_scheduler_metadata\[0\] = \[ *-1 "):
    validate(case, (sched, md.num_splits))


def test_validate_refuses_traced_values(case):
  _, k, bt, lens = case.args()
  with pytest.raises(TypeError, match="block_table: expected a concrete array .* got a traced "
                                      "value"):
    jax.jit(lambda bt: jax_flashmla.validate_decode_inputs(k, bt, lens))(bt)


def test_validate_checks_shapes_first(case):
  _, k, bt, lens = case.args()
  with pytest.raises(ValueError, match=r"cache_seqlens: expected shape \(4,\)"):
    jax_flashmla.validate_decode_inputs(k, bt, lens[:3])
  with pytest.raises(TypeError, match="block_table: expected dtype int32, got float32"):
    jax_flashmla.validate_decode_inputs(k, bt.astype(jnp.float32), lens)


# ------------------------------------------------------------------------------------------------
# check_decode_values under checkify, in the decode step
# ------------------------------------------------------------------------------------------------

def step(q, k, bt, lens, md):
  jax_flashmla.check_decode_values(bt, lens, k.shape[0], metadata=md)
  return jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, metadata=md, causal=True,
                                             implementation="xla")


@pytest.mark.parametrize("order", ["checkify_of_jit", "jit_of_checkify"])
def test_checkify_in_a_jitted_step(case, order):
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens), 8, 1, num_sms=6)
  fn = (checkify.checkify(jax.jit(step)) if order == "checkify_of_jit"
        else jax.jit(checkify.checkify(step)))
  err, (out, lse) = fn(*case.args(), md)
  assert err.get() is None
  check_decode(out, lse, *oracle(case))

  case.block_table[1, 0] = -1
  err, (out, lse) = fn(*case.args(), md)
  assert "block_table[1, 0]: expected a page id in [0, 15)" in err.get()
  with pytest.raises(checkify.JaxRuntimeError, match=r"block_table\[1, 0\]"):
    err.throw()
  check_decode(out, lse, *oracle(case))  # the decode still ran, with the page masked


def test_eager_check_raises_at_once(case):
  case.cache_seqlens[0] = -2
  _, k, bt, lens = case.args()
  with pytest.raises(checkify.JaxRuntimeError, match=r"cache_seqlens\[0\]"):
    jax_flashmla.check_decode_values(bt, lens, k.shape[0])
