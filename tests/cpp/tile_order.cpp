// The forward's tile list (src/kernels/tile_order.h) on the host, as the kernel computes it: every (head, query
// block) exactly once; sections of section_heads heads in head order; within one, query blocks from last to
// first with the section's heads in turn; one head per section is the plain head-by-head list. And
// the section sizes: fwd_section_heads (the largest divisor of the head count whose K/V fit the section budget)
// and bwd_causal_section_heads (the causal backward heavy first, within its dQ budget). And the persistent grid's two
// orders under a causal mask (persistent_busiest, causal_tile_costs). Needs no GPU.
#include <cstdio>
#include <vector>

#include "kernels/tile_order.h"

namespace {

using dhp::kernels::TileOrder;

long failures = 0;

void expect(bool ok, const char* what, long long a, long long b, long long c) {
  if (!ok && failures++ < 10) std::printf("%s (%lld, %lld, %lld)\n", what, a, b, c);
}

void check_order(int heads, int m_blocks, int section_heads) {
  const TileOrder order = TileOrder::make(m_blocks, section_heads);
  std::vector<int> seen(size_t(heads) * m_blocks, 0);
  for (int t = 0; t < heads * m_blocks; ++t) {
    const TileOrder::Position p = order.at(t);
    const bool in_range = p.head >= 0 && p.head < heads && p.m_block >= 0 && p.m_block < m_blocks;
    expect(in_range, "position out of range", heads, m_blocks, t);
    if (!in_range) continue;
    ++seen[size_t(p.head) * m_blocks + p.m_block];
    const int section = t / (section_heads * m_blocks), in_section = t % (section_heads * m_blocks);
    expect(p.head == section * section_heads + in_section % section_heads, "head out of turn", heads, section_heads, t);
    expect(p.m_block == m_blocks - 1 - in_section / section_heads, "query block out of order", heads, section_heads, t);
    if (section_heads == 1)
      expect(p.head == t / m_blocks && p.m_block == m_blocks - 1 - t % m_blocks, "not head by head", heads, m_blocks, t);
  }
  for (int count : seen) expect(count == 1, "a tile not listed exactly once", heads, m_blocks, section_heads);
}

void check_section_heads(long long heads, int q_heads_per_kv, long long kv_head_bytes, int expected) {
  const int g = dhp::kernels::fwd_section_heads(heads, q_heads_per_kv, kv_head_bytes);
  expect(g == expected, "fwd_section_heads", heads, kv_head_bytes, g);
  expect(g >= 1 && heads % g == 0, "section heads must divide the heads", heads, q_heads_per_kv, g);
  const long long fit = dhp::kernels::kCausalSectionBytes / kv_head_bytes;
  const long long budget = (fit > 1 ? fit : 1) * q_heads_per_kv;
  expect(g == 1 || g <= budget, "section over the budget", heads, kv_head_bytes, g);
  for (long long larger = g + 1; larger <= heads && larger <= budget; ++larger)
    expect(heads % larger != 0, "a larger divisor fits", heads, kv_head_bytes, larger);
}

}  // namespace

