// Tile configuration of the forward kernel, as data: one plain struct chosen by head_dim, causal and seqlen_k.
#pragma once

#include <initializer_list>

#include "register_budget.h"

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
  int softmax_under_pv;     // row halves of a warpgroup's softmax of S(j+1) that overlap its own P(j) V(j): 2, 1 (the
                            // second half's exponentials follow the P V wait with O's rescale) or 0 (attention_fwd.cuh)
  int softmax_chains;       // partial maxima and sums per row half (OnlineSoftmax, softmax.cuh)
  bool half_first_block;    // causal: the diagonal key block masked and softmaxed on its first half where a
                            // warpgroup's rows see none of the second (attention_fwd.cuh, second_half_unseen)
  int o_stage_boxes;        // 0: O goes out through the warpgroup's Q rows; > 0: through a buffer of its own of this
                            // many 64-column boxes per warpgroup, in head_dim / 64 / o_stage_boxes passes, so the Q
                            // buffer is free once the tile's last QK^T has completed (attention_fwd.cuh)
  bool masked_loop;         // causal: the key blocks after the first that need the mask run in a loop of their own,
                            // then the rest in a loop without mask code; false: one loop, a mask check per block
  bool split_tile;          // a tile whose rows all fall to its first warpgroup (seqlen_q's last 64 or fewer) has its
                            // key blocks dealt round robin to the warpgroups, each with a softmax and O of its own,
                            // joined in a fixed order (attention_fwd.cuh, split_tile); tiles go to CTAs in rotation
  bool key_splits;          // a tile's key blocks are split over the CTAs of a cluster, each with a softmax and O of its
                            // own, joined in rank order through distributed shared memory (attention_fwd.cuh,
                            // key_range): one CTA per (tile, split), for few query tiles against many keys
  int split_rows = 64;      // split_tile: the most rows a split tile holds; 8 (row half 0 of the first warp) keeps the
                            // warpgroups' partials to that half (KeySplitSlot): 8 KB where 64 rows take 66 KB
  bool q_registers = false;  // Q's k16 fragments are loaded into registers once a tile and the key-block loop's QK^Ts
                             // read them there (register-sourced wgmmas, attention_fwd.cuh): no Q descriptor to form
                             // per k16 step, and a third less shared memory read by QK^T; 16 (head_dim 64) or 32
                             // registers more, which only the 128-key tiles have to spare
  bool q_o_evict_first = false;  // Q's loads and O's store carry the L2 policy evict_first (each is touched once), so
                                 // L2 keeps K and V, and O's lines go out to DRAM early (the 4-d maps; not key splits)

  constexpr int threads() const { return 128 * (1 + consumer_warpgroups); }
  constexpr int tile_bytes(int rows, int elem_bytes) const { return rows * head_dim * elem_bytes; }
};

