"""Timing test (TVLA / dudect style): does dhp's kernel time depend on the values of Q, K, V?

Method. Classes: `fixed` (one random input), `random` (different random inputs), and the classes of
dhp.audit.inputs other than random (zeros, ones, huge, tiny, nan, inf), each itself a fixed input. Every class
is a pool of `--pool` buffers (copies of its input, or for `random` distinct draws) used round robin, so all
classes touch the same amount of memory and L2 treats them alike. A schedule holds `--launches` launches of
every class, shuffled with a seeded generator (balanced and reproducible). Launches run in batches; each one is

    torch.cuda._sleep(spin)   (keeps the GPU busy while the host enqueues the next three, so host overhead
    start.record()             stays out of the interval)
    kernel
    end.record()

and the batch is synchronised and read. Then dhp.audit.stats: Welch's t of fixed against random (TVLA's
non-specific test) and of fixed against each class, whole and at dudect's crops; a leak is |t| > 4.5.
With --peers, torch SDPA's cuDNN and flash backends are measured the same way, in the same run, on the same
inputs (their verdicts are reported, not judged). SM clock and power are read through NVML (pynvml) or
nvidia-smi before and after each batch, and around a block of launches of each class alone, so that a class
that changes time through power and clocks (DVFS; docs/SECURITY.md, out of scope) can be told apart from one
that changes the code path (which the counters check would show).

The backward (bwd cases, for the head_dims build_info lists under "backward_head_dims"): a class's input is
q, k, v and dout of that class (dout an independent draw of q's shape, see dhp.audit.inputs); each buffer's
forward outputs (out, lse) are computed once, before timing, and only the backward is timed: for dhp one
ext.backward (its three kernels) into dq, dk, dv and a workspace shared by all launches; for the peers one
torch.autograd.grad over the SDPA forward, built once per buffer and kept with retain_graph=True (see
`prepare_backward`). The backward's launches run after `--bwd-spin` cycles (default 3x --spin): the host
work of a backward launch is larger, and the spin must cover it.

Host-bound check: per batch, the host's time to enqueue the batch and the GPU's span from the first start
to the last end are recorded. When the GPU span is not clearly longer than the enqueueing (`host_bound`), the
GPU has been waiting for the host, and host overhead leaked into the intervals: it adds noise (not a bias,
being independent of values) and lowers the test's power; the run warns, and a larger spin is the fix.

Status: the schedule, plan, host-bound and verdict logic are unit-tested on the CPU with synthetic timings;
the GPU loop has NOT yet run on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from . import stats
from .inputs import CLASSES

TIMING_CLASSES = ("fixed", "random") + tuple(c for c in CLASSES if c != "random")
FIXED_INDEX = 1_000_003  # the fixed input's draw index, apart from the random pool's 0 .. pool-1
SHAPE = (2, 1024, 8, 8)  # batch, seqlen, heads_q, heads_kv
QUICK_LAUNCHES, QUICK_BLOCK = 500, 200  # --quick's caps on launches per class and on the class blocks
HOST_BOUND_MARGIN = 1.1  # a batch whose GPU span is below this times its enqueueing time waited for the host


def schedule(classes: int, per_class: int, seed: int) -> np.ndarray:
    """Class index of every launch: each class exactly per_class times, in a random order fixed by seed."""
    order = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(order)


def settings(args, dtypes, head_dims, backward_dims) -> dict:
    """What a run times: {"cases" (dhp.audit.inputs.plan), "launches", "block", "spin" {"fwd", "bwd"}}.
    --quick: the first dtype, one head_dim (128 where compiled), non-causal, fwd and bwd, capped launches."""
    from .inputs import plan, selected_causals, selected_passes

    causals = selected_causals(getattr(args, "causal", None))
    launches, block = args.launches, args.block
    if args.quick:
        dtypes, head_dims, causals = dtypes[:1], head_dims[-2:-1] or head_dims[:1], (False,)
        launches, block = min(launches, QUICK_LAUNCHES), min(block, QUICK_BLOCK)
    bwd_spin = getattr(args, "bwd_spin", None)
    spin = {"fwd": args.spin, "bwd": 3 * args.spin if bwd_spin is None else bwd_spin}
    cases = plan(dtypes, head_dims, backward_dims, selected_passes(getattr(args, "passes", None)), causals)
    return {"cases": cases, "launches": launches, "block": block, "spin": spin}


def pool_draws(name: str, pool: int) -> list[tuple[str, int, bool]]:
    """(input class, draw index, copy of the first buffer?) of each buffer of a timing class's pool: `random`
    draws `pool` different inputs, `fixed` is one random draw (FIXED_INDEX) copied, every other class its own
    draw 0 copied."""
    if name == "random":
        return [("random", j, False) for j in range(pool)]
    cls, index = ("random", FIXED_INDEX) if name == "fixed" else (name, 0)
    return [(cls, index, j > 0) for j in range(pool)]


def host_bound(batches: list[dict], margin: float = HOST_BOUND_MARGIN) -> int:
    """How many batches the GPU spent waiting for the host: GPU span < margin x the host's enqueueing time.

    When the host enqueues faster than the GPU runs, work piles up and the GPU span exceeds the enqueueing time
    by the backlog; when it is slower, the GPU follows the host and the two are about equal."""
    return sum(1 for b in batches if "gpu_span_ms" in b and b["gpu_span_ms"] < margin * b["enqueue_ms"])


def analyse(times: dict, fixed: str = "fixed", random: str = "random", crops: int = 100,
            min_samples: int = 100) -> dict:
    """t-tests of one implementation's timings {class: array}: fixed vs random, fixed vs every other class."""
    tests = {f"{fixed} vs {random}": stats.fixed_vs_random(times[fixed], times[random], crops=crops,
                                                             min_samples=min_samples)}
    for name, samples in times.items():
        if name not in (fixed, random):
            tests[f"{fixed} vs {name}"] = stats.compare(times[fixed], samples, crops=crops,
                                                        min_samples=min_samples)
    summary = {name: {"n": int(np.size(s)), "median_us": float(np.median(s)) * 1e3,
                      "mean_us": float(np.mean(s)) * 1e3} for name, s in times.items()}
    return {"tests": {k: t.to_json() for k, t in tests.items()}, "classes": summary,
            "leak": any(t.leak for t in tests.values())}


