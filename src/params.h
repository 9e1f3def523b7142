// The boundary between the C API and the kernels: plain pointers, sizes and 64-bit element strides,
// already validated. Kernels and launchers never see DLPack.
#pragma once

#include <cstdint>

#include "dhp/dhp.h"

namespace dhp {

enum class DType { bf16, fp16 };

// Strides of a (batch, seqlen, heads, head_dim) tensor, in elements; the head_dim stride is 1.
struct BshdStrides {
  int64_t batch;
  int64_t seq;
  int64_t head;
};

struct FwdParams {
  DType dtype;
  int head_dim;
  int batch;
  int seqlen_q;
  int seqlen_k;
  int heads_q;
  int heads_kv;

  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // nullptr: not written

  BshdStrides q_stride, k_stride, v_stride, out_stride;
  int64_t lse_stride_batch, lse_stride_head, lse_stride_seq;  // elements

  bool causal;
  float softmax_scale;  // resolved: never 0
};

// Launches the forward kernel for validated params on `stream` (the current device must be the tensors').
// Returns DHP_SUCCESS, or an error recorded with fail() (e.g. TMA descriptor encoding, launch failure).
dhp_status launch_forward(const FwdParams& params, cudaStream_t stream);

// Whether this build holds a forward kernel for (dtype, head_dim).
bool forward_variant_exists(DType dtype, int head_dim);

}  // namespace dhp
