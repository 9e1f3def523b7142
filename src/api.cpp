// The C API: argument validation, device checks and dispatch to the forward and backward launchers.
//
// Validation runs in a fixed order, one category at a time over all tensors (pointers, device, dtype, rank,
// shapes, strides, extents, aliasing, options) and calls no CUDA function until the device checks at the
// end, so every rejection is testable on a machine without a GPU. Messages name the argument and what was
// expected. Nothing here allocates or throws: sentences are formatted into fixed buffers.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "build_info.h"
#include "dhp/dhp.h"
#include "error.h"
#include "kernels/bwd_config.h"
#include "kernels/fwd_config.h"
#include "kernels/tile_order.h"
#include "memory_check.h"
#include "params.h"

namespace dhp {
namespace {

constexpr int64_t kMaxDim = int64_t{1} << 31;              // FwdParams holds sizes as int
constexpr int64_t kMaxGridDim = 65535;                      // batch and heads_q index grid.y / grid.z
constexpr int64_t kTmaMaxStrideBytes = int64_t{1} << 40;    // cuTensorMapEncodeTiled: globalStrides < 2^40
constexpr int64_t kTmaAlignBytes = 16;                      // TMA: global base address and strides
constexpr int kHeadDimStep = 8, kMaxHeadDimListed = 512;    // candidates probed to list the built head dims
constexpr int kCachedDevices = 64;

enum Bshd { kBatch, kSeq, kHeads, kHeadDim };  // dims of q, k, v, out
enum Lse { kLseBatch, kLseHeads, kLseSeq };   // dims of lse

// A short formatted string in a fixed buffer.
struct Text {
  char s[160];
};

Text dtype_text(DLDataType t) {
  static const char* const kCodes[] = {"int", "uint", "float", "handle", "bfloat", "complex", "bool"};
  Text out;
  const char* code = t.code < sizeof(kCodes) / sizeof(kCodes[0]) ? kCodes[t.code] : "code?";
  if (t.lanes == 1) {
    std::snprintf(out.s, sizeof(out.s), "%s%u", code, unsigned{t.bits});
  } else {
    std::snprintf(out.s, sizeof(out.s), "%s%ux%u", code, unsigned{t.bits}, unsigned{t.lanes});
  }
  return out;
}

Text device_text(DLDevice d) {
  Text out;
  const char* type = d.device_type == kDLCPU           ? "cpu"
                     : d.device_type == kDLCUDA        ? "cuda"
                     : d.device_type == kDLCUDAHost    ? "cuda_host"
                     : d.device_type == kDLCUDAManaged ? "cuda_managed"
                                                       : nullptr;
  if (type) {
    std::snprintf(out.s, sizeof(out.s), "%s:%d", type, static_cast<int>(d.device_id));
  } else {
    std::snprintf(out.s, sizeof(out.s), "device_type %d:%d", static_cast<int>(d.device_type),
                  static_cast<int>(d.device_id));
  }
  return out;
}

// "(2, 128, 8, 64)"
Text dims_text(const int64_t* dims, int n) {
  Text out;
  int len = std::snprintf(out.s, sizeof(out.s), "(");
  for (int i = 0; i < n; ++i) {
    len += std::snprintf(out.s + len, sizeof(out.s) - len, "%s%" PRId64, i ? ", " : "", dims[i]);
  }
  std::snprintf(out.s + len, sizeof(out.s) - len, ")");
  return out;
}

// "64, 128 or 256": the head dims this build holds kernels for.
Text head_dims_text(DType dtype) {
  Text out{};
  int found[kMaxHeadDimListed / kHeadDimStep], n = 0;
  for (int d = kHeadDimStep; d <= kMaxHeadDimListed; d += kHeadDimStep) {
    if (forward_variant_exists(dtype, d)) found[n++] = d;
  }
  if (n == 0) std::snprintf(out.s, sizeof(out.s), "one this build holds (it has none for this dtype)");
  int len = 0;
  for (int i = 0; i < n; ++i) {
    const char* sep = i == 0 ? "" : i + 1 == n ? " or " : ", ";
    len += std::snprintf(out.s + len, sizeof(out.s) - len, "%s%d", sep, found[i]);
  }
  return out;
}

bool is_bf16(DLDataType t) { return t.code == kDLBfloat && t.bits == 16 && t.lanes == 1; }
bool is_fp16(DLDataType t) { return t.code == kDLFloat && t.bits == 16 && t.lanes == 1; }
bool is_fp32(DLDataType t) { return t.code == kDLFloat && t.bits == 32 && t.lanes == 1; }
bool same_dtype(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }

// One tensor argument and what validation derives from it.
struct Arg {
  const char* name;
  const DLTensor* t;
  bool bshd;  // (batch, seqlen, heads, head_dim); otherwise lse (batch, heads_q, seqlen_q)

  int rank() const { return bshd ? 4 : 3; }
  int64_t dim(int i) const { return t->shape[i]; }
  int64_t elem_bytes() const { return t->dtype.bits / 8; }
  int64_t given_stride(int i) const { return t->strides ? t->strides[i] : stride[i]; }
  bool empty() const { return std::any_of(t->shape, t->shape + rank(), [](int64_t d) { return d == 0; }); }

