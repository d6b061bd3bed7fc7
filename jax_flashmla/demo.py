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

Needs Flax (`pip install jax_flashmla[flax]`). `--implementation` picks the attention: `auto`
(the CUDA kernels on a Hopper GPU, the pure-JAX reference elsewhere), `cuda` or `xla`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of jax_flashmla
  raise ImportError("jax_flashmla.demo needs Flax: pip install 'jax_flashmla[flax]'") from e

from jax_flashmla import _extension
from jax_flashmla.allocator import PageAllocator
from jax_flashmla.cache import PagedKVCache
from jax_flashmla.constants import PAGE_SIZE
from jax_flashmla.layers import MLAConfig, MultiHeadLatentAttention
from jax_flashmla.metadata import get_mla_metadata

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


def make_step(graphdef, implementation):
  """The jitted step: one chunk of tokens per row, caches donated, next tokens sampled.

  Args (of the returned function):
    state: the model's parameters (`nnx.split`).
    caches: one `PagedKVCache` per layer (donated).
    block_table: `[b, max_blocks]` int32 from the allocator (shared by every layer).
    tokens: `[b, s]` int32, each row's new tokens left-padded.
    num_new: `[b]` int32 new tokens per row (0: the row is idle this step).
    use_prev: `[b]` bool: the row's one new token is its last sampled token (`prev`).
    restart: `[b]` bool: the row's sequence starts over (length 0) before this step.
    prev: `[b]` int32 last sampled tokens.

  Returns:
    `(caches, next [b] int32)`, greedy; rows with `num_new == 0` keep `prev`.
  """

  def step(state, caches, block_table, tokens, num_new, use_prev, restart, prev):
    model = nnx.merge(graphdef, state)
    caches = tuple(c.replace(block_table=block_table).reset(restart) for c in caches)
    tokens = tokens.at[:, -1].set(jnp.where(use_prev, prev, tokens[:, -1]))
    heads = model.config.attention.num_heads
    # The step's scheduler records: once, for every layer (MLA caches one latent head).
    metadata = get_mla_metadata(caches[0].lengths + num_new, tokens.shape[1] * heads, 1,
                                implementation=implementation)
    logits, caches = model(tokens, caches, num_new=num_new, metadata=metadata,
                           implementation=implementation)
    sampled = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return caches, jnp.where(num_new > 0, sampled, prev)

  return jax.jit(step, donate_argnums=(1,))


# ------------------------------------------------------------------------------------------------
# The serving loop
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Request:
  prompt: np.ndarray          # [n] int32 token ids
  max_new_tokens: int
  output: list[int] = dataclasses.field(default_factory=list)

  @property
  def max_cached_tokens(self) -> int:  # the last sampled token is never written to the cache
    return len(self.prompt) + self.max_new_tokens - 1


@dataclasses.dataclass
class _Slot:
  request_id: int
  prompt_read: int = 0   # prompt tokens already in the cache
  length: int = 0        # tokens in the cache
  generated: int = 0


@dataclasses.dataclass
class ServeStats:
  tokens: int             # generated
  prompt_tokens: int
  seconds: float          # the serving loop, after compilation
  compile_seconds: float
  steps: int
  chunk_steps: int
  peak_pages: int
  pages_reused: int       # page hand-outs that reused a page freed by an earlier request

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.seconds


