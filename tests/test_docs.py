"""The code in the documentation runs as written: every Python block of docs/sharding.md (on the
8 CPU host devices conftest.py asks for), and the README's API example.

Blocks are read from the files at test time, so a recipe edited in the docs is the recipe tested.
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_cases import OUT_TOL, check_close, make_case, oracle

ROOT = pathlib.Path(__file__).resolve().parent.parent


def python_blocks(path: pathlib.Path) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```$", path.read_text(), re.S | re.M)


SHARDING = python_blocks(ROOT / "docs" / "sharding.md")


def test_the_sharding_doc_has_every_recipe():
  # jit: heads, pools; shard_map: heads, batch with a shared cache, pools.
  assert len(SHARDING) == 5
  assert sum("jax.shard_map(" in block for block in SHARDING) == 3


@pytest.mark.parametrize("index", range(len(SHARDING)))
def test_sharding_recipe_runs_as_written(index):
  if len(jax.devices("cpu")) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  namespace = {"__name__": f"sharding_recipe_{index}"}
  with jax.default_device(jax.devices("cpu")[0]):
    exec(compile(SHARDING[index], f"docs/sharding.md block {index}", "exec"), namespace)
  out = namespace["out"]
  assert len(out.sharding.device_set) == 8, out.sharding  # it really ran on 8 devices


def test_readme_api_example_runs():
  [block] = [b for b in python_blocks(ROOT / "README.md") if "def decode_step" in b]
  namespace = {"__name__": "readme_api"}
  exec(compile(block, "README.md API block", "exec"), namespace)
  case = make_case(np.random.default_rng(0), b=3, s_q=2, mean_len=100, h_q=16, h_kv=1,
                   causal=True, softmax_scale=namespace["SOFTMAX_SCALE"])
  # Two layers over one page table: the second with its own queries and cache values.
  layers = [case, dataclasses.replace(case, q=case.q[:, ::-1].copy(), k_cache=-case.k_cache)]
  outs = namespace["decode_step"]([jnp.asarray(c.q) for c in layers],
                                  [jnp.asarray(c.k_cache) for c in layers],
                                  jnp.asarray(case.block_table), jnp.asarray(case.cache_seqlens))
  for out, layer in zip(outs, layers, strict=True):
    check_close("out", np.asarray(out, np.float32), oracle(layer)[0], **OUT_TOL)


@pytest.mark.parametrize("module", ["decode", "metadata", "reference", "cache"])
def test_docstring_examples_run(module):
  import doctest
  import importlib

  import jax_flashmla

  mod = importlib.import_module(f"jax_flashmla.{module}")
  names = {name: getattr(jax_flashmla, name) for name in jax_flashmla.__all__}
  result = doctest.testmod(mod, extraglobs=dict(names, jax=jax, jnp=jnp, np=np),
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result