// Each (head_dim, causal) kernel family has its main tile configuration (kTierMain, every seqlen_k) and may
// have a second one for short keys (kTierShortKeys, seqlen_k <= fwd_short_keys(...) > 0), chosen by seqlen_k,
// a public shape. The tier changes the order of the online softmax's additions, so results depend on seqlen_k
// through it (as they do through the key count itself), never on values or on the rest of the batch.
constexpr int kTierMain = 0;
constexpr int kTierShortKeys = 1;
// Where a family has them (their indices follow on: fwd_split_tier, fwd_long_tier, then fwd_key_split_tier), a
// split tier, kTierSplitTile: the main tier's tiles with split_tile, for seqlen_q up to fwd_split_max_seqlen_q(...) > 0
// whose last query tile holds at most 64 rows (fwd_takes_split_tier), a public shape as well. Its kernel is a kernel
// of its own: with the split tile's code beside it ptxas schedules the main tier's key-block loop differently (nine
// more uniform-datapath instructions a block, its QK^T descriptors rebuilt between the wgmmas; head_dim 64, 8k keys
// -1..-3% in two calls), so the other shapes keep the plain main tier.
constexpr int kTierSplitTile = 2;
// Without a causal mask head_dim 64 and 256 take their short tiers up to 512 keys, where 192-row tiles pad 512 query
// rows to 576 and 80-key blocks pad 512 keys to 560 (H100, bf16, 2026-11-26, six alternating rounds: d64 512 keys
// 360 -> 365 TFLOP/s, d256 512 keys 470 -> 482, 500 keys 451 -> 460; 1k is the main tiers', even in the same call).
// Head_dim 128's causal short tier reaches 4k keys since its softmax is split around the P V wait (softmax_under_pv
// below; H100, bf16, 2026-11-27: causal 4k 631 -> 639 TFLOP/s, GQA 32/8 causal 4k 647 -> 661 against the main tier
// with the same split; without the split the short tier lost at 4k, 631 -> 614).
constexpr int fwd_short_keys(int head_dim, bool causal) {
  if (head_dim == 128) return causal ? 4096 : 2048;
  if (!causal) return 512;
  return head_dim == 64 ? 2048 : 1024;
}
// Head_dim 64 without a mask: 192-row tiles leave 64 rows in the last tile at 640, 1k (1024 = 5 x 192 + 64), 4k; H100,
// bf16, 2026-11-27, alternating builds in two calls (bench/results/2026-11-27-h100-fwd-split-tile-ab.txt): 640 keys
// +16%, 1000 / 1024 +11..+12%, 4k +3%; at 16k (one tile in 86) it lost 0.7%. Under a causal mask the split tile is the
// tile with the most key blocks (same file, call s31f): causal 4k +3.9%, 2305 +9.9%, 16k +1.3%.
constexpr int fwd_split_max_seqlen_q(int head_dim, bool causal) { return head_dim == 64 ? (causal ? 16384 : 4096) : 0; }
constexpr int fwd_split_tier(int head_dim, bool causal) {
  return fwd_split_max_seqlen_q(head_dim, causal) > 0 ? kTierSplitTile : -1;
}
// A long-key tier (seqlen_k >= fwd_long_keys(...) > 0): wider key blocks where a tile has so many of them that its
// boundary matters little. Head_dim 128 without a mask on 192-key blocks, which leave room for one Q buffer alone
// (the next tile's Q loads after the O store): a block costs its latency chain (QK^T wait, softmax, the turn) more
// than its width, so fewer blocks a tile pay from about 8k keys. H100, bf16, 2026-11-27, against 160-key blocks with
// two Q buffers (bench/results/2026-11-27-h100-fwd-d128-kb192-ab.txt, two calls with an A/A tree): 8k +1.0 / +2.0%,
// 12k +1.4%, 24k +2.8%, 32k +3.2%, GQA 32/8 8k / 16k -0.3 / +0.6%, MHA 16k -1.4 / -1.6% (both trees' rounds bimodal);
// at 4k it lost 2.6% (GQA 32/8 5.5%): 22 blocks a tile and an exposed Q load at each boundary.
constexpr int fwd_long_keys(int head_dim, bool causal) { return head_dim == 128 && !causal ? 8192 : 0; }
constexpr int fwd_long_tier(int head_dim, bool causal) {
  return fwd_long_keys(head_dim, causal) > 0 ? 2 + (fwd_split_tier(head_dim, causal) >= 0) : -1;
}
// A scheduled short tier (seqlen_k from fwd_scheduled_keys(...) > 0 up to the short tier's limit): the short tier's
// tile, so the same bits, in a kernel of its own whose parameters carry a static schedule of the persistent grid
// (tile_order.h, TileSchedule, says why the short launches must not carry it). Head_dim 128 under a causal mask: H100,
// bf16, 2026-11-27, against main (bench/results/2026-11-27-h100-fwd-causal-list-schedule-ab.txt, call s39n): 4 x 16
// heads at 4096 keys +1.3%, GQA 32/8 +2.8%, one sequence of 24 heads at 4096 +3.7%, 2048 and 512 keys unchanged.
constexpr int fwd_scheduled_keys(int head_dim, bool causal) { return head_dim == 128 && causal ? 2049 : 0; }
constexpr int fwd_scheduled_tier(int head_dim, bool causal) {
  return fwd_scheduled_keys(head_dim, causal) > 0
             ? 2 + (fwd_split_tier(head_dim, causal) >= 0) + (fwd_long_tier(head_dim, causal) >= 0)
             : -1;
}
// The last tier of every family, kernels of their own: the short-key tier's tile with its key blocks split over a
// cluster of CTAs (key_splits), where seqlen_q fits one query tile (fwd_key_splits).
constexpr int fwd_key_split_tier(int head_dim, bool causal) {
  return 2 + (fwd_split_tier(head_dim, causal) >= 0) + (fwd_long_tier(head_dim, causal) >= 0) +
         (fwd_scheduled_tier(head_dim, causal) >= 0);
}
constexpr int fwd_tiers(int head_dim, bool causal) { return fwd_key_split_tier(head_dim, causal) + 1; }