  // Filled in order by the stages below.
  int64_t stride[4] = {};  // elements; a dimension of size <= 1 gets its compact stride (its own is ignored)
  uintptr_t base = 0;      // data + byte_offset
  uintptr_t end = 0;       // one past the last byte; end == base when empty
};

dhp_status check_present(const Arg& a) {
  if (!a.t) return fail(DHP_ERROR_INVALID_VALUE, "%s is NULL: expected a DLTensor", a.name);
  return DHP_SUCCESS;
}

dhp_status check_device(const Arg& a, const Arg& q) {
  const DLDevice d = a.t->device;
  if (d.device_type != kDLCUDA) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.device=%s: expected a CUDA device tensor (kDLCUDA)", a.name,
                device_text(d).s);
  }
  if (d.device_id < 0) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.device=%s: the device id must be >= 0", a.name, device_text(d).s);
  }
  if (d.device_id != q.t->device.device_id) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.device=%s: expected %s, the device of q", a.name, device_text(d).s,
                device_text(q.t->device).s);
  }
  return DHP_SUCCESS;
}

dhp_status check_dtype(const Arg& a, const Arg& q) {
  const DLDataType t = a.t->dtype;
  if (!a.bshd) {
    if (is_fp32(t)) return DHP_SUCCESS;
    return fail(DHP_ERROR_INVALID_DTYPE, "%s.dtype=%s: expected float32", a.name, dtype_text(t).s);
  }
  if (&a == &q) {
    if (is_bf16(t) || is_fp16(t)) return DHP_SUCCESS;
    return fail(DHP_ERROR_INVALID_DTYPE, "%s.dtype=%s: expected bfloat16 or float16", a.name, dtype_text(t).s);
  }
  if (same_dtype(t, q.t->dtype)) return DHP_SUCCESS;
  return fail(DHP_ERROR_INVALID_DTYPE, "%s.dtype=%s: expected %s, the same as q", a.name, dtype_text(t).s,
              dtype_text(q.t->dtype).s);
}

dhp_status check_rank(const Arg& a) {
  if (a.t->ndim != a.rank()) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.ndim=%d: expected %d dimensions %s", a.name, a.t->ndim, a.rank(),
                a.bshd ? "(batch, seqlen, heads, head_dim)" : "(batch, heads_q, seqlen_q)");
  }
  if (!a.t->shape) return fail(DHP_ERROR_INVALID_VALUE, "%s.shape is NULL: expected %d sizes", a.name, a.rank());
  for (int i = 0; i < a.rank(); ++i) {
    if (a.dim(i) < 0 || a.dim(i) >= kMaxDim) {
      return fail(DHP_ERROR_INVALID_VALUE, "%s.shape[%d]=%" PRId64 ": sizes must be in [0, 2^31)", a.name, i,
                  a.dim(i));
    }
  }
  if (!a.t->data && !a.empty()) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.data is NULL: a non-empty tensor needs a device pointer", a.name);
  }
  return DHP_SUCCESS;
}

dhp_status check_shape(const Arg& a, const int64_t* want, const char* what) {
  if (std::equal(want, want + a.rank(), a.t->shape)) return DHP_SUCCESS;
  return fail(DHP_ERROR_INVALID_VALUE, "%s.shape=%s: expected %s, %s", a.name, dims_text(a.t->shape, a.rank()).s,
              dims_text(want, a.rank()).s, what);
}

// Resolves strides (NULL: compact row-major) and checks TMA's rules; lse only needs non-negative strides.
dhp_status check_strides(Arg& a) {
  const int n = a.rank();
  int64_t compact = 1;
  for (int i = n - 1; i >= 0; --i) {
    const int64_t stride = a.t->strides ? a.t->strides[i] : compact;
    const bool last = a.bshd && i == n - 1;
    if (a.dim(i) <= 1) {
      a.stride[i] = compact;  // never stepped: any given value is fine, and a compact one suits TMA
    } else if (last && stride != 1) {
      return fail(DHP_ERROR_INVALID_VALUE, "%s.strides[%d]=%" PRId64
                  ": the last dimension must be contiguous (stride 1)", a.name, i, stride);
    } else if (stride < 0) {
      return fail(DHP_ERROR_INVALID_VALUE, "%s.strides[%d]=%" PRId64 ": strides must be non-negative", a.name, i,
                  stride);
    } else if (a.bshd && !last && stride % (kTmaAlignBytes / a.elem_bytes()) != 0) {
      return fail(DHP_ERROR_INVALID_VALUE, "%s.strides[%d]=%" PRId64
                  ": expected a multiple of %" PRId64 " elements (16 bytes, for TMA)", a.name, i, stride,
                  kTmaAlignBytes / a.elem_bytes());
    } else if (a.bshd && stride >= kTmaMaxStrideBytes / a.elem_bytes()) {
      return fail(DHP_ERROR_INVALID_VALUE, "%s.strides[%d]=%" PRId64 ": expected less than 2^40 bytes (TMA limit)",
                  a.name, i, stride);
    } else {
      a.stride[i] = stride;
    }
    if (__builtin_mul_overflow(compact, std::max<int64_t>(a.dim(i), 1), &compact)) compact = INT64_MAX;
  }
  a.base = reinterpret_cast<uintptr_t>(a.t->data) + a.t->byte_offset;
  const int64_t align = a.bshd ? kTmaAlignBytes : a.elem_bytes();
  if (a.base % align != 0) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.data+byte_offset=0x%" PRIxPTR ": expected a %" PRId64
                "-byte aligned address", a.name, a.base, align);
  }
  return DHP_SUCCESS;
}

