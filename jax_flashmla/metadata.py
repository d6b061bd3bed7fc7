"""Split-KV scheduling records: computed once per decode step, shared by every layer."""

from __future__ import annotations

import dataclasses
import functools

import jax

from jax_flashmla import _extension, shapes
from jax_flashmla.constants import DEFAULT_NUM_SMS
from jax_flashmla.primitives import check_implementation, mla_metadata_p


# The ints are static (pytree aux data): they survive jit, vmap and tree_map and are never traced.
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("tile_scheduler_metadata", "num_splits"),
                   meta_fields=("num_sms", "num_q_tokens_per_head_k", "num_heads_k", "topk"))
@dataclasses.dataclass(frozen=True)
class MLAMetadata:
  """Scheduler output for one decode step (a pytree of two int32 arrays and static ints).

  Attributes:
    tile_scheduler_metadata: `[num_sm_parts, 8]` int32, one work record per CTA of the split
      axis (layout: `SchedRecord` in `src/kernels/params.h`). Each record carries a fingerprint
      of the lengths of the requests it covers; a decode given other lengths returns NaN rows
      for those requests (see `flash_mla_with_kvcache`).
    num_splits: `[b + 1]` int32, exclusive prefix sum of each request's number of splits.
    num_sms: the SM count the records were scheduled for. A decode whose batch or heads are
      sharded recomputes the records per device for this count, unless given its own.
    num_q_tokens_per_head_k: the `s_q * h_q // h_kv` the records were scheduled for (`h_q` for
      the sparse decode's, whose requests are query tokens); a decode with other shapes raises.
      None (a hand-made MLAMetadata) is not checked.
    num_heads_k: the `h_kv` the records were scheduled for, checked the same way.
    topk: None for the dense decode's records (`get_mla_metadata`); for the sparse decode's
      (`get_sparse_mla_metadata`), the `topk` (index slots per query token) they were scheduled
      for. Each decode refuses the other's records.
  """

  tile_scheduler_metadata: jax.Array
  num_splits: jax.Array
  num_sms: int
  num_q_tokens_per_head_k: int | None = None
  num_heads_k: int | None = None
  topk: int | None = None

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

    A pair carries no shapes either, so `check_metadata_for` cannot check it.

  Raises:
    TypeError: `metadata` is none of these (the message gives its type, and a tuple's length),
      or a hand-made `MLAMetadata` has a `num_sms` that is not an int (or shapes that are
      neither ints nor None).
  """
  if isinstance(metadata, MLAMetadata):
    shapes.check_static_int("metadata.num_sms", metadata.num_sms)
    for name in ("num_q_tokens_per_head_k", "num_heads_k", "topk"):
      if getattr(metadata, name) is not None:
        shapes.check_static_int(f"metadata.{name}", getattr(metadata, name))
  if metadata is None or isinstance(metadata, MLAMetadata):
    return metadata
  if isinstance(metadata, tuple) and len(metadata) == 2:
    num_sms = local_num_sms() if num_sms is None else shapes.check_static_int("num_sms", num_sms)
    return MLAMetadata(*metadata, num_sms=num_sms)
  length = f" of length {len(metadata)}" if isinstance(metadata, tuple) else ""
  raise TypeError(f"metadata: expected MLAMetadata, a (tile_scheduler_metadata, num_splits) "
                  f"pair or None, got {type(metadata).__name__}{length}")


def check_metadata_for(metadata: MLAMetadata, num_q_tokens_per_head_k: int,
                       num_heads_k: int) -> None:
  """Raises a ValueError when `metadata` was scheduled for other shapes than a decode call's.

  Free (static data, checked while tracing). Records scheduled for another number of query rows
  or KV heads still cover every page, but their split of the work was planned for the wrong
  grid. Fields that are None (a pair, a hand-made MLAMetadata) are not checked. The sparse
  decode's records (`topk` set) are refused.
  """
  if metadata.topk is not None:
    raise ValueError(
        f"metadata: expected the dense decode's records (get_mla_metadata(cache_seqlens, "
        f"{num_q_tokens_per_head_k}, {num_heads_k})), got the sparse decode's "
        f"(get_sparse_mla_metadata, topk={metadata.topk}), whose requests are query tokens and "
        f"whose lengths are index counts")
  got = (metadata.num_q_tokens_per_head_k, metadata.num_heads_k)
  want = (num_q_tokens_per_head_k, num_heads_k)
  if any(g is not None and g != w for g, w in zip(got, want)):
    raise ValueError(
        f"metadata: expected records for this call's {want[0]} query rows per KV head "
        f"(s_q * h_q // h_kv) and {want[1]} KV heads, got metadata computed with "
        f"num_q_tokens_per_head_k={got[0]}, num_heads_k={got[1]}; compute it with "
        f"get_mla_metadata(cache_seqlens, {want[0]}, {want[1]})")


def get_mla_metadata(
    cache_seqlens: jax.Array,
    num_q_tokens_per_head_k: int,
    num_heads_k: int = 1,
    *,
    num_sms: int | None = None,
    implementation: str | None = None,
) -> MLAMetadata:
  """Schedules split-KV work for one decode step, on the device (no host sync).

  The decode splits each request's pages into chunks and packs the chunks onto
  `num_sm_parts = min(max(num_sms // h_kv // ceil(num_q_tokens_per_head_k / 64), 1), 160)`
  parts, one CTA each, so that the grid fills the GPU once; requests split across parts are
  merged afterwards. Every layer of a step decodes the same lengths, so compute this once per
  step and pass it to each layer's `flash_mla_with_kvcache(..., metadata=...)`.

  Shapes: `b` batch (requests), `num_sm_parts` as above.

  Args:
    cache_seqlens: `[b]` int32 lengths of the step: the values the decode calls will see (after
      the step's tokens are written, e.g. `cache.lengths + num_new`).
    num_q_tokens_per_head_k: static int, `s_q * h_q // h_kv`: the query rows sharing one KV
      head in the decode calls.
    num_heads_k: static int, `h_kv` of the decode calls.
    num_sms: static int, SMs to fill; defaults to the local GPU's count (132 when no GPU is
      attached, e.g. when exporting on a CPU host for an H100/H200).
    implementation: None, "cuda" or "xla", as for `flash_mla_with_kvcache`.

  Returns:
    `MLAMetadata`: `tile_scheduler_metadata [num_sm_parts, 8]` int32 and `num_splits [b + 1]`
    int32, with `num_sms`, `num_q_tokens_per_head_k` and `num_heads_k` as static data. The
    records describe the whole batch; a decode whose batch or heads are sharded recomputes them
    on each device for its own part (docs/sharding.md).

    They are valid only for these lengths and shapes. A decode with other
    `num_q_tokens_per_head_k` or `num_heads_k` raises a ValueError; a decode given other
    lengths returns NaN `out` and `lse` rows for the requests of every record whose length
    fingerprint no longer matches (on every platform).

  Raises:
    TypeError: `cache_seqlens` is not an int32 array (a list: wrap it with `jnp.asarray`), or
      a static argument is not an int.
    ValueError: `cache_seqlens` is not `[b]` with `b >= 1`, a static int is below 1, or
      `implementation` is unknown (or "cuda" where the kernels cannot run, when lowered).

  Example:
    >>> lens = jnp.asarray([100, 10], jnp.int32)
    >>> md = get_mla_metadata(lens, 1 * 16 // 1, 1, num_sms=132)   # s_q=1, h_q=16, h_kv=1
    >>> md.tile_scheduler_metadata.shape, md.num_splits.shape
    ((132, 8), (3,))
  """
  check_implementation(implementation)
  num_q_tokens_per_head_k = shapes.check_static_int("num_q_tokens_per_head_k",
                                                     num_q_tokens_per_head_k)
  num_heads_k = shapes.check_static_int("num_heads_k", num_heads_k)
  num_sms = local_num_sms() if num_sms is None else shapes.check_static_int("num_sms", num_sms)
  parts = shapes.num_sm_parts_for(num_sms, num_q_tokens_per_head_k, num_heads_k)
  # Before binding: JAX's own message for a list is about "a JAX value", not the argument.
  shapes.check_metadata_args(cache_seqlens, parts)
  sched, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=parts,
                                          implementation=implementation)
  return MLAMetadata(sched, num_splits, num_sms, num_q_tokens_per_head_k, num_heads_k)
