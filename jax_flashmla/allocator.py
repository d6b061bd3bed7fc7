"""Page allocation for serving: one pool of cache pages shared by sequences of any length.

The allocator lives on the host and owns the block table; the device never decides which page a
token goes to. A serving loop, per step:

    allocator.reserve(slot, new_length)         # every sequence that grows this step
    table = allocator.device_block_table()      # transferred again only after it changed
    caches, tokens = step(caches, table, ...)   # jitted with the caches donated; inside it:
                                                #   cache.replace(block_table=table) per layer
    allocator.free(slot)                        # a sequence finished: its pages go back ...
                                                # ... and the step resets its device length
                                                #   (`cache.reset(rows)`) when the slot restarts

Pass the table into the jitted step rather than storing one array in every layer's cache
outside it: a buffer cannot be donated twice in one call. A step that donates a cache holding
the table (`write = jax.jit(PagedKVCache.write, donate_argnums=0)` on
`cache.replace(block_table=allocator.device_block_table())`) deletes the array it was given;
`device_block_table()` then transfers the table again.

Pages are taken as sequences grow (one page per 64 tokens), go back to the pool when a sequence
finishes and are handed out again first (last freed, first reused). When the pool cannot cover a
request, `reserve` raises `PagePoolExhausted` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla import shapes
from jax_flashmla.cache import NO_PAGE, PagedKVCache
from jax_flashmla.constants import PAGE_SIZE


class PagePoolExhausted(RuntimeError):
  """The pool has fewer free pages than a reservation needs (nothing was reserved).

  Attributes:
    needed: pages the reservation had to take.
    free: pages that were free.
  """

  def __init__(self, message: str, needed: int, free: int):
    super().__init__(message)
    self.needed = needed
    self.free = free


class PageAllocator:
  """Hands out the pages of one pool to the rows ("slots") of one block table.

  Args:
    num_blocks: pages in the pool (`cache.num_blocks`).
    batch_size: slots (`cache.batch_size`).
    max_blocks_per_seq: block-table columns (`cache.max_blocks_per_seq`).
    page_size: tokens per page: 64, the kernels' page size (the only one accepted).

  Raises:
    TypeError, ValueError: a size is not an int >= 1, or `page_size` is not 64.
  """

  def __init__(self, num_blocks: int, batch_size: int, max_blocks_per_seq: int,
               page_size: int = PAGE_SIZE):
    num_blocks, batch_size, max_blocks_per_seq, page_size = (
        shapes.check_static_int(name, v) for name, v in (
            ("num_blocks", num_blocks), ("batch_size", batch_size),
            ("max_blocks_per_seq", max_blocks_per_seq), ("page_size", page_size)))
    if page_size != PAGE_SIZE:
      raise ValueError(f"page_size: expected {PAGE_SIZE} (the kernels' page size), got "
                       f"{page_size}")
    self.num_blocks = num_blocks
    self.page_size = page_size
    self._table = np.full((batch_size, max_blocks_per_seq), NO_PAGE, np.int32)
    self._held = np.zeros(batch_size, np.int64)  # pages held per slot (a prefix of its row)
    self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: page 0 is taken first
    self._device_table = None  # cached jnp copy of _table; None when stale

  @classmethod
  def for_cache(cls, cache: PagedKVCache) -> PageAllocator:
    """An allocator for `cache`'s pool and block table (made with `create(num_blocks=...)`)."""
    return cls(cache.num_blocks, cache.batch_size, cache.max_blocks_per_seq, cache.page_size)

  # ---- queries ----------------------------------------------------------------------------------

  @property
  def batch_size(self) -> int:
    return self._table.shape[0]

  @property
  def max_blocks_per_seq(self) -> int:
    return self._table.shape[1]

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self.num_blocks - len(self._free)

  @property
  def block_table(self) -> np.ndarray:
    """`[b, max_blocks]` int32 page ids (`NO_PAGE` where none); a read-only view."""
    view = self._table.view()
    view.flags.writeable = False
    return view

  def pages_for(self, num_tokens: int) -> int:
    """Pages that hold `num_tokens` tokens."""
    return -(-int(num_tokens) // self.page_size)

  def pages(self, slot: int) -> tuple[int, ...]:
    """The page ids of `slot`, in order."""
    self._check_slot(slot)
    return tuple(int(p) for p in self._table[slot, : self._held[slot]])

  def capacity(self, slot: int) -> int:
    """Tokens `slot` can hold without taking another page."""
    self._check_slot(slot)
    return int(self._held[slot]) * self.page_size

  # ---- changes ----------------------------------------------------------------------------------

  def reserve(self, slot: int, num_tokens: int) -> list[int]:
    """Makes `slot` hold pages for `num_tokens` tokens in all; returns the pages it took."""
    return self.reserve_many({slot: num_tokens})[slot]

  def reserve_many(self, num_tokens: dict[int, int] | Sequence[int]) -> dict[int, list[int]]:
    """`reserve` for several slots at once, all or nothing.

    Args:
      num_tokens: `{slot: tokens}`, or one count per slot (`[b]`, 0 for "no change").

    Returns:
      `{slot: [page ids taken]}` for every slot named.

    Raises:
      ValueError: a slot would need more pages than its block-table row holds.
      PagePoolExhausted: the pool has too few free pages (then no slot changes).
    """
    if not isinstance(num_tokens, dict):
      num_tokens = dict(enumerate(num_tokens))
    wanted = {}
    for slot, n in num_tokens.items():
      self._check_slot(slot)
      if int(n) < 0:
        raise ValueError(f"slot {slot}: expected a token count >= 0, got {n}")
      need = self.pages_for(n)
      if need > self.max_blocks_per_seq:
        most = self.max_blocks_per_seq
        raise ValueError(
            f"slot {slot}: {n} tokens need {need} pages, but the block table holds {most} pages "
            f"per sequence ({most * self.page_size} tokens); create the cache with a larger "
            "max_seq_len")
      wanted[slot] = max(need - int(self._held[slot]), 0)
    total = sum(wanted.values())
    if total > len(self._free):
      short = {s: w for s, w in wanted.items() if w}
      raise PagePoolExhausted(
          f"page pool exhausted: {total} more pages needed (per slot {short}), but only "
          f"{len(self._free)} of {self.num_blocks} pages are free; free finished sequences or "
          "create the cache with more num_blocks", needed=total, free=len(self._free))
    taken = {}
    for slot, w in wanted.items():
      new = [self._free.pop() for _ in range(w)]
      held = int(self._held[slot])
      self._table[slot, held: held + w] = new
      self._held[slot] = held + w
      taken[slot] = new
    if total:
      self._device_table = None
    return taken

  def free(self, slot: int) -> list[int]:
    """Returns all pages of `slot` to the pool (it holds none afterwards); returns them."""
    self._check_slot(slot)
    pages = [int(p) for p in self._table[slot, : self._held[slot]]]
    # Push in reverse so the next reservation takes them back in the same order.
    self._free.extend(reversed(pages))
    self._table[slot] = NO_PAGE
    self._held[slot] = 0
    if pages:
      self._device_table = None
    return pages

  # ---- device side ------------------------------------------------------------------------------

  def device_block_table(self) -> jax.Array:
    """The block table as a device array, transferred again only after it changed.

    Also transferred again when the array returned before was deleted, as donating a cache
    that holds it does; so a donated step may be given the table again every step.
    """
    if self._device_table is None or self._device_table.is_deleted():
      # From a host copy of its own: the transfer may still read it after this returns, and
      # _table is edited in place by the next reserve or free.
      self._device_table = jnp.asarray(np.array(self._table))
    return self._device_table

  def _check_slot(self, slot) -> None:
    if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.batch_size:
      raise ValueError(f"slot: expected an int in [0, {self.batch_size}), got {slot!r}")

