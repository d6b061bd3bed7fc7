"""`flash_mla_with_kvcache`: paged MLA decode with FlashMLA's arguments, as a JAX operation."""

from __future__ import annotations

import jax

from jax_flashmla import shapes
from jax_flashmla.constants import HEAD_DIM_V
from jax_flashmla.metadata import MetadataLike, as_metadata, get_mla_metadata
from jax_flashmla.primitives import check_implementation, mla_decode_p
from jax_flashmla.reference import default_softmax_scale


def flash_mla_with_kvcache(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    head_dim_v: int = HEAD_DIM_V,
    metadata: MetadataLike = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    implementation: str | None = None,
    num_sms: int | None = None,
    num_pools: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Multi-head latent attention decode over a paged cache (absorbed weights: MQA, d=576).

  Args:
    q: `[b, s_q, h_q, 576]` bfloat16 queries (512 absorbed latent + 64 RoPE).
    k_cache: `[num_blocks, 64, h_kv, 576]`, q's dtype; V is its first `head_dim_v` columns.
    block_table: `[b, max_blocks]` int32 page ids of each row.
    cache_seqlens: `[b]` int32 tokens in the cache per row (0 allowed).
    head_dim_v: must be 512.
    metadata: `get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)` computed once per
      step and shared by every layer, or FlashMLA's `(tile_scheduler_metadata, num_splits)`
      pair (see `as_metadata`); None computes it here.
    softmax_scale: static float, default `576 ** -0.5`; models pass their own.
    causal: static bool; with `s_q > 1` token `s` sees keys `0 … len - s_q + s`.
    implementation: None (kernels on Hopper, pure JAX elsewhere), "cuda" or "xla".
    num_sms: SMs of one device to schedule for: used for `metadata=None` (see
      `get_mla_metadata`) and for the records each device recomputes when the batch or the
      heads are sharded. Default: `metadata.num_sms`, the count the metadata was built for;
      the local GPU's count with `metadata=None` or a pair.
    num_pools: static int. 1 (default): block-table ids index the whole `k_cache`. n > 1:
      `k_cache` is n equal pools stacked on its page axis, the batch is n equal groups of
      consecutive rows, and group j's ids index pool j (ids local to the pool; others read
      nothing). With the batch and the page axis sharded over the same mesh axes, each device
      then decodes its rows from its own pools, and the cache never moves (docs/sharding.md).

  Returns:
    `out [b, s_q, h_q, 512]` in q's dtype and `lse [b, h_q, s_q]` float32 (natural log; +inf
    where a row has nothing to attend, and there `out` is 0).
  """
  check_implementation(implementation)
  softmax_scale = shapes.check_static_float("softmax_scale", softmax_scale)
  causal = shapes.check_static_bool("causal", causal)
  shapes.check_head_dim_v(head_dim_v)
  shapes.check_decode_args_without_metadata(q, k_cache, block_table, cache_seqlens)
  shapes.check_kernel_dtype(q, implementation)
  num_pools = shapes.check_num_pools(num_pools, q.shape[0], k_cache.shape[0])
  b, s_q, h_q, d = q.shape
  h_kv = k_cache.shape[2]
  if num_sms is not None:
    num_sms = shapes.check_static_int("num_sms", num_sms)
  metadata = as_metadata(metadata, num_sms=num_sms)
  if metadata is None:
    metadata = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, num_sms=num_sms,
                                implementation=implementation)
  # Records built for another batch (or swapped, or hand-made) fail here, before binding.
  shapes.check_scheduler_records(metadata.tile_scheduler_metadata, metadata.num_splits, b)
  num_sms = metadata.num_sms if num_sms is None else num_sms
  return tuple(mla_decode_p.bind(
      q, k_cache, block_table, cache_seqlens, metadata.tile_scheduler_metadata,
      metadata.num_splits,
      softmax_scale=default_softmax_scale(d) if softmax_scale is None else softmax_scale,
      causal=causal and s_q > 1, implementation=implementation, num_pools=num_pools,
      num_sms=num_sms))
