"""The split-KV scheduler: every page of every request is covered exactly once, splits are
numbered as num_splits says, and the work is balanced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.shapes import num_sm_parts_for

PAGE, FIXED = 64, 5


def chunks(records, b):
  """(part, request, first page, end page, split index) of every chunk, decoded from records."""
  out = []
  for p, (br, bb, er, eb, bs, *_) in enumerate(records):
    if br >= b:
      continue
    for r in range(br, er + 1):
      lo = bb if r == br else 0
      hi = eb if r == er else None
      out.append((p, r, lo, hi, bs if r == br else 0))
  return out


def check_schedule(lens, parts):
  lens = np.asarray(lens, np.int32)
  b = len(lens)
  md = jax_flashmla.get_mla_metadata(jnp.asarray(lens), 64, 1, num_sms=parts,
                                     implementation="xla")
  records = np.asarray(md.tile_scheduler_metadata)
  num_splits = np.asarray(md.num_splits)
  assert records.shape == (parts, 8) and num_splits.shape == (b + 1,)
  cost = np.minimum(np.maximum(-(-np.maximum(lens.astype(np.int64), 0) // PAGE), 1),
                    (2**31 - 1) // b - FIXED)
  seen = {r: [] for r in range(b)}
  for p, r, lo, hi, split in chunks(records, b):
    seen[r].append((lo, cost[r] if hi is None else hi, split, p))
  assert num_splits[0] == 0
  for r in range(b):
    pieces = seen[r]
    assert pieces, f"request {r} is in no part"
    assert [s for *_, s, _ in pieces] == list(range(len(pieces))), pieces
    assert num_splits[r + 1] - num_splits[r] == len(pieces)
    assert pieces[0][0] == 0 and pieces[-1][1] == cost[r]
    for (_, hi, _, p0), (lo, _, _, p1) in zip(pieces, pieces[1:]):
      assert hi == lo and p1 == p0 + 1, pieces
    assert all(lo < hi for lo, hi, *_ in pieces)
  assert num_splits[-1] <= b + parts
  return records, num_splits, cost


@pytest.mark.parametrize("parts", [1, 2, 7, 66, 132])
@pytest.mark.parametrize("b", [1, 3, 64, 128])
def test_schedule_covers_every_page_once(b, parts):
  rng = np.random.default_rng(b * 1000 + parts)
  lens = np.maximum(rng.normal(4096, 2048, size=b), 0).astype(np.int32)
  lens[rng.random(b) < 0.2] = 0
  check_schedule(lens, parts)


def test_schedule_balances_load():
  lens = np.full(128, 8192, np.int32)
  records, _, cost = check_schedule(lens, 132)
  per_part = np.zeros(132)
  for p, r, lo, hi, _ in chunks(records, 128):
    per_part[p] += (cost[r] if hi is None else hi) - lo + FIXED
  assert per_part.max() <= (cost + FIXED).sum() / 132 + FIXED + 1
  # The per-part slack (one overhead) can leave the last few parts idle, never many.
  assert np.count_nonzero(per_part) >= 0.9 * 132


def test_schedule_survives_hostile_lengths():
  check_schedule([2**31 - 1, -7, 0, 2**31 - 1, 5], 8)


def test_num_sm_parts_fill_the_gpu():
  assert num_sm_parts_for(132, 16, 1) == 132
  assert num_sm_parts_for(132, 128, 1) == 66
  assert num_sm_parts_for(132, 256, 1) == 33
  assert num_sm_parts_for(132, 64, 8) == 16
  assert num_sm_parts_for(4, 1024, 2) == 1


def test_metadata_is_a_pytree_usable_under_jit():
  lens = jnp.asarray([5, 300, 0], jnp.int32)

  @jax.jit
  def step(lens):
    return jax_flashmla.get_mla_metadata(lens, 16, 1, num_sms=8)

  md = step(lens)
  assert isinstance(md, jax_flashmla.MLAMetadata) and md.num_sm_parts == 8
  leaves = jax.tree_util.tree_leaves(md)
  assert [x.shape for x in leaves] == [(8, 8), (4,)]
