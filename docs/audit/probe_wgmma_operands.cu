// Do the tensor cores take longer on some operand values than on others? A microbenchmark for the open question
// of docs/SECURITY.md's timing test: dhp's backward runs about 1% faster on all-zero inputs with an identical
// instruction stream, and about half of that went away with the L2 reduce-adds of zeros; the tensor cores with
// zero operands are the other suspect.
//
// Each launch: 2 CTAs per SM, one warpgroup each, iterating groups of four wgmma.mma_async m64n128k16 (bf16 in,
// fp32 accumulate) on a 64 x 64 A tile and a 128 x 64 B tile in shared memory, copied in from the class's
// buffers. The classes differ only in the values: random (normal), zeros, ones, A zero with B random, and
// random with 7 of 8 values zero. Launches of all classes interleave in a random order (a GPU spin before each),
// each timed twice: CUDA events (time) and clock64 around the loop in every CTA (SM cycles, mean over CTAs).
// Cycles count the SM clock, so a class that takes fewer cycles changes the datapath's work; one that takes the
// same cycles in less time ran at a higher clock (power management, out of scope in SECURITY.md).
//
// Build and run on an sm_90a GPU, from the repository root:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Isrc docs/audit/probe_wgmma_operands.cu -o /tmp/probe
//   /tmp/probe
// It prints per class the median time and cycles, the effective clock, and Welch's t against random for both.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "hopper/tma.cuh"
#include "hopper/wgmma.cuh"

namespace {

constexpr int kN = 128;                        // wgmma m64n128k16
constexpr int kABytes = 64 * 128;              // 64 rows x 64 bf16: one 128-byte box per row
constexpr int kBBytes = kN * 128;              // 128 rows x 64 bf16
constexpr int kIters = 4096;                   // groups of four k16 steps per launch
constexpr int kCtasPerSm = 2;
constexpr int kLaunchesPerClass = 400;

__global__ void __launch_bounds__(128) probe(const uint4* a_src, const uint4* b_src, long long* cycles,
                                             float* sink) {
  __shared__ alignas(1024) uint8_t a[kABytes];
  __shared__ alignas(1024) uint8_t b[kBBytes];
  for (int i = threadIdx.x; i < kABytes / 16; i += 128) reinterpret_cast<uint4*>(a)[i] = a_src[i];
  for (int i = threadIdx.x; i < kBBytes / 16; i += 128) reinterpret_cast<uint4*>(b)[i] = b_src[i];
  dhp::hopper::fence_view_async_shared();  // generic-proxy stores before the wgmma (async proxy) reads
  __syncthreads();

  const uint32_t a_base = static_cast<uint32_t>(__cvta_generic_to_shared(a));
  const uint32_t b_base = static_cast<uint32_t>(__cvta_generic_to_shared(b));
  float acc[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) acc[i] = 0.f;
  const long long start = clock64();
  for (int it = 0; it < kIters; ++it) {
    dhp::hopper::wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // K-major A and B: +32 bytes per k16 step inside the 128-byte rows
      const uint64_t da = dhp::hopper::SmemDescriptor{a_base + k * 32, 16, 1024}.encode();
      const uint64_t db = dhp::hopper::SmemDescriptor{b_base + k * 32, 16, 1024}.encode();
      dhp::hopper::mma_ss<__nv_bfloat16, kN, 0, 0>(acc, da, db, 1);
    }
    dhp::hopper::wgmma_commit();
    dhp::hopper::wgmma_wait<1>();
  }
  dhp::hopper::wgmma_wait<0>();
  dhp::hopper::fence_registers(acc);
  const long long stop = clock64();
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) sum += acc[i];
  sink[blockIdx.x * 128 + threadIdx.x] = sum;  // keeps the accumulators (and so the wgmmas) live
  if (threadIdx.x == 0) cycles[blockIdx.x] = stop - start;
}

