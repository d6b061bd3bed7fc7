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
(the CUDA kernels on a Hopper GPU, the pure-JAX reference elsewhere), `cuda` or `xla`. The demo
says where jax_flashmla was imported from and whether its compiled extension loaded (run it as
`python -P -m jax_flashmla.demo`, so that a clone's source folder does not shadow the installed
package), which attention it runs and, when it falls back on a GPU, why. With the kernels it
checks itself at the end: the same attention over the served caches with the pure-JAX path,
compared with FlashMLA's tolerances (`jax_flashmla.testing`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of jax_flashmla
  raise ImportError("jax_flashmla.demo needs Flax: pip install 'jax_flashmla[flax]'") from e

from jax_flashmla import _extension, local_primitives, testing
from jax_flashmla.cache import mla_decode
from jax_flashmla.constants import PAGE_SIZE
from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention
from jax_flashmla.metadata import get_mla_metadata
# Re-exported: the serving loop used to live here.
from jax_flashmla.serving import (Request, ServeStats, Server, make_requests,  # noqa: F401
                                  make_step)

IMPLEMENTATIONS = {"auto": None, "cuda": "cuda", "xla": "xla"}
CACHE_DTYPE = jnp.bfloat16  # the Server's default: a dtype the kernels take


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

class _Parser(argparse.ArgumentParser):
  """Mistakes end the demo with one line on stderr (exit status 2), not a usage block."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
  return value


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -P -m jax_flashmla.demo", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--implementation", choices=sorted(IMPLEMENTATIONS), default="auto",
                 help="attention; auto: CUDA kernels on Hopper, pure-JAX reference elsewhere")
  p.add_argument("--layers", type=_positive_int, default=4, help="decoder blocks")
  p.add_argument("--hidden", type=_positive_int, default=1024, help="model width")
  p.add_argument("--heads", type=_positive_int, default=16, help="query heads")
  p.add_argument("--vocab", type=_positive_int, default=4096, help="vocabulary size")
  p.add_argument("--batch-size", type=_positive_int, default=8, help="slots decoded together")
  p.add_argument("--requests", type=_positive_int, default=16, help="prompts in the queue")
  p.add_argument("--max-prompt-len", type=_positive_int, default=100,
                 help="longest prompt (tokens)")
  p.add_argument("--max-new-tokens", type=_positive_int, default=64,
                 help="largest generation budget")
  p.add_argument("--chunk", type=_positive_int, default=32, help="prompt tokens read per step")
  p.add_argument("--num-blocks", type=_positive_int, default=None,
                 help="pages in the pool; None: 2/3 of every slot's worst case")
  p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                 help="weights and activations; auto: bfloat16 on GPU, float32 elsewhere")
  p.add_argument("--seed", type=int, default=0, help="weights and prompts")
  p.add_argument("--log-every", type=_positive_int, default=10,
                 help="steps between progress lines")
  return p


def describe_package() -> str:
  """Where jax_flashmla was imported from and whether its compiled extension loaded."""
  info = _extension.build_info()
  where = pathlib.Path(_extension.__file__).resolve().parent
  if not info["extension"]:
    return f"jax_flashmla from {where}: compiled extension missing: {info['reason']}"
  kernels = "with the CUDA kernels" if info.get("cuda") else "CPU-only build, no CUDA kernels"
  return f"jax_flashmla from {where}: compiled extension loaded ({kernels})"


def describe_attention(implementation: str | None) -> tuple[bool, str, str | None]:
  """Whether the step runs the CUDA kernels, which attention that is, and, for a fallback on a
  GPU, why. `implementation="cuda"` is assumed to have been checked (`main` does)."""
  if implementation == "xla":
    return False, "pure-JAX reference", None
  if implementation == "cuda":
    return True, "CUDA kernels", None
  if jax.default_backend() != "gpu":
    return False, "pure-JAX reference", None  # no GPU: the expected path
  reason = (_extension.kernels_unavailable_reason() or
            local_primitives.fallback_reason("cuda", CACHE_DTYPE))
  return reason is None, "CUDA kernels" if reason is None else "pure-JAX reference", reason


def _max_errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
  """Largest absolute and relative difference over the elements finite in both."""
  both = np.isfinite(got) & np.isfinite(want)
  err = np.abs(got[both] - want[both])
  if not err.size:
    return 0.0, 0.0
  nonzero = want[both] != 0
  rel = err[nonzero] / np.abs(want[both][nonzero])
  return float(err.max()), float(rel.max()) if rel.size else 0.0


def self_check(caches, num_heads: int, softmax_scale: float, implementation: str | None,
               log=print, *, layers: int = 3, seed: int = 0) -> bool:
  """The attention of a few decode steps over `caches` with `implementation` and with the
  pure-JAX path, compared with FlashMLA's tolerances (`testing.OUT_TOL`, `testing.LSE_TOL`),
  out also allowing for the kernels' rounding of P on live data (`testing.value_bound`).

  For each of the first `layers` caches, random queries of 1 and 2 tokens (causal) per row
  attend to the cache as the serving loop left it. Logs one line with the largest errors and
  the verdict (and what failed); returns whether every comparison passed.
  """
  rng = np.random.default_rng(seed)
  worst = dict(out_abs=0.0, out_rel=0.0, out_cos=0.0, lse_abs=0.0, lse_rel=0.0)
  failures = []
  checked = caches[:layers]
  for layer, cache in enumerate(checked):
    for s_q in (1, 2):
      q = np.clip(rng.standard_normal((cache.batch_size, s_q, num_heads, 576)) / 10, -1, 1)
      q = jnp.asarray(q, cache.pages.dtype)
      runs = []
      for impl in (implementation, "xla"):  # each path with its own scheduler
        md = get_mla_metadata(cache.lengths, s_q * num_heads, 1, implementation=impl)
        runs.append(jax.device_get(mla_decode(q, cache, md, softmax_scale=softmax_scale,
                                              implementation=impl)))
      (out, lse), (want_out, want_lse) = [(np.asarray(o, np.float32), np.asarray(s))
                                          for o, s in runs]
      # Live caches hold a model's values, larger than FlashMLA's test data: allow for the
      # kernels' rounding of P (jax_flashmla.testing's docstring).
      bound = np.asarray(testing.value_bound(cache.pages, cache.block_table, cache.lengths))
      live = dict(scale=bound[:, None, None], scale_tol=testing.p_rounding_tol(q.dtype))
      for name, got, want, tol, extra in (("out", out, want_out, testing.OUT_TOL, live),
                                          ("lse", lse, want_lse, testing.LSE_TOL, {})):
        report = testing.compare(got, want, **tol, **extra)
        err_abs, err_rel = _max_errors(got, want)
        worst[f"{name}_abs"] = max(worst[f"{name}_abs"], err_abs)
        worst[f"{name}_rel"] = max(worst[f"{name}_rel"], err_rel)
        if name == "out":
          worst["out_cos"] = max(worst["out_cos"], float(report.cos_diff))
        if not bool(report.passed):
          failures.append(report.describe(f"layer {layer} s_q {s_q} {name}", **tol))
  verdict = ("agree within FlashMLA's tolerances" if not failures else
             "DISAGREE: " + "; ".join(failures))
  log(f"  self-check: attention with the kernels vs the pure-JAX path over the served caches "
      f"({len(checked)} layers x s_q 1 and 2): out max abs {worst['out_abs']:.2e}, max rel "
      f"{worst['out_rel']:.2e}, cosine diff {worst['out_cos']:.2e}; lse max abs "
      f"{worst['lse_abs']:.2e}, max rel {worst['lse_rel']:.2e}; {verdict}")
  return not failures


def main(argv=None, log=print) -> ServeStats:
  """Runs the demo; argument mistakes exit with one line (status 2), a failed self-check with
  status 1."""
  parser = _parser()
  args = parser.parse_args(argv)
  implementation = IMPLEMENTATIONS[args.implementation]
  if implementation == "cuda" and _extension.kernels_unavailable_reason() is not None:
    parser.error(f"--implementation cuda: the CUDA kernels cannot run here: "
                 f"{_extension.kernels_unavailable_reason()}; use --implementation auto or xla")
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
  if args.num_blocks is not None and args.num_blocks < worst:
    parser.error(f"--num-blocks: expected at least {worst} pages (the longest request holds "
                 f"{max_seq_len} tokens: {worst} pages of {PAGE_SIZE}), got {args.num_blocks}")
  num_blocks = args.num_blocks or max(worst, -(-2 * args.batch_size * worst // 3))

  kernels, attn, reason = describe_attention(implementation)
  log(f"jax_flashmla demo: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
      f"kv_lora 512, qk_nope 128, qk_rope 64, v_head 128, vocab {args.vocab}, {dtype} weights, "
      f"bf16 cache")
  log(f"  {describe_package()}")
  log(f"  attention: {attn} (--implementation {args.implementation}) on "
      f"{jax.devices()[0].device_kind}" + (f"; not the CUDA kernels: {reason}" if reason else ""))
  lens = sorted(len(r.prompt) for r in requests)
  log(f"  {len(requests)} requests over {args.batch_size} slots: prompts of {lens[0]}-{lens[-1]} "
      f"tokens, {min(r.max_new_tokens for r in requests)}-"
      f"{max(r.max_new_tokens for r in requests)} new tokens each; one pool of {num_blocks} "
      f"pages of 64 tokens ({args.batch_size * worst} if every slot held its worst case)")

  server = Server(model, batch_size=args.batch_size, max_seq_len=max_seq_len,
                  num_blocks=num_blocks, chunk=args.chunk, implementation=implementation,
                  cache_dtype=CACHE_DTYPE, log=log, log_every=args.log_every)
  log("  compiling the step (chunk and decode shapes) ...")
  log(f"  compiled in {server.compile():.1f} s")
  stats = server.serve(requests)

  for i, r in enumerate(requests[:4]):
    shown = " ".join(map(str, r.output[:12]))
    log(f"  request {i:2d}: prompt {len(r.prompt):3d} tokens -> {len(r.output):3d} new: "
        f"{shown}{' ...' if len(r.output) > 12 else ''}")
  if kernels and not self_check(server.caches, args.heads, attention.softmax_scale,
                                implementation, log):
    raise SystemExit("jax_flashmla demo: the self-check failed: the kernels and the pure-JAX "
                     "path disagree (the line above says where)")
  log(f"generated {stats.tokens} tokens (after {stats.prompt_tokens} prompt tokens) in "
      f"{stats.seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s  [{stats.steps} steps, "
      f"{stats.chunk_steps} with prompt chunks; peak {stats.peak_pages}/{num_blocks} pages, "
      f"{stats.pages_reused} page hand-outs reused freed pages]")
  return stats


if __name__ == "__main__":
  main(sys.argv[1:])
