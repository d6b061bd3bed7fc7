"""`python -m jax_flashmla.demo`: a small DeepSeek-shaped model serving a queue of prompts.

A random-weight model with DeepSeek-V2-Lite's attention shapes (16 heads, kv_lora_rank 512,
qk_nope 128, qk_rope 64, v_head 128, no q LoRA) and a few layers generates tokens for prompts
of very different lengths, the way a serving loop does:

- one jitted step function, its layer caches donated (updated in place), two compiled shapes:
  a chunk step while some prompt is being read, a one-token step when all rows decode;
- chunked prefill: a prompt is read `--chunk` tokens per step, left-padded, in the same step
  as the other rows' decode tokens; the scheduler records (`get_mla_metadata`) are computed
  once per step and shared by every layer;
- slots and pages: a request takes a free slot, its pages come from one shared pool as it
  grows (`PageAllocator`), and go back when it finishes, for the next request to reuse.

The loop itself is `jax_flashmla.serving.Server` (this module keeps the model and the command
line); `benchmarks/soak.py` drives the same loop for minutes with requests coming and going.

Needs Flax (`pip install jax_flashmla[flax]`). `--implementation` picks the attention: `auto`
(the CUDA kernels on a Hopper GPU, the pure-JAX reference elsewhere), `cuda` or `xla`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of jax_flashmla
  raise ImportError("jax_flashmla.demo needs Flax: pip install 'jax_flashmla[flax]'") from e

from jax_flashmla import _extension
from jax_flashmla.constants import PAGE_SIZE
from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention
# Re-exported: the serving loop used to live here.
from jax_flashmla.serving import Request, ServeStats, Server, make_step  # noqa: F401

IMPLEMENTATIONS = {"auto": None, "cuda": "cuda", "xla": "xla"}


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  attention: MLAConfig
  num_layers: int = 4
  vocab_size: int = 4096
  intermediate_size: int = 2816


class DecoderBlock(nnx.Module):
  """Pre-norm block: MLA then a SwiGLU MLP (DeepSeek's dense layers), both residual."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    a = config.attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(a.hidden_size, epsilon=a.rms_norm_eps, **kw)
    self.attn = MultiHeadLatentAttention(a, **kw)
    self.mlp_norm = nnx.RMSNorm(a.hidden_size, epsilon=a.rms_norm_eps, **kw)
    self.gate = nnx.Linear(a.hidden_size, config.intermediate_size, use_bias=False, **kw)
    self.up = nnx.Linear(a.hidden_size, config.intermediate_size, use_bias=False, **kw)
    self.down = nnx.Linear(config.intermediate_size, a.hidden_size, use_bias=False, **kw)

  def __call__(self, x, cache, **attn_kwargs):
    h, cache = self.attn(self.attn_norm(x), cache, **attn_kwargs)
    x = x + h
    y = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y)), cache


class DemoModel(nnx.Module):
  """Embedding, `num_layers` decoder blocks, final norm, LM head (random weights)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.config = config
    a = config.attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Embed(config.vocab_size, a.hidden_size, **kw)
    self.blocks = nnx.List([DecoderBlock(config, **kw) for _ in range(config.num_layers)])
    self.norm = nnx.RMSNorm(a.hidden_size, epsilon=a.rms_norm_eps, **kw)
    self.lm_head = nnx.Linear(a.hidden_size, config.vocab_size, use_bias=False, **kw)

  def __call__(self, tokens, caches, **attn_kwargs):
    """`tokens [b, s]` -> logits of each row's last token `[b, vocab]`, and the caches."""
    x = self.embed(tokens)
    new_caches = []
    for block, cache in zip(self.blocks, caches, strict=True):
      x, cache = block(x, cache, **attn_kwargs)
      new_caches.append(cache)
    return self.lm_head(self.norm(x[:, -1])).astype(jnp.float32), tuple(new_caches)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def make_requests(rng: np.random.Generator, n: int, max_prompt_len: int, max_new_tokens: int,
                  vocab_size: int) -> list[Request]:
  """Prompts of very different lengths (log-uniform in [4, max_prompt_len]) and budgets."""
  lens = np.exp(rng.uniform(np.log(4), np.log(max_prompt_len), n)).round().astype(int)
  lens[0] = max_prompt_len  # always one long prompt among short ones
  news = rng.integers(max(1, max_new_tokens // 4), max_new_tokens + 1, n)
  return [Request(rng.integers(0, vocab_size, int(p), dtype=np.int32), int(m))
          for p, m in zip(lens, news, strict=True)]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jax_flashmla.demo", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--implementation", choices=sorted(IMPLEMENTATIONS), default="auto",
                 help="attention; auto: CUDA kernels on Hopper, pure-JAX reference elsewhere")
  p.add_argument("--layers", type=int, default=4, help="decoder blocks")
  p.add_argument("--hidden", type=int, default=1024, help="model width")
  p.add_argument("--heads", type=int, default=16, help="query heads")
  p.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
  p.add_argument("--batch-size", type=int, default=8, help="slots decoded together")
  p.add_argument("--requests", type=int, default=16, help="prompts in the queue")
  p.add_argument("--max-prompt-len", type=int, default=100, help="longest prompt (tokens)")
  p.add_argument("--max-new-tokens", type=int, default=64, help="largest generation budget")
  p.add_argument("--chunk", type=int, default=32, help="prompt tokens read per step")
  p.add_argument("--num-blocks", type=int, default=None,
                 help="pages in the pool; None: 2/3 of every slot's worst case")
  p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                 help="weights and activations; auto: bfloat16 on GPU, float32 elsewhere")
  p.add_argument("--seed", type=int, default=0, help="weights and prompts")
  p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
  return p


