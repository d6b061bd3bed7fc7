"""Opt-in checks of the values no trace can see: lengths, page ids and scheduler records.

The decode never faults on such values and never lets them leak into other rows (the rules in
`reference.py` and `src/kernels/params.h`): a length above the block table's capacity is clamped
to it, a negative length counts as 0, a page id outside `[0, num_blocks)` is masked. Those rules
keep a server alive, but such a value is nearly always a bug upstream (a page never assigned, a
length advanced twice), and clamping hides it. These checks report it instead:

    # in a jitted step, with checkify
    def step(q, cache, md):
      check_decode_values(cache.block_table, cache.lengths, cache.pages.shape[0], metadata=md)
      return mla_decode(q, cache, metadata=md)
    err, (out, lse) = jax.jit(checkify.checkify(step))(q, cache, md)
    err.throw()

    # or eagerly, between steps (one small compiled program, cached)
    validate_decode_inputs(cache.pages, cache.block_table, cache.lengths, metadata=md)

Each check reports the first offending row (and column) with its value. Checks run in this
order, and checkify reports the first that fails: negative lengths, lengths above capacity,
page ids (only the pages a row's length uses; entries past them may hold anything), then the
metadata: first the length fingerprint of each record (`reference.stale_requests`, the check
every decode path applies: a mismatch there makes the decode return NaN rows), then that the
records are exactly what `get_mla_metadata` computes for these lengths (which also catches
hand-made records and a wrong `num_splits`, which the decode does not check).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jax_flashmla import shapes
from jax_flashmla.metadata import MetadataLike, as_metadata
from jax_flashmla.constants import PAGE_SIZE
from jax_flashmla.reference import (length_fingerprints, mla_metadata_reference,
                                    stale_requests)

__all__ = ["check_decode_values", "validate_decode_inputs"]


def _first(mask: jax.Array) -> jax.Array:
  """Flat index of the first True of `mask` (0 if none)."""
  return jnp.argmax(mask.reshape(-1)).astype(jnp.int32)


def check_decode_values(block_table: jax.Array, cache_seqlens: jax.Array, num_blocks: int, *,
                        metadata: MetadataLike = None,
                        num_pools: int = 1) -> None:
  """Checks the run-time values of a decode call with `jax.experimental.checkify.check`.

  Functionalize it with `checkify.checkify` (around or inside `jax.jit`); called eagerly it
  raises at once. Shapes and dtypes are checked at trace time, as the decode checks them.

  Args:
    block_table: `[b, max_blocks]` int32 page ids, as passed to the decode.
    cache_seqlens: `[b]` int32 lengths.
    num_blocks: static int, pages in `k_cache` (`k_cache.shape[0]`).
    metadata: optional `MLAMetadata` (or pair) the decode will be given: checked to be the
      schedule of `cache_seqlens` (same number of parts).
    num_pools: as for `flash_mla_with_kvcache`: with n > 1, row group j's ids index pool j of
      `num_blocks / n` pages.

  Reports (first offending row/column and value):
    - `cache_seqlens[i]` below 0;
    - `cache_seqlens[i]` above `max_blocks * 64`;
    - `block_table[i, j]` outside `[0, num_blocks / num_pools)` for a page `j` that row `i`'s
      length uses (`j < ceil(len / 64)`);
    - a record of `metadata` whose length fingerprint does not match `cache_seqlens` (the
      decode would return NaN rows for its requests);
    - `metadata` differing from `get_mla_metadata(cache_seqlens, ...)` with as many parts.
  """
  for name, x in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
    shapes._expect_array(name, x)
  shapes._expect_rank("block_table", block_table, 2, "[b, max_blocks]")
  shapes._expect_rank("cache_seqlens", cache_seqlens, 1, "[b]")
  shapes._expect_dtype("block_table", block_table, (jnp.int32,))
  shapes._expect_dtype("cache_seqlens", cache_seqlens, (jnp.int32,))
  b, max_blocks = block_table.shape
  if cache_seqlens.shape != (b,):
    raise ValueError(f"cache_seqlens: expected shape ({b},) (batch of block_table), got "
                     f"{tuple(cache_seqlens.shape)}")
  num_blocks = shapes.check_static_int("num_blocks", num_blocks)
  num_pools = shapes.check_num_pools(num_pools, b, num_blocks, batch_from="from block_table",
                                     pages_from="num_blocks")
  metadata = as_metadata(metadata)
  if metadata is not None:
    shapes.check_scheduler_records(metadata.tile_scheduler_metadata, metadata.num_splits, b)

  capacity = max_blocks * PAGE_SIZE
  lens = cache_seqlens
  negative = lens < 0
  i = _first(negative)
  checkify.check(~negative.any(), "cache_seqlens[{i}]: expected a length >= 0, got {v}",
                 i=i, v=lens[i])
  too_long = lens > capacity
  i = _first(too_long)
  checkify.check(~too_long.any(),
                 f"cache_seqlens[{{i}}]: expected a length <= {capacity} (the block table's "
                 f"{max_blocks} pages of {PAGE_SIZE}), got {{v}}", i=i, v=lens[i])

  pool = num_blocks // num_pools
  eff = jnp.clip(lens, 0, capacity)
  used = jnp.arange(max_blocks)[None, :] < ((eff + PAGE_SIZE - 1) // PAGE_SIZE)[:, None]
  bad_page = used & ((block_table < 0) | (block_table >= pool))
  flat = _first(bad_page)
  row, col = flat // max_blocks, flat % max_blocks
  what = "page id" if num_pools == 1 else "pool-local page id"
  checkify.check(~bad_page.any(),
                 f"block_table[{{row}}, {{col}}]: expected a {what} in [0, {pool}) (a page the "
                 f"row's length {{n}} uses), got {{v}}",
                 row=row, col=col, n=lens[row], v=block_table[row, col])

  if metadata is not None:
    got_sched = metadata.tile_scheduler_metadata
    stale = stale_requests(got_sched, lens)
    i = _first(stale)
    begin, end = got_sched[:, 0], got_sched[:, 2]
    p = _first((begin <= i) & (end >= i) & (begin >= 0) & (begin < b) &
               (length_fingerprints(lens, begin, end) != got_sched[:, 5]))
    checkify.check(~stale.any(),
                   "metadata: expected records computed for these cache_seqlens, got "
                   "tile_scheduler_metadata[{p}] (requests {r0} to {r1}) with the length "
                   "fingerprint {v} where these lengths give {w}: the decode returns NaN rows "
                   "for its requests, starting at {i} (records from another step's lengths?)",
                   p=p, r0=begin[p], r1=end[p], v=got_sched[p, 5],
                   w=length_fingerprints(lens, begin, end)[p], i=i)
    parts = got_sched.shape[0]
    want_sched, want_splits = mla_metadata_reference(lens, parts)
    got_splits = metadata.num_splits
    differs = got_splits != want_splits
    i = _first(differs)
    checkify.check(~differs.any(),
                   "metadata: expected the schedule get_mla_metadata computes for these "
                   "cache_seqlens, got num_splits[{i}] = {v} instead of {w} (records from "
                   "another step's lengths?)", i=i, v=got_splits[i], w=want_splits[i])
    got_sched = metadata.tile_scheduler_metadata
    differs = (got_sched != want_sched).any(axis=1)
    p = _first(differs)
    checkify.check(~differs.any(),
                   "metadata: expected the schedule get_mla_metadata computes for these "
                   "cache_seqlens, got tile_scheduler_metadata[{p}] = {v} instead of {w} "
                   "(records from another step's lengths?)", p=p, v=got_sched[p],
                   w=want_sched[p])


@functools.lru_cache(maxsize=64)
def _checked_fn(num_blocks: int, num_pools: int):
  def fn(block_table, cache_seqlens, metadata):
    check_decode_values(block_table, cache_seqlens, num_blocks, metadata=metadata,
                        num_pools=num_pools)
  return jax.jit(checkify.checkify(fn))


def validate_decode_inputs(k_cache: jax.Array, block_table: jax.Array, cache_seqlens: jax.Array,
                           metadata: MetadataLike = None, *,
                           num_pools: int = 1) -> None:
  """Runs `check_decode_values` now and raises a ValueError naming the first bad value.

  For concrete arrays, outside `jax.jit` (it waits for the result: a host sync). Inside a jitted
  step use `check_decode_values` under `checkify.checkify` instead.

  Args:
    k_cache: `[num_blocks, 64, h_kv, 576]` (only its shape is used).
    block_table, cache_seqlens, metadata, num_pools: as for `flash_mla_with_kvcache`.
  """
  shapes._expect_array("k_cache", k_cache)
  shapes._expect_rank("k_cache", k_cache, 4, "[num_blocks, 64, h_kv, 576]")
  for name, x in (("block_table", block_table), ("cache_seqlens", cache_seqlens),
                  *(() if metadata is None else (("metadata", x) for x in
                                                 jax.tree.leaves(metadata)))):
    if isinstance(x, jax.core.Tracer):
      raise TypeError(f"{name}: expected a concrete array (validate_decode_inputs runs outside "
                      f"jax.jit), got a traced value; inside jit use check_decode_values under "
                      f"jax.experimental.checkify.checkify")
  metadata = as_metadata(metadata)
  num_blocks = shapes.check_static_int("k_cache: num_blocks", k_cache.shape[0])
  err, _ = _checked_fn(num_blocks, shapes.check_static_int("num_pools", num_pools))(
      block_table, cache_seqlens, metadata)
  message = err.get()
  if message is not None:
    raise ValueError(message.replace(" (`check` failed)", "").strip())
