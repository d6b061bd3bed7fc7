#!/usr/bin/env bash
# One device call: configure and build the standalone CUDA tools with CMake
# (JAX_FLASHMLA_BUILD_TOOLS=ON, into $BUILD, default build/tools; incremental when it is already
# there), then run the steps named in STEPS. Logs go to $OUT (or ./_out). Never touches clocks or
# GPU settings. Needs nvcc, and a python3 with jax, nanobind, cmake and ninja (the extension's
# build requirements: the tools are configured by the same CMakeLists.txt).
#   prims   building blocks (check_decode --prims)
#   check   correctness of the shipped path against the float64 reference (check_decode); on a
#           hang, the watchdog build says which barrier wait is stuck
#   sass    instruction summary and the wgmma serialization guard (tests/cuda/check_sass.sh)
#   bench   the full benchmark grid (bench_kernels), JSON in $OUT/bench.json
#   ab      the corners with the default kernels, with JAX_FLASHMLA_DECODE_KERNEL=wide, and
#           without PDL
#   timing  per-part start/end at the corners (bench_kernels_timing), parts dump for
#           parts_by_sm.py in $OUT/parts.txt
#   ncu     Nsight Compute sections at the corners
#   stalls  warp-stall samples per kernel source line at both corners (L=8192), via
#           stalls_by_line.py (needs nvdisasm there; without it, run the script elsewhere on the
#           returned CSVs)
#   floor   read_floor at the memory corner (what reading the cache's bytes alone costs)
#   percall the per-call floor (bench_kernels --floor): an empty batch and two tiny ones, host and
#           GPU microseconds per decode call; then without PDL
set -u  # a failing step does not stop the next ones
cd "$(dirname "$0")/../.."
OUT=${OUT:-_out}
STEPS=${STEPS:-"prims check sass bench ab ncu"}
BUILD=${BUILD:-build/tools}
mkdir -p "$OUT"
has() { [[ " $STEPS " == *" $1 "* ]]; }
B=$BUILD

export PATH="$PATH:/usr/local/cuda/bin"
# cmake and ninja may come as Python packages whose scripts are not on PATH.
py_attr() { python3 -c "import $1; print($1.$2)" 2>/dev/null || true; }
command -v cmake >/dev/null || PATH="$PATH:$(py_attr cmake CMAKE_BIN_DIR)"
command -v ninja >/dev/null || PATH="$PATH:$(py_attr ninja BIN_DIR)"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

cmake -S . -B "$B" -G Ninja -DJAX_FLASHMLA_BUILD_TOOLS=ON -DJAX_FLASHMLA_ENABLE_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v python3)" \
  > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build "$B" --target jax_flashmla_tools > "$OUT/build.log" 2>&1 ||
  { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }

if has prims; then timeout 60 "$B/check_decode" --prims 2>&1 | tee "$OUT/prims.log"; fi
if has check; then
  timeout 240 "$B/check_decode" 2>&1 | tee "$OUT/check.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 3 ] || [ "$rc" = 124 ]; then
    echo "== hang: rerunning with the watchdog build"
    timeout 120 "$B/check_decode_wd" 2>&1 | tail -40 | tee "$OUT/check_wd.log"
  fi
fi
if has sass; then
  cuobjdump --dump-sass "$B/check_decode" 2>/dev/null |
    grep -o "HGMMA[.0-9A-Zx]*\|UTMALDG[.0-9A-Z]*" | sort | uniq -c > "$OUT/sass_summary.txt"
  # Registers, stack (spills show as LOCAL) and shared memory of the shipped kernels.
  cuobjdump --dump-resource-usage "$B/check_decode" 2>/dev/null | grep -A1 "Function _ZN12jax" |
    grep -v "^--" >> "$OUT/sass_summary.txt"
  cat "$OUT/sass_summary.txt"
  bash tests/cuda/check_sass.sh "$B/check_decode" 2>&1 | tee -a "$OUT/sass_summary.txt"
fi
if has bench; then
  timeout 300 "$B/bench_kernels" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
if has ab; then
  {
    echo "== default kernels"; timeout 90 "$B/bench_kernels" --corners --no-bw
    echo "== JAX_FLASHMLA_DECODE_KERNEL=wide"
    JAX_FLASHMLA_DECODE_KERNEL=wide timeout 90 "$B/bench_kernels" --corners --no-bw
    echo "== no PDL"; timeout 90 "$B/bench_kernels" --corners --no-bw --no-pdl
  } 2>&1 | grep -v "^device" | tee "$OUT/ab.log"
fi
if has timing; then
  rm -f "$OUT/parts.txt"
  JFM_TIMING_DUMP="$OUT/parts.txt" timeout 120 "$B/bench_kernels_timing" --corners --no-bw \
    --reps 5 2>&1 | tee "$OUT/timing.log"
  python3 benchmarks/cuda/parts_by_sm.py "$OUT/parts.txt" 2>&1 | tee -a "$OUT/timing.log"
fi
if has ncu; then
  # The compute corner runs the wide kernel, the memory corners the narrow one (narrow.cuh).
  for corner in "compute 2,8192,128,0" "memory 1,8192,16,0" "memory_32k 1,32768,16,0"; do
    set -- $corner
    timeout 150 ncu --clock-control none -k regex:decode_ -c 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section ComputeWorkloadAnalysis \
      "$B/bench_kernels" --no-bw --reps 1 --only $2 > "$OUT/ncu_$1.txt" 2>&1
    echo "== ncu $1 corner"
    grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|L1/TEX Hit|Compute \(SM\)|Mem Busy|Max Bandwidth|Stall|stall|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc|SM Frequency|DRAM Frequency|ERROR" "$OUT/ncu_$1.txt" | cut -c1-220 | head -30
  done
fi
if has stalls; then
  # Each timed iteration launches the decode kernel twice (in a full call, then alone):
  # --launch-skip 2 profiles the second warm-up iteration's full call.
  for corner in "compute 2,8192,128,0 dense/wide.cuh" "memory 1,8192,16,0 dense/narrow.cuh"; do
    set -- $corner
    timeout 200 ncu --clock-control none --section SourceCounters -k regex:decode_ \
      --launch-skip 2 --launch-count 1 -o "$OUT/stalls_$1" -f \
      "$B/bench_kernels" --no-bw --reps 3 --only $2 > /dev/null 2>&1
    ncu --import "$OUT/stalls_$1.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/stalls_$1.csv" 2>&1 && rm -f "$OUT/stalls_$1.ncu-rep"
    echo "== stalls per line, $1 corner"
    python3 benchmarks/cuda/stalls_by_line.py "$OUT/stalls_$1.csv" "$B/bench_kernels" \
      --source $3 --top 25 2>&1 | tee "$OUT/stalls_$1.txt"
  done
fi
if has floor; then
  timeout 300 "$B/read_floor" --len 8192 2>&1 | tee "$OUT/read_floor.log"
fi
if has percall; then
  {
    timeout 120 "$B/bench_kernels" --floor
    echo "== no PDL"; timeout 120 "$B/bench_kernels" --floor --no-pdl
  } 2>&1 | grep -v "^device" | tee "$OUT/percall.log"
fi
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv >> "$OUT/gpu.txt" 2>&1
