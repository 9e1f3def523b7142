// Forward attention, sm_90a: O = softmax(Q K^T * scale [+ causal mask]) V, plus the row log-sum-exp.
//
// Persistent: the grid is one CTA per SM (at most one per tile), and the CTAs take a fixed tile list
// (tile_at) round by round, in snake order, or by a static schedule computed on the host (tile_of_round); a tile is a
// block_m x head_dim output block of one (batch, query head). The K/V ring and its barriers run on across a CTA's
// tiles, so the loads of the next tile overlap the epilogue of the current one. Warp specialisation:
//   warpgroup 0 (producer): one thread issues TMA loads — per tile Q (once the consumers have freed its
//     buffer), then K and V blocks into a ring of `stages` shared-memory slots, each slot guarded by a
//     full/empty mbarrier pair per operand; the warpgroup gives registers back (setmaxnreg.dec).
//   warpgroups 1..C (consumers): each owns 64 query rows. Per key block: S = Q K^T (wgmma, both operands
//     in shared memory), release K, mask by position, online softmax in fp32 with exp2, rescale O,
//     O += P V (wgmma with P from registers), release V. The QK^T of the next block is issued with the
//     PV of the current one, and the warpgroups take turns issuing GEMMs (named barriers), so one's
//     softmax overlaps the others' tensor-core work and, where the tile says so, its own PV. Finally O / rowsum goes to shared memory (over the
//     warpgroup's own Q rows, or through a staging buffer of its own) and out via TMA store; the LSE is stored
//     directly.
// Key blocks run from last to first so the masked blocks (causal diagonal, seqlen_k tail) come first: the first
// one is peeled out of the loop, and under a causal mask the others that need the mask run in a loop of their own
// (FwdConfig::masked_loop), so the main loop has no mask code; a warpgroup skips a first block none of its rows sees.
// A split tile (FwdConfig::split_tile: a last query tile of at most 64 rows, in a tier of its own) runs those rows on
// every consumer warpgroup, each against every kConsumers-th key block with a softmax and O of its own, and the first
// warpgroup joins the three in order: the tile takes about a third of the time of one whose other warpgroups
// compute on padding.
// Key splits (FwdConfig::key_splits, a tier of its own: seqlen_q within one query tile against many keys) pack the
// query heads of a K/V head into a tile's rows (pos) and give each tile a cluster of CTAs, each over a run of its key
// blocks (key_range); rank 0 joins the others' partial results in rank order through distributed shared memory
// (join_key_splits).
//
// Constant time: trip counts, addresses and the masking branch depend only on shapes, options and
// block indices; masking, -inf rows and NaN/inf values go through selects. Out-of-range rows and keys
// are zero-filled by TMA on load and clipped by TMA on store.
//
// Shared memory: every operand tile is stored as head_dim/64 boxes of [rows][64] elements with the
// 128-byte swizzle, each box 1024-byte aligned — the layout TMA writes and the wgmma descriptors read.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.h"
#include "hopper/smem.cuh"
#include "hopper/sync.cuh"
#include "hopper/tma.cuh"
#include "hopper/wgmma.cuh"
#include "kernels/fast_div.h"
#include "kernels/fwd_config.h"
#include "kernels/gemm.cuh"
#include "kernels/softmax.cuh"
#include "kernels/tile_order.h"
#include "params.h"
#include "tma.h"

namespace dhp::kernels {

struct FwdKernelParams {
  CUtensorMap q, k, v, out;  // 4-d (head_dim, seqlen, heads, batch) maps, 64-column boxes
  float* lse;                // nullptr: not written
  int64_t lse_stride_batch, lse_stride_head, lse_stride_seq;
  int seqlen_q, seqlen_k;
  int heads_q, q_heads_per_kv;
  int num_tiles;
  TileOrder order;
  FastDiv by_heads_q;
  float scale_log2;  // softmax_scale * log2(e)
  int key_splits;    // FwdConfig::key_splits: CTAs per tile (the cluster's size), each taking split_runs runs
  int split_runs;    // runs of split_blocks key blocks a CTA, in a row (1: one; more only for narrow tiles)
  int split_count;   // runs of a tile (key_splits * split_runs or a few less: the last CTA's may be empty)
  int split_blocks;
  int q_pack_shift;  // with key splits: log2 of the query heads of a K/V head packed into a tile's rows (pos)
  int rotate;        // split tiles: the persistent grid's rounds rotated (1) or in the snake (0) (tile_of_round)
};

// The causal kernels' parameters (but the key splits'): FwdKernelParams and a static schedule of the persistent grid
// (tile_order.h, list_schedule; launch_forward_tier chooses it), read by tile_of_round where schedule.ctas > 0.
struct FwdScheduledParams : FwdKernelParams {
  TileSchedule schedule;
};

enum class FwdBarrier : int {
  kSyncThreads = 0,    // reserved: __syncthreads
  kEpilogueFirst = 1,  // + consumer index: a consumer warpgroup's own 128 threads
  kTurnFirst = 5,      // + consumer index: "your turn to issue GEMMs" (this warpgroup + the one before)
  kSplitJoin = 15,     // a split tile's warpgroups: partial results written / read (FwdConfig::split_tile)
};

// Consumer warpgroups take turns issuing GEMMs, round robin. Each turn is wait(own barrier) -> issue ->
// pass (arrive on the next one's barrier). The last warpgroup opens by passing once, so warpgroup 0
// goes first, and skips its pass after its final turn, so every arrival is matched by a wait. All
// warpgroups run the same number of turns (the CTA's key-block count + 1), a function of shapes only.
template <int kWarpgroups>
struct GemmTurns {
  int me;
  static constexpr int kThreads = 256;
  static_assert(int(FwdBarrier::kTurnFirst) + kWarpgroups <= 16, "16 named barriers per CTA");
  __device__ static int barrier(int who) { return int(FwdBarrier::kTurnFirst) + who; }
  __device__ void first() const {
    if (me == kWarpgroups - 1) hopper::named_barrier_arrive(barrier(0), kThreads);
  }
  __device__ void wait() const { hopper::named_barrier_sync(barrier(me), kThreads); }
  __device__ void pass(bool last) const {
    if (!(last && me == kWarpgroups - 1)) hopper::named_barrier_arrive(barrier((me + 1) % kWarpgroups), kThreads);
  }
};

// The O tile's own staging buffer (FwdConfig::o_stage_boxes): a base of Smem, empty where O goes through Q's rows.
template <int Boxes, int BoxBytes>
struct alignas(1024) OStage {
  alignas(1024) uint8_t o[Boxes][BoxBytes];
};
template <int BoxBytes>
struct OStage<0, BoxBytes> {};

// A split tile's partial results (FwdConfig::split_tile) of the warpgroups after the first, which joins them: O's
// fragment, the raw row maxima and each thread's share of the row sums, register by register, thread-contiguous.
template <int Partials, int ORegs>
struct SplitPartials {
  float split_o[Partials][ORegs][128];
  float split_max[Partials][2][128];
  float split_sum[Partials][2][128];
};
template <int ORegs>
struct SplitPartials<0, ORegs> {};

// Key splits' barriers (FwdConfig::key_splits): rank 0 of a cluster waits on its split_ready for the other ranks'
// partial results (each arrives once), and each of those waits on its own split_read until rank 0 has read them.
template <bool KeySplit>
struct KeySplitBarriers {
  alignas(8) uint64_t split_ready, split_read;
};
template <>
struct KeySplitBarriers<false> {};

// A narrow key-split tile's partial results (at most kKeySplitNarrowRows packed rows: row half 0 of the first warp),
// one slot a run of the CTA's: row half 0's O registers, the raw row maximum and the thread's share of the row sum,
// register by register, thread-contiguous. A CTA takes its runs last first: those it takes before run 0 wait beside
// the ring while it reads the next (KeySplitSlots), run 0's goes over the first warpgroup's Q rows (FwdKernel::run_slot).
static_assert(kKeySplitNarrowRows <= 8, "a narrow tile's rows: row half 0 of the first warp");
template <int HeadDim>
struct KeySplitSlot {
  float o[HeadDim / 4][32];
  float max[32];
  float sum[32];
};
template <int Runs, int HeadDim>
struct KeySplitSlots {
  KeySplitSlot<HeadDim> slot[Runs];
};
template <int HeadDim>
struct KeySplitSlots<0, HeadDim> {};

template <class T, int HeadDim, bool Causal, int Tier>
struct FwdKernel {
  static constexpr FwdConfig kCfg = fwd_config(HeadDim, Causal, Tier);
  static constexpr int kBlockM = kCfg.block_m;
  static constexpr int kBlockN = kCfg.block_n;
  static constexpr int kStages = kCfg.stages;
  static constexpr int kConsumers = kCfg.consumer_warpgroups;
  static constexpr int kQBuffers = kCfg.q_buffers;
  static constexpr int kBoxes = HeadDim / 64;              // 64-column (128-byte) boxes per row
  static constexpr int kWgRows = 64;                       // query rows per consumer warpgroup
  // Under a causal mask, a tile's first key block is masked and softmaxed on its first half alone where no row of
  // a warpgroup sees the second half (second_half_unseen); the half is whole k16 steps of the PV GEMM.
  static constexpr bool kHalfFirstBlock = Causal && kCfg.half_first_block;
  // Under a causal mask, a warpgroup skips a tile's first key block where none of its rows sees it (block_unseen).
  // Where block_n is a multiple of block_m, the first block holds the tile's whole diagonal (seqlen_q = seqlen_k),
  // of which every warpgroup sees a part: there the branch is left out (it would be taken for uneven seqlens only).
  static constexpr bool kMaySkipFirstBlock = Causal && kBlockN % kBlockM != 0;
  static constexpr bool kMaskedLoop = Causal && kCfg.masked_loop;  // consume_tile, next_block
  static constexpr bool kSplitTile = kCfg.split_tile;  // split_tile
  static constexpr bool kKeySplit = kCfg.key_splits;   // key_range
  static constexpr int kMaxRuns = kKeySplit ? fwd_key_split_max_runs(HeadDim) : 1;  // runs a CTA (join_key_splits)
  // A static schedule in the parameters (FwdScheduledParams, tile_of_round; fwd_config.h, fwd_scheduled), or the small
  // parameters (tile_order.h, TileSchedule, says why).
  static constexpr bool kScheduled = fwd_scheduled(HeadDim, Causal, Tier);
  using Params = std::conditional_t<kScheduled, FwdScheduledParams, FwdKernelParams>;
  // A split tile of at most 8 rows (FwdConfig::split_rows) joins its warpgroups through row half 0's partials alone, in
  // a key split's slot (split_join_slot).
  static constexpr bool kNarrowSplit = kSplitTile && kCfg.split_rows <= 8;
  static_assert(!kNarrowSplit || (kKeySplit && kConsumers == 2), "narrow split tiles: key splits' two warpgroups");
  static constexpr int kBoxBytesQ = kWgRows * 128;         // one box of a warpgroup's Q (or O) rows
  static constexpr int kBoxBytesKV = kBlockN * 128;        // one box of a K or V block
  // With a staging buffer of its own, O leaves in passes of kOPassBoxes boxes, and a warpgroup's Q rows are free
  // once its last QK^T has completed (the next tile's Q loads under the last P V and the epilogue); without one, O
  // goes out through the Q rows, which are free once that store has read them.
  static constexpr bool kOwnOStage = kCfg.o_stage_boxes > 0;
  static constexpr int kOPassBoxes = kOwnOStage ? kCfg.o_stage_boxes : kBoxes;
  static constexpr uint32_t kQBytes = kCfg.tile_bytes(kBlockM, sizeof(T));
  static constexpr uint32_t kKVBytes = kCfg.tile_bytes(kBlockN, sizeof(T));

