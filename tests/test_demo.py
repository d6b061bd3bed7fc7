"""The demo (`python -m jax_flashmla.demo`) and `examples/decode_loop.py`, at small sizes: they
run, generate every requested token, reuse freed pages, print tokens/s, and the compiled step
updates every layer's pages in place."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from hlo_aliasing import aliased_parameters, parameters_named  # noqa: E402
from jax_flashmla import demo  # noqa: E402
from jax_flashmla.layers import MLAConfig  # noqa: E402

SMALL = ["--layers", "2", "--hidden", "64", "--heads", "2", "--vocab", "128", "--batch-size",
         "3", "--requests", "5", "--max-prompt-len", "70", "--max-new-tokens", "10", "--chunk",
         "16", "--log-every", "5"]
EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "decode_loop.py"


@pytest.mark.parametrize("implementation", ["auto", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_demo_serves_every_request(implementation):
  lines = []
  stats = demo.main(SMALL + ["--implementation", implementation], log=lines.append)
  text = "\n".join(lines)
  assert re.search(r"generated \d+ tokens .* [\d.]+ tokens/s", lines[-1]), text
  assert "step    5" in text and "compiled in" in text
  assert stats.tokens > 0 and len(re.findall(r"request +\d+: prompt", text)) == 4
  assert stats.steps > stats.chunk_steps > 0
  assert stats.pages_reused > 0, "finished requests' pages were not handed out again"


def test_server_generates_each_requests_budget_within_the_pool():
  rng = np.random.default_rng(3)
  config = demo.ModelConfig(MLAConfig(hidden_size=64, num_heads=2), num_layers=1,
                            vocab_size=64, intermediate_size=64)
  model = demo.DemoModel(config, rngs=nnx.Rngs(0))
  requests = demo.make_requests(rng, 5, max_prompt_len=100, max_new_tokens=6, vocab_size=64)
  server = demo.Server(model, batch_size=2, max_seq_len=105, num_blocks=3, chunk=32,
                       implementation=None, log=lambda _: None)
  stats = server.serve(requests)
  for r in requests:
    assert len(r.output) == r.max_new_tokens
    assert all(0 <= t < 64 for t in r.output)
  assert stats.tokens == sum(r.max_new_tokens for r in requests)
  assert stats.peak_pages <= 3
  assert server.allocator.num_free == 3  # everything went back to the pool

  # Both compiled steps donate the caches: every layer's pages buffer is updated in place.
  for compiled in server._compiled.values():
    text = compiled.as_text()
    pages = parameters_named(text, "pages")
    assert len(pages) == config.num_layers, pages
    assert set(pages) <= set(aliased_parameters(text)), (pages, text.splitlines()[0])


def test_example_decode_loop_runs():
  spec = importlib.util.spec_from_file_location("decode_loop", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  lines = []
  tokens, caches = example.main(["--batch-size", "2", "--layers", "1", "--hidden", "64",
                                 "--new-tokens", "9", "--steps-per-call", "4"], log=lines.append)
  assert tokens.shape == (2, 9)
  assert "tokens/s" in lines[-1]
  assert sum("tokens per sequence" in line for line in lines) == 2  # 8 decode steps, 4 a call
  lengths = np.asarray(caches[0].lengths)
  assert lengths[0] != lengths[1]  # prompts of different lengths, 8 rows written after each
