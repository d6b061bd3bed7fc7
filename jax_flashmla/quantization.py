"""The FP8 KV cache: DeepSeek-V3.2's 656-byte rows, as FlashMLA's sparse decode reads them.

One cache row (one token of one KV head) is 656 bytes:

    bytes [0, 512)    the 512 latent values as float8_e4m3fn, in four tiles of 128 columns
    bytes [512, 528)  four float32 scales (little endian), one per tile
    bytes [528, 656)  the 64 RoPE values as bfloat16, not quantized

A tile's scale is the power of two `2^ceil(log2(max(amax / 448, 1e-4)))` (amax over the tile's
values, float32) and a stored value is `round_to_nearest_even_e4m3(x / scale)`; so
`dequantize_kv` gives `fp8 * scale` exactly in bfloat16, and that is what the kernels compute
with (docs/design.md, "The FP8 cache"). An FP8 cache is `[num_blocks, 64, h_kv, 656]` uint8:
the row mixes three types, so bytes say what it is. FlashMLA keeps the same bytes in a
float8_e4m3fn array; that dtype is accepted too and read as its bytes.

    fp8 = quantize_kv(rows)         # [..., 576] -> [..., 656] uint8
    rows8 = dequantize_kv(fp8)      # [..., 656] -> [..., 576] bfloat16, == rows up to rounding
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_flashmla.constants import (FP8_ROPE_OFFSET, FP8_ROW_BYTES, FP8_SCALE_OFFSET,
                                    FP8_TILE_COLS, HEAD_DIM_K, HEAD_DIM_V)

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_SCALE_BASE = 1e-4  # a tile's amax / 448 is raised to this before rounding up to 2^k
NUM_TILES = HEAD_DIM_V // FP8_TILE_COLS  # 4
CACHE_DTYPES = (jnp.dtype(jnp.uint8), jnp.dtype(jnp.float8_e4m3fn))


def is_fp8_cache(k_cache) -> bool:
  """Whether `k_cache` holds FP8 rows (its dtype is uint8 or float8_e4m3fn)."""
  return jnp.dtype(k_cache.dtype) in CACHE_DTYPES


def cache_bytes(k_cache: jax.Array) -> jax.Array:
  """An FP8 cache as uint8 (a float8_e4m3fn array of the same bytes is reinterpreted)."""
  if jnp.dtype(k_cache.dtype) == jnp.dtype(jnp.float8_e4m3fn):
    return lax.bitcast_convert_type(k_cache, jnp.uint8)
  return k_cache


def _check_last_dim(name: str, x, width: int, what: str) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"{name}: expected a jax.Array or numpy array, got {type(x).__name__}")
  if len(x.shape) < 1 or x.shape[-1] != width:
    raise ValueError(f"{name}: expected a last dim of {width} ({what}), got shape "
                     f"{tuple(x.shape)}")


def pow2_scale(amax: jax.Array) -> jax.Array:
  """`2^ceil(log2(max(amax / 448, 1e-4)))` in float32, exactly (frexp, not a rounded log2)."""
  v = jnp.maximum(amax.astype(jnp.float32) / jnp.float32(FP8_MAX), jnp.float32(MIN_SCALE_BASE))
  mant, exp = jnp.frexp(v)  # v = mant * 2^exp, mant in [0.5, 1)
  exp = jnp.where(mant == 0.5, exp - 1, exp)  # v is a power of two: 2^(exp - 1) exactly
  return jnp.ldexp(jnp.ones_like(v), exp)


def quantize_kv(rows: jax.Array) -> jax.Array:
  """Cache rows `[..., 576]` -> FP8 cache rows `[..., 656]` uint8 (the module's layout).

  Args:
    rows: `[..., 576]` (512 latent + 64 RoPE), bfloat16; another float dtype is first rounded
      to bfloat16, as a bf16 cache would store it.

  Returns:
    `[..., 656]` uint8. A tile holding NaN or inf gets a NaN scale (the tile reads back as NaN);
    NaN never reaches another row of the decode.

  Raises:
    TypeError: `rows` is not an array or not a float dtype.
    ValueError: its last dim is not 576.

  Example:
    >>> rows = jnp.ones((2, 64, 1, 576), jnp.bfloat16)
    >>> quantize_kv(rows).shape, quantize_kv(rows).dtype
    ((2, 64, 1, 656), dtype('uint8'))
  """
  _check_last_dim("rows", rows, HEAD_DIM_K, "512 latent + 64 RoPE")
  if not jnp.issubdtype(rows.dtype, jnp.floating):
    raise TypeError(f"rows: expected a float dtype (bfloat16), got {jnp.dtype(rows.dtype)}")
  x = jnp.asarray(rows).astype(jnp.bfloat16)
  lead = x.shape[:-1]
  latent = x[..., :HEAD_DIM_V].astype(jnp.float32).reshape(lead + (NUM_TILES, FP8_TILE_COLS))
  amax = jnp.max(jnp.abs(latent), axis=-1)  # [..., 4]
  # A tile holding NaN or inf gets a NaN scale: it dequantizes to NaN (as its codes alone might
  # not: e4m3fn has no inf), in the kernels as in dequantize_kv.
  scale = jnp.where(jnp.isfinite(amax), pow2_scale(amax), jnp.float32(jnp.nan))
  codes = (latent / scale[..., None]).astype(jnp.float8_e4m3fn)  # exact division by 2^k
  parts = (
      lax.bitcast_convert_type(codes, jnp.uint8).reshape(lead + (HEAD_DIM_V,)),
      _to_le_bytes(scale, jnp.uint32),
      _to_le_bytes(x[..., HEAD_DIM_V:], jnp.uint16),
  )
  return jnp.concatenate(parts, axis=-1)


def _to_le_bytes(x: jax.Array, word) -> jax.Array:
  """`[..., n]` of a k-byte dtype -> `[..., n * k]` little-endian uint8, bit for bit (bitcast at
  equal width, then shifts: see `_from_le_bytes` for why not a width-changing bitcast)."""
  k = jnp.dtype(word).itemsize
  w = lax.bitcast_convert_type(x, word)
  shifts = (jnp.arange(k, dtype=word) * 8).astype(word)
  parts = ((w[..., None] >> shifts) & jnp.asarray(0xFF, word)).astype(jnp.uint8)
  return parts.reshape(x.shape[:-1] + (x.shape[-1] * k,))


def _from_le_bytes(b: jax.Array, word, dtype) -> jax.Array:
  """`[..., n * k]` little-endian uint8 -> `[..., n]` of a k-byte `dtype`, bit for bit.

  The words are put together with shifts and only then bitcast at equal width: a bitcast that
  changes the element width (and so the shape) does not survive shape refinement when a leading
  dimension is symbolic (jax.export with a symbolic batch).
  """
  k = jnp.dtype(word).itemsize
  parts = b.reshape(b.shape[:-1] + (b.shape[-1] // k, k)).astype(word)
  shifts = (jnp.arange(k, dtype=word) * 8).astype(word)
  return lax.bitcast_convert_type(jnp.sum(parts << shifts, axis=-1, dtype=word), dtype)


def dequantize_kv(fp8_rows: jax.Array) -> jax.Array:
  """FP8 cache rows `[..., 656]` (uint8 or float8_e4m3fn) -> `[..., 576]` bfloat16.

  Latent column j of tile t is `float(code) * scale[t]`, exact in bfloat16 for the scales
  `quantize_kv` writes; the RoPE columns are the stored bfloat16 values. These are the values the
  kernels compute with.

  Raises:
    TypeError: not an array, or a dtype other than uint8 / float8_e4m3fn.
    ValueError: its last dim is not 656.

  Example:
    >>> rows = jnp.full((3, 576), 0.5, jnp.bfloat16)
    >>> bool((dequantize_kv(quantize_kv(rows)) == rows).all())
    True
  """
  _check_last_dim("fp8_rows", fp8_rows, FP8_ROW_BYTES, "an FP8 cache row")
  if jnp.dtype(fp8_rows.dtype) not in CACHE_DTYPES:
    raise TypeError(f"fp8_rows: expected dtype uint8 or float8_e4m3fn, got "
                    f"{jnp.dtype(fp8_rows.dtype)}")
  b = cache_bytes(jnp.asarray(fp8_rows))
  lead = b.shape[:-1]
  codes = lax.bitcast_convert_type(b[..., :FP8_SCALE_OFFSET], jnp.float8_e4m3fn)
  scale = _from_le_bytes(b[..., FP8_SCALE_OFFSET:FP8_ROPE_OFFSET], jnp.uint32, jnp.float32)
  latent = codes.astype(jnp.float32).reshape(lead + (NUM_TILES, FP8_TILE_COLS)) * scale[..., None]
  rope = _from_le_bytes(b[..., FP8_ROPE_OFFSET:], jnp.uint16, jnp.bfloat16)
  return jnp.concatenate(
      [latent.reshape(lead + (HEAD_DIM_V,)).astype(jnp.bfloat16), rope], axis=-1)