  struct alignas(1024) Smem : OStage<kOwnOStage ? kConsumers * kOPassBoxes : 0, kBoxBytesQ>,
                              SplitPartials<kSplitTile && !kNarrowSplit ? kConsumers - 1 : 0, HeadDim / 2>,
                              KeySplitBarriers<kCfg.key_splits>,
                              KeySplitSlots<kMaxRuns - 1, HeadDim> {
    alignas(1024) uint8_t q[kQBuffers][kConsumers][kBoxes][kBoxBytesQ];  // reused for the O tile in the epilogue
    alignas(1024) uint8_t k[kStages][kBoxes][kBoxBytesKV];
    alignas(1024) uint8_t v[kStages][kBoxes][kBoxBytesKV];
    alignas(8) uint64_t q_full[kQBuffers], q_empty[kQBuffers];
    uint64_t k_full[kStages], k_empty[kStages];
    uint64_t v_full[kStages], v_empty[kStages];
  };
  static constexpr size_t kSmemBytes = sizeof(Smem) + 1024;  // + slack to align the dynamic base
  static_assert(kSmemBytes <= 232448, "shared memory over the 227 KB per-block limit");
  static_assert(kBoxBytesKV % 1024 == 0 && kBoxBytesQ % 1024 == 0, "boxes must keep 1024-byte alignment");
  static_assert(kConsumers >= 2 && int(FwdBarrier::kEpilogueFirst) + kConsumers <= int(FwdBarrier::kTurnFirst) &&
                    int(FwdBarrier::kTurnFirst) + kConsumers <= int(FwdBarrier::kSplitJoin),
                "named-barrier ids of the epilogue, the GEMM turns and the split join must not overlap");
  static_assert(!kSplitTile || !kOwnOStage, "a split tile's O leaves through the first warpgroup's Q rows");
  // A key split's partial results (kKeySplit): O's fragments, the raw row maxima and each thread's share of the row
  // sums, register by register, thread-contiguous, over the Q buffer and the K/V ring (k follows q, v follows k), which
  // a CTA that does not store reads no more once its last P V is done.
  struct KeySplitPartials {
    float o[kConsumers][HeadDim / 2][128];
    float max[kConsumers][2][128];
    float sum[kConsumers][2][128];
  };
  static_assert(!kKeySplit || (sizeof(KeySplitPartials) <= kQBuffers * kConsumers * kBoxes * kBoxBytesQ +
                                                            2 * kStages * kBoxes * kBoxBytesKV &&
                                !kOwnOStage),
                "a key split's partial results must fit the Q buffer and the K/V ring");

  static_assert(!kKeySplit || sizeof(KeySplitSlot<HeadDim>) <= sizeof(Smem::q[0][0]),
                "a narrow tile's last run's partial goes over the first warpgroup's Q rows");
  // The shared-window address of the slot of the CTA's run `run` (KeySplitSlot; thread t's elements 4 t bytes further:
  // store_slot, join_peer_o). A CTA takes its runs last first (consume), so run 0's comes last and goes over the first
  // warpgroup's Q rows, which its QK^Ts have all read by then (a split tile's other warpgroups read Q rows of their
  // own); run r > 0 waits in slot r - 1 beside the ring.
  __device__ static uint32_t run_slot(Smem& s, int run) {
    const uint32_t q = static_cast<uint32_t>(__cvta_generic_to_shared(s.q[0][0]));
    if constexpr (kMaxRuns > 1) return run == 0 ? q : static_cast<uint32_t>(__cvta_generic_to_shared(&s.slot[run - 1]));
    return q;
  }
  // A narrow split tile's join (kNarrowSplit) of the CTA's run `run`: the second warpgroup's partial goes to the run's
  // own slot, which takes the joined partial after it (run > 0), or for run 0, the last the CTA takes, over the second
  // warpgroup's Q rows, which it reads no more.
  __device__ static uint32_t split_join_slot(Smem& s, int run) {
    return run == 0 ? static_cast<uint32_t>(__cvta_generic_to_shared(s.q[0][kConsumers - 1])) : run_slot(s, run);
  }
  static constexpr int kSlotMax = int(offsetof(KeySplitSlot<HeadDim>, max));
  static constexpr int kSlotSum = int(offsetof(KeySplitSlot<HeadDim>, sum));
  // A narrow partial into thread `t`'s elements of the slot at `slot` (run_slot + 4 t): row half 0's O registers, the
  // row maximum and this thread's share of the row sum.
  template <class Softmax, int... J>
  __device__ static void store_slot(uint32_t slot, const float (&acc_o)[HeadDim / 2], const Softmax& softmax,
                                    std::integer_sequence<int, J...>) {
    (hopper::store_shared_f32<J * 32 * int(sizeof(float))>(slot, acc_o[partial_reg<true>(J)]), ...);
    hopper::store_shared_f32<kSlotMax>(slot, softmax.row_max[0]);
    hopper::store_shared_f32<kSlotSum>(slot, softmax.row_sum[0]);
  }

  struct Tile {
    int m_block, head, batch;
  };

  // The tile at list position t (tile_order.h): sections of one head on the persistent grid without a causal mask
  // (the list goes head by head and concurrently running CTAs share K/V in L2), of one head, several or all under a
  // causal mask (launch_forward_tier).
  __device__ static Tile tile_at(const FwdKernelParams& p, int t) {
    const TileOrder::Position pos = p.order.at(t);
    const int batch = p.by_heads_q.div(pos.head);
    return {pos.m_block, pos.head - batch * p.heads_q, batch};
  }

