"""Soak of the serving loop: requests arrive and leave for minutes, checked while it runs.

    python benchmarks/soak.py --minutes 10                  # sizes for a GPU (the default there)
    python benchmarks/soak.py --minutes 1 --preset small    # what CI runs on the CPU

The ten-minute H200 run (bf16 cache; its summary goes to tests/GPU_RESULTS.md):

    python3 -P benchmarks/soak.py --minutes 10 --implementation cuda --seed 0 \\
        --json soak_h200_bf16.json

What runs: `jax_flashmla.serving.Server`, the demo's loop (one shared page pool, the
`PageAllocator`, one jitted step with the caches donated in two compiled shapes, the scheduler
records once per step), driving the demo's model (`--preset full`: 4 layers, hidden 1024,
16 heads, 32 slots, chunk 64, prompts of 4 … 4096 tokens, 1 … 256 new tokens, a pool of 495
pages). The requests come from a seeded random process (the n-th request's prompt, budget and
fate depend on `--seed` only):

- prompt lengths log-uniform from `--min-prompt` to `--max-prompt` (lowered, if the pool is
  small, so one request's worst case takes at most half of the pool), generation budgets
  log-uniform from 1 to `--max-new`; the pool (`--num-blocks`) defaults to 1.5 times what the
  slots' requests need on average, so the pool, not the slots, often holds the queue back;
- Poisson arrivals at `--rate` per second, held back while `--max-waiting` requests already
  wait (back-pressure: held, never dropped);
- bursts at Poisson times (`--burst-every` seconds apart on average) of as many requests as
  make up `--burst-pool` times the pool in worst-case pages: they exhaust the pool, requests
  wait for pages, none is dropped;
- cancellations (`--cancel` of the requests): mid-generation after a random number of tokens,
  as soon as it runs (mostly while its prompt is read, before any token), or while it waits
  (at a random place in the queue); a running request's pages go back at once.

Why the throughput can be compared between the first and the last minute: the default `--rate`
is `--load` (1.5) times the completion rate measured in the warm-up, so the queue is (almost)
never empty and the server runs at its capacity; and after the warm-up the request stream
repeats every "cycle" of about a minute of work (a quarter of a shorter run; its length in
requests comes from the warm-up's rate). With the queue full, admission takes the requests in
stream order whatever the timing of arrivals and bursts, so every cycle runs the same steps on
the same lengths (the summary lists each cycle's steps: they agree while the queue never runs
dry), and the first and the last cycle differ only by what the machine did: their ratio is the
drift check. Tokens/s over the first and the last clock minute are reported beside it (they also
hold partial cycles, so they vary a little more).

Phases: compile; warm-up (`--warmup` s with the queue kept full; both step shapes and both
cross-check shapes run); the measured phase (`--minutes`); the drain (arrivals stop, everything
still waiting or running is served, `--drain-timeout`).

Checks while it runs, reported in the summary (and `--json`):

- every `--check-every` steps, one layer's live cache (pages, the step's block table and
  lengths; layers in turn) is decoded with random queries of the step's shape by the step's
  implementation and by `implementation="xla"`, compared on the device with FlashMLA's
  tolerances (`jax_flashmla.testing`); the cache's lengths must equal the host's;
- after every step `Server.audit()`: pages held + free = pool, none held twice, each slot's
  pages cover exactly its tokens (a finished or cancelled request's are back at once), the
  running requests' worst cases fit in the pool;
- every request that finishes has exactly `max_new_tokens` tokens, a cancelled one exactly the
  tokens it had sampled; submitted = done + cancelled at the end (none lost);
- device memory in use (`memory_stats()["bytes_in_use"]`, sampled with no step in flight) after
  warm-up, its max, and at the end of the measured phase: the end within 1% of the start;
- programs compiled (`jax.monitoring`, the backend-compile event) after warm-up: none;
- generated tokens/s of the last cycle within 5% of the first; on a GPU with nvidia-smi, the SM
  clock and power are sampled every ~10 s (read only) and reported beside it.

Exit status 1 if a check fails. The correctness checks (cross-checks, lengths, pages, requests,
compilations) always count. The memory and throughput ones count with `--steady-checks on`, the
default on a GPU; on the CPU they are reported only (`memory_stats()` is None there, and a
one-minute run on a shared CI machine has no steady throughput to judge). On the CPU the
cross-check compares the pure-JAX path with itself, so there it checks the plumbing (live cache,
block table, lengths), not a kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_flashmla import _extension, flash_mla_with_kvcache, get_mla_metadata, testing
from jax_flashmla.demo import DemoModel, ModelConfig
from jax_flashmla.layers import MLAConfig
from jax_flashmla.quantization import is_fp8_cache
from jax_flashmla.serving import CANCELLED, DONE, RUNNING, WAITING, Request, Server

PAGE = 64
HEAD_DIM = 576
IMPLEMENTATIONS = {"auto": None, "cuda": "cuda", "xla": "xla"}

# Sizes per preset; a flag given on the command line wins.
PRESETS = {
    "full": dict(layers=4, hidden=1024, heads=16, vocab=4096, batch_size=32, chunk=64,
                 min_prompt=4, max_prompt=4096, max_new=256, check_every=100, warmup=30.0),
    "small": dict(layers=2, hidden=64, heads=2, vocab=128, batch_size=4, chunk=16,
                  min_prompt=2, max_prompt=256, max_new=48, check_every=50, warmup=10.0),
}
MEMORY_TOLERANCE = 0.01
DRIFT_TOLERANCE = 0.05


# ------------------------------------------------------------------------------------------------
# The arrival process
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
  """When a request is cancelled. kind: "generation" (once it has `after` tokens), "prefill"
  (as soon as it runs, usually while its prompt is being read) or "waiting" (while it waits,
  once at most `after` requests wait ahead of it: a place in the queue rather than a time, so
  that bursts change when requests join the queue but not what the server does)."""
  kind: str
  after: int


class Arrivals:
  """The seeded request stream and its arrival times (separate generators, so the n-th request
  is the same whatever the timing).

  After `start_cycle(n)` the stream repeats its next `n` requests over and over: a full cycle
  then always meets the server in the same state (its queue full), so it runs the same steps,
  and cycles can be compared for drift.
  """

  def __init__(self, seed: int, *, min_prompt: int, max_prompt: int, max_new: int, vocab: int,
               cancel: float, burst_every: float):
    self._requests = np.random.default_rng([seed, 1])
    self._gaps = np.random.default_rng([seed, 2])
    self._bursts = np.random.default_rng([seed, 3])
    self.min_prompt, self.max_prompt, self.max_new = min_prompt, max_prompt, max_new
    self.vocab, self.cancel, self.burst_every = vocab, cancel, burst_every
    self._cycle: list[tuple[np.ndarray, int, Plan | None]] | None = None
    self._drawn = 0  # requests handed out since the cycle started

  def _draw(self) -> tuple[np.ndarray, int, Plan | None]:
    r = self._requests
    # Every draw is made for every request, so the stream does not depend on the branches.
    n = round(math.exp(r.uniform(math.log(self.min_prompt), math.log(self.max_prompt))))
    m = round(math.exp(r.uniform(0.0, math.log(self.max_new))))
    prompt = r.integers(0, self.vocab, n, dtype=np.int32)
    cancel, kind, frac, place = r.random(), r.random(), r.random(), int(r.integers(0, 8))
    plan = None
    if cancel < self.cancel:
      if kind < 0.6 and m >= 2:
        plan = Plan("generation", 1 + int(frac * (m - 1)))  # in [1, m - 1]
      elif kind < 0.8:
        plan = Plan("prefill", 0)
      else:
        plan = Plan("waiting", place)
    return prompt, m, plan

  def start_cycle(self, length: int) -> None:
    self._cycle = [self._draw() for _ in range(length)]
    self._drawn = 0

  def request(self) -> tuple[Request, Plan | None, int | None]:
    """The next request, its cancellation plan and its cycle number (None before cycling)."""
    if self._cycle is None:
      prompt, m, plan = self._draw()
      cycle = None
    else:
      cycle, i = divmod(self._drawn, len(self._cycle))
      prompt, m, plan = self._cycle[i]
      self._drawn += 1
    return Request(prompt, m), plan, cycle

  def gap(self) -> float:
    """Time to the next Poisson arrival at rate 1 (scale by 1 / rate)."""
    return float(self._gaps.exponential(1.0))

  def burst_gap(self) -> float:
    return float(self._bursts.exponential(self.burst_every))


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def make_cross_check(implementation: str | None, num_heads: int, softmax_scale: float | None):
  """A jitted check of one layer's live cache: the step's decode by `implementation` and by the
  pure-JAX path, compared on the device; returns two `Comparison`s and the cache's lengths."""

  def check(pages, block_table, lengths, seed, *, s_q):
    b = lengths.shape[0]
    q = jax.random.normal(jax.random.key(seed), (b, s_q, num_heads, HEAD_DIM), jnp.float32)
    q_dtype = jnp.bfloat16 if is_fp8_cache(pages) else pages.dtype  # FP8 rows take bf16 queries
    q = q.astype(q_dtype)

    def decode(impl):
      metadata = get_mla_metadata(lengths, s_q * num_heads, 1, implementation=impl)
      return flash_mla_with_kvcache(q, pages, block_table, lengths, metadata=metadata,
                                    softmax_scale=softmax_scale, causal=True,
                                    implementation=impl)

    out, lse = decode(implementation)
    want_out, want_lse = decode("xla")
    # A live cache holds a model's values: allow for the kernels' rounding of P (see
    # jax_flashmla.testing); lse keeps FlashMLA's tolerances.
    bound = testing.value_bound(pages, block_table, lengths)[:, None, None]
    return (testing.compare(out, want_out, **testing.OUT_TOL, scale=bound,
                            scale_tol=testing.p_rounding_tol(q_dtype)),
            testing.compare(lse, want_lse, **testing.LSE_TOL), lengths)

  return jax.jit(check, static_argnames="s_q")


