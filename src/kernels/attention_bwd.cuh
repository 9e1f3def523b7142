// Backward attention, sm_90a: dQ, dK, dV from Q, K, V, O, dO and the forward's LSE, bitwise deterministic.
//
// Three kernels on the caller's stream:
//   prep:  per query row, delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf where the row saw no key, so
//          its probabilities come out 0); sets the dQ tiles' turn counters. Scratch in the caller's
//          workspace (BwdWorkspace).
//   main:  one CTA per (key block, KV head, batch). K and V of the block stay in shared memory; the CTA walks
//          the query blocks of every query head of its KV head (GQA: heads in order), and per step
//              S^T = K Q^T, dP^T = V dO^T, P^T = exp2(S^T * scale * log2 e - lse2), dS^T = P^T (dP^T - delta),
//              dV += P^T dO, dK += dS^T Q (dS^T from registers), dQ_part = dS K (dS^T through shared memory).
//          dK and dV accumulate in registers across all steps, so they need no reduction at all. dQ_part goes
//          to shared memory and a writer thread adds it to the tile's fp32 sum in the workspace with one bulk
//          reduce (the first part is stored, so the sums need no zeroing), in descending key-block order (heavy
//          first, ascending: below): it waits until the tile's turn counter says every key block before it that
//          sees the tile has added, adds, and passes the turn on. Without a causal mask, short MHA problems keep
//          two such sums per tile, key blocks alternating between them (bwd_dq_chains, chosen from shapes only);
//          without a causal mask the key blocks also add in pairs (below). Every dQ element is therefore summed in
//          the same order on every run.
//   post:  dq = (chain 0 + chain 1) * scale, converted and written with the caller's strides.
// Main and post launch with programmatic dependent launch: main's CTAs wait for prep (griddepcontrol.wait) and let
// post launch at once; post's CTAs start as the main kernel's last CTAs leave their SMs and each waits until its
// tile's turn counters have counted every adder (bwd_dq_chain_adders), so the conversion of most tiles runs under
// the main kernel's last wave instead of after it.
// Warp specialisation in main: warpgroup 0 is the producer (thread 0 issues TMA: K, V once, then Q, dO, lse2,
// delta per step into a Q/dO ring; threads 32, 64, ... are the dQ writers, one per dQ buffer, and the next one sends
// the dS^T of kSplitDq pairs with turns); warpgroups 1 and 2
// each own 64 keys and take turns issuing their GEMMs, with dQ one step behind (BwdConfig::turns(), in `consume`).
// At head_dim 256 they split the products of the block's 64 keys: warpgroup 1 computes S^T, P^T and dV, warpgroup 2
// dP^T, dS^T and dK (P^T reaches it through shared memory), and both the dQ GEMMs, each half of the CTA's dQ
// columns, from dS^T in shared memory (BwdConfig::split_products).
//
// Constant time: trip counts, addresses and branches depend on shapes, options and block indices only; the
// masks are selects. The writer's spin on the turn counter and the mbarrier waits last as long as other
// threads take, never as long as values dictate.
//
// Pairs (BwdConfig::pairs of the mask's configuration, bwd_paired_key_blocks): CTAs 2c and 2c + 1 form a cluster,
// rank 0 the upper key block.
// kSumDq (head_dim 128 under a causal mask, heavy first with a large enough group, where bwd_paired_key_blocks says):
// the lower key block (rank 1) hands each step's dQ part to the upper one through its shared memory, and rank 0 adds
// the sum in the pair's turn; rank 1's writer thread has nothing to do. Both walk the lower one's query blocks, and
// the lowest key blocks run two to a cluster without pairing (bwd_heavy_first_cta).
// kSplitDq (head_dim 256 always, head_dim 128 without a causal mask): both walk the same steps and copy their dS^T of
// each step into the other's shared memory; rank r computes dQ over the pair's keys for the r-th half of head_dim's
// columns and adds it in pair c's turn of that half. At head_dim 256 both warpgroups compute a quarter each, after
// the step's barrier; at head_dim 128, whose warpgroups take turns, warpgroup 0 computes the half alone (its dQ GEMM
// over 256 keys in its turn with dV and dK, warpgroup 1's turn without one; BwdConfig::dq_wgs), and a producer thread
// sends the CTA's dS^T once both warpgroups have stored their rows (send_ds).
//
// Deadlock freedom of the dQ turns: a CTA waits only for higher key blocks (or pairs) of its own (head, batch),
// which have lower block (cluster) indices (blockIdx.x counts key blocks from the last), so they were scheduled no
// later and never wait on it; within a pair the two CTAs are co-scheduled, as a cluster's CTAs are. Heavy first
// (below), for lower key blocks (or pairs), which come earlier in its one-dimensional grid or in the same cluster.
//
// Why descending: a CTA walks its query blocks upwards from the first one its keys see, so under a causal mask
// key block n + 1 reaches every query block before key block n does (its first block is later and it has fewer
// of them), and its turn is passed on before key block n asks for it: no CTA waits to start. (In ascending order
// every key block would queue behind all lower ones on the first query block; measured on the H100 at
// head_dim 128, 8k, causal: 377 TFLOP/s that way.) But the grid then ends on the heaviest CTAs, key block 0 of each
// head, and with GQA a CTA walks every query head of its group. There (bwd_causal_heavy_first) the grid is
// one-dimensional (tile_order.h): key block 0 of every (batch, K/V head) of a section first, then key block 1, and
// so on; each CTA walks its query blocks from the last down, at each the query heads of its group in turn, and a
// tile's parts are added in ascending key-block order, so the grid ends on light CTAs (head_dim 256: its kSplitDq
// pairs, from 4 query heads per K/V head). With many query heads per K/V head (head_dim 128) the key blocks go in
// kSumDq pairs and each walk in two halves of the group's query heads (bwd_heavy_first_cta, bwd_heavy_first_halves:
// the first half's dK/dV sums handed over through the workspace).
// Without GQA, at head_dim 128, the longest walks are split in two halves of their query blocks instead (BwdSplit in
// bwd_config.h: a second dQ chain for the second halves, the dK/dV sums handed over the same way).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "error.h"
#include "hopper/math.cuh"
#include "hopper/smem.cuh"
#include "hopper/sync.cuh"
#include "hopper/tma.cuh"
#include "hopper/wgmma.cuh"
#include "kernels/bwd_config.h"
#include "kernels/gemm.cuh"
#include "kernels/softmax.cuh"
#include "kernels/tile_order.h"
#include "params.h"
#include "tma.h"

namespace dhp::kernels {

struct BwdKernelParams {
  CUtensorMap q, k, v, dout, dk, dv;  // 4-d (head_dim, seqlen, heads, batch) maps, 64-column boxes
  float* dq_accum;
  const float* lse2;
  const float* delta;
  int* dq_turn;
  int seqlen_q, seqlen_k;
  int heads_q, q_heads_per_kv;
  int m_blocks, n_blocks;
  float scale_log2;     // softmax_scale * log2(e)
  float softmax_scale;
  int64_t tiles;  // dQ tiles of one chain: batch * heads_q * m_blocks
  int64_t dq_tiles;  // of both chains (bwd_dq_tile): with kSplitDq pairs, the stride of dq_turn's halves
  int dq_chains;  // chains of dQ sums in use: bwd_dq_chains(...), without a causal mask at most the adders
  int chain1_m0;  // chain 1's first query block (bwd_dq_chain1_m0)
  int paired;     // key blocks in pairs (bwd_paired_key_blocks): launched as 2-CTA clusters
  TileOrder order;  // heavy first (bwd_causal_heavy_first): the 1-d grid's list of (batch x K/V head, unit)
  int heads_kv;
  BwdSplit split;      // causal, lightest first: the units of a (batch, K/V head) and their walks
  float* dkv_partial;  // split walks, head halves: the first halves' dK and dV sums, a ring (bwd_dkv_slots)
  int* split_flag;     // the ring: each slot's uses (2u + 1: the u-th sums written, 2u + 2: read)
  int split_slots;
  int heavy_halves;  // heavy first in head halves (bwd_heavy_first_halves)
};

// How a CTA's dQ parts reach the tile sums (bwd_paired_key_blocks): it adds them itself, it adds them summed with
// its pair's lower key block's parts, or it hands them to the upper key block of its pair.
enum class DqRole : int { kAdd, kAddWithPeer, kGive };

// What a CTA works on: its key block, the query blocks it walks [m_begin, m_end) (from the first that sees its key
// block, or with kSplitDq pairs the pair's lower one: both CTAs of the pair walk the same steps; or half of them),
// its cluster rank, its role in the dQ sum, its position in the dQ turns (adder) and the half of a split walk.
struct BwdCta {
  int n_block, kv_head, batch, m_begin, m_end, adder;
  uint32_t rank;
  DqRole role;
  BwdHalf half;
  int split;  // heavy first in head halves: BwdHeavyCta::split
};

enum class BwdBarrier : int {
  kSyncThreads = 0,  // reserved: __syncthreads
  kDsReady = 1,      // without turns: both consumer warpgroups have written their P^T and dS^T of the step
  kTurnFirst = 2,    // + consumer index, with turns: that warpgroup may issue its next group of GEMMs
  kEpilogue = 4,     // both consumer warpgroups are done reading K and V
  kStoreFirst = 5,   // + consumer index: a consumer warpgroup's own 128 threads
  kPReady = 7,       // split products: warpgroup 0's P^T of the step is stored (warpgroup 1 waits)
};

// HeavyFirst: the causal backward's key blocks heaviest first (bwd_causal_heavy_first, the file comment), a kernel of
// its own so that the other kernels' code does not change with it.
template <class T, int HeadDim, bool Causal, bool HeavyFirst>
struct BwdKernel {
  static constexpr BwdConfig kCfg = bwd_config(HeadDim, Causal);
  static constexpr int kBlockM = kCfg.block_m;
  static constexpr int kBlockN = kCfg.block_n;
  static constexpr int kStages = kCfg.stages;
  static constexpr int kDqBuffers = kCfg.dq_buffers;
  static_assert(kDqBuffers <= 3, "one dQ writer per buffer, on warps 1-3 of the producer warpgroup");
  static constexpr int kBoxes = HeadDim / 64;
  static constexpr int kBoxBytesQ = kBlockM * 128;   // one 64-column box of a Q or dO block
  static constexpr int kBoxBytesKV = kBlockN * 128;  // one 64-column box of a K or V block
  static constexpr int kDsBoxes = kBlockM / 64;      // dS^T: kBlockN key rows x kBlockM query columns
  static constexpr int kBoxBytesDs = kBlockN * 128;
  static constexpr bool kSplitPairs = kCfg.pairs == BwdPairs::kSplitDq;
  static constexpr int kPeerBoxes = kSplitPairs ? kBoxes / 2 : 0;  // the pair's other K block, this CTA's dQ columns
  // dS^T; P^T with split products; the pair's other dS^T with kSplitDq pairs.
  static constexpr int kDsTiles = (kCfg.split_products ? 2 : 1) + (kSplitPairs ? 1 : 0);
  static constexpr int kPeerDsTile = kDsTiles - 1;
  static constexpr int kWgQueries = kCfg.wg_queries();           // query columns of a warpgroup's S^T, dP^T
  static constexpr int kDqRows = kCfg.dq_rows();
  static constexpr int kDqCols = kCfg.dq_cols();
  static constexpr int kTileFloats = kBlockM * HeadDim;           // a dQ tile
  static constexpr int kDqFloats = kTileFloats / kCfg.dq_ctas();  // the CTA's part of it, each step
  static constexpr int kWgCols = kCfg.wg_cols();  // dK and dV columns a consumer warpgroup owns
  static constexpr uint32_t kQBytes = kBlockM * HeadDim * sizeof(T);
  static constexpr uint32_t kKVBytes = kBlockN * HeadDim * sizeof(T);
  static constexpr uint32_t kRowStatBytes = kBlockM * sizeof(float);
  // kSumDq pairs: without a causal mask, or heavy first; p.paired decides per problem.
  static constexpr bool kMayPair = (!Causal || HeavyFirst) && kCfg.pairs == BwdPairs::kSumDq;
  static_assert(!HeavyFirst || Causal, "heavy first: causal kernels only");
  // Split walks (BwdSplit): causal, lightest first, where the configuration splits; not with kSplitDq pairs (measured
  // +1..+1.5% at 8k-16k keys, -4..-21% below: bwd_split's comment), so the pair terms stay out of the code.
  static constexpr bool kSplitWalks = Causal && !HeavyFirst && kCfg.split_walks_over > 0;
  static_assert(!kSplitWalks || !kSplitPairs, "split walks: not with kSplitDq pairs");
  static constexpr bool kHeadHalves = HeavyFirst && kCfg.head_halves_from > 0;  // p.heavy_halves decides per problem
  static_assert(!kCfg.split_products || !(kSplitWalks || kHeadHalves),
                "split products keep one of dK, dV per warpgroup: no dK/dV hand-over between halves of a walk");

