"""The Flax MLA layer (absorbed weights, paged cache, jax_flashmla attention) against a plain,
non-absorbed MLA: K and V expanded per head from the latent, ordinary causal softmax attention
over whole sequences, in float32. Also the RoPE/YaRN helpers it uses."""

import cmath
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_flashmla import get_mla_metadata, rope  # noqa: E402
from jax_flashmla.allocator import PageAllocator  # noqa: E402
from jax_flashmla.cache import PagedKVCache  # noqa: E402
from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention  # noqa: E402

SMALL = dict(hidden_size=64, num_heads=4, qk_nope_head_dim=16, v_head_dim=24,
             rope_scaling=rope.YarnScaling(factor=4.0, original_max_position_embeddings=32))
LENGTHS = (21, 70, 5)  # row 1 crosses a page boundary while decoding one token at a time
STEPS = (16, 16, 16, 16, 1)  # tokens per step: ragged left-padded chunks, then decode


def _rms_norm(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def plain_mla(layer, x):
  """Non-absorbed MLA over whole sequences `x [b, T, hidden]`, written from the weights."""
  c = layer.config
  b, t, _ = x.shape
  hp = jax.lax.Precision.HIGHEST

  def mm(a, w):
    return jnp.matmul(a, w[...], precision=hp)

  if c.q_lora_rank:
    q = mm(_rms_norm(mm(x, layer.wq_a.kernel), layer.q_norm.scale[...], c.rms_norm_eps),
           layer.wq_b.kernel)
  else:
    q = mm(x, layer.wq.kernel)
  q = q.reshape(b, t, c.num_heads, c.qk_head_dim)
  kv = mm(x, layer.wkv_a.kernel)
  latent = _rms_norm(kv[..., :512], layer.kv_norm.scale[...], c.rms_norm_eps)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  freqs = rope.rope_frequencies(64, c.rope_theta, c.rope_scaling)
  factor = rope.rope_attention_factor(c.rope_scaling)
  k_pe = rope.apply_rope(kv[..., 512:], pos, freqs, factor)
  q_pe = rope.apply_rope(q[..., c.qk_nope_head_dim:], pos, freqs, factor)

  # Expand K and V per head: [b, T, h, qk_nope] and [b, T, h, v].
  w = layer.wkv_b.kernel[...].reshape(512, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
  k_nope = jnp.einsum("btc,chn->bthn", latent, w[..., : c.qk_nope_head_dim], precision=hp)
  v = jnp.einsum("btc,chv->bthv", latent, w[..., c.qk_nope_head_dim:], precision=hp)
  k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + (64,))],
                      axis=-1)
  qq = jnp.concatenate([q[..., : c.qk_nope_head_dim], q_pe], axis=-1)
  scores = jnp.einsum("bshd,bthd->bhst", qq, k, precision=hp) * c.softmax_scale
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  p = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  o = jnp.einsum("bhst,bthv->bshv", p, v, precision=hp).reshape(b, t, -1)
  return mm(o, layer.wo.kernel)


def run_layer_in_steps(layer, x, lengths, steps, *, dtype, implementation, shared_metadata):
  """Feeds each row its tokens through the cache, `steps[k]` per call (left-padded), and
  returns the layer's outputs at every token position."""
  b, t, _ = x.shape
  cache = PagedKVCache.create(b, 128, num_blocks=7, dtype=dtype)
  allocator = PageAllocator.for_cache(cache)
  graphdef, state = nnx.split(layer)

  @jax.jit
  def step(state, cache, table, xs, num_new):
    layer = nnx.merge(graphdef, state)
    cache = cache.replace(block_table=table)
    md = None
    if shared_metadata:
      md = get_mla_metadata(cache.lengths + num_new, xs.shape[1] * layer.config.num_heads, 1,
                            implementation=implementation)
    return layer(xs, cache, num_new=num_new, metadata=md, implementation=implementation)

  out = np.zeros(x.shape, np.float32)
  done = np.zeros(b, np.int64)
  schedule = list(steps) + [steps[-1]] * t
  for s in schedule:
    if (done == lengths).all():
      break
    n = np.minimum(s, lengths - done)
    xs = np.zeros((b, s, x.shape[2]), np.float32)
    for i in range(b):
      xs[i, s - n[i]:] = x[i, done[i]: done[i] + n[i]]
      allocator.reserve(i, done[i] + n[i])
    y, cache = step(state, cache, allocator.device_block_table(), jnp.asarray(xs),
                    jnp.asarray(n, jnp.int32))
    y = np.asarray(y, np.float32)
    for i in range(b):
      out[i, done[i]: done[i] + n[i]] = y[i, s - n[i]:]
    done += n
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
  return out


