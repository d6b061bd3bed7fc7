"""The compiled extension: loading it, registering its FFI targets, describing the build.

The nanobind module `_ext` exports `registrations()` (target name -> handler capsule),
`build_info()` (with `kernel_dtypes`, the dtypes the kernels take, in builds that have float16)
and `constants()` (the C++ side's values of `jax_flashmla.constants`, compared by
tests/test_constants.py). A build without a CUDA compiler still produces `_ext`, with no targets;
a source tree that was never built has no `_ext` at all. Both leave the pure-JAX path working,
and `build_info()["reason"]` says why the extension is missing.
"""

from __future__ import annotations

import functools
import pathlib

import jax

from jax_flashmla.constants import DECODE_TARGET, METADATA_TARGET, SPARSE_DECODE_TARGET

TARGETS = (METADATA_TARGET, DECODE_TARGET)  # the dense decode's: what has_cuda_kernels() means
# Targets that came later: an extension built before them still runs the dense kernels.
LATER_TARGETS = (SPARSE_DECODE_TARGET,)


class KernelFallbackWarning(UserWarning):
  """`implementation=None` runs the pure-JAX path where the CUDA kernels could run (a Hopper GPU
  is attached, or the program is lowered for 'cuda'); the message says why. Pass
  `implementation="xla"` to choose that path on purpose."""


def _import_error_reason(error: ImportError) -> str:
  package = pathlib.Path(__file__).resolve().parent
  if not any(package.glob("_ext*.so")) and (package.parent / "pyproject.toml").exists():
    # `python -m`, `python -c` and the REPL put the current folder first on sys.path, so run
    # from a clone's root they import the source folder, which has no compiled module.
    return (f"jax_flashmla was imported from its source checkout ({package}), which has no "
            f"compiled jax_flashmla._ext, instead of the installed package: Python puts the "
            f"current folder first on sys.path. Run with `python -P` (e.g. `python -P -m "
            f"jax_flashmla.demo`) or from another folder; if it is not installed yet, "
            f"`python -m pip install --no-build-isolation .` ({error})")
  return f"the compiled module jax_flashmla._ext is missing (not built?): {error}"


try:
  from jax_flashmla import _ext  # type: ignore[attr-defined]
except ImportError as e:  # a source checkout, or a package that was never built
  _ext = None
  _IMPORT_ERROR = _import_error_reason(e)
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


def has_sparse_kernel() -> bool:
  """True when the extension has the token-sparse decode's kernel (and the scheduler)."""
  return {METADATA_TARGET, SPARSE_DECODE_TARGET} <= _registered_targets()


def kernels_missing_reason() -> str | None:
  """Why this installation has no CUDA kernels to run (None when it has them)."""
  if _ext is None:
    return _IMPORT_ERROR
  if not has_cuda_kernels():
    return ("jax_flashmla was built without its CUDA kernels (no nvcc when it was built); "
            "reinstall with nvcc on the PATH")
  return None


def kernels_unavailable_reason() -> str | None:
  """Why the kernels cannot run in this process (None when they can): no GPU, a GPU that is not
  a Hopper, or an installation without them."""
  gpus = local_gpus()
  if not gpus:
    return "no NVIDIA GPU is visible to JAX"
  if not local_hopper_gpus():
    kinds = sorted({getattr(d, "device_kind", "?") for d in gpus})
    return f"the GPU is not a Hopper (compute capability 9.0) part: {kinds}"
  return kernels_missing_reason()


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

  return tuple(export.DisabledSafetyCheck.custom_call(name) for name in TARGETS + LATER_TARGETS)
