"""Checkpoint loading without torch: safetensors shards read lazily (bfloat16 and float8 included),
DeepSeek-V3's FP8 blocks dequantized, Hugging Face names mapped onto the model (both expert
layouts), and the errors a wrong checkpoint gets."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jax_flashmla.models import deepseek, hf  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "deepseek"


def test_fp8_blocks_dequantize_elementwise():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(130, 300)).astype(ml_dtypes.float8_e4m3fn)   # partial blocks both ways
  scale = rng.uniform(0.5, 2.0, size=(2, 3)).astype(np.float32)
  got = hf.dequantize_fp8_blocks(w, scale, (128, 128))
  want = np.empty(w.shape, np.float32)
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      want[i, j] = float(w[i, j]) * scale[i // 128, j // 128]
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"scale_inv: expected shape \[2, 3\] for a 130 x 300"):
    hf.dequantize_fp8_blocks(w, scale[:, :2])


def test_shards_are_read_through_the_index():
  with hf.SafetensorsCheckpoint(DATA / "tiny-v3-fp8") as ckpt:
    index = json.loads((DATA / "tiny-v3-fp8" / hf.INDEX_FILE).read_text())["weight_map"]
    assert ckpt.keys() == sorted(index) and len(set(index.values())) == 2
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (ckpt.dtype(q), ckpt.shape(q)) == ("F8_E4M3", (144, 16))
    assert (ckpt.dtype(q + "_scale_inv"), ckpt.shape(q + "_scale_inv")) == ("F32", (2, 1))
    assert ckpt.dtype("model.embed_tokens.weight") == "BF16"
    assert ckpt.dtype("model.layers.1.mlp.gate.weight") == "F32"
    assert ckpt.get(q).dtype == ml_dtypes.float8_e4m3fn
    with pytest.raises(KeyError, match="'model.layers.9.mlp.gate.weight' is not in the checkpoint"):
      ckpt.get("model.layers.9.mlp.gate.weight")


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v3-fp8"])
def test_bfloat16_reads_are_safetensors_own(name):
  # NumPy has no bfloat16 or float8 for safetensors' NumPy backend, so those tensors are
  # memory-mapped at the header's offsets; its Flax backend reads bfloat16 itself. (float8 goes
  # through the same offsets; the FP8 golden logits check its values.)
  directory = DATA / name
  seen = 0
  with hf.SafetensorsCheckpoint(directory) as ckpt:
    for path in sorted(directory.glob("*.safetensors")):
      with safe_open(path, framework="flax") as f:
        for key in f.keys():
          if ckpt.dtype(key) == "BF16":
            np.testing.assert_array_equal(ckpt.get(key), np.asarray(f.get_tensor(key)))
            seen += 1
  assert seen >= 5


def test_a_directory_without_weights_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected model.safetensors.index.json or"):
    hf.SafetensorsCheckpoint(tmp_path)


def _params(model):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model))}


def _copy(name, tmp_path):
  out = tmp_path / name
  shutil.copytree(DATA / name, out)
  return out


def test_loading_maps_names_dtypes_and_layouts():
  model = deepseek.from_pretrained(DATA / "tiny-v3")
  params = _params(model)
  # The checkpoint's dtype by default; the router stays float32.
  assert params["layers/0/attn/wq_a/kernel"].dtype == jnp.bfloat16
  assert params["layers/1/mlp/router"].dtype == np.float32
  with hf.SafetensorsCheckpoint(DATA / "tiny-v3") as ckpt:
    def get(name):
      return np.asarray(ckpt.get(name), np.float32)
    np.testing.assert_array_equal(params["layers/0/attn/wkv_b/kernel"],
                                  get("model.layers.0.self_attn.kv_b_proj.weight").T)
    np.testing.assert_array_equal(params["layers/1/mlp/expert_down"][3],
                                  get("model.layers.1.mlp.experts.3.down_proj.weight").T)
    np.testing.assert_array_equal(params["layers/1/mlp/router_bias"],
                                  get("model.layers.1.mlp.gate.e_score_correction_bias"))
    # W_UK / W_UV per head: kv_b_proj rows are heads x (qk_nope | v).
    w_uk, w_uv = model.layers[0].attn.absorbed_weights()
    kv_b = get("model.layers.0.self_attn.kv_b_proj.weight").reshape(2, 8 + 4, 512)
    np.testing.assert_array_equal(np.asarray(w_uk, np.float32), kv_b[:, :8].transpose(2, 0, 1))
    np.testing.assert_array_equal(np.asarray(w_uv, np.float32), kv_b[:, 8:].transpose(2, 0, 1))


def test_fp8_rows_are_dequantized_then_reordered():
  model = deepseek.from_pretrained(DATA / "tiny-v3-fp8", param_dtype=jnp.float32)
  assert model.config.attention.rope_interleave  # the half layout was reordered on load
  with hf.SafetensorsCheckpoint(DATA / "tiny-v3-fp8") as ckpt:
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    w = hf.dequantize_fp8_blocks(ckpt.get(name), ckpt.get(name + "_scale_inv"))
  kernel = np.asarray(model.layers[0].attn.wkv_a.kernel[...])
  np.testing.assert_array_equal(kernel[:, :512], w[:512].T)
  np.testing.assert_array_equal(kernel[:, 512:], w[512:][hf.rope_interleave_permutation(64)].T)


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path):
  # transformers' in-memory layout: experts.gate_up_proj [e, 2 * inter, hidden] (gate first),
  # experts.down_proj [e, hidden, inter].
  out = tmp_path / "fused"
  out.mkdir()
  shutil.copy(DATA / "tiny-v3" / "config.json", out)
  with hf.SafetensorsCheckpoint(DATA / "tiny-v3") as ckpt:
    tensors = {k: np.asarray(ckpt.get(k), np.float32) for k in ckpt.keys()}
  p = "model.layers.1.mlp.experts"
  fused = {k: v for k, v in tensors.items() if not k.startswith(p + ".")}
  fused[p + ".gate_up_proj"] = np.stack([np.concatenate([tensors[f"{p}.{e}.gate_proj.weight"],
                                                         tensors[f"{p}.{e}.up_proj.weight"]])
                                         for e in range(8)])
  fused[p + ".down_proj"] = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(8)])
  save_file(fused, out / "model.safetensors")
  got = _params(deepseek.from_pretrained(out, param_dtype=jnp.float32))
  want = _params(deepseek.from_pretrained(DATA / "tiny-v3", param_dtype=jnp.float32))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_first_layers_only():
  model = deepseek.from_pretrained(DATA / "tiny-v2", num_layers=1)
  assert model.config.num_layers == len(model.layers) == 1
  with pytest.raises(ValueError, match=r"num_layers: expected 1..2, got 3"):
    deepseek.from_pretrained(DATA / "tiny-v2", num_layers=3)


def test_tied_embeddings_need_no_lm_head(tmp_path):
  out = _copy("tiny-v2", tmp_path)
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
  model = deepseek.from_pretrained(out)
  assert model.lm_head is None and "lm_head/kernel" not in _params(model)


@pytest.mark.parametrize("change, message", [
    (dict(intermediate_size=48), r"parameter layers/0/mlp/down/kernel: expected shape \[48, 16\] "
                                 r"from config.json, got \[32, 16\] from the checkpoint"),
    (dict(num_hidden_layers=3), "no tensor for parameter layers/2/.*'model.layers.2.self_attn"),
    (dict(quantization_config={"quant_method": "awq"}), "got quant_method 'awq'"),
])
def test_checkpoint_errors(tmp_path, change, message):
  out = _copy("tiny-v2", tmp_path)
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps(dict(config, **change)))
  with pytest.raises(ValueError, match=message):
    deepseek.from_pretrained(out)


def test_float8_without_scales_is_refused(tmp_path):
  out = _copy("tiny-v3-fp8", tmp_path)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
  del index["weight_map"][name]
  (out / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match="o_proj.weight: a float8 weight without .*_scale_inv"):
    deepseek.from_pretrained(out)