  struct alignas(1024) Smem {
    alignas(1024) uint8_t k[kBoxes + kPeerBoxes][kBoxBytesKV];  // reused for dK in the epilogue
    alignas(1024) uint8_t v[kBoxes][kBoxBytesKV];  // reused for dV
    alignas(1024) uint8_t q[kStages][kBoxes][kBoxBytesQ];
    alignas(1024) uint8_t dout[kStages][kBoxes][kBoxBytesQ];
    alignas(1024) uint8_t ds[2][kDsTiles][kDsBoxes][kBoxBytesDs];  // [buffer][dS^T, P^T, the other's dS^T]
    alignas(128) float dq[kDqBuffers][kDqFloats];
    alignas(16) float lse2[kStages][kBlockM];
    alignas(16) float delta[kStages][kBlockM];
    alignas(8) uint64_t kv_full;
    uint64_t full[kStages], empty[kStages];
    uint64_t dq_full[kDqBuffers], dq_empty[kDqBuffers];
    uint64_t ds_full[2], ds_empty[2];  // with turns: both warpgroups' dS^T rows stored / read by both dQ GEMMs
    uint64_t peer_full[kDqBuffers];    // pairs, upper key block: the lower one's dQ part has landed in dq
    uint64_t peer_empty[kDqBuffers];   // pairs, lower key block: the upper one's dq buffer is free again
    uint64_t ds_peer_full[2];          // kSplitDq pairs: the other key block's dS^T has landed in ds[.][kPeerDsTile]
    uint64_t ds_peer_done;             // kSplitDq pairs: our last dS^T has landed in the other's (no copy reads ours)
  };
  static constexpr size_t kSmemBytes = sizeof(Smem) + 1024;  // + slack to align the dynamic base
  static_assert(kSmemBytes <= 232448, "shared memory over the 227 KB per-block limit");

  __device__ static int first_m_block(const BwdKernelParams& p, int n_block) {
    return bwd_first_m_block(n_block, kBlockM, kBlockN, p.seqlen_q, p.seqlen_k, p.m_blocks, Causal);
  }

  __device__ static bool block_needs_mask(const BwdKernelParams& p, int m_block, int n_block) {
    const int64_t block_end = int64_t(n_block + 1) * kBlockN;
    const int64_t first_row_limit = int64_t(m_block) * kBlockM + p.seqlen_k - p.seqlen_q;
    return block_end > p.seqlen_k || (Causal && block_end - 1 > first_row_limit);
  }

  // The query heads of the KV head's group that the CTA walks, [begin, end): all, or heavy first in head halves the
  // first G / 2 or the rest.
  __device__ static BwdSplit::Range group_heads(const BwdKernelParams& p, const BwdCta& c) {
    if constexpr (!kHeadHalves) return {0, p.q_heads_per_kv};
    const int half = p.q_heads_per_kv / 2;
    return {c.half == BwdHalf::kSecond ? half : 0, c.half == BwdHalf::kFirst ? half : p.q_heads_per_kv};
  }

  // The CTA's steps in order, f(step, head, m_block): every query head of the KV head, and within it the query
  // blocks of its walk, first to last; heavy first, the query blocks from the last down, at each the query heads of
  // the KV head (or of its half) in turn.
  template <class F>
  __device__ static void for_each_step(const BwdKernelParams& p, const BwdCta& c, F&& f) {
    int step = 0;
    if constexpr (HeavyFirst) {
      const BwdSplit::Range heads = group_heads(p, c);
      for (int m = c.m_end - 1; m >= c.m_begin; --m)
        for (int g = heads.begin; g < heads.end; ++g) f(step++, c.kv_head * p.q_heads_per_kv + g, m);
    } else {
      for (int g = 0; g < p.q_heads_per_kv; ++g)
        for (int m = c.m_begin; m < c.m_end; ++m) f(step++, c.kv_head * p.q_heads_per_kv + g, m);
    }
  }

  // A query block's index among all of them (p.tiles <= INT32_MAX, checked before the launch).
  __device__ static int row_tile(const BwdKernelParams& p, int batch, int head, int m_block) {
    return (batch * p.heads_q + head) * p.m_blocks + m_block;
  }

  __device__ static void produce(const BwdKernelParams& p, Smem& s, const BwdCta& c) {
    hopper::mbarrier_arrive_expect_tx(&s.kv_full, 2 * kKVBytes + kPeerBoxes * kBoxBytesKV);
    for (int b = 0; b < kBoxes; ++b) {
      hopper::tma_load_4d(s.k[b], &p.k, b * 64, c.n_block * kBlockN, c.kv_head, c.batch, &s.kv_full);
      hopper::tma_load_4d(s.v[b], &p.v, b * 64, c.n_block * kBlockN, c.kv_head, c.batch, &s.kv_full);
    }
    for (int b = 0; b < kPeerBoxes; ++b)  // the other key block of the pair (n_block ^ 1), this CTA's dQ columns
      hopper::tma_load_4d(s.k[kBoxes + b], &p.k, (int(c.rank) * kPeerBoxes + b) * 64, (c.n_block ^ 1) * kBlockN,
                          c.kv_head, c.batch, &s.kv_full);
    const int batch = c.batch;
    for_each_step(p, c, [&](int step, int head, int m_block) {
      const int stage = step % kStages;
      hopper::mbarrier_wait(&s.empty[stage], ((step / kStages) & 1) ^ 1);
      hopper::mbarrier_arrive_expect_tx(&s.full[stage], 2 * kQBytes + 2 * kRowStatBytes);
      for (int b = 0; b < kBoxes; ++b) {
        hopper::tma_load_4d(s.q[stage][b], &p.q, b * 64, m_block * kBlockM, head, batch, &s.full[stage]);
        hopper::tma_load_4d(s.dout[stage][b], &p.dout, b * 64, m_block * kBlockM, head, batch, &s.full[stage]);
      }
      const int64_t row0 = int64_t(row_tile(p, batch, head, m_block)) * kBlockM;
      hopper::bulk_load(s.lse2[stage], p.lse2 + row0, kRowStatBytes, &s.full[stage]);
      hopper::bulk_load(s.delta[stage], p.delta + row0, kRowStatBytes, &s.full[stage]);
    });
  }

