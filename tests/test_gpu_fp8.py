"""GPU tier, FP8 cache: the kernels reading DeepSeek-V3.2's 656-byte rows against the float64
oracle over the dequantized rows (mla_cases.fp8_case) and against the pure-JAX path.

The kernels dequantize exactly (docs/design.md, "The FP8 cache"), so FlashMLA's bf16 tolerances
apply unchanged. Unused slots hold garbage bytes (NaN codes and NaN scales past each length,
random bytes in pages no row uses), page tables are permuted, some rows are empty, and unused
block-table columns hold invalid ids.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from mla_cases import check_decode, fp8_case, make_case, oracle

pytestmark = pytest.mark.gpu


def _grid():
  rng = np.random.default_rng(2027)
  cases = []
  for (h_q, h_kv), s_q, causal in itertools.product(
      [(16, 1), (32, 1), (64, 1), (128, 1), (16, 2), (128, 8)], (1, 2), (False, True)):
    if causal and s_q == 1:
      continue
    b, mean_len = [(1, 20), (6, 140), (64, 700), (3, 4096)][rng.integers(4)]
    cases.append((b, s_q, mean_len, h_q, h_kv, causal))
  cases += [(2, 4, 300, 16, 1, True), (128, 1, 2000, 16, 1, False), (8, 2, 9000, 128, 1, True)]
  return cases


GRID = _grid()


def _run(case, k8, num_sms=None):
  def fn(q, k, bt, lens):
    kw = dict(softmax_scale=case.softmax_scale, causal=case.causal)
    return (jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, implementation="cuda",
                                                num_sms=num_sms, **kw),
            jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, implementation="xla", **kw))
  q, _, bt, lens = case.args()
  return jax.jit(fn)(q, jnp.asarray(k8), bt, lens)


@pytest.mark.parametrize("b,s_q,mean_len,h_q,h_kv,causal", GRID)
def test_fp8_kernels_match_the_oracle(b, s_q, mean_len, h_q, h_kv, causal):
  rng = np.random.default_rng(b * 7919 + s_q * 131 + h_q * 17 + h_kv + causal)
  case = make_case(rng, b, s_q, mean_len, h_q, h_kv, causal=causal, zero_rows=0.15)
  k8, deq_case = fp8_case(case, seed=b + h_q)
  (out, lse), (ref_out, ref_lse) = _run(case, k8)
  want_out, want_lse = oracle(deq_case)
  check_decode(out, lse, want_out, want_lse)
  check_decode(ref_out, ref_lse, want_out, want_lse)


@pytest.mark.parametrize("num_sms", [1, 7, 1000])
@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 16), (2, 64)])
def test_fp8_kernels_with_many_splits_and_hostile_ids(num_sms, s_q, h_q):
  """Splits across parts (1 part, odd counts, more parts than work), invalid block-table ids in
  the columns past each row's pages (make_case), a negative length."""
  rng = np.random.default_rng(num_sms + 10 * s_q + h_q)
  case = make_case(rng, 9, s_q, 500, h_q, 1, causal=s_q > 1, zero_rows=0.2)
  case.cache_seqlens[2] = -5  # an empty row
  k8, deq_case = fp8_case(case, seed=num_sms)
  (out, lse), _ = _run(case, k8, num_sms=num_sms)
  check_decode(out, lse, *oracle(deq_case))


def test_fp8_kernel_reads_float8_arrays_and_the_paged_cache():
  rng = np.random.default_rng(11)
  cache = jax_flashmla.PagedKVCache.create(batch_size=4, max_seq_len=1024, kv_format="fp8")
  rows = jnp.asarray(rng.standard_normal((4, 300, 1, 576)) / 10, jnp.bfloat16)
  cache = jax.jit(jax_flashmla.PagedKVCache.write, donate_argnums=0)(
      cache, rows, jnp.asarray([300, 0, 17, 64], jnp.int32))
  q = jnp.asarray(rng.standard_normal((4, 2, 16, 576)) / 10, jnp.bfloat16)
  got = jax_flashmla.mla_decode(q, cache, implementation="cuda")
  want = jax_flashmla.mla_decode(q, cache, implementation="xla")
  check_decode(got[0], got[1], np.asarray(want[0], np.float64), np.asarray(want[1], np.float64))
  f8 = jax.lax.bitcast_convert_type(cache.pages, jnp.float8_e4m3fn)
  again = jax_flashmla.flash_mla_with_kvcache(q, f8, cache.block_table, cache.lengths,
                                              causal=True, implementation="cuda")
  np.testing.assert_array_equal(np.asarray(again[0], np.float32), np.asarray(got[0], np.float32))
