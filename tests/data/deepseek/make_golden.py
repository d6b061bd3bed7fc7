"""Writes the DeepSeek golden files of tests/test_deepseek_*.py with transformers' own models.

    pip install torch==2.13.0 transformers safetensors   # CPU torch; transformers >= 5
    python tests/data/deepseek/make_golden.py             # rewrites the files below

The tests need only `safetensors` (NumPy, no torch): CI compares against these files instead of
installing transformers and torch. Everything is seeded; a rerun with the same torch and
transformers writes the same values.

What it writes, next to this script:

- `tiny-v2/`: a random `DeepseekV2ForCausalLM` saved by `save_pretrained` (bfloat16): 2 layers
  (the first dense), no q LoRA, 4 routed experts in 2 groups (group-limited greedy, top 2), one
  shared expert, V2's YaRN (mscale 0.707).
- `tiny-v3/`: a random `DeepseekV3ForCausalLM` saved by `save_pretrained` (bfloat16): 2 layers
  (the first dense), q LoRA 8, 8 routed experts in 4 groups (sigmoid, `noaux_tc` with a random
  correction bias, top 2, normalised, scaled 2.5), one shared expert, V3's YaRN (mscale 1).
- `tiny-v3-fp8/`: another random `DeepseekV3ForCausalLM` stored as DeepSeek-V3 is published:
  every projection float8_e4m3fn with float32 `weight_scale_inv` per 128 x 128 block,
  embeddings, norms and LM head bfloat16, the router float32, a `quantization_config`, two
  shards and `model.safetensors.index.json`. It also has no q LoRA and `rope_interleave=False`
  (rotary rows in the half layout), so loading must dequantize before reordering rows.
- `<model>/golden.npz`: transformers' float32 logits (eager attention), computed on exactly the
  weights stored (bfloat16 rounded, or dequantized from FP8), for two prompts of 20 and 13
  tokens followed by 8 greedy tokens: `prompt_a`, `tokens_a` (the 9 greedy tokens: 1 from the
  prompt, 8 from decode steps), `logits_a` (`[28, vocab]`, every position, from one forward of
  prompt + 8 greedy tokens; the script checks incremental decoding gives the same), and `_b`.
  Greedy margins are checked so that float32 rounding cannot flip a token.
- `expected_rope.json`: for each published config in `configs/`, the softmax scale, the cos/sin
  factor and the inverse frequencies transformers computes (its `ROPE_INIT_FUNCTIONS["yarn"]`
  and the DeepSeek attention's `yarn_apply_mscale`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v2 import modeling_deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3

HERE = pathlib.Path(__file__).parent
PROMPT_LENGTHS = {"a": 20, "b": 13}
NEW_TOKENS = 9           # 1 from the prompt's last position, then 8 decode steps
MIN_MARGIN = 1e-3        # greedy top-1 minus top-2, relative to the largest |logit|
FP8_MAX = 448.0          # largest float8_e4m3fn
BLOCK = 128

# Shapes shared by the tiny models: the MLA latent must be 512 + 64 (the kernels' cache row);
# everything else is as small as keeps the parts distinct (qk_nope != v_head).
TINY = dict(vocab_size=128, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=8, v_head_dim=4, first_k_dense_replace=1,
            n_shared_experts=1, max_position_embeddings=64, rms_norm_eps=1e-6,
            bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
            beta_slow=1)


def tiny_v2():
  config = DeepseekV2Config(**TINY, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2,
                            topk_method="group_limited_greedy", n_group=2, topk_group=1,
                            routed_scaling_factor=1.5, norm_topk_prob=False,
                            rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707))
  return DeepseekV2ForCausalLM, config


def tiny_v3(q_lora_rank=8, rope_interleave=True, n_group=4, topk_group=2):
  config = DeepseekV3Config(**TINY, q_lora_rank=q_lora_rank, n_routed_experts=8,
                            num_experts_per_tok=2, n_group=n_group, topk_group=topk_group,
                            routed_scaling_factor=2.5, norm_topk_prob=True,
                            rope_interleave=rope_interleave,
                            rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0))
  return DeepseekV3ForCausalLM, config


def randomize(model, seed):
  """Weights of unit-scale activations (the default 0.02 init gives near-uniform logits), norms
  and the V3 correction bias away from their trivial values (a mix-up must change the result)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:  # [out, in] or experts [e, out, in]: fan-in scaling
        p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))


