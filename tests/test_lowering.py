"""The CUDA lowering, produced on any machine (no GPU needed), and jax.export round trips."""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_flashmla
from jax_flashmla import KernelFallbackWarning, _extension, shapes
from mla_cases import check_decode, make_case, oracle


def _args(b=2, s_q=2, h_q=16, h_kv=1, num_blocks=8, max_blocks=4):
  return (jnp.zeros((b, s_q, h_q, 576), jnp.bfloat16),
          jnp.zeros((num_blocks, 64, h_kv, 576), jnp.bfloat16),
          jnp.zeros((b, max_blocks), jnp.int32), jnp.zeros((b,), jnp.int32))


def _cuda_text(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _custom_calls(text):
  return re.findall(r"stablehlo\.custom_call @(\w+)\(.*?\{(.*?)\}\s*:\s*\((.*?)\)\s*->\s*\((.*?)\)",
                    text)


def test_cuda_lowering_has_versioned_targets_and_typed_attributes():
  fn = lambda *a: jax_flashmla.flash_mla_with_kvcache(
      *a, softmax_scale=0.125, causal=True, implementation="cuda", num_sms=132)
  calls = _custom_calls(_cuda_text(fn, *_args()))
  assert [c[0] for c in calls] == ["jax_flashmla_mla_metadata_v1", "jax_flashmla_mla_decode_v1"]
  meta_attrs, decode = calls[0][1], calls[1]
  assert "mhlo.backend_config = {}" in meta_attrs
  assert "causal = true" in decode[1]
  assert "softmax_scale = 1.250000e-01 : f32" in decode[1]
  # s_q * h_q / h_kv = 32 rows -> one M block -> 132 parts; partials are (b + parts) rows.
  assert decode[2].split(", ")[-2:] == ["tensor<132x8xi32>", "tensor<3xi32>"]
  assert decode[3].split(", ") == ["tensor<2x2x16x512xbf16>", "tensor<2x16x2xf32>",
                                   "tensor<134x1x32xf32>", "tensor<134x1x32x512xf32>"]


def test_causal_is_dropped_for_single_token_and_scale_defaults():
  fn = lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, causal=True, implementation="cuda")
  (_, _, _, _), (_, attrs, _, _) = _custom_calls(_cuda_text(fn, *_args(s_q=1)))
  assert "causal = false" in attrs
  scale = float(re.search(r"softmax_scale = ([0-9.e+-]+) : f32", attrs).group(1))
  assert scale == pytest.approx(576**-0.5, rel=1e-7)


def test_metadata_reused_across_layers_is_computed_once():
  def model(q, k, bt, lens):
    md = jax_flashmla.get_mla_metadata(lens, 32, 1, num_sms=132, implementation="cuda")
    outs = [jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, metadata=md,
                                                implementation="cuda")[0] for _ in range(3)]
    return sum(o.astype(jnp.float32) for o in outs)

  names = [c[0] for c in _custom_calls(_cuda_text(model, *_args()))]
  assert names.count("jax_flashmla_mla_metadata_v1") == 1
  assert names.count("jax_flashmla_mla_decode_v1") == 3


def test_xla_implementation_lowers_without_custom_calls():
  fn = lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, implementation="xla")
  assert "custom_call @jax_flashmla" not in _cuda_text(fn, *_args())


def test_cuda_implementation_refuses_the_cpu():
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, implementation="cuda"))
  with pytest.raises(ValueError, match="implementation='cuda' needs an NVIDIA Hopper GPU"):
    fn(*_args())


def test_export_needs_the_disabled_checks_and_round_trips():
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, implementation="cuda"))
  with pytest.raises(ValueError, match="custom call"):
    export.export(fn, platforms=["cuda"])(*_args())
  exp = export.export(fn, platforms=["cuda"],
                      disabled_checks=jax_flashmla.DISABLE_JAX_EXPORT_CHECKS)(*_args())
  again = export.deserialize(exp.serialize())
  assert again.platforms == ("cuda",)
  assert "jax_flashmla_mla_decode_v1" in again.mlir_module()


def test_export_for_cpu_runs_the_reference():
  case = make_case(np.random.default_rng(0), b=2, s_q=2, mean_len=90, h_q=4, h_kv=1,
                   causal=True)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, causal=True))
  exp = export.deserialize(export.export(fn, platforms=["cpu"])(*case.args()).serialize())
  out, lse = exp.call(*case.args())
  check_decode(out, lse, *oracle(case))


@pytest.mark.skipif(os.environ.get("JAX_FLASHMLA_EXPECT_CUDA_BUILD") != "1",
                    reason="set JAX_FLASHMLA_EXPECT_CUDA_BUILD=1 where nvcc was present at build")
def test_cuda_kernels_were_built():
  from jax_flashmla import _extension

  assert _extension.has_cuda_kernels(), jax_flashmla.build_info()


def test_build_info_describes_the_build():
  info = jax_flashmla.build_info()
  assert isinstance(info, dict) and "cuda" in info
  if info.get("extension"):
    assert re.fullmatch(r"\d+\.\d+", info["xla_ffi_api"])


# ------------------------------------------------------------------------------------------------
# Shape-polymorphic and multi-platform export
# ------------------------------------------------------------------------------------------------

def _symbolic_args():
  b, m, n = export.symbolic_shape("b, m, n")
  return (jax.ShapeDtypeStruct((b, 2, 4, 576), jnp.bfloat16),
          jax.ShapeDtypeStruct((n, 64, 1, 576), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, m), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))