// The byte range [base, end) the tensor spans, checked for 64-bit overflow, and (for outputs) that no two
// elements share an address: sorted by stride, each dimension must step over everything inside it.
dhp_status check_extent(Arg& a, bool written) {
  if (a.empty()) {
    a.end = a.base;
    return DHP_SUCCESS;
  }
  int64_t last = 0, bytes = 0;
  bool overflow = false;
  for (int i = 0; i < a.rank(); ++i) {
    int64_t term = 0;
    overflow |= __builtin_mul_overflow(a.dim(i) - 1, a.stride[i], &term);
    overflow |= __builtin_add_overflow(last, term, &last);
  }
  overflow |= __builtin_add_overflow(last, 1, &last) || __builtin_mul_overflow(last, a.elem_bytes(), &bytes);
  overflow |= a.base > UINTPTR_MAX - static_cast<uint64_t>(bytes);
  if (overflow) {
    return fail(DHP_ERROR_INVALID_VALUE, "%s.shape=%s: the tensor's byte extent overflows 64 bits", a.name,
                dims_text(a.t->shape, a.rank()).s);
  }
  a.end = a.base + static_cast<uint64_t>(bytes);
  if (!written) return DHP_SUCCESS;

  int order[4], n = 0;  // the dimensions of size > 1, by increasing stride (insertion sort)
  for (int i = 0; i < a.rank(); ++i) {
    if (a.dim(i) <= 1) continue;
    int j = n++;
    for (; j > 0 && a.stride[order[j - 1]] > a.stride[i]; --j) order[j] = order[j - 1];
    order[j] = i;
  }
  int64_t inner = 1;  // elements spanned by the dimensions already visited
  for (int j = 0; j < n; ++j) {
    const int i = order[j];
    if (a.stride[i] < inner) {
      int64_t given[4];
      for (int d = 0; d < a.rank(); ++d) given[d] = a.given_stride(d);
      return fail(DHP_ERROR_INVALID_VALUE, "%s.strides=%s: elements of %s overlap each other; expected a "
                  "non-overlapping layout", a.name, dims_text(given, a.rank()).s, a.name);
    }
    inner = a.stride[i] * a.dim(i);  // <= the byte extent, so no overflow
  }
  return DHP_SUCCESS;
}

dhp_status check_disjoint(const Arg& written, const Arg& other) {
  const bool overlap = written.base < written.end && other.base < other.end && written.base < other.end &&
                       other.base < written.end;
  if (!overlap) return DHP_SUCCESS;
  return fail(DHP_ERROR_INVALID_VALUE, "%s overlaps %s in memory: an output must not share memory with any other "
              "argument", written.name, other.name);
}

dhp_status check_options(const dhp_attention_options& o) {
  if (o.causal != 0 && o.causal != 1) {
    return fail(DHP_ERROR_INVALID_VALUE, "options.causal=%d: expected 0 or 1", o.causal);
  }
  if (!(std::isfinite(o.softmax_scale) && o.softmax_scale >= 0.0f)) {
    return fail(DHP_ERROR_INVALID_VALUE, "options.softmax_scale=%g: expected 0 (for 1/sqrt(head_dim)) or a "
                "positive finite number", static_cast<double>(o.softmax_scale));
  }
  return DHP_SUCCESS;
}

// cudaGetDeviceCount, leaving no error behind in the runtime's per-thread state; *count = 0 on failure.
cudaError_t device_count(int* count) {
  *count = 0;
  const cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *count = 0;
  }
  return e;
}

// Errors that mean "this machine has no usable GPU", which is not a failure of the call that asked.
bool no_gpu(cudaError_t e) {
  return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorStubLibrary;
}

dhp_status check_device_runs_dhp(int device) {
  int count = 0;
  if (const cudaError_t e = device_count(&count)) {
    return fail(no_gpu(e) ? DHP_ERROR_UNSUPPORTED : DHP_ERROR_CUDA, "no CUDA device is usable "
                "(cudaGetDeviceCount: %s): dhp needs an sm_90 GPU (H100/H200) and its driver", cudaGetErrorString(e));
  }
  if (device >= count) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.device=cuda:%d: only %d CUDA device%s visible", device, count,
                count == 1 ? " is" : "s are");
  }
  // compute capability as major * 10 + minor; 0 = not looked up yet
  static std::atomic<int> cached_cc[kCachedDevices];
  int cc = device < kCachedDevices ? cached_cc[device].load(std::memory_order_relaxed) : 0;
  if (cc == 0) {
    int major = 0, minor = 0;
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return fail(DHP_ERROR_CUDA, "device %d: cudaDeviceGetAttribute failed: %s", device, cudaGetErrorString(err));
    }
    cc = major * 10 + minor;
    if (device < kCachedDevices) cached_cc[device].store(cc, std::memory_order_relaxed);
  }
  if (cc == 90) return DHP_SUCCESS;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    std::snprintf(prop.name, sizeof(prop.name), "unknown");
  }
  return fail(DHP_ERROR_UNSUPPORTED, "device %d (%s) is sm_%d: dhp needs an sm_90 GPU (H100/H200)", device,
              prop.name, cc);
}

// The per-tensor device check, after check_device_runs_dhp (it calls the driver): the tensor's bytes
// [base, end), known after check_extent, must not lie in compressible memory.
dhp_status check_memory(const Arg& a) { return check_not_compressible(a.name, a.base, a.end); }

// The device checks, once every argument check has passed: q's device runs dhp, no tensor is compressible.
dhp_status check_devices(const Arg* args, int n, int device) {
  if (dhp_status s = check_device_runs_dhp(device)) return s;
  for (int i = 0; i < n; ++i) {
    if (dhp_status s = check_memory(args[i])) return s;
  }
  return DHP_SUCCESS;
}

