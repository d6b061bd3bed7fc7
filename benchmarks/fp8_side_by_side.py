#!/usr/bin/env python3
"""The FP8 cache beside the BF16 cache and beside FlashMLA, on one GPU, in one process.

    python3 benchmarks/fp8_side_by_side.py                 # the issue's rows (below)
    python3 benchmarks/fp8_side_by_side.py --case 128:1:16:normal:8192 --no-flashmla

Needs torch and FlashMLA's `flash_mla` package (the shared kit builds it, ../shared/anchors/
flashmla) for the FlashMLA columns and the cross-check; `--no-flashmla` runs ours alone.

Per case (b:s_q:h_q:LENGTHS[:causal], LENGTHS = fixed:L | normal:L (N(L, L/2)) | uniform:LO:HI):
  - one bf16 cache of random rows (unused slots NaN), and its FP8 twin `quantize_kv(rows)`;
  - ours on the FP8 cache and on the bf16 cache, each timed by the per-call slope of a jitted
    program of --layers decode calls (the kit's method), and FlashMLA's dense bf16 decode on the
    same bf16 rows by CUDA-graph replay;
  - bytes counted as FlashMLA counts them, with 656 bytes per token for FP8 and 1152 for bf16.
Cross-checks (--check, default on): ours on the FP8 cache against ours on the dequantized cache
(the bf16 kernels on `dequantize_kv(fp8)`, which must agree to rounding), and, for h_q in
{64, 128} without causal, against FlashMLA's sparse FP8 decode given every token of each row as
its index list: the same attention over the same bytes. Tolerances are FlashMLA's (out max-abs
2e-2 at these magnitudes, lse 1e-3); the json keeps the measured figures.
"""
import argparse
import json
import math
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with -P: the sibling module
from flashmla_anchor import dense_decode_seconds, load, slope_seconds, to_torch  # noqa: E402

DEFAULT_CASES = [  # the memory-bound rows, then its compute corner
    "128:1:16:normal:8192", "128:1:16:normal:16384", "128:1:16:normal:32768",
    "128:2:128:normal:4096", "128:2:128:normal:8192",
    "128:1:64:normal:8192",
]
CROSS_CASES = ["8:1:64:uniform:1:2048", "8:2:128:uniform:1:2048", "32:1:128:normal:1024"]


def lengths(spec, b, rng):
  kind, *a = spec.split(":")
  if kind == "fixed":
    return np.full(b, int(a[0]), np.int32)
  if kind == "normal":
    return np.maximum(rng.normal(int(a[0]), int(a[0]) / 2, b), 1).astype(np.int32)
  if kind == "uniform":
    return rng.integers(int(a[0]), int(a[1]) + 1, b).astype(np.int32)
  raise SystemExit(f"unknown lengths {spec}")


def parse(case, rng):
  p = case.split(":")
  causal = p[-1] == "causal"
  if causal:
    p = p[:-1]
  b, s_q, h_q = map(int, p[:3])
  return dict(name=case, seqlens=lengths(":".join(p[3:]), b, rng), s_q=s_q, h_q=h_q,
              causal=causal)


def inputs(c, seed=0):
  """q, the bf16 cache (slots past each length NaN), its FP8 twin, block table, lengths."""
  sl, s_q, h_q = c["seqlens"], c["s_q"], c["h_q"]
  b = len(sl)
  nblk = max(1, math.ceil(int(sl.max()) / 64))
  rng = np.random.default_rng(seed)
  bt = rng.permutation(b * nblk).astype(np.int32).reshape(b, nblk)
  kq, kk = jax.random.split(jax.random.key(seed))
  q = (jax.random.normal(kq, (b, s_q, h_q, 576), jnp.float32) / 4).astype(jnp.bfloat16)
  rows = jax.random.normal(kk, (b * nblk, 64, 1, 576), jnp.bfloat16) / 4
  # every slot past its row's length is NaN, in both caches
  dead = np.ones((b * nblk, 64), bool)
  for i in range(b):
    for j in range(nblk):
      n = min(max(int(sl[i]) - 64 * j, 0), 64)
      dead[bt[i, j], :n] = False
  rows = jnp.where(jnp.asarray(dead)[:, :, None, None], jnp.nan, rows).astype(jnp.bfloat16)
  fp8 = jax.jit(jfm.quantize_kv)(rows)
  return q, rows, fp8, jnp.asarray(bt), jnp.asarray(sl)


