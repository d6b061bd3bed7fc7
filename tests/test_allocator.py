"""PageAllocator: pages taken as sequences grow, freed and reused, a clear error when the pool is
exhausted, and a serving run where sequences of very different lengths share one pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.allocator import PageAllocator, PagePoolExhausted
from jax_flashmla.cache import NO_PAGE, PagedKVCache
from mla_cases import Case, check_decode, oracle


def _check_invariants(alloc: PageAllocator):
  held = [p for slot in range(alloc.batch_size) for p in alloc.pages(slot)]
  assert len(held) == len(set(held)), "a page is held twice"
  assert len(held) + alloc.num_free == alloc.num_blocks
  table = alloc.block_table
  for slot in range(alloc.batch_size):
    n = len(alloc.pages(slot))
    assert tuple(table[slot, :n]) == alloc.pages(slot)
    assert (table[slot, n:] == NO_PAGE).all()


def test_pages_are_taken_as_a_sequence_grows():
  alloc = PageAllocator(num_blocks=8, batch_size=2, max_blocks_per_seq=4)
  assert alloc.reserve(0, 10) == [0]
  assert alloc.reserve(0, 64) == []            # still fits in its first page
  assert alloc.reserve(1, 1) == [1]
  assert alloc.reserve(0, 65) == [2]           # the 65th token needs a second page
  assert alloc.pages(0) == (0, 2) and alloc.capacity(0) == 128
  assert alloc.reserve(0, 3) == []             # never shrinks
  assert (alloc.num_used, alloc.num_free) == (3, 5)
  _check_invariants(alloc)


def test_freed_pages_are_reused_first():
  alloc = PageAllocator(num_blocks=8, batch_size=3, max_blocks_per_seq=4)
  alloc.reserve(0, 200)
  alloc.reserve(1, 10)
  assert alloc.free(0) == [0, 1, 2, 3]
  assert (alloc.block_table[0] == NO_PAGE).all() and alloc.capacity(0) == 0
  assert alloc.reserve(2, 150) == [0, 1, 2]    # slot 0's pages, in the same order
  assert alloc.free(0) == []                   # freeing an empty slot is harmless
  _check_invariants(alloc)


def test_exhausted_pool_raises_a_clear_error_and_changes_nothing():
  alloc = PageAllocator(num_blocks=4, batch_size=3, max_blocks_per_seq=4)
  alloc.reserve(0, 130)                        # 3 pages
  table, free = alloc.block_table.copy(), alloc.num_free
  with pytest.raises(PagePoolExhausted,
                     match=r"page pool exhausted: 3 more pages needed .* only 1 of 4 pages are "
                           r"free") as info:
    alloc.reserve_many({1: 64, 2: 100})
  assert (info.value.needed, info.value.free) == (3, 1)
  np.testing.assert_array_equal(alloc.block_table, table)
  assert alloc.num_free == free
  alloc.free(0)
  alloc.reserve_many({1: 64, 2: 100})          # fits once slot 0 has finished
  _check_invariants(alloc)


def test_more_tokens_than_the_block_table_holds_is_an_argument_error():
  alloc = PageAllocator(num_blocks=100, batch_size=1, max_blocks_per_seq=2)
  with pytest.raises(ValueError, match=r"slot 0: 129 tokens need 3 pages, but the block table "
                                       r"holds 2 pages per sequence \(128 tokens\)"):
    alloc.reserve(0, 129)
  with pytest.raises(ValueError, match=r"slot: expected an int in \[0, 1\), got 1"):
    alloc.reserve(1, 1)


def test_device_block_table_is_sent_again_only_after_a_change():
  alloc = PageAllocator.for_cache(PagedKVCache.create(2, 128, num_blocks=4))
  first = alloc.device_block_table()
  assert alloc.device_block_table() is first
  alloc.reserve(0, 1)
  second = alloc.device_block_table()
  assert second is not first and int(second[0, 0]) == 0 and int(first[0, 0]) == NO_PAGE
  alloc.reserve(0, 2)                          # no new page: no new transfer
  assert alloc.device_block_table() is second


def test_donating_a_cache_that_holds_the_table():
  """The README's pattern: the table from the allocator inside a cache that a jitted write
  donates. Donation deletes the table's array; the next step gets a new one, whether the table
  changed or not."""
  cache = PagedKVCache.create(2, 256, num_blocks=8, dtype=jnp.float32)
  alloc = PageAllocator.for_cache(cache)
  write = jax.jit(PagedKVCache.write, donate_argnums=0)
  for step in range(5):
    if step != 2:                                # step 2 keeps the table: no reservation
      alloc.reserve_many([(step + 1) * 10, 20])
    table = alloc.device_block_table()
    assert not table.is_deleted()
    kv = jnp.full((2, 10, 1, 576), step, jnp.float32)
    num_new = jnp.asarray([10, 10 if step < 2 else 0], jnp.int32)
    cache = write(cache.replace(block_table=table), kv, num_new)
    assert table.is_deleted()                    # donated with the cache
  np.testing.assert_array_equal(cache.lengths, [50, 20])
  np.testing.assert_array_equal(cache.block_table, alloc.block_table)
  pages = np.asarray(cache.pages)
  for step in range(5):                          # row 0 got 10 rows of `step` per step
    pos = 10 * step + np.arange(10)
    np.testing.assert_array_equal(pages[alloc.block_table[0, pos // 64], pos % 64], step)


def test_page_size_is_the_kernels():
  with pytest.raises(ValueError, match=r"^page_size: expected 64 \(the kernels' page size\), "
                                       r"got 32$"):
    PageAllocator(num_blocks=4, batch_size=2, max_blocks_per_seq=2, page_size=32)
  cache = PagedKVCache.create(2, 64, num_blocks=4)
  cache = cache.replace(pages=cache.pages.reshape(8, 32, 1, 576))
  with pytest.raises(ValueError, match=r"^page_size: expected 64 .* got 32$"):
    PageAllocator.for_cache(cache)


def test_random_workload_keeps_the_pool_consistent():
  rng = np.random.default_rng(0)
  alloc = PageAllocator(num_blocks=40, batch_size=6, max_blocks_per_seq=20)
  lengths = np.zeros(6, int)
  exhausted = 0
  for _ in range(500):
    slot = int(rng.integers(6))
    if rng.random() < 0.1:
      alloc.free(slot)
      lengths[slot] = 0
    else:
      grow = int(rng.choice([1, 1, 1, 30, 200]))  # mostly decode, sometimes a long prompt
      try:
        alloc.reserve(slot, min(lengths[slot] + grow, 20 * 64))
        lengths[slot] = min(lengths[slot] + grow, 20 * 64)
      except PagePoolExhausted:
        exhausted += 1
    assert alloc.capacity(slot) >= lengths[slot]
    _check_invariants(alloc)
  assert exhausted > 0  # the pool was really contended


@pytest.mark.parametrize("implementation", [None, pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sequences_of_very_different_lengths_share_one_pool(implementation):
  """A long and a short sequence grow in one pool; the short one finishes, a new sequence takes
  its slot and its pages (stale rows still in them) and decodes exactly as the oracle says."""
  rng = np.random.default_rng(1)
  b, h_q = 3, 16
  cache = PagedKVCache.create(b, 64 * 8, num_blocks=9)
  cache = cache.replace(pages=jnp.full(cache.pages.shape, jnp.nan, jnp.bfloat16))
  alloc = PageAllocator.for_cache(cache)

  @jax.jit
  def step(cache, table, kv, num_new, restart):
    return cache.replace(block_table=table).reset(restart).write(kv, num_new)

  def grow(cache, targets, restart=(False,) * b):
    chunk = 64
    while True:
      n = np.minimum(chunk, np.maximum(targets - np.asarray(cache.lengths), 0)).astype(np.int32)
      if restart == (False,) * b and not n.any():
        return cache
      alloc.reserve_many({i: int(cache.lengths[i]) * (not restart[i]) + int(n[i])
                          for i in range(b)})
      kv = np.clip(rng.standard_normal((b, chunk, 1, 576)) / 10, -1, 1)
      cache = step(cache, alloc.device_block_table(), jnp.asarray(kv, jnp.bfloat16),
                   jnp.asarray(n), jnp.asarray(restart))
      restart = (False,) * b

  cache = grow(cache, np.array([400, 100, 0]))   # 7 + 2 pages: the pool is full
  assert alloc.num_free == 0
  short_pages = alloc.pages(1)
  with pytest.raises(PagePoolExhausted):
    alloc.reserve(2, 1)
  alloc.free(1)                                   # the short one finishes ...
  cache = grow(cache, np.array([400, 0, 90]), restart=(False, True, False))
  assert alloc.pages(2) == short_pages            # ... and the new one reuses its pages
  assert int(cache.lengths[1]) == 0

  q = jnp.asarray(np.clip(rng.standard_normal((b, 1, h_q, 576)) / 10, -1, 1), jnp.bfloat16)
  out, lse = jax_flashmla.mla_decode(q, cache, implementation=implementation)
  case = Case(np.asarray(q), np.asarray(cache.pages), np.asarray(cache.block_table),
              np.asarray(cache.lengths), causal=True, softmax_scale=576**-0.5)
  check_decode(out, lse, *oracle(case))
  assert np.isinf(np.asarray(lse)[1]).all()       # the finished slot attends to nothing
