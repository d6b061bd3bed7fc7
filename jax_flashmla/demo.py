"""`python -m jax_flashmla.demo`: a small DeepSeek-shaped model (or a checkpoint) serving prompts.

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

`--checkpoint DIR` serves a Hugging Face DeepSeek-V2/V3 checkpoint instead of the random weights
(`jax_flashmla.models.deepseek.load_for_serving`; needs `jax_flashmla[models]`), with the same
loop. Prompts are random (`--requests`, `--max-prompt-len`) unless given: `--prompt TEXT` (text,
encoded by the checkpoint's `tokenizer.json` when there is one and `tokenizers` is installed)
and `--prompt-ids 1,2,3`, each repeatable, each generating `--max-new-tokens` tokens. With a
tokenizer the demo prints what the first requests generated as text, otherwise as ids.

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
import importlib.util
import pathlib
import sys
import time

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
KV_BYTES_PER_TOKEN = {"bf16": 576 * 2, "fp8": 656}  # one KV head (MLA)
# Defaults of flags that only some runs use, filled in by `main` (the parser's are None), so
# that it can refuse them when given where they would be ignored: the random model's shapes
# (a checkpoint has its own) and the random requests' sizes (prompts given are the requests).
RANDOM_MODEL = {"layers": 4, "hidden": 1024, "heads": 16, "vocab": 4096}
RANDOM_REQUESTS = {"requests": 16, "max_prompt_len": 100}
SHOWN_REQUESTS = 4  # random requests whose outputs are printed (prompts given: all)


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each flag's default, except None: such a flag's help says what leaving it out does."""

  def _get_help_string(self, action):
    return action.help if action.default is None else super()._get_help_string(action)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
  return value


def _token_ids(text: str) -> tuple[int, ...]:
  """A `--prompt-ids` value: ints >= 0 separated by commas or spaces (checked against the
  vocabulary once it is known). A tuple, where `--prompt` gives a str: both share a list."""
  parts = text.replace(",", " ").split()
  if not parts or not all(p.isascii() and p.isdigit() for p in parts):
    raise argparse.ArgumentTypeError(f"expected token ids like 1,2,3, got {text!r}")
  return tuple(int(p) for p in parts)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -P -m jax_flashmla.demo", description=__doc__.split("\n\n")[0],
              formatter_class=_HelpFormatter)
  p.add_argument("--implementation", choices=sorted(IMPLEMENTATIONS), default="auto",
                 help="attention; auto: CUDA kernels on Hopper, pure-JAX reference elsewhere")
  p.add_argument("--checkpoint", metavar="DIR", default=None,
                 help="serve this Hugging Face DeepSeek-V2/V3 checkpoint directory (config.json, "
                      "safetensors; tokenizer.json for text prompts) instead of random weights")
  p.add_argument("--prompt", metavar="TEXT", dest="prompts", action="append", default=None,
                 help="a prompt as text (needs the checkpoint's tokenizer.json and the tokenizers "
                      "package); repeatable; without prompts the requests are random")
  p.add_argument("--prompt-ids", metavar="IDS", dest="prompts", action="append", default=None,
                 type=_token_ids, help="a prompt as token ids, e.g. 1,2,3; repeatable")
  for name, what in (("layers", "decoder blocks"), ("hidden", "width"), ("heads", "query heads"),
                     ("vocab", "vocabulary size")):
    p.add_argument(f"--{name}", type=_positive_int, default=None,
                   help=f"the random model's {what} (default: {RANDOM_MODEL[name]})")
  p.add_argument("--batch-size", type=_positive_int, default=8, help="slots decoded together")
  p.add_argument("--requests", type=_positive_int, default=None,
                 help=f"random prompts in the queue (default: {RANDOM_REQUESTS['requests']})")
  p.add_argument("--max-prompt-len", type=_positive_int, default=None,
                 help=f"longest random prompt, tokens (default: "
                      f"{RANDOM_REQUESTS['max_prompt_len']})")
  p.add_argument("--max-new-tokens", type=_positive_int, default=64,
                 help="tokens to generate: each given prompt's budget, the largest of a random "
                      "request's")
  p.add_argument("--chunk", type=_positive_int, default=32, help="prompt tokens read per step")
  p.add_argument("--num-blocks", type=_positive_int, default=None,
                 help="pages in the pool (default: 2/3 of every slot's worst case)")
  p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                 help="weights and activations; auto: bfloat16 on GPU, float32 elsewhere")
  p.add_argument("--kv-format", choices=["bf16", "fp8"], default="bf16",
                 help="the paged cache's rows: bf16 (1152 bytes per token) or DeepSeek-V3.2's "
                      "FP8 rows (656 bytes per token)")
  p.add_argument("--seed", type=int, default=0, help="random weights and prompts")
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
      q = jnp.asarray(q, cache.query_dtype)
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


