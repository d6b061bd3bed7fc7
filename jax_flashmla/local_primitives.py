"""One device's scheduler and decode: the primitives that map 1:1 onto our FFI targets.

These are the inner level of two (the layout of TransformerEngine's and JAX's cuDNN
primitives). They see one device's shapes and nothing else: no vmap, no sharding. The primitives
users bind (`primitives.py`) own those transformations and bind these on per-device shapes,
either directly (one device) or from a partitioning rule (`partitioning.py`).

Each has an abstract evaluation (all shape/dtype checks), a lowering registered for the 'cuda'
platform that emits our XLA FFI target, and a lowering for every other platform that runs the
pure-JAX twin from `reference.py`. Being registered per platform, a program exported for several
platforms (`jax.export(..., platforms=("cpu", "cuda"))`) gets each platform's own lowering.

`implementation` is a static parameter of both:
  - "xla": the pure-JAX path on every platform;
  - "cuda": the CUDA kernels; lowering for any other platform raises;
  - None: the kernels where they can run (CUDA lowering, extension built with CUDA, GPU is
    Hopper or no GPU is attached, as when exporting, dtype one of the kernels'), the pure-JAX
    path otherwise. Falling back where the kernels could run (lowered for 'cuda' with a Hopper
    GPU or none attached) warns with the reason (`KernelFallbackWarning`).

The pure-JAX decode checks the scheduler records the way the kernels do: requests covered by a
record whose length fingerprint does not match `cache_seqlens` get NaN rows
(`reference.stale_requests`).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir

from jax_flashmla import _compat, _extension, shapes
from jax_flashmla.constants import DECODE_TARGET, METADATA_TARGET, SCHED_RECORD_INTS
from jax_flashmla.reference import flash_mla_reference, mla_metadata_reference, stale_requests

IMPLEMENTATIONS = (None, "cuda", "xla")


def check_implementation(implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected one of None, 'cuda', 'xla', got "
                     f"{implementation!r}")


def kernels_could_run(platform: str) -> bool:
  """Whether a lowering for `platform` is where our kernels run: 'cuda', with a Hopper GPU or
  none attached (lowering ahead of time). Elsewhere the pure-JAX path is simply the expected one."""
  if platform != "cuda":
    return False
  return not (_extension.local_gpus() and not _extension.local_hopper_gpus())


def fallback_reason(platform: str, dtype=None) -> str | None:
  """Why `implementation=None`, lowered for `platform`, runs pure JAX where the kernels could.

  None when the kernels run, and when the pure-JAX path is simply the expected one: a platform
  other than 'cuda', or a GPU that is not a Hopper. Otherwise (lowered for 'cuda' with a Hopper
  GPU or no GPU attached) the reason: the extension is missing or has no kernels, or `dtype` is
  not one of the kernels'.
  """
  if not kernels_could_run(platform):
    return None
  missing = _extension.kernels_missing_reason()
  if missing is not None:
    return missing
  if dtype is not None and jnp.dtype(dtype) not in shapes.KERNEL_DTYPES:
    return (f"dtype {jnp.dtype(dtype)}: the kernels take {shapes.kernel_dtype_names()}; cast q "
            f"and k_cache to one of those")
  return None


def warn_fallback(reason: str, what: str = "decode (12-27x slower on an H200)") -> None:
  """KernelFallbackWarning: `implementation=None` runs the pure-JAX `what` where the CUDA kernels
  could run, and why."""
  # The default filter shows each distinct message once per location: once per reason here.
  warnings.warn(f"jax_flashmla: implementation=None runs the pure-JAX {what} where the CUDA "
                f"kernels could run: {reason}. Pass implementation='xla' to choose the pure-JAX "
                f"path on purpose.", _extension.KernelFallbackWarning, stacklevel=2)


def _use_kernels(implementation, platform: str, dtype=None) -> bool:
  """Whether a lowering for `platform` emits our FFI calls (raises where it cannot).

  `dtype`: q's, for the decode (None for the scheduler, which takes any). With
  implementation=None a fallback where the kernels could run warns.
  """
  if implementation == "xla":
    return False
  if platform != "cuda":
    if implementation == "cuda":
      raise ValueError(
          "implementation='cuda' needs an NVIDIA Hopper GPU (sm_90a): expected a computation "
          f"lowered for platform 'cuda', got platform {platform!r}; use implementation=None "
          "or 'xla'")
    return False
  gpus = _extension.local_gpus()
  hopper = _extension.local_hopper_gpus()
  if implementation is None:
    # With no GPU attached we are lowering ahead of time (export, CPU CI): emit the kernels.
    if gpus and not hopper:
      return False
    reason = fallback_reason(platform, dtype)
    if reason is not None and dtype is not None:  # the decode warns, for both primitives
      warn_fallback(reason)
    return _extension.has_cuda_kernels() and reason is None
  if gpus and not _extension.has_cuda_kernels():
    raise RuntimeError(
        f"implementation='cuda': {_extension.kernels_missing_reason()} (build_info: "
        f"{_extension.build_info()})")
  if gpus and not hopper:
    kinds = sorted({getattr(d, "device_kind", "?") for d in gpus})
    raise ValueError(f"implementation='cuda' needs a Hopper GPU (compute capability 9.0), got "
                     f"{kinds}; use implementation=None or 'xla'")
  return True


def cached_jit_bind(prim: Primitive):
  """Eager calls run the primitive through jit, compiled once per set of parameters."""

  @functools.cache
  def jitted(items):
    return jax.jit(functools.partial(prim.bind, **dict(items)))

  def impl(*args, **params):
    return jitted(tuple(sorted(params.items())))(*args)

  return impl


def register_no_gradient(prim: Primitive, what: str, reference: str) -> None:
  """Makes `jax.grad` through `prim` raise: the kernels are inference-only; `reference` names
  the differentiable pure-JAX twin users should differentiate instead."""
  def jvp(primals, tangents, **params):
    del primals, tangents, params
    raise NotImplementedError(f"jax_flashmla's {what} is inference-only and has no gradient; "
                              f"differentiate {reference} instead")
  ad.primitive_jvps[prim] = jvp


def _register_lowerings(prim: Primitive, lowering) -> None:
  """`lowering(ctx, *args, platform=..., **params)` as the 'cuda' rule and the default rule.

  Per-platform rules let a multi-platform export keep the kernels in its 'cuda' branch (JAX
  emits a switch on the platform index); the default rule serves every other platform.
  """
  mlir.register_lowering(prim, functools.partial(lowering, platform="cuda"), platform="cuda")
  mlir.register_lowering(prim, functools.partial(lowering, platform=None))


def _platform(ctx, platform: str | None) -> str:
  """The platform a rule lowers for: 'cuda' for the CUDA rule, else the branch's platform(s)."""
  if platform is not None:
    return platform
  return ", ".join(_compat.lowering_platforms(ctx))


