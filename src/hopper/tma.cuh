// Tensor Memory Accelerator copies (cp.async.bulk.tensor) through CCCL's cuda::ptx, for the 4-d
// (head_dim, seqlen, heads, batch) tensor maps the attention kernels use. Issued by one thread.
#pragma once

#include <cuda.h>
#include <cuda/ptx>

#include <cstdint>

namespace dhp::hopper {

// prefetch.tensormap [PTX 9.7.9.15]: warm the descriptor cache; `map` is a generic address (of a
// __grid_constant__ parameter here), so no state space is named.
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes: global box -> shared,
// completion counted in bytes on `bar`. Out-of-bounds elements are zero-filled.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  const int32_t coords[4] = {c0, c1, c2, c3};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, dst, map, coords, bar);
}

// The L2 cache policy evict_first (createpolicy.fractional.L2::evict_first, as CUTLASS's CacheHintSm90 encodes it),
// for the .L2::cache_hint forms below (inline PTX: CCCL 13.0's cuda::ptx has no such form of cp.async.bulk.tensor):
// data touched once leaves L2 before the rest.
inline constexpr uint64_t kL2EvictFirst = 0x12F0000000000000ull;

// tma_load_4d with an L2 cache policy: cp.async.bulk.tensor...mbarrier::complete_tx::bytes.L2::cache_hint.
__device__ __forceinline__ void tma_load_4d_hint(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                                 uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "l"(policy)
      : "memory");
}

// The same over a 5-d map (heads packed into a box's rows, tma.h).
__device__ __forceinline__ void tma_load_5d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, int c4,
                                            uint64_t* bar) {
  const int32_t coords[5] = {c0, c1, c2, c3, c4};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, dst, map, coords, bar);
}

// cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group: shared box -> global; out-of-bounds
// elements are not written.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2,
                                             int c3) {
  const int32_t coords[4] = {c0, c1, c2, c3};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_global, cuda::ptx::space_shared, map, coords, src);
}

// tma_store_4d with an L2 cache policy: cp.async.bulk.tensor...bulk_group.L2::cache_hint.
__device__ __forceinline__ void tma_store_4d_hint(const CUtensorMap* map, const void* src, int c0, int c1, int c2,
                                                  int c3, uint64_t policy) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group.L2::cache_hint [%0, {%1, %2, %3, %4}], [%5], %6;\n" ::
                   "l"(reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(static_cast<uint32_t>(__cvta_generic_to_shared(src))),
               "l"(policy)
               : "memory");
}

// The same over a 5-d map (heads packed into a box's rows, tma.h).
__device__ __forceinline__ void tma_store_5d(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3,
                                             int c4) {
  const int32_t coords[5] = {c0, c1, c2, c3, c4};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_global, cuda::ptx::space_shared, map, coords, src);
}

// cp.async.bulk.commit_group
__device__ __forceinline__ void tma_store_commit() { cuda::ptx::cp_async_bulk_commit_group(); }

// cp.async.bulk.wait_group.read 0: the shared source of every committed store has been read.
__device__ __forceinline__ void tma_store_wait_read() { cuda::ptx::cp_async_bulk_wait_group_read(cuda::ptx::n32_t<0>{}); }

// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes: `bytes` (a multiple of 16) contiguous
// bytes global -> shared, completion counted on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  cuda::ptx::cp_async_bulk(cuda::ptx::space_cluster, cuda::ptx::space_global, dst, src, bytes, bar);
}

// cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32: dst[i] += src[i] for `bytes` / 4 floats,
// each element one atomic add in L2.
__device__ __forceinline__ void bulk_reduce_add(float* dst, const float* src, uint32_t bytes) {
  cuda::ptx::cp_reduce_async_bulk(cuda::ptx::space_global, cuda::ptx::space_shared, cuda::ptx::op_add, dst, src,
                                  bytes);
}

// cp.async.bulk.global.shared::cta.bulk_group: `bytes` (a multiple of 16) contiguous bytes shared -> global.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes) {
  cuda::ptx::cp_async_bulk(cuda::ptx::space_global, cuda::ptx::space_shared, dst, src, bytes);
}

// cp.async.bulk.wait_group 0: every committed bulk operation has completed, its writes performed.
__device__ __forceinline__ void bulk_wait_all() { cuda::ptx::cp_async_bulk_wait_group(cuda::ptx::n32_t<0>{}); }

// fence.proxy.async.shared::cta: ordinary shared-memory stores become visible to the async proxy
// (TMA store, wgmma) once followed by a barrier.
__device__ __forceinline__ void fence_view_async_shared() { cuda::ptx::fence_proxy_async(cuda::ptx::space_shared); }

}  // namespace dhp::hopper
