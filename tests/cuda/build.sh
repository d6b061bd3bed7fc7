#!/usr/bin/env bash
# Builds the standalone checker (release, watchdog and per-CTA timing variants) and the read floor
# (read_floor.cu) into tests/cuda/build/.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p tests/cuda/build
FLAGS="-gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -lineinfo -Isrc"
SRCS="tests/cuda/check_decode.cu src/kernels/sm90/decode/dense/launch.cu"
nvcc $FLAGS -Xptxas -v $SRCS -o tests/cuda/build/check_decode 2> tests/cuda/build/ptxas.log
nvcc $FLAGS -DJFM_WATCHDOG $SRCS -o tests/cuda/build/check_decode_wd
nvcc $FLAGS -DJFM_TIMING $SRCS -o tests/cuda/build/check_decode_timing
nvcc $FLAGS tests/cuda/read_floor.cu -o tests/cuda/build/read_floor
grep -A2 "decode_main_sm90" tests/cuda/build/ptxas.log | grep -E "registers|spill" || true
