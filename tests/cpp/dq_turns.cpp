// The backward's dQ turn orders (src/kernels/bwd_config.h) on the host, for every head_dim's configuration, with
// and without a causal mask, MHA and GQA, odd and unequal lengths: CTA x's key block and walk (bwd_key_block,
// bwd_walk_block, bwd_first_m_block; heavy first, the one-dimensional grid's TileOrder over three K/V heads), and from
// them the adders that reach each dQ tile, as the kernel's writer counts them (bwd_dq_turn). Taken in launch order,
// the adders of every tile (and chain, and half of the columns with kSplitDq pairs) must have exactly the positions
// prep's starting count (bwd_dq_first_position), +1, ... up to the chain's last adder, each once: otherwise a writer
// waits for a turn that never comes (or for a CTA launched after it: a deadlock where the grid is not all
// resident), or a part lands on another's sum, or the tile's first part is added to a sum nobody stored. The two
// CTAs of a kSplitDq pair walk the same query blocks, and the upper one's rows before its own first query block see
// none of its keys (the kernel masks them). Under a causal mask, lightest first, the launch runs BwdSplit's units:
// a split adder's halves partition its walk, its first half is launched before its second (which waits for its
// dK/dV sums), chain 1 holds the second halves from chain1_start on, and the writer's test for a chain's first part
// (first_below) agrees with prep's counters. And the sums' and counters' places in the workspace (check_layout).
// Needs no GPU.
#include <algorithm>
#include <cstdio>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/bwd_config.h"
#include "kernels/tile_order.h"

