// The boundary between the C API and the kernels: plain pointers, sizes and 64-bit element strides,
// already validated. Kernels and launchers never see DLPack.
#pragma once

#include <cstddef>
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

// The backward's request: the forward's problem (q, k, v, out, lse as inputs) plus dout, the gradients and the
// caller's scratch memory.
struct BwdParams {
  FwdParams fwd;
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  BshdStrides dout_stride, dq_stride, dk_stride, dv_stride;
  void* workspace;  // backward_workspace_bytes(fwd) bytes, kWorkspaceAlign-aligned
};

constexpr size_t kWorkspaceAlign = 256;

// Whether this build holds a backward kernel for (dtype, head_dim).
bool backward_variant_exists(DType dtype, int head_dim);

// Scratch bytes the backward needs; depends on batch, heads_q, seqlen_q, head_dim only. A multiple of
// kWorkspaceAlign; 0 when batch or seqlen_q is 0.
size_t backward_workspace_bytes(const FwdParams& params);

// Launches the backward kernels for validated params on `stream` (the current device must be the tensors').
dhp_status launch_backward(const BwdParams& params, cudaStream_t stream);

}  // namespace dhp
