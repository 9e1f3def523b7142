// The kernels' dynamic shared memory.
#pragma once

#include <cstdint>

namespace dhp::hopper {

// The dynamic shared memory from its first `Align`-byte boundary on, as a T (launch with Align bytes of slack).
// The boundary is reached by pointer arithmetic on the __shared__ array, not by rounding an integer, so the
// compiler still sees shared memory behind every access through the result: LDS/STS with 32-bit addresses
// instead of generic LD/ST with 64-bit ones.
template <class T, uint32_t Align = 1024>
__device__ __forceinline__ T& aligned_dynamic_smem() {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t misalignment = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) % Align;
  return *reinterpret_cast<T*>(smem_raw + (Align - misalignment) % Align);
}

}  // namespace dhp::hopper