class CompileCounter:
  """Counts XLA backend compilations (the event jit records per program it compiles)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.names: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    del duration
    if event == self.EVENT:
      self.names.append(str(kwargs.get("fun_name", "?")))

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def device_bytes_in_use() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_in_use", 0))


def host_rss_bytes() -> int | None:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


class ClockSampler:
  """SM clock, power draw and limit from nvidia-smi, read every ~10 s without waiting for it
  (one query in flight at a time; settings are never touched). Does nothing without the tool
  or a GPU."""

  QUERY = "clocks.sm,power.draw,power.limit"

  def __init__(self, enabled: bool):
    self.exe = shutil.which("nvidia-smi") if enabled else None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    self.index = visible if visible.isdigit() else "0"
    self.samples: list[tuple[float, float, float, float]] = []  # (t, MHz, W, limit W)
    self._proc, self._started = None, 0.0

  def poll(self, t: float) -> None:
    if self.exe is None:
      return
    if self._proc is not None:
      if self._proc.poll() is None:
        return  # still running: look again at the next tick
      out = self._proc.communicate()[0]
      self._proc = None
      try:
        mhz, watts, limit = (float(v) for v in out.strip().splitlines()[0].split(","))
        self.samples.append((self._started, mhz, watts, limit))
      except (ValueError, IndexError):
        pass
    self._started = t
    self._proc = subprocess.Popen(
        [self.exe, "-i", self.index, f"--query-gpu={self.QUERY}",
         "--format=csv,noheader,nounits"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)

  def close(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.communicate()
      self._proc = None

  def summary(self, windows: dict[str, tuple[float, float]]) -> dict | None:
    if not self.samples:
      return None
    mhz = [s[1] for s in self.samples]
    out = dict(samples=len(self.samples), sm_mhz_min=min(mhz),
               sm_mhz_median=statistics.median(mhz), sm_mhz_max=max(mhz),
               power_w_median=statistics.median(s[2] for s in self.samples),
               power_limit_w=self.samples[-1][3])
    for name, (lo, hi) in windows.items():
      inside = [s[1] for s in self.samples if lo <= s[0] < hi]
      out[f"sm_mhz_median_{name}"] = statistics.median(inside) if inside else None
    return out


# ------------------------------------------------------------------------------------------------
# The soak
# ------------------------------------------------------------------------------------------------

class Soak:
  """The loop: arrivals, one server step, the per-step checks, cancellations, progress."""

  def __init__(self, args, server: Server, arrivals: Arrivals, softmax_scale, log):
    self.args, self.server, self.arrivals, self.log = args, server, arrivals, log
    self.pool = server.allocator.num_blocks
    self.cross_check = make_cross_check(server.implementation, server.num_heads, softmax_scale)
    self.clock = ClockSampler(enabled=on_gpu())
    self.live: dict[int, tuple[Request, int | None]] = {}  # id -> (request, its cycle)
    self.plans: dict[int, Plan] = {}
    self.t0 = time.perf_counter()
    self.phase = "warm-up"
    # Counts
    self.submitted = self.done = self.cancelled = self.truncated = self.lost_tokens = 0
    self.cancelled_by = dict(generation=0, prefill=0, waiting=0)
    self.bursts = self.burst_requests = 0
    self.audited_steps = self.unbalanced_steps = 0
    self.checks = self.check_mismatches = self.length_mismatches = 0
    self.check_widths: set[int] = set()
    self.check_seconds = 0.0
    self.worst_cos = 0.0
    self.problems: list[str] = []  # the first few failures of any kind, for the summary
    self.saturated_steps = self.steps_in_phase = 0
    self.held_seconds = 0.0  # of the measured phase, Poisson arrivals held back (queue full)
    self.max_waiting_seen = 0
    # (time, tokens generated, steps, process CPU time, cross-check seconds so far) when each
    # cycle's first request was admitted.
    self.cycle_starts: list[tuple[float, int, int, float, float]] = []
    # Per second of the measured phase: [generated, prompt tokens, steps].
    self.per_second: list[list[int]] = []
    self.memory: list[tuple[float, int]] = []
    self.rss: list[tuple[float, int]] = []
    # Set by the phases, for the summary.
    self.measure_start, self.measure_tokens, self.measure_saturated = 0.0, 0, None
    self.cycle_length = 0
    self.memory_end, self.phase_tokens = None, 0

  def now(self) -> float:
    return time.perf_counter() - self.t0

  def note(self, problem: str) -> None:
    if len(self.problems) < 20:
      self.problems.append(f"[{self.now():.0f} s, step {self.server.steps}] {problem}")

  # ---- requests ---------------------------------------------------------------------------------

  def submit(self, burst: bool = False) -> Request:
    request, plan, cycle = self.arrivals.request()
    rid = self.server.submit(request)
    self.live[rid] = (request, cycle)
    if plan is not None:
      self.plans[rid] = plan
    self.submitted += 1
    self.burst_requests += burst
    return request

  def submit_burst(self) -> None:
    """Requests until their worst cases add up to `--burst-pool` pools."""
    pages, want = 0, self.args.burst_pool * self.pool
    while pages < want:
      request = self.submit(burst=True)
      pages += self.server.allocator.pages_for(request.max_cached_tokens)
    self.bursts += 1

  def apply_plans(self) -> None:
    server = self.server
    ahead = None  # queue places, computed only when a waiting plan needs them
    for rid, plan in list(self.plans.items()):
      request = self.live[rid][0]
      status = request.status
      if status == WAITING and plan.kind == "waiting":
        if ahead is None:
          ahead = {r: i for i, r in enumerate(server.waiting_ids())}
        due = ahead[rid] <= plan.after
      elif status == RUNNING and plan.kind != "waiting":
        due = request.num_generated >= plan.after
      else:
        due = False
        if status != WAITING:
          del self.plans[rid]  # done, or started before its waiting cancellation came
      if due:
        kind = "waiting" if status == WAITING else (
            "prefill" if request.num_generated == 0 else "generation")
        if server.cancel(rid):
          self.cancelled_by[kind] += 1
        del self.plans[rid]

  def account(self, completed) -> None:
    for request in completed:
      del self.live[request.id]
      self.plans.pop(request.id, None)
      out = request.output
      in_vocab = not out or (min(out) >= 0 and max(out) < self.args.vocab)
      if request.status == DONE:
        self.done += 1
        if len(out) != request.max_new_tokens or not in_vocab:
          self.truncated += 1
          self.note(f"request {request.id} done with {len(out)} of {request.max_new_tokens} "
                    f"tokens{'' if in_vocab else ' (some outside the vocabulary)'}")
      else:
        assert request.status == CANCELLED, request.status
        self.cancelled += 1
        if len(out) != request.num_generated or not in_vocab:
          self.lost_tokens += 1
          self.note(f"cancelled request {request.id} has {len(out)} tokens, sampled "
                    f"{request.num_generated}")

  # ---- checks -----------------------------------------------------------------------------------

  def audit(self) -> None:
    self.audited_steps += 1
    problems = self.server.audit()
    if problems:
      self.unbalanced_steps += 1
      self.note("; ".join(problems))

  def check(self, width: int) -> None:
    """Cross-checks one layer of the live cache (layers in turn) with queries of `width`."""
    server = self.server
    t = time.perf_counter()
    layer = self.checks % server.num_layers
    cache = server.caches[layer]
    out, lse, lengths = self.cross_check(cache.pages, cache.block_table, cache.lengths,
                                         np.uint32(self.checks), s_q=width)
    out, lse, lengths = jax.device_get((out, lse, lengths))
    self.checks += 1
    self.check_widths.add(width)
    self.worst_cos = max(self.worst_cos, float(out.cos_diff))
    if not (out.passed and lse.passed):
      self.check_mismatches += 1
      self.note(f"cross-check layer {layer} s_q {width}: "
                f"{out.describe('out', **testing.OUT_TOL)}; "
                f"{lse.describe('lse', **testing.LSE_TOL)}")
    host = server.slot_lengths()
    running = host >= 0  # slots emptied by the step keep their length until the next one
    if not np.array_equal(lengths[running], host[running]):
      self.length_mismatches += 1
      self.note(f"cache lengths {lengths.tolist()} != host {host.tolist()} (-1: empty slot)")
    self.check_seconds += time.perf_counter() - t

  # ---- the loop ---------------------------------------------------------------------------------

  def run(self, phase: str, seconds: float, *, rate: float = 0.0) -> float:
    """Runs one phase: "warm-up" (queue kept full), "measure" (Poisson + bursts) or "drain"
    (no arrivals, until idle or `seconds`). Returns the phase's length in seconds."""
    args, server = self.args, self.server
    self.phase, start = phase, self.now()
    self.saturated_steps = self.steps_in_phase = 0
    vclock, next_arrival = 0.0, self.arrivals.gap() / rate if rate else math.inf
    next_burst = self.arrivals.burst_gap() if phase == "measure" else math.inf
    generated_at_start = server.tokens_generated
    next_progress, last = start + args.progress_every, start
    last_line = (start, generated_at_start)  # the tokens/s of a progress line: since the last
    while True:
      t = self.now()
      elapsed = t - start
      if elapsed >= seconds or (phase == "drain" and server.idle):
        break
      if phase == "warm-up":
        while server.num_waiting < args.max_waiting:
          self.submit()
      elif phase == "measure":
        if server.num_waiting < args.max_waiting:
          vclock += t - last  # held back while the queue is full: arrivals wait, none is lost
        else:
          self.held_seconds += t - last
        while vclock >= next_arrival and server.num_waiting < args.max_waiting:
          self.submit()
          next_arrival += self.arrivals.gap() / rate
        while elapsed >= next_burst:
          self.submit_burst()
          next_burst += self.arrivals.burst_gap()
      last = t
      self.max_waiting_seen = max(self.max_waiting_seen, server.num_waiting)

      result = server.step()
      if result is None:  # nothing to run: wait for the next arrival
        time.sleep(0.001)
        continue
      self.steps_in_phase += 1
      self.saturated_steps += server.num_waiting > 0
      for rid in result.admitted:
        cycle = self.live[rid][1]
        if phase == "measure" and cycle is not None and cycle >= len(self.cycle_starts):
          # Tokens counted before this step: the cycle's first request starts in it.
          self.cycle_starts.append((t, server.tokens_generated - result.generated,
                                    server.steps - 1, time.process_time(),
                                    self.check_seconds))
      self.account(result.completed)
      self.audit()
      if result.step % args.check_every == 0:
        self.check(result.width)
      self.apply_plans()
      if phase == "measure":
        second = int(elapsed)
        while len(self.per_second) <= second:
          self.per_second.append([0, 0, 0])
        bucket = self.per_second[second]
        bucket[0] += result.generated
        bucket[1] += result.prompt_tokens
        bucket[2] += 1

      if t >= next_progress:
        next_progress += args.progress_every
        self.sample(t)
        done = server.tokens_generated - last_line[1]
        rate_now = done / max(t - last_line[0], 1e-9)
        last_line = (t, server.tokens_generated)
        self.log(self.progress_line(t, rate_now))
    self.account(server.drain() if phase == "drain" else ())
    if phase != "drain":
      self.sample(self.now())
    self.phase_tokens = server.tokens_generated - generated_at_start
    return self.now() - start

  def sample(self, t: float) -> None:
    """Memory (device and host) and clocks, at a fixed point of the loop with no step running
    (a running step's temporaries would make the samples jump)."""
    self.server.wait()
    mem = device_bytes_in_use()
    if mem is not None:
      self.memory.append((t, mem))
    rss = host_rss_bytes()
    if rss is not None:
      self.rss.append((t, rss))
    self.clock.poll(t)

  def progress_line(self, t: float, rate: float) -> str:
    s, alloc = self.server, self.server.allocator
    mem = f"  mem {self.memory[-1][1] / 2**30:.3f} GiB" if self.memory else ""
    clock = ""
    if self.clock.samples:
      _, mhz, watts, _ = self.clock.samples[-1]
      clock = f"  sm {mhz:.0f} MHz {watts:.0f} W"
    return (f"  [{t:6.0f} s {self.phase:8s}] step {s.steps:7d}  running {s.num_running:2d}/"
            f"{s.batch_size}  waiting {s.num_waiting:3d}  pages {alloc.num_used:4d}/"
            f"{alloc.num_blocks}  {rate:9.1f} tok/s  done {self.done:6d}  cancelled "
            f"{self.cancelled:5d}  checks {self.checks} ({self.check_mismatches} bad){mem}{clock}")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python benchmarks/soak.py",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--minutes", type=float, default=10.0, help="length of the measured phase")
  p.add_argument("--seed", type=int, default=0, help="weights and the request stream")
  p.add_argument("--implementation", choices=sorted(IMPLEMENTATIONS), default="auto",
                 help="attention of the steps; auto: CUDA kernels on Hopper, pure JAX elsewhere")
  p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                 help="sizes; auto: full on a GPU, small elsewhere (flags below override)")
  p.add_argument("--check-every", type=int, help="steps between cross-checks")
  p.add_argument("--warmup", type=float, help="seconds of warm-up after compiling")
  p.add_argument("--layers", type=int)
  p.add_argument("--hidden", type=int)
  p.add_argument("--heads", type=int)
  p.add_argument("--vocab", type=int)
  p.add_argument("--batch-size", type=int, help="slots")
  p.add_argument("--chunk", type=int, help="prompt tokens read per row and step")
  p.add_argument("--min-prompt", type=int)
  p.add_argument("--max-prompt", type=int)
  p.add_argument("--max-new", type=int, help="largest generation budget")
  p.add_argument("--num-blocks", type=int, help="pages in the pool; default: 1.5 x the batch "
                 "size x a request's mean worst case (at least twice the largest)")
  p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                 help="weights and activations; auto: bfloat16 on GPU, float32 elsewhere")
  # Only bfloat16 exists today; the FP8 cache adds its name here.
  p.add_argument("--cache-dtype", choices=["bfloat16", "fp8"], default="bfloat16",
                 help="the cache's rows: bfloat16, or DeepSeek-V3.2's FP8 rows (656 bytes)")
  p.add_argument("--rate", type=float, help="Poisson arrivals per second; default --load "
                 "times the warm-up's completion rate")
  p.add_argument("--load", type=float, default=1.5, help="see --rate")
  p.add_argument("--max-waiting", type=int, help="Poisson arrivals are held back while this many "
                 "requests wait; default 2 x batch size")
  p.add_argument("--burst-every", type=float, default=15.0, help="mean seconds between bursts")
  p.add_argument("--burst-pool", type=float, default=1.5,
                 help="a burst's worst-case pages, in pools")
  p.add_argument("--cancel", type=float, default=0.1, help="fraction of requests cancelled")
  p.add_argument("--drain-timeout", type=float, default=300.0, help="seconds")
  p.add_argument("--progress-every", type=float, default=10.0, help="seconds between lines")
  p.add_argument("--steady-checks", choices=["auto", "on", "off"], default="auto",
                 help="make the memory and throughput checks count; auto: on a GPU")
  p.add_argument("--json", help="write the summary here")
  return p