  // The CTA's tile of round k (G = gridDim.x tiles per round): position c = blockIdx.x in even rounds and
  // G-1-c in odd ones, so a CTA that drew an expensive causal tile in one round draws a cheap one in the
  // next even when G is a multiple of the number of query blocks. With split tiles (FwdConfig::split_tile: one a
  // head, its first in the list, taking about a third of a tile's time) position (c + k) mod G instead, always without
  // a mask and under one where p.rotate says (launch_forward_tier): where G is a multiple of the query blocks (132
  // SMs, 6 or 22 tiles a head) the snake gives every split tile to the same few CTAs, the rotation deals them to all
  // in turn (counted by list scheduling, head_dim 64 at 1k: the busiest CTA's 24 tiles either way with the snake, 21.8
  // tile times with the rotation). With a static schedule (kScheduled, schedule.ctas > 0), the CTA's k-th position of
  // it. -1 once past the list or the CTA's part of the schedule (only the last round can be partial, so the first -1
  // ends the CTA's work).
  __device__ static int tile_of_round(const FwdKernelParams& p, int k) {
    if constexpr (kKeySplit) return k == 0 ? int(blockIdx.x) / p.key_splits : -1;  // one tile a CTA, a cluster a tile
    if constexpr (kScheduled) {  // a static schedule: the CTA's k-th position of it
      const TileSchedule& schedule = static_cast<const FwdScheduledParams&>(p).schedule;
      if (schedule.ctas > 0) {
        const int i = schedule.start[blockIdx.x] + k;
        return i < schedule.start[blockIdx.x + 1] ? int(schedule.tile[i]) : -1;
      }
    }
    const int64_t t = int64_t(k) * gridDim.x + (kSplitTile && (!Causal || p.rotate) ? (blockIdx.x + k) % gridDim.x
                                                : (k & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
    return t < p.num_tiles ? int(t) : -1;
  }

  // A tile row's query position: rows are positions, or with key splits (kKeySplit) (position, head) pairs of the
  // 2^q_pack_shift query heads of a K/V head that a tile packs, the heads innermost (tma.h's 5-d maps of q and out).
  __device__ static int64_t pos(const FwdKernelParams& p, int64_t row) {
    return kKeySplit ? row >> p.q_pack_shift : row;
  }

  // Whether the tile is split: its rows all fall to its first warpgroup (the last query block, seqlen_q's last 64
  // rows or fewer; with key splits, 64 packed rows or fewer), so every warpgroup takes those rows, against every
  // kConsumers-th of the key blocks, and the first joins their results in warpgroup order. Shapes only: a row's result
  // depends on seqlen_q (and the packing) through it, never on values or on the rest of the batch.
  // A key-split tile of at most kKeySplitNarrowRows packed rows (join_key_splits); a split tile.
  __device__ static bool narrow_tile(const FwdKernelParams& p) {
    return (int64_t(p.seqlen_q) << p.q_pack_shift) <= kKeySplitNarrowRows;
  }
  __device__ static bool split_tile(const FwdKernelParams& p, int m_block) {
    const int64_t rows = kKeySplit ? int64_t(p.seqlen_q) << p.q_pack_shift : int64_t(p.seqlen_q);
    return kSplitTile && int64_t(m_block) * kBlockM + kCfg.split_rows >= rows;
  }

  // Position in the K/V ring, counted over all key blocks of all the CTA's tiles.
  struct RingPos {
    int count;
    __device__ int stage() const { return count % kStages; }
    __device__ uint32_t phase() const { return (count / kStages) & 1; }
  };

  // Number of key blocks the tile's rows can see (a function of shapes and m_block only).
  __device__ static int key_blocks(const FwdKernelParams& p, int m_block) {
    const int all = (p.seqlen_k + kBlockN - 1) / kBlockN;
    if (!Causal) return all;
    const int64_t last_col = pos(p, int64_t(m_block + 1) * kBlockM - 1) + p.seqlen_k - p.seqlen_q;
    return last_col < 0 ? 0 : int(min(int64_t(all), last_col / kBlockN + 1));
  }

  // Whether no row of warpgroup `consumer` sees the second half of key block n_block (on the causal diagonal: the
  // first rows of a tile). Shapes and block indices only. The result is the same bits either way: the unseen half
  // would be -inf in S, 0 in P, and would add nothing to the row's maximum and sum.
  __device__ static bool second_half_unseen(const FwdKernelParams& p, int m_block, int consumer, int n_block) {
    const int64_t last_row = pos(p, int64_t(m_block) * kBlockM + (consumer + 1) * kWgRows - 1);
    const int64_t limit = Causal ? min(int64_t(p.seqlen_k), last_row + 1 + p.seqlen_k - p.seqlen_q) : int64_t(p.seqlen_k);
    return limit <= int64_t(n_block) * kBlockN + kBlockN / 2;
  }

  // Whether no row of warpgroup `consumer` sees any key of block n_block (causal: the diagonal's last keys, beyond
  // the warpgroup's last row). Shapes and block indices only; as for second_half_unseen, skipping such a block gives
  // the same bits: it would be -inf in S and 0 in P.
  __device__ static bool block_unseen(const FwdKernelParams& p, int m_block, int consumer, int n_block) {
    const int64_t last_row = pos(p, int64_t(m_block) * kBlockM + (consumer + 1) * kWgRows - 1);
    return Causal && last_row + 1 + p.seqlen_k - p.seqlen_q <= int64_t(n_block) * kBlockN;
  }

  // The key blocks a CTA takes of its tile: all, or with key splits (kKeySplit) its cluster rank's split_runs runs of
  // split_blocks (the tile's runs rank * split_runs on), up to (not including) block `end`, `count` of them; or of
  // those, run `run` alone (run_range). Shapes and the rank only.
  struct KeyRange {
    int end, count;
  };
  __device__ static KeyRange key_range(const FwdKernelParams& p, int m_block) {
    const int all = key_blocks(p, m_block);
    if constexpr (!kKeySplit) return {all, all};
    const int begin = min(all, int(hopper::cluster_rank()) * p.split_runs * p.split_blocks);
    const int end = min(all, begin + p.split_runs * p.split_blocks);
    return {end, end - begin};
  }
  __device__ static KeyRange run_range(const FwdKernelParams& p, int m_block, int run) {
    const int all = key_blocks(p, m_block);
    const int begin = min(all, (int(hopper::cluster_rank()) * p.split_runs + run) * p.split_blocks);
    const int end = min(all, begin + p.split_blocks);
    return {end, end - begin};
  }

  // How many of the n_blocks key blocks from block `begin` on need no mask (block_needs_mask false: the lowest ones).
  __device__ static int unmasked_blocks(const FwdKernelParams& p, int m_block, int begin, int n_blocks) {
    const int64_t first_row_limit = pos(p, int64_t(m_block) * kBlockM) + p.seqlen_k - p.seqlen_q;
    const int64_t whole = min(int64_t(p.seqlen_k), first_row_limit + 1) / kBlockN;
    return int(max(int64_t(0), min(int64_t(n_blocks), whole - begin)));
  }

  __device__ static bool block_needs_mask(const FwdKernelParams& p, int m_block, int n_block) {
    const int64_t block_end = int64_t(n_block + 1) * kBlockN;
    const int64_t first_row_limit = pos(p, int64_t(m_block) * kBlockM) + p.seqlen_k - p.seqlen_q;
    return block_end > p.seqlen_k || (Causal && block_end - 1 > first_row_limit);
  }

  __device__ static void produce(const FwdKernelParams& p, Smem& s) {
    RingPos ring{0};
    int tile_count = 0;
    for (int k = 0;; ++k) {
      const int t = tile_of_round(p, k);
      if (t < 0) break;
      const Tile tile = tile_at(p, t);
      const KeyRange keys = key_range(p, tile.m_block);
      const int kv_head = tile.head / p.q_heads_per_kv;
      const int qb = tile_count % kQBuffers;
      const int wg_rows = split_tile(p, tile.m_block) ? 0 : kWgRows;  // a split tile: the first 64 rows for all
      hopper::mbarrier_wait(&s.q_empty[qb], ((tile_count / kQBuffers) & 1) ^ 1);
      hopper::mbarrier_arrive_expect_tx(&s.q_full[qb], kQBytes);
      for (int wg = 0; wg < kConsumers; ++wg)
        for (int b = 0; b < kBoxes; ++b) {
          const int row0 = tile.m_block * kBlockM + wg * wg_rows;
          if constexpr (kKeySplit)
            hopper::tma_load_5d(s.q[qb][wg][b], &p.q, b * 64, 0, tile.head, int(pos(p, row0)), tile.batch,
                                &s.q_full[qb]);
          else if constexpr (kCfg.q_o_evict_first)
            hopper::tma_load_4d_hint(s.q[qb][wg][b], &p.q, b * 64, row0, tile.head, tile.batch, &s.q_full[qb],
                                     hopper::kL2EvictFirst);
          else
            hopper::tma_load_4d(s.q[qb][wg][b], &p.q, b * 64, row0, tile.head, tile.batch, &s.q_full[qb]);
        }

      for (int it = 0; it < keys.count; ++it, ++ring.count) {
        const int n_block = keys.end - 1 - it;
        const int stage = ring.stage();
        hopper::mbarrier_wait(&s.k_empty[stage], ring.phase() ^ 1);
        hopper::mbarrier_arrive_expect_tx(&s.k_full[stage], kKVBytes);
        for (int b = 0; b < kBoxes; ++b)
          hopper::tma_load_4d(s.k[stage][b], &p.k, b * 64, n_block * kBlockN, kv_head, tile.batch, &s.k_full[stage]);
        hopper::mbarrier_wait(&s.v_empty[stage], ring.phase() ^ 1);
        hopper::mbarrier_arrive_expect_tx(&s.v_full[stage], kKVBytes);
        for (int b = 0; b < kBoxes; ++b)
          hopper::tma_load_4d(s.v[stage][b], &p.v, b * 64, n_block * kBlockN, kv_head, tile.batch, &s.v_full[stage]);
      }
      ++tile_count;
    }
  }

  // A Q buffer holds the O tile until its TMA store has read it. With one Q buffer the epilogue waits for that
  // and frees the buffer at once (the producer needs it for the next tile). With two it hands the wait to the next
  // tile, which does it under its first QK^T: the producer needs the buffer only for the tile after next. With O's
  // own staging buffer the Q buffer is freed earlier (consume_tile) and the next tile waits for the store's last
  // pass, under its first QK^T, before it writes that buffer again.
  static constexpr bool kDeferStoreWait = kQBuffers >= 2 || kOwnOStage;
  struct PendingStore {
    int qb = -1;  // the Q buffer to free, -1 if none
    // Whether a store from shared memory is in flight. An int in the split tier's kernel: there ptxas packed the bool
    // into the low byte of a register that held a row sum (PRMT), which the SASS audit, tracking whole registers,
    // takes for a value reaching the branch around the store wait. The other kernels keep their code as it was.
    std::conditional_t<kSplitTile, int, bool> stored = false;
  };
  // Thread 0 of a consumer warpgroup: the store has read shared memory; the producer may refill the Q buffer (with
  // O's own buffer, freed already).
  __device__ static void free_q_buffer(Smem& s, const PendingStore& pending) {
    if constexpr (kOwnOStage) {
      if (pending.stored) hopper::tma_store_wait_read();
      return;
    }
    if (pending.qb < 0) return;
    if (pending.stored) hopper::tma_store_wait_read();
    hopper::mbarrier_arrive(&s.q_empty[pending.qb]);
  }
  // The box of shared memory that column box b of this warpgroup's O tile passes through.
  __device__ static uint8_t* o_box(Smem& s, int consumer, uint8_t (&q_tile)[kBoxes][kBoxBytesQ], int b) {
    if constexpr (kOwnOStage) return s.o[consumer * kOPassBoxes + b % kOPassBoxes];
    return q_tile[b];
  }

  __device__ static void consume(const FwdKernelParams& p, Smem& s, int consumer) {
    RingPos ring{0};
    int tile_count = 0;
    PendingStore pending;
    if constexpr (kMaxRuns > 1) {
      // One tile. A narrow one (narrow_tile: a split tile) takes the CTA's runs of it one after another on the same
      // Q, the last first (the producer's blocks run from the CTA's last key down), in code of its own
      // (consume_tile's Narrow: the split path alone; with the pipelined path beside it, head_dim 256 spilled).
      const Tile tile = tile_at(p, tile_of_round(p, 0));
      const int last = narrow_tile(p) ? p.split_runs - 1 : 0;
      const KeyRange keys = run_range(p, tile.m_block, last);
      pending = narrow_tile(p) ? consume_tile<true>(p, s, consumer, tile, keys, last, ring, 0, PendingStore{})
                               : consume_tile(p, s, consumer, tile, keys, last, ring, 0, PendingStore{});
    }
    for (int k = 0; kMaxRuns == 1; ++k) {
      const int t = tile_of_round(p, k);
      if (t < 0) break;
      const Tile tile = tile_at(p, t);
      const KeyRange keys = key_range(p, tile.m_block);
      pending = consume_tile(p, s, consumer, tile, keys, 0, ring, tile_count++, pending);
      ring.count += keys.count;
    }
    if (threadIdx.x % 128 == 0) free_q_buffer(s, pending);  // no store may read shared memory after exit
  }

  // O's register of a partial's j-th: all of them (j), or a narrow slot's row half 0 alone (KeySplitSlot).
  template <bool Narrow>
  __device__ static constexpr int partial_reg(int j) {
    return Narrow ? (j / 2) * 4 + j % 2 : j;
  }
  // O = O * mine + O_peer * theirs over the registers of a partial (all, or with Narrow row half 0's), O_peer's j-th at
  // byte 4 j Threads from `peer_o` (the thread-contiguous layouts of KeySplitPartials and KeySplitSlot) in a CTA's
  // shared memory (distributed: this one's or another's): immediate offsets from one address register.
  template <bool Narrow, int... J>
  __device__ static void join_peer_o(float (&acc_o)[HeadDim / 2], uint32_t peer_o, const float (&mine)[2],
                                     const float (&theirs)[2], std::integer_sequence<int, J...>) {
    using FragO = AccFragment<HeadDim>;
    constexpr int kStride = (Narrow ? 32 : 128) * int(sizeof(float));
    ((acc_o[partial_reg<Narrow>(J)] =
          fmaf(hopper::load_peer_f32<J * kStride>(peer_o), theirs[FragO::row_half(partial_reg<Narrow>(J))],
               acc_o[partial_reg<Narrow>(J)] * mine[FragO::row_half(partial_reg<Narrow>(J))])),
     ...);
  }

  // Key splits (kKeySplit): every CTA of the cluster but rank 0 leaves its partial results in its shared memory and
  // arrives on rank 0's split_ready; rank 0 joins them into its own in rank order (distributed shared memory), frees
  // the others (their split_read) and goes on to store the tile. Only the threads with a row below seqlen_q (`row`:
  // their first; the second is 8 below) take part in the exchange. Returns whether this CTA stores the tile. Trip
  // counts and the rows taking part are functions of shapes.
  // A narrow tile (kKeySplitNarrowRows packed rows or fewer, every one in row half 0 of the first warp) may give a CTA
  // several runs (split_runs, chosen with the batch), which it takes last first: each run's partial goes to a slot of
  // its own (run_slot) but rank 0's run 0, the last it takes, and rank 0 joins the tile's runs into that one in order.
  // The joins are the same arithmetic on the same partials whatever the runs a CTA: the bits do not depend on
  // split_runs.
  template <bool Narrow, class Softmax>
  __device__ static bool join_key_splits(const FwdKernelParams& p, Smem& s, int consumer, int row, bool split, int run,
                                         float (&acc_o)[HeadDim / 2], Softmax& softmax) {
    using FragO = AccFragment<HeadDim>;
    const int t = threadIdx.x % 128;
    const int threads = split ? 128 : 128 * kConsumers;  // a split tile's other warpgroups are done
    const bool live = row < p.seqlen_q;
    if constexpr (Narrow) {
      if (live && hopper::cluster_rank() != 0)  // runs 1.. are in their slots (consume_tile)
        store_slot(run_slot(s, 0) + 4 * t, acc_o, softmax, std::make_integer_sequence<int, HeadDim / 4>{});
    } else {
      hopper::named_barrier_sync(int(FwdBarrier::kSplitJoin), threads);  // every K/V block has been read
      KeySplitPartials& part = *reinterpret_cast<KeySplitPartials*>(s.q);
      if (hopper::cluster_rank() != 0 && live) {
#pragma unroll
        for (int i = 0; i < FragO::kRegs; ++i) part.o[consumer][i][t] = acc_o[i];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          part.max[consumer][h][t] = softmax.row_max[h];
          part.sum[consumer][h][t] = softmax.row_sum[h];
        }
      }
    }
    if (hopper::cluster_rank() != 0) {
      hopper::named_barrier_sync(int(FwdBarrier::kSplitJoin), threads);
      if (threadIdx.x == 128) {
        hopper::fence_cluster();
        hopper::mbarrier_arrive_peer(hopper::map_to_rank(&s.split_ready, 0));
      }
      hopper::mbarrier_wait(&s.split_read, 0);  // the shared memory stays until rank 0 has read it
      return false;
    }
    hopper::mbarrier_wait_cluster(&s.split_ready, 0);
    // The tile's run r: CTA `rank`'s run `run` (a tile that is not narrow has a run a CTA).
    for (int r = 1, rank = 0, run = 0; live && r < p.split_count; ++r) {
      if (++run == (Narrow ? p.split_runs : 1)) run = 0, ++rank;
      float other_max[2], other_sum[2];
      uint32_t peer_o;
      if constexpr (Narrow) {
        peer_o = hopper::map_to_rank(run_slot(s, run) + 4 * t, uint32_t(rank));
        other_max[0] = other_max[1] = hopper::load_peer_f32<kSlotMax>(peer_o);
        other_sum[0] = other_sum[1] = hopper::load_peer_f32<kSlotSum>(peer_o);
      } else {
        KeySplitPartials& part = *reinterpret_cast<KeySplitPartials*>(s.q);
        const uint32_t peer = hopper::map_to_rank(&part, uint32_t(rank));
        auto at = [&](const float& local) {
          return peer + uint32_t(reinterpret_cast<const char*>(&local) - reinterpret_cast<const char*>(&part));
        };
#pragma unroll
        for (int h = 0; h < 2; ++h) other_max[h] = hopper::load_peer_f32(at(part.max[consumer][h][t]));
#pragma unroll
        for (int h = 0; h < 2; ++h) other_sum[h] = hopper::load_peer_f32(at(part.sum[consumer][h][t]));
        peer_o = at(part.o[consumer][0][t]);
      }
      float mine[2], theirs[2];
      softmax.join(other_max, other_sum, mine, theirs);
      join_peer_o<Narrow>(acc_o, peer_o, mine, theirs, std::make_integer_sequence<int, HeadDim / (Narrow ? 4 : 2)>{});
    }
    hopper::named_barrier_sync(int(FwdBarrier::kSplitJoin), threads);  // every peer's partials have been read
    if (threadIdx.x == 128)
      for (int rank = 1; rank < p.key_splits; ++rank)
        hopper::mbarrier_arrive_peer(hopper::map_to_rank(&s.split_read, uint32_t(rank)));
    return true;
  }

  // One tile for one consumer warpgroup: its 64 query rows against the tile's key blocks (taken from the
  // ring from `ring` on), then the epilogue, which frees the Q buffer for the producer (at once, or under the
  // next tile's first QK^T: the returned PendingStore, kDeferStoreWait). `previous` is the last tile's. With key
  // splits, one of the CTA's runs (`run`, keys) of the tile, of which the last joins them.
  // Narrow: a narrow key-split tile (narrow_tile), a split tile: the CTA's runs `run` (keys) down to 0, each run's
  // partial but run 0's left in its slot (run_slot) for join_key_splits. The loop over runs stays inside the split
  // path: around the whole of consume_tile, ptxas kept the ring's position in vector registers (WARPSYNC).
  template <bool Narrow = false>
  __device__ static PendingStore consume_tile(const FwdKernelParams& p, Smem& s, int consumer, const Tile& tile,
                                              KeyRange keys, int run, RingPos ring, int tile_count,
                                              PendingStore previous) {
    using FragS = AccFragment<kBlockN>;
    using FragO = AccFragment<HeadDim>;
    const int t = threadIdx.x % 128;
    const int lane = t % 32;
    int n_blocks = keys.count, key_end = keys.end;  // the blocks run from key_end - 1 down
    const bool split = Narrow || (!kNarrowSplit && split_tile(p, tile.m_block));
    const int wg_row0 = tile.m_block * kBlockM + (split ? 0 : consumer * kWgRows);  // a split tile: WG 0's rows
    const int row_in_wg = 16 * (t / 32) + lane / 4;  // row half 0; half 1 is 8 rows below
    const int qb = tile_count % kQBuffers;
    uint8_t(&q_tile)[kBoxes][kBoxBytesQ] = s.q[qb][consumer];
    const uint32_t q_base = static_cast<uint32_t>(__cvta_generic_to_shared(q_tile[0]));

    float acc_o[HeadDim / 2];
#pragma unroll
    for (int i = 0; i < HeadDim / 2; ++i) acc_o[i] = 0.f;
    OnlineSoftmax<kCfg.softmax_chains> softmax(p.scale_log2);
    float acc_s[kBlockN / 2];
    uint32_t p_frag[kBlockN / 16][4];
    GemmTurns<kConsumers> turns{consumer};

    // The first `Cols` columns of S (all of them, or a first block's first half): the leading registers of the
    // fragment, whose column mapping does not depend on its width.
    using AllCols = std::integral_constant<int, kBlockN>;
    using HalfCols = std::integral_constant<int, kBlockN / 2>;
    auto cols_of_s = [&](auto cols) -> float(&)[decltype(cols)::value / 2] {
      return *reinterpret_cast<float(*)[decltype(cols)::value / 2]>(acc_s);
    };
    // Masks the first `cols` columns of key block `n_block` of S by position (-inf where a row may not see a key).
    auto mask = [&](int n_block, auto cols) {
      constexpr int kCols = decltype(cols)::value;
      float(&s_cols)[kCols / 2] = cols_of_s(cols);
      if (block_needs_mask(p, tile.m_block, n_block)) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = pos(p, wg_row0 + row_in_wg + 8 * h);
          const int64_t limit = Causal ? min(int64_t(p.seqlen_k), row + 1 + p.seqlen_k - p.seqlen_q)
                                         : int64_t(p.seqlen_k);
          // Column col(i, lane) = col(i, 0) + col(0, lane): the lane's offset comes off the limit, so each register
          // is compared with a constant (masked loops 29-37 instructions shorter a block; H100, bf16, 2026-11-27,
          // eight alternating rounds with an A/A tree: causal d64 512-4k +0.7..+1.7%, the rest even).
          const int limit_in_block =
              int(max(int64_t(-1), min(int64_t(kBlockN), limit - int64_t(n_block) * kBlockN))) - FragS::col(0, lane);
#pragma unroll
          for (int i = 0; i < kCols / 2; ++i)
            if (FragS::row_half(i) == h) s_cols[i] = FragS::col(i, 0) < limit_in_block ? s_cols[i] : -INFINITY;
        }
      }
    };
    auto mask_and_softmax = [&](int n_block, float (&rescale)[2], auto cols) {
      mask(n_block, cols);
      softmax.step<decltype(cols)::value>(cols_of_s(cols), rescale);
    };
    auto pack_p = [&] {
#pragma unroll
      for (int k = 0; k < kBlockN / 16; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) p_frag[k][j] = hopper::pack2<T>(acc_s[8 * k + 2 * j], acc_s[8 * k + 2 * j + 1]);
    };
    auto rescale_o = [&](const float (&rescale)[2]) {
#pragma unroll
      for (int i = 0; i < FragO::kRegs; ++i) acc_o[i] *= rescale[FragO::row_half(i)];
    };
    // Each issue is one wgmma group: fence (registers touched since), the k16 steps, commit.
    // With kCfg.q_registers, the pipelined key-block loop's QK^Ts read Q from registers (q_frag), which load_q fills
    // under the tile's first QK^T (from shared memory, as every QK^T of a split tile: in the key-split tier's split
    // loop ptxas gave the fragments' registers to the softmax, whose values the next QK^T then read;
    // test_machine_code checks every loop that reads them).
    using QInRegisters = std::bool_constant<kCfg.q_registers>;
    uint32_t q_frag[HeadDim / 16][4];  // unused, so no registers, without kCfg.q_registers
    // k16 step j's fragment: four 8 x 8 matrices (ldmatrix_x4), rows 0-7 / 8-15 of the warp's 16 by columns 16 j to
    // 16 j + 7 / + 15; lane l gives row l % 8 of matrix l / 8, its 16-byte chunk swizzled (chunk c ^ (row % 8)).
    auto load_q = [&] {
      if constexpr (kCfg.q_registers) {
        const int row = 16 * (t / 32) + lane % 8 + 8 * (lane / 8 % 2);
#pragma unroll
        for (int j = 0; j < HeadDim / 16; ++j) {
          const int chunk = (16 * j % 64) / 8 + lane / 16;
          hopper::ldmatrix_x4(q_frag[j], q_base + (16 * j / 64) * kBoxBytesQ + row * 128 + ((chunk ^ (row % 8)) * 16));
        }
      }
    };
    auto issue_qk = [&](int stage, auto q_in_registers) {
      hopper::wgmma_fence();
      const uint32_t k_base = static_cast<uint32_t>(__cvta_generic_to_shared(s.k[stage][0]));
      if constexpr (decltype(q_in_registers)::value)
        gemm_rs_kmajor<T, HeadDim, kBlockN, kBoxBytesKV>(acc_s, q_frag, k_base);
      else
        gemm_kmajor<T, HeadDim, kBlockN, kBoxBytesQ, kBoxBytesKV>(acc_s, q_base, k_base);
      hopper::wgmma_commit();
    };
    auto issue_pv = [&](int stage) {
      hopper::wgmma_fence();
      gemm_rs_nmajor<T, kBlockN, HeadDim, kBoxBytesKV>(acc_o, p_frag,
                                                        static_cast<uint32_t>(__cvta_generic_to_shared(s.v[stage][0])));
      hopper::wgmma_commit();
    };
    // After every wgmma group has completed: O is final for this block, and V's slot goes back.
    auto retire_pv = [&](int stage) {
      hopper::wgmma_wait<0>();
      hopper::fence_registers(acc_o);
      hopper::mbarrier_arrive(&s.v_empty[stage]);
    };

