"""jax_flashmla/constants.py against the compiled extension, and stated nowhere else.

Contract with the C++ side: `jax_flashmla._ext.constants()` returns a dict with exactly the keys
of `PYTHON_VALUE_OF` below (present in every build, with or without CUDA), each equal, type and
value, to the Python constant it names. A source tree that was never built has no `_ext`: the
comparison then skips with the import error, unless JAX_FLASHMLA_EXPECT_CUDA_BUILD=1 (CI with
nvcc), where a missing extension is a failure.
"""

import ast
import os
import pathlib

import pytest

import jax_flashmla
from jax_flashmla import _extension, constants

# Key of `_ext.constants()` -> the Python value it must equal.
PYTHON_VALUE_OF = {
    "head_dim_k": constants.HEAD_DIM_K,
    "head_dim_v": constants.HEAD_DIM_V,
    "page_size": constants.PAGE_SIZE,
    "block_m": constants.BLOCK_M,
    "max_sm_parts": constants.MAX_SM_PARTS,
    "sched_record_ints": constants.SCHED_RECORD_INTS,
    "fixed_overhead_blocks": constants.FIXED_OVERHEAD_BLOCKS,
    "metadata_target": constants.METADATA_TARGET,
    "decode_target": constants.DECODE_TARGET,
    "sparse_decode_target": constants.SPARSE_DECODE_TARGET,
    "fp8_row_bytes": constants.FP8_ROW_BYTES,
    "fp8_scale_offset": constants.FP8_SCALE_OFFSET,
    "fp8_rope_offset": constants.FP8_ROPE_OFFSET,
    "fp8_tile_cols": constants.FP8_TILE_COLS,
}


def _extension_constants() -> dict:
  if _extension._ext is None:
    if os.environ.get("JAX_FLASHMLA_EXPECT_CUDA_BUILD") == "1":
      pytest.fail(f"JAX_FLASHMLA_EXPECT_CUDA_BUILD=1, but {_extension._IMPORT_ERROR}")
    pytest.skip(_extension._IMPORT_ERROR)
  return dict(_extension._ext.constants())


def test_the_extension_states_the_same_constants():
  got = _extension_constants()
  missing, extra = sorted(PYTHON_VALUE_OF.keys() - got.keys()), sorted(got.keys() -
                                                                         PYTHON_VALUE_OF.keys())
  assert not missing and not extra, (
      f"_ext.constants(): expected the keys {sorted(PYTHON_VALUE_OF)}, got {sorted(got)} "
      f"(missing {missing}, not known to Python {extra})")
  differ = {key: (want, got[key]) for key, want in PYTHON_VALUE_OF.items()
            if type(got[key]) is not type(want) or got[key] != want}
  assert not differ, ("_ext.constants() differs from jax_flashmla/constants.py, as "
                      "{key: (python, extension)}: " + repr(differ))


def test_the_targets_registered_are_the_constants():
  assert _extension.TARGETS == (constants.METADATA_TARGET, constants.DECODE_TARGET)


def test_no_other_module_defines_a_constant():
  """Modules import the constants; none assigns one of their names at module level."""
  names = {n for n in vars(constants) if n.isupper()}
  package = pathlib.Path(jax_flashmla.__file__).parent
  found = []
  for path in sorted(package.glob("*.py")):
    if path.name == "constants.py":
      continue
    for node in ast.parse(path.read_text()).body:
      targets = node.targets if isinstance(node, ast.Assign) else (
          [node.target] if isinstance(node, ast.AnnAssign) else [])
      found += [f"{path.name}:{node.lineno} {t.id}" for t in targets
                if isinstance(t, ast.Name) and t.id in names]
  assert not found, f"constants defined outside constants.py: {found}"