// Key splits (the key-split tier): where seqlen_q fits one query tile (decoding, short chunks of queries against a
// long cache), the tile's keys are split into up to kKeySplitMaxCtas runs of at least kKeySplitMinBlocks 128-key
// blocks, on the CTAs of a cluster (one run a CTA, or several: fwd_key_split_runs): a grid of (batch x heads_q) CTAs
// would leave most SMs idle. The tier also packs the query heads of a K/V head into a tile's rows
// (fwd_key_split_pack; attention_fwd.cuh, pos). The runs a tile gets are bounded by a wave: a sequence's tiles, each
// a cluster of a run a CTA, must all run at once (kKeySplitWaves), so a sequence of many tiles (MHA, 128 queries of
// GQA) takes fewer runs rather than waves with a tail. A function of seqlen_q, seqlen_k and the head counts, never of
// the batch: a sequence's bits do not depend on what else is in the batch. H100, bf16, 2026-11-27 (bench/results/2026-11-27-h100-fwd-key-splits.txt), head_dim 128, GQA 32/8, seqlen_q 1, against main: batch 1 at
// 4k / 16k / 64k keys 50.6 / 181 / 682 -> 21.5 / 41.3 / 110 us (cuDNN 18.4 / 39.6 / 106), batch 8 at 8k 192 -> 129
// (cuDNN 106), MHA 32 heads 16k 187 -> 129; seqlen_q 16 / 128 at 8k 95 / 96 -> 31 / 83. Four blocks a CTA and no
// packing lost at batch 8 (192 -> 462 us: each query head streamed its K/V again). Its split tile (64 packed rows or
// fewer on both warpgroups), H200, one call: decoding 8-22% faster again (16k 36.9 -> 31.6 us, cuDNN 31.8); on the
// H100 4k / 16k / 64k 18.4 / 38.3 / 103.5 us (cuDNN 17.9 / 39.7 / 105.6), batch 8 120 (106), MHA 16k 121 (105).
constexpr int kKeySplitMaxSeqlenQ = 128;
constexpr int kKeySplitTileRows = 128;  // the key-split tier's tile (fwd_config)
constexpr int kKeySplitMinBlocks = 8;
// A narrow tile (kKeySplitNarrowRows packed rows or fewer: one query of a K/V head's group) takes runs of half that once
// its keys split at all (2 x kKeySplitMinBlocks blocks), so one sequence's decoding at 2k-8k keys runs on up to twice
// the CTAs. H100, bf16, 2026-11-27 (bench/results/2026-11-27-h100-fwd-key-split-narrow-runs.txt): one query of GQA
// 32/8 at 2k / 3k / 4k / 6k keys 17.5 / 18.3 / 19.5 / 23.2 -> 15.0 / 16.9 / 19.2 / 23.4 us (cuDNN 14.9 / 17.3 / 20.1 /
// 24.1), head_dim 64 and 256 at 4k +7%, batches of 4 and 8 at 4k -1..-1.6%; with 16 queries (64 packed rows) runs of
// 4 blocks lost 8%: those keep kKeySplitMinBlocks.
constexpr int kKeySplitNarrowMinBlocks = 4;
constexpr int kKeySplitNarrowRows = 8;
constexpr int kKeySplitMaxCtas = 8;  // the portable cluster size
// Clusters of a key-split kernel (one CTA an SM) that run at once on an H100 SXM (132 SMs), by cluster size:
// cudaOccupancyMaxActiveClusters, H100 80GB HBM3, 2026-11-27 (7 CTAs: 15 clusters, as 8; 16: 7).
struct KeySplitWave {
  int ctas, clusters;
};
constexpr KeySplitWave kKeySplitWaves[] = {{8, 15}, {6, 17}, {5, 22}, {4, 30}, {3, 39}, {2, 66}, {1, 132}};
// Query heads of a K/V head packed into a key-split tile's rows: the largest power of two dividing heads_q / heads_kv,
// at most 64 (a warpgroup's rows: a 64-row box holds whole positions).
constexpr int fwd_key_split_pack(int heads_q, int heads_kv) {
  const int group = heads_q / heads_kv;
  return (group & -group) < 64 ? group & -group : 64;
}
// A sequence's query tiles in the key-split tier: its packed heads times the tiles of its packed rows.
constexpr long long fwd_key_split_tiles(long long seqlen_q, int heads_q, int heads_kv) {
  const int pack = fwd_key_split_pack(heads_q, heads_kv);
  return (long long)(heads_q / pack) * ((seqlen_q * pack + kKeySplitTileRows - 1) / kKeySplitTileRows);
}
struct KeySplits {
  int runs;    // runs of key blocks a tile, each with a partial result (1: no key splits)
  int blocks;  // 128-key blocks a run (the last one's may be fewer)
};
constexpr KeySplits fwd_key_splits(int head_dim, long long seqlen_q, long long seqlen_k, int heads_q, int heads_kv) {
  const long long blocks = (seqlen_k + 127) / 128;
  int wave = 1;  // the largest cluster of which a cluster for each of the sequence's tiles runs at once
  const long long tiles = fwd_key_split_tiles(seqlen_q, heads_q, heads_kv);
  for (const KeySplitWave& w : kKeySplitWaves)
    if (wave == 1 && tiles <= w.clusters) wave = w.ctas;
  const long long rows = seqlen_q * fwd_key_split_pack(heads_q, heads_kv);
  const long long least = rows <= kKeySplitNarrowRows ? kKeySplitNarrowMinBlocks : kKeySplitMinBlocks;
  const long long wanted = blocks / least < wave ? blocks / least : wave;
  if (head_dim % 64 != 0 || seqlen_q > kKeySplitMaxSeqlenQ || blocks < 2 * kKeySplitMinBlocks || wanted < 2)
    return {1, int(blocks)};
  const long long per_cta = (blocks + wanted - 1) / wanted;
  return {int((blocks + per_cta - 1) / per_cta), int(per_cta)};  // no run without a block
}
// Clusters of `ctas` CTAs that run at once (kKeySplitWaves; a size between two as the larger).
constexpr int fwd_key_split_clusters(int ctas) {
  int clusters = 0;
  for (const KeySplitWave& w : kKeySplitWaves)
    if (w.ctas >= ctas) clusters = w.clusters;
  return clusters;
}
// Runs a CTA takes in a row. A tile's runs are fixed by its sequence (fwd_key_splits: they are the bits); where a
// tile's packed rows are few (kKeySplitNarrowRows: decoding, whose partials fit slots beside the ring) a CTA may take
// up to fwd_key_split_max_runs of them, so a batch of many tiles runs in fewer waves of smaller clusters. The count
// follows the launch's tiles (the batch) and changes no bit: rank 0 joins the tile's runs in order either way. It is
// the count of least time by a model of the waves, in key blocks, fitted on an H100 (bf16, 2026-11-27, runs a CTA
// forced 1-4 over 13 decode shapes, bench/results/2026-11-27-h100-fwd-key-split-runs.txt): decoding streams K and V,
// a CTA at about 1/kKeySplitStreamCtas of what the HBM gives, so a wave lasts as long as its slowest CTA's blocks or
// as its clusters' blocks at kKeySplitStreamCtas CTAs' speed, whichever is longer, plus kKeySplitWaveBlocks of start;
// on a tie, the CTAs all as busy (batch 4 at 16k keys: 3, 3 and 2 runs took 113 us, 4 and 4 took 107), then the fewer
// runs a CTA.
constexpr int kKeySplitMaxRuns = 4;
constexpr int kKeySplitStreamCtas = 64;
constexpr int kKeySplitWaveBlocks = 2;
constexpr int fwd_key_split_max_runs(int) { return kKeySplitMaxRuns; }
constexpr int fwd_key_split_runs(int head_dim, KeySplits splits, long long tiles, long long packed_rows) {
  if (packed_rows > kKeySplitNarrowRows) return 1;
  const long long tile_blocks = (long long)splits.runs * splits.blocks;
  auto wave = [&](long long clusters, int per_cta) {  // in key blocks, times kKeySplitStreamCtas
    const long long slowest = (long long)per_cta * splits.blocks * kKeySplitStreamCtas, all = clusters * tile_blocks;
    return (slowest > all ? slowest : all) + kKeySplitWaveBlocks * kKeySplitStreamCtas;
  };
  int best = 1, best_idle = 0;
  long long best_time = -1;
  for (int most = 1; most <= fwd_key_split_max_runs(head_dim); ++most) {
    const int ctas = (splits.runs + most - 1) / most;
    const int per_cta = (splits.runs + ctas - 1) / ctas;  // as even as the CTAs allow
    const int idle = ctas * per_cta - splits.runs;        // runs the last CTA is short
    const long long at_once = fwd_key_split_clusters(ctas);
    const long long time = tiles / at_once * wave(at_once, per_cta) + (tiles % at_once ? wave(tiles % at_once, per_cta) : 0);
    if (best_time < 0 || time < best_time || (time == best_time && idle < best_idle))
      best = per_cta, best_time = time, best_idle = idle;
  }
  return best;
}

