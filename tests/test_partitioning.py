"""Sharding with JAX's own partitioner: the rules of `jax_flashmla/partitioning.py`.

CPU tier: 8 host devices (conftest.py sets the flag). The CPU lowering goes through the same
`custom_partitioning` rule as the CUDA call, so these tests exercise exactly that rule: each
compares the sharded result with the single-device one and counts collectives in the compiled
HLO. GPU tier: the same tests on a one-device mesh with implementation="cuda".
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flashmla
from jax_flashmla import partitioning
from mla_cases import INVALID_PAGE, check_close, check_decode, make_case, oracle

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_COLLECTIVE_RE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
NUM_SMS = 8  # small, so the schedule has several parts but stays quick on the CPU


def collectives(hlo: str) -> list[tuple[str, str]]:
  """(kind, result type) of every collective in compiled HLO text."""
  return [(m.group(2), m.group(1)) for m in _COLLECTIVE_RE.finditer(hlo)]


def assert_no_collectives(hlo: str) -> None:
  found = collectives(hlo)
  assert not found, f"the compiled program has collectives: {found}"


def cache_gathers(hlo: str, k_cache) -> list[tuple[str, str]]:
  """Collectives that move pages of the cache (result type ends in the cache's row shape)."""
  row = ",".join(str(d) for d in k_cache.shape[1:]) + "]"
  return [(kind, ty) for kind, ty in collectives(hlo)
          if kind in ("all-gather", "all-to-all") and row in ty]


# ------------------------------------------------------------------------------------------------
# Tiers and meshes
# ------------------------------------------------------------------------------------------------

TIERS = [pytest.param("cpu", id="cpu8"), pytest.param("gpu", id="gpu1", marks=pytest.mark.gpu)]


@pytest.fixture(params=TIERS)
def tier(request):
  """(devices, implementation): 8 CPU devices and the default path, or one Hopper GPU."""
  if request.param == "gpu":
    return jax.devices("gpu")[:1], "cuda"
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip(f"needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                f"got {len(devices)}")
  return devices[:8], None


def mesh_of(devices, **axes):
  """A mesh with automatic axes; an axis of size -1 takes the devices left over."""
  sizes = list(axes.values())
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // -np.prod(sizes)
  auto = (jax.sharding.AxisType.Auto,) * len(sizes)
  return jax.make_mesh(tuple(sizes), tuple(axes), axis_types=auto,
                       devices=devices[:int(np.prod(sizes))])


def to_pools(case, num_pools: int):
  """The same decode problem with the cache as `num_pools` pools and pool-local page ids."""
  b, max_blocks = case.block_table.shape
  rows = b // num_pools
  per_pool = rows * max_blocks + 1  # one spare page per pool, never read
  k_cache = np.full((num_pools * per_pool,) + case.k_cache.shape[1:], np.nan,
                    case.k_cache.dtype)
  block_table = np.full_like(case.block_table, INVALID_PAGE)
  num_pages = case.k_cache.shape[0]
  for i in range(b):
    pool = i // rows
    for j, page in enumerate(case.block_table[i]):
      if 0 <= page < num_pages:
        local = (i % rows) * max_blocks + j
        k_cache[pool * per_pool + local] = case.k_cache[page]
        block_table[i, j] = local
  return type(case)(case.q, k_cache, block_table, case.cache_seqlens, case.causal,
                    case.softmax_scale)


def decode_fn(case, implementation, **kw):
  return lambda q, k, bt, lens: jax_flashmla.flash_mla_with_kvcache(
      q, k, bt, lens, softmax_scale=case.softmax_scale, causal=case.causal,
      implementation=implementation, num_sms=NUM_SMS, **kw)


def run_sharded(fn, case, mesh, specs):
  """Runs jit(fn) on operands placed with `specs`; returns (out, lse), compiled HLO text."""
  args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(case.args(), specs)]
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled(*args), compiled.as_text()


def check_same(got, want):
  """Equal to the single-device result up to float32 summation order (<= 1 bf16 ulp)."""
  check_close("out", np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
              abs_tol=2**-14, rel_tol=2**-7, cos_tol=1e-7)
  check_close("lse", got[1], want[1], abs_tol=1e-6, rel_tol=1e-6, cos_tol=0.0)


def spec_of(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def assert_spec(x, want):
  """x is sharded as `want`; on a mesh axis of size 1 (the one-GPU tier) sharded means
  replicated, and JAX reports it so."""
  sizes = dict(zip(x.sharding.mesh.axis_names, x.sharding.mesh.axis_sizes))
  norm = lambda spec: tuple(None if a is not None and sizes.get(a, 1) == 1 else a for a in spec)
  assert norm(spec_of(x)) == norm(want), (spec_of(x), want)


# ------------------------------------------------------------------------------------------------
# Pure layouts: no collective at all
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pass_metadata", [False, True], ids=["metadata_inside", "metadata_given"])
def test_head_parallel_runs_only_its_heads(tier, pass_metadata):
  devices, impl = tier
  mesh = mesh_of(devices, tp=-1)
  case = make_case(np.random.default_rng(1), b=3, s_q=2, mean_len=150, h_q=16, h_kv=1,
                   causal=True, zero_rows=0.3)
  decode = decode_fn(case, impl)

  def fn(q, k, bt, lens):
    md = jax_flashmla.get_mla_metadata(lens, 2 * 16, 1, num_sms=NUM_SMS,
                                       implementation=impl) if pass_metadata else None
    return decode(q, k, bt, lens) if md is None else jax_flashmla.flash_mla_with_kvcache(
        q, k, bt, lens, metadata=md, softmax_scale=case.softmax_scale, causal=True,
        implementation=impl)

  got, hlo = run_sharded(fn, case, mesh, [P(None, None, "tp"), P(), P(), P()])
  assert_no_collectives(hlo)
  assert_spec(got[0], (None, None, "tp", None))
  assert_spec(got[1], (None, "tp", None))
  check_same(got, jax.jit(fn)(*case.args()))
  check_decode(*got, *oracle(case))


@pytest.mark.parametrize("cache_spec", [P(), P(None, None, "tp")],
                         ids=["cache_replicated", "cache_split_on_heads"])
def test_head_parallel_with_kv_head_groups(tier, cache_spec):
  devices, impl = tier
  mesh = mesh_of(devices, dp=-1, tp=min(2, len(devices)))
  case = make_case(np.random.default_rng(2), b=2, s_q=1, mean_len=100, h_q=8, h_kv=2)
  fn = decode_fn(case, impl)
  got, hlo = run_sharded(fn, case, mesh, [P(None, None, "tp"), cache_spec, P(), P()])
  assert_no_collectives(hlo)
  check_same(got, jax.jit(fn)(*case.args()))
  check_decode(*got, *oracle(case))


def test_batch_parallel_with_replicated_cache(tier):
  devices, impl = tier
  mesh = mesh_of(devices, dp=-1)
  case = make_case(np.random.default_rng(3), b=8, s_q=2, mean_len=120, h_q=4, h_kv=1,
                   causal=True, zero_rows=0.2)
  decode = decode_fn(case, impl)

  def fn(q, k, bt, lens):  # metadata of the whole batch, as a model computes it once per step
    md = jax_flashmla.get_mla_metadata(lens, 2 * 4, 1, num_sms=NUM_SMS, implementation=impl)
    return jax_flashmla.flash_mla_with_kvcache(
        q, k, bt, lens, metadata=md, softmax_scale=case.softmax_scale, causal=True,
        implementation=impl)

  got, hlo = run_sharded(fn, case, mesh, [P("dp"), P(), P("dp"), P("dp")])
  # The whole-batch records would need every length on every device; the rule recomputes them
  # per shard instead, so XLA drops them together with the gather of the lengths.
  assert_no_collectives(hlo)
  assert_spec(got[0], ("dp",) + spec_of(got[0])[1:])
  assert_spec(got[1], ("dp",) + spec_of(got[1])[1:])
  check_same(got, jax.jit(decode)(*case.args()))
  check_decode(*got, *oracle(case))


@pytest.mark.parametrize("cache_spec", [P("dp"), P()], ids=["cache_split", "cache_replicated"])
def test_batch_parallel_with_pooled_cache(tier, cache_spec):
  devices, impl = tier
  mesh = mesh_of(devices, dp=-1)
  case = make_case(np.random.default_rng(4), b=8, s_q=1, mean_len=100, h_q=4, h_kv=1,
                   zero_rows=0.2)
  num_pools = max(2, len(devices))  # on one device: two pools, unsplit
  pooled = to_pools(case, num_pools)
  fn = decode_fn(case, impl, num_pools=num_pools)
  got, hlo = run_sharded(fn, pooled, mesh, [P("dp"), cache_spec, P("dp"), P("dp")])
  assert_no_collectives(hlo)
  single = jax.jit(fn)(*pooled.args())
  check_decode(*single, *oracle(case))  # num_pools on one device means the same decode
  check_same(got, single)


def test_batch_and_head_parallel_together(tier):
  devices, impl = tier
  mesh = mesh_of(devices, dp=min(4, len(devices)), tp=-1)
  case = make_case(np.random.default_rng(5), b=4, s_q=2, mean_len=90, h_q=8, h_kv=1,
                   causal=True)
  num_pools = mesh.shape["dp"]
  pooled = to_pools(case, num_pools)
  fn = decode_fn(case, impl, num_pools=num_pools)
  got, hlo = run_sharded(fn, pooled, mesh, [P("dp", None, "tp"), P("dp"), P("dp"), P("dp")])
  assert_no_collectives(hlo)
  assert_spec(got[0], ("dp", None, "tp", None))
  assert_spec(got[1], ("dp", "tp", None))
  check_same(got, jax.jit(fn)(*pooled.args()))
  check_decode(*got, *oracle(case))


def test_num_pools_is_checked():
  case = make_case(np.random.default_rng(9), b=4, s_q=1, mean_len=80, h_q=4, h_kv=1)
  with pytest.raises(ValueError, match="num_pools=3"):
    jax_flashmla.flash_mla_with_kvcache(*case.args(), num_pools=3)


@pytest.mark.parametrize("cache_axis", [None, 0], ids=["shared_cache", "cache_per_lane"])
def test_num_pools_under_vmap_matches_a_loop(cache_axis):
  lanes = [to_pools(make_case(np.random.default_rng(10 + i), b=4, s_q=2, mean_len=80, h_q=4,
                              h_kv=1, causal=True, varlen=False), 2) for i in range(2)]
  lanes[1].cache_seqlens[1] = 5
  decode = decode_fn(lanes[0], "xla", num_pools=2)
  q, k, bt, lens = (np.stack([c.args()[i] for c in lanes]) for i in range(4))
  if cache_axis is None:
    k = k[0]  # one cache for both lanes (the page layouts are the same)
  out, lse = jax.jit(jax.vmap(decode, in_axes=(0, cache_axis, 0, 0)))(q, k, bt, lens)
  for lane in range(2):
    want = jax.jit(decode)(q[lane], k if cache_axis is None else k[lane], bt[lane], lens[lane])
    check_same((out[lane], lse[lane]), want)


# ------------------------------------------------------------------------------------------------
# Without the rule: what an FFI call left alone gets
# ------------------------------------------------------------------------------------------------


def _replicate_everything(config, mesh, arg_shapes, result_shape):
  """What XLA does with a custom call it knows nothing about: every operand on every device."""
  del arg_shapes, result_shape
  rep = NamedSharding(mesh, P())
  lower = lambda *args: partitioning.decode_unpartitioned(*args, config)
  return mesh, lower, (rep, rep), (rep,) * 6


@pytest.mark.parametrize("variant", ["no_rule_at_all", "no_sharding_rule"])
def test_without_the_rule_the_cache_is_gathered(tier, variant):
  devices, impl = tier
  if len(devices) == 1:
    pytest.skip("one device: nothing to gather")
  mesh = mesh_of(devices, dp=-1)
  case = make_case(np.random.default_rng(4), b=8, s_q=1, mean_len=100, h_q=4, h_kv=1)
  pooled = to_pools(case, len(devices))
  config = partitioning.DecodeConfig(case.softmax_scale, False, impl, len(devices), NUM_SMS)
  op = custom_partitioning(partitioning.decode_unpartitioned, static_argnums=(6,))
  if variant == "no_rule_at_all":
    op.def_partition(_replicate_everything)
  else:  # our partition callback, but Shardy is not told which dimensions are shared
    op.def_partition(partitioning._partition_decode)

  def fn(q, k, bt, lens):
    md = jax_flashmla.get_mla_metadata(lens, 4, 1, num_sms=NUM_SMS, implementation=impl)
    return op(q, k, bt, lens, md.tile_scheduler_metadata, md.num_splits, config)

  got, hlo = run_sharded(fn, pooled, mesh, [P("dp"), P("dp"), P("dp"), P("dp")])
  check_decode(*got, *oracle(case))  # still correct ...
  with pytest.raises(AssertionError, match="collectives"):  # ... but the check above catches it
    assert_no_collectives(hlo)
  if variant == "no_rule_at_all":
    assert cache_gathers(hlo, pooled.k_cache), collectives(hlo)


# ------------------------------------------------------------------------------------------------
# Layouts that would gather the cache are refused; the scheduler runs per shard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["page_split_global_ids", "heads_split_across_kv_groups",
                                    "pages_split_off_batch"])
