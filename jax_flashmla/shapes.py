"""Trace-time validation and output shapes of the two operations.

Every check names the argument, what was expected and what was got, so a bad call fails in
Python at trace time rather than in a kernel.

Dimensions may be symbolic (`jax.export.symbolic_shape`): checks that relate dimensions to each
other hold symbolically and always run; checks that compare a dimension with a constant bound
(int32 limits, "at least one") run only where the dimension is a known integer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla import _extension
from jax_flashmla.constants import (BLOCK_M, FIXED_OVERHEAD_BLOCKS, FP8_ROW_BYTES, HEAD_DIM_K,
                                    HEAD_DIM_V, INT32_MAX, MAX_SM_PARTS, PAGE_SIZE,
                                    SCHED_RECORD_INTS)
from jax_flashmla.quantization import is_fp8_cache


def _kernel_dtypes() -> tuple[np.dtype, ...]:
  """The dtypes the compiled kernels take, as the extension reports them; bfloat16 where it does
  not say (builds from before float16, CPU-only builds, no extension: the kernels' first dtype,
  which `implementation="cuda"` lowerings for export may still emit)."""
  names = _extension.build_info().get("kernel_dtypes") or ("bfloat16",)
  return tuple(jnp.dtype(name) for name in names)


KERNEL_DTYPES = _kernel_dtypes()
REFERENCE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape)


def known(*dims) -> bool:
  """True when every dimension is a known integer (not symbolic, as in a shape-polymorphic
  export): only then can it be compared with a constant."""
  return all(isinstance(d, (int, np.integer)) for d in dims)


def _expect_array(name: str, x) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    wrap = "; wrap it with jnp.asarray" if isinstance(x, (list, tuple, int, float)) else ""
    raise TypeError(f"{name}: expected a jax.Array or numpy array, got {type(x).__name__}{wrap}")


def _expect_rank(name: str, x, rank: int, layout: str) -> None:
  if len(_shape(x)) != rank:
    raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {_shape(x)}")


def _expect_dtype(name: str, x, dtypes, what: str | None = None) -> None:
  """`what`: how the expected dtypes are named in the message (default: their names)."""
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
    names = what or ", ".join(str(jnp.dtype(d)) for d in dtypes)
    raise TypeError(f"{name}: expected dtype {names}, got {jnp.dtype(x.dtype)}")


def _got(value) -> str:
  """How a wrong static argument is described: traced values say so and say what to do."""
  if isinstance(value, jax.core.Tracer):
    return (f"a traced value ({type(value).__name__} {value.aval.str_short()}); static "
            "arguments select the compiled kernel, so pass a Python value: close over it or "
            "list it in jax.jit's static_argnames")
  return f"{type(value).__name__} {value!r}"


def check_static_float(name: str, value) -> float | None:
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                    np.floating)):
    raise TypeError(f"{name}: expected a static Python float or None, got {_got(value)}")
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name}: expected a finite positive float, got {value}")
  return value


def check_static_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}: expected a static Python bool, got {_got(value)}")
  return bool(value)


def check_static_int(name: str, value, minimum: int = 1) -> int:
  """A static Python (or numpy) int >= minimum; bools and traced values are refused."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}: expected a static int >= {minimum}, got {_got(value)}")
  if value < minimum:
    raise ValueError(f"{name}: expected a static int >= {minimum}, got {value!r}")
  return int(value)


def check_metadata_args(cache_seqlens, num_sm_parts: int) -> None:
  _expect_array("cache_seqlens", cache_seqlens)
  _expect_rank("cache_seqlens", cache_seqlens, 1, "[b]")
  _expect_dtype("cache_seqlens", cache_seqlens, (jnp.int32,))
  if known(_shape(cache_seqlens)[0]) and _shape(cache_seqlens)[0] < 1:
    raise ValueError(f"cache_seqlens: expected a batch of at least 1, got shape "
                     f"{_shape(cache_seqlens)}")
  if not isinstance(num_sm_parts, (int, np.integer)) or not 1 <= num_sm_parts <= MAX_SM_PARTS:
    raise ValueError(f"num_sm_parts: expected an int in [1, {MAX_SM_PARTS}], got "
                     f"{num_sm_parts!r}")


def check_head_dim_v(head_dim_v) -> None:
  """FlashMLA's `head_dim_v` argument: the kernels' V width is fixed.

  Metadata passed positionally lands here (FlashMLA's order is `..., head_dim_v, metadata`):
  that gets its own message, without the arrays.
  """
  # Imported here: metadata.py imports this module.
  from jax_flashmla.metadata import MLAMetadata

  if isinstance(head_dim_v, MLAMetadata) or (isinstance(head_dim_v, tuple) and
                                             len(head_dim_v) == 2):
    raise TypeError(f"head_dim_v: expected {HEAD_DIM_V}, got {type(head_dim_v).__name__} "
                    f"(scheduler metadata?); metadata is the 6th positional argument, after "
                    f"head_dim_v: pass it as metadata=...")
  if isinstance(head_dim_v, (bool, np.bool_)) or not isinstance(head_dim_v, (int, np.integer)) \
      or head_dim_v != HEAD_DIM_V:
    raise ValueError(f"head_dim_v: expected {HEAD_DIM_V}, got {head_dim_v!r}")