  // Adds each step's dQ part to its tile's sum in its chain (key blocks alternate between p.dq_chains chains,
  // counted from the last), in descending key-block order (see the file comment): the prep kernel starts the
  // tile's counter at the number of key blocks that do not see it (the highest ones; with two chains, none).
  // The turn is awaited before the part is ready, so the poll overlaps the consumers' step, and passed on as
  // soon as the reduce has completed (bulk wait_group: its writes are performed; the release store orders them
  // before the turn). Measured on the H100, head_dim 128, 8k: 452 -> 466 TFLOP/s against waiting for the part
  // first and fencing before the release. One writer thread per dQ buffer (warp w + 1 of the producer warpgroup
  // takes the steps of buffer w), so one step's reduce and its completion overlap the next step's: consecutive steps
  // add to different tiles, each in its own turn, so every sum keeps its order and its bits. Head_dim 128 (two
  // buffers), H100 bf16, three alternating rounds: 512-1k +2..+4%, causal 2k +4%, GQA 32/8 causal 4k +2.6%, 16k
  // +2.3%, non-causal 2k-8k even to +1%; the reduce traffic itself, not its latency, is what the rest of the dQ
  // sum costs (a probe without it: causal 4k +13%, GQA causal 4k +33%, non-causal 4k +7%).
  __device__ static void write_dq(const BwdKernelParams& p, Smem& s, const BwdCta& c, int writer) {
    const DqRole role = c.role;
    const int half = kSplitPairs ? int(c.rank) : 0;  // of the tile's columns, with kSplitDq pairs
    const int first_below = Causal && !HeavyFirst ? p.split.first_below(c.adder, c.half) : 0;  // (lightest first)
    for_each_step(p, c, [&](int step, int head, int m_block) {
      const int buf = step % kDqBuffers;
      if (kDqBuffers > 1 && buf != writer) return;
      // Under a causal mask: chain 1 for the second half of a split walk (not heavy first's head halves, whose tiles
      // are other query heads'), the adder's position in either; without one, adders alternate between the chains.
      const int chain = Causal ? int(!HeavyFirst && c.half == BwdHalf::kSecond) : c.adder % p.dq_chains;
      const int position = Causal ? c.adder : c.adder / p.dq_chains;  // adders of the chain that add before this one
      // (without a causal mask chain 1 covers every query block: chain * tiles + the query block's, bwd_dq_tile with
      // m1 = 0, written so, which keeps those kernels' code as it was measured)
      const int tile = Causal ? bwd_dq_tile(chain, c.batch * p.heads_q + head, m_block, p.m_blocks, p.chain1_m0,
                                            int(p.tiles))
                              : chain * int(p.tiles) + row_tile(p, c.batch, head, m_block);
      int* turn = p.dq_turn + half * p.dq_tiles + tile;
      hopper::wait_flag_equals(turn, position);
      hopper::mbarrier_wait(&s.dq_full[buf], (step / kDqBuffers) & 1);
      float* sum = p.dq_accum + int64_t(tile) * kTileFloats + half * kDqFloats;
      // The chain's first part stores (no zeroes to add to): that of the first adder that sees the tile (without
      // a causal mask every key block sees it, so the chain's first; heavy first, key block 0; else
      // BwdSplit::first_below).
      if (Causal ? (HeavyFirst ? position == 0 : m_block < first_below) : c.adder < p.dq_chains)
        hopper::bulk_store(sum, s.dq[buf], kDqFloats * sizeof(float));
      else
        hopper::bulk_reduce_add(sum, s.dq[buf], kDqFloats * sizeof(float));
      hopper::tma_store_commit();
      hopper::tma_store_wait_read();
      if (role == DqRole::kAddWithPeer) {  // the buffer takes the lower key block's next part, then our own
        hopper::mbarrier_arrive_expect_tx(&s.peer_full[buf], kDqFloats * sizeof(float));
        hopper::mbarrier_arrive_peer(hopper::map_to_rank(&s.peer_empty[buf], 1));
      } else {
        hopper::mbarrier_arrive(&s.dq_empty[buf]);
      }
      hopper::bulk_wait_all();
      hopper::store_release_gpu(turn, position + 1);
    });
  }

  // kSplitDq pairs with turns: each step's dS^T, once both warpgroups have stored their rows (ds_full), to the other
  // CTA of the pair (its kPeerDsTile), counted on its ds_peer_full. That buffer is free: it held our dS^T of two steps
  // before, and our warpgroup 0 stored this step's rows only after ds_empty, which counts the other CTA's arrival once
  // its dQ GEMM had read it. Our rows stay until the other's dQ GEMM of this step is done (ds_empty again).
  __device__ static void send_ds(const BwdKernelParams& p, Smem& s, const BwdCta& c) {
    for_each_step(p, c, [&](int step, int /* head */, int /* m_block */) {
      const int buf = step & 1;
      hopper::mbarrier_wait(&s.ds_full[buf], (step / 2) & 1);
      hopper::bulk_copy_to_peer(hopper::map_to_rank(s.ds[buf][kPeerDsTile][0], c.rank ^ 1), s.ds[buf][0][0],
                                kBoxBytesDs, hopper::map_to_rank(&s.ds_peer_full[buf], c.rank ^ 1));
    });
  }

  // acc (64 x kWgQueries) = 64 rows of K or V times kWgQueries rows of Q or dO, transposed, over head_dim.
  __device__ static void gemm_rows_by_queries(float (&acc)[kWgQueries / 2], uint32_t a_base, uint32_t b_base) {
    gemm_kmajor<T, HeadDim, kWgQueries, kBoxBytesKV, kBoxBytesQ>(acc, a_base, b_base);
  }

  // acc (64 x kWgCols) += A (64 x kBlockM, registers) * the kBlockM rows of Q or dO, from column b_base's on.
  __device__ static void gemm_into_keys(float (&acc)[kWgCols / 2], const uint32_t (&a)[kBlockM / 16][4],
                                        uint32_t b_base) {
    gemm_rs_nmajor<T, kBlockM, kWgCols, kBoxBytesQ>(acc, a, b_base);
  }

  // acc (64 query rows x kDqCols) = dS (from dS^T in shared memory, M-major) * K (N-major), over the kBlockN keys in
  // k16 steps of 16 rows (2048 B) of both; with kSplitDq pairs then over the other key block's, whose dS^T and K
  // columns lie peer_ds and peer_k bytes further on (the same two descriptors, advanced).
  __device__ static void gemm_dq(float (&acc)[kDqCols / 2], uint32_t ds_base, uint32_t k_base, uint32_t peer_ds = 0,
                                 uint32_t peer_k = 0) {
    const uint64_t a0 = hopper::SmemDescriptor{ds_base, kBoxBytesDs, 1024}.encode();
    const uint64_t b0 = hopper::SmemDescriptor{k_base, kBoxBytesKV, 1024}.encode();
#pragma unroll
    for (int part = 0; part < (kSplitPairs ? 2 : 1); ++part)
#pragma unroll
      for (int t = 0; t < kBlockN / 16; ++t)
        hopper::mma_ss<T, kDqCols, 1, 1>(acc, hopper::advance(a0, part * peer_ds + t * 2048),
                                         hopper::advance(b0, part * peer_k + t * 2048), part > 0 || t > 0);
  }

  // The 128B-swizzled address of element (row, col) of a tile stored as 64-column boxes of `box_bytes`.
  __device__ static uint8_t* swizzled(uint8_t* tile, int box_bytes, int row, int col) {
    const int chunk = (col % 64) / 8;
    return tile + (col / 64) * box_bytes + row * 128 + ((chunk ^ (row % 8)) * 16) + (col % 8) * sizeof(T);
  }

