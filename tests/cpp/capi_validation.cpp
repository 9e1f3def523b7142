// Every rejection path of dhp_attention_forward_check and dhp_attention_forward, on hand-built DLTensors with
// fake device addresses (nothing is dereferenced): the status, and a message that names the argument.
// Valid requests must get through validation to the device checks: on a machine without a GPU they fail
// there with "no CUDA device"; with a GPU, check() reports the device's verdict and nothing is launched.
#include <cmath>
#include <limits>
#include <string>
#include <thread>

#include "capi_test.h"

namespace {

using namespace capi_test;

// A valid request: batch 2, seqlen_q 128, seqlen_k 256, heads_q 8, heads_kv 2 (GQA), head_dim 128, bf16.
struct Request {
  Tensor q{0x10000000, kBf16, {2, 128, 8, 128}};
  Tensor k{0x20000000, kBf16, {2, 256, 2, 128}};
  Tensor v{0x30000000, kBf16, {2, 256, 2, 128}};
  Tensor out{0x40000000, kBf16, {2, 128, 8, 128}};
  Tensor lse{0x50000000, kFp32, {2, 8, 128}};
  dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;

  // What is passed: a case may replace any of these with NULL.
  const DLTensor* q_arg = &q.t;
  const DLTensor* k_arg = &k.t;
  const DLTensor* v_arg = &v.t;
  DLTensor* out_arg = &out.t;
  DLTensor* lse_arg = &lse.t;
  const dhp_attention_options* options_arg = &options;

