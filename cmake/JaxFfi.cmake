# dhp_add_jax_ffi(<target> <source>): compiles <source> (XLA FFI handlers for JAX) into <target> and defines
# DHP_WITH_JAX_FFI there, when jaxlib's XLA FFI headers (xla/ffi/api/ffi.h, header-only) are found; otherwise
# says why in the configure log and leaves the target as it is. Nothing links against JAX or XLA.
#
# Where the headers come from, first match wins:
#   -DDHP_XLA_FFI_INCLUDE_DIR=<dir>   e.g. "$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')"; needed
#                                     under pip's build isolation, whose interpreter cannot import the jax of
#                                     the environment being installed into (.ci/run passes it)
#   jax.ffi.include_dir()             of ${Python_EXECUTABLE} (pip install --no-build-isolation, plain CMake)
# -DDHP_JAX_FFI=OFF skips the handlers altogether.
option(DHP_JAX_FFI "Build the XLA FFI handlers for JAX into dhp._C when jaxlib's headers are found" ON)
set(DHP_XLA_FFI_INCLUDE_DIR "" CACHE PATH "jaxlib's include directory (jax.ffi.include_dir()); empty: ask Python")

function(dhp_add_jax_ffi target source)
  if(NOT DHP_JAX_FFI)
    message(STATUS "dhp: JAX XLA FFI handlers: off (DHP_JAX_FFI=OFF)")
    return()
  endif()
  set(include_dir "${DHP_XLA_FFI_INCLUDE_DIR}")
  if(include_dir STREQUAL "")
    execute_process(COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
                    OUTPUT_VARIABLE include_dir OUTPUT_STRIP_TRAILING_WHITESPACE
                    RESULT_VARIABLE failed ERROR_QUIET)
    if(failed)
      message(STATUS "dhp: JAX XLA FFI handlers: off (${Python_EXECUTABLE} cannot import jax.ffi; under pip's "
                     "build isolation pass -DDHP_XLA_FFI_INCLUDE_DIR=<jax.ffi.include_dir()>)")
      return()
    endif()
  endif()
  set(header "${include_dir}/xla/ffi/api/ffi.h")
  if(NOT EXISTS "${header}")
    if(DHP_XLA_FFI_INCLUDE_DIR STREQUAL "")
      message(STATUS "dhp: JAX XLA FFI handlers: off (no ${header})")
      return()
    endif()
    message(FATAL_ERROR "DHP_XLA_FFI_INCLUDE_DIR=${DHP_XLA_FFI_INCLUDE_DIR}: no xla/ffi/api/ffi.h there")
  endif()
  # The handlers take the device ordinal from the execution context (XLA FFI API of jaxlib >= 0.5).
  file(STRINGS "${header}" has_device_ordinal REGEX "struct DeviceOrdinal")
  if(NOT has_device_ordinal)
    message(STATUS "dhp: JAX XLA FFI handlers: off (${header} predates ffi::DeviceOrdinal: jaxlib too old)")
    return()
  endif()
  target_sources(${target} PRIVATE "${source}")
  # SYSTEM: the XLA headers' own warnings are not ours.
  target_include_directories(${target} SYSTEM PRIVATE "${include_dir}")
  target_compile_definitions(${target} PRIVATE DHP_WITH_JAX_FFI)
  message(STATUS "dhp: JAX XLA FFI handlers: on (${include_dir})")
endfunction()
