// dhp._C: the Python face of the C API, thin on purpose. Each entry point turns the DLPack tensors that
// nanobind imported (from any framework) into DLTensors, makes one dhp_* call with the GIL released, and turns a
// failing status into the matching Python exception carrying dhp_last_error()'s sentence:
// DHP_ERROR_INVALID_VALUE -> ValueError, DHP_ERROR_INVALID_DTYPE -> TypeError, anything else -> RuntimeError.
//
// NOTES:
// - Tensors are unconstrained nb::ndarray (any device, dtype, rank, strides), so validation is the C API's
//   alone: a CPU array reaches dhp_attention_forward and gets its sentence, not nanobind's generic
//   "incompatible function arguments". Inputs are nb::ro so that read-only exports (JAX) are accepted.
// - The CUDA runtime is used for one purpose only: frameworks that cannot lend us a stream we may join or a
//   buffer we may write (JAX arrays are immutable and live on XLA's streams). For them `empty` allocates a
//   DeviceBuffer (cudaMalloc) that the framework adopts zero-copy through DLPack, and `forward_synchronous`
//   runs on the legacy default stream and waits for it (so does `backward_synchronous`). Calls: cudaGetDevice,
//   cudaSetDevice, cudaMalloc, cudaFree, cudaStreamSynchronize, cudaGetLastError, cudaGetErrorString.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dhp/dhp.h"
#ifdef DHP_WITH_JAX_FFI
#include "jax_ffi.h"  // XLA FFI handlers for JAX, where CMake found jaxlib's headers
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using InTensor = nb::ndarray<nb::ro>;
using OutTensor = nb::ndarray<>;

// ---------------------------------------------------------------------------------------------------------------
// Errors

struct Failure {
  dhp_status status;
  std::string message;
};

[[noreturn]] void raise(const Failure& f) {
  switch (f.status) {
    case DHP_ERROR_INVALID_VALUE:
      throw nb::value_error(f.message.c_str());
    case DHP_ERROR_INVALID_DTYPE:
      throw nb::type_error(f.message.c_str());
    default:
      throw std::runtime_error(f.message);
  }
}

// The failure of a dhp_* call, read on the calling thread (dhp_last_error() is thread-local).
std::optional<Failure> failure_of(dhp_status status) {
  if (status == DHP_SUCCESS) return std::nullopt;
  return Failure{status, dhp_last_error()};
}

std::optional<Failure> cuda_failure(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return std::nullopt;
  cudaGetLastError();  // clear a non-sticky error so that it does not surface in an unrelated later call
  return Failure{DHP_ERROR_CUDA, what + " failed: " + cudaGetErrorString(err)};
}

// Runs `body` (which returns std::optional<Failure>) with the GIL released, then raises its failure, if any.
template <typename Body>
void run_released(Body&& body) {
  std::optional<Failure> failed;
  {
    nb::gil_scoped_release release;
    failed = body();
  }
  if (failed) raise(*failed);
}

// ---------------------------------------------------------------------------------------------------------------
// DLPack tensors in

// A DLTensor viewing an imported ndarray, which keeps the memory alive and owns the shape and stride arrays
// (nanobind fills in compact strides where the producer gave none). Strides are passed as given: a dimension
// of extent 1 may carry any stride (PyTorch exports 1, pytorch gh-83069), which the C API ignores.
class TensorArg {
 public:
  template <typename... Ts>
  explicit TensorArg(const nb::ndarray<Ts...>& a) {
    const auto dtype = a.dtype();
    dl_.data = const_cast<void*>(static_cast<const void*>(a.data()));  // data() already adds byte_offset
    dl_.device = DLDevice{static_cast<DLDeviceType>(a.device_type()), a.device_id()};
    dl_.ndim = static_cast<int32_t>(a.ndim());
    dl_.dtype = DLDataType{dtype.code, dtype.bits, dtype.lanes};
    dl_.shape = const_cast<int64_t*>(a.shape_ptr());
    dl_.strides = const_cast<int64_t*>(a.stride_ptr());
    dl_.byte_offset = 0;
  }

  DLTensor* get() { return &dl_; }

 private:
  DLTensor dl_{};
};

dhp_attention_options options_of(bool causal, float softmax_scale) {
  dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;
  options.causal = causal ? 1 : 0;
  options.softmax_scale = softmax_scale;
  return options;
}

