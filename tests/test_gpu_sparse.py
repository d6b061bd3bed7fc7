"""GPU tier, token-sparse decode: the sm90 sparse kernel (src/kernels/sm90/decode/sparse/)
against the float64 oracle of tests/test_sparse.py and against the pure-JAX path.

Dimensions are FlashMLA's sparse-decode test grid (b 4 and 74, s_q 1 and 3, block sizes 2, 64,
69 and 576, topk 64 to 2048, h_q 64 and 128), plus the padded head blocks (h_q 16, 32). Indices
are hostile: invalid ones (-1, -7, INT32_MIN, INT32_MAX, num_tokens itself), duplicates,
topk_length out of range on both sides and 0, whole rows with no valid index; every slot no used
valid index names holds garbage (NaN codes, NaN scales), so a read of one shows up as NaN. With
b = 4 every request is split across parts (the combine and its sink); with b = 74 most are not
(the kernel's own epilogue and its sink).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.sparse import flash_mla_sparse_decode
from mla_cases import check_decode

import test_sparse as ts

pytestmark = pytest.mark.gpu


def _grid():
  rng = np.random.default_rng(22)
  cases = []
  for b, s_q, block_size, h_q in itertools.product((4, 74), (1, 3), (2, 64, 69, 576), (64, 128)):
    topk = int(rng.choice([64, 128, 512, 2048] if b == 4 else [64, 200, 512]))
    lengths = ["partial", "full", None][rng.integers(3)]
    sink = ["finite", "mixed", None][rng.integers(3)]
    cases.append((b, s_q, h_q, block_size, topk, lengths, sink))
  # Padded head blocks, odd topk (a short last block), a single block, an all-empty batch.
  cases += [(4, 3, 16, 64, 100, "partial", "mixed"), (74, 1, 32, 69, 64, "full", "finite"),
            (4, 1, 64, 2, 1, None, None), (4, 3, 128, 64, 2048, "zero", "mixed"),
            (1, 1, 128, 576, 2048, "full", None)]
  return cases


GRID = _grid()


def _num_blocks(block_size, topk):
  # Enough slots that half of them hold more than topk distinct rows, small enough to stay fast.
  return max(4, -(-4 * topk // block_size))


def _run(q, k8, idx, tl, snk):
  def fn(q, k, i, t, s):
    return (flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s, implementation="cuda"),
            flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s, implementation="xla"))
  return jax.jit(fn)(*ts._jnp(q, k8, idx, tl, snk))


@pytest.mark.parametrize("b,s_q,h_q,block_size,topk,lengths,sink", GRID)
def test_sparse_kernel_matches_the_oracle(b, s_q, h_q, block_size, topk, lengths, sink):
  rng = np.random.default_rng(b * 7919 + s_q * 131 + h_q * 17 + block_size + topk)
  q, k8, idx, tl, snk = ts.make_sparse(rng, b, s_q, h_q, block_size,
                                       _num_blocks(block_size, topk), topk, lengths=lengths,
                                       sink=sink, invalid=0.25, dup=0.3)
  if b > 1:  # one row with no valid index at all, whatever its length
    idx[1, 0] = -1
  (out, lse), (ref_out, ref_lse) = _run(q, k8, idx, tl, snk)
  want_out, want_lse = ts.sparse_oracle(q, k8, idx, tl, snk)
  check_decode(out, lse, want_out, want_lse)
  check_decode(ref_out, ref_lse, want_out, want_lse)


def test_special_rows_exactly_on_the_kernel():
  """Empty rows give out 0, lse +inf (also with a +inf sink); a +inf sink zeroes a live row and
  keeps its lse; a -inf sink changes nothing."""
  rng = np.random.default_rng(5)
  q, k8, idx, _, _ = ts.make_sparse(rng, 4, 2, 64, 64, 8, 128, invalid=0.0)
  idx[0] = -1
  tl = np.int32([128, 128, 0, -3])
  run = lambda s: flash_mla_sparse_decode(*ts._jnp(q, k8, idx), topk_length=jnp.asarray(tl),
                                          attn_sink=jnp.full((64,), s, jnp.float32),
                                          implementation="cuda")
  out, lse = run(-np.inf)
  o_inf, l_inf = run(np.inf)
  for o, l in ((out, lse), (o_inf, l_inf)):
    np.testing.assert_array_equal(np.asarray(o, np.float32)[[0, 2, 3]], 0.0)
    np.testing.assert_array_equal(np.asarray(l)[[0, 2, 3]], np.inf)
  np.testing.assert_array_equal(np.asarray(o_inf, np.float32), 0.0)
  np.testing.assert_array_equal(l_inf, lse)
  o_none, l_none = flash_mla_sparse_decode(*ts._jnp(q, k8, idx), topk_length=jnp.asarray(tl),
                                           implementation="cuda")
  np.testing.assert_array_equal(np.asarray(o_none, np.float32), np.asarray(out, np.float32))
  np.testing.assert_array_equal(l_none, lse)


def test_duplicates_count_each_time_on_the_kernel():
  rng = np.random.default_rng(6)
  # Only the slots make_sparse's own indices name hold data; the others are NaN-poisoned.
  q, k8, idx, _, _ = ts.make_sparse(rng, 1, 1, 64, 64, 4, 3, invalid=0.0)
  a, c = int(idx[0, 0, 0]), int(idx[0, 0, 1])
  twice = jnp.asarray([[[a, a, c]]], jnp.int32)
  out, lse = flash_mla_sparse_decode(*ts._jnp(q, k8), twice, implementation="cuda")
  check_decode(out, lse, *ts.sparse_oracle(q, k8, np.asarray(twice)))


@pytest.mark.parametrize("b,s_q,h_q,topk", [(4, 3, 128, 512), (74, 1, 64, 200)])
def test_kernel_with_metadata_equals_the_kernel_without(b, s_q, h_q, topk):
  """Records computed once by get_sparse_mla_metadata are the ones the call would schedule: the
  same kernel work, so the same bits."""
  rng = np.random.default_rng(b + s_q + h_q + topk)
  host = ts.make_sparse(rng, b, s_q, h_q, 64, _num_blocks(64, topk), topk, lengths="partial",
                        sink="finite")

  def fn(q, k, i, t, s):
    md = jax_flashmla.get_sparse_mla_metadata(t, s_q=s_q, h_q=h_q, topk=topk,
                                              implementation="cuda")
    return (flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s, metadata=md,
                                    implementation="cuda"),
            flash_mla_sparse_decode(q, k, i, topk_length=t, attn_sink=s, implementation="cuda"))

  with_md, without = jax.jit(fn)(*ts._jnp(*host))
  ts._same(with_md, without)
  check_decode(*with_md, *ts.sparse_oracle(*host))


def test_kernel_gives_nan_rows_for_records_of_other_lengths():
  """The kernel's fingerprint check, and the pure-JAX path's copy of it, poison the same rows."""
  b, s_q, h_q, topk = 8, 2, 64, 128
  rng = np.random.default_rng(31)
  q, k8, idx, tl, _ = ts._jnp(*ts.make_sparse(rng, b, s_q, h_q, 64, 8, topk, lengths="partial"))
  other = tl.at[3].set(jnp.where(jnp.clip(tl[3], 0, topk) == 5, 6, 5))
  md = jax_flashmla.get_sparse_mla_metadata(other, s_q=s_q, h_q=h_q, topk=topk, num_sms=8,
                                            implementation="cuda")
  run = lambda impl: flash_mla_sparse_decode(q, k8, idx, topk_length=tl, metadata=md,
                                             implementation=impl)
  (out, lse), (ref_out, ref_lse) = run("cuda"), run("xla")
  nan = np.isnan(np.asarray(out, np.float32)).all(axis=(2, 3))
  assert nan[3].all() and not nan.all()
  np.testing.assert_array_equal(nan, np.isnan(np.asarray(ref_out, np.float32)).all(axis=(2, 3)))
  np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
  check_decode(np.asarray(out, np.float32)[~nan], np.asarray(lse).transpose(0, 2, 1)[~nan],
               np.asarray(ref_out, np.float64)[~nan],
               np.asarray(ref_lse, np.float64).transpose(0, 2, 1)[~nan])
