"""Test data and the independent float64 oracle shared by the CPU and GPU tiers.

Cases follow FlashMLA's tests: q and K ~ N(0, 1)/10 clipped to [-1, 1], varlen lengths ~ N(L, L/2)
clipped at >= s_q, randomly permuted page tables, NaN in every cache slot past a row's length and
in every page no row uses, and block-table entries past a row's last page set to a huge invalid id.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

# The tolerances (DESIGN.md §4) and FlashMLA's comparison live in the package, where
# benchmarks/soak.py uses the same ones on the device.
from jax_flashmla.testing import LSE_TOL, OUT_TOL  # noqa: F401
from jax_flashmla.testing import assert_close as check_close

PAGE = 64
D = 576
DV = 512
INVALID_PAGE = 2147480000


@dataclasses.dataclass
class Case:
  q: np.ndarray            # [b, s_q, h_q, 576] bfloat16
  k_cache: np.ndarray      # [num_blocks, 64, h_kv, 576] bfloat16
  block_table: np.ndarray  # [b, max_blocks] int32
  cache_seqlens: np.ndarray  # [b] int32
  causal: bool
  softmax_scale: float

  def args(self):
    return (jnp.asarray(self.q), jnp.asarray(self.k_cache), jnp.asarray(self.block_table),
            jnp.asarray(self.cache_seqlens))


def make_case(rng: np.random.Generator, b: int, s_q: int, mean_len: int, h_q: int, h_kv: int,
              *, varlen: bool = True, causal: bool = False, zero_rows: float = 0.0,
              softmax_scale: float | None = None, spare_pages: int = 3,
              dtype=ml_dtypes.bfloat16) -> Case:
  if varlen:
    lens = rng.normal(mean_len, mean_len / 2, size=b).round().astype(np.int64)
    lens = np.maximum(lens, s_q)
  else:
    lens = np.full(b, mean_len, np.int64)
  if zero_rows:
    lens[rng.random(b) < zero_rows] = 0
  pages = -(-lens // PAGE)
  max_blocks = max(1, int(pages.max()))
  num_blocks = int(pages.sum()) + spare_pages
  perm = rng.permutation(num_blocks).astype(np.int32)
  block_table = np.full((b, max_blocks), INVALID_PAGE, np.int32)
  starts = np.concatenate([[0], np.cumsum(pages)])
  for i in range(b):
    block_table[i, : pages[i]] = perm[starts[i]: starts[i + 1]]

  def rand(shape):
    return np.clip(rng.standard_normal(shape, dtype=np.float32) / 10, -1, 1)

  q = rand((b, s_q, h_q, D)).astype(dtype)
  k = rand((num_blocks, PAGE, h_kv, D))
  k[perm[starts[-1]:]] = np.nan  # pages no row uses
  for i in range(b):  # slots past each row's length in its last page
    if lens[i] % PAGE:
      k[block_table[i, pages[i] - 1], lens[i] % PAGE:] = np.nan
  return Case(q, k.astype(dtype), block_table, lens.astype(np.int32), causal,
              D**-0.5 if softmax_scale is None else softmax_scale)


def oracle(case: Case) -> tuple[np.ndarray, np.ndarray]:
  """float64 paged MQA decode, written from docs/design.md#numerics-contract (a loop over rows)."""
  q = case.q.astype(np.float64)
  k = case.k_cache.astype(np.float64)
  b, s_q, h_q, _ = q.shape
  num_blocks, _, h_kv, _ = k.shape
  g = h_q // h_kv
  max_blocks = case.block_table.shape[1]
  out = np.zeros((b, s_q, h_q, DV))
  lse = np.full((b, h_q, s_q), np.inf)
  for i in range(b):
    n = int(np.clip(case.cache_seqlens[i], 0, max_blocks * PAGE))
    ids = case.block_table[i, : -(-n // PAGE)]
    keys = np.zeros((n, h_kv, D))
    valid = np.zeros(n, bool)
    for j, page in enumerate(ids):
      lo, hi = j * PAGE, min(n, (j + 1) * PAGE)
      if 0 <= page < num_blocks:
        keys[lo:hi] = k[page, : hi - lo]
        valid[lo:hi] = True
    visible = np.broadcast_to(valid, (s_q, n)).copy()  # [s_q, n]
    if case.causal and s_q > 1:
      for s in range(s_q):
        visible[s, max(0, n - s_q + s + 1):] = False
    qi = q[i].reshape(s_q, h_kv, g, D)
    scores = np.einsum("shgd,nhd->shgn", qi, np.where(valid[:, None, None], keys, 0))
    scores = np.where(visible[:, None, None, :], scores * case.softmax_scale, -np.inf)
    m = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = ~np.isneginf(m)  # NaN in a row's own keys propagates, as in the reference
    p = np.exp(scores - np.where(seen, m, 0))
    l = p.sum(axis=-1, keepdims=True)
    o = np.einsum("shgn,nhv->shgv", p, np.where(valid[:, None, None], keys[..., :DV], 0))
    o = np.where(seen, o / np.where(seen, l, 1), 0)
    out[i] = o.reshape(s_q, h_q, DV)
    lse_i = np.where(seen[..., 0], np.log(np.where(seen[..., 0], l[..., 0], 1)) + m[..., 0],
                     np.inf)
    lse[i] = lse_i.reshape(s_q, h_q).T
  return out, lse


def check_decode(out, lse, want_out, want_lse):
  check_close("out", np.asarray(out, np.float32), want_out, **OUT_TOL)
  check_close("lse", lse, want_lse, **LSE_TOL)


# ------------------------------------------------------------------------------------------------
# The FP8 cache (jax_flashmla/quantization.py), built here independently in NumPy: the scale's
# exponent from the float32 bits, the rounding by ml_dtypes, the bytes by NumPy views.
# ------------------------------------------------------------------------------------------------

FP8_ROW = 656


def np_pow2_scale(amax: np.ndarray) -> np.ndarray:
  """2^ceil(log2(max(amax / 448, 1e-4))), from the bits of the float32 quotient."""
  r = np.maximum(amax.astype(np.float32) / np.float32(448.0), np.float32(1e-4))
  bits = r.view(np.uint32)
  exponent = ((bits >> 23) & 0xFF).astype(np.int64) - 127  # r is normal: >= 1e-4
  exponent += (bits & 0x7FFFFF) != 0  # not a power of two: round up
  return np.ldexp(np.float32(1.0), exponent).astype(np.float32)


def np_quantize(rows) -> np.ndarray:
  """[..., 576] bfloat16 (finite) -> [..., 656] uint8 in the V3.2 layout."""
  x = np.asarray(rows).astype(ml_dtypes.bfloat16)
  lead = x.shape[:-1]
  lat = x[..., :DV].astype(np.float32).reshape(lead + (4, 128))
  scale = np_pow2_scale(np.abs(lat).max(axis=-1))
  codes = (lat / scale[..., None]).astype(ml_dtypes.float8_e4m3fn)
  out = np.empty(lead + (FP8_ROW,), np.uint8)
  out[..., :512] = codes.view(np.uint8).reshape(lead + (512,))
  out[..., 512:528] = scale.astype("<f4").view(np.uint8).reshape(lead + (16,))
  out[..., 528:] = np.ascontiguousarray(x[..., DV:]).view(np.uint8).reshape(lead + (128,))
  return out


def np_dequantize(b: np.ndarray) -> np.ndarray:
  """[..., 656] uint8 -> [..., 576] float64 (exactly the bf16 values the format stores)."""
  b = np.ascontiguousarray(b)
  lead = b.shape[:-1]
  with np.errstate(invalid="ignore"):  # garbage slots hold NaN codes and scales
    codes = b[..., :512].view(ml_dtypes.float8_e4m3fn).astype(np.float64).reshape(
        lead + (4, 128))
    scale = np.ascontiguousarray(b[..., 512:528]).view("<f4").astype(np.float64)
    rope = np.ascontiguousarray(b[..., 528:]).view(ml_dtypes.bfloat16).astype(np.float64)
  return np.concatenate([(codes * scale[..., None]).reshape(lead + (512,)), rope], axis=-1)


def fp8_case(case: Case, seed: int = 0) -> tuple[np.ndarray, Case]:
  """The case's cache in FP8, and the same case over the dequantized cache (for the oracle).

  Slots past a row's length keep the case's NaN poison as garbage bytes: NaN codes (0x7F/0xFF)
  and NaN scales; pages no row uses get random bytes.
  """
  k = np.asarray(case.k_cache)
  finite = np.isfinite(k.astype(np.float32))
  k8 = np_quantize(np.where(finite, k, 0).astype(ml_dtypes.bfloat16))
  slot_dead = ~finite.all(axis=-1)  # [num_blocks, 64, h_kv]
  rng = np.random.default_rng(seed)
  garbage = rng.integers(0, 256, k8.shape, dtype=np.uint8)
  garbage[..., :512:7] = 0x7F  # NaN codes
  garbage[..., 512:528] = np.frombuffer(np.full(4, np.nan, "<f4").tobytes(), np.uint8)[None]
  k8 = np.where(slot_dead[..., None], garbage, k8)
  deq = np_dequantize(k8).astype(ml_dtypes.bfloat16)  # exact: the values are bf16
  return k8, dataclasses.replace(case, k_cache=deq)
