"""`flash_mla_with_kvcache`: paged MLA decode with FlashMLA's arguments, as a JAX operation."""

from __future__ import annotations

import jax

from jax_flashmla import shapes
from jax_flashmla.constants import HEAD_DIM_V
from jax_flashmla.metadata import (MetadataLike, as_metadata, check_metadata_for,
                                   get_mla_metadata)
from jax_flashmla.primitives import check_implementation, mla_decode_p
from jax_flashmla.quantization import cache_bytes, is_fp8_cache
from jax_flashmla.reference import default_softmax_scale
from jax_flashmla.sparse import flash_mla_sparse_decode


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
    is_fp8_kvcache: bool | None = None,
    implementation: str | None = None,
    num_sms: int | None = None,
    num_pools: int = 1,
    indices: jax.Array | None = None,
    topk_length: jax.Array | None = None,
    attn_sink: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Multi-head latent attention decode over a paged cache (absorbed weights: MQA, d=576).

  FlashMLA's `flash_mla_with_kvcache`, as a JAX operation: the CUDA kernels on a Hopper GPU,
  the same numerics in plain JAX elsewhere (docs/design.md#numerics-contract). For batch row
  `i`, query token `s` and query head `h` (sharing KV head `h // (h_q // h_kv)`):

    scores[t] = softmax_scale * q[i, s, h] · K[t]          over the visible keys t
    out[i, s, h] = Σ_t softmax(scores)[t] · K[t, :512]      (V is the first 512 columns)
    lse[i, h, s] = log Σ_t exp(scores[t])                  (natural log)

  `K[t]` is token `t` of row `i`: slot `t % 64` of page `block_table[i, t // 64]`. Visible
  keys: `t < len = clip(cache_seqlens[i], 0, max_blocks * 64)` on a page id in
  `[0, num_blocks)` (other ids are never read: their keys are masked), and with `causal` and
  `s_q > 1` also `t <= len - s_q + s` (bottom-right aligned: the step's tokens are the last
  `s_q` of the row). A row with no visible key gets `out = 0` and `lse = +inf`. Scores and the
  softmax are float32; cache slots past a row's length may hold anything, NaN included.

  Shapes: `b` batch, `s_q` query tokens per row, `h_q` query heads, `h_kv` KV heads
  (`h_q % h_kv == 0`; 1 for DeepSeek), `d = 576` (512 latent + 64 RoPE), `d_v = 512`,
  `num_blocks` pages of 64 tokens, `max_blocks` block-table columns. The batch and
  `max_blocks` (and `num_blocks`) may be symbolic (`jax.export` with symbolic shapes).

  Args:
    q: `[b, s_q, h_q, d]` queries (512 absorbed latent + 64 RoPE): bfloat16 or float16 for the
      kernels (`shapes.KERNEL_DTYPES`), float32 too on the pure-JAX path.
    k_cache: `[num_blocks, 64, h_kv, d]` in q's dtype; V is its first `d_v` columns. Or an
      FP8 cache `[num_blocks, 64, h_kv, 656]` uint8 (or float8_e4m3fn: FlashMLA's dtype for
      the same bytes) of DeepSeek-V3.2's rows (`quantize_kv`), with a bfloat16 q: the same
      computation over `dequantize_kv(k_cache)`, reading 656 bytes per token instead of 1152.
    block_table: `[b, max_blocks]` int32 page ids of each row.
    cache_seqlens: `[b]` int32 tokens in the cache per row (0 allowed).
    head_dim_v: must be 512 (FlashMLA's argument; the 5th positional argument).
    metadata: `get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)` computed once per
      step and shared by every layer, or FlashMLA's `(tile_scheduler_metadata, num_splits)`
      pair (see `as_metadata`); None computes it here. An `MLAMetadata` computed for another
      `s_q * h_q // h_kv` or `h_kv` raises; records computed for other lengths give NaN rows
      (below). A pair carries no shapes, so only its lengths are checked.
    softmax_scale: static float, default `576 ** -0.5`; models pass their own.
    causal: static bool; with `s_q > 1` token `s` sees keys `0 … len - s_q + s`.
    is_fp8_kvcache: FlashMLA's flag. None (default) reads the format from k_cache's dtype;
      True or False must agree with it.
    implementation: None (the kernels on a Hopper GPU with the CUDA build, pure JAX
      elsewhere; falling back where the kernels could run, e.g. for float32, warns with the
      reason), "cuda" (the kernels or an error) or "xla" (pure JAX everywhere).
    num_sms: SMs of one device to schedule for: used for `metadata=None` (see
      `get_mla_metadata`) and for the records each device recomputes when the batch or the
      heads are sharded. Default: `metadata.num_sms`, the count the metadata was built for;
      the local GPU's count with `metadata=None` or a pair.
    num_pools: static int. 1 (default): block-table ids index the whole `k_cache`. n > 1:
      `k_cache` is n equal pools stacked on its page axis, the batch is n equal groups of
      consecutive rows, and group j's ids index pool j (ids local to the pool; others read
      nothing). With the batch and the page axis sharded over the same mesh axes, each device
      then decodes its rows from its own pools, and the cache never moves (docs/sharding.md).
    indices: FlashMLA's sparse decode (DeepSeek-V3.2): `[b, s_q, topk]` int32 cache slots
      (`page * block_size + offset`) each query token attends to. Given, the call is
      `flash_mla_sparse_decode(q, k_cache, indices, topk_length=, attn_sink=, softmax_scale=,
      metadata=, implementation=)` (see there), and block_table, cache_seqlens and num_sms
      must be None, causal False, num_pools 1. `metadata` is then the sparse decode's:
      `get_sparse_mla_metadata(topk_length, s_q=, h_q=, topk=)` once per step (or the pair of
      its arrays); the dense decode's raises.
    topk_length, attn_sink: with `indices` only: `[b]` int32 indices used per row, `[h_q]`
      float32 sink logits.

  Returns:
    `out [b, s_q, h_q, d_v]` in q's dtype and `lse [b, h_q, s_q]` float32 (natural log; +inf
    where a row has nothing to attend, and there `out` is 0). Rows of requests covered by a
    scheduler record whose length fingerprint does not match `cache_seqlens` (records of
    another step, or of permuted lengths) are NaN in both, on every platform.

  Raises:
    TypeError: an array argument is not an array (a list: wrap it with `jnp.asarray`) or has
      the wrong dtype (q and k_cache must share one; an FP8 cache needs a bfloat16 q), a
      static argument is traced or of the wrong type, metadata was passed as the 5th
      positional argument (`head_dim_v`), or `implementation="cuda"` with a dtype the kernels
      do not take.
    ValueError: wrong ranks or shapes (each message names the argument, what was expected and
      what was got), `is_fp8_kvcache` disagreeing with k_cache, `head_dim_v != 512`, metadata
      computed for another batch or other shapes (or for the other decode: the sparse
      decode's without `indices`, the dense one's with), a `num_pools` that does not divide
      the batch and the pages, or `implementation="cuda"` lowered for a platform other than a
      Hopper GPU. With `indices`: a dense-only argument that is not left at its default;
      without: `topk_length` or `attn_sink` given.
    NotImplementedError: under `jax.grad` (the op is inference-only; differentiate
      `flash_mla_reference`).

  Example:
    >>> b, s_q, h_q, h_kv = 2, 1, 16, 1
    >>> q = jnp.zeros((b, s_q, h_q, 576), jnp.bfloat16)
    >>> k_cache = jnp.zeros((4, 64, h_kv, 576), jnp.bfloat16)
    >>> block_table = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    >>> cache_seqlens = jnp.asarray([100, 10], jnp.int32)
    >>> md = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)   # once per step
    >>> out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
    ...                                   metadata=md, softmax_scale=192 ** -0.5)
    >>> out.shape, lse.shape
    ((2, 1, 16, 512), (2, 16, 1))
  """
  if indices is not None:
    return _sparse(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale,
                   causal, is_fp8_kvcache, implementation, num_sms, num_pools, indices,
                   topk_length, attn_sink)
  for name, value in (("topk_length", topk_length), ("attn_sink", attn_sink)):
    if value is not None:
      raise ValueError(f"{name}: expected None without indices (it belongs to the sparse "
                       f"decode), got {type(value).__name__}")
  check_implementation(implementation)
  softmax_scale = shapes.check_static_float("softmax_scale", softmax_scale)
  causal = shapes.check_static_bool("causal", causal)
  shapes.check_head_dim_v(head_dim_v)
  shapes.check_decode_args_without_metadata(q, k_cache, block_table, cache_seqlens)
  shapes.check_fp8_flag(is_fp8_kvcache, k_cache)
  shapes.check_kernel_dtype(q, implementation)
  k_cache = cache_bytes(k_cache) if is_fp8_cache(k_cache) else k_cache
  num_pools = shapes.check_num_pools(num_pools, q.shape[0], k_cache.shape[0])
  b, s_q, h_q, d = q.shape
  h_kv = k_cache.shape[2]
  if num_sms is not None:
    num_sms = shapes.check_static_int("num_sms", num_sms)
  metadata = as_metadata(metadata, num_sms=num_sms)
  if metadata is not None:
    check_metadata_for(metadata, s_q * h_q // h_kv, h_kv)
  else:
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


def _sparse(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, softmax_scale, causal,
            is_fp8_kvcache, implementation, num_sms, num_pools, indices, topk_length, attn_sink):
  """FlashMLA's sparse call: the dense-only arguments must be left at their defaults."""
  shapes.check_head_dim_v(head_dim_v)
  unused = (("block_table", block_table, None), ("cache_seqlens", cache_seqlens, None),
            ("num_sms", num_sms, None))
  for name, value, default in unused:
    if value is not default:
      raise ValueError(f"{name}: expected None with indices (the sparse decode reads the tokens "
                       f"indices names; it takes no {name}), got {type(value).__name__}")
  if shapes.check_static_bool("causal", causal):
    raise ValueError("causal: expected False with indices (the indices say which tokens each "
                     "query token sees), got True")
  if shapes.check_static_int("num_pools", num_pools) != 1:
    raise ValueError(f"num_pools: expected 1 with indices (they address the whole cache), got "
                     f"{num_pools}")
  if is_fp8_kvcache is not None and not shapes.check_static_bool("is_fp8_kvcache",
                                                                  is_fp8_kvcache):
    raise ValueError("is_fp8_kvcache: expected True or None with indices (the sparse decode "
                     "reads an FP8 cache), got False")
  return flash_mla_sparse_decode(q, k_cache, indices, topk_length=topk_length,
                                 attn_sink=attn_sink, softmax_scale=softmax_scale,
                                 metadata=metadata, implementation=implementation)
