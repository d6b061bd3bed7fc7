"""The serving loop (`jax_flashmla.serving.Server`) step by step, and `benchmarks/soak.py`: a
one-minute soak on the CPU with every check it makes, and the checks themselves catching faults.
(The ten-minute H200 soak is recorded in tests/GPU_RESULTS.md.)"""

import json
import os
import stat
import sys

import jax
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_flashmla import demo  # noqa: E402
from jax_flashmla.layers import MLAConfig  # noqa: E402
from jax_flashmla.serving import CANCELLED, DONE, RUNNING, WAITING, Request, Server  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import soak  # noqa: E402

VOCAB = 64


def _server(*, batch_size=2, num_blocks=4, max_seq_len=200, chunk=16, **kw) -> Server:
  config = demo.ModelConfig(MLAConfig(hidden_size=64, num_heads=2), num_layers=1,
                            vocab_size=VOCAB, intermediate_size=64)
  model = demo.DemoModel(config, rngs=nnx.Rngs(0))
  return Server(model, batch_size=batch_size, max_seq_len=max_seq_len, num_blocks=num_blocks,
                chunk=chunk, implementation=None, log=lambda _: None, **kw)


def _request(rng, prompt_len, max_new) -> Request:
  return Request(rng.integers(0, VOCAB, prompt_len, dtype=np.int32), max_new)


def _step_checked(server: Server):
  """One step, then the pool's invariants and the device lengths against the host's."""
  result = server.step()
  assert server.audit() == []
  lengths = np.asarray(server.caches[0].lengths)
  host = server.slot_lengths()
  np.testing.assert_array_equal(lengths[host >= 0], host[host >= 0])
  return result


# ------------------------------------------------------------------------------------------------
# Server semantics
# ------------------------------------------------------------------------------------------------

def test_cancel_frees_a_running_requests_pages_at_once():
  rng = np.random.default_rng(0)
  server = _server(batch_size=2, num_blocks=6)
  long, short = _request(rng, 150, 20), _request(rng, 5, 3)
  long_id, short_id = server.submit(long), server.submit(short)
  for _ in range(3):
    _step_checked(server)
  assert long.status == RUNNING and server.allocator.pages(0)  # reading its prompt
  held = len(server.allocator.pages(0))
  free = server.allocator.num_free

  assert server.cancel(long_id)
  assert long.status == CANCELLED and server.allocator.pages(0) == ()
  assert server.allocator.num_free == free + held and server.audit() == []
  assert not server.cancel(long_id)  # already cancelled: nothing changes
  assert not server.cancel(12345)    # unknown

  completed = []
  while not server.idle:
    completed += _step_checked(server).completed
  completed += server.drain()
  assert {r.id for r in completed} == {long_id, short_id}
  assert long.output == [] and long.num_generated == 0
  assert short.status == DONE and len(short.output) == 3
  assert server.allocator.num_free == 6 and server.num_cancelled == 1


def test_cancelled_mid_generation_keeps_the_tokens_it_sampled():
  rng = np.random.default_rng(1)
  server = _server(batch_size=1, num_blocks=4)
  request = _request(rng, 10, 30)
  rid = server.submit(request)
  while request.num_generated < 5:
    _step_checked(server)
  assert server.cancel(rid) and server.allocator.num_free == 4
  assert server.step() is None  # nothing left to run
  (done,) = server.drain()
  assert done is request and len(request.output) == 5
  assert all(0 <= t < VOCAB for t in request.output)


def test_cancel_while_waiting_leaves_the_queue():
  rng = np.random.default_rng(2)
  server = _server(batch_size=1, num_blocks=4)
  first, second, third = (_request(rng, 8, 4) for _ in range(3))
  ids = [server.submit(r) for r in (first, second, third)]
  _step_checked(server)
  assert server.waiting_ids() == ids[1:]
  assert server.cancel(ids[1]) and second.status == CANCELLED
  assert server.waiting_ids() == [ids[2]]
  while not server.idle:
    _step_checked(server)
  server.drain()
  assert second.output == [] and len(first.output) == len(third.output) == 4


