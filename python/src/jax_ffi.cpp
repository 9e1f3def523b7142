// XLA FFI handlers for dhp's C API: the forward and the backward as XLA custom calls, so that JAX runs them inside
// jit, grad and vmap on XLA's own stream (python/dhp/jax.py registers and calls them). Each handler turns XLA's
// buffers into DLTensors, calls the C API on the stream XLA gives it, and turns a failing dhp_status into an
// ffi::Error carrying dhp_last_error()'s sentence. Nothing here links against JAX or XLA: ffi.h is header-only.
//
// NOTES:
// - Layout: ffi_call asks for XLA's default (row-major) layouts, so every buffer is compact and its strides
//   follow from its dimensions.
// - vmap: dhp.jax calls ffi_call with vmap_method="expand_dims". Each vmap level then adds one leading axis to
//   every operand: the vmapped size on batched operands, 1 on the others. The handler reads all axes in front of
//   (seqlen, heads, head_dim) - resp. (heads, seqlen) for lse - as batch axes: those whose strides line up fold
//   into the C API's batch axis, a size-1 axis broadcasts with stride 0 (the C API accepts broadcast inputs),
//   and axes that cannot fold (a vmapped q over an unbatched k with batch > 1) are looped over, one C API call
//   per index. A sequence's result does not depend on its batch (batch invariance), so folding, looping and
//   unbatched calls give the same bits. The batch of one call is capped at kMaxBatchPerCall, the C API's limit.
// - Workspace of the backward: an extra uint8 output of the ffi_call, sized at trace time by
//   dhp_attention_backward_workspace_size on the shapes (jax_backward_workspace_size below); python/dhp/jax.py
//   drops it from the results. Under vmap it gains the vmapped axes like every output, which covers the folded
//   batch (the size grows at most linearly with batch). XLA's ScratchAllocator was the first choice; on the H100
//   test machine it refused every request (0.8 to 4 MB) in the test suite, so the handler does not depend on it.
// - Device: the XLA execution context's device ordinal, which is the CUDA device of the buffers.
#include "jax_ffi.h"

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dhp/dhp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace dhp_jax {
namespace {

// The C API's limit on batch (a CUDA grid dimension); larger folded batches are split into several calls.
constexpr int64_t kMaxBatchPerCall = 65535;
// Per-sequence axes after the batch axis: (seqlen, heads, head_dim), or (heads, seqlen) for lse.
constexpr int kBshdTrailing = 3;
constexpr int kLseTrailing = 2;
constexpr size_t kWorkspaceAlign = 256;  // dhp.h: the backward's workspace is 256-byte aligned

DLDataType dl_dtype(ffi::DataType t) {
  const auto bits = static_cast<uint8_t>(8 * ffi::ByteWidth(t));
  switch (t) {
    case ffi::DataType::BF16:
      return {kDLBfloat, 16, 1};
    case ffi::DataType::F16:
    case ffi::DataType::F32:
    case ffi::DataType::F64:
      return {kDLFloat, bits, 1};
    case ffi::DataType::S8:
    case ffi::DataType::S16:
    case ffi::DataType::S32:
    case ffi::DataType::S64:
      return {kDLInt, bits, 1};
    case ffi::DataType::U8:
    case ffi::DataType::U16:
    case ffi::DataType::U32:
    case ffi::DataType::U64:
      return {kDLUInt, bits, 1};
    case ffi::DataType::PRED:
      return {kDLBool, 8, 1};
    default:  // any other XLA type: the C API rejects it by its bit pattern, which is all it needs to name
      return {kDLOpaqueHandle, bits, 1};
  }
}

// One XLA buffer as the C API will see it.
struct Operand {
  char* data;
  DLDataType dtype;
  size_t elem_bytes;
  std::vector<int64_t> dims;
  int trailing;  // kBshdTrailing or kLseTrailing

  Operand(const ffi::AnyBuffer& b, int trailing)
      : data(static_cast<char*>(b.untyped_data())),
        dtype(dl_dtype(b.element_type())),
        elem_bytes(ffi::ByteWidth(b.element_type())),
        dims(b.dimensions().begin(), b.dimensions().end()),
        trailing(trailing) {}

  int rank() const { return static_cast<int>(dims.size()); }

  // Elements from axis `from` to the end: the compact stride of axis from - 1.
  int64_t elements_from(int from) const {
    int64_t n = 1;
    for (int a = from; a < rank(); ++a) n *= dims[a];
    return n;
  }
};

// One batch-like axis shared by all operands: its extent and each operand's stride (elements) along it.
struct Axis {
  int64_t size = 1;
  std::vector<int64_t> stride;
};

// How the operands' leading axes map onto C API calls: the inner axis is the C API's batch axis (cut into
// chunks of at most kMaxBatchPerCall), the outer axes are looped over. `fallback`: the operands do not follow
// the vmap pattern (wrong rank or mismatched batch), so each goes to one call with its leading axes folded into
// its own batch - or as it is, if it has no leading axis - and the C API names what is wrong.
struct Plan {
  bool fallback = false;
  Axis inner;
  std::vector<Axis> outer;
};

Plan plan_calls(const std::vector<Operand>& ops) {
  Plan plan;
  const int lead = ops[0].rank() - ops[0].trailing;
  bool follows = lead >= 1;
  for (const Operand& o : ops) follows = follows && o.rank() == lead + o.trailing;
  if (!follows) {
    plan.fallback = true;
    return plan;
  }
  // Extent of each leading axis: vmap axes (all but the last) broadcast from 1; the batch axis must agree.
  std::vector<int64_t> full(lead, 1);
  for (int a = 0; a < lead; ++a) {
    for (const Operand& o : ops) {
      if (o.dims[a] != 1) full[a] = o.dims[a];
    }
    for (const Operand& o : ops) {
      const bool ok = a == lead - 1 ? o.dims[a] == ops[0].dims[a] : (o.dims[a] == 1 || o.dims[a] == full[a]);
      if (!ok) {
        plan.fallback = true;
        return plan;
      }
    }
  }

  auto compact = [&](int from) {
    Axis axis;
    for (const Operand& o : ops) axis.stride.push_back(o.elements_from(from));
    return axis;
  };
  int64_t total = 1;
  for (int64_t extent : full) total *= extent;
  if (total == 0) {  // an empty call: one C API call with batch 0 still validates everything else
    plan.inner = compact(lead);
    plan.inner.size = 0;
    return plan;
  }

  // From the innermost axis outwards: an axis folds into the group inside it when, for every operand, its stride
  // is the group's stride times the group's extent. Size-1 axes take no part.
  std::vector<Axis> groups;
  for (int a = lead - 1; a >= 0; --a) {
    if (full[a] == 1) continue;
    Axis axis;
    axis.size = full[a];
    for (const Operand& o : ops) axis.stride.push_back(o.dims[a] == 1 ? 0 : o.elements_from(a + 1));
    bool folds = !groups.empty();
    for (size_t i = 0; folds && i < ops.size(); ++i) {
      folds = axis.stride[i] == groups.back().stride[i] * groups.back().size;
    }
    if (folds) {
      groups.back().size *= axis.size;
    } else {
      groups.push_back(std::move(axis));
    }
  }
  if (groups.empty()) {
    plan.inner = compact(lead);
  } else {
    plan.inner = std::move(groups.front());
    plan.outer.assign(std::make_move_iterator(groups.begin() + 1), std::make_move_iterator(groups.end()));
  }
  return plan;
}

// The DLTensors of one C API call, re-aimed at each call of a plan.
class Views {
 public:
  Views(const std::vector<Operand>& ops, int32_t device)
      : device_{kDLCUDA, device}, ops_(ops), shapes_(ops.size()), strides_(ops.size()), tensors_(ops.size()) {}

  // Every call of `plan`, in order: fn(tensors) returns a dhp_status; the first failure stops the walk.
  template <class Fn>
  dhp_status for_each_call(const Plan& plan, Fn&& fn) {
    if (plan.fallback) {
      for (size_t i = 0; i < ops_.size(); ++i) aim_fallback(i);
      return fn(tensors_.data());
    }
    int64_t outer_total = 1;
    for (const Axis& axis : plan.outer) outer_total *= axis.size;
    for (int64_t index = 0; index < outer_total; ++index) {
      std::vector<int64_t> offset(ops_.size(), 0);
      int64_t rest = index;
      for (const Axis& axis : plan.outer) {
        const int64_t i = rest % axis.size;
        rest /= axis.size;
        for (size_t t = 0; t < ops_.size(); ++t) offset[t] += i * axis.stride[t];
      }
      int64_t first = 0;
      do {
        const int64_t count = std::min(plan.inner.size - first, kMaxBatchPerCall);
        for (size_t t = 0; t < ops_.size(); ++t) {
          aim(t, offset[t] + first * plan.inner.stride[t], count, plan.inner.stride[t]);
        }
        if (dhp_status s = fn(tensors_.data())) return s;
        first += count;
      } while (first < plan.inner.size);
    }
    return DHP_SUCCESS;
  }

 private:
  // Operand t as (count, per-sequence axes...) at element offset `offset`, batch stride `batch_stride`.
  void aim(size_t t, int64_t offset, int64_t count, int64_t batch_stride) {
    const Operand& o = ops_[t];
    const int lead = o.rank() - o.trailing;
    shapes_[t].assign({count});
    strides_[t].assign({batch_stride});
    for (int a = lead; a < o.rank(); ++a) {
      shapes_[t].push_back(o.dims[a]);
      strides_[t].push_back(o.elements_from(a + 1));
    }
    fill(t, o.data + offset * static_cast<int64_t>(o.elem_bytes));
  }

  // Operand t with its leading axes folded (compact), or as it is when it has none.
  void aim_fallback(size_t t) {
    const Operand& o = ops_[t];
    const int lead = o.rank() - o.trailing;
    if (lead < 1) {
      shapes_[t] = o.dims;
      strides_[t].clear();
      for (int a = 0; a < o.rank(); ++a) strides_[t].push_back(o.elements_from(a + 1));
      fill(t, o.data);
      return;
    }
    int64_t batch = 1;
    for (int a = 0; a < lead; ++a) batch *= o.dims[a];
    aim(t, 0, batch, o.elements_from(lead));
  }

  void fill(size_t t, char* data) {
    DLTensor& dl = tensors_[t];
    dl.data = data;
    dl.device = device_;
    dl.ndim = static_cast<int32_t>(shapes_[t].size());
    dl.dtype = ops_[t].dtype;
    dl.shape = shapes_[t].data();
    dl.strides = strides_[t].data();
    dl.byte_offset = 0;
  }

  DLDevice device_;
  const std::vector<Operand>& ops_;
  std::vector<std::vector<int64_t>> shapes_, strides_;
  std::vector<DLTensor> tensors_;
};

ffi::Error failure(dhp_status status, const char* entry) {
  const std::string message = std::string(entry) + ": " + dhp_last_error();
  switch (status) {
    case DHP_ERROR_INVALID_VALUE:
    case DHP_ERROR_INVALID_DTYPE:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, message);
    case DHP_ERROR_UNSUPPORTED:
      return ffi::Error(ffi::ErrorCode::kUnimplemented, message);
    default:
      return ffi::Error(ffi::ErrorCode::kInternal, message);
  }
}

int64_t calls_of(const Plan& plan) {
  if (plan.fallback) return 1;
  int64_t calls = std::max<int64_t>(1, (plan.inner.size + kMaxBatchPerCall - 1) / kMaxBatchPerCall);
  for (const Axis& axis : plan.outer) calls *= axis.size;
  return calls;
}

dhp_attention_options options_of(bool causal, float softmax_scale) {
  dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;
  options.causal = causal ? 1 : 0;
  options.softmax_scale = softmax_scale;
  return options;
}

// Operands: q, k, v (in); out, lse (out).
ffi::Error forward_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse, bool causal,
                        float softmax_scale) {
  const std::vector<Operand> ops = {{q, kBshdTrailing},    {k, kBshdTrailing},   {v, kBshdTrailing},
                                    {*out, kBshdTrailing}, {*lse, kLseTrailing}};
  const Plan plan = plan_calls(ops);
  const dhp_attention_options options = options_of(causal, softmax_scale);
  Views views(ops, device);
  // Several calls: validate them all before the first launch, so that a failure leaves every output untouched.
  if (calls_of(plan) > 1) {
    const dhp_status s = views.for_each_call(plan, [&](DLTensor* t) {
      return dhp_attention_forward_check(&t[0], &t[1], &t[2], &t[3], &t[4], &options);
    });
    if (s) return failure(s, "dhp_attention_forward");
  }
  const dhp_status s = views.for_each_call(plan, [&](DLTensor* t) {
    return dhp_attention_forward(&t[0], &t[1], &t[2], &t[3], &t[4], &options, stream);
  });
  return s ? failure(s, "dhp_attention_forward") : ffi::Error::Success();
}

