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
