// Dispatch from validated backward params to the compiled (dtype, head_dim) variant, and the scratch size.
#include "error.h"
#include "kernels/bwd_config.h"
#include "params.h"

namespace dhp {
namespace kernels {
template <DType DT, int HeadDim, bool Causal>
dhp_status run_backward(const BwdParams& params, cudaStream_t stream);
}  // namespace kernels

namespace {

struct BwdVariant {
  DType dtype;
  int head_dim;
  dhp_status (*run_full)(const BwdParams&, cudaStream_t);
  dhp_status (*run_causal)(const BwdParams&, cudaStream_t);
};

// The build's backward variant list (CMake's DHP_DTYPES x DHP_BWD_HEAD_DIMS), one line per compiled instance.
#define DHP_BWD_VARIANT(dt, hd)                                                                    \
  BwdVariant{DType::dt, hd, &kernels::run_backward<DType::dt, hd, false>,                          \
             &kernels::run_backward<DType::dt, hd, true>},
constexpr BwdVariant kBwdVariants[] = {
#include "bwd_variants.inc"
};
#undef DHP_BWD_VARIANT

const BwdVariant* find_variant(DType dtype, int head_dim) {
  for (const BwdVariant& v : kBwdVariants)
    if (v.dtype == dtype && v.head_dim == head_dim) return &v;
  return nullptr;
}

}  // namespace

bool backward_variant_exists(DType dtype, int head_dim) { return find_variant(dtype, head_dim) != nullptr; }

size_t backward_workspace_bytes(const FwdParams& p) {
  if (p.batch == 0 || p.seqlen_q == 0 || !backward_variant_exists(p.dtype, p.head_dim)) return 0;
  return kernels::bwd_workspace(p.head_dim, p.causal, p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv).bytes;
}

dhp_status launch_backward(const BwdParams& params, cudaStream_t stream) {
  const BwdVariant* v = find_variant(params.fwd.dtype, params.fwd.head_dim);
  if (v == nullptr)
    return fail(DHP_ERROR_UNSUPPORTED, "head_dim=%d: no backward kernel was built for this dtype and head_dim",
                params.fwd.head_dim);
  return (params.fwd.causal ? v->run_causal : v->run_full)(params, stream);
}

}  // namespace dhp
