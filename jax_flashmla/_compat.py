"""The few private or version-dependent JAX details we rely on, kept in one place.

Written against jax 0.10.2 (CPU CI) and 0.11.2 (the GPU machine). When a JAX release moves one of
these, this is the only file to change.
"""

from __future__ import annotations

import jax


def require_devices_during_lowering(*primitives) -> None:
  """Lets `primitives` see the device assignment while they are lowered.

  A primitive whose lowering goes through `custom_partitioning` needs it: that lowering asks for
  the devices to decide between inlining its body (one device) and emitting a partitioned call.
  JAX adds its own `custom_partitioning_p` to this registry, but our primitives wrap it inside
  their lowering rules, so JAX cannot see it in the jaxpr. Without the entry, jit of a sharded
  computation fails in lowering.
  """
  from jax._src import dispatch  # private: no public equivalent as of jax 0.11

  registry = getattr(dispatch, "prim_requires_devices_during_lowering", None)
  if registry is None:
    raise ImportError(
        f"jax {jax.__version__}: jax._src.dispatch.prim_requires_devices_during_lowering is "
        "gone; jax_flashmla._compat needs updating for this JAX release")
  registry.update(primitives)


def without_varying_axes(ctx):
  """A lowering context whose abstract values are plain shapes and dtypes.

  Our pure-JAX lowerings (`mlir.lower_fun`) trace the reference on one device's values. Inside
  `shard_map` the values arrive tagged with the manual axes they vary over; that bookkeeping has
  no meaning for one device's computation, and it would reject the scheduler's loops, whose
  constant initial carries vary over nothing. (JAX >= 0.9 tags avals this way; the attribute
  holding the tag has been renamed across releases, so rebuild the avals instead.)
  """
  plain = lambda avals: [jax.core.ShapedArray(a.shape, a.dtype, a.weak_type) for a in avals]
  return ctx.replace(avals_in=plain(ctx.avals_in), avals_out=plain(ctx.avals_out))


def lowering_platforms(ctx) -> tuple[str, ...]:
  """The platforms a lowering rule emits code for: those of its branch in a multi-platform
  lowering (`ctx.platforms`, set by JAX's per-platform switch), else the module's."""
  return tuple(getattr(ctx, "platforms", None) or ctx.module_context.platforms)
