"""The demo (`python -P -m jax_flashmla.demo`) and `examples/decode_loop.py`, at small sizes:
they run, generate every requested token, reuse freed pages, print tokens/s, and the compiled
step updates every layer's pages in place. The README's demo command, run from the clone's root,
uses the installed package; mistakes end the demo with one line; the self-check compares. With
`--checkpoint`, the demo serves a tiny committed checkpoint on given or random prompts."""

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
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
DATA = ROOT / "tests" / "data" / "deepseek"
TINY_V3 = DATA / "tiny-v3"  # vocabulary 128, no tokenizer.json
CHECKPOINT = ["--checkpoint", str(TINY_V3), "--batch-size", "2", "--chunk", "8", "--log-every",
              "5"]
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="loading a checkpoint needs safetensors")


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


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_example_decode_loop_runs(kv_format):
  spec = importlib.util.spec_from_file_location("decode_loop", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  lines = []
  tokens, caches = example.main(["--batch-size", "2", "--layers", "1", "--hidden", "64",
                                 "--new-tokens", "9", "--steps-per-call", "4",
                                 "--kv-format", kv_format], log=lines.append)
  assert caches[0].kv_format == kv_format
  assert tokens.shape == (2, 9)
  assert "tokens/s" in lines[-1]
  assert sum("tokens per sequence" in line for line in lines) == 2  # 8 decode steps, 4 a call
  lengths = np.asarray(caches[0].lengths)
  assert lengths[0] != lengths[1]  # prompts of different lengths, 8 rows written after each


# ------------------------------------------------------------------------------------------------
# --checkpoint
# ------------------------------------------------------------------------------------------------

def _outputs(lines) -> list[tuple[int, int, str]]:
  """(prompt tokens, new tokens, what was shown) of each `request i:` line, in order."""
  found = [re.fullmatch(r"  request +\d+: prompt +(\d+) tokens -> +(\d+) new: (.*)", line)
           for line in lines]
  return [(int(m[1]), int(m[2]), m[3]) for m in found if m]


@needs_safetensors
def test_demo_serves_a_checkpoint_on_given_token_ids():
  from jax_flashmla.models import deepseek

  prompts = [[5, 6, 7], list(range(9, 29)), [4]]  # three requests over two slots: one waits
  argv = CHECKPOINT + ["--max-new-tokens", "3", "--dtype", "float32"]
  for prompt in prompts:
    argv += ["--prompt-ids", ",".join(map(str, prompt))]
  lines = []
  # float32 weights and matmuls (not TF32 on a GPU): the greedy tokens compared below do not
  # depend on which requests share a step.
  with jax.default_matmul_precision("float32"):
    stats = demo.main(argv, log=lines.append)
  text = "\n".join(lines)
  assert lines[0].startswith(f"jax_flashmla demo: checkpoint {TINY_V3} "), lines[0]
  assert "prompts: token ids (no tokenizer)" in lines[0] and "vocab 128" in lines[0], lines[0]
  assert stats.tokens == 3 * len(prompts) and stats.prompt_tokens == sum(map(len, prompts))
  outputs = _outputs(lines)
  assert [(n, new) for n, new, _ in outputs] == [(len(p), 3) for p in prompts], text
  ids = [[int(t) for t in shown.split()] for _, _, shown in outputs]
  assert all(0 <= t < 128 for row in ids for t in row), text
  # The checkpoint's own greedy continuation: the demo served its weights.
  model = deepseek.load_for_serving(TINY_V3, param_dtype="float32").model
  with jax.default_matmul_precision("float32"):
    want = deepseek.generate(model, [np.array(prompts[1], np.int32)], 3, chunk=8).tokens[0]
  assert ids[1] == want.tolist(), text
  assert re.search(r"generated 9 tokens .* [\d.]+ tokens/s", lines[-1]), text
  kernels = _extension.kernels_unavailable_reason() is None
  assert sum("self-check" in line for line in lines) == kernels, text


@needs_safetensors
def test_demo_serves_a_checkpoint_on_random_requests():
  lines = []
  argv = CHECKPOINT + ["--requests", "3", "--max-prompt-len", "20", "--max-new-tokens", "4",
                       "--seed", "1"]
  stats = demo.main(argv, log=lines.append)
  # The requests the demo drew: the same generator, seed and the checkpoint's vocabulary.
  requests = demo.make_requests(np.random.default_rng(1), 3, 20, 4, vocab_size=128)
  assert stats.tokens == sum(r.max_new_tokens for r in requests)
  assert stats.prompt_tokens == sum(len(r.prompt) for r in requests)
  assert [(n, new) for n, new, _ in _outputs(lines)] == [(len(r.prompt), r.max_new_tokens)
                                                         for r in requests], lines


@needs_safetensors
def test_demo_serves_text_prompts_with_the_checkpoints_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  checkpoint = tmp_path / "tiny-v3"
  shutil.copytree(TINY_V3, checkpoint)
  words = ["<s>", "</s>", "hello", "world"] + [f"w{i}" for i in range(4, 128)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token="</s>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(checkpoint / "tokenizer.json"))
  lines = []
  stats = demo.main(["--checkpoint", str(checkpoint), "--prompt", "hello world", "--prompt-ids",
                     "2,3", "--max-new-tokens", "3", "--chunk", "4"], log=lines.append)
  assert "prompts: text or token ids" in lines[0], lines[0]
  assert stats.tokens == 6
  # The text gets the config's BOS (id 0) first; outputs are shown as the tokenizer's text.
  outputs = _outputs(lines)
  assert [(n, new) for n, new, _ in outputs] == [(3, 3), (2, 3)], lines
  for _, _, shown in outputs:
    assert re.fullmatch(r"'(\S+ ){2}\S+'", shown) and set(shown[1:-1].split()) <= set(words)


def _one_line_error(argv) -> str:
  """The demo's stderr for `argv`, after checking that it ended with status 2 and one line."""
  res = subprocess.run([sys.executable, "-P", "-m", "jax_flashmla.demo"] + argv, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 2, res.stderr[-4000:]
  assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
  return res.stderr


def test_a_text_prompt_without_a_tokenizer_ends_with_one_line():
  """The command line itself, end to end: refused before any weights are loaded."""
  err = _one_line_error(CHECKPOINT + ["--prompt", "hello"])
  assert re.fullmatch(rf"python -P -m jax_flashmla.demo: error: --prompt 'hello': text needs a "
                      rf"tokenizer, and {re.escape(str(TINY_V3))} has no tokenizer.json; give "
                      rf"token ids with --prompt-ids \(--help lists the options\)\n", err), err


CHECKPOINT_MISTAKES = [
    (["--checkpoint", "no-such-dir"], r"--checkpoint: expected a checkpoint directory, got "
                                      r"'no-such-dir' \(no such directory\)"),
    (["--checkpoint", str(TINY_V3 / "config.json")], r"--checkpoint: expected a checkpoint "
                                                     r"directory, got '.*' \(not a directory\)"),
    (["--checkpoint", str(DATA / "configs")], r"--checkpoint .*configs: config: expected a "
                                              r"config.json file"),
    (CHECKPOINT + ["--hidden", "8", "--vocab", "8"], r"--hidden --vocab: for random weights only; "
                                                     r"a --checkpoint sets the model's shapes"),
    (CHECKPOINT + ["--prompt-ids", "1,128"], r"--prompt-ids 1,128: expected token ids in "
                                             r"\[0, 128\) \(the vocabulary\), got 128"),
    (["--prompt-ids", "1, -2"], r"argument --prompt-ids: expected token ids like 1,2,3, got "
                                r"'1, -2'"),
    (["--prompt-ids", "3", "--requests", "2"], r"--requests: for random requests only; with "
                                               r"--prompt or --prompt-ids the prompts given are "
                                               r"the requests"),
    (["--prompt", "hello"], r"--prompt 'hello': text needs a tokenizer, and random weights have "
                            r"none; give token ids with --prompt-ids"),
]


@needs_safetensors
@pytest.mark.parametrize("argv,message", CHECKPOINT_MISTAKES,
                         ids=["missing", "a-file", "no-config", "shape-flags", "id-past-vocab",
                              "bad-ids", "requests-with-prompts", "text-random-weights"])
def test_checkpoint_and_prompt_mistakes_end_with_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as info:
    demo.main(argv, log=lambda _: None)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert re.search(r"^python -P -m jax_flashmla.demo: error: " + message, err), err


@needs_safetensors
def test_a_text_prompt_without_the_tokenizers_package_ends_with_one_line(tmp_path, capsys,
                                                                         monkeypatch):
  checkpoint = tmp_path / "tiny-v3"
  shutil.copytree(TINY_V3, checkpoint)
  (checkpoint / "tokenizer.json").write_text("{}")  # never read: refused before loading
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tokenizers" else find_spec(name, *a))
  with pytest.raises(SystemExit) as info:
    demo.main(["--checkpoint", str(checkpoint), "--prompt", "hello"], log=lambda _: None)
  err = capsys.readouterr().err
  assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
  assert "the tokenizers package is not installed (pip install tokenizers)" in err, err