def test_an_exhausted_pool_makes_requests_wait_and_drops_none():
  rng = np.random.default_rng(3)
  # 3 slots, 4 pages: each request's worst case takes 2 pages, so only two run at a time.
  server = _server(batch_size=3, num_blocks=4, max_seq_len=128)
  requests = [_request(rng, int(rng.integers(70, 100)), int(rng.integers(1, 12)))
              for _ in range(7)]
  for r in requests:
    server.submit(r)
  results = []
  while not server.idle:
    results.append(_step_checked(server))
    assert server.num_running <= 2
    assert server.allocator.num_used <= 4
  assert sum(r.pool_wait for r in results) > 0 and server.pool_waits > 0
  server.drain()
  for r in requests:
    assert r.status == DONE and len(r.output) == r.max_new_tokens
  assert server.num_submitted == server.num_finished == 7
  assert server.allocator.num_free == 4 and server.audit() == []


def test_a_request_that_can_never_fit_is_refused_at_submit():
  server = _server(num_blocks=2, max_seq_len=1000)
  rng = np.random.default_rng(4)
  with pytest.raises(ValueError, match=r"request: 199 tokens need 4 pages; the pool has 2"):
    server.submit(_request(rng, 190, 10))
  with pytest.raises(ValueError, match=r"max_new_tokens >= 1"):
    server.submit(_request(rng, 10, 0))
  r = _request(rng, 10, 2)
  server.submit(r)
  with pytest.raises(ValueError, match="already submitted"):
    server.submit(r)
  assert server.num_submitted == 1 and server.num_waiting == 1


def test_outputs_do_not_depend_on_when_they_are_fetched():
  # The tokens reach the host `output_lag` steps late, in batches; what they are must not
  # change. (A reused slot that was not reset would also change them, at random.)
  def serve(output_lag):
    rng = np.random.default_rng(5)
    requests = [_request(rng, int(rng.integers(2, 90)), int(rng.integers(1, 9)))
                for _ in range(6)]
    _server(batch_size=2, num_blocks=4, output_lag=output_lag).serve(requests)
    return [r.output for r in requests]

  first = serve(1)
  assert all(first)
  assert serve(3) == first
  assert serve(1000) == first


def test_step_reports_what_it_did():
  rng = np.random.default_rng(6)
  server = _server(batch_size=2, num_blocks=4, chunk=16)
  a, b = _request(rng, 20, 2), _request(rng, 3, 1)
  server.submit(a)
  server.submit(b)
  first = server.step()
  assert first.admitted == (a.id, b.id) and first.width == 16
  assert first.prompt_tokens == 16 + 3 and first.generated == 1  # b's prompt fits one chunk
  assert first.finished == (b.id,) and b.status == DONE and server.num_running == 1
  second = server.step()
  assert (second.width, second.prompt_tokens, second.generated) == (16, 4, 1)
  third = server.step()
  assert (third.width, third.generated, third.finished) == (1, 1, (a.id,))
  assert server.step() is None and server.idle
  assert {r.id for r in server.drain()} == {a.id, b.id}
  assert server.steps == 3 and server.chunk_steps == 2 and server.tokens_generated == 3


# ------------------------------------------------------------------------------------------------
# The soak's checks
# ------------------------------------------------------------------------------------------------

def test_cross_check_catches_a_wrong_decode(monkeypatch):
  rng = np.random.default_rng(7)
  server = _server(batch_size=2, num_blocks=6)
  for r in (_request(rng, 70, 5), _request(rng, 9, 5)):
    server.submit(r)
  for _ in range(3):
    server.step()
  cache = server.caches[0]
  args = (cache.pages, cache.block_table, cache.lengths, np.uint32(0))
  scale = MLAConfig(hidden_size=64, num_heads=2).softmax_scale

  out, lse, lengths = soak.make_cross_check(None, 2, scale)(*args, s_q=16)
  assert bool(out.passed) and bool(lse.passed)
  np.testing.assert_array_equal(np.asarray(lengths), server.slot_lengths())

  real = soak.flash_mla_with_kvcache

  def off_by_a_little(*a, implementation=None, **kw):  # the tested path is 2% off
    out, lse = real(*a, implementation=implementation, **kw)
    return (out, lse) if implementation == "xla" else (out * 1.02, lse + 1e-3)

  monkeypatch.setattr(soak, "flash_mla_with_kvcache", off_by_a_little)
  out, lse, _ = soak.make_cross_check(None, 2, scale)(*args, s_q=1)
  assert not bool(out.passed) and int(out.out_of_tolerance) > 0
  assert not bool(lse.passed)
  assert "elements out of tolerance" in out.describe("out", **soak.testing.OUT_TOL)