// The five tensors of a forward call, as the C API takes them.
struct ForwardArgs {
  ForwardArgs(const InTensor& q, const InTensor& k, const InTensor& v, const OutTensor& out,
              const std::optional<OutTensor>& lse, bool causal, float softmax_scale)
      : q(q), k(k), v(v), out(out), options(options_of(causal, softmax_scale)) {
    if (lse) this->lse.emplace(*lse);
  }

  DLTensor* lse_or_null() { return lse ? lse->get() : nullptr; }

  dhp_status forward(cudaStream_t stream) {
    return dhp_attention_forward(q.get(), k.get(), v.get(), out.get(), lse_or_null(), &options, stream);
  }

  dhp_status check() {
    return dhp_attention_forward_check(q.get(), k.get(), v.get(), out.get(), lse_or_null(), &options);
  }

  TensorArg q, k, v, out;
  std::optional<TensorArg> lse;
  dhp_attention_options options;
};

// True when the elements of `a` are one gap-free block in row-major order (extent-1 dimensions may carry any
// stride).
bool is_compact(const OutTensor& a) {
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected) return false;
    expected *= a.shape(i);
  }
  return true;
}

// The nine tensors of a backward call and its workspace, which the C API takes as a pointer and a byte count
// (and checks: device, alignment, size, overlap). Turning a DLPack tensor into those two is honest only for a
// compact tensor, whose elements are exactly the bytes [data, data + nbytes): a strided view's are not.
struct BackwardArgs {
  BackwardArgs(const InTensor& q, const InTensor& k, const InTensor& v, const InTensor& out, const InTensor& dout,
               const InTensor& lse, const OutTensor& dq, const OutTensor& dk, const OutTensor& dv,
               const std::optional<OutTensor>& workspace, bool causal, float softmax_scale)
      : q(q), k(k), v(v), out(out), dout(dout), lse(lse), dq(dq), dk(dk), dv(dv),
        options(options_of(causal, softmax_scale)) {
    if (!workspace) return;
    if (!is_compact(*workspace)) {
      throw nb::value_error("workspace is a strided view: expected one compact block of memory");
    }
    workspace_data = workspace->data();
    workspace_bytes = workspace->nbytes();
  }

  dhp_status backward(cudaStream_t stream) {
    return dhp_attention_backward(q.get(), k.get(), v.get(), out.get(), dout.get(), lse.get(), dq.get(), dk.get(),
                                  dv.get(), &options, workspace_data, workspace_bytes, stream);
  }

  dhp_status check() {
    return dhp_attention_backward_check(q.get(), k.get(), v.get(), out.get(), dout.get(), lse.get(), dq.get(),
                                        dk.get(), dv.get(), &options, workspace_data, workspace_bytes);
  }

  TensorArg q, k, v, out, dout, lse, dq, dk, dv;
  void* workspace_data = nullptr;
  size_t workspace_bytes = 0;
  dhp_attention_options options;
};

// Makes `device` current for the guard's lifetime (no-op when it already is).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    restore_ = device != previous_ && cudaSetDevice(device) == cudaSuccess && previous_ >= 0;
    cudaGetLastError();  // a failure here leaves no error behind; the call that follows reports its own
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool restore_ = false;
};

// ---------------------------------------------------------------------------------------------------------------
// Device memory out, for frameworks that cannot allocate a buffer we may write (JAX)

// A DLPack deleter runs wherever the consumer drops its last reference: any thread, with or without the GIL,
// possibly inside a CUDA host callback, where CUDA calls are forbidden. So releasing memory only queues the
// pointer; the queue is drained (cudaFree) by the next allocation, on a thread that may call CUDA.
class DeferredFrees {
 public:
  void push(void* ptr, int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.emplace_back(ptr, device);
  }

  void drain() {
    std::vector<std::pair<void*, int>> pending;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending.swap(pending_);
    }
    for (const auto& [ptr, device] : pending) {
      DeviceGuard guard(device);
      if (cudaFree(ptr) != cudaSuccess) cudaGetLastError();
    }
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, int>> pending_;
};

// Leaked on purpose: deleters may still run during interpreter shutdown, after static destructors.
DeferredFrees& deferred_frees() {
  static auto* frees = new DeferredFrees;
  return *frees;
}

