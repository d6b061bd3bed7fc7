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

namespace jax_flashmla {
namespace {

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  // Read once per process. PDL (on both launches) can be switched off to rule it out when
  // debugging or timing; the kernels are correct either way. JAX_FLASHMLA_DECODE_KERNEL=wide
  // runs the wide kernel for every shape (A/B runs against the narrow kernel).
  static const bool pdl = std::getenv("JAX_FLASHMLA_DISABLE_PDL") == nullptr;
  static const bool allow_narrow = !env_is("JAX_FLASHMLA_DECODE_KERNEL", "wide");
  cudaError_t err = launch_dense_decode_sm90(params, stream, pdl, allow_narrow);
  if (err != cudaSuccess) return err;
  err = launch_combine(params, stream, pdl);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace jax_flashmla
