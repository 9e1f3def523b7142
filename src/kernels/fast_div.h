// Division by a launch-time constant without the integer-division sequence: q = n / d for 0 <= n < 2^31 as
// umulhi(n, m) >> s with m = ceil(2^(31 + l) / d), l = ceil(log2 d), s = l - 1 (Granlund and Montgomery,
// "Division by invariant integers using multiplication", 1994); d == 1 passes n through.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DHP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DHP_HOST_DEVICE inline
#endif

namespace dhp::kernels {

struct FastDiv {
  uint32_t d, mul, shift;

  static FastDiv make(uint32_t d) {
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    if (l == 0) return {1, 0, 0};
    const uint64_t m = ((uint64_t(1) << (31 + l)) + d - 1) / d;
    return {d, uint32_t(m), l - 1};
  }
  DHP_HOST_DEVICE int div(int n) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(uint32_t(n), mul);
#else
    const uint32_t high = uint32_t((uint64_t(uint32_t(n)) * mul) >> 32);
#endif
    return d == 1 ? n : int(high >> shift);
  }
};

}  // namespace dhp::kernels
