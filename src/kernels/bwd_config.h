// Tile configuration of the backward kernel, as data, and the layout of its scratch memory (host and device).
#pragma once

#include <cstddef>
#include <cstdint>

#include "fast_div.h"
#include "register_budget.h"
#include "tile_order.h"

namespace dhp::kernels {

enum class BwdPairs : int { kNone, kSumDq, kSplitDq };

struct BwdConfig {
  int head_dim;
  int block_m;        // query rows per step (a CTA walks the query blocks of its key block)
  int block_n;        // keys per CTA: 64 per consumer warpgroup
  int stages;         // Q/dO shared-memory ring depth
  int dq_buffers;     // shared-memory dQ tiles between the consumers and the dQ writer
  int producer_regs;  // setmaxnreg budget of the producer warpgroup (TMA loads and the dQ writer)
  int consumer_regs;  // setmaxnreg budget of each of the two consumer warpgroups
  // false: each consumer warpgroup owns 64 of the block's keys, all head_dim columns of their dK and dV, and
  // computes S^T and dP^T of its keys for the whole query block; P^T and dS^T stay in its registers for the dV
  // and dK GEMMs. The two take turns issuing GEMMs and compute each step's dQ one step later (turns()).
  // true: the two split the products of the block's 64 keys: warpgroup 0 computes S^T, P^T and dV, warpgroup 1
  // dP^T, dS^T and dK, each over the whole query block and all of head_dim; P^T reaches warpgroup 1 through shared
  // memory, dS^T both dQ GEMMs (each half of the CTA's dQ columns), after a barrier every step.
  bool split_products;
  // Key blocks in pairs, 2-CTA clusters (bwd_paired_key_blocks):
  //   kSumDq: without a causal mask, the lower key block hands each dQ part to the upper one, which adds the sum.
  //           It needs a second dQ buffer: with one, the lower key block's push waits for the upper one's reduce.
  //   kSplitDq: always; both key blocks walk the same query blocks, each sends its dS^T to the other, and each
  //           computes dQ over the pair's keys for half of head_dim: half the dQ bytes a CTA adds per step.
  BwdPairs pairs;
  // Under a causal mask, lightest first: walks longer than this many query blocks (and than half of them) run in
  // two halves (BwdSplit); 0: never.
  int split_walks_over;
  // Under a causal mask, from this many query heads per K/V head the key blocks run heavy first
  // (bwd_causal_heavy_first); 0: never.
  int heavy_first_from;
  // Under a causal mask, heavy first (GQA): from this many query heads per K/V head, each key block's (or pair's)
  // walk runs in two halves of the group's query heads (bwd_heavy_first_halves); 0: never.
  int head_halves_from;

