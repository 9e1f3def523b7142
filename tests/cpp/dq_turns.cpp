// The backward's dQ turn orders (src/kernels/bwd_config.h) on the host, for every head_dim's configuration, with
// and without a causal mask, MHA and GQA, odd and unequal lengths: CTA x's key block and walk (bwd_key_block,
// bwd_walk_block, bwd_first_m_block; heavy first, the one-dimensional grid's TileOrder over three K/V heads), and from
// them the adders that reach each dQ tile, as the kernel's writer counts them (bwd_dq_turn). Taken in launch order,
// the adders of every tile (and chain, and half of the columns with kSplitDq pairs) must have exactly the positions
// prep's starting count (bwd_dq_first_position), +1, ... up to the chain's last adder, each once: otherwise a writer
// waits for a turn that never comes (or for a CTA launched after it: a deadlock where the grid is not all
// resident), or a part lands on another's sum, or the tile's first part is added to a sum nobody stored. The two
// CTAs of a kSplitDq pair walk the same query blocks, and the upper one's rows before its own first query block see
// none of its keys (the kernel masks them). Needs no GPU.
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

void check(int head_dim, bool causal, int seqlen_q, int seqlen_k, int heads_q, int heads_kv) {
  const BwdConfig c = bwd_config(head_dim);
  const int m_blocks = (seqlen_q + c.block_m - 1) / c.block_m;
  const int n_blocks = (seqlen_k + c.block_n - 1) / c.block_n;
  const bool paired = bwd_paired_key_blocks(head_dim, causal, seqlen_k, heads_q, heads_kv);
  const int adders = bwd_dq_adders(paired, n_blocks);
  const int chains = causal ? 1 : std::min(bwd_dq_chains(head_dim, causal, seqlen_k, heads_q, heads_kv), adders);
  const bool heavy_first = bwd_causal_heavy_first(head_dim, causal, heads_q, heads_kv);
  const int ctas = paired ? (n_blocks + 1) / 2 * 2 : n_blocks;  // the launch's grid.x (one K/V head)
  const int kv_heads = heavy_first ? 3 : 1;                      // heavy first: sections of the 1-d grid
  const TileOrder order = TileOrder::make(n_blocks, bwd_causal_section_heads(kv_heads));
  const int halves = c.dq_ctas();
  // (K/V head, chain, half, m_block) -> the positions of its adders, in launch order
  std::map<std::tuple<int, int, int, int>, std::vector<int>> positions;
  for (int launch = 0; launch < (heavy_first ? kv_heads * n_blocks : ctas); ++launch) {
    const TileOrder::Position pos = order.at(launch);
    const int x = heavy_first ? -1 : launch, kv_head = heavy_first ? pos.head : 0;  // x: the 3-d grid's blockIdx.x
    const int n_block = heavy_first ? n_blocks - 1 - pos.m_block : bwd_key_block(c.pairs, n_blocks, x);
    const int rank = paired ? x % 2 : 0;
    if (n_block < 0) continue;                                          // kSumDq: no lower key block
    if (c.pairs == BwdPairs::kSumDq && paired && rank == 1) continue;  // it hands its parts to rank 0
    const int walk = bwd_walk_block(c.pairs, n_block);
    const int first = bwd_first_m_block(walk, c.block_m, c.block_n, seqlen_q, seqlen_k, m_blocks, causal);
    if (c.pairs == BwdPairs::kSplitDq) {
      const int peer = n_block ^ 1;
      expect(bwd_walk_block(c.pairs, peer) == walk, "the pair walks different query blocks", head_dim, seqlen_q,
             seqlen_k, x);
      const int own_first = bwd_first_m_block(n_block, c.block_m, c.block_n, seqlen_q, seqlen_k, m_blocks, causal);
      for (int m = first; m < own_first && m < m_blocks; ++m)
        expect(key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal) <= n_block,
               "a row before the key block's first query block sees its keys", head_dim, seqlen_q, seqlen_k, m);
    }
    const int turn = bwd_dq_turn(heavy_first, paired, n_blocks, n_block, x);
    for (int m = first; m < m_blocks; ++m)
      positions[{kv_head, turn % chains, c.pairs == BwdPairs::kSplitDq ? rank : 0, m}].push_back(turn / chains);
    // A key block reaches every query block that sees it.
    for (int m = 0; m < m_blocks && n_block < n_blocks; ++m)
      if (key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal) > n_block)
        expect(m >= first, "a query block that sees the key block is not walked", head_dim, seqlen_q, seqlen_k, m);
  }
  for (int kv_head = 0; kv_head < kv_heads; ++kv_head)
    for (int m = 0; m < m_blocks; ++m) {
      const int seen = key_blocks_seen(m, c.block_m, c.block_n, seqlen_q, seqlen_k, n_blocks, causal);
      // prep's counter and the first store's position; the adders that never see the tile (the highest ones)
      const int start = bwd_dq_first_position(heavy_first, paired, n_blocks, seen);
      const int skipped = bwd_dq_adders_skipped(paired, n_blocks, seen);
      for (int chain = 0; chain < chains; ++chain)
        for (int half = 0; half < halves; ++half) {
          const auto it = positions.find({kv_head, chain, half, m});
          const std::vector<int> got = it == positions.end() ? std::vector<int>{} : it->second;
          // Chain `chain` holds adders chain, chain + chains, ...; under a causal mask (one chain) all but those
          // skipped, from `start` on.
          const int count = seen == 0 ? 0 : (adders - chain + chains - 1) / chains - (causal ? skipped : 0);
          expect(int(got.size()) == count, "adders of a tile", head_dim, seqlen_q, seqlen_k,
                 m * 100 + chain * 10 + half);
          for (size_t i = 0; i < got.size() && int(got.size()) == count; ++i)
            expect(got[i] == start + int(i), "adder positions not consecutive from prep's count in launch order",
                   head_dim, seqlen_q, seqlen_k, m);
        }
    }
}

}  // namespace

int main() {
  for (int head_dim : {64, 128, 256})
    for (bool causal : {false, true})
      for (auto [seqlen_q, seqlen_k] : {std::pair{1, 1}, {64, 64}, {100, 300}, {300, 100}, {1000, 1000}, {1000, 2100},
                                        {2100, 2100}, {4096, 4096}, {4200, 4200}, {5000, 8300}, {8300, 8300}})
        for (auto [heads_q, heads_kv] : {std::pair{2, 2}, {4, 2}, {32, 8}})
          check(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
  std::printf("dq_turns: %ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
