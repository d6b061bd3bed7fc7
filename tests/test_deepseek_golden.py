"""The DeepSeek decoder against transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM.

tests/data/deepseek/make_golden.py saved three tiny random checkpoints with transformers (V2
without q LoRA; V3 with q LoRA; V3 stored as DeepSeek publishes V3, FP8 weights with 128 x 128
block scales in two shards, also in the `rope_interleave=False` layout) and transformers' float32
logits for a 20-token and a 13-token prompt, each followed by 8 greedy decode steps. Here
`from_pretrained` loads each checkpoint and `generate` runs both prompts as one ragged batch
(chunked prefill, then decode) through `PagedKVCache` and `PageAllocator`.

Tolerances (error = max |ours - transformers| / max |transformers| over the vocabulary, per
step):
- float32 weights, activations and cache: 1e-4 (seen on the CPU: at most 8.7e-7);
- float32 weights, bfloat16 cache (cache rows and absorbed queries rounded, as the kernels take
  them): 1.5e-2 (seen: at most 6.1e-3);
- bfloat16 weights, activations and cache (the serving setting): 4e-2 (seen: at most 2.4e-2,
  on the FP8 checkpoint, whose dequantized weights are rounded to bfloat16 once more).
In the bfloat16 runs the decode feeds transformers' greedy tokens (`force_tokens`), so that a
token flipped by rounding cannot send the sequences apart.

On a Hopper GPU, `test_kernels_give_the_reference_logits` runs the same with the CUDA kernels:
    JAX_FLASHMLA_REQUIRE_GPU=1 python -P -m pytest -q tests/test_deepseek_golden.py
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("safetensors")

from jax_flashmla.models import deepseek  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "deepseek"
MODELS = ["tiny-v2", "tiny-v3", "tiny-v3-fp8"]
FLOAT32_TOL = 1e-4
BF16_CACHE_TOL = 1.5e-2
# The FP8 cache (e4m3: every cached value within 2^-4 of itself): 3.5e-2, 2.6e-2 and 5.5e-2 on
# the three models when this bound was set.
FP8_CACHE_TOL = 8e-2
BF16_TOL = 4e-2
CHUNK = 8  # prompts of 20 and 13 tokens: ragged chunks, and rows that wait for the other


@functools.lru_cache(maxsize=None)
def _model(name, param_dtype):
  return deepseek.from_pretrained(DATA / name, param_dtype=param_dtype)


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # On a GPU, float32 matmuls would otherwise run in TF32 (the tolerances are float32's).
  with jax.default_matmul_precision("float32"):
    yield


@functools.lru_cache(maxsize=None)
def _golden(name):
  return dict(np.load(DATA / name / "golden.npz"))


def _errors(got, want):
  """Per-step max |got - want| / max |want| of `[steps, vocab]` logits."""
  return np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)


def _generate(name, param_dtype, cache_dtype, implementation="xla", forced=False,
              kv_format="bf16"):
  g = _golden(name)
  prompts = [g["prompt_a"], g["prompt_b"]]
  force = [g["tokens_a"][:-1], g["tokens_b"][:-1]] if forced else None
  return deepseek.generate(_model(name, param_dtype), prompts, len(g["tokens_a"]), chunk=CHUNK,
                           implementation=implementation, cache_dtype=cache_dtype,
                           kv_format=kv_format, force_tokens=force, return_logits=True)


def _check(name, out, tol, *, tokens=True):
  g = _golden(name)
  for i, key in enumerate("ab"):
    n = len(g[f"prompt_{key}"])
    want = g[f"logits_{key}"][n - 1:]   # the prompt's last position, then the 8 decode steps
    err = _errors(out.logits[i], want)
    assert err.max() <= tol, f"{name} prompt {key}: errors per step {np.round(err, 7)}"
    if tokens:
      np.testing.assert_array_equal(out.tokens[i], g[f"tokens_{key}"])
  return err


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_transformers_float32(name):
  out = _generate(name, jnp.float32, jnp.float32)
  _check(name, out, FLOAT32_TOL)


@pytest.mark.parametrize("name", MODELS)
def test_every_prompt_position_matches_transformers_float32(name):
  # One step over each whole sequence, left-padded into one ragged batch: the prefill logits of
  # every position (causal attention within the step).
  g = _golden(name)
  seqs = [np.concatenate([g[f"prompt_{k}"], g[f"tokens_{k}"][:-1]]) for k in "ab"]
  t = max(map(len, seqs))
  tokens = np.zeros((2, t), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, t - len(s):] = s
  model = _model(name, jnp.float32)
  caches = model.create_caches(2, 64, dtype=jnp.float32)
  logits, caches = jax.jit(lambda m, tok, c, n: m(tok, c, num_new=n, all_logits=True,
                                                  implementation="xla"))(
      model, jnp.asarray(tokens), caches, jnp.array([len(s) for s in seqs], jnp.int32))
  for i, (key, s) in enumerate(zip("ab", seqs, strict=True)):
    err = _errors(np.asarray(logits[i, t - len(s):]), g[f"logits_{key}"])
    assert err.max() <= FLOAT32_TOL, f"{name} prompt {key}: errors {np.round(err, 7)}"
  np.testing.assert_array_equal(np.asarray(caches[0].lengths), [len(s) for s in seqs])


@pytest.mark.parametrize("name", MODELS)
def test_bf16_cache_within_its_bound(name):
  _check(name, _generate(name, jnp.float32, jnp.bfloat16, forced=True), BF16_CACHE_TOL,
         tokens=False)


@pytest.mark.parametrize("name", MODELS)
def test_fp8_cache_within_its_bound(name):
  _check(name, _generate(name, jnp.float32, jnp.bfloat16, forced=True, kv_format="fp8"),
         FP8_CACHE_TOL, tokens=False)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_model_within_its_bound(name):
  _check(name, _generate(name, jnp.bfloat16, jnp.bfloat16, forced=True), BF16_TOL,
         tokens=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("name", MODELS)
def test_kernels_give_the_reference_logits(name, kv_format):
  # The CUDA kernels against the pure-JAX attention on the same cache (bf16 or FP8); everything
  # else (projections, MoE) at float32 precision so that only the attention differs.
  kw = dict(forced=True, kv_format=kv_format)
  with jax.default_matmul_precision("highest"):
    cuda = _generate(name, jnp.float32, jnp.bfloat16, implementation="cuda", **kw)
    xla = _generate(name, jnp.float32, jnp.bfloat16, implementation="xla", **kw)
  # Both round the cache and queries to bf16 alike; the kernels also feed bf16 probabilities
  # to the P @ V product, which the reference keeps in float32.
  for got, want in zip(cuda.logits, xla.logits, strict=True):
    err = _errors(got, want)
    assert err.max() <= 1e-2, f"{name}: kernels vs pure JAX, errors per step {err}"
  _check(name, cuda, BF16_CACHE_TOL if kv_format == "bf16" else FP8_CACHE_TOL, tokens=False)
