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

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 [PTX 9.7.14.5.15]: four 8x8 matrices of 16-bit elements. Lane l gives the
// shared-window address of row l % 8 of matrix l / 8 (16 contiguous bytes); register i receives row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of matrix i. Volatile, with a memory clobber: it stays after the barrier wait that
// makes the data visible.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

}  // namespace dhp::hopper
