"""Pure-JAX twins of the kernels: the decode reference and the scheduler.

`flash_mla_reference` is the `implementation="xla"` path and the lowering used on every platform
that is not a Hopper GPU. It implements docs/design.md#numerics-contract exactly, including the
run-time value rules the kernels follow (see `src/kernels/params.h`):

- a length is clamped to `[0, max_blocks * 64]`;
- a page id outside `[0, num_blocks)` is never read: its keys are masked;
- causal with `s_q > 1` is bottom-right aligned: token `s` sees keys `0 … len - s_q + s`;
- a row with nothing to attend gets `out = 0`, `lse = +inf`;
- whatever sits in cache slots past a row's length (NaN, inf) never reaches the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_flashmla.constants import (FIXED_OVERHEAD_BLOCKS, HEAD_DIM_K, HEAD_DIM_V, INT32_MAX,
                                    PAGE_SIZE, SCHED_RECORD_INTS)


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

  Args:
    q: `[b, s_q, h_q, d]` queries (d = 576 for MLA).
    k_cache: `[num_blocks, page_size, h_kv, d]`; V is `k_cache[..., :head_dim_v]`.
    block_table: `[b, max_blocks]` int32 page ids.
    cache_seqlens: `[b]` int32 lengths.
  Returns:
    `out [b, s_q, h_q, head_dim_v]` in q's dtype and `lse [b, h_q, s_q]` float32 (natural log).
  """
  b, s_q, h_q, d = q.shape
  num_blocks, page_size, h_kv, _ = k_cache.shape
  max_blocks = block_table.shape[1]
  g = h_q // h_kv
  scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
  t = max_blocks * page_size

  page_ok = (block_table >= 0) & (block_table < num_blocks)  # [b, max_blocks]
  pages = jnp.take(k_cache, jnp.clip(block_table, 0, num_blocks - 1), axis=0)
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
  record layout is `SchedRecord` in `src/kernels/params.h`.
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
  num_splits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(nsplits, dtype=jnp.int32)])
  return records, num_splits
