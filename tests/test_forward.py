"""dhp.attention forward on the GPU (torch) against the float64 reference, with FlashAttention's error rule.

Every compiled (dtype, head_dim) x causal x GQA ratio x seqlen pair; outputs poisoned with NaN beforehand.
Then layouts, explicit scales, every output written (NaN-poisoned lse), bit determinism and error paths.
"""

from __future__ import annotations

import math

import dhp
import pytest
from dhp import reference
from key_split_rule import key_split_runs, key_split_runs_a_cta
from torch_helpers import assert_bitwise_equal, inputs, randn

SEQLENS = [
    (1, 1), (17, 17), (128, 128), (1000, 1000), (4097, 4097),  # causal: persistent grid up to 4096 keys
    (113, 203), (239, 1), (799, 3), (1, 239), (1023, 1024),
    (257, 512), (257, 513), (257, 1025), (257, 2048), (257, 2049),  # either side of the short-key tiers' limits
    (256, 2049), (1000, 2100),  # main tiers: an even number of query blocks, a partial last key block
    (40, 700), (200, 1200),  # split tiers: one query tile; two, the second split, over 10 key blocks
    (200, 2700), (200, 2304),  # and under a causal mask: 22 and 18 key blocks
    (40, 2300), (1, 4500), (100, 2000), (3, 8300),  # key splits: 2, 4, 2 and 8 CTAs, the last one's blocks fewer
    (300, 8300),  # long-key tiers: two query tiles, a partial last key block
]
HEADS = {"mha": (2, 2), "gqa2": (4, 2), "mqa": (8, 1)}  # (heads_q, heads_kv)


def tier_of(info, head_dim, causal, seqlen_q, seqlen_k, heads_q=1, heads_kv=1):
    """The tier run_forward takes (attention_fwd.cuh): the key-split tier where it splits, else the short-key tier up
    to its seqlen_k limit, else the split tier up to its seqlen_q limit where the last query tile holds at most 64 rows,
    else the long-key tier from its seqlen_k limit, else the main tier."""
    family = [t for t in info["forward_tiles"] if (t["head_dim"], t["causal"]) == (head_dim, causal)]
    for t in family:
        if t["key_splits"] and key_split_runs(info, seqlen_q, seqlen_k, heads_q, heads_kv) > 1:
            return t["tier"]
    for t in family:  # the scheduled short tier (both limits) first, then the short-key tier
        if t["max_seqlen_k"] is not None and t["min_seqlen_k"] is not None and \
                t["min_seqlen_k"] <= seqlen_k <= t["max_seqlen_k"]:
            return t["tier"]
    for t in family:
        if t["max_seqlen_k"] is not None and t["min_seqlen_k"] is None and seqlen_k <= t["max_seqlen_k"]:
            return t["tier"]
    for t in family:
        split = t["split_tile"] and not t["key_splits"]
        if split and seqlen_q <= t["max_seqlen_q"] and (seqlen_q - 1) % t["block_m"] < 64:
            return t["tier"]
    for t in family:
        if t["min_seqlen_k"] is not None and t["max_seqlen_k"] is None and seqlen_k >= t["min_seqlen_k"]:
            return t["tier"]
    return next(t["tier"] for t in family if t["max_seqlen_k"] is None and t["max_seqlen_q"] is None
                and t["min_seqlen_k"] is None)