def slope_time(q, cache, bt, sl, md, causal, layers):
  """Per-call seconds of ours: slope between two counts of a jitted --layers program."""
  qs = jnp.stack([q] * layers)
  f = jax.jit(lambda qs, kc, bt, sl, md: tuple(
      jfm.flash_mla_with_kvcache(qs[i], kc, bt, sl, 512, md, causal=causal)[0]
      for i in range(layers)))
  return slope_seconds(f, (qs, cache, bt, sl, md), layers)


def agree(o_a, l_a, o_b, l_b):
  oa, ob = np.asarray(o_a, np.float32), np.asarray(o_b, np.float32)
  la, lb = np.asarray(l_a, np.float32), np.asarray(l_b, np.float32)
  fin = np.isfinite(lb)
  return dict(out_max_abs=float(np.max(np.abs(oa - ob))), out_finite=bool(np.isfinite(oa).all()),
              lse_inf_same=bool(np.array_equal(np.isinf(la), np.isinf(lb))),
              lse_max_abs=float(np.max(np.abs(la[fin] - lb[fin]))) if fin.any() else 0.0)


def ok(r):
  return (r["out_finite"] and r["lse_inf_same"] and r["out_max_abs"] < 2e-2
          and r["lse_max_abs"] < 1e-3)


def run_case(c, layers, torch, flash_mla, check):
  q, rows, fp8, bt, sl = inputs(c)
  s_q, h_q, causal = c["s_q"], c["h_q"], c["causal"]
  b = len(c["seqlens"])
  md = jax.jit(lambda s: jfm.get_mla_metadata(s, s_q * h_q, 1))(sl)
  r = dict(name=c["name"], b=b, s_q=s_q, h_q=h_q, causal=causal,
           mean_len=float(c["seqlens"].mean()))
  if check:
    dec = jax.jit(lambda q, kc, bt, sl, md: jfm.flash_mla_with_kvcache(q, kc, bt, sl, 512, md,
                                                                       causal=causal))
    o8, l8 = dec(q, fp8, bt, sl, md)
    od, ld = dec(q, jax.jit(jfm.dequantize_kv)(fp8), bt, sl, md)
    r["vs_dequantized_bf16"] = agree(o8, l8, od, ld)
  t8 = slope_time(q, fp8, bt, sl, md, causal, layers)
  t16 = slope_time(q, rows, bt, sl, md, causal, layers)
  m = r["mean_len"]
  flop = b * h_q * s_q * 2 * (576 + 512) * m
  io = b * (s_q * h_q * 576 * 2 + s_q * h_q * 512 * 2)
  r.update(fp8_us=t8 * 1e6, bf16_us=t16 * 1e6, fp8_over_bf16=t16 / t8,
           fp8_tbps=(io + b * m * 656) / t8 / 1e12, bf16_tbps=(io + b * m * 1152) / t16 / 1e12,
           fp8_tflops=flop / t8 / 1e12)
  if flash_mla is not None:
    t_fm = dense_decode_seconds((torch, flash_mla), q, rows, bt, sl, causal)
    r.update(flashmla_bf16_us=t_fm * 1e6, fp8_over_flashmla=t_fm / t8)
  return r


