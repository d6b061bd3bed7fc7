#!/usr/bin/env python3
"""Warp-stall samples of one kernel, summed per line of its source file.

    ncu --clock-control none --section SourceCounters -k regex:decode_wide --launch-skip 2 \
        --launch-count 1 -o prof build/tools/bench_kernels --no-bw --reps 3 \
        --only 2,8192,128,0
    ncu --import prof.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 benchmarks/cuda/stalls_by_line.py sass.csv build/tools/bench_kernels

ncu's SASS view gives samples per instruction address; the binary's line table (it is built with
-lineinfo; read with `nvdisasm -gi`) gives, per address, the chain of inlined calls. Each
instruction is charged to the outermost frame in --source (default: the kernel's file), so the
samples of an inlined helper land on the kernel line that calls it. Prints the stall reasons over
all samples, then the lines with the most samples and their main reasons; the text shown for a
line is the working tree's, so profile a binary built from it. cuobjdump and nvdisasm must be on
PATH.
"""

import argparse
import collections
import csv
import glob
import os
import re
import subprocess
import tempfile

LOC = re.compile(r'"([^"]+)", line (\d+)')
INST = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def line_table(binary, kernel, source):
  """{offset in the kernel's code: line of `source`} from the binary's line info."""
  with tempfile.TemporaryDirectory() as d:
    subprocess.run(["cuobjdump", "-xelf", "all", os.path.abspath(binary)], cwd=d, check=True,
                   capture_output=True)
    for cubin in sorted(glob.glob(os.path.join(d, "*.cubin"))):
      text = subprocess.run(["nvdisasm", "-gi", cubin], check=True, capture_output=True,
                            text=True).stdout
      m = re.search(rf"\n\.text\.{kernel}:", text)
      if m is None:
        continue
      start = m.start()
      end = text.find("\n//--------------------- ", start)
      table, line = {}, None
      for row in text[start:end if end > 0 else len(text)].splitlines():
        if row.lstrip().startswith("//## File"):
          in_source = [int(n) for f, n in LOC.findall(row) if f.endswith(source)]
          line = in_source[-1] if in_source else line
          continue
        m = INST.match(row)
        if m:
          table[int(m.group(1), 16)] = line
      return table
  raise SystemExit(f"no function matching {kernel} in {binary}")


def mangled_core(ncu_name):
  """The part of the kernel's mangled name that identifies it, from ncu's demangled name:
  the unqualified function name, plus a template's integer arguments, which ncu spells
  `decode_narrow_kernel<(int)16>` and the mangling `decode_narrow_kernelILi16EE`."""
  name = re.sub(r"\((?:unsigned )?(?:int|long|short|char|bool)\)", "", ncu_name)  # casts
  name = re.sub(r"\(.*", "", name).split("::")[-1]  # parameters and namespaces
  name, _, targs = name.partition("<")
  if not targs:
    return name
  return name + "I" + "".join(f"Li{a.strip()}E" for a in targs.rstrip(">").split(",")) + "E"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("csv", help="ncu --page source --csv --print-source sass output")
  p.add_argument("binary", help="the profiled executable, built with -lineinfo")
  p.add_argument("--source", default="dense/wide.cuh",
                 help="file whose lines are reported (a path suffix)")
  p.add_argument("--top", type=int, default=40)
  args = p.parse_args(argv)

  rows = list(csv.reader(open(args.csv)))
  kernel_row = next(r for r in rows if r and r[0] == "Kernel Name")
  header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
  header, data = rows[header_at], [r for r in rows[header_at + 1:] if len(r) > 2]
  samples = header.index("Warp Stall Sampling (All Samples)")
  reasons = [(i, h[len("stall_"):]) for i, h in enumerate(header)
             if h.startswith("stall_") and "(Not Issued)" not in h]
  # ncu names the kernel demangled; the disassembly uses the mangled name, which contains the
  # unqualified function name.
  mangled = mangled_core(kernel_row[1])
  num = lambda x: float(x) if re.fullmatch(r"[0-9.]+", x) else 0.0

  table = line_table(args.binary, rf"[A-Za-z0-9_]*{mangled}[A-Za-z0-9_]*", args.source)
  base = int(data[0][0], 16)
  per_line = collections.defaultdict(collections.Counter)
  total = collections.Counter()
  for r in data:
    line = table.get(int(r[0], 16) - base)
    per_line[line]["all"] += num(r[samples])
    for i, name in reasons:
      per_line[line][name] += num(r[i])
      total[name] += num(r[i])
  n = sum(c["all"] for c in per_line.values()) or 1.0
  print(f"{n:.0f} samples; by reason: " +
        ", ".join(f"{k} {v / n * 100:.1f}%" for k, v in total.most_common(8)))
  src = {}
  for f in glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "src", "**", args.source),
                     recursive=True):
    src = dict(enumerate(open(f).read().splitlines(), 1))
  for line, c in sorted(per_line.items(), key=lambda kv: -kv[1]["all"])[:args.top]:
    top = ", ".join(f"{k} {v / n * 100:.1f}" for k, v in c.most_common(4) if k != "all" and v)
    text = src.get(line, "?").strip()[:60]
    print(f"{line!s:>5} {c['all'] / n * 100:5.1f}%  {text:60s}  {top}")


if __name__ == "__main__":
  main()
