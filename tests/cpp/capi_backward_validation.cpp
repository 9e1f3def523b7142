// Every rejection path of dhp_attention_backward_check and dhp_attention_backward, and of
// dhp_attention_backward_workspace_size, on hand-built DLTensors with fake device addresses (tests/cpp/capi_test.h).
// Valid requests must get through validation to the device checks: without a GPU they fail there with
// "no CUDA device"; on an sm_90 GPU the fake workspace is then refused as not device memory (none is needed
// for an empty call, which succeeds), so nothing is ever launched.
#include <limits>
#include <string>

#include "capi_test.h"

namespace {

using namespace capi_test;

// A valid request: batch 2, seqlen_q 128, seqlen_k 256, heads_q 8, heads_kv 2 (GQA), head_dim 128, bf16.
struct Request {
  Tensor q{0x10000000, kBf16, {2, 128, 8, 128}};
  Tensor k{0x20000000, kBf16, {2, 256, 2, 128}};
  Tensor v{0x30000000, kBf16, {2, 256, 2, 128}};
  Tensor out{0x40000000, kBf16, {2, 128, 8, 128}};
  Tensor dout{0x50000000, kBf16, {2, 128, 8, 128}};
  Tensor lse{0x60000000, kFp32, {2, 8, 128}};
  Tensor dq{0x70000000, kBf16, {2, 128, 8, 128}};
  Tensor dk{0x80000000, kBf16, {2, 256, 2, 128}};
  Tensor dv{0x90000000, kBf16, {2, 256, 2, 128}};
  dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;
  void* workspace = reinterpret_cast<void*>(0xA0000000);
  size_t workspace_bytes = workspace_size(q, k, options);

  // What is passed: a case may replace any of these with NULL.
  const DLTensor *q_arg = &q.t, *k_arg = &k.t, *v_arg = &v.t, *out_arg = &out.t, *dout_arg = &dout.t,
                 *lse_arg = &lse.t;
  DLTensor *dq_arg = &dq.t, *dk_arg = &dk.t, *dv_arg = &dv.t;
  const dhp_attention_options* options_arg = &options;

