#!/usr/bin/env bash
# v3.5 against v3.4 (the narrow kernel for 32 query rows too): correctness, then sustained time
# and energy per call, interleaved. Build each tree with tests/cuda/build.sh's nvcc line and
# -o tests/cuda/build/check_decode_<name>: v3.4 (f4c535d) -> check_decode_v34, v3.5 ->
# check_decode_n32. 16 rows: both run the narrow kernel (v3.5's epilogue merges in two halves
# through the Q tiles); 32 rows: v3.4 runs the wide kernel, v3.5 narrow<32>.
cd "$(dirname "$0")/../.."
B=tests/cuda/build
timeout 120 $B/check_decode_n32 2>&1 | grep -E "FAIL|correctness"
for cn in 2,8192,16,1:5000 2,32768,16,0:1300 1,8192,32,0:5000 1,8192,16,0:5000 1,32768,16,0:1300; do
  cfg=${cn%%:*}; n=${cn##*:}
  for round in 1 2; do
    for v in v34 n32; do
      echo "$cfg $v: $(timeout 120 $B/check_decode_$v --bench --no-bw --reps 5 --only $cfg \
        --energy $n 2>&1 | grep -E 'energy|^ *[12] +[0-9]+' | tr -s ' ' | tr '\n' '|')"
    done
  done
done