    // Pipeline, per warpgroup: S(j+1) = Q K(j+1)^T and O += P(j) V(j) are issued together, O's rescale by the
    // softmax of S(j) just before the PV. GemmTurns makes the warpgroups issue in turn, so one's softmax hides
    // under the others' GEMMs; with kCfg.softmax_under_pv it also overlaps its own P(j) V(j). That needs a
    // branch between the softmax and the wait for P(j) V(j), since ptxas hoists a wgmma wait to the top of its
    // basic block (kernel-notes.md): the wait for V(j+1) goes there (its retry loop is the branch). It never
    // depends on the release below it: V(j+1)'s slot was freed by P(j-1) V(j-1) (two or more stages).
    // With one row half under the P V (kSplitSoftmax), row half 1's exponentials follow that wait, together with
    // O's rescale (by S(j+1)'s factor, once P(j) V(j) is in O; after the first block O is still zero) and the packs
    // of P: independent work for the MUFU.EX2s to interleave with, which a softmax wholly under the P V lacks.
    constexpr bool kEarlyV = kCfg.softmax_under_pv > 0;
    constexpr bool kSplitSoftmax = kCfg.softmax_under_pv == 1;
    hopper::mbarrier_wait(&s.q_full[qb], (tile_count / kQBuffers) & 1);
    if (split) {
      if constexpr (kSplitTile) {  // compiled in the split tier's kernel alone (fwd_config.h, kTierSplitTile)
        // Key block `it` of the ring goes to warpgroup it % kConsumers, which runs it through unpipelined (QK^T, mask,
        // softmax, O's rescale, P V, each waited for), so both its slots go back when it is done; the warpgroups'
        // blocks overlap one another. The others only hand its slots back. The loop steps over the warpgroup's own
        // blocks: with a wgmma under a per-block condition instead, ptxas serialised every wgmma of the kernel.
        if (t == 0) free_q_buffer(s, previous);
        // Hands back the slots of the ring's blocks before `end` that another warpgroup takes.
        auto pass_blocks = [&](int end) {
          for (; ring.count < end; ++ring.count) {
            hopper::mbarrier_wait(&s.k_full[ring.stage()], ring.phase());
            hopper::mbarrier_arrive(&s.k_empty[ring.stage()]);
            hopper::mbarrier_wait(&s.v_full[ring.stage()], ring.phase());
            hopper::mbarrier_arrive(&s.v_empty[ring.stage()]);
          }
        };
        for (;; --run) {
          const int first = ring.count;
          for (int it = consumer; it < n_blocks; it += kConsumers) {
            pass_blocks(first + it);
            const int stage = ring.stage();
            hopper::mbarrier_wait(&s.k_full[stage], ring.phase());
            issue_qk(stage, std::false_type{});
            hopper::wgmma_wait<0>();
            hopper::fence_registers(acc_s);
            hopper::mbarrier_arrive(&s.k_empty[stage]);
            float rescale[2];
            mask_and_softmax(key_end - 1 - it, rescale, AllCols{});
            rescale_o(rescale);
            pack_p();
            hopper::mbarrier_wait(&s.v_full[stage], ring.phase());
            issue_pv(stage);
            retire_pv(stage);
            ++ring.count;
          }
          pass_blocks(first + n_blocks);
          // The join: warpgroups 1.. leave O, the row maxima and sums in shared memory; warpgroup 0 takes them in
          // order. With narrow partials (kNarrowSplit) the first warp's row half 0 alone, the tile's only rows.
          if constexpr (kNarrowSplit) {
            if (consumer > 0 && t < 32)
              store_slot(split_join_slot(s, run) + 4 * t, acc_o, softmax,
                         std::make_integer_sequence<int, HeadDim / 4>{});
          } else if (consumer > 0) {
#pragma unroll
            for (int i = 0; i < FragO::kRegs; ++i) s.split_o[consumer - 1][i][t] = acc_o[i];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              s.split_max[consumer - 1][h][t] = softmax.row_max[h];
              s.split_sum[consumer - 1][h][t] = softmax.row_sum[h];
            }
          }
          hopper::named_barrier_sync(int(FwdBarrier::kSplitJoin), 128 * kConsumers);
          if (consumer == 0 && (!kNarrowSplit || t < 32)) {
#pragma unroll
            for (int w = 0; w < kConsumers - 1; ++w) {
              float mine[2], theirs[2];
              if constexpr (kNarrowSplit) {
                const uint32_t slot = hopper::map_to_rank(split_join_slot(s, run) + 4 * t, hopper::cluster_rank());
                const float other_max[2] = {hopper::load_peer_f32<kSlotMax>(slot),
                                            hopper::load_peer_f32<kSlotMax>(slot)};
                const float other_sum[2] = {hopper::load_peer_f32<kSlotSum>(slot),
                                            hopper::load_peer_f32<kSlotSum>(slot)};
                softmax.join(other_max, other_sum, mine, theirs);
                join_peer_o<true>(acc_o, slot, mine, theirs, std::make_integer_sequence<int, HeadDim / 4>{});
              } else {
                const float other_max[2] = {s.split_max[w][0][t], s.split_max[w][1][t]};
                const float other_sum[2] = {s.split_sum[w][0][t], s.split_sum[w][1][t]};
                softmax.join(other_max, other_sum, mine, theirs);
#pragma unroll
                for (int i = 0; i < FragO::kRegs; ++i)
                  acc_o[i] = fmaf(s.split_o[w][i][t], theirs[FragO::row_half(i)], acc_o[i] * mine[FragO::row_half(i)]);
              }
            }
          }
          hopper::named_barrier_sync(int(FwdBarrier::kSplitJoin), 128 * kConsumers);  // read before the next split tile
          if (!Narrow || run == 0) break;
          // The run's partial to its slot (the tile's rows: row half 0 of the first warp), and the CTA's next run.
          if (consumer == 0 && pos(p, wg_row0 + row_in_wg) < p.seqlen_q)
            store_slot(run_slot(s, run) + 4 * t, acc_o, softmax, std::make_integer_sequence<int, HeadDim / 4>{});
          keys = run_range(p, tile.m_block, run - 1);
          n_blocks = keys.count, key_end = keys.end;
#pragma unroll
          for (int i = 0; i < HeadDim / 2; ++i) acc_o[i] = 0.f;
          softmax = OnlineSoftmax<kCfg.softmax_chains>(p.scale_log2);
        }
        if (consumer > 0) return PendingStore{qb, false};  // its rows are past seqlen_q: nothing to store
      }
    } else if (n_blocks > 0) {
      float rescale[2];
      // A first block none of this warpgroup's rows sees (causal, beyond the diagonal's end): its turn passes without
      // GEMMs and its slots go back unread, so the tensor cores serve the other warpgroups. A warpgroup misses at
      // most the tile's last (kConsumers - 1) * 64 keys, so no other block can be unseen. It keeps at least one
      // block: its turns stay one more than its blocks, as every warpgroup's (GemmTurns). It is never the last
      // warpgroup (whose last row ends the tile), for which alone GemmTurns::first does anything.
      static_assert(!kMaySkipFirstBlock || (kConsumers - 1) * kWgRows <= kBlockN, "only a first block may be unseen");
      if (kMaySkipFirstBlock && n_blocks > 1 && block_unseen(p, tile.m_block, consumer, key_end - 1)) {
        turns.wait();
        turns.pass(false);
        hopper::mbarrier_wait(&s.k_full[ring.stage()], ring.phase());
        hopper::mbarrier_arrive(&s.k_empty[ring.stage()]);
        hopper::mbarrier_wait(&s.v_full[ring.stage()], ring.phase());
        hopper::mbarrier_arrive(&s.v_empty[ring.stage()]);
        ++ring.count;
        --n_blocks;
        --key_end;
      }
      const bool half_first =
          kHalfFirstBlock && second_half_unseen(p, tile.m_block, consumer, key_end - 1);
      turns.first();
      hopper::mbarrier_wait(&s.k_full[ring.stage()], ring.phase());
      turns.wait();
      issue_qk(ring.stage(), std::false_type{});
      turns.pass(false);
      if (t == 0) free_q_buffer(s, previous);
      load_q();
      hopper::wgmma_wait<0>();
      hopper::fence_registers(acc_s);
      hopper::mbarrier_arrive(&s.k_empty[ring.stage()]);
      if (half_first)
        mask_and_softmax(key_end - 1, rescale, HalfCols{});
      else
        mask_and_softmax(key_end - 1, rescale, AllCols{});
      if constexpr (kEarlyV) hopper::mbarrier_wait(&s.v_full[ring.stage()], ring.phase());
      if (half_first)  // P of the unseen half: 0, as the full softmax would give (zeros, not a second pack_p: two
                       // definitions of the PV GEMM's A fragments make ptxas serialise every wgmma, C7511)
#pragma unroll
        for (int i = kBlockN / 4; i < kBlockN / 2; ++i) acc_s[i] = 0.f;
      pack_p();

      // One key block after the first (iteration `it`): its QK^T with the previous block's P V, then its softmax,
      // masked first when `masked` says so. Without a causal mask only the key block holding seqlen_k's end needs
      // masking, and it is a tile's first (above): the loop has no mask code at all, which keeps what follows the QK^T
      // wait one basic block (a never-taken branch around the mask cost 1-4%). Under a causal mask the blocks that
      // need it come first (the diagonal's, the seqlen_k tail's): with kMaskedLoop a loop of their own takes them and
      // the rest run without mask code; otherwise one loop checks every block.
      auto next_block = [&](int it, auto masked) {
        const RingPos prev = ring;
        ++ring.count;
        hopper::mbarrier_wait(&s.k_full[ring.stage()], ring.phase());
        if constexpr (!kEarlyV) hopper::mbarrier_wait(&s.v_full[prev.stage()], prev.phase());
        turns.wait();
        issue_qk(ring.stage(), QInRegisters{});
        if constexpr (!kSplitSoftmax) rescale_o(rescale);
        issue_pv(prev.stage());
        turns.pass(false);
        hopper::wgmma_wait<1>();
        hopper::fence_registers(acc_s);
        hopper::mbarrier_arrive(&s.k_empty[ring.stage()]);
        if constexpr (decltype(masked)::value) mask(key_end - 1 - it, AllCols{});
        if constexpr (kSplitSoftmax) {
          softmax.update_max<kBlockN>(acc_s, rescale);
          softmax.exponentiate<kBlockN>(acc_s, true, false);
        } else {
          softmax.step<kBlockN>(acc_s, rescale);
        }
        if constexpr (kEarlyV) hopper::mbarrier_wait(&s.v_full[ring.stage()], ring.phase());
        retire_pv(prev.stage());
        if constexpr (kSplitSoftmax) {
          rescale_o(rescale);
          softmax.exponentiate<kBlockN>(acc_s, false, true);
        }
        pack_p();
      };
      int it = 1;
      if constexpr (kMaskedLoop)
        for (const int masked = n_blocks - unmasked_blocks(p, tile.m_block, key_end - n_blocks, n_blocks); it < masked;
             ++it)
          next_block(it, std::true_type{});
      for (; it < n_blocks; ++it) next_block(it, std::bool_constant<Causal && !kMaskedLoop>{});

      if constexpr (!kEarlyV) hopper::mbarrier_wait(&s.v_full[ring.stage()], ring.phase());
      turns.wait();
      if constexpr (!kSplitSoftmax) rescale_o(rescale);
      issue_pv(ring.stage());
      turns.pass(true);
      // Every QK^T has completed. Between the issue and the wait, as the first block's free_q_buffer: before the turn
      // wait this one thread's arrival left ptxas unable to prove the warp converged at the wgmma (a WARPSYNC).
      if (kOwnOStage && t == 0) hopper::mbarrier_arrive(&s.q_empty[qb]);
      retire_pv(ring.stage());
    } else if (t == 0) {
      free_q_buffer(s, previous);
      if constexpr (kOwnOStage) hopper::mbarrier_arrive(&s.q_empty[qb]);
    }

