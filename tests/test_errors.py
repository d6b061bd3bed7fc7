"""Argument errors, one test per case: every wrong rank, shape, dtype, static argument or
scheduler record fails at trace time with a ValueError/TypeError whose message names the
argument, what was expected and what was got ("name: expected X, got Y").

Calls are traced with `jax.eval_shape`, so nothing runs: an error raised here is raised while
tracing, before any kernel could see the arguments. Values no trace can see (lengths, page ids)
are not errors; they have defined behaviour (test_reference.py) and an opt-in check
(test_validation.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla import MLAMetadata, shapes

SDS = jax.ShapeDtypeStruct
BF16, F16, F32, I32 = jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32

# A valid call: b=2, s_q=2, h_q=8, h_kv=1, 6 pages, 3 block-table columns.
GOOD = dict(q=SDS((2, 2, 8, 576), BF16), k_cache=SDS((6, 64, 1, 576), BF16),
            block_table=SDS((2, 3), I32), cache_seqlens=SDS((2,), I32))


def records(parts=4, b=2, dtype=I32, width=8):
  return MLAMetadata(SDS((parts, width), dtype), SDS((b + 1,), I32), num_sms=132)


def _abstract(value) -> bool:
  leaves = jax.tree.leaves(value)
  return bool(leaves) and all(isinstance(leaf, SDS) for leaf in leaves)


def trace(fn, **kwargs):
  """`fn(**kwargs)` under jax.eval_shape: ShapeDtypeStructs (and pytrees of them) become
  tracers, everything else is passed as it is."""
  traced = {k: v for k, v in kwargs.items() if _abstract(v)}
  fixed = {k: v for k, v in kwargs.items() if k not in traced}
  return jax.eval_shape(lambda t: fn(**t, **fixed), traced)


def trace_decode(**overrides):
  return trace(jax_flashmla.flash_mla_with_kvcache, **(GOOD | overrides))


def trace_metadata(**overrides):
  kwargs = dict(cache_seqlens=SDS((2,), I32), num_q_tokens_per_head_k=16, num_heads_k=1,
                num_sms=8) | overrides
  return trace(jax_flashmla.get_mla_metadata, **kwargs)


def lower_decode(platform, **kwargs):
  """Lowers a decode for `platform` (lowering rules run; nothing is compiled)."""
  fn = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, **kwargs))
  return fn.trace(*GOOD.values()).lower(lowering_platforms=(platform,))


def assert_names_expected_got(exc_info, name, expected, got):
  msg = str(exc_info.value)
  assert msg.startswith(name), f"message does not start with the argument {name!r}: {msg}"
  assert "expected " + expected in msg, f"expected {expected!r} missing from: {msg}"
  assert "got " + got in msg, f"got {got!r} missing from: {msg}"


def test_the_valid_call_traces():
  out, lse = trace_decode()
  assert out.shape == (2, 2, 8, 512) and out.dtype == BF16
  assert lse.shape == (2, 8, 2) and lse.dtype == F32
  out, lse = trace_decode(metadata=records())
  assert out.shape == (2, 2, 8, 512)


# (id, overrides of flash_mla_with_kvcache's arguments, exception, argument, expected, got)
DECODE_CASES = [
    # q
    ("q_not_an_array", dict(q=np.zeros((2, 2, 8, 576)).tolist()), TypeError, "q",
     "a jax.Array or numpy array", "list; wrap it with jnp.asarray"),
    ("q_rank_3", dict(q=SDS((2, 8, 576), BF16)), ValueError, "q",
     "rank 4 [b, s_q, h_q, 576]", "shape (2, 8, 576)"),
    ("q_int32", dict(q=SDS((2, 2, 8, 576), I32)), TypeError, "q",
     "dtype bfloat16, float16, float32", "int32"),
    ("q_numpy_float64", dict(q=np.zeros((2, 2, 8, 576))), TypeError, "q",
     "dtype bfloat16, float16, float32", "float64"),
    ("q_head_dim_512", dict(q=SDS((2, 2, 8, 512), BF16)), ValueError, "q",
     "head dim 576", "512"),
    ("q_batch_0", dict(q=SDS((0, 2, 8, 576), BF16), block_table=SDS((0, 3), I32),
                       cache_seqlens=SDS((0,), I32)), ValueError, "q",
     "b, s_q, h_q >= 1", "shape (0, 2, 8, 576)"),
    ("q_s_q_0", dict(q=SDS((2, 0, 8, 576), BF16)), ValueError, "q",
     "b, s_q, h_q >= 1", "shape (2, 0, 8, 576)"),
    ("q_h_q_0", dict(q=SDS((2, 2, 0, 576), BF16)), ValueError, "q",
     "b, s_q, h_q >= 1", "shape (2, 2, 0, 576)"),
    # k_cache
    ("k_cache_rank_3", dict(k_cache=SDS((6, 64, 576), BF16)), ValueError, "k_cache",
     "rank 4 [num_blocks, 64, h_kv, 576]", "shape (6, 64, 576)"),
    ("k_cache_dtype_not_q_dtype", dict(k_cache=SDS((6, 64, 1, 576), F16)), TypeError,
     "q and k_cache", "one dtype", "q bfloat16 and k_cache float16 (cast q to the cache's "
     "dtype; an FP8 cache is uint8 or float8_e4m3fn)"),
    ("q_float32_cache_bfloat16", dict(q=SDS((2, 2, 8, 576), F32)), TypeError, "q and k_cache",
     "one dtype", "q float32 and k_cache bfloat16"),
    ("k_cache_page_size_32", dict(k_cache=SDS((6, 32, 1, 576), BF16)), ValueError, "k_cache",
     "page size 64 (axis 1)", "32"),
    ("k_cache_head_dim_512", dict(k_cache=SDS((6, 64, 1, 512), BF16)), ValueError, "k_cache",
     "head dim 576", "512"),
    ("k_cache_no_pages", dict(k_cache=SDS((0, 64, 1, 576), BF16)), ValueError, "k_cache",
     "num_blocks, h_kv >= 1", "shape (0, 64, 1, 576)"),
    ("k_cache_h_kv_0", dict(k_cache=SDS((6, 64, 0, 576), BF16)), ValueError, "k_cache",
     "num_blocks, h_kv >= 1", "shape (6, 64, 0, 576)"),
    # heads
    ("h_q_not_a_multiple_of_h_kv", dict(k_cache=SDS((6, 64, 3, 576), BF16)), ValueError, "q",
     "h_q to be a multiple of h_kv=3", "h_q=8"),
    ("h_kv_above_h_q", dict(k_cache=SDS((6, 64, 16, 576), BF16)), ValueError, "q",
     "h_q to be a multiple of h_kv=16", "h_q=8"),
    # block_table
    ("block_table_rank_1", dict(block_table=SDS((6,), I32)), ValueError, "block_table",
     "rank 2 [b, max_blocks]", "shape (6,)"),
    ("block_table_numpy_int64", dict(block_table=np.zeros((2, 3), np.int64)), TypeError,
     "block_table", "dtype int32", "int64"),
    ("block_table_float32", dict(block_table=SDS((2, 3), F32)), TypeError, "block_table",
     "dtype int32", "float32"),
    ("block_table_batch_mismatch", dict(block_table=SDS((3, 3), I32)), ValueError,
     "block_table", "batch 2 (from q)", "shape (3, 3)"),
    ("block_table_no_columns", dict(block_table=SDS((2, 0), I32)), ValueError, "block_table",
     "at least one column", "shape (2, 0)"),
    ("block_table_overflows_int32", dict(block_table=SDS((2, 2**30), I32)), ValueError,
     "block_table", "b * (max_blocks + 5) and max_blocks * 64 below 2**31",
     f"shape (2, {2**30})"),
    # cache_seqlens
    ("cache_seqlens_list", dict(cache_seqlens=[5, 7]), TypeError, "cache_seqlens",
     "a jax.Array or numpy array", "list; wrap it with jnp.asarray"),
    ("block_table_list", dict(block_table=[[0, 1, 2], [3, 4, 5]]), TypeError, "block_table",
     "a jax.Array or numpy array", "list; wrap it with jnp.asarray"),
    ("cache_seqlens_rank_2", dict(cache_seqlens=SDS((2, 1), I32)), ValueError, "cache_seqlens",
     "rank 1 [b]", "shape (2, 1)"),
    ("cache_seqlens_float32", dict(cache_seqlens=SDS((2,), F32)), TypeError, "cache_seqlens",
     "dtype int32", "float32"),
    ("cache_seqlens_batch_mismatch", dict(cache_seqlens=SDS((3,), I32)), ValueError,
     "cache_seqlens", "shape (2,) (batch of q)", "(3,)"),
    # static arguments
    ("head_dim_v_576", dict(head_dim_v=576), ValueError, "head_dim_v", "512", "576"),
    ("softmax_scale_negative", dict(softmax_scale=-1.0), ValueError, "softmax_scale",
     "a finite positive float", "-1.0"),
    ("softmax_scale_zero", dict(softmax_scale=0), ValueError, "softmax_scale",
     "a finite positive float", "0.0"),
    ("softmax_scale_nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale",
     "a finite positive float", "nan"),
    ("softmax_scale_inf", dict(softmax_scale=float("inf")), ValueError, "softmax_scale",
     "a finite positive float", "inf"),
    ("softmax_scale_string", dict(softmax_scale="0.1"), TypeError, "softmax_scale",
     "a static Python float or None", "str '0.1'"),
    ("softmax_scale_traced", dict(softmax_scale=SDS((), F32)), TypeError, "softmax_scale",
     "a static Python float or None", "a traced value"),
    ("causal_traced", dict(causal=SDS((), jnp.bool_)), TypeError, "causal",
     "a static Python bool", "a traced value"),
    ("causal_int", dict(causal=1), TypeError, "causal", "a static Python bool", "int 1"),
    ("causal_none", dict(causal=None), TypeError, "causal", "a static Python bool",
     "NoneType None"),
    ("implementation_unknown", dict(implementation="triton"), ValueError, "implementation",
     "one of None, 'cuda', 'xla'", "'triton'"),
    ("num_sms_zero", dict(num_sms=0), ValueError, "num_sms", "a static int >= 1", "0"),
    ("num_sms_bool", dict(num_sms=True), TypeError, "num_sms", "a static int >= 1",
     "bool True"),
    ("num_sms_with_metadata_float", dict(metadata=records(), num_sms=132.0), TypeError,
     "num_sms", "a static int >= 1", "float 132.0"),
    ("num_pools_zero", dict(num_pools=0), ValueError, "num_pools", "a static int >= 1", "0"),
    ("num_pools_float", dict(num_pools=2.0), TypeError, "num_pools", "a static int >= 1",
     "float 2.0"),
    ("num_pools_not_a_divisor", dict(num_pools=4), ValueError, "num_pools",
     "a divisor of both the batch (2, from q) and the pages (6, k_cache axis 0)",
     "num_pools=4"),
    # scheduler records
    ("metadata_list", dict(metadata=[1, 2]), TypeError, "metadata",
     "MLAMetadata, a (tile_scheduler_metadata, num_splits) pair or None", "list"),
    ("metadata_triple", dict(metadata=(SDS((4, 8), I32), SDS((3,), I32), SDS((3,), I32))),
     TypeError, "metadata", "MLAMetadata", "tuple of length 3"),
    ("metadata_for_another_batch", dict(metadata=records(b=4)), ValueError, "num_splits",
     "shape (3,) for batch 2", "(5,) (metadata computed for another batch?)"),
    ("metadata_pair_swapped", dict(metadata=(SDS((3,), I32), SDS((4, 8), I32))), ValueError,
     "tile_scheduler_metadata", "rank 2 [num_sm_parts, 8]", "shape (3,)"),
    ("metadata_records_of_7_ints", dict(metadata=records(width=7)), ValueError,
     "tile_scheduler_metadata", "shape [num_sm_parts, 8]", "(4, 7)"),
    ("metadata_too_many_parts", dict(metadata=records(parts=161)), ValueError,
     "tile_scheduler_metadata", "shape [num_sm_parts, 8] with 1 <= num_sm_parts <= 160",
     "(161, 8)"),
    ("metadata_no_parts", dict(metadata=records(parts=0)), ValueError,
     "tile_scheduler_metadata", "shape [num_sm_parts, 8] with 1 <= num_sm_parts <= 160",
     "(0, 8)"),
    ("metadata_records_float32", dict(metadata=records(dtype=F32)), TypeError,
     "tile_scheduler_metadata", "dtype int32", "float32"),
    ("metadata_num_splits_int64",
     dict(metadata=MLAMetadata(np.zeros((4, 8), np.int32), np.zeros((3,), np.int64), 132)),
     TypeError, "num_splits", "dtype int32", "int64"),
    ("metadata_of_lists", dict(metadata=([0] * 8, [0, 1, 2])), TypeError,
     "tile_scheduler_metadata", "a jax.Array", "list"),
]


@pytest.mark.parametrize("overrides,exc,name,expected,got",
                         [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_decode_argument_error(overrides, exc, name, expected, got):
  with pytest.raises(exc) as info:
    trace_decode(**overrides)
  assert_names_expected_got(info, name, expected, got)


METADATA_CASES = [
    ("cache_seqlens_float32", dict(cache_seqlens=SDS((2,), F32)), TypeError, "cache_seqlens",
     "dtype int32", "float32"),
    ("cache_seqlens_rank_2", dict(cache_seqlens=SDS((2, 3), I32)), ValueError,
     "cache_seqlens", "rank 1 [b]", "shape (2, 3)"),
    ("cache_seqlens_empty_batch", dict(cache_seqlens=SDS((0,), I32)), ValueError,
     "cache_seqlens", "a batch of at least 1", "shape (0,)"),
    ("num_q_tokens_per_head_k_zero", dict(num_q_tokens_per_head_k=0), ValueError,
     "num_q_tokens_per_head_k", "a static int >= 1", "0"),
    ("num_q_tokens_per_head_k_float", dict(num_q_tokens_per_head_k=16.0), TypeError,
     "num_q_tokens_per_head_k", "a static int >= 1", "float 16.0"),
    ("num_heads_k_negative", dict(num_heads_k=-1), ValueError, "num_heads_k",
     "a static int >= 1", "-1"),
    ("num_heads_k_traced", dict(num_heads_k=SDS((), I32)), TypeError, "num_heads_k",
     "a static int >= 1", "a traced value"),
    ("num_sms_zero", dict(num_sms=0), ValueError, "num_sms", "a static int >= 1", "0"),
    ("num_sms_bool", dict(num_sms=True), TypeError, "num_sms", "a static int >= 1",
     "bool True"),
    ("implementation_unknown", dict(implementation="pallas"), ValueError, "implementation",
     "one of None, 'cuda', 'xla'", "'pallas'"),
]


@pytest.mark.parametrize("overrides,exc,name,expected,got",
                         [c[1:] for c in METADATA_CASES], ids=[c[0] for c in METADATA_CASES])
def test_metadata_argument_error(overrides, exc, name, expected, got):
  with pytest.raises(exc) as info:
    trace_metadata(**overrides)
  assert_names_expected_got(info, name, expected, got)


def test_cuda_implementation_lowered_for_the_cpu():
  with pytest.raises(ValueError) as info:
    lower_decode("cpu", implementation="cuda")
  assert_names_expected_got(info, "implementation='cuda'", "a computation lowered for platform "
                            "'cuda'", "platform 'cpu'")


@pytest.mark.parametrize("dtype", [d for d in (F32, F16)
                                   if jnp.dtype(d) not in shapes.KERNEL_DTYPES])
def test_cuda_implementation_with_another_dtype(dtype):
  """The kernels take the dtypes the extension reports (bfloat16, and float16 in builds that
  have it): anything else is said while tracing, whatever the platform."""
  q, k = (SDS(GOOD[n].shape, dtype) for n in ("q", "k_cache"))
  with pytest.raises(TypeError) as info:
    trace_decode(q=q, k_cache=k, implementation="cuda")
  assert_names_expected_got(info, "q", f"dtype {shapes.kernel_dtype_names()} with "
                            "implementation='cuda'", jnp.dtype(dtype).name)


def test_kernel_dtypes_follow_the_extension():
  from jax_flashmla import _extension

  reported = jax_flashmla.build_info().get("kernel_dtypes") or ["bfloat16"]
  assert [d.name for d in shapes.KERNEL_DTYPES] == list(reported)
  assert jnp.dtype(BF16) in shapes.KERNEL_DTYPES
  if _extension._ext is None:
    assert shapes.KERNEL_DTYPES == (jnp.dtype(BF16),)


@pytest.mark.parametrize("metadata", ["records", "pair"])
def test_metadata_passed_where_head_dim_v_goes(metadata):
  """FlashMLA's order is (..., cache_seqlens, head_dim_v, metadata): metadata passed 5th is
  named as such, and no array is printed."""
  md = jax_flashmla.get_mla_metadata(jnp.asarray([5, 7], I32), 16, 1, num_sms=4)
  md = md if metadata == "records" else (md.tile_scheduler_metadata, md.num_splits)
  args = (jnp.zeros((2, 2, 8, 576), BF16), jnp.zeros((6, 64, 1, 576), BF16),
          jnp.zeros((2, 3), I32), jnp.asarray([5, 7], I32))
  with pytest.raises(TypeError) as info:
    jax_flashmla.flash_mla_with_kvcache(*args, md)
  assert_names_expected_got(info, "head_dim_v", "512", type(md).__name__ + " (scheduler "
                            "metadata?); metadata is the 6th positional argument")
  assert "metadata=" in str(info.value) and "Array" not in str(info.value)
  out, _ = jax_flashmla.flash_mla_with_kvcache(*args, 512, md)  # the 6th position works
  assert out.shape == (2, 2, 8, 512)


def test_get_mla_metadata_of_a_list():
  with pytest.raises(TypeError) as info:
    jax_flashmla.get_mla_metadata([100, 10], 16, 1)
  assert_names_expected_got(info, "cache_seqlens", "a jax.Array or numpy array",
                            "list; wrap it with jnp.asarray")
  md = jax_flashmla.get_mla_metadata(np.asarray([100, 10], np.int32), 16, 1, num_sms=4)
  assert md.num_splits.shape == (3,)  # numpy arrays are fine


@pytest.mark.parametrize("rows,heads", [(128, 1), (16, 2)])
def test_metadata_for_other_shapes(rows, heads):
  """Records scheduled for another number of query rows per KV head, or of KV heads: the
  MLAMetadata says which, and the decode refuses it while tracing."""
  md = jax_flashmla.get_mla_metadata(jnp.asarray([5, 7], I32), rows, heads, num_sms=8)
  assert (md.num_q_tokens_per_head_k, md.num_heads_k) == (rows, heads)
  with pytest.raises(ValueError) as info:
    trace_decode(metadata=md)  # s_q=2, h_q=8, h_kv=1: 16 rows per KV head, 1 KV head
  assert_names_expected_got(info, "metadata", "records for this call's 16 query rows per KV "
                            "head (s_q * h_q // h_kv) and 1 KV heads",
                            f"metadata computed with num_q_tokens_per_head_k={rows}, "
                            f"num_heads_k={heads}")
  # A pair carries no shapes: not checked (README, "Values no trace can check").
  trace_decode(metadata=(md.tile_scheduler_metadata, md.num_splits))


def test_mla_decode_needs_a_cache():
  with pytest.raises(TypeError) as info:
    jax_flashmla.mla_decode(GOOD["q"], {"pages": GOOD["k_cache"]})
  assert_names_expected_got(info, "cache", "a PagedKVCache", "dict")


def test_errors_are_raised_inside_jit_before_compiling():
  """The same checks fire when a jitted step is traced (no compile, no run)."""
  q = jnp.zeros((2, 2, 8, 576), BF16)
  k = jnp.zeros((6, 64, 3, 576), BF16)
  step = jax.jit(jax_flashmla.flash_mla_with_kvcache)
  with pytest.raises(ValueError, match="q: expected h_q to be a multiple of h_kv=3"):
    step.trace(q, k, jnp.zeros((2, 3), I32), jnp.zeros((2,), I32))


def test_case_count():
  assert len(DECODE_CASES) + len(METADATA_CASES) + 3 >= 25
