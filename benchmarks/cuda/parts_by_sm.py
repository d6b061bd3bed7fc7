"""Which SMs run the decode kernel's parts fast, from the timing build's per-part dumps.

    JFM_TIMING_DUMP=parts.txt build/tools/bench_kernels_timing --no-bw --reps 5 \\
        --only 1,8192,16,0          # once or more; each launch appends its parts
    python3 benchmarks/cuda/parts_by_sm.py parts.txt

(STEPS=timing benchmarks/cuda/run_device.sh does both at the corners.)

A part's pace is its time per page (end - start over pages). The scheduler gives every part about
the same pages, so a part that ends early either got less work or ran on a faster SM. Paces are
normalised by each launch's median, then averaged per SM over all launches; an SM that is fast in
every launch is a property of the chip, which a static split cannot balance.
"""

import sys
from collections import defaultdict
from statistics import mean, median


def launches(path):
  """Lists of (part, sm, pages, chunks, start_us, end_us), one per launch in the file."""
  out = []
  for line in open(path):
    if line.startswith("# launch"):
      out.append([])
    elif line.strip() and not line.startswith("#"):
      part, sm, pages, chunks, start, end = line.split()
      out[-1].append((int(part), int(sm), float(pages), float(chunks), float(start), float(end)))
  return out


def pace_by_sm(path, min_pages=32):
  """{SM: its parts' time per page over each launch's median, averaged over launches}."""
  pace = defaultdict(list)
  for parts in launches(path):
    rows = [(sm, (end - start) / pages) for _, sm, pages, _, start, end in parts
            if pages >= min_pages]  # a short last part's fixed costs would dominate its pace
    if not rows:
      continue
    mid = median(p for _, p in rows)
    for sm, p in rows:
      pace[sm].append(p / mid)
  return {sm: mean(v) for sm, v in pace.items()}


def main(path):
  per_sm = pace_by_sm(path)
  fast = sorted(sm for sm, p in per_sm.items() if p < 0.95)
  slow = sorted(sm for sm, p in per_sm.items() if p > 1.05)
  print(f"{len(per_sm)} SMs; time per page relative to each launch's median, mean over launches")
  for lo in range(0, max(per_sm) + 1, 12):
    print("  " + " ".join(f"{sm:3d}:{per_sm[sm]:.3f}" for sm in range(lo, lo + 12) if sm in per_sm))
  for name, sms in (("fast (< 0.95)", fast), ("slow (> 1.05)", slow)):
    paces = [per_sm[sm] for sm in sms]
    print(f"{name}: {len(sms)} SMs" + (f", mean {mean(paces):.3f}: {sms}" if sms else ""))


if __name__ == "__main__":
  main(sys.argv[1])