def check_decode_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                      num_splits) -> None:
  """Validates shapes and dtypes of a decode call (arrays or abstract values)."""
  check_decode_args_without_metadata(q, k_cache, block_table, cache_seqlens)
  check_scheduler_records(tile_scheduler_metadata, num_splits, _shape(q)[0])


def check_scheduler_records(tile_scheduler_metadata, num_splits, b: int) -> None:
  """The two arrays of `MLAMetadata`, for a decode of batch `b`."""
  _expect_array("tile_scheduler_metadata", tile_scheduler_metadata)
  _expect_array("num_splits", num_splits)
  _expect_rank("tile_scheduler_metadata", tile_scheduler_metadata, 2, "[num_sm_parts, 8]")
  _expect_dtype("tile_scheduler_metadata", tile_scheduler_metadata, (jnp.int32,))
  parts, width = _shape(tile_scheduler_metadata)
  if not known(parts, width) or width != SCHED_RECORD_INTS or not 1 <= parts <= MAX_SM_PARTS:
    raise ValueError(f"tile_scheduler_metadata: expected shape [num_sm_parts, 8] with "
                     f"1 <= num_sm_parts <= {MAX_SM_PARTS}, got "
                     f"{_shape(tile_scheduler_metadata)}")
  _expect_dtype("num_splits", num_splits, (jnp.int32,))
  if _shape(num_splits) != (b + 1,):
    raise ValueError(f"num_splits: expected shape ({b + 1},) for batch {b}, got "
                     f"{_shape(num_splits)} (metadata computed for another batch?)")


def kernel_dtype_names() -> str:
  return " or ".join(d.name for d in KERNEL_DTYPES)


def check_kernel_dtype(q, implementation) -> None:
  """implementation='cuda' runs the kernels whatever the platform would allow: their dtypes only."""
  if implementation == "cuda" and jnp.dtype(q.dtype) not in KERNEL_DTYPES:
    raise TypeError(f"q: expected dtype {kernel_dtype_names()} with implementation='cuda' (the "
                    f"kernels' dtypes), got {jnp.dtype(q.dtype)}")


def check_fp8_flag(is_fp8_kvcache, k_cache) -> None:
  """FlashMLA's `is_fp8_kvcache`: None follows the cache's dtype; a bool must agree with it."""
  if is_fp8_kvcache is None:
    return
  flag = check_static_bool("is_fp8_kvcache", is_fp8_kvcache)
  if flag != is_fp8_cache(k_cache):
    want = ("uint8 or float8_e4m3fn [num_blocks, 64, h_kv, 656] (an FP8 cache)" if flag else
            "the dtype of q, [num_blocks, 64, h_kv, 576]")
    raise ValueError(f"k_cache: is_fp8_kvcache={flag} expects {want}, got dtype "
                     f"{jnp.dtype(k_cache.dtype)} shape {_shape(k_cache)}")