def round_to_bf16(model):
  """Keeps in the float32 model exactly what a bfloat16 checkpoint stores (transformers keeps
  the router's weight and bias in float32)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.endswith("mlp.gate.weight"):
        p.copy_(p.to(torch.bfloat16).float())


def quantizable(name: str, tensor: torch.Tensor) -> bool:
  """What DeepSeek-V3 stores in FP8: every projection; not embeddings, norms, the LM head or
  the router."""
  return (tensor.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name
          and not name.startswith("lm_head") and not name.endswith("mlp.gate.weight"))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """`(fp8 [out, in], scale_inv [ceil(out/128), ceil(in/128)] float32)`, `w ~ fp8 * scale_inv`
  per 128 x 128 block; each block's largest magnitude maps to the largest float8_e4m3fn."""
  rows, cols = w.shape
  rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
  padded = torch.zeros(rb * BLOCK, cb * BLOCK)
  padded[:rows, :cols] = w
  blocks = padded.reshape(rb, BLOCK, cb, BLOCK)
  scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
  q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
  q = q.reshape(rb * BLOCK, cb * BLOCK)[:rows, :cols].contiguous()
  return q, scale.float()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  rows, cols = q.shape
  full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
  return q.float() * full


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """transformers' in-memory layout of per-expert checkpoint tensors: `experts.gate_up_proj
  [e, 2 * inter, hidden]` (gate rows first) and `experts.down_proj [e, hidden, inter]`."""
  out, experts = {}, {}
  for key, value in tensors.items():
    head, sep, tail = key.partition(".mlp.experts.")
    if not sep:
      out[key] = value
      continue
    index, proj, _ = tail.split(".")
    experts.setdefault(head, {})[(int(index), proj)] = value
  for head, parts in experts.items():
    n = 1 + max(i for i, _ in parts)
    out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([parts[(i, "gate_proj")], parts[(i, "up_proj")]]) for i in range(n)])
    out[f"{head}.mlp.experts.down_proj"] = torch.stack([parts[(i, "down_proj")] for i in range(n)])
  return out


def greedy(model, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """transformers' greedy decoding with its cache: `(tokens [9], logits of each [9, vocab])`."""
  cache = transformers.DynamicCache(config=model.config)
  ids = torch.tensor(prompt[None], dtype=torch.long)
  tokens, logits = [], []
  with torch.no_grad():
    for _ in range(NEW_TOKENS):
      out = model(input_ids=ids, past_key_values=cache, use_cache=True)
      step = out.logits[0, -1].float()
      logits.append(step.numpy())
      tokens.append(int(step.argmax()))
      ids = torch.tensor([[tokens[-1]]])
  return np.array(tokens, np.int32), np.stack(logits)


def golden(model, seed: int) -> dict[str, np.ndarray]:
  """Prompts whose greedy continuations have clear margins, and transformers' logits."""
  vocab = model.config.vocab_size
  rng = np.random.default_rng(seed)
  out = {}
  for key, length in PROMPT_LENGTHS.items():
    for _ in range(100):
      prompt = rng.integers(2, vocab, length).astype(np.int32)
      tokens, step_logits = greedy(model, prompt)
      top2 = np.sort(step_logits, axis=-1)[:, -2:]
      if np.all(top2[:, 1] - top2[:, 0] > MIN_MARGIN * np.abs(step_logits).max()):
        break
    else:
      raise RuntimeError(f"no prompt with clear greedy margins for seed {seed}")
    sequence = np.concatenate([prompt, tokens[:-1]])
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(sequence[None], dtype=torch.long)).logits[0].numpy()
    # One forward over the sequence equals prefill + incremental decode (float32 rounding).
    incremental = logits[length - 1:]
    err = np.abs(incremental - step_logits).max() / np.abs(step_logits).max()
    assert err < 1e-5, f"transformers' cached decode differs from its forward: {err}"
    out[f"prompt_{key}"] = prompt
    out[f"tokens_{key}"] = tokens
    out[f"logits_{key}"] = logits.astype(np.float32)
  out["transformers_version"] = np.array(transformers.__version__)
  out["torch_version"] = np.array(torch.__version__)
  return out


def fresh(directory: pathlib.Path) -> pathlib.Path:
  if directory.exists():
    shutil.rmtree(directory)
  directory.mkdir(parents=True)
  return directory


