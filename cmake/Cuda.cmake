# Decides whether this build has CUDA kernels and, if so, sets up the CUDA language.
#
# JAX_FLASHMLA_ENABLE_CUDA:
#   AUTO (default)  build the kernels iff CMake finds nvcc; otherwise a CPU-only module
#   ON              nvcc is required; configuring fails without it
#   OFF             CPU-only module (registrations() is empty), e.g. for CI without a toolkit
#
# Sets JAX_FLASHMLA_WITH_CUDA (bool) and, when true, JAX_FLASHMLA_CUDA_FLAGS /
# JAX_FLASHMLA_CUDA_ARCHS, and defines jax_flashmla_cuda_target(), which applies them: the one
# place CUDA compile settings are stated, for the kernel library and the CUDA tools alike.

set(JAX_FLASHMLA_ENABLE_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
set_property(CACHE JAX_FLASHMLA_ENABLE_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${JAX_FLASHMLA_ENABLE_CUDA}" _jfm_cuda_mode)

set(JAX_FLASHMLA_WITH_CUDA OFF)
if(_jfm_cuda_mode STREQUAL "OFF")
  message(STATUS "jax_flashmla: CUDA disabled (JAX_FLASHMLA_ENABLE_CUDA=OFF); CPU-only module")
elseif(_jfm_cuda_mode STREQUAL "ON" OR _jfm_cuda_mode STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(JAX_FLASHMLA_WITH_CUDA ON)
  elseif(_jfm_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR
      "JAX_FLASHMLA_ENABLE_CUDA=ON but no CUDA compiler was found. Put nvcc on PATH, set "
      "CUDACXX or CMAKE_CUDA_COMPILER, or build with JAX_FLASHMLA_ENABLE_CUDA=OFF.")
  else()
    message(STATUS "jax_flashmla: no nvcc found; building a CPU-only module")
  endif()
else()
  message(FATAL_ERROR
    "JAX_FLASHMLA_ENABLE_CUDA must be AUTO, ON or OFF (got '${JAX_FLASHMLA_ENABLE_CUDA}')")
endif()

if(JAX_FLASHMLA_WITH_CUDA)
  # The kernels target exactly Hopper's arch-specific ISA (wgmma/TMA need sm_90a, not sm_90).
  # We pass -gencode ourselves and switch CMake's architecture handling off, which works with
  # every CMake we meet (3.25 here, 4.x on the GPU machine) whatever their "90a" support.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES OFF)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.8)
    message(FATAL_ERROR "jax_flashmla needs CUDA >= 12.8 (found ${CMAKE_CUDA_COMPILER_VERSION})")
  endif()

  set(JAX_FLASHMLA_CUDA_ARCHS "90a")
  set(JAX_FLASHMLA_CUDA_FLAGS
      -gencode=arch=compute_90a,code=sm_90a
      -O3
      -lineinfo
      --expt-relaxed-constexpr)
  message(STATUS
    "jax_flashmla: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, archs ${JAX_FLASHMLA_CUDA_ARCHS}")
endif()

option(JAX_FLASHMLA_PTXAS_VERBOSE "Print ptxas register/smem/spill usage per kernel" OFF)
if(JAX_FLASHMLA_WITH_CUDA AND JAX_FLASHMLA_PTXAS_VERBOSE)
  list(APPEND JAX_FLASHMLA_CUDA_FLAGS -Xptxas=-v)
endif()

# Compiles `target`'s CUDA sources the way the shipped kernels are compiled.
function(jax_flashmla_cuda_target target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${JAX_FLASHMLA_CUDA_FLAGS}>)
  set_target_properties(${target} PROPERTIES
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_ARCHITECTURES OFF            # JAX_FLASHMLA_CUDA_FLAGS' -gencode says sm_90a
    CUDA_SEPARABLE_COMPILATION OFF    # no device linking: each .cu is self-contained
    CUDA_RUNTIME_LIBRARY Static
    POSITION_INDEPENDENT_CODE ON)     # the kernels are linked into a shared Python module
endfunction()
