#!/usr/bin/env python3
"""Token-sparse decode beside FlashMLA's sparse FP8 decode, on one GPU, in one process.

    python3 -P benchmarks/sparse_side_by_side.py            # the issue's rows (below)
    python3 -P benchmarks/sparse_side_by_side.py --case 128:2:128:2048:32768 --no-flashmla

Needs torch and FlashMLA's `flash_mla` package (the shared kit builds it, ../shared/anchors/
flashmla) for the FlashMLA column and the cross-check; `--no-flashmla` runs ours alone.

Per case b:s_q:h_q:topk:L: an FP8 cache (`quantize_kv` of random rows) of b requests of L
tokens each in 64-token pages, pages permuted; for every (request, query token) `topk` distinct
tokens of its own request, drawn at random, as `page * 64 + offset`. Ours is timed by the
per-call slope of a jitted program of --layers sparse decode calls (the kit's method; the
scheduler records built once per program, `get_sparse_mla_metadata`, and passed to every call;
`--per-call-metadata` builds them inside each call), FlashMLA by CUDA-graph replay of one call
with its metadata built once. FLOP are counted as FlashMLA counts them: 2 * h_q * b * s_q * topk *
(576 + 512). The two outputs are compared on every case (FlashMLA's tolerances: out max-abs
2e-2 at these magnitudes, lse 1e-3).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm
from jax_flashmla.sparse import flash_mla_sparse_decode, get_sparse_mla_metadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with -P: the sibling module
from flashmla_anchor import graph_seconds, load, slope_seconds, to_torch  # noqa: E402

DEFAULT_CASES = [  # issue 22: V3.2 serving shapes, the peak shapes, h_q = 64 at s_q = 1
    "2:2:128:2048:32768", "64:2:128:2048:32768", "74:2:128:2048:32768", "128:2:128:2048:32768",
    "148:2:64:16384:32768", "148:2:128:16384:32768", "128:1:64:2048:32768",
]


def inputs(b, s_q, h_q, topk, length, seed=0):
  """q, the FP8 cache and the indices of one case (all on the default device)."""
  pages = -(-length // 64)
  kq, kr, kp, ki = jax.random.split(jax.random.key(seed), 4)
  q = (jax.random.normal(kq, (b, s_q, h_q, 576), jnp.float32) / 4).astype(jnp.bfloat16)

  @jax.jit
  def cache(k):
    rows = jax.random.normal(k, (b * pages, 64, 1, 576), jnp.bfloat16) / 4
    return jfm.quantize_kv(rows)

  k8 = cache(kr)
  page_of = jax.random.permutation(kp, b * pages).reshape(b, pages)

  @jax.jit
  def pick(k):  # topk distinct tokens of each request, for each of its query tokens
    keys = jax.random.uniform(k, (b, s_q, length))
    tok = jnp.argsort(keys, axis=-1)[..., :topk].astype(jnp.int32)
    page = jnp.take_along_axis(page_of[:, None, :], tok // 64, axis=-1)
    return page * 64 + tok % 64

  return q, k8, pick(ki)


def slope_time(q, k8, idx, layers, per_call):
  """Per-call seconds of ours: slope between two counts of a jitted --layers program; the
  scheduler records built once per program and shared by its layers, as a serving step does
  (per_call: inside every call instead)."""
  b, s_q, h_q, _ = q.shape
  qs = jnp.stack([q] * layers)

  def program(qs, k8, idx):
    md = None if per_call else get_sparse_mla_metadata(s_q=s_q, h_q=h_q, topk=idx.shape[2],
                                                       batch=b)
    return tuple(flash_mla_sparse_decode(qs[i], k8, idx, metadata=md)[0] for i in range(layers))

  return slope_seconds(jax.jit(program), (qs, k8, idx), layers)


def run_case(spec, layers, anchor, per_call=False):
  b, s_q, h_q, topk, length = map(int, spec.split(":"))
  q, k8, idx = inputs(b, s_q, h_q, topk, length)
  flop = 2 * h_q * b * s_q * topk * (576 + 512)
  r = dict(name=spec, b=b, s_q=s_q, h_q=h_q, topk=topk, length=length)
  t = slope_time(q, k8, idx, layers, per_call)
  r.update(ours_us=t * 1e6, ours_tflops=flop / t / 1e12)
  if anchor is not None:
    torch, flash_mla = anchor
    qt, it = to_torch(torch, q), to_torch(torch, idx)
    kt = to_torch(torch, k8).view(torch.float8_e4m3fn)
    meta, _ = flash_mla.get_mla_metadata()
    call = lambda: flash_mla.flash_mla_with_kvcache(qt, kt, None, None, 512, meta, None,
                                                    is_fp8_kvcache=True, indices=it)
    o_fm, l_fm = call()
    t_fm = graph_seconds(torch, call)
    o, l = jax.jit(flash_mla_sparse_decode)(q, k8, idx)
    oa, ob = np.asarray(o, np.float32), o_fm.float().cpu().numpy()
    la = np.asarray(l, np.float32)
    lb = l_fm.float().cpu().numpy().reshape(la.shape)
    r.update(flashmla_us=t_fm * 1e6, flashmla_tflops=flop / t_fm / 1e12,
             ours_over_flashmla=t_fm / t, out_max_abs=float(np.max(np.abs(oa - ob))),
             lse_max_abs=float(np.max(np.abs(la - lb))))
    r["agree"] = bool(np.isfinite(oa).all() and r["out_max_abs"] < 2e-2
                      and r["lse_max_abs"] < 1e-3)
  return r


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--case", action="append", default=[], help="b:s_q:h_q:topk:L")
  ap.add_argument("--layers", type=int, default=20)
  ap.add_argument("--no-flashmla", action="store_true")
  ap.add_argument("--per-call-metadata", action="store_true",
                  help="build the scheduler records inside every call (no metadata=)")
  ap.add_argument("--json", default="sparse_side_by_side.json")
  a = ap.parse_args()
  anchor = None
  if not a.no_flashmla:
    anchor, reason = load()
    if anchor is None:
      ap.error(f"{reason} (or pass --no-flashmla)")
  out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=[])
  print(f"{'case b:s_q:h_q:topk:L':24s} {'ours us':>8s} {'FM us':>8s} {'ours TF':>8s} "
        f"{'FM TF':>7s} {'ours/FM':>7s}  same answer")
  for spec in a.case or DEFAULT_CASES:
    r = run_case(spec, a.layers, anchor, a.per_call_metadata)
    nan = float("nan")
    same = "-" if anchor is None else (
        f"{'yes' if r['agree'] else 'NO'} (out {r['out_max_abs']:.2g}, lse {r['lse_max_abs']:.2g})")
    print(f"{spec:24s} {r['ours_us']:8.1f} {r.get('flashmla_us', nan):8.1f} "
          f"{r['ours_tflops']:8.1f} {r.get('flashmla_tflops', nan):7.1f} "
          f"{r.get('ours_over_flashmla', nan):7.3f}  {same}", flush=True)
    out["rows"].append(r)
    json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
  main()