  static size_t workspace_size(const Tensor& q, const Tensor& k, const dhp_attention_options& options) {
    size_t bytes = 0;
    dhp_attention_backward_workspace_size(&q.t, &k.t, &options, &bytes);
    return bytes;
  }
  void for_bshd(const std::function<void(Tensor&)>& f) {
    for (Tensor* x : {&q, &k, &v, &out, &dout, &dq, &dk, &dv}) f(*x);
  }
  void for_like_k(const std::function<void(Tensor&)>& f) {
    for (Tensor* x : {&k, &v, &dk, &dv}) f(*x);
  }
  dhp_status check() const {
    return dhp_attention_backward_check(q_arg, k_arg, v_arg, out_arg, dout_arg, lse_arg, dq_arg, dk_arg, dv_arg,
                                        options_arg, workspace, workspace_bytes);
  }
  dhp_status call() {
    return dhp_attention_backward(q_arg, k_arg, v_arg, out_arg, dout_arg, lse_arg, dq_arg, dk_arg, dv_arg,
                                  options_arg, workspace, workspace_bytes, nullptr);
  }
  std::string written() const { return snapshot({&dq, &dk, &dv}); }
  Outcome reached(const Outcome& device) const {
    if (device.status != DHP_SUCCESS || workspace_size(q, k, options) == 0) return device;
    return {DHP_ERROR_INVALID_VALUE, "workspace=0x"};  // a fake address is no device memory
  }
};

std::vector<Case<Request>> cases() {
  constexpr int kInvalid = DHP_ERROR_INVALID_VALUE, kDtype = DHP_ERROR_INVALID_DTYPE;
  const float kNan = std::numeric_limits<float>::quiet_NaN();
  const Request base;
  const size_t needed = base.workspace_bytes;
  const uintptr_t q_end = base.q.address() + base.q.bytes(), v_end = base.v.address() + base.v.bytes();
  return {
      // valid requests
      {"valid", [](Request&) {}, kReachesDevice, {}},
      {"valid fp16, head_dim 64, MHA, causal", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.t.dtype = kFp16; x.shape[3] = 64; });
         r.for_like_k([](Tensor& x) { x.shape[2] = 8; });
         r.options.causal = 1;
       }, kReachesDevice, {}},
      {"valid explicit scale", [](Request& r) { r.options.softmax_scale = 0.125f; }, kReachesDevice, {}},
      {"valid empty batch, NULL data and workspace", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.shape[0] = 0; x.t.data = nullptr; });
         r.lse.shape[0] = 0;
         r.lse.t.data = nullptr;
         r.workspace = nullptr;
         r.workspace_bytes = 0;
       }, kReachesDevice, {}},
      {"valid seqlen_q 0, NULL workspace", [](Request& r) {
         r.q.shape[1] = r.out.shape[1] = r.dout.shape[1] = r.dq.shape[1] = r.lse.shape[2] = 0;
         r.workspace = nullptr;
         r.workspace_bytes = 0;
       }, kReachesDevice, {}},
      {"valid padded dq strides", [](Request& r) { r.dq.set_strides({128 * 8 * 136, 8 * 136, 136, 1}); },
       kReachesDevice, {}},
      {"valid dout the same memory as out", [](Request& r) { r.dout.t.data = r.out.t.data; }, kReachesDevice, {}},
      {"valid workspace larger than needed", [](Request& r) { r.workspace_bytes += 4096; }, kReachesDevice, {}},
      {"valid workspace right after q", [q_end](Request& r) { r.workspace = reinterpret_cast<void*>(q_end); },
       kReachesDevice, {}},

      // null pointers
      {"q NULL", [](Request& r) { r.q_arg = nullptr; }, kInvalid, {"q is NULL"}},
      {"k NULL", [](Request& r) { r.k_arg = nullptr; }, kInvalid, {"k is NULL"}},
      {"v NULL", [](Request& r) { r.v_arg = nullptr; }, kInvalid, {"v is NULL"}},
      {"out NULL", [](Request& r) { r.out_arg = nullptr; }, kInvalid, {"out is NULL"}},
      {"dout NULL", [](Request& r) { r.dout_arg = nullptr; }, kInvalid, {"dout is NULL"}},
      {"lse NULL (required by the backward)", [](Request& r) { r.lse_arg = nullptr; }, kInvalid, {"lse is NULL"}},
      {"dq NULL", [](Request& r) { r.dq_arg = nullptr; }, kInvalid, {"dq is NULL"}},
      {"dk NULL", [](Request& r) { r.dk_arg = nullptr; }, kInvalid, {"dk is NULL"}},
      {"dv NULL", [](Request& r) { r.dv_arg = nullptr; }, kInvalid, {"dv is NULL"}},
      {"options NULL", [](Request& r) { r.options_arg = nullptr; }, kInvalid, {"options is NULL"}},
      {"dout.data NULL", [](Request& r) { r.dout.t.data = nullptr; }, kInvalid, {"dout.data is NULL"}},
      {"dk.data NULL", [](Request& r) { r.dk.t.data = nullptr; }, kInvalid, {"dk.data is NULL"}},

      // device
      {"dout on the CPU", [](Request& r) { r.dout.t.device = {kDLCPU, 0}; }, kInvalid,
       {"dout.device=cpu:0", "kDLCUDA"}},
      {"dq on another GPU", [](Request& r) { r.dq.t.device.device_id = 1; }, kInvalid,
       {"dq.device=cuda:1", "expected cuda:0, the device of q"}},
      {"dk on the CPU", [](Request& r) { r.dk.t.device = {kDLCPU, 0}; }, kInvalid, {"dk.device=cpu:0"}},
      {"dv in pinned host memory", [](Request& r) { r.dv.t.device = {kDLCUDAHost, 0}; }, kInvalid,
       {"dv.device=cuda_host:0"}},
      {"lse on another GPU", [](Request& r) { r.lse.t.device.device_id = 1; }, kInvalid, {"lse.device=cuda:1"}},
      {"dq negative device id", [](Request& r) { r.dq.t.device.device_id = -1; }, kInvalid, {"dq.device=cuda:-1"}},

      // dtype
      {"q float32", [](Request& r) { r.q.t.dtype = kFp32; }, kDtype, {"q.dtype=float32", "bfloat16 or float16"}},
      {"out float16 with q bfloat16", [](Request& r) { r.out.t.dtype = kFp16; }, kDtype, {"out.dtype=float16"}},
      {"dout float16 with q bfloat16", [](Request& r) { r.dout.t.dtype = kFp16; }, kDtype,
       {"dout.dtype=float16: expected bfloat16, the same as q"}},
      {"dq float32", [](Request& r) { r.dq.t.dtype = kFp32; }, kDtype, {"dq.dtype=float32", "the same as q"}},
      {"dk float16", [](Request& r) { r.dk.t.dtype = kFp16; }, kDtype, {"dk.dtype=float16", "the same as q"}},
      {"dv vector bf16x2", [](Request& r) { r.dv.t.dtype = {kDLBfloat, 16, 2}; }, kDtype, {"dv.dtype=bfloat16x2"}},
      {"lse bfloat16", [](Request& r) { r.lse.t.dtype = kBf16; }, kDtype, {"lse.dtype=bfloat16: expected float32"}},

      // rank and sizes
      {"dout rank 3", [](Request& r) { r.dout.set_shape({2, 128, 1024}); }, kInvalid,
       {"dout.ndim=3", "4 dimensions"}},
      {"dq rank 5", [](Request& r) { r.dq.set_shape({2, 128, 8, 128, 1}); }, kInvalid, {"dq.ndim=5"}},
      {"lse rank 2", [](Request& r) { r.lse.set_shape({16, 128}); }, kInvalid, {"lse.ndim=2", "3 dimensions"}},
      {"dv shape NULL", [](Request& r) { r.dv.t.shape = nullptr; }, kInvalid, {"dv.shape is NULL"}},
      {"dk negative size", [](Request& r) { r.dk.shape[1] = -1; }, kInvalid, {"dk.shape[1]=-1"}},

      // shape agreement: dout and dq like q, dk and dv like k, lse (batch, heads_q, seqlen_q)
      {"dout seqlen differs", [](Request& r) { r.dout.shape[1] = 64; }, kInvalid,
       {"dout.shape=(2, 64, 8, 128): expected (2, 128, 8, 128), the shape of q"}},
      {"dq shaped like k", [](Request& r) { r.dq.set_shape({2, 256, 2, 128}); }, kInvalid,
       {"dq.shape=(2, 256, 2, 128)", "the shape of q"}},
      {"dk shaped like q", [](Request& r) { r.dk.set_shape({2, 128, 8, 128}); }, kInvalid,
       {"dk.shape=(2, 128, 8, 128): expected (2, 256, 2, 128), the shape of k"}},
      {"dv head_dim differs", [](Request& r) { r.dv.shape[3] = 64; }, kInvalid, {"dv.shape=", "the shape of k"}},
      {"out heads differ", [](Request& r) { r.out.shape[2] = 4; }, kInvalid, {"out.shape=", "the shape of q"}},
      {"lse transposed", [](Request& r) { r.lse.set_shape({2, 128, 8}); }, kInvalid,
       {"lse.shape=(2, 128, 8): expected (2, 8, 128)"}},

      // supported sizes
      {"valid head_dim 256 (head_dim split between the warpgroups)", [](Request& r) {
         r.for_bshd([](Tensor& x) { x.shape[3] = 256; });
         r.workspace_bytes = Request::workspace_size(r.q, r.k, r.options);
       }, kReachesDevice, {}},
      {"head_dim 96", [](Request& r) { r.for_bshd([](Tensor& x) { x.shape[3] = 96; }); }, kInvalid,
       {"q.shape[3]=96: head_dim must be " + built_list("head_dims")}},
      {"heads_q not a multiple of heads_kv", [](Request& r) { r.for_like_k([](Tensor& x) { x.shape[2] = 3; }); },
       kInvalid, {"q.shape[2]=8", "multiple of heads_kv=3"}},
      {"seqlen_k 0", [](Request& r) { r.for_like_k([](Tensor& x) { x.shape[1] = 0; }); }, kInvalid,
       {"k.shape[1]=0: seqlen_k must be >= 1"}},

      // strides and alignment (TMA's rules)
      {"dout last dim not contiguous", [](Request& r) { r.dout.set_strides({128 * 8 * 256, 8 * 256, 256, 2}); },
       kInvalid, {"dout.strides[3]=2: the last dimension must be contiguous"}},
      {"dq head stride not a 16-byte multiple", [](Request& r) { r.dq.set_strides({128 * 1028, 1028, 100, 1}); },
       kInvalid, {"dq.strides[2]=100", "multiple of 8 elements"}},
      {"dk negative stride", [](Request& r) { r.dk.set_strides({-256 * 256, 256, 128, 1}); }, kInvalid,
       {"dk.strides[0]=-65536", "non-negative"}},
      {"dv stride 2^40 bytes", [](Request& r) { r.dv.set_strides({int64_t{1} << 39, 2 * 128, 128, 1}); }, kInvalid,
       {"dv.strides[0]=549755813888", "2^40 bytes"}},
      {"dq misaligned", [](Request& r) { r.dq.t.data = reinterpret_cast<void*>(0x70000008); }, kInvalid,
       {"dq.data+byte_offset=0x70000008", "16-byte aligned"}},
      {"dk byte_offset misaligns", [](Request& r) { r.dk.t.byte_offset = 4; }, kInvalid,
       {"dk.data+byte_offset=0x80000004", "16-byte aligned"}},
      {"dout misaligned", [](Request& r) { r.dout.t.data = reinterpret_cast<void*>(0x50000002); }, kInvalid,
       {"dout.data+byte_offset=0x50000002"}},
      {"lse misaligned", [](Request& r) { r.lse.t.data = reinterpret_cast<void*>(0x60000002); }, kInvalid,
       {"lse.data+byte_offset=0x60000002", "4-byte aligned"}},

      // aliasing: a gradient must not overlap itself, another gradient or any input
      {"dq overlaps itself", [](Request& r) { r.dq.set_strides({128 * 8 * 128, 8 * 128, 0, 1}); }, kInvalid,
       {"dq.strides=(131072, 1024, 0, 1)", "elements of dq overlap"}},
      {"dk broadcast heads (stride 0)", [](Request& r) { r.dk.set_strides({256 * 128, 128, 0, 1}); }, kInvalid,
       {"dk.strides=(32768, 128, 0, 1)", "elements of dk overlap"}},
      {"dv overlaps itself", [](Request& r) { r.dv.set_strides({256 * 2 * 128, 64, 128, 1}); }, kInvalid,
       {"dv.strides=(65536, 64, 128, 1)", "elements of dv overlap"}},
      {"dq is dk", [](Request& r) { r.dk.t.data = r.dq.t.data; }, kInvalid, {"dq overlaps dk"}},
      {"dq is q", [](Request& r) { r.dq.t.data = r.q.t.data; }, kInvalid, {"dq overlaps q"}},
      {"dq overlaps dout through byte_offset", [](Request& r) { r.dq.t.byte_offset = 0x50000000 - 0x70000000ull; },
       kInvalid, {"dq overlaps dout"}},
      {"dk overlaps the end of v", [v_end](Request& r) { r.dk.t.data = reinterpret_cast<void*>(v_end - 16); },
       kInvalid, {"dk overlaps v"}},
      {"dv overlaps lse", [](Request& r) { r.lse.t.data = reinterpret_cast<void*>(r.dv.address() + 4096); },
       kInvalid, {"dv overlaps lse"}},
      {"dv overlaps dk", [](Request& r) { r.dv.t.data = reinterpret_cast<void*>(r.dk.address() + 256); }, kInvalid,
       {"dk overlaps dv"}},

      // workspace
      {"workspace NULL", [](Request& r) { r.workspace = nullptr; }, kInvalid,
       {"workspace is NULL: expected " + std::to_string(needed) + " bytes"}},
      {"workspace NULL with 0 bytes", [](Request& r) { r.workspace = nullptr; r.workspace_bytes = 0; }, kInvalid,
       {"workspace_bytes=0: expected at least " + std::to_string(needed)}},
      {"workspace a byte too small", [](Request& r) { --r.workspace_bytes; }, kInvalid,
       {"workspace_bytes=" + std::to_string(needed - 1), "dhp_attention_backward_workspace_size"}},
      {"workspace misaligned", [](Request& r) { r.workspace = reinterpret_cast<void*>(0xA0000080); }, kInvalid,
       {"workspace=0xa0000080: expected a 256-byte aligned address"}},
      {"workspace is q", [](Request& r) { r.workspace = r.q.t.data; }, kInvalid, {"workspace overlaps q"}},
      {"workspace overlaps the end of q", [q_end](Request& r) { r.workspace = reinterpret_cast<void*>(q_end - 256); },
       kInvalid, {"workspace overlaps q"}},
      {"workspace runs into lse", [needed](Request& r) {
         r.workspace = reinterpret_cast<void*>(r.lse.address() - needed + 256);
       }, kInvalid, {"workspace overlaps lse"}},
      {"workspace inside dv", [](Request& r) { r.workspace = reinterpret_cast<void*>(r.dv.address() + 256); },
       kInvalid, {"workspace overlaps dv"}},

      // options
      {"causal 2", [](Request& r) { r.options.causal = 2; }, kInvalid, {"options.causal=2", "0 or 1"}},
      {"negative scale", [](Request& r) { r.options.softmax_scale = -1.0f; }, kInvalid,
       {"options.softmax_scale=-1", "positive finite"}},
      {"NaN scale", [kNan](Request& r) { r.options.softmax_scale = kNan; }, kInvalid, {"options.softmax_scale=nan"}},
  };
}