// What validating a request yields: the shared problem description, the device, and whether the call is empty.
struct Validated {
  FwdParams params;
  int device;
  bool empty;  // batch == 0 or seqlen_q == 0: valid, nothing to launch
};

BshdStrides bshd_strides(const Arg& a) { return {a.stride[kBatch], a.stride[kSeq], a.stride[kHeads]}; }

// The checks every request shares, over args = {q, k, v, ...}: q, k and v first; every other (batch, seqlen,
// heads, head_dim) tensor takes q's shape (`like_k`: k's); lse tensors take (batch, heads_q, seqlen_q). Tensors
// marked `written` must not overlap themselves or any other argument. Fills `out` with the problem, q, k, v.
// Calls no CUDA function: the caller runs check_devices after its own argument checks.
template <int N>
dhp_status validate_request(Arg (&args)[N], int n, const bool (&written)[N], const bool (&like_k)[N],
                            const dhp_attention_options* options, Validated* out) {
  Arg &q = args[0], &k = args[1], &v = args[2];
  const auto each = [&](auto&& check) -> dhp_status {
    for (int i = 0; i < n; ++i) {
      if (const dhp_status s = check(args[i])) return s;
    }
    return DHP_SUCCESS;
  };

  if (dhp_status s = each(check_present)) return s;
  if (!options) {
    return fail(DHP_ERROR_INVALID_VALUE, "options is NULL: expected a dhp_attention_options "
                "(DHP_ATTENTION_OPTIONS_DEFAULT for the defaults)");
  }
  if (dhp_status s = each([&](const Arg& a) { return check_device(a, q); })) return s;
  if (dhp_status s = each([&](const Arg& a) { return check_dtype(a, q); })) return s;
  if (dhp_status s = each(check_rank)) return s;

  const int64_t batch = q.dim(kBatch), seqlen_q = q.dim(kSeq), heads_q = q.dim(kHeads), head_dim = q.dim(kHeadDim);
  const int64_t seqlen_k = k.dim(kSeq), heads_kv = k.dim(kHeads);
  const int64_t k_want[] = {batch, seqlen_k, heads_kv, head_dim};
  const int64_t lse_want[] = {batch, heads_q, seqlen_q};
  if (dhp_status s = check_shape(k, k_want, "the batch size and head_dim of q")) return s;
  for (int i = 2; i < n; ++i) {
    Arg& a = args[i];
    const dhp_status s = !a.bshd    ? check_shape(a, lse_want, "(batch, heads_q, seqlen_q) of q")
                         : like_k[i] ? check_shape(a, k.t->shape, "the shape of k")
                                     : check_shape(a, q.t->shape, "the shape of q");
    if (s) return s;
  }

  const DType dtype = is_bf16(q.t->dtype) ? DType::bf16 : DType::fp16;
  if (!forward_variant_exists(dtype, static_cast<int>(head_dim))) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape[3]=%" PRId64 ": head_dim must be %s", head_dim,
                head_dims_text(dtype).s);
  }
  if (heads_q < 1) return fail(DHP_ERROR_INVALID_VALUE, "q.shape[2]=%" PRId64 ": heads_q must be >= 1", heads_q);
  if (heads_kv < 1) return fail(DHP_ERROR_INVALID_VALUE, "k.shape[2]=%" PRId64 ": heads_kv must be >= 1", heads_kv);
  if (heads_q % heads_kv != 0) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape[2]=%" PRId64 ": heads_q must be a multiple of heads_kv=%" PRId64
                " (k.shape[2])", heads_q, heads_kv);
  }
  if (seqlen_k < 1) return fail(DHP_ERROR_INVALID_VALUE, "k.shape[1]=%" PRId64 ": seqlen_k must be >= 1", seqlen_k);
  if (batch > kMaxGridDim) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape[0]=%" PRId64 ": batch must be <= %" PRId64, batch, kMaxGridDim);
  }
  if (heads_q > kMaxGridDim) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape[2]=%" PRId64 ": heads_q must be <= %" PRId64, heads_q,
                kMaxGridDim);
  }

  if (dhp_status s = each(check_strides)) return s;
  for (int i = 0; i < n; ++i) {
    if (dhp_status s = check_extent(args[i], written[i])) return s;
  }
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n && written[i]; ++j) {
      if (j == i) continue;
      if (dhp_status s = check_disjoint(args[i], args[j])) return s;
    }
  }
  if (dhp_status s = check_options(*options)) return s;

  out->device = q.t->device.device_id;
  out->empty = batch == 0 || seqlen_q == 0;
  FwdParams& p = out->params;
  p.dtype = dtype;
  p.head_dim = static_cast<int>(head_dim);
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.q = reinterpret_cast<const void*>(q.base);
  p.k = reinterpret_cast<const void*>(k.base);
  p.v = reinterpret_cast<const void*>(v.base);
  p.q_stride = bshd_strides(q);
  p.k_stride = bshd_strides(k);
  p.v_stride = bshd_strides(v);
  p.causal = options->causal == 1;
  p.softmax_scale = options->softmax_scale != 0.0f ? options->softmax_scale
                                                   : 1.0f / std::sqrt(static_cast<float>(head_dim));
  return DHP_SUCCESS;
}

void set_out_lse(FwdParams& p, const Arg& out, const Arg* lse) {
  p.out = reinterpret_cast<void*>(out.base);
  p.out_stride = bshd_strides(out);
  p.lse = lse ? reinterpret_cast<float*>(lse->base) : nullptr;
  p.lse_stride_batch = lse ? lse->stride[kLseBatch] : 0;
  p.lse_stride_head = lse ? lse->stride[kLseHeads] : 0;
  p.lse_stride_seq = lse ? lse->stride[kLseSeq] : 0;
}