def report(cases: list[dict]) -> str:
    """One line per (case, implementation, class pair): |t|, the crop it came from, leak or not."""
    lines = [f"{'case':<28} {'impl':<6} {'pair':<18} {'|t|':>8} {'crop':>6}  verdict"]
    for case in cases:
        for impl, result in case["impls"].items():
            if "error" in result:
                lines.append(f"{case['name']:<28} {impl:<6} {'-':<18} {'-':>8} {'-':>6}  unavailable: "
                             f"{result['error']}")
                continue
            for pair, t in result["analysis"]["tests"].items():
                crop = "all" if t["percentile"] is None else f"{100 * t['percentile']:.1f}%"
                lines.append(f"{case['name']:<28} {impl:<6} {pair:<18} {abs(t['t']):>8.2f} {crop:>6}  "
                             f"{'LEAK' if t['leak'] else 'ok'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Clocks


class Clocks:
    """SM clock (MHz) and power (W) of one GPU, through pynvml if importable, else nvidia-smi."""

    def __init__(self, index: int) -> None:
        self.index, self.handle, self.nvml = index, None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
            self.source = "nvml"
        except Exception:  # noqa: BLE001 -- not installed, or no NVML: fall back to nvidia-smi
            self.source = "nvidia-smi"

    def read(self) -> dict:
        try:
            if self.nvml is not None:
                return {"sm_mhz": self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM),
                        "power_w": self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0}
            out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=clocks.sm,power.draw",
                                  "--format=csv,noheader,nounits"], check=False, capture_output=True, text=True,
                                 timeout=10)
            sm, power = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
            return {"sm_mhz": float(sm), "power_w": float(power)}
        except Exception as error:  # noqa: BLE001 -- a clock read must never stop the test; record why it failed
            return {"error": str(error)}


# ----------------------------------------------------------------------------------------------------------
# The GPU loop


def make_pools(torch, dtype: str, head_dim: int, shape, pool: int, seed: int, backward: bool = False) -> dict:
    """{class: [(q, k, v), ...]}, or with `backward` [(q, k, v, dout), ...], `pool` buffers per class (see
    `pool_draws` and the module docstring)."""
    from . import inputs

    batch, seqlen, heads_q, heads_kv = shape
    q_shape, kv_shape = (batch, seqlen, heads_q, head_dim), (batch, seqlen, heads_kv, head_dim)
    pools = {}
    for name in TIMING_CLASSES:
        pools[name] = []
        for cls, index, copy in pool_draws(name, pool):
            if copy:
                pools[name].append(tuple(t.clone() for t in pools[name][0]))
                continue
            entry = inputs.qkv_torch(torch, cls, q_shape, kv_shape, dtype, "cuda", seed, index)
            if backward:
                entry += (inputs.dout_torch(torch, cls, q_shape, dtype, "cuda", seed, index),)
            pools[name].append(entry)
    return pools


