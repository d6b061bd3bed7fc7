"""The numbers and names the kernels are built around, stated once for the Python side.

The C++ side states them in `src/kernels/params.h` and the FFI registration; the compiled
extension exports its values as `_ext.constants()`, and `tests/test_constants.py` checks that the
two agree. Every module of this package imports them from here.
"""

from __future__ import annotations

# Shapes of the operands: fixed by the kernels' tiling, so checked at trace time.
HEAD_DIM_K = 576  # one cache row: 512 latent (c_kv) + 64 RoPE (k_pe); the decode's Q/K width
HEAD_DIM_V = 512  # V is the first 512 columns of the same row (the latent part)
PAGE_SIZE = 64  # tokens per KV page (the cache's axis 1); also the kernels' N tile

# The split-KV scheduler: the pure-JAX twin must write the CUDA scheduler's records exactly.
BLOCK_M = 64  # query rows per CTA (the wgmma M): each KV head's rows come in blocks of this many
MAX_SM_PARTS = 160  # kMaxSplits: the combine merges at most this many splits of one request
SCHED_RECORD_INTS = 8  # int32s in one record (`SchedRecord`), the last axis of the records
FIXED_OVERHEAD_BLOCKS = 5  # a request's cost beyond its pages, in pages, when splitting work
INT32_MAX = 2**31 - 1  # the scheduler and the kernels do their length arithmetic in int32

# Versioned FFI target names. A new handler ABI gets a new suffix and the old name stays
# registered, so programs exported with `jax.export` keep working.
METADATA_TARGET = "jax_flashmla_mla_metadata_v1"  # the scheduler
DECODE_TARGET = "jax_flashmla_mla_decode_v1"  # the decode (split-KV kernel + combine)
SPARSE_DECODE_TARGET = "jax_flashmla_mla_sparse_decode_v1"  # the token-sparse decode (FP8 cache)

# The FP8 cache row (DeepSeek-V3.2's layout; jax_flashmla/quantization.py): 512 float8_e4m3fn
# latent values, then 4 float32 scales (one per tile of 128), then 64 bfloat16 RoPE values.
FP8_ROW_BYTES = 656
FP8_SCALE_OFFSET = 512
FP8_ROPE_OFFSET = 528
FP8_TILE_COLS = 128

# SM count assumed when no GPU is attached (H100/H200 SXM); pass num_sms to target another part.
DEFAULT_NUM_SMS = 132
