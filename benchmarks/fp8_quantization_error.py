#!/usr/bin/env python3
"""How much the FP8 cache changes attention: random and outlier-heavy rows (runs on the CPU).

    python3 -P benchmarks/fp8_quantization_error.py

For each kind of row, 4096 cache rows (64 pages) are stored in bf16 and in FP8 (`quantize_kv`),
and one decode row (16 heads, q ~ N(0, 1)/10, softmax scale 192^-0.5) attends to all of them
through the pure-JAX path, once per cache. Printed: the latent values' relative error (Frobenius),
the fraction of non-zero latent values that FP8 flushes to zero, and the attention output's
relative error, cosine difference and largest lse difference. Row kinds:
  normal    N(0, 1);
  outliers  N(0, 1) with 0.3% of the values multiplied by 100-1000 (scattered outliers);
  channel   N(0, 1) with 8 of the 512 latent channels 30x larger in every token.
"""
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_flashmla as jfm


def rows(rng, kind, n=4096):
  x = rng.standard_normal((n, 576)).astype(np.float32)
  if kind == "outliers":
    x = np.where(rng.random(x.shape) < 0.003, x * rng.uniform(1e2, 1e3, x.shape), x)
  elif kind == "channel":
    x[:, rng.choice(512, 8, replace=False)] *= 30
  return x.astype(ml_dtypes.bfloat16)


def main():
  rng = np.random.default_rng(0)
  print(f"{'rows':9s} {'latent rel err':>14s} {'flushed to 0':>12s} {'out rel err':>11s} "
        f"{'cos diff':>9s} {'lse max|d|':>10s}")
  for kind in ("normal", "outliers", "channel"):
    x = rows(rng, kind)
    fp8 = jfm.quantize_kv(jnp.asarray(x))
    y = np.asarray(jfm.dequantize_kv(fp8)).astype(np.float64)[:, :512]
    xf = x.astype(np.float64)[:, :512]
    rel = np.linalg.norm(y - xf) / np.linalg.norm(xf)
    flushed = np.mean((y == 0) & (xf != 0))
    q = jnp.asarray((rng.standard_normal((1, 1, 16, 576)) / 10).astype(ml_dtypes.bfloat16))
    bt = jnp.arange(64, dtype=jnp.int32)[None]
    lens = jnp.asarray([4096], jnp.int32)
    (o16, l16), (o8, l8) = [jfm.flash_mla_with_kvcache(q, k, bt, lens, softmax_scale=192**-0.5,
                                                       implementation="xla")
                            for k in (jnp.asarray(x).reshape(64, 64, 1, 576),
                                      fp8.reshape(64, 64, 1, 656))]
    o16, o8 = np.asarray(o16, np.float64).ravel(), np.asarray(o8, np.float64).ravel()
    out_rel = np.linalg.norm(o8 - o16) / np.linalg.norm(o16)
    cos = 1 - o8 @ o16 / np.linalg.norm(o8) / np.linalg.norm(o16)
    lse = float(np.max(np.abs(np.asarray(l8) - np.asarray(l16))))
    print(f"{kind:9s} {rel:14.3e} {flushed:12.2%} {out_rel:11.3e} {cos:9.2e} {lse:10.2e}")


if __name__ == "__main__":
  main()