  // kDq: this warpgroup computes dQ parts (both do, except with kSplitDq pairs and turns: warpgroup 0 alone,
  // compiled as a path of its own, since a wgmma issued under a branch makes ptxas serialise them all and spill).
  template <bool kDq>
  __device__ static void consume(const BwdKernelParams& p, Smem& s, int consumer, const BwdCta& c) {
    const int n_block = c.n_block;
    const DqRole role = c.role;
    using FragS = AccFragment<kWgQueries>;
    using FragD = AccFragment<kWgCols>;
    const int t = threadIdx.x % 128;
    const int lane = t % 32;
    const int row_in_wg = 16 * (t / 32) + lane / 4;  // row half 0; half 1 is 8 rows below
    constexpr bool kSplit = kCfg.split_products;
    const int key_row0 = kSplit ? 0 : 64 * consumer;   // this warpgroup's keys within the block
    const auto smem = [](const void* ptr) { return static_cast<uint32_t>(__cvta_generic_to_shared(ptr)); };
    const uint32_t k_rows = smem(s.k[0]) + key_row0 * 128;
    const uint32_t v_rows = smem(s.v[0]) + key_row0 * 128;
    const int dq_row0 = kCfg.dq_split_rows() ? consumer * 64 : 0;
    const int dq_half = kSplitPairs ? int(c.rank) : 0;  // with kSplitDq pairs, the CTA's half of the columns
    const int dq_col0 = kCfg.dq_split_rows() ? 0 : (dq_half * kCfg.dq_wgs() + consumer) * kDqCols;

    // With split products (kSplit) a warpgroup accumulates one of them, in acc_dv: warpgroup 0 dV, warpgroup 1 dK.
    float acc_dv[kWgCols / 2], acc_dk[kSplit ? 1 : kWgCols / 2];
#pragma unroll
    for (int i = 0; i < kWgCols / 2; ++i) acc_dv[i] = 0.f;
#pragma unroll
    for (int i = 0; i < (kSplit ? 1 : kWgCols / 2); ++i) acc_dk[i] = 0.f;

    // With turns (kCfg.turns()), the two warpgroups take turns issuing GEMMs (S^T and dP^T of a step, then dV, dK
    // and the previous step's dQ), so one's P/dS arithmetic and dQ store run under the other's GEMMs. dQ lags a
    // step behind: by the time a warpgroup issues the dQ of step j - 1, the other stored its dS^T rows of step
    // j - 1 half a step earlier (ds_full), so neither waits for the other at a barrier. With split products
    // (kSplit), warpgroup 0 stores P^T and arrives on kPReady, warpgroup 1 waits there, stores dS^T and arrives on
    // kDsReady, where warpgroup 0 waits before its dQ GEMM; each barrier has one arriving and one waiting
    // warpgroup, and neither can arrive twice before the other has waited once (each waits on the other's barrier
    // in between). P^T and dS^T are double-buffered: a buffer is written again two steps later, once its readers
    // are done: P^T(j - 2) was read by warpgroup 1 before it arrived on kDsReady(j - 2), which warpgroup 0 waited
    // for; dS^T(j - 2) by both dQ GEMMs of step j - 2, which warpgroup 0 completed before arriving on kPReady(j - 1),
    // which warpgroup 1 waited for (and the copy to the pair's other CTA: below).
    constexpr bool kTurns = kCfg.turns();
    const int steps = (HeavyFirst ? group_heads(p, c).end - group_heads(p, c).begin : p.q_heads_per_kv) *
                      (c.m_end - c.m_begin);
    const auto turn_sync = [&] {
      if constexpr (kTurns) hopper::named_barrier_sync(int(BwdBarrier::kTurnFirst) + consumer, 256);
    };
    const auto turn_pass = [&] {
      if constexpr (kTurns) hopper::named_barrier_arrive(int(BwdBarrier::kTurnFirst) + (consumer ^ 1), 256);
    };
    // dQ part of step `step` -> shared memory in fragment order (thread t's registers 4j..4j+3 at float4
    // j * 128 + t), which the workspace keeps and the post kernel undoes. With a pair, the lower key block pushes
    // its part straight from registers into the upper one's buffer (st.async, counted on the upper one's peer_full
    // barrier, once the upper one's writer has given the buffer back through peer_empty), and the upper one adds
    // its own part in place: sum = own part + lower part, in that order.
    const auto hand_dq_to_writer = [&](int step, const float (&acc_dq)[kDqCols / 2]) {
      const int dq_buf = step % kDqBuffers;
      const uint32_t parity = (step / kDqBuffers) & 1;
      float4* part = reinterpret_cast<float4*>(s.dq[dq_buf] + consumer * kDqRows * kDqCols);
      if (role == DqRole::kGive) {
        hopper::mbarrier_wait(&s.peer_empty[dq_buf], parity ^ 1);
        const uint32_t upper = hopper::map_to_rank(part + t, 0);
        const uint32_t landed = hopper::map_to_rank(&s.peer_full[dq_buf], 0);
#pragma unroll
        for (int j = 0; j < kDqCols / 8; ++j)
          hopper::store_async_peer(upper + j * 128 * sizeof(float4),
                                   make_float4(acc_dq[4 * j], acc_dq[4 * j + 1], acc_dq[4 * j + 2], acc_dq[4 * j + 3]),
                                   landed);
        return;
      }
      if (role == DqRole::kAddWithPeer) {
        hopper::mbarrier_wait(&s.peer_full[dq_buf], parity);  // the lower part has landed (so the buffer was free)
#pragma unroll
        for (int j = 0; j < kDqCols / 8; ++j) {
          const float4 l = part[j * 128 + t];
          part[j * 128 + t] = make_float4(acc_dq[4 * j] + l.x, acc_dq[4 * j + 1] + l.y, acc_dq[4 * j + 2] + l.z,
                                          acc_dq[4 * j + 3] + l.w);
        }
      } else {
        hopper::mbarrier_wait(&s.dq_empty[dq_buf], parity ^ 1);
#pragma unroll
        for (int j = 0; j < kDqCols / 8; ++j)
          part[j * 128 + t] = make_float4(acc_dq[4 * j], acc_dq[4 * j + 1], acc_dq[4 * j + 2], acc_dq[4 * j + 3]);
      }
      hopper::fence_view_async_shared();
      hopper::mbarrier_arrive(&s.dq_full[dq_buf]);
    };
    // With kSplitDq pairs: over this key block's keys, then the other one's (its dS^T copied here, its K columns
    // loaded after ours).
    const auto gemm_dq_of = [&](float (&acc_dq)[kDqCols / 2], int step) {
      const uint32_t ds = smem(s.ds[step & 1][0][dq_row0 / 64]), k = smem(s.k[dq_col0 / 64]);
      if constexpr (kSplitPairs)
        gemm_dq(acc_dq, ds, k, smem(s.ds[step & 1][kPeerDsTile][0]) - ds, smem(s.k[kBoxes + consumer]) - k);
      else
        gemm_dq(acc_dq, ds, k);
    };
    // Step 0 has no previous dQ: its GEMM reads K's first box in place of dS^T and the result is dropped, so the
    // wgmma is issued unconditionally (a conditional one makes ptxas spill the accumulators).
    // With kSplitDq pairs (warpgroup 0 alone) as gemm_dq_of of step - 1: at step 0 it reads buffer 1 for nothing (the
    // result is dropped; the other CTA's copy of its step 1 may be landing there meanwhile).
    const auto gemm_dq_of_previous = [&](float (&acc_dq)[kDqCols / 2], int step) {
      if constexpr (kSplitPairs) {
        gemm_dq_of(acc_dq, step - 1);
      } else {
        const uint32_t a = step > 0 ? smem(s.ds[(step - 1) & 1][0][dq_row0 / 64]) : smem(s.k[0]);
        gemm_dq(acc_dq, a, smem(s.k[dq_col0 / 64]));
      }
    };
    // kSplitDq pairs with turns: warpgroup 0 waits until the other key block's dS^T of `step` has landed here, and
    // arms the buffer's barrier for the copy two steps later.
    const auto wait_peer_ds = [&](int step) {
      if constexpr (kSplitPairs && kTurns) {
        hopper::mbarrier_wait(&s.ds_peer_full[step & 1], (step / 2) & 1);
        if (t == 0) hopper::mbarrier_arrive_expect_tx(&s.ds_peer_full[step & 1], kBoxBytesDs);
      }
    };

    // Masked entries of S^T (causal, keys past seqlen_k) become -inf, so their probabilities come out 0.
    const auto mask = [&](float (&acc)[kWgQueries / 2], int m_block) {
      if (!block_needs_mask(p, m_block, n_block)) return;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t key = int64_t(n_block) * kBlockN + key_row0 + row_in_wg + 8 * h;
        const int64_t first_col = Causal ? key - (p.seqlen_k - p.seqlen_q) - int64_t(m_block) * kBlockM : 0;
        const int first = key < p.seqlen_k ? int(max(int64_t(0), min(int64_t(kBlockM), first_col))) : kBlockM;
#pragma unroll
        for (int i = 0; i < FragS::kRegs; ++i)
          if (FragS::row_half(i) == h) acc[i] = FragS::col(i, lane) >= first ? acc[i] : -INFINITY;
      }
    };
    // Registers 4g..4g+3 hold query columns 8g + 2(lane % 4) + {0, 1} (of both row halves): one float2 of
    // lse2 and of delta per group.
    const auto row_stat = [&](const float* stat, int g) {
      return *reinterpret_cast<const float2*>(stat + FragS::col(4 * g, lane));
    };
    // S^T -> P^T = exp2(S^T * scale * log2 e - lse2).
    const auto to_probabilities = [&](float (&acc)[kWgQueries / 2], int stage) {
#pragma unroll
      for (int g = 0; g < FragS::kRegs / 4; ++g) {
        const float2 lse2 = row_stat(s.lse2[stage], g);
#pragma unroll
        for (int r = 0; r < 4; ++r)
          acc[4 * g + r] = hopper::exp2_approx(fmaf(acc[4 * g + r], p.scale_log2, -(r & 1 ? lse2.y : lse2.x)));
      }
    };
    // dP^T -> dS^T = P^T (dP^T - delta), prob(i) the probability of register i.
    const auto to_ds = [&](float (&acc)[kWgQueries / 2], int stage, auto&& prob) {
#pragma unroll
      for (int g = 0; g < FragS::kRegs / 4; ++g) {
        const float2 delta = row_stat(s.delta[stage], g);
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[4 * g + r] = prob(4 * g + r) * (acc[4 * g + r] - (r & 1 ? delta.y : delta.x));
      }
    };
    // A k16 fragment per 16 query columns, as the next GEMM's A operand (register j of group k: row half j % 2,
    // columns 16k + 8(j / 2) + 2(lane % 4) + {0, 1}).
    const auto pack = [&](uint32_t (&frag)[kWgQueries / 16][4], const float (&acc)[kWgQueries / 2]) {
#pragma unroll
      for (int k = 0; k < kWgQueries / 16; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) frag[k][j] = hopper::pack2<T>(acc[8 * k + 2 * j], acc[8 * k + 2 * j + 1]);
    };
    // The address in a dS^T (or P^T) tile of register j of group k: this warpgroup's rows and query columns.
    const auto frag_at = [&](uint8_t* tile, int k, int j) {
      const int row = key_row0 + row_in_wg + 8 * (j % 2);
      const int col = 16 * k + 8 * (j / 2) + 2 * (lane % 4);
      return reinterpret_cast<uint32_t*>(swizzled(tile, kBoxBytesDs, row, col));
    };
    const auto store_rows = [&](uint8_t* tile, const uint32_t (&frag)[kWgQueries / 16][4]) {
#pragma unroll
      for (int k = 0; k < kWgQueries / 16; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) *frag_at(tile, k, j) = frag[k][j];
    };

