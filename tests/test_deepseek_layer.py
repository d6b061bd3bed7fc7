"""What the DeepSeek decoder added to the MLA layer and what it builds on: explicit RoPE
positions, the half (`rope_interleave=False`) rotary layout and its row reorder, and expert
routing against a plain NumPy statement of DeepSeek's rules."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_flashmla import rope  # noqa: E402
from jax_flashmla.cache import PagedKVCache  # noqa: E402
from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention  # noqa: E402
from jax_flashmla.models import hf  # noqa: E402
from jax_flashmla.models.deepseek import DeepseekConfig, route  # noqa: E402

SMALL = dict(hidden_size=64, num_heads=2, qk_nope_head_dim=16, v_head_dim=24,
             rope_scaling=rope.YarnScaling(factor=4.0, original_max_position_embeddings=32))


def _layer(**kw):
  config = MLAConfig(**dict(SMALL, **kw))
  return nnx.jit(lambda: MultiHeadLatentAttention(config, rngs=nnx.Rngs(0)))()


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # On a GPU, float32 matmuls would otherwise run in TF32 (the tolerances are float32's).
  with jax.default_matmul_precision("float32"):
    yield


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, cache, xs, positions):
  return nnx.merge(graphdef, state)(xs, cache, positions=positions, implementation="xla")


def _two_steps(layer, x, offset=None):
  """Prefill `x[:, :-1]`, then decode `x[:, -1:]`; returns the decode step's output. `offset`:
  explicit positions shifted by it (None: the layer's default positions)."""
  b, t, _ = x.shape
  cache = PagedKVCache.create(b, 64, dtype=jnp.float32)
  graphdef, state = nnx.split(layer)

  def pos(start, n):
    return None if offset is None else jnp.broadcast_to(jnp.arange(start, start + n) + offset,
                                                        (b, n)).astype(jnp.int32)

  _, cache = _step(graphdef, state, cache, x[:, :-1], pos(0, t - 1))
  y, _ = _step(graphdef, state, cache, x[:, -1:], pos(t - 1, 1))
  return np.asarray(y)


def test_explicit_positions_default_to_the_cache_lengths():
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (2, 10, 64))
  default = _two_steps(layer, x)
  np.testing.assert_array_equal(_two_steps(layer, x, offset=0), default)
  # Attention sees only position differences: shifting every position changes nothing ...
  np.testing.assert_allclose(_two_steps(layer, x, offset=1000), default, rtol=1e-3, atol=1e-4)
  # ... but other positions do.
  graphdef, state = nnx.split(layer)
  cache = PagedKVCache.create(2, 64, dtype=jnp.float32)
  shuffled = jnp.stack([jax.random.permutation(jax.random.key(i), 9) for i in range(2)])
  shuffled = _step(graphdef, state, cache, x[:, :-1], shuffled.astype(jnp.int32))[0]
  plain = _step(graphdef, state, cache, x[:, :-1], None)[0]
  assert np.abs(np.asarray(shuffled) - np.asarray(plain)).max() > 1e-3


def test_positions_shape_is_checked():
  layer = _layer()
  with pytest.raises(ValueError, match=r"positions: expected an integer array of shape \(2, 3\)"):
    layer(jnp.zeros((2, 3, 64)), PagedKVCache.create(2, 64, dtype=jnp.float32),
          positions=jnp.zeros((2, 4), jnp.int32), implementation="xla")


