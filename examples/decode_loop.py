"""Batch generation with the decode loop on the device: `python examples/decode_loop.py`.

The smallest complete use of jax_flashmla in a model: a fixed batch of prompts of different
lengths, each sequence with its own pages (`PagedKVCache.create` without a pool, so no
allocator), one jitted call that reads all prompts at once (left-padded), then jitted calls that
each run `--steps-per-call` decode steps in a `lax.fori_loop`, the caches donated so every
layer's pages are updated in place. The scheduler records are computed once per step and shared
by every layer. For a shared page pool and requests coming and going, see
`python -m jax_flashmla.demo`.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_flashmla import PagedKVCache, get_mla_metadata
from jax_flashmla.demo import DemoModel, ModelConfig
from jax_flashmla.layers import MLAConfig


def main(argv=None, log=print):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--implementation", choices=["auto", "cuda", "xla"], default="auto")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--steps-per-call", type=int, default=16)
  p.add_argument("--kv-format", choices=["bf16", "fp8"], default="bf16",
                 help="cache rows: bf16, or DeepSeek-V3.2's FP8 rows (656 bytes per token)")
  args = p.parse_args(argv)
  impl = None if args.implementation == "auto" else args.implementation

  config = ModelConfig(MLAConfig(hidden_size=args.hidden, num_heads=16),
                       num_layers=args.layers, vocab_size=1024,
                       intermediate_size=2 * args.hidden)
  graphdef, state = nnx.split(DemoModel(config, rngs=nnx.Rngs(0)))
  heads = config.attention.num_heads

  rng = np.random.default_rng(0)
  prompt_lens = rng.integers(3, 60, args.batch_size).astype(np.int32)
  width = int(prompt_lens.max())
  prompts = np.zeros((args.batch_size, width), np.int32)  # left-padded
  for i, n in enumerate(prompt_lens):
    prompts[i, width - n:] = rng.integers(0, config.vocab_size, n)
  max_len = width + args.new_tokens
  caches = tuple(PagedKVCache.create(args.batch_size, max_len, kv_format=args.kv_format)
                 for _ in range(args.layers))

  def forward(state, caches, tokens, num_new):
    model = nnx.merge(graphdef, state)
    # Once per step, shared by every layer; the lengths are those after this step's writes.
    metadata = get_mla_metadata(caches[0].lengths + num_new, tokens.shape[1] * heads, 1,
                                implementation=impl)
    logits, caches = model(tokens, caches, num_new=num_new, metadata=metadata,
                           implementation=impl)
    return caches, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill(state, caches, prompts, prompt_lens):
    return forward(state, caches, prompts, prompt_lens)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def decode(state, caches, last, steps):
    """`steps` (traced, at most --steps-per-call) decode steps on the device."""
    def body(i, carry):
      caches, last, out = carry
      caches, nxt = forward(state, caches, last[:, None], jnp.ones_like(last))
      return caches, nxt, out.at[:, i].set(nxt)

    out = jnp.zeros((last.shape[0], args.steps_per_call), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (caches, last, out))

  t0 = time.perf_counter()
  caches, last = prefill(state, caches, jnp.asarray(prompts), jnp.asarray(prompt_lens))
  outputs = [last]
  remaining = args.new_tokens - 1
  while remaining > 0:
    steps = min(args.steps_per_call, remaining)
    caches, last, out = decode(state, caches, last, jnp.int32(steps))
    outputs.append(out[:, :steps])
    remaining -= steps
    jax.block_until_ready(last)
    log(f"  {args.new_tokens - remaining:4d}/{args.new_tokens} tokens per sequence, "
        f"{time.perf_counter() - t0:6.2f} s (compilation included)")
  tokens = np.concatenate([np.asarray(outputs[0])[:, None]] + [np.asarray(o)
                                                               for o in outputs[1:]], axis=1)
  seconds = time.perf_counter() - t0
  for i in range(args.batch_size):
    log(f"  prompt {prompt_lens[i]:2d} tokens -> {' '.join(map(str, tokens[i, :10]))} ...")
  log(f"{tokens.size} tokens in {seconds:.2f} s (compilation included): "
      f"{tokens.size / seconds:.1f} tokens/s; cache lengths {np.asarray(caches[0].lengths)}")
  return tokens, caches


if __name__ == "__main__":
  main()
