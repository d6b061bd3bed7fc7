"""The split-KV scheduler: every page of every request is covered exactly once, splits are
numbered as num_splits says, and the work is balanced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.metadata import as_metadata, local_num_sms
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


def test_metadata_carries_its_sm_count_as_static_data():
  """num_sms is pytree aux data: kept by jit, vmap and tree_map, never a traced value."""
  lens = jnp.asarray([5, 300, 0], jnp.int32)
  md = jax.jit(lambda s: jax_flashmla.get_mla_metadata(s, 16, 1, num_sms=7))(lens)
  assert md.num_sms == 7 and type(md.num_sms) is int
  assert jax.tree.map(lambda x: x + 1, md).num_sms == 7
  batched = jax.vmap(lambda s: jax_flashmla.get_mla_metadata(s, 16, 1, num_sms=7))(
      jnp.stack([lens, lens]))
  assert batched.num_sms == 7 and batched.num_splits.shape == (2, 4)
  seen = []
  jax.jit(lambda m: seen.append(m.num_sms) or m.num_splits)(md)
  assert seen == [7]
  leaves, treedef = jax.tree.flatten(md)
  assert len(leaves) == 2 and jax.tree.unflatten(treedef, leaves).num_sms == 7
  assert jax.tree.structure(md) != jax.tree.structure(
      jax_flashmla.MLAMetadata(md.tile_scheduler_metadata, md.num_splits, 8))


def _decode_num_sms(metadata, **kw):
  """The num_sms the decode primitive is bound with (2 row blocks of 64: 128 query rows)."""
  args = (jnp.zeros((3, 1, 128, 576), jnp.bfloat16), jnp.zeros((6, 64, 1, 576), jnp.bfloat16),
          jnp.zeros((3, 2), jnp.int32), jnp.zeros((3,), jnp.int32))
  jaxpr = jax.make_jaxpr(lambda *a: jax_flashmla.flash_mla_with_kvcache(
      *a, metadata=metadata, **kw))(*args)
  [eqn] = [e for e in jaxpr.eqns if e.primitive.name == "jax_flashmla_mla_decode"]
  return eqn.params["num_sms"]


def test_decode_schedules_shards_for_the_metadatas_sm_count():
  # 7 SMs, 2 row blocks -> 3 parts, which alone would suggest 6 SMs.
  md = jax_flashmla.get_mla_metadata(jnp.zeros((3,), jnp.int32), 128, 1, num_sms=7)
  assert md.num_sm_parts == 3 and md.num_sms == 7
  assert _decode_num_sms(md) == 7
  assert _decode_num_sms(md, num_sms=5) == 5  # the call's own count wins
  pair = (md.tile_scheduler_metadata, md.num_splits)
  assert _decode_num_sms(pair, num_sms=7) == 7
  assert _decode_num_sms(pair) == local_num_sms()  # a pair does not say: the local count


def test_as_metadata():
  md = jax_flashmla.get_mla_metadata(jnp.zeros((2,), jnp.int32), 16, 1, num_sms=7)
  pair = (md.tile_scheduler_metadata, md.num_splits)
  assert as_metadata(md) is md and as_metadata(md, num_sms=9) is md
  assert as_metadata(None) is None
  got = as_metadata(pair, num_sms=7)
  assert (got.tile_scheduler_metadata, got.num_splits, got.num_sms) == (*pair, 7)
  assert as_metadata(pair).num_sms == local_num_sms()
  with pytest.raises(TypeError, match=r"^metadata: expected MLAMetadata, a \(tile_scheduler_"
                                      r"metadata, num_splits\) pair or None, got tuple of "
                                      r"length 1$"):
    as_metadata((md.num_splits,))
  with pytest.raises(TypeError, match=r"^num_sms: expected a static int >= 1, got float 7.0$"):
    as_metadata(pair, num_sms=7.0)
  with pytest.raises(TypeError, match=r"^metadata.num_sms: expected a static int >= 1, got "
                                      r"NoneType None$"):
    as_metadata(jax_flashmla.MLAMetadata(*pair, num_sms=None))
