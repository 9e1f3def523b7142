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

Status: the schedule and verdict logic are unit-tested on the CPU with synthetic timings; the GPU loop has
NOT yet run on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from . import stats
from .inputs import CLASSES

TIMING_CLASSES = ("fixed", "random") + tuple(c for c in CLASSES if c != "random")
FIXED_INDEX = 1_000_003  # the fixed input's draw index, apart from the random pool's 0 .. pool-1
SHAPE = (2, 1024, 8, 8)  # batch, seqlen, heads_q, heads_kv


def schedule(classes: int, per_class: int, seed: int) -> np.ndarray:
    """Class index of every launch: each class exactly per_class times, in a random order fixed by seed."""
    order = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(order)


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


def make_pools(torch, dtype: str, head_dim: int, shape, pool: int, seed: int) -> dict:
    """{class: [(q, k, v), ...]} with `pool` buffers per class (see the module docstring)."""
    from . import inputs

    batch, seqlen, heads_q, heads_kv = shape
    q_shape, kv_shape = (batch, seqlen, heads_q, head_dim), (batch, seqlen, heads_kv, head_dim)
    pools = {}
    for name in TIMING_CLASSES:
        if name == "random":
            pools[name] = [inputs.qkv_torch(torch, "random", q_shape, kv_shape, dtype, "cuda", seed, j)
                           for j in range(pool)]
        else:
            cls, index = ("random", FIXED_INDEX) if name == "fixed" else (name, 0)
            first = inputs.qkv_torch(torch, cls, q_shape, kv_shape, dtype, "cuda", seed, index)
            pools[name] = [first] + [tuple(t.clone() for t in first) for _ in range(pool - 1)]
    return pools


def make_call(torch, impl: str, causal: bool):
    """fn(q, k, v, out) for dhp, or torch SDPA with the cuDNN ("cudnn") or flash ("flash") backend."""
    if impl == "dhp":
        import dhp

        return lambda q, k, v, out: dhp.attention(q, k, v, causal=causal, out=out)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[impl]

    def call(q, k, v, out):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kwargs = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **kwargs)

    return call


def time_impl(torch, fn, pools: dict, launches: int, seed: int, batch: int, spin: int, block: int,
              clocks: Clocks) -> dict:
    """Interleaved timings {class: ms array}, clocks per batch, and a block of each class alone."""
    names = list(pools)
    order = schedule(len(names), launches, seed)
    out = torch.empty_like(pools[names[0]][0][0])
    used = {name: 0 for name in names}
    times = {name: [] for name in names}
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
    sleep = getattr(torch.cuda, "_sleep", None)

    def launch(name, start, end):
        q, k, v = pools[name][used[name] % len(pools[name])]
        used[name] += 1
        if sleep is not None and spin > 0:
            sleep(spin)
        start.record()
        fn(q, k, v, out)
        end.record()

    for name in names:  # warm-up: every class and buffer once
        for _ in range(len(pools[name])):
            launch(name, *events[0])
    torch.cuda.synchronize()
    batches = []
    for first in range(0, len(order), batch):
        chunk = order[first:first + batch]
        before = clocks.read()
        for i, c in enumerate(chunk):
            launch(names[c], *events[i])
        torch.cuda.synchronize()
        for i, c in enumerate(chunk):
            times[names[c]].append(events[i][0].elapsed_time(events[i][1]))
        batches.append({"first": int(first), "count": len(chunk), "before": before, "after": clocks.read()})
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
    from .inputs import gpu_variants

    variants = gpu_variants(args)
    if variants is None:
        return 2
    import torch

    dtypes, head_dims = variants
    launches, block = args.launches, args.block
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    if args.quick:
        dtypes, head_dims, causals = dtypes[:1], head_dims[-2:-1] or head_dims[:1], (False,)
        launches, block = min(launches, 1000), min(block, 200)
    impls = ["dhp"] + (["cudnn", "flash"] if args.peers else [])
    clocks = Clocks(torch.cuda.current_device())
    cases = []
    with torch.no_grad():
        for dtype in dtypes:
            for head_dim in head_dims:
                for causal in causals:
                    name = f"{dtype} d{head_dim} {'causal' if causal else 'full'}"
                    pools = make_pools(torch, dtype, head_dim, SHAPE, args.pool, args.seed)
                    case = {"name": name, "dtype": dtype, "head_dim": head_dim, "causal": causal,
                            "shape": list(SHAPE), "launches_per_class": launches, "impls": {}}
                    for impl in impls:
                        print(f"timing {name} {impl} ...", file=sys.stderr, flush=True)
                        try:
                            fn = make_call(torch, impl, causal)
                            q, k, v = pools["fixed"][0]
                            fn(q, k, v, torch.empty_like(q))
                            torch.cuda.synchronize()
                        except Exception as error:  # a peer without this variant: reported, not fatal
                            if impl == "dhp":
                                raise
                            case["impls"][impl] = {"error": f"{type(error).__name__}: {error}"[:300]}
                            continue
                        measured = time_impl(torch, fn, pools, launches, args.seed, args.batch, args.spin,
                                             block, clocks)
                        case["impls"][impl] = {"analysis": analyse(measured["times"]),
                                               "batches": measured["batches"], "blocks": measured["blocks"]}
                    del pools
                    torch.cuda.empty_cache()
                    cases.append(case)
    leak = any(c["impls"]["dhp"]["analysis"]["leak"] for c in cases)
    verdict = "fail" if leak else "pass"
    print(f"timing test ({len(cases)} cases, {launches} launches per class, clocks via {clocks.source}): "
          f"dhp {verdict.upper()}")
    print(report(cases))
    if leak:
        print("A leak here may come from power and clocks (DVFS) rather than code: compare the class blocks' "
              "clocks in the JSON and run `python -m dhp.audit counters`.")
    if args.json:
        document = {"check": "timing", "verdict": verdict, "device": torch.cuda.get_device_name(),
                    "clock_source": clocks.source, "threshold": stats.T_THRESHOLD, "seed": args.seed,
                    "pool": args.pool, "spin_cycles": args.spin, "cases": cases}
        with open(args.json, "w") as out:
            out.write(json.dumps(document, indent=1) + "\n")
    return 1 if leak else 0
