// dhp refuses tensors in CUDA compressible memory (docs/SECURITY.md): their L2/DRAM traffic depends on the values.
//
// On a GPU that can allocate compressible memory (cuMemCreate with CU_MEM_ALLOCATION_COMP_GENERIC), each tensor
// position (q, k, v, out, lse) in turn gets compressible memory: dhp_attention_forward_check and
// dhp_attention_forward must return DHP_ERROR_UNSUPPORTED with a sentence that names it, and leave out and lse as
// they were. So must a tensor that starts in ordinary VMM memory and runs into a compressible mapping. The same
// request in VMM memory without compression, in cudaMalloc memory and in a cudaMallocAsync pool must run, with
// the same bits. The backward likewise: each of dout, dq, dk, dv and its workspace in compressible memory in turn
// is refused by dhp_attention_backward_check and dhp_attention_backward, dq, dk and dv left as they were; in
// ordinary memory it runs. Also prints what the check costs per call (host time of dhp_attention_forward_check).
//
// Exits 77 (ctest's SKIP_RETURN_CODE; tests/test_capi.py skips on it) with the reason on a machine that cannot
// run it: no GPU, no sm_90 GPU, no VMM or no compressible memory. The driver API comes through
// cudaGetDriverEntryPointByVersion, so the program starts (and skips) where no driver is installed.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dhp/dhp.h"

namespace {

constexpr int kSkip = 77;

// One small bf16 request: batch 1, seqlen_q = seqlen_k = 128, 2 heads, head_dim 64, with lse.
constexpr int64_t kBatch = 1, kSeq = 128, kHeads = 2, kHeadDim = 64;
constexpr size_t kBshdBytes = kBatch * kSeq * kHeads * kHeadDim * 2;
constexpr size_t kLseBytes = kBatch * kHeads * kSeq * 4;
constexpr size_t kSlotBytes = 64 << 10;  // room for any one tensor; keeps each 16-byte aligned
constexpr int kTensors = 5;
const char* const kNames[kTensors] = {"q", "k", "v", "out", "lse"};
enum { kQ, kK, kV, kOut, kLse };
constexpr unsigned char kPattern = 0xA5;  // what out and lse hold before a call that must not write them

int failures = 0;

[[noreturn]] void skip(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::printf("SKIP: ");
  std::vprintf(fmt, args);
  std::printf("\n");
  va_end(args);
  std::exit(kSkip);
}

[[noreturn]] void die(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  std::exit(1);
}

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

void check_rt(cudaError_t e, const char* call) {
  if (e != cudaSuccess) die(std::string(call) + ": " + cudaGetErrorString(e));
}

void check_cu(CUresult r, const char* call) {
  if (r != CUDA_SUCCESS) die(std::string(call) + " failed: CUresult " + std::to_string(static_cast<int>(r)));
}

// The driver's virtual-memory API.
struct Driver {
  PFN_cuDeviceGet_v2000 device_get;
  PFN_cuDeviceGetAttribute_v2000 device_attribute;
  PFN_cuMemGetAllocationGranularity_v10020 granularity;
  PFN_cuMemCreate_v10020 create;
  PFN_cuMemGetAllocationPropertiesFromHandle_v10020 properties;
  PFN_cuMemAddressReserve_v10020 reserve;
  PFN_cuMemMap_v10020 map;
  PFN_cuMemSetAccess_v10020 set_access;
  PFN_cuMemUnmap_v10020 unmap;
  PFN_cuMemAddressFree_v10020 address_free;
  PFN_cuMemRelease_v10020 release;
} cu;

template <typename Fn>
void entry(Fn* fn, const char* symbol, unsigned version) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult query{};
  const cudaError_t e = cudaGetDriverEntryPointByVersion(symbol, &ptr, version, cudaEnableDefault, &query);
  if (e != cudaSuccess || query != cudaDriverEntryPointSuccess) die(std::string("no driver entry point ") + symbol);
  *fn = reinterpret_cast<Fn>(ptr);
}

void load_driver() {
  entry(&cu.device_get, "cuDeviceGet", 2000);
  entry(&cu.device_attribute, "cuDeviceGetAttribute", 2000);
  entry(&cu.granularity, "cuMemGetAllocationGranularity", 10020);
  entry(&cu.create, "cuMemCreate", 10020);
  entry(&cu.properties, "cuMemGetAllocationPropertiesFromHandle", 10020);
  entry(&cu.reserve, "cuMemAddressReserve", 10020);
  entry(&cu.map, "cuMemMap", 10020);
  entry(&cu.set_access, "cuMemSetAccess", 10020);
  entry(&cu.unmap, "cuMemUnmap", 10020);
  entry(&cu.address_free, "cuMemAddressFree", 10020);
  entry(&cu.release, "cuMemRelease", 10020);
}