def _fill_in(parser, args, defaults: dict, refuse: str | None) -> None:
  """Gives the flags of `defaults` that were left out their default; with `refuse`, one that was
  given is a mistake, and `refuse` says why."""
  given = [name for name in defaults if getattr(args, name) is not None]
  if refuse and given:
    parser.error(f"{' '.join('--' + name.replace('_', '-') for name in given)}: {refuse}")
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)


def _check_text_prompts(parser, args, texts: list[str]) -> None:
  """Refuses text prompts where no tokenizer will be loaded, before loading any weights."""
  if not texts:
    return
  # Imported here, as in the other checkpoint helpers: random weights need no jax_flashmla.models.
  from jax_flashmla.models import deepseek

  head = f"--prompt {texts[0][:40]!r}: text needs a tokenizer"
  if args.checkpoint is None:
    parser.error(f"{head}, and random weights have none; give token ids with --prompt-ids")
  if not (pathlib.Path(args.checkpoint) / deepseek.TOKENIZER_FILE).is_file():
    parser.error(f"{head}, and {args.checkpoint} has no {deepseek.TOKENIZER_FILE}; give token "
                 f"ids with --prompt-ids")
  if importlib.util.find_spec("tokenizers") is None:
    parser.error(f"{head}, and the tokenizers package is not installed (pip install "
                 f"tokenizers); give token ids with --prompt-ids")


def _load_checkpoint(parser, directory: str, dtype: str):
  """`load_for_serving(directory)`: `(model, tokenizer or None, config)`; a directory that is
  not a checkpoint it can load ends the demo with the loader's reason, on one line."""
  from jax_flashmla.models import deepseek

  path = pathlib.Path(directory)
  if not path.is_dir():
    parser.error(f"--checkpoint: expected a checkpoint directory, got {directory!r} "
                 f"({'not a directory' if path.exists() else 'no such directory'})")
  try:
    return deepseek.load_for_serving(directory, param_dtype=jnp.dtype(dtype))
  except ImportError as e:
    parser.error(f"--checkpoint: loading needs {e.name or 'safetensors'}: pip install "
                 f"'jax_flashmla[models]'")
  except (OSError, ValueError) as e:
    # No config.json, no safetensors, not an MLA model, tensors of other shapes: the loader
    # names it; its message may span lines.
    parser.error(f"--checkpoint {directory}: {' '.join(str(e).split())}")


def _given_requests(parser, prompts: list, tokenizer, bos_token_id: int | None,
                    vocab_size: int, max_new_tokens: int) -> list[Request]:
  """One request of `max_new_tokens` per `--prompt` (a str) and `--prompt-ids` (a tuple), in
  command-line order."""
  requests = []
  for prompt in prompts:
    if isinstance(prompt, str):
      from jax_flashmla.models import deepseek  # text: a checkpoint, `_check_text_prompts` saw

      flag = f"--prompt {prompt[:40]!r}"
      ids = deepseek.encode_text(prompt, tokenizer, bos_token_id=bos_token_id).tolist()
    else:
      flag = f"--prompt-ids {','.join(map(str, prompt[:8]))}{',...' if len(prompt) > 8 else ''}"
      ids = prompt
    if not ids:
      parser.error(f"{flag}: the tokenizer gave no tokens")
    # Checked as Python ints: an id past the vocabulary may not fit in int32 either.
    if max(ids) >= vocab_size:
      parser.error(f"{flag}: expected token ids in [0, {vocab_size}) (the vocabulary), got "
                   f"{max(ids)}")
    requests.append(Request(np.array(ids, np.int32), max_new_tokens))
  return requests


def _shapes(attention: MLAConfig, num_layers: int, vocab_size: int) -> str:
  a = attention
  return (f"{num_layers} layers, hidden {a.hidden_size}, {a.num_heads} heads, kv_lora "
          f"{a.kv_lora_rank}, qk_nope {a.qk_nope_head_dim}, qk_rope {a.qk_rope_head_dim}, v_head "
          f"{a.v_head_dim}, vocab {vocab_size}")


