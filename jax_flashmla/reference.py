"""Pure-JAX twins of the kernels: the decode reference and the scheduler.

`flash_mla_reference` is the `implementation="xla"` path and the lowering used on every platform
that is not a Hopper GPU. It implements docs/design.md#numerics-contract exactly, including the
run-time value rules the kernels follow (see `src/kernels/params.h`):

- a length is clamped to `[0, max_blocks * 64]`;
- a page id outside `[0, num_blocks)` is never read: its keys are masked;
- causal with `s_q > 1` is bottom-right aligned: token `s` sees keys `0 … len - s_q + s`;
- a row with nothing to attend gets `out = 0`, `lse = +inf`;
- whatever sits in cache slots past a row's length (NaN, inf) never reaches the output.

`mla_metadata_reference` writes the CUDA scheduler's records, fingerprints included, and
`stale_requests` is the records check every decode path applies (docs/design.md, "Scheduler
records").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_flashmla.constants import (FIXED_OVERHEAD_BLOCKS, HEAD_DIM_K, HEAD_DIM_V, INT32_MAX,
                                    PAGE_SIZE, SCHED_RECORD_INTS)
from jax_flashmla.quantization import dequantize_kv, is_fp8_cache


def default_softmax_scale(head_dim: int = HEAD_DIM_K) -> float:
  return head_dim**-0.5


def effective_lengths(cache_seqlens: jax.Array, max_blocks: int) -> jax.Array:
  return jnp.clip(cache_seqlens, 0, max_blocks * PAGE_SIZE)


def flash_mla_reference(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    head_dim_v: int = HEAD_DIM_V,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Paged MLA decode in plain JAX: gather the pages, two einsums, float32 softmax.

  The same numerics as `flash_mla_with_kvcache` (docs/design.md#numerics-contract) without
  its restrictions: any head dim and page size, any float dtype, no scheduler records. It is
  differentiable (`jax.grad`, `jax.vjp`) in q and k_cache, where the decode op is
  inference-only, so use it for training or to check gradients. For row `i`, query token `s`
  and query head `h` (sharing KV head `h // (h_q // h_kv)`):

    scores[t] = softmax_scale * q[i, s, h] · K[t]          for the visible keys t
    out[i, s, h] = Σ_t softmax(scores)[t] · K[t, :head_dim_v]
    lse[i, h, s] = log Σ_t exp(scores[t])                  (natural log)

  where `K[t]` is token `t` of the row: slot `t % page_size` of page `block_table[i, t //
  page_size]`. Visible keys: `t < len = clip(cache_seqlens[i], 0, max_blocks * page_size)` on a
  page id in `[0, num_blocks)`, and with `causal` and `s_q > 1` also `t <= len - s_q + s`. A
  row with no visible key gets `out = 0` and `lse = +inf`.

  Shapes: `b` batch, `s_q` query tokens per row, `h_q` query heads, `h_kv` KV heads (`h_q %
  h_kv == 0`), `d` head dim (576 for MLA), `num_blocks` pages of `page_size` tokens,
  `max_blocks` block-table columns.

  Args:
    q: `[b, s_q, h_q, d]` queries.
    k_cache: `[num_blocks, page_size, h_kv, d]` in q's dtype; V is `k_cache[..., :head_dim_v]`.
      Or an FP8 cache `[num_blocks, page_size, h_kv, 656]` uint8 / float8_e4m3fn
      (`quantize_kv`): the gathered pages are dequantized (`dequantize_kv`) first.
    block_table: `[b, max_blocks]` int32 page ids.
    cache_seqlens: `[b]` int32 lengths.
    head_dim_v: static int, the value width: the first `head_dim_v` columns of each row
      (default 512, MLA's latent).
    softmax_scale: static float multiplying the scores; default `d ** -0.5`.
    causal: static bool; with `s_q > 1` token `s` sees keys `0 … len - s_q + s` (bottom-right
      aligned); with `s_q == 1` it changes nothing.

  Returns:
    `out [b, s_q, h_q, head_dim_v]` in q's dtype and `lse [b, h_q, s_q]` float32.

  Raises:
    Only what the shapes make JAX raise (e.g. a batch mismatch in an einsum): this function
    does not check its arguments; `flash_mla_with_kvcache(..., implementation="xla")` runs it
    behind the decode's checks.

  Example:
    >>> q = jnp.ones((2, 1, 16, 576), jnp.float32)
    >>> k_cache = jnp.ones((4, 64, 1, 576), jnp.float32)
    >>> block_table = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    >>> lens = jnp.asarray([70, 0], jnp.int32)
    >>> out, lse = flash_mla_reference(q, k_cache, block_table, lens)
    >>> out.shape, lse.shape
    ((2, 1, 16, 512), (2, 16, 1))
    >>> loss = lambda q: flash_mla_reference(q, k_cache, block_table, lens)[0].sum()
    >>> jax.grad(loss)(q).shape
    (2, 1, 16, 576)
  """
  b, s_q, h_q, d = q.shape
  num_blocks, page_size, h_kv, _ = k_cache.shape
  max_blocks = block_table.shape[1]
  g = h_q // h_kv
  scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
  t = max_blocks * page_size

  page_ok = (block_table >= 0) & (block_table < num_blocks)  # [b, max_blocks]
  pages = jnp.take(k_cache, jnp.clip(block_table, 0, num_blocks - 1), axis=0)
  if is_fp8_cache(k_cache):  # FP8 rows: the gathered pages, dequantized (quantization.py)
    pages = dequantize_kv(pages)
  kv = pages.reshape(b, t, h_kv, d)  # [b, t, h_kv, d]

  lens = jnp.clip(cache_seqlens, 0, max_blocks * page_size)
  pos = jnp.arange(t)
  key_ok = (pos[None, :] < lens[:, None]) & jnp.repeat(page_ok, page_size, axis=1)  # [b, t]
  # Zero K and V rows that are not keys, so NaN/inf stored there cannot leak (0·NaN is NaN).
  kv = jnp.where(key_ok[:, :, None, None], kv, jnp.zeros((), kv.dtype))

  qg = q.reshape(b, s_q, h_kv, g, d)
  scores = jnp.einsum(
      "bshgd,bthd->bhsgt", qg, kv, preferred_element_type=jnp.float32,
      precision=lax.Precision.HIGHEST,
  ) * jnp.float32(scale)
  mask = key_ok[:, None, None, None, :]  # [b, 1, 1, 1, t]
  if causal and s_q > 1:
    limit = lens[:, None] - s_q + jnp.arange(s_q)[None, :]  # last visible key per token
    mask = mask & (pos[None, None, :] <= limit[:, :, None])[:, None, :, None, :]
  scores = jnp.where(mask, scores, -jnp.inf)

  m = jnp.max(scores, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m_safe)  # exactly 0 where masked
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum(
      "bhsgt,bthv->bshgv", p, kv[..., :head_dim_v].astype(jnp.float32),
      preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST,
  )
  # l == 0: nothing to attend -> out 0, lse +inf. (NaN only arises from NaN inside a row's own
  # keys, and then propagates as it should.)
  empty = l[..., 0] == 0  # [b, h_kv, s, g]
  l_safe = jnp.where(empty, 1.0, l[..., 0])
  out = o / jnp.transpose(l_safe, (0, 2, 1, 3))[..., None]
  out = jnp.where(jnp.transpose(empty, (0, 2, 1, 3))[..., None], 0.0, out)
  out = out.reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)
  lse = jnp.where(empty, jnp.inf, jnp.log(l_safe) + m_safe[..., 0])  # [b, h_kv, s, g]
  lse = jnp.transpose(lse, (0, 1, 3, 2)).reshape(b, h_q, s_q)
  return out, lse.astype(jnp.float32)


