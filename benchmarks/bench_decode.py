"""Decode benchmark: jax_flashmla's kernel beside the plain-XLA path, counted per docs/design.md.

    python benchmarks/bench_decode.py                      # the grid
    python benchmarks/bench_decode.py --b 128 --s-q 1 --h-q 16 --len 8192   # one config
    python benchmarks/bench_decode.py --json out.json --plot out.png
    python benchmarks/bench_decode.py --devices 2 --b 256 --len 8192   # batch over two GPUs

With FlashMLA importable (PYTHONPATH=<the shared kit's flash_mla>, and torch), a FlashMLA column
times its dense decode on the same cache, block table and lengths (one call replayed in a CUDA
graph, flashmla_anchor.py) and `vs FM` = FlashMLA time / ours; `--implementations` without
`flashmla` leaves it out.

What is timed: one jitted program that runs the decode call `--layers` times, as the layers of a
model do: each "layer" has its own queries and its own block table (the same pages under another
permutation, so XLA cannot share the reference's page gather between layers), and all of them
reuse scheduler records computed once outside. A timed run calls that program `--steps` times in
a row and waits once for all results, as a decode loop does that dispatches step n+1 while step n
runs (so the host's launch work overlaps the GPU's; `--steps 1` waits for every program and
exposes it). Per-call time = run time / (steps * layers), combine kernel and launches included;
the figure is the median over `--repeats` timed runs after a warm-up run. With `--device-time`,
one more timed run under the JAX profiler gives the GPU time per call (first kernel start to last
kernel end, over steps * layers: the kernels and any gaps between them, without the first
program's launch and the host's final wait). `benchmarks/trace_decode.py` lists the kernels of one
config.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jax_flashmla

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with -P: the sibling module
import flashmla_anchor  # noqa: E402

PAGE = 64
HBM_TBPS = 4.8
PEAK_TFLOPS = 990.0


def make_inputs(key, b: int, mean_len: int, s_q: int, h_kv: int = 1, pools: int = 1):
  """Lengths ~ N(L, L/2) clipped at >= s_q, pages permuted at random within each pool.

  With `pools` > 1 the batch is that many groups of consecutive rows, each with its own pool of
  pages and pool-local ids (the `num_pools` convention of batch-parallel sharding); the pools are
  padded to one size and stacked on the page axis.
  """
  rng = np.random.default_rng(mean_len)
  lens = np.maximum(rng.normal(mean_len, mean_len / 2, b).round(), s_q).astype(np.int32)
  pages_per_row = -(-lens // PAGE)
  max_blocks = int(pages_per_row.max())
  groups = np.split(np.arange(b), pools)
  pool_pages = max(int(pages_per_row[g].sum()) for g in groups)
  block_table = np.zeros((b, max_blocks), np.int32)
  for g in groups:
    perm = rng.permutation(pool_pages)
    start = 0
    for i in g:
      block_table[i, :pages_per_row[i]] = perm[start:start + pages_per_row[i]]
      start += pages_per_row[i]
  k_cache = (jax.random.normal(key, (pools * pool_pages, PAGE, h_kv, 576), jnp.float32) /
             10).astype(jnp.bfloat16)
  return k_cache, jnp.asarray(block_table), jnp.asarray(lens), float(lens.mean())


def counts(b, s_q, h_q, h_kv, mean_len):
  flops = b * h_q * s_q * (2 * 576 * mean_len + 2 * 512 * mean_len)
  nbytes = b * (s_q * h_q * 576 * 2 + mean_len * h_kv * 576 * 2 + s_q * h_q * 512 * 2)
  return flops, nbytes


def layer_inputs(key, q_shape, block_table, num_pages: int, layers: int):
  """Per-layer queries, and per-layer block tables that map the same rows to the same pages
  under a random relabelling of page ids (ids stay pool-local when the pages are pooled)."""
  qs = [(jax.random.normal(jax.random.fold_in(key, i), q_shape) / 10).astype(jnp.bfloat16)
        for i in range(layers)]
  rng = np.random.default_rng(layers)
  bt = np.asarray(block_table)
  bts = [bt] + [rng.permutation(num_pages).astype(np.int32)[bt] for _ in range(layers - 1)]
  return qs, [jnp.asarray(t) for t in bts]


def trace_events(trace_dir):
  """The events of the perfetto trace that `jax.profiler.trace(create_perfetto_trace=True)` wrote
  (host and device events share one microsecond timeline)."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def gpu_kernel_events(trace_dir):
  """(name, start_us, dur_us) of every kernel on a GPU stream of a JAX perfetto trace."""
  events = trace_events(trace_dir)
  proc, thread = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      proc[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      thread[(e["pid"], e["tid"])] = e["args"]["name"]
  gpu_pids = {pid for pid, name in proc.items() if "gpu" in name.lower()}
  out = []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    if not thread.get((e["pid"], e["tid"]), "").lower().startswith("stream"):
      continue  # "XLA Ops" / "XLA Modules" lanes repeat the stream's work at a coarser grain
    out.append((e["name"], float(e["ts"]), float(e.get("dur", 0.0))))
  return sorted(out, key=lambda x: x[1])


def profiler_options():
  """GPU activity and annotations are all we read: no python tracer or HLO protos, which keeps
  the trace small (a 20-layer trace with them once passed protobuf's 2 GB limit)."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  options.enable_hlo_proto = False
  return options


def device_seconds(run, calls):
  """GPU time per call of one run of `run` under the profiler: first kernel start to last kernel
  end, over `calls` (the program's launch and the host's wait for it are not in it)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True, profiler_options=profiler_options()):
      run()
    events = gpu_kernel_events(d)
  if not events:
    return None
  return (max(t + dur for _, t, dur in events) - events[0][1]) * 1e-6 / calls


