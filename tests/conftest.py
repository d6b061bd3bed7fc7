"""Test tiers: everything runs on the CPU except tests marked `gpu`, which need a Hopper GPU and
the CUDA extension. They skip with the reason, or fail when JAX_FLASHMLA_REQUIRE_GPU=1."""

import os

# Eight host devices for the sharding tests (test_partitioning.py). Set before JAX starts its
# CPU backend; the other tests run on the first device as before. A flag already given wins.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

import jax_flashmla  # noqa: E402
from jax_flashmla import _extension  # noqa: E402


def _gpu_unavailable_reason():
  if not _extension.local_gpus():
    return "no NVIDIA GPU visible to JAX"
  if not _extension.local_hopper_gpus():
    return "the GPU is not a Hopper (sm_90) part"
  if not _extension.has_cuda_kernels():
    return f"jax_flashmla was built without CUDA kernels: {jax_flashmla.build_info()}"
  return None


def _flashmla_skip_reason():
  """Why the opt-in comparison with FlashMLA itself does not run, or None."""
  if os.environ.get("JAX_FLASHMLA_AGAINST_FLASHMLA") != "1":
    return "opt-in: set JAX_FLASHMLA_AGAINST_FLASHMLA=1 (once per kernel change; long)"
  try:
    import flash_mla  # noqa: F401, PLC0415
    import torch  # noqa: F401, PLC0415
  except ImportError as e:
    return f"FlashMLA not importable ({e}): put the shared kit's flash_mla on PYTHONPATH"
  return None


def pytest_collection_modifyitems(config, items):
  flashmla_reason = _flashmla_skip_reason()
  if flashmla_reason is not None:
    for item in items:
      if "flashmla" in item.keywords:
        item.add_marker(pytest.mark.skip(reason=flashmla_reason))
  reason = _gpu_unavailable_reason()
  if reason is None:
    return
  if os.environ.get("JAX_FLASHMLA_REQUIRE_GPU") == "1":
    for item in items:
      if "gpu" in item.keywords:
        item.add_marker(pytest.mark.xfail(reason=f"GPU required: {reason}", strict=True,
                                          run=False))
    raise pytest.UsageError(f"JAX_FLASHMLA_REQUIRE_GPU=1 but {reason}")
  skip = pytest.mark.skip(reason=f"GPU tier: {reason}")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
