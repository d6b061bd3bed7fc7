"""The CUDA lowering, produced on any machine (no GPU needed), and jax.export round trips."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_flashmla
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