  static constexpr int kConsumers = 2;
  constexpr int threads() const { return 128 * (1 + kConsumers); }
  constexpr int wg_cols() const { return head_dim; }     // of a warpgroup's dK and dV (one of them when split)
  constexpr int wg_queries() const { return block_m; }  // of its S^T, dP^T
  constexpr bool turns() const { return !split_products; }
  // dQ of a step (block_m x head_dim) is split between the consumer warpgroups: by query rows when each
  // can take 64 of them, else by head_dim columns; with kSplitDq pairs, a CTA takes half the columns first.
  constexpr int dq_ctas() const { return pairs == BwdPairs::kSplitDq ? 2 : 1; }
  constexpr bool dq_split_rows() const { return block_m == 64 * kConsumers; }
  constexpr int dq_rows() const { return dq_split_rows() ? 64 : block_m; }
  // Warpgroups that compute dQ: both, or with kSplitDq pairs and turns warpgroup 0 alone, over the pair's keys.
  constexpr int dq_wgs() const { return pairs == BwdPairs::kSplitDq && turns() ? 1 : kConsumers; }
  constexpr int dq_cols() const { return dq_split_rows() ? head_dim : head_dim / dq_wgs() / dq_ctas(); }
  constexpr int dq_parts() const { return block_m * head_dim / (dq_rows() * dq_cols()); }  // of a dQ tile
};

// Per head_dim: a warpgroup keeps dK and dV of its keys in registers (wg_cols/2 + wg_cols/2 floats per thread; with
// split products one of them) next to the S^T and dP^T fragments of a step (block_m/2 each); head_dim 64 affords
// 128-row query blocks, head_dim 128 takes 64. Shared memory: K, V, a Q/dO ring, double-buffered dS^T, and dQ tiles
// (two at head_dim 128 under a causal mask; one at head_dim 64, whose 128-row tiles leave no room for a second):
// 224 KB; head_dim 128 without a mask (kSplitDq pairs) holds one 16 KB half tile, the other key block's K half (16 KB)
// and double-buffered dS^T (16 KB) instead: 226 KB of the 227. head_dim 256
// cannot keep 2 x 64 x 256 dK/dV floats per warpgroup, so its warpgroups split the products (64-key blocks: one of dK,
// dV each, 64 x 256 floats) and it has room for one Q/dO stage only (K, V 32 KB each, the pair's other K block's half
// of the columns 16 KB, Q, dO 32 KB each, dS^T, P^T and the other key block's dS^T 2 x 8 KB each, the CTA's half of a
// dQ tile 32 KB). Split products read 256 KB of wgmma operands from shared memory per 64 x 64 step where split halves
// of head_dim read 352 KB (S^T and dP^T at N = 32 fetched all of K and V in each warpgroup), and the pipe that shared
// memory and TMA share was the busiest: measured against the split halves (H100, bf16, 2026-11-26,
// bench/results/2026-11-26-h100-bwd-d256-split-products-ab.txt) +4..+9% under a causal mask, +6..+12% without. Register
// budgets: every head_dim runs 24 / 240 (head_dim 64 ran 40 / 232 while its dQ writer spilled at 24; since it compiles
// without spills, 24 / 240 measured +1..+3% without a causal mask and even under one, H100 bf16, 2026-11-26,
// bench/results/2026-11-26-h100-bwd-d64-halves-ab.txt).
// Head_dim 128 has a row per mask (the causal-only fields are 0 in the other). Without a mask its key blocks go in
// kSplitDq pairs: no fp32 dQ part crosses between the two CTAs (kSumDq's lower key block pushed 32 KB of them per step
// into the upper one, which added them; a probe without that hand-over ran +8..+14% at 2k-8k keys), each CTA adds 16 KB
// per step in its half's turn, and warpgroup 0 computes the half over the pair's 256 keys. Under a mask, split walks
// and heavy first's kSumDq pairs stay (kSplitDq pairs there lost 5-7%). Measured against kSumDq pairs with two chains
// up to 4k (bf16, 2026-11-26, bench/results/2026-11-26-bwd-d128-split-dq-ab.txt, alternating builds): H200, four
// rounds, 512 keys +5.7%, 1k +2.0%, 2k +3.7%, 4k +0.2%, 8k +3.3%, 16k +3.3%, GQA 32/8 4k +3.5%; H100, three rounds,
// 1k-2k +0.6%, 4k +5.0%, 8k +3.1%, 16k -1.6%, GQA +1.0%.
constexpr BwdConfig bwd_config(int head_dim, bool causal) {
  return head_dim == 64 ? BwdConfig{64, 128, 128, 2, 1, 24, 240, false, BwdPairs::kNone, 0, 2, 8}
         : head_dim == 128
             ? (causal ? BwdConfig{128, 64, 128, 2, 2, 24, 240, false, BwdPairs::kSumDq, 64, 2, 4}
                       : BwdConfig{128, 64, 128, 2, 1, 24, 240, false, BwdPairs::kSplitDq, 0, 0, 0})
             : BwdConfig{256, 64, 64, 1, 1, 24, 240, true, BwdPairs::kSplitDq, 0, 4, 0};
}

constexpr bool bwd_config_valid(const BwdConfig& c) {
  return c.block_n == (c.split_products ? 64 : 64 * BwdConfig::kConsumers) && c.block_m % 64 == 0 && c.wg_queries() % 16 == 0 && c.dq_buffers >= 1 && c.head_dim % 64 == 0 &&
         c.dq_rows() == 64 && c.dq_cols() % 64 == 0 &&
         c.dq_rows() * c.dq_cols() * c.dq_wgs() * c.dq_ctas() == c.block_m * c.head_dim &&
         register_budget_fits(BwdConfig::kConsumers, c.producer_regs, c.consumer_regs) &&
         (c.pairs != BwdPairs::kSumDq || c.dq_buffers >= 2) &&
         c.split_walks_over >= 0 && (c.split_walks_over == 0 || c.pairs != BwdPairs::kSplitDq) &&
         (c.heavy_first_from == 0 || c.heavy_first_from >= 2) &&
         (c.head_halves_from == 0 || (c.heavy_first_from > 0 && c.head_halves_from >= c.heavy_first_from));
}

static_assert(bwd_config_valid(bwd_config(64, false)) && bwd_config_valid(bwd_config(128, false)) &&
              bwd_config_valid(bwd_config(256, false)) && bwd_config_valid(bwd_config(64, true)) &&
              bwd_config_valid(bwd_config(128, true)) && bwd_config_valid(bwd_config(256, true)));
// What the prep and post kernels (one per head_dim, the mask a runtime flag) take from either row: the tiles' shape
// and their parts' layout.
constexpr bool bwd_masks_share_tiles(int head_dim) {
  const BwdConfig a = bwd_config(head_dim, false), b = bwd_config(head_dim, true);
  return a.block_m == b.block_m && a.block_n == b.block_n && a.dq_rows() == b.dq_rows() &&
         a.dq_cols() == b.dq_cols() && a.dq_parts() == b.dq_parts() && a.dq_split_rows() == b.dq_split_rows() &&
         a.threads() == b.threads();
}
static_assert(bwd_masks_share_tiles(64) && bwd_masks_share_tiles(128) && bwd_masks_share_tiles(256));

// Without a causal mask every key block starts on the first query block, so key block n waits for the n above it
// before its first dQ add. Two chains of dQ sums, key blocks alternating between them (each in descending order;
// the post kernel adds chain 0 + chain 1), halve that wait but double the dQ sums held in L2. Measured (H200, bf16,
// alternating builds, 2026-11-25, docs/performance.md): head_dim 64 +2% at 512 keys, +9..13% at 1k-8k, -2% at 16k;
// 128 +3..4% at 1k-2k, -2..-6% at 4k-16k (2026-11-26, same GPU: +5% at 3k, +3..4% at 4k, so 4k is in); GQA 32/8
// -3..-5% at every length (2026-11-26: -5% at d128 512 keys). Head_dim 256 had them up to 4k (+7..11%) until its
// key blocks went in kSplitDq pairs, which halve the adders per tile themselves: two chains on top measured even
// (H100, 2026-11-26: 512 keys -6%, 2k +3%, 1k and 4k within the spread), so it keeps one; head_dim 128 had them up to
// 4k with its kSumDq pairs; with its kSplitDq pairs (each half of a tile has two turn counters then), measured
// against one chain (H100, bf16, four alternating rounds, 2026-11-26, bench/results/2026-11-26-bwd-d128-split-dq-ab.txt):
// 512 keys -8.2%, 1k -4.9%, 2k -0.8%, 3k +3.9%, 4k +2.5%, so head_dim 128 takes them from 2049 keys to 4096 (the
// start-up wait grows with the adders; the second chain's L2 footprint and post-kernel reads weigh on short ones).
// Under a causal mask the descending order already keeps key blocks from waiting; there the second chain takes the
// second halves of split walks (BwdSplit, bwd_dq_chains below). The choice depends on public values only (shapes
// and options), never on the batch size, so a sequence's dQ bits do not depend on its batch.
constexpr int bwd_dq_chains_max_seqlen_k(int head_dim) {
  return head_dim == 64 ? 8192 : head_dim == 128 ? 4096 : 0;
}
constexpr int bwd_dq_chains_min_seqlen_k(int head_dim) { return head_dim == 128 ? 2048 : 0; }  // exclusive

// Key blocks in pairs (BwdConfig::pairs), a 2-CTA cluster each: blockIdx.x 2c and 2c + 1 are the key blocks
// N - 1 - 2c and the one below, N the number of key blocks (kSumDq; an odd N leaves the last pair without its lower
// one) or N rounded up to even (kSplitDq; an odd N gives the first pair an upper key block past the keys, whose
// keys are all masked and whose dK, dV are not stored). Heavy first, clusters count from key block 0 instead
// (bwd_heavy_first_cta).
//   kSumDq, without a causal mask (a configuration that has them there), except MHA problems of at most
//   bwd_unpaired_max_seqlen_k keys: the lower key block pushes its dQ part into the upper one's shared memory, which
//   adds the sum (its own part + the lower one's, in that order) to the tile's chain once: half the adders per tile
//   (half the wait at a walk's start, half the bulk reduces in L2). Measured (H100, bf16, head_dim 128 MHA, six
//   alternating rounds, 2026-11-26, docs/performance.md): with two chains too +1.6% at 2k keys, +0.9% at 3k, +1.7% at
//   4k, but -0.5% at 1k and -3% at 512; with one chain (above 4096 keys, GQA) +1..+2%; since replaced there by kSplitDq
//   pairs (bwd_config). Under a causal mask, where at least
//   kBwdCausalPairsMinGroup query heads share a K/V head (heavy first, bwd_heavy_first_cta): the two key blocks walk
//   the lower one's query blocks, the upper one's first steps masked out (its parts there are zeros). Measured (H100,
//   bf16, head_dim 128, 2026-11-26, bench/results/2026-11-26-h100-bwd-causal-pairs-ab.txt): 8 or 16 query heads per
//   K/V head +3..+30% (32/4 at 1k-16k keys +11..+24%, 64/8 at 4k +29%); on a grid of one wave (128 CTAs) -8..+4%;
//   with 4 per K/V head -7..+10% (left unpaired); MHA, lightest first, -9..-10% (left unpaired).
//   kSplitDq, always: both walk the query blocks the lower key block sees; the upper one's rows before its first
//   are masked out. Each sends its dS^T of every step into the other's shared memory and computes dQ over the
//   pair's 2 x 64 keys for its half of head_dim: each CTA adds half the dQ bytes per step (measured to be what
//   bounds head_dim 256), and each half of a tile has half the adders, in its own turn order.
// Chosen from shapes only, like the chains.
constexpr int bwd_unpaired_max_seqlen_k(int head_dim) {
  return bwd_config(head_dim, false).pairs == BwdPairs::kSumDq ? 1024 : 0;
}
// Under a causal mask, the query heads per K/V head from which key blocks pair (0: never; kSplitDq: always).
constexpr int kBwdCausalPairsMinGroup = 8;
constexpr int bwd_causal_paired_min_group(int head_dim) {
  const BwdPairs pairs = bwd_config(head_dim, true).pairs;
  return pairs == BwdPairs::kSplitDq ? 1 : pairs == BwdPairs::kSumDq ? kBwdCausalPairsMinGroup : 0;
}
constexpr bool bwd_causal_sum_pairs_heavy_first(int head_dim) {
  const BwdConfig c = bwd_config(head_dim, true);
  return c.pairs != BwdPairs::kSumDq || (c.heavy_first_from > 0 && kBwdCausalPairsMinGroup >= c.heavy_first_from);
}
static_assert(bwd_causal_sum_pairs_heavy_first(64) && bwd_causal_sum_pairs_heavy_first(128) &&
                  bwd_causal_sum_pairs_heavy_first(256),
              "causal kSumDq pairs run heavy first (bwd_heavy_first_cta maps them)");
constexpr bool bwd_paired_key_blocks(int head_dim, bool causal, int seqlen_k, int heads_q, int heads_kv) {
  const BwdPairs pairs = bwd_config(head_dim, causal).pairs;
  if (causal) return pairs != BwdPairs::kNone && heads_q >= bwd_causal_paired_min_group(head_dim) * heads_kv;
  return pairs == BwdPairs::kSplitDq ||
         (pairs == BwdPairs::kSumDq && (heads_q != heads_kv || seqlen_k > bwd_unpaired_max_seqlen_k(head_dim)));
}
// The dQ adders of a tile (of each half with kSplitDq): one per pair of key blocks, or per key block.
constexpr int bwd_dq_adders(bool paired, int n_blocks) { return paired ? (n_blocks + 1) / 2 : n_blocks; }
// The adders, counted from the highest, that never add to a tile whose rows see key blocks [0, seen). (Lightest
// first, only kSplitDq pairs run under a causal mask, where seen < N; their pairs count from N rounded up to even.)
DHP_HOST_DEVICE constexpr int bwd_dq_adders_skipped(bool paired, int n_blocks, int seen) {
  return paired ? ((n_blocks + 1) / 2 * 2 - seen) / 2 : n_blocks - seen;
}

// Under a causal mask, the order in which a head's key blocks run and add their dQ parts (attention_bwd.cuh, file
// comment): lightest first by default; heavy first from BwdConfig::heavy_first_from query heads per K/V head (GQA),
// where a key block walks several query heads, so its CTA runs G times a head's steps and the lightest-first grid
// would end on the heaviest CTAs. Measured on the H100 (bf16, 2026-11-26, alternating builds): heavy first for every
// problem gave GQA 32/8 at 4k keys +6%, but MHA -3..-18% (its key blocks then add to the same tile one after another);
// for GQA only, head_dim 128 32/8 causal 1k-16k +3..+9%, 32/4 at 4k +13%, head_dim 64 32/8 at 4k +4%. Head_dim 256,
// whose key blocks run in kSplitDq pairs (2026-11-26, one build, the order switched per call, three rounds): MHA
// -10..-16% at 1k-16k keys (sections of 1, 2, 4 or 16 heads alike; Nsight Compute at 4k: the same L2 hit rate, 92%,
// the schedulers idle 82% of the time against 78%: waits, not memory), GQA 8/4 at 4k -7%, but 8/2 +3% at 1k, +7% at
// 4k, +12% at 16k and MQA 8/1 at 4k +22%: head_dim 256 from 4. Chosen from shapes only. The measurements:
//   bench/results/2026-11-26-h100-bwd-causal-heavy-first-ab.txt
//   bench/results/2026-11-26-h100-bwd-gqa-causal-heavy-first-ab.txt
//   bench/results/2026-11-26-h100-bwd-d256-heavy-first-ab.txt
constexpr int bwd_causal_heavy_first_min_group(int head_dim) { return bwd_config(head_dim, true).heavy_first_from; }
constexpr bool bwd_causal_heavy_first(int head_dim, bool causal, int heads_q, int heads_kv) {
  const int from = bwd_causal_heavy_first_min_group(head_dim);
  return causal && from > 0 && heads_q >= int64_t(from) * heads_kv;
}

// A CTA's turn in the chains of the tiles it adds to (turn % chains: its chain; turn / chains: its position there):
// key blocks, or pairs (x / 2, x the CTA's index among its head's), counted from the highest; heavy first, counted
// from the lowest (bwd_heavy_first_cta: the key blocks that see a tile are always the lowest ones). Under a causal
// mask with split walks (BwdSplit, below) the position is the unit's adder and the chain its half's.
DHP_HOST_DEVICE constexpr int bwd_dq_turn(bool paired, int n_blocks, int n_block, int x) {
  return paired ? x / 2 : n_blocks - 1 - n_block;
}
// The position of a tile's first adder, which stores its part (no zeros to add to), and the turn counter's start
// (the prep kernel): the adders skipped before it.
DHP_HOST_DEVICE constexpr int bwd_dq_first_position(bool heavy_first, bool paired, int n_blocks, int seen) {
  return heavy_first ? 0 : bwd_dq_adders_skipped(paired, n_blocks, seen);
}

// Which rows see which keys, and which key blocks a CTA and its pair walk: the kernels' index arithmetic, host and
// device (tests/cpp/dq_turns.cpp checks the turn orders it implies on the host).

// Key blocks [0, n) see some row of query block m_block, the others none (causal: row r sees the keys up to
// r + seqlen_k - seqlen_q).
DHP_HOST_DEVICE int key_blocks_seen(int m_block, int block_m, int block_n, int seqlen_q, int seqlen_k, int n_blocks,
                                    bool causal) {
  if (!causal) return n_blocks;
  const int64_t end = int64_t(m_block + 1) * block_m;
  const int64_t keys = (end < seqlen_q ? end : int64_t(seqlen_q)) + seqlen_k - seqlen_q;
  const int64_t blocks = (keys + block_n - 1) / block_n;
  const int64_t capped = blocks < n_blocks ? blocks : int64_t(n_blocks);
  return int(capped > 0 ? capped : 0);
}

// The first query block whose rows see key block n_block (m_blocks: none).
DHP_HOST_DEVICE int bwd_first_m_block(int n_block, int block_m, int block_n, int seqlen_q, int seqlen_k, int m_blocks,
                                      bool causal) {
  if (!causal) return 0;
  const int64_t first_row = int64_t(n_block) * block_n - (seqlen_k - seqlen_q);
  if (first_row <= 0) return 0;
  return first_row >= seqlen_q ? m_blocks : int(first_row / block_m);
}

// The key block of the CTA with blockIdx.x = x: counted from the last, with kSplitDq pairs from the last of an even
// number (n_blocks for an odd n_blocks: all its keys past seqlen_k). Negative for kSumDq's missing lower key block.
DHP_HOST_DEVICE int bwd_key_block(BwdPairs pairs, int n_blocks, int x) {
  return (pairs == BwdPairs::kSplitDq ? (n_blocks + 1) / 2 * 2 : n_blocks) - 1 - x;
}

// The key block whose query blocks a CTA walks: its own, or with kSplitDq pairs the pair's lower (even) one.
DHP_HOST_DEVICE int bwd_walk_block(BwdPairs pairs, int n_block) {
  return pairs == BwdPairs::kSplitDq ? n_block & ~1 : n_block;
}

// A walk in two halves (split walks, heavy-first head halves), or whole.
enum class BwdHalf : int { kWhole, kFirst, kSecond };

// Heavy first (bwd_causal_heavy_first), the one-dimensional grid, over list units: key blocks, or (with pairs,
// bwd_paired_key_blocks) 2-CTA clusters; with head halves (bwd_heavy_first_halves) each unit runs twice, its first
// half of the group's query heads, then its second. Unit u = order.at(u) over (batch x K/V head, unit counted from the
// highest). With pairs, cluster k counted from the lowest of ceil(N / 2): below kBwdHeavyUnpairedClusters it holds key
// blocks 2k (rank 0) and 2k + 1 (rank 1), each adding alone: the longest walks, which bound a grid of one wave, where a
// pair's hand-over costs it ~10% (measured: 8 query heads per K/V head, 128 CTAs, -7..-13% with every key block
// paired). The others hold kSumDq pairs, 2k + 1 (rank 0, the upper) and 2k (rank 1, which hands its parts over), both
// walking from 2k's first query block. A key block past the keys (the last cluster of an odd N) exits. Adders count
// from the lowest: key blocks 0 .. 2U - 1 alone, then one per pair. kSplitDq pairs (head_dim 256) are always pairs:
// cluster k holds key blocks 2k + 1 (rank 0; past the keys for the last cluster of an odd N, which still computes its
// half of the pair's dQ columns) and 2k (rank 1), adder k.
constexpr int kBwdHeavyUnpairedClusters = 2;
struct BwdHeavyCta {
  int head, n_block, adder;
  bool pair;     // hands its parts over (rank 1) or adds them summed with the other's (rank 0)
  BwdHalf half;  // of the group's query heads
  int split;     // with halves: the (unit, rank) in launch order, whose halves share a slot of the dK/dV ring
};
DHP_HOST_DEVICE int bwd_heavy_first_clusters(int n_blocks) { return (n_blocks + 1) / 2; }
DHP_HOST_DEVICE BwdHeavyCta bwd_heavy_first_cta(const TileOrder& order, BwdPairs pairs, bool halves, int n_blocks,
                                                int x) {
  const bool paired = pairs != BwdPairs::kNone;
  const int rank = paired ? x % 2 : 0, unit_ctas = paired ? 2 : 1;
  const int y = x / unit_ctas;  // the cluster (or CTA) in launch order
  const int u = halves ? y / 2 : y;
  const BwdHalf half = !halves ? BwdHalf::kWhole : y % 2 ? BwdHalf::kSecond : BwdHalf::kFirst;
  const int split = u * unit_ctas + rank;
  const TileOrder::Position pos = order.at(u);
  if (!paired) {
    const int n_block = n_blocks - 1 - pos.m_block;
    return {pos.head, n_block, n_block, false, half, split};
  }
  const int k = bwd_heavy_first_clusters(n_blocks) - 1 - pos.m_block;
  if (pairs == BwdPairs::kSplitDq) return {pos.head, 2 * k + 1 - rank, k, false, half, split};
  constexpr int kU = kBwdHeavyUnpairedClusters;
  if (k < kU) return {pos.head, 2 * k + rank, 2 * k + rank, false, half, split};
  const int n_block = 2 * k + 1 - rank;
  return {pos.head, n_block, kU + k, 2 * k + 1 < n_blocks, half, split};
}
// The list units of one (batch, K/V head), heavy first.
DHP_HOST_DEVICE int bwd_heavy_first_units(bool paired, int n_blocks) {
  return paired ? bwd_heavy_first_clusters(n_blocks) : n_blocks;
}

// The adders of one chain of a dQ tile (of each half with kSplitDq pairs) whose rows see key blocks [0, seen): its turn
// counter runs from prep's start (bwd_dq_first_position; chain 1 under a causal mask: BwdSplit::chain1_start) up by
// this many, and the post kernel waits for the end. Without a causal mask chain c of `chains` holds adders c,
// c + chains, ...; heavy first, the lowest 2 x kBwdHeavyUnpairedClusters key blocks add alone and the others in kSumDq
// pairs (kSplitDq: every pair adds once); lightest first, chain 0 the adders from the first that sees the tile up to
// chain 1's first, chain 1 the rest. tests/cpp/dq_turns.cpp checks it against the adders the CTAs' walks give.
DHP_HOST_DEVICE int bwd_dq_chain_adders(BwdPairs pairs, bool paired, bool causal, bool heavy_first, int n_blocks,
                                        int seen, int chains, int chain, int chain1_start) {
  const int adders = paired ? (n_blocks + 1) / 2 : n_blocks;
  constexpr int kAlone = 2 * kBwdHeavyUnpairedClusters;
  if (seen == 0) return 0;
  if (!causal) return (adders - chain + chains - 1) / chains;
  if (heavy_first) {
    if (pairs == BwdPairs::kSplitDq) return (seen + 1) / 2;
    return !paired || seen <= kAlone ? seen : kAlone + (seen - kAlone + 1) / 2;
  }
  const int skipped = bwd_dq_adders_skipped(paired, n_blocks, seen);
  return chain == 0 ? (chain1_start > skipped ? chain1_start - skipped : 0) : adders - chain1_start;
}

// Heavy first in head halves, from BwdConfig::head_halves_from query heads per K/V head: a unit's walk over its group's
// G query heads runs as two launches, one after the other, the first over heads [0, G / 2), the second over [G / 2, G),
// both over the same query blocks (from the last down). Every dQ tile belongs to one query head, so its adders and
// their turns stay as they were; the first half hands its dK and dV sums to the second through the split walks' ring of
// slots (bwd_dkv_slots), which adds them to its own once at the end: the same order on every run. A unit's heaviest
// walk is halved, so a grid of few units (few K/V heads) ends sooner. Measured (H100, bf16, 2026-11-26):
// - head_dim 128 (bench/results/2026-11-26-h100-bwd-causal-pairs-ab.txt, sections 10-11): grids of one wave (128
//   CTAs) 8/1 at 4k keys +48%, at 1k +20%, 16/1 at 8k +59%, 4/1 at 4k +60%; with 8 or more per K/V head, grids of
//   several waves -1..+1% (32/4, 64/8). With 4 per K/V head, grids of several waves lost 5-12% at 4k (32/8, 16/4,
//   64/16) while sections of up to 16 K/V heads let the dQ sums leave L2; with sections sized by their dQ sums
//   (tile_order.h) they gain (bench/results/2026-11-26-h100-bwd-g4-halves-ab.txt, three rounds): 32/8 at 4k +2%, 8k
//   +3%, 16k +3%, 1k-2k -0.5..-1.3%, 64/16 and 16/4 at 4k +1%, 64/16 at 16k +3%, 4/1 at 4k (one wave) +56%; with 2
//   (4/2) -5% at 4k: head_dim 128 halves from 4.
// - head_dim 64 (bench/results/2026-11-26-h100-bwd-d64-halves-ab.txt, three alternating rounds): 16/1 at 4k +54% (one
//   wave; 287 -> 434 TFLOP/s, cuDNN 352), at 1k +25%, 32/4 at 4k +8%, at 16k +10%; MHA and 32/8 (whole groups) even.
//   From 4 (same file as head_dim 128's): 32/8 at 4k -11%, 16k +2%: head_dim 64 halves from 8.
// The choice cannot look at the batch (it decides how many waves; a sequence's dK/dV bits would then depend on it), so
// smaller groups stay whole, and a one-wave grid of them stays that slow. Chosen from shapes only.
constexpr int bwd_causal_head_halves_min_group(int head_dim) { return bwd_config(head_dim, true).head_halves_from; }
constexpr bool bwd_heavy_first_halves(int head_dim, bool causal, int heads_q, int heads_kv) {
  const int from = bwd_config(head_dim, true).head_halves_from;
  return from > 0 && bwd_causal_heavy_first(head_dim, causal, heads_q, heads_kv) && heads_q >= from * heads_kv;
}

// Split walks. Under a causal mask, lightest first, key block 0 (or pair 0) walks every query block, and the grid ends
// on such CTAs: list scheduling leaves about 7% of the SMs' time idle at head_dim 128 (bench/grid_model.py). So the
// adders (key blocks, or pairs) whose walk is longer than half the query blocks run as two CTAs (or clusters), launched
// one after the other: the first half walks [first, mid), the second [mid, m_blocks). The first half's dQ parts stay in
// chain 0 with the unsplit adders, the second halves' go to chain 1, both in descending key-block order (adder c
// counted from the highest, the position in either chain), and since mid falls as c grows, each chain's adders at a
// query block are a contiguous range: chain 0 [bwd_dq_adders_skipped(seen), chain1_start(m)), chain 1
// [chain1_start(m), adders). Both chains therefore advance as today's single one does, without waits: adder c + 1's
// half reaches a query block after adder c's. The first half hands its dK and dV sums (fp32) to the second through
// the workspace (a ring of slots, bwd_split_slots), which adds them to its own once at the end: the same order on
// every run.

struct BwdUnit {
  int adder;     // counted from the highest key block (or pair): the dQ chains' position
  BwdHalf half;  // of its walk
};

// One (batch, K/V head)'s adders under a causal mask, lightest first. Host and device.
struct BwdSplit {
  int block_m, block_n, seqlen_q, seqlen_k, m_blocks, n_blocks;
  bool paired;     // an adder is a pair of key blocks, a 2-CTA cluster (kSplitDq; never split; heavy-first kernels
                   // take their pairs from bwd_heavy_first_cta instead)
  int adders;      // bwd_dq_adders
  int split_from;  // adders c >= split_from walk in two halves (adders: none)

