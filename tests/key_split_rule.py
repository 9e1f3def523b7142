"""The forward's key-split rule (src/kernels/fwd_config.h) in Python, from dhp_build_info's numbers, for the suites that
pick shapes by it (test_forward.py, test_audit_dynamic.py); tests/cpp/key_splits.cpp checks the C++ rule itself."""

from __future__ import annotations


def key_split_pack(heads_q, heads_kv):
    """Query heads a key-split tile packs into its rows (fwd_config.h, fwd_key_split_pack)."""
    group = heads_q // heads_kv
    return min(group & -group, 64)


def key_splits(info, seqlen_q, seqlen_k, heads_q=1, heads_kv=1):
    """(runs, 128-key blocks a run) of a tile's key blocks (fwd_config.h, fwd_key_splits; one run: no splits), ignoring
    the head_dim: at most the largest cluster of "key_split_waves" of which the sequence's tiles (packed heads x 128-row
    tiles) all run at once, at least "key_split_min_blocks" 128-key blocks a run ("key_split_narrow_min_blocks" for a
    tile of at most "key_split_narrow_rows" packed rows), splits from 2 x "key_split_min_blocks" blocks."""
    blocks = -(-seqlen_k // 128)
    limit = next(t["max_seqlen_q"] for t in info["forward_tiles"] if t["key_splits"])
    pack = key_split_pack(heads_q, heads_kv)
    narrow = seqlen_q * pack <= info["key_split_narrow_rows"]
    least = info["key_split_narrow_min_blocks" if narrow else "key_split_min_blocks"]
    tiles = heads_q // pack * -(-seqlen_q * pack // 128)
    wave = next((ctas for ctas, clusters in info["key_split_waves"] if tiles <= clusters), 1)
    wanted = min(blocks // least, wave)
    if seqlen_q > limit or blocks < 2 * info["key_split_min_blocks"] or wanted < 2:
        return 1, blocks
    per_run = -(-blocks // wanted)
    return -(-blocks // per_run), per_run


def key_split_runs(info, seqlen_q, seqlen_k, heads_q=1, heads_kv=1):
    return key_splits(info, seqlen_q, seqlen_k, heads_q, heads_kv)[0]


def key_split_runs_a_cta(info, head_dim, batch, seqlen_q, seqlen_k, heads_q, heads_kv):
    """Runs of a tile a CTA takes (fwd_config.h, fwd_key_split_runs): 1 but for tiles of at most
    "key_split_narrow_rows" packed rows, there the count of least time up to the head_dim's "key_split_max_runs" by the
    model of the waves (in key blocks: a wave lasts as its slowest CTA or as its clusters' blocks at
    "key_split_stream_ctas" CTAs' speed, plus "key_split_wave_blocks"; on a tie the CTAs all as busy, then the fewer runs)."""
    runs, per_run = key_splits(info, seqlen_q, seqlen_k, heads_q, heads_kv)
    pack = key_split_pack(heads_q, heads_kv)
    if seqlen_q * pack > info["key_split_narrow_rows"]:
        return 1
    tiles = batch * heads_q // pack * -(-seqlen_q * pack // 128)
    stream, start = info["key_split_stream_ctas"], info["key_split_wave_blocks"]

    def wave(clusters, per_cta):
        return max(per_cta * per_run * stream, clusters * runs * per_run) + start * stream

    best, best_key = 1, None
    for most in range(1, info["key_split_max_runs"][str(head_dim)] + 1):
        ctas = -(-runs // most)
        per_cta = -(-runs // ctas)
        at_once = next(clusters for size, clusters in reversed(info["key_split_waves"]) if size >= ctas)
        time = tiles // at_once * wave(at_once, per_cta) + (wave(tiles % at_once, per_cta) if tiles % at_once else 0)
        key = (time, ctas * per_cta - runs)  # on a tie, the CTAs all as busy, then the fewer runs a CTA
        if best_key is None or key < best_key:
            best, best_key = per_cta, key
    return best