def _as_uint32(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)


def length_fingerprints(cache_seqlens: jax.Array, begin_req: jax.Array,
                        end_req: jax.Array) -> jax.Array:
  """The fingerprint of the lengths of requests `begin_req … end_req` (inclusive), per record.

  `fp = Σ_{i = begin … end} (uint32(cache_seqlens[i]) + 1) · (2i + 1)` in wrapping uint32
  arithmetic, returned as the int32 with the same bits: what the scheduler stores in a record's
  `pad[0]` (`SchedRecord` in `src/kernels/params.h`). Lengths are the raw values, not clamped.
  Indices outside `[0, b)` are clipped into it (only hand-made records have them).

  Args:
    cache_seqlens: `[b]` int32.
    begin_req, end_req: int32 arrays of one shape (one entry per record).
  """
  b = cache_seqlens.shape[0]
  i = jnp.arange(b, dtype=jnp.uint32)
  weights = (_as_uint32(cache_seqlens) + jnp.uint32(1)) * (jnp.uint32(2) * i + jnp.uint32(1))
  # Differences of prefix sums: modular arithmetic makes them the wrapping sums over ranges.
  prefix = jnp.concatenate([jnp.zeros((1,), jnp.uint32), jnp.cumsum(weights, dtype=jnp.uint32)])
  lo = jnp.clip(begin_req, 0, b)
  hi = jnp.clip(end_req + 1, lo, b)
  return lax.bitcast_convert_type(prefix[hi] - prefix[lo], jnp.int32)