namespace {

using namespace dhp::kernels;

long failures = 0;

void expect(bool ok, const char* what, int head_dim, int seqlen_q, int seqlen_k, long long detail) {
  if (!ok && failures++ < 10)
    std::printf("%s (head_dim %d, seqlen_q %d, seqlen_k %d: %lld)\n", what, head_dim, seqlen_q, seqlen_k, detail);
}

// split_over: the split walks' threshold (BwdConfig::split_walks_over; -1: the configuration's, 1: every walk over
// half the query blocks, to check the mechanism where the configuration does not use it).
void check(int head_dim, bool causal, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int split_over) {
  const BwdConfig c = bwd_config(head_dim, causal);
  const int m_blocks = (seqlen_q + c.block_m - 1) / c.block_m;
  const int n_blocks = (seqlen_k + c.block_n - 1) / c.block_n;
  const bool paired = bwd_paired_key_blocks(head_dim, causal, seqlen_k, heads_q, heads_kv);
  const int adders = bwd_dq_adders(paired, n_blocks);
  const bool heavy_first = bwd_causal_heavy_first(head_dim, causal, heads_q, heads_kv);
  const BwdSplit split = split_over < 0 ? bwd_split(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv)
                                        : bwd_split_walks_over(split_over, head_dim, causal, seqlen_q, seqlen_k,
                                                               heads_q, heads_kv);
  const int dq_chains = bwd_dq_chains(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
  // as run_backward clips them; under a causal mask chain 1 where walks split
  const int chains = !causal ? std::min(dq_chains, adders) : split.split_from < adders ? 2 : 1;
  const bool units = causal && !heavy_first;  // the grid runs split's units
  expect(split.adders == adders && split.paired == paired, "the split's adders", head_dim, seqlen_q,
         seqlen_k, split.adders);
  expect(chains == dq_chains || !causal || split_over >= 0, "a second chain exactly where walks are split", head_dim,
         seqlen_q, seqlen_k, chains);
  // the launch's grid.x (one K/V head)
  const int ctas = units ? split.units() << int(paired) : paired ? (n_blocks + 1) / 2 * 2 : n_blocks;
  const int kv_heads = heavy_first ? 3 : 1;                      // heavy first: sections of the 1-d grid
  const bool sum_pairs = paired && c.pairs == BwdPairs::kSumDq;
  const BwdPairs pairs = paired ? c.pairs : BwdPairs::kNone;
  const int heavy_units = bwd_heavy_first_units(paired, n_blocks);  // of the 1-d grid's list
  const long long kv_head_dq_bytes = 4ll * heads_q / heads_kv * seqlen_q * head_dim;
  const TileOrder order = TileOrder::make(heavy_units, bwd_causal_section_heads(kv_heads, kv_head_dq_bytes));
  // heavy first in head halves: each half's tiles (its query heads') are a group of their own, groups 2h and 2h + 1
  const bool head_halves = bwd_heavy_first_halves(head_dim, causal, heads_q, heads_kv);
  const int groups = kv_heads * (head_halves ? 2 : 1);
  std::map<int, std::vector<std::pair<int, int>>> ring;  // heavy halves: split index -> (launch, half) of its users
  const int halves = c.dq_ctas();
  // (K/V head, chain, half, m_block) -> the positions of its adders, in launch order
  std::map<std::tuple<int, int, int, int>, std::vector<int>> positions;
  // split walks: (adder, rank) -> the launch of its first half, and the query blocks each half walked
  std::map<std::pair<int, int>, int> first_half_launch;
  std::map<std::pair<int, int>, std::vector<int>> walked;
  const int heavy_ctas = kv_heads * heavy_units * (paired ? 2 : 1) * (head_halves ? 2 : 1);
  for (int launch = 0; launch < (heavy_first ? heavy_ctas : ctas); ++launch) {
    const int x = launch;  // blockIdx.x of the 3-d grid, or heavy first of the 1-d one
    const BwdHeavyCta heavy =
        heavy_first ? bwd_heavy_first_cta(order, pairs, head_halves, n_blocks, x) : BwdHeavyCta{};
    const int kv_head = heavy.head * (head_halves ? 2 : 1) + int(heavy.half == BwdHalf::kSecond);  // its tiles' group
    if (head_halves) ring[heavy.split].emplace_back(launch, int(heavy.half));
    const int rank = paired ? x % 2 : 0;
    const BwdUnit unit = units ? split.unit(paired ? x / 2 : x) : BwdUnit{-1, BwdHalf::kWhole};
    const int n_block = heavy_first ? heavy.n_block
                        : units     ? bwd_key_block(c.pairs, n_blocks, paired ? 2 * unit.adder + rank : unit.adder)
                                    : bwd_key_block(c.pairs, n_blocks, x);
    // kSumDq: a pair's other key block outside the keys (the kernel's `absent`)
    if (n_block < 0 || (heavy_first && c.pairs != BwdPairs::kSplitDq && n_block >= n_blocks)) continue;
    // in a kSumDq pair (the kernel's `pair`): rank 1 hands its parts to rank 0, which adds them in its own turn
    const bool pair = heavy_first ? heavy.pair : sum_pairs && (rank == 1 || n_block > 0);
    const auto peer_of = [](int n, int r) { return r == 0 ? n - 1 : n + 1; };  // rank 0 is the upper key block
    if (pair) {
      const int peer = peer_of(n_block, rank);
      expect(peer >= 0 && peer < n_blocks, "a pair's other key block outside the keys", head_dim, seqlen_q, seqlen_k,
             x);
      if (heavy_first)
        expect(bwd_heavy_first_cta(order, pairs, head_halves, n_blocks, x ^ 1).n_block == peer &&
                   bwd_heavy_first_cta(order, pairs, head_halves, n_blocks, x ^ 1).pair,
               "a cluster's other CTA is not the pair's other key block", head_dim, seqlen_q, seqlen_k, x);
    }
    const int walk = pair ? std::min(n_block, peer_of(n_block, rank)) : bwd_walk_block(c.pairs, n_block);
    const int first = bwd_first_m_block(walk, c.block_m, c.block_n, seqlen_q, seqlen_k, m_blocks, causal);
    if (c.pairs == BwdPairs::kSplitDq || pair) {  // the upper key block's rows before its first see none of its keys
      if (c.pairs == BwdPairs::kSplitDq)
        expect(bwd_walk_block(c.pairs, n_block ^ 1) == walk, "the pair walks different query blocks", head_dim,
               seqlen_q, seqlen_k, x);
      const int own_first = bwd_first_m_block(n_block, c.block_m, c.block_n, seqlen_q, seqlen_k, m_blocks, causal);
      for (int m = first; m < own_first && m < m_blocks; ++m)
        expect(key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal) <= n_block,
               "a row before the key block's first query block sees its keys", head_dim, seqlen_q, seqlen_k, m);
    }
    if (pair && rank == 1) continue;
    // The kernel's walk, chain and position (attention_bwd_kernel, write_dq).
    const BwdSplit::Range steps = units ? split.walk(unit) : BwdSplit::Range{first, m_blocks};
    const int adder = units ? unit.adder : heavy_first ? heavy.adder : bwd_dq_turn(paired, n_blocks, n_block, x);
    // (the kernel's chain: a split walk's second half adds to chain 1; heavy first's head halves to chain 0)
    const BwdHalf half = heavy_first ? heavy.half : unit.half;
    const int chain = causal ? int(!heavy_first && half == BwdHalf::kSecond) : adder % chains;
    const int position = causal ? adder : adder / chains;
    if (units) {
      expect(steps.begin < steps.end || unit.half == BwdHalf::kWhole, "an empty half walk", head_dim, seqlen_q,
             seqlen_k, x);
      expect(split.first_m(unit.adder) == first, "the split's first query block", head_dim, seqlen_q, seqlen_k, x);
      if (unit.half == BwdHalf::kFirst) first_half_launch[{unit.adder, rank}] = launch;
      if (unit.half == BwdHalf::kSecond)
        expect(first_half_launch.count({unit.adder, rank}) == 1, "a second half launched before its first", head_dim,
               seqlen_q, seqlen_k, x);
      for (int m = steps.begin; m < steps.end; ++m) {
        walked[{unit.adder, rank}].push_back(m);
        const int seen = key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal);
        const int chain_first = unit.half == BwdHalf::kSecond ? split.chain1_start(m)
                                                               : bwd_dq_first_position(false, paired, n_blocks, seen);
        expect((m < split.first_below(unit.adder, unit.half)) == (chain_first == unit.adder),
               "the writer's first of a chain differs from prep's", head_dim, seqlen_q, seqlen_k, m);
      }
    }
    for (int m = steps.begin; m < steps.end; ++m)
      positions[{kv_head, chain, c.pairs == BwdPairs::kSplitDq ? rank : 0, m}].push_back(position);
    // A key block reaches every query block that sees it.
    for (int m = 0; m < m_blocks && n_block < n_blocks; ++m)
      if (key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal) > n_block)
        expect(m >= first, "a query block that sees the key block is not walked", head_dim, seqlen_q, seqlen_k, m);
  }
  // A split adder's two halves walk its query blocks once each, in order.
  for (const auto& [key, ms] : walked) {
    std::vector<int> want;
    for (int m = split.first_m(key.first); m < m_blocks; ++m) want.push_back(m);
    expect(ms == want, "a split walk's halves do not partition it", head_dim, seqlen_q, seqlen_k, key.first);
  }
  // Chain 1 holds the query blocks from chain1_first_m on, exactly those with chain 1 adders; bwd_dq_tile puts the
  // two chains' tiles of two heads at distinct indices in [0, tiles + tiles1).
  const int m1 = bwd_dq_chain1_m0(split, causal);
  if (causal)
    for (int m = 0; m < m_blocks; ++m)
      expect((split.chain1_start(m) < adders) == (m >= m1), "chain 1's first query block", head_dim, seqlen_q,
             seqlen_k, m);
  std::vector<int> seen_tiles;
  for (int bh = 0; bh < 2; ++bh)
    for (int m = 0; m < m_blocks; ++m)
      for (int chain = 0; chain < (m >= m1 ? chains : 1); ++chain)
        seen_tiles.push_back(bwd_dq_tile(chain, bh, m, m_blocks, m1, 2 * m_blocks));
  std::sort(seen_tiles.begin(), seen_tiles.end());
  const int tiles1 = chains > 1 ? 2 * (m_blocks - m1) : 0;
  expect(std::adjacent_find(seen_tiles.begin(), seen_tiles.end()) == seen_tiles.end() &&
             (seen_tiles.empty() || (seen_tiles.front() >= 0 && seen_tiles.back() < 2 * m_blocks + tiles1)),
         "dQ tiles overlap or fall outside the workspace", head_dim, seqlen_q, seqlen_k, m1);
  // The dK/dV ring of heavy first's head halves: every (unit, rank) index once, used by its first half, then by its
  // second, launched later; each slot's next user (index + an even number of slots) a later unit's first half.
  if (head_halves) {
    expect(int(ring.size()) * 2 == heavy_ctas, "head halves: split indices", head_dim, seqlen_q, seqlen_k,
           int(ring.size()));
    for (const auto& [split, users] : ring) {
      expect(split >= 0 && split < int(ring.size()) && users.size() == 2 && users[0].second == int(BwdHalf::kFirst) &&
                 users[1].second == int(BwdHalf::kSecond) && users[0].first < users[1].first,
             "head halves: a ring index not used by a first half, then its second", head_dim, seqlen_q, seqlen_k,
             split);
      const auto next = ring.find(split + 2);  // with 2 slots, the slot's next user
      if (next != ring.end()) expect(next->second[0].first > users[1].first, "head halves: a slot's next user "
                                     "launched before its last", head_dim, seqlen_q, seqlen_k, split);
    }
  }
  for (int kv_head = 0; kv_head < groups; ++kv_head)
    for (int m = 0; m < m_blocks; ++m) {
      const int seen = key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal);
      // prep's counters and the first stores' positions; the adders that never see the tile (the highest ones)
      const int first = bwd_dq_first_position(heavy_first, paired, n_blocks, seen);
      const int skipped = bwd_dq_adders_skipped(paired, n_blocks, seen);
      const int chain1 = causal ? split.chain1_start(m) : first;  // under a causal mask, chain 1's first adder
      for (int chain = 0; chain < chains; ++chain)
        for (int half = 0; half < halves; ++half) {
          const auto it = positions.find({kv_head, chain, half, m});
          const std::vector<int> got = it == positions.end() ? std::vector<int>{} : it->second;
          const int start = chain == 0 ? first : chain1;
          // Without a causal mask chain `chain` holds adders chain, chain + chains, ...; under one, chain 0 the
          // adders from the first that sees the tile up to chain 1's first, chain 1 the rest.
          // Heavy first with kSumDq pairs: the lowest 2 x kBwdHeavyUnpairedClusters key blocks add alone, the
          // others in pairs.
          const int alone = 2 * kBwdHeavyUnpairedClusters;
          const int count = seen == 0     ? 0
                            : !causal     ? (adders - chain + chains - 1) / chains
                            : heavy_first ? (c.pairs == BwdPairs::kSplitDq    ? (seen + 1) / 2
                                             : !sum_pairs || seen <= alone ? seen
                                                                           : alone + (seen - alone + 1) / 2)
                            : chain == 0  ? std::max(0, chain1 - skipped)
                                          : adders - chain1;
          expect(int(got.size()) == count, "adders of a tile", head_dim, seqlen_q, seqlen_k,
                 m * 100 + chain * 10 + half);
          // the post kernel waits for the counter to reach start + the adders it computes
          expect(bwd_dq_chain_adders(c.pairs, paired, causal, heavy_first, n_blocks, seen, chains, chain, chain1) ==
                     int(got.size()),
                 "bwd_dq_chain_adders", head_dim, seqlen_q, seqlen_k, m * 100 + chain * 10 + half);
          // prep zeroes chain 0 where it has no adder, post reads chain 1 only where it has one
          if (chain == 0 && half == 0)
            expect((seen == 0 || (causal && first >= chain1)) == got.empty(), "prep's zeroed chain 0", head_dim,
                   seqlen_q, seqlen_k, m);
          if (chain == 1 && causal)
            expect((chain1 < adders) == !got.empty(), "post's chain 1", head_dim, seqlen_q, seqlen_k, m);
          for (size_t i = 0; i < got.size() && int(got.size()) == count; ++i)
            expect(got[i] == start + int(i), "adder positions not consecutive from prep's count in launch order",
                   head_dim, seqlen_q, seqlen_k, m);
        }
    }
}