def check_decode_args_without_metadata(q, k_cache, block_table, cache_seqlens) -> None:
  for name, x in (("q", q), ("k_cache", k_cache), ("block_table", block_table),
                  ("cache_seqlens", cache_seqlens)):
    _expect_array(name, x)
  _expect_rank("q", q, 4, "[b, s_q, h_q, 576]")
  _expect_rank("k_cache", k_cache, 4, "[num_blocks, 64, h_kv, 576] (656 bytes: FP8)")
  _expect_rank("block_table", block_table, 2, "[b, max_blocks]")
  _expect_rank("cache_seqlens", cache_seqlens, 1, "[b]")
  _expect_dtype("q", q, REFERENCE_DTYPES)
  fp8 = is_fp8_cache(k_cache)
  if fp8 and jnp.dtype(q.dtype) != jnp.dtype(jnp.bfloat16):
    raise TypeError(f"q: expected dtype bfloat16 with an FP8 cache (k_cache dtype "
                    f"{jnp.dtype(k_cache.dtype)}), got {jnp.dtype(q.dtype)}")
  if not fp8 and jnp.dtype(k_cache.dtype) != jnp.dtype(q.dtype):
    raise TypeError(f"q and k_cache: expected one dtype, got q {jnp.dtype(q.dtype)} and k_cache "
                    f"{jnp.dtype(k_cache.dtype)} (cast q to the cache's dtype; an FP8 cache is "
                    f"uint8 or float8_e4m3fn)")
  _expect_dtype("block_table", block_table, (jnp.int32,))
  _expect_dtype("cache_seqlens", cache_seqlens, (jnp.int32,))

  b, s_q, h_q, d = _shape(q)
  num_blocks, page_size, h_kv, d_k = _shape(k_cache)
  if d != HEAD_DIM_K:
    raise ValueError(f"q: expected head dim {HEAD_DIM_K} (512 latent + 64 RoPE), got {d} "
                     f"(shape {_shape(q)})")
  if fp8 and d_k != FP8_ROW_BYTES:
    raise ValueError(f"k_cache: expected {FP8_ROW_BYTES} bytes per row (axis 3) for an FP8 "
                     f"cache (dtype {jnp.dtype(k_cache.dtype)}), got {d_k} (shape "
                     f"{_shape(k_cache)})")
  if not fp8 and d_k != HEAD_DIM_K:
    raise ValueError(f"k_cache: expected head dim {HEAD_DIM_K}, got {d_k} "
                     f"(shape {_shape(k_cache)})")
  if page_size != PAGE_SIZE:
    raise ValueError(f"k_cache: expected page size {PAGE_SIZE} (axis 1), got {page_size} "
                     f"(shape {_shape(k_cache)})")
  if any(known(n) and n < 1 for n in (b, s_q, h_q)):
    raise ValueError(f"q: expected b, s_q, h_q >= 1, got shape {_shape(q)}")
  if any(known(n) and n < 1 for n in (num_blocks, h_kv)):
    raise ValueError(f"k_cache: expected num_blocks, h_kv >= 1, got shape {_shape(k_cache)}")
  if not known(s_q, h_q, h_kv):
    raise ValueError(f"q: expected known s_q, h_q and h_kv (k_cache axis 2): they choose the "
                     f"kernel and its schedule; only the batch, the block table's columns and "
                     f"the pages may be symbolic, got s_q={s_q}, h_q={h_q}, h_kv={h_kv}")
  if h_q % h_kv:
    raise ValueError(f"q: expected h_q to be a multiple of h_kv={h_kv} (k_cache axis 2), got "
                     f"h_q={h_q}")
  if _shape(block_table)[0] != b:
    raise ValueError(f"block_table: expected batch {b} (from q), got shape {_shape(block_table)}")
  max_blocks = _shape(block_table)[1]
  if known(max_blocks) and max_blocks < 1:
    raise ValueError(f"block_table: expected at least one column, got shape "
                     f"{_shape(block_table)}")
  if _shape(cache_seqlens) != (b,):
    raise ValueError(f"cache_seqlens: expected shape ({b},) (batch of q), got "
                     f"{_shape(cache_seqlens)}")
  # Symbolic sizes are bound when the program is called; the FFI handler checks them there.
  if known(b, max_blocks) and (b * (max_blocks + FIXED_OVERHEAD_BLOCKS) > INT32_MAX or
                               max_blocks * PAGE_SIZE > INT32_MAX):
    raise ValueError(f"block_table: expected b * (max_blocks + 5) and max_blocks * 64 below "
                     f"2**31 (int32 scheduler and length arithmetic), got shape "
                     f"{_shape(block_table)}")


def decode_output_shapes(q, k_cache, num_sm_parts: int):
  """(out, lse, lse_accum, o_accum) shapes and dtypes of the kernel call."""
  b, s_q, h_q, _ = _shape(q)
  h_kv = _shape(k_cache)[2]
  q_rows = s_q * (h_q // h_kv)
  return (
      ((b, s_q, h_q, HEAD_DIM_V), jnp.dtype(q.dtype)),
      ((b, h_q, s_q), jnp.dtype(jnp.float32)),
      ((b + num_sm_parts, h_kv, q_rows), jnp.dtype(jnp.float32)),
      ((b + num_sm_parts, h_kv, q_rows, HEAD_DIM_V), jnp.dtype(jnp.float32)),
  )


def num_sm_parts_for(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
  """CTAs along the split axis so that m_blocks * h_kv * parts fills the SMs once."""
  m_blocks = -(-num_q_tokens_per_head_k // BLOCK_M)
  return min(max(num_sms // num_heads_k // m_blocks, 1), MAX_SM_PARTS)


def check_num_pools(num_pools, b: int, num_blocks: int, *, batch_from: str = "from q",
                    pages_from: str = "k_cache axis 0") -> int:
  """The cache as `num_pools` equal page pools, one per group of `b / num_pools` batch rows.

  `batch_from` and `pages_from` say where the caller's `b` and `num_blocks` come from.
  """
  num_pools = check_static_int("num_pools", num_pools)
  if num_pools == 1:
    return 1
  if not known(b, num_blocks):
    raise ValueError(f"num_pools: expected a batch and pages of known size to split into "
                     f"{num_pools} pools, got the batch {b} ({batch_from}) and the pages "
                     f"{num_blocks} ({pages_from})")
  if b % num_pools or num_blocks % num_pools:
    raise ValueError(f"num_pools: expected a divisor of both the batch ({b}, {batch_from}) and "
                     f"the pages ({num_blocks}, {pages_from}), so that both split into equal "
                     f"groups, got num_pools={num_pools}")
  return num_pools