def write_saved_by_transformers(name: str, build, seed: int) -> None:
  cls, config = build()
  torch.manual_seed(seed)
  model = cls(config).eval()
  randomize(model, seed)
  round_to_bf16(model)
  data = golden(model, seed)
  directory = fresh(HERE / name)
  # transformers keeps the router (weight and correction bias) in float32: keep them exact.
  routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
  kept = [{k: v.clone() for k, v in r.state_dict().items()} for r in routers]
  model.to(torch.bfloat16)
  for router, state in zip(routers, kept, strict=True):
    router.float().load_state_dict(state)
  model.save_pretrained(directory)
  (directory / "generation_config.json").unlink(missing_ok=True)
  np.savez_compressed(directory / "golden.npz", **data)


def write_fp8(name: str, build, seed: int) -> None:
  cls, config = build()
  torch.manual_seed(seed)
  model = cls(config).eval()
  randomize(model, seed)
  round_to_bf16(model)
  with tempfile.TemporaryDirectory() as tmp:  # transformers' names, one tensor per expert
    model.save_pretrained(tmp)
    tensors = load_file(pathlib.Path(tmp) / "model.safetensors")
    saved_config = json.loads((pathlib.Path(tmp) / "config.json").read_text())

  stored, exact = {}, {}
  for key, value in tensors.items():
    if quantizable(key, value):
      q, scale = quantize_fp8(value.float())
      stored[key], stored[key + "_scale_inv"] = q, scale
      exact[key] = dequantize_fp8(q, scale)
    elif key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias"):
      stored[key] = exact[key] = value.float()
    else:
      stored[key] = value.to(torch.bfloat16)
      exact[key] = stored[key].float()
  # The golden logits come from exactly the stored weights.
  missing, unexpected = model.load_state_dict(fuse_experts(exact), strict=False)
  assert not unexpected, unexpected
  assert set(missing) <= {k for k, _ in model.named_buffers()}, missing
  data = golden(model, seed)

  directory = fresh(HERE / name)
  saved_config["dtype"] = "bfloat16"
  saved_config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8",
                                         "weight_block_size": [BLOCK, BLOCK]}
  (directory / "config.json").write_text(json.dumps(saved_config, indent=2, sort_keys=True) + "\n")
  # Two shards and an index, as published checkpoints come: layer 0 and the rest.
  shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
  for key, value in stored.items():
    first = key.startswith("model.layers.0.") or key.startswith("model.embed_tokens")
    shards["model-0000%d-of-00002.safetensors" % (1 if first else 2)][key] = value.contiguous()
  weight_map = {}
  for file, part in shards.items():
    save_file(part, directory / file, metadata={"format": "pt"})
    weight_map.update({key: file for key in part})
  total = sum(v.numel() * v.element_size() for v in stored.values())
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  np.savez_compressed(directory / "golden.npz", **data)


def write_expected_rope() -> None:
  """transformers' softmax scale, cos/sin factor and frequencies for each published config."""
  out = {"_comment": "Written by make_golden.py with transformers " + transformers.__version__,
         "configs": {}}
  for path in sorted((HERE / "configs").glob("*.json")):
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    v3 = values["model_type"] != "deepseek_v2"
    values.pop("model_type")
    config = (DeepseekV3Config if v3 else DeepseekV2Config)(**values)
    module = modeling_deepseek_v3 if v3 else modeling_deepseek_v2
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    out["configs"][path.stem] = {
        "softmax_scale": module.yarn_apply_mscale(config.rope_parameters, qk_head_dim**-0.5),
        "attention_factor": float(attention_factor),
        "inv_freq": [float(f) for f in inv_freq],
    }
  (HERE / "expected_rope.json").write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
  torch.set_num_threads(1)
  write_expected_rope()
  write_saved_by_transformers("tiny-v2", tiny_v2, seed=2)
  write_saved_by_transformers("tiny-v3", tiny_v3, seed=3)
  write_fp8("tiny-v3-fp8", lambda: tiny_v3(q_lora_rank=None, rope_interleave=False, n_group=2,
                                           topk_group=1), seed=4)
  sizes = {p.relative_to(HERE): p.stat().st_size for p in sorted(HERE.rglob("*"))
           if p.is_file() and p.suffix in (".safetensors", ".npz", ".json")}
  for path, size in sizes.items():
    print(f"{size:8d}  {path}")
  print(f"{sum(sizes.values()):8d}  in all")


if __name__ == "__main__":
  main()