def _compare(got, want, lengths, *, rel, cos):
  for i, n in enumerate(lengths):
    g, w = got[i, :n], np.asarray(want[i, :n], np.float64)
    err = np.max(np.abs(g - w)) / np.max(np.abs(w))
    cos_diff = 1 - np.sum(g * w) / np.sqrt(np.sum(g * g) * np.sum(w * w))
    assert err <= rel, f"row {i}: max error {err:.3g} of the largest output (tolerance {rel})"
    assert cos_diff <= cos, f"row {i}: cosine difference {cos_diff:.3g} > {cos}"


def _check_against_plain(q_lora_rank, dtype, implementation, shared_metadata, rel, cos):
  config = MLAConfig(q_lora_rank=q_lora_rank, **SMALL)
  # Jitted, initialisation and the oracle compile once instead of op by op.
  layer = nnx.jit(lambda: MultiHeadLatentAttention(config, rngs=nnx.Rngs(0)))()
  lengths = np.array(LENGTHS)
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, max(LENGTHS), 64)), np.float32)
  got = run_layer_in_steps(layer, x, lengths, STEPS, dtype=dtype,
                           implementation=implementation, shared_metadata=shared_metadata)
  want = jax.jit(plain_mla)(layer, jnp.asarray(x))  # causal: padding past a length is unseen
  _compare(got, want, lengths, rel=rel, cos=cos)


def test_absorbed_layer_equals_plain_mla_float32_cache():
  # A float32 cache (reference path only) isolates the algebra: absorption, paging, RoPE
  # positions, ragged left-padded steps. Errors are float32 rounding (GPUs would otherwise run
  # float32 matmuls in TF32).
  with jax.default_matmul_precision("float32"):
    _check_against_plain(None, jnp.float32, "xla", False, rel=1e-5, cos=1e-7)


@pytest.mark.parametrize("implementation", [
    None,
    pytest.param("cuda", marks=pytest.mark.gpu),
])
def test_absorbed_layer_equals_plain_mla_bf16_cache(implementation):
  # The kernels' setting: bf16 cache rows and queries, metadata shared by the step.
  _check_against_plain(32, jnp.bfloat16, implementation, True, rel=1.5e-2, cos=5e-5)


def test_softmax_scale_is_the_models():
  m = 0.1 * 0.707 * math.log(40) + 1
  assert math.isclose(MLAConfig().softmax_scale, 192**-0.5 * m * m)
  assert math.isclose(MLAConfig(rope_scaling=None).softmax_scale, 192**-0.5)
  v3 = rope.YarnScaling(mscale=1.0, mscale_all_dim=1.0)
  assert math.isclose(rope.mla_softmax_scale(192, v3), 192**-0.5 * (1 + 0.1 * math.log(40))**2)
  assert rope.rope_attention_factor(v3) == 1.0


def test_yarn_frequencies_keep_fast_dims_and_interpolate_slow_ones():
  plain = rope.rope_frequencies(64, 10000.0)
  np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 64, 2) / 64))
  yarn = rope.rope_frequencies(64, 10000.0, rope.YarnScaling())
  assert yarn[0] == plain[0]                                    # turns > beta_fast times
  np.testing.assert_allclose(yarn[-1], plain[-1] / 40)           # turns < beta_slow times
  assert np.all(np.diff(yarn) < 0)
  assert np.all((yarn <= plain) & (yarn >= plain / 40))


def test_rope_rotates_interleaved_pairs():
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 2, 3, 8)), np.float32)
  pos = np.array([[5, 17]])
  freqs = rope.rope_frequencies(8, 100.0)
  got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), freqs, 0.5))
  for s in range(2):
    for h in range(3):
      for i, f in enumerate(freqs):
        z = complex(x[0, s, h, 2 * i], x[0, s, h, 2 * i + 1]) * 0.5 * cmath.exp(1j * pos[0, s] * f)
        np.testing.assert_allclose(got[0, s, h, 2 * i: 2 * i + 2], [z.real, z.imag], rtol=1e-5,
                                   atol=1e-6)


def test_config_rejects_latent_sizes_the_kernels_cannot_take():
  with pytest.raises(ValueError, match="kv_lora_rank, qk_rope_head_dim: expected 512, 64"):
    MLAConfig(kv_lora_rank=256)


def test_importing_jax_flashmla_does_not_import_flax():
  import subprocess
  import sys

  code = "import sys, jax_flashmla, jax_flashmla.cache, jax_flashmla.allocator; " \
         "print('flax' in sys.modules)"
  # Import the same jax_flashmla as this run (`python -P` tests the installed package).
  flags = ["-P"] if getattr(sys.flags, "safe_path", False) else []
  out = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "False"
