"""The two primitives users bind: the split-KV scheduler and the paged MLA decode.

They are the outer level of two. They own the transformations: abstract evaluation, vmap, the
"no gradient" rule, and sharding: their lowering goes through `custom_partitioning`
(`partitioning.py`), whose per-device computation binds the inner primitives of
`local_primitives.py` (the CUDA FFI call, or the pure-JAX twin on every other platform). On one
device that lowering simply inlines the per-device computation.

Parameters (all static):
  mla_metadata_p: num_sm_parts, implementation.
  mla_decode_p: softmax_scale, causal, implementation, num_pools (the cache holds this many
    page pools, one per group of consecutive batch rows, with pool-local page ids; see
    `partitioning.py`), num_sms (one device's SM count, for records recomputed per shard).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_flashmla import _compat, partitioning, shapes
from jax_flashmla.local_primitives import (IMPLEMENTATIONS, cached_jit_bind, check_implementation,
                                           decode_abstract_eval, metadata_abstract_eval,
                                           register_no_gradient)

__all__ = ["IMPLEMENTATIONS", "check_implementation", "mla_decode_p", "mla_metadata_p"]

# ------------------------------------------------------------------------------------------------
# Scheduler: cache_seqlens [b] -> (tile_scheduler_metadata [P, 8], num_splits [b + 1])
# ------------------------------------------------------------------------------------------------

mla_metadata_p = Primitive("jax_flashmla_mla_metadata")
mla_metadata_p.multiple_results = True
mla_metadata_p.def_impl(cached_jit_bind(mla_metadata_p))


def _metadata_batch(args, dims, *, num_sm_parts, implementation):
  (seqlens,), (dim,) = args, dims
  seqlens = jnp.moveaxis(seqlens, dim, 0)
  # Each lane is its own batch with its own schedule; lanes are few, so run them in turn.
  out = jax.lax.map(
      lambda s: tuple(mla_metadata_p.bind(s, num_sm_parts=num_sm_parts,
                                          implementation=implementation)), seqlens)
  return list(out), [0, 0]


mla_metadata_p.def_abstract_eval(metadata_abstract_eval)
mlir.register_lowering(mla_metadata_p, partitioning.metadata_lowering)
batching.primitive_batchers[mla_metadata_p] = _metadata_batch


# ------------------------------------------------------------------------------------------------
# Decode: (q, k_cache, block_table, cache_seqlens, sched, num_splits) -> (out, lse)
# ------------------------------------------------------------------------------------------------

mla_decode_p = Primitive("jax_flashmla_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_impl(cached_jit_bind(mla_decode_p))


def _decode_abstract_eval(q, k_cache, block_table, cache_seqlens, sched, num_splits, *,
                          softmax_scale, causal, implementation, num_pools, num_sms):
  del softmax_scale, causal
  shapes.check_num_pools(num_pools, q.shape[0], k_cache.shape[0])
  shapes.check_static_int("num_sms", num_sms)
  return decode_abstract_eval(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                              implementation=implementation)


def _fold_q_into_heads(q, k_cache, block_table, cache_seqlens, sched, num_splits, params):
  """vmap over q alone: more query heads over the same cache (not more tokens, which would
  change the causal mask)."""
  n, b, s_q, h_q, d = q.shape
  h_kv = k_cache.shape[2]
  g = h_q // h_kv
  qf = q.reshape(n, b, s_q, h_kv, g, d).transpose(1, 2, 3, 0, 4, 5).reshape(b, s_q, -1, d)
  out, lse = mla_decode_p.bind(qf, k_cache, block_table, cache_seqlens, sched, num_splits,
                               **params)
  dv = out.shape[-1]
  out = out.reshape(b, s_q, h_kv, n, g, dv).transpose(3, 0, 1, 2, 4, 5).reshape(n, b, s_q, h_q,
                                                                                 dv)
  lse = lse.reshape(b, h_kv, n, g, s_q).transpose(2, 0, 1, 3, 4).reshape(n, b, h_q, s_q)
  return out, lse


def _decode_batch(args, dims, **params):
  q, k_cache, block_table, cache_seqlens, sched, num_splits = args
  qd, kd, btd, sld, _, _ = dims
  nm = None  # batching.not_mapped
  lanes = next(a.shape[d] for a, d in zip(args, dims) if d is not nm)
  mv = lambda x, d: x if d is nm else jnp.moveaxis(x, d, 0)
  sched = sched if dims[4] is nm else jnp.moveaxis(sched, dims[4], 0)[0]
  num_splits = num_splits if dims[5] is nm else jnp.moveaxis(num_splits, dims[5], 0)[0]

  if kd is nm and btd is nm and sld is nm and qd is not nm and dims[4] is nm and dims[5] is nm:
    out, lse = _fold_q_into_heads(mv(q, qd), k_cache, block_table, cache_seqlens, sched,
                                  num_splits, params)
    return [out, lse], [0, 0]

  # Otherwise fold the vmapped axis into the batch: each lane's rows become more rows. Page
  # ids are made ids into the whole cache first, so the folded rows need no pool structure.
  k_cache = mv(k_cache, kd)
  num_blocks = k_cache.shape[0 if kd is nm else 1]
  block_table = partitioning.global_page_ids(mv(block_table, btd), num_blocks,
                                             params["num_pools"])
  btd = btd if btd is nm else 0
  params = dict(params, num_pools=1)

  def lanes_first(x, d):
    return jnp.broadcast_to(x, (lanes,) + x.shape) if d is nm else jnp.moveaxis(x, d, 0)

  q, block_table, cache_seqlens = (lanes_first(x, d) for x, d in
                                   ((q, qd), (block_table, btd), (cache_seqlens, sld)))
  if kd is not nm:
    # One pool per lane: concatenate the pools and shift each lane's page ids; ids that were
    # invalid stay invalid (-1), so they still read nothing.
    k_cache = k_cache.reshape((lanes * num_blocks,) + k_cache.shape[2:])
    offset = (jnp.arange(lanes, dtype=jnp.int32) * num_blocks)[:, None, None]
    valid = (block_table >= 0) & (block_table < num_blocks)
    block_table = jnp.where(valid, block_table + offset, -1)
  n, b = q.shape[:2]
  q = q.reshape((n * b,) + q.shape[2:])
  block_table = block_table.reshape(n * b, -1)
  cache_seqlens = cache_seqlens.reshape(n * b)
  # The schedule depends on every row's length: recompute it for the folded batch.
  sched, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=sched.shape[0],
                                          implementation=params["implementation"])
  out, lse = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                               **params)
  return [out.reshape((n, b) + out.shape[1:]), lse.reshape((n, b) + lse.shape[1:])], [0, 0]


mla_decode_p.def_abstract_eval(_decode_abstract_eval)
mlir.register_lowering(mla_decode_p, partitioning.decode_lowering)
batching.primitive_batchers[mla_decode_p] = _decode_batch
register_no_gradient(mla_decode_p, "decode", "jax_flashmla.flash_mla_reference")

# Their lowering (custom_partitioning) decides from the devices whether to partition.
_compat.require_devices_during_lowering(mla_metadata_p, mla_decode_p)
