"""Split-KV scheduling records: computed once per decode step, shared by every layer."""

from __future__ import annotations

import dataclasses
import functools

import jax

from jax_flashmla import _extension, shapes
from jax_flashmla.constants import DEFAULT_NUM_SMS
from jax_flashmla.primitives import check_implementation, mla_metadata_p


# num_sms is static (pytree aux data): it survives jit, vmap and tree_map and is never traced.
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("tile_scheduler_metadata", "num_splits"), meta_fields=("num_sms",))
@dataclasses.dataclass(frozen=True)
class MLAMetadata:
  """Scheduler output for one decode step (a pytree of two int32 arrays and a static int).

  Attributes:
    tile_scheduler_metadata: `[num_sm_parts, 8]` int32, one work record per CTA of the split
      axis (layout: `SchedRecord` in `src/kernels/params.h`).
    num_splits: `[b + 1]` int32, exclusive prefix sum of each request's number of splits.
    num_sms: the SM count the records were scheduled for. A decode whose batch or heads are
      sharded recomputes the records per device for this count, unless given its own.
  """

  tile_scheduler_metadata: jax.Array
  num_splits: jax.Array
  num_sms: int

  @property
  def num_sm_parts(self) -> int:
    return self.tile_scheduler_metadata.shape[0]


# What entry points accept as `metadata`; `as_metadata` turns it into an MLAMetadata (or None).
MetadataLike = MLAMetadata | tuple[jax.Array, jax.Array] | None


def local_num_sms() -> int:
  """SM count of the first local GPU, or DEFAULT_NUM_SMS when none is attached."""
  gpus = _extension.local_gpus()
  return int(getattr(gpus[0], "core_count", DEFAULT_NUM_SMS)) if gpus else DEFAULT_NUM_SMS


def as_metadata(metadata: MetadataLike, *, num_sms: int | None = None) -> MLAMetadata | None:
  """The one reading of a `metadata` argument, shared by every entry point that takes one.

  Args:
    metadata: an `MLAMetadata` (returned as it is), FlashMLA's
      `(tile_scheduler_metadata, num_splits)` pair, or None (returned as None: the caller
      computes the schedule or does without). The arrays are not checked here; the entry point
      checks them against its batch (`shapes.check_scheduler_records`).
    num_sms: for a pair, the SM count its records were scheduled for. A pair does not carry
      one, so by default the local GPU's count is assumed (`local_num_sms()`: DEFAULT_NUM_SMS
      with no GPU attached); it matters only where a sharded decode recomputes the records per
      device.

  Raises:
    TypeError: `metadata` is none of these (the message gives its type, and a tuple's length),
      or a hand-made `MLAMetadata` has a `num_sms` that is not an int.
  """
  if isinstance(metadata, MLAMetadata):
    shapes.check_static_int("metadata.num_sms", metadata.num_sms)
  if metadata is None or isinstance(metadata, MLAMetadata):
    return metadata
  if isinstance(metadata, tuple) and len(metadata) == 2:
    num_sms = local_num_sms() if num_sms is None else shapes.check_static_int("num_sms", num_sms)
    return MLAMetadata(*metadata, num_sms=num_sms)
  length = f" of length {len(metadata)}" if isinstance(metadata, tuple) else ""
  raise TypeError(f"metadata: expected MLAMetadata, a (tile_scheduler_metadata, num_splits) "
                  f"pair or None, got {type(metadata).__name__}{length}")


def get_mla_metadata(
    cache_seqlens: jax.Array,
    num_q_tokens_per_head_k: int,
    num_heads_k: int = 1,
    *,
    num_sms: int | None = None,
    implementation: str | None = None,
) -> MLAMetadata:
  """Schedules split-KV work for one decode step, on the device (no host sync).

  Args:
    cache_seqlens: `[b]` int32 lengths of the step (the values the decode calls will see).
    num_q_tokens_per_head_k: `s_q * h_q // h_kv`, the query rows sharing one KV head.
    num_heads_k: `h_kv`.
    num_sms: SMs to fill; defaults to the local GPU's count (132 when no GPU is attached, e.g.
      when exporting on a CPU host for an H100/H200).
    implementation: None, "cuda" or "xla", as for `flash_mla_with_kvcache`.

  Returns:
    `MLAMetadata` (with `num_sms`), valid for every decode call of the step with the same
    `cache_seqlens`.
    The records describe the whole batch; a decode whose batch or heads are sharded recomputes
    them on each device for its own part (docs/sharding.md).
  """
  check_implementation(implementation)
  num_q_tokens_per_head_k = shapes.check_static_int("num_q_tokens_per_head_k",
                                                     num_q_tokens_per_head_k)
  num_heads_k = shapes.check_static_int("num_heads_k", num_heads_k)
  num_sms = local_num_sms() if num_sms is None else shapes.check_static_int("num_sms", num_sms)
  parts = shapes.num_sm_parts_for(num_sms, num_q_tokens_per_head_k, num_heads_k)
  sched, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=parts,
                                          implementation=implementation)
  return MLAMetadata(sched, num_splits, num_sms)