class DeviceMemory {
 public:
  DeviceMemory(void* ptr, int device) : ptr_(ptr), device_(device) {}
  ~DeviceMemory() { deferred_frees().push(ptr_, device_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  void* data() const { return ptr_; }
  int device() const { return device_; }

 private:
  void* ptr_;
  int device_;
};

// dlpack.h's DLManagedTensor (unversioned: the capsule kind every consumer, JAX included, reads), which
// include/dhp/dlpack.h leaves out.
struct ManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

// One export of a DeviceBuffer: a DLPack tensor holding a reference to the memory. Freed by its deleter.
struct Export {
  ManagedTensor managed{};
  std::shared_ptr<DeviceMemory> memory;
  std::vector<int64_t> shape;
};

void delete_export(ManagedTensor* managed) { delete static_cast<Export*>(managed->manager_ctx); }

constexpr const char* kCapsuleName = "dltensor";

// A consumer that takes the tensor renames the capsule ("used_dltensor"); only an unconsumed one still owns it.
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kCapsuleName)) {
    auto* managed = static_cast<ManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleName));
    managed->deleter(managed);
  }
}

// Uninitialized, compact (row-major) device memory of one dtype and shape. Every __dlpack__ call exports a
// new DLPack tensor that shares ownership of the memory, so the buffer may be passed to forward() and then
// handed to a framework (jax.dlpack.from_dlpack), which keeps it alive as long as it needs.
class DeviceBuffer {
 public:
  DeviceBuffer(std::vector<int64_t> shape, DLDataType dtype, int device)
      : shape_(std::move(shape)), dtype_(dtype), device_(device) {
    size_t bytes = (dtype.bits * size_t{dtype.lanes} + 7) / 8;
    for (int64_t extent : shape_) {
      if (extent < 0) throw nb::value_error("DeviceBuffer: negative extent in shape");
      bytes *= static_cast<size_t>(extent);
    }
    // Never a null pointer, even for an empty tensor: a consumer may reject null data.
    constexpr size_t kMinBytes = 256;
    void* ptr = nullptr;
    run_released([&]() -> std::optional<Failure> {
      deferred_frees().drain();
      DeviceGuard guard(device);
      return cuda_failure(cudaMalloc(&ptr, std::max(bytes, kMinBytes)),
                          "cudaMalloc of " + std::to_string(bytes) + " bytes on CUDA device " +
                              std::to_string(device) +
                              " (under JAX, XLA_PYTHON_CLIENT_PREALLOCATE=false leaves memory to others)");
    });
    memory_ = std::make_shared<DeviceMemory>(ptr, device);
  }

  nb::object dlpack(const nb::kwargs& kwargs) const {
    // stream: the memory holds finished results by the time it is handed out (see forward_synchronous), so
    // there is nothing to order. max_version: an unversioned capsule is always allowed by the protocol.
    if (kwargs.contains("copy") && PyObject_IsTrue(nb::object(kwargs["copy"]).ptr()) == 1) {
      throw nb::buffer_error("DeviceBuffer.__dlpack__: copy=True is not supported");
    }
    auto exported = std::make_unique<Export>();
    exported->memory = memory_;
    exported->shape = shape_;
    DLTensor& t = exported->managed.dl_tensor;
    t.data = memory_->data();
    t.device = DLDevice{kDLCUDA, device_};
    t.ndim = static_cast<int32_t>(shape_.size());
    t.dtype = dtype_;
    t.shape = exported->shape.data();
    t.strides = nullptr;  // compact row-major
    t.byte_offset = 0;
    exported->managed.manager_ctx = exported.get();
    exported->managed.deleter = delete_export;
    PyObject* capsule = PyCapsule_New(&exported->managed, kCapsuleName, capsule_destructor);
    if (!capsule) throw nb::python_error();
    exported.release();
    return nb::steal(capsule);
  }

  nb::tuple dlpack_device() const { return nb::make_tuple(static_cast<int>(kDLCUDA), device_); }

  std::vector<int64_t> shape() const { return shape_; }

 private:
  std::vector<int64_t> shape_;
  DLDataType dtype_;
  int device_;
  std::shared_ptr<DeviceMemory> memory_;
};

// ---------------------------------------------------------------------------------------------------------------
// Entry points

void forward(const InTensor& q, const InTensor& k, const InTensor& v, const OutTensor& out,
             const std::optional<OutTensor>& lse, bool causal, float softmax_scale, std::uintptr_t stream) {
  ForwardArgs args(q, k, v, out, lse, causal, softmax_scale);
  run_released([&] { return failure_of(args.forward(reinterpret_cast<cudaStream_t>(stream))); });
}

