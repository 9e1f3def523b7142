"""python -m dhp.bench: dhp's forward and backward beside torch SDPA's cuDNN and flash (FA2) backends, in one run,
and beside FlashAttention-3 where its Python interface (flash_attn_interface) is installed.

Every case times the backends on the same inputs: warm-up first, then --reps runs of each, the backends taking
turns run by run (the round's first rotating), each run with the L2 cache flushed before it (the same flush for
every side) and CUDA events around the call alone; the median counts, and the spread of the runs (min, quartiles,
max) is kept beside it. Taking turns keeps a clock that drifts within a case (after a heavy case, say) from
weighing on whichever backend is timed first. Runs are enqueued back to back and
synchronized once at the end; a GPU-side spin queued before each flush keeps the GPU behind the host, so the
events time the kernels, not a call's host overhead. TFLOP/s = 4·batch·heads_q·seqlen_q·seqlen_k·head_dim /
time, halved for causal; a backward counts 2.5 times its forward. A backend that refuses a case gets None.

The backward (--direction bwd, or both) times the backward alone, from the same forward outputs for every side,
prepared once outside the timed runs. dhp: one ext.backward call (its workspace allocated once). The peers:
torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) on a graph built once (SDPA under the backend, or
FA3's flash_attn_func), which runs the backend's backward op on the saved out and logsumexp (no forward
recompute; the test suite checks the kernels of the timed call with torch.profiler). That is the path a torch
user takes, and it holds across torch versions, unlike the aten backward ops' signatures; autograd's host
overhead stays hidden behind the spin.

Cases: the build's dtypes and head_dims, seqlen 512..16k with batch·seqlen = 16k and heads·head_dim = 2048,
causal and not, plus GQA (32 q heads, 8 kv heads, head_dim 128, seqlen 4k); backward cases only for the
build's backward head_dims. --direction picks fwd, bwd or both (the default; all forward cases run first).
--quick runs a small subset; --dtypes, --head-dims, --seqlens, --causal and --backends narrow the run (dhp always
runs: ratios need it).

    python -m dhp.bench [--quick] [--direction both] [--reps 30] [--out results.json] [--plot results.png]
    python -m dhp.bench --plot-from results.json --plot results.png      # redraw, no GPU needed
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from . import _native

TOKENS = 16384  # batch * seqlen
WIDTH = 2048  # heads * head_dim
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096)
GQA_HEADS = (32, 8)
GQA_SEQLEN = 4096
BACKENDS = ("dhp", "cudnn", "fa2", "fa3")  # every backend the benchmark knows, in column order
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "fa2": "FLASH_ATTENTION"}  # torch.nn.attention.SDPBackend members
FA3_MODULE = "flash_attn_interface"  # FlashAttention-3's Python interface (hopper/ in Dao-AILab/flash-attention)
LABELS = {"dhp": "dhp", "cudnn": "cuDNN", "fa2": "FA2", "fa3": "FA3"}
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}
ALL_DTYPES = ("bfloat16", "float16")
ALL_HEAD_DIMS = (64, 128, 256)
ALL_BWD_HEAD_DIMS = (64, 128)  # CMake's default DHP_BWD_HEAD_DIMS (--list without the compiled module)
CAUSAL_CHOICES = {"both": (False, True), "no": (False,), "yes": (True,)}
DIRECTIONS = ("fwd", "bwd")
DIRECTION_CHOICES = {"both": DIRECTIONS, "fwd": ("fwd",), "bwd": ("bwd",)}
DIRECTION_NAMES = {"fwd": "forward", "bwd": "backward"}
BWD_FLOPS_FACTOR = 2.5  # the backward's five GEMMs against the forward's two
# Seqlen buckets of the summary (the targets are stated per bucket); bounds inclusive.
BUCKETS = (("512-2k", 512, 2048), ("4k+", 4096, math.inf))
FLUSH_BYTES = 256 << 20  # five times an H100's 50 MB L2
SPIN_CYCLES = 400_000  # ~0.2 ms of GPU time queued ahead of each timed call
# 1: environment, settings, rows, geomean; 2 adds rows[].spread, geomean_by and schema; 3 adds rows[].direction
# (older rows are forward) and the backward's groups in geomean_by.
SCHEMA = 3


@dataclass(frozen=True)
class Case:
    dtype: str  # "bfloat16" or "float16"
    head_dim: int
    batch: int
    seqlen: int
    heads_q: int
    heads_kv: int
    causal: bool
    direction: str = "fwd"  # "fwd" or "bwd"

    @property
    def flops(self) -> float:
        full = 4.0 * self.batch * self.heads_q * self.seqlen * self.seqlen * self.head_dim
        full *= BWD_FLOPS_FACTOR if self.direction == "bwd" else 1.0
        return full / 2 if self.causal else full

    @property
    def name(self) -> str:
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}/{self.heads_kv}"
        mask = " causal" if self.causal else ""
        short = SHORT_DTYPES.get(self.dtype, self.dtype)
        suffix = "" if self.direction == "fwd" else f" {self.direction}"
        return f"{short} d{self.head_dim} b{self.batch} s{self.seqlen} {heads}{mask}{suffix}"


def direction_of(row: dict) -> str:
    """A result row's direction; rows from before the backward (schema 1 and 2) are forward."""
    return row.get("direction") or "fwd"