  void for_bshd(const std::function<void(Tensor&)>& f) {
    for (Tensor* x : {&q, &k, &v, &out}) f(*x);
  }
  dhp_status check() const { return dhp_attention_forward_check(q_arg, k_arg, v_arg, out_arg, lse_arg, options_arg); }
  dhp_status call() { return dhp_attention_forward(q_arg, k_arg, v_arg, out_arg, lse_arg, options_arg, nullptr); }
  std::string written() const { return snapshot({&out, &lse}); }
  Outcome reached(const Outcome& device) const { return device; }
};

std::vector<Case<Request>> cases() {
  constexpr int kInvalid = DHP_ERROR_INVALID_VALUE, kDtype = DHP_ERROR_INVALID_DTYPE;
  const int64_t kTwo31 = int64_t{1} << 31;
  const float kNan = std::numeric_limits<float>::quiet_NaN(), kInf = std::numeric_limits<float>::infinity();
  return {
      // valid requests
      {"valid", [](Request&) {}, kReachesDevice, {}},
      {"valid without lse", [](Request& r) { r.lse_arg = nullptr; }, kReachesDevice, {}},
      {"valid fp16, head_dim 64, MHA, causal", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.t.dtype = kFp16; x.shape[3] = 64; });
         r.k.shape[2] = r.v.shape[2] = 8;
         r.options.causal = 1;
       }, kReachesDevice, {}},
      {"valid MQA, seqlen 1, explicit scale", [](Request& r) {
         r.k.shape[2] = r.v.shape[2] = 1;
         r.q.shape[1] = r.out.shape[1] = r.lse.shape[2] = 1;
         r.k.shape[1] = r.v.shape[1] = 1;
         r.options.softmax_scale = 0.125f;
       }, kReachesDevice, {}},
      {"valid empty batch with NULL data", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.shape[0] = 0; x.t.data = nullptr; });
         r.lse.shape[0] = 0;
         r.lse.t.data = nullptr;
       }, kReachesDevice, {}},
      {"valid seqlen_q 0", [](Request& r) { r.q.shape[1] = r.out.shape[1] = r.lse.shape[2] = 0; }, kReachesDevice, {}},
      {"valid q slice of packed qkv", [](Request& r) { r.q.set_strides({128 * 3 * 8 * 128, 3 * 8 * 128, 128, 1}); },
       kReachesDevice, {}},
      {"valid broadcast k heads (stride 0)", [](Request& r) { r.k.set_strides({256 * 128, 128, 0, 1}); },
       kReachesDevice, {}},
      {"valid odd stride of a size-1 dim", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.shape[0] = 1; });
         r.lse.shape[0] = 1;
         r.q.set_strides({3, 8 * 128, 128, 1});
         r.lse.set_strides({-5, 128, 1});
       }, kReachesDevice, {}},
      {"valid byte_offset folded into the pointer", [](Request& r) {
         r.q.t.data = reinterpret_cast<void*>(0x10000008);
         r.q.t.byte_offset = 8;
       }, kReachesDevice, {}},
      {"valid q and k the same tensor", [](Request& r) {
         r.k.set_shape({2, 128, 8, 128});
         r.v.set_shape({2, 128, 8, 128});
         r.k_arg = &r.q.t;
       }, kReachesDevice, {}},

      // null pointers
      {"q NULL", [](Request& r) { r.q_arg = nullptr; }, kInvalid, {"q is NULL"}},
      {"k NULL", [](Request& r) { r.k_arg = nullptr; }, kInvalid, {"k is NULL"}},
      {"v NULL", [](Request& r) { r.v_arg = nullptr; }, kInvalid, {"v is NULL"}},
      {"out NULL", [](Request& r) { r.out_arg = nullptr; }, kInvalid, {"out is NULL"}},
      {"options NULL", [](Request& r) { r.options_arg = nullptr; }, kInvalid, {"options is NULL"}},
      {"q.data NULL", [](Request& r) { r.q.t.data = nullptr; }, kInvalid, {"q.data is NULL"}},
      {"lse.data NULL", [](Request& r) { r.lse.t.data = nullptr; }, kInvalid, {"lse.data is NULL"}},

      // device
      {"k on the CPU", [](Request& r) { r.k.t.device = {kDLCPU, 0}; }, kInvalid, {"k.device=cpu:0", "kDLCUDA"}},
      {"out in pinned host memory", [](Request& r) { r.out.t.device = {kDLCUDAHost, 0}; }, kInvalid,
       {"out.device=cuda_host:0"}},
      {"v on another GPU", [](Request& r) { r.v.t.device.device_id = 1; }, kInvalid,
       {"v.device=cuda:1", "expected cuda:0, the device of q"}},
      {"lse on another GPU", [](Request& r) { r.lse.t.device.device_id = 1; }, kInvalid, {"lse.device=cuda:1"}},
      {"negative device id", [](Request& r) { r.q.t.device.device_id = -1; }, kInvalid, {"q.device=cuda:-1"}},

      // dtype
      {"q float32", [](Request& r) { r.q.t.dtype = kFp32; }, kDtype, {"q.dtype=float32", "bfloat16 or float16"}},
      {"q int8", [](Request& r) { r.q.t.dtype = {kDLInt, 8, 1}; }, kDtype, {"q.dtype=int8"}},
      {"k float16 with q bfloat16", [](Request& r) { r.k.t.dtype = kFp16; }, kDtype,
       {"k.dtype=float16: expected bfloat16, the same as q"}},
      {"v vector bf16x2", [](Request& r) { r.v.t.dtype = {kDLBfloat, 16, 2}; }, kDtype, {"v.dtype=bfloat16x2"}},
      {"out float32", [](Request& r) { r.out.t.dtype = kFp32; }, kDtype, {"out.dtype=float32"}},
      {"lse float16", [](Request& r) { r.lse.t.dtype = kFp16; }, kDtype, {"lse.dtype=float16: expected float32"}},

      // rank and sizes
      {"q rank 3", [](Request& r) { r.q.set_shape({2, 128, 1024}); }, kInvalid, {"q.ndim=3", "4 dimensions"}},
      {"lse rank 4", [](Request& r) { r.lse.set_shape({2, 8, 128, 1}); }, kInvalid, {"lse.ndim=4", "3 dimensions"}},
      {"k shape NULL", [](Request& r) { r.k.t.shape = nullptr; }, kInvalid, {"k.shape is NULL"}},
      {"negative size", [](Request& r) { r.v.shape[1] = -1; }, kInvalid, {"v.shape[1]=-1"}},
      {"size 2^31", [kTwo31](Request& r) { r.q.shape[1] = kTwo31; }, kInvalid, {"q.shape[1]=2147483648", "2^31"}},

      // shape agreement
      {"k batch differs", [](Request& r) { r.k.shape[0] = 3; }, kInvalid,
       {"k.shape=(3, 256, 2, 128): expected (2, 256, 2, 128)"}},
      {"k head_dim differs", [](Request& r) { r.k.shape[3] = 64; }, kInvalid, {"k.shape=", "head_dim of q"}},
      {"v seqlen differs from k", [](Request& r) { r.v.shape[1] = 255; }, kInvalid, {"v.shape=", "the shape of k"}},
      {"v heads differ from k", [](Request& r) { r.v.shape[2] = 4; }, kInvalid, {"v.shape=", "the shape of k"}},
      {"out shape differs", [](Request& r) { r.out.shape[1] = 64; }, kInvalid, {"out.shape=", "the shape of q"}},
      {"lse shape differs", [](Request& r) { r.lse.set_shape({2, 128, 8}); }, kInvalid,
       {"lse.shape=(2, 128, 8): expected (2, 8, 128)"}},

      // supported sizes
      {"head_dim 96", [](Request& r) { r.for_bshd([](Tensor& x) { x.shape[3] = 96; }); }, kInvalid,
       {"q.shape[3]=96: head_dim must be " + built_list("head_dims")}},
      {"heads_q 0", [](Request& r) {
         r.q.shape[2] = r.out.shape[2] = 0;
         r.lse_arg = nullptr;
       }, kInvalid, {"q.shape[2]=0: heads_q must be >= 1"}},
      {"heads_kv 0", [](Request& r) { r.k.shape[2] = r.v.shape[2] = 0; }, kInvalid,
       {"k.shape[2]=0: heads_kv must be >= 1"}},
      {"heads_q not a multiple of heads_kv", [](Request& r) { r.k.shape[2] = r.v.shape[2] = 3; }, kInvalid,
       {"q.shape[2]=8", "multiple of heads_kv=3"}},
      {"seqlen_k 0", [](Request& r) { r.k.shape[1] = r.v.shape[1] = 0; }, kInvalid,
       {"k.shape[1]=0: seqlen_k must be >= 1"}},
      {"batch over the grid limit", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.shape[0] = 65536; });
         r.lse.shape[0] = 65536;
       }, kInvalid, {"q.shape[0]=65536: batch must be <= 65535"}},
      {"heads_q over the grid limit", [](Request& r) {
         r.q.shape[2] = r.out.shape[2] = r.lse.shape[1] = 65536;
         r.k.shape[2] = r.v.shape[2] = 1;
       }, kInvalid, {"q.shape[2]=65536: heads_q must be <= 65535"}},

      // strides and alignment
      {"v last dim not contiguous", [](Request& r) { r.v.set_strides({256 * 2 * 256, 2 * 256, 256, 2}); }, kInvalid,
       {"v.strides[3]=2: the last dimension must be contiguous (stride 1)"}},
      {"q head stride not a 16-byte multiple", [](Request& r) { r.q.set_strides({128 * 1028, 1028, 100, 1}); },
       kInvalid, {"q.strides[2]=100", "multiple of 8 elements"}},
      {"k negative stride", [](Request& r) { r.k.set_strides({-256 * 256, 256, 128, 1}); }, kInvalid,
       {"k.strides[0]=-65536", "non-negative"}},
      {"out stride 2^40 bytes", [](Request& r) { r.out.set_strides({int64_t{1} << 39, 8 * 128, 128, 1}); },
       kInvalid, {"out.strides[0]=549755813888", "2^40 bytes"}},
      {"q misaligned", [](Request& r) { r.q.t.data = reinterpret_cast<void*>(0x10000008); }, kInvalid,
       {"q.data+byte_offset=0x10000008", "16-byte aligned"}},
      {"k byte_offset misaligns", [](Request& r) { r.k.t.byte_offset = 4; }, kInvalid,
       {"k.data+byte_offset=0x20000004", "16-byte aligned"}},
      {"lse misaligned", [](Request& r) { r.lse.t.data = reinterpret_cast<void*>(0x50000002); }, kInvalid,
       {"lse.data+byte_offset=0x50000002", "4-byte aligned"}},
      {"lse negative stride", [](Request& r) { r.lse.set_strides({1024, 128, -1}); }, kInvalid,
       {"lse.strides[2]=-1", "non-negative"}},

      // extents and aliasing
      {"byte extent overflows", [kTwo31](Request& r) {
         r.for_bshd([](Tensor& x) { x.shape[0] = 1; });
         r.q.shape[1] = r.out.shape[1] = kTwo31 - 1;
         r.q.set_strides({0, int64_t{1} << 38, 128, 1});
         r.lse_arg = nullptr;
       }, kInvalid, {"q.shape=(1, 2147483647, 8, 128)", "overflows 64 bits"}},
      {"out overlaps itself", [](Request& r) { r.out.set_strides({128 * 8 * 128, 8 * 128, 0, 1}); }, kInvalid,
       {"out.strides=(131072, 1024, 0, 1)", "overlap"}},
      {"lse overlaps itself", [](Request& r) { r.lse.set_strides({0, 128, 1}); }, kInvalid,
       {"lse.strides=(0, 128, 1)", "overlap"}},
      {"out is q", [](Request& r) { r.out.t.data = r.q.t.data; }, kInvalid, {"out overlaps q"}},
      {"out overlaps the end of k", [](Request& r) {
         r.out.t.data = reinterpret_cast<void*>(r.k.address() + 2 * 256 * 2 * 128 * 2 - 16);
       }, kInvalid, {"out overlaps k"}},
      {"out overlaps v through byte_offset", [](Request& r) { r.out.t.byte_offset = 0x30000000 - 0x40000000ull; },
       kInvalid, {"out overlaps v"}},
      {"out overlaps lse", [](Request& r) { r.lse.t.data = reinterpret_cast<void*>(r.out.address() + 4096); },
       kInvalid, {"out overlaps lse"}},
      {"lse overlaps v", [](Request& r) { r.lse.t.data = r.v.t.data; }, kInvalid, {"lse overlaps v"}},

      // options
      {"causal 2", [](Request& r) { r.options.causal = 2; }, kInvalid, {"options.causal=2", "0 or 1"}},
      {"negative scale", [](Request& r) { r.options.softmax_scale = -1.0f; }, kInvalid,
       {"options.softmax_scale=-1", "positive finite"}},
      {"NaN scale", [kNan](Request& r) { r.options.softmax_scale = kNan; }, kInvalid, {"options.softmax_scale=nan"}},
      {"infinite scale", [kInf](Request& r) { r.options.softmax_scale = kInf; }, kInvalid,
       {"options.softmax_scale=inf"}},
  };
}