# ------------------------------------------------------------------------------------------------
# Scheduler: cache_seqlens [b] -> (tile_scheduler_metadata [P, 8], num_splits [b + 1])
# ------------------------------------------------------------------------------------------------

mla_metadata_local_p = Primitive("jax_flashmla_mla_metadata_local")
mla_metadata_local_p.multiple_results = True
mla_metadata_local_p.def_impl(cached_jit_bind(mla_metadata_local_p))


def metadata_abstract_eval(cache_seqlens, *, num_sm_parts, implementation):
  check_implementation(implementation)
  shapes.check_metadata_args(cache_seqlens, num_sm_parts)
  b = cache_seqlens.shape[0]
  return (jax.core.ShapedArray((num_sm_parts, SCHED_RECORD_INTS), jnp.int32),
          jax.core.ShapedArray((b + 1,), jnp.int32))


def _metadata_reference_lowering(ctx, cache_seqlens, *, num_sm_parts):
  fn = functools.partial(mla_metadata_reference, num_sm_parts=num_sm_parts)
  return mlir.lower_fun(lambda s: list(fn(s)), multiple_results=True)(
      _compat.without_varying_axes(ctx), cache_seqlens)


def _metadata_lowering(ctx, cache_seqlens, *, num_sm_parts, implementation, platform):
  if _use_kernels(implementation, _platform(ctx, platform)):
    return jax.ffi.ffi_lowering(METADATA_TARGET)(ctx, cache_seqlens)
  return _metadata_reference_lowering(ctx, cache_seqlens, num_sm_parts=num_sm_parts)


