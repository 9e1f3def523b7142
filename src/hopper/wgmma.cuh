// Warpgroup matrix multiply-accumulate (wgmma) [PTX ISA 9.7.15]: shared-memory descriptors, the
// fence/commit/wait protocol and the mma_async shapes dhp uses. All functions are warpgroup-collective.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace dhp::hopper {

// Shared-memory matrix descriptor for operands laid out with the 128-byte swizzle [PTX 9.7.15.5.1.2.2]:
// start address, leading- and stride-dimension byte offsets (each stored >> 4), swizzle mode 1 (128B) in
// bits 62-63. Base offset stays 0: every swizzled buffer starts on a 1024-byte boundary.
struct SmemDescriptor {
  uint32_t start_bytes;    // shared-window address of the first element
  uint32_t leading_bytes;  // LBO
  uint32_t stride_bytes;   // SBO: distance between 8-row groups

  static constexpr uint64_t kSwizzle128B = 1;

  __host__ __device__ constexpr uint64_t encode() const {
    return uint64_t((start_bytes & 0x3FFFF) >> 4) | (uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16) |
           (uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32) | (kSwizzle128B << 62);
  }
};

// The descriptor of the same layout `bytes` further on (a multiple of 16). Only the start address field (bits
// 0-13, address >> 4) moves: shared-window addresses stay below 2^18, so it never carries into the next field,
// and the add touches the low word alone (one uniform add per wgmma instead of re-encoding the address).
__device__ __forceinline__ uint64_t advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = uint32_t(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// wgmma.fence.sync.aligned: orders register accesses to accumulators / A fragments before a wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// wgmma.commit_group.sync.aligned: closes the group of wgmmas issued so far.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// wgmma.wait_group.sync.aligned N: waits until at most N committed groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator reads/writes across a wgmma wait (the asm above only
// clobbers memory, not the registers the async wgmma writes).
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#include "hopper/wgmma_ops.inc"

// D(64xN) (+)= A(64x16, shared) * B(16xN, shared).
template <class T, int N, int TransA, int TransB>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (N == 32) mma_ss_m64n32k16<T, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else if constexpr (N == 64) mma_ss_m64n64k16<T, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else if constexpr (N == 80) mma_ss_m64n80k16<T, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else if constexpr (N == 128) mma_ss_m64n128k16<T, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else if constexpr (N == 160) mma_ss_m64n160k16<T, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else if constexpr (N == 192) mma_ss_m64n192k16<T, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else static_assert(N == 64, "no generated wgmma (ss) for this N: add it to tools/gen_wgmma.py");
}

// D(64xN) (+)= A(64x16, registers) * B(16xN, shared).
template <class T, int N, int TransB>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  if constexpr (N == 64) mma_rs_m64n64k16<T, TransB>(d, a, desc_b, scale_d);
  else if constexpr (N == 128) mma_rs_m64n128k16<T, TransB>(d, a, desc_b, scale_d);
  else if constexpr (N == 256) mma_rs_m64n256k16<T, TransB>(d, a, desc_b, scale_d);
  else static_assert(N == 64, "no generated wgmma (rs) for this N: add it to tools/gen_wgmma.py");
}

}  // namespace dhp::hopper