def test_half_layout_rope_is_the_interleaved_one_permuted():
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 2, 64)), np.float32)
  pos = jnp.array([[0, 7, 300]])
  freqs = rope.rope_frequencies(64, 10000.0, SMALL["rope_scaling"])
  perm = hf.rope_interleave_permutation(64)
  assert list(perm[:4]) == [0, 32, 1, 33]
  half = rope.apply_rope(jnp.asarray(x), pos, freqs, 0.9, interleaved=False)
  inter = rope.apply_rope(jnp.asarray(x[..., perm]), pos, freqs, 0.9)
  np.testing.assert_allclose(np.asarray(half)[..., perm], np.asarray(inter), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_reordered_rows_run_the_half_layout_layer(q_lora_rank):
  # A layer told `rope_interleave=False` on half-layout weights equals DeepSeek's layout on the
  # rows `interleave_rope_rows` reorders (what `from_pretrained` does on load).
  half = _layer(q_lora_rank=q_lora_rank, rope_interleave=False)
  inter = _layer(q_lora_rank=q_lora_rank)
  c = half.config
  for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
    if hasattr(half, name):
      getattr(inter, name).kernel[...] = getattr(half, name).kernel[...]
  for name in ("q_norm", "kv_norm"):
    if hasattr(half, name):
      getattr(inter, name).scale[...] = getattr(half, name).scale[...]
  x = jax.random.normal(jax.random.key(2), (2, 10, 64))
  want = _two_steps(half, x)
  assert np.abs(_two_steps(inter, x) - want).max() > 1e-3  # the same rows, other pairs
  q = inter.wq_b if q_lora_rank else inter.wq
  q.kernel[...] = hf.interleave_rope_rows(np.asarray(q.kernel[...]).T, c.num_heads,
                                          c.qk_head_dim, 64).T
  inter.wkv_a.kernel[...] = hf.interleave_rope_rows(np.asarray(inter.wkv_a.kernel[...]).T, 1,
                                                    576, 64).T
  np.testing.assert_allclose(_two_steps(inter, x), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------

def _config(**kw):
  return DeepseekConfig(attention=MLAConfig(hidden_size=64, num_heads=2), num_layers=2,
                        vocab_size=16, intermediate_size=32, moe_intermediate_size=8, **kw)


def route_oracle(logits, c, bias):
  """DeepSeek's routing, one token at a time, as the model cards and modeling code state it."""
  e, k = c.num_routed_experts, c.num_experts_per_tok
  combine = np.zeros(logits.shape)
  for t, row in enumerate(logits.astype(np.float64)):
    if c.scoring_func == "softmax":
      scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    else:
      scores = 1 / (1 + np.exp(-row))
    choice = scores + (0 if bias is None else bias)
    allowed = list(range(e))
    if c.topk_method != "greedy" and c.n_group > 1:
      size = e // c.n_group
      groups = [choice[g * size:(g + 1) * size] for g in range(c.n_group)]
      if c.topk_method == "group_limited_greedy":
        group_score = [g.max() for g in groups]
      else:
        group_score = [np.sort(g)[-2:].sum() for g in groups]
      best = sorted(range(c.n_group), key=lambda g: -group_score[g])[: c.topk_group]
      allowed = [x for g in best for x in range(g * size, (g + 1) * size)]
    chosen = sorted(allowed, key=lambda x: -choice[x])[:k]
    w = scores[chosen]
    if c.norm_topk_prob and k > 1:
      w = w / w.sum()
      if c.scoring_func == "sigmoid":
        w = w * c.routed_scaling_factor
    else:
      w = w * c.routed_scaling_factor
    combine[t, chosen] = w
  return combine


@pytest.mark.parametrize("kw", [
    dict(num_routed_experts=64, num_experts_per_tok=6),                             # V2-Lite
    dict(num_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy",
         n_group=4, topk_group=2, routed_scaling_factor=16.0),                       # V2
    dict(num_routed_experts=16, num_experts_per_tok=3, norm_topk_prob=True),         # normalised
    dict(num_routed_experts=32, num_experts_per_tok=4, scoring_func="sigmoid",
         topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
         routed_scaling_factor=2.5),                                                 # V3
    dict(num_routed_experts=24, num_experts_per_tok=4, scoring_func="sigmoid",
         topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.827),  # Kimi-K2
])
def test_routing_is_deepseeks(kw):
  c = _config(**kw)
  logits = np.asarray(jax.random.normal(jax.random.key(0), (40, c.num_routed_experts)) * 2)
  bias = None
  if c.topk_method == "noaux_tc":
    bias = np.asarray(jax.random.normal(jax.random.key(1), (c.num_routed_experts,)) * 0.3)
  weights, experts = jax.jit(lambda x, b: route(x, c, b))(jnp.asarray(logits),
                                                          None if bias is None else
                                                          jnp.asarray(bias))
  got = np.zeros(logits.shape)
  np.put_along_axis(got, np.asarray(experts), np.asarray(weights), axis=1)
  np.testing.assert_allclose(got, route_oracle(logits, c, bias), rtol=1e-5, atol=1e-7)


def test_moe_layers_follow_first_k_dense_and_frequency():
  c = dataclasses.replace(_config(num_routed_experts=4, num_experts_per_tok=2),
                          num_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
  assert [c.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
