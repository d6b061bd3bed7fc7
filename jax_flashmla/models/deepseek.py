"""DeepSeek-V2/V3 decoders for inference, from Hugging Face checkpoints, served by jax_flashmla.

    model = from_pretrained("path/to/DeepSeek-V2-Lite")          # config.json + safetensors
    out = generate(model, [prompt_ids], max_new_tokens=32)        # greedy, paged cache
    print(out.tokens[0])

The model: token embedding; `num_layers` pre-norm blocks, each multi-head latent attention (the
`jax_flashmla.layers` layer, attention by the kernels on Hopper) then either a dense SwiGLU MLP
(the first `first_k_dense_replace` layers) or a mixture of experts with shared experts; final
RMSNorm; LM head. Routing, as DeepSeek's code does it:

- V2 (`scoring_func="softmax"`): softmax scores; `greedy` top-k, or `group_limited_greedy`: keep
  the `topk_group` groups with the highest single score, then top-k within them; weights are the
  scores times `routed_scaling_factor` (normalised instead when `norm_topk_prob`, which no
  published V2 config sets and transformers' V2 ignores).
- V3, R1, Kimi-K2 (`scoring_func="sigmoid"`, `topk_method="noaux_tc"`): sigmoid scores; experts
  are chosen on scores plus `e_score_correction_bias`, within the `topk_group` groups whose two
  best biased scores sum highest (the others masked with -inf, as DeepSeek's inference code and
  transformers do); weights are the unbiased scores, normalised when `norm_topk_prob`, times
  `routed_scaling_factor`.

The experts run densely: every expert's SwiGLU on every token, weighted by the routing (zero for
experts not chosen). Exact, jit-friendly and bounded in memory, but `num_experts /
num_experts_per_tok` times the arithmetic of a grouped kernel: decode, which reads every expert's
weights anyway once a batch routes to most of them, pays little; long prefills pay more.

Call contract (that of `jax_flashmla.serving`, whose `Server` drives this model as it does the
demo's): `model(tokens [b, s], caches, num_new=, metadata=, implementation=, positions=)` returns
the last token's logits `[b, vocab]` float32 and the updated per-layer `PagedKVCache`s;
`model.config` has `num_layers` and `attention` (the `MLAConfig`).

`python -m jax_flashmla.models.deepseek --random v2-lite` times greedy generation on a
random-weight DeepSeek-V2-Lite-shaped model; `--checkpoint DIR` runs a checkpoint.

Needs Flax; loading needs `safetensors`, not torch (`pip install 'jax_flashmla[models]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of jax_flashmla
  raise ImportError("jax_flashmla.models needs Flax: pip install 'jax_flashmla[models]'") from e

from jax_flashmla import serving
from jax_flashmla.allocator import PageAllocator
from jax_flashmla.cache import PagedKVCache
from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention
from jax_flashmla.models import hf

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
IMPLEMENTATIONS = {"auto": None, "cuda": "cuda", "xla": "xla"}
TOKENIZER_FILE = "tokenizer.json"  # in a checkpoint directory, for text prompts


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
  """A DeepSeek-V2/V3-style decoder (`from_hf` reads one from a Hugging Face config).

  Attributes:
    attention: the MLA layers' config.
    num_layers: decoder blocks (`num_hidden_layers`; V3's multi-token-prediction layer is not
      part of the model).
    vocab_size: rows of the embedding and the LM head.
    intermediate_size: width of the dense MLPs.
    moe_intermediate_size: width of each expert (the shared experts together are
      `num_shared_experts` times as wide).
    num_routed_experts: 0 makes every block dense.
    num_shared_experts: experts every token goes through (0: none).
    num_experts_per_tok: routed experts per token (k).
    first_k_dense_replace: the first blocks keep a dense MLP.
    moe_layer_freq: of the later blocks, those with `index % moe_layer_freq == 0` are MoE.
    scoring_func: "softmax" (V2) or "sigmoid" (V3).
    topk_method: "greedy", "group_limited_greedy" (V2) or "noaux_tc" (V3: the correction bias).
    n_group: expert groups for the group-limited methods.
    topk_group: groups a token may route to.
    norm_topk_prob: normalise the k weights to sum to 1.
    routed_scaling_factor: multiplies the routed experts' weights.
    tie_word_embeddings: the LM head is the embedding.
    rms_norm_eps: of the blocks' and the final RMSNorm.
    bos_token_id: from the checkpoint's config, for prompts (not used by the model).
    eos_token_id: likewise (an int or a tuple of ints).
  """

  attention: MLAConfig
  num_layers: int
  vocab_size: int
  intermediate_size: int
  moe_intermediate_size: int = 0
  num_routed_experts: int = 0
  num_shared_experts: int = 0
  num_experts_per_tok: int = 0
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  scoring_func: str = "softmax"
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  tie_word_embeddings: bool = False
  rms_norm_eps: float = 1e-6
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.scoring_func not in SCORING_FUNCS:
      raise ValueError(f"scoring_func: expected one of {SCORING_FUNCS}, got {self.scoring_func!r}")
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(f"topk_method: expected one of {TOPK_METHODS}, got {self.topk_method!r}")
    if self.num_routed_experts:
      e, k = self.num_routed_experts, self.num_experts_per_tok
      if not 1 <= k <= e:
        raise ValueError(f"num_experts_per_tok: expected 1..{e} (num_routed_experts), got {k}")
      if self.n_group < 1 or e % self.n_group:
        raise ValueError(f"n_group: expected a divisor of num_routed_experts={e}, got "
                         f"{self.n_group}")
      if not 1 <= self.topk_group <= self.n_group:
        raise ValueError(f"topk_group: expected 1..{self.n_group} (n_group), got "
                         f"{self.topk_group}")
      if self.topk_method == "noaux_tc" and self.n_group > 1 and e // self.n_group < 2:
        raise ValueError(f"n_group: noaux_tc scores a group by its two best experts; expected "
                         f"at least 2 experts per group, got {e} experts in {self.n_group}")
      if self.moe_intermediate_size < 1:
        raise ValueError(f"moe_intermediate_size: expected a positive int with experts, got "
                         f"{self.moe_intermediate_size}")
    if self.moe_layer_freq < 1:
      raise ValueError(f"moe_layer_freq: expected a positive int, got {self.moe_layer_freq}")

  def is_moe_layer(self, index: int) -> bool:
    """Whether block `index` has experts (DeepSeek's rule)."""
    return (self.num_routed_experts > 0 and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0)

  @classmethod
  def from_hf(cls, config) -> DeepseekConfig:
    """The decoder of a Hugging Face DeepSeek-V2/V3-style config.

    Args:
      config: a `config.json` path (or its directory), its dict, or a transformers config.

    The family sets what a config may leave out (transformers 5 drops `scoring_func` and
    `topk_method` from the V3 configs it saves): `model_type` "deepseek_v3" or "kimi_k2" (or a
    DeepseekV3 architecture) defaults to sigmoid scores and `noaux_tc`, anything else to softmax
    and `greedy`.
    """
    c = hf.read_hf_config(config)
    hf.require_keys(c, ("vocab_size", "num_hidden_layers", "intermediate_size"))
    attention = MLAConfig.from_hf(c)
    if c.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config: expected hidden_act 'silu', got {c['hidden_act']!r}")
    if c.get("mlp_bias"):
      raise ValueError("config: expected mlp_bias false (the MLPs have no biases), got true")
    v3 = (c.get("model_type") in ("deepseek_v3", "kimi_k2")
          or any("V3" in a for a in c.get("architectures") or ()))
    experts = int(c.get("n_routed_experts") or 0)
    eos = c.get("eos_token_id")
    return cls(
        attention=attention,
        num_layers=int(c["num_hidden_layers"]),
        vocab_size=int(c["vocab_size"]),
        intermediate_size=int(c["intermediate_size"]),
        moe_intermediate_size=int(c.get("moe_intermediate_size") or 0),
        num_routed_experts=experts,
        num_shared_experts=int(c.get("n_shared_experts") or 0),
        num_experts_per_tok=int(c.get("num_experts_per_tok") or 0) if experts else 0,
        first_k_dense_replace=int(c.get("first_k_dense_replace") or 0),
        moe_layer_freq=int(c.get("moe_layer_freq") or 1),
        scoring_func=c.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        topk_method=c.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
        n_group=int(c.get("n_group") or 1),
        topk_group=int(c.get("topk_group") or 1),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )


# Published DeepSeek-V2-Lite hyperparameters (its config.json), for random-weight runs.
V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "routed_scaling_factor": 1.0, "topk_method": "greedy", "scoring_func": "softmax",
    "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 163840, "rope_theta": 10000,
    "bos_token_id": 100000, "eos_token_id": 100001,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}
