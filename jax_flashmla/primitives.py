"""The two JAX primitives: the split-KV scheduler and the paged MLA decode.

Each primitive has an abstract evaluation (all shape/dtype checks), a CUDA lowering to our XLA
FFI targets, a lowering for every other platform that runs the pure-JAX twin from
`reference.py`, a batching rule, and (for decode) a clear "no gradient" rule.

`implementation` is a static parameter of both primitives:
  - "xla": the pure-JAX path on every platform;
  - "cuda": the CUDA kernels; lowering for any other platform raises;
  - None: the kernels where they can run (CUDA lowering, extension built with CUDA, GPU is
    Hopper or no GPU is attached, as when exporting), the pure-JAX path otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_flashmla import _extension, shapes
from jax_flashmla.reference import flash_mla_reference, mla_metadata_reference

IMPLEMENTATIONS = (None, "cuda", "xla")


def check_implementation(implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected one of None, 'cuda', 'xla', got "
                     f"{implementation!r}")


def _use_kernels(implementation, platform: str) -> bool:
  """Whether a lowering for `platform` emits our FFI calls (raises where it cannot)."""
  if implementation == "xla":
    return False
  if platform != "cuda":
    if implementation == "cuda":
      raise ValueError(
          "implementation='cuda' needs an NVIDIA Hopper GPU (sm_90a), but this computation is "
          f"lowered for platform {platform!r}; use implementation=None or 'xla'")
    return False
  gpus = _extension.local_gpus()
  hopper = _extension.local_hopper_gpus()
  if implementation is None:
    # With no GPU attached we are lowering ahead of time (export, CPU CI): emit the kernels.
    return _extension.has_cuda_kernels() and (not gpus or bool(hopper))
  if gpus and not _extension.has_cuda_kernels():
    raise RuntimeError(
        "implementation='cuda': jax_flashmla was built without its CUDA kernels "
        f"(build_info: {_extension.build_info()}); reinstall with nvcc on the PATH")
  if gpus and not hopper:
    kinds = sorted({getattr(d, "device_kind", "?") for d in gpus})
    raise ValueError(f"implementation='cuda' needs a Hopper GPU (compute capability 9.0), got "
                     f"{kinds}; use implementation=None or 'xla'")
  return True


def _cached_jit_bind(prim: Primitive):
  """Eager calls run the primitive through jit, compiled once per set of parameters."""

  @functools.cache
  def jitted(items):
    return jax.jit(functools.partial(prim.bind, **dict(items)))

  def impl(*args, **params):
    return jitted(tuple(sorted(params.items())))(*args)

  return impl


def _platform(ctx) -> str:
  platforms = ctx.module_context.platforms
  if len(platforms) != 1:
    # Multi-platform export: the kernels exist for one platform only; use the portable path.
    return "multi"
  return platforms[0]


# ------------------------------------------------------------------------------------------------
# Scheduler: cache_seqlens [b] -> (tile_scheduler_metadata [P, 8], num_splits [b + 1])
# ------------------------------------------------------------------------------------------------

mla_metadata_p = Primitive("jax_flashmla_mla_metadata")
mla_metadata_p.multiple_results = True
mla_metadata_p.def_impl(_cached_jit_bind(mla_metadata_p))


def _metadata_abstract_eval(cache_seqlens, *, num_sm_parts, implementation):
  check_implementation(implementation)
  shapes.check_metadata_args(cache_seqlens, num_sm_parts)
  b = cache_seqlens.shape[0]
  return (jax.core.ShapedArray((num_sm_parts, 8), jnp.int32),
          jax.core.ShapedArray((b + 1,), jnp.int32))


def _metadata_reference_lowering(ctx, cache_seqlens, *, num_sm_parts, implementation):
  del implementation
  fn = functools.partial(mla_metadata_reference, num_sm_parts=num_sm_parts)
  return mlir.lower_fun(lambda s: list(fn(s)), multiple_results=True)(ctx, cache_seqlens)


def _metadata_lowering(ctx, cache_seqlens, *, num_sm_parts, implementation):
  if _use_kernels(implementation, _platform(ctx)):
    return jax.ffi.ffi_lowering(_extension.METADATA_TARGET)(ctx, cache_seqlens)
  return _metadata_reference_lowering(ctx, cache_seqlens, num_sm_parts=num_sm_parts,
                                      implementation=implementation)


def _metadata_batch(args, dims, *, num_sm_parts, implementation):
  (seqlens,), (dim,) = args, dims
  seqlens = jnp.moveaxis(seqlens, dim, 0)
  # Each lane is its own batch with its own schedule; lanes are few, so run them in turn.
  out = jax.lax.map(
      lambda s: tuple(mla_metadata_p.bind(s, num_sm_parts=num_sm_parts,
                                          implementation=implementation)), seqlens)
  return list(out), [0, 0]


mla_metadata_p.def_abstract_eval(_metadata_abstract_eval)
mlir.register_lowering(mla_metadata_p, _metadata_lowering)  # every platform; see _use_kernels
batching.primitive_batchers[mla_metadata_p] = _metadata_batch


# ------------------------------------------------------------------------------------------------
# Decode: (q, k_cache, block_table, cache_seqlens, sched, num_splits) -> (out, lse)
# The FFI call also returns the split-KV partials (lse_accum, o_accum): XLA allocates them as
# outputs because scratch memory would be freed before the kernels run. They are dropped here.
# ------------------------------------------------------------------------------------------------

mla_decode_p = Primitive("jax_flashmla_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_impl(_cached_jit_bind(mla_decode_p))


def _decode_abstract_eval(q, k_cache, block_table, cache_seqlens, sched, num_splits, *,
                          softmax_scale, causal, implementation):
  check_implementation(implementation)
  shapes.check_decode_args(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                           shapes.HEAD_DIM_V)
  (out_shape, out_dtype), (lse_shape, lse_dtype), *_ = shapes.decode_output_shapes(
      q, k_cache, sched.shape[0])
  return (jax.core.ShapedArray(out_shape, out_dtype),
          jax.core.ShapedArray(lse_shape, lse_dtype))


def _decode_reference_lowering(ctx, q, k_cache, block_table, cache_seqlens, sched, num_splits,
                               *, softmax_scale, causal):
  def fn(q, k_cache, block_table, cache_seqlens, sched, num_splits):
    del sched, num_splits  # the reference needs no schedule
    return list(flash_mla_reference(q, k_cache, block_table, cache_seqlens,
                                    softmax_scale=softmax_scale, causal=causal))

  return mlir.lower_fun(fn, multiple_results=True)(
      ctx, q, k_cache, block_table, cache_seqlens, sched, num_splits)


def _decode_lowering(ctx, q, k_cache, block_table, cache_seqlens, sched, num_splits, *,
                     softmax_scale, causal, implementation):
  q_aval, k_aval, *_, sched_aval, _ = ctx.avals_in
  if _use_kernels(implementation, _platform(ctx)):
    if jnp.dtype(q_aval.dtype) not in shapes.KERNEL_DTYPES:
      if implementation == "cuda":
        raise TypeError(f"q: implementation='cuda' expects dtype bfloat16, got {q_aval.dtype}")
    else:
      avals_out = [jax.core.ShapedArray(s, d)
                   for s, d in shapes.decode_output_shapes(q_aval, k_aval, sched_aval.shape[0])]
      results = jax.ffi.ffi_lowering(_extension.DECODE_TARGET)(
          ctx.replace(avals_out=avals_out), q, k_cache, block_table, cache_seqlens, sched,
          num_splits, softmax_scale=np.float32(softmax_scale), causal=np.bool_(causal))
      return results[:2]
  return _decode_reference_lowering(ctx, q, k_cache, block_table, cache_seqlens, sched,
                                    num_splits, softmax_scale=softmax_scale, causal=causal)


def _fold_q_into_heads(q, k_cache, block_table, cache_seqlens, sched, num_splits, lanes,
                       params):
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


def _decode_batch(args, dims, *, softmax_scale, causal, implementation):
  params = dict(softmax_scale=softmax_scale, causal=causal, implementation=implementation)
  q, k_cache, block_table, cache_seqlens, sched, num_splits = args
  qd, kd, btd, sld, _, _ = dims
  nm = None  # batching.not_mapped
  lanes = next(a.shape[d] for a, d in zip(args, dims) if d is not nm)
  mv = lambda x, d: x if d is nm else jnp.moveaxis(x, d, 0)
  sched = sched if dims[4] is nm else jnp.moveaxis(sched, dims[4], 0)[0]
  num_splits = num_splits if dims[5] is nm else jnp.moveaxis(num_splits, dims[5], 0)[0]

  if kd is nm and btd is nm and sld is nm and qd is not nm and dims[4] is nm and dims[5] is nm:
    out, lse = _fold_q_into_heads(mv(q, qd), k_cache, block_table, cache_seqlens, sched,
                                  num_splits, lanes, params)
    return [out, lse], [0, 0]

  # Otherwise fold the vmapped axis into the batch: each lane's rows become more rows.
  def lanes_first(x, d):
    return jnp.broadcast_to(x, (lanes,) + x.shape) if d is nm else jnp.moveaxis(x, d, 0)

  q, block_table, cache_seqlens = (lanes_first(x, d) for x, d in
                                   ((q, qd), (block_table, btd), (cache_seqlens, sld)))
  if kd is not nm:
    # One pool per lane: concatenate the pools and shift each lane's page ids; ids that were
    # invalid stay invalid (-1), so they still read nothing.
    k_cache = jnp.moveaxis(k_cache, kd, 0)
    num_blocks = k_cache.shape[1]
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
                                          implementation=implementation)
  out, lse = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, sched, num_splits,
                               **params)
  return [out.reshape((n, b) + out.shape[1:]), lse.reshape((n, b) + lse.shape[1:])], [0, 0]


def _decode_jvp(primals, tangents, **params):
  del primals, tangents, params
  raise NotImplementedError(
      "jax_flashmla's decode is inference-only and has no gradient; differentiate "
      "jax_flashmla.flash_mla_reference instead")


mla_decode_p.def_abstract_eval(_decode_abstract_eval)
mlir.register_lowering(mla_decode_p, _decode_lowering)
batching.primitive_batchers[mla_decode_p] = _decode_batch
ad.primitive_jvps[mla_decode_p] = _decode_jvp
