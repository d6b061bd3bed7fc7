// launch_decode: the decode policy. Which kernel runs the split-KV decode (today the sm90 dense
// kernels, which pick wide or narrow themselves), then the combine of split rows. The combine
// follows on the same stream as a programmatic dependent launch (PDL), so its launch latency
// hides behind the decode kernel's tail while griddepcontrol.wait inside it keeps the data
// dependency exact.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "kernels/launch.h"
#include "kernels/params.h"
#include "kernels/sm90/decode/dense/launch.h"
#include "kernels/sm90/decode/sparse/launch.h"

namespace jax_flashmla {

const DecodePolicy& decode_policy() {
  static const DecodePolicy policy = [] {
    const char* kernel = std::getenv("JAX_FLASHMLA_DECODE_KERNEL");
    DecodePolicy p;
    p.pdl = std::getenv("JAX_FLASHMLA_DISABLE_PDL") == nullptr;
    p.allow_narrow = kernel == nullptr || std::strcmp(kernel, "wide") != 0;
    return p;
  }();
  return policy;
}

// Every launch returns its own status (cudaLaunchKernelEx reports a bad launch and errors left by
// earlier work on the context), so no cudaGetLastError follows: it would only cost a runtime call
// per decode and hand us, and clear, an error some other code on this thread left behind.
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  const DecodePolicy& policy = decode_policy();
  const cudaError_t err =
      launch_dense_decode_sm90(params, stream, policy.pdl, policy.allow_narrow);
  if (err != cudaSuccess) return err;
  return launch_combine(params, stream, policy.pdl);
}

}  // namespace jax_flashmla

namespace jax_flashmla {

cudaError_t launch_sparse_decode(const SparseDecodeParams& params, cudaStream_t stream) {
  const DecodePolicy& policy = decode_policy();
  const cudaError_t err = launch_sparse_decode_sm90(params, stream, policy.pdl);
  if (err != cudaSuccess) return err;
  return launch_sparse_combine(params, stream, policy.pdl);
}

}  // namespace jax_flashmla