// The persistent grid's order under a causal mask is chosen by list scheduling for lists of up to this many rounds of
// the grid (attention_fwd.cuh, launch_forward_tier), head by head in the snake beyond.
constexpr int kPersistentOrderRounds = 64;

// Causal kernels run on the persistent grid up to this many keys and with one CTA per tile beyond
// (attention_fwd.cuh, launch_forward_tier, says why). Head_dim 256's limit is its short tier's: its main tier holds one
// Q buffer, so a CTA's next tile gains no overlap on the persistent grid, and one CTA per tile balances better. H100,
// bf16, 2026-11-27, against the persistent grid up to 4096 keys, 8 rounds with an A/A tree at 0.999-1.004
// (bench/results/2026-11-27-h100-fwd-d256-causal-grid-ab.txt): causal 1500 / 2048 / 3000 / 4096 keys +0.9 / +0.1 /
// +4.6 / +1.4%, 16 heads at 4096 +1.3%, GQA 16/4 +2.9%, fp16 4096 +0.8%, 8 x 8 heads at 2368 +8.3%, one sequence of 8
// heads at 4096 +50% (256 tiles on 132 persistent CTAs); launches of fewer tiles than SMs -1..-2%. Head_dim 64 lost the
// same way (from 2048: 3000 keys -5.2%, 4096 -1.6%; its main tier's two Q buffers overlap on the persistent grid).
constexpr int fwd_persistent_causal_keys(int head_dim) { return head_dim == 256 ? fwd_short_keys(256, true) : 4096; }