    hopper::mbarrier_wait(&s.kv_full, 0);
    if (consumer == 1 && steps > 0) turn_pass();  // warpgroup 0 issues first
    for_each_step(p, c, [&](int step, int /* head */, int m_block) {
      const int stage = step % kStages;
      const int buf = step & 1;  // dS^T buffer
      hopper::mbarrier_wait(&s.full[stage], (step / kStages) & 1);
      const uint32_t q_tile = smem(s.q[stage][0]);
      const uint32_t dout_tile = smem(s.dout[stage][0]);
      float acc_dq[kDqCols / 2];

      if constexpr (kSplit) {
        // Warpgroup 0: S^T = K Q^T, P^T (to shared memory for warpgroup 1), dV += P^T dO (P^T from registers).
        // Warpgroup 1: dP^T = V dO^T, dS^T = P^T (dP^T - delta) (to shared memory for both dQ GEMMs and the pair's
        // other CTA), dK += dS^T Q. The same GEMM shapes on either's operands.
        const bool probs = consumer == 0;
        float acc[kWgQueries / 2];
        hopper::wgmma_fence();
        gemm_rows_by_queries(acc, probs ? k_rows : v_rows, probs ? q_tile : dout_tile);
        hopper::wgmma_commit();
        hopper::wgmma_wait<0>();
        hopper::fence_registers(acc);
        uint32_t frag[kWgQueries / 16][4];
        if (probs) {
          mask(acc, m_block);
          to_probabilities(acc, stage);
          pack(frag, acc);
          store_rows(s.ds[buf][1][0], frag);
          hopper::named_barrier_arrive(int(BwdBarrier::kPReady), 256);
        } else {
          hopper::named_barrier_sync(int(BwdBarrier::kPReady), 256);
          uint32_t prob[kWgQueries / 16][4];
#pragma unroll
          for (int k = 0; k < kWgQueries / 16; ++k)
#pragma unroll
            for (int j = 0; j < 4; ++j) prob[k][j] = *frag_at(s.ds[buf][1][0], k, j);
          to_ds(acc, stage, [&](int i) {
            const float2 pr = hopper::unpack2<T>(prob[i / 8][(i % 8) / 2]);
            return i % 2 ? pr.y : pr.x;
          });
          pack(frag, acc);
          store_rows(s.ds[buf][0][0], frag);
          hopper::fence_view_async_shared();
          hopper::named_barrier_arrive(int(BwdBarrier::kDsReady), 256);
        }
        hopper::wgmma_fence();
        gemm_into_keys(acc_dv, frag, probs ? dout_tile : q_tile);
        hopper::wgmma_commit();
        // kSplitDq pairs: dS^T to the other CTA of the pair, whose buffer is free: it sent its dS^T of the step before
        // after its dQ GEMMs of the step before that had read the buffer. The copy has landed (and read ours) before
        // the other CTA's dQ GEMM of this step, which our step after next waits for before writing ours again.
        const bool sender = kSplitPairs && probs && t == 0;
        if (probs) hopper::named_barrier_sync(int(BwdBarrier::kDsReady), 256);
        if (sender)
          hopper::bulk_copy_to_peer(hopper::map_to_rank(s.ds[buf][kPeerDsTile][0], c.rank ^ 1), s.ds[buf][0][0],
                                    kBoxBytesDs, hopper::map_to_rank(&s.ds_peer_full[buf], c.rank ^ 1));
        if constexpr (kSplitPairs) {  // the other's dS^T of this step, under the dV and dK GEMMs
          hopper::mbarrier_wait(&s.ds_peer_full[buf], (step / 2) & 1);
          if (sender) {
            hopper::mbarrier_arrive_expect_tx(&s.ds_peer_full[buf], kBoxBytesDs);  // for step + 2
            if (step == steps - 1) hopper::mbarrier_arrive_peer(hopper::map_to_rank(&s.ds_peer_done, c.rank ^ 1));
          }
        }
        hopper::wgmma_fence();
        gemm_dq_of(acc_dq, step);
      } else {
        float acc_s[kWgQueries / 2], acc_dp[kWgQueries / 2];
        turn_sync();
        hopper::wgmma_fence();
        gemm_rows_by_queries(acc_s, k_rows, q_tile);
        hopper::wgmma_commit();
        hopper::wgmma_fence();
        gemm_rows_by_queries(acc_dp, v_rows, dout_tile);
        hopper::wgmma_commit();
        turn_pass();
        // P^T while dP^T is still in flight.
        hopper::wgmma_wait<1>();
        hopper::fence_registers(acc_s);
        mask(acc_s, m_block);
        to_probabilities(acc_s, stage);
        hopper::wgmma_wait<0>();
        hopper::fence_registers(acc_dp);
        to_ds(acc_dp, stage, [&](int i) { return acc_s[i]; });
        uint32_t p_frag[kWgQueries / 16][4], ds_frag[kWgQueries / 16][4];
        pack(p_frag, acc_s);
        pack(ds_frag, acc_dp);
        hopper::mbarrier_wait(&s.ds_empty[buf], ((step / 2) & 1) ^ 1);
        store_rows(s.ds[buf][0][0], ds_frag);  // this warpgroup's rows of dS^T, for both dQ GEMMs
        hopper::fence_view_async_shared();
        hopper::mbarrier_arrive(&s.ds_full[buf]);
        if (step > 0) hopper::mbarrier_wait(&s.ds_full[buf ^ 1], ((step - 1) / 2) & 1);
        if (kDq && step > 0) wait_peer_ds(step - 1);
        turn_sync();
        hopper::wgmma_fence();
        gemm_into_keys(acc_dv, p_frag, dout_tile);
        gemm_into_keys(acc_dk, ds_frag, q_tile);
        hopper::wgmma_commit();
        if (kDq) gemm_dq_of_previous(acc_dq, step);
      }
      hopper::wgmma_commit();
      turn_pass();
      // dV and dK, the last readers of this step's Q and dO, are a group ahead of dQ (which reads dS and K): the
      // stage goes back to the producer while dQ is still computed.
      hopper::wgmma_wait<1>();
      hopper::fence_registers(acc_dk);
      hopper::fence_registers(acc_dv);
      hopper::mbarrier_arrive(&s.empty[stage]);
      hopper::wgmma_wait<0>();
      hopper::fence_registers(acc_dq);
      if constexpr (kTurns) {
        if (step > 0) {
          hopper::mbarrier_arrive(&s.ds_empty[buf ^ 1]);
          // kSplitDq pairs: the other CTA may copy its next dS^T into the buffer our dQ GEMM has read.
          if (kSplitPairs && kDq && t == 0)
            hopper::mbarrier_arrive_peer(hopper::map_to_rank(&s.ds_empty[buf ^ 1], c.rank ^ 1));
          if (kDq) hand_dq_to_writer(step - 1, acc_dq);
        }
      } else {
        hand_dq_to_writer(step, acc_dq);
      }
    });
    if (kTurns && steps > 0) {  // the last step's dQ; warpgroup 1 has no one to pass the turn to
      const int last = steps - 1;
      float acc_dq[kDqCols / 2];
      hopper::mbarrier_wait(&s.ds_full[last & 1], (last / 2) & 1);
      if (kDq) wait_peer_ds(last);
      // kSplitDq pairs: the other CTA's last dS^T has landed, so its copies are done reading its shared memory.
      if (kSplitPairs && kDq && t == 0)
        hopper::mbarrier_arrive_peer(hopper::map_to_rank(&s.ds_peer_done, c.rank ^ 1));
      turn_sync();
      if (kDq) {
        hopper::wgmma_fence();
        gemm_dq_of(acc_dq, last);
        hopper::wgmma_commit();
      }
      if (consumer == 0) turn_pass();
      if (kDq) {
        hopper::wgmma_wait<0>();
        hopper::fence_registers(acc_dq);
        hand_dq_to_writer(last, acc_dq);
      }
    }

    // A split walk (BwdSplit) or heavy first's head halves: the first half hands its dK and dV sums to the second
    // through a slot of the workspace's ring (bwd_dkv_slots), each thread its own registers (float4 j of consumer w's
    // thread t at
    // (w * kWgCols / 4 + j) * 128 + t), and the second adds them to its own once: dK = second half's + first half's,
    // the same order on every run. The first half waits until the slot's last user has read it, and releases its
    // sums after a barrier of both consumer warpgroups; the second half's threads each acquire them, read them, and
    // free the slot after a barrier. Every thread polls for itself: no divergent wait before a barrier.
    if constexpr (kSplitWalks || kHeadHalves) {
      if (c.half != BwdHalf::kWhole) {
        // the launch's split adders (heavy first: (unit, rank)s), in launch order
        const int split_adders = p.split.adders - p.split.split_from;
        const int64_t g = kHeadHalves ? int64_t(c.split)
                                      : (int64_t(c.batch) * p.heads_kv + c.kv_head) * split_adders + c.adder -
                                            p.split.split_from;
        const int slot = int(g % p.split_slots), use = int(g / p.split_slots);
        float4* partial = reinterpret_cast<float4*>(p.dkv_partial) +
                          (int64_t(slot) * BwdConfig::kConsumers + consumer) * (kWgCols / 4) * 128 + t;
        int* flag = p.split_flag + slot;
        if (c.half == BwdHalf::kFirst) {
          hopper::wait_flag_equals(flag, 2 * use);
#pragma unroll
          for (int j = 0; j < kWgCols / 8; ++j) {
            partial[j * 128] = make_float4(acc_dk[4 * j], acc_dk[4 * j + 1], acc_dk[4 * j + 2], acc_dk[4 * j + 3]);
            partial[(kWgCols / 8 + j) * 128] =
                make_float4(acc_dv[4 * j], acc_dv[4 * j + 1], acc_dv[4 * j + 2], acc_dv[4 * j + 3]);
          }
          hopper::named_barrier_sync(int(BwdBarrier::kEpilogue), 256);
          if (consumer == 0 && t == 0) hopper::store_release_gpu(flag, 2 * use + 1);
        } else {
          hopper::wait_flag_equals(flag, 2 * use + 1);
#pragma unroll
          for (int j = 0; j < kWgCols / 8; ++j) {
            const float4 dk = partial[j * 128], dv = partial[(kWgCols / 8 + j) * 128];
            acc_dk[4 * j] += dk.x, acc_dk[4 * j + 1] += dk.y, acc_dk[4 * j + 2] += dk.z, acc_dk[4 * j + 3] += dk.w;
            acc_dv[4 * j] += dv.x, acc_dv[4 * j + 1] += dv.y, acc_dv[4 * j + 2] += dv.z, acc_dv[4 * j + 3] += dv.w;
          }
          hopper::named_barrier_sync(int(BwdBarrier::kEpilogue), 256);
          if (consumer == 0 && t == 0) hopper::store_release_gpu(flag, 2 * use + 2);
        }
      }
    }

    // dK (scaled) and dV -> this warpgroup's rows of the K and V buffers, once neither warpgroup reads them,
    // then out through TMA (rows past seqlen_k are clipped). Not for the first half of a split walk.
    if (c.half != BwdHalf::kFirst) {
      hopper::named_barrier_sync(int(BwdBarrier::kEpilogue), 256);
      const int lane_e = int(hopper::lane_index());
      const int row_e = 16 * (t / 32) + lane_e / 4;
#pragma unroll
      for (int i = 0; i < FragD::kRegs; i += 2) {
        const int row = key_row0 + row_e + 8 * FragD::row_half(i);
        const int col = FragD::col(i, lane_e);
        if constexpr (kSplit) {  // warpgroup 1's dK (scaled), warpgroup 0's dV
          const float scale = consumer == 1 ? p.softmax_scale : 1.f;
          *reinterpret_cast<uint32_t*>(swizzled(consumer == 1 ? s.k[0] : s.v[0], kBoxBytesKV, row, col)) =
              hopper::pack2<T>(acc_dv[i] * scale, acc_dv[i + 1] * scale);
        } else {
          *reinterpret_cast<uint32_t*>(swizzled(s.k[0], kBoxBytesKV, row, col)) =
              hopper::pack2<T>(acc_dk[i] * p.softmax_scale, acc_dk[i + 1] * p.softmax_scale);
          *reinterpret_cast<uint32_t*>(swizzled(s.v[0], kBoxBytesKV, row, col)) =
              hopper::pack2<T>(acc_dv[i], acc_dv[i + 1]);
        }
      }
      hopper::fence_view_async_shared();
      hopper::named_barrier_sync(int(BwdBarrier::kStoreFirst) + consumer, 128);
      const int key0 = n_block * kBlockN + key_row0;
      if (t == 0 && key0 < p.seqlen_k) {
        for (int b = 0; b < kBoxes; ++b) {
          if (!kSplit || consumer == 1)
            hopper::tma_store_4d(&p.dk, s.k[b] + key_row0 * 128, b * 64, key0, c.kv_head, c.batch);
          if (!kSplit || consumer == 0)
            hopper::tma_store_4d(&p.dv, s.v[b] + key_row0 * 128, b * 64, key0, c.kv_head, c.batch);
        }
        hopper::tma_store_commit();
        hopper::tma_store_wait_read();
      }
    }
    // kSplitDq pairs: stay until the other CTA has our last dS^T (its arrival also ends its accesses to ours).
    if (kSplitPairs && consumer == 0 && t == 0 && steps > 0) hopper::mbarrier_wait(&s.ds_peer_done, 0);
    // The upper key block's writer signals this CTA after each of its adds: stay until the last has come.
    if (role == DqRole::kGive)
      for (int k = 0; k < kDqBuffers; ++k)
        hopper::mbarrier_wait(&s.peer_empty[(steps + k) % kDqBuffers], (((steps + k) / kDqBuffers) & 1) ^ 1);
  }
};

