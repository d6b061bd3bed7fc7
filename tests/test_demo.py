"""The demo (`python -P -m jax_flashmla.demo`) and `examples/decode_loop.py`, at small sizes:
they run, generate every requested token, reuse freed pages, print tokens/s, and the compiled
step updates every layer's pages in place. The README's demo command, run from the clone's root,
uses the installed package; mistakes end the demo with one line; the self-check compares."""

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from hlo_aliasing import aliased_parameters, parameters_named  # noqa: E402
from jax_flashmla import _extension, demo  # noqa: E402
from jax_flashmla.layers import MLAConfig  # noqa: E402

SMALL = ["--layers", "2", "--hidden", "64", "--heads", "2", "--vocab", "128", "--batch-size",
         "3", "--requests", "5", "--max-prompt-len", "70", "--max-new-tokens", "10", "--chunk",
         "16", "--log-every", "5"]
ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "decode_loop.py"


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
  [attention] = [line for line in lines if line.startswith("  attention: ")]
  kernels = "attention: CUDA kernels" in attention
  assert kernels == (implementation == "cuda" or _extension.kernels_unavailable_reason() is None)
  # With the kernels the demo checks itself against the pure-JAX path; without, it does not.
  checks = [line for line in lines if "self-check" in line]
  assert len(checks) == kernels, text
  if kernels:
    assert "agree within FlashMLA's tolerances" in checks[0], checks[0]


def readme_demo_command() -> list[str]:
  """The demo command of README.md's set-up block (its last `&&` part), as arguments."""
  readme = (ROOT / "README.md").read_text()
  [block] = [b for b in re.findall(r"^```bash\n(.*?)^```$", readme, re.S | re.M)
             if "jax_flashmla.demo" in b]
  command = shlex.split(block.strip().split("&&")[-1])
  assert command[0] == "python" and command[-1] == "jax_flashmla.demo", command
  return [sys.executable] + command[1:]


def test_readme_demo_command_uses_the_installed_package():
  """Run from the clone's root, `python -m` puts the source folder (no compiled extension)
  first on sys.path; the README's command must import the installed package instead."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  res = subprocess.run(readme_demo_command() + SMALL, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  [package] = [line for line in res.stdout.splitlines() if "jax_flashmla from " in line]
  assert "compiled extension loaded" in package, package


def test_a_source_checkout_says_so():
  """The source folder imported by mistake: build_info names the cause and the fix."""
  script = "import jax_flashmla; print(jax_flashmla.build_info())"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-4000:]
  if "'extension': True" in res.stdout:
    pytest.skip("the source folder has a compiled extension (an in-place build)")
  assert "imported from its source checkout" in res.stdout and "python -P" in res.stdout


MISTAKES = [
    (["--num-blocks", "1"], r"--num-blocks: expected at least 2 pages \(the longest request holds "
                            r"\d+ tokens: 2 pages of 64\), got 1"),
    (["--layers", "0"], r"argument --layers: expected an int >= 1, got 0"),
    (["--chunk", "x"], r"argument --chunk: expected an int >= 1, got 'x'"),
    (["--implementation", "triton"], r"argument --implementation: invalid choice: 'triton'"),
]


@pytest.mark.parametrize("argv,message", MISTAKES, ids=[m[0][0] for m in MISTAKES])
def test_demo_mistakes_end_with_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as info:
    demo.main(SMALL + argv, log=lambda _: None)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert re.search(r"^python -P -m jax_flashmla.demo: error: " + message, err), err


def test_demo_refuses_cuda_where_the_kernels_cannot_run(capsys):
  reason = _extension.kernels_unavailable_reason()
  if reason is None:
    pytest.skip("the kernels can run here")
  with pytest.raises(SystemExit) as info:
    demo.main(SMALL + ["--implementation", "cuda"], log=lambda _: None)
  err = capsys.readouterr().err
  assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
  assert f"--implementation cuda: the CUDA kernels cannot run here: {reason}" in err


def _served_server():
  rng = np.random.default_rng(4)
  config = demo.ModelConfig(MLAConfig(hidden_size=64, num_heads=2), num_layers=2,
                            vocab_size=64, intermediate_size=64)
  model = demo.DemoModel(config, rngs=nnx.Rngs(0))
  server = demo.Server(model, batch_size=3, max_seq_len=140, num_blocks=8, chunk=32,
                       implementation=None, log=lambda _: None)
  server.serve(demo.make_requests(rng, 4, max_prompt_len=100, max_new_tokens=6, vocab_size=64))
  return server, config


def test_self_check_reports_agreement_and_disagreement(monkeypatch):
  """The comparison the demo runs after serving with the kernels, here between two runs of the
  pure-JAX path (agree) and with one of them perturbed (disagree, and says where)."""
  server, config = _served_server()
  assert (np.asarray(server.caches[0].lengths) > 0).any()
  scale = config.attention.softmax_scale
  lines = []
  assert demo.self_check(server.caches, 2, scale, "xla", lines.append)
  assert re.search(r"self-check: .* \(2 layers x s_q 1 and 2\): out max abs 0.00e\+00, .*; agree "
                   r"within FlashMLA's tolerances$", lines[-1]), lines[-1]

  decode = demo.mla_decode

  def off_by_a_little(q, cache, md, **kw):
    out, lse = decode(q, cache, md, **kw)
    return (out + 1e-2, lse) if kw["implementation"] is None else (out, lse)

  monkeypatch.setattr(demo, "mla_decode", off_by_a_little)
  assert not demo.self_check(server.caches, 2, scale, None, lines.append)
  assert "DISAGREE: layer 0 s_q 1 out: " in lines[-1] and "out of tolerance" in lines[-1]


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