def layered_program(*, causal, implementation, pools=1):
  """The timed program: one decode call per layer, each with its own queries and block table,
  all with the same cache, lengths and scheduler records."""
  @jax.jit
  def model(qs, k_cache, block_tables, lens, md):
    return [jax_flashmla.flash_mla_with_kvcache(q, k_cache, bt, lens, metadata=md, causal=causal,
                                                implementation=implementation, num_pools=pools)
            for q, bt in zip(qs, block_tables)]
  return model


def time_decode(qs, k_cache, block_tables, lens, *, causal, implementation, repeats, steps=1,
                mesh=None, device_time=False):
  """(wall seconds, GPU seconds or None) per decode call of a jitted program of len(qs) layer
  calls, run `steps` times back to back per timed run. With a mesh: batch-parallel over its "dp"
  axis, one page pool per device, scheduler records computed per device inside each call (so they
  are timed too)."""
  s_q, h_q, h_kv = qs[0].shape[1], qs[0].shape[2], k_cache.shape[2]
  pools = 1
  if mesh is None:
    md = jax_flashmla.get_mla_metadata(lens, s_q * h_q // h_kv, h_kv,
                                       implementation=implementation)
  else:
    pools = mesh.size
    md = None
    split = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("dp")))
    qs, block_tables = [split(x) for x in qs], [split(x) for x in block_tables]
    k_cache, lens = split(k_cache), split(lens)

  model = layered_program(causal=causal, implementation=implementation, pools=pools)
  run = lambda: jax.block_until_ready(
      [model(qs, k_cache, block_tables, lens, md) for _ in range(steps)])
  run()  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append((time.perf_counter() - t0) / (steps * len(qs)))
  gpu = device_seconds(run, steps * len(qs)) if device_time else None
  return statistics.median(times), gpu