template <class T, int HeadDim, bool Causal, bool HeavyFirst>
__global__ void __launch_bounds__(bwd_config(HeadDim, Causal).threads(), 1)
    attention_bwd_kernel(const __grid_constant__ BwdKernelParams p) {
  using K = BwdKernel<T, HeadDim, Causal, HeavyFirst>;
  auto& s = hopper::aligned_dynamic_smem<typename K::Smem>();
  const int x = int(blockIdx.x);
  const bool sum_pairs = K::kMayPair && p.paired;
  const bool paired = K::kSplitPairs || sum_pairs;
  const uint32_t rank = paired ? hopper::cluster_rank() : 0;  // 1: the lower key block of a pair
  int n_block = bwd_key_block(K::kCfg.pairs, p.n_blocks, x), kv_head = blockIdx.y, batch = blockIdx.z;
  int adder = bwd_dq_turn(paired, p.n_blocks, n_block, x);
  bool heavy_pair = false;  // heavy first: in a kSumDq pair (bwd_heavy_first_cta)
  BwdHalf half = BwdHalf::kWhole;
  int split = 0;
  if constexpr (HeavyFirst) {
    const BwdPairs pairs = K::kSplitPairs ? BwdPairs::kSplitDq : sum_pairs ? BwdPairs::kSumDq : BwdPairs::kNone;
    const BwdHeavyCta h = bwd_heavy_first_cta(p.order, pairs, K::kHeadHalves && p.heavy_halves, p.n_blocks, x);
    batch = h.head / p.heads_kv;
    kv_head = h.head - batch * p.heads_kv;
    n_block = h.n_block;
    adder = h.adder;
    heavy_pair = h.pair;
    half = h.half;
    split = h.split;
  } else if constexpr (K::kSplitWalks) {  // the units of split walks (BwdSplit)
    const BwdUnit unit = p.split.unit(x);
    n_block = bwd_key_block(K::kCfg.pairs, p.n_blocks, unit.adder);
    adder = unit.adder;
    half = unit.half;
  }
  // kSumDq pairs: rank 1 (the lower key block) hands its parts to rank 0; counted from the highest (without a causal
  // mask), key block 0 of an odd N has no lower one and adds alone.
  const DqRole role = HeavyFirst ? (!heavy_pair ? DqRole::kAdd : rank == 1 ? DqRole::kGive : DqRole::kAddWithPeer)
                      : !sum_pairs ? DqRole::kAdd
                      : rank == 1  ? DqRole::kGive
                      : n_block > 0 ? DqRole::kAddWithPeer
                                    : DqRole::kAdd;
  // A heavy-first pair walks from its lower key block's first query block (rank 1's).
  const int walk_block = heavy_pair ? n_block - 1 + int(rank) : bwd_walk_block(K::kCfg.pairs, n_block);
  const BwdSplit::Range walk = K::kSplitWalks ? p.split.walk({adder, half})
                                              : BwdSplit::Range{K::first_m_block(p, walk_block), p.m_blocks};
  const BwdCta cta{n_block, kv_head, batch, walk.begin, walk.end, adder, rank, role, half, split};

  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
  if (threadIdx.x == 0) {
    hopper::mbarrier_init(&s.kv_full, 1);
    for (int i = 0; i < K::kStages; ++i) {
      hopper::mbarrier_init(&s.full[i], 1);
      hopper::mbarrier_init(&s.empty[i], 128 * BwdConfig::kConsumers);
    }
    for (int i = 0; i < K::kDqBuffers; ++i) {
      hopper::mbarrier_init(&s.dq_full[i], 128 * K::kCfg.dq_wgs());
      hopper::mbarrier_init(&s.dq_empty[i], 1);
      hopper::mbarrier_init(&s.peer_full[i], 1);
      hopper::mbarrier_init(&s.peer_empty[i], 1);
      // The first phase expects the lower key block's first part (later ones are armed by the writer).
      if (role == DqRole::kAddWithPeer) hopper::mbarrier_arrive_expect_tx(&s.peer_full[i], K::kDqFloats * sizeof(float));
    }
    if constexpr (K::kCfg.turns())
      for (int i = 0; i < 2; ++i) {
        hopper::mbarrier_init(&s.ds_full[i], 128 * BwdConfig::kConsumers);
        hopper::mbarrier_init(&s.ds_empty[i], 128 * BwdConfig::kConsumers + (K::kSplitPairs ? 1 : 0));
      }
    if constexpr (K::kSplitPairs) {
      for (int i = 0; i < 2; ++i) {  // expects the other key block's dS^T of steps 0 and 1 (later ones: consume)
        hopper::mbarrier_init(&s.ds_peer_full[i], 1);
        hopper::mbarrier_arrive_expect_tx(&s.ds_peer_full[i], K::kBoxBytesDs);
      }
      hopper::mbarrier_init(&s.ds_peer_done, 1);
    }
    hopper::fence_barrier_init();
  }
  // Launched after the prep kernel with programmatic stream serialisation: wait for its scratch (lse2, delta, the turn
  // counters, the flags), then let the post kernel launch, whose CTAs wait for their tiles' last dQ adds.
  hopper::grid_dependency_wait();
  hopper::launch_dependents();
  if (paired) {  // the pair's barriers are initialised before either CTA arrives on the other's
    hopper::cluster_arrive();
    hopper::cluster_wait();
    // An odd number of key blocks: the last pair (kSumDq) has no lower key block, heavy first no upper one (whose
    // head halves still pass their slot of the dK/dV ring on to its next user).
    if (HeavyFirst && !K::kSplitPairs ? n_block >= p.n_blocks : n_block < 0) {
      if (K::kHeadHalves && half != BwdHalf::kWhole && threadIdx.x == 0) {
        int* flag = p.split_flag + split % p.split_slots;
        const int use = split / p.split_slots, first = int(half == BwdHalf::kFirst);
        hopper::wait_flag_equals(flag, 2 * use + 1 - first);
        hopper::store_release_gpu(flag, 2 * use + 2 - first);
      }
      return;
    }
  } else {
    __syncthreads();
  }

  if (warpgroup == 0) {
    hopper::setmaxnreg_dec<K::kCfg.producer_regs>();
    if (threadIdx.x == 0) {
      hopper::prefetch_tensormap(&p.q);
      hopper::prefetch_tensormap(&p.dout);
      K::produce(p, s, cta);
    } else if (K::kDqBuffers == 1 ? threadIdx.x == 32 : threadIdx.x % 32 == 0 && threadIdx.x / 32 <= K::kDqBuffers) {
      if (role != DqRole::kGive) K::write_dq(p, s, cta, K::kDqBuffers == 1 ? 0 : threadIdx.x / 32 - 1);  // warps 1..
    } else if (K::kSplitPairs && K::kCfg.turns() && threadIdx.x == 32 * (K::kDqBuffers + 1)) {
      K::send_ds(p, s, cta);
    }
  } else {
    hopper::setmaxnreg_inc<K::kCfg.consumer_regs>();
    if constexpr (K::kCfg.dq_wgs() == 1) {
      if (warpgroup == 1) K::template consume<true>(p, s, 0, cta);
      else K::template consume<false>(p, s, 1, cta);
    } else {
      K::template consume<true>(p, s, warpgroup - 1, cta);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// prep and post

struct BwdRowParams {
  const void* out;
  const void* dout;
  const float* lse;
  void* dq;
  BshdStrides out_stride, dout_stride, dq_stride;
  int64_t lse_stride_batch, lse_stride_head, lse_stride_seq;
  float* dq_accum;
  float* lse2;
  float* delta;
  int* dq_turn;
  int* split_flag;
  int split_slots;  // at most kBwdSplitSlots <= kRowKernelThreads
  int64_t tiles;
  int64_t dq_tiles;  // of both chains: the stride of dq_turn's halves
  int dq_chains;
  int chain1_m0;  // chain 1's first query block (bwd_dq_chain1_m0)
  int seqlen_q, seqlen_k, heads_q, m_blocks, n_blocks;
  bool causal, paired, heavy_first;
  BwdSplit split;  // causal: the chains' adders at each query block, the split walks' flags
  float softmax_scale;
};

constexpr int kRowKernelThreads = 256;
static_assert(kBwdSplitSlots <= kRowKernelThreads, "prep's first block zeroes the split walks' slot flags");

__device__ inline int64_t bshd_offset(const BshdStrides& s, int batch, int row, int head) {
  return batch * s.batch + row * s.seq + head * s.head;
}


// Per query block of one (batch, head): delta and lse2 of its rows (8 threads a row, 16-byte loads), and the
// turn counters at the number of adders that will not add to the tile before the chain's first. The dQ sums need
// no zeroing: the first adder to reach a tile stores its part, the others add; only chain 0 of a tile it has no
// adder in is zeroed (chain 1 of such a tile the post kernel does not read). The first block zeroes the split walks'
// slot flags.
template <class T, int HeadDim>
__global__ void __launch_bounds__(kRowKernelThreads) attention_bwd_prep_kernel(const BwdRowParams p) {
  constexpr int kBlockM = bwd_config(HeadDim, false).block_m;  // either mask's (bwd_masks_share_tiles)
  constexpr int kLanesPerRow = 8, kVec = 16 / sizeof(T);
  constexpr float kLog2e = 1.4426950408889634f;
  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int64_t tile = (int64_t(batch) * p.heads_q + head) * p.m_blocks + m_block;
  const int sub = threadIdx.x % kLanesPerRow;
  hopper::launch_dependents();  // the main kernel's CTAs may take the SMs this grid leaves (they wait for it first)

  for (int r = threadIdx.x / kLanesPerRow; r < kBlockM; r += kRowKernelThreads / kLanesPerRow) {
    const int row = m_block * kBlockM + r;
    float sum = 0.f, lse = -INFINITY;
    if (row < p.seqlen_q) {
      const T* o = static_cast<const T*>(p.out) + bshd_offset(p.out_stride, batch, row, head);
      const T* d = static_cast<const T*>(p.dout) + bshd_offset(p.dout_stride, batch, row, head);
#pragma unroll
      for (int c = sub * kVec; c < HeadDim; c += kLanesPerRow * kVec) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
        const uint4 dv = *reinterpret_cast<const uint4*>(d + c);
        const T* oe = reinterpret_cast<const T*>(&ov);
        const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum = fmaf(float(oe[e]), float(de[e]), sum);
      }
      lse = p.lse[batch * p.lse_stride_batch + head * p.lse_stride_head + row * p.lse_stride_seq];
    }
#pragma unroll
    for (int x = 1; x < kLanesPerRow; x *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    if (sub == 0) {
      p.delta[tile * kBlockM + r] = sum;
      p.lse2[tile * kBlockM + r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    }
  }
  const int seen = key_blocks_seen(m_block, kBlockM, bwd_config(HeadDim, false).block_n, p.seqlen_q, p.seqlen_k,
                                   p.n_blocks, p.causal);
  const int first = bwd_dq_first_position(p.heavy_first, p.paired, p.n_blocks, seen);
  const int chain1_first = p.causal ? p.split.chain1_start(m_block) : first;
  if (seen == 0 || (p.causal && first >= chain1_first)) {  // no adder in chain 0 (e.g. rows that see no key)
    float4* sums = reinterpret_cast<float4*>(p.dq_accum + tile * kBlockM * HeadDim);
    for (int i = threadIdx.x; i < kBlockM * HeadDim / 4; i += kRowKernelThreads) sums[i] = make_float4(0, 0, 0, 0);
  }
  const int halves = bwd_config(HeadDim, p.causal).dq_ctas();
  if (int(threadIdx.x) < halves)
    p.dq_turn[threadIdx.x * p.dq_tiles + tile] = first;
  else if (int(threadIdx.x) < 2 * halves && p.dq_chains > 1 && m_block >= p.chain1_m0)
    p.dq_turn[(threadIdx.x - halves) * p.dq_tiles +
              bwd_dq_tile(1, batch * p.heads_q + head, m_block, p.m_blocks, p.chain1_m0, int(p.tiles))] = chain1_first;
  if (m_block == 0 && head == 0 && batch == 0 && int(threadIdx.x) < p.split_slots) p.split_flag[threadIdx.x] = 0;
}

// dq = dQ sum * scale for one query block of one (batch, head), the sum being chain 0 + chain 1 in that order
// (under a causal mask chain 1 only where a split walk's second half adds to the tile). The sums are in fragment
// order (each thread's values are 2 columns of 2 rows): they are scaled, converted and put in row order in shared
// memory, then written 16 bytes a thread along the rows.
template <class T, int HeadDim>
__global__ void __launch_bounds__(kRowKernelThreads) attention_bwd_post_kernel(const BwdRowParams p) {
  constexpr BwdConfig kCfg = bwd_config(HeadDim, false);  // the tiles' layout: either mask's (bwd_masks_share_tiles)
  constexpr int kDqCols = kCfg.dq_cols();
  constexpr int kPitch = HeadDim + 16 / sizeof(T);  // a row and 16 bytes: the fragment stores hit 32 banks
  constexpr int kChunksPerRow = HeadDim * sizeof(T) / 16;
  static_assert(kCfg.dq_parts() % (kRowKernelThreads / 128) == 0, "128 threads a part (64 rows x kDqCols), each "
                "group of 128 the same number of parts");
  __shared__ alignas(16) T rows[kCfg.block_m * kPitch];
  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int t = threadIdx.x % 128, lane = t % 32;
  const int chains = m_block >= p.chain1_m0 ? p.dq_chains : 1;  // (under a causal mask: chain1_start(m) < adders)
  // Launched after the main kernel with programmatic stream serialisation, so it may start while the main kernel's
  // last CTAs run (in the SMs they leave): one thread per (chain, half) of the tile waits until its turn counter has
  // counted every adder (prep's start + bwd_dq_chain_adders; the last adder's release follows its reduce's completion).
  const BwdConfig cfg = bwd_config(HeadDim, p.causal);  // the pairs: the mask's
  if (int(threadIdx.x) < chains * cfg.dq_ctas()) {
    const int chain = threadIdx.x / cfg.dq_ctas(), half = threadIdx.x % cfg.dq_ctas();
    const int seen = key_blocks_seen(m_block, kCfg.block_m, kCfg.block_n, p.seqlen_q, p.seqlen_k, p.n_blocks, p.causal);
    const int first = bwd_dq_first_position(p.heavy_first, p.paired, p.n_blocks, seen);
    const int chain1_first = p.causal ? p.split.chain1_start(m_block) : first;
    const int adders = bwd_dq_chain_adders(cfg.pairs, p.paired, p.causal, p.heavy_first, p.n_blocks, seen,
                                           p.dq_chains, chain, chain1_first);
    const int tile = bwd_dq_tile(chain, batch * p.heads_q + head, m_block, p.m_blocks, p.chain1_m0, int(p.tiles));
    hopper::wait_flag_equals(p.dq_turn + half * p.dq_tiles + tile, (chain == 0 ? first : chain1_first) + adders);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kCfg.dq_parts() / (kRowKernelThreads / 128); ++i) {
    const int part = threadIdx.x / 128 + i * (kRowKernelThreads / 128);
    const int row0 = (kCfg.dq_split_rows() ? part * 64 : 0) + 16 * (t / 32) + lane / 4;
    const int col0 = (kCfg.dq_split_rows() ? 0 : part * kDqCols) + 2 * (lane % 4);
    const auto sums = [&](int chain) {
      const int64_t index =
          bwd_dq_tile(chain, batch * p.heads_q + head, m_block, p.m_blocks, p.chain1_m0, int(p.tiles));
      return reinterpret_cast<const float4*>(p.dq_accum + index * kCfg.block_m * HeadDim) + part * 64 * kDqCols / 4;
    };
#pragma unroll
    for (int j = 0; j < kDqCols / 8; ++j) {
      float4 v = sums(0)[j * 128 + t];
      if (chains > 1) {
        const float4 w = sums(1)[j * 128 + t];
        v = make_float4(v.x + w.x, v.y + w.y, v.z + w.z, v.w + w.w);
      }
      const int col = col0 + 8 * j;
      *reinterpret_cast<uint32_t*>(&rows[row0 * kPitch + col]) =
          hopper::pack2<T>(v.x * p.softmax_scale, v.y * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(&rows[(row0 + 8) * kPitch + col]) =
          hopper::pack2<T>(v.z * p.softmax_scale, v.w * p.softmax_scale);
    }
  }
  __syncthreads();
  T* dq = static_cast<T*>(p.dq);
  for (int i = threadIdx.x; i < kCfg.block_m * kChunksPerRow; i += kRowKernelThreads) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * (16 / sizeof(T));
    const int row = m_block * kCfg.block_m + r;
    if (row < p.seqlen_q)
      *reinterpret_cast<uint4*>(dq + bshd_offset(p.dq_stride, batch, row, head) + c) =
          *reinterpret_cast<const uint4*>(&rows[r * kPitch + c]);
  }
  // The grid's last CTA stays until the main kernel has completed, so this kernel, the backward's last, completes
  // after everything the backward writes (dK and dV too) and the stream's next work sees it.
  if (threadIdx.x == 0 && m_block == p.m_blocks - 1 && head == p.heads_q - 1 && batch == int(gridDim.z) - 1)
    hopper::grid_dependency_wait();
}

// dk = dv = 0 when there are no queries (seqlen_q == 0): one row of one head per block.
template <class T, int HeadDim>
__global__ void attention_bwd_zero_kernel(void* dk, void* dv, BshdStrides dk_stride, BshdStrides dv_stride) {
  const int row = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int c = threadIdx.x * (16 / sizeof(T));
  *reinterpret_cast<uint4*>(static_cast<T*>(dk) + bshd_offset(dk_stride, batch, row, head) + c) = uint4{};
  *reinterpret_cast<uint4*>(static_cast<T*>(dv) + bshd_offset(dv_stride, batch, row, head) + c) = uint4{};
}

// The dynamic shared memory of a backward kernel, reserved once per kernel and device ordinal (as in the forward).
template <auto kKernel>
cudaError_t reserve_backward_smem(size_t bytes) {
  static std::atomic<uint64_t> reserved{0};  // per kernel: one instance of this function each
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  const uint64_t device_bit = device < 64 ? uint64_t{1} << device : 0;
  if (err == cudaSuccess && !(reserved.load(std::memory_order_acquire) & device_bit)) {
    err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err == cudaSuccess) reserved.fetch_or(device_bit, std::memory_order_release);
  }
  return err;
}

template <DType DT, int HeadDim, bool Causal>
dhp_status run_backward(const BwdParams& prm, cudaStream_t stream) {
  using T = std::conditional_t<DT == DType::bf16, __nv_bfloat16, __half>;
  using K = BwdKernel<T, HeadDim, Causal, false>;
  const FwdParams& f = prm.fwd;
  constexpr BwdConfig kCfg = bwd_config(HeadDim, Causal);

  cudaError_t err;
  if (f.seqlen_q == 0) {
    attention_bwd_zero_kernel<T, HeadDim><<<dim3(f.seqlen_k, f.heads_kv, f.batch), HeadDim * sizeof(T) / 16, 0,
                                            stream>>>(prm.dk, prm.dv, prm.dk_stride, prm.dv_stride);
    err = cudaGetLastError();
    if (err != cudaSuccess) return fail(DHP_ERROR_CUDA, "backward launch failed: %s", cudaGetErrorString(err));
    return succeed();
  }

  const int64_t m_blocks = (int64_t(f.seqlen_q) + kCfg.block_m - 1) / kCfg.block_m;
  if (m_blocks * (f.heads_q / f.heads_kv) > INT32_MAX)
    return fail(DHP_ERROR_INVALID_VALUE,
                "heads_q/heads_kv=%d x ceil(seqlen_q=%d / %d) = %lld steps for one key block: at most 2^31 - 1 are "
                "supported", f.heads_q / f.heads_kv, f.seqlen_q, kCfg.block_m,
                (long long)(m_blocks * (f.heads_q / f.heads_kv)));
  if (2 * int64_t(f.batch) * f.heads_q * m_blocks > INT32_MAX)
    return fail(DHP_ERROR_INVALID_VALUE,
                "batch=%d x heads_q=%d x ceil(seqlen_q=%d / %d) = %lld dQ tiles: at most 2^30 - 1 are supported",
                f.batch, f.heads_q, f.seqlen_q, kCfg.block_m, (long long)(int64_t(f.batch) * f.heads_q * m_blocks));
  const int dq_chains = bwd_dq_chains(HeadDim, Causal, f.seqlen_q, f.seqlen_k, f.heads_q, f.heads_kv);
  const bool paired = bwd_paired_key_blocks(HeadDim, Causal, f.seqlen_k, f.heads_q, f.heads_kv);
  const BwdSplit split = bwd_split(HeadDim, Causal, f.seqlen_q, f.seqlen_k, f.heads_q, f.heads_kv);
  const BwdWorkspace ws = bwd_workspace(HeadDim, Causal, f.batch, f.seqlen_q, f.seqlen_k, f.heads_q, f.heads_kv);
  uint8_t* base = static_cast<uint8_t*>(prm.workspace);
  BwdRowParams rp{};
  rp.out = f.out;
  rp.dout = prm.dout;
  rp.lse = f.lse;
  rp.dq = prm.dq;
  rp.out_stride = f.out_stride;
  rp.dout_stride = prm.dout_stride;
  rp.dq_stride = prm.dq_stride;
  rp.lse_stride_batch = f.lse_stride_batch;
  rp.lse_stride_head = f.lse_stride_head;
  rp.lse_stride_seq = f.lse_stride_seq;
  rp.dq_accum = reinterpret_cast<float*>(base + ws.dq_accum);
  rp.lse2 = reinterpret_cast<float*>(base + ws.lse2);
  rp.delta = reinterpret_cast<float*>(base + ws.delta);
  rp.dq_turn = reinterpret_cast<int*>(base + ws.dq_turn);
  rp.split_flag = reinterpret_cast<int*>(base + ws.split_flag);
  rp.seqlen_q = f.seqlen_q;
  rp.seqlen_k = f.seqlen_k;
  rp.heads_q = f.heads_q;
  rp.split_slots = bwd_dkv_slots(HeadDim, Causal, f.batch, f.seqlen_q, f.seqlen_k, f.heads_q, f.heads_kv);
  rp.m_blocks = int(m_blocks);
  rp.n_blocks = int((int64_t(f.seqlen_k) + kCfg.block_n - 1) / kCfg.block_n);
  rp.tiles = int64_t(f.batch) * f.heads_q * m_blocks;
  // Without a causal mask a chain without adders is never written; under one, chain 1 exists only where walks split.
  rp.dq_chains = Causal ? dq_chains : std::min(dq_chains, bwd_dq_adders(paired, rp.n_blocks));
  rp.chain1_m0 = bwd_dq_chain1_m0(split, Causal);
  rp.dq_tiles = rp.tiles + (rp.dq_chains > 1 ? int64_t(f.batch) * f.heads_q * (m_blocks - rp.chain1_m0) : 0);
  rp.causal = Causal;
  rp.paired = paired;
  rp.heavy_first = bwd_causal_heavy_first(HeadDim, Causal, f.heads_q, f.heads_kv);
  rp.split = split;
  rp.softmax_scale = f.softmax_scale;

  BwdKernelParams kp{};
  const TensorMapShape q_shape{HeadDim, f.seqlen_q, f.heads_q, f.batch};
  const TensorMapShape kv_shape{HeadDim, f.seqlen_k, f.heads_kv, f.batch};
  dhp_status st;
  if ((st = encode_tensor_map(&kp.q, DT, f.q, q_shape, f.q_stride, kCfg.block_m, "q")) != DHP_SUCCESS) return st;
  if ((st = encode_tensor_map(&kp.dout, DT, prm.dout, q_shape, prm.dout_stride, kCfg.block_m, "dout")) != DHP_SUCCESS)
    return st;
  if ((st = encode_tensor_map(&kp.k, DT, f.k, kv_shape, f.k_stride, kCfg.block_n, "k")) != DHP_SUCCESS) return st;
  if ((st = encode_tensor_map(&kp.v, DT, f.v, kv_shape, f.v_stride, kCfg.block_n, "v")) != DHP_SUCCESS) return st;
  if ((st = encode_tensor_map(&kp.dk, DT, prm.dk, kv_shape, prm.dk_stride, 64, "dk")) != DHP_SUCCESS) return st;
  if ((st = encode_tensor_map(&kp.dv, DT, prm.dv, kv_shape, prm.dv_stride, 64, "dv")) != DHP_SUCCESS) return st;
  kp.dq_accum = rp.dq_accum;
  kp.lse2 = rp.lse2;
  kp.delta = rp.delta;
  kp.dq_turn = rp.dq_turn;
  kp.tiles = rp.tiles;
  kp.dq_tiles = rp.dq_tiles;
  kp.dq_chains = rp.dq_chains;
  kp.chain1_m0 = rp.chain1_m0;
  kp.paired = paired;
  kp.seqlen_q = f.seqlen_q;
  kp.seqlen_k = f.seqlen_k;
  kp.heads_q = f.heads_q;
  kp.q_heads_per_kv = f.heads_q / f.heads_kv;
  kp.m_blocks = rp.m_blocks;
  kp.n_blocks = rp.n_blocks;
  kp.heads_kv = f.heads_kv;
  kp.split = split;
  kp.dkv_partial = reinterpret_cast<float*>(base + ws.dkv_partial);
  kp.split_flag = rp.split_flag;
  kp.split_slots = rp.split_slots;
  const bool heavy_first = rp.heavy_first;
  const int64_t kv_heads = int64_t(f.batch) * f.heads_kv;
  // Heavy first: the one-dimensional grid's list, over key blocks or (with pairs) 2-CTA clusters, each unit once or
  // in two head halves.
  const int heavy_units = bwd_heavy_first_units(paired, kp.n_blocks);
  kp.heavy_halves = bwd_heavy_first_halves(HeadDim, Causal, f.heads_q, f.heads_kv);
  const int64_t heavy_ctas = kv_heads * heavy_units * (paired ? 2 : 1) * (kp.heavy_halves ? 2 : 1);
  if (heavy_first && heavy_ctas > INT32_MAX)
    return fail(DHP_ERROR_INVALID_VALUE,
                "batch=%d x heads_kv=%d x ceil(seqlen_k=%d / %d) key blocks = %lld CTAs: at most 2^31 - 1 are "
                "supported", f.batch, f.heads_kv, f.seqlen_k, kCfg.block_n, (long long)heavy_ctas);
  const long long kv_head_dq_bytes = 4ll * f.heads_q / f.heads_kv * f.seqlen_q * HeadDim;
  if (heavy_first) kp.order = TileOrder::make(heavy_units, bwd_causal_section_heads(kv_heads, kv_head_dq_bytes));
  constexpr float kLog2e = 1.4426950408889634f;
  kp.scale_log2 = f.softmax_scale * kLog2e;
  kp.softmax_scale = f.softmax_scale;

  auto kernel = attention_bwd_kernel<T, HeadDim, Causal, false>;
  err = reserve_backward_smem<attention_bwd_kernel<T, HeadDim, Causal, false>>(K::kSmemBytes);
  if constexpr (Causal)
    if (heavy_first && err == cudaSuccess) {
      kernel = attention_bwd_kernel<T, HeadDim, Causal, true>;
      err = reserve_backward_smem<attention_bwd_kernel<T, HeadDim, Causal, true>>(K::kSmemBytes);
    }
  if (err != cudaSuccess)
    return fail(DHP_ERROR_CUDA, "could not reserve %zu bytes of shared memory for the backward kernel: %s",
                K::kSmemBytes, cudaGetErrorString(err));

  // Grid x: a head's CTAs, or heavy first every (batch, K/V head)'s; under a causal mask its units of split walks.
  const int head_ctas = Causal ? split.units() << int(paired) : paired ? (kp.n_blocks + 1) / 2 * 2 : kp.n_blocks;

  // The main and post kernels launch with programmatic stream serialisation (programmatic dependent launch): the main
  // kernel's CTAs start as the prep kernel's leave and wait for it (griddepcontrol.wait); the post kernel's CTAs
  // start in the SMs the main kernel's last CTAs leave, each waiting for its tile's turn counters to reach their ends,
  // so the dQ conversion runs under the main kernel's last wave.
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[0].val.programmaticStreamSerializationAllowed = 1;
  attrs[1].id = cudaLaunchAttributeClusterDimension;
  attrs[1].val.clusterDim.x = paired ? 2 : 1;
  attrs[1].val.clusterDim.y = attrs[1].val.clusterDim.z = 1;
  const dim3 row_grid(unsigned(rp.m_blocks), unsigned(f.heads_q), unsigned(f.batch));
  attention_bwd_prep_kernel<T, HeadDim><<<row_grid, kRowKernelThreads, 0, stream>>>(rp);
  cudaLaunchConfig_t config{};
  config.gridDim = heavy_first ? dim3(unsigned(heavy_ctas))
                               : dim3(unsigned(head_ctas), unsigned(f.heads_kv), unsigned(f.batch));
  config.blockDim = dim3(kCfg.threads());
  config.dynamicSmemBytes = K::kSmemBytes;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = paired ? 2 : 1;
  err = cudaLaunchKernelEx(&config, kernel, kp);
  if (err != cudaSuccess) return fail(DHP_ERROR_CUDA, "backward kernel launch failed: %s", cudaGetErrorString(err));
  cudaLaunchConfig_t post{};
  post.gridDim = row_grid;
  post.blockDim = dim3(kRowKernelThreads);
  post.stream = stream;
  post.attrs = attrs;
  post.numAttrs = 1;
  err = cudaLaunchKernelEx(&post, attention_bwd_post_kernel<T, HeadDim>, rp);
  if (err != cudaSuccess) return fail(DHP_ERROR_CUDA, "backward launch failed: %s", cudaGetErrorString(err));
  return succeed();
}

}  // namespace dhp::kernels
