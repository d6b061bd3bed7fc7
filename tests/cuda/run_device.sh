#!/usr/bin/env bash
# One device call: (re)build if the carried binaries do not run there, then the steps named in
# STEPS (default: all). Logs go to $OUT (or ./_out). Never touches clocks or GPU settings.
#   prims  building blocks;  check  correctness;  sass  instruction summary and the
#   serialization guard;  bench  full DESIGN §6 grid;  ab  corner configs with each experiment
#   switch;  ncu  Nsight Compute sections for both corners (memory: L=8192 and 32768);
#   stalls  warp-stall samples per kernel source line at both corners (L=8192), via
#   stalls_by_line.py (needs nvdisasm there; without it, run the script here on the returned CSVs).
#   An optional earlier build at $B/check_decode_v2 is timed on the corners too (A/B in one run).
cd "$(dirname "$0")/../.."
OUT=${OUT:-_out}
STEPS=${STEPS:-"prims check sass bench ab ncu"}
mkdir -p "$OUT"
B=tests/cuda/build
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if ! $B/check_decode --noop >/dev/null 2>&1; then
  echo "carried binary does not run here; rebuilding"; bash tests/cuda/build.sh
fi
if has prims; then timeout 60 $B/check_decode --prims 2>&1 | tee "$OUT/prims.log"; fi
if has check; then
  timeout 240 $B/check_decode 2>&1 | tee "$OUT/check.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 3 ] || [ "$rc" = 124 ]; then
    echo "== hang: rerunning with the watchdog build"
    timeout 120 $B/check_decode_wd 2>&1 | tail -40 | tee "$OUT/check_wd.log"
  fi
fi
if has sass; then
  cuobjdump --dump-sass $B/check_decode 2>/dev/null | grep -o "HGMMA[.0-9A-Zx]*\|UTMALDG[.0-9A-Z]*" | sort | uniq -c > "$OUT/sass_summary.txt"
  cat "$OUT/sass_summary.txt"
  bash tests/cuda/check_sass.sh $B/check_decode 2>&1 | tee -a "$OUT/sass_summary.txt"
fi
if has bench; then
  timeout 240 $B/check_decode --bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
if has ab; then
  {
    if [ -x $B/check_decode_v2 ]; then
      echo "== previous build (check_decode_v2)"
      timeout 60 $B/check_decode_v2 --bench --corners --no-bw
    fi
    echo "== scheduler overhead 2"; timeout 60 $B/check_decode --bench --corners --no-bw --overhead 2
    echo "== default again (spread)"; timeout 60 $B/check_decode --bench --corners --no-bw
  } 2>&1 | grep -v "^device" | tee "$OUT/ab.log"
fi
if has ncu; then
  # The compute corner runs the wide kernel, the memory corner the narrow one (decode_narrow.cuh).
  for corner in "compute 2,8192,128,0" "memory 1,8192,16,0" "memory_32k 1,32768,16,0"; do
    set -- $corner
    timeout 150 ncu --clock-control none -k regex:decode_ -c 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section ComputeWorkloadAnalysis \
      $B/check_decode --bench --no-bw --reps 1 --only $2 > "$OUT/ncu_$1.txt" 2>&1
    echo "== ncu $1 corner"
    grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|L1/TEX Hit|Compute \(SM\)|Mem Busy|Max Bandwidth|Stall|stall|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc|SM Frequency|DRAM Frequency|ERROR" "$OUT/ncu_$1.txt" | cut -c1-220 | head -30
  done
fi
if has stalls; then
  # The memory corner (16 query rows) runs the narrow kernel (decode_narrow.cuh).
  for corner in "compute 2,8192,128,0 decode_wgmma.cuh" "memory 1,8192,16,0 decode_narrow.cuh"; do
    set -- $corner
    timeout 200 ncu --clock-control none --section SourceCounters -k regex:decode_ \
      --launch-skip 2 --launch-count 1 -o "$OUT/stalls_$1" -f \
      $B/check_decode --bench --no-bw --reps 3 --only $2 > /dev/null 2>&1
    ncu --import "$OUT/stalls_$1.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/stalls_$1.csv" 2>&1 && rm -f "$OUT/stalls_$1.ncu-rep"
    echo "== stalls per line, $1 corner"
    python3 tests/cuda/stalls_by_line.py "$OUT/stalls_$1.csv" $B/check_decode --source $3 --top 25 \
      2>&1 | tee "$OUT/stalls_$1.txt"
  done
fi
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv >> "$OUT/gpu.txt" 2>&1
