"""How JAX's partitioner splits the scheduler and the decode across devices.

An FFI call is opaque to XLA: left alone under sharding, it gets every operand gathered onto
every device and runs the whole problem everywhere. So the primitives users bind lower through
`custom_partitioning`, with a Shardy sharding rule (which dimensions are shared, which must not
be split) and a `partition` callback that, once the partitioner has chosen shardings, re-binds the
per-device primitives (`local_primitives.py`) on one device's shapes. The CPU path lowers the same
way, so the tests on CPU host devices go through exactly the rule the CUDA path uses.

Supported layouts (mesh axes are free to choose; any mix of the first two works):

- head-parallel: q/out/lse sharded on heads; each device runs its heads. With `h_kv > 1` the
  head shard count must divide `h_kv`, and the cache's head axis is split the same way (a device
  holds whole KV-head groups: `h_q / h_kv` query heads with their KV head). With `h_kv == 1` any
  count dividing `h_q` works and the cache is replicated.
- batch-parallel: q/block_table/cache_seqlens/out/lse sharded on batch. The cache is either
  replicated (block tables hold ids into the whole cache), or split into pools (`num_pools`):
  `k_cache` is `num_pools` equal pools stacked on its page axis, the batch is `num_pools` equal
  groups of consecutive rows, and group j's block-table ids index pool j (ids local to the pool).
  Sharding the page axis over the batch's mesh axes then gives every device its own pools and
  rows, and nothing moves between devices.
- anything else that would need the cache gathered raises a ValueError naming the layout.

Scheduler records: when the batch or the heads are split, each device recomputes the records
from its own `cache_seqlens` for its own shapes (the records passed in describe the whole batch,
and XLA drops their computation when nothing else uses it). Unsplit, the records passed in are
used as they are.

docs/sharding.md has the user's view, with the equivalent shard_map recipes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from jax_flashmla import shapes
from jax_flashmla.local_primitives import mla_decode_local_p, mla_metadata_local_p


@dataclasses.dataclass(frozen=True)
class MetadataConfig:
  num_sm_parts: int
  implementation: str | None


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  softmax_scale: float
  causal: bool
  implementation: str | None
  num_pools: int  # k_cache holds this many pools; see the module docstring
  num_sms: int    # SMs of one device, for records recomputed per shard


def global_page_ids(block_table: jax.Array, num_blocks: int, num_pools: int) -> jax.Array:
  """Pool-local page ids -> ids into the whole `k_cache` (ids outside their pool become -1).

  `block_table` is `[..., b, max_blocks]`; row group j (rows `j*b/num_pools …`) uses pool j,
  pages `j*num_blocks/num_pools …`. An id outside `[0, num_blocks/num_pools)` is invalid, and
  stays invalid: it reads nothing.
  """
  if num_pools == 1:
    return block_table
  b = block_table.shape[-2]
  rows, pages = b // num_pools, num_blocks // num_pools
  pool = (jnp.arange(b, dtype=jnp.int32) // rows)[:, None]
  valid = (block_table >= 0) & (block_table < pages)
  return jnp.where(valid, block_table + pool * pages, -1)


# ------------------------------------------------------------------------------------------------
# The computations on one device (also the whole computation when nothing is split).
# ------------------------------------------------------------------------------------------------


def metadata_unpartitioned(cache_seqlens, config: MetadataConfig):
  return tuple(mla_metadata_local_p.bind(cache_seqlens, num_sm_parts=config.num_sm_parts,
                                         implementation=config.implementation))


def _decode_on_device(q, k_cache, block_table, cache_seqlens, sched, num_splits, *,
                      config: DecodeConfig, num_pools: int, num_sm_parts: int | None):
  """Decode with `num_pools` pools in `k_cache`; `num_sm_parts`: recompute the records."""
  block_table = global_page_ids(block_table, k_cache.shape[0], num_pools)
  if num_sm_parts is not None:
    sched, num_splits = mla_metadata_local_p.bind(
        cache_seqlens, num_sm_parts=num_sm_parts, implementation=config.implementation)
  return tuple(mla_decode_local_p.bind(
      q, k_cache, block_table, cache_seqlens, sched, num_splits,
      softmax_scale=config.softmax_scale, causal=config.causal,
      implementation=config.implementation))


def decode_unpartitioned(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                         config: DecodeConfig):
  return _decode_on_device(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                           config=config, num_pools=config.num_pools, num_sm_parts=None)


# ------------------------------------------------------------------------------------------------
# Shardy rules. Factors: b batch, s query tokens, h query heads, d = 576, v = 512, n pages,
# p page slots (64), k KV heads, w the cache row (576 elements, or 656 bytes for FP8),
# m block-table columns, r e / c the scheduler records.
# Pages and KV heads may be split (the partition callback checks how); the rest may not.
# ------------------------------------------------------------------------------------------------

METADATA_RULE = "b -> r e, c"
METADATA_REPLICATED = "b r e c"
DECODE_RULE = "b s h d, n p k w, b m, b, r e, c -> b s h v, b h s"
DECODE_REPLICATED = "s d p w m r e c v"


def _in_rule_order(rule: str, factors: str) -> tuple[str, ...]:
  # Shardy's verifier wants special factors listed in the order the rule first names them.
  order = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
  return tuple(sorted(factors.split(), key=order.index))


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _dim_axes(sharding, ndim: int) -> list[tuple[str, ...]]:
  """Mesh axes splitting each dimension, from a NamedSharding."""
  if not isinstance(sharding, NamedSharding):
    # JAX hands custom_partitioning mesh-less shardings inside a shard_map that leaves some mesh
    # axes automatic, and for jit over devices given without a Mesh.
    raise ValueError(
        f"jax_flashmla: the partitioner proposed {sharding}, which names no mesh axes. Shard with "
        f"NamedSharding over a Mesh, and inside shard_map make every mesh axis manual (the "
        f"default)")
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return [_axes(e) for e in spec]


def _spec(*dims: tuple[str, ...]) -> PartitionSpec:
  return PartitionSpec(*[None if not a else a[0] if len(a) == 1 else a for a in dims])


def _count(mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _partition_metadata(config: MetadataConfig, mesh, arg_shapes, result_shape):
  # The records describe the whole batch: computed from all lengths, the same on every device.
  del arg_shapes, result_shape
  replicated = NamedSharding(mesh, PartitionSpec())
  lower = lambda cache_seqlens: metadata_unpartitioned(cache_seqlens, config)
  return mesh, lower, (replicated, replicated), (replicated,)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """What one device computes, for shardings the partitioner proposed."""

  arg_specs: tuple[PartitionSpec, ...]     # q, k_cache, block_table, cache_seqlens, sched, splits
  result_specs: tuple[PartitionSpec, ...]  # out, lse
  num_pools: int                           # pools in one device's slice of k_cache
  num_sm_parts: int | None                 # recompute the records with this many parts, or None


def plan_decode(config: DecodeConfig, mesh, arg_shapes) -> DecodePlan:
  """Chooses the per-device layout from the proposed shardings, or raises why it cannot.

  Batch and head axes are read from q (the rule shares them with block_table, cache_seqlens,
  out and lse). The cache may arrive replicated or split as the layout needs; split any other
  way it would have to be gathered, which this refuses to do.
  """
  q, k_cache = arg_shapes[0], arg_shapes[1]
  b, s_q, h_q, _ = q.shape
  num_blocks, _, h_kv, _ = k_cache.shape
  q_axes = _dim_axes(q.sharding, 4)
  page_axes_in, _, kv_axes_in, _ = _dim_axes(k_cache.sharding, 4)
  batch_axes, head_axes = q_axes[0], q_axes[2]
  kb, kh = _count(mesh, batch_axes), _count(mesh, head_axes)
  where = (f"q {tuple(q.shape)} sharded {q.sharding.spec}, k_cache {tuple(k_cache.shape)} "
           f"sharded {k_cache.sharding.spec}, num_pools={config.num_pools}")

  if b % kb or h_q % kh:
    raise ValueError(f"jax_flashmla: batch {b} and heads {h_q} must split evenly over their mesh "
                     f"axes ({kb} and {kh} shards); {where}")
  kv_axes = ()
  if kh > 1 and h_kv > 1:
    if h_kv % kh:
      raise ValueError(
          f"jax_flashmla: heads split {kh} ways with h_kv={h_kv}: a device must hold whole "
          f"KV-head groups, so the head shard count must divide h_kv (or h_kv must be 1); {where}")
    kv_axes = head_axes
  if kv_axes_in and kv_axes_in != kv_axes:
    raise ValueError(f"jax_flashmla: k_cache's head axis must be split like q's heads "
                     f"({_spec(head_axes)}) or replicated; {where}")

  page_axes = ()
  if config.num_pools == 1:
    if page_axes_in:
      raise ValueError(
          "jax_flashmla: k_cache is split on its page axis, but its block tables hold ids into "
          "the whole cache (num_pools=1), which would gather the cache onto every device. Split "
          "the cache into per-device pools with pool-local page ids (num_pools=<batch shard "
          f"count>, batch split over the same mesh axes), or replicate it; {where}")
  else:
    if config.num_pools % kb:
      raise ValueError(f"jax_flashmla: num_pools={config.num_pools} must be a multiple of the "
                       f"batch shard count {kb}; {where}")
    page_axes = batch_axes
    if page_axes_in and page_axes_in != page_axes:
      raise ValueError(f"jax_flashmla: with num_pools > 1, k_cache's page axis must be split "
                       f"over the batch's mesh axes {_spec(batch_axes)} or replicated; {where}")

  split = kb > 1 or kh > 1
  local_h_q, local_h_kv = h_q // kh, h_kv // _count(mesh, kv_axes)
  parts = shapes.num_sm_parts_for(config.num_sms, s_q * local_h_q // local_h_kv, local_h_kv)
  rep = ()
  return DecodePlan(
      arg_specs=(_spec(batch_axes, rep, head_axes, rep), _spec(page_axes, rep, kv_axes, rep),
                 _spec(batch_axes, rep), _spec(batch_axes), _spec(rep, rep), _spec(rep)),
      result_specs=(_spec(batch_axes, rep, head_axes, rep), _spec(batch_axes, head_axes, rep)),
      num_pools=config.num_pools // kb if config.num_pools > 1 else 1,
      num_sm_parts=parts if split else None)


def _partition_decode(config: DecodeConfig, mesh, arg_shapes, result_shape):
  del result_shape  # ours follows from the operands
  plan = plan_decode(config, mesh, arg_shapes)

  def lower(q, k_cache, block_table, cache_seqlens, sched, num_splits):
    return _decode_on_device(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                             config=config, num_pools=plan.num_pools,
                             num_sm_parts=plan.num_sm_parts)

  named = lambda specs: tuple(NamedSharding(mesh, s) for s in specs)
  return mesh, lower, named(plan.result_specs), named(plan.arg_specs)


_metadata_op = custom_partitioning(metadata_unpartitioned, static_argnums=(1,))
_metadata_op.def_partition(
    _partition_metadata, sharding_rule=METADATA_RULE,
    need_replication_factors=_in_rule_order(METADATA_RULE, METADATA_REPLICATED))

_decode_op = custom_partitioning(decode_unpartitioned, static_argnums=(6,))
_decode_op.def_partition(
    _partition_decode, sharding_rule=DECODE_RULE,
    need_replication_factors=_in_rule_order(DECODE_RULE, DECODE_REPLICATED))


def metadata_lowering(ctx, cache_seqlens, *, num_sm_parts, implementation):
  config = MetadataConfig(num_sm_parts, implementation)
  return mlir.lower_fun(lambda s: list(_metadata_op(s, config)), multiple_results=True)(
      ctx, cache_seqlens)


def decode_lowering(ctx, *args, softmax_scale, causal, implementation, num_pools, num_sms):
  config = DecodeConfig(softmax_scale, causal, implementation, num_pools, num_sms)
  return mlir.lower_fun(lambda *a: list(_decode_op(*a, config)), multiple_results=True)(
      ctx, *args)
