"""FlashMLA, the anchor the benchmarks compare with: imported when it is there, timed as it runs.

FlashMLA (deepseek-ai/FlashMLA) is a PyTorch extension; the shared kit (shared/anchors/flashmla,
outside the repository) builds it on the H200. The benchmarks import it through `load()`, which
says why not when it cannot (no torch, no `flash_mla` on the path, no GPU), and time one call by
CUDA-graph replay (`graph_seconds`): scheduler records reused, split kernel and combine, no host
work, which is how a serving loop runs it. Ours is timed beside it by `slope_seconds`, the
per-call slope of a jitted program of many decode calls.
"""

from __future__ import annotations

import time

import jax


def load():
  """(torch, flash_mla) or (None, reason)."""
  try:
    import torch  # noqa: PLC0415
    import flash_mla  # noqa: PLC0415
  except ImportError as e:
    return None, f"FlashMLA not importable ({e}); put the kit's flash_mla on PYTHONPATH"
  if not torch.cuda.is_available():
    return None, "FlashMLA needs a CUDA GPU"
  return (torch, flash_mla), None


def to_torch(torch, x):
  """A JAX array on the GPU as a torch tensor over the same memory (DLPack, no copy)."""
  return torch.from_dlpack(x)


def graph_seconds(torch, fn, iters: int = 50) -> float:
  """Seconds per call of `fn` replayed in a CUDA graph: median of 5 runs of `iters` replays."""
  for _ in range(3):
    fn()
  torch.cuda.synchronize()
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    fn()
  for _ in range(3):
    graph.replay()
  times = []
  for _ in range(5):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
      graph.replay()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / iters / 1e3)
  return sorted(times)[2]


def slope_seconds(fn, args, calls_per_run: int) -> float:
  """Seconds per call of ours: `fn(*args)` (a jitted program of `calls_per_run` calls) run n1
  and n2 times back to back; the slope between the two counts, median of three, leaves out
  the per-program launch and wait."""
  def wall(n):
    t0 = time.perf_counter()
    for _ in range(n):
      o = fn(*args)
    jax.block_until_ready(o)
    return time.perf_counter() - t0

  wall(2)
  one = wall(1)
  n1, n2 = 2, 2 + max(3, min(40, int(0.4 / max(one, 1e-5))))
  return sorted((wall(n2) - wall(n1)) / ((n2 - n1) * calls_per_run) for _ in range(3))[1]


def dense_decode_seconds(anchor, q, k_cache, block_table, cache_seqlens, causal: bool) -> float:
  """FlashMLA's dense bf16 decode on the same (JAX) arrays: seconds per call."""
  torch, flash_mla = anchor
  qt, kt = to_torch(torch, q), to_torch(torch, k_cache)
  bt, lens = to_torch(torch, block_table), to_torch(torch, cache_seqlens)
  meta, _ = flash_mla.get_mla_metadata()
  return graph_seconds(torch, lambda: flash_mla.flash_mla_with_kvcache(
      qt, kt, bt, lens, 512, meta, None, causal=causal))