// dhp_attention_backward_workspace_size(q, k, options, bytes): its rejections, and the sizes it gives.
struct SizeRequest {
  Tensor q{0x10000000, kBf16, {2, 128, 8, 128}};
  Tensor k{0x20000000, kBf16, {2, 256, 2, 128}};
  dhp_attention_options options = DHP_ATTENTION_OPTIONS_DEFAULT;
  size_t bytes = 12345;  // set to 0 on failure

  const DLTensor *q_arg = &q.t, *k_arg = &k.t;
  const dhp_attention_options* options_arg = &options;
  size_t* bytes_arg = &bytes;

  dhp_status check() { return dhp_attention_backward_workspace_size(q_arg, k_arg, options_arg, bytes_arg); }
};

std::vector<Case<SizeRequest>> size_cases() {
  constexpr int kInvalid = DHP_ERROR_INVALID_VALUE, kDtype = DHP_ERROR_INVALID_DTYPE;
  return {
      {"bytes NULL", [](SizeRequest& r) { r.bytes_arg = nullptr; }, kInvalid, {"bytes is NULL"}},
      {"q NULL", [](SizeRequest& r) { r.q_arg = nullptr; }, kInvalid, {"q is NULL"}},
      {"k NULL", [](SizeRequest& r) { r.k_arg = nullptr; }, kInvalid, {"k is NULL"}},
      {"options NULL", [](SizeRequest& r) { r.options_arg = nullptr; }, kInvalid, {"options is NULL"}},
      {"q rank 3", [](SizeRequest& r) { r.q.set_shape({2, 128, 1024}); }, kInvalid, {"q.ndim=3", "4 dimensions"}},
      {"k rank 5", [](SizeRequest& r) { r.k.set_shape({2, 256, 2, 128, 1}); }, kInvalid, {"k.ndim=5"}},
      {"q shape NULL", [](SizeRequest& r) { r.q.t.shape = nullptr; }, kInvalid, {"q.shape is NULL"}},
      {"q negative size", [](SizeRequest& r) { r.q.shape[1] = -1; }, kInvalid, {"q.shape[1]=-1"}},
      {"q float32", [](SizeRequest& r) { r.q.t.dtype = kFp32; }, kDtype, {"q.dtype=float32"}},
      {"k float16 with q bfloat16", [](SizeRequest& r) { r.k.t.dtype = kFp16; }, kDtype,
       {"k.dtype=float16: expected bfloat16, the same as q"}},
      {"causal 2", [](SizeRequest& r) { r.options.causal = 2; }, kInvalid, {"options.causal=2"}},
      {"negative scale", [](SizeRequest& r) { r.options.softmax_scale = -2.0f; }, kInvalid,
       {"options.softmax_scale=-2"}},
      {"head_dim 96 (as the backward says)", [](SizeRequest& r) { r.q.shape[3] = r.k.shape[3] = 96; }, kInvalid,
       {"q.shape[3]=96: head_dim must be " + built_list("head_dims")}},
      {"batch over the grid limit", [](SizeRequest& r) { r.q.shape[0] = r.k.shape[0] = 65536; }, kInvalid,
       {"batch and heads_q must be <= 65535"}},
      {"size past 2^62 bytes", [](SizeRequest& r) {
         r.q.shape[0] = r.k.shape[0] = 65535;
         r.q.shape[2] = 65535;
         r.q.shape[1] = 2147483647;
       }, kInvalid, {"exceed 2^62 bytes"}},
  };
}

