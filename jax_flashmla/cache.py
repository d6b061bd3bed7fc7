"""`PagedKVCache`: the paged latent cache of one MLA layer as a pytree, and decode on top of it.

    cache = PagedKVCache.create(batch_size=8, max_seq_len=4096)       # one per layer
    write = jax.jit(PagedKVCache.write, donate_argnums=0)             # in place under donation
    cache = write(cache, kv_rows)                                     # [b, s_new, 1, 576]
    out, lse = mla_decode(q, cache, metadata=metadata, softmax_scale=scale)

A cache row is the 576-wide MLA latent of one token: the 512 normalised `c_kv` values followed by
the 64 RoPE'd `k_pe` values (V is the first 512 columns of the same row). Rows live in a pool of
64-token pages; `block_table[i]` lists the pages of sequence `i` in order and `lengths[i]` counts
its tokens. Page size and dims are the array shapes, hence static under `jax.jit`.

Pages can be laid out once per sequence (`create` without `num_blocks`) or handed out from a
shared pool as sequences grow (`create(..., num_blocks=n)` plus `jax_flashmla.allocator`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla import shapes
from jax_flashmla.constants import FP8_ROW_BYTES, HEAD_DIM_K, PAGE_SIZE
from jax_flashmla.decode import flash_mla_with_kvcache
from jax_flashmla.metadata import MetadataLike
from jax_flashmla.quantization import is_fp8_cache, quantize_kv

# Block-table entry of a page that is not assigned. Any id outside [0, num_blocks) is never read
# by the decode nor written by `write`; -1 says "none" most plainly.
NO_PAGE = -1

# Row formats of the pages: rows of the pages' dtype, or DeepSeek-V3.2's FP8 rows.
KV_FORMATS = ("bf16", "fp8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """The paged latent cache of one layer (a pytree of three arrays).

  Attributes:
    pages: `[num_blocks, 64, h_kv, 576]` cache rows (bfloat16 for the CUDA kernels), or
      `[num_blocks, 64, h_kv, 656]` uint8 FP8 rows (`kv_format="fp8"`).
    block_table: `[b, max_blocks]` int32 page ids of each sequence; `NO_PAGE` (or any id outside
      `[0, num_blocks)`) where no page is assigned.
    lengths: `[b]` int32 tokens stored per sequence.
  """

  pages: jax.Array
  block_table: jax.Array
  lengths: jax.Array

  @classmethod
  def create(cls, batch_size: int, max_seq_len: int, *, num_blocks: int | None = None,
             num_kv_heads: int = 1, head_dim: int = HEAD_DIM_K,
             dtype=jnp.bfloat16, kv_format: str = "bf16") -> PagedKVCache:
    """An empty cache (all lengths 0, pages zeroed).

    Args:
      batch_size: sequences (rows of the block table).
      max_seq_len: tokens one sequence may hold; the block table gets
        `ceil(max_seq_len / 64)` columns.
      num_blocks: pages in the pool. None gives every sequence its own `max_blocks` pages,
        assigned in order (no allocator needed). An int creates a shared pool with every
        block-table entry `NO_PAGE`: assign pages with `jax_flashmla.allocator.PageAllocator`.
      num_kv_heads: `h_kv` (1 for MLA).
      head_dim: 576 for MLA (512 latent + 64 RoPE).
      dtype: of the pages (the CUDA kernels take bfloat16 and float16); "fp8" ignores it.
      kv_format: "bf16" (default): rows of `dtype`, 1152 bytes per token in bfloat16. "fp8":
        DeepSeek-V3.2's FP8 rows (`jax_flashmla.quantize_kv`), `[num_blocks, 64, h_kv, 656]`
        uint8, 656 bytes per token; `write` quantizes, the decode reads them with a bfloat16 q.

    Raises:
      ValueError: a size below 1, an unknown `kv_format`, or "fp8" with `head_dim != 576`.
      TypeError: a size that is not a static int.
    """
    batch_size, max_seq_len, num_kv_heads, head_dim = (
        shapes.check_static_int(name, v) for name, v in (
            ("batch_size", batch_size), ("max_seq_len", max_seq_len),
            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
    if kv_format not in KV_FORMATS:
      raise ValueError(f"kv_format: expected one of {', '.join(map(repr, KV_FORMATS))}, got "
                       f"{kv_format!r}")
    if kv_format == "fp8" and head_dim != HEAD_DIM_K:
      raise ValueError(f"head_dim: expected {HEAD_DIM_K} with kv_format='fp8' (the FP8 row "
                       f"holds 512 latent + 64 RoPE values), got {head_dim}")
    max_blocks = -(-max_seq_len // PAGE_SIZE)
    if num_blocks is None:
      num_blocks = batch_size * max_blocks
      block_table = jnp.arange(num_blocks, dtype=jnp.int32).reshape(batch_size, max_blocks)
    else:
      num_blocks = shapes.check_static_int("num_blocks", num_blocks)
      block_table = jnp.full((batch_size, max_blocks), NO_PAGE, jnp.int32)
    if kv_format == "fp8":
      pages = jnp.zeros((num_blocks, PAGE_SIZE, num_kv_heads, FP8_ROW_BYTES), jnp.uint8)
    else:
      pages = jnp.zeros((num_blocks, PAGE_SIZE, num_kv_heads, head_dim), dtype)
    return cls(pages, block_table, jnp.zeros((batch_size,), jnp.int32))

  # Static facts, read from the shapes.
  @property
  def num_blocks(self) -> int:
    return self.pages.shape[0]

  @property
  def page_size(self) -> int:
    return self.pages.shape[1]

  @property
  def num_kv_heads(self) -> int:
    return self.pages.shape[2]

  @property
  def kv_format(self) -> str:
    """The rows' format: "fp8" for FP8 rows, else "bf16" (rows of `pages.dtype`)."""
    return "fp8" if is_fp8_cache(self.pages) else "bf16"

  @property
  def head_dim(self) -> int:
    """The row width the model writes and the queries have: 576 for MLA, FP8 rows included."""
    return HEAD_DIM_K if self.kv_format == "fp8" else self.pages.shape[3]

  @property
  def query_dtype(self):
    """The dtype queries (and the decode's output) have with this cache: the pages' dtype, or
    bfloat16 for FP8 rows."""
    return jnp.dtype(jnp.bfloat16) if self.kv_format == "fp8" else jnp.dtype(self.pages.dtype)

  @property
  def bytes_per_token(self) -> int:
    """Cache bytes one token takes over all KV heads: 1152 (bf16) or 656 (fp8) for MLA."""
    return self.pages.shape[2] * self.pages.shape[3] * jnp.dtype(self.pages.dtype).itemsize

  @property
  def batch_size(self) -> int:
    return self.block_table.shape[0]

  @property
  def max_blocks_per_seq(self) -> int:
    return self.block_table.shape[1]

  @property
  def max_seq_len(self) -> int:
    return self.max_blocks_per_seq * self.page_size

  def replace(self, **changes) -> PagedKVCache:
    """A copy with some arrays replaced, e.g. `cache.replace(block_table=allocator_table)`."""
    return dataclasses.replace(self, **changes)

  def reset(self, rows: jax.Array) -> PagedKVCache:
    """Sets `lengths` to 0 where `rows` (`[b]` bool) is set: those sequences start over.

    Their old rows stay in the pages but sit past the new length, so nothing reads them.
    """
    return self.replace(lengths=jnp.where(rows, 0, self.lengths).astype(jnp.int32))

  def write(self, kv: jax.Array, num_new: jax.Array | None = None) -> PagedKVCache:
    """Stores new rows at each sequence's current length and advances the lengths.

    Row `j` of `kv[i]` is token `k = j - (s_new - num_new[i])` of sequence `i`'s step (rows
    with `k < 0` are padding) and goes to position `p = lengths[i] + k`: slot `p % 64` of page
    `block_table[i, p // 64]`. A sequence never has holes: the rows stored are its first
    `stored[i]` new rows, up to (not including) the first that cannot land, because its
    position is past `max_seq_len` or its page is not assigned (an id outside
    `[0, num_blocks)`). Rows from there on are dropped, nothing else is touched, and
    `lengths[i]` grows by `stored[i]` only, so the cache never claims rows it does not hold.
    Assign the pages a sequence grows into before the write (`PageAllocator.reserve`).

    Jit it with the cache donated (`jax.jit(PagedKVCache.write, donate_argnums=0)`, or donate
    the cache of a whole decode step) and XLA updates the pages in place.

    Shapes: `b` sequences, `s_new` rows per sequence this step, `h_kv` KV heads (1 for MLA),
    `d` the row width (576 for MLA).

    Args:
      kv: `[b, s_new, h_kv, d]` new rows (cast to the pages' dtype; quantized with
        `quantize_kv` for an FP8 cache).
      num_new: `[b]` int32 rows to store per sequence, in `[0, s_new]` (clipped into it);
        default all `s_new`. Sequence `i` stores the *last* `num_new[i]` rows of `kv[i]`: a
        ragged step is left-padded, which is the alignment the causal decode uses (the last
        query of a block is the newest token), so queries and keys of a padded block line up.

    Returns:
      The cache with the rows stored and `lengths + stored`, where `stored == num_new` unless
      rows were dropped as above.

    Raises:
      TypeError: `kv` or `num_new` is not an array (a list: wrap it with `jnp.asarray`).
      ValueError: `kv` is not `[b, s_new >= 1, h_kv, d]` for this cache, or `num_new` is not
        an integer array of shape `[b]`.

    Example:
      >>> cache = PagedKVCache.create(batch_size=2, max_seq_len=64)
      >>> write = jax.jit(PagedKVCache.write, donate_argnums=0)
      >>> cache = write(cache, jnp.ones((2, 3, 1, 576), jnp.bfloat16))
      >>> cache.lengths.tolist()
      [3, 3]
      >>> cache = write(cache, jnp.ones((2, 70, 1, 576), jnp.bfloat16))  # 61 rows fit
      >>> cache.lengths.tolist()
      [64, 64]
    """
    b, nb, ps = self.batch_size, self.num_blocks, self.page_size
    _check_rows(kv, self)
    s_new = kv.shape[1]
    if num_new is None:
      num_new = jnp.full((b,), s_new, jnp.int32)
    else:
      shapes._expect_array("num_new", num_new)
      if tuple(num_new.shape) != (b,) or not jnp.issubdtype(num_new.dtype, jnp.integer):
        raise ValueError(f"num_new: expected an integer array of shape ({b},), got "
                         f"{num_new.dtype}{list(num_new.shape)}")
    num_new = jnp.clip(num_new.astype(jnp.int32), 0, s_new)

    # Row j of sequence i is token k = j - (s_new - num_new[i]) of this step (valid if k >= 0).
    k = jnp.arange(s_new, dtype=jnp.int32)[None, :] - (s_new - num_new)[:, None]
    pos = self.lengths[:, None] + k                               # [b, s_new]
    logical = pos // ps
    in_table = (pos >= 0) & (logical < self.max_blocks_per_seq)
    page = jnp.take_along_axis(self.block_table,
                               jnp.clip(logical, 0, self.max_blocks_per_seq - 1), axis=1)
    lands = in_table & (page >= 0) & (page < nb)
    # Tokens up to the first that cannot land are stored; the rest are dropped (no holes).
    stored = jnp.min(jnp.where((k >= 0) & ~lands, k, num_new[:, None]), axis=1)  # [b]
    ok = (k >= 0) & (k < stored[:, None])
    # Rows that must not land get distinct page ids past the pool: the scatter drops them and the
    # (page, slot) pairs stay unique. (Negative ids would wrap around, so none are used.)
    dropped = nb + jnp.arange(b * s_new, dtype=jnp.int32).reshape(b, s_new)
    page = jnp.where(ok, page, dropped).reshape(-1)
    slot = jnp.where(ok, pos % ps, 0).reshape(-1)
    # Index the 4-D pages directly: reshaping them to rows would make XLA copy the pool.
    rows = kv.reshape((b * s_new,) + kv.shape[2:])
    rows = quantize_kv(rows) if self.kv_format == "fp8" else rows.astype(self.pages.dtype)
    pages = self.pages.at[page, slot].set(rows, mode="drop", unique_indices=True)
    return self.replace(pages=pages, lengths=self.lengths + stored)


