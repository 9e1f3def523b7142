// dhp._C's JAX part: XLA FFI handlers for the C API, built only where jaxlib's XLA FFI headers were found at
// configure time (CMake defines DHP_WITH_JAX_FFI then). See jax_ffi.cpp.
#pragma once

#include <nanobind/nanobind.h>

namespace dhp_jax {

// Adds jax_ffi_targets() and jax_check_forward() to the module.
void register_jax_ffi(nanobind::module_& m);

}  // namespace dhp_jax