// A causal tier that may run on the persistent grid and never runs below kScheduleMinSeqlenK keys carries a static
// schedule of that grid in its kernel's parameters (tile_order.h, TileSchedule, says why the shorter launches must
// not). Such a kernel also keeps the persistent grid beyond fwd_persistent_causal_keys where its schedule is taken
// (attention_fwd.cuh, launch_forward_tier): list scheduling balances what the snake could not there. Head_dim 64's
// causal main and split tiers, H100, bf16, 2026-11-27, against one CTA per tile (6 rounds with an A/A tree at
// 0.979-0.997, bench/results/2026-11-27-h100-fwd-d64-causal-scheduled-beyond-ab.txt): 2 x 32 heads at 8192 keys +2.5%
// (every round), 2 x 16 heads at 8192 +4.0%, 2 x 32 at 6144 +3.5%, one sequence of 32 heads at 16384 even.
constexpr int kScheduleMinSeqlenK = 2049;
constexpr bool fwd_scheduled(int head_dim, bool causal, int tier) {
  const int least = tier == fwd_scheduled_tier(head_dim, causal) ? fwd_scheduled_keys(head_dim, causal)
                    : tier == kTierShortKeys                     ? 1
                                                                 : fwd_short_keys(head_dim, causal) + 1;  // run_forward
  return causal && tier != fwd_key_split_tier(head_dim, causal) && least >= kScheduleMinSeqlenK &&
         least <= fwd_persistent_causal_keys(head_dim);
}