    if constexpr (kKeySplit) {
      if (!join_key_splits<Narrow>(p, s, consumer, int(pos(p, wg_row0 + row_in_wg)), split, run, acc_o, softmax))
        return PendingStore{};  // rank 0 stores the tile
    }
    float inv_sum[2], lse[2];
    softmax.finish(inv_sum, lse);

    // O tile -> shared memory (this warpgroup's Q boxes, no longer read, or O's own buffer, pass by pass), in the
    // 128B-swizzled layout TMA stores from: 16-byte chunk c of row r lives at chunk c ^ (r % 8).
    const int epilogue_barrier = int(FwdBarrier::kEpilogueFirst) + consumer;
    // O's own buffer may still be read by the previous tile's last store until thread 0 has waited for it
    // (free_q_buffer above): no thread writes it before then. A tile without keys has no GEMM in between whose
    // warpgroup-wide issue would order this.
    if constexpr (kOwnOStage) hopper::named_barrier_sync(epilogue_barrier, 128);
#pragma unroll
    for (int pass = 0; pass < kBoxes / kOPassBoxes; ++pass) {
      if (pass > 0) {  // the previous pass's store has read the buffer
        if (t == 0) hopper::tma_store_wait_read();
        hopper::named_barrier_sync(epilogue_barrier, 128);
      }
#pragma unroll
      for (int i = 0; i < FragO::kRegs; i += 2) {
        const int h = FragO::row_half(i);
        const int row = row_in_wg + 8 * h;
        const int col = FragO::col(i, lane);
        const int box = FragO::col(i, 0) / 64;  // the lane adds less than 8 columns: known at compile time
        if (box / kOPassBoxes != pass) continue;
        const int chunk = (col % 64) / 8;
        uint8_t* dst = o_box(s, consumer, q_tile, box) + row * 128 + ((chunk ^ (row % 8)) * 16) + (col % 8) * sizeof(T);
        *reinterpret_cast<uint32_t*>(dst) = hopper::pack2<T>(acc_o[i] * inv_sum[h], acc_o[i + 1] * inv_sum[h]);
      }
      hopper::fence_view_async_shared();
      hopper::named_barrier_sync(epilogue_barrier, 128);
      if (t == 0 && pos(p, wg_row0) < p.seqlen_q) {
        for (int b = pass * kOPassBoxes; b < (pass + 1) * kOPassBoxes; ++b) {
          if constexpr (kKeySplit)
            hopper::tma_store_5d(&p.out, o_box(s, consumer, q_tile, b), b * 64, 0, tile.head, int(pos(p, wg_row0)),
                                 tile.batch);
          else if constexpr (kCfg.q_o_evict_first)
            hopper::tma_store_4d_hint(&p.out, o_box(s, consumer, q_tile, b), b * 64, wg_row0, tile.head, tile.batch,
                                      hopper::kL2EvictFirst);
          else
            hopper::tma_store_4d(&p.out, o_box(s, consumer, q_tile, b), b * 64, wg_row0, tile.head, tile.batch);
        }
        hopper::tma_store_commit();
      }
    }

