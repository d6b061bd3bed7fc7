"""A Flax NNX layer: DeepSeek-V2/V3 multi-head latent attention at decode, run by jax_flashmla.

Needs Flax (`pip install jax_flashmla[flax]`); `import jax_flashmla` alone does not import it.

Per token the layer caches one 576-wide row, `[kv_norm(c_kv) (512) | rope(k_pe) (64)]`, and
attends with absorbed weights, so decode is MQA over that row (docs/design.md#what-it-computes):

    q_nope·k_nope = q_nope·(W_UK c) = (W_UKᵀ q_nope)·c     query absorbed into the 512 latent
    Σ p·v         = Σ p·(W_UV c)    = W_UV (Σ p·c)         value projection after attention

with `W_UK`, `W_UV` the two halves of `wkv_b` (DeepSeek's names). The softmax scale is the
pre-absorption one: `(qk_nope + qk_rope) ** -0.5` times YaRN's mscale².
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of jax_flashmla
  raise ImportError("jax_flashmla.layers needs Flax: pip install 'jax_flashmla[flax]'") from e

from jax_flashmla import rope
from jax_flashmla.cache import PagedKVCache, mla_decode
from jax_flashmla.metadata import MetadataLike
from jax_flashmla.constants import HEAD_DIM_K, HEAD_DIM_V


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Shapes of one MLA layer; defaults are DeepSeek-V2-Lite's (V2/V3 set `q_lora_rank=1536`).

  `kv_lora_rank` and `qk_rope_head_dim` are fixed by the kernels (512 + 64 = 576 per row). The
  default YaRN is V2's (`mscale = mscale_all_dim = 0.707`); V3, R1 and Kimi-K2 use 1.0, so build
  their configs with `MLAConfig.from_hf` rather than by hand. `rope_interleave=False` says the
  rotary rows of `wq`/`wq_b` and `wkv_a` pair the two halves of the 64 dims (transformers'
  `rope_interleave=False` layout) instead of neighbours (DeepSeek's).
  """

  hidden_size: int = 2048
  num_heads: int = 16
  q_lora_rank: int | None = None
  kv_lora_rank: int = HEAD_DIM_V
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = HEAD_DIM_K - HEAD_DIM_V
  v_head_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: rope.YarnScaling | None = rope.YarnScaling()
  rms_norm_eps: float = 1e-6
  rope_interleave: bool = True

  def __post_init__(self):
    if (self.kv_lora_rank, self.qk_rope_head_dim) != (HEAD_DIM_V, HEAD_DIM_K - HEAD_DIM_V):
      raise ValueError(f"kv_lora_rank, qk_rope_head_dim: expected {HEAD_DIM_V}, "
                       f"{HEAD_DIM_K - HEAD_DIM_V} (a 576-wide cache row), got "
                       f"{self.kv_lora_rank}, {self.qk_rope_head_dim}")

  @classmethod
  def from_hf(cls, config) -> MLAConfig:
    """The attention of a Hugging Face DeepSeek-V2/V3-style config (any MLA model whose cache row
    is 512 + 64: DeepSeek-V2, V2-Lite, V3, R1, V3.1, Kimi-K2, ...).

    Args:
      config: a `config.json` path (or the directory holding it), its dict, or a transformers
        config object. Both spellings of the RoPE settings are read: the published `rope_theta`
        plus `rope_scaling`, and transformers 5's `rope_parameters`.

    Returns:
      The config with every attention field of `config`, YaRN included (`factor`,
      `original_max_position_embeddings`, `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`,
      with DeepSeek's defaults for missing keys), and `rope_interleave` (default True).

    Raises:
      ValueError: a key the layer needs is missing, or a setting it cannot run (attention
        biases, a latent other than 512 + 64, RoPE scaling other than YaRN).
    """
    from jax_flashmla.models import hf  # no flax or safetensors there; imported only when used

    c = hf.read_hf_config(config)
    hf.require_keys(c, ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                        "qk_rope_head_dim", "v_head_dim"))
    if c.get("attention_bias"):
      raise ValueError("config: expected attention_bias false (the layer's projections have no "
                       "biases), got true")
    theta, scaling = hf.rope_from_hf(c)
    return cls(
        hidden_size=int(c["hidden_size"]),
        num_heads=int(c["num_attention_heads"]),
        q_lora_rank=int(c["q_lora_rank"]) if c.get("q_lora_rank") else None,
        kv_lora_rank=int(c["kv_lora_rank"]),
        qk_nope_head_dim=int(c["qk_nope_head_dim"]),
        qk_rope_head_dim=int(c["qk_rope_head_dim"]),
        v_head_dim=int(c["v_head_dim"]),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_interleave=bool(c.get("rope_interleave", True)),
    )

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    return rope.mla_softmax_scale(self.qk_head_dim, self.rope_scaling)


