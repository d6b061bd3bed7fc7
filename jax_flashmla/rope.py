"""DeepSeek-V2/V3 rotary embedding of MLA's 64-dim decoupled part, with YaRN context extension.

Plain JAX (no Flax), shared by `jax_flashmla.layers` and anyone wiring MLA by hand. YaRN, as the
DeepSeek configs use it (`rope_scaling: {type: yarn, factor: 40, ...}`):

- frequencies: dims that turn fewer than `beta_slow` times over the original context are
  interpolated (divided by `factor`), dims that turn more than `beta_fast` times are kept, and a
  linear ramp blends the dims between;
- attention temperature: the softmax scale of the 192-dim pre-absorption head is multiplied by
  `mscale(factor, mscale_all_dim) ** 2`, with `mscale(f, m) = 0.1 * m * ln(f) + 1` (f > 1);
- cos/sin are multiplied by `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (1 for the
  published configs, where the two are equal).

Pairs are interleaved, (x0, x1), (x2, x3), ..., as in DeepSeek's checkpoints; `interleaved=False`
pairs the two halves instead, (x0, x32), (x1, x33), ..., as transformers' `rope_interleave=False`
checkpoints do (their rows are DeepSeek's, permuted).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN settings of a DeepSeek config's `rope_scaling` (defaults: DeepSeek-V2)."""

  factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.707
  mscale_all_dim: float = 0.707


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction for a context `factor` times the original."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(qk_head_dim: int, scaling: YarnScaling | None = None) -> float:
  """The model's softmax scale: `qk_head_dim ** -0.5` (192 for DeepSeek) times YaRN's mscale².

  The absorbed decode's dot products equal the pre-absorption ones, so the kernel gets this
  scale, not `576 ** -0.5`.
  """
  scale = qk_head_dim**-0.5
  if scaling is not None:
    m = yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    scale *= m * m
  return scale


def rope_frequencies(dim: int, theta: float = 10000.0,
                     scaling: YarnScaling | None = None) -> np.ndarray:
  """`[dim // 2]` float64 angular frequencies of the pairs (YaRN-blended with `scaling`)."""
  if dim % 2:
    raise ValueError(f"dim: expected an even rotary dim, got {dim}")
  base = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  if scaling is None or scaling.factor <= 1:
    return base

  def dim_turning(turns):  # the (fractional) dim whose pair turns `turns` times over the context
    return (dim * math.log(scaling.original_max_position_embeddings / (turns * 2 * math.pi))
            / (2 * math.log(theta)))

  low = max(math.floor(dim_turning(scaling.beta_fast)), 0)
  high = min(math.ceil(dim_turning(scaling.beta_slow)), dim - 1)
  if high == low:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  # ramp 0: fast dims, kept as they are; ramp 1: slow dims, interpolated by `factor`.
  return base * (1 - ramp) + base / scaling.factor * ramp


def rope_attention_factor(scaling: YarnScaling | None) -> float:
  """The factor YaRN puts on cos and sin (1 for the published DeepSeek configs)."""
  if scaling is None:
    return 1.0
  return (yarn_mscale(scaling.factor, scaling.mscale)
          / yarn_mscale(scaling.factor, scaling.mscale_all_dim))


def apply_rope(x: jax.Array, positions: jax.Array, frequencies: np.ndarray,
               attention_factor: float = 1.0, *, interleaved: bool = True) -> jax.Array:
  """Rotates pairs of the last axis of `x` by `positions * frequencies`.

  Args:
    x: `[b, s, h, dim]` (or `[b, s, dim]`).
    positions: `[b, s]` integer token positions.
    frequencies: `[dim // 2]` from `rope_frequencies`.
    attention_factor: multiplies cos and sin (see `rope_attention_factor`).
    interleaved: pair `i` is `(x[2i], x[2i + 1])` (DeepSeek's layout); False: `(x[i],
      x[i + dim // 2])` (transformers' `rope_interleave=False`).

  Returns:
    x rotated, in x's dtype (computed in float32).
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(frequencies, jnp.float32)
  cos = jnp.cos(angles) * attention_factor  # [b, s, dim // 2]
  sin = jnp.sin(angles) * attention_factor
  if x.ndim == 4:
    cos, sin = cos[:, :, None], sin[:, :, None]
  half = x.shape[-1] // 2
  if interleaved:
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
  else:
    even, odd = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  parts = [even * cos - odd * sin, odd * cos + even * sin]
  rotated = jnp.stack(parts, axis=-1) if interleaved else jnp.concatenate(parts, axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)