def test_layouts_that_would_gather_the_cache_raise(tier, layout):
  devices, impl = tier
  if len(devices) == 1:
    pytest.skip("one device: nothing is split")
  mesh = mesh_of(devices, dp=2, tp=-1)
  # 4 * max_blocks + 4 pages: splits evenly over either mesh axis and into 2 pools.
  case = make_case(np.random.default_rng(6), b=4, s_q=1, mean_len=70, h_q=8, h_kv=2,
                   spare_pages=4)
  kw, specs, message = {
      "page_split_global_ids": ({}, [P("dp"), P("dp"), P("dp"), P("dp")],
                                "block tables hold ids into the whole cache"),
      "heads_split_across_kv_groups": ({}, [P(None, None, "tp"), P(), P(), P()],
                                       "head shard count must divide h_kv"),
      "pages_split_off_batch": ({"num_pools": 2}, [P("dp"), P("tp"), P("dp"), P("dp")],
                                "page axis must be split over the batch's mesh axes"),
  }[layout]
  with pytest.raises(Exception, match=message):
    run_sharded(decode_fn(case, impl, **kw), case, mesh, specs)


def test_plan_recomputes_the_records_per_shard(tier):
  devices, _ = tier
  mesh = mesh_of(devices, dp=-1)
  n = len(devices)
  config = partitioning.DecodeConfig(0.1, False, "xla", 1, 132)
  shaped = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype,
                                                           sharding=NamedSharding(mesh, spec))
  args = [shaped((8, 1, 128, 576), jnp.bfloat16, P("dp")),
          shaped((40, 64, 1, 576), jnp.bfloat16, P()),
          shaped((8, 5), jnp.int32, P("dp")), shaped((8,), jnp.int32, P("dp")),
          shaped((66, 8), jnp.int32, P()), shaped((9,), jnp.int32, P())]
  plan = partitioning.plan_decode(config, mesh, args)
  assert plan.arg_specs[:4] == (P("dp", None, None, None), P(None, None, None, None),
                                P("dp", None), P("dp"))
  # 128 query rows -> 2 row blocks of 64 -> 132 / 2 parts, for each shard's own 8/n rows.
  assert plan.num_sm_parts == (66 if n > 1 else None)
  if n > 1:
    # The per-device computation schedules its own rows: the scheduler reads the local lengths
    # and its records, not the ones passed in, feed the decode.
    _, lower, _, _ = partitioning._partition_decode(config, mesh, args, None)
    local = [jax.ShapeDtypeStruct((a.shape[0] // n,) + a.shape[1:] if i in (0, 2, 3) else
                                  a.shape, a.dtype) for i, a in enumerate(args)]
    jaxpr = jax.make_jaxpr(lower)(*local).jaxpr
    sched, decode = [e for e in jaxpr.eqns if e.primitive.name.startswith("jax_flashmla")]
    assert sched.primitive.name == "jax_flashmla_mla_metadata_local"
    assert sched.params["num_sm_parts"] == 66 and sched.invars == [jaxpr.invars[3]]
    assert decode.invars[4:] == sched.outvars

  unsplit = [shaped(a.shape, a.dtype, P()) for a in args]
  assert partitioning.plan_decode(config, mesh, unsplit).num_sm_parts is None

  heads = [shaped(a.shape, a.dtype, P(None, None, "dp") if i == 0 else P())
           for i, a in enumerate(args)]
  # Head-parallel: fewer rows per device (128/n), so more parts fill the SMs.
  want = (132 // -(-(128 // n) // 64)) if n > 1 else None
  assert partitioning.plan_decode(config, mesh, heads).num_sm_parts == want


def test_metadata_of_a_sharded_batch_is_the_whole_batchs(tier):
  devices, impl = tier
  mesh = mesh_of(devices, dp=-1)
  lens = jnp.asarray(np.random.default_rng(7).integers(0, 900, size=16), jnp.int32)
  fn = jax.jit(lambda s: jax_flashmla.get_mla_metadata(s, 64, 1, num_sms=NUM_SMS,
                                                        implementation=impl))
  got = fn(jax.device_put(lens, NamedSharding(mesh, P("dp"))))
  want = fn(lens)
  np.testing.assert_array_equal(got.tile_scheduler_metadata, want.tile_scheduler_metadata)
  np.testing.assert_array_equal(got.num_splits, want.num_splits)


# ------------------------------------------------------------------------------------------------
# The shard_map recipes of docs/sharding.md
# ------------------------------------------------------------------------------------------------


def _recipe(layout, mesh, case, impl, layers=2):
  """A decode step over `layers` layers, as docs/sharding.md writes it for `layout`."""
  if layout == "heads":
    in_specs = (P(None, None, "tp"), P(), P(), P())
    out_specs = (P(None, None, "tp"), P(None, "tp"))
  else:  # "batch" (replicated cache) or "pools" (each device its own pool, local ids)
    cache = P("dp") if layout == "pools" else P()
    in_specs = (P("dp"), cache, P("dp"), P("dp"))
    out_specs = (P("dp"), P("dp"))

  def step(q, k_cache, block_table, lens):
    b, s_q, h_q, _ = q.shape  # this device's shapes
    md = jax_flashmla.get_mla_metadata(lens, s_q * h_q // k_cache.shape[2], k_cache.shape[2],
                                       num_sms=NUM_SMS, implementation=impl)  # once per step
    outs = [jax_flashmla.flash_mla_with_kvcache(
        q, k_cache, block_table, lens, metadata=md, softmax_scale=case.softmax_scale,
        causal=case.causal, implementation=impl) for _ in range(layers)]
    return outs[-1]

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


@pytest.mark.parametrize("layout", ["heads", "batch", "pools"])
def test_shard_map_recipes(tier, layout):
  devices, impl = tier
  mesh = mesh_of(devices, **({"tp": -1} if layout == "heads" else {"dp": -1}))
  case = make_case(np.random.default_rng(8), b=8, s_q=2, mean_len=100, h_q=16, h_kv=1,
                   causal=True, zero_rows=0.2)
  run = case if layout != "pools" else to_pools(case, len(devices))
  fn = _recipe(layout, mesh, case, impl)
  compiled = fn.lower(*run.args()).compile()
  assert_no_collectives(compiled.as_text())
  check_decode(*compiled(*run.args()), *oracle(case))
