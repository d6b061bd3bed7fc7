"""The benchmark scripts on the CPU: tiny configs through the XLA path, and the trace parser on a
hand-written perfetto trace (the GPU runs are recorded in benchmarks/NOTES.md)."""

import gzip
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_decode  # noqa: E402


def test_layer_inputs_relabel_pages_per_layer():
  key = jax.random.PRNGKey(0)
  k_cache, block_table, lens, _ = bench_decode.make_inputs(key, 4, 200, 1)
  qs, bts = bench_decode.layer_inputs(key, (4, 1, 16, 576), block_table, k_cache.shape[0], 3)
  assert len(qs) == len(bts) == 3
  assert not np.array_equal(np.asarray(qs[0]), np.asarray(qs[1]))
  base = np.asarray(block_table)
  np.testing.assert_array_equal(np.asarray(bts[0]), base)
  used = -(-np.asarray(lens) // 64)
  for bt in bts[1:]:
    bt = np.asarray(bt)
    assert not np.array_equal(bt, base)
    # A relabelling: equal ids stay equal, different ids stay different, all stay in the pool.
    for i in range(4):
      for j in range(4):
        a, b = base[i, :used[i]], base[j, :used[j]]
        ra, rb = bt[i, :used[i]], bt[j, :used[j]]
        np.testing.assert_array_equal(a[:, None] == b[None, :], ra[:, None] == rb[None, :])
    assert bt.min() >= 0 and bt.max() < k_cache.shape[0]


def test_bench_one_config_writes_json(tmp_path):
  out = tmp_path / "b.json"
  bench_decode.main(["--b", "2", "--len", "100", "--s-q", "2", "--h-q", "16", "--layers", "2",
                     "--repeats", "1", "--steps", "2", "--implementations", "xla",
                     "--causal", "true", "--json", str(out)])
  data = json.loads(out.read_text())
  assert data["meta"]["layers"] == 2 and data["meta"]["steps"] == 2
  (row,) = data["results"]
  assert (row["b"], row["s_q"], row["h_q"], row["causal"]) == (2, 2, 16, True)
  assert row["xla"]["ms"] > 0 and row["xla"]["tbps"] > 0
  assert "cuda" not in row and "gpu_ms" not in row["xla"]


def test_time_decode_runs_steps_programs_per_timed_run(monkeypatch):
  # A timed run is `steps` program calls dispatched back to back; the figure is per layer call.
  calls = []
  real = bench_decode.layered_program

  def counting(**kw):
    model = real(**kw)

    def wrapped(*args):
      calls.append(1)
      return model(*args)
    return wrapped

  monkeypatch.setattr(bench_decode, "layered_program", counting)
  key = jax.random.PRNGKey(1)
  k_cache, block_table, lens, _ = bench_decode.make_inputs(key, 2, 100, 1)
  qs, bts = bench_decode.layer_inputs(key, (2, 1, 16, 576), block_table, k_cache.shape[0], 2)
  wall, gpu = bench_decode.time_decode(qs, k_cache, bts, lens, causal=False, implementation="xla",
                                       repeats=2, steps=3)
  assert len(calls) == 3 * (1 + 2)  # warm-up run + 2 timed runs
  assert wall > 0 and gpu is None


def test_bench_batch_parallel_over_two_devices(tmp_path):
  out = tmp_path / "b.json"
  bench_decode.main(["--b", "4", "--len", "100", "--h-q", "16", "--layers", "2", "--repeats", "1",
                     "--implementations", "xla", "--devices", "2", "--json", str(out)])
  (row,) = json.loads(out.read_text())["results"]
  assert row["devices"] == 2 and row["xla"]["ms"] > 0


def test_gpu_kernel_events_reads_only_gpu_streams(tmp_path):
  events = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "tid": 10, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
      {"ph": "M", "pid": 2, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "X", "pid": 1, "tid": 5, "name": "host work", "ts": 0, "dur": 1000},
      {"ph": "X", "pid": 2, "tid": 11, "name": "custom-call", "ts": 100, "dur": 400},
      {"ph": "X", "pid": 2, "tid": 10, "name": "combine_kernel", "ts": 300, "dur": 5},
      {"ph": "X", "pid": 2, "tid": 10, "name": "decode_wide_kernel", "ts": 100, "dur": 200},
  ]
  d = tmp_path / "plugins" / "profile" / "run"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  assert bench_decode.gpu_kernel_events(str(tmp_path)) == [
      ("decode_wide_kernel", 100.0, 200.0), ("combine_kernel", 300.0, 5.0)]


