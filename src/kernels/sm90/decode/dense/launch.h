// Host entry of the sm90 (wgmma + TMA) dense decode kernels, which read a bf16 paged cache. They
// write the final output of unsplit requests and the fp32 partials of split ones; the combine
// kernel must run after them for those. Calls with at most 32 query rows per kv head run the
// narrow kernel (narrow.cuh, N = 16 or 32), others the wide one (wide.cuh); all take the same
// grid, block, descriptor and outputs.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/params.h"

namespace jax_flashmla {

// Launches the chosen kernel on `stream` with grid (num_m_blocks, h_kv, num_sm_parts), 256
// threads and that kernel's kSmemBytes (FP8: kSmemBytesFp8) of dynamic shared memory. Encodes
// the TMA descriptor(s) of k_cache on the host for every call (no device sync, safe under graph
// capture). With programmatic_dependent it
// is launched with programmatic stream serialization (its setup overlaps the previous kernel's
// tail); either way it waits (griddepcontrol.wait) before reading any input, and lets its
// dependents launch once every CTA has finished its last main loop. allow_narrow = false runs
// the wide kernel for every shape (A/B runs and cross-checks).
cudaError_t launch_dense_decode_sm90(const DecodeParams& params, cudaStream_t stream,
                                     bool programmatic_dependent = true, bool allow_narrow = true);

// The same for an FP8 cache (params.cache_format == kFp8, elem_type bf16): the kernels
// instantiated for it, with its three TMA descriptors (launch_fp8.cu). launch_dense_decode_sm90
// forwards FP8 calls here.
cudaError_t launch_dense_decode_fp8_sm90(const DecodeParams& params, cudaStream_t stream,
                                         bool programmatic_dependent, bool allow_narrow);

// The TMA descriptor of k_cache the kernels take (exposed for tests of the building blocks and
// the host-cost benchmark).
cudaError_t make_kcache_tensor_map_sm90(CUtensorMap* map, const DecodeParams& params);

#if defined(JFM_TIMING)
// Timing builds (common/cta_timing.cuh): (start ns, end ns, SM) of CTAs 0..ctas-1 of the last
// launch, CTA-linear.
cudaError_t read_cta_timing_sm90(unsigned long long* host, size_t ctas);
#endif

}  // namespace jax_flashmla
