"""Generation with the DeepSeek decoder: `generate` (chunked prefill, then decode, in one jitted
step over paged caches) against a single forward pass, the serving loop (`jax_flashmla.serving`)
driving the model, `load_for_serving` with and without a tokenizer, and the command line."""

import functools
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("safetensors")

from hlo_aliasing import aliased_parameters, parameters_named  # noqa: E402
from jax_flashmla import serving  # noqa: E402
from jax_flashmla.models import deepseek  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "deepseek"


@functools.lru_cache(maxsize=None)
def _tiny_model():
  config = deepseek.DeepseekConfig.from_hf(dict(deepseek.TINY, num_hidden_layers=2))
  return deepseek.random_model(config, seed=0)


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # On a GPU, float32 matmuls would otherwise run in TF32 (the tolerances are float32's).
  with jax.default_matmul_precision("float32"):
    yield


def test_generate_equals_one_forward_pass():
  model = _tiny_model()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, n, dtype=np.int32) for n in (1, 7, 19)]
  new = 5
  out = deepseek.generate(model, prompts, new, chunk=4, cache_dtype=jnp.float32,
                          implementation="xla", return_logits=True)
  assert out.steps == 5 + new - 1   # 19 prompt tokens in chunks of 4, then the decode steps
  # The oracle: each prompt plus its generated tokens in one causal step (no paging history).
  seqs = [np.concatenate([p, t[:-1]]) for p, t in zip(prompts, out.tokens, strict=True)]
  width = max(map(len, seqs))
  tokens = np.zeros((3, width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, width - len(s):] = s
  logits, _ = model(jnp.asarray(tokens), model.create_caches(3, 64, dtype=jnp.float32),
                    num_new=jnp.array([len(s) for s in seqs], jnp.int32), all_logits=True,
                    implementation="xla")
  for i, p in enumerate(prompts):
    want = np.asarray(logits[i, width - new:])
    np.testing.assert_allclose(out.logits[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(out.tokens[i], want.argmax(-1))


def test_generator_reuses_its_pages_and_compiled_steps():
  model = _tiny_model()
  gen = deepseek.Generator(model, batch_size=2, max_seq_len=40, chunk=16, implementation=None)
  rng = np.random.default_rng(1)
  first = gen.run([rng.integers(0, 256, 30), rng.integers(0, 256, 3)], 8)
  assert gen.allocator.num_used == 2  # 37 and 10 tokens cached: one page each
  again = gen.run([rng.integers(0, 256, 5)], 4)
  assert gen.allocator.num_used == 1 and [len(t) for t in again.tokens] == [4]
  assert [len(t) for t in first.tokens] == [8, 8]
  assert sorted(gen._compiled) == [1, 16]
  # Both steps donate the caches: every layer's pages are updated in place.
  for compiled in gen._compiled.values():
    text = compiled.as_text()
    pages = parameters_named(text, "pages")
    assert len(pages) == 2 and set(pages) <= set(aliased_parameters(text)), pages
  with pytest.raises(ValueError, match=r"prompts\[0\]: expected 1..33 tokens"):
    gen.run([np.zeros(34, np.int32)], 8)
  with pytest.raises(ValueError, match="force_tokens: expected 1 sequences of 3 tokens"):
    gen.run([np.zeros(3, np.int32)], 4, force_tokens=[[1, 2]])


def test_the_server_drives_the_model():
  # The serving loop needs only the call contract (tokens, caches, num_new, metadata,
  # implementation) and config.num_layers / config.attention.
  model = _tiny_model()
  requests = serving.make_requests(np.random.default_rng(2), 4, max_prompt_len=40,
                                   max_new_tokens=5, vocab_size=256)
  server = serving.Server(model, batch_size=2, max_seq_len=45, num_blocks=2, chunk=16,
                          implementation=None, log=lambda _: None)
  stats = server.serve(requests)
  assert stats.tokens == sum(r.max_new_tokens for r in requests)
  # The same greedy tokens as generate() for the first request.
  r = requests[0]
  want = deepseek.generate(model, [r.prompt], r.max_new_tokens, chunk=16).tokens[0]
  np.testing.assert_array_equal(r.output, want)


def test_load_for_serving_without_a_tokenizer():
  model, tokenizer, config = deepseek.load_for_serving(DATA / "tiny-v2")
  assert tokenizer is None and config is model.config and config.num_layers == 2
  assert (config.bos_token_id, config.eos_token_id) == (0, 1)
  np.testing.assert_array_equal(deepseek.encode_prompt("3, 4 5", None), [3, 4, 5])
  with pytest.raises(ValueError, match="prompt: expected token ids"):
    deepseek.encode_prompt("hello", None)


def test_load_for_serving_with_a_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  out = tmp_path / "tiny-v2"
  shutil.copytree(DATA / "tiny-v2", out)
  vocab = {w: i for i, w in enumerate(["<s>", "</s>", "hello", "world", "[UNK]"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(out / "tokenizer.json"))
  loaded = deepseek.load_for_serving(out)
  assert loaded.tokenizer is not None
  ids = deepseek.encode_prompt("hello world", loaded.tokenizer,
                               bos_token_id=loaded.config.bos_token_id)
  np.testing.assert_array_equal(ids, [0, 2, 3])
  # encode_text takes digits as text (here unknown words); encode_prompt takes them as ids.
  np.testing.assert_array_equal(deepseek.encode_text("3 hello", loaded.tokenizer, bos_token_id=0),
                                [0, 4, 2])


def test_command_line_random_served_and_checkpoint_generated():
  lines = []
  stats = deepseek.main(["--random", "tiny", "--layers", "2", "--serve", "3", "--batch-size", "2",
                         "--prompt-len", "20", "--new-tokens", "4", "--chunk", "8"],
                        log=lines.append)
  text = "\n".join(lines)
  assert "2 layers" in text and "8 routed experts (top 2)" in text
  assert re.search(r"served: \d+ tokens generated .* [\d.]+ tokens/s", lines[-1]), text
  assert stats.tokens > 0
  lines = []
  out = deepseek.main(["--checkpoint", str(DATA / "tiny-v3"), "--prompt", "5,6,7",
                       "--new-tokens", "3", "--dtype", "float32"], log=lines.append)
  assert out.tokens[0].shape == (3,)
  assert re.search(r"decode: 2 tokens in [\d.]+ s: [\d.]+ tokens/s", lines[-1]), lines


def test_random_v2_lite_preset_is_v2_lite():
  config = deepseek.DeepseekConfig.from_hf(deepseek.V2_LITE)
  published = json.loads((DATA / "configs" / "deepseek-v2-lite.json").read_text())
  assert config == deepseek.DeepseekConfig.from_hf(published)
  # Parameter count of the published model (15.7 B), from the abstract shapes only.
  abstract = nnx.eval_shape(lambda: deepseek.DeepseekForCausalLM(config, rngs=nnx.Rngs(0)))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert 15.6e9 < params < 15.8e9, params