def _shown(tokens: list[int], tokenizer) -> str:
  """A request's output for the log: its text with a tokenizer, else its first ids."""
  if tokenizer is not None:
    text = tokenizer.decode(tokens)
    return repr(text[:120]) + (" ..." if len(text) > 120 else "")
  return " ".join(map(str, tokens[:12])) + (" ..." if len(tokens) > 12 else "")


def main(argv=None, log=print) -> ServeStats:
  """Runs the demo; argument mistakes exit with one line (status 2), a failed self-check with
  status 1."""
  parser = _parser()
  args = parser.parse_args(argv)
  implementation = IMPLEMENTATIONS[args.implementation]
  if implementation == "cuda" and _extension.kernels_unavailable_reason() is not None:
    parser.error(f"--implementation cuda: the CUDA kernels cannot run here: "
                 f"{_extension.kernels_unavailable_reason()}; use --implementation auto or xla")
  prompts = args.prompts or []
  _fill_in(parser, args, RANDOM_MODEL, "for random weights only; a --checkpoint sets the "
           "model's shapes" if args.checkpoint is not None else None)
  _fill_in(parser, args, RANDOM_REQUESTS, "for random requests only; with --prompt or "
           "--prompt-ids the prompts given are the requests" if prompts else None)
  _check_text_prompts(parser, args, [p for p in prompts if isinstance(p, str)])
  platform = jax.default_backend()
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
  t0 = time.perf_counter()
  if args.checkpoint is None:
    attention = MLAConfig(hidden_size=args.hidden, num_heads=args.heads)
    config = ModelConfig(attention, num_layers=args.layers, vocab_size=args.vocab,
                         intermediate_size=args.hidden * 11 // 4)
    model = DemoModel(config, rngs=nnx.Rngs(args.seed), dtype=jnp.dtype(dtype),
                      param_dtype=jnp.dtype(dtype))
    tokenizer, bos_token_id = None, None
    source = f"{_shapes(attention, args.layers, args.vocab)}, {dtype} weights"
  else:
    model, tokenizer, config = _load_checkpoint(parser, args.checkpoint, dtype)
    attention, bos_token_id = config.attention, config.bos_token_id
    experts = (f", {config.num_routed_experts} routed experts (top "
               f"{config.num_experts_per_tok})" if config.num_routed_experts else "")
    prompts_are = "text or token ids" if tokenizer is not None else "token ids (no tokenizer)"
    source = (f"checkpoint {args.checkpoint} (loaded in {time.perf_counter() - t0:.1f} s; "
              f"prompts: {prompts_are}): "
              f"{_shapes(attention, config.num_layers, config.vocab_size)}{experts}, {dtype} "
              f"weights")

  rng = np.random.default_rng(args.seed)
  if prompts:
    requests = _given_requests(parser, prompts, tokenizer, bos_token_id, config.vocab_size,
                               args.max_new_tokens)
  else:
    requests = make_requests(rng, args.requests, args.max_prompt_len, args.max_new_tokens,
                             config.vocab_size)
  max_seq_len = max(r.max_cached_tokens for r in requests)
  worst = -(-max_seq_len // PAGE_SIZE)
  if args.num_blocks is not None and args.num_blocks < worst:
    parser.error(f"--num-blocks: expected at least {worst} pages (the longest request holds "
                 f"{max_seq_len} tokens: {worst} pages of {PAGE_SIZE}), got {args.num_blocks}")
  num_blocks = args.num_blocks or max(worst, -(-2 * args.batch_size * worst // 3))

  kernels, attn, reason = describe_attention(implementation)
  log(f"jax_flashmla demo: {source}, {args.kv_format} cache "
      f"({KV_BYTES_PER_TOKEN[args.kv_format]} bytes per token and layer)")
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
                  cache_dtype=CACHE_DTYPE, kv_format=args.kv_format, log=log,
                  log_every=args.log_every)
  log("  compiling the step (chunk and decode shapes) ...")
  log(f"  compiled in {server.compile():.1f} s")
  stats = server.serve(requests)

  for i, r in enumerate(requests if prompts else requests[:SHOWN_REQUESTS]):
    log(f"  request {i:2d}: prompt {len(r.prompt):3d} tokens -> {len(r.output):3d} new: "
        f"{_shown(r.output, tokenizer)}")
  if kernels and not self_check(server.caches, attention.num_heads, attention.softmax_scale,
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