def sdpa_forward(torch, impl: str, causal: bool):
    """fn(q, k, v) -> out (batch, heads, seqlen, head_dim): torch SDPA with the cuDNN ("cudnn") or flash
    ("flash") backend, on dhp's layout (batch, seqlen, heads, head_dim)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[impl]

    def call(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kwargs = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **kwargs)

    return call


def prepare_forward(torch, impl: str, causal: bool, pools: dict):
    """(fn(entry), pools) of the forward: dhp.attention into one preallocated out, or torch SDPA."""
    if impl == "dhp":
        import dhp

        out = torch.empty_like(next(iter(pools.values()))[0][0])
        return (lambda entry: dhp.attention(*entry, causal=causal, out=out)), pools
    forward = sdpa_forward(torch, impl, causal)
    return (lambda entry: forward(*entry)), pools


def prepare_backward(torch, impl: str, causal: bool, pools: dict):
    """(fn(entry), entries) of the backward, from pools of (q, k, v, dout), with the forward run once per buffer.

    dhp: entries (q, k, v, out, dout, lse); fn is one ext.backward on the current stream into dq, dk, dv and a
    workspace allocated once, so a launch is the backward's kernels and nothing else.

    Peers: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) on an SDPA forward recorded once per
    buffer. Chosen over calling aten's _scaled_dot_product_{cudnn,flash}_attention_backward directly: those are
    private ops whose signatures change between torch releases (cuDNN's gained attn_bias, the philox and
    cum_seq arguments move), while autograd reaches whichever backward the forward's backend recorded, with the
    saved tensors and any layout copies that torch's own users get. Its host work (the autograd engine, a
    thread hop) is larger than a direct call; the backward's longer spin covers it, and `host_bound` tells
    when it did not. Only kernels run between the events; the leaves' layout and the saved tensors are fixed
    when the graph is built."""
    stream = torch.cuda.current_stream().cuda_stream
    first = next(iter(pools.values()))[0]
    if impl == "dhp":
        from .. import _native

        ext = _native.ext()
        q0, k0 = first[0], first[1]
        batch, seqlen, heads_q, _ = q0.shape
        entries = {}
        for name, buffers in pools.items():
            entries[name] = []
            for q, k, v, dout in buffers:
                out = torch.empty_like(q)
                lse = torch.empty((batch, heads_q, seqlen), dtype=torch.float32, device=q.device)
                ext.forward(q, k, v, out, lse, causal, 0.0, stream)
                entries[name].append((q, k, v, out, dout, lse))
        dq, dk, dv = torch.empty_like(q0), torch.empty_like(k0), torch.empty_like(first[2])
        size = ext.backward_workspace_size(q0, k0, causal, 0.0)
        workspace = torch.empty(size, dtype=torch.uint8, device=q0.device) if size else None
        torch.cuda.synchronize()

        def call(entry):
            ext.backward(*entry, dq, dk, dv, workspace, causal, 0.0, stream)

        return call, entries
    forward = sdpa_forward(torch, impl, causal)
    entries = {}
    with torch.enable_grad():
        for name, buffers in pools.items():
            entries[name] = []
            for q, k, v, dout in buffers:
                leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
                entries[name].append((forward(*leaves), leaves, dout.transpose(1, 2)))
    torch.cuda.synchronize()

    def call(entry):
        out, leaves, grad_out = entry
        torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    return call, entries


def time_impl(torch, fn, pools: dict, launches: int, seed: int, batch: int, spin: int, block: int,
              clocks: Clocks) -> dict:
    """Interleaved timings {class: ms array} of fn(entry) over the pools' entries, clocks and host-bound
    measures per batch, and a block of each class alone."""
    names = list(pools)
    order = schedule(len(names), launches, seed)
    used = {name: 0 for name in names}
    times = {name: [] for name in names}
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
    sleep = getattr(torch.cuda, "_sleep", None)

    def launch(name, start, end):
        entry = pools[name][used[name] % len(pools[name])]
        used[name] += 1
        if sleep is not None and spin > 0:
            sleep(spin)
        start.record()
        fn(entry)
        end.record()

    for name in names:  # warm-up: every class and buffer once
        for _ in range(len(pools[name])):
            launch(name, *events[0])
    torch.cuda.synchronize()
    batches = []
    for first in range(0, len(order), batch):
        chunk = order[first:first + batch]
        before = clocks.read()
        enqueue = time.perf_counter()
        for i, c in enumerate(chunk):
            launch(names[c], *events[i])
        enqueue_ms = (time.perf_counter() - enqueue) * 1e3
        torch.cuda.synchronize()
        for i, c in enumerate(chunk):
            times[names[c]].append(events[i][0].elapsed_time(events[i][1]))
        batches.append({"first": int(first), "count": len(chunk), "before": before, "after": clocks.read(),
                        "enqueue_ms": enqueue_ms,
                        "gpu_span_ms": events[0][0].elapsed_time(events[len(chunk) - 1][1])})
    blocks = {}
    for name in names:  # each class alone: does a class move clocks or power?
        before, samples = clocks.read(), []
        for first in range(0, block, batch):
            count = min(batch, block - first)
            for i in range(count):
                launch(name, *events[i])
            torch.cuda.synchronize()
            samples += [events[i][0].elapsed_time(events[i][1]) for i in range(count)]
        blocks[name] = {"launches": block, "median_us": float(np.median(samples)) * 1e3 if samples else None,
                        "before": before, "after": clocks.read()}
    return {"times": {k: np.asarray(v) for k, v in times.items()}, "batches": batches, "blocks": blocks}


def run(args) -> int:
    """`python -m dhp.audit timing`: time every case, print the table, write JSON; exit 0/1/2."""
    from .inputs import PASS_NAMES, backward_head_dims, gpu_variants

    variants = gpu_variants(args)
    if variants is None:
        return 2
    import torch

    setup = settings(args, *variants, backward_head_dims())
    launches, block = setup["launches"], setup["block"]
    if not setup["cases"]:
        print("cannot run: no case to time (this build has no backward for the selected head_dims)",
              file=sys.stderr)
        return 2
    impls = ["dhp"] + (["cudnn", "flash"] if args.peers else [])
    clocks = Clocks(torch.cuda.current_device())
    cases, warnings = [], []
    with torch.no_grad():
        for planned in setup["cases"]:
            name, direction, spin = planned["name"], planned["pass"], setup["spin"][planned["pass"]]
            backward = direction == "bwd"
            pools = make_pools(torch, planned["dtype"], planned["head_dim"], SHAPE, args.pool, args.seed, backward)
            case = {**planned, "pass": PASS_NAMES[direction], "shape": list(SHAPE), "launches_per_class": launches,
                    "spin_cycles": spin, "impls": {}}
            for impl in impls:
                print(f"timing {name} {impl} ...", file=sys.stderr, flush=True)
                try:
                    prepare = prepare_backward if backward else prepare_forward
                    fn, entries = prepare(torch, impl, planned["causal"], pools)
                    fn(entries["fixed"][0])
                    torch.cuda.synchronize()
                except Exception as error:  # a peer without this variant: reported, not fatal
                    if impl == "dhp":
                        raise
                    case["impls"][impl] = {"error": f"{type(error).__name__}: {error}"[:300]}
                    continue
                measured = time_impl(torch, fn, entries, launches, args.seed, args.batch, spin, block, clocks)
                waited = host_bound(measured["batches"])
                if waited:
                    warnings.append(f"{name} {impl}: in {waited} of {len(measured['batches'])} batches the GPU "
                                    f"waited for the host (spin {spin} cycles too short: raise "
                                    f"{'--bwd-spin' if backward else '--spin'}); host overhead adds noise")
                case["impls"][impl] = {"analysis": analyse(measured["times"]), "host_bound_batches": waited,
                                       "batches": measured["batches"], "blocks": measured["blocks"]}
                del fn, entries
            del pools
            torch.cuda.empty_cache()
            cases.append(case)
    leak = any(c["impls"]["dhp"]["analysis"]["leak"] for c in cases)
    verdict = "fail" if leak else "pass"
    print(f"timing test ({len(cases)} cases, {launches} launches per class, clocks via {clocks.source}): "
          f"dhp {verdict.upper()}")
    print(report(cases))
    for warning in warnings:
        print(f"warning: {warning}")
    if leak:
        print("A leak here may come from power and clocks (DVFS) rather than code: compare the class blocks' "
              "clocks in the JSON and run `python -m dhp.audit counters`.")
    if args.json:
        document = {"check": "timing", "verdict": verdict, "device": torch.cuda.get_device_name(),
                    "clock_source": clocks.source, "threshold": stats.T_THRESHOLD, "seed": args.seed,
                    "pool": args.pool, "spin_cycles": setup["spin"], "cases": cases}
        with open(args.json, "w") as out:
            out.write(json.dumps(document, indent=1) + "\n")
    return 1 if leak else 0