def grid(args):
  if args.len is not None:
    causal = [args.causal] if args.causal is not None else [False]
    return [(args.len, args.s_q, args.h_q, c) for c in causal]
  configs = []
  for mean_len, h_q in itertools.product((4096, 8192, 16384, 32768), (16, 64, 128)):
    configs.append((mean_len, 1, h_q, False))
    configs += [(mean_len, 2, h_q, False), (mean_len, 2, h_q, True)]
  return configs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--b", type=int, default=128)
  p.add_argument("--s-q", type=int, default=1)
  p.add_argument("--h-q", type=int, default=16)
  p.add_argument("--len", type=int, default=None, help="one mean length (default: the grid)")
  p.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
  p.add_argument("--implementations", default="cuda,xla,flashmla",
                 help="cuda (ours), xla (the pure-JAX path), flashmla (FlashMLA's dense decode, "
                      "when importable)")
  p.add_argument("--layers", type=int, default=20,
                 help="decode calls per timed program (the XLA reference runs a quarter)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=10,
                 help="program calls per timed run, dispatched back to back (a decode loop)")
  p.add_argument("--xla-max-len", type=int, default=32768,
                 help="skip the XLA reference above this mean length (its memory grows fast)")
  p.add_argument("--devices", type=int, default=1,
                 help="split the batch over this many local devices (batch-parallel, one page "
                      "pool per device); figures are then for all devices together")
  p.add_argument("--device-time", action="store_true",
                 help="also report GPU time per call from one profiled timed run (kernels and "
                      "the gaps between them, without the first launch and the host's wait)")
  p.add_argument("--json", default=None)
  p.add_argument("--plot", default=None)
  args = p.parse_args(argv)
  impls = args.implementations.split(",")
  anchor = None
  if "flashmla" in impls:
    anchor, reason = flashmla_anchor.load()
    if anchor is None or args.devices > 1:
      print(f"# no FlashMLA column: {reason or 'one device only'}", flush=True)
      impls.remove("flashmla")
  mesh = None
  if args.devices > 1:
    if args.b % args.devices:
      p.error(f"--b {args.b} must be a multiple of --devices {args.devices}")
    mesh = jax.make_mesh((args.devices,), ("dp",), devices=jax.devices()[:args.devices])

  device = jax.devices()[0]
  print(f"# {device.device_kind}, jax {jax.__version__}, jax_flashmla build "
        f"{jax_flashmla.build_info()}", flush=True)
  configs = grid(args)
  rows = []
  key = jax.random.PRNGKey(0)
  cache_key = None
  header = (f"{'b':>4} {'s_q':>3} {'h_q':>4} {'len':>6} {'causal':>6} {'impl':>8} {'ms':>9} "
            f"{'TB/s':>6} {'TFLOPS':>7} {'%BW':>5} {'%PEAK':>5} {'vs XLA':>7} {'vs FM':>6}"
            + (f" {'gpu ms':>9} {'TB/s':>6} {'TFLOPS':>7}" if args.device_time else ""))
  print(header, flush=True)
  for n, (mean_len, s_q, h_q, causal) in enumerate(configs, 1):
    if cache_key != mean_len:  # one pool per length, reused by the head/s_q variants
      k_cache = block_table = lens = None
      k_cache, block_table, lens, real_mean = make_inputs(key, args.b, mean_len, 2,
                                                          pools=args.devices)
      cache_key = mean_len
    flops, nbytes = counts(args.b, s_q, h_q, 1, real_mean)
    result = {"devices": args.devices, "b": args.b, "s_q": s_q, "h_q": h_q, "h_kv": 1, "mean_len": mean_len,
              "actual_mean_len": real_mean, "causal": causal, "flops": flops, "bytes": nbytes}
    for impl in impls:
      if impl == "xla" and mean_len > args.xla_max_len:
        continue
      try:
        if impl == "flashmla":  # one call on the first layer's inputs, replayed
          qs, bts = layer_inputs(jax.random.fold_in(key, n), (args.b, s_q, h_q, 576),
                                 block_table, k_cache.shape[0], 1)
          sec, gpu_sec = flashmla_anchor.dense_decode_seconds(
              anchor, qs[0], k_cache, bts[0], lens, causal), None
          del qs, bts
          result[impl] = {"ms": sec * 1e3, "tbps": nbytes / sec / 1e12,
                          "tflops": flops / sec / 1e12}
          continue
        layers = args.layers if impl != "xla" else max(2, args.layers // 4)
        qs, bts = layer_inputs(jax.random.fold_in(key, n), (args.b, s_q, h_q, 576),
                               block_table, k_cache.shape[0] // args.devices, layers)
        sec, gpu_sec = time_decode(qs, k_cache, bts, lens, causal=causal, implementation=impl,
                                   repeats=args.repeats, steps=args.steps, mesh=mesh,
                                   device_time=args.device_time)
        del qs, bts
      except Exception as e:  # e.g. the reference running out of memory at long lengths
        print(f"  [{n}/{len(configs)}] {impl} failed: {type(e).__name__}: {str(e)[:200]}",
              flush=True)
        continue
      result[impl] = {"ms": sec * 1e3, "tbps": nbytes / sec / 1e12,
                      "tflops": flops / sec / 1e12}
      if gpu_sec:
        result[impl].update({"gpu_ms": gpu_sec * 1e3, "gpu_tbps": nbytes / gpu_sec / 1e12,
                             "gpu_tflops": flops / gpu_sec / 1e12})
    if "cuda" in result and "xla" in result:
      result["speedup_vs_xla"] = result["xla"]["ms"] / result["cuda"]["ms"]
    if "cuda" in result and "flashmla" in result:
      result["ratio_vs_flashmla"] = result["flashmla"]["ms"] / result["cuda"]["ms"]
    rows.append(result)
    save(args, rows)  # after every config, so a sweep cut short still leaves its figures
    for impl in impls:
      if impl not in result:
        continue
      r = result[impl]
      speed = f"{result['speedup_vs_xla']:6.1f}x" if impl == "cuda" and "xla" in result else ""
      vs_fm = (f"{result['ratio_vs_flashmla']:6.3f}" if impl == "cuda" and
               "ratio_vs_flashmla" in result else "")
      gpu = (f" {r['gpu_ms']:9.3f} {r['gpu_tbps']:6.2f} {r['gpu_tflops']:7.1f}"
             if "gpu_ms" in r else "")
      print(f"{args.b:>4} {s_q:>3} {h_q:>4} {mean_len:>6} {str(causal):>6} {impl:>8} "
            f"{r['ms']:9.3f} {r['tbps']:6.2f} {r['tflops']:7.1f} "
            f"{100 * r['tbps'] / HBM_TBPS:5.1f} {100 * r['tflops'] / PEAK_TFLOPS:5.1f} {speed:>7} "
            f"{vs_fm:>6}"
            f"{gpu}   [{n}/{len(configs)}]", flush=True)

  if args.plot:
    plot(rows, args.plot, save(args, rows))


def save(args, rows):
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "build": jax_flashmla.build_info(), "command": " ".join(sys.argv),
          "layers": args.layers, "steps": args.steps, "repeats": args.repeats,
          "devices": args.devices}
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
  return meta


def plot(rows, path, meta):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  series = sorted({(r["s_q"], r["h_q"], r["causal"]) for r in rows})
  for s_q, h_q, causal in series:
    pts = [r for r in rows if (r["s_q"], r["h_q"], r["causal"]) == (s_q, h_q, causal)]
    lens = [r["mean_len"] for r in pts]
    label = f"h_q={h_q} s_q={s_q}{' causal' if causal else ''}"
    for ax, key in zip(axes, ("tbps", "tflops")):
      ys = [r["cuda"][key] if "cuda" in r else math.nan for r in pts]
      line, = ax.plot(lens, ys, marker="o", label=label)
      gs = [r["cuda"].get("gpu_" + key, math.nan) if "cuda" in r else math.nan for r in pts]
      if not all(math.isnan(g) for g in gs):
        ax.plot(lens, gs, linestyle="--", linewidth=1, color=line.get_color())
      xs = [r["xla"][key] if "xla" in r else math.nan for r in pts]
      ax.plot(lens, xs, marker="x", linestyle=":", color=line.get_color())
  axes[0].axhline(HBM_TBPS, color="gray", linestyle="--", label="4.8 TB/s datasheet")
  axes[1].axhline(PEAK_TFLOPS, color="gray", linestyle="--", label="990 TFLOPS datasheet")
  for ax, title in zip(axes, ("memory throughput (TB/s)", "compute (TFLOPS)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean cache length")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(f"jax_flashmla decode (solid: wall clock, dashed: GPU time) vs XLA reference "
               f"(dotted), b=128, {meta['device']}, jax {meta['jax']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