// Operands: q, k, v, out, dout, lse (in); dq, dk, dv, workspace (out).
ffi::Error backward_impl(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer out, ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::Result<ffi::AnyBuffer> dq,
                         ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                         ffi::Result<ffi::AnyBuffer> scratch, bool causal, float softmax_scale) {
  const std::vector<Operand> ops = {{q, kBshdTrailing},    {k, kBshdTrailing},   {v, kBshdTrailing},
                                    {out, kBshdTrailing},  {dout, kBshdTrailing}, {lse, kLseTrailing},
                                    {*dq, kBshdTrailing},  {*dk, kBshdTrailing}, {*dv, kBshdTrailing}};
  const Plan plan = plan_calls(ops);
  const dhp_attention_options options = options_of(causal, softmax_scale);
  Views views(ops, device);

  // One workspace, as large as the largest call needs, serves every call: they run one after another on `stream`.
  size_t workspace_bytes = 0;
  dhp_status s = views.for_each_call(plan, [&](DLTensor* t) {
    size_t bytes = 0;
    const dhp_status status = dhp_attention_backward_workspace_size(&t[0], &t[1], &options, &bytes);
    workspace_bytes = std::max(workspace_bytes, bytes);
    return status;
  });
  if (s) return failure(s, "dhp_attention_backward_workspace_size");
  void* workspace = scratch->untyped_data();
  if (workspace_bytes > scratch->size_bytes() || reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlign != 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "dhp_attention_backward: the workspace output holds " + std::to_string(scratch->size_bytes()) +
                          " bytes at a " + std::to_string(reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlign) +
                          "-byte offset from 256-byte alignment; expected " + std::to_string(workspace_bytes) +
                          " bytes, aligned");
  }

  if (calls_of(plan) > 1) {
    s = views.for_each_call(plan, [&](DLTensor* t) {
      return dhp_attention_backward_check(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], &options,
                                          workspace, workspace_bytes);
    });
    if (s) return failure(s, "dhp_attention_backward");
  }
  s = views.for_each_call(plan, [&](DLTensor* t) {
    return dhp_attention_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8], &options,
                                  workspace, workspace_bytes, stream);
  });
  return s ? failure(s, "dhp_attention_backward") : ffi::Error::Success();
}

}  // namespace
}  // namespace dhp_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(dhp_jax_attention_forward, dhp_jax::forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<bool>("causal")
                                  .Attr<float>("softmax_scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(dhp_jax_attention_backward, dhp_jax::backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<bool>("causal")
                                  .Attr<float>("softmax_scale"));

