"""Token-sparse MLA decode (DeepSeek-V3.2's DSA): each query token attends to its own top-k tokens.

FlashMLA's sparse decode, as a JAX operation. The cache is V3.2's FP8 one (656-byte rows,
`quantization.py`) with any number of tokens per block; each query token names the cache slots
it attends to (`indices`, `page * block_size + offset`), as the indexer chose them.

On a Hopper GPU it runs our sm90 sparse kernel (`src/kernels/sm90/decode/sparse/`, FFI target
`jax_flashmla_mla_sparse_decode_v1`); every other platform runs `sparse_decode_reference` (pure
JAX). The layering is the dense decode's:

- `mla_sparse_decode_p`, the primitive users bind: abstract evaluation, vmap, no gradient, and
  a lowering through `custom_partitioning` (batch- and head-parallel sharding);
- `mla_sparse_decode_local_p`, one device's decode: on 'cuda' the kernel (its scheduler records
  computed in the lowering, from the per-device `topk_length`, unless the call was given them),
  the pure-JAX lowering elsewhere; with `implementation=None` on 'cuda' where the kernel is
  missing (an extension built before it), the pure-JAX path warns (`KernelFallbackWarning`).

`topk_length` and `attn_sink` are optional for users but always operands of the primitives (all
topk indices, and a sink of -inf, change nothing). The scheduler records are optional operands:
both primitives take `(q, k_cache, indices, topk_length, attn_sink)` and, when the caller passed
`metadata` (`get_sparse_mla_metadata`, once per step), `(tile_scheduler_metadata, num_splits)`
after them. Without them the kernel's lowering schedules the call itself, as it always did; with
them it passes them to the kernel. Wherever the batch a device decodes is not the batch the
records were made for (a batch or head split, vmap's folded lanes) they are dropped and that
batch is scheduled in the lowering, as the dense decode does (`partitioning.py`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding

import numpy as np

from jax_flashmla import _compat, _extension, shapes
from jax_flashmla.constants import (FP8_ROW_BYTES, HEAD_DIM_K, HEAD_DIM_V, INT32_MAX,
                                    SCHED_RECORD_INTS, SPARSE_DECODE_TARGET)
from jax_flashmla.local_primitives import (_use_kernels, cached_jit_bind, check_implementation,
                                           kernels_could_run, mla_metadata_local_p,
                                           register_no_gradient, warn_fallback)
from jax_flashmla.metadata import (MetadataLike, MLAMetadata, as_metadata, get_mla_metadata,
                                   local_num_sms)
from jax_flashmla.partitioning import _count, _dim_axes, _in_rule_order, _spec
from jax_flashmla.quantization import CACHE_DTYPES, cache_bytes, dequantize_kv
from jax_flashmla.reference import default_softmax_scale, stale_requests

NO_KERNEL_REASON = ("this build of jax_flashmla has no sparse kernel (its extension predates "
                    "it); rebuild it")

# ------------------------------------------------------------------------------------------------
# Trace-time checks (each names the argument, what was expected and what was got)
# ------------------------------------------------------------------------------------------------


def _array(name, x) -> tuple:
  shapes._expect_array(name, x)
  return tuple(x.shape)


def check_sparse_args(q, k_cache, indices, topk_length=None, attn_sink=None) -> None:
  """Shapes and dtypes of a sparse decode (arrays or abstract values); raises on the first bad."""
  qs, ks, xs = _array("q", q), _array("k_cache", k_cache), _array("indices", indices)
  if len(qs) != 4:
    raise ValueError(f"q: expected rank 4 [b, s_q, h_q, 576], got shape {qs}")
  shapes._expect_dtype("q", q, (jnp.bfloat16,), "bfloat16 (the sparse decode reads an FP8 cache)")
  b, s_q, h_q, d = qs
  if d != HEAD_DIM_K:
    raise ValueError(f"q: expected head dim {HEAD_DIM_K} (512 latent + 64 RoPE), got {d} "
                     f"(shape {qs})")
  if not shapes.known(s_q, h_q):
    raise ValueError(f"q: expected known s_q and h_q (only the batch and the cache's blocks may "
                     f"be symbolic), got shape {qs}")
  if any(shapes.known(n) and n < 1 for n in (b, s_q, h_q)):
    raise ValueError(f"q: expected b, s_q, h_q >= 1, got shape {qs}")

  if len(ks) != 4:
    raise ValueError(f"k_cache: expected rank 4 [num_blocks, block_size, 1, 656] (an FP8 "
                     f"cache), got shape {ks}")
  shapes._expect_dtype("k_cache", k_cache, CACHE_DTYPES, "uint8 or float8_e4m3fn (an FP8 cache, quantize_kv)")
  num_blocks, block_size, h_kv, row = ks
  if row != FP8_ROW_BYTES:
    raise ValueError(f"k_cache: expected {FP8_ROW_BYTES} bytes per row (axis 3, an FP8 cache), "
                     f"got {row} (shape {ks})")
  if h_kv != 1:
    raise ValueError(f"k_cache: expected 1 KV head (axis 2; the sparse decode is MQA), got "
                     f"{h_kv} (shape {ks})")
  if not shapes.known(block_size) or block_size < 1:
    raise ValueError(f"k_cache: expected a known block_size >= 1 (axis 1), got shape {ks}")
  if shapes.known(num_blocks) and num_blocks < 1:
    raise ValueError(f"k_cache: expected num_blocks >= 1 (axis 0), got shape {ks}")
  if shapes.known(num_blocks) and num_blocks * block_size > INT32_MAX:
    raise ValueError(f"k_cache: expected num_blocks * block_size below 2**31 (indices are "
                     f"int32), got shape {ks}")

  if len(xs) != 3:
    raise ValueError(f"indices: expected rank 3 [b, s_q, topk], got shape {xs}")
  shapes._expect_dtype("indices", indices, (jnp.int32,))
  if xs[:2] != (b, s_q):
    raise ValueError(f"indices: expected shape ({b}, {s_q}, topk) (b and s_q of q), got {xs}")
  if not shapes.known(xs[2]) or xs[2] < 1:
    raise ValueError(f"indices: expected a known topk >= 1 (axis 2), got shape {xs}")

  if topk_length is not None:
    ts = _array("topk_length", topk_length)
    shapes._expect_dtype("topk_length", topk_length, (jnp.int32,))
    if ts != (b,):
      raise ValueError(f"topk_length: expected shape ({b},) (batch of q), got {ts}")
  if attn_sink is not None:
    ss = _array("attn_sink", attn_sink)
    shapes._expect_dtype("attn_sink", attn_sink, (jnp.float32,))
    if ss != (h_q,):
      raise ValueError(f"attn_sink: expected shape ({h_q},) (one per query head of q), got {ss}")


def _sparse_metadata_call(s_q, h_q, topk) -> str:
  return f"get_sparse_mla_metadata(topk_length, s_q={s_q}, h_q={h_q}, topk={topk})"


def check_sparse_metadata(metadata: MLAMetadata, b, s_q: int, h_q: int, topk: int) -> None:
  """Raises when `metadata` was not scheduled for a sparse decode of these shapes.

  Static checks (free, at trace time): the records of the dense decode (`get_mla_metadata`:
  requests are batch rows, lengths `cache_seqlens`), records for another `h_q` or `topk` (the
  shapes `get_sparse_mla_metadata` stores), records for another number of requests
  (`num_splits` is `[b * s_q + 1]`), and arrays of the wrong rank or dtype. A FlashMLA-style
  pair carries no shapes, so only its arrays are checked. Records of other lengths are caught
  when the decode runs: their requests are NaN (the kernel's fingerprint check, and the pure-JAX
  path's `stale_requests`).
  """
  call = _sparse_metadata_call(s_q, h_q, topk)
  if metadata.topk is None and metadata.num_q_tokens_per_head_k is not None:
    raise ValueError(
        f"metadata: expected the sparse decode's records ({call}), got the dense decode's "
        f"(get_mla_metadata, num_q_tokens_per_head_k={metadata.num_q_tokens_per_head_k}, "
        f"num_heads_k={metadata.num_heads_k}), whose requests are batch rows and whose lengths "
        f"are cache lengths")
  got = (metadata.num_q_tokens_per_head_k, metadata.num_heads_k, metadata.topk)
  if any(g is not None and g != w for g, w in zip(got, (h_q, 1, topk))):
    raise ValueError(
        f"metadata: expected records for this call's h_q={h_q} query heads (one KV head) and "
        f"topk={topk}, got metadata computed with h_q={got[0]}, num_heads_k={got[1]}, "
        f"topk={got[2]}; compute it with {call}")
  splits = metadata.num_splits
  requests = b * s_q
  if hasattr(splits, "shape") and tuple(splits.shape) != (requests + 1,):
    raise ValueError(
        f"metadata: expected num_splits of shape ({requests + 1},) (b * s_q + 1 = {b} * {s_q} + "
        f"1: one request per query token), got {tuple(splits.shape)} (metadata computed for "
        f"another batch or s_q? compute it with {call})")
  shapes.check_scheduler_records(metadata.tile_scheduler_metadata, splits, requests)


# ------------------------------------------------------------------------------------------------
# The pure-JAX decode
# ------------------------------------------------------------------------------------------------


def sparse_decode_reference(q, k_cache, indices, topk_length=None, attn_sink=None,
                            softmax_scale=None):
  """Token-sparse MLA decode in plain JAX (no checks: `flash_mla_sparse_decode` runs it).

  For row `i`, query token `s`, head `h`: the keys are the cache rows `indices[i, s, j]` for
  `j < clip(topk_length[i], 0, topk)` with an index in `[0, num_blocks * block_size)`, each
  dequantized (`dequantize_kv`); a duplicated index is a key as many times as it appears.
  Scores, softmax and `lse` are float32, as in the dense reference; `out` is then scaled by
  `1 / (1 + exp(attn_sink[h] - lse))` when a sink is given. Returns `out [b, s_q, h_q, 512]`
  bfloat16 and `lse [b, h_q, s_q]` float32 (+inf and out 0 where no index is valid).
  """
  b, s_q, h_q, d = q.shape
  topk = indices.shape[2]
  rows = cache_bytes(k_cache).reshape(-1, FP8_ROW_BYTES)  # token-major: page * bs + offset
  n = rows.shape[0]
  scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale

  valid = (indices >= 0) & (indices < n)  # [b, s_q, topk]
  if topk_length is not None:
    used = jnp.clip(topk_length, 0, topk)[:, None, None]
    valid &= jnp.arange(topk, dtype=jnp.int32)[None, None, :] < used
  # Gather through a clipped index, then select: an invalid index reads a real slot, whose bytes
  # (garbage, NaN) are dropped by the select, never multiplied by zero.
  kv = dequantize_kv(jnp.take(rows, jnp.clip(indices, 0, n - 1), axis=0))  # [b, s, t, 576]
  kv = jnp.where(valid[..., None], kv, jnp.zeros((), kv.dtype))

  scores = jnp.einsum("bshd,bstd->bsht", q, kv, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * jnp.float32(scale)
  scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m_safe)  # exactly 0 where masked
  l = jnp.sum(p, axis=-1)  # [b, s, h]
  o = jnp.einsum("bsht,bstv->bshv", p,
                 kv[..., :HEAD_DIM_V].astype(jnp.float32), preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST)
  empty = l == 0
  l_safe = jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, jnp.inf, jnp.log(l_safe) + m_safe[..., 0])  # [b, s, h]
  o = o / l_safe[..., None]
  if attn_sink is not None:
    # exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)): +inf sink -> 0, -inf -> 1.
    factor = 1.0 / (1.0 + jnp.exp(attn_sink[None, None, :] - lse))
    o = o * factor[..., None]
  # An empty row is 0 whatever the sink: selected, since a +inf sink gives inf - inf = NaN there.
  o = jnp.where(empty[..., None], 0.0, o)
  return o.astype(q.dtype), jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# One device's decode: (q, k_cache, indices, topk_length, attn_sink) -> (out, lse)
# ------------------------------------------------------------------------------------------------


def sparse_request_lengths(topk_length, topk: int, s_q: int):
  """The kernel's requests: query token `s` of batch row `i` is request `i * s_q + s`, whose
  length is the number of index slots it uses, `clip(topk_length[i], 0, topk)`: `[b * s_q]`."""
  used = jnp.clip(topk_length, 0, topk).astype(jnp.int32)
  return jnp.broadcast_to(used[:, None], (used.shape[0], s_q)).reshape(-1)


def _fallback_reason(platform: str) -> str | None:
  """Why implementation=None runs pure JAX where the sparse kernel could run (None if it runs)."""
  if not kernels_could_run(platform):
    return None
  missing = _extension.kernels_missing_reason()
  if missing is not None:
    return missing
  return None if _extension.has_sparse_kernel() else NO_KERNEL_REASON


def _use_kernel(implementation, platform: str) -> bool:
  """Whether a lowering for `platform` emits the sparse kernel (raises where it cannot)."""
  if implementation == "xla":
    return False
  if implementation is None:
    if platform != "cuda" or (_extension.local_gpus() and not _extension.local_hopper_gpus()):
      return False
    reason = _fallback_reason(platform)
    if reason is not None:
      warn_fallback(reason, what="sparse decode")
      return False
    return True
  # "cuda": the dense decode's rules (a non-CUDA platform, a GPU that is not a Hopper, an
  # extension without kernels on a GPU machine all raise), then this kernel's own.
  _use_kernels(implementation, platform)
  if _extension.local_gpus() and not _extension.has_sparse_kernel():
    raise RuntimeError(f"implementation='cuda': {NO_KERNEL_REASON} (build_info: "
                       f"{_extension.build_info()})")
  return True


def _abstract_eval(q, k_cache, indices, topk_length, attn_sink, *records, softmax_scale,
                   implementation, num_sms):
  del softmax_scale
  check_implementation(implementation)
  check_sparse_args(q, k_cache, indices, topk_length, attn_sink)
  b, s_q, h_q, _ = q.shape
  if num_sms is not None:
    shapes.check_static_int("num_sms", num_sms)
  if records:
    if len(records) != 2:
      raise ValueError(f"metadata: expected two arrays (tile_scheduler_metadata, num_splits), "
                       f"got {len(records)}")
    shapes.check_scheduler_records(*records, b * s_q)
  return (jax.core.ShapedArray((b, s_q, h_q, HEAD_DIM_V), jnp.dtype(jnp.bfloat16)),
          jax.core.ShapedArray((b, h_q, s_q), jnp.dtype(jnp.float32)))


def _plain(shape, dtype):
  return jax.core.ShapedArray(tuple(shape), jnp.dtype(dtype))


def _first(v):
  return v[0] if isinstance(v, (list, tuple)) else v


def _kernel_lowering(ctx, q, k_cache, indices, topk_length, attn_sink, *records, softmax_scale,
                     num_sms):
  """The FFI call, after the request lengths and (without `records`) the scheduler records.

  Without records they are computed here, on every call (one small kernel): each shard and each
  vmap lane then has records for its own lengths. The SM count is `num_sms`, or the local GPU's
  (132 without one) when None. Given records (the call's `metadata`, scheduled once per step)
  go to the kernel as they are. The lengths are computed here either way: they are a clip and a
  broadcast, and taken from this call's `topk_length` they are the ones the kernel checks the
  records' length fingerprints against.
  """
  avals = [_plain(a.shape, a.dtype) for a in ctx.avals_in]
  q_aval, k_aval, x_aval, t_aval, s_aval = avals[:5]
  b, s_q, h_q, _ = q_aval.shape
  topk = x_aval.shape[2]
  requests = b * s_q
  lens_aval = _plain((requests,), jnp.int32)

  if records:
    sched_aval, splits_aval = avals[5:]
    parts = sched_aval.shape[0]
    sched, splits = records
    lens_ctx = ctx.replace(avals_in=[t_aval], avals_out=[lens_aval])
    lens = _first(mlir.lower_fun(lambda tl: [sparse_request_lengths(tl, topk, s_q)],
                                 multiple_results=True)(lens_ctx, topk_length)[0])
  else:
    parts = shapes.num_sm_parts_for(local_num_sms() if num_sms is None else num_sms, h_q, 1)
    sched_aval = _plain((parts, SCHED_RECORD_INTS), jnp.int32)
    splits_aval = _plain((requests + 1,), jnp.int32)

    def metadata(tl):
      lens = sparse_request_lengths(tl, topk, s_q)
      sched, splits = mla_metadata_local_p.bind(lens, num_sm_parts=parts, implementation="cuda")
      return [lens, sched, splits]

    meta_ctx = ctx.replace(avals_in=[t_aval], avals_out=[lens_aval, sched_aval, splits_aval])
    lowered = mlir.lower_fun(metadata, multiple_results=True)(meta_ctx, topk_length)
    lens, sched, splits = (_first(v) for v in lowered)
  avals_out = [_plain((b, s_q, h_q, HEAD_DIM_V), jnp.bfloat16),
               _plain((b, h_q, s_q), jnp.float32),
               _plain((requests + parts, 1, h_q), jnp.float32),
               _plain((requests + parts, 1, h_q, HEAD_DIM_V), jnp.float32)]
  call_ctx = ctx.replace(avals_in=[q_aval, k_aval, x_aval, lens_aval, s_aval, sched_aval,
                                   splits_aval], avals_out=avals_out)
  results = jax.ffi.ffi_lowering(SPARSE_DECODE_TARGET)(
      call_ctx, q, k_cache, indices, lens, attn_sink, sched, splits,
      softmax_scale=np.float32(softmax_scale))
  return results[:2]


def sparse_decode_with_records(q, k_cache, indices, topk_length, attn_sink, sched,
                               num_splits, *, softmax_scale):
  """`sparse_decode_reference`, plus the kernel's check of given scheduler records: the rows of
  requests covered by a record scheduled for other lengths are NaN (`stale_requests`)."""
  del num_splits  # not fingerprinted
  b, s_q = q.shape[:2]
  out, lse = sparse_decode_reference(q, k_cache, indices, topk_length, attn_sink,
                                     softmax_scale=softmax_scale)
  lens = sparse_request_lengths(topk_length, indices.shape[2], s_q)
  stale = stale_requests(sched, lens).reshape(b, s_q)
  out = jnp.where(stale[:, :, None, None], jnp.array(jnp.nan, out.dtype), out)
  lse = jnp.where(stale[:, None, :], jnp.float32(jnp.nan), lse)
  return out, lse


def _local_lowering(ctx, *args, softmax_scale, implementation, num_sms, platform):
  platform = platform or ", ".join(_compat.lowering_platforms(ctx))
  if _use_kernel(implementation, platform):
    return _kernel_lowering(ctx, *args, softmax_scale=softmax_scale, num_sms=num_sms)
  decode = sparse_decode_with_records if len(args) > 5 else sparse_decode_reference
  fn = lambda *a: list(decode(*a, softmax_scale=softmax_scale))
  return mlir.lower_fun(fn, multiple_results=True)(_compat.without_varying_axes(ctx), *args)


mla_sparse_decode_local_p = Primitive("jax_flashmla_mla_sparse_decode_local")
mla_sparse_decode_local_p.multiple_results = True
mla_sparse_decode_local_p.def_impl(cached_jit_bind(mla_sparse_decode_local_p))
mla_sparse_decode_local_p.def_abstract_eval(_abstract_eval)
# Per platform, as the dense decode: a multi-platform export gets each platform's rule.
mlir.register_lowering(mla_sparse_decode_local_p,
                       lambda ctx, *a, **p: _local_lowering(ctx, *a, platform="cuda", **p),
                       platform="cuda")
mlir.register_lowering(mla_sparse_decode_local_p,
                       lambda ctx, *a, **p: _local_lowering(ctx, *a, platform=None, **p))


# ------------------------------------------------------------------------------------------------
# Sharding: batch-parallel (q, indices, topk_length) and head-parallel (q, attn_sink), any mix;
# the cache replicated (indices address the whole cache). Factors: b batch, s query tokens, h
# heads, d = 576, n blocks, p block slots, k the KV head, w the 656-byte row, t topk, v = 512,
# r e / c the scheduler records (when the call was given them).
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SparseConfig:
  softmax_scale: float
  implementation: str | None
  num_sms: int | None = None  # SMs of one device, for records scheduled in the lowering


SPARSE_RULE = "b s h d, n p k w, b s t, b, h -> b s h v, b h s"
# Blocks are not listed: a cache split on them is refused by name rather than gathered.
SPARSE_REPLICATED = "s d p k w t v"
# With the records: they describe the whole batch, so they are never split.
SPARSE_RECORDS_RULE = "b s h d, n p k w, b s t, b, h, r e, c -> b s h v, b h s"
SPARSE_RECORDS_REPLICATED = SPARSE_REPLICATED + " r e c"


def _on_device(q, k_cache, indices, topk_length, attn_sink, config: SparseConfig):
  return tuple(mla_sparse_decode_local_p.bind(
      q, k_cache, indices, topk_length, attn_sink, softmax_scale=config.softmax_scale,
      implementation=config.implementation, num_sms=config.num_sms))


def _on_device_with_records(q, k_cache, indices, topk_length, attn_sink, sched, num_splits,
                            config: SparseConfig):
  return tuple(mla_sparse_decode_local_p.bind(
      q, k_cache, indices, topk_length, attn_sink, sched, num_splits,
      softmax_scale=config.softmax_scale, implementation=config.implementation,
      num_sms=config.num_sms))


def _partition(config: SparseConfig, mesh, arg_shapes, result_shape):
  """Per-device shardings and computation. Given records describe the whole batch: with the
  batch or the heads split, each device drops them and schedules its own part in the lowering
  (for `config.num_sms`), as the dense decode does; unsplit, the records are used."""
  del result_shape  # follows from the operands
  q, k_cache = arg_shapes[0], arg_shapes[1]
  b, _, h_q, _ = q.shape
  q_axes = _dim_axes(q.sharding, 4)
  batch, heads = q_axes[0], q_axes[2]
  where = (f"q {tuple(q.shape)} sharded {q.sharding.spec}, k_cache {tuple(k_cache.shape)} "
           f"sharded {k_cache.sharding.spec}")
  if any(_dim_axes(k_cache.sharding, 4)):
    raise ValueError(f"jax_flashmla: the sparse decode's indices address the whole cache, so "
                     f"k_cache must be replicated (a split cache would be gathered onto every "
                     f"device); {where}")
  kb, kh = _count(mesh, batch), _count(mesh, heads)
  if b % kb or h_q % kh:
    raise ValueError(f"jax_flashmla: batch {b} and heads {h_q} must split evenly over their "
                     f"mesh axes ({kb} and {kh} shards); {where}")
  named = lambda *specs: tuple(NamedSharding(mesh, s) for s in specs)
  specs = [_spec(batch, (), heads, ()), _spec(), _spec(batch, (), ()), _spec(batch),
           _spec(heads)]
  results = named(_spec(batch, (), heads, ()), _spec(batch, heads, ()))
  if len(arg_shapes) == 5:
    lower = lambda *a: _on_device(*a, config)
  elif kb > 1 or kh > 1:
    specs += [_spec(), _spec()]
    lower = lambda *a: _on_device(*a[:5], config)  # records of this device's part, scheduled
  else:
    specs += [_spec(), _spec()]
    lower = lambda *a: _on_device_with_records(*a, config)
  return mesh, lower, results, named(*specs)


_sparse_op = custom_partitioning(_on_device, static_argnums=(5,))
_sparse_op.def_partition(_partition, sharding_rule=SPARSE_RULE,
                         need_replication_factors=_in_rule_order(SPARSE_RULE, SPARSE_REPLICATED))
_sparse_records_op = custom_partitioning(_on_device_with_records, static_argnums=(7,))
_sparse_records_op.def_partition(
    _partition, sharding_rule=SPARSE_RECORDS_RULE,
    need_replication_factors=_in_rule_order(SPARSE_RECORDS_RULE, SPARSE_RECORDS_REPLICATED))


def _lowering(ctx, *args, softmax_scale, implementation, num_sms):
  config = SparseConfig(softmax_scale, implementation, num_sms)
  op = _sparse_op if len(args) == 5 else _sparse_records_op
  return mlir.lower_fun(lambda *a: list(op(*a, config)), multiple_results=True)(ctx, *args)


# ------------------------------------------------------------------------------------------------
# The primitive users bind: vmap, no gradient, lowering through the partitioning rule.
# ------------------------------------------------------------------------------------------------

mla_sparse_decode_p = Primitive("jax_flashmla_mla_sparse_decode")
mla_sparse_decode_p.multiple_results = True
mla_sparse_decode_p.def_impl(cached_jit_bind(mla_sparse_decode_p))
mla_sparse_decode_p.def_abstract_eval(_abstract_eval)


def _batch(args, dims, **params):
  nm = None  # batching.not_mapped
  lanes = next(a.shape[d] for a, d in zip(args, dims) if d is not nm)
  # Given scheduler records describe one lane's batch, not the batch decoded below (the lanes
  # folded into it, or each lane in turn): they are dropped, and the lowering schedules that
  # batch itself (for `num_sms`), as the dense decode recomputes them for its folded batch.
  args, dims = args[:5], dims[:5]
  q, k_cache, indices, topk_length, attn_sink = (
      x if d is nm else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims))
  qd, kd, xd, td, sd = dims

  if sd is not nm:
    # A sink per lane is per head, not per batch row, so it does not fold: run lanes in turn.
    def lane(xs):
      it = iter(xs)
      return tuple(mla_sparse_decode_p.bind(*(x if d is nm else next(it) for x, d in
                                              zip((q, k_cache, indices, topk_length, attn_sink),
                                                  dims)), **params))
    out, lse = lax.map(lane, [x for x, d in zip((q, k_cache, indices, topk_length, attn_sink),
                                                dims) if d is not nm])
    return [out, lse], [0, 0]

  # Otherwise each lane's rows become more batch rows.
  first = lambda x, d: jnp.broadcast_to(x, (lanes,) + x.shape) if d is nm else x
  q, indices, topk_length = first(q, qd), first(indices, xd), first(topk_length, td)
  if kd is not nm:
    # One cache per lane: stack them and move each lane's indices into its own cache; invalid
    # ones become -1, so they stay invalid.
    n = math.prod(k_cache.shape[1:3])
    k_cache = k_cache.reshape((lanes * k_cache.shape[1],) + k_cache.shape[2:])
    valid = (indices >= 0) & (indices < n)
    offset = (jnp.arange(lanes, dtype=jnp.int32) * n)[:, None, None, None]
    indices = jnp.where(valid, indices + offset, -1)
  b = q.shape[1]
  fold = lambda x: x.reshape((lanes * b,) + x.shape[2:])
  out, lse = mla_sparse_decode_p.bind(fold(q), k_cache, fold(indices), fold(topk_length),
                                      attn_sink, **params)
  return [out.reshape((lanes, b) + out.shape[1:]), lse.reshape((lanes, b) + lse.shape[1:])], [0, 0]


mlir.register_lowering(mla_sparse_decode_p, _lowering)
batching.primitive_batchers[mla_sparse_decode_p] = _batch
register_no_gradient(mla_sparse_decode_p, "sparse decode",
                     "jax_flashmla.sparse.sparse_decode_reference")
_compat.require_devices_during_lowering(mla_sparse_decode_p)


# ------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------


def flash_mla_sparse_decode(
    q: jax.Array,
    k_cache: jax.Array,
    indices: jax.Array,
    *,
    topk_length: jax.Array | None = None,
    attn_sink: jax.Array | None = None,
    softmax_scale: float | None = None,
    metadata: MetadataLike = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Token-sparse MLA decode over an FP8 cache (DeepSeek-V3.2's DSA; FlashMLA's sparse decode).

  For batch row `i`, query token `s` and head `h`, the keys are the cache rows named by
  `indices[i, s, :k]`, `k = clip(topk_length[i], 0, topk)` (all `topk` without it):

    K[j] = dequantize_kv(k_cache.reshape(-1, 656)[indices[i, s, j]])   (index = page * bs + offset)
    scores[j] = softmax_scale * q[i, s, h] · K[j]            over the valid j
    out[i, s, h] = Σ_j softmax(scores)[j] · K[j, :512]
    lse[i, h, s] = log Σ_j exp(scores[j])                    (natural log)

  An index `< 0` or `>= num_blocks * block_size` is invalid and skipped; only the rows valid
  indices name are read, so other slots may hold anything (NaN bytes included). A duplicated
  index counts each time it appears (it is that many keys). No valid index: `out = 0`,
  `lse = +inf`. With `attn_sink`, `out` is multiplied by `exp(lse) / (exp(lse) +
  exp(attn_sink[h]))` (a +inf sink gives 0, -inf changes nothing; an empty row stays 0) and
  `lse` is unchanged. Scores and softmax are float32.

  On a Hopper GPU (and lowered for 'cuda' with no GPU attached, as when exporting) this runs
  our sm90 sparse kernel; elsewhere the pure-JAX path. With `implementation=None` and an
  extension built before the kernel existed, 'cuda' runs the pure-JAX path and warns
  (`KernelFallbackWarning`).

  Args:
    q: `[b, s_q, h_q, 576]` bfloat16 (512 absorbed latent + 64 RoPE).
    k_cache: `[num_blocks, block_size, 1, 656]` uint8 or float8_e4m3fn, V3.2's FP8 rows
      (`quantize_kv`); any `block_size >= 1`.
    indices: `[b, s_q, topk]` int32 token slots, `topk >= 1`.
    topk_length: optional `[b]` int32: row `i` uses only its first `topk_length[i]` indices.
    attn_sink: optional `[h_q]` float32, one logit per head.
    softmax_scale: static float, default `576 ** -0.5`.
    metadata: the kernel's split-KV scheduler records, `get_sparse_mla_metadata(topk_length,
      s_q=, h_q=, topk=)` computed once per step and shared by every layer (each layer has its
      own indices, but the same lengths and shapes), or a `(tile_scheduler_metadata,
      num_splits)` pair of its arrays (see `as_metadata`). None (default) schedules each call
      itself. Records scheduled for another `h_q`, `topk` or number of requests (`b * s_q`), or
      the dense decode's (`get_mla_metadata`), raise; records scheduled for other lengths give
      NaN `out` and `lse` rows for the query tokens they cover, on every platform (the
      kernel's check, which the pure-JAX path repeats). The records describe the whole batch:
      where the batch or the heads are sharded, each device schedules its own part instead
      (for `metadata.num_sms`), and under vmap the decoded batch (the lanes folded into it) is
      scheduled in the call, as the dense decode does; the results are the same.
    implementation: None (the kernel where it can run), "xla" (the pure-JAX path) or "cuda"
      (the kernel; raises where it cannot run).

  Returns:
    `out [b, s_q, h_q, 512]` bfloat16 and `lse [b, h_q, s_q]` float32.

  Raises:
    TypeError, ValueError: a wrong dtype, rank or shape (naming the argument, what was expected
      and what was got), a bad static argument, or `metadata` scheduled for other shapes.
    ValueError, RuntimeError: `implementation="cuda"` where the kernel cannot run (another
      platform, a GPU that is not a Hopper, an extension without it).
    NotImplementedError: under `jax.grad` (inference-only).

  Example:
    >>> q = jnp.zeros((2, 1, 16, 576), jnp.bfloat16)
    >>> k_cache = quantize_kv(jnp.ones((4, 64, 1, 576), jnp.bfloat16))
    >>> indices = jnp.asarray([[[0, 65, -1]], [[3, 3, 300]]], jnp.int32)
    >>> out, lse = flash_mla_sparse_decode(q, k_cache, indices, implementation="xla")
    >>> out.shape, lse.shape
    ((2, 1, 16, 512), (2, 16, 1))
    >>> md = get_sparse_mla_metadata(None, batch=2, s_q=1, h_q=16, topk=3)   # once per step
    >>> out, lse = flash_mla_sparse_decode(q, k_cache, indices, metadata=md,
    ...                                    implementation="xla")
    >>> out.shape, lse.shape
    ((2, 1, 16, 512), (2, 16, 1))
  """
  check_implementation(implementation)
  softmax_scale = shapes.check_static_float("softmax_scale", softmax_scale)
  check_sparse_args(q, k_cache, indices, topk_length, attn_sink)
  b, s_q, h_q, d = q.shape
  topk = indices.shape[2]
  metadata = as_metadata(metadata)
  records, num_sms = (), None
  if metadata is not None:
    check_sparse_metadata(metadata, b, s_q, h_q, topk)
    records = (metadata.tile_scheduler_metadata, metadata.num_splits)
    num_sms = metadata.num_sms
  if topk_length is None:
    topk_length = jnp.full((b,), topk, jnp.int32)
  if attn_sink is None:
    attn_sink = jnp.full((h_q,), -jnp.inf, jnp.float32)  # exactly a factor of 1
  return tuple(mla_sparse_decode_p.bind(
      q, cache_bytes(k_cache), indices, topk_length, attn_sink, *records,
      softmax_scale=default_softmax_scale(d) if softmax_scale is None else softmax_scale,
      implementation=implementation, num_sms=num_sms))


def get_sparse_mla_metadata(
    topk_length: jax.Array | None = None,
    *,
    s_q: int,
    h_q: int,
    topk: int,
    batch: int | None = None,
    num_sms: int | None = None,
    implementation: str | None = None,
) -> MLAMetadata:
  """Schedules one step's sparse decodes, on the device (no host sync): FlashMLA's
  `get_mla_metadata()` for its sparse decode.

  The sparse kernel decodes one request per query token: token `s` of batch row `i` is request
  `i * s_q + s`, with `h_q` query rows over the one KV head and a length of
  `clip(topk_length[i], 0, topk)` index slots (`topk` without `topk_length`). Its records are
  the dense scheduler's for those requests (`get_mla_metadata(lengths, h_q, 1)`). Every layer of
  a step has the same lengths and shapes, so compute this once per step and pass it to each
  layer's `flash_mla_sparse_decode(..., metadata=...)` (or `flash_mla_with_kvcache(...,
  metadata=..., indices=...)`).

  Args:
    topk_length: `[b]` int32, the `topk_length` the step's decodes get, or None where they get
      none (every index slot is used).
    s_q: static int, query tokens per batch row (`q.shape[1]`).
    h_q: static int, query heads of the decodes (`q.shape[2]`).
    topk: static int, index slots per query token (`indices.shape[2]`).
    batch: static int, the batch `b`; needed only without `topk_length` (and must agree with
      it otherwise).
    num_sms: static int, SMs to fill; defaults to the local GPU's count (132 when no GPU is
      attached, e.g. when exporting on a CPU host for an H100/H200).
    implementation: None, "cuda" or "xla", as for the decode.

  Returns:
    `MLAMetadata`: `tile_scheduler_metadata [num_sm_parts, 8]` int32 (`num_sm_parts =
    min(max(num_sms // ceil(h_q / 64), 1), 160)`) and `num_splits [b * s_q + 1]` int32, with
    `num_sms`, `num_q_tokens_per_head_k = h_q`, `num_heads_k = 1` and `topk` as static data. A
    decode with another `h_q`, `topk` or `b * s_q` raises; one with other lengths returns NaN
    rows for the query tokens of the records whose length fingerprint no longer matches.

  Raises:
    TypeError: `topk_length` is not an int32 array, or a static argument is not an int.
    ValueError: `topk_length` is not `[b]`, `batch` is missing without it or disagrees with it,
      a static int is below 1, or `implementation` is unknown.

  Example:
    >>> md = get_sparse_mla_metadata(jnp.asarray([2048, 100], jnp.int32), s_q=2, h_q=128,
    ...                              topk=2048, num_sms=132)
    >>> md.tile_scheduler_metadata.shape, md.num_splits.shape
    ((66, 8), (5,))
  """
  check_implementation(implementation)
  s_q = shapes.check_static_int("s_q", s_q)
  h_q = shapes.check_static_int("h_q", h_q)
  topk = shapes.check_static_int("topk", topk)
  if batch is not None:
    batch = shapes.check_static_int("batch", batch)
  if topk_length is None:
    if batch is None:
      raise ValueError("batch: expected the batch size (a static int) when topk_length is None, "
                       "got None")
    topk_length = jnp.full((batch,), topk, jnp.int32)
  else:
    ts = _array("topk_length", topk_length)
    shapes._expect_dtype("topk_length", topk_length, (jnp.int32,))
    if len(ts) != 1 or (shapes.known(ts[0]) and ts[0] < 1):
      raise ValueError(f"topk_length: expected shape [b] with b >= 1, got shape {ts}")
    if batch is not None and (not shapes.known(ts[0]) or ts[0] != batch):
      raise ValueError(f"batch: expected topk_length's batch {ts[0]} (or None), got {batch}")
  lengths = sparse_request_lengths(topk_length, topk, s_q)
  md = get_mla_metadata(lengths, h_q, 1, num_sms=num_sms, implementation=implementation)
  return dataclasses.replace(md, topk=topk)