// The dQ sums' and turn counters' places in the workspace (BwdWorkspace, bwd_dq_tile), as the writer, prep and post
// kernels index them for a batch of two: every (chain, half of the columns, tile) a counter and a part of its own,
// inside the arrays the workspace holds (dq_turn's halves strided by both chains' tiles, run_backward's dq_tiles).
void check_layout(int head_dim, bool causal, int seqlen_q, int seqlen_k, int heads_q, int heads_kv) {
  const BwdConfig c = bwd_config(head_dim, causal);
  constexpr int kBatch = 2;
  const int m_blocks = (seqlen_q + c.block_m - 1) / c.block_m;
  const int n_blocks = (seqlen_k + c.block_n - 1) / c.block_n;
  const bool paired = bwd_paired_key_blocks(head_dim, causal, seqlen_k, heads_q, heads_kv);
  const BwdSplit split = bwd_split(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
  const int dq_chains = bwd_dq_chains(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
  const int chains = causal ? dq_chains : std::min(dq_chains, bwd_dq_adders(paired, n_blocks));  // run_backward's
  const int m1 = bwd_dq_chain1_m0(split, causal);
  const long long tiles = 1ll * kBatch * heads_q * m_blocks;
  const long long dq_tiles = tiles + (chains > 1 ? 1ll * kBatch * heads_q * (m_blocks - m1) : 0);
  const BwdWorkspace w = bwd_workspace(head_dim, causal, kBatch, seqlen_q, seqlen_k, heads_q, heads_kv);
  const long long tile_floats = 1ll * c.block_m * head_dim, part_floats = tile_floats / c.dq_ctas();
  std::vector<char> turn_used(size_t(c.dq_ctas() * dq_tiles), 0), part_used(size_t(dq_tiles * c.dq_ctas()), 0);
  expect(static_cast<long long>(w.dkv_partial - w.dq_turn) >= c.dq_ctas() * dq_tiles * 4,
         "dq_turn holds every counter", head_dim, seqlen_q, seqlen_k, dq_tiles);
  expect(static_cast<long long>(w.lse2 - w.dq_accum) >= dq_tiles * tile_floats * 4,
         "dq_accum holds every sum", head_dim, seqlen_q, seqlen_k, dq_tiles);
  for (int chain = 0; chain < chains; ++chain)
    for (int bh = 0; bh < kBatch * heads_q; ++bh)
      for (int m = chain ? m1 : 0; m < m_blocks; ++m)
        for (int half = 0; half < c.dq_ctas(); ++half) {
          const long long tile = bwd_dq_tile(chain, bh, m, m_blocks, m1, int(tiles));
          const long long turn = half * dq_tiles + tile;
          const long long part = (tile * tile_floats + half * part_floats) / part_floats;
          const bool inside = turn >= 0 && turn < c.dq_ctas() * dq_tiles && part >= 0 && part < dq_tiles * c.dq_ctas();
          expect(inside, "a counter or sum outside the workspace", head_dim, seqlen_q, seqlen_k, turn);
          if (!inside) continue;
          expect(!turn_used[size_t(turn)]++, "two tiles share a turn counter", head_dim, seqlen_q, seqlen_k, turn);
          expect(!part_used[size_t(part)]++, "two tiles share a dQ sum", head_dim, seqlen_q, seqlen_k, part);
        }
}

}  // namespace

int main() {
  for (int head_dim : {64, 128, 256})
    for (bool causal : {false, true})
      for (auto [seqlen_q, seqlen_k] : {std::pair{1, 1}, {64, 64}, {100, 300}, {300, 100}, {1000, 1000}, {1000, 2100},
                                        {2100, 2100}, {4096, 4096}, {4200, 4200}, {5000, 8300}, {8300, 5000},
                                        {8300, 8300}})
        for (auto [heads_q, heads_kv] : {std::pair{2, 2}, {4, 2}, {32, 8}, {16, 2}})
          for (int split_over : {-1, 1}) {
            check(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv, split_over);
            if (split_over < 0) check_layout(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
          }
  std::printf("dq_turns: %ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