dhp_status validate_forward(const DLTensor* q_t, const DLTensor* k_t, const DLTensor* v_t, const DLTensor* out_t,
                            const DLTensor* lse_t, const dhp_attention_options* options, Validated* fwd) {
  Arg args[] = {{"q", q_t, true}, {"k", k_t, true}, {"v", v_t, true}, {"out", out_t, true}, {"lse", lse_t, false}};
  constexpr bool written[] = {false, false, false, true, true};
  constexpr bool like_k[] = {false, false, true, false, false};
  const int n = lse_t ? 5 : 4;
  if (dhp_status s = validate_request(args, n, written, like_k, options, fwd)) return s;
  if (dhp_status s = check_devices(args, n, fwd->device)) return s;
  set_out_lse(fwd->params, args[3], lse_t ? &args[4] : nullptr);
  return DHP_SUCCESS;
}

// Scratch memory of the backward, checked like a tensor argument: large enough, present, aligned and not
// overlapping any tensor here; on q's device and not compressible in check_workspace_memory.
dhp_status check_workspace(const void* workspace, size_t bytes, size_t needed, const Arg* args, int n) {
  if (bytes < needed) {
    return fail(DHP_ERROR_INVALID_VALUE, "workspace_bytes=%zu: expected at least %zu "
                "(dhp_attention_backward_workspace_size)", bytes, needed);
  }
  if (needed == 0) return DHP_SUCCESS;
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
  if (!workspace) return fail(DHP_ERROR_INVALID_VALUE, "workspace is NULL: expected %zu bytes of device memory", needed);
  if (base % kWorkspaceAlign != 0) {
    return fail(DHP_ERROR_INVALID_VALUE, "workspace=0x%" PRIxPTR ": expected a %zu-byte aligned address", base,
                kWorkspaceAlign);
  }
  for (int i = 0; i < n; ++i) {
    const Arg& a = args[i];
    if (a.base < a.end && base < a.end && a.base < base + needed) {
      return fail(DHP_ERROR_INVALID_VALUE, "workspace overlaps %s in memory: expected separate scratch memory",
                  a.name);
    }
  }
  return DHP_SUCCESS;
}

// The workspace's device checks, after check_devices (they call the runtime and the driver).
dhp_status check_workspace_memory(const void* workspace, size_t needed, int device) {
  if (needed == 0) return DHP_SUCCESS;
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, workspace);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return fail(DHP_ERROR_INVALID_VALUE, "workspace=0x%" PRIxPTR ": not a CUDA allocation (%s)", base,
                cudaGetErrorString(e));
  }
  if (attr.type != cudaMemoryTypeDevice || attr.device != device) {
    return fail(DHP_ERROR_INVALID_VALUE, "workspace=0x%" PRIxPTR ": expected device memory of cuda:%d, the device "
                "of q", base, device);
  }
  return check_not_compressible("workspace", base, base + needed);  // it holds sums of tensor values
}

// The problem size behind dhp_attention_backward_workspace_size: q's and k's dtype and shape checked as a
// backward call would (no device pointers needed), then the scratch size for them.
dhp_status shape_only_problem(const DLTensor* q_t, const DLTensor* k_t, const dhp_attention_options* options,
                              size_t* bytes) {
  Arg q{"q", q_t, true}, k{"k", k_t, true};
  for (const Arg* a : {&q, &k}) {
    if (dhp_status s = check_present(*a)) return s;
  }
  if (!options) {
    return fail(DHP_ERROR_INVALID_VALUE, "options is NULL: expected a dhp_attention_options "
                "(DHP_ATTENTION_OPTIONS_DEFAULT for the defaults)");
  }
  for (const Arg* a : {&q, &k}) {
    if (dhp_status s = check_dtype(*a, q)) return s;
    if (a->t->ndim != 4) {
      return fail(DHP_ERROR_INVALID_VALUE, "%s.ndim=%d: expected 4 dimensions (batch, seqlen, heads, head_dim)",
                  a->name, a->t->ndim);
    }
    if (!a->t->shape) return fail(DHP_ERROR_INVALID_VALUE, "%s.shape is NULL: expected 4 sizes", a->name);
    for (int i = 0; i < 4; ++i) {
      if (a->dim(i) < 0 || a->dim(i) >= kMaxDim) {
        return fail(DHP_ERROR_INVALID_VALUE, "%s.shape[%d]=%" PRId64 ": sizes must be in [0, 2^31)", a->name, i,
                    a->dim(i));
      }
    }
  }
  if (dhp_status s = check_options(*options)) return s;
  FwdParams p{};
  p.dtype = is_bf16(q_t->dtype) ? DType::bf16 : DType::fp16;
  p.batch = static_cast<int>(q.dim(kBatch));
  p.seqlen_q = static_cast<int>(q.dim(kSeq));
  p.heads_q = static_cast<int>(q.dim(kHeads));
  p.head_dim = static_cast<int>(q.dim(kHeadDim));
  p.seqlen_k = static_cast<int>(k.dim(kSeq));
  p.heads_kv = static_cast<int>(k.dim(kHeads));
  p.causal = options->causal == 1;
  if (!forward_variant_exists(p.dtype, p.head_dim)) {  // the same verdict as the backward call would give
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape[3]=%d: head_dim must be %s", p.head_dim,
                head_dims_text(p.dtype).s);
  }
  if (!backward_variant_exists(p.dtype, p.head_dim)) {
    return fail(DHP_ERROR_UNSUPPORTED, "q.shape[3]=%d: this build has no backward kernel for head_dim %d",
                p.head_dim, p.head_dim);
  }
  if (p.batch > kMaxGridDim || p.heads_q > kMaxGridDim) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape=%s: batch and heads_q must be <= %" PRId64,
                dims_text(q_t->shape, 4).s, kMaxGridDim);
  }
  // The dQ sums dominate: two chains of batch * heads_q * seqlen_q (padded to a query block) * head_dim floats.
  // Below 2^62 bytes the size cannot wrap; larger requests cannot be allocated anyway.
  const double sums_bytes =
      2.0 * double(p.batch) * p.heads_q * (double(p.seqlen_q) + 256) * p.head_dim * sizeof(float);
  if (sums_bytes > 0x1p62) {
    return fail(DHP_ERROR_INVALID_VALUE, "q.shape=%s: the backward's workspace would exceed 2^62 bytes",
                dims_text(q_t->shape, 4).s);
  }
  *bytes = backward_workspace_bytes(p);
  return DHP_SUCCESS;
}

