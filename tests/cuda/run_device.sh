#!/usr/bin/env bash
# One device call: (re)build if the carried binaries do not run there, then building blocks,
# correctness, SASS check and the benchmark. Logs go to $OUT (or ./_out). Never touches clocks.
cd "$(dirname "$0")/../.."
OUT=${OUT:-_out}
mkdir -p "$OUT"
B=tests/cuda/build
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if ! $B/check_decode --noop >/dev/null 2>&1; then
  echo "carried binary does not run here; rebuilding"; bash tests/cuda/build.sh
fi
timeout 60 $B/check_decode --prims 2>&1 | tee "$OUT/prims.log"
timeout 240 $B/check_decode ${CHECK_ARGS:-} 2>&1 | tee "$OUT/check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 3 ] || [ "$rc" = 124 ]; then
  echo "== hang: rerunning with the watchdog build"
  timeout 120 $B/check_decode_wd ${CHECK_ARGS:-} 2>&1 | tail -40 | tee "$OUT/check_wd.log"
fi
cuobjdump --dump-sass $B/check_decode 2>/dev/null | grep -o "HGMMA[.0-9A-Zx]*\|UTMALDG[.0-9A-Z]*" | sort | uniq -c > "$OUT/sass_summary.txt"
cat "$OUT/sass_summary.txt"
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout 240 $B/check_decode --bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv >> "$OUT/gpu.txt" 2>&1