namespace dhp_jax {
namespace {

// Trace-time validation: the forward's checks on shapes and dtypes alone, so that a bad call raises ValueError or
// TypeError where JAX traces it, as the eager path does, instead of failing inside the compiled computation.
// Stand-in DLTensors carry the shapes and dtypes, on cuda:0, at distinct made-up addresses (nothing reads them:
// the C API checks pointers only for alignment and overlap). The device checks come last in the C API's order;
// they depend on where XLA runs the call, so their verdict (DHP_ERROR_UNSUPPORTED, DHP_ERROR_CUDA) is left to
// the handler.
void check_forward(const std::vector<std::vector<int64_t>>& shapes, const std::vector<std::pair<int, int>>& dtypes,
                   bool causal, float softmax_scale) {
  constexpr size_t kTensors = 5;  // q, k, v, out, lse
  if (shapes.size() != kTensors || dtypes.size() != kTensors) {
    throw nb::value_error("jax_check_forward: expected the shapes and dtypes of q, k, v, out, lse");
  }
  std::vector<std::vector<int64_t>> dims = shapes;
  DLTensor tensors[kTensors];
  uintptr_t address = uintptr_t{1} << 40;
  for (size_t i = 0; i < kTensors; ++i) {
    const auto [code, bits] = dtypes[i];
    size_t bytes = (static_cast<size_t>(bits) + 7) / 8;
    for (int64_t extent : dims[i]) bytes *= static_cast<size_t>(std::max<int64_t>(extent, 0));
    tensors[i] = DLTensor{reinterpret_cast<void*>(address), DLDevice{kDLCUDA, 0}, static_cast<int32_t>(dims[i].size()),
                          DLDataType{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1}, dims[i].data(),
                          nullptr, 0};
    address += (bytes + kWorkspaceAlign) / kWorkspaceAlign * kWorkspaceAlign;
  }
  const dhp_attention_options options = options_of(causal, softmax_scale);
  dhp_status status;
  std::string message;
  {
    nb::gil_scoped_release release;
    status = dhp_attention_forward_check(&tensors[0], &tensors[1], &tensors[2], &tensors[3], &tensors[4], &options);
    if (status) message = dhp_last_error();
  }
  if (status == DHP_ERROR_INVALID_VALUE) throw nb::value_error(message.c_str());
  if (status == DHP_ERROR_INVALID_DTYPE) throw nb::type_error(message.c_str());
}

// dhp_attention_backward_workspace_size for q and k of these shapes and DLPack (code, bits) dtype.
size_t backward_workspace_size(std::vector<int64_t> q_shape, std::vector<int64_t> k_shape, std::pair<int, int> dtype,
                               bool causal, float softmax_scale) {
  const DLDataType dl{static_cast<uint8_t>(dtype.first), static_cast<uint8_t>(dtype.second), 1};
  DLTensor q{nullptr, DLDevice{kDLCUDA, 0}, static_cast<int32_t>(q_shape.size()), dl, q_shape.data(), nullptr, 0};
  DLTensor k{nullptr, DLDevice{kDLCUDA, 0}, static_cast<int32_t>(k_shape.size()), dl, k_shape.data(), nullptr, 0};
  const dhp_attention_options options = options_of(causal, softmax_scale);
  size_t bytes = 0;
  const dhp_status status = dhp_attention_backward_workspace_size(&q, &k, &options, &bytes);
  if (status == DHP_ERROR_INVALID_VALUE) throw nb::value_error(dhp_last_error());
  if (status == DHP_ERROR_INVALID_DTYPE) throw nb::type_error(dhp_last_error());
  if (status) throw std::runtime_error(dhp_last_error());
  return bytes;
}

template <typename Handler>
nb::capsule handler_capsule(Handler* handler) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Handler, XLA_FFI_CallFrame*>, "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(handler));
}

}  // namespace