// The backward's request: q, k, v, out, dout, lse in; dq, dk, dv out; plus the workspace.
struct Backward {
  Validated v;
  BwdParams params;
};

dhp_status validate_backward(const DLTensor* q_t, const DLTensor* k_t, const DLTensor* v_t, const DLTensor* out_t,
                             const DLTensor* dout_t, const DLTensor* lse_t, const DLTensor* dq_t,
                             const DLTensor* dk_t, const DLTensor* dv_t, const dhp_attention_options* options,
                             const void* workspace, size_t workspace_bytes, Backward* bwd) {
  Arg args[] = {{"q", q_t, true},     {"k", k_t, true},       {"v", v_t, true},
                {"out", out_t, true}, {"dout", dout_t, true}, {"lse", lse_t, false},
                {"dq", dq_t, true},   {"dk", dk_t, true},     {"dv", dv_t, true}};
  constexpr bool written[] = {false, false, false, false, false, false, true, true, true};
  constexpr bool like_k[] = {false, false, true, false, false, false, false, true, true};
  if (dhp_status s = validate_request(args, 9, written, like_k, options, &bwd->v)) return s;
  FwdParams& f = bwd->v.params;
  set_out_lse(f, args[3], &args[5]);
  if (!backward_variant_exists(f.dtype, f.head_dim)) {
    return fail(DHP_ERROR_UNSUPPORTED, "q.shape[3]=%d: this build has no backward kernel for head_dim %d",
                f.head_dim, f.head_dim);
  }
  const size_t needed = backward_workspace_bytes(f);
  if (dhp_status s = check_workspace(workspace, workspace_bytes, needed, args, 9)) return s;
  if (dhp_status s = check_devices(args, 9, bwd->v.device)) return s;
  if (dhp_status s = check_workspace_memory(workspace, needed, bwd->v.device)) return s;
  BwdParams& b = bwd->params;
  b.fwd = f;
  b.dout = reinterpret_cast<const void*>(args[4].base);
  b.dout_stride = bshd_strides(args[4]);
  b.dq = reinterpret_cast<void*>(args[6].base);
  b.dk = reinterpret_cast<void*>(args[7].base);
  b.dv = reinterpret_cast<void*>(args[8].base);
  b.dq_stride = bshd_strides(args[6]);
  b.dk_stride = bshd_strides(args[7]);
  b.dv_stride = bshd_strides(args[8]);
  b.workspace = const_cast<void*>(workspace);
  return DHP_SUCCESS;
}

// Runs `launch` with the tensors' device current, restoring the caller's afterwards.
template <class Launch>
dhp_status on_device(int device, Launch&& launch) {
  int current = 0;
  cudaError_t e = cudaGetDevice(&current);
  if (e == cudaSuccess && current != device) e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return fail(DHP_ERROR_CUDA, "cannot make device %d current: %s", device, cudaGetErrorString(e));
  }
  dhp_status status = launch();
  if (current != device) {
    e = cudaSetDevice(current);
    if (e != cudaSuccess && status == DHP_SUCCESS) {
      cudaGetLastError();
      status = fail(DHP_ERROR_CUDA, "cannot restore device %d as current: %s", current, cudaGetErrorString(e));
    }
  }
  return status == DHP_SUCCESS ? succeed() : status;
}