__global__ void spin(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

struct Class {
  std::string name;
  std::vector<__nv_bfloat16> a, b;
  uint4 *a_dev = nullptr, *b_dev = nullptr;
  std::vector<double> ms, cycles;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

double welch_t(const std::vector<double>& x, const std::vector<double>& y) {
  const auto moments = [](const std::vector<double>& v) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
    double var = 0;
    for (double e : v) var += (e - mean) * (e - mean);
    return std::pair<double, double>{mean, var / (v.size() - 1)};
  };
  const auto [mx, vx] = moments(x);
  const auto [my, vy] = moments(y);
  return (mx - my) / std::sqrt(vx / x.size() + vy / y.size());
}

#define CHECK(call)                                                                                  \
  do {                                                                                               \
    const cudaError_t e_ = (call);                                                                   \
    if (e_ != cudaSuccess) {                                                                         \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));                        \
      return 1;                                                                                      \
    }                                                                                                \
  } while (0)

}  // namespace

int main() {
  int device = 0, sms = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, device));

  std::mt19937 gen(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  const auto fill = [&](std::vector<__nv_bfloat16>& v, int bytes, const char* kind) {
    v.resize(bytes / 2);
    int i = 0;
    for (auto& e : v) {
      const std::string k = kind;
      const float x = k == "zeros" ? 0.f : k == "ones" ? 1.f : k == "sparse" && (i % 8) ? 0.f : normal(gen);
      e = __float2bfloat16(x);
      ++i;
    }
  };
  std::vector<Class> classes;
  for (const auto& [name, a_kind, b_kind] : std::vector<std::array<const char*, 3>>{
           {"random", "random", "random"}, {"zeros", "zeros", "zeros"}, {"ones", "ones", "ones"},
           {"a_zero", "zeros", "random"}, {"sparse", "sparse", "sparse"}}) {
    Class c{name};
    fill(c.a, kABytes, a_kind);
    fill(c.b, kBBytes, b_kind);
    CHECK(cudaMalloc(&c.a_dev, kABytes));
    CHECK(cudaMalloc(&c.b_dev, kBBytes));
    CHECK(cudaMemcpy(c.a_dev, c.a.data(), kABytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(c.b_dev, c.b.data(), kBBytes, cudaMemcpyHostToDevice));
    classes.push_back(std::move(c));
  }
  const int ctas = sms * kCtasPerSm;
  long long* cycles_dev = nullptr;
  float* sink = nullptr;
  CHECK(cudaMalloc(&cycles_dev, ctas * sizeof(long long)));
  CHECK(cudaMalloc(&sink, ctas * 128 * sizeof(float)));
  cudaEvent_t begin, end;
  CHECK(cudaEventCreate(&begin));
  CHECK(cudaEventCreate(&end));

  std::vector<int> order;
  for (int c = 0; c < int(classes.size()); ++c) order.insert(order.end(), kLaunchesPerClass, c);
  std::shuffle(order.begin(), order.end(), gen);
  for (int c = 0; c < int(classes.size()); ++c)  // warm-up
    probe<<<ctas, 128>>>(classes[c].a_dev, classes[c].b_dev, cycles_dev, sink);
  std::vector<long long> cycles(ctas);
  for (int c : order) {
    Class& cls = classes[c];
    spin<<<1, 1>>>(200000);
    CHECK(cudaEventRecord(begin));
    probe<<<ctas, 128>>>(cls.a_dev, cls.b_dev, cycles_dev, sink);
    CHECK(cudaEventRecord(end));
    CHECK(cudaEventSynchronize(end));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, begin, end));
    CHECK(cudaMemcpy(cycles.data(), cycles_dev, ctas * sizeof(long long), cudaMemcpyDeviceToHost));
    cls.ms.push_back(ms);
    cls.cycles.push_back(double(std::accumulate(cycles.begin(), cycles.end(), 0LL)) / ctas);
  }
  CHECK(cudaGetLastError());

  std::printf("%s, %d SMs, %d CTAs x %d groups of 4 wgmma m64n128k16 bf16, %d launches per class, random order\n",
              prop.name, sms, ctas, kIters, kLaunchesPerClass);
  std::printf("%-8s %12s %14s %10s %10s %10s\n", "class", "median ms", "median cycles", "MHz", "t(time)",
              "t(cycles)");
  const Class& base = classes[0];
  for (const Class& c : classes) {
    const double ms = median(c.ms), cyc = median(c.cycles);
    std::printf("%-8s %12.4f %14.0f %10.0f %10.2f %10.2f\n", c.name.c_str(), ms, cyc, cyc / (ms * 1e3),
                &c == &base ? 0.0 : welch_t(c.ms, base.ms), &c == &base ? 0.0 : welch_t(c.cycles, base.cycles));
  }
  return 0;
}