def cases(dtypes, head_dims, quick=False, seqlens=None, causal="both", direction="fwd") -> list[Case]:
    """The case family for these dtypes and head_dims: FlashAttention's shapes at every seqlen, plus GQA.

    quick narrows to the first dtype, head_dim 128 (if present) and seqlens 1k, 4k; explicit seqlens win.
    causal: "both", "yes" or "no". The GQA cases come with head_dim 128 when seqlen 4k is in the run.
    direction: "fwd" or "bwd", for every case of the list.
    """
    if quick:
        dtypes = list(dtypes)[:1]
        head_dims = [128] if 128 in head_dims else list(head_dims)[:1]
    seqlens = tuple(seqlens) if seqlens else QUICK_SEQLENS if quick else SEQLENS
    masks = CAUSAL_CHOICES[causal]
    result = [
        Case(dtype, d, max(1, TOKENS // s), s, WIDTH // d, WIDTH // d, mask, direction)
        for dtype in dtypes
        for d in head_dims
        for s in seqlens
        for mask in masks
    ]
    if 128 in head_dims and GQA_SEQLEN in seqlens:
        hq, hkv = GQA_HEADS
        result += [
            Case(dtype, 128, TOKENS // GQA_SEQLEN, GQA_SEQLEN, hq, hkv, mask, direction)
            for dtype in dtypes for mask in masks
        ]
    return result


def select_cases(build_dtypes, build_head_dims, *, dtypes=None, head_dims=None, seqlens=None, causal="both",
                 quick=False, direction="fwd", backward_head_dims=()) -> list[Case]:
    """The cases of a run: the build's variants narrowed by the filters (None: no filter).

    direction: "fwd", "bwd" or "both" (every forward case, then every backward case); backward cases come only
    for the build's backward_head_dims. --quick narrows only what the filters leave open. ValueError names a
    dtype or head_dim not in the build (for "bwd": one without a backward).
    """
    directions = DIRECTION_CHOICES[direction]
    # The backward's inputs come from dhp's forward, so a backward head_dim needs both.
    dims_of = {"fwd": list(build_head_dims), "bwd": [d for d in build_head_dims if d in backward_head_dims]}
    searchable = sorted({d for name in directions for d in dims_of[name]})
    for kind, wanted, built in (("dtype", dtypes, build_dtypes), ("head_dim", head_dims, searchable)):
        missing = [w for w in wanted or () if w not in built]
        if missing:
            shown = ", ".join(SHORT_DTYPES.get(b, str(b)) for b in built) or "none"
            owner = "its backward" if kind == "head_dim" and directions == ("bwd",) else "it"
            raise ValueError(f"{kind} {', '.join(map(str, missing))} not in this build ({owner} has {shown})")
    chosen_dtypes = [d for d in build_dtypes if d in dtypes] if dtypes else list(build_dtypes)
    if quick and not dtypes:
        chosen_dtypes = chosen_dtypes[:1]
    if not seqlens:
        seqlens = QUICK_SEQLENS if quick else SEQLENS
    result = []
    for name in directions:
        built = dims_of[name]
        chosen_dims = [d for d in built if d in head_dims] if head_dims else list(built)
        if quick and not head_dims:
            chosen_dims = [128] if 128 in chosen_dims else chosen_dims[:1]
        result += cases(chosen_dtypes, chosen_dims, seqlens=sorted(set(seqlens)), causal=causal, direction=name)
    return result


def parse_dtypes(text: str) -> list[str]:
    """"bf16,fp16" -> ["bfloat16", "float16"] (also takes bfloat16, float16, half)."""
    names = []
    for item in _items(text):
        if item.lower() not in DTYPE_NAMES:
            raise argparse.ArgumentTypeError(f"unknown dtype {item!r} (use bf16, fp16)")
        names.append(DTYPE_NAMES[item.lower()])
    return names


def parse_ints(text: str) -> list[int]:
    """"512,1k,4096" -> [512, 1024, 4096]; a k suffix means 1024."""
    values = []
    for item in _items(text):
        try:
            value = int(item[:-1]) * 1024 if item.lower().endswith("k") else int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {item!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be positive: {item!r}")
        values.append(value)
    return values


def fa3_available() -> bool:
    return importlib.util.find_spec(FA3_MODULE) is not None


def default_backends() -> list[str]:
    """dhp, cuDNN and FA2, and FA3 where its interface module is installed."""
    return [b for b in BACKENDS if b != "fa3" or fa3_available()]


def parse_backends(text: str) -> list[str]:
    """"cudnn" -> ["dhp", "cudnn"]: dhp always runs, order is BACKENDS'."""
    wanted = {item.lower() for item in _items(text)}
    unknown = wanted - set(BACKENDS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(sorted(unknown))} (use {','.join(BACKENDS)})")
    if "fa3" in wanted and not fa3_available():
        raise argparse.ArgumentTypeError(f"fa3 needs FlashAttention-3's {FA3_MODULE} module, which is not installed "
                                         "(build hopper/ of Dao-AILab/flash-attention)")
    return [b for b in BACKENDS if b == "dhp" or b in wanted]


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    return items


def make_inputs(torch, case: Case):
    dtype = getattr(torch, case.dtype)
    shape_q = (case.batch, case.seqlen, case.heads_q, case.head_dim)
    shape_kv = (case.batch, case.seqlen, case.heads_kv, case.head_dim)
    return tuple(torch.randn(shape, dtype=dtype, device="cuda") for shape in (shape_q, shape_kv, shape_kv))


def _dhp_call(torch, case, q, k, v):
    import dhp

    out = torch.empty_like(q)
    return lambda: dhp.attention(q, k, v, causal=case.causal, out=out)


def _on_current_stream(torch, entry, tensors, causal):
    """A call of entry(*tensors, causal, softmax_scale=0.0, stream) on torch's current stream, as dhp.attention
    makes it: fresh DLPack capsules each call (a capsule is consumed once), stream=-1 (no synchronization)."""
    stream = torch.cuda.current_stream().cuda_stream

    def call():
        entry(*(None if t is None else t.__dlpack__(stream=-1) for t in tensors), causal, 0.0, stream)

    return call


def _dhp_backward_call(torch, case, q, k, v, dout):
    """One ext.backward call, timed alone: out and lse come from dhp's forward once, the workspace is allocated
    once. The call returns (dq, dk, dv), which every call overwrites."""
    ext = _native.ext()
    out = torch.empty_like(q)
    lse = torch.empty((case.batch, case.heads_q, case.seqlen), dtype=torch.float32, device=q.device)
    _on_current_stream(torch, ext.forward, (q, k, v, out, lse), case.causal)()
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    size = ext.backward_workspace_size(q.__dlpack__(stream=-1), k.__dlpack__(stream=-1), case.causal, 0.0)
    workspace = torch.empty(size, dtype=torch.uint8, device=q.device) if size else None
    backward = _on_current_stream(torch, ext.backward, (q, k, v, out, dout, lse, dq, dk, dv, workspace),
                                  case.causal)

    def call():
        backward()
        return dq, dk, dv

    return call


def _sdpa_forward(torch, backend_name, case, q, k, v):
    """SDPA on (b, s, h, d) tensors under one backend: out in SDPA's (b, h, s, d), a view of whatever memory the
    backend chose. Raises RuntimeError where the backend refuses the case."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[backend_name])
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (b, h, s, d), as a view of the same memory
    kwargs = {"is_causal": case.causal}
    if case.heads_q != case.heads_kv:
        kwargs["enable_gqa"] = True
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qt, kt, vt, **kwargs)


def _fa3_forward(case, q, k, v):
    """FlashAttention-3's flash_attn_func on the (b, s, h, d) tensors it takes natively: out in (b, s, h, d).
    Some releases return (out, logsumexp). Raises RuntimeError where it refuses the case."""
    from flash_attn_interface import flash_attn_func

    result = flash_attn_func(q, k, v, causal=case.causal)
    return result[0] if isinstance(result, tuple) else result


def _peer_forward(torch, backend_name, case, q, k, v):
    """A peer's out for (b, s, h, d) inputs, as a (b, s, h, d) view of the memory the backend chose."""
    if backend_name == "fa3":
        return _fa3_forward(case, q, k, v)
    return _sdpa_forward(torch, backend_name, case, q, k, v).transpose(1, 2)


def _peer_call(torch, backend_name, case, q, k, v):
    return lambda: _peer_forward(torch, backend_name, case, q, k, v)


def _peer_backward_call(torch, backend_name, case, q, k, v, dout):
    """The backward of one peer call, timed alone: the graph is built once (the forward runs here, under the
    backend), and each call runs torch.autograd.grad on it, which launches the backend's backward op on the
    saved out and logsumexp (FA2: aten::_scaled_dot_product_flash_attention_backward, cuDNN: ..._cudnn_...,
    FA3: its own backward), and nothing of the forward. The call returns (dq, dk, dv) in (b, s, h, d).

    The upstream gradient holds dout's values in out's own strides: cuDNN may copy a gradient whose strides differ
    from out's, FA2 one that is not contiguous in (b, s, h, d), and neither copy belongs in the timed run.
    Raises RuntimeError where the backend refuses the case.
    """
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out = _peer_forward(torch, backend_name, case, *leaves)
    grad = torch.empty_like(out)  # empty_like keeps a dense tensor's strides
    grad.copy_(dout)

    def call():
        with torch.enable_grad():
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)

    return call


def timed_call(torch, name, case, q, k, v, dout=None):
    """The function that time_runs times for one backend and case (dout: the backward's upstream gradient)."""
    if case.direction == "bwd":
        if name == "dhp":
            return _dhp_backward_call(torch, case, q, k, v, dout)
        return _peer_backward_call(torch, name, case, q, k, v, dout)
    return _dhp_call(torch, case, q, k, v) if name == "dhp" else _peer_call(torch, name, case, q, k, v)


@functools.cache
def _flush_buffer(torch, device: int):
    return torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=f"cuda:{device}")


def time_runs(torch, fn, reps=30, warmup=5) -> list[float]:
    """Milliseconds of each of reps runs of fn(), each after an L2 flush, on the current stream."""
    return time_runs_interleaved(torch, {"fn": fn}, reps, warmup)["fn"]


def time_runs_interleaved(torch, fns: dict, reps=30, warmup=5) -> dict:
    """{name: milliseconds of each of reps runs of fns[name]()}, each run after an L2 flush, on the current stream.

    The functions take turns run by run, and the round's first one rotates, so a clock or temperature that drifts
    during a case (a heavy kernel timed just before raises both) weighs on every side alike, whatever its place in
    the list. Each function is warmed up before the first timed run.
    """
    flush = _flush_buffer(torch, torch.cuda.current_device())
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    events = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # A GPU-side spin ahead of the flush keeps the GPU queue ahead of the host, so host-side call
            # overhead (any side's) never shows up as idle time between the events: the kernel is timed.
            torch.cuda._sleep(SPIN_CYCLES)
            flush.zero_()
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [start.elapsed_time(end) for start, end in events[name]] for name in names}


def time_ms(torch, fn, reps=30, warmup=5) -> float:
    """Median milliseconds of fn() over reps runs, each after an L2 flush, on the current stream."""
    return statistics.median(time_runs(torch, fn, reps, warmup))


def measure_runs(torch, case: Case, backends=None, reps=30, warmup=5, on_backend=None) -> dict:
    """{backend: [ms of each timed run] or None (refused)} for one case, all backends (default_backends()) on the
    same inputs, their timed runs interleaved (time_runs_interleaved).

    on_backend(name), if given, is called before each backend's call is prepared (the progress display).
    """
    backends = default_backends() if backends is None else backends
    q, k, v = make_inputs(torch, case)
    dout = torch.randn_like(q) if case.direction == "bwd" else None
    fns, refused = {}, []
    for name in backends:
        if on_backend is not None:
            on_backend(name)
        if name == "dhp":
            fns[name] = timed_call(torch, name, case, q, k, v, dout)
            continue
        try:  # a peer that cannot run the case raises while its call is made or on its first call
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = timed_call(torch, name, case, q, k, v, dout)
                fn()
            torch.cuda.synchronize()
            fns[name] = fn
        except RuntimeError:
            refused.append(name)
    runs = time_runs_interleaved(torch, fns, reps, warmup)
    return {name: None if name in refused else runs[name] for name in backends}


def measure(torch, case: Case, backends=None, reps=30, warmup=5) -> dict:
    """{backend: median ms or None (refused)} for one case, all backends on the same inputs."""
    return medians(measure_runs(torch, case, backends, reps, warmup))


def medians(runs: dict) -> dict:
    return {name: None if values is None else statistics.median(values) for name, values in runs.items()}


def spread_of(values) -> dict | None:
    """min, quartiles (p25, p75) and max of the timed runs, in ms; None for a refused backend."""
    if not values:
        return None
    values = sorted(values)
    if len(values) == 1:
        p25 = p75 = values[0]
    else:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return {"min": values[0], "p25": p25, "p75": p75, "max": values[-1]}


def make_row(case: Case, times: dict, spread: dict | None = None) -> dict:
    """One result row: times {backend: median ms or None}; spread {backend: spread_of(runs)}, if known."""
    tflops = {name: None if ms is None else case.flops / (ms * 1e-3) / 1e12 for name, ms in times.items()}
    ratios = {
        f"dhp/{peer}": None if tflops.get(peer) is None or tflops.get("dhp") is None else tflops["dhp"] / tflops[peer]
        for peer in times
        if peer != "dhp"
    }
    row = {"case": case.name, **asdict(case), "flops": case.flops, "ms": times, "tflops": tflops, "ratios": ratios}
    if spread is not None:
        row["spread"] = spread
    return row


def row_from_runs(case: Case, runs: dict) -> dict:
    return make_row(case, medians(runs), {name: spread_of(values) for name, values in runs.items()})


def noise(row: dict) -> float | None:
    """The largest interquartile range of the row's backends, as a fraction of that backend's median."""
    spreads = row.get("spread") or {}
    values = [
        (s["p75"] - s["p25"]) / row["ms"][name]
        for name, s in spreads.items()
        if s is not None and row["ms"].get(name)
    ]
    return max(values) if values else None


def _cell(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def format_header(backends=BACKENDS) -> str:
    peers = [b for b in backends if b != "dhp"]
    cols = "".join(f"{LABELS[b]:>9}" for b in backends) + "".join(f"{'/' + LABELS[p]:>9}" for p in peers)
    return f"{'case (TFLOP/s)':<36}{cols}{'iqr%':>7}"


def format_row(row: dict, backends=BACKENDS) -> str:
    peers = [b for b in backends if b != "dhp"]
    cols = "".join(f"{_cell(row['tflops'].get(b), '.1f'):>9}" for b in backends)
    cols += "".join(f"{_cell(row['ratios'].get(f'dhp/{p}'), '.2f'):>9}" for p in peers)
    spread = noise(row)
    return f"{row['case']:<36}{cols}{_cell(None if spread is None else 100 * spread, '.1f'):>7}"


def _geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def geomean_ratios(rows: list[dict]) -> dict:
    """{"dhp/peer": geometric mean of that ratio over the rows (None where no row has it)}."""
    keys = {key for row in rows for key in row["ratios"]}
    return {key: _geomean(row["ratios"].get(key) for row in rows) for key in sorted(keys)}


def variant_of(row: dict) -> str:
    """The summary group of a row: "bf16 d128", or "bf16 d128 gqa" for the GQA cases; " bwd" follows for the
    backward ("bf16 d128 gqa bwd"), as in the case names."""
    name = f"{SHORT_DTYPES.get(row['dtype'], row['dtype'])} d{row['head_dim']}"
    name += " gqa" if row["heads_q"] != row["heads_kv"] else ""
    direction = direction_of(row)
    return name if direction == "fwd" else f"{name} {direction}"


def bucket_of(seqlen: int) -> str | None:
    return next((label for label, low, high in BUCKETS if low <= seqlen <= high), None)


def _direction_order(direction: str) -> int:
    return DIRECTIONS.index(direction) if direction in DIRECTIONS else len(DIRECTIONS)


def geomean_by(rows: list[dict]) -> dict:
    """{group: {bucket or "all": {"dhp/peer": geomean}}}: each variant (variant_of), split by seqlen bucket
    (BUCKETS) and over all seqlens; the forward's variants first, then the backward's. Where the rows hold both
    directions, "all fwd" and "all bwd" follow each direction's variants. "all" (last) takes every row:
    ["all"]["all"] is the overall geometric mean, the same as geomean_ratios(rows)."""
    directions = sorted({direction_of(row) for row in rows}, key=lambda d: (_direction_order(d), d))
    groups = []  # (name, member test)
    for direction in directions:
        inside = [row for row in rows if direction_of(row) == direction]
        variants = sorted({variant_of(row) for row in inside}, key=lambda v: (v.split()[0], int(v.split()[1][1:]), v))
        groups += [(v, lambda row, v=v: variant_of(row) == v) for v in variants]
        if len(directions) > 1:
            groups.append((f"all {direction}", lambda row, d=direction: direction_of(row) == d))
    groups.append(("all", lambda row: True))
    result = {}
    for group, member in groups:
        members = [row for row in rows if member(row)]
        result[group] = {}
        for label, _, _ in BUCKETS:
            inside = [row for row in members if bucket_of(row["seqlen"]) == label]
            if inside:
                result[group][label] = geomean_ratios(inside)
        result[group]["all"] = geomean_ratios(members)
    return result


def format_summary(by: dict) -> list[str]:
    """The geometric-mean table: one line per variant (and all), ratio columns per seqlen bucket."""
    buckets = [label for label, _, _ in BUCKETS if any(label in cols for cols in by.values())] + ["all"]
    keys = sorted({key for cols in by.values() for ratios in cols.values() for key in ratios})
    peers = ["/" + LABELS.get(key.split("/", 1)[1], key.split("/", 1)[1]) for key in keys]
    width = 8 * len(keys) + 2
    lines = [
        f"{'geomean dhp/peer, by seqlen':<28}" + "".join(f"{b:>{width}}" for b in buckets),
        f"{'':<28}" + "".join("  " + "".join(f"{p:>8}" for p in peers) for _ in buckets),
    ]
    for group, cols in by.items():
        cells = "".join(
            "  " + "".join(f"{_cell(cols.get(b, {}).get(key), '.3f'):>8}" for key in keys) for b in buckets
        )
        lines.append(f"{group:<28}{cells}")
    return lines


def results_backends(rows: list[dict]) -> list[str]:
    present = {name for row in rows for name in row["tflops"]}
    return [b for b in BACKENDS if b in present] + sorted(present - set(BACKENDS))


def load_results(path) -> dict:
    """A results JSON (any schema version), with geomean and geomean_by filled in where it predates them."""
    with open(path) as f:
        results = json.load(f)
    rows = results.get("rows", [])
    for row in rows:
        row.setdefault("direction", "fwd")  # before schema 3 every row was a forward
    results.setdefault("environment", {})
    results.setdefault("settings", {})
    results.setdefault("geomean", geomean_ratios(rows))
    results.setdefault("geomean_by", geomean_by(rows))
    return results


def print_results(results: dict, stream=None) -> None:
    """The table and the geometric-mean summary of a results dict (as main prints them after a run)."""
    stream = stream or sys.stdout
    rows = results["rows"]
    backends = results_backends(rows)
    print(format_header(backends), file=stream)
    for row in rows:
        print(format_row(row, backends), file=stream)
    print_summary(results, stream)


def print_summary(results: dict, stream=None) -> None:
    stream = stream or sys.stdout
    print(file=stream)
    for line in format_summary(results["geomean_by"]):
        print(line, file=stream)
    means = results["geomean"]
    by = results["geomean_by"]
    line = "geometric mean: " + ", ".join(f"{key} {_cell(value, '.3f')}" for key, value in means.items())
    parts = [f"{DIRECTION_NAMES.get(d, d)} " + ", ".join(f"{key} {_cell(value, '.3f')}"
                                                         for key, value in by[f"all {d}"]["all"].items())
             for d in DIRECTIONS if f"all {d}" in by]
    print(line + (f" ({'; '.join(parts)})" if parts else ""), file=stream)


class Progress:
    """`[12/76] bf16 d128 b4 s4096 h16 causal: cudnn (1:02 elapsed, ~2:40 left)` on stderr.

    On a terminal the line is rewritten in place (and names the backend being timed); otherwise one line per
    case. clear() wipes it before the table writes a row, so the two never mix on one terminal.
    """

    def __init__(self, total: int, stream=None, tty: bool | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.started = time.monotonic()
        self.shown = False

    def show(self, index: int, text: str, backend: str | None = None, done: int | None = None) -> None:
        """index: 1-based case number; done: cases finished (for the estimate; default index - 1)."""
        if backend is not None and not self.tty:
            return
        done = index - 1 if done is None else done
        elapsed = time.monotonic() - self.started
        timing = f" ({_clock(elapsed)} elapsed"
        timing += f", ~{_clock(elapsed / done * (self.total - done))} left)" if done else ")"
        line = f"[{index}/{self.total}] {text}" + (f": {backend}" if backend else " ...") + timing
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _nvidia_smi_driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return done.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cuda_driver_api() -> str | None:
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None


def _fa3_version() -> str | None:
    """The installed FlashAttention-3 interface's version (None where it is not installed)."""
    if not fa3_available():
        return None
    import flash_attn_interface

    version = getattr(flash_attn_interface, "__version__", None)
    if version is None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("flash_attn_3")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def environment(torch) -> dict:
    import dhp

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": props.name,
        "multiprocessors": props.multi_processor_count,
        "driver": _nvidia_smi_driver(),
        "cuda_driver_api": _cuda_driver_api(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "dhp": dhp.__version__,
        "dhp_build": dhp.build_info(),
        "fa3": _fa3_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def make_results(env: dict, settings: dict, rows: list[dict]) -> dict:
    """The JSON document: environment, settings, rows (with spread), geomean (overall), geomean_by."""
    return {"schema": SCHEMA, "environment": env, "settings": settings, "rows": rows,
            "geomean": geomean_ratios(rows), "geomean_by": geomean_by(rows)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dhp.bench", description=__doc__.split("\n\n")[0],
        epilog="Lists are comma-separated. Progress goes to stderr, the table to stdout.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a small subset: one dtype, head_dim 128, seqlen 1k and 4k, in each direction of "
                             "--direction (filters given win)")
    parser.add_argument("--dtypes", type=parse_dtypes, metavar="LIST", help="e.g. bf16,fp16 (default: the build's)")
    parser.add_argument("--head-dims", type=parse_ints, metavar="LIST", help="e.g. 64,128 (default: the build's)")
    parser.add_argument("--seqlens", type=parse_ints, metavar="LIST",
                        help=f"e.g. 512,4k (default: {','.join(map(str, SEQLENS))}); batch = {TOKENS} // seqlen")
    parser.add_argument("--causal", choices=tuple(CAUSAL_CHOICES), default="both", help="masks to run (both)")
    parser.add_argument("--direction", choices=tuple(DIRECTION_CHOICES), default="both",
                        help="forward, backward or both (default; the forward cases first). The backward runs "
                             "only the build's backward head_dims")
    parser.add_argument("--backends", type=parse_backends, metavar="LIST",
                        help="peers beside dhp: cudnn,fa2,fa3 (dhp always runs; default: cudnn,fa2, and fa3 where "
                             f"{FA3_MODULE} is installed)")
    parser.add_argument("--reps", type=int, default=30, help="timed runs per backend and case (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--out", metavar="PATH.json", help="also write environment, settings and rows as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="also draw TFLOP/s against seqlen (needs matplotlib)")
    parser.add_argument("--plot-from", metavar="PATH.json",
                        help="no run: print the table of a saved JSON and draw --plot (default: PATH.png) from it")
    parser.add_argument("--list", action="store_true", help="print the cases the filters select and exit")
    return parser


def _replot(args) -> int:
    from . import bench_plot

    results = load_results(args.plot_from)
    print_results(results)
    target = args.plot or args.plot_from.removesuffix(".json") + ".png"
    bench_plot.plot(results, target)
    print(f"wrote {target}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    if args.plot_from:
        return _replot(args)
    args.backends = args.backends or default_backends()
    if args.plot:
        from . import bench_plot

        try:
            bench_plot.require_matplotlib()
        except ImportError as error:  # before the run, not after it
            parser.error(str(error))

    if _native.available():
        build_dtypes, build_head_dims = _native.variants()
        build_bwd_head_dims = sorted(int(d) for d in _native.build_info().get("backward_head_dims", []))
    elif args.list:
        build_dtypes, build_head_dims, build_bwd_head_dims = list(ALL_DTYPES), list(ALL_HEAD_DIMS), list(
            ALL_BWD_HEAD_DIMS)
    else:
        print(f"dhp.bench: {_native_error()}", file=sys.stderr)
        return 2
    try:
        run_cases = select_cases(build_dtypes, build_head_dims, dtypes=args.dtypes, head_dims=args.head_dims,
                                 seqlens=args.seqlens, causal=args.causal, quick=args.quick,
                                 direction=args.direction, backward_head_dims=build_bwd_head_dims)
    except ValueError as error:
        parser.error(str(error))
    if args.list:
        for case in run_cases:
            print(case.name)
        print(f"{len(run_cases)} cases; backends {','.join(args.backends)}")
        return 0
    if not run_cases:
        parser.error("no case to run (this build has no backward for the head_dims chosen)")

    try:
        import torch
    except ImportError:
        print("dhp.bench needs torch (the peers are torch SDPA's cuDNN and flash backends)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("dhp.bench: no CUDA GPU visible", file=sys.stderr)
        return 2

    env = environment(torch)
    print(f"{env['device']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
          f"cuDNN {env['cudnn']}, dhp {env['dhp']}" + (f", FA3 {env['fa3']}" if "fa3" in args.backends else ""))
    backends = args.backends
    print(format_header(backends), flush=True)
    progress = Progress(len(run_cases))
    rows = []
    interrupted = False
    try:
        with torch.no_grad():
            for index, case in enumerate(run_cases, 1):
                progress.show(index, case.name)
                runs = measure_runs(torch, case, backends, args.reps, args.warmup,
                                    on_backend=lambda name, i=index, c=case: progress.show(i, c.name, name))
                rows.append(row_from_runs(case, runs))
                progress.clear()
                print(format_row(rows[-1], backends), flush=True)
    except KeyboardInterrupt:
        progress.clear()
        interrupted = True
        print(f"interrupted after {len(rows)} of {len(run_cases)} cases", file=sys.stderr)
    if not rows:
        return 130
    settings = {
        "reps": args.reps, "warmup": args.warmup, "timing": "interleaved", "quick": args.quick,
        "flush_bytes": FLUSH_BYTES,
        "spin_cycles": SPIN_CYCLES, "backends": backends, "dtypes": args.dtypes, "head_dims": args.head_dims,
        "seqlens": args.seqlens, "causal": args.causal, "direction": args.direction, "cases": len(run_cases),
        "interrupted": interrupted,
    }
    results = make_results(env, settings, rows)
    print_summary(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    if args.plot:
        from . import bench_plot

        bench_plot.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 130 if interrupted else 0


def _native_error() -> str:
    try:
        _native.ext()
    except ImportError as error:
        return str(error)
    return "dhp._C is not available"


if __name__ == "__main__":
    sys.exit(main())
