"""Where a decode call's time goes inside a jitted program: the benchmark's layered program under
the JAX profiler, its GPU activity split into kernels and the gaps between them.

    python benchmarks/trace_decode.py --b 128 --s-q 1 --h-q 16 --len 8192

Prints the wall clock per call and when the program's dispatch returns; per kernel name, how
often it ran and its mean duration; then, per program run, the span from the first kernel's start
to the last kernel's end, the summed kernel time and the idle time between kernels, each divided
by the number of layers. "Over our kernels" is the span per call minus the decode and combine
kernels' own time per call. With `--steps N` each traced run dispatches the program N times back
to back before waiting, as bench_decode.py times it, so the split also shows how much of a decode
loop's wall clock lies before its first kernel and after its last. `--fit-steps 1,5,10,20,40`
instead times unprofiled runs of that many program calls each (three rounds, alternating) and
fits wall = calls * per_call + per_run: the cost of one more call in a long decode loop, and the
fixed cost of a run (the first dispatch and the final wait).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import bench_decode  # noqa: E402
import jax_flashmla  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--b", type=int, default=128)
  p.add_argument("--s-q", type=int, default=1)
  p.add_argument("--h-q", type=int, default=16)
  p.add_argument("--len", type=int, default=8192)
  p.add_argument("--causal", action="store_true")
  p.add_argument("--layers", type=int, default=20)
  p.add_argument("--runs", type=int, default=3, help="program runs inside the trace")
  p.add_argument("--steps", type=int, default=1,
                 help="program calls per traced run, dispatched back to back")
  p.add_argument("--implementation", default="cuda")
  p.add_argument("--fit-steps", default=None,
                 help="comma-separated program calls per run: fit per-call and per-run wall time")
  args = p.parse_args(argv)

  key = jax.random.PRNGKey(0)
  k_cache, block_table, lens, mean = bench_decode.make_inputs(key, args.b, args.len, 2)
  qs, bts = bench_decode.layer_inputs(key, (args.b, args.s_q, args.h_q, 576), block_table,
                                      k_cache.shape[0], args.layers)
  md = jax_flashmla.get_mla_metadata(lens, args.s_q * args.h_q, 1,
                                     implementation=args.implementation)

  model = bench_decode.layered_program(causal=args.causal, implementation=args.implementation)

  run = lambda steps=args.steps: jax.block_until_ready(
      [model(qs, k_cache, bts, lens, md) for _ in range(steps)])
  calls_per_run = args.layers * args.steps
  run()
  if args.fit_steps:
    fit_steps(run, [int(x) for x in args.fit_steps.split(",")], args.layers)
    return
  wall, dispatch = [], []
  for _ in range(5):
    t0 = time.perf_counter()
    out = [model(qs, k_cache, bts, lens, md)]
    dispatch.append((time.perf_counter() - t0) * 1e6)
    out += [model(qs, k_cache, bts, lens, md) for _ in range(args.steps - 1)]
    jax.block_until_ready(out)
    wall.append((time.perf_counter() - t0) / calls_per_run * 1e6)
    del out
  flops, nbytes = bench_decode.counts(args.b, args.s_q, args.h_q, 1, mean)
  per_call = statistics.median(wall)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; b={args.b} s_q={args.s_q} "
        f"h_q={args.h_q} len={args.len} causal={args.causal}, {args.layers} layers, "
        f"{args.steps} program call(s) per run")
  print(f"wall clock per call: {per_call:.1f} us  ({nbytes / per_call / 1e6:.2f} TB/s, "
        f"{flops / per_call / 1e6:.0f} TFLOPS); the first program's dispatch returns after "
        f"{statistics.median(dispatch):.0f} us")

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True,
                            profiler_options=bench_decode.profiler_options()):
      for i in range(args.runs):
        with jax.profiler.TraceAnnotation(f"decode-program-{i}"):
          run()
        time.sleep(0.05)  # separates the runs in the trace
    events = bench_decode.gpu_kernel_events(d)
    calls = sorted(((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in bench_decode.trace_events(d)
                    if e.get("ph") == "X" and str(e.get("name", "")).startswith("decode-program-")))
  if not events:
    print("no GPU kernel events in the trace (profiler unavailable?)")
    return

  by_name = collections.defaultdict(list)
  for name, _, dur in events:
    by_name[name].append(dur)
  print(f"{'kernel':<60} {'count':>6} {'mean us':>9} {'min us':>8} {'max us':>8}")
  for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
    print(f"{name[:60]:<60} {len(durs):>6} {statistics.mean(durs):9.1f} {min(durs):8.1f} "
          f"{max(durs):8.1f}")

  # Split into program runs at idle stretches longer than 20 ms (the sleeps above).
  runs, cur = [], [events[0]]
  for ev in events[1:]:
    prev_end = max(e[1] + e[2] for e in cur)
    if ev[1] - prev_end > 20_000:
      runs.append(cur)
      cur = []
    cur.append(ev)
  runs.append(cur)
  ours_names = ("decode_wide", "decode_narrow", "combine_kernel")
  is_ours = lambda n: any(k in n for k in ours_names)
  for i, r in enumerate(runs):
    start, end = r[0][1], max(e[1] + e[2] for e in r)
    span = end - start
    busy = sum(e[2] for e in r)
    ours = sum(e[2] for e in r if is_ours(e[0]))
    print(f"run {i}: {len(r)} kernels; per call: span {span / calls_per_run:.1f} us, "
          f"our kernels {ours / calls_per_run:.1f} us, other kernels "
          f"{(busy - ours) / calls_per_run:.1f} us, over our kernels "
          f"{(span - ours) / calls_per_run:.1f} us")
    # The host's view of the same run (profiler on, so its waits are somewhat longer).
    call = [c for c in calls if c[0] <= start <= c[1]]
    if call:
      print(f"        the first kernel starts {start - call[0][0]:.0f} us after the program is "
            f"called; the host sees the result {call[0][1] - end:.0f} us after the last ends")


def fit_steps(run, steps_list, layers):
  calls, seconds = [], []
  for rnd in range(3):
    line = []
    for steps in steps_list:
      t0 = time.perf_counter()
      run(steps)
      t = time.perf_counter() - t0
      calls.append(steps * layers)
      seconds.append(t)
      line.append(f"{steps}: {t / (steps * layers) * 1e6:.1f}")
    print(f"round {rnd}, us per call by program calls per run: " + "  ".join(line), flush=True)
  a = np.stack([calls, np.ones(len(calls))], 1)
  (per_call, per_run), *_ = np.linalg.lstsq(a, np.array(seconds), rcond=None)
  print(f"fit: {per_call * 1e6:.1f} us per call + {per_run * 1e3:.3f} ms per run")


if __name__ == "__main__":
  main()