  // The first query block of adder c's walk (that of its key block, or its pair's lower one).
  DHP_HOST_DEVICE int first_m(int c) const {
    const int walk = paired ? (n_blocks + 1) / 2 * 2 - 2 - 2 * c : n_blocks - 1 - c;
    return bwd_first_m_block(walk, block_m, block_n, seqlen_q, seqlen_k, m_blocks, true);
  }
  DHP_HOST_DEVICE int mid(int c) const {
    const int first = first_m(c);
    return first + (m_blocks - first) / 2;
  }
  // The query blocks [begin, end) a unit walks: the adder's, or one half of them.
  struct Range {
    int begin, end;
  };
  DHP_HOST_DEVICE Range walk(BwdUnit u) const {
    if (u.half == BwdHalf::kWhole) return {first_m(u.adder), m_blocks};
    const int m = mid(u.adder);
    return u.half == BwdHalf::kFirst ? Range{first_m(u.adder), m} : Range{m, m_blocks};
  }
  // Units of the launch (CTAs, or clusters with pairs): each adder below split_from, then each split adder's halves.
  DHP_HOST_DEVICE int units() const { return 2 * adders - split_from; }
  DHP_HOST_DEVICE BwdUnit unit(int u) const {
    if (u < split_from) return {u, BwdHalf::kWhole};
    const int j = u - split_from;
    return {split_from + j / 2, j % 2 ? BwdHalf::kSecond : BwdHalf::kFirst};
  }
  // The first adder of chain 1 at query block m: the lowest split adder whose second half walks it (mid(c) <= m;
  // mid falls as c grows), adders if none.
  DHP_HOST_DEVICE int chain1_start(int m) const {
    int lo = split_from, hi = adders;
    while (lo < hi) {
      const int c = (lo + hi) / 2;
      if (mid(c) <= m) hi = c;
      else lo = c + 1;
    }
    return lo;
  }
  // The first query block with chain 1 adders (mid falls as c grows: the last adder's), m_blocks if none: chain 1
  // holds the tiles from there on only (BwdWorkspace).
  DHP_HOST_DEVICE int chain1_first_m() const { return split_from < adders ? mid(adders - 1) : m_blocks; }
  // The query blocks where adder c's part of a tile is its chain's first, seen from the adder's side: those below
  // this, which the adder before it (higher) does not walk in the same chain: chain 0 the whole adder's walk (its
  // first query block), chain 1 a second half's (its mid). The writer's test, with no search per step; prep's
  // counters (bwd_dq_first_position, chain1_start) agree (tests/cpp/dq_turns.cpp).
  DHP_HOST_DEVICE int first_below(int c, BwdHalf half) const {
    if (half == BwdHalf::kSecond) return c > split_from ? mid(c - 1) : m_blocks;
    return c > 0 ? first_m(c - 1) : m_blocks;
  }
};

// The policy: causal problems that are not heavy first (bwd_causal_heavy_first) and not in kSplitDq pairs split the
// walks longer than half the query blocks and than BwdConfig::split_walks_over; the others have split_from = adders.
// Chosen from shapes only.
// Measured (H100, bf16, MHA, alternating builds, 2026-11-26; bench/results/2026-11-26-h100-bwd-split-walks-ab.txt):
// every walk over half the query blocks split, head_dim 128 8k keys +7%, 16k +10%, but 4k -5%, 2k -9%, 1k -15%;
// head_dim 64 -3% at 8k, even at 16k, -7..-20% below; head_dim 256 (pairs) +1..+1.5% at 8k-16k, -4..-21% below.
// A half's fixed costs (its K/V load, pipeline fill and drain, the dK/dV sums through the workspace) weigh on short
// walks, so only head_dim 128 splits, and only walks over 64 query blocks (from 8k keys on): 8k +7.6%, 16k +11%,
// the rest within ±0.5% (three rounds, same file).
inline BwdSplit bwd_split_walks_over(int over, int head_dim, bool causal, int seqlen_q, int seqlen_k, int heads_q,
                                     int heads_kv) {
  const BwdConfig c = bwd_config(head_dim, causal);
  const bool paired = bwd_paired_key_blocks(head_dim, causal, seqlen_k, heads_q, heads_kv);
  BwdSplit s{c.block_m, c.block_n, seqlen_q, seqlen_k, (seqlen_q + c.block_m - 1) / c.block_m,
             (seqlen_k + c.block_n - 1) / c.block_n, paired, 0, 0};
  s.adders = bwd_dq_adders(paired, s.n_blocks);
  s.split_from = s.adders;
  if (!causal || over == 0 || paired || bwd_causal_heavy_first(head_dim, causal, heads_q, heads_kv)) return s;
  // Walks grow with c: the first adder whose walk is long enough.
  int lo = 0, hi = s.adders;
  while (lo < hi) {
    const int a = (lo + hi) / 2;
    const int walk = s.m_blocks - s.first_m(a);
    if (walk > over && 2 * walk > s.m_blocks) hi = a;
    else lo = a + 1;
  }
  s.split_from = lo;
  return s;
}
inline BwdSplit bwd_split(int head_dim, bool causal, int seqlen_q, int seqlen_k, int heads_q, int heads_kv) {
  return bwd_split_walks_over(bwd_config(head_dim, causal).split_walks_over, head_dim, causal, seqlen_q, seqlen_k, heads_q,
                              heads_kv);
}

// Chains of dQ sums: two for short MHA problems without a causal mask (seqlen_k in (bwd_dq_chains_min_seqlen_k,
// bwd_dq_chains_max_seqlen_k]), and under one
// where walks are split (chain 1: the second halves).
inline int bwd_dq_chains(int head_dim, bool causal, int seqlen_q, int seqlen_k, int heads_q, int heads_kv) {
  if (causal) {
    const BwdSplit s = bwd_split(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
    return s.split_from < s.adders ? 2 : 1;
  }
  return heads_q == heads_kv && seqlen_k > bwd_dq_chains_min_seqlen_k(head_dim) &&
                 seqlen_k <= bwd_dq_chains_max_seqlen_k(head_dim)
             ? 2
             : 1;
}

// The backward's scratch memory, for one problem: six arrays, each 256-byte aligned.
//   dq_accum     float  [tiles + tiles1][block_m * head_dim]           dQ sums, each tile in fragment order: chain 0
//                                                                       [batch][heads_q][m_blocks], then chain 1
//                                                                       [batch][heads_q][m_blocks - m1] (bwd_dq_tile)
//   lse2         float  [batch][heads_q][m_blocks * block_m]            lse * log2(e); +inf on padding and for
//                                                                       rows that saw no key
//   delta        float  [batch][heads_q][m_blocks * block_m]            rowsum(dO * O); 0 on padding
//   dq_turn      int    [dq_ctas][tiles + tiles1]                       adders of the chain that have added to the
//                                                                       tile (its half: kSplitDq pairs) or never will
//   dkv_partial  float  [slots][2 x 128 threads x wg_cols]            first halves' dK, dV sums (bwd_split_slots)
//   split_flag   int    [slots]                                         the slot's uses: 2u + 1 written, 2u + 2 read
struct BwdWorkspace {
  size_t dq_accum, lse2, delta, dq_turn, dkv_partial, split_flag, bytes;  // byte offsets of the arrays, total size

  static constexpr size_t kAlign = 256;
  static constexpr size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  // chain1_m0: chain 1's first query block (bwd_dq_chain1_m0); split_slots: bwd_split_slots.
  static constexpr BwdWorkspace make(const BwdConfig& c, int batch, int heads_q, int seqlen_q, int dq_chains,
                                     int chain1_m0, size_t split_slots) {
    const size_t m_blocks = (size_t(seqlen_q) + c.block_m - 1) / c.block_m;
    const size_t rows = size_t(batch) * heads_q * m_blocks * c.block_m;
    const size_t tiles = size_t(batch) * heads_q * m_blocks;
    const size_t tiles1 = dq_chains > 1 ? size_t(batch) * heads_q * (m_blocks - size_t(chain1_m0)) : 0;
    BwdWorkspace w{};
    w.dq_accum = 0;
    w.lse2 = round_up((tiles + tiles1) * c.block_m * c.head_dim * sizeof(float));
    w.delta = w.lse2 + round_up(rows * sizeof(float));
    w.dq_turn = w.delta + round_up(rows * sizeof(float));
    w.dkv_partial = w.dq_turn + round_up(c.dq_ctas() * (tiles + tiles1) * sizeof(int));
    w.split_flag = w.dkv_partial + round_up(split_slots * BwdConfig::kConsumers * 128 * c.wg_cols() * sizeof(float));
    w.bytes = w.split_flag + round_up(split_slots * sizeof(int));
    return w;
  }
};

// Split walks hand their dK/dV sums over through a ring of slots: split adder g of the launch (counted over batch x
// K/V heads in launch order) uses slot g % slots for the (g / slots)-th time, once the second half of adder
// g - slots has read it; that half was launched earlier and waits for nothing launched after it, so the ring cannot
// deadlock, and the sums are the same bits whichever slot carries them. A slot is held from a first half's end to its
// second half's, about as long, so two per SM wait rarely; 256 slots of 128 KB (head_dim 128) are 32 MB whatever
// the length, where one per split adder took 128 MB at 16k keys x 16 heads.
// Heavy first in head halves, the same ring over the launch's (unit, rank)s (BwdHeavyCta::split): an even number of
// slots, so a slot's next user is a later unit's.
constexpr int kBwdSplitSlots = 256;
inline int bwd_split_slots(const BwdSplit& s, int batch, int heads_kv) {
  const int64_t split_adders = int64_t(batch) * heads_kv * (s.adders - s.split_from);
  return int(split_adders < kBwdSplitSlots ? split_adders : kBwdSplitSlots);
}
inline int bwd_dkv_slots(int head_dim, bool causal, int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv) {
  if (!bwd_heavy_first_halves(head_dim, causal, heads_q, heads_kv))
    return bwd_split_slots(bwd_split(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv), batch, heads_kv);
  const bool paired = bwd_paired_key_blocks(head_dim, causal, seqlen_k, heads_q, heads_kv);
  const int block_n = bwd_config(head_dim, causal).block_n;
  const int64_t n_blocks = (int64_t(seqlen_k) + block_n - 1) / block_n;
  const int64_t ctas = int64_t(batch) * heads_kv * bwd_heavy_first_units(paired, int(n_blocks)) * (paired ? 2 : 1);
  return int(ctas < kBwdSplitSlots ? ctas : kBwdSplitSlots);
}
static_assert(kBwdSplitSlots % 2 == 0, "heavy-first halves with pairs: two (unit, rank)s per unit");

// Chain 1's first query block: under a causal mask the first a second half walks (BwdSplit::chain1_first_m), else 0.
inline int bwd_dq_chain1_m0(const BwdSplit& s, bool causal) { return causal ? s.chain1_first_m() : 0; }

// A dQ tile's index in dq_accum (in tiles), and in dq_turn with `half * (tiles + tiles1)` added: chain 0's tile of
// (batch x heads_q + head) bh at query block m, or chain 1's (m >= m1), which follows chain 0's tiles. 32 bits:
// run_backward checks 2 x tiles <= INT32_MAX.
DHP_HOST_DEVICE int bwd_dq_tile(int chain, int bh, int m, int m_blocks, int m1, int tiles) {
  return chain ? tiles + bh * (m_blocks - m1) + (m - m1) : bh * m_blocks + m;
}

// The workspace of a problem (the C API's size query and the launch).
inline BwdWorkspace bwd_workspace(int head_dim, bool causal, int batch, int seqlen_q, int seqlen_k, int heads_q,
                                  int heads_kv) {
  const BwdSplit s = bwd_split(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv);
  return BwdWorkspace::make(bwd_config(head_dim, causal), batch, heads_q, seqlen_q,
                            bwd_dq_chains(head_dim, causal, seqlen_q, seqlen_k, heads_q, heads_kv),
                            bwd_dq_chain1_m0(s, causal),
                            size_t(bwd_dkv_slots(head_dim, causal, batch, seqlen_q, seqlen_k, heads_q, heads_kv)));
}

}  // namespace dhp::kernels
