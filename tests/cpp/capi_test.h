// What the C API validation tests share: DLTensors on fake device addresses (nothing is dereferenced) and a
// runner for tables of cases. A case changes a valid request and names the status and the substrings of
// dhp_last_error() it expects; a case that stays valid (kReachesDevice) expects the device checks' verdict.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "dhp/dhp.h"

namespace capi_test {

constexpr DLDataType kBf16{kDLBfloat, 16, 1};
constexpr DLDataType kFp16{kDLFloat, 16, 1};
constexpr DLDataType kFp32{kDLFloat, 32, 1};

// A DLTensor with its own shape and stride storage (so it must not move).
struct Tensor {
  int64_t shape[5] = {};
  int64_t strides[5] = {};
  DLTensor t{};

  Tensor(uintptr_t address, DLDataType dtype, std::initializer_list<int64_t> dims) {
    t.data = reinterpret_cast<void*>(address);
    t.device = {kDLCUDA, 0};
    t.dtype = dtype;
    t.shape = shape;
    set_shape(dims);
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  void set_shape(std::initializer_list<int64_t> dims) {
    std::copy(dims.begin(), dims.end(), shape);
    t.ndim = static_cast<int32_t>(dims.size());
  }
  void set_strides(std::initializer_list<int64_t> s) {
    std::copy(s.begin(), s.end(), strides);
    t.strides = strides;
  }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(t.data); }
  // Bytes spanned by a compact tensor of this shape and dtype.
  uintptr_t bytes() const {
    int64_t n = t.dtype.bits / 8;
    for (int i = 0; i < t.ndim; ++i) n *= shape[i];
    return static_cast<uintptr_t>(n);
  }
};

// The descriptors (and shape and stride storage) of tensors, as bytes: an entry point that refuses a request
// must not have written through the DLTensor pointers it was given.
inline std::string snapshot(std::initializer_list<const Tensor*> tensors) {
  std::string bytes;
  for (const Tensor* x : tensors) bytes.append(reinterpret_cast<const char*>(x), sizeof(Tensor));
  return bytes;
}

// Stands for "valid: validation passes and the device checks decide".
constexpr int kReachesDevice = -1;

template <class Request>
struct Case {
  const char* name;
  std::function<void(Request&)> change;
  int status;
  std::vector<std::string> needles;  // substrings of dhp_last_error()
};

struct Outcome {
  dhp_status status;
  std::string needle;
};

inline int failures = 0, passes = 0;

inline void expect(bool ok, const std::string& what) {
  if (ok) {
    ++passes;
  } else {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

inline int report() {
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}

// "64, 128 or 256" from dhp_build_info()'s `key` (a JSON list of ints, e.g. "head_dims").
inline std::string built_list(const std::string& key) {
  const std::string info = dhp_build_info();
  const std::string prefix = "\"" + key + "\": [";
  const size_t begin = info.find(prefix) + prefix.size();
  std::string list = info.substr(begin, info.find(']', begin) - begin);
  const size_t last = list.rfind(", ");
  if (last != std::string::npos) list.replace(last, 2, " or ");
  return list;
}

// What a valid request meets at the device checks on this machine (before any check of the backward's workspace).
inline Outcome device_outcome() {
  int count = -1;
  if (dhp_device_count(&count) != DHP_SUCCESS || count == 0) return {DHP_ERROR_UNSUPPORTED, "no CUDA device"};
  dhp_device_info info{};
  dhp_get_device_info(0, &info);
  if (!info.supported) return {DHP_ERROR_UNSUPPORTED, "dhp needs an sm_90 GPU"};
  return {DHP_SUCCESS, ""};
}

// A Request has check() (the _check entry point), call() (the real one), written() (a snapshot of the tensors
// that call() may write) and reached(device): the outcome of a valid request, given device_outcome().
// The real entry point gets only requests that fail (nothing may launch here): it must return the same status
// and sentence as check() and leave its outputs' descriptors as they were.
template <class Request>
void run(const Case<Request>& c, const Outcome& device) {
  Request r;
  c.change(r);
  const bool valid = c.status == kReachesDevice;
  const Outcome reached = r.reached(device);
  const dhp_status want = valid ? reached.status : static_cast<dhp_status>(c.status);
  const std::vector<std::string> needles = valid ? std::vector<std::string>{reached.needle} : c.needles;

  const dhp_status got = r.check();
  const std::string message = dhp_last_error();
  bool ok = got == want;
  for (const std::string& n : needles) ok = ok && message.find(n) != std::string::npos;
  if (want == DHP_SUCCESS) ok = ok && message.empty();
  expect(ok, std::string(c.name) + ": check() returned " + std::to_string(got) + " \"" + message + "\", expected " +
                 std::to_string(want));
  if (ok) std::printf("ok   %-52s %d \"%s\"\n", c.name, got, message.c_str());

  if (want != DHP_SUCCESS) {
    const std::string before = r.written();
    const dhp_status call = r.call();
    expect(call == got && message == dhp_last_error() && before == r.written(),
           std::string(c.name) + ": the entry point returned " + std::to_string(call) + " \"" + dhp_last_error() +
               "\" or changed an output's descriptor");
  }
}

}  // namespace capi_test
