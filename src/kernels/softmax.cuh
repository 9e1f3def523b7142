// Online softmax over wgmma accumulator fragments, in fp32 with exp2, branch-free.
//
// A consumer warpgroup holds a 64 x N tile; thread t (warp w = t/32, g = (t%32)/4, q = t%4) holds rows
// 16w+g and 16w+g+8 ("row halves" 0 and 1), N/4 values of each. Register i of an m64nN f32 accumulator
// sits at row half (i/2)%2, column 8*(i/4) + 2q + i%2. A row's four owners are the lanes of one quad.
//
// Rows that have seen no key yet have max = -inf. Every step that would compute -inf - (-inf) selects
// a zero shift instead, so such rows keep probabilities and sums of exactly 0 without a branch.
#pragma once

#include <cmath>

#include "hopper/math.cuh"

namespace dhp::kernels {

template <int N>
struct AccFragment {
  static constexpr int kRegs = N / 2;
  __device__ static constexpr int row_half(int i) { return (i >> 1) & 1; }
  __device__ static int col(int i, int lane) { return 8 * (i >> 2) + 2 * (lane & 3) + (i & 1); }
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Chains: a row half's maximum and sum run as this many interleaved partial results (register i of the
// fragment feeds chain (position of i within its row half) % Chains), combined by a pairwise tree, so their
// dependency chains are N/8/Chains long instead of N/8. The maximum is the same in any order; the sum's order
// is fixed by Chains (a configuration constant), so results stay deterministic. The block's sum joins the
// rescaled running sum in one fma at the end, off the chains' path.
template <int Chains>
struct OnlineSoftmax {
  static_assert(Chains >= 1 && (Chains & (Chains - 1)) == 0, "Chains: a power of two");
  float row_max[2];  // raw (unscaled) running maximum of each row half
  float row_sum[2];  // this thread's share of the running sum of exp2
  float scale_log2;  // softmax_scale * log2(e)
  float shift[2];       // this step's maximum * scale_log2 (0 for rows that saw no key yet)
  float rescale_of[2];  // this step's rescale factor of the earlier sum and output

  __device__ explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  }

  __device__ static constexpr int chain(int i) { return ((i >> 2) * 2 + (i & 1)) % Chains; }

  // Turns raw scores s (masked entries -inf) into unnormalised probabilities in place, and returns in
  // `rescale` the factor by which each row half's earlier output accumulator must be multiplied.
  template <int N>
  __device__ __forceinline__ void step(float (&s)[N / 2], float (&rescale)[2]) {
    update_max<N>(s, rescale);
    exponentiate<N>(s, true, true);
  }

  // A step in two parts: each row half's new maximum, exp2 shift and rescale factor, then the probabilities and
  // running sums of the row halves chosen (both at once, or each in a call of its own, in either order).
  template <int N>
  __device__ __forceinline__ void update_max(const float (&s)[N / 2], float (&rescale)[2]) {
    using Frag = AccFragment<N>;
    float part[2][Chains];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int c = 0; c < Chains; ++c) part[h][c] = c == 0 ? row_max[h] : -INFINITY;
#pragma unroll
    for (int i = 0; i < Frag::kRegs; ++i) {
      float& m = part[Frag::row_half(i)][chain(i)];
      m = fmaxf(m, s[i]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int w = Chains / 2; w > 0; w /= 2)
#pragma unroll
        for (int c = 0; c < w; ++c) part[h][c] = fmaxf(part[h][c], part[h][c + w]);
      const float new_max = quad_max(part[h][0]);
      shift[h] = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      rescale_of[h] = rescale[h] = hopper::exp2_approx(row_max[h] * scale_log2 - shift[h]);
      row_max[h] = new_max;
    }
  }

  template <int N>
  __device__ __forceinline__ void exponentiate(float (&s)[N / 2], bool half0, bool half1) {
    using Frag = AccFragment<N>;
    const bool chosen[2] = {half0, half1};
    float part[2][Chains];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int c = 0; c < Chains; ++c) part[h][c] = 0.f;
#pragma unroll
    for (int i = 0; i < Frag::kRegs; ++i) {
      const int h = Frag::row_half(i);
      if (!chosen[h]) continue;
      s[i] = hopper::exp2_approx(fmaf(s[i], scale_log2, -shift[h]));
      part[h][chain(i)] += s[i];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!chosen[h]) continue;
#pragma unroll
      for (int w = Chains / 2; w > 0; w /= 2)
#pragma unroll
        for (int c = 0; c < w; ++c) part[h][c] += part[h][c + w];
      row_sum[h] = fmaf(row_sum[h], rescale_of[h], part[h][0]);
    }
  }

  // Joins the softmax of the same rows over other keys (its raw running maxima and this thread's share of its
  // sums): `mine` and `theirs` are the factors that bring this side's and the other side's output onto the joint
  // maximum (O = O * mine + O_other * theirs). Joins applied in a fixed order give deterministic results (not the bits
  // of one pass over all the keys). Rows that have seen no key on either side keep a maximum of -inf and a sum of 0.
  __device__ __forceinline__ void join(const float (&other_max)[2], const float (&other_sum)[2], float (&mine)[2],
                                       float (&theirs)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float new_max = fmaxf(row_max[h], other_max[h]);
      const float joint_shift = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      mine[h] = hopper::exp2_approx(row_max[h] * scale_log2 - joint_shift);
      theirs[h] = hopper::exp2_approx(other_max[h] * scale_log2 - joint_shift);
      row_sum[h] = fmaf(other_sum[h], theirs[h], row_sum[h] * mine[h]);
      row_max[h] = new_max;
    }
  }

  // After the last step: 1/sum per row half (0 for rows that saw no key) and the natural-log LSE
  // (-inf for such rows). NaN sums stay NaN. Approximate reciprocal and log2 (one MUFU op each): IEEE
  // division and log2f branch to slow paths on inf/NaN/huge sums, a value-dependent branch.
  __device__ __forceinline__ void finish(float (&inv_sum)[2], float (&lse)[2]) {
    constexpr float kLn2 = 0.69314718055994530942f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(row_sum[h]);
      inv_sum[h] = sum == 0.f ? 0.f : hopper::rcp_approx(sum);
      lse[h] = sum == 0.f ? -INFINITY : (row_max[h] * scale_log2 + hopper::log2_approx(sum)) * kLn2;
    }
  }
};

}  // namespace dhp::kernels