// For callers with no stream to join (JAX eager arrays; other DLPack producers, which make their data ready for
// the legacy default stream when asked without a stream): runs `launch` on the legacy default stream of q's device
// and returns once the results are written. `what` names the work in a failed synchronization's sentence.
template <typename Launch>
void run_synchronous(const InTensor& q, const char* what, Launch&& launch) {
  const bool on_cuda = q.device_type() == kDLCUDA;
  run_released([&]() -> std::optional<Failure> {
    // A non-CUDA q never launches: the C API rejects it, and there is no device to make current.
    if (!on_cuda) return failure_of(launch(cudaStreamLegacy));
    DeviceGuard guard(q.device_id());
    if (auto failed = failure_of(launch(cudaStreamLegacy))) return failed;
    return cuda_failure(cudaStreamSynchronize(cudaStreamLegacy),
                        std::string("cudaStreamSynchronize after the ") + what);
  });
}

void forward_synchronous(const InTensor& q, const InTensor& k, const InTensor& v, const OutTensor& out,
                         const std::optional<OutTensor>& lse, bool causal, float softmax_scale) {
  ForwardArgs args(q, k, v, out, lse, causal, softmax_scale);
  run_synchronous(q, "forward kernel", [&](cudaStream_t stream) { return args.forward(stream); });
}

void forward_check(const InTensor& q, const InTensor& k, const InTensor& v, const OutTensor& out,
                   const std::optional<OutTensor>& lse, bool causal, float softmax_scale) {
  ForwardArgs args(q, k, v, out, lse, causal, softmax_scale);
  run_released([&] { return failure_of(args.check()); });
}

void backward(const InTensor& q, const InTensor& k, const InTensor& v, const InTensor& out, const InTensor& dout,
              const InTensor& lse, const OutTensor& dq, const OutTensor& dk, const OutTensor& dv,
              const std::optional<OutTensor>& workspace, bool causal, float softmax_scale, std::uintptr_t stream) {
  BackwardArgs args(q, k, v, out, dout, lse, dq, dk, dv, workspace, causal, softmax_scale);
  run_released([&] { return failure_of(args.backward(reinterpret_cast<cudaStream_t>(stream))); });
}

void backward_synchronous(const InTensor& q, const InTensor& k, const InTensor& v, const InTensor& out,
                          const InTensor& dout, const InTensor& lse, const OutTensor& dq, const OutTensor& dk,
                          const OutTensor& dv, const std::optional<OutTensor>& workspace, bool causal,
                          float softmax_scale) {
  BackwardArgs args(q, k, v, out, dout, lse, dq, dk, dv, workspace, causal, softmax_scale);
  run_synchronous(q, "backward kernels", [&](cudaStream_t stream) { return args.backward(stream); });
}

void backward_check(const InTensor& q, const InTensor& k, const InTensor& v, const InTensor& out,
                    const InTensor& dout, const InTensor& lse, const OutTensor& dq, const OutTensor& dk,
                    const OutTensor& dv, const std::optional<OutTensor>& workspace, bool causal,
                    float softmax_scale) {
  BackwardArgs args(q, k, v, out, dout, lse, dq, dk, dv, workspace, causal, softmax_scale);
  run_released([&] { return failure_of(args.check()); });
}

size_t backward_workspace_size(const InTensor& q, const InTensor& k, bool causal, float softmax_scale) {
  TensorArg q_arg(q), k_arg(k);
  const dhp_attention_options options = options_of(causal, softmax_scale);
  size_t bytes = 0;
  run_released([&] {
    return failure_of(dhp_attention_backward_workspace_size(q_arg.get(), k_arg.get(), &options, &bytes));
  });
  return bytes;
}

DeviceBuffer empty(std::vector<int64_t> shape, const InTensor& like, bool float32) {
  if (like.device_type() != kDLCUDA) {
    throw nb::value_error(("empty: `like` is on DLPack device_type=" + std::to_string(like.device_type()) +
                           ": expected a CUDA tensor (device_type=2)")
                              .c_str());
  }
  const auto d = like.dtype();
  const DLDataType dtype = float32 ? DLDataType{kDLFloat, 32, 1} : DLDataType{d.code, d.bits, d.lanes};
  return DeviceBuffer(std::move(shape), dtype, like.device_id());
}

int device_count() {
  int count = 0;
  run_released([&] { return failure_of(dhp_device_count(&count)); });
  return count;
}

