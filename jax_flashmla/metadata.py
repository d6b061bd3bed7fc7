"""Split-KV scheduling records: computed once per decode step, shared by every layer."""

from __future__ import annotations

import dataclasses

import jax

from jax_flashmla import _extension, shapes
from jax_flashmla.constants import DEFAULT_NUM_SMS
from jax_flashmla.primitives import check_implementation, mla_metadata_p


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLAMetadata:
  """Scheduler output for one decode step (a pytree of two int32 arrays).

  Attributes:
    tile_scheduler_metadata: `[num_sm_parts, 8]` int32, one work record per CTA of the split
      axis (layout: `SchedRecord` in `src/kernels/params.h`).
    num_splits: `[b + 1]` int32, exclusive prefix sum of each request's number of splits.
  """

  tile_scheduler_metadata: jax.Array
  num_splits: jax.Array

  @property
  def num_sm_parts(self) -> int:
    return self.tile_scheduler_metadata.shape[0]


def local_num_sms() -> int:
  """SM count of the first local GPU, or DEFAULT_NUM_SMS when none is attached."""
  gpus = _extension.local_gpus()
  return int(getattr(gpus[0], "core_count", DEFAULT_NUM_SMS)) if gpus else DEFAULT_NUM_SMS


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
    `MLAMetadata`, valid for every decode call of the step with the same `cache_seqlens`.
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
  return MLAMetadata(sched, num_splits)