def _check_rows(kv, cache: PagedKVCache) -> None:
  shapes._expect_array("kv", kv)
  want = (cache.batch_size, cache.num_kv_heads, cache.head_dim)
  if kv.ndim != 4 or \
      (kv.shape[0], kv.shape[2], kv.shape[3]) != want:
    raise ValueError(f"kv: expected shape [b={want[0]}, s_new, h_kv={want[1]}, "
                     f"head_dim={want[2]}] for this cache, got "
                     f"{getattr(kv, 'shape', type(kv).__name__)}")
  if kv.shape[1] < 1:
    raise ValueError(f"kv: expected s_new >= 1, got shape {kv.shape}")


def mla_decode(
    q: jax.Array,
    cache: PagedKVCache,
    metadata: MetadataLike = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    *,
    implementation: str | None = None,
    num_sms: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`flash_mla_with_kvcache` over a `PagedKVCache` (write the step's rows first).

  For sequence `i`, query token `s` and head `h`, with `len = cache.lengths[i]` and the keys
  `K[t]` = cache row `t` of the sequence (`t < len`; with `causal` also `t <= len - s_q + s`):

    out[i, s, h] = Σ_t softmax_t(softmax_scale * q[i, s, h] · K[t]) · K[t, :512]
    lse[i, h, s] = log Σ_t exp(softmax_scale * q[i, s, h] · K[t])

  A sequence with no visible key gets `out = 0`, `lse = +inf`. See `flash_mla_with_kvcache`
  for the full rules.

  Shapes: `b` sequences, `s_q` query tokens per sequence (the step's tokens, the last `s_q` in
  the cache), `h_q` query heads, `h_kv` the cache's KV heads (1 for MLA), `d = 576`,
  `d_v = 512`.

  Args:
    q: `[b, s_q, h_q, d]` absorbed queries, in the pages' dtype (bfloat16 for an FP8 cache).
    cache: the layer's cache, already holding this step's `s_q` tokens.
    metadata: `get_mla_metadata(cache.lengths, s_q * h_q // h_kv, h_kv)` of the step, computed
      once (from the lengths after the step's write) and shared by every layer; None computes
      it here. Records of other lengths give NaN rows; of other shapes, a ValueError.
    softmax_scale: static float; DeepSeek models pass `192 ** -0.5` times the YaRN mscale².
    causal: default True: the step's tokens are the last `s_q` of each sequence and token `s`
      sees keys up to itself (nothing changes for `s_q == 1`).
    implementation: None (kernels on Hopper, pure JAX elsewhere), "cuda" or "xla".
    num_sms: for `metadata=None`, the SM count to schedule for.

  Returns:
    `out [b, s_q, h_q, d_v]` in q's dtype and `lse [b, h_q, s_q]` float32.

  Raises:
    TypeError: `cache` is not a `PagedKVCache`, or as `flash_mla_with_kvcache` (e.g. q and the
      pages of different dtypes).
    ValueError: as `flash_mla_with_kvcache` (shapes, metadata for other shapes).

  Example:
    >>> cache = PagedKVCache.create(batch_size=2, max_seq_len=256)
    >>> cache = cache.write(jnp.ones((2, 5, 1, 576), jnp.bfloat16))
    >>> q = jnp.ones((2, 1, 16, 576), jnp.bfloat16)
    >>> md = get_mla_metadata(cache.lengths, 1 * 16 // 1, 1)
    >>> out, lse = mla_decode(q, cache, md, softmax_scale=192 ** -0.5)
    >>> out.shape, lse.shape
    ((2, 1, 16, 512), (2, 16, 1))
  """
  if not isinstance(cache, PagedKVCache):
    raise TypeError(f"cache: expected a PagedKVCache, got {type(cache).__name__}")
  return flash_mla_with_kvcache(q, cache.pages, cache.block_table, cache.lengths,
                                metadata=metadata, softmax_scale=softmax_scale, causal=causal,
                                implementation=implementation, num_sms=num_sms)
