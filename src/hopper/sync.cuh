// Synchronisation and register-budget primitives: mbarriers (through CCCL's cuda::ptx), named barriers
// and setmaxnreg (inline PTX: cuda::ptx has no wrapper for them).
#pragma once

#include <cuda/ptx>

#include <cstdint>

namespace dhp::hopper {

// mbarrier.init.shared::cta.b64 [PTX 9.7.13.15.9]
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  cuda::ptx::mbarrier_init(bar, arrivals);
}

// fence.mbarrier_init.release.cluster: makes initialised barriers visible to the async proxy (TMA).
__device__ __forceinline__ void fence_barrier_init() {
  cuda::ptx::fence_mbarrier_init(cuda::ptx::sem_release, cuda::ptx::scope_cluster);
}

// mbarrier.arrive.shared::cta.b64 (release, CTA scope), one arrival.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) { (void)cuda::ptx::mbarrier_arrive(bar); }

// mbarrier.arrive.expect_tx: announce `bytes` of asynchronous transfer, then arrive once.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  (void)cuda::ptx::mbarrier_arrive_expect_tx(cuda::ptx::sem_release, cuda::ptx::scope_cta,
                                             cuda::ptx::space_shared, bar, bytes);
}

// Spins on mbarrier.try_wait.parity until the phase with this parity has completed. The loop's length
// follows timing only (how long the producer takes), never tensor values.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!cuda::ptx::mbarrier_try_wait_parity(bar, parity)) {
  }
}

// mbarrier.try_wait.parity.acquire.cluster: as mbarrier_wait, and what the arriving CTAs of the cluster wrote before
// their release (fence_cluster) is visible after it.
__device__ __forceinline__ void mbarrier_wait_cluster(uint64_t* bar, uint32_t parity) {
  while (!cuda::ptx::mbarrier_try_wait_parity(cuda::ptx::sem_acquire, cuda::ptx::scope_cluster, bar, parity)) {
  }
}

// fence.acq_rel.cluster: this thread's earlier memory accesses (and those ordered before them, e.g. by a CTA
// barrier) are ordered before its later ones for every thread of the cluster.
__device__ __forceinline__ void fence_cluster() { cuda::ptx::fence(cuda::ptx::sem_acq_rel, cuda::ptx::scope_cluster); }

// mbarrier.arrive.shared::cluster.b64 (release, CTA scope): one arrival on a barrier of another CTA of the
// cluster (address from map_to_rank).
__device__ __forceinline__ void mbarrier_arrive_peer(uint32_t peer_bar) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(peer_bar) : "memory");
}

// st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [PTX 9.7.9.12]: 16 bytes into another CTA's shared
// memory, asynchronously; their arrival counts as complete-tx on that CTA's barrier (both addresses from
// map_to_rank), whose waiters then read them like a TMA load's.
__device__ __forceinline__ void store_async_peer(uint32_t peer_addr, float4 v, uint32_t peer_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];\n"
               ::"r"(peer_addr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(peer_bar)
               : "memory");
}

// cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [PTX 9.7.9.25.4.1]: `bytes` (a multiple of
// 16) contiguous bytes of this CTA's shared memory into another CTA's (`peer_dst` and `peer_bar` from map_to_rank),
// their arrival counted as complete-tx on that CTA's barrier. Issued by one thread.
__device__ __forceinline__ void bulk_copy_to_peer(uint32_t peer_dst, const void* src, uint32_t bytes,
                                                  uint32_t peer_bar) {
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(peer_dst), "r"(static_cast<uint32_t>(__cvta_generic_to_shared(src))), "r"(bytes), "r"(peer_bar)
               : "memory");
}

// mapa.shared::cluster.u32 [PTX 9.7.9.22]: the address of the same shared-memory location (`local`, a shared-window
// address of this CTA's, or a pointer into its shared memory) in CTA `rank` of the cluster, for shared::cluster
// accesses.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t local, uint32_t rank) {
  uint32_t mapped;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(mapped) : "r"(local), "r"(rank));
  return mapped;
}
__device__ __forceinline__ uint32_t map_to_rank(const void* local, uint32_t rank) {
  return map_to_rank(static_cast<uint32_t>(__cvta_generic_to_shared(local)), rank);
}

