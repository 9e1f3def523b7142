// The two wgmma loops both attention kernels are made of, over 128B-swizzled shared-memory tiles stored as
// 64-column boxes (see the layout note in attention_fwd.cuh).
#pragma once

#include <cstdint>

#include "hopper/wgmma.cuh"

namespace dhp::kernels {

// acc (64 x N) (+)= A (64 rows) * B^T (N rows), both K-major with K = head_dim in 64-column boxes of ABox and BBox
// bytes: k16 steps of +32 B inside a box, the next box after 4. The first step overwrites acc.
template <class T, int HeadDim, int N, int ABox, int BBox>
__device__ __forceinline__ void gemm_kmajor(float (&acc)[N / 2], uint32_t a_base, uint32_t b_base) {
  const uint64_t a0 = hopper::SmemDescriptor{a_base, 16, 1024}.encode();
  const uint64_t b0 = hopper::SmemDescriptor{b_base, 16, 1024}.encode();
#pragma unroll
  for (int t = 0; t < HeadDim / 16; ++t) {
    const uint32_t k_off = (t % 4) * 32;
    hopper::mma_ss<T, N, 0, 0>(acc, hopper::advance(a0, (t / 4) * ABox + k_off),
                               hopper::advance(b0, (t / 4) * BBox + k_off), t > 0);
  }
}

// acc (64 x N) (+)= A (64 rows, registers: one k16 fragment per step) * B^T (N rows), B K-major as in gemm_kmajor.
// The first step overwrites acc.
template <class T, int HeadDim, int N, int BBox>
__device__ __forceinline__ void gemm_rs_kmajor(float (&acc)[N / 2], const uint32_t (&a)[HeadDim / 16][4],
                                               uint32_t b_base) {
  const uint64_t b0 = hopper::SmemDescriptor{b_base, 16, 1024}.encode();
#pragma unroll
  for (int t = 0; t < HeadDim / 16; ++t)
    hopper::mma_rs<T, N, 0>(acc, a[t], hopper::advance(b0, (t / 4) * BBox + (t % 4) * 32), t > 0);
}

// acc (64 x N) += A (64 x K, registers: one k16 fragment per step) * B (K rows x N), B N-major (N contiguous) in
// 64-column boxes of BBox bytes: LBO = box stride, SBO = 8 rows, +16 rows (2048 B) per k16 step.
template <class T, int K, int N, int BBox>
__device__ __forceinline__ void gemm_rs_nmajor(float (&acc)[N / 2], const uint32_t (&a)[K / 16][4], uint32_t b_base) {
  const uint64_t b0 = hopper::SmemDescriptor{b_base, BBox, 1024}.encode();
#pragma unroll
  for (int t = 0; t < K / 16; ++t) hopper::mma_rs<T, N, 1>(acc, a[t], hopper::advance(b0, t * 2048), 1);
}

}  // namespace dhp::kernels
