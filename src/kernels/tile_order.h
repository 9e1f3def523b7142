// The forward's tile list: list position -> (head, query block). Heads are counted batch-major (batch x query
// heads) and taken in sections of `section_heads`; within a section the query blocks run from last to first
// (under a causal mask the tiles with the most key blocks first), the section's heads taking turns at each.
// With one head per section the list goes head by head. The causal backward, heavy first, lists its key blocks the
// same way (batch x K/V heads; m_block read as the key block counted from the last, so key block 0 comes first).
// Host and device: tests/cpp/tile_order.cpp checks it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/fast_div.h"

namespace dhp::kernels {

struct TileOrder {
  FastDiv by_section_tiles, by_section_heads;  // num_m_blocks x section_heads, section_heads
  int num_m_blocks;

  static TileOrder make(int num_m_blocks, int section_heads) {
    return {FastDiv::make(uint32_t(num_m_blocks) * uint32_t(section_heads)), FastDiv::make(uint32_t(section_heads)),
            num_m_blocks};
  }

  struct Position {
    int head, m_block;  // head: batch * heads_q + query head
  };
  DHP_HOST_DEVICE Position at(int t) const {
    const int section = by_section_tiles.div(t);
    const int in_section = t - section * int(by_section_tiles.d);
    const int rank = by_section_heads.div(in_section);
    const int head = section * int(by_section_heads.d) + in_section - rank * int(by_section_heads.d);
    return {head, num_m_blocks - 1 - rank};
  }
};

// The persistent grid deals the list in rounds of `grid` positions: position c of round k to CTA c, or grid - 1 - c in
// odd rounds (the snake), or to CTA (c - k) mod grid (the rotation). The work of the busiest CTA either way, for a
// list of `tiles` positions in sections of `section_heads` heads (TileOrder), a head's query blocks costing `cost` in
// list order. Host only; O(tiles).
inline long long persistent_busiest(long long tiles, int grid, const std::vector<long long>& cost, int section_heads,
                                    bool rotate) {
  std::vector<long long> load(size_t(grid), 0);
  size_t rank = 0;  // of position t's query block in its head (list order); `turn` its head within the section
  for (long long t = 0, k = 0, turn = 0; t < tiles; ++k) {
    const long long shift = rotate ? (grid - k % grid) % grid : 0;  // the rotation: position c to CTA c + shift
    for (long long c = 0; c < grid && t < tiles; ++c, ++t) {
      long long cta = rotate ? c + shift : (k % 2 == 0 ? c : grid - 1 - c);
      if (cta >= grid) cta -= grid;
      load[size_t(cta)] += cost[rank];
      if (++turn == section_heads) turn = 0, rank = rank + 1 == cost.size() ? 0 : rank + 1;
    }
  }
  long long busiest = 0;
  for (long long l : load) busiest = l > busiest ? l : busiest;
  return busiest;
}

// A head's causal tiles in list order (query blocks from the last), each costing its key blocks + 1; with split tiles
// (FwdConfig::split_tile) the last query block's, where it holds at most 64 rows, a warpgroup's share of them + 1.
// Host only.
inline std::vector<long long> causal_tile_costs(long long seqlen_q, long long seqlen_k, int block_m, int block_n,
                                                int consumers, bool split_tiles) {
  const long long m_blocks = (seqlen_q + block_m - 1) / block_m, all = (seqlen_k + block_n - 1) / block_n;
  std::vector<long long> cost(static_cast<size_t>(m_blocks), 0);
  for (long long m = 0; m < m_blocks; ++m) {
    const long long last_col = (m + 1) * block_m - 1 + seqlen_k - seqlen_q;
    const long long blocks = last_col < 0 ? 0 : last_col / block_n + 1 < all ? last_col / block_n + 1 : all;
    const bool split = split_tiles && m * block_m + 64 >= seqlen_q;
    cost[static_cast<size_t>(m_blocks - 1 - m)] = (split ? (blocks + consumers - 1) / consumers : blocks) + 1;
  }
  return cost;
}

// The causal persistent grid's list and dealing (attention_fwd.cuh, launch_forward_tier): head by head or in sections
// of `budget_heads`, in the snake or (with split tiles) rotated, whichever leaves the busiest CTA the least work and by
// kOrderGainPercent at least, else the first of those (head by head in the snake). On launches of a few rounds both
// can leave the busiest CTA far above the mean: the snake pairs a round's heavy tiles with the next round's light ones
// only where the rounds fall on like tiles, and a head's tiles span fewer rounds than it takes to even out (head_dim
// 128, one sequence of 16 heads at 4096 keys: 98 key blocks against a mean of 68). One section of every head lists
// every head's heaviest tile first, then every head's next, so a round holds tiles of about one cost and the snake
// pairs heavy rounds with light ones (68 there). It takes every head's K and V into L2 at once, so it is a candidate
// only where they fit kAllHeadsSectionBytes (`all_heads_fit`), and taken where it cuts the busiest CTA's work by
// kAllHeadsGainPercent. H100, bf16, 2026-11-27, against head by head or sections (6 rounds, alternating builds,
// bench/results/2026-11-27-h100-fwd-causal-all-heads-ab.txt): head_dim 128, one sequence of 16 heads at 4096 keys
// (32 MB of K/V) +33%, 12 heads +27%, 16 heads at 3000 +18%, three of 16 heads at 1024 +1.5%; head_dim 64, 32 heads
// at 2368 +19%, at 4096 (model: 9.9% less) +10%;
// with 48 MB, one sequence of 24 heads at 4096 +16% but two of 24 heads at 2048 -0.6% (model: 14% less); with 64 MB
// or more it lost where the model gained 3%: two sequences of 16 heads at 4096 -3.7%, GQA 32/8 -2.2%, four of 16
// heads -18%. Host only.
struct PersistentOrder {
  int section_heads;
  bool rotate;
  long long busiest;  // the busiest CTA's work (persistent_busiest)
};
constexpr int kOrderGainPercent = 2;
constexpr int kAllHeadsGainPercent = 5;
constexpr long long kAllHeadsSectionBytes = 32ll << 20;
inline PersistentOrder persistent_causal_order(long long tiles, int grid, const std::vector<long long>& cost,
                                               int budget_heads, bool all_heads_fit, bool split_tiles) {
  PersistentOrder best{1, false, -1};
  auto consider = [&](int heads, int gain_percent) {
    for (int rotate = 0; rotate <= int(split_tiles); ++rotate) {
      const long long busiest = persistent_busiest(tiles, grid, cost, heads, rotate != 0);
      if (best.busiest < 0 || busiest * 100 < best.busiest * (100 - gain_percent)) best = {heads, rotate != 0, busiest};
    }
  };
  consider(1, kOrderGainPercent);
  if (budget_heads > 1) consider(budget_heads, kOrderGainPercent);
  const long long all_heads = tiles / (long long)cost.size();
  if (all_heads_fit && all_heads > budget_heads) consider(int(all_heads), kAllHeadsGainPercent);
  return best;
}

// Whether the persistent grid keeps a causal launch of more tiles than CTAs: where the chosen order still leaves its
// busiest CTA more than kPersistentImbalancePercent above the mean, the launch takes one CTA per tile instead, as
// beyond fwd_persistent_causal_keys, and the hardware balances it. H100, bf16, 2026-11-27 (same file): head_dim 128,
// two sequences of 24 heads at 2048 keys (busiest 65 key blocks against a mean of 55) +3.3%, one of 24 heads at 4096
// (129 against 102) +15%, 40 heads at 4096 +8.4%; head_dim 64, two of 16 heads at 2120 +6.1%; head_dim 256, 24 heads
// at 1024 (192 tiles) +10%, three of 8 heads at 664 (144 tiles) even. The benchmark's shapes (within 3% of the mean)
// keep the persistent grid. Host only.
constexpr int kPersistentImbalancePercent = 15;
// Beyond fwd_persistent_causal_keys a scheduled kernel (fwd_config.h, fwd_scheduled) keeps the persistent grid only where
// its busiest CTA is this close to the mean: its overlap of a CTA's next tile with this one's end gained 1.5% where the
// snake left 3% (head_dim 64, 6144 keys) and lost 4.6-7.5% where it left 8-10% (8k, 16k; H100, bf16, 2026-11-27).
constexpr int kBeyondImbalancePercent = 2;
inline bool persistent_causal_balanced(long long busiest, long long tiles, int grid, const std::vector<long long>& cost,
                                       int imbalance_percent) {
  long long head = 0;
  for (long long c : cost) head += c;
  const long long total = head * (tiles / (long long)cost.size());
  return tiles <= grid || busiest * grid * 100 <= total * (100 + imbalance_percent);
}

// A static schedule of the persistent grid: CTA c runs the list positions tile[start[c]] .. tile[start[c + 1] - 1], in
// that order; ctas == 0: no schedule (the rounds of tile_of_round). The snake leaves the busiest CTA of the benchmark's
// causal launches about 3% above the mean (the last, partial round; 2048 tiles on 132 CTAs), list scheduling (below)
// 0.2-1%. The schedule travels in the kernel's parameters (attention_fwd.cuh, FwdScheduledParams: at most
// kScheduleTiles positions on at most kScheduleCtas CTAs, 8.7 KB), which costs the short causal launches 0.8-3% (512
// to 2048 keys, H100), so only kernels that never run below 2049 keys carry it (fwd_config.h, fwd_scheduled): head_dim 64's causal
// main and split tiers, and head_dim 128's scheduled short tier (fwd_config.h, fwd_scheduled_keys: its causal short
// tile from 2049 keys in a kernel of its own). It is taken where its busiest CTA has kScheduleGainPercent less work
// than the chosen order's and the K/V of all heads exceed kAllHeadsSectionBytes (within them, one section of every
// head measured as well or better). H100, bf16, 2026-11-27, against the snake or rotation (8 rounds, alternating builds with an A/A tree,
// bench/results/2026-11-27-h100-fwd-causal-list-schedule-ab.txt): head_dim 64, 4 x 32 heads at 4096 keys +2.1..+2.6%,
// 6 x 32 at 2368 +3.0 / +3.2%, 3 x 16 at 4096 +1.3%. Head_dim 128's causal short tier (1 to 4096 keys) with the table:
// 4096 keys +1.1..+1.5%, GQA 32/8 +2.7..+3.2%, but 512 keys -0.9% with no schedule taken there: hence its scheduled
// tier from 2049 keys.
constexpr int kScheduleTiles = 4096;
constexpr int kScheduleCtas = 256;
constexpr int kScheduleGainPercent = 1;
struct TileSchedule {
  int ctas;
  uint16_t start[kScheduleCtas + 1];
  uint16_t tile[kScheduleTiles];
};

// List scheduling of the list in sections of `section_heads` heads (TileOrder; a head's query blocks costing `cost` in
// list order): each position in turn to the CTA with the least work so far, the lowest-numbered among equals, as a
// grid of one CTA per tile hands tiles to SMs as they free up, here decided on the host from shapes alone. Writes the
// schedule (tiles <= kScheduleTiles, grid <= kScheduleCtas) and returns its busiest CTA's work. Host only; O(tiles):
// every CTA's work lies within the largest cost of the least, so the CTAs sit in a ring of that many buckets by work,
// each a bit set.
inline long long list_schedule(long long tiles, int grid, const std::vector<long long>& cost, int section_heads,
                               TileSchedule& out) {
  constexpr int kWords = (kScheduleCtas + 63) / 64;
  long long ring = 1;
  for (long long c : cost) ring = c + 1 > ring ? c + 1 : ring;
  std::vector<uint64_t> bucket(static_cast<size_t>(ring) * kWords, 0);  // bucket w % ring: the CTAs with work w
  for (int c = 0; c < grid; ++c) bucket[size_t(c / 64)] |= uint64_t{1} << (c % 64);
  std::vector<uint16_t> owner(static_cast<size_t>(tiles));
  int count[kScheduleCtas + 1] = {};
  long long least = 0, busiest = 0, at = 0;  // at: least % ring
  size_t rank = 0;                           // as in persistent_busiest
  for (long long t = 0, turn = 0; t < tiles; ++t) {
    uint64_t* ctas = &bucket[size_t(at) * kWords];
    int word = 0;
    while (word < kWords && ctas[word] == 0) ++word;
    while (word == kWords) {  // no CTA with the least work left: the next
      ++least, at = at + 1 == ring ? 0 : at + 1;
      ctas = &bucket[size_t(at) * kWords];
      for (word = 0; word < kWords && ctas[word] == 0;) ++word;
    }
    const int bit = __builtin_ctzll(ctas[word]);
    ctas[word] &= ctas[word] - 1;
    const int cta = word * 64 + bit;
    const long long work = least + cost[rank];
    const long long to = at + cost[rank] < ring ? at + cost[rank] : at + cost[rank] - ring;
    bucket[size_t(to) * kWords + size_t(word)] |= uint64_t{1} << bit;
    busiest = work > busiest ? work : busiest;
    owner[size_t(t)] = uint16_t(cta);
    ++count[cta + 1];
    if (++turn == section_heads) turn = 0, rank = rank + 1 == cost.size() ? 0 : rank + 1;
  }
  out.ctas = grid;
  for (int c = 0; c < grid; ++c) count[c + 1] += count[c];
  for (int c = 0; c <= grid; ++c) out.start[c] = uint16_t(count[c]);
  for (long long t = 0; t < tiles; ++t) out.tile[count[owner[size_t(t)]]++] = uint16_t(t);
  return busiest;
}

// On the grid of one CTA per causal tile the hardware hands tiles to SMs in list order. Head by head, the last
// head's heaviest tile starts when little else is left and runs on alone (bench/grid_model.py: 0.90-0.96 of the
// SMs' time busy at 8k keys); in sections, the list ends on the light tiles of a section's heads (0.99). The K and V of a section's heads (at most kCausalSectionBytes, else one
// head) stay in L2 while its tiles run. Measured against head by head (H100, bf16, 2026-11-26, alternating
// builds, bench/results/2026-11-26-h100-fwd-causal-sections-ab.txt) with 16 MB: 8k keys d64 +3%, d128 +6%,
// d256 +6%, GQA 32/8 +2%; 16k d64 +1%, d128 +1%, d256 even (one head per section there). 32 MB lost 2-3% against
// 16 MB at d128 8k and d256 16k; 8 MB (one d256 8k head) lost 6% at d256 8k. Taking 4k keys off the persistent
// grid as well lost (d128 -3.5%, GQA -4%).
constexpr long long kCausalSectionBytes = 16ll << 20;

// The largest divisor of n that is at most limit; at least 1.
constexpr int largest_divisor_at_most(long long n, long long limit) {
  for (long long g = limit < n ? limit : n; g > 1; --g)
    if (n % g == 0) return int(g);
  return 1;
}

// Heads per section: the largest divisor of `heads` whose K and V fit kCausalSectionBytes, counting once the
// query heads that share a K/V head; at least 1.
constexpr int fwd_section_heads(long long heads, int q_heads_per_kv, long long kv_head_bytes) {
  const long long kv_heads_fit = kCausalSectionBytes / kv_head_bytes;
  return largest_divisor_at_most(heads, (kv_heads_fit > 1 ? kv_heads_fit : 1) * q_heads_per_kv);
}

// The causal backward, heavy first (bwd_causal_heavy_first): one CTA per (key block, K/V head, batch), key block 0
// of every (batch, K/V head) of a section first, then key block 1, and so on. A list-scheduling model of the grid
// put 8-16 K/V heads per section at 0.98-0.99 of the busy time for GQA 32/8 at 4k-8k keys (head by head, lightest
// first: 0.86); 2 to 4 lost at 1k-2k. But every dQ tile of a section's query heads takes its adds (fp32 bulk reduces
// into L2) from key blocks that run up to the section's whole time apart, so the section's dQ sums must stay in L2:
// with 16 heads per section, GQA 32/8 at 4k keys (128 MB of dQ sums a section) read 1.7 TB/s from DRAM and hit L2 on
// 72% of its accesses (Nsight Compute, H100; MHA, lightest first: 92%). Heads per section: the largest divisor of the
// (batch x K/V head) count up to kBwdCausalSectionHeads whose dQ sums (fp32, seqlen_q x head_dim per query head) fit
// kBwdCausalSectionDqBytes; at least 1. Measured against 16 heads by count alone (H100, bf16, 2026-11-26, two calls,
// bench/results/2026-11-26-h100-bwd-dq-sections-ab.txt; the list order changes no bits): 64 MB gave GQA 32/8 at 4k
// +7% (L2 hits 72% -> 83%), 8k +15%, 16k +2%, head_dim 64 32/8 at 4k +3..+5%, 32/4 at 4k +2..+3%, and 32/4 at 16k (64
// MB a K/V head: one per section) -1.4%; 32 MB lost 6% at 2k (8 heads a section, where 64 MB keeps 16); at least two
// heads a section did not win that back (0.97-1.00 on the shapes it changes).
constexpr int kBwdCausalSectionHeads = 16;
constexpr long long kBwdCausalSectionDqBytes = 64ll << 20;
constexpr int bwd_causal_section_heads(long long kv_heads, long long kv_head_dq_bytes) {
  const long long fit = kBwdCausalSectionDqBytes / (kv_head_dq_bytes > 0 ? kv_head_dq_bytes : 1);
  return largest_divisor_at_most(kv_heads, fit < 1 ? 1 : fit < kBwdCausalSectionHeads ? fit : kBwdCausalSectionHeads);
}

}  // namespace dhp::kernels