def test_clock_sampler_reads_nvidia_smi_without_waiting(tmp_path, monkeypatch):
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\necho '1755, 612.50, 700.00'\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  sampler = soak.ClockSampler(enabled=True)
  assert sampler.exe == str(fake)
  for t in range(4):
    sampler.poll(float(t))
    sampler._proc.wait()
  sampler.close()
  assert len(sampler.samples) == 3 and sampler.samples[0] == (0.0, 1755.0, 612.5, 700.0)
  summary = sampler.summary({"first": (0, 1.5), "last": (1.5, 3)})
  assert summary["sm_mhz_median"] == 1755 and summary["power_limit_w"] == 700
  assert summary["sm_mhz_median_first"] == 1755
  assert soak.ClockSampler(enabled=False).summary({}) is None


def test_soak_reports_memory_and_clocks_and_fails_when_an_audit_does(tmp_path, monkeypatch):
  # The GPU-only parts of the summary, with a fake memory counter and a fake nvidia-smi; and one
  # failed audit of the pool (of thousands) must fail the run.
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\necho '1980, 650.00, 700.00'\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setattr(soak, "on_gpu", lambda: True)
  monkeypatch.setattr(soak, "device_bytes_in_use", lambda: 2**30)
  audits = []
  real_audit = Server.audit

  def audit(self):
    audits.append(1)
    return real_audit(self) + (["pages: injected"] if len(audits) == 50 else [])

  monkeypatch.setattr(Server, "audit", audit)
  lines = []
  summary = soak.main(["--preset", "small", "--minutes", "0.1", "--warmup", "2",
                       "--progress-every", "1", "--dtype", "float32"], log=lines.append)
  text = "\n".join(lines)
  assert "device memory in use: first 1.0000 GiB, max 1.0000 GiB, last 1.0000 GiB" in text
  assert "SM clock (nvidia-smi" in text and "min 1980" in text
  assert summary["checks"]["device memory flat (1%)"] is True
  assert summary["checks"]["pages balanced at every step"] is False
  assert not summary["passed"] and lines[-1].startswith("soak: FAIL (")
  assert "pages: injected" in text


# ------------------------------------------------------------------------------------------------
# The one-minute soak
# ------------------------------------------------------------------------------------------------

def test_one_minute_soak_on_cpu(tmp_path):
  out = tmp_path / "soak.json"
  lines = []
  summary = soak.main(["--preset", "small", "--minutes", "1", "--seed", "0", "--json",
                       str(out)], log=lines.append)
  text = "\n".join(lines)
  assert summary["passed"], text
  assert json.loads(out.read_text())["passed"]
  r, st, x = summary["requests"], summary["steps"], summary["cross_checks"]
  # Nothing lost or cut short, pages balanced after every step, no recompilation.
  assert r["lost"] == r["truncated"] == r["cancelled_with_missing_tokens"] == 0, text
  assert r["submitted"] == r["done"] + r["cancelled"] > 100
  assert st["unbalanced"] == 0 and st["audited"] == st["total"]
  assert summary["compiles"]["after_warmup"] == 0, summary["compiles"]
  # The checks ran: cross-checks of both step shapes with no mismatch, lengths as the host's.
  assert x["count"] >= 10 and x["mismatches"] == x["length_mismatches"] == 0
  assert x["widths"] == [1, 16]
  # What the soak is for actually happened: cancellations of each kind, bursts, requests held
  # back by the pool (not only by the slots).
  assert all(n > 0 for n in r["cancelled_by"].values()), r
  assert r["bursts"] >= 1 and r["burst_requests"] > 0
  assert st["pool_waits"] > 0
  # On the CPU the steady checks are reported, not enforced; memory_stats() is None here.
  assert set(summary["reported_only"]) == {"device memory flat (1%)",
                                           "throughput steady (5%, last cycle / first)"}
  assert summary["device_memory"] is None or jax.default_backend() != "cpu"
  assert lines[-1] == "soak: PASS"