mla_metadata_local_p.def_abstract_eval(metadata_abstract_eval)
_register_lowerings(mla_metadata_local_p, _metadata_lowering)


# ------------------------------------------------------------------------------------------------
# Decode: (q, k_cache, block_table, cache_seqlens, sched, num_splits) -> (out, lse)
# The FFI call also returns the split-KV partials (lse_accum, o_accum): XLA allocates them as
# outputs because scratch memory would be freed before the kernels run. They are dropped here.
# Page ids in block_table index k_cache directly (one pool).
# ------------------------------------------------------------------------------------------------

mla_decode_local_p = Primitive("jax_flashmla_mla_decode_local")
mla_decode_local_p.multiple_results = True
mla_decode_local_p.def_impl(cached_jit_bind(mla_decode_local_p))


def decode_abstract_eval(q, k_cache, block_table, cache_seqlens, sched, num_splits, *,
                         implementation, **unused_params):
  check_implementation(implementation)
  shapes.check_decode_args(q, k_cache, block_table, cache_seqlens, sched, num_splits)
  (out_shape, out_dtype), (lse_shape, lse_dtype), *_ = shapes.decode_output_shapes(
      q, k_cache, sched.shape[0])
  return (jax.core.ShapedArray(out_shape, out_dtype),
          jax.core.ShapedArray(lse_shape, lse_dtype))


def _decode_reference_lowering(ctx, q, k_cache, block_table, cache_seqlens, sched, num_splits,
                               *, softmax_scale, causal):
  def fn(q, k_cache, block_table, cache_seqlens, sched, num_splits):
    del num_splits  # the reference needs no schedule; num_splits is not fingerprinted
    out, lse = flash_mla_reference(q, k_cache, block_table, cache_seqlens,
                                   softmax_scale=softmax_scale, causal=causal)
    # The kernels' records check: a record scheduled for other lengths poisons its requests.
    stale = stale_requests(sched, cache_seqlens)
    out = jnp.where(stale[:, None, None, None], jnp.array(jnp.nan, out.dtype), out)
    lse = jnp.where(stale[:, None, None], jnp.float32(jnp.nan), lse)
    return [out, lse]

  return mlir.lower_fun(fn, multiple_results=True)(
      _compat.without_varying_axes(ctx), q, k_cache, block_table, cache_seqlens, sched,
      num_splits)


def _decode_lowering(ctx, q, k_cache, block_table, cache_seqlens, sched, num_splits, *,
                     softmax_scale, causal, implementation, platform):
  q_aval, k_aval, *_, sched_aval, _ = ctx.avals_in
  if _use_kernels(implementation, _platform(ctx, platform), q_aval.dtype):
    shapes.check_kernel_dtype(q_aval, implementation)  # with None, other dtypes run pure JAX
    avals_out = [jax.core.ShapedArray(s, d)
                 for s, d in shapes.decode_output_shapes(q_aval, k_aval, sched_aval.shape[0])]
    results = jax.ffi.ffi_lowering(DECODE_TARGET)(
        ctx.replace(avals_out=avals_out), q, k_cache, block_table, cache_seqlens, sched,
        num_splits, softmax_scale=np.float32(softmax_scale), causal=np.bool_(causal))
    return results[:2]
  return _decode_reference_lowering(ctx, q, k_cache, block_table, cache_seqlens, sched,
                                    num_splits, softmax_scale=softmax_scale, causal=causal)


mla_decode_local_p.def_abstract_eval(decode_abstract_eval)
_register_lowerings(mla_decode_local_p, _decode_lowering)