def main(argv=None, log=print) -> ServeStats:
  args = _parser().parse_args(argv)
  implementation = IMPLEMENTATIONS[args.implementation]
  platform = jax.default_backend()
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
  attention = MLAConfig(hidden_size=args.hidden, num_heads=args.heads)
  config = ModelConfig(attention, num_layers=args.layers, vocab_size=args.vocab,
                       intermediate_size=args.hidden * 11 // 4)
  model = DemoModel(config, rngs=nnx.Rngs(args.seed), dtype=jnp.dtype(dtype),
                    param_dtype=jnp.dtype(dtype))

  rng = np.random.default_rng(args.seed)
  requests = make_requests(rng, args.requests, args.max_prompt_len, args.max_new_tokens,
                           args.vocab)
  max_seq_len = max(r.max_cached_tokens for r in requests)
  worst = -(-max_seq_len // PAGE_SIZE)
  num_blocks = args.num_blocks or max(worst, -(-2 * args.batch_size * worst // 3))

  kernels = _extension.has_cuda_kernels() and bool(_extension.local_hopper_gpus())
  attn = {"cuda": "CUDA kernels", "xla": "pure-JAX reference"}.get(
      implementation, "CUDA kernels" if kernels else "pure-JAX reference")
  log(f"jax_flashmla demo: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
      f"kv_lora 512, qk_nope 128, qk_rope 64, v_head 128, vocab {args.vocab}, {dtype} weights, "
      f"bf16 cache")
  log(f"  attention: {attn} (--implementation {args.implementation}) on "
      f"{jax.devices()[0].device_kind}")
  lens = sorted(len(r.prompt) for r in requests)
  log(f"  {len(requests)} requests over {args.batch_size} slots: prompts of {lens[0]}-{lens[-1]} "
      f"tokens, {min(r.max_new_tokens for r in requests)}-"
      f"{max(r.max_new_tokens for r in requests)} new tokens each; one pool of {num_blocks} "
      f"pages of 64 tokens ({args.batch_size * worst} if every slot held its worst case)")

  server = Server(model, batch_size=args.batch_size, max_seq_len=max_seq_len,
                  num_blocks=num_blocks, chunk=args.chunk, implementation=implementation,
                  log=log, log_every=args.log_every)
  log("  compiling the step (chunk and decode shapes) ...")
  log(f"  compiled in {server.compile():.1f} s")
  stats = server.serve(requests)

  for i, r in enumerate(requests[:4]):
    shown = " ".join(map(str, r.output[:12]))
    log(f"  request {i:2d}: prompt {len(r.prompt):3d} tokens -> {len(r.output):3d} new: "
        f"{shown}{' ...' if len(r.output) > 12 else ''}")
  log(f"generated {stats.tokens} tokens (after {stats.prompt_tokens} prompt tokens) in "
      f"{stats.seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s  [{stats.steps} steps, "
      f"{stats.chunk_steps} with prompt chunks; peak {stats.peak_pages}/{num_blocks} pages, "
      f"{stats.pages_reused} page hand-outs reused freed pages]")
  return stats


if __name__ == "__main__":
  main(sys.argv[1:])