CUmemAllocationProp allocation_prop(bool compressible) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = 0;
  prop.allocFlags.compressionType = compressible ? CU_MEM_ALLOCATION_COMP_GENERIC : CU_MEM_ALLOCATION_COMP_NONE;
  return prop;
}

size_t granule() {
  size_t g = 0;
  for (bool compressible : {false, true}) {
    const CUmemAllocationProp prop = allocation_prop(compressible);
    size_t one = 0;
    check_cu(cu.granularity(&one, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity");
    g = std::max(g, one);
  }
  return g;
}

// One reserved address range of consecutive granules, each mapped to an allocation of its own, compressible or
// not: the layout of PyTorch's expandable segments, with a compressible chunk where the test wants one.
class Region {
 public:
  explicit Region(std::initializer_list<bool> compressed) : granule_(granule()) {
    size_ = granule_ * compressed.size();
    check_cu(cu.reserve(&base_, size_, granule_, 0, 0), "cuMemAddressReserve");
    size_t offset = 0;
    for (bool compressible : compressed) {
      const CUmemAllocationProp want = allocation_prop(compressible);
      CUmemGenericAllocationHandle handle{};
      check_cu(cu.create(&handle, granule_, &want, 0), "cuMemCreate");
      handles_.push_back(handle);
      // COMP_GENERIC is a request; the driver says in the handle's properties whether it granted it.
      CUmemAllocationProp got{};
      check_cu(cu.properties(&got, handle), "cuMemGetAllocationPropertiesFromHandle");
      if (compressible && got.allocFlags.compressionType != CU_MEM_ALLOCATION_COMP_GENERIC) {
        skip("cuMemCreate with CU_MEM_ALLOCATION_COMP_GENERIC gave memory that is not compressible on this "
             "GPU/driver, so there is nothing to refuse");
      }
      if (!compressible && got.allocFlags.compressionType != CU_MEM_ALLOCATION_COMP_NONE) {
        die("cuMemCreate without compression gave compressible memory");
      }
      check_cu(cu.map(base_ + offset, granule_, 0, handle, 0), "cuMemMap");
      offset += granule_;
    }
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = 0;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    check_cu(cu.set_access(base_, size_, &access, 1), "cuMemSetAccess");
  }
  ~Region() {
    cu.unmap(base_, size_);
    for (CUmemGenericAllocationHandle h : handles_) cu.release(h);
    cu.address_free(base_, size_);
  }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  uintptr_t at(size_t offset) const { return static_cast<uintptr_t>(base_ + offset); }
  size_t granule_bytes() const { return granule_; }

 private:
  size_t granule_;
  size_t size_ = 0;
  CUdeviceptr base_ = 0;
  std::vector<CUmemGenericAllocationHandle> handles_;
};

// The five DLTensors of a request at the given addresses.
struct Request {
  int64_t bshd[4] = {kBatch, kSeq, kHeads, kHeadDim};
  int64_t lse_shape[3] = {kBatch, kHeads, kSeq};
  DLTensor t[kTensors];
  dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;

  explicit Request(const uintptr_t (&address)[kTensors]) {
    for (int i = 0; i < kTensors; ++i) {
      const bool lse = i == kLse;
      t[i] = DLTensor{reinterpret_cast<void*>(address[i]), {kDLCUDA, 0}, lse ? 3 : 4,
                      lse ? DLDataType{kDLFloat, 32, 1} : DLDataType{kDLBfloat, 16, 1}, lse ? lse_shape : bshd,
                      nullptr, 0};
    }
  }
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;

  dhp_status check() const {
    return dhp_attention_forward_check(&t[kQ], &t[kK], &t[kV], &t[kOut], &t[kLse], &options);
  }
  dhp_status forward() {
    return dhp_attention_forward(&t[kQ], &t[kK], &t[kV], &t[kOut], &t[kLse], &options, nullptr);
  }
  size_t bytes(int i) const { return i == kLse ? kLseBytes : kBshdBytes; }
};

// Fresh inputs (the same every time: bf16 of uniform [-1, 1)) and out, lse filled with kPattern.
void fill(const Request& r) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<uint16_t> host(kBshdBytes / 2);
  for (int i : {kQ, kK, kV}) {
    for (uint16_t& x : host) {
      const float f = uniform(rng);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      x = static_cast<uint16_t>(bits >> 16);
    }
    check_rt(cudaMemcpy(r.t[i].data, host.data(), kBshdBytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  for (int i : {kOut, kLse}) check_rt(cudaMemset(r.t[i].data, kPattern, r.bytes(i)), "cudaMemset");
  check_rt(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

std::vector<unsigned char> read(const Request& r, int i) {
  std::vector<unsigned char> host(r.bytes(i));
  check_rt(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  check_rt(cudaMemcpy(host.data(), r.t[i].data, host.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return host;
}

bool untouched(const Request& r, int i) {
  for (unsigned char b : read(r, i)) {
    if (b != kPattern) return false;
  }
  return true;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// Both entry points refuse the request, name `name` as the compressible tensor, and leave out and lse alone.
void expect_refused(Request& r, const char* name, const std::string& what) {
  fill(r);
  const std::string want = std::string(name) + ": the tensor's memory is compressible";
  const dhp_status checked = r.check();
  const std::string check_message = dhp_last_error();
  expect(checked == DHP_ERROR_UNSUPPORTED && starts_with(check_message, want),
         what + ": check() -> " + std::to_string(checked) + " \"" + check_message + "\"");
  const dhp_status ran = r.forward();
  const std::string forward_message = dhp_last_error();
  expect(ran == DHP_ERROR_UNSUPPORTED && forward_message == check_message,
         what + ": forward() -> " + std::to_string(ran) + " \"" + forward_message + "\"");
  expect(untouched(r, kOut) && untouched(r, kLse), what + ": out and lse untouched");
}

// Both entry points accept the request; returns out and lse, which must have been written.
std::vector<unsigned char> expect_runs(Request& r, const std::string& what) {
  fill(r);
  const dhp_status checked = r.check();
  expect(checked == DHP_SUCCESS && *dhp_last_error() == '\0',
         what + ": check() -> " + std::to_string(checked) + " \"" + dhp_last_error() + "\"");
  const dhp_status ran = r.forward();
  expect(ran == DHP_SUCCESS, what + ": forward() -> " + std::to_string(ran) + " \"" + dhp_last_error() + "\"");
  check_rt(cudaDeviceSynchronize(), "cudaDeviceSynchronize after dhp_attention_forward");
  std::vector<unsigned char> result = read(r, kOut);
  const std::vector<unsigned char> lse = read(r, kLse);
  expect(!untouched(r, kOut) && !untouched(r, kLse), what + ": out and lse written");
  result.insert(result.end(), lse.begin(), lse.end());
  return result;
}

// Host microseconds per dhp_attention_forward_check call (validation plus the memory check).
double check_microseconds(const Request& r) {
  constexpr int kCalls = 2000;
  r.check();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kCalls; ++i) r.check();
  const std::chrono::duration<double, std::micro> spent = std::chrono::steady_clock::now() - start;
  return spent.count() / kCalls;
}

// The backward's own arguments, beside a forward Request's q, k, v, out and lse: dout, dq, dk, dv, workspace.
constexpr int kBackwardArgs = 5;
const char* const kBackwardNames[kBackwardArgs] = {"dout", "dq", "dk", "dv", "workspace"};
enum { kDout, kDq, kDk, kDv, kWorkspace };

struct BackwardRequest {
  const Request& fwd;
  DLTensor t[4];  // dout, dq, dk, dv: q's shape (no GQA here)
  void* workspace;
  size_t workspace_bytes;

  BackwardRequest(const Request& f, const uintptr_t (&address)[kBackwardArgs], size_t bytes)
      : fwd(f), workspace(reinterpret_cast<void*>(address[kWorkspace])), workspace_bytes(bytes) {
    for (int i = 0; i < 4; ++i) {
      t[i] = f.t[kQ];
      t[i].data = reinterpret_cast<void*>(address[i]);
    }
  }
  BackwardRequest(const BackwardRequest&) = delete;
  BackwardRequest& operator=(const BackwardRequest&) = delete;

  dhp_status check() const {
    return dhp_attention_backward_check(&fwd.t[kQ], &fwd.t[kK], &fwd.t[kV], &fwd.t[kOut], &t[kDout], &fwd.t[kLse],
                                        &t[kDq], &t[kDk], &t[kDv], &fwd.options, workspace, workspace_bytes);
  }
  dhp_status backward() {
    return dhp_attention_backward(&fwd.t[kQ], &fwd.t[kK], &fwd.t[kV], &fwd.t[kOut], &t[kDout], &fwd.t[kLse],
                                  &t[kDq], &t[kDk], &t[kDv], &fwd.options, workspace, workspace_bytes, nullptr);
  }
};

// dout = ones (bf16 0x3F80) and dq, dk, dv filled with kPattern.
void fill(const BackwardRequest& r) {
  const std::vector<uint16_t> ones(kBshdBytes / 2, 0x3F80);
  check_rt(cudaMemcpy(r.t[kDout].data, ones.data(), kBshdBytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  for (int i : {kDq, kDk, kDv}) check_rt(cudaMemset(r.t[i].data, kPattern, kBshdBytes), "cudaMemset");
  check_rt(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

bool gradients_untouched(const BackwardRequest& r) {
  std::vector<unsigned char> host(kBshdBytes);
  check_rt(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  for (int i : {kDq, kDk, kDv}) {
    check_rt(cudaMemcpy(host.data(), r.t[i].data, kBshdBytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
    if (std::any_of(host.begin(), host.end(), [](unsigned char b) { return b != kPattern; })) return false;
  }
  return true;
}

void expect_refused(BackwardRequest& r, const char* name, const std::string& what) {
  fill(r);
  const std::string want = std::string(name) + ": the tensor's memory is compressible";
  const dhp_status checked = r.check();
  const std::string check_message = dhp_last_error();
  expect(checked == DHP_ERROR_UNSUPPORTED && starts_with(check_message, want),
         what + ": backward check() -> " + std::to_string(checked) + " \"" + check_message + "\"");
  const dhp_status ran = r.backward();
  const std::string backward_message = dhp_last_error();
  expect(ran == DHP_ERROR_UNSUPPORTED && backward_message == check_message,
         what + ": backward() -> " + std::to_string(ran) + " \"" + backward_message + "\"");
  expect(gradients_untouched(r), what + ": dq, dk, dv untouched");
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    skip("no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount: 0 devices");
  }
  dhp_device_info info{};
  if (dhp_get_device_info(0, &info) != DHP_SUCCESS) die(std::string("dhp_get_device_info: ") + dhp_last_error());
  if (!info.supported) {
    skip("GPU 0 (%s) is sm_%d%d: dhp needs sm_90", info.name, info.compute_major, info.compute_minor);
  }
  check_rt(cudaSetDevice(0), "cudaSetDevice");
  check_rt(cudaFree(nullptr), "cudaFree(0)");  // creates the primary context, which dhp's runtime shares
  load_driver();
  CUdevice device{};
  check_cu(cu.device_get(&device, 0), "cuDeviceGet");
  int vmm = 0, compression = 0;
  check_cu(cu.device_attribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device),
           "cuDeviceGetAttribute");
  check_cu(cu.device_attribute(&compression, CU_DEVICE_ATTRIBUTE_GENERIC_COMPRESSION_SUPPORTED, device),
           "cuDeviceGetAttribute");
  if (!vmm) skip("GPU 0 (%s) has no virtual memory management (cuMemCreate)", info.name);
  if (!compression) skip("GPU 0 (%s) does not support compressible memory", info.name);
  std::printf("GPU 0: %s\n", info.name);

  // One ordinary VMM mapping holding a slot per tensor, and one compressible mapping.
  Region plain{false};
  Region compressed{true};
  uintptr_t in_plain[kTensors];
  for (int i = 0; i < kTensors; ++i) in_plain[i] = plain.at(i * kSlotBytes);

  for (int i = 0; i < kTensors; ++i) {
    uintptr_t address[kTensors];
    std::copy(in_plain, in_plain + kTensors, address);
    address[i] = compressed.at(0);
    Request r(address);
    expect_refused(r, kNames[i], std::string(kNames[i]) + " in compressible memory");
  }

  // q starts in an ordinary mapping and runs 16 KiB into a compressible one right after it.
  {
    Region split{false, true};
    uintptr_t address[kTensors];
    std::copy(in_plain, in_plain + kTensors, address);
    address[kQ] = split.at(split.granule_bytes() - kBshdBytes / 2);
    Request r(address);
    expect_refused(r, "q", "q crossing into a compressible mapping");
  }
  // The same crossing between two ordinary mappings is fine.
  {
    Region two{false, false};
    uintptr_t address[kTensors];
    std::copy(in_plain, in_plain + kTensors, address);
    address[kQ] = two.at(two.granule_bytes() - kBshdBytes / 2);
    Request r(address);
    expect_runs(r, "q crossing two ordinary mappings");
  }

  // Ordinary memory of each kind runs, with the same bits.
  Request vmm_request(in_plain);
  const std::vector<unsigned char> from_vmm = expect_runs(vmm_request, "all in VMM memory without compression");

  void* buffers[kTensors] = {};
  uintptr_t in_malloc[kTensors];
  for (int i = 0; i < kTensors; ++i) {
    check_rt(cudaMalloc(&buffers[i], kSlotBytes), "cudaMalloc");
    in_malloc[i] = reinterpret_cast<uintptr_t>(buffers[i]);
  }
  Request malloc_request(in_malloc);
  expect(expect_runs(malloc_request, "all in cudaMalloc memory") == from_vmm, "cudaMalloc result == VMM result");

  cudaStream_t stream{};
  check_rt(cudaStreamCreate(&stream), "cudaStreamCreate");
  void* pooled[kTensors] = {};
  uintptr_t in_pool[kTensors];
  for (int i = 0; i < kTensors; ++i) {
    check_rt(cudaMallocAsync(&pooled[i], kSlotBytes, stream), "cudaMallocAsync");
    in_pool[i] = reinterpret_cast<uintptr_t>(pooled[i]);
  }
  check_rt(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  Request pool_request(in_pool);
  expect(expect_runs(pool_request, "all in a cudaMallocAsync pool") == from_vmm, "pool result == VMM result");

  // A thread that has never made a context current asks too (the check must not rely on one).
  std::thread([&] {
    uintptr_t address[kTensors];
    std::copy(in_plain, in_plain + kTensors, address);
    address[kK] = compressed.at(0);
    Request refused(address);
    const dhp_status s = refused.check();
    expect(s == DHP_ERROR_UNSUPPORTED && starts_with(dhp_last_error(), "k: the tensor's memory is compressible"),
           std::string("fresh thread, k compressible: check() -> ") + std::to_string(s) + " \"" + dhp_last_error() +
               "\"");
    const dhp_status ok = vmm_request.check();
    expect(ok == DHP_SUCCESS, std::string("fresh thread, VMM memory: check() -> ") + std::to_string(ok) + " \"" +
                                  dhp_last_error() + "\"");
  }).join();

  // The backward: dout, dq, dk, dv and the workspace in the plain mapping after the forward's slots, then each
  // of them in the compressible one in turn.
  size_t workspace_bytes = 0;
  if (dhp_attention_backward_workspace_size(&vmm_request.t[kQ], &vmm_request.t[kK], &vmm_request.options,
                                            &workspace_bytes) != DHP_SUCCESS) {
    die(std::string("dhp_attention_backward_workspace_size: ") + dhp_last_error());
  }
  const size_t workspace_offset = (kTensors + 4) * kSlotBytes;
  if (workspace_offset + workspace_bytes > plain.granule_bytes() || workspace_bytes > compressed.granule_bytes()) {
    die("the backward's workspace (" + std::to_string(workspace_bytes) + " bytes) does not fit one granule");
  }
  uintptr_t backward_plain[kBackwardArgs];
  for (int i = 0; i < 4; ++i) backward_plain[i] = plain.at((kTensors + i) * kSlotBytes);
  backward_plain[kWorkspace] = plain.at(workspace_offset);
  for (int i = 0; i < kBackwardArgs; ++i) {
    uintptr_t address[kBackwardArgs];
    std::copy(backward_plain, backward_plain + kBackwardArgs, address);
    address[i] = compressed.at(0);
    BackwardRequest r(vmm_request, address, workspace_bytes);
    expect_refused(r, kBackwardNames[i], std::string(kBackwardNames[i]) + " in compressible memory");
  }
  {
    BackwardRequest r(vmm_request, backward_plain, workspace_bytes);
    fill(r);
    const dhp_status ran = r.backward();
    expect(ran == DHP_SUCCESS, std::string("backward, all in VMM memory: ") + std::to_string(ran) + " \"" +
                                   dhp_last_error() + "\"");
    expect(!gradients_untouched(r), "backward, all in VMM memory: dq, dk, dv written");
  }

  std::printf("host time per dhp_attention_forward_check (5 tensors): cudaMalloc %.2f us, VMM %.2f us, "
              "pool %.2f us\n",
              check_microseconds(malloc_request), check_microseconds(vmm_request), check_microseconds(pool_request));

  for (void* p : pooled) cudaFreeAsync(p, stream);
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  for (void* p : buffers) cudaFree(p);
  std::printf("%s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
