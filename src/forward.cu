// Dispatch from validated forward params to the compiled (dtype, head_dim) variant.
#include "error.h"
#include "params.h"

namespace dhp {
namespace kernels {
template <DType DT, int HeadDim, bool Causal>
dhp_status run_forward(const FwdParams& params, cudaStream_t stream);
}  // namespace kernels

namespace {

struct FwdVariant {
  DType dtype;
  int head_dim;
  dhp_status (*run_full)(const FwdParams&, cudaStream_t);
  dhp_status (*run_causal)(const FwdParams&, cudaStream_t);
};

// The build's variant list (CMake's DHP_DTYPES x DHP_HEAD_DIMS), one line per compiled instance.
#define DHP_FWD_VARIANT(dt, hd) \
  FwdVariant{DType::dt, hd, &kernels::run_forward<DType::dt, hd, false>, &kernels::run_forward<DType::dt, hd, true>},
constexpr FwdVariant kFwdVariants[] = {
#include "fwd_variants.inc"
};
#undef DHP_FWD_VARIANT

const FwdVariant* find_variant(DType dtype, int head_dim) {
  for (const FwdVariant& v : kFwdVariants)
    if (v.dtype == dtype && v.head_dim == head_dim) return &v;
  return nullptr;
}

}  // namespace

bool forward_variant_exists(DType dtype, int head_dim) { return find_variant(dtype, head_dim) != nullptr; }

dhp_status launch_forward(const FwdParams& params, cudaStream_t stream) {
  const FwdVariant* v = find_variant(params.dtype, params.head_dim);
  if (v == nullptr)
    return fail(DHP_ERROR_UNSUPPORTED, "head_dim=%d: no forward kernel was built for this dtype and head_dim",
                params.head_dim);
  return (params.causal ? v->run_causal : v->run_full)(params, stream);
}

}  // namespace dhp