constexpr FwdConfig fwd_config(int head_dim, bool causal, int tier) {
  // Main tier: per head_dim, the largest key block whose S, P and O fragments fit the consumer register
  // budget and whose K/V stages fit shared memory; head_dim 64 has cheap GEMMs next to its softmax, so a
  // third consumer warpgroup gives the tensor cores more independent work. head_dim 128 gives 16 keys of its
  // block (176 -> 160) for a second Q buffer, so the tile boundary (O store, next Q load) overlaps the next
  // tile's first GEMMs. H200, bf16, 2026-11-26, two calls: 4k 636 -> 667, 16k 641 -> 658, causal 4k 533 ->
  // 560, GQA 32/8 4k 595 -> 613, causal 510 -> 556; 8k and causal 16k even.
  // Short-key tier, measured on an H100 (bf16, 2026-11-25, builds alternating in one call): smaller blocks
  // waste less on the padded tail and the causal diagonal. head_dim 128 with 128-key blocks and two Q
  // buffers: 512 keys 398 -> 467 TFLOP/s, 1k 505 -> 548, 2k 590 -> 612, causal 512 210 -> 240, 1k
  // 311 -> 343; it loses at 16k (627 -> 616) and causal 8k (601 -> 563). Causal head_dim 64 with 128 query rows: 512 163 -> 178,
  // 1k 235 -> 256, but 2k 343 -> 327 and non-causal 2k 472 -> 409. Causal head_dim 256 with 64-key blocks:
  // 512 279 -> 291, 1k 392 -> 412, but non-causal 1k 617 -> 588. Causal head_dim 64's short tier reaches 2k
  // since its four softmax chains (H200, 2026-11-26): 2k 349 -> 359; non-causal d64 1k lost (411 -> 397).
  // softmax_under_pv, measured the same way (H100 bf16, 2026-11-25): main tiers gain at 4k and beyond (d64 4k
  // 491 -> 513, d128 16k 611 -> 626, d256 16k 701 -> 732, d256 causal 4k 592 -> 621, GQA 32/8 4k 553 -> 578;
  // a second run: d128 4k 611 -> 637, 16k 614 -> 643, d256 4k 667 -> 705); the short-key tiers lose (d128 1k
  // 553 -> 520, causal d64 1k 281 -> 265): V's slot is freed one softmax later.
  // softmax_chains, measured on an H200 (bf16, 2026-11-26, alternating builds in one call, three calls): four
  // partial maxima/sums shorten the softmax's dependency chains, which pays where the softmax is on the
  // warpgroup's critical path (not under its own PV): d128 short tier 1k 570 -> 580, 2k 618 -> 634, causal 1k
  // 384 -> 391, 2k 465 -> 491; causal d64 512 207 -> 211. On the main tiers four chains lost at d128 (4k 632 ->
  // 612, 16k 639 -> 623 in one call, -1% in the next) and were even at d256; d64's three consumer warpgroups
  // gained slightly (512 355 -> 360, 1k 413 -> 416).
  // half_first_block, measured on an H200 (bf16, 2026-11-26, alternating builds, six rounds in two calls): the
  // causal diagonal is a large share of short sequences and of head_dim 64's cheap GEMMs: d64 512 +4%, 1k +7%,
  // 2k +5..8%, 4k +4%, 16k +1%; d128 and d256 short tiers even to +2%. d128's main tier was even to -2% (4k-16k,
  // its inner loop scheduled differently), and d256's 80-key block has no half of whole k16 steps.
  // o_stage_boxes, measured on an H100 (bf16, 2026-11-26, four alternating rounds in one call): head_dim 256's short
  // tier has one Q buffer (64 KB beside two 64-key K/V stages) and 32 KB free, so O leaves through a buffer of its
  // own in two passes of two boxes, and the next tile's Q loads under the last P V instead of after the O store:
  // 512 keys +5.3%, causal 512 +7.2%, causal 1k +4.8%, 1k even. The same short tier up to 1k or 2k keys without a
  // mask was even at 1k and lost 2-3% at 2k; head_dim 128's main tier with 176-key blocks, one Q buffer and a
  // one-box O stage lost 3-6% at 3k-4k (causal 4k 567 -> 533).
  // head_dim 128's causal short tier takes a third Q buffer (224 KB of shared memory in all), so a CTA's Q loads two
  // tiles ahead: at 512 keys its tiles are of one to four key blocks and the next Q was not always in (H100, bf16,
  // 2026-11-26, two calls of six and eight alternating rounds: causal 512 312 -> 324 and 311 -> 324 TFLOP/s, 1k and
  // 2k even, 256 keys -1.6%; the same on the other short tiers: d64 even, non-causal d128 even).
  // softmax_under_pv = 1 (row half 0 under the warpgroup's own P V, row half 1 after its wait), measured on an H100
  // (bf16, 2026-11-27, alternating builds in four calls): with the whole softmax under the P V the block's last 40
  // MUFU.EX2 ran alone, each waiting for the MUFU pipe, and O's 64-FMUL rescale sat among the QK^T wgmmas in the GEMM
  // turn; after the split ptxas interleaves row half 1's exponentials with the rescale and the packs of P, as
  // FlashAttention-3's loop has them. head_dim 128's main tier: 3k-8k +1.8..+3.0% in every call (4k 700 -> 718, 8k
  // 710 -> 732), 16k +1.8% (one call +10%), causal 4k-8k +2.5..+4.4% (one call causal 8k -2%), 16k even, GQA 32/8
  // -2..+1%, causal +4.9%, fp16 8k +1%. Its causal short tier: 1k +1.4..+1.9%, 2k +2.9..+3.4%, 512 even; the
  // non-causal short tier lost at 512 and 1k (-1.6..-2.7%), and head_dim 64's and 256's tiers lost or were even
  // (d64 main 8k -6%, causal short tier 1k-2k -4..-5%; d256 main causal 8k -4.6%, short tiers -2..+1%), so they
  // keep 2 and 0.
  const bool key_split = tier == fwd_key_split_tier(head_dim, causal);
  const bool short_keys = tier == kTierShortKeys || key_split ||  // the key-split and scheduled tiers: the short tile
                          tier == fwd_scheduled_tier(head_dim, causal);
  const bool half_first = causal && (short_keys || head_dim == 64);
  // q_registers, measured on an H100 (bf16, 2026-11-27, three calls of 5-8 alternating rounds with an A/A tree at
  // 0.995-1.005; bench/results/2026-11-27-h100-fwd-q-registers-ab.txt): the causal short tiers, head_dim 128 2k /
  // 3000 / 4k / GQA 32/8 4k +0.5 / +1.1 / +0.7 / +1.0% (512 and 1k even), head_dim 64 512 / 1k / 2k +1.4 / +1.7 /
  // +1.9%; the non-causal short tier of head_dim 128 lost 1.2-1.6% at 512 and 1k in two calls and keeps Q in shared
  // memory. The main tiers have no registers to spare: head_dim 128's wider blocks spilled 32-312 bytes, head_dim 64's
  // three warpgroups at 160 registers 96-144.
  // masked_loop, measured on an H100 (bf16, 2026-11-27, alternating builds with an A/A tree): d128 causal 5000-16k
  // +2.3..+2.5%, GQA 32/8 8k +1.4%, its short tier 2k-4k +0.8..+1.3% (1k even); d64 main 4k-16k +2.7..+3.6%; d256 8k
  // +1.8%, 2k even. Head_dim 64's short tier lost (1k -3.1..-3.8%, 2k -5.0%) and head_dim 256's (1k +3.0%, 512 even)
  // had ptxas put WARPSYNCs before its GEMMs (test_collective_operands_are_warp_uniform): both keep one loop.
  const bool masked_loop = causal && (head_dim == 128 || !short_keys);
  // q_o_evict_first, measured on an H100 (bf16, 2026-11-27, three calls of 5-7 alternating rounds with an A/A tree at
  // 0.997-1.002 on these rows; bench/results/2026-11-27-h100-fwd-l2-cache-hints-ab.txt): the causal 512 rows, which
  // move Q, K, V and O through DRAM once, head_dim 128 +1.1% (on every tier: +1.2 / +0.9%), head_dim 256 +1.1% (+1.1 /
  // +0.7%), head_dim 256 causal 1k +0.7%; causal 1k-4k at head_dim 128 and head_dim 64's causal 512 even. Not on the
  // other tiers: head_dim 128 at 16k keys lost 6% with O's store evict_first (not profiled; its one Q buffer waits for
  // that store to have read O), and 4-6% with K and V evict_last (they outgrow L2).
  // split_tile: in kTierSplitTile alone. Head_dim 64's main tier has four K/V stages (two before; H100, bf16,
  // 2026-11-27, alternating builds in one call: 640-16k +1.3..+3.8%, causal 4k / 8k even); the split tile gains the
  // same beside either (1k: two stages +9.5% over two, four +8.4% over four).
  const bool split = tier == fwd_split_tier(head_dim, causal);
  // key_splits: the short tier's tile, one Q buffer (a CTA has one tile), O through the Q rows; the partial results
  // take the Q and K/V memory of the CTAs that do not store once every key block has been read. With split_tile a tile
  // of at most 64 packed rows (decoding) runs them on both warpgroups, each over every second key block, instead of
  // one over padding; head_dim 256 (64-key blocks, 192 KB) has shared memory left for a split tile of 8 rows alone.
  if (key_split)
    return FwdConfig{head_dim, kKeySplitTileRows, head_dim == 256 ? 64 : 128, 2, 2, 24, 240, 1, 0, 4, half_first, 0, masked_loop,
                     true, true, head_dim == 256 ? kKeySplitNarrowRows : 64};
  if (head_dim == 64)
    return short_keys
               ? FwdConfig{64, 128, 128, 2, 2, 24, 240, 2, 0, 4, half_first, 0, masked_loop, false, false, 64, causal}
               : FwdConfig{64, 192, 128, 4, 3, 32, 160, 2, 2, 4, half_first, 0, masked_loop, split, false};
  const bool long_keys = tier == fwd_long_tier(head_dim, causal);  // (fwd_long_keys)
  if (head_dim == 128) {
    if (short_keys)
      return FwdConfig{128, 128, 128, 2, 2, 24, 240, causal ? 3 : 2, causal ? 1 : 0, 4, half_first, 0, masked_loop,
                       false, false, 64, causal, causal};
    // Under a causal mask beyond 4k keys a CTA runs one tile (attention_fwd.cuh), so a second Q buffer is never
    // used: the main tier takes the long-key tier's tile, 192-key blocks with one Q buffer. H100, bf16, 2026-11-27,
    // against 160-key blocks with two Q buffers (bench/results/2026-11-27-h100-fwd-d128-causal-kb192-ab.txt, 8
    // rounds with an A/A tree): causal 5000 / 8k / 16k +1.5 / +1.6 / +2.0%, GQA 32/8 8k / 16k +2.7 / +0.7%.
    return long_keys || causal
               ? FwdConfig{128, 128, 192, 2, 2, 24, 240, 1, 1, 1, half_first, 0, masked_loop, false, false}
               : FwdConfig{128, 128, 160, 2, 2, 24, 240, 2, 1, 1, half_first, 0, masked_loop, false, false};
  }
  return short_keys ? FwdConfig{256, 128, 64, 2, 2, 24, 240, 1, 0, 4, half_first, 2, masked_loop, false, false, 64,
                                false, causal}
                    : FwdConfig{256, 128, 80, 2, 2, 24, 240, 1, 2, 1, half_first, 0, masked_loop, false, false};
}

