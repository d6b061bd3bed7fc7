"""Public API behaviour: jit, implementation choice, gradients (errors: test_errors.py)."""

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