class Server:
  """Continuous batching over `batch_size` slots and one page pool (host-side scheduling)."""

  def __init__(self, model: DemoModel, *, batch_size: int, max_seq_len: int, num_blocks: int,
               chunk: int, implementation: str | None, log=print, log_every: int = 10):
    self.batch_size, self.chunk, self.log, self.log_every = batch_size, chunk, log, log_every
    self.graphdef, self.state = nnx.split(model)
    self.caches = tuple(PagedKVCache.create(batch_size, max_seq_len, num_blocks=num_blocks)
                        for _ in range(model.config.num_layers))
    self.allocator = PageAllocator.for_cache(self.caches[0])
    self.step_fn = make_step(self.graphdef, implementation)
    self._compiled = {}
    self.compile_seconds = 0.0

  def compile(self) -> float:
    """Compiles both step shapes ahead of time; returns the seconds it took."""
    t0 = time.perf_counter()
    b = self.batch_size
    for s in sorted({1, self.chunk}):
      args = self._args(np.zeros((b, s), np.int32), np.zeros(b, np.int32), np.zeros(b, bool),
                        np.zeros(b, bool), jnp.zeros((b,), jnp.int32))
      self._compiled[s] = self.step_fn.lower(*args).compile()
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def _args(self, tokens, num_new, use_prev, restart, prev):
    return (self.state, self.caches, self.allocator.device_block_table(), jnp.asarray(tokens),
            jnp.asarray(num_new), jnp.asarray(use_prev), jnp.asarray(restart), prev)

  def serve(self, requests: list[Request]) -> ServeStats:
    alloc, b = self.allocator, self.batch_size
    for i, r in enumerate(requests):
      need = alloc.pages_for(r.max_cached_tokens)
      if need > min(alloc.num_blocks, alloc.max_blocks_per_seq):
        raise ValueError(f"request {i}: {r.max_cached_tokens} tokens need {need} pages; the "
                         f"pool has {alloc.num_blocks}, a sequence at most "
                         f"{alloc.max_blocks_per_seq}")
    if not self._compiled:
      self.compile()
    waiting = collections.deque(range(len(requests)))
    slots: list[_Slot | None] = [None] * b
    committed = 0  # pages the running requests may still grow into (admission control)
    restart = np.zeros(b, bool)
    prev = jnp.zeros((b,), jnp.int32)
    emitted = []  # per step: (next tokens on the device, [(request id, slot)] that count)
    steps = chunk_steps = peak = reused = 0
    ever_used = set()
    t0 = time.perf_counter()

    while waiting or any(slots):
      # Admit waiting requests into free slots while their worst case fits in the pool.
      for slot in range(b):
        if slots[slot] is None and waiting:
          need = alloc.pages_for(requests[waiting[0]].max_cached_tokens)
          if committed + need > alloc.num_blocks:
            break
          committed += need
          slots[slot] = _Slot(waiting.popleft())

      s = self.chunk if any(sl and sl.prompt_read < len(requests[sl.request_id].prompt)
                            for sl in slots) else 1
      tokens = np.zeros((b, s), np.int32)
      num_new = np.zeros(b, np.int32)
      use_prev = np.zeros(b, bool)
      growth = {}
      for slot, sl in enumerate(slots):
        if sl is None:
          continue
        prompt = requests[sl.request_id].prompt
        if sl.prompt_read < len(prompt):
          n = min(s, len(prompt) - sl.prompt_read)
          tokens[slot, s - n:] = prompt[sl.prompt_read: sl.prompt_read + n]
        else:
          n, use_prev[slot] = 1, True
        num_new[slot] = n
        growth[slot] = sl.length + n
      for pages in alloc.reserve_many(growth).values():
        reused += len(ever_used.intersection(pages))
        ever_used.update(pages)
      peak = max(peak, alloc.num_used)

      self.caches, prev = self._compiled[s](*self._args(tokens, num_new, use_prev, restart,
                                                        prev))
      restart[:] = False
      steps += 1
      chunk_steps += s > 1

      counted = []
      for slot, sl in enumerate(slots):
        if sl is None:
          continue
        request = requests[sl.request_id]
        sl.length += int(num_new[slot])
        if sl.prompt_read < len(request.prompt):
          sl.prompt_read += int(num_new[slot])
          if sl.prompt_read < len(request.prompt):
            continue  # this step's sample is not a token yet: the prompt is not read
        sl.generated += 1
        counted.append((sl.request_id, slot))
        if sl.generated == request.max_new_tokens:
          alloc.free(slot)
          committed -= alloc.pages_for(request.max_cached_tokens)
          slots[slot], restart[slot] = None, True
      emitted.append((prev, counted))

      if steps % self.log_every == 0 or not (waiting or any(slots)):
        jax.block_until_ready(prev)
        done = sum(len(c) for _, c in emitted)
        elapsed = time.perf_counter() - t0
        self.log(f"  step {steps:4d}  {'chunk ' if s > 1 else 'decode'}  "
                 f"running {sum(sl is not None for sl in slots)}/{b}  waiting {len(waiting):2d}  "
                 f"pages {alloc.num_used:3d}/{alloc.num_blocks}  generated {done:5d}  "
                 f"{done / elapsed:8.1f} tok/s")

    jax.block_until_ready(prev)
    seconds = time.perf_counter() - t0
    for step_tokens, (_, counted) in zip(jax.device_get([t for t, _ in emitted]), emitted,
                                         strict=True):
      for request_id, slot in counted:
        requests[request_id].output.append(int(step_tokens[slot]))
    return ServeStats(
        tokens=sum(len(r.output) for r in requests),
        prompt_tokens=sum(len(r.prompt) for r in requests), seconds=seconds,
        compile_seconds=self.compile_seconds, steps=steps, chunk_steps=chunk_steps,
        peak_pages=peak, pages_reused=reused)


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
