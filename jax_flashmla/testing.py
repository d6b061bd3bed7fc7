"""FlashMLA's comparison of two decode results, for the tests and for checks in a running loop.

    report = compare(out, want_out, **OUT_TOL)          # NumPy arrays, or JAX arrays in a jit
    assert_close("out", out, want_out, **OUT_TOL)       # NumPy, raises with the details

The rules are FlashMLA's (its tests' `assert_close`): the NaN, +inf and -inf positions must be
the same in both; every other element must be within `abs_tol` absolutely or `rel_tol` of the
expected value relatively; and over all finite elements the cosine difference
`1 - 2 Σab / Σ(a² + b²)` must be at most `cos_tol`. It is computed as `Σ(a - b)² / Σ(a² + b²)`,
the same number without the cancellation that float32 sums would suffer near 0.

`compare` runs on NumPy arrays (in float64) and on JAX arrays, also inside `jax.jit` (in
float32), so a serving loop can check a step on the device and bring back a few numbers rather
than the outputs.

Live data (a model's cache rather than the tests' small random values) needs one more allowance.
The kernels round the softmax weights P to the element type before P·V, as FlashMLA's do; the
pure-JAX path keeps them in float32. The difference in one output element is then at most
`u · Σ_t p_t |v_t| / Σ_t p_t ≤ u · max_t |v_t|` (u the unit roundoff: 2⁻⁸ for bfloat16), plus
the final rounding of both outputs, `u · |out|` each. FlashMLA's absolute tolerance (8e-4) assumes
its tests' magnitudes; on rows whose V reaches several units it is smaller than that rounding. So
`compare(..., scale=value_bound(...), scale_tol=p_rounding_tol(dtype))` also accepts an element
within `scale_tol` times the largest |V| its row attends to (4u, 2⁻⁶ for bfloat16: the bound
above, 3u, with a margin). The lse and the cosine difference keep FlashMLA's tolerances: a wrong page, mask
or scale moves them far more than any rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla.constants import HEAD_DIM_V
from jax_flashmla.quantization import dequantize_kv, is_fp8_cache

# FlashMLA's tolerances for out (bfloat16) and lse (float32).
OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536, cos_tol=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Comparison:
  """`compare`'s findings: scalars (NumPy or JAX), a pytree so a jitted check can return it.

  Attributes:
    passed: every rule holds.
    nan, posinf, neginf: elements where one side has a NaN (+inf, -inf) and the other not.
    out_of_tolerance: elements finite in `want` that are neither abs- nor rel-close.
    worst: flat index of the element with the largest error among those out of tolerance
      (among all elements when none is).
    worst_got, worst_want: the two values there.
    cos_diff: the cosine difference over the elements finite in `want`.
  """

  passed: jax.Array
  nan: jax.Array
  posinf: jax.Array
  neginf: jax.Array
  out_of_tolerance: jax.Array
  worst: jax.Array
  worst_got: jax.Array
  worst_want: jax.Array
  cos_diff: jax.Array

  def describe(self, name: str, *, abs_tol: float, rel_tol: float, cos_tol: float) -> str:
    """One line: what failed (or "ok") with the numbers, for a report."""
    if bool(self.passed):
      return f"{name}: ok (cosine difference {float(self.cos_diff):.3g})"
    parts = [f"{int(n)} {kind} positions differ" for kind, n in
             (("nan", self.nan), ("+inf", self.posinf), ("-inf", self.neginf)) if int(n)]
    if int(self.out_of_tolerance):
      parts.append(f"{int(self.out_of_tolerance)} elements out of tolerance; worst got "
                   f"{float(self.worst_got)!r} want {float(self.worst_want)!r} (abs {abs_tol}, "
                   f"rel {rel_tol})")
    if cos_tol and float(self.cos_diff) > cos_tol:
      parts.append(f"cosine difference {float(self.cos_diff):.3g} > {cos_tol}")
    return f"{name}: " + "; ".join(parts)


def p_rounding_tol(dtype) -> float:
  """`scale_tol` for outputs of the element type `dtype` (see the module docstring): four unit
  roundoffs (2⁻⁶ for bfloat16, 2⁻⁹ for float16), which cover the rounding of P and of both
  outputs."""
  return 2.0 * float(jnp.finfo(dtype).eps)


def value_bound(k_cache, block_table, cache_seqlens, head_dim_v: int = HEAD_DIM_V):
  """`[b, head_dim_v]` float32: per row and column, the largest |V| among the keys the row can
  see (its first `cache_seqlens[i]` tokens on valid pages); 0 for a row with none. The `scale`
  of `compare` for live data, broadcast over `[b, s_q, h_q, head_dim_v]` as `bound[:, None,
  None]`. An FP8 cache is read as its dequantized values. Runs under `jax.jit`."""
  num_blocks, page_size = k_cache.shape[:2]
  b, max_blocks = block_table.shape
  page_ok = (block_table >= 0) & (block_table < num_blocks)
  v = jnp.take(k_cache, jnp.clip(block_table, 0, num_blocks - 1), axis=0)
  v = (dequantize_kv(v) if is_fp8_cache(k_cache) else v)[..., :head_dim_v]
  v = jnp.abs(v.astype(jnp.float32)).reshape(b, max_blocks * page_size, -1, head_dim_v)
  pos = jnp.arange(max_blocks * page_size)
  lens = jnp.clip(cache_seqlens, 0, max_blocks * page_size)
  ok = (pos[None] < lens[:, None]) & jnp.repeat(page_ok, page_size, axis=1)
  v = jnp.where(ok[:, :, None, None], v, 0.0)  # also hides NaN in unused slots
  return jnp.max(v, axis=(1, 2))


def compare(got, want, *, abs_tol: float, rel_tol: float, cos_tol: float, scale=None,
            scale_tol: float = 0.0) -> Comparison:
  """FlashMLA's comparison of `got` with `want` (same shape); see the module docstring.

  NumPy inputs are compared in float64 and give NumPy scalars; anything else (JAX arrays,
  tracers) in float32 with `jax.numpy`, so it works under `jax.jit`. With `scale` (an array
  broadcastable to the shape, e.g. from `value_bound`), an element within `scale_tol * scale`
  also passes.
  """
  if isinstance(got, np.ndarray) and isinstance(want, np.ndarray):
    xp, dtype = np, np.float64
  else:
    xp, dtype = jnp, jnp.float32
  got = xp.asarray(got).astype(dtype)
  want = xp.asarray(want).astype(dtype)
  if got.shape != want.shape:
    raise ValueError(f"compare: shapes differ, got {got.shape} want {want.shape}")
  nan = xp.count_nonzero(xp.isnan(got) != xp.isnan(want))
  posinf = xp.count_nonzero(xp.isposinf(got) != xp.isposinf(want))
  neginf = xp.count_nonzero(xp.isneginf(got) != xp.isneginf(want))
  finite = xp.isfinite(want)
  # Masked with where (not by indexing) so shapes stay static; a non-finite `got` at a finite
  # `want` is caught by the position counts above.
  g = xp.where(finite & xp.isfinite(got), got, 0).reshape(-1)
  w = xp.where(finite, want, 0).reshape(-1)
  err = xp.abs(g - w)
  ok = ~finite.reshape(-1) | (err <= abs_tol) | (err <= rel_tol * xp.abs(w))
  if scale is not None:
    bound = xp.broadcast_to(xp.asarray(scale).astype(dtype), want.shape).reshape(-1)
    ok = ok | (err <= scale_tol * bound)
  out_of_tolerance = xp.count_nonzero(~ok)
  if got.size:
    worst = xp.where(out_of_tolerance > 0, xp.argmax(xp.where(ok, 0, err)), xp.argmax(err))
    worst_got, worst_want = got.reshape(-1)[worst], want.reshape(-1)[worst]
  else:
    worst, worst_got, worst_want = (xp.asarray(0), xp.asarray(0, dtype), xp.asarray(0, dtype))
  denom = xp.sum(g * g + w * w)
  cos_diff = xp.where(denom > 0, xp.sum((g - w) ** 2) / xp.where(denom > 0, denom, 1), 0)
  passed = nan + posinf + neginf + out_of_tolerance == 0
  if cos_tol:
    passed = passed & (cos_diff <= cos_tol)
  return Comparison(passed=passed, nan=nan, posinf=posinf, neginf=neginf,
                    out_of_tolerance=out_of_tolerance, worst=worst, worst_got=worst_got,
                    worst_want=worst_want, cos_diff=cos_diff)


def assert_close(name: str, got, want, *, abs_tol: float, rel_tol: float, cos_tol: float):
  """`compare` on the host (float64), raising AssertionError with the failing positions."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  report = compare(got, want, abs_tol=abs_tol, rel_tol=rel_tol, cos_tol=cos_tol)
  for kind, fn, count in (("nan", np.isnan, report.nan), ("+inf", np.isposinf, report.posinf),
                          ("-inf", np.isneginf, report.neginf)):
    if count:
      mismatch = fn(got) != fn(want)
      raise AssertionError(
          f"{name}: {kind} positions differ at {np.argwhere(mismatch)[:5].tolist()} "
          f"(got {got[mismatch][:5]}, want {want[mismatch][:5]})")
  if report.out_of_tolerance:
    raise AssertionError(
        f"{name}: {int(report.out_of_tolerance)} of {int(np.isfinite(want).sum())} elements out "
        f"of tolerance; worst got {report.worst_got!r} want {report.worst_want!r} (abs {abs_tol}, "
        f"rel {rel_tol})")
  if cos_tol:
    assert report.cos_diff <= cos_tol, (
        f"{name}: cosine difference {report.cos_diff:.3g} > {cos_tol}")
