// The setmaxnreg register budget of a warp-specialized kernel, checked at compile time.
#pragma once

namespace dhp::kernels {

// Registers per thread at entry under __launch_bounds__(threads, 1): the register file (64K) over the threads,
// in the allocation unit of 8 (384 threads: 168; 512: 128).
constexpr int entry_regs(int threads) { return 65536 / threads / 8 * 8; }

// setmaxnreg moves registers within the CTA's own pool, allocated at entry (threads x entry_regs), not the SM's
// whole register file: a producer warpgroup's `dec` and the consumers' `inc` must fit in it, or the consumers'
// `inc` waits forever. (32 + 2 x 240 = 512 per lane fits 64K, but not 3 x 168 = 504: that backward hung on an H100.)
constexpr bool register_budget_fits(int consumer_warpgroups, int producer_regs, int consumer_regs) {
  const int warpgroups = 1 + consumer_warpgroups;
  return producer_regs % 8 == 0 && consumer_regs % 8 == 0 && producer_regs >= 24 && consumer_regs <= 256 &&
         producer_regs + consumer_warpgroups * consumer_regs <= warpgroups * entry_regs(128 * warpgroups);
}

}  // namespace dhp::kernels
