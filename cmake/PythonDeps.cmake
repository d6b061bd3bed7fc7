# Locates the build-time Python dependencies: nanobind's CMake package and the XLA FFI headers
# that ship inside jaxlib. Both are asked of the interpreter that runs the build, so a wheel
# build (scikit-build-core) and a plain `cmake -DPython_EXECUTABLE=...` see the same packages.
#
# Sets:
#   JAX_FLASHMLA_XLA_FFI_INCLUDE_DIR  folder holding xla/ffi/api/ffi.h
#   JAX_FLASHMLA_JAXLIB_VERSION       jaxlib version whose headers define our FFI ABI

find_package(Python 3.11 REQUIRED
             COMPONENTS Interpreter Development.Module ${SKBUILD_SABI_COMPONENT})

# nanobind is a build requirement (pip-installed), not a system package: ask it where its CMake
# config lives instead of relying on CMAKE_PREFIX_PATH.
if(NOT nanobind_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -m nanobind --cmake_dir
    OUTPUT_VARIABLE _jfm_nanobind_dir
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _jfm_nanobind_rc)
  if(NOT _jfm_nanobind_rc EQUAL 0)
    message(FATAL_ERROR
      "nanobind is not importable by ${Python_EXECUTABLE}; install it (pip install nanobind).")
  endif()
  set(nanobind_DIR "${_jfm_nanobind_dir}" CACHE PATH "nanobind CMake config folder")
endif()
find_package(nanobind CONFIG REQUIRED)

# The FFI headers define the ABI version our handlers report to XLA: a handler built against
# newer headers than the runtime jaxlib is refused, so record which jaxlib they came from.
if(NOT JAX_FLASHMLA_XLA_FFI_INCLUDE_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
    OUTPUT_VARIABLE _jfm_ffi_dir
    OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_VARIABLE _jfm_ffi_err
    RESULT_VARIABLE _jfm_ffi_rc)
  if(NOT _jfm_ffi_rc EQUAL 0 OR NOT EXISTS "${_jfm_ffi_dir}/xla/ffi/api/ffi.h")
    message(FATAL_ERROR
      "Could not find the XLA FFI headers: `import jax.ffi` failed for ${Python_EXECUTABLE}.\n"
      "Install jax and jaxlib (>= 0.5) into that interpreter, or pass "
      "-DJAX_FLASHMLA_XLA_FFI_INCLUDE_DIR=<folder containing xla/ffi/api/ffi.h>.\n"
      "${_jfm_ffi_err}")
  endif()
  set(JAX_FLASHMLA_XLA_FFI_INCLUDE_DIR "${_jfm_ffi_dir}" CACHE PATH "XLA FFI header folder")
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jaxlib; print(jaxlib.__version__)"
  OUTPUT_VARIABLE JAX_FLASHMLA_JAXLIB_VERSION
  OUTPUT_STRIP_TRAILING_WHITESPACE
  ERROR_QUIET)
if(NOT JAX_FLASHMLA_JAXLIB_VERSION)
  set(JAX_FLASHMLA_JAXLIB_VERSION "unknown")
endif()
message(STATUS "jax_flashmla: XLA FFI headers from jaxlib ${JAX_FLASHMLA_JAXLIB_VERSION}: "
               "${JAX_FLASHMLA_XLA_FFI_INCLUDE_DIR}")