// The build's JSON (CMake: version, toolkit, variant lists) plus the forward's tile configurations of the
// compiled head_dims: one entry per (head_dim, causal, tier), "max_seqlen_k" / "max_seqlen_q" the tier's limits
// (null: any), and
// the key count up to which causal runs on the persistent grid. Built once.
const char* build_info_json() {
  static const std::string json = [] {
    std::string tiles;
    for (int head_dim : {64, 128, 256}) {
      if (!forward_variant_exists(DType::bf16, head_dim) && !forward_variant_exists(DType::fp16, head_dim)) continue;
      for (bool causal : {false, true}) {
        for (int tier = 0; tier < kernels::fwd_tiers(head_dim, causal); ++tier) {
          const kernels::FwdConfig c = kernels::fwd_config(head_dim, causal, tier);
          char limit[16] = "null", limit_q[16] = "null", split_rows[16] = "null", least[16] = "null";
          if (tier == kernels::kTierShortKeys || tier == kernels::fwd_scheduled_tier(head_dim, causal))
            std::snprintf(limit, sizeof limit, "%d", kernels::fwd_short_keys(head_dim, causal));
          if (tier == kernels::fwd_scheduled_tier(head_dim, causal))
            std::snprintf(least, sizeof least, "%d", kernels::fwd_scheduled_keys(head_dim, causal));
          if (tier == kernels::fwd_split_tier(head_dim, causal))
            std::snprintf(limit_q, sizeof limit_q, "%d", kernels::fwd_split_max_seqlen_q(head_dim, causal));
          if (tier == kernels::fwd_long_tier(head_dim, causal))
            std::snprintf(least, sizeof least, "%d", kernels::fwd_long_keys(head_dim, causal));
          if (c.key_splits) std::snprintf(limit_q, sizeof limit_q, "%d", kernels::kKeySplitMaxSeqlenQ);
          if (c.split_tile) std::snprintf(split_rows, sizeof split_rows, "%d", c.split_rows);
          char entry[768];
          std::snprintf(entry, sizeof entry,
                        "%s{\"head_dim\": %d, \"causal\": %s, \"tier\": %d, \"max_seqlen_k\": %s, "
                        "\"min_seqlen_k\": %s, \"max_seqlen_q\": %s, \"block_m\": %d, "
                        "\"block_n\": %d, \"stages\": %d, \"q_buffers\": %d, \"consumer_warpgroups\": %d, "
                        "\"softmax_under_pv\": %d, \"softmax_chains\": %d, \"half_first_block\": %s, "
                        "\"o_stage_boxes\": %d, \"masked_loop\": %s, \"split_tile\": %s, \"split_rows\": %s, "
                        "\"key_splits\": %s, \"scheduled\": %s, \"q_registers\": %s, \"q_o_evict_first\": %s}",
                        tiles.empty() ? "" : ", ", head_dim, causal ? "true" : "false", tier, limit, least, limit_q,
                        c.block_m, c.block_n, c.stages, c.q_buffers, c.consumer_warpgroups, c.softmax_under_pv,
                        c.softmax_chains, c.half_first_block ? "true" : "false", c.o_stage_boxes,
                        c.masked_loop ? "true" : "false", c.split_tile ? "true" : "false", split_rows,
                        c.key_splits ? "true" : "false", kernels::fwd_scheduled(head_dim, causal, tier) ? "true" : "false",
                        c.q_registers ? "true" : "false", c.q_o_evict_first ? "true" : "false");
          tiles += entry;
        }
      }
    }
    std::string cmake = DHP_BUILD_INFO_JSON;
    cmake.pop_back();  // the closing brace
    std::string chains, chains_min, pairs, unpaired, split, causal_pairs, heavy, halves;
    for (int head_dim : {64, 128, 256}) {
      if (!backward_variant_exists(DType::bf16, head_dim) && !backward_variant_exists(DType::fp16, head_dim)) continue;
      char entry[48];
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", chains.empty() ? "" : ", ", head_dim,
                    kernels::bwd_dq_chains_max_seqlen_k(head_dim));
      chains += entry;
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", chains_min.empty() ? "" : ", ", head_dim,
                    kernels::bwd_dq_chains_min_seqlen_k(head_dim));
      chains_min += entry;
      const kernels::BwdConfig c = kernels::bwd_config(head_dim, true);
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", split.empty() ? "" : ", ", head_dim,
                    c.split_walks_over * c.block_m);
      split += entry;
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", heavy.empty() ? "" : ", ", head_dim,
                    kernels::bwd_causal_heavy_first_min_group(head_dim));
      heavy += entry;
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", halves.empty() ? "" : ", ", head_dim,
                    kernels::bwd_causal_head_halves_min_group(head_dim));
      halves += entry;
      if (kernels::bwd_config(head_dim, false).pairs == kernels::BwdPairs::kNone) continue;  // without a mask
      std::snprintf(entry, sizeof entry, "%s%d", pairs.empty() ? "" : ", ", head_dim);
      pairs += entry;
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", unpaired.empty() ? "" : ", ", head_dim,
                    kernels::bwd_unpaired_max_seqlen_k(head_dim));
      unpaired += entry;
      std::snprintf(entry, sizeof entry, "%s\"%d\": %d", causal_pairs.empty() ? "" : ", ", head_dim,
                    kernels::bwd_causal_paired_min_group(head_dim));
      causal_pairs += entry;
    }
    char tail[512];
    std::snprintf(tail, sizeof tail,
                  "], \"persistent_causal_max_seqlen_k\": {\"64\": %d, \"128\": %d, \"256\": %d}, "
                  "\"causal_section_bytes\": %lld, "
                  "\"key_split_min_blocks\": %d, \"key_split_narrow_min_blocks\": %d, \"key_split_max_ctas\": %d, "
                  "\"key_split_max_runs\": {\"64\": %d, \"128\": %d, \"256\": %d}, \"key_split_narrow_rows\": %d, "
                  "\"key_split_stream_ctas\": %d, \"key_split_wave_blocks\": %d",
                  kernels::fwd_persistent_causal_keys(64), kernels::fwd_persistent_causal_keys(128),
                  kernels::fwd_persistent_causal_keys(256), kernels::kCausalSectionBytes, kernels::kKeySplitMinBlocks,
                  kernels::kKeySplitNarrowMinBlocks, kernels::kKeySplitMaxCtas, kernels::fwd_key_split_max_runs(64), kernels::fwd_key_split_max_runs(128),
                  kernels::fwd_key_split_max_runs(256), kernels::kKeySplitNarrowRows, kernels::kKeySplitStreamCtas,
                  kernels::kKeySplitWaveBlocks);
    std::string waves;
    for (const kernels::KeySplitWave& w : kernels::kKeySplitWaves) {
      char entry[32];
      std::snprintf(entry, sizeof entry, "%s[%d, %d]", waves.empty() ? "" : ", ", w.ctas, w.clusters);
      waves += entry;
    }
    return cmake + ", \"forward_tiles\": [" + tiles + tail + ", \"key_split_waves\": [" + waves +
           "], \"backward_two_dq_chains_max_seqlen_k\": {" +
           chains + "}, \"backward_two_dq_chains_min_seqlen_k\": {" + chains_min +
           "}, \"backward_paired_key_blocks_head_dims\": [" + pairs +
           "], \"backward_unpaired_max_seqlen_k\": {" + unpaired + "}, \"backward_causal_paired_min_group\": {" +
           causal_pairs + "}, \"backward_causal_split_walks_over\": {" + split +
           "}, \"backward_causal_heavy_first_min_group\": {" + heavy +
           "}, \"backward_causal_head_halves_min_group\": {" + halves + "}}";
  }();
  return json.c_str();
}

}  // namespace
}  // namespace dhp