void test_queries(const Outcome& device) {
  expect(std::string(dhp_version()) == DHP_EXPECTED_VERSION, "dhp_version() == " DHP_EXPECTED_VERSION);
  const std::string info = dhp_build_info();
  for (const char* key : {"\"version\": \"" DHP_EXPECTED_VERSION "\"", "\"cuda\": \"", "\"arch\": \"sm_90a\"",
                          "\"dtypes\": [\"bf16\", \"fp16\"]", "\"head_dims\": ["}) {
    expect(info.find(key) != std::string::npos, std::string("dhp_build_info() has ") + key + ": " + info);
  }

  int count = -1;
  expect(dhp_device_count(&count) == DHP_SUCCESS && count >= 0 && *dhp_last_error() == '\0',
         "dhp_device_count() succeeds, also without a GPU");
  expect(dhp_device_count(nullptr) == DHP_ERROR_INVALID_VALUE && std::string(dhp_last_error()).find("count") == 0,
         "dhp_device_count(NULL) names count");
  expect(dhp_get_device_info(0, nullptr) == DHP_ERROR_INVALID_VALUE &&
             std::string(dhp_last_error()).find("info is NULL") == 0,
         "dhp_get_device_info(0, NULL) names info");
  dhp_device_info info_out{};
  expect(dhp_get_device_info(count, &info_out) == DHP_ERROR_INVALID_VALUE &&
             std::string(dhp_last_error()).find("device=" + std::to_string(count)) == 0,
         "dhp_get_device_info(count) is out of range");
  if (count > 0) {
    expect(dhp_get_device_info(0, &info_out) == DHP_SUCCESS && info_out.name[0] != '\0' &&
               info_out.supported == (info_out.compute_major == 9 && info_out.compute_minor == 0),
           "dhp_get_device_info(0) fills the struct");
  }
  std::printf("devices: %d; a valid request meets: %d \"%s\"\n", count, device.status, device.needle.c_str());
}

// The last error is per thread: a failure on another thread leaves this thread's sentence alone.
void test_thread_local() {
  Request r;
  r.options.causal = 7;
  r.check();
  const std::string mine = dhp_last_error();
  std::thread([] {
    int dummy = 0;
    dhp_device_count(&dummy);
    dhp_get_device_info(-1, nullptr);
  }).join();
  expect(mine == dhp_last_error() && mine.find("options.causal=7") == 0, "dhp_last_error() is thread-local");
}

}  // namespace

int main() {
  const Outcome device = device_outcome();
  test_queries(device);
  for (const auto& c : cases()) run(c, device);
  test_thread_local();
  return report();
}
