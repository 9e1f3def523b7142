// Compressible memory makes L2/DRAM traffic depend on the values stored (all-zero or repetitive data moves
// fewer bytes: the GPU.zip channel), which no kernel code can hide, so tensors in it are refused.
//
// Only the virtual-memory-management API (cuMemCreate + cuMemMap) can request compression, and only its
// allocations have a handle that cuMemRetainAllocationHandle returns; the handle's properties say whether the
// allocation is compressible. Every other allocation (cudaMalloc; cudaMallocAsync pools, whose properties
// have no compression field) fails the retain and is not compressible. A tensor may cross several
// mappings of one reserved range (PyTorch's expandable segments map chunk after chunk), so the range is
// walked mapping by mapping. Cost: one driver call per tensor for cudaMalloc memory, four per mapping for
// VMM memory.
//
// The driver entry points come through cudaGetDriverEntryPointByVersion, so libdhp never links libcuda.
#include "memory_check.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cinttypes>

#include "error.h"

namespace dhp {
namespace {

struct Driver {
  PFN_cuMemRetainAllocationHandle_v11000 retain = nullptr;
  PFN_cuMemGetAllocationPropertiesFromHandle_v10020 properties = nullptr;
  PFN_cuMemRelease_v10020 release = nullptr;
  PFN_cuPointerGetAttributes_v7000 pointer_attributes = nullptr;
  PFN_cuGetErrorName_v6000 error_name = nullptr;
  const char* missing = nullptr;  // the first entry point the driver could not give
  cudaError_t lookup_error = cudaSuccess;
};

template <typename Fn>
void look_up(Driver& d, Fn* fn, const char* symbol, unsigned version) {
  if (d.missing) return;
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult query{};
  cudaError_t e = cudaGetDriverEntryPointByVersion(symbol, &ptr, version, cudaEnableDefault, &query);
  if (e != cudaSuccess) cudaGetLastError();
  if (e == cudaSuccess && query != cudaDriverEntryPointSuccess) e = cudaErrorSymbolNotFound;
  if (e != cudaSuccess) {
    d.missing = symbol;
    d.lookup_error = e;
    return;
  }
  *fn = reinterpret_cast<Fn>(ptr);
}

const Driver& driver() {
  static const Driver d = [] {
    Driver d;
    look_up(d, &d.retain, "cuMemRetainAllocationHandle", 11000);
    look_up(d, &d.properties, "cuMemGetAllocationPropertiesFromHandle", 10020);
    look_up(d, &d.release, "cuMemRelease", 10020);
    look_up(d, &d.pointer_attributes, "cuPointerGetAttributes", 7000);
    look_up(d, &d.error_name, "cuGetErrorName", 6000);
    return d;
  }();
  return d;
}

// A driver failure means the question went unanswered: refuse rather than launch on memory of unknown kind.
dhp_status unanswered(const char* name, const char* call, CUresult r) {
  const char* error = nullptr;
  if (driver().error_name == nullptr || driver().error_name(r, &error) != CUDA_SUCCESS) error = nullptr;
  return fail(DHP_ERROR_CUDA, "%s: cannot tell whether the tensor's memory is compressible: %s failed (%s, "
              "CUresult %d)", name, call, error ? error : "unknown error", static_cast<int>(r));
}

}  // namespace

dhp_status check_not_compressible(const char* name, uintptr_t begin, uintptr_t end) {
  if (begin >= end) return DHP_SUCCESS;
  const Driver& d = driver();
  if (d.missing) {
    return fail(DHP_ERROR_CUDA, "%s: cannot tell whether the tensor's memory is compressible: the CUDA driver has "
                "no %s (%s)", name, d.missing, cudaGetErrorString(d.lookup_error));
  }
  for (uintptr_t p = begin; p < end;) {
    CUmemGenericAllocationHandle handle{};
    CUresult r = d.retain(&handle, reinterpret_cast<void*>(p));
    // No mapping made by cuMemMap at p (or no VMM on this system): an ordinary allocation, never compressed.
    if (r == CUDA_ERROR_INVALID_VALUE || r == CUDA_ERROR_NOT_SUPPORTED) return DHP_SUCCESS;
    if (r != CUDA_SUCCESS) return unanswered(name, "cuMemRetainAllocationHandle", r);
    CUmemAllocationProp prop{};
    r = d.properties(&prop, handle);
    const CUresult released = d.release(handle);  // drops only the reference the retain took
    if (r != CUDA_SUCCESS) return unanswered(name, "cuMemGetAllocationPropertiesFromHandle", r);
    if (released != CUDA_SUCCESS) return unanswered(name, "cuMemRelease", released);
    if (prop.allocFlags.compressionType != CU_MEM_ALLOCATION_COMP_NONE) {
      return fail(DHP_ERROR_UNSUPPORTED, "%s: the tensor's memory is compressible (cuMemCreate with "
                  "CU_MEM_ALLOCATION_COMP_GENERIC); compression makes memory traffic depend on the values, which dhp "
                  "does not allow: allocate it without compression", name);
    }
    void* base = nullptr;
    size_t size = 0;
    CUpointer_attribute attributes[] = {CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR, CU_POINTER_ATTRIBUTE_MAPPING_SIZE};
    void* values[] = {&base, &size};
    r = d.pointer_attributes(2, attributes, values, static_cast<CUdeviceptr>(p));
    if (r != CUDA_SUCCESS) return unanswered(name, "cuPointerGetAttributes (mapping range)", r);
    const uintptr_t next = reinterpret_cast<uintptr_t>(base) + size;
    if (next <= p) {
      return fail(DHP_ERROR_CUDA, "%s: cannot tell whether the tensor's memory is compressible: the driver "
                  "reports no mapping range at 0x%" PRIxPTR, name, p);
    }
    p = next;
  }
  return DHP_SUCCESS;
}

}  // namespace dhp
