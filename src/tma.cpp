#include "tma.h"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "error.h"

namespace dhp {
namespace {

// cuTensorMapEncodeTiled from the driver, looked up at run time so libdhp never links against libcuda.
PFN_cuTensorMapEncodeTiled_v12000 encode_entry_point(cudaError_t* error) {
  static cudaError_t lookup_error = cudaSuccess;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult query{};
    lookup_error = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &query);
    if (lookup_error == cudaSuccess && query != cudaDriverEntryPointSuccess) lookup_error = cudaErrorSymbolNotFound;
    return lookup_error == cudaSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr) : nullptr;
  }();
  *error = lookup_error;
  return fn;
}

}  // namespace

dhp_status encode_tensor_map(CUtensorMap* map, DType dtype, const void* base, const TensorMapShape& shape,
                             const BshdStrides& strides, int box_rows, const char* name, int pack) {
  cudaError_t lookup_error;
  const auto encode = encode_entry_point(&lookup_error);
  if (encode == nullptr)
    return fail(DHP_ERROR_CUDA, "the CUDA driver has no cuTensorMapEncodeTiled (needs a driver for CUDA 12.0+): %s",
                cudaGetErrorString(lookup_error));

  constexpr cuuint64_t kElemBytes = 2;
  // Dimensions innermost first, and each outer one's stride in elements. A dimension of extent 1 is never stepped
  // over, so its stride is free; give it a compact one so that whatever the framework reported (torch may report
  // anything) meets TMA's multiple-of-16 rule.
  const int rank = pack > 0 ? 5 : 4;
  const cuuint64_t dims4[4] = {cuuint64_t(shape.head_dim), cuuint64_t(shape.seqlen), cuuint64_t(shape.heads),
                               cuuint64_t(shape.batch)};
  const int64_t given4[3] = {strides.seq, strides.head, strides.batch};
  const cuuint64_t dims5[5] = {cuuint64_t(shape.head_dim), cuuint64_t(pack), cuuint64_t(shape.heads / (pack > 0 ? pack : 1)),
                               cuuint64_t(shape.seqlen), cuuint64_t(shape.batch)};
  const int64_t given5[4] = {strides.head, strides.head * pack, strides.seq, strides.batch};
  const cuuint64_t* dims = pack > 0 ? dims5 : dims4;
  const int64_t* given = pack > 0 ? given5 : given4;
  cuuint64_t byte_strides[4];
  cuuint64_t compact = dims[0] * kElemBytes;
  for (int i = 0; i + 1 < rank; ++i) {
    byte_strides[i] = dims[i + 1] == 1 ? compact : cuuint64_t(given[i]) * kElemBytes;
    compact = byte_strides[i] * dims[i + 1];
  }
  const cuuint32_t box4[4] = {64, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t box5[5] = {64, cuuint32_t(pack), 1, cuuint32_t(box_rows / (pack > 0 ? pack : 1)), 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode(map, dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            cuuint32_t(rank), const_cast<void*>(base), dims, byte_strides, pack > 0 ? box5 : box4,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return fail(DHP_ERROR_CUDA,
                "%s: cuTensorMapEncodeTiled failed (CUresult %d) for shape (batch=%d, seqlen=%d, heads=%d, head_dim=%d) "
                "and strides (batch=%lld, seq=%lld, head=%lld) elements",
                name, int(r), shape.batch, shape.seqlen, shape.heads, shape.head_dim, (long long)strides.batch,
                (long long)strides.seq, (long long)strides.head);
  return DHP_SUCCESS;
}

}  // namespace dhp