nb::dict device_info(int device) {
  dhp_device_info info{};
  run_released([&] { return failure_of(dhp_get_device_info(device, &info)); });
  nb::dict d;
  d["name"] = nb::str(info.name);
  d["compute_capability"] = nb::make_tuple(info.compute_major, info.compute_minor);
  d["multiprocessors"] = info.multiprocessors;
  d["supported"] = info.supported != 0;
  return d;
}

constexpr const char* kForwardDoc =
    "dhp_attention_forward on `stream` (a cudaStream_t as an integer). q, k, v, out: DLPack tensors\n"
    "(batch, seqlen, heads, head_dim); lse: float32 (batch, heads_q, seqlen_q) or None. softmax_scale 0 means\n"
    "1/sqrt(head_dim). Raises ValueError (bad value), TypeError (bad dtype) or RuntimeError, with the C\n"
    "library's sentence; on any error no output is touched.";

constexpr const char* kBackwardDoc =
    "dhp_attention_backward on `stream` (a cudaStream_t as an integer): writes dq, dk, dv, the gradients for\n"
    "`dout`, from the forward's q, k, v, out and lse (float32, required). workspace: compact CUDA memory on q's\n"
    "device of at least backward_workspace_size() bytes, any dtype (e.g. uint8), or None when that size is 0.\n"
    "softmax_scale 0 means 1/sqrt(head_dim). Raises as forward() does; on any error no output is touched.";

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "dhp's compiled core: DLPack tensors in, the dhp C API, Python exceptions out.";

  m.def("version", [] { return std::string(dhp_version()); }, "The C library's version, \"MAJOR.MINOR.PATCH\".");
  m.def("build_info", [] { return std::string(dhp_build_info()); },
        "How the C library was built, as a JSON string: version, cuda, arch, dtypes, head_dims.");
  m.def("device_count", &device_count, "Number of visible CUDA devices (0 without a GPU or driver).");
  m.def("device_info", &device_info, "device"_a,
        "dict(name, compute_capability, multiprocessors, supported) of one CUDA device.");

  m.def("forward", &forward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "causal"_a, "softmax_scale"_a,
        "stream"_a, kForwardDoc);
  m.def("forward_synchronous", &forward_synchronous, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "causal"_a,
        "softmax_scale"_a,
        "forward() on the legacy default stream of q's device, returning once the outputs are written.");
  m.def("forward_check", &forward_check, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "causal"_a,
        "softmax_scale"_a, "dhp_attention_forward_check: forward()'s validation, device checks included, no launch.");

  m.def("backward", &backward, "q"_a, "k"_a, "v"_a, "out"_a, "dout"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a,
        "workspace"_a.none(), "causal"_a, "softmax_scale"_a, "stream"_a, kBackwardDoc);
  m.def("backward_synchronous", &backward_synchronous, "q"_a, "k"_a, "v"_a, "out"_a, "dout"_a, "lse"_a, "dq"_a,
        "dk"_a, "dv"_a, "workspace"_a.none(), "causal"_a, "softmax_scale"_a,
        "backward() on the legacy default stream of q's device, returning once the gradients are written.");
  m.def("backward_check", &backward_check, "q"_a, "k"_a, "v"_a, "out"_a, "dout"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a,
        "workspace"_a.none(), "causal"_a, "softmax_scale"_a,
        "dhp_attention_backward_check: backward()'s validation, device checks included, no launch.");
  m.def("backward_workspace_size", &backward_workspace_size, "q"_a, "k"_a, "causal"_a, "softmax_scale"_a,
        "dhp_attention_backward_workspace_size: the bytes of workspace backward() needs for these shapes.");

  nb::class_<DeviceBuffer>(m, "DeviceBuffer",
                           "Uninitialized compact CUDA memory exported through DLPack; freed when its last "
                           "holder (e.g. the JAX array adopting it) lets go.")
      .def("__dlpack__", &DeviceBuffer::dlpack)
      .def("__dlpack_device__", &DeviceBuffer::dlpack_device)
      .def_prop_ro("shape", &DeviceBuffer::shape);
  m.def("empty", &empty, "shape"_a, "like"_a, "float32"_a = false,
        "A DeviceBuffer of `shape` on like's CUDA device, with like's dtype (float32 if asked).");
#ifdef DHP_WITH_JAX_FFI
  dhp_jax::register_jax_ffi(m);
#endif
}