// ld.shared::cluster.f32 [PTX 9.7.9.8]: a float from another CTA's shared memory, `Offset` bytes past `peer_addr`
// (from map_to_rank); the offset is an immediate, so a run of loads needs one address register. Volatile: kept after
// the barrier wait that orders it behind the peer's writes.
template <int Offset = 0>
__device__ __forceinline__ float load_peer_f32(uint32_t peer_addr) {
  float value;
  asm volatile("ld.shared::cluster.f32 %0, [%1+%2];\n" : "=f"(value) : "r"(peer_addr), "n"(Offset));
  return value;
}

// st.shared.f32 [PTX 9.7.9.9]: a float into this CTA's shared memory, `Offset` bytes past the shared-window address
// `addr`: a run of stores needs one address register.
template <int Offset = 0>
__device__ __forceinline__ void store_shared_f32(uint32_t addr, float value) {
  asm volatile("st.shared.f32 [%0+%1], %2;\n" ::"r"(addr), "n"(Offset), "f"(value) : "memory");
}

// %cluster_ctarank: this CTA's rank within its cluster.
__device__ __forceinline__ uint32_t cluster_rank() { return cuda::ptx::get_sreg_cluster_ctarank(); }

// barrier.cluster.arrive.release [PTX 9.7.13.4]: this thread's arrival at the cluster-wide barrier.
__device__ __forceinline__ void cluster_arrive() { cuda::ptx::barrier_cluster_arrive(cuda::ptx::sem_release); }

// barrier.cluster.wait.acquire: waits until every thread of the cluster has arrived.
__device__ __forceinline__ void cluster_wait() { cuda::ptx::barrier_cluster_wait(cuda::ptx::sem_acquire); }

// bar.sync id, threads [PTX 9.7.13.1]: named barrier over `threads` (multiple of 32) threads.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// bar.arrive id, threads: arrive on a named barrier without waiting.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ld.acquire.gpu.global.b32: reads a flag another CTA publishes with store_release_gpu.
__device__ __forceinline__ int load_acquire_gpu(const int* flag) {
  int value;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(flag) : "memory");
  return value;
}

// st.release.gpu.global.b32: publishes `value`; this thread's earlier writes are visible to an acquirer.
__device__ __forceinline__ void store_release_gpu(int* flag, int value) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(flag), "r"(value) : "memory");
}

// Programmatic dependent launch (griddepcontrol, through the CUDA runtime's device functions). The grid launched after
// this one with cudaLaunchAttributeProgrammaticStreamSerialization may start once every CTA of this one has called
// launch_dependents or exited; it does not wait for this grid's memory.
// mov.u32 %laneid [PTX 10.13], volatile: read where it is used, so ptxas does not derive addresses from it early
// and hold (or spill) them across a kernel's main loop.
__device__ __forceinline__ uint32_t lane_index() {
  uint32_t lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

__device__ __forceinline__ void launch_dependents() { cudaTriggerProgrammaticLaunchCompletion(); }

// Blocks until the grid this one was launched after (with that attribute) has completed and its memory is visible;
// returns at once for a grid launched the ordinary way.
__device__ __forceinline__ void grid_dependency_wait() { cudaGridDependencySynchronize(); }

// Spins until *flag == value (acquire). The loop's length follows other CTAs' progress, never tensor values.
__device__ __forceinline__ void wait_flag_equals(const int* flag, int value) {
  while (load_acquire_gpu(flag) != value) {
  }
}

// setmaxnreg.dec.sync.aligned.u32 [PTX 9.7.19.5]: give registers back to the CTA pool (warpgroup-wide).
template <int Regs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(Regs >= 24 && Regs <= 256 && Regs % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Regs));
}

// setmaxnreg.inc.sync.aligned.u32: take registers from the CTA pool (blocks until they are free).
template <int Regs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(Regs >= 24 && Regs <= 256 && Regs % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Regs));
}

}  // namespace dhp::hopper
