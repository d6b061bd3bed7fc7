"""Hugging Face checkpoints without torch: `config.json`, safetensors shards, FP8 weight blocks.

Python and NumPy (no Flax, no torch), shared by `MLAConfig.from_hf` and
`jax_flashmla.models.deepseek`:

- `read_hf_config`: a `config.json` path or directory, a dict or a transformers config, as a dict;
  `rope_from_hf` turns its RoPE settings (published `rope_theta` + `rope_scaling`, or
  transformers 5's `rope_parameters`) into `rope_theta` and `rope.YarnScaling`;
- `SafetensorsCheckpoint`: the tensors of a checkpoint directory (one file, or shards named by
  `model.safetensors.index.json`), each read only when asked for, through the `safetensors`
  package's NumPy backend (memory-mapped);
- `dequantize_fp8_blocks`: DeepSeek-V3's published weights are float8_e4m3fn with one float32
  `weight_scale_inv` per 128 x 128 block (`w = fp8 * scale_inv`);
- `interleave_rope_rows`: the row permutation from transformers' `rope_interleave=False` layout
  (pairs `(x_i, x_{i+32})`) to DeepSeek's (pairs `(x_{2i}, x_{2i+1})`).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping

import ml_dtypes  # a dependency of jax: NumPy types for bfloat16 and float8
import numpy as np

from jax_flashmla import rope

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

# safetensors' NumPy backend names dtypes that NumPy lacks by attributes of the numpy module,
# which has none for these; such tensors are memory-mapped at the offsets the file header gives.
_NUMPY_MISSING = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------

def read_hf_config(config) -> dict:
  """A Hugging Face model config as a plain dict.

  Args:
    config: a `config.json` path, the directory holding one, a dict, or a transformers config
      (anything with `to_dict()`).
  """
  if isinstance(config, Mapping):
    return dict(config)
  if isinstance(config, (str, os.PathLike)):
    path = pathlib.Path(config)
    if path.is_dir():
      path = path / CONFIG_FILE
    if not path.is_file():
      raise FileNotFoundError(f"config: expected a config.json file or a directory holding one, "
                              f"got {str(config)!r} (no {path})")
    with open(path) as f:
      return json.load(f)
  if hasattr(config, "to_dict"):
    return dict(config.to_dict())
  raise TypeError(f"config: expected a path, a dict or a transformers config, got "
                  f"{type(config).__name__}")


def require_keys(config: Mapping, keys: Iterable[str]) -> None:
  missing = [k for k in keys if config.get(k) is None]
  if missing:
    raise ValueError(f"config: expected the keys {missing} of an MLA model (DeepSeek-V2/V3 "
                     f"style), missing (model_type {config.get('model_type')!r})")


def rope_from_hf(config: Mapping) -> tuple[float, rope.YarnScaling | None]:
  """`(rope_theta, YaRN or None)` of a config, in either spelling of its RoPE settings.

  Missing YaRN keys take DeepSeek's defaults (`beta_fast` 32, `beta_slow` 1, `mscale` 1,
  `mscale_all_dim` 0, `original_max_position_embeddings` = `max_position_embeddings`, `factor` =
  their ratio), as transformers does, with one difference that no published config hits: with
  `mscale` set and `mscale_all_dim` missing, transformers drops `mscale` from the cos/sin factor
  and DeepSeek's code keeps it (so does this).
  """
  params = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or params
  theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
  kind = scaling.get("rope_type") or scaling.get("type") or "default"
  if kind == "default":
    return float(theta), None
  if kind != "yarn":
    raise ValueError(f"config: expected rope_scaling of type 'yarn' (DeepSeek's) or none, got "
                     f"{kind!r}")
  if scaling.get("attention_factor") is not None:
    raise ValueError("config: an explicit rope_scaling attention_factor is not supported (YaRN's "
                     "is derived from factor, mscale and mscale_all_dim)")
  if scaling.get("truncate", True) is False:
    raise ValueError("config: rope_scaling truncate=false is not supported (DeepSeek's YaRN "
                     "rounds the correction range to whole dims)")
  max_positions = config.get("max_position_embeddings")
  original = scaling.get("original_max_position_embeddings") or max_positions
  if original is None:
    raise ValueError("config: YaRN needs original_max_position_embeddings (or "
                     "max_position_embeddings), got neither")
  factor = scaling.get("factor")
  if factor is None:
    if max_positions is None:
      raise ValueError("config: YaRN needs rope_scaling.factor (or max_position_embeddings), "
                       "got neither")
    factor = max_positions / original
  yarn = rope.YarnScaling(
      factor=float(factor),
      original_max_position_embeddings=int(original),
      beta_fast=float(scaling.get("beta_fast") or 32.0),
      beta_slow=float(scaling.get("beta_slow") or 1.0),
      mscale=float(scaling.get("mscale", 1.0) or 0.0),
      mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0) or 0.0),
  )
  return float(theta), yarn


# ------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------

class SafetensorsCheckpoint:
  """The tensors of a checkpoint directory, each read from disk only when asked for.

  Shards are named by `model.safetensors.index.json` (its `weight_map`); without an index every
  `*.safetensors` file of the directory is opened. Use as a context manager (or call `close`).

  Args:
    directory: the checkpoint directory.
  """

  def __init__(self, directory):
    from safetensors import safe_open  # the `safetensors` package: pip install safetensors

    self._safe_open = safe_open
    self.directory = pathlib.Path(directory)
    self._handles = {}   # file name -> safe_open handle, opened on first use
    self._headers = {}   # file name -> (JSON header, data offset), for dtypes NumPy lacks
    index = self.directory / INDEX_FILE
    if index.is_file():
      with open(index) as f:
        self._file_of = dict(json.load(f)["weight_map"])
    else:
      files = sorted(self.directory.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(f"directory: expected {INDEX_FILE} or *.safetensors files in "
                                f"{str(self.directory)!r}, found neither")
      self._file_of = {}
      for path in files:
        for name in self._handle(path.name).keys():
          self._file_of[name] = path.name

  def _handle(self, filename):
    if filename not in self._handles:
      self._handles[filename] = self._safe_open(self.directory / filename, framework="numpy")
    return self._handles[filename]

  def __enter__(self) -> SafetensorsCheckpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._handles.clear()
    self._headers.clear()

  def keys(self) -> list[str]:
    return sorted(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def _slice(self, name: str):
    if name not in self._file_of:
      raise KeyError(f"tensor {name!r} is not in the checkpoint {str(self.directory)!r}")
    return self._handle(self._file_of[name]).get_slice(name)

  def dtype(self, name: str) -> str:
    """The tensor's safetensors dtype code (`"BF16"`, `"F8_E4M3"`, `"F32"`, ...)."""
    return self._slice(name).get_dtype()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """The tensor as a NumPy array (bfloat16 and float8 as ml_dtypes' types), read-only."""
    dtype = self.dtype(name)
    if dtype not in _NUMPY_MISSING:
      return self._handle(self._file_of[name]).get_tensor(name)
    filename = self._file_of[name]
    header, data_start = self._header(filename)
    entry = header[name]
    begin, end = entry["data_offsets"]
    array = np.memmap(self.directory / filename, dtype=np.uint8, mode="r",
                      offset=data_start + begin, shape=(end - begin,))
    return array.view(_NUMPY_MISSING[dtype]).reshape(entry["shape"])

  def _header(self, filename) -> tuple[dict, int]:
    # The format: an 8-byte little-endian header size, a JSON header of {name: {dtype, shape,
    # data_offsets}} (offsets relative to the end of the header), then the data.
    if filename not in self._headers:
      with open(self.directory / filename, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        self._headers[filename] = (json.loads(f.read(size)), 8 + size)
    return self._headers[filename]


# ------------------------------------------------------------------------------------------------
# Weight transforms
# ------------------------------------------------------------------------------------------------

def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray,
                          block_size: tuple[int, int] = (128, 128)) -> np.ndarray:
  """`weight * scale_inv` per block: DeepSeek-V3's FP8 storage back to float32.

  Args:
    weight: `[out, in]` float8 (any dtype NumPy can turn into float32).
    scale_inv: `[ceil(out / bo), ceil(in / bi)]` float32, one multiplier per block.
    block_size: `(bo, bi)`, the config's `quantization_config.weight_block_size`.

  Returns:
    `[out, in]` float32.
  """
  if weight.ndim != 2:
    raise ValueError(f"weight: expected a 2-D FP8 weight, got shape {weight.shape}")
  (rows, cols), (bo, bi) = weight.shape, block_size
  blocks = (-(-rows // bo), -(-cols // bi))
  if tuple(scale_inv.shape) != blocks:
    raise ValueError(f"scale_inv: expected shape {list(blocks)} for a {rows} x {cols} weight in "
                     f"{bo} x {bi} blocks, got {list(scale_inv.shape)}")
  w = np.zeros((blocks[0] * bo, blocks[1] * bi), np.float32)
  w[:rows, :cols] = weight.astype(np.float32)
  w = w.reshape(blocks[0], bo, blocks[1], bi) * \
      scale_inv.astype(np.float32)[:, None, :, None]
  return w.reshape(blocks[0] * bo, blocks[1] * bi)[:rows, :cols]


def rope_interleave_permutation(rope_dim: int) -> np.ndarray:
  """Row `j` of DeepSeek's interleaved layout is row `perm[j]` of the half layout.

  transformers' `rope_interleave=False` pairs dims `(i, i + rope_dim // 2)`; DeepSeek pairs
  `(2i, 2i + 1)`, with the same frequency for pair `i`: `perm = [0, half, 1, half + 1, ...]`.
  """
  return np.arange(rope_dim).reshape(2, rope_dim // 2).T.reshape(-1)


def interleave_rope_rows(weight: np.ndarray, num_heads: int, head_dim: int,
                         rope_dim: int) -> np.ndarray:
  """Reorders the rotary rows (the last `rope_dim` of each head's `head_dim`) of an `[out, in]`
  weight from the half layout to the interleaved one; other rows are kept."""
  if weight.shape[0] != num_heads * head_dim:
    raise ValueError(f"weight: expected {num_heads} x {head_dim} rows, got shape {weight.shape}")
  w = weight.reshape(num_heads, head_dim, -1)
  nope = head_dim - rope_dim
  w = np.concatenate([w[:, :nope], w[:, nope:][:, rope_interleave_permutation(rope_dim)]], axis=1)
  return w.reshape(weight.shape)
