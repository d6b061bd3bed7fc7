"""The code in the documentation runs as written: every Python block of docs/sharding.md (each a
script of its own on 8 CPU devices), the README's API example, and the docstrings' examples.

Blocks are read from the files at test time, so a recipe edited in the docs is the recipe tested.
"""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

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
def test_sharding_recipe_runs_as_written(index, tmp_path):
  """Each block as a script of its own, on 8 CPU devices whatever this machine has (a recipe's
  `jax.make_mesh((8,), ...)` takes the default backend's devices)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env.pop("PYTHONPATH", None)
  script = SHARDING[index] + "\nassert len(out.sharding.device_set) == 8, out.sharding\n"
  res = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, f"docs/sharding.md block {index} failed:\n{res.stderr[-4000:]}"


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


@pytest.mark.parametrize("module", ["decode", "metadata", "reference", "cache", "sparse",
                                    "quantization"])
def test_docstring_examples_run(module):
  import doctest
  import importlib

  import jax_flashmla

  mod = importlib.import_module(f"jax_flashmla.{module}")
  names = {name: getattr(jax_flashmla, name) for name in jax_flashmla.__all__}
  result = doctest.testmod(mod, extraglobs=dict(names, jax=jax, jnp=jnp, np=np),
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result
