"""Steady-state throughput, SM clock and board power of dhp beside torch SDPA's backends, one case at a time.

Each backend runs the case back to back for --seconds (after a second of warm-up, no L2 flush) while NVML is sampled
every 50 ms on a thread: TFLOP/s from CUDA events around the whole stretch, the median SM clock (and the lowest),
the median board power, the last temperature, and the clock-event (throttle) reasons seen, by sample count. On a
GPU held at its power cap the clock follows each kernel's energy per unit of work, which this puts beside its
TFLOP/s (docs/performance.md, "The forward at the power cap").

    python bench/steady_clocks.py --case bf16/128/4/4096/16/16/0 --case bf16/128/2/8192/16/16/1 [--seconds 3]

A case is dtype/head_dim/batch/seqlen/heads_q/heads_kv/causal(0|1); --direction bwd times the backward the way
dhp.bench does. Needs torch with CUDA, dhp's extension and nvidia-ml-py (pynvml).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

# NVML's clocks-event reason bits (nvmlClocksEventReasons*), as named in nvidia-smi -q
REASONS = {
    0x1: "idle",
    0x2: "applications clocks setting",
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x10: "sync boost",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake slowdown",
    0x100: "display clock setting",
}


def reason_names(mask: int) -> list[str]:
    """The reasons set in an NVML clocks-event mask; unknown bits as hex."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    rest = mask & ~sum(REASONS)
    return names + ([hex(rest)] if rest else []) or ["none"]


def summarize(samples: list[tuple[int, float, int, int]]) -> dict:
    """Samples of (SM MHz, board W, temperature C, reasons mask) -> medians, lowest clock, last temperature and
    {reason: samples}."""
    reasons: dict[str, int] = {}
    for *_, mask in samples:
        for name in reason_names(mask):
            reasons[name] = reasons.get(name, 0) + 1
    return {
        "sm_mhz": statistics.median(s[0] for s in samples),
        "sm_mhz_min": min(s[0] for s in samples),
        "watts": statistics.median(s[1] for s in samples),
        "celsius": samples[-1][2],
        "reasons": reasons,
    }


def parse_case(text: str):
    """'bf16/128/4/4096/16/16/0' -> (dtype, head_dim, batch, seqlen, heads_q, heads_kv, causal)."""
    dtype, head_dim, batch, seqlen, heads_q, heads_kv, causal = text.split("/")
    return dtype, int(head_dim), int(batch), int(seqlen), int(heads_q), int(heads_kv), causal == "1"


def measure(torch, pynvml, handle, fn, seconds: float) -> tuple[float, dict]:
    """(milliseconds per call, summarize(...)) of fn run back to back for `seconds` after a second of warm-up."""
    start = time.time()
    while time.time() - start < 1.0:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    samples: list[tuple[int, float, int, int]] = []
    done = threading.Event()
    event_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    event_reasons = event_reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons  # older nvidia-ml-py

    def sample():
        while not done.is_set():
            samples.append((pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                            pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                            event_reasons(handle)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, start = 0, time.time()
    begin.record()
    while time.time() - start < seconds:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    done.set()
    sampler.join()
    return begin.elapsed_time(end) / calls, summarize(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", required=True, metavar="D/HD/B/S/HQ/HKV/C",
                        help="e.g. bf16/128/4/4096/16/16/0 (repeatable)")
    parser.add_argument("--backends", default="dhp,cudnn", help="comma-separated, from dhp,cudnn,fa2")
    parser.add_argument("--direction", choices=("fwd", "bwd"), default="fwd")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed stretch per backend and case")
    args = parser.parse_args(argv)

    import pynvml
    import torch
    from dhp import bench

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    print(f"{'case':38} {'backend':7} {'TFLOP/s':>8} {'SM MHz':>7} {'(min)':>6} {'W':>5} {'C':>3}  clocks-event reasons")
    for text in args.case:
        dtype, head_dim, batch, seqlen, heads_q, heads_kv, causal = parse_case(text)
        case = bench.Case(bench.DTYPE_NAMES[dtype], head_dim, batch, seqlen, heads_q, heads_kv, causal, args.direction)
        q, k, v = bench.make_inputs(torch, case)
        dout = torch.randn_like(q) if args.direction == "bwd" else None
        for name in args.backends.split(","):
            ms, s = measure(torch, pynvml, handle, bench.timed_call(torch, name, case, q, k, v, dout), args.seconds)
            reasons = ", ".join(f"{r} {n}" for r, n in s["reasons"].items())
            print(f"{case.name:38} {name:7} {case.flops / ms / 1e9:8.1f} {s['sm_mhz']:7.0f} {s['sm_mhz_min']:6d}"
                  f" {s['watts']:5.0f} {s['celsius']:3d}  {reasons}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