extern "C" {

const char* dhp_version(void) { return DHP_VERSION_STRING; }

const char* dhp_build_info(void) { return dhp::build_info_json(); }

dhp_status dhp_device_count(int* count) {
  if (!count) return dhp::fail(DHP_ERROR_INVALID_VALUE, "count is NULL: expected a pointer to an int");
  const cudaError_t e = dhp::device_count(count);
  if (e != cudaSuccess && !dhp::no_gpu(e)) {
    return dhp::fail(DHP_ERROR_CUDA, "cudaGetDeviceCount failed: %s", cudaGetErrorString(e));
  }
  return dhp::succeed();
}

dhp_status dhp_get_device_info(int device, dhp_device_info* info) {
  if (!info) return dhp::fail(DHP_ERROR_INVALID_VALUE, "info is NULL: expected a pointer to a dhp_device_info");
  int count = 0;
  if (dhp_status s = dhp_device_count(&count)) return s;
  if (device < 0 || device >= count) {
    return dhp::fail(DHP_ERROR_INVALID_VALUE, "device=%d: expected 0 <= device < %d, the number of visible CUDA "
                     "devices", device, count);
  }
  cudaDeviceProp prop{};
  const cudaError_t e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return dhp::fail(DHP_ERROR_CUDA, "device %d: cudaGetDeviceProperties failed: %s", device,
                     cudaGetErrorString(e));
  }
  *info = dhp_device_info{};
  std::snprintf(info->name, sizeof(info->name), "%s", prop.name);
  info->compute_major = prop.major;
  info->compute_minor = prop.minor;
  info->multiprocessors = prop.multiProcessorCount;
  info->supported = prop.major == 9 && prop.minor == 0;
  return dhp::succeed();
}

dhp_status dhp_attention_forward_check(const DLTensor* q, const DLTensor* k, const DLTensor* v, const DLTensor* out,
                                       const DLTensor* lse, const dhp_attention_options* options) {
  dhp::Validated fwd{};
  if (dhp_status s = dhp::validate_forward(q, k, v, out, lse, options, &fwd)) return s;
  return dhp::succeed();
}

dhp_status dhp_attention_forward(const DLTensor* q, const DLTensor* k, const DLTensor* v, DLTensor* out,
                                 DLTensor* lse, const dhp_attention_options* options, cudaStream_t stream) {
  dhp::Validated fwd{};
  if (dhp_status s = dhp::validate_forward(q, k, v, out, lse, options, &fwd)) return s;
  if (fwd.empty) return dhp::succeed();
  return dhp::on_device(fwd.device, [&] { return dhp::launch_forward(fwd.params, stream); });
}

dhp_status dhp_attention_backward_workspace_size(const DLTensor* q, const DLTensor* k,
                                                 const dhp_attention_options* options, size_t* bytes) {
  if (!bytes) return dhp::fail(DHP_ERROR_INVALID_VALUE, "bytes is NULL: expected a pointer to a size_t");
  *bytes = 0;
  if (dhp_status s = dhp::shape_only_problem(q, k, options, bytes)) return s;
  return dhp::succeed();
}

dhp_status dhp_attention_backward_check(const DLTensor* q, const DLTensor* k, const DLTensor* v, const DLTensor* out,
                                        const DLTensor* dout, const DLTensor* lse, const DLTensor* dq,
                                        const DLTensor* dk, const DLTensor* dv, const dhp_attention_options* options,
                                        const void* workspace, size_t workspace_bytes) {
  dhp::Backward bwd{};
  if (dhp_status s = dhp::validate_backward(q, k, v, out, dout, lse, dq, dk, dv, options, workspace,
                                            workspace_bytes, &bwd))
    return s;
  return dhp::succeed();
}

dhp_status dhp_attention_backward(const DLTensor* q, const DLTensor* k, const DLTensor* v, const DLTensor* out,
                                  const DLTensor* dout, const DLTensor* lse, DLTensor* dq, DLTensor* dk, DLTensor* dv,
                                  const dhp_attention_options* options, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  dhp::Backward bwd{};
  if (dhp_status s = dhp::validate_backward(q, k, v, out, dout, lse, dq, dk, dv, options, workspace,
                                            workspace_bytes, &bwd))
    return s;
  if (bwd.params.fwd.batch == 0) return dhp::succeed();  // seqlen_q == 0 still zeroes dk and dv
  return dhp::on_device(bwd.v.device, [&] { return dhp::launch_backward(bwd.params, stream); });
}

}  // extern "C"