    if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int packed = wg_row0 + row_in_wg + 8 * h;
        const int row = int(pos(p, packed));
        const int head = kKeySplit ? (tile.head << p.q_pack_shift) + (packed & ((1 << p.q_pack_shift) - 1)) : tile.head;
        if (row < p.seqlen_q)
          p.lse[tile.batch * p.lse_stride_batch + head * p.lse_stride_head + row * p.lse_stride_seq] = lse[h];
      }
    }
    // The producer may refill this warpgroup's Q buffer once the store has read it (with O's own buffer: done).
    const PendingStore mine{kOwnOStage ? -1 : qb, pos(p, wg_row0) < p.seqlen_q};
    if (kDeferStoreWait) return mine;
    if (t == 0) free_q_buffer(s, mine);
    return PendingStore{};
  }
};

template <class T, int HeadDim, bool Causal, int Tier>
__global__ void __launch_bounds__(fwd_config(HeadDim, Causal, Tier).threads(), 1)
    attention_fwd_kernel(const __grid_constant__ typename FwdKernel<T, HeadDim, Causal, Tier>::Params p) {
  using K = FwdKernel<T, HeadDim, Causal, Tier>;
  auto& s = hopper::aligned_dynamic_smem<typename K::Smem>();

  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < K::kQBuffers; ++i) {
      hopper::mbarrier_init(&s.q_full[i], 1);
      hopper::mbarrier_init(&s.q_empty[i], K::kConsumers);
    }
    for (int i = 0; i < K::kStages; ++i) {
      hopper::mbarrier_init(&s.k_full[i], 1);
      hopper::mbarrier_init(&s.v_full[i], 1);
      hopper::mbarrier_init(&s.k_empty[i], 128 * K::kConsumers);
      hopper::mbarrier_init(&s.v_empty[i], 128 * K::kConsumers);
    }
    if constexpr (K::kKeySplit) {
      hopper::mbarrier_init(&s.split_ready, uint32_t(p.key_splits - 1));
      hopper::mbarrier_init(&s.split_read, 1);
    }
    hopper::fence_barrier_init();
  }
  if constexpr (K::kKeySplit) {  // every CTA's barriers are initialised before another arrives on them
    hopper::cluster_arrive();
    hopper::cluster_wait();
  } else {
    __syncthreads();
  }

  if (warpgroup == 0) {
    hopper::setmaxnreg_dec<K::kCfg.producer_regs>();
    if (threadIdx.x == 0) {
      hopper::prefetch_tensormap(&p.q);
      hopper::prefetch_tensormap(&p.k);
      hopper::prefetch_tensormap(&p.v);
      K::produce(p, s);
    }
  } else {
    hopper::setmaxnreg_inc<K::kCfg.consumer_regs>();
    K::consume(p, s, warpgroup - 1);
  }
}

