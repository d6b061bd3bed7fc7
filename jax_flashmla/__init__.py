"""jax_flashmla: FlashMLA-class paged MLA decoding for JAX on NVIDIA Hopper GPUs.

    metadata = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)   # once per step
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                      metadata=metadata, softmax_scale=scale)

On a Hopper GPU with the extension built with CUDA the calls run our sm_90a kernels (bfloat16 and,
where the build reports it, float16); anywhere else they run the same computation in plain JAX
(`implementation="xla"`). Falling back to plain JAX where the kernels could run (a float32 call
on a Hopper GPU, an extension that did not load) warns with the reason (`KernelFallbackWarning`).

The cache may also hold DeepSeek-V3.2's FP8 rows (656 bytes per token: `quantize_kv`,
`PagedKVCache.create(..., kv_format="fp8")`), read by the same calls at 1.76x fewer bytes.
`flash_mla_sparse_decode` attends each query token to its own top-k tokens of such a cache
(V3.2's sparse attention; its own kernel on Hopper, pure JAX elsewhere), with its scheduler
records computed once per step by `get_sparse_mla_metadata`.
Model code works on `PagedKVCache` (per layer) and `mla_decode`; `PageAllocator` hands out pages
for serving; `jax_flashmla.layers` has a Flax NNX MLA layer (needs flax, not imported here).
`validate_decode_inputs` (eager) and `check_decode_values` (checkify) report lengths, page ids
and scheduler records that the decode would clamp, mask or trust.
"""

from jax_flashmla import _extension
from jax_flashmla._extension import KernelFallbackWarning as KernelFallbackWarning
from jax_flashmla._extension import build_info as build_info
from jax_flashmla.allocator import PageAllocator as PageAllocator
from jax_flashmla.allocator import PagePoolExhausted as PagePoolExhausted
from jax_flashmla.cache import PagedKVCache as PagedKVCache
from jax_flashmla.cache import mla_decode as mla_decode
from jax_flashmla.decode import flash_mla_with_kvcache as flash_mla_with_kvcache
from jax_flashmla.metadata import MLAMetadata as MLAMetadata
from jax_flashmla.metadata import get_mla_metadata as get_mla_metadata
from jax_flashmla.quantization import dequantize_kv as dequantize_kv
from jax_flashmla.quantization import quantize_kv as quantize_kv
from jax_flashmla.reference import flash_mla_reference as flash_mla_reference
from jax_flashmla.sparse import flash_mla_sparse_decode as flash_mla_sparse_decode
from jax_flashmla.sparse import get_sparse_mla_metadata as get_sparse_mla_metadata
from jax_flashmla.validation import check_decode_values as check_decode_values
from jax_flashmla.validation import validate_decode_inputs as validate_decode_inputs

__version__ = "0.1.0"

_extension.register()

# Pass to jax.export.export(..., disabled_checks=DISABLE_JAX_EXPORT_CHECKS): our custom calls are
# not on JAX's list of targets with stability guarantees. An exported program runs where the
# same (versioned) targets are registered, i.e. with a compatible jax_flashmla installed.
DISABLE_JAX_EXPORT_CHECKS = _extension.disable_export_checks()

__all__ = [
    "DISABLE_JAX_EXPORT_CHECKS",
    "KernelFallbackWarning",
    "MLAMetadata",
    "PageAllocator",
    "PagePoolExhausted",
    "PagedKVCache",
    "build_info",
    "check_decode_values",
    "dequantize_kv",
    "flash_mla_reference",
    "flash_mla_sparse_decode",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "get_sparse_mla_metadata",
    "mla_decode",
    "quantize_kv",
    "validate_decode_inputs",
]
