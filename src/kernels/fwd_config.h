// Tile configuration of the forward kernel, as data: one plain struct chosen by head_dim.
#pragma once

namespace dhp::kernels {

struct FwdConfig {
  int head_dim;
  int block_m;              // query rows per CTA: 64 per consumer warpgroup
  int block_n;              // keys per pipeline stage
  int stages;               // K/V shared-memory ring depth
  int consumer_warpgroups;  // warpgroups running wgmma + softmax (a producer warpgroup comes on top)
  int producer_regs;        // setmaxnreg budget of the TMA producer warpgroup
  int consumer_regs;        // setmaxnreg budget of each consumer warpgroup
  int q_buffers;            // Q tiles in shared memory: with 2, a CTA's next tile loads while this one computes

  constexpr int threads() const { return 128 * (1 + consumer_warpgroups); }
  constexpr int tile_bytes(int rows, int elem_bytes) const { return rows * head_dim * elem_bytes; }
};

constexpr FwdConfig fwd_config(int head_dim) {
  // Per head_dim, the largest key block whose S, P and O fragments fit the consumer register budget
  // and whose K/V stages fit shared memory; head_dim 64 has cheap GEMMs next to its softmax, so a third
  // consumer warpgroup gives the tensor cores more independent work. Causal kernels (compiled apart,
  // with the mask at compile time) use the same tiles: measured on an H100 (bf16/fp16, 2026-11-25),
  // smaller causal tiles waste less work on the diagonal but lose on long sequences (d128 with 128-key
  // blocks: +8-11% at seqlen 512-1k, -2% at 8k, -7-12% at 16k; d64 with 128 query rows: +8% at 512,
  // -8% at 4k), and long sequences win the tie.
  return head_dim == 64    ? FwdConfig{64, 192, 128, 2, 3, 32, 160, 2}
         : head_dim == 128 ? FwdConfig{128, 128, 176, 2, 2, 24, 240, 1}
                           : FwdConfig{256, 128, 80, 2, 2, 24, 240, 1};
}

constexpr bool fwd_config_valid(const FwdConfig& c) {
  return c.block_m == 64 * c.consumer_warpgroups && c.block_n % 16 == 0 && c.head_dim % 64 == 0 &&
         c.stages >= 1 && c.q_buffers >= 1 && 128 * (c.producer_regs + c.consumer_warpgroups * c.consumer_regs) <= 65536;
}

static_assert(fwd_config_valid(fwd_config(64)) && fwd_config_valid(fwd_config(128)) &&
              fwd_config_valid(fwd_config(256)));

}  // namespace dhp::kernels