constexpr bool fwd_config_valid(const FwdConfig& c) {
  return c.block_m == 64 * c.consumer_warpgroups && c.block_n % 16 == 0 && c.head_dim % 64 == 0 &&
         c.softmax_under_pv >= 0 && c.softmax_under_pv <= 2 && c.stages >= (c.softmax_under_pv > 0 ? 2 : 1) &&
         c.q_buffers >= 1 &&
         c.softmax_chains >= 1 && (c.softmax_chains & (c.softmax_chains - 1)) == 0 &&
         (!c.half_first_block || c.block_n / 2 % 16 == 0) &&
         (c.o_stage_boxes == 0 || (c.head_dim / 64) % c.o_stage_boxes == 0) &&
         (!c.split_tile || c.o_stage_boxes == 0) && (!c.key_splits || c.o_stage_boxes == 0) &&
         register_budget_fits(c.consumer_warpgroups, c.producer_regs, c.consumer_regs);
}

constexpr bool fwd_configs_valid() {
  for (int head_dim : {64, 128, 256})
    for (bool causal : {false, true})
      for (int tier = 0; tier < fwd_tiers(head_dim, causal); ++tier)
        if (!fwd_config_valid(fwd_config(head_dim, causal, tier))) return false;
  return true;
}
static_assert(fwd_configs_valid());

}  // namespace dhp::kernels
