"""The FP8 dequantization's bit manipulations (src/kernels/sm90/decode/dense/fp8_bits.h) against
the first kernels' formulas, on the CPU: tests/cuda/check_fp8_bits.cpp, built with the host C++
compiler (skipped without one). The kernels themselves are checked on the GPU by test_gpu_fp8.py.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_fp8_dequant_bits_match_reference(tmp_path):
  cxx = os.environ.get("CXX") or next(
      (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
  if cxx is None:
    pytest.skip("no host C++ compiler")
  exe = tmp_path / "check_fp8_bits"
  subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'src'}",
                  str(ROOT / "tests" / "cuda" / "check_fp8_bits.cpp"), "-o", str(exe)],
                 check=True)
  out = subprocess.run([str(exe)], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "check_fp8_bits: ok" in out.stdout