def _resolve(args) -> None:
  gpu = on_gpu()
  preset = PRESETS[args.preset if args.preset != "auto" else ("full" if gpu else "small")]
  for name, value in preset.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.dtype == "auto":
    args.dtype = "bfloat16" if gpu else "float32"
  if args.max_waiting is None:
    args.max_waiting = 2 * args.batch_size
  if args.steady_checks == "auto":
    args.steady_checks = "on" if gpu else "off"
  if args.num_blocks is None:
    # 1.5 times what the slots' requests need on average: the pool, not the slots, holds the
    # queue back about a third of the time (the full preset), and a burst exhausts it.
    args.num_blocks = max(2 * _pages(args.max_prompt + args.max_new - 1),
                          round(1.5 * args.batch_size * _mean_pages(args)))
  # Prompts scale with the pool: one request's worst case takes at most half of it.
  fits = args.num_blocks * PAGE // 2 - args.max_new + 1
  if fits < args.max_prompt:
    if fits < args.min_prompt:
      raise SystemExit(f"--num-blocks {args.num_blocks}: too small for prompts of "
                       f"{args.min_prompt} tokens and {args.max_new} new ones")
    args.max_prompt = fits
  for name in ("check_every", "batch_size", "chunk", "min_prompt", "max_new", "max_waiting"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1")


def _pages(tokens: int) -> int:
  return -(-tokens // PAGE)


def _mean_pages(args) -> float:
  """Mean worst-case pages of the request stream (estimated from a fixed sample of it)."""
  arrivals = Arrivals(0, min_prompt=args.min_prompt, max_prompt=args.max_prompt,
                      max_new=args.max_new, vocab=2, cancel=0.0, burst_every=1.0)
  return float(np.mean([_pages(arrivals.request()[0].max_cached_tokens) for _ in range(4096)]))


def _window_rate(per_second, lo: int, hi: int, column: int) -> float:
  rows = per_second[lo:hi]
  return sum(r[column] for r in rows) / max(len(rows), 1)


def summarize(soak: Soak, args, *, compile_seconds, warmup_seconds, measure_seconds,
              drain_seconds, drain_finished, compiles_warmup, compiles_after, rate) -> dict:
  server = soak.server
  per_second = soak.per_second[:int(measure_seconds)]  # whole seconds only
  total = len(per_second)
  window = max(1, min(60, total // 3))
  first = (0, window)
  last = (total - window, total)
  tok_first = _window_rate(per_second, *first, 0)
  tok_last = _window_rate(per_second, *last, 0)
  minutes = [_window_rate(per_second, m * 60, (m + 1) * 60, 0) for m in range(total // 60)]
  # Full cycles of the repeated stream: the same requests, the same steps; the first and the
  # last are the drift check.
  starts = soak.cycle_starts
  # A cycle's serving time leaves out the cross-checks it ran: they are the soak's own work, and
  # how many of the costlier (longer s_q) ones fall into a cycle varies.
  cycles = [dict(seconds=t1 - t0 - (k1 - k0), tok_s=(n1 - n0) / (t1 - t0 - (k1 - k0)),
                 steps=s1 - s0, cpu_seconds=c1 - c0, check_seconds=k1 - k0)
            for (t0, n0, s0, c0, k0), (t1, n1, s1, c1, k1) in zip(starts, starts[1:])]
  drift = cycles[-1]["tok_s"] / cycles[0]["tok_s"] if len(cycles) >= 2 else None

  memory = [m for _, m in soak.memory]
  measured_memory = [m for t, m in soak.memory if t >= soak.measure_start - 1e-6]
  mem = None
  if measured_memory:
    first_m, last_m = measured_memory[0], soak.memory_end
    mem = dict(first=first_m, max=max(measured_memory), last=last_m,
               change=(last_m - first_m) / first_m if first_m else None)
  rss = [r for _, r in soak.rss]
  lost = soak.submitted - soak.done - soak.cancelled
  m0 = soak.measure_start
  clocks = soak.clock.summary({"first": (m0 + first[0], m0 + first[1]),
                               "last": (m0 + last[0], m0 + last[1])})
  steady = args.steady_checks == "on"

  checks = {
      "cross-checks match": soak.check_mismatches == 0 and soak.checks > 0,
      "cache lengths match the host": soak.length_mismatches == 0,
      "pages balanced at every step": soak.unbalanced_steps == 0,
      "no request lost or truncated": lost == 0 and soak.truncated == 0
                                      and soak.lost_tokens == 0 and drain_finished,
      # None (a failure) if the counter never saw a compilation, e.g. a JAX that renamed the
      # event: the warm-up always compiles (the steps, the cross-checks).
      "no compilation after warm-up": not compiles_after if compiles_warmup else None,
  }
  reported = {
      "device memory flat (1%)": None if mem is None or mem["change"] is None
                                 else abs(mem["change"]) <= MEMORY_TOLERANCE,
      "throughput steady (5%, last cycle / first)": None if drift is None
                                                   else abs(drift - 1) <= DRIFT_TOLERANCE,
  }
  if steady:
    checks.update(reported)
  failed = [k for k, v in checks.items() if v is False or v is None]
  return dict(
      passed=not failed, failed=failed, checks=checks,
      reported_only={} if steady else reported,
      config=dict(vars(args), platform=jax.default_backend(),
                  device=jax.devices()[0].device_kind, pool_pages=soak.pool,
                  attention=_attention_name(server.implementation)),
      seconds=dict(compile=compile_seconds, warmup=warmup_seconds, measure=measure_seconds,
                   drain=drain_seconds, checks=soak.check_seconds),
      rate_per_second=rate,
      requests=dict(submitted=soak.submitted, done=soak.done, cancelled=soak.cancelled,
                    cancelled_by=soak.cancelled_by, lost=lost, truncated=soak.truncated,
                    cancelled_with_missing_tokens=soak.lost_tokens, bursts=soak.bursts,
                    burst_requests=soak.burst_requests, max_waiting=soak.max_waiting_seen),
      steps=dict(total=server.steps, chunk=server.chunk_steps, audited=soak.audited_steps,
                 unbalanced=soak.unbalanced_steps, pool_waits=server.pool_waits,
                 measured_saturated_fraction=soak.measure_saturated,
                 arrivals_held_fraction=soak.held_seconds / measure_seconds
                 if measure_seconds else None),
      pages=dict(pool=soak.pool, peak=server.peak_pages, reused=server.pages_reused),
      cross_checks=dict(count=soak.checks, mismatches=soak.check_mismatches,
                        length_mismatches=soak.length_mismatches, every=args.check_every,
                        widths=sorted(soak.check_widths), worst_out_cos_diff=soak.worst_cos),
      compiles=dict(warmup=len(compiles_warmup), after_warmup=len(compiles_after),
                    after_warmup_names=compiles_after[:20]),
      device_memory=mem,
      host_rss=dict(first=rss[0], max=max(rss), last=rss[-1]) if rss else None,
      cycles=dict(requests=soak.cycle_length, full=len(cycles), ratio=drift,
                  first_tok_s=cycles[0]["tok_s"] if cycles else None,
                  last_tok_s=cycles[-1]["tok_s"] if cycles else None, each=cycles),
      throughput=dict(window_seconds=window, first_tok_s=tok_first, last_tok_s=tok_last,
                      ratio=tok_last / tok_first if tok_first else None,
                      per_minute_tok_s=minutes,
                      first_steps_s=_window_rate(per_second, *first, 2),
                      last_steps_s=_window_rate(per_second, *last, 2),
                      first_prompt_tok_s=_window_rate(per_second, *first, 1),
                      last_prompt_tok_s=_window_rate(per_second, *last, 1),
                      measured_tok_s=soak.measure_tokens / measure_seconds if measure_seconds
                      else None),
      clocks=clocks,
      problems=soak.problems,
      all_memory_samples=len(memory),
  )


def _attention_name(implementation) -> str:
  kernels = _extension.has_cuda_kernels() and bool(_extension.local_hopper_gpus())
  if implementation == "xla" or (implementation is None and not kernels):
    return "xla"
  return "cuda"


def _gib(n) -> str:
  return "n/a" if n is None else f"{n / 2**30:.4f} GiB"


def summary_lines(s: dict) -> list[str]:
  c, r, st, x = s["config"], s["requests"], s["steps"], s["cross_checks"]
  sec, tp, mem, clocks = s["seconds"], s["throughput"], s["device_memory"], s["clocks"]
  lines = [
      f"soak summary: {c['device']} ({c['platform']}), attention {c['attention']} vs xla, "
      f"{c['cache_dtype']} cache, {c['dtype']} weights, {c['layers']} layers, hidden "
      f"{c['hidden']}, {c['heads']} heads, {c['batch_size']} slots, chunk {c['chunk']}, pool "
      f"{c['pool_pages']} pages, seed {c['seed']}",
      f"  time: compile {sec['compile']:.1f} s, warm-up {sec['warmup']:.1f} s, measured "
      f"{sec['measure']:.1f} s, drain {sec['drain']:.1f} s (cross-checks {sec['checks']:.1f} s "
      f"of it); arrivals {s['rate_per_second']:.2f}/s + {r['bursts']} bursts",
      f"  requests: {r['submitted']} submitted, {r['done']} done, {r['cancelled']} cancelled "
      f"({r['cancelled_by']['generation']} mid-generation, {r['cancelled_by']['prefill']} "
      f"before a token, {r['cancelled_by']['waiting']} waiting), {r['lost']} lost, "
      f"{r['truncated']} truncated; {r['burst_requests']} arrived in bursts, at most "
      f"{r['max_waiting']} waiting",
      f"  steps: {st['total']} ({st['chunk']} chunk), audited {st['audited']}, pages unbalanced "
      f"in {st['unbalanced']}; the pool held the queue back in {st['pool_waits']}; "
      f"queue non-empty in {100 * (st['measured_saturated_fraction'] or 0):.0f}% of measured "
      f"steps, arrivals held back {100 * (st['arrivals_held_fraction'] or 0):.0f}% of the time; "
      f"peak {s['pages']['peak']}/{s['pages']['pool']} pages, {s['pages']['reused']} "
      f"reused",
      f"  cross-checks: {x['count']} (every {x['every']} steps, s_q {x['widths']}), "
      f"{x['mismatches']} mismatches, worst out cosine difference {x['worst_out_cos_diff']:.2g}; "
      f"cache lengths differing from the host {x['length_mismatches']} times",
      f"  compilations: {s['compiles']['warmup']} up to the end of warm-up, "
      f"{s['compiles']['after_warmup']} after" + (f" {s['compiles']['after_warmup_names']}"
                                                   if s['compiles']['after_warmup'] else ""),
      "  device memory in use: " + ("n/a (memory_stats() is None here)" if mem is None else
                                    f"first {_gib(mem['first'])}, max {_gib(mem['max'])}, last "
                                    f"{_gib(mem['last'])} ({100 * mem['change']:+.3f}%)"),
  ]
  if s["host_rss"]:
    h = s["host_rss"]
    lines.append(f"  host RSS: first {_gib(h['first'])}, max {_gib(h['max'])}, last "
                 f"{_gib(h['last'])}")
  cy = s["cycles"]
  if cy["full"]:
    ratio = "n/a (one cycle)" if cy["ratio"] is None else f"{cy['ratio']:.4f}"
    lines.append(
        f"  throughput: the stream repeats every {cy['requests']} requests; full cycles "
        f"{cy['full']}, the first {cy['first_tok_s']:.1f} tok/s, the last "
        f"{cy['last_tok_s']:.1f} tok/s (ratio {ratio}); cycles of "
        + "/".join(f"{c['seconds']:.1f}" for c in cy["each"]) + " s (cross-checks left out), "
        + "/".join(str(c["steps"]) for c in cy["each"]) + " steps, "
        + "/".join(f"{c['cpu_seconds']:.1f}" for c in cy["each"]) + " s of process CPU time")
  else:
    lines.append(f"  throughput: no full cycle of {cy['requests']} requests in the measured phase")
  ratio = "n/a" if tp["ratio"] is None else f"{tp['ratio']:.4f}"
  lines.append(f"  clock windows: {tp['first_tok_s']:.1f} tok/s over the first "
               f"{tp['window_seconds']} s, {tp['last_tok_s']:.1f} over the last (ratio {ratio}); "
               f"steps/s {tp['first_steps_s']:.1f} -> {tp['last_steps_s']:.1f}; whole measured "
               f"phase {tp['measured_tok_s'] or 0:.1f} tok/s")
  if tp["per_minute_tok_s"]:
    lines.append("  per minute (tok/s): " + " ".join(f"{v:.0f}" for v in tp["per_minute_tok_s"]))
  if clocks:
    lines.append(
        f"  SM clock (nvidia-smi, {clocks['samples']} samples): min {clocks['sm_mhz_min']:.0f}, "
        f"median {clocks['sm_mhz_median']:.0f}, max {clocks['sm_mhz_max']:.0f} MHz; median over "
        f"the first window {clocks['sm_mhz_median_first']}, the last "
        f"{clocks['sm_mhz_median_last']}; power median {clocks['power_w_median']:.0f} W of "
        f"{clocks['power_limit_w']:.0f} W")
  else:
    lines.append("  SM clock: n/a (no GPU or no nvidia-smi)")
  for name, ok in s["checks"].items():
    lines.append(f"  check: {name}: {'yes' if ok else 'NO' if ok is False else 'n/a'}")
  for name, ok in s["reported_only"].items():
    lines.append(f"  reported only: {name}: {'yes' if ok else 'no' if ok is False else 'n/a'}")
  for problem in s["problems"][:10]:
    lines.append(f"  problem: {problem}")
  lines.append("soak: PASS" if s["passed"] else f"soak: FAIL ({', '.join(s['failed'])})")
  return lines


def main(argv=None, log=print) -> dict:
  args = _parser().parse_args(argv)
  _resolve(args)
  compiles = CompileCounter()
  try:
    return _soak(args, compiles, log)
  finally:
    compiles.close()


def _soak(args, compiles: CompileCounter, log) -> dict:
  implementation = IMPLEMENTATIONS[args.implementation]
  attention = MLAConfig(hidden_size=args.hidden, num_heads=args.heads)
  config = ModelConfig(attention, num_layers=args.layers, vocab_size=args.vocab,
                       intermediate_size=args.hidden * 11 // 4)
  dtype = jnp.dtype(args.dtype)
  model = DemoModel(config, rngs=nnx.Rngs(args.seed), dtype=dtype, param_dtype=dtype)
  max_seq_len = args.max_prompt + args.max_new - 1
  server = Server(model, batch_size=args.batch_size, max_seq_len=max_seq_len,
                  num_blocks=args.num_blocks, chunk=args.chunk, implementation=implementation,
                  kv_format="fp8" if args.cache_dtype == "fp8" else "bf16", log=log)
  arrivals = Arrivals(args.seed, min_prompt=args.min_prompt, max_prompt=args.max_prompt,
                      max_new=args.max_new, vocab=args.vocab, cancel=args.cancel,
                      burst_every=args.burst_every)
  soak = Soak(args, server, arrivals, attention.softmax_scale, log)
  log(f"soak: {args.minutes:g} min on {jax.devices()[0].device_kind}, attention "
      f"{_attention_name(implementation)} (--implementation {args.implementation}); "
      f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, {args.batch_size} "
      f"slots, pool {args.num_blocks} pages, prompts {args.min_prompt}-{args.max_prompt}, "
      f"1-{args.max_new} new tokens, seed {args.seed}")
  compile_seconds = server.compile()
  log(f"  compiled both step shapes in {compile_seconds:.1f} s")

  # Warm-up: the queue kept full. Its second half gives the completion rate.
  half = args.warmup / 2
  soak.run("warm-up", half)
  done_before, t_before = soak.done + soak.cancelled, soak.now()
  warmup_seconds = half + soak.run("warm-up", args.warmup - half)
  completion_rate = (soak.done + soak.cancelled - done_before) / max(soak.now() - t_before, 1e-9)
  for width in sorted({1, args.chunk} - soak.check_widths):
    soak.check(width)  # both check programs are compiled before the measured phase
  rate = args.rate or max(args.load * completion_rate, 0.1)
  # A cycle of about a minute of work (a quarter of a shorter run) from here on.
  soak.cycle_length = max(2 * args.batch_size,
                          round(completion_rate * min(60.0, args.minutes * 60 / 4)))
  arrivals.start_cycle(soak.cycle_length)
  compiles_warmup = list(compiles.names)
  log(f"  warm-up: {warmup_seconds:.1f} s, {soak.done + soak.cancelled} requests completed "
      f"({completion_rate:.2f}/s); from now Poisson arrivals at {rate:.2f}/s, the stream "
      f"repeating every {soak.cycle_length} requests; {len(compiles_warmup)} programs compiled "
      "so far")

  soak.measure_start = soak.now()
  soak.sample(soak.measure_start)
  measure_seconds = soak.run("measure", args.minutes * 60, rate=rate)
  soak.measure_tokens = soak.phase_tokens
  soak.measure_saturated = soak.saturated_steps / max(soak.steps_in_phase, 1)
  soak.memory_end = soak.memory[-1][1] if soak.memory else None
  drain_seconds = soak.run("drain", args.drain_timeout)
  drain_finished = server.idle
  if not drain_finished:
    soak.note(f"drain: {server.num_running} running and {server.num_waiting} waiting after "
              f"{args.drain_timeout:g} s")
  soak.account(server.drain())
  soak.clock.close()
  compiles_after = compiles.names[len(compiles_warmup):]

  summary = summarize(soak, args, compile_seconds=compile_seconds,
                      warmup_seconds=warmup_seconds, measure_seconds=measure_seconds,
                      drain_seconds=drain_seconds, drain_finished=drain_finished,
                      compiles_warmup=compiles_warmup, compiles_after=compiles_after,
                      rate=rate)
  for line in summary_lines(summary):
    log(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1, default=str)
  return summary


if __name__ == "__main__":
  sys.exit(0 if main(sys.argv[1:])["passed"] else 1)
