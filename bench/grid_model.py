"""A list-scheduling model of dhp's causal grids: how much of the SMs' time is busy, given a grid order.

Not a timing tool: it counts work in units (forward: key blocks of a tile; backward: steps of a key block) and
lets 132 SMs take the next CTA of the list whenever one is free, as the hardware does with a grid of one CTA per
work item (the persistent forward grid is dealt out in rounds instead). Its numbers are fractions of busy time,
which docs/performance.md and src/kernels/tile_order.h quote beside what was measured; where the two disagree
(the backward's heavy-first order for MHA), the measurement wins.

    python bench/grid_model.py            # the tables quoted in the docs
"""

from __future__ import annotations

import heapq
import math

SMS = 132


def forward_costs(seqlen: int, block_m: int, block_n: int) -> list[int]:
    """Key blocks of each causal tile (query block m sees keys up to (m + 1) * block_m - 1)."""
    return [min(math.ceil(seqlen / block_n), ((m + 1) * block_m - 1) // block_n + 1)
            for m in range(math.ceil(seqlen / block_m))]


def tile_list(heads: int, blocks: int, section_heads: int) -> list[tuple[int, int]]:
    """(head, rank) in the order of tile_order.h: sections of heads taking turns rank by rank."""
    return [(h, r) for s0 in range(0, heads, section_heads) for r in range(blocks)
            for h in range(s0, min(heads, s0 + section_heads))]


def hardware_grid(costs: list[float], slots: int = SMS) -> float:
    """Busy fraction when SMs (or 2-CTA clusters: slots = SMS // 2) take the next item of the list as they free up."""
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return sum(costs) / slots / max(free)


def persistent_snake(costs: list[float]) -> float:
    """Busy fraction of the persistent grid: round k gives item k * SMS + c to CTA c, reversed in odd rounds."""
    load = [0.0] * SMS
    for t, c in enumerate(costs):
        k, c_ = divmod(t, SMS)
        load[c_ if k % 2 == 0 else SMS - 1 - c_] += c
    return sum(costs) / SMS / max(load)


def persistent_tail(costs: list[float]) -> float:
    """Busy fraction of the persistent grid with a tail table (measured and not kept, docs/performance.md): snake
    rounds up to the last full one, then the remaining tiles heaviest first, each to the CTA with the least work so
    far (ties: the lowest CTA)."""
    n, grid = len(costs), min(len(costs), SMS)
    prefix = n // grid - 1
    load = [0.0] * grid
    for t in range(prefix * grid):
        k, c = divmod(t, grid)
        load[c if k % 2 == 0 else grid - 1 - c] += costs[t]
    least = [(w, c) for c, w in enumerate(load)]
    heapq.heapify(least)
    for t in sorted(range(prefix * grid, n), key=lambda t: (-costs[t], t)):
        w, c = heapq.heappop(least)
        load[c] = w + costs[t]
        heapq.heappush(least, (load[c], c))
    return sum(costs) / grid / max(load)


def forward(heads: int, seqlen: int, block_m: int, block_n: int, section_heads: int, tile_overhead: float = 2.0):
    """Causal forward on the grid of one CTA per tile: query blocks from the last (rank 0) to the first."""
    costs = forward_costs(seqlen, block_m, block_n)[::-1]
    return hardware_grid([costs[r] + tile_overhead for _, r in tile_list(heads, len(costs), section_heads)])


def backward(heads: int, n_blocks: int, m_blocks: int, q_heads_per_kv: int, heavy_first: bool,
             section_heads: int = 16, add_latency: float = 0.5, dq_buffers: int = 2, overhead: float = 2.0,
             split_over: int | None = None) -> float:
    """Causal backward, one CTA per (K/V head, key block) with a step per (query head, query block) it sees.

    Each step's dQ part is added by a writer after the previous adder of that tile (the tile's key-block order),
    taking add_latency steps, and the consumers run at most dq_buffers steps ahead of the writer. Lightest first:
    head by head, key blocks from the last, walks up from the diagonal, adds descending. Heavy first: sections of
    heads, key block 0 first, walks from the last query block down (query heads in turn at each), adds ascending.
    In both, a tile's adders come in list order, so the model needs no lookahead. split_over (lightest first only,
    BwdSplit in src/kernels/bwd_config.h): walks longer than that many query blocks and than half of them run as two
    CTAs, adjacent in the list, the second half's adds in a second chain (the dK/dV hand-over is not modelled)."""
    ratio = max(1, m_blocks // n_blocks)
    if heavy_first:
        items = [(h, n, m_blocks) for h, n in tile_list(heads, n_blocks, section_heads)]
    else:
        items = []
        for h in range(heads):
            for r in range(n_blocks):
                n = n_blocks - 1 - r
                first = min(m_blocks, n * ratio)
                walk = m_blocks - first
                if split_over is not None and walk > split_over and 2 * walk > m_blocks:
                    items += [(h, n, first + walk // 2), (h, n, -(first + walk // 2))]  # first half, second half
                else:
                    items.append((h, n, m_blocks))
    last_add: dict[tuple[int, int, int], float] = {}
    free = [0.0] * SMS
    busy = end = 0.0
    for head, n, end_m in items:
        start = heapq.heappop(free)
        first = min(m_blocks, n * ratio)
        chain = int(end_m < 0)  # a second half: its walk [-end_m, m_blocks), its adds in chain 1
        first, end_m = (-end_m, m_blocks) if chain else (first, end_m)
        if heavy_first:
            steps = [(g, m) for m in range(m_blocks - 1, first - 1, -1) for g in range(q_heads_per_kv)]
        else:
            steps = [(g, m) for g in range(q_heads_per_kv) for m in range(first, end_m)]
        compute, added = start + overhead / 2, []
        for i, (g, m) in enumerate(steps):
            compute = max(compute, added[i - dq_buffers] if i >= dq_buffers else start) + 1.0
            done = max(added[-1] if added else start, compute, last_add.get((head, g, m, chain), 0.0)) + add_latency
            added.append(done)
            last_add[(head, g, m, chain)] = done
        finish = max(compute, added[-1] if added else start) + overhead / 2
        busy += len(steps) + overhead
        heapq.heappush(free, finish)
        end = max(end, finish)
    return busy / SMS / end


def backward_pairs(heads: int, m_blocks: int, section_heads: int = 1, split_over: float | None = None,
                   overhead: float = 1.0) -> float:
    """Causal head_dim 256 backward: key blocks in pairs (2-CTA clusters, SMS // 2 at a time), pair c of a head
    walking the m_blocks - 2c query blocks from its lower key block's diagonal; lightest first, no waits (the
    descending adds never wait there). Sections as tile_list; split_over: walks longer than that many steps run as
    two halves (a what-if: the halves' dK/dV partials and a second dQ chain are not modelled)."""
    walks = [m_blocks - 2 * c for c in range(m_blocks // 2)][::-1]  # rank 0: the lightest pair
    costs = []
    for _, r in tile_list(heads, len(walks), section_heads):
        halves = 2 if split_over is not None and walks[r] > split_over else 1
        costs += [walks[r] / halves + overhead] * halves
    return hardware_grid(costs, SMS // 2)


def main() -> None:
    print("forward, causal, one CTA per tile (16k tokens x 2048 per shape): busy fraction by section heads")
    for d, block_m, block_n in ((64, 192, 128), (128, 128, 160), (256, 128, 80)):
        for seqlen in (8192, 16384):
            heads = 16384 // seqlen * (2048 // d)
            fit = max(1, (16 << 20) // (seqlen * d * 2 * 2))  # K/V heads in 16 MB (tile_order.h)
            g = max(x for x in range(1, min(fit, heads) + 1) if heads % x == 0)
            print(f"  d{d} {seqlen:>5}: head by head {forward(heads, seqlen, block_m, block_n, 1):.3f}  "
                  f"sections of {g} heads (16 MB) {forward(heads, seqlen, block_m, block_n, g):.3f}")
    print("forward, causal, persistent grid (up to 4096 keys), head by head: busy fraction, snake rounds to the end "
          "vs a tail table (a tile's fixed costs as one key block)")
    for d, block_m, block_n, seqlen in ((64, 128, 128, 512), (64, 128, 128, 2048), (64, 192, 128, 4096),
                                        (128, 128, 128, 512), (128, 128, 128, 1024), (128, 128, 128, 2048),
                                        (128, 128, 160, 4096), (256, 128, 64, 512), (256, 128, 64, 1024),
                                        (256, 128, 80, 4096)):
        costs = forward_costs(seqlen, block_m, block_n)[::-1]
        heads = 16384 // seqlen * (2048 // d)
        listed = [costs[r] + 1.0 for _, r in tile_list(heads, len(costs), 1)]
        print(f"  d{d} {seqlen:>5}: snake {persistent_snake(listed):.3f}  tail table {persistent_tail(listed):.3f}")
    print("backward, causal, d128 (128-key blocks, 64-row query blocks): lightest first vs heavy first")
    for seqlen, kv_per_q in ((4096, 1), (8192, 1), (16384, 1), (4096, 4), (8192, 4)):
        heads_q = 2048 // 128 if kv_per_q == 1 else 32
        heads = 16384 // seqlen * heads_q // kv_per_q
        args = (heads, seqlen // 128, seqlen // 64, kv_per_q)
        split = f"  split walks over 64 {backward(*args, heavy_first=False, split_over=64):.3f}" if kv_per_q == 1 else ""
        print(f"  {seqlen:>5} {'GQA 32/8' if kv_per_q > 1 else 'MHA':8}: lightest first "
              f"{backward(*args, heavy_first=False):.3f}  heavy first {backward(*args, heavy_first=True):.3f}{split}")
    print("backward, causal, d256 (key blocks in pairs, 64-row query blocks): lightest first, rank-major sections, "
          "walks over half the query blocks split")
    for seqlen in (2048, 4096, 8192, 16384):
        heads, m_blocks = 16384 // seqlen * 8, seqlen // 64
        sections = "  ".join(f"s{s} {backward_pairs(heads, m_blocks, s):.3f}" for s in (4, 16) if heads % s == 0)
        print(f"  {seqlen:>5}: lightest first {backward_pairs(heads, m_blocks):.3f}  {sections}  "
              f"split {backward_pairs(heads, m_blocks, split_over=m_blocks / 2):.3f}")


if __name__ == "__main__":
    main()