def stale_requests(tile_scheduler_metadata: jax.Array, cache_seqlens: jax.Array) -> jax.Array:
  """`[b]` bool: requests covered by a record whose length fingerprint differs from the one
  `cache_seqlens` gives, i.e. records scheduled for other lengths (another step's, or
  permuted). Every decode path returns NaN `out` and `lse` rows for them.

  A record with no work (`begin_req` outside `[0, b)`) is not checked. Equal fingerprints of
  different lengths are possible (it is a 32-bit sum) but need a coincidence.
  """
  b = cache_seqlens.shape[0]
  begin = tile_scheduler_metadata[:, 0]
  end = tile_scheduler_metadata[:, 2]
  working = (begin >= 0) & (begin < b)
  bad = working & (length_fingerprints(cache_seqlens, begin, end) !=
                   tile_scheduler_metadata[:, 5])
  req = jnp.arange(b, dtype=jnp.int32)[None, :]
  covered = (req >= begin[:, None]) & (req <= end[:, None])  # [num_sm_parts, b]
  return jnp.any(covered & bad[:, None], axis=0)


def schedule_cost_pages(cache_seqlens: jax.Array) -> jax.Array:
  """Scheduler cost of each request in pages (`sched_cost_pages` in params.h).

  An empty request still costs one page; the cost is capped so the batch total fits in int32.
  """
  b = cache_seqlens.shape[0]
  lens = jnp.maximum(cache_seqlens, 0)
  pages = jnp.maximum(lens // PAGE_SIZE + (lens % PAGE_SIZE != 0), 1)
  return jnp.minimum(pages, INT32_MAX // b - FIXED_OVERHEAD_BLOCKS).astype(jnp.int32)


def mla_metadata_reference(cache_seqlens: jax.Array, num_sm_parts: int):
  """The split-KV scheduler in plain JAX, record for record what the CUDA scheduler writes.

  Greedy packing (the idea is FlashMLA's): every request costs its pages plus a fixed overhead;
  each of the `num_sm_parts` parts gets `ceil(total / parts) + overhead`, takes whole requests
  while they fit and otherwise the part of the next request that fits, which then continues in
  the next part as its next split. The last part takes whatever is left.

  Returns `(tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32)`; the
  record layout is `SchedRecord` in `src/kernels/params.h`: `begin_req, begin_block, end_req,
  end_block, begin_split`, then the fingerprint of the covered requests' lengths
  (`length_fingerprints`; 0 in a part with no work) and two zeros.
  """
  b = cache_seqlens.shape[0]
  parts = num_sm_parts
  fixed = FIXED_OVERHEAD_BLOCKS
  pages = schedule_cost_pages(cache_seqlens)
  total = jnp.sum(pages + fixed)  # <= INT32_MAX by the cap
  payload = total // parts + (total % parts != 0) + fixed

  def part_body(p, carry):
    req, blk, split, records, nsplits = carry
    begin = (req, blk, split)

    def cond(c):
      _, r, _, _, _, _, _, done = c
      return (r < b) & ~done

    def body(c):
      remaining, r, bk, sp, end_req, end_blk, nsp, _ = c
      left = pages[r] - bk
      whole = (remaining >= left + fixed) | (p == parts - 1)
      take = remaining - fixed
      partial = ~whole & (take > 0)
      nsp = jnp.where(whole, nsp.at[r].set(sp + 1), nsp)
      new_end_req = jnp.where(whole | partial, r, end_req)
      new_end_blk = jnp.where(whole, pages[r], jnp.where(partial, bk + take, end_blk))
      new_remaining = jnp.where(whole, remaining - left - fixed, remaining)
      new_r = jnp.where(whole, r + 1, r)
      new_bk = jnp.where(whole, 0, jnp.where(partial, bk + take, bk))
      new_sp = jnp.where(whole, 0, jnp.where(partial, sp + 1, sp))
      return (new_remaining, new_r, new_bk, new_sp, new_end_req, new_end_blk, nsp, ~whole)

    init = (payload, req, blk, split, jnp.int32(-1), jnp.int32(0), nsplits, jnp.bool_(False))
    _, req, blk, split, end_req, end_blk, nsplits, _ = lax.while_loop(cond, body, init)
    empty = end_req < 0
    rec = jnp.stack([
        jnp.where(empty, b, begin[0]),
        jnp.where(empty, 0, begin[1]),
        jnp.where(empty, 0, end_req),
        jnp.where(empty, 0, end_blk),
        jnp.where(empty, 0, begin[2]),
        jnp.int32(0), jnp.int32(0), jnp.int32(0),
    ]).astype(jnp.int32)
    records = records.at[p].set(rec)
    return req, blk, split, records, nsplits

  init = (
      jnp.int32(0), jnp.int32(0), jnp.int32(0),
      jnp.zeros((parts, SCHED_RECORD_INTS), jnp.int32),
      jnp.zeros((b,), jnp.int32),
  )
  _, _, _, records, nsplits = lax.fori_loop(0, parts, part_body, init)
  working = records[:, 0] < b
  fingerprint = length_fingerprints(cache_seqlens, records[:, 0], records[:, 2])
  records = records.at[:, 5].set(jnp.where(working, fingerprint, 0))
  num_splits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(nsplits, dtype=jnp.int32)])
  return records, num_splits
