"""The kernel-profiling helpers of benchmarks/cuda on the CPU: the figures of benchmarks/NOTES.md that
come from them depend on their parsing, which needs no GPU."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cuda"))
import parts_by_sm  # noqa: E402
import stalls_by_line  # noqa: E402


@pytest.mark.parametrize("ncu_name, core", [
    ("void jax_flashmla::sm90::decode_narrow_kernel<(int)16>(CUtensorMap_st, "
     "jax_flashmla::DecodeParams)", "decode_narrow_kernelILi16EE"),
    ("void jax_flashmla::sm90::decode_narrow_kernel<(int)32>(CUtensorMap_st, "
     "jax_flashmla::DecodeParams)", "decode_narrow_kernelILi32EE"),
    ("jax_flashmla::sm90::decode_wide_kernel(CUtensorMap_st, jax_flashmla::DecodeParams)",
     "decode_wide_kernel"),
])
def test_mangled_core_tells_template_instances_apart(ncu_name, core):
  assert stalls_by_line.mangled_core(ncu_name) == core
  # ...and is found in the real mangled names nvcc gives the kernels.
  params = "14CUtensorMap_stNS_12DecodeParamsE"
  mangled = {16: "_ZN12jax_flashmla4sm9020decode_narrow_kernelILi16EEEv" + params,
             32: "_ZN12jax_flashmla4sm9020decode_narrow_kernelILi32EEEv" + params,
             0: "_ZN12jax_flashmla4sm9018decode_wide_kernelE" + params}
  hits = [k for k, m in mangled.items() if core in m]
  assert len(hits) == 1


def write_dump(path, launches):
  with open(path, "w") as f:
    f.write("# a comment line, as the session logs add\n")
    for parts in launches:
      f.write(f"# launch of {len(parts)} parts\n")
      for row in parts:
        f.write("%d %d %d %d %.3f %.3f\n" % row)


def test_pace_by_sm_finds_the_sms_that_are_fast_in_every_launch(tmp_path, capsys):
  # 12 parts of 100 pages per launch, on a different SM order each time; SMs 3 and 7 take 0.85x
  # as long per page, SM 5 is slow in one launch only, and the last part is short (ignored).
  launches = []
  for shift in (0, 5):
    parts = []
    for i in range(12):
      sm = (i + shift) % 12
      pace = 2.0 * (0.85 if sm in (3, 7) else 1.0) * (1.3 if (sm == 5 and shift == 0) else 1.0)
      pages = 100 if i < 11 else 10
      parts.append((i, sm, pages, 2, 0.0, pages * pace))
    launches.append(parts)
  path = tmp_path / "parts.txt"
  write_dump(path, launches)

  per_sm = parts_by_sm.pace_by_sm(str(path))
  assert sorted(sm for sm, p in per_sm.items() if p < 0.95) == [3, 7]
  assert per_sm[3] == pytest.approx(0.85)
  assert per_sm[5] == pytest.approx((1.3 + 1.0) / 2)
  parts_by_sm.main(str(path))
  assert "fast (< 0.95): 2 SMs, mean 0.850: [3, 7]" in capsys.readouterr().out