template <DType DT, int HeadDim, bool Causal, int Tier>
dhp_status launch_forward_tier(const FwdParams& prm, cudaStream_t stream) {
  using T = std::conditional_t<DT == DType::bf16, __nv_bfloat16, __half>;
  using K = FwdKernel<T, HeadDim, Causal, Tier>;

  typename K::Params kp{};
  const TensorMapShape q_shape{HeadDim, prm.seqlen_q, prm.heads_q, prm.batch};
  const TensorMapShape kv_shape{HeadDim, prm.seqlen_k, prm.heads_kv, prm.batch};
  // Key splits pack the query heads of a K/V head into a tile's rows, as many as a power of two divides, at most 64:
  // decoding's single row a head becomes one row of a group, and the group reads its K and V once.
  const int group = prm.heads_q / prm.heads_kv;
  const int pack = K::kKeySplit ? fwd_key_split_pack(prm.heads_q, prm.heads_kv) : 1;
  const int map_pack = K::kKeySplit ? pack : 0;
  dhp_status st;
  if ((st = encode_tensor_map(&kp.q, DT, prm.q, q_shape, prm.q_stride, K::kWgRows, "q", map_pack)) != DHP_SUCCESS)
    return st;
  if ((st = encode_tensor_map(&kp.k, DT, prm.k, kv_shape, prm.k_stride, K::kBlockN, "k")) != DHP_SUCCESS) return st;
  if ((st = encode_tensor_map(&kp.v, DT, prm.v, kv_shape, prm.v_stride, K::kBlockN, "v")) != DHP_SUCCESS) return st;
  if ((st = encode_tensor_map(&kp.out, DT, prm.out, q_shape, prm.out_stride, K::kWgRows, "out", map_pack)) !=
      DHP_SUCCESS)
    return st;
  kp.q_pack_shift = 0;
  while ((1 << kp.q_pack_shift) < pack) ++kp.q_pack_shift;
  kp.lse = prm.lse;
  kp.lse_stride_batch = prm.lse_stride_batch;
  kp.lse_stride_head = prm.lse_stride_head;
  kp.lse_stride_seq = prm.lse_stride_seq;
  kp.seqlen_q = prm.seqlen_q;
  kp.seqlen_k = prm.seqlen_k;
  kp.heads_q = prm.heads_q / pack;  // a tile's head: a packed group of query heads
  kp.q_heads_per_kv = group / pack;
  // Key splits (kKeySplit): one CTA per (tile, split), a cluster per tile, the tile's key blocks dealt in runs.
  const KeySplits splits = fwd_key_splits(HeadDim, prm.seqlen_q, prm.seqlen_k, prm.heads_q, prm.heads_kv);
  static_assert(!K::kKeySplit || 128 % K::kBlockN == 0, "key splits count 128-key blocks");
  const int64_t num_m_blocks = (int64_t(prm.seqlen_q) * pack + K::kBlockM - 1) / K::kBlockM;
  const int64_t num_tiles = num_m_blocks * kp.heads_q * prm.batch;
  // A narrow tile's runs may go several to a CTA: how many follows the batch (fwd_key_split_runs), the bits do not.
  const int runs_a_cta = K::kKeySplit ? fwd_key_split_runs(HeadDim, splits, num_tiles, int64_t(prm.seqlen_q) * pack) : 1;
  kp.split_runs = runs_a_cta;
  kp.split_count = K::kKeySplit ? splits.runs : 1;
  kp.key_splits = K::kKeySplit ? (splits.runs + runs_a_cta - 1) / runs_a_cta : 1;
  kp.split_blocks = K::kKeySplit ? splits.blocks * (128 / K::kBlockN) : splits.blocks;
  if (num_tiles > INT32_MAX)
    return fail(DHP_ERROR_INVALID_VALUE,
                "batch=%d x heads_q=%d x ceil(seqlen_q=%d / %d) = %lld query tiles: at most 2^31 - 1 are supported",
                prm.batch, prm.heads_q, prm.seqlen_q, K::kBlockM, (long long)num_tiles);
  if (K::kKeySplit && num_tiles * kp.key_splits > INT32_MAX)
    return fail(DHP_ERROR_INVALID_VALUE,
                "batch=%d x heads_q=%d: %lld query tiles of %d CTAs each (key splits of seqlen_k=%d): at most 2^31 - 1 "
                "CTAs are supported",
                prm.batch, prm.heads_q, (long long)num_tiles, kp.key_splits, prm.seqlen_k);
  kp.num_tiles = int(num_tiles);
  // Non-causal tiles all cost the same: a persistent grid of one CTA per SM takes them round by round,
  // and the K/V loads of a CTA's next tile (and its Q, with two Q buffers) overlap its epilogue. Causal
  // tiles cost 1..n key blocks: up to fwd_persistent_causal_keys keys the snake order of
  // tile_of_round balances them well enough and the overlap wins (H100 bf16, alternating builds: d64 512
  // 177 -> 217 TFLOP/s, d128 512 256 -> 302, 2k 472 -> 513; head_dim 256's main tier, with one Q buffer and no
  // overlap to gain, lost there since: fwd_config.h);
  // beyond that a static round-robin cannot balance them (d128 16k: 467 vs 646), so the grid has one CTA
  // per tile and the hardware hands tiles, heaviest first within a section of heads, to SMs as they free up.
  // The tile -> CTA assignment never changes a tile's arithmetic: results do not depend on the grid.
  // A scheduled kernel (kScheduled) keeps the persistent grid beyond fwd_persistent_causal_keys where its order or
  // static schedule leaves the busiest CTA within kBeyondImbalancePercent of the mean (below; fwd_config.h,
  // fwd_scheduled).
  const bool beyond = Causal && prm.seqlen_k > fwd_persistent_causal_keys(HeadDim);
  bool persistent = !K::kKeySplit && (!beyond || K::kScheduled);
  const int64_t kv_head_bytes = int64_t(prm.seqlen_k) * HeadDim * 2 * int64_t(sizeof(T));
  const int budget_heads = fwd_section_heads(int64_t(prm.heads_q) * prm.batch, kp.q_heads_per_kv, kv_head_bytes);
  int section_heads = 1;  // one CTA per tile: budget_heads (below)
  kp.by_heads_q = FastDiv::make(uint32_t(kp.heads_q));
  constexpr float kLog2e = 1.4426950408889634f;
  kp.scale_log2 = prm.softmax_scale * kLog2e;

  auto kernel = attention_fwd_kernel<T, HeadDim, Causal, Tier>;
  // The shared-memory opt-in is a per-device setting of the kernel: made once per device (bit = ordinal).
  static std::atomic<uint64_t> smem_reserved{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  const uint64_t device_bit = device < 64 ? uint64_t{1} << device : 0;
  if (err == cudaSuccess && !(smem_reserved.load(std::memory_order_acquire) & device_bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(K::kSmemBytes));
    if (err == cudaSuccess) smem_reserved.fetch_or(device_bit, std::memory_order_release);
  }
  if (err != cudaSuccess)
    return fail(DHP_ERROR_CUDA, "could not reserve %zu bytes of shared memory for the forward kernel: %s",
                K::kSmemBytes, cudaGetErrorString(err));

  int multiprocessors = 0;
  err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess)
    return fail(DHP_ERROR_CUDA, "could not read the multiprocessor count of device %d: %s", device,
                cudaGetErrorString(err));

  // The persistent grid's list under a causal mask, where tiles cost from one key block to all: head by head (the K and
  // V of the heads running at once shared in L2), in the sections of kCausalSectionBytes (as the grid of one CTA a
  // tile) or, where every head's K and V fit kAllHeadsSectionBytes, in one section of every head, dealt in the snake
  // or (the split tier, tile_of_round) rotated: persistent_causal_order (tile_order.h) by list scheduling, on lists of
  // up to kPersistentOrderRounds rounds (host time, 2-core build machine, g++ -O2: 48 us for four orders of 64 rounds,
  // 8448 tiles, against the kernel's milliseconds there; one section of every head adds two orders of at most 1024
  // tiles, since their K and V must fit 32 MB). Without a mask, head by head (the
  // split tier rotated). Head_dim 64's split tier at 4096 keys: 32 heads, the snake's busiest CTA 111 blocks and the
  // rotation's 174, 128 heads 407 and 385. H100, bf16, 2026-11-27, against the rotation head by head everywhere
  // (bench/results/2026-11-27-h100-fwd-causal-split-order.txt): 32 heads at 4096 keys 256 -> 172 us, 3520 keys 209 ->
  // 161, 16 heads at 4096 142 -> 110, 64 heads at 2113 130 -> 108; where the rotation stays, even.
  // Where the chosen order leaves the busiest CTA far above the mean, one CTA per tile (persistent_causal_balanced).
  const int64_t persistent_grid = std::min(num_tiles, int64_t{multiprocessors});
  kp.rotate = K::kSplitTile && persistent && !Causal;
  if (persistent && Causal && num_tiles > kPersistentOrderRounds * persistent_grid) {
    persistent = !beyond;  // the snake, unmodelled: only up to fwd_persistent_causal_keys
  } else if (persistent && Causal) {
    const std::vector<long long> cost =
        causal_tile_costs(prm.seqlen_q, prm.seqlen_k, K::kBlockM, K::kBlockN, K::kConsumers, K::kSplitTile);
    const bool all_heads_fit =
        int64_t(prm.batch) * prm.heads_q / kp.q_heads_per_kv * kv_head_bytes <= kAllHeadsSectionBytes;
    const PersistentOrder order =
        persistent_causal_order(num_tiles, int(persistent_grid), cost, budget_heads, all_heads_fit, K::kSplitTile);
    long long busiest = order.busiest;
    section_heads = order.section_heads;
    kp.rotate = order.rotate;
    if constexpr (K::kScheduled) {  // where every head's K and V fit, one section of them did as well or better
      if (!all_heads_fit && num_tiles <= kScheduleTiles && persistent_grid <= kScheduleCtas) {
        const long long listed = list_schedule(num_tiles, int(persistent_grid), cost, budget_heads, kp.schedule);
        if (listed * 100 < busiest * (100 - kScheduleGainPercent))
          busiest = listed, section_heads = budget_heads, kp.rotate = 0;
        else
          kp.schedule.ctas = 0;
      }
    }
    persistent = persistent_causal_balanced(busiest, num_tiles, int(persistent_grid), cost,
                                            beyond ? kBeyondImbalancePercent : kPersistentImbalancePercent);
    if constexpr (K::kScheduled) {
      if (!persistent) kp.schedule.ctas = 0;
    }
  }
  if (!persistent && !K::kKeySplit) section_heads = budget_heads, kp.rotate = 0;
  const int64_t grid = persistent ? persistent_grid : num_tiles * kp.key_splits;
  kp.order = TileOrder::make(int(num_m_blocks), section_heads);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(grid));
  config.blockDim = dim3(K::kCfg.threads());
  config.dynamicSmemBytes = K::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  if (K::kKeySplit) {
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = unsigned(kp.key_splits);
    cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
  }
  err = cudaLaunchKernelEx(&config, kernel, kp);
  if (err != cudaSuccess) return fail(DHP_ERROR_CUDA, "forward kernel launch failed: %s", cudaGetErrorString(err));
  return succeed();
}