void register_jax_ffi(nb::module_& m) {
  m.def(
      "jax_ffi_targets",
      [] {
        nb::dict targets;
        targets["dhp_attention_forward"] = handler_capsule(dhp_jax_attention_forward);
        targets["dhp_attention_backward"] = handler_capsule(dhp_jax_attention_backward);
        return targets;
      },
      "XLA FFI handlers by target name, as PyCapsules for jax.ffi.register_ffi_target(..., platform=\"CUDA\").\n"
      "dhp_attention_forward: (q, k, v) -> (out, lse); dhp_attention_backward: (q, k, v, out, dout, lse) ->\n"
      "(dq, dk, dv); attributes causal (bool) and softmax_scale (float32, 0 for 1/sqrt(head_dim)).");
  m.def("jax_check_forward", &check_forward, nb::arg("shapes"), nb::arg("dtypes"), nb::arg("causal"),
        nb::arg("softmax_scale"),
        "dhp_attention_forward_check on shapes alone: shapes and DLPack (code, bits) of q, k, v, out, lse.\n"
        "Raises ValueError or TypeError with the C library's sentence; device checks are left to the run.");
  m.def("jax_backward_workspace_size", &backward_workspace_size, nb::arg("q_shape"), nb::arg("k_shape"),
        nb::arg("dtype"), nb::arg("causal"), nb::arg("softmax_scale"),
        "dhp_attention_backward_workspace_size for q and k shapes and a DLPack (code, bits) dtype: the bytes of the\n"
        "backward handler's workspace output.");
}

}  // namespace dhp_jax