void test_workspace_size() {
  for (const auto& c : size_cases()) {
    SizeRequest r;
    c.change(r);
    const dhp_status got = r.check();
    const std::string message = dhp_last_error();
    bool ok = got == c.status && (r.bytes_arg == nullptr || r.bytes == 0);
    for (const std::string& n : c.needles) ok = ok && message.find(n) != std::string::npos;
    expect(ok, std::string("workspace_size ") + c.name + ": returned " + std::to_string(got) + " \"" + message +
                   "\", bytes " + std::to_string(r.bytes));
    if (ok) std::printf("ok   workspace_size %-37s %d \"%s\"\n", c.name, got, message.c_str());
  }

  const auto size = [](const std::function<void(SizeRequest&)>& change) {
    SizeRequest r;
    change(r);
    const dhp_status s = r.check();
    expect(s == DHP_SUCCESS && *dhp_last_error() == '\0',
           "workspace_size of a valid request succeeds: " + std::string(dhp_last_error()));
    return r.bytes;
  };
  const size_t base = size([](SizeRequest&) {});
  expect(base > 0 && base % 256 == 0, "workspace_size is a positive multiple of 256: " + std::to_string(base));
  for (const auto& [what, change] : std::vector<std::pair<const char*, std::function<void(SizeRequest&)>>>{
           {"batch", [](SizeRequest& r) { r.q.shape[0] = r.k.shape[0] = 3; }},
           {"seqlen_q", [](SizeRequest& r) { r.q.shape[1] = 1000; }},
           {"heads_q", [](SizeRequest& r) { r.q.shape[2] = 16; }},
       }) {
    const size_t grown = size(change);
    expect(grown > base && grown % 256 == 0, std::string("workspace_size grows with ") + what + ": " +
                                                 std::to_string(base) + " -> " + std::to_string(grown));
  }
  // seqlen_k and heads_kv enter only through the number of dQ chains: two for MHA without a causal mask for a range
  // of seqlen_k per head_dim (dhp_build_info's backward_two_dq_chains_min_seqlen_k, exclusive, and _max_seqlen_k:
  // 2048 and 4096 at head_dim 128), else one, as the base request (GQA) has.
  expect(size([](SizeRequest& r) { r.k.shape[1] = 16384; r.k.shape[2] = 8; }) == base,
         "workspace_size of MHA beyond the two-chain limit is the base (GQA) request's");
  expect(size([](SizeRequest& r) { r.k.shape[2] = 8; }) == base,
         "workspace_size of MHA below the two-chain range (256 keys) is the base (GQA) request's");
  const size_t two_chains = size([](SizeRequest& r) { r.k.shape[1] = 3072; r.k.shape[2] = 8; });
  expect(two_chains > base && two_chains % 256 == 0,
         "workspace_size grows with a second dQ chain (MHA, 3072 keys, no causal mask): " + std::to_string(base) +
             " -> " + std::to_string(two_chains));
  expect(size([](SizeRequest& r) { r.k.shape[1] = 3072; r.k.shape[2] = 8; r.options.causal = 1; }) == base,
         "workspace_size under a causal mask has one dQ chain");
  expect(size([](SizeRequest& r) { r.q.shape[0] = r.k.shape[0] = 0; }) == 0, "workspace_size is 0 for batch 0");
  expect(size([](SizeRequest& r) { r.q.shape[1] = 0; }) == 0, "workspace_size is 0 for seqlen_q 0");
  expect(built_list("backward_head_dims") == built_list("head_dims"),
         "dhp_build_info()'s backward_head_dims are the forward's: " + built_list("backward_head_dims"));
}

}  // namespace

int main() {
  const Outcome device = device_outcome();
  std::printf("a valid request meets: %d \"%s\"\n", device.status, device.needle.c_str());
  test_workspace_size();
  for (const auto& c : cases()) run(c, device);
  return report();
}