def first_block_unseen(tile, seqlen_q, seqlen_k):
    """Whether some warpgroup of some query tile skips its tile's first key block (attention_fwd.cuh, block_unseen):
    causal, none of its 64 rows sees a key of it. The kernel's rule, on shapes alone; a split tier's last query tile
    takes the split path instead (a query tile of at most split_rows rows: the last)."""
    block_m, block_n = tile["block_m"], tile["block_n"]
    for m_block in range(-(-seqlen_q // block_m)):
        if tile["split_tile"] and m_block * block_m + tile["split_rows"] >= seqlen_q:
            continue
        last_col = (m_block + 1) * block_m - 1 + seqlen_k - seqlen_q
        n_blocks = 0 if last_col < 0 else min(-(-seqlen_k // block_n), last_col // block_n + 1)
        for consumer in range(tile["consumer_warpgroups"] - 1):
            last_row = m_block * block_m + (consumer + 1) * 64 - 1
            if n_blocks > 1 and last_row + 1 + seqlen_k - seqlen_q <= (n_blocks - 1) * block_n:
                return True
    return False


def test_seqlens_reach_every_skipped_first_block(ext):
    """Each causal tile whose key blocks do not tile its query tile's end (block_n not a multiple of block_m) has
    warpgroups that skip an unseen first key block: SEQLENS must take that path in every such tier."""
    info = dhp.build_info()
    for tile in (t for t in info["forward_tiles"] if t["causal"]):
        if tile["block_n"] % tile["block_m"]:
            reached = [p for p in SEQLENS if tier_of(info, tile["head_dim"], True, *p) == tile["tier"]
                       and first_block_unseen(tile, *p)]
            assert reached, f"no SEQLENS pair of its tier makes a warpgroup skip a block of {tile}"
        else:  # the kernel leaves the skip out: with seqlen_q = seqlen_k the first block holds the whole diagonal
            assert not any(first_block_unseen(tile, n, n) for n in range(1, 16 * tile["block_m"], 7)), tile


def split_tile_blocks(tile, seqlen_q, seqlen_k):
    """Key blocks of the last query tile (attention_fwd.cuh, key_blocks)."""
    blocks = -(-seqlen_k // tile["block_n"])
    if not tile["causal"]:
        return blocks
    last_col = -(-seqlen_q // tile["block_m"]) * tile["block_m"] - 1 + seqlen_k - seqlen_q
    return 0 if last_col < 0 else min(blocks, last_col // tile["block_n"] + 1)


def test_seqlens_reach_every_split_tier(ext):
    """Each split tier runs on SEQLENS with several query tiles and, where key splits leave it any, with one, and with
    its key blocks dealt to the warpgroups in every remainder; the non-causal ones with a partial last key block and a
    whole one; and SEQLENS also run each family's main tier."""
    info = dhp.build_info()
    tiles = info["forward_tiles"]
    for tile in (t for t in tiles if t["split_tile"] and not t["key_splits"]):
        family = (tile["head_dim"], tile["causal"])
        reached = [(q, k) for q, k in SEQLENS if tier_of(info, *family, q, k) == tile["tier"]]
        one_tile = [k for k in range(1, 4 * tile["max_seqlen_q"], 97) if tier_of(info, *family, 64, k) == tile["tier"]]
        assert not one_tile or any(q <= 64 for q, _ in reached), (tile, reached)
        assert any(q > tile["block_m"] for q, _ in reached), (tile, reached)
        assert tile["causal"] or {k % tile["block_n"] == 0 for _, k in reached} == {True, False}, (tile, reached)
        blocks = {split_tile_blocks(tile, q, k) % tile["consumer_warpgroups"] for q, k in reached}
        assert blocks == set(range(tile["consumer_warpgroups"])), (tile, reached)
        assert any(tier_of(info, *family, q, k) == 0 for q, k in SEQLENS), tile


def test_seqlens_reach_every_long_key_tier(ext):
    """Each long-key tier runs on SEQLENS with several query tiles and a partial last key block, and its family's main
    tier on seqlens short of its limit."""
    info = dhp.build_info()
    for tile in (t for t in info["forward_tiles"] if t["min_seqlen_k"] is not None and t["max_seqlen_k"] is None):
        family = (tile["head_dim"], tile["causal"])
        reached = [(q, k) for q, k in SEQLENS if tier_of(info, *family, q, k) == tile["tier"]]
        assert any(q > tile["block_m"] and k % tile["block_n"] for q, k in reached), (tile, reached)
        assert any(tier_of(info, *family, q, k) == 0 for q, k in SEQLENS), tile


def test_seqlens_reach_every_key_split_tier(ext):
    """Each key-split tier runs on SEQLENS with two CTAs a tile and with the most, with a partial last key block, and
    (under a causal mask) with seqlen_q > 1; HEADS pack 1, 2 and 8 query heads into its tiles' rows; and with a last
    query tile of at most split_rows packed rows (its warpgroups split the key blocks) and of more."""
    info = dhp.build_info()
    for tile in (t for t in info["forward_tiles"] if t["key_splits"]):
        family = (tile["head_dim"], tile["causal"])
        reached = [(q, k) for q, k in SEQLENS if tier_of(info, *family, q, k) == tile["tier"]]
        runs = {key_split_runs(info, q, k) for q, k in reached}
        assert {2, info["key_split_max_ctas"]} <= runs, (tile, reached)
        assert any(k % 128 for _, k in reached) and any(q > 1 for q, _ in reached), (tile, reached)
        rows = tile["split_rows"]
        assert tile["split_tile"] and any(q <= rows for q, _ in reached) and any(q > rows for q, _ in reached), tile
    assert {hq // hkv for hq, hkv in HEADS.values()} == {1, 2, 8}


def check_against_reference(torch, q, k, v, out, lse, causal, softmax_scale):
    """out and lse from dhp against the float64 reference; the error budget is FlashAttention's."""
    ref_out, ref_lse = reference.attention_reference(q, k, v, causal, softmax_scale)
    budget = reference.error_budget(q, k, v, causal, softmax_scale, ref_out, ref_lse)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    error = reference.max_abs_error(out, ref_out, ref_lse)
    assert error <= budget, f"max abs error {error:.3e} > budget {budget:.3e}"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse is -inf exactly on the rows that see no key"
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all(), "rows that see no key are 0"
    finite = ~empty
    lse_error = (lse[finite].double() - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_error <= 1e-3 + 1e-4 * ref_lse[finite].abs().max().item(), f"lse error {lse_error:.3e}"


def run_and_check(torch, q, k, v, causal, softmax_scale=None):
    """Poisoned out= path and default path: both checked, and identical to the bit."""
    poisoned = torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)
    out, lse = dhp.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True, out=poisoned)
    assert out is poisoned
    check_against_reference(torch, q, k, v, out, lse, causal, softmax_scale)
    out2, lse2 = dhp.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    assert out2.is_contiguous() and out2.device == q.device
    assert_bitwise_equal(torch, out, out2)
    assert_bitwise_equal(torch, lse, lse2)
    assert_bitwise_equal(torch, out, dhp.attention(q, k, v, causal=causal, softmax_scale=softmax_scale))
    return out, lse


@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"sq{a}_sk{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(torch_cuda, dtype_name, head_dim, causal, heads, seqlens):
    torch = torch_cuda
    seqlen_q, seqlen_k = seqlens
    batch = 2 if max(seqlens) <= 1024 else 1
    q, k, v = inputs(torch, dtype_name, batch, seqlen_q, seqlen_k, *heads, head_dim, seed=seqlen_q + seqlen_k)
    with torch.no_grad():
        run_and_check(torch, q, k, v, causal)


KEY_SPLIT_WAVES = [  # (heads_q, heads_kv, seqlen_q, seqlen_k) and the CTAs a tile takes
    ((16, 16, 1, 6200), 6), ((20, 20, 1, 5200), 5), ((24, 24, 1, 4500), 4), ((32, 8, 128, 4500), 3),
    ((40, 40, 1, 4500), 2), ((72, 72, 1, 4500), 1),
]


def test_key_split_waves_reach_every_cluster(ext):
    """KEY_SPLIT_WAVES take clusters of every size below the largest (a sequence of 16, 20, 24 or 40 tiles, or of 32
    with 128 packed queries: "key_split_waves") and no splits at all (72 tiles: no cluster lets them all run at once)."""
    info = dhp.build_info()
    runs = [key_split_runs(info, q, k, hq, hkv) for (hq, hkv, q, k), _ in KEY_SPLIT_WAVES]
    assert runs == [c for _, c in KEY_SPLIT_WAVES], runs
    assert {c for _, c in KEY_SPLIT_WAVES} >= {c for c, _ in info["key_split_waves"][1:]} | {1}


@pytest.mark.parametrize("shape", [s for s, _ in KEY_SPLIT_WAVES], ids=[f"h{a}_{b}_sq{c}_sk{d}" for (a, b, c, d), _ in
                                                                         KEY_SPLIT_WAVES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_split_waves(torch_cuda, dtype_name, head_dim, causal, shape):
    """Many heads take smaller clusters (fwd_key_splits): checked against the reference, and a batch of two equal to
    each sequence alone, to the bit (the clusters depend on the heads, never on the batch)."""
    torch = torch_cuda
    heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = inputs(torch, dtype_name, 2, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, seed=heads_q + seqlen_q)
    with torch.no_grad():
        out, lse = run_and_check(torch, q, k, v, causal)
        for b in range(2):
            alone, alone_lse = dhp.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=causal, return_lse=True)
            assert_bitwise_equal(torch, out[b:b + 1], alone)
            assert_bitwise_equal(torch, lse[b:b + 1], alone_lse)


KEY_SPLIT_RUNS = [  # (batch, heads_q, heads_kv, seqlen_q, seqlen_k): a batch whose CTAs take several runs of a tile
    (8, 32, 8, 1, 8192), (2, 32, 8, 1, 8192), (4, 32, 8, 1, 3584), (8, 32, 32, 1, 8192), (8, 64, 8, 1, 9000),
]


def test_key_split_runs_reach_every_count(ext):
    """KEY_SPLIT_RUNS give CTAs of every head_dim two, three and four runs of a tile (fwd_key_split_runs), with a CTA
    left runs short (3584 keys: 7 runs over 3 CTAs), clusters of one CTA (MHA 32 heads: 3 runs) and eight packed rows
    (GQA 64/8); alone, each of those sequences gives a CTA one run."""
    info = dhp.build_info()
    for head_dim in (64, 128, 256):
        counts = [key_split_runs_a_cta(info, head_dim, b, q, k, hq, hkv) for b, hq, hkv, q, k in KEY_SPLIT_RUNS]
        assert counts == [4, 2, 3, 3, 4], (head_dim, counts)
        assert all(key_split_runs_a_cta(info, head_dim, 1, q, k, hq, hkv) == 1 for _, hq, hkv, q, k in KEY_SPLIT_RUNS)
    assert key_split_runs(info, 1, 3584, 32, 8) == 7 and key_split_runs(info, 1, 8192, 32, 32) == 3


@pytest.mark.parametrize("shape", KEY_SPLIT_RUNS, ids=[f"b{a}_h{b}_{c}_sq{d}_sk{e}" for a, b, c, d, e in KEY_SPLIT_RUNS])
def test_key_split_runs(torch_cuda, dtype_name, head_dim, shape):
    """A batch whose CTAs take several runs of a tile (key_split_runs_a_cta): checked against the reference, and each
    sequence equal to the bit to itself alone (one run a CTA): the runs a CTA follow the batch, the bits do not."""
    torch = torch_cuda
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = inputs(torch, dtype_name, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, seed=batch + seqlen_k)
    with torch.no_grad():
        out, lse = run_and_check(torch, q, k, v, False)
        for b in range(batch):
            alone, alone_lse = dhp.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], return_lse=True)
            assert_bitwise_equal(torch, out[b:b + 1], alone)
            assert_bitwise_equal(torch, lse[b:b + 1], alone_lse)


PERSISTENT_ORDERS = {  # (batch, heads, seqlen) a causal launch takes in each order (tests/cpp/tile_order.cpp)
    "snake": {64: (1, 32, 1000), 128: (1, 32, 1000), 256: (4, 32, 264)},
    "sections": {64: (1, 16, 2368), 128: (1, 8, 4096), 256: (3, 48, 264)},
    "all_heads": {64: (4, 32, 520), 128: (1, 16, 4096), 256: (3, 12, 520)},
    # list_schedule: head_dim 64's tiers and head_dim 128's scheduled short tier from 2049 keys, where the K/V of all
    # heads exceed 32 MB (the causal split tier's
    # rotation, which the schedule took over up to 4096 tiles, is left to tests/cpp/tile_order.cpp: the next launch
    # that takes it is 512 heads at 2120 keys)
    "schedule": {64: (3, 16, 4096), 128: (1, 24, 4096)},
    # one CTA per tile where no order or schedule leaves the busiest CTA within 15% of the mean
    "one_cta_per_tile": {64: (1, 12, 2120), 128: (2, 24, 264), 256: (1, 48, 264)},
    # beyond persistent_causal_max_seqlen_k, the persistent grid in a scheduled tier where the busiest CTA is within 2%
    # of the mean: in the snake, and by the static schedule
    "beyond_snake": {64: (1, 48, 4200)},
    "beyond_schedule": {64: (1, 64, 4608)},
}


@pytest.mark.parametrize("order", list(PERSISTENT_ORDERS))
def test_causal_persistent_orders(torch_cuda, dtype_name, head_dim, order):
    """The causal persistent grid lists its tiles head by head, in sections or in one section of every head, and deals
    them in the snake or rotated (persistent_causal_order) or by a static schedule (list_schedule), whichever leaves the
    busiest CTA less work, or gives way to one CTA per tile (persistent_causal_balanced); PERSISTENT_ORDERS take each,
    every tile once, checked against the reference."""
    torch = torch_cuda
    if head_dim not in PERSISTENT_ORDERS[order]:
        pytest.skip(f"head_dim {head_dim} has no launch in the {order} order")
    batch, heads, seqlen = PERSISTENT_ORDERS[order][head_dim]
    info = dhp.build_info()
    if order.startswith("beyond"):
        assert seqlen > info["persistent_causal_max_seqlen_k"][str(head_dim)]
        assert [t["scheduled"] for t in info["forward_tiles"] if t["head_dim"] == head_dim and t["causal"] and
                t["max_seqlen_k"] is None and t["max_seqlen_q"] is None and t["min_seqlen_k"] is None] == [True]
    else:
        assert seqlen <= info["persistent_causal_max_seqlen_k"][str(head_dim)]
    q, k, v = inputs(torch, dtype_name, batch, seqlen, seqlen, heads, heads, head_dim, seed=seqlen)
    with torch.no_grad():
        out, lse = run_and_check(torch, q, k, v, True)
        # The first sequence's first four heads alone: a launch of fewer tiles than SMs, one a CTA, whatever the order.
        # The grid and the list's order never change a tile's arithmetic, so their bits are the same.
        few = [x[:1, :, :4].contiguous() for x in (q, k, v)]
        alone, alone_lse = dhp.attention(*few, causal=True, return_lse=True)
        assert_bitwise_equal(torch, out[:1, :, :4], alone)
        assert_bitwise_equal(torch, lse[:1, :4], alone_lse)


@pytest.mark.parametrize("layout", ["sliced_head_dim", "bhsd_transposed"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(300, 257), (16, 2500)], ids=["tiles", "key_splits"])  # key splits: 5-d maps
def test_strided_inputs_and_output(torch_cuda, dtype_name, head_dim, layout, causal, seqlens):
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cuda").manual_seed(7)
    (seqlen_q, seqlen_k), batch, heads_q, heads_kv = seqlens, 2, 4, 2

    def make(seqlen, heads):
        if layout == "sliced_head_dim":  # a view of the first half of a larger head dimension
            return randn(torch, (batch, seqlen, heads, 2 * head_dim), dtype, generator)[..., :head_dim]
        return randn(torch, (batch, heads, seqlen, head_dim), dtype, generator).transpose(1, 2)

    q, k, v = make(seqlen_q, heads_q), make(seqlen_k, heads_kv), make(seqlen_k, heads_kv)
    assert not q.is_contiguous()
    out = torch.full((batch, heads_q, seqlen_q, head_dim), math.nan, dtype=dtype, device="cuda").transpose(1, 2)
    with torch.no_grad():
        result, lse = dhp.attention(q, k, v, causal=causal, return_lse=True, out=out)
        assert result is out
        check_against_reference(torch, q, k, v, out, lse, causal, None)
        assert_bitwise_equal(torch, out, dhp.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal))


@pytest.mark.parametrize("softmax_scale", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_explicit_softmax_scale(torch_cuda, dtype_name, head_dim, softmax_scale, causal):
    torch = torch_cuda
    q, k, v = inputs(torch, dtype_name, 2, 333, 400, 4, 2, head_dim, seed=3)
    with torch.no_grad():
        run_and_check(torch, q, k, v, causal, softmax_scale)


@pytest.mark.parametrize("seqlens", [(239, 17), (64, 64), (17, 239)], ids=lambda s: f"sq{s[0]}_sk{s[1]}")
def test_every_output_element_is_written(torch_cuda, ext, dtype_name, head_dim, seqlens):
    """out and lse poisoned with NaN, through the binding; causal with seqlen_q > seqlen_k has rows with no key."""
    torch = torch_cuda
    q, k, v = inputs(torch, dtype_name, 2, *seqlens, 4, 2, head_dim, seed=11)
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device="cuda")
    lse = torch.full((2, 4, seqlens[0]), math.nan, dtype=torch.float32, device="cuda")
    ext.forward(q, k, v, out, lse, True, 0.0, torch.cuda.current_stream().cuda_stream)
    check_against_reference(torch, q, k, v, out, lse, True, None)


def test_bit_determinism(torch_cuda, dtype_name, head_dim):
    torch = torch_cuda
    q, k, v = inputs(torch, dtype_name, 2, 2048, 2048, 8, 2, head_dim, seed=5)
    with torch.no_grad():
        for causal in (False, True):
            first, first_lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
            for _ in range(3):
                again, again_lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
                assert_bitwise_equal(torch, first, again)
                assert_bitwise_equal(torch, first_lse, again_lse)


def test_causal_sections(torch_cuda, dtype_name, head_dim):
    """Beyond the persistent grid's limit a causal launch takes its heads in sections (src/kernels/tile_order.h):
    batch 5 x 8 heads at 4200 keys makes 4, 8 or 20 sections at head_dim 64, 128 or 256 (tests/cpp/tile_order.cpp).
    Every (batch, head) of the launch, NaN-poisoned beforehand, equals its own one-head launch to the bit."""
    torch = torch_cuda
    q, k, v = inputs(torch, dtype_name, 5, 4200, 4200, 8, 8, head_dim, seed=13)
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device="cuda")
    with torch.no_grad():
        _, lse = dhp.attention(q, k, v, causal=True, return_lse=True, out=out)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        for b in range(5):
            for h in range(8):
                one = [x[b : b + 1, :, h : h + 1].contiguous() for x in (q, k, v)]
                one_out, one_lse = dhp.attention(*one, causal=True, return_lse=True)
                assert_bitwise_equal(torch, out[b : b + 1, :, h : h + 1], one_out)
                assert_bitwise_equal(torch, lse[b : b + 1, h : h + 1], one_lse)


def test_batch_invariance(torch_cuda, dtype_name, head_dim):
    """A sequence's outputs do not depend on the rest of the batch."""
    torch = torch_cuda
    q, k, v = inputs(torch, dtype_name, 4, 777, 777, 4, 4, head_dim, seed=9)
    with torch.no_grad():
        whole, whole_lse = dhp.attention(q, k, v, causal=True, return_lse=True)
        one, one_lse = dhp.attention(q[2:3], k[2:3], v[2:3], causal=True, return_lse=True)
    assert_bitwise_equal(torch, whole[2:3], one)
    assert_bitwise_equal(torch, whole_lse[2:3], one_lse)


@pytest.mark.parametrize("seqlens", [(1100, 700), (2500, 2100)], ids=["short_tiers", "main_tiers"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_several_tiles_per_cta(torch_cuda, dtype_name, head_dim, causal, seqlens):
    """More query tiles than SMs, so each CTA of the persistent grid takes several in turn and a warpgroup issues the
    next tile's first QK^T under its last P V; with seqlen_q > seqlen_k a causal mask leaves the first tiles of each
    head without keys, between tiles with keys. Checked against the reference (NaN-poisoned out) and bit-equal to a
    one-sequence launch."""
    torch = torch_cuda
    seqlen_q, seqlen_k = seqlens
    q, k, v = inputs(torch, dtype_name, 2, seqlen_q, seqlen_k, 16, 4, head_dim, seed=seqlen_q)
    with torch.no_grad():
        out, lse = run_and_check(torch, q, k, v, causal)
        one, one_lse = dhp.attention(q[1:2], k[1:2], v[1:2], causal=causal, return_lse=True)
    assert_bitwise_equal(torch, out[1:2], one)
    assert_bitwise_equal(torch, lse[1:2], one_lse)


@pytest.mark.parametrize("shape", [(0, 16, 2), (2, 0, 2)], ids=["batch0", "seqlen_q0"])
def test_empty_calls(torch_cuda, shape):
    torch = torch_cuda
    batch, seqlen_q, heads = shape
    q = torch.empty(batch, seqlen_q, heads, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, 16, heads, 128, dtype=torch.bfloat16, device="cuda")
    out, lse = dhp.attention(q, k, k, return_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)


# Errors: the C sentence reaches Python as the right exception, and no output is touched.


def _bf16(torch, *shape):
    return torch.randn(shape, dtype=torch.bfloat16, device="cuda")


def assert_rejected(torch, error, q, k, v, match=None):
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)
    with pytest.raises(error, match=match) as caught:
        dhp.attention(q, k, v, out=out)
    assert str(caught.value)
    assert torch.isnan(out).all(), "a rejected call touched out"


def test_error_bad_head_dim(torch_cuda):
    q = _bf16(torch_cuda, 1, 16, 2, 96)
    assert_rejected(torch_cuda, ValueError, q, q, q, match="head_dim")


def test_error_mismatched_dtypes(torch_cuda):
    q = _bf16(torch_cuda, 1, 16, 2, 128)
    assert_rejected(torch_cuda, TypeError, q, q.half(), q, match="k")


def test_error_unsupported_dtype(torch_cuda):
    q = _bf16(torch_cuda, 1, 16, 2, 128).float()
    assert_rejected(torch_cuda, TypeError, q, q, q)


def test_error_out_aliases_q(torch_cuda):
    torch = torch_cuda
    q, k = _bf16(torch, 1, 16, 2, 128), _bf16(torch, 1, 16, 2, 128)
    before = q.clone()
    with pytest.raises(ValueError, match="out"):
        dhp.attention(q, k, k, out=q)
    assert_bitwise_equal(torch, q, before)


def test_error_misaligned(torch_cuda):
    """The first element sliced off a larger last dimension: data 2 bytes off 16, strides not multiples of 8."""
    q = _bf16(torch_cuda, 1, 64, 2, 128)
    k = _bf16(torch_cuda, 1, 64, 2, 129)[..., 1:]
    assert k.shape == q.shape and k.stride()[2] % 8 != 0
    assert_rejected(torch_cuda, ValueError, q, k, q)


def test_error_gqa_not_divisible(torch_cuda):
    q, k = _bf16(torch_cuda, 1, 16, 3, 128), _bf16(torch_cuda, 1, 16, 2, 128)
    assert_rejected(torch_cuda, ValueError, q, k, k, match="heads")


def test_error_cpu_tensor(torch_cuda):
    q = _bf16(torch_cuda, 1, 16, 2, 128).cpu()
    with pytest.raises(ValueError, match="CUDA"):
        dhp.attention(q, q, q)


def test_error_out_with_autograd(torch_cuda):
    """out= is written in place, which autograd cannot track (test_torch_ops.py covers the differentiable call)."""
    torch = torch_cuda
    q = _bf16(torch, 1, 16, 2, 128).requires_grad_()
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)
    with pytest.raises(ValueError, match="autograd"):
        dhp.attention(q, q, q, out=out)
    assert torch.isnan(out).all()
    with torch.no_grad():
        assert dhp.attention(q, q, q, out=out) is out
