"""The plot of a dhp.bench run: TFLOP/s against seqlen, one subplot per (dtype, head_dim), dhp beside its peers.

A run with both directions gets the forward's rows of subplots, then the backward's (its own y scale; a head_dim
without a backward leaves its place empty). Rows without a direction (JSON from before the backward) are forward.

    python -m dhp.bench --plot-from results.json --plot results.png      # redraw from a saved run, no GPU

matplotlib (the `bench` extra) is imported only here, only when a plot is drawn, with the Agg backend.
Solid lines are non-causal, dashed causal; each backend keeps its colour across plots. Only the MHA family
(heads_q == heads_kv) is drawn: the GQA cases are a single seqlen, and stay in the table and JSON.
"""

from __future__ import annotations

from .bench import (
    DIRECTION_NAMES,
    DIRECTIONS,
    LABELS,
    SHORT_DTYPES,
    TOKENS,
    direction_of,
    results_backends,
)

# dhp red, cuDNN NVIDIA green, FA2 blue, FA3 orange
COLORS = {"dhp": "#d62728", "cudnn": "#76b900", "fa2": "#1f77b4", "fa3": "#ff7f0e"}
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
DTYPE_ORDER = ("bfloat16", "float16")


def require_matplotlib():
    """The pyplot module on the Agg backend, or ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "the plot needs matplotlib: pip install matplotlib (or the extra: pip install 'dhp[bench]')"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def directions(rows: list[dict]) -> list[str]:
    """The directions present among the MHA rows, forward first."""
    present = {direction_of(row) for row in rows if row["heads_q"] == row["heads_kv"]}
    return [d for d in DIRECTIONS if d in present] + sorted(present - set(DIRECTIONS))


def panels(rows: list[dict], direction: str | None = None) -> tuple[list[str], list[int]]:
    """The grid: dtypes (rows of subplots) and head_dims (columns) present among the MHA rows (of one direction,
    if given)."""
    mha = [row for row in rows if row["heads_q"] == row["heads_kv"]
           and (direction is None or direction_of(row) == direction)]
    order = {d: i for i, d in enumerate(DTYPE_ORDER)}
    dtypes = sorted({row["dtype"] for row in mha}, key=lambda d: (order.get(d, len(order)), d))
    return dtypes, sorted({row["head_dim"] for row in mha})


def series(rows: list[dict], dtype: str, head_dim: int, backend: str, causal: bool,
           direction: str = "fwd") -> tuple[list, list]:
    """(seqlens, TFLOP/s) of one line, sorted by seqlen; refused cases (None) left out."""
    points = sorted(
        (row["seqlen"], row["tflops"][backend])
        for row in rows
        if row["dtype"] == dtype and row["head_dim"] == head_dim and row["heads_q"] == row["heads_kv"]
        and bool(row["causal"]) == causal and row["tflops"].get(backend) is not None
        and direction_of(row) == direction
    )
    return [p[0] for p in points], [p[1] for p in points]


def cudnn_version(value) -> str:
    """torch.backends.cudnn.version()'s integer as a release: 91900 -> 9.19.0, 8902 -> 8.9.2."""
    if not isinstance(value, int):
        return str(value)
    if value >= 90000:
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"
    return f"{value // 1000}.{value // 100 % 10}.{value % 100}"


def title(env: dict, shown=("fwd",)) -> str:
    """shown: the directions drawn ("Attention forward", "Attention forward and backward")."""
    date = str(env.get("date") or "")[:10]
    what = " and ".join(DIRECTION_NAMES.get(d, d) for d in shown)
    head = f"Attention {what}, {env.get('device', 'unknown GPU')}" + (f", {date}" if date else "")
    details = []
    if env.get("driver"):
        details.append(f"driver {env['driver']}")
    if env.get("torch"):
        details.append(f"torch {env['torch']}")
    if env.get("cudnn"):
        details.append(f"cuDNN {cudnn_version(env['cudnn'])}")
    if env.get("dhp"):
        details.append(f"dhp {env['dhp']}")
    if env.get("fa3"):
        details.append(f"FA3 {env['fa3']}")
    return head + ("\n" + ", ".join(details) if details else "")


def plot(results: dict, path: str) -> None:
    """Draw results (a dhp.bench JSON document) to path (PNG, or any format matplotlib knows by extension)."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    rows = results["rows"]
    shown = directions(rows)
    if not shown:
        raise ValueError("no rows to plot (the plot draws the cases with heads_q == heads_kv)")
    grid = [(direction, dtype) for direction in shown for dtype in panels(rows, direction)[0]]
    head_dims = panels(rows)[1]
    backends = results_backends(rows)
    extra = iter(OTHER_COLORS)
    colors = {b: COLORS.get(b) or next(extra, "black") for b in backends}
    seqlens = sorted({row["seqlen"] for row in rows})
    drawn = [row for row in rows if row["heads_q"] == row["heads_kv"]]
    top = {d: max((v for row in drawn if direction_of(row) == d for v in row["tflops"].values() if v is not None),
                  default=1.0) for d in shown}

    ncols, nrows = len(head_dims), len(grid)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 0.6, 3.5 * nrows + 1.3), squeeze=False)
    lowest = {}  # column -> the lowest subplot drawn in it, which carries the seqlen label
    for i, (direction, dtype) in enumerate(grid):
        for j, head_dim in enumerate(head_dims):
            ax = axes[i][j]
            members = [row for row in drawn if direction_of(row) == direction and row["dtype"] == dtype
                       and row["head_dim"] == head_dim]
            if not members:  # e.g. a head_dim without a backward
                ax.set_axis_off()
                continue
            lowest[j] = ax
            for backend in backends:
                for causal in (False, True):
                    x, y = series(rows, dtype, head_dim, backend, causal, direction)
                    if x:
                        ax.plot(x, y, color=colors[backend], linestyle="--" if causal else "-", marker="o",
                                markersize=3.5, linewidth=1.8 if backend == "dhp" else 1.4)
            heads = {row["heads_q"] for row in members}
            suffix = f", {min(heads)} heads" if len(heads) == 1 else ""
            prefix = f"{DIRECTION_NAMES.get(direction, direction)}: " if len(shown) > 1 else ""
            ax.set_title(f"{prefix}{SHORT_DTYPES.get(dtype, dtype)}, head_dim {head_dim}{suffix}", fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens)
            ax.set_xticklabels([seqlen_label(s) for s in seqlens])
            ax.minorticks_off()
            ax.set_ylim(0, top[direction] * 1.08)
            ax.grid(True, alpha=0.3)
            if j == 0 or not any(axes[i][c].get_visible() and axes[i][c].axison for c in range(j)):
                ax.set_ylabel("TFLOP/s")
            else:
                ax.tick_params(labelleft=False)
    for j, ax in lowest.items():
        ax.set_xlabel(f"seqlen (batch × seqlen = {TOKENS // 1024}k)")
    for i in range(nrows):  # seqlen tick labels only where no drawn subplot sits below
        for j in range(ncols):
            if axes[i][j].axison and axes[i][j] is not lowest.get(j):
                axes[i][j].tick_params(labelbottom=False)

    handles = [Line2D([], [], color=colors[b], linewidth=2, label=LABELS.get(b, b)) for b in backends]
    handles += [Line2D([], [], color="gray", linestyle="-", label="non-causal"),
                Line2D([], [], color="gray", linestyle="--", label="causal")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(title(results.get("environment", {}), shown), fontsize=11)
    fig.tight_layout(rect=(0, 0.045 if nrows > 1 else 0.08, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