# The same architecture scaled down (for tests of the command line).
TINY = dict(V2_LITE, vocab_size=256, hidden_size=64, intermediate_size=128,
            moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, qk_nope_head_dim=16,
            v_head_dim=16)
PRESETS = {"v2-lite": V2_LITE, "tiny": TINY}


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

def route(router_logits: jax.Array, config: DeepseekConfig,
          bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Chooses each token's routed experts and their weights (see the module docstring).

  Args:
    router_logits: `[t, num_routed_experts]` float32.
    config: the routing settings.
    bias: `[num_routed_experts]` `e_score_correction_bias` (noaux_tc), else None.

  Returns:
    `weights [t, k]` float32 and `experts [t, k]` int32.
  """
  c = config
  t, e = router_logits.shape
  k, groups = c.num_experts_per_tok, c.n_group
  if c.scoring_func == "softmax":
    scores = jax.nn.softmax(router_logits, axis=-1)
  else:
    scores = jax.nn.sigmoid(router_logits)
  choice = scores if bias is None else scores + bias.astype(jnp.float32)
  if c.topk_method != "greedy" and groups > 1 and c.topk_group < groups:
    grouped = choice.reshape(t, groups, e // groups)
    if c.topk_method == "group_limited_greedy":
      group_scores = grouped.max(axis=-1)
    else:  # noaux_tc: a group is as good as its two best experts
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
    _, kept = jax.lax.top_k(group_scores, c.topk_group)
    keep = jax.nn.one_hot(kept, groups, dtype=jnp.int32).sum(axis=1) > 0       # [t, groups]
    keep = jnp.repeat(keep, e // groups, axis=-1)
    # V2 masks with 0 (below every softmax score); V3's biased scores may be negative.
    masked = 0.0 if c.topk_method == "group_limited_greedy" else -jnp.inf
    choice = jnp.where(keep, choice, masked)
  chosen, experts = jax.lax.top_k(choice, k)
  if c.topk_method == "noaux_tc":
    weights = jnp.take_along_axis(scores, experts, axis=-1)   # the bias only chooses
  else:
    weights = chosen                                          # V2: 0 where a group was masked
  if c.norm_topk_prob and k > 1:
    weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    if c.scoring_func == "sigmoid":
      weights = weights * c.routed_scaling_factor
  else:
    weights = weights * c.routed_scaling_factor
  return weights, experts.astype(jnp.int32)


class DenseMLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = nnx.Linear(hidden, intermediate, **kw)
    self.up = nnx.Linear(hidden, intermediate, **kw)
    self.down = nnx.Linear(intermediate, hidden, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class MoE(nnx.Module):
  """Routed experts (stacked weights, run densely, weighted by `route`) plus shared experts.

  Parameters: `router [hidden, experts]` and `router_bias [experts]` (noaux_tc only), both
  float32 as DeepSeek keeps them; `expert_gate`, `expert_up` `[experts, hidden, inter]` and
  `expert_down [experts, inter, hidden]`; `shared` (a `DenseMLP`, or None).
  """

  def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.config = config
    self.dtype = dtype
    h, e, n = config.attention.hidden_size, config.num_routed_experts, config.moe_intermediate_size
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                             out_axis=-1, batch_axis=(0,))
    self.router = nnx.Param(nnx.initializers.normal(h**-0.5)(rngs.params(), (h, e), jnp.float32))
    self.router_bias = (nnx.Param(jnp.zeros((e,), jnp.float32))
                        if config.topk_method == "noaux_tc" else None)
    self.expert_gate = nnx.Param(init(rngs.params(), (e, h, n), param_dtype))
    self.expert_up = nnx.Param(init(rngs.params(), (e, h, n), param_dtype))
    self.expert_down = nnx.Param(init(rngs.params(), (e, n, h), param_dtype))
    self.shared = (DenseMLP(h, n * config.num_shared_experts, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype) if config.num_shared_experts else None)

  def __call__(self, x):
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    # Routing in float32 at full precision: a TF32 matmul could pick other experts.
    logits = jnp.dot(tokens.astype(jnp.float32), self.router[...],
                     precision=jax.lax.Precision.HIGHEST)
    bias = None if self.router_bias is None else self.router_bias[...]
    weights, experts = route(logits, self.config, bias)
    t, e = tokens.shape[0], self.config.num_routed_experts
    combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], experts].add(weights)

    dtype = self.dtype or self.expert_gate[...].dtype
    # Experts as a batch axis of both operands: batched matmuls read `[e, hidden, inter]` as it
    # is stored (with `e` only in the weights, XLA would transpose them to `[hidden, e * inter]`
    # first, a copy of every expert's weights per step).
    xs = jnp.broadcast_to(tokens.astype(dtype), (e,) + tokens.shape)
    gate = jnp.einsum("eth,ehn->etn", xs, self.expert_gate[...].astype(dtype))
    up = jnp.einsum("eth,ehn->etn", xs, self.expert_up[...].astype(dtype))
    act = jax.nn.silu(gate) * up
    # Weight before the down projection (linear, so the same sum); `where` keeps an expert that
    # was not chosen out even if its activations overflowed.
    w = combine.T[..., None]                                     # [e, t, 1]
    act = jnp.where(w != 0, act.astype(jnp.float32) * w, 0).astype(dtype)
    # Contracting experts and inter together: `[e * inter, hidden]` is the weights' own layout.
    y = jnp.einsum("etn,enh->th", act, self.expert_down[...].astype(dtype))
    y = y.reshape(shape)
    if self.shared is not None:
      y = y + self.shared(x)
    return y.astype(x.dtype)


class DecoderLayer(nnx.Module):
  """Pre-norm block: MLA then a dense MLP or a MoE, both residual."""

  def __init__(self, config: DeepseekConfig, index: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    a = config.attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(a.hidden_size, epsilon=config.rms_norm_eps, **kw)
    self.attn = MultiHeadLatentAttention(a, **kw)
    self.mlp_norm = nnx.RMSNorm(a.hidden_size, epsilon=config.rms_norm_eps, **kw)
    if config.is_moe_layer(index):
      self.mlp = MoE(config, **kw)
    else:
      self.mlp = DenseMLP(a.hidden_size, config.intermediate_size, **kw)

  def __call__(self, x, cache, **attn_kwargs):
    h, cache = self.attn(self.attn_norm(x), cache, **attn_kwargs)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class DeepseekForCausalLM(nnx.Module):
  """Embedding, `num_layers` decoder blocks, final RMSNorm, LM head.

  Args:
    config: the decoder.
    rngs: for the random initialisation (`from_pretrained` loads weights instead).
    dtype: of the computation (None: the parameters' dtype); routing is float32 always.
    param_dtype: of the weights (the router's stay float32).
  """

  def __init__(self, config: DeepseekConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.config = config
    a = config.attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Embed(config.vocab_size, a.hidden_size, **kw)
    self.layers = nnx.List([DecoderLayer(config, i, **kw) for i in range(config.num_layers)])
    self.norm = nnx.RMSNorm(a.hidden_size, epsilon=config.rms_norm_eps, **kw)
    self.lm_head = (None if config.tie_word_embeddings else
                    nnx.Linear(a.hidden_size, config.vocab_size, use_bias=False, **kw))

  @classmethod
  def from_pretrained(cls, directory, **kwargs) -> DeepseekForCausalLM:
    """`from_pretrained(directory, **kwargs)` (the module function)."""
    return from_pretrained(directory, **kwargs)

  def create_caches(self, batch_size: int, max_seq_len: int, *, num_blocks: int | None = None,
                    dtype=jnp.bfloat16, kv_format: str = "bf16") -> tuple[PagedKVCache, ...]:
    """One empty `PagedKVCache` per layer (see `PagedKVCache.create`)."""
    return tuple(PagedKVCache.create(batch_size, max_seq_len, num_blocks=num_blocks, dtype=dtype,
                                     kv_format=kv_format)
                 for _ in range(self.config.num_layers))

  def __call__(self, tokens, caches, *, num_new=None, metadata=None, implementation=None,
               positions=None, all_logits: bool = False):
    """Runs one step of `s` tokens per row through every layer and its cache.

    Args:
      tokens: `[b, s]` int32 token ids, each row's new tokens left-padded.
      caches: one `PagedKVCache` per layer.
      num_new, metadata, implementation, positions: as for `MultiHeadLatentAttention`
        (`metadata` is shared by every layer of the step).
      all_logits: return the logits of all `s` positions, `[b, s, vocab]`.

    Returns:
      The logits of each row's last token `[b, vocab]` float32 (or of every position), and the
      caches with the step's rows written.
    """
    if len(caches) != self.config.num_layers:
      raise ValueError(f"caches: expected one per layer ({self.config.num_layers}), got "
                       f"{len(caches)}")
    x = self.embed(tokens)
    new_caches = []
    for layer, cache in zip(self.layers, caches, strict=True):
      x, cache = layer(x, cache, num_new=num_new, metadata=metadata,
                       implementation=implementation, positions=positions)
      new_caches.append(cache)
    h = self.norm(x if all_logits else x[:, -1])
    logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return logits.astype(jnp.float32), tuple(new_caches)


def random_model(config: DeepseekConfig, *, seed: int = 0, dtype=None,
                 param_dtype=jnp.float32) -> DeepseekForCausalLM:
  """A model with random weights, initialised in one jitted call (on the default device)."""
  return nnx.jit(lambda: DeepseekForCausalLM(config, rngs=nnx.Rngs(seed), dtype=dtype,
                                             param_dtype=param_dtype))()


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

_ATTENTION = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
              "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
              "wo": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FP8 = (np.dtype(hf.ml_dtypes.float8_e4m3fn), np.dtype(hf.ml_dtypes.float8_e5m2))


class _CheckpointWeights:
  """Our parameters from a checkpoint's tensors: names, transposes, FP8, RoPE rows."""

  def __init__(self, checkpoint: hf.SafetensorsCheckpoint, hf_config: dict,
               config: DeepseekConfig):
    self.ckpt, self.config = checkpoint, config
    quant = hf_config.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
      raise ValueError(f"config: expected no quantization_config or FP8 blocks (quant_method "
                       f"'fp8'), got quant_method {quant.get('quant_method')!r}")
    self.block_size = tuple(quant.get("weight_block_size") or (128, 128))
    # The layer runs DeepSeek's interleaved layout; half-layout rows are reordered on load.
    self.reorder_rope = not config.attention.rope_interleave

  def tensor(self, name: str) -> np.ndarray:
    """A checkpoint tensor; FP8 weights dequantized with their `_scale_inv` blocks."""
    w = self.ckpt.get(name)
    scale = name + "_scale_inv"
    if scale in self.ckpt:
      return hf.dequantize_fp8_blocks(w, self.ckpt.get(scale), self.block_size)
    if w.dtype in _FP8:
      raise ValueError(f"{name}: a float8 weight without {scale} (its block scales)")
    return w

  def kernel(self, module: str, *, rope_heads: int = 0, head_dim: int = 0) -> np.ndarray:
    """`[in, out]`: the transpose of `module.weight`, rotary rows reordered where asked."""
    w = self.tensor(module + ".weight")
    if rope_heads and self.reorder_rope:
      w = hf.interleave_rope_rows(w, rope_heads, head_dim, self.config.attention.qk_rope_head_dim)
    return w.T

  def experts(self, prefix: str, which: str, dtype) -> np.ndarray:
    """Stacked expert weights in our layout, from per-expert tensors (as DeepSeek publishes
    them and transformers saves them) or from transformers' fused `gate_up_proj`/`down_proj`.
    Each expert is cast to `dtype` before stacking (dequantized FP8 is float32: 4x the bytes)."""
    c = self.config
    if f"{prefix}.experts.0.{_MLP[which]}.weight" in self.ckpt:
      return np.stack([self.kernel(f"{prefix}.experts.{e}.{_MLP[which]}").astype(dtype)
                       for e in range(c.num_routed_experts)])
    if which == "down":
      return np.swapaxes(self.tensor(f"{prefix}.experts.down_proj"), 1, 2)
    fused = self.tensor(f"{prefix}.experts.gate_up_proj")        # [e, 2 * inter, hidden]
    n = c.moe_intermediate_size
    part = fused[:, :n] if which == "gate" else fused[:, n:]
    return np.swapaxes(part, 1, 2)

  def value(self, path: tuple, dtype) -> np.ndarray:
    """The checkpoint's value of the parameter at `path` (an `nnx` state path), as `dtype`."""
    # A copy: never hand JAX a view of the read-only memory map (the CPU backend may alias it).
    return np.asarray(self._value(path, dtype)).astype(dtype)

  def _value(self, path: tuple, dtype) -> np.ndarray:
    a = self.config.attention
    if path == ("embed", "embedding"):
      return self.tensor("model.embed_tokens.weight")
    if path == ("norm", "scale"):
      return self.tensor("model.norm.weight")
    if path == ("lm_head", "kernel"):
      return self.kernel("lm_head")
    if path[0] != "layers":
      raise KeyError(path)
    prefix, rest = f"model.layers.{path[1]}", path[2:]
    if rest == ("attn_norm", "scale"):
      return self.tensor(f"{prefix}.input_layernorm.weight")
    if rest == ("mlp_norm", "scale"):
      return self.tensor(f"{prefix}.post_attention_layernorm.weight")
    if rest[0] == "attn":
      module = f"{prefix}.self_attn.{_ATTENTION[rest[1]]}"
      if rest[2] == "scale":
        return self.tensor(module + ".weight")
      if rest[1] in ("wq", "wq_b"):
        return self.kernel(module, rope_heads=a.num_heads, head_dim=a.qk_head_dim)
      if rest[1] == "wkv_a":
        return self.kernel(module, rope_heads=1, head_dim=a.kv_lora_rank + a.qk_rope_head_dim)
      return self.kernel(module)
    mlp = f"{prefix}.mlp"
    if rest == ("mlp", "router"):
      return self.tensor(f"{mlp}.gate.weight").T
    if rest == ("mlp", "router_bias"):
      return self.tensor(f"{mlp}.gate.e_score_correction_bias")
    if rest[1].startswith("expert_"):
      return self.experts(mlp, rest[1][len("expert_"):], dtype)
    if rest[1] == "shared":
      return self.kernel(f"{mlp}.shared_experts.{_MLP[rest[2]]}")
    return self.kernel(f"{mlp}.{_MLP[rest[1]]}")


def _checkpoint_dtype(hf_config: dict):
  name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
  return jnp.dtype({"bfloat16": "bfloat16", "float16": "float16"}.get(name, "float32"))


def from_pretrained(directory, *, param_dtype=None, dtype=None,
                    num_layers: int | None = None) -> DeepseekForCausalLM:
  """Loads a Hugging Face DeepSeek-V2/V3-style checkpoint directory.

  Reads `config.json` and the safetensors shards (through `model.safetensors.index.json` when
  there is one), one tensor at a time; no torch. FP8 weights with `weight_scale_inv` blocks (how
  V3, R1 and Kimi-K2 are published) are dequantized to `param_dtype`; checkpoints saved with
  `rope_interleave=False` get their rotary rows reordered to DeepSeek's interleaved layout (the
  returned config says `rope_interleave=True`). Parameters are built directly from the tensors
  (no random initialisation first).

  Args:
    directory: the checkpoint directory.
    param_dtype: of the weights; None: the checkpoint's `torch_dtype` (bfloat16 for DeepSeek's,
      FP8 ones included). The router's weights stay float32.
    dtype: of the computation (None: `param_dtype`).
    num_layers: load only the first `num_layers` blocks (e.g. to try a large model in less
      memory; its outputs are then not the model's).

  Returns:
    The model, its parameters on the default device.
  """
  hf_config = hf.read_hf_config(directory)
  config = DeepseekConfig.from_hf(hf_config)
  if num_layers is not None:
    if not 1 <= num_layers <= config.num_layers:
      raise ValueError(f"num_layers: expected 1..{config.num_layers}, got {num_layers}")
    config = dataclasses.replace(config, num_layers=num_layers)
  param_dtype = _checkpoint_dtype(hf_config) if param_dtype is None else jnp.dtype(param_dtype)
  loaded_config = dataclasses.replace(
      config, attention=dataclasses.replace(config.attention, rope_interleave=True))
  abstract = nnx.eval_shape(lambda: DeepseekForCausalLM(loaded_config, rngs=nnx.Rngs(0),
                                                        dtype=dtype, param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)
  leaves = []
  with hf.SafetensorsCheckpoint(directory) as ckpt:
    weights = _CheckpointWeights(ckpt, hf_config, config)
    for path, var in nnx.to_flat_state(state):
      want = var.get_value()
      try:
        value = weights.value(path, want.dtype)
      except KeyError as e:
        raise ValueError(f"{directory}: no tensor for parameter {'/'.join(map(str, path))}: "
                         f"{e.args[0]}") from None
      if tuple(value.shape) != tuple(want.shape):
        raise ValueError(f"{directory}: parameter {'/'.join(map(str, path))}: expected shape "
                         f"{list(want.shape)} from config.json, got {list(value.shape)} from "
                         "the checkpoint")
      leaves.append((path, var.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Generation:
  """What `generate` returns.

  Attributes:
    tokens: per prompt, `[max_new_tokens]` int32 greedy tokens.
    logits: per prompt, `[max_new_tokens, vocab]` float32: the logits each token was chosen
      from (the prompt's last position, then each decode step); None unless asked for.
    prefill_seconds: reading the prompts (after compilation).
    decode_seconds: the decode steps.
    steps: step calls (chunk steps, then decode steps).
  """

  tokens: list[np.ndarray]
  logits: list[np.ndarray] | None
  prefill_seconds: float
  decode_seconds: float
  steps: int


class Generator:
  """Greedy generation for a batch of prompts over per-layer paged caches and one page pool.

  One jitted step (the serving loop's, `jax_flashmla.serving.make_step`, returning the logits
  too; caches donated), compiled for two shapes: `[b, chunk]` while prompts are read (each row's
  next chunk, left-padded; rows already done wait), `[b, 1]` for decode (every row feeds back its
  last token on the device). Pages come from a `PageAllocator` as sequences grow and go back
  before the next `run`.

  Args:
    model: a `DeepseekForCausalLM` (or any model with the same call contract).
    batch_size: rows of the step (prompts per `run` at most).
    max_seq_len: prompt plus new tokens, the longest a row may get.
    chunk: prompt tokens read per step.
    implementation: None (kernels on Hopper, pure JAX elsewhere), "cuda" or "xla".
    cache_dtype: of the pages (the kernels take bfloat16; float32 for the reference only).
    kv_format: "bf16" (rows of `cache_dtype`) or "fp8" (DeepSeek-V3.2's FP8 rows).
  """

  def __init__(self, model, *, batch_size: int, max_seq_len: int, chunk: int = 64,
               implementation: str | None = None, cache_dtype=jnp.bfloat16,
               kv_format: str = "bf16"):
    if chunk < 1:
      raise ValueError(f"chunk: expected a positive int, got {chunk}")
    self.batch_size, self.max_seq_len, self.chunk = batch_size, max_seq_len, chunk
    self.graphdef, self.state = nnx.split(model)
    pages = -(-max_seq_len // 64)
    self.caches = tuple(
        PagedKVCache.create(batch_size, max_seq_len, num_blocks=batch_size * pages,
                            dtype=cache_dtype, kv_format=kv_format)
        for _ in range(model.config.num_layers))
    self.allocator = PageAllocator.for_cache(self.caches[0])
    self._step = serving.make_step(self.graphdef, implementation, return_logits=True)
    self._compiled = {}

  def _args(self, tokens, num_new, use_prev, restart, prev):
    return (self.state, self.caches, self.allocator.device_block_table(), jnp.asarray(tokens),
            jnp.asarray(num_new), jnp.asarray(use_prev), jnp.asarray(restart), prev)

  def compile(self) -> float:
    """Compiles the chunk and decode shapes; returns the seconds it took."""
    t0 = time.perf_counter()
    b = self.batch_size
    for s in sorted({1, self.chunk}):
      if s not in self._compiled:
        args = self._args(np.zeros((b, s), np.int32), np.zeros(b, np.int32), np.zeros(b, bool),
                          np.zeros(b, bool), jnp.zeros((b,), jnp.int32))
        self._compiled[s] = self._step.lower(*args).compile()
    return time.perf_counter() - t0

  def run(self, prompts: Sequence, max_new_tokens: int, *,
          force_tokens: Sequence | None = None, return_logits: bool = False) -> Generation:
    """Greedy-generates `max_new_tokens` tokens after each prompt.

    Args:
      prompts: up to `batch_size` non-empty sequences of token ids.
      max_new_tokens: tokens generated per prompt (>= 1).
      force_tokens: per prompt, `max_new_tokens - 1` tokens fed back instead of the greedy ones
        (to score a given continuation; `tokens` still holds the greedy choices).
      return_logits: also return the logits of every generated token.
    """
    b = self.batch_size
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not 1 <= len(prompts) <= b:
      raise ValueError(f"prompts: expected 1..{b} (batch_size) prompts, got {len(prompts)}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
      if not 1 <= len(p) or len(p) + max_new_tokens - 1 > self.max_seq_len:
        raise ValueError(f"prompts[{i}]: expected 1..{self.max_seq_len - max_new_tokens + 1} "
                         f"tokens (max_seq_len {self.max_seq_len}, {max_new_tokens} new), got "
                         f"{len(p)}")
    if force_tokens is not None:
      force_tokens = [np.asarray(f, np.int32).reshape(-1) for f in force_tokens]
      if len(force_tokens) != len(prompts) or any(len(f) != max_new_tokens - 1
                                                  for f in force_tokens):
        raise ValueError(f"force_tokens: expected {len(prompts)} sequences of "
                         f"{max_new_tokens - 1} tokens, got lengths "
                         f"{[len(f) for f in force_tokens]}")
    self.compile()
    for slot in range(b):
      self.allocator.free(slot)

    n = len(prompts)
    read = np.zeros(b, np.int64)
    lengths = np.zeros(b, np.int64)
    restart = np.ones(b, bool)
    prev = jnp.zeros((b,), jnp.int32)
    first = {}         # row -> (step index, device arrays) of the step that read its last token
    emitted = []       # decode steps: (next tokens, logits) on the device
    steps = 0
    t0 = time.perf_counter()
    while any(read[i] < len(prompts[i]) for i in range(n)):
      s = self.chunk
      tokens = np.zeros((b, s), np.int32)
      num_new = np.zeros(b, np.int32)
      for i in range(n):
        k = int(min(s, len(prompts[i]) - read[i]))
        if k > 0:
          tokens[i, s - k:] = prompts[i][read[i]: read[i] + k]
          num_new[i] = k
      self.allocator.reserve_many({i: int(lengths[i] + num_new[i]) for i in range(n)})
      self.caches, prev, logits = self._compiled[s](
          *self._args(tokens, num_new, np.zeros(b, bool), restart, prev))
      restart[:] = False
      steps += 1
      read += num_new
      lengths += num_new
      for i in range(n):
        if num_new[i] and read[i] == len(prompts[i]):
          first[i] = (prev, logits)
    jax.block_until_ready(prev)
    t1 = time.perf_counter()

    for j in range(max_new_tokens - 1):
      tokens = np.zeros((b, 1), np.int32)
      num_new = np.zeros(b, np.int32)
      num_new[:n] = 1
      use_prev = np.zeros(b, bool)
      if force_tokens is None:
        use_prev[:n] = True
      else:
        tokens[:n, 0] = [f[j] for f in force_tokens]
      lengths += num_new
      self.allocator.reserve_many({i: int(lengths[i]) for i in range(n)})
      self.caches, prev, logits = self._compiled[1](
          *self._args(tokens, num_new, use_prev, restart, prev))
      steps += 1
      emitted.append((prev, logits if return_logits else None))
    jax.block_until_ready(prev)
    t2 = time.perf_counter()

    firsts = jax.device_get([first[i] if return_logits else (first[i][0], None)
                             for i in range(n)])
    rest = jax.device_get(emitted)
    tokens_out = [np.array([firsts[i][0][i]] + [t[i] for t, _ in rest], np.int32)
                  for i in range(n)]
    logits_out = None
    if return_logits:
      logits_out = [np.stack([firsts[i][1][i]] + [lg[i] for _, lg in rest]).astype(np.float32)
                    for i in range(n)]
    return Generation(tokens_out, logits_out, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                      steps=steps)


def generate(model, prompts: Sequence, max_new_tokens: int, *, chunk: int = 64,
             implementation: str | None = None, cache_dtype=jnp.bfloat16, kv_format: str = "bf16",
             force_tokens: Sequence | None = None, return_logits: bool = False) -> Generation:
  """Greedy generation: `Generator(model, ...)` sized for these prompts, then `run`.

  Args:
    model: a `DeepseekForCausalLM` (or any model with its call contract).
    prompts: sequences of token ids (a batch; lengths may differ).
    max_new_tokens: tokens generated per prompt.
    chunk: prompt tokens read per step.
    implementation: None (kernels on Hopper, pure JAX elsewhere), "cuda" or "xla".
    cache_dtype: of the cache pages (bfloat16 for the kernels).
    kv_format: "bf16" or "fp8" (DeepSeek-V3.2's FP8 rows; `PagedKVCache.create`).
    force_tokens, return_logits: as for `Generator.run`.
  """
  longest = max(len(p) for p in prompts) + max_new_tokens - 1
  generator = Generator(model, batch_size=len(prompts), max_seq_len=longest,
                        chunk=min(chunk, max(len(p) for p in prompts)),
                        implementation=implementation, cache_dtype=cache_dtype,
                        kv_format=kv_format)
  return generator.run(prompts, max_new_tokens, force_tokens=force_tokens,
                       return_logits=return_logits)


# ------------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------------

class ServingCheckpoint(NamedTuple):
  """What `load_for_serving` returns."""

  model: DeepseekForCausalLM
  tokenizer: Any            # a `tokenizers.Tokenizer`, or None
  config: DeepseekConfig


def load_tokenizer(directory):
  """The checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`, or None when the file is
  missing or the `tokenizers` package is not installed."""
  path = pathlib.Path(directory) / TOKENIZER_FILE
  if not path.is_file():
    return None
  try:
    import tokenizers
  except ImportError:
    return None
  return tokenizers.Tokenizer.from_file(str(path))


def load_for_serving(directory, *, param_dtype=None, dtype=None,
                     num_layers: int | None = None) -> ServingCheckpoint:
  """What a serving loop needs from a checkpoint directory: `(model, tokenizer, config)`.

  Args:
    directory: a Hugging Face DeepSeek-V2/V3-style checkpoint.
    param_dtype, dtype, num_layers: as for `from_pretrained`.

  Returns:
    The model (`from_pretrained`), its tokenizer (`load_tokenizer`: None without
    `tokenizer.json` or the `tokenizers` package; then prompts are token ids) and its
    `DeepseekConfig` (`num_layers`, `attention`, `vocab_size`, `bos_token_id`, `eos_token_id`).
  """
  model = from_pretrained(directory, param_dtype=param_dtype, dtype=dtype, num_layers=num_layers)
  return ServingCheckpoint(model, load_tokenizer(directory), model.config)


def encode_prompt(prompt: str, tokenizer=None, *, bos_token_id: int | None = None) -> np.ndarray:
  """Token ids of a command-line prompt: integers separated by commas or spaces are ids as they
  are; other text needs `tokenizer` (its encoding, with `bos_token_id` put first unless the
  tokenizer already did)."""
  parts = prompt.replace(",", " ").split()
  if parts and all(p.isdigit() for p in parts):
    return np.array([int(p) for p in parts], np.int32)
  if tokenizer is None:
    raise ValueError(f"prompt: expected token ids (e.g. '1,2,3') without a tokenizer, got "
                     f"{prompt[:40]!r}")
  return encode_text(prompt, tokenizer, bos_token_id=bos_token_id)


def encode_text(text: str, tokenizer, *, bos_token_id: int | None = None) -> np.ndarray:
  """`tokenizer`'s token ids of `text`, digits included, with `bos_token_id` put first unless
  the tokenizer already did."""
  ids = list(tokenizer.encode(text).ids)
  if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
    ids = [bos_token_id] + ids
  return np.array(ids, np.int32)


# ------------------------------------------------------------------------------------------------
# Command line: a random-weight model (or a checkpoint) timed
# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jax_flashmla.models.deepseek",
      description="Greedy generation with a DeepSeek decoder on jax_flashmla, timed.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--random", choices=sorted(PRESETS),
                   help="random weights with a preset's shapes (v2-lite: 27 layers, 64 experts)")
  src.add_argument("--checkpoint", help="a Hugging Face checkpoint directory")
  p.add_argument("--layers", type=int, default=None, help="use only the first N blocks")
  p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
  p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
  p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
  p.add_argument("--chunk", type=int, default=64, help="prompt tokens read per step")
  p.add_argument("--prompt", default=None,
                 help="(with --checkpoint) one prompt: token ids '1,2,3' or text (tokenizer.json)")
  p.add_argument("--serve", type=int, default=0, metavar="N",
                 help="instead: the serving loop (jax_flashmla.serving) on N requests of "
                      "4..prompt-len tokens and up to new-tokens new ones, batch-size slots")
  p.add_argument("--implementation", choices=sorted(IMPLEMENTATIONS), default="auto",
                 help="attention; auto: CUDA kernels on Hopper, pure-JAX reference elsewhere")
  p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                 help="weights and activations; auto: bfloat16 on GPU, float32 elsewhere")
  p.add_argument("--kv-format", choices=["bf16", "fp8"], default="bf16",
                 help="the paged cache's rows: bf16, or DeepSeek-V3.2's FP8 rows (656 bytes)")
  p.add_argument("--seed", type=int, default=0, help="weights and prompts")
  return p


def _serve(model, args, implementation, rng, log):
  """The continuous-batching loop (`jax_flashmla.serving.Server`: ragged prompts, chunked
  prefill, pages reused) on random requests."""
  requests = serving.make_requests(rng, args.serve, args.prompt_len, args.new_tokens,
                                   model.config.vocab_size)
  max_seq_len = max(r.max_cached_tokens for r in requests)
  pages = -(-max_seq_len // 64)
  server = serving.Server(model, batch_size=args.batch_size, max_seq_len=max_seq_len,
                          num_blocks=args.batch_size * pages, chunk=args.chunk,
                          implementation=implementation, kv_format=args.kv_format, log=log,
                          log_every=50)
  log(f"  serving {args.serve} requests over {args.batch_size} slots (prompts of 4.."
      f"{args.prompt_len} tokens, up to {args.new_tokens} new); attention: "
      f"{args.implementation} on {jax.devices()[0].device_kind}; {args.kv_format} cache")
  log(f"  compiled (chunk and decode steps) in {server.compile():.1f} s")
  stats = server.serve(requests)
  log(f"served: {stats.tokens} tokens generated (after {stats.prompt_tokens} prompt tokens) in "
      f"{stats.seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s [{stats.steps} steps, "
      f"{stats.chunk_steps} with prompt chunks]")
  return stats


def main(argv=None, log=print):
  """The command line; returns the `Generation` (or the serving loop's `ServeStats` with
  --serve)."""
  args = _parser().parse_args(argv)
  implementation = IMPLEMENTATIONS[args.implementation]
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.dtype(args.dtype if args.dtype != "auto" else
                    ("bfloat16" if on_gpu else "float32"))
  t0 = time.perf_counter()
  tokenizer = None
  if args.random:
    config = DeepseekConfig.from_hf(PRESETS[args.random])
    if args.layers:
      config = dataclasses.replace(config, num_layers=args.layers)
    model = random_model(config, seed=args.seed, param_dtype=dtype)
    source = f"random {args.random}"
  else:
    model, tokenizer, config = load_for_serving(args.checkpoint, param_dtype=dtype,
                                                num_layers=args.layers)
    source = args.checkpoint
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  jax.block_until_ready(nnx.state(model))
  a = config.attention
  log(f"deepseek ({source}): {config.num_layers} layers, hidden {a.hidden_size}, "
      f"{a.num_heads} heads, {config.num_routed_experts} routed experts (top "
      f"{config.num_experts_per_tok}), {config.num_shared_experts} shared, vocab "
      f"{config.vocab_size}; {params / 1e9:.2f} B parameters in {dtype.name}, ready in "
      f"{time.perf_counter() - t0:.1f} s")

  rng = np.random.default_rng(args.seed)
  if args.serve:
    return _serve(model, args, implementation, rng, log)
  if args.prompt is not None:
    prompts = [encode_prompt(args.prompt, tokenizer, bos_token_id=config.bos_token_id)]
  else:
    prompts = [rng.integers(0, config.vocab_size, args.prompt_len, dtype=np.int32)
               for _ in range(args.batch_size)]
  longest = max(map(len, prompts))
  chunk = min(args.chunk, longest)
  generator = Generator(model, batch_size=len(prompts), max_seq_len=longest + args.new_tokens,
                        chunk=chunk, implementation=implementation, kv_format=args.kv_format)
  log(f"  attention: {args.implementation} on {jax.devices()[0].device_kind}; "
      f"{len(prompts)} prompts of {len(prompts[0])} tokens, {args.new_tokens} new each, "
      f"chunk {chunk}; {args.kv_format} cache")
  log(f"  compiled (chunk and decode steps) in {generator.compile():.1f} s")
  out = generator.run(prompts, args.new_tokens)
  prompt_tokens = sum(map(len, prompts))
  decoded = len(prompts) * (args.new_tokens - 1)
  for i, toks in enumerate(out.tokens[:2]):
    text = f" {tokenizer.decode(toks.tolist())!r}" if tokenizer is not None else ""
    log(f"  prompt {i}: {' '.join(map(str, toks[:12]))}{' ...' if len(toks) > 12 else ''}{text}")
  log(f"prefill: {prompt_tokens} tokens in {out.prefill_seconds:.3f} s "
      f"({prompt_tokens / out.prefill_seconds:.1f} tokens/s)")
  if decoded:
    log(f"decode: {decoded} tokens in {out.decode_seconds:.3f} s: "
        f"{decoded / out.decode_seconds:.1f} tokens/s "
        f"({1e3 * out.decode_seconds / (args.new_tokens - 1):.2f} ms per step of "
        f"{len(prompts)})")
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
