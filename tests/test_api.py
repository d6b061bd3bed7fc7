"""Public API behaviour: jit, implementation choice, gradients, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from mla_cases import check_decode, make_case, oracle


@pytest.fixture(scope="module")
def case():
  return make_case(np.random.default_rng(3), b=3, s_q=2, mean_len=100, h_q=8, h_kv=1,
                   causal=True, zero_rows=0.3)


def test_default_implementation_is_correct_under_jit(case):
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens), 16, 1)
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, metadata=md, causal=True))
  check_decode(*fn(*case.args()), *oracle(case))


def test_eager_call_and_tuple_metadata(case):
  md = jax_flashmla.get_mla_metadata(jnp.asarray(case.cache_seqlens), 16, 1, num_sms=5)
  out, lse = jax_flashmla.flash_mla_with_kvcache(
      *case.args(), metadata=(md.tile_scheduler_metadata, md.num_splits), causal=True)
  check_decode(out, lse, *oracle(case))


def test_float32_inputs_work_on_the_xla_path(case):
  args = list(case.args())
  args[0] = args[0].astype(jnp.float32)
  args[1] = args[1].astype(jnp.float32)
  out, lse = jax_flashmla.flash_mla_with_kvcache(*args, causal=True)
  assert out.dtype == jnp.float32 and lse.dtype == jnp.float32


def test_gradient_raises_a_clear_error(case):
  def loss(q):
    out, _ = jax_flashmla.flash_mla_with_kvcache(q, *case.args()[1:], causal=True)
    return out.astype(jnp.float32).sum()

  with pytest.raises(NotImplementedError, match="inference-only"):
    jax.grad(loss)(case.args()[0])


def test_reference_is_differentiable(case):
  def loss(q):
    out, _ = jax_flashmla.flash_mla_reference(q.astype(jnp.bfloat16), *case.args()[1:])
    return out.astype(jnp.float32).sum()

  grad = jax.grad(loss)(case.args()[0].astype(jnp.float32))
  assert grad.shape == case.q.shape


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(implementation="triton"), ValueError, "implementation: expected one of"),
    (dict(head_dim_v=576), ValueError, "head_dim_v: expected 512, got 576"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale: expected a finite positive float"),
    (dict(causal=1), TypeError, "causal: expected a static Python bool, got int"),
    (dict(metadata=[1, 2, 3]), TypeError, "metadata: expected MLAMetadata"),
])
def test_argument_errors(case, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jax_flashmla.flash_mla_with_kvcache(*case.args(), **kwargs)


def test_traced_scale_is_rejected(case):
  @jax.jit
  def fn(scale):
    return jax_flashmla.flash_mla_with_kvcache(*case.args(), softmax_scale=scale)

  with pytest.raises(TypeError, match="softmax_scale: expected a static Python float"):
    fn(0.1)


@pytest.mark.parametrize("index,value,exc,match", [
    (0, jnp.zeros((3, 2, 8, 512), jnp.bfloat16), ValueError, "q: expected head dim 576"),
    (0, jnp.zeros((3, 8, 576), jnp.bfloat16), ValueError, r"q: expected rank 4"),
    (0, jnp.zeros((3, 2, 8, 576), jnp.int32), TypeError, "q: expected dtype"),
    (1, jnp.zeros((4, 32, 1, 576), jnp.bfloat16), ValueError, "k_cache: expected page size 64"),
    (1, jnp.zeros((4, 64, 3, 576), jnp.bfloat16), ValueError, "multiple of h_kv=3"),
    (1, jnp.zeros((4, 64, 1, 576), jnp.float16), TypeError, "k_cache: expected the dtype of q"),
    (2, jnp.zeros((2, 4), jnp.int32), ValueError, "block_table: expected batch 3"),
    (2, jnp.zeros((3, 4), jnp.int64 if jax.config.x64_enabled else jnp.float32), TypeError,
     "block_table: expected dtype int32"),
    (3, jnp.zeros((4,), jnp.int32), ValueError, r"cache_seqlens: expected shape \(3,\)"),
    (3, [1, 2, 3], TypeError, "cache_seqlens: expected a jax.Array, got list"),
])
def test_shape_and_dtype_errors(case, index, value, exc, match):
  args = list(case.args())
  args[index] = value
  with pytest.raises(exc, match=match):
    jax_flashmla.flash_mla_with_kvcache(*args)


def test_metadata_for_another_batch_is_rejected(case):
  md = jax_flashmla.get_mla_metadata(jnp.zeros(5, jnp.int32), 16, 1, num_sms=4)
  with pytest.raises(ValueError, match=r"num_splits: expected shape \(4,\) for batch 3"):
    jax_flashmla.flash_mla_with_kvcache(*case.args(), metadata=md)