def _decode_fn(**kw):
  def fn(q, k, bt, lens):
    md = jax_flashmla.get_mla_metadata(lens, 8, 1, num_sms=132, **kw)
    return jax_flashmla.flash_mla_with_kvcache(q, k, bt, lens, metadata=md, causal=True, **kw)
  return jax.jit(fn)


@pytest.mark.parametrize("platforms", [("cpu",), ("cpu", "cuda")])
def test_export_with_a_symbolic_batch(platforms):
  """A symbolic batch, block-table width and page count trace; the exported program runs any of
  them. Lowered
  for cpu and cuda, the cuda branch keeps the kernels (each platform gets its own lowering) and
  the cpu branch runs the pure-JAX path."""
  # A build without the kernels (no nvcc) exports the pure-JAX path for cuda too, and says so.
  kernels = "cuda" in platforms and _extension.has_cuda_kernels()
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    exp = export.export(_decode_fn(), platforms=platforms,
                        disabled_checks=jax_flashmla.DISABLE_JAX_EXPORT_CHECKS)(*_symbolic_args())
  assert bool(_fallback_warnings(record)) == ("cuda" in platforms and not kernels)
  exp = export.deserialize(exp.serialize())
  assert exp.platforms == platforms
  text = exp.mlir_module()
  assert ("jax_flashmla_mla_decode_v1" in text) == kernels
  assert ("jax_flashmla_mla_metadata_v1" in text) == kernels
  for b, mean_len in ((2, 90), (5, 300)):
    case = make_case(np.random.default_rng(b), b=b, s_q=2, mean_len=mean_len, h_q=4, h_kv=1,
                     causal=True)
    with jax.default_device(jax.devices("cpu")[0]):  # the cpu branch, also on a GPU machine
      check_decode(*exp.call(*case.args()), *oracle(case))


def test_symbolic_head_counts_are_refused():
  s, = export.symbolic_shape("s")
  args = list(_args())
  args[0] = jax.ShapeDtypeStruct((2, s, 16, 576), jnp.bfloat16)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, num_sms=132))
  with pytest.raises(ValueError, match=r"^q: expected known s_q, h_q and h_kv"):
    export.export(fn, platforms=("cpu",))(*args)


# ------------------------------------------------------------------------------------------------
# implementation=None: a fallback where the kernels could run is never silent
# ------------------------------------------------------------------------------------------------

def _lower(platform, dtype=jnp.bfloat16, b=2, **kw):
  args = list(_args(b=b))
  args[0], args[1] = args[0].astype(dtype), args[1].astype(dtype)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, num_sms=132, **kw))
  return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _fallback_warnings(record):
  return [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]


def test_float32_lowered_for_cuda_warns_once_per_reason():
  """Lowered for 'cuda' with no GPU attached (an export) or on a Hopper GPU, a dtype the kernels
  do not take runs pure JAX, and says so (once: the default filter keeps one per message)."""
  if not _extension.has_cuda_kernels():
    pytest.skip("the extension has no kernels: the reason would be that instead")
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("default")
    text = _lower("cuda", jnp.float32)
    _lower("cuda", jnp.float32, b=3)
  assert "jax_flashmla_mla_decode_v1" not in text
  [message] = _fallback_warnings(record)
  assert "runs the pure-JAX decode" in message and "dtype float32: the kernels take " \
      f"{shapes.kernel_dtype_names()}; cast q and k_cache" in message
  assert "implementation='xla'" in message


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_dtypes_lowered_for_cuda_emit_the_kernels(dtype):
  if not _extension.has_cuda_kernels():
    pytest.skip("the extension has no kernels")
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    text = _lower("cuda", dtype)
  runs_kernels = jnp.dtype(dtype) in shapes.KERNEL_DTYPES
  assert ("jax_flashmla_mla_decode_v1" in text) == runs_kernels
  assert bool(_fallback_warnings(record)) != runs_kernels


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_cpu_path_is_expected_and_silent(dtype):
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    _lower("cpu", dtype)
    _lower("cuda", dtype, implementation="xla")
  assert not _fallback_warnings(record)


class _FakeGpu:
  def __init__(self, compute_capability):
    self.compute_capability = compute_capability
    self.device_kind = f"sm {compute_capability}"


def test_a_missing_extension_on_a_hopper_gpu_warns_with_its_reason(monkeypatch):
  reason = "jax_flashmla was imported from its source checkout (...); run with `python -P`"
  monkeypatch.setattr(_extension, "local_gpus", lambda: [_FakeGpu("9.0")])
  monkeypatch.setattr(_extension, "local_hopper_gpus", lambda: [_FakeGpu("9.0")])
  monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
  monkeypatch.setattr(_extension, "kernels_missing_reason", lambda: reason)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    text = _lower("cuda")
  assert "custom_call @jax_flashmla" not in text
  [message] = set(_fallback_warnings(record))
  assert reason in message


def test_a_gpu_that_is_not_a_hopper_falls_back_silently(monkeypatch):
  monkeypatch.setattr(_extension, "local_gpus", lambda: [_FakeGpu("8.0")])
  monkeypatch.setattr(_extension, "local_hopper_gpus", lambda: [])
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    text = _lower("cuda", jnp.float32)
  assert "custom_call @jax_flashmla" not in text
  assert not _fallback_warnings(record)