def test_trace_decode_dispatches_steps_programs_per_run(monkeypatch, capsys):
  import trace_decode
  calls = []
  real = bench_decode.layered_program

  def counting_program(**kwargs):
    model = real(**kwargs)
    return lambda *args: (calls.append(1), model(*args))[1]

  monkeypatch.setattr(bench_decode, "layered_program", counting_program)
  trace_decode.main(["--b", "2", "--len", "100", "--layers", "2", "--steps", "3", "--runs", "1",
                     "--implementation", "xla"])
  # warm-up run, 5 timed runs, 1 traced run: each dispatches --steps programs
  assert len(calls) == 3 * (1 + 5 + 1)
  assert "2 layers, 3 program call(s) per run" in capsys.readouterr().out


def test_trace_decode_fit_steps_separates_per_call_from_per_run(monkeypatch, capsys):
  # A fake clock: each program call (2 layers) costs 2 x 100 us, each final wait 1 ms.
  import trace_decode
  clock = [0.0]
  real = bench_decode.layered_program

  def timed_program(**kwargs):
    model = real(**kwargs)

    def call(*args):
      clock[0] += 2 * 100e-6
      return model(*args)
    return call

  real_wait = jax.block_until_ready

  def timed_wait(x):
    clock[0] += 1e-3
    return real_wait(x)

  monkeypatch.setattr(bench_decode, "layered_program", timed_program)
  monkeypatch.setattr(trace_decode.jax, "block_until_ready", timed_wait)
  monkeypatch.setattr(trace_decode.time, "perf_counter", lambda: clock[0])
  trace_decode.main(["--b", "2", "--len", "100", "--layers", "2", "--implementation", "xla",
                     "--fit-steps", "1,3"])
  assert "fit: 100.0 us per call + 1.000 ms per run" in capsys.readouterr().out


def test_bench_without_flashmla_says_so_and_keeps_the_other_columns(tmp_path, capsys):
  # On a machine without torch/flash_mla the default FlashMLA column is dropped with a reason.
  out = tmp_path / "b.json"
  bench_decode.main(["--b", "2", "--len", "100", "--layers", "2", "--repeats", "1", "--steps",
                     "1", "--implementations", "xla,flashmla", "--json", str(out)])
  assert "# no FlashMLA column: " in capsys.readouterr().out
  (row,) = json.loads(out.read_text())["results"]
  assert "flashmla" not in row and row["xla"]["ms"] > 0


def test_fp8_side_by_side_on_the_pure_jax_path(tmp_path, monkeypatch):
  # The FP8 benchmark's own check (FP8 rows against the bf16 path over their dequantized rows)
  # and its counting, on tiny cases through the pure-JAX path.
  import fp8_side_by_side  # noqa: PLC0415

  out = tmp_path / "f.json"
  monkeypatch.setattr(sys, "argv", ["fp8_side_by_side.py", "--case", "2:1:16:fixed:100",
                                    "--case", "2:2:16:uniform:1:150:causal", "--no-flashmla",
                                    "--layers", "2", "--json", str(out)])
  fp8_side_by_side.main()
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["2:1:16:fixed:100", "2:2:16:uniform:1:150:causal"]
  for r in rows:
    assert fp8_side_by_side.ok(r["vs_dequantized_bf16"]), r["vs_dequantized_bf16"]
    assert r["fp8_us"] > 0 and r["bf16_us"] > 0 and "flashmla_bf16_us" not in r


def test_fp8_quantization_error_prints_each_kind(capsys):
  import fp8_quantization_error  # noqa: PLC0415

  fp8_quantization_error.main()
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines[1:]] == ["normal", "outliers", "channel"]
  # N(0, 1) rows: e4m3's 3 mantissa bits give a few percent, never more than 2^-4 of the norm.
  assert 0.0 < float(lines[1].split()[1]) < 2.0**-4
