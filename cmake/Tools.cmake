# The standalone CUDA tools (JAX_FLASHMLA_BUILD_TOOLS=ON): no Python, no XLA, for the GPU
# machine. Each is built against a kernel library made from the shipped sources with the shipped
# flags (jax_flashmla_add_kernels, jax_flashmla_cuda_target), so the tools exercise exactly the
# code the extension ships; the watchdog and timing variants only add a compile definition.
#
#   check_decode               correctness against a float64 host reference; --prims
#   check_decode_wd            the same with JFM_WATCHDOG: a stuck mbarrier wait traps and
#                              prints instead of hanging the GPU
#   bench_kernels              kernel timing over the benchmark grid, back-to-back and energy
#   bench_kernels_timing       the same with JFM_TIMING: per-CTA start/end (cta_timing.cuh)
#   read_floor                 what reading the cache's bytes costs without any attention work
#   racecheck_uneven_barriers  a race-free program racecheck flags like the narrow kernel
#
# benchmarks/cuda/run_device.sh configures and builds these and runs them in one device call.
if(NOT JAX_FLASHMLA_WITH_CUDA)
  message(FATAL_ERROR "JAX_FLASHMLA_BUILD_TOOLS=ON needs the CUDA kernels (nvcc and "
                      "JAX_FLASHMLA_ENABLE_CUDA=AUTO or ON)")
endif()

jax_flashmla_add_kernels(jax_flashmla_kernels_watchdog JFM_WATCHDOG)
jax_flashmla_add_kernels(jax_flashmla_kernels_timing JFM_TIMING)

set(_jfm_tools)
function(jax_flashmla_add_tool name source kernels)
  add_executable(${name} ${source})
  # tests/cuda holds problem.h, shared by the checker and the benchmark.
  target_include_directories(${name} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/tests/cuda")
  target_link_libraries(${name} PRIVATE ${kernels} ${CMAKE_DL_LIBS})  # dl: NVML at run time
  jax_flashmla_cuda_target(${name})
  set(_jfm_tools ${_jfm_tools} ${name} PARENT_SCOPE)
endfunction()

jax_flashmla_add_tool(check_decode tests/cuda/check_decode.cu jax_flashmla_kernels)
jax_flashmla_add_tool(check_decode_wd tests/cuda/check_decode.cu jax_flashmla_kernels_watchdog)
jax_flashmla_add_tool(racecheck_uneven_barriers tests/cuda/racecheck_uneven_barriers.cu
                      jax_flashmla_kernels)
jax_flashmla_add_tool(bench_kernels benchmarks/cuda/bench_kernels.cu jax_flashmla_kernels)
jax_flashmla_add_tool(bench_kernels_timing benchmarks/cuda/bench_kernels.cu
                      jax_flashmla_kernels_timing)
jax_flashmla_add_tool(read_floor benchmarks/cuda/read_floor.cu jax_flashmla_kernels)

add_custom_target(jax_flashmla_tools DEPENDS ${_jfm_tools})