int main() {
  for (int heads : {1, 2, 3, 7, 12, 40, 64})
    for (int m_blocks : {1, 2, 5, 43, 128})
      for (int section_heads = 1; section_heads <= heads; ++section_heads)
        if (heads % section_heads == 0) check_order(heads, m_blocks, section_heads);
  const long long mb = 1 << 20;
  // d64/d128/d256 at 4200 keys (K and V, bf16): 1.03, 2.05, 4.1 MB per K/V head.
  const long long kv4200[] = {4200ll * 64 * 4, 4200ll * 128 * 4, 4200ll * 256 * 4};
  // With the 16 MB budget: 15, 7 and 3 K/V heads fit.
  check_section_heads(40, 1, kv4200[0], 10);
  check_section_heads(40, 1, kv4200[1], 5);
  check_section_heads(40, 1, kv4200[2], 2);
  check_section_heads(40, 4, kv4200[2], 10);  // GQA: four query heads per K/V head
  check_section_heads(13, 1, 3 * mb, 1);     // a prime head count over the budget: head by head
  check_section_heads(13, 1, mb, 13);
  check_section_heads(8, 1, 64 * mb, 1);     // one head's K/V over the budget
  check_section_heads(8, 2, 64 * mb, 2);     // ... still shared by its two query heads
  check_section_heads(1, 1, mb, 1);
  // The backward's sections: at most 16 (batch x K/V) heads, and the dQ sums of a section within 64 MB. A K/V head's
  // dQ sums: 4 bytes x G x seqlen_q x head_dim (GQA 32/8 at 4k, head_dim 128: 8 MB).
  const long long bwd[][3] = {{1, mb, 1},       {8, mb, 8},       {16, mb, 16},      {32, mb, 16},
                              {40, mb, 10},     {13, mb, 13},     {17, mb, 1},       {64, mb, 16},
                              {32, 8 * mb, 8},  {16, 16 * mb, 4}, {8, 32 * mb, 2},   {12, 16 * mb, 4},
                              {10, 16 * mb, 2}, {8, 64 * mb, 1},  {8, 128 * mb, 1},  {64, 4 * mb, 16},
                              {4, 0, 4}};  // (no query rows: no dQ sums to bound)
  for (const auto& [kv_heads, dq_bytes, expected] : bwd)
    expect(dhp::kernels::bwd_causal_section_heads(kv_heads, dq_bytes) == expected, "bwd_causal_section_heads",
           kv_heads, expected, dhp::kernels::bwd_causal_section_heads(kv_heads, dq_bytes));
  // The persistent grid's orders: equal costs give the busiest CTA ceil(tiles / grid) of them either way; head_dim 64's
  // causal split tier (192 x 128 tiles, 3 warpgroups) at 4096 keys, whose first tile is the split one (32 key blocks,
  // 11 a warpgroup): 32 heads favour the snake (111 against 174), 128 heads and 48 heads at 2368 keys the rotation
  // (tests/test_forward.py runs the first).
  const std::vector<long long> even(5, 3);
  for (bool rotate : {false, true})
    for (long long tiles : {1ll, 131ll, 132ll, 133ll, 1000ll})
      expect(dhp::kernels::persistent_busiest(tiles, 132, even, 1, rotate) == (tiles + 131) / 132 * 3, "equal costs",
             tiles, rotate, 0);
  const std::vector<long long> d64_4096 = dhp::kernels::causal_tile_costs(4096, 4096, 192, 128, 3, true);
  expect(d64_4096.size() == 22 && d64_4096[0] == 12 && d64_4096[1] == 33 && d64_4096[21] == 3, "causal split costs",
         (long long)d64_4096.size(), d64_4096[0], d64_4096[21]);
  const long long orders[][4] = {{32, 4096, 111, 174}, {128, 4096, 407, 385}, {48, 2368, 69, 63}};
  for (const auto& [heads, seqlen, snake, rotation] : orders) {
    const std::vector<long long> cost = dhp::kernels::causal_tile_costs(seqlen, seqlen, 192, 128, 3, true);
    const long long tiles = heads * (long long)cost.size();
    expect(dhp::kernels::persistent_busiest(tiles, 132, cost, 1, false) == snake, "the snake's busiest CTA", heads, seqlen,
           dhp::kernels::persistent_busiest(tiles, 132, cost, 1, false));
    expect(dhp::kernels::persistent_busiest(tiles, 132, cost, 1, true) == rotation, "the rotation's busiest CTA", heads,
           seqlen, dhp::kernels::persistent_busiest(tiles, 132, cost, 1, true));
  }
  // The orders test_forward's test_causal_persistent_orders runs, and a few more (16 MB sections: 1 MB of K/V a head at
  // head_dim 64 and 4096 keys, 2 MB at 128; head_dim 256's persistent grid is its short tier's, 128 x 64 tiles up to
  // 1024 keys). One section of every head, where their K/V fit 32 MB and it cuts the busiest CTA's work by 5%: head_dim
  // 64, 32 heads at 4096 keys 100 key blocks against the snake's 111; 48 heads at 2368 56 against the rotation's 63;
  // head_dim 128, 16 heads at 4096 68 against 8 heads a section's 98. One CTA per tile where the busiest CTA of the
  // chosen order is 15% above the mean: head_dim 128, 24 heads at 4096 (48 MB of K/V), 129 against 101.8; head_dim 64,
  // 12 heads at 2120 (144 tiles), 18 against 10.9.
  struct OrderCase {
    long long seqlen, heads;
    int block_m, block_n, consumers, budget_heads;
    bool all_heads_fit, split;
    dhp::kernels::PersistentOrder order;  // busiest: the busiest CTA's work
    bool persistent;
  };
  const OrderCase order_cases[] = {
      // head_dim 64's split tier (192 x 128, three warpgroups)
      {4096, 32, 192, 128, 3, 16, false, true, {1, false, 111}, false},
      {4096, 32, 192, 128, 3, 16, true, true, {32, false, 100}, true},
      {4096, 12, 192, 128, 3, 12, true, true, {1, false, 37}, true},
      {2368, 48, 192, 128, 3, 16, false, true, {1, true, 63}, false},
      {2368, 48, 192, 128, 3, 16, true, true, {48, false, 56}, true},
      {2120, 96, 192, 128, 3, 24, false, true, {24, true, 100}, true},
      {2368, 16, 192, 128, 3, 16, true, true, {16, false, 19}, true},
      {2120, 12, 192, 128, 3, 12, true, true, {12, false, 18}, false},
      // head_dim 128's causal short tier (128 x 128)
      {4096, 64, 128, 128, 2, 8, false, false, {1, false, 280}, true},
      {1000, 32, 128, 128, 2, 32, true, false, {1, false, 11}, true},
      {4096, 8, 128, 128, 2, 8, true, false, {8, false, 34}, true},
      {4096, 16, 128, 128, 2, 8, true, false, {16, false, 68}, true},
      {4096, 24, 128, 128, 2, 8, false, false, {1, false, 129}, false},
      // head_dim 256's short tier (128 x 64)
      {264, 128, 128, 64, 2, 32, false, false, {1, false, 15}, true},
      {264, 144, 128, 64, 2, 48, false, false, {48, false, 17}, true},
      {520, 36, 128, 64, 2, 18, true, false, {36, false, 10}, true},
      {264, 48, 128, 64, 2, 48, true, false, {48, false, 6}, false},
      {1024, 16, 128, 64, 2, 16, true, false, {1, false, 17}, true},  // 128 tiles: one a CTA, balanced
  };
  for (const OrderCase& o : order_cases) {
    const std::vector<long long> cost =
        dhp::kernels::causal_tile_costs(o.seqlen, o.seqlen, o.block_m, o.block_n, o.consumers, o.split);
    const long long tiles = o.heads * (long long)cost.size();
    const int grid = int(tiles < 132 ? tiles : 132);
    const dhp::kernels::PersistentOrder got =
        dhp::kernels::persistent_causal_order(tiles, grid, cost, o.budget_heads, o.all_heads_fit, o.split);
    expect(got.section_heads == o.order.section_heads && got.rotate == o.order.rotate, "persistent_causal_order",
           o.seqlen, o.heads, got.section_heads * 2 + got.rotate);
    expect(got.busiest == o.order.busiest, "persistent_causal_order's busiest CTA", o.seqlen, o.heads, got.busiest);
    expect(dhp::kernels::persistent_causal_balanced(got.busiest, tiles, grid, cost,
                                                    dhp::kernels::kPersistentImbalancePercent) == o.persistent,
           "persistent_causal_balanced", o.seqlen, o.heads, o.persistent);
  }
  // The static schedule by list scheduling (list_schedule): every list position once, each CTA's in list order, the
  // busiest CTA's work as returned; on the benchmark's causal rows within 0.2-1% of the mean where the snake leaves 3%
  // (head_dim 128 at 4096 keys, 64 heads in sections of 8: 272 against 280; GQA 32/8, 128 heads in sections of 32: 545
  // against 560; head_dim 64's split tier, 128 heads in sections of 16: 376 against the rotation's 385).
  struct ScheduleCase {
    long long seqlen, heads;
    int block_m, block_n, consumers, section_heads;
    bool split;
    long long busiest;
  };
  const ScheduleCase schedule_cases[] = {{4096, 64, 128, 128, 2, 8, false, 272}, {4096, 128, 128, 128, 2, 32, false, 545},
                                         {4096, 128, 192, 128, 3, 16, true, 376}, {1000, 3, 128, 128, 2, 3, false, 9},
                                         {8192, 64, 192, 128, 3, 16, false, 716}};
  for (const ScheduleCase& o : schedule_cases) {
    const std::vector<long long> cost =
        dhp::kernels::causal_tile_costs(o.seqlen, o.seqlen, o.block_m, o.block_n, o.consumers, o.split);
    const long long tiles = o.heads * (long long)cost.size();
    const int grid = int(tiles < 132 ? tiles : 132);
    static dhp::kernels::TileSchedule schedule;
    const long long busiest = dhp::kernels::list_schedule(tiles, grid, cost, o.section_heads, schedule);
    expect(busiest == o.busiest && schedule.ctas == grid, "list_schedule's busiest CTA", o.seqlen, o.heads, busiest);
    const TileOrder order = TileOrder::make(int(cost.size()), o.section_heads);
    std::vector<int> seen(size_t(tiles), 0);
    long long most = 0;
    for (int c = 0; c < grid; ++c) {
      long long load = 0;
      for (int i = schedule.start[c]; i < schedule.start[c + 1]; ++i) {
        const int t = schedule.tile[i];
        expect(t >= 0 && t < tiles, "scheduled position out of range", o.seqlen, c, t);
        if (t < 0 || t >= tiles) continue;
        ++seen[size_t(t)];
        expect(i == schedule.start[c] || t > schedule.tile[i - 1], "a CTA's positions out of list order", o.seqlen, c, t);
        load += cost[size_t(cost.size() - 1 - order.at(t).m_block)];
      }
      most = load > most ? load : most;
    }
    expect(schedule.start[0] == 0 && schedule.start[grid] == tiles, "schedule bounds", o.seqlen, schedule.start[grid], tiles);
    expect(most == busiest, "the schedule's loads", o.seqlen, most, busiest);
    for (int count : seen) expect(count == 1, "a position not scheduled exactly once", o.seqlen, o.heads, count);
  }
  // Beyond fwd_persistent_causal_keys head_dim 64's scheduled tiers keep the persistent grid where the busiest CTA is
  // within kBeyondImbalancePercent of the mean: 2 x 32 heads at 8192 keys (16 MB sections of 8 heads), the schedule's
  // 719 against a mean of 713.7 and the snake's 773; one sequence of 48 heads at 4200, the snake's 148, the mean; 64 heads
  // at 4608, the schedule's 237 against 232.7 (the snake's 240). Not: 32 heads at 4200 (the schedule's 104 against 98.7);
  // 16 heads at 8192 (their K/V fit 32 MB: one section of all, 183 against 178.4).
  struct BeyondCase {
    long long seqlen, heads;
    int section_heads;
    bool all_heads_fit, persistent;
  };
  const BeyondCase beyond_cases[] = {{8192, 64, 8, false, true}, {4200, 48, 48, false, true}, {4608, 64, 8, false, true},
                                     {8192, 16, 16, true, false}, {4200, 32, 8, false, false}};
  for (const BeyondCase& o : beyond_cases) {
    const std::vector<long long> cost = dhp::kernels::causal_tile_costs(o.seqlen, o.seqlen, 192, 128, 3, false);
    const long long tiles = o.heads * (long long)cost.size();
    const int grid = int(tiles < 132 ? tiles : 132);
    const dhp::kernels::PersistentOrder order =
        dhp::kernels::persistent_causal_order(tiles, grid, cost, o.section_heads, o.all_heads_fit, false);
    static dhp::kernels::TileSchedule schedule;
    const long long listed = o.all_heads_fit ? order.busiest : dhp::kernels::list_schedule(tiles, grid, cost, o.section_heads, schedule);
    const long long busiest = listed < order.busiest ? listed : order.busiest;
    expect(dhp::kernels::persistent_causal_balanced(busiest, tiles, grid, cost, dhp::kernels::kBeyondImbalancePercent) ==
               o.persistent,
           "persistent beyond fwd_persistent_causal_keys", o.seqlen, o.heads, busiest);
  }
  std::printf("tile_order: %ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
