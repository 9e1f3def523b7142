// The forward's key-split rule (src/kernels/fwd_config.h: fwd_key_splits, fwd_key_split_pack, fwd_key_split_runs) on
// the host: which shapes split, into how many runs of how many 128-key blocks, how many query heads a tile packs, and
// how many runs a CTA takes. Needs no GPU.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string_view>

#include "kernels/fwd_config.h"

namespace {

using namespace dhp::kernels;

long failures = 0;

void expect(bool ok, const char* what, long long a, long long b, long long c) {
  if (!ok && failures++ < 10) std::printf("%s (%lld, %lld, %lld)\n", what, a, b, c);
}

void check_splits(int head_dim, long long seqlen_q, long long seqlen_k, int heads_q, int heads_kv) {
  const KeySplits s = fwd_key_splits(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv);
  const long long blocks = (seqlen_k + 127) / 128;
  const long long tiles = fwd_key_split_tiles(seqlen_q, heads_q, heads_kv);
  int wave = 1;
  for (const KeySplitWave& w : kKeySplitWaves)
    if (wave == 1 && tiles <= w.clusters) wave = w.ctas;
  const bool splits = fwd_key_split_tier(head_dim, false) >= 0 && seqlen_q <= kKeySplitMaxSeqlenQ &&
                      blocks >= 2 * kKeySplitMinBlocks && wave >= 2;
  expect(splits == (s.runs > 1), "splits where the rule says", head_dim, seqlen_q, seqlen_k);
  if (!splits) return;
  expect(s.runs <= kKeySplitMaxCtas, "at most a portable cluster", seqlen_q, seqlen_k, s.runs);
  // A cluster of a run a CTA for each of the sequence's tiles runs at once: the wave's cluster size bounds the runs.
  expect(s.runs <= wave, "at most the wave's cluster", tiles, s.runs, wave);
  const bool narrow = seqlen_q * fwd_key_split_pack(heads_q, heads_kv) <= kKeySplitNarrowRows;
  expect(s.blocks >= (narrow ? kKeySplitNarrowMinBlocks : kKeySplitMinBlocks), "at least the minimum run", seqlen_q,
         seqlen_k, s.blocks);
  expect(s.runs * (long long)s.blocks >= blocks, "every block taken", seqlen_k, s.runs, s.blocks);
  expect((s.runs - 1) * (long long)s.blocks < blocks, "no run without a block", seqlen_k, s.runs, s.blocks);
  // As many runs as the minimum run and the wave allow, each as long as that many runs need: more heads never split
  // into more.
  const long long wanted = std::min<long long>(blocks / (narrow ? kKeySplitNarrowMinBlocks : kKeySplitMinBlocks), wave);
  expect(s.blocks == (blocks + wanted - 1) / wanted, "runs as short as the wave and the minimum run allow", seqlen_k,
         s.runs, s.blocks);
  const KeySplits more_heads = fwd_key_splits(head_dim, seqlen_q, seqlen_k, 2 * heads_q, 2 * heads_kv);
  expect(more_heads.runs <= s.runs, "more runs for more heads", heads_q, s.runs, more_heads.runs);
}

// The runs a CTA takes in a batch of `batch` such sequences (fwd_key_split_runs).
int runs_a_cta(int head_dim, long long seqlen_q, long long seqlen_k, int heads_q, int heads_kv, long long batch) {
  const KeySplits s = fwd_key_splits(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv);
  return fwd_key_split_runs(head_dim, s, batch * fwd_key_split_tiles(seqlen_q, heads_q, heads_kv),
                            seqlen_q * fwd_key_split_pack(heads_q, heads_kv));
}

void check_runs(int head_dim, long long seqlen_q, long long seqlen_k, int heads_q, int heads_kv, long long batch) {
  const KeySplits s = fwd_key_splits(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv);
  if (s.runs < 2) return;
  const int per_cta = runs_a_cta(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv, batch);
  expect(per_cta >= 1 && per_cta <= fwd_key_split_max_runs(head_dim), "at most the head_dim's runs a CTA", head_dim,
         batch, per_cta);
  expect(per_cta == 1 || seqlen_q * fwd_key_split_pack(heads_q, heads_kv) <= kKeySplitNarrowRows,
         "several runs a CTA in narrow tiles alone", seqlen_q, heads_q, per_cta);
  const int ctas = (s.runs + per_cta - 1) / per_cta;
  expect(ctas <= kKeySplitMaxCtas && (ctas - 1) * per_cta < s.runs, "a portable cluster, no CTA without a run", s.runs,
         per_cta, ctas);
  expect(per_cta == (s.runs + ctas - 1) / ctas, "the runs as even over the CTAs as they allow", s.runs, per_cta, ctas);
}

// With --table: the rule on 20,000 shapes drawn from a fixed seed, a line each (head_dim seqlen_q seqlen_k heads_q
// heads_kv batch runs blocks runs_a_cta), for tests/test_capi.py to hold tests/key_split_rule.py, the rule in Python
// that the GPU suites choose shapes by, to this one.
void print_table() {
  std::mt19937 draw(1);
  const int heads[][2] = {{1, 1}, {32, 8}, {24, 24}, {40, 40}, {72, 72}, {8, 1}, {16, 8}, {64, 8}, {32, 32}, {12, 2}};
  for (int i = 0; i < 20000; ++i) {
    const int head_dim = 64 << (draw() % 3);
    const auto& [heads_q, heads_kv] = heads[draw() % 10];
    const long long seqlen_q = draw() % 2 ? 1 + draw() % 8 : 1 + draw() % 160, seqlen_k = 1 + draw() % 70000;
    const long long batch = 1 + draw() % 20;
    const KeySplits s = fwd_key_splits(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv);
    std::printf("%d %lld %lld %d %d %lld %d %d %d\n", head_dim, seqlen_q, seqlen_k, heads_q, heads_kv, batch, s.runs,
                s.blocks, runs_a_cta(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv, batch));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string_view(argv[1]) == "--table") {
    print_table();
    return 0;
  }
  const int heads[][2] = {{1, 1}, {32, 8}, {24, 24}, {40, 40}, {72, 72}, {8, 1}};
  for (int head_dim : {64, 128, 256})
    for (long long seqlen_q : {1, 2, 16, 64, 127, 128, 129, 1000})
      for (long long seqlen_k = 1; seqlen_k <= 70000; seqlen_k += seqlen_k < 4096 ? 1 : 97)
        for (const auto& [heads_q, heads_kv] : heads) {
          check_splits(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv);
          if (seqlen_k % 7 == 0)
            for (long long batch : {1, 2, 3, 8, 16, 100, 1000})
              check_runs(head_dim, seqlen_q, seqlen_k, heads_q, heads_kv, batch);
        }
  expect(fwd_key_splits(128, 1, 16384, 32, 8).runs == kKeySplitMaxCtas, "decoding 16k keys, GQA 32/8: the whole cluster",
         1, 16384, 0);
  expect(fwd_key_splits(128, 1, 1920, 1, 1).runs == 1 && fwd_key_splits(128, 1, 1921, 1, 1).runs == 4,
         "first split at 16 blocks, a narrow tile's in runs of 4", 1920, 1921, 0);
  expect(fwd_key_splits(128, 16, 1920, 32, 8).runs == 1 && fwd_key_splits(128, 16, 1921, 32, 8).runs == 2,
         "first split at 16 blocks, 64 packed rows' in runs of 8", 1920, 1921, 0);
  // The waves: MHA with 16 heads takes clusters of 6, 24 heads of 4, 32 heads of 3, 40 of 2, 72 none; 128 queries of
  // GQA 32/8 pack into 4 tiles a K/V head, 32 in all: clusters of 3.
  expect(fwd_key_splits(128, 1, 16384, 16, 16).runs == 6, "MHA 16 heads: clusters of 6", 16, 16, 0);
  expect(fwd_key_splits(128, 1, 16384, 24, 24).runs == 4, "MHA 24 heads: clusters of 4", 24, 24, 0);
  expect(fwd_key_splits(128, 1, 16384, 32, 32).runs == 3, "MHA 32 heads: clusters of 3", 32, 32, 0);
  expect(fwd_key_splits(128, 1, 16384, 40, 40).runs == 2, "MHA 40 heads: clusters of 2", 40, 40, 0);
  expect(fwd_key_splits(128, 1, 16384, 72, 72).runs == 1, "MHA 72 heads: no splits", 72, 72, 0);
  // test_forward's KEY_SPLIT_WAVES: clusters of 6 and 5 where the keys allow as many runs.
  expect(fwd_key_splits(64, 1, 6200, 16, 16).runs == 6 && fwd_key_splits(64, 1, 5200, 20, 20).runs == 5,
         "MHA 16 / 20 heads: clusters of 6 / 5", 16, 20, 0);
  expect(fwd_key_splits(128, 128, 16384, 32, 8).runs == 3, "128 queries, GQA 32/8: clusters of 3", 32, 8, 128);
  expect(fwd_key_split_tiles(128, 32, 8) == 32 && fwd_key_split_tiles(1, 32, 8) == 8, "tiles of a sequence", 32, 8, 0);
  // Runs a CTA, decoding GQA 32/8 (8 runs at 4k-16k keys, 7 at 3584): one sequence 1; a batch of 8 at 8k 4 (64 tiles
  // in clusters of 2, one wave), at 4k 4; 2 sequences at 8k 2; 4 at 16k 4 (a tie with 3, 3 and 2); 4 at 3584 3 (3, 3
  // and 1); 16 queries 1; head_dim 256 as the others (GQA 16/8 at 8k keys: batch 2 2, batch 8 4).
  expect(runs_a_cta(128, 1, 8192, 32, 8, 1) == 1 && runs_a_cta(128, 1, 8192, 32, 8, 8) == 4, "8k keys: 1, batch 8: 4",
         1, 8, 0);
  expect(runs_a_cta(128, 1, 4096, 32, 8, 8) == 4 && runs_a_cta(64, 1, 4096, 32, 8, 8) == 4, "4k keys, batch 8: 4",
         128, 64, 0);
  expect(runs_a_cta(128, 1, 8192, 32, 8, 2) == 2 && runs_a_cta(128, 1, 16384, 32, 8, 4) == 4, "batch 2 at 8k, 4 at 16k",
         2, 4, 0);
  expect(runs_a_cta(128, 1, 3584, 32, 8, 4) == 3, "batch 4 at 3584 keys: 3 runs a CTA, the last CTA's 1", 4, 3584, 0);
  expect(runs_a_cta(256, 1, 8192, 16, 8, 2) == 2 && runs_a_cta(256, 1, 8192, 16, 8, 8) == 4,
         "head_dim 256 at 8k keys, batch 2: 2, batch 8: 4", 2, 8, 0);
  expect(runs_a_cta(128, 16, 8192, 32, 8, 8) == 1, "64 packed rows: 1", 128, 16, 0);
  // (heads_q, heads_kv, packed): the largest power of two dividing the group, at most 64.
  const int packs[][3] = {{32, 32, 1}, {32, 8, 4}, {8, 1, 8}, {12, 2, 2}, {6, 2, 1}, {96, 1, 32}, {128, 1, 64},
                          {256, 2, 64}, {40, 8, 1}, {48, 4, 4}};
  for (const auto& [heads_q, heads_kv, packed] : packs) {
    const int p = fwd_key_split_pack(heads_q, heads_kv);
    expect(p == packed, "fwd_key_split_pack", heads_q, heads_kv, p);
    expect(p >= 1 && 64 % p == 0 && (heads_q / heads_kv) % p == 0, "a power of two dividing the group and 64",
           heads_q, heads_kv, p);
  }
  std::printf("key_splits: %ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