// The family's tier (fwd_config.h) by seqlen_k and, for the split tiles and key splits, seqlen_q: key splits, short
// keys (the scheduled short tier from its limit), split tile, long keys, else the main tier.
template <DType DT, int HeadDim, bool Causal>
dhp_status run_forward(const FwdParams& prm, cudaStream_t stream) {
  if constexpr (fwd_key_split_tier(HeadDim, Causal) >= 0) {
    if (fwd_key_splits(HeadDim, prm.seqlen_q, prm.seqlen_k, prm.heads_q, prm.heads_kv).runs > 1)
      return launch_forward_tier<DT, HeadDim, Causal, fwd_key_split_tier(HeadDim, Causal)>(prm, stream);
  }
  if constexpr (fwd_tiers(HeadDim, Causal) >= 2) {
    if constexpr (fwd_scheduled_tier(HeadDim, Causal) >= 0) {
      if (prm.seqlen_k >= fwd_scheduled_keys(HeadDim, Causal) && prm.seqlen_k <= fwd_short_keys(HeadDim, Causal))
        return launch_forward_tier<DT, HeadDim, Causal, fwd_scheduled_tier(HeadDim, Causal)>(prm, stream);
    }
    if (prm.seqlen_k <= fwd_short_keys(HeadDim, Causal))
      return launch_forward_tier<DT, HeadDim, Causal, kTierShortKeys>(prm, stream);
  }
  if constexpr (fwd_split_tier(HeadDim, Causal) >= 0) {
    constexpr int kRows = fwd_config(HeadDim, Causal, kTierSplitTile).block_m;
    if (prm.seqlen_q <= fwd_split_max_seqlen_q(HeadDim, Causal) && (prm.seqlen_q - 1) % kRows < 64)
      return launch_forward_tier<DT, HeadDim, Causal, kTierSplitTile>(prm, stream);
  }
  if constexpr (fwd_long_tier(HeadDim, Causal) >= 0) {
    if (prm.seqlen_k >= fwd_long_keys(HeadDim, Causal))
      return launch_forward_tier<DT, HeadDim, Causal, fwd_long_tier(HeadDim, Causal)>(prm, stream);
  }
  return launch_forward_tier<DT, HeadDim, Causal, kTierMain>(prm, stream);
}

}  // namespace dhp::kernels
