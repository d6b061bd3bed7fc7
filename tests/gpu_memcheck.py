"""Hostile-value cases for compute-sanitizer (not a pytest module; run it under the sanitizer):

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck \
        --kernel-name regex:'decode|combine|sched' python3 -P tests/gpu_memcheck.py

The platform allocator gives every buffer its own allocation, so an out-of-bounds access is not
hidden inside XLA's memory pool. Exits non-zero if a kept row differs from the reference.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jax_flashmla  # noqa: E402
from mla_cases import check_decode, make_case  # noqa: E402


def run(case, **kw):
  def fn(*a):
    return (jax_flashmla.flash_mla_with_kvcache(*a, causal=case.causal, implementation="cuda",
                                                **kw),
            jax_flashmla.flash_mla_with_kvcache(*a, causal=case.causal, implementation="xla"))
  (out, lse), (ref_out, ref_lse) = jax.jit(fn)(*case.args())
  return [np.asarray(x, np.float32) for x in (out, lse, ref_out, ref_lse)]


def main():
  rng = np.random.default_rng(0)
  case = make_case(rng, 8, 2, 300, 16, 1, causal=True, zero_rows=0.2)
  case.cache_seqlens[1] = 2**31 - 1
  case.cache_seqlens[2] = -7
  case.block_table[3, 0] = -1
  case.block_table[4, 1] = case.k_cache.shape[0]
  case.block_table[5, 2] = 2**31 - 1
  rows = [0, 2, 3, 4, 5, 6, 7]
  for kw in ({}, {"num_sms": 1}, {"num_sms": 1000}):
    out, lse, ref_out, ref_lse = run(case, **kw)
    check_decode(out[rows], lse[rows], ref_out[rows], ref_lse[rows])
  big = make_case(rng, 64, 1, 2000, 128, 1, zero_rows=0.3)
  check_decode(*run(big))
  print("memcheck cases ok")


if __name__ == "__main__":
  main()
