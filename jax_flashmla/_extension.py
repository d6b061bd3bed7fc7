"""The compiled extension: loading it, registering its FFI targets, describing the build.

The nanobind module `_ext` exports `registrations()` (target name -> handler capsule),
`build_info()` and `constants()` (the C++ side's values of `jax_flashmla.constants`, compared by
tests/test_constants.py). A build without a CUDA compiler still produces `_ext`, with no targets;
a source tree that was never built has no `_ext` at all. Both leave the pure-JAX path working.
"""

from __future__ import annotations

import functools

import jax

from jax_flashmla.constants import DECODE_TARGET, METADATA_TARGET

TARGETS = (METADATA_TARGET, DECODE_TARGET)

try:
  from jax_flashmla import _ext  # type: ignore[attr-defined]
except ImportError as e:  # a source checkout used without building
  _ext = None
  _IMPORT_ERROR = f"the compiled module jax_flashmla._ext is missing (not built?): {e}"
else:
  _IMPORT_ERROR = None


@functools.cache
def _registered_targets() -> frozenset[str]:
  if _ext is None:
    return frozenset()
  names = []
  for name, capsule in _ext.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    names.append(name)
  return frozenset(names)


def register() -> None:
  """Registers the CUDA FFI targets with XLA (idempotent; done at import)."""
  _registered_targets()


def has_cuda_kernels() -> bool:
  """True when the extension was built with CUDA and its targets are registered."""
  return set(TARGETS) <= _registered_targets()


def build_info() -> dict:
  """How this installation was built: CUDA or not, CUDA version, archs, XLA FFI API version."""
  if _ext is None:
    return {"extension": False, "cuda": False, "reason": _IMPORT_ERROR}
  info = dict(_ext.build_info())
  info["extension"] = True
  info["jax_runtime"] = jax.__version__
  return info


def local_hopper_gpus() -> list:
  """Local CUDA devices of compute capability 9.0 (H100/H200)."""
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return []
  return [d for d in devices if getattr(d, "compute_capability", None) == "9.0"]


def local_gpus() -> list:
  try:
    return list(jax.devices("gpu"))
  except RuntimeError:
    return []


def disable_export_checks() -> tuple:
  from jax import export

  return tuple(export.DisabledSafetyCheck.custom_call(name) for name in TARGETS)