def cross_check(c, torch, flash_mla):
  """Ours on the FP8 cache against FlashMLA's sparse FP8 decode with all tokens as indices."""
  q, rows, fp8, bt, sl = inputs(c, seed=1)
  s_q, h_q = c["s_q"], c["h_q"]
  seqlens = c["seqlens"]
  b = len(seqlens)
  topk = max(64, math.ceil(int(seqlens.max()) / 64) * 64)
  bt_np = np.asarray(bt)
  idx = np.full((b, s_q, topk), -1, np.int32)
  for i in range(b):
    t = np.arange(int(seqlens[i]))
    idx[i, :, :len(t)] = bt_np[i, t // 64] * 64 + t % 64
  md = jax.jit(lambda s: jfm.get_mla_metadata(s, s_q * h_q, 1))(sl)
  o, l = jax.jit(lambda q, kc, bt, sl, md: jfm.flash_mla_with_kvcache(q, kc, bt, sl, 512, md))(
      q, fp8, bt, sl, md)
  meta, _ = flash_mla.get_mla_metadata()
  kt = to_torch(torch, fp8).view(torch.float8_e4m3fn)
  o_fm, l_fm = flash_mla.flash_mla_with_kvcache(
      to_torch(torch, q), kt, None, None, 512, meta, None, is_fp8_kvcache=True,
      indices=torch.from_numpy(idx).cuda())
  torch.cuda.synchronize()
  l_fm = l_fm.float().cpu().numpy().reshape(np.asarray(l).shape)
  r = dict(name=c["name"], b=b, s_q=s_q, h_q=h_q, topk=topk)
  r.update(agree(o.astype(jnp.float32), l, o_fm.float().cpu().numpy(), l_fm))
  return r


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--case", action="append", default=[])
  ap.add_argument("--layers", type=int, default=20)
  ap.add_argument("--no-flashmla", action="store_true")
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--json", default="fp8_side_by_side.json")
  a = ap.parse_args()
  torch = flash_mla = None
  if not a.no_flashmla:
    anchor, reason = load()
    if anchor is None:
      ap.error(f"{reason} (or pass --no-flashmla)")
    torch, flash_mla = anchor
  rng = np.random.default_rng(0)
  cases = [parse(c, rng) for c in (a.case or DEFAULT_CASES)]
  out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=[], cross=[])
  print(f"{'case':28s} {'fp8 us':>8s} {'bf16 us':>8s} {'FM bf16':>8s} {'fp8/bf16':>8s} "
        f"{'fp8/FM':>7s} {'fp8 TB/s':>8s} {'bf16 TB/s':>9s}  fp8 = dequantized bf16")
  for c in cases:
    r = run_case(c, a.layers, torch, flash_mla, not a.no_check)
    chk = "-" if a.no_check else ("yes" if ok(r["vs_dequantized_bf16"]) else
                                  f"NO {r['vs_dequantized_bf16']}")
    print(f"{r['name']:28s} {r['fp8_us']:8.1f} {r['bf16_us']:8.1f} "
          f"{r.get('flashmla_bf16_us', float('nan')):8.1f} {r['fp8_over_bf16']:8.3f} "
          f"{r.get('fp8_over_flashmla', float('nan')):7.3f} {r['fp8_tbps']:8.2f} "
          f"{r['bf16_tbps']:9.2f}  {chk}", flush=True)
    out["rows"].append(r)
    json.dump(out, open(a.json, "w"), indent=1)
  if flash_mla is not None and not a.no_check:
    print("cross-check against FlashMLA's sparse FP8 decode (all tokens as indices):")
    for spec in CROSS_CASES:
      try:
        r = cross_check(parse(spec, rng), torch, flash_mla)
      except Exception as e:  # e.g. a shape FlashMLA's sparse decode does not take on this GPU
        print(f"  {spec}: FlashMLA failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        out["cross"].append(dict(name=spec, error=f"{type(e).__name__}: {e}"))
        continue
      print(f"  {r['name']:28s} topk {r['topk']:5d}: out max|d| {r['out_max_abs']:.3g}, "
            f"lse max|d| {r['lse_max_abs']:.3g}, inf same {r['lse_inf_same']}: "
            f"{'agree' if ok(r) else 'DISAGREE'}", flush=True)
      out["cross"].append(r)
      json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
  main()