class MultiHeadLatentAttention(nnx.Module):
  """MLA for decode and chunked prefill over a `PagedKVCache`, attention by jax_flashmla.

  Weights keep DeepSeek's layout and names: `wq` (or `wq_a`, `q_norm`, `wq_b` with a q LoRA),
  `wkv_a` (hidden -> 512 + 64), `kv_norm`, `wkv_b` (512 -> heads × (qk_nope + v)), `wo`.

  Args:
    config: the layer's shapes.
    rngs: for the random initialisation.
    dtype: of the projections' computation (None: the parameters' dtype).
    param_dtype: of the weights.
  """

  def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.config = config
    c = config

    def dense(features_in, features_out):
      return nnx.Linear(features_in, features_out, use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

    def norm(features):
      return nnx.RMSNorm(features, epsilon=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

    if c.q_lora_rank:
      self.wq_a = dense(c.hidden_size, c.q_lora_rank)
      self.q_norm = norm(c.q_lora_rank)
      self.wq_b = dense(c.q_lora_rank, c.num_heads * c.qk_head_dim)
    else:
      self.wq = dense(c.hidden_size, c.num_heads * c.qk_head_dim)
    self.wkv_a = dense(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
    self.kv_norm = norm(c.kv_lora_rank)
    self.wkv_b = dense(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim))
    self.wo = dense(c.num_heads * c.v_head_dim, c.hidden_size)
    # A tuple of floats: static, not a parameter.
    self.rope_frequencies = tuple(rope.rope_frequencies(c.qk_rope_head_dim, c.rope_theta,
                                                        c.rope_scaling).tolist())

  def absorbed_weights(self) -> tuple[jax.Array, jax.Array]:
    """`W_UK [512, h, qk_nope]` and `W_UV [512, h, v]`: the two halves of `wkv_b`."""
    c = self.config
    w = self.wkv_b.kernel[...].reshape(c.kv_lora_rank, c.num_heads,
                                       c.qk_nope_head_dim + c.v_head_dim)
    return w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]

  def project(self, x: jax.Array, positions: jax.Array):
    """The per-token projections, shared with a non-absorbed reference.

    Args:
      x: `[b, s, hidden]`.
      positions: `[b, s]` token positions (for RoPE).

    Returns:
      `q_nope [b, s, h, qk_nope]`, `q_pe [b, s, h, 64]` (rotated), `c_kv [b, s, 512]`
      (normalised) and `k_pe [b, s, 64]` (rotated).
    """
    c = self.config
    b, s, _ = x.shape
    q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)
    q = q.reshape(b, s, c.num_heads, c.qk_head_dim)
    q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    kv = self.wkv_a(x)
    c_kv = self.kv_norm(kv[..., : c.kv_lora_rank])
    freqs, factor = self.rope_frequencies, rope.rope_attention_factor(c.rope_scaling)
    q_pe = rope.apply_rope(q_pe, positions, freqs, factor, interleaved=c.rope_interleave)
    k_pe = rope.apply_rope(kv[..., c.kv_lora_rank:], positions, freqs, factor,
                           interleaved=c.rope_interleave)
    return q_nope, q_pe, c_kv, k_pe

  def __call__(
      self,
      x: jax.Array,
      cache: PagedKVCache,
      *,
      num_new: jax.Array | None = None,
      metadata: MetadataLike = None,
      implementation: str | None = None,
      positions: jax.Array | None = None,
  ) -> tuple[jax.Array, PagedKVCache]:
    """Attends the step's `s` tokens (each to its sequence's cache and itself) and caches them.

    Args:
      x: `[b, s, hidden]` hidden states of the step's tokens; `s == 1` for plain decode.
      cache: this layer's `PagedKVCache` (h_kv = 1, pages with room for the new tokens).
      num_new: `[b]` int32 tokens of sequence `i` in this step, in `[0, s]`; its tokens are the
        last `num_new[i]` of `x[i]` (left padding). Default: all `s`. Rows with 0 write nothing;
        outputs of padding positions are meaningless.
      metadata: `get_mla_metadata(cache.lengths + num_new, s * num_heads, 1)`, computed once
        per step and shared by all layers; None computes it here.
      implementation: None (kernels on Hopper, pure JAX elsewhere), "cuda" or "xla".
      positions: `[b, s]` integer RoPE positions of the step's tokens (entries of padding are
        ignored). Default: each token's index in its sequence, `cache.lengths[i] + j - (s -
        num_new[i])`. Positions only rotate q and k: where a row is cached and which rows it
        attends to still follow the cache lengths.

    Returns:
      `[b, s, hidden]` in x's dtype and the cache with the step's rows written.
    """
    c = self.config
    b, s, _ = x.shape
    if cache.num_kv_heads != 1:
      raise ValueError(f"cache: MLA caches one latent head, got h_kv={cache.num_kv_heads}")
    num_new = jnp.full((b,), s, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
    if positions is None:
      # Token j of row i sits at position lengths[i] + j - (s - num_new[i]); padding gets 0.
      offset = jnp.arange(s, dtype=jnp.int32)[None, :] - (s - num_new)[:, None]
      positions = jnp.maximum(cache.lengths[:, None] + offset, 0)
    elif tuple(positions.shape) != (b, s) or not jnp.issubdtype(positions.dtype, jnp.integer):
      raise ValueError(f"positions: expected an integer array of shape ({b}, {s}) (from x), got "
                       f"{positions.dtype}{list(positions.shape)}")

    q_nope, q_pe, c_kv, k_pe = self.project(x, positions)
    w_uk, w_uv = self.absorbed_weights()
    q_latent = jnp.einsum("bshn,chn->bshc", q_nope, w_uk.astype(q_nope.dtype))
    q = jnp.concatenate([q_latent, q_pe.astype(q_latent.dtype)], axis=-1)
    row = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)[:, :, None, :]

    cache = cache.write(row, num_new)
    latent, _ = mla_decode(q.astype(cache.query_dtype), cache, metadata,
                           softmax_scale=c.softmax_scale, causal=True,
                           implementation=implementation)
    o = jnp.einsum("bshc,chv->bshv", latent.astype(q_latent.dtype), w_uv.astype(q_latent.dtype))
    return self.wo(o.reshape(b, s, c.num_heads * c.v_head_dim)).astype(x.dtype), cache
