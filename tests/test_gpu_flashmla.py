"""Opt-in GPU tier: our kernels against FlashMLA itself, on the same bytes, over every combination
of FlashMLA's dense-decode correctness dimensions (not a sample).

    JAX_FLASHMLA_AGAINST_FLASHMLA=1 PYTHONPATH=<the shared kit's flash_mla> \\
        python3 -P -m pytest -q -n 8 -m "gpu and flashmla" tests/test_gpu_flashmla.py

Run it once per kernel change and record the result in tests/GPU_RESULTS.md. FlashMLA's dense
sm90 decode takes bf16 with h_kv = 1; the grid is b x s_q x mean length x h_q x varlen x causal
(384 cases), with NaN in every unused slot and permuted page tables (mla_cases.make_case), and
FlashMLA's tolerances between the two.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from mla_cases import check_decode, make_case

pytestmark = [pytest.mark.gpu, pytest.mark.flashmla]

GRID = list(itertools.product((1, 2, 6, 64),        # b
                              (1, 2),               # s_q
                              (20, 140, 4096),      # mean length
                              (16, 32, 64, 128),    # h_q (h_kv = 1)
                              (False, True),        # varlen
                              (False, True)))       # causal


@pytest.mark.parametrize("b,s_q,mean_len,h_q,varlen,causal", GRID)
def test_kernels_match_flashmla(b, s_q, mean_len, h_q, varlen, causal):
  import flash_mla  # noqa: PLC0415
  import torch  # noqa: PLC0415

  rng = np.random.default_rng(hash((b, s_q, mean_len, h_q, varlen, causal)) % 2**32)
  case = make_case(rng, b, s_q, mean_len, h_q, 1, varlen=varlen, causal=causal)
  q, k, bt, lens = case.args()
  # FlashMLA reads only valid page ids: its table gets 0 where ours holds the invalid id (those
  # columns are past every row's pages, so neither reads them).
  bt_fm = jnp.where((bt >= 0) & (bt < k.shape[0]), bt, 0)
  out, lse = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
      *a, softmax_scale=case.softmax_scale, causal=causal, implementation="cuda"))(q, k, bt, lens)
  meta, _ = flash_mla.get_mla_metadata()
  t = lambda x: torch.from_dlpack(x)
  o_fm, l_fm = flash_mla.flash_mla_with_kvcache(t(q), t(k), t(bt_fm), t(lens), 512, meta, None,
                                                softmax_scale=case.softmax_scale, causal=causal)
  torch.cuda.synchronize()
  check_decode(out, lse, o_fm.float().cpu().numpy().astype(np.float64),
               l_fm.float().cpu().numpy().astype(np.float64))
