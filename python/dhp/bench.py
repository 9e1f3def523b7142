"""python -m dhp.bench: dhp's forward beside torch SDPA's cuDNN and flash (FA2) backends, in one run.

Every case times the three on the same inputs: warm-up first, then --reps runs, each with the L2 cache flushed
before it (the same flush for every side) and CUDA events around the call alone; the median counts. Runs are
enqueued back to back and synchronized once at the end; a GPU-side spin queued before each flush keeps the
GPU behind the host, so the events time the kernels, not a call's host overhead. TFLOP/s = 4·batch·heads_q·seqlen_q·
seqlen_k·head_dim / time, halved for causal. A backend that refuses a case gets None.

Cases: the build's dtypes and head_dims, seqlen 512..16k with batch·seqlen = 16k and heads·head_dim = 2048,
causal and not, plus GQA (32 q heads, 8 kv heads, head_dim 128, seqlen 4k). --quick runs a small subset.

    python -m dhp.bench [--quick] [--reps 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import statistics
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from . import _native

TOKENS = 16384  # batch * seqlen
WIDTH = 2048  # heads * head_dim
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096)
GQA_HEADS = (32, 8)
BACKENDS = ("dhp", "cudnn", "fa2")
LABELS = {"dhp": "dhp", "cudnn": "cuDNN", "fa2": "FA2"}
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}
FLUSH_BYTES = 256 << 20  # five times an H100's 50 MB L2
SPIN_CYCLES = 400_000  # ~0.2 ms of GPU time queued ahead of each timed call


@dataclass(frozen=True)
class Case:
    dtype: str  # "bfloat16" or "float16"
    head_dim: int
    batch: int
    seqlen: int
    heads_q: int
    heads_kv: int
    causal: bool

    @property
    def flops(self) -> float:
        full = 4.0 * self.batch * self.heads_q * self.seqlen * self.seqlen * self.head_dim
        return full / 2 if self.causal else full

    @property
    def name(self) -> str:
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}/{self.heads_kv}"
        mask = " causal" if self.causal else ""
        short = SHORT_DTYPES.get(self.dtype, self.dtype)
        return f"{short} d{self.head_dim} b{self.batch} s{self.seqlen} {heads}{mask}"


def cases(dtypes, head_dims, quick=False) -> list[Case]:
    if quick:
        dtypes = list(dtypes)[:1]
        head_dims = [128] if 128 in head_dims else list(head_dims)[:1]
    seqlens = QUICK_SEQLENS if quick else SEQLENS
    result = [
        Case(dtype, d, TOKENS // s, s, WIDTH // d, WIDTH // d, causal)
        for dtype in dtypes
        for d in head_dims
        for s in seqlens
        for causal in (False, True)
    ]
    if 128 in head_dims:
        hq, hkv = GQA_HEADS
        result += [
            Case(dtype, 128, TOKENS // 4096, 4096, hq, hkv, causal) for dtype in dtypes for causal in (False, True)
        ]
    return result


def make_inputs(torch, case: Case):
    dtype = getattr(torch, case.dtype)
    shape_q = (case.batch, case.seqlen, case.heads_q, case.head_dim)
    shape_kv = (case.batch, case.seqlen, case.heads_kv, case.head_dim)
    return tuple(torch.randn(shape, dtype=dtype, device="cuda") for shape in (shape_q, shape_kv, shape_kv))


def _dhp_call(torch, case, q, k, v):
    import dhp

    out = torch.empty_like(q)
    return lambda: dhp.attention(q, k, v, causal=case.causal, out=out)


def _sdpa_call(torch, backend_name, case, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}[backend_name]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (b, h, s, d), as a view of the same memory
    kwargs = {"is_causal": case.causal}
    if case.heads_q != case.heads_kv:
        kwargs["enable_gqa"] = True

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, **kwargs)

    return call


@functools.lru_cache(maxsize=None)
def _flush_buffer(torch, device: int):
    return torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=f"cuda:{device}")


def time_ms(torch, fn, reps=30, warmup=5) -> float:
    """Median milliseconds of fn() over reps runs, each after an L2 flush, on the current stream."""
    flush = _flush_buffer(torch, torch.cuda.current_device())
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        # A GPU-side spin ahead of the flush keeps the GPU queue ahead of the host, so host-side call
        # overhead (any side's) never shows up as idle time between the events: the kernel is timed.
        torch.cuda._sleep(SPIN_CYCLES)
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure(torch, case: Case, backends=BACKENDS, reps=30, warmup=5) -> dict:
    """{backend: median ms or None (refused)} for one case, all backends on the same inputs."""
    q, k, v = make_inputs(torch, case)
    times = {}
    for name in backends:
        fn = _dhp_call(torch, case, q, k, v) if name == "dhp" else _sdpa_call(torch, name, case, q, k, v)
        if name != "dhp":
            try:  # a peer that cannot run the case raises on its first call
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn()
                torch.cuda.synchronize()
            except RuntimeError:
                times[name] = None
                continue
        times[name] = time_ms(torch, fn, reps, warmup)
    return times


def make_row(case: Case, times: dict) -> dict:
    tflops = {name: None if ms is None else case.flops / (ms * 1e-3) / 1e12 for name, ms in times.items()}
    ratios = {
        f"dhp/{peer}": None if tflops.get(peer) is None or tflops.get("dhp") is None else tflops["dhp"] / tflops[peer]
        for peer in times
        if peer != "dhp"
    }
    return {"case": case.name, **asdict(case), "flops": case.flops, "ms": times, "tflops": tflops, "ratios": ratios}


def _cell(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def format_header(backends=BACKENDS) -> str:
    peers = [b for b in backends if b != "dhp"]
    cols = "".join(f"{LABELS[b]:>9}" for b in backends) + "".join(f"{'/' + LABELS[p]:>9}" for p in peers)
    return f"{'case (TFLOP/s)':<36}{cols}"


def format_row(row: dict, backends=BACKENDS) -> str:
    peers = [b for b in backends if b != "dhp"]
    cols = "".join(f"{_cell(row['tflops'].get(b), '.1f'):>9}" for b in backends)
    cols += "".join(f"{_cell(row['ratios'].get(f'dhp/{p}'), '.2f'):>9}" for p in peers)
    return f"{row['case']:<36}{cols}"


def geomean_ratios(rows: list[dict]) -> dict:
    keys = {key for row in rows for key in row["ratios"]}
    result = {}
    for key in sorted(keys):
        values = [row["ratios"][key] for row in rows if row["ratios"].get(key)]
        result[key] = math.exp(sum(map(math.log, values)) / len(values)) if values else None
    return result


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
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dhp.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset: one dtype, head_dim 128, 1k and 4k")
    parser.add_argument("--reps", type=int, default=30, help="timed runs per backend and case (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--out", metavar="PATH", help="also write environment and rows as JSON")
    args = parser.parse_args(argv)

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
          f"cuDNN {env['cudnn']}, dhp {env['dhp']}")
    dtypes, head_dims = _native.variants()
    print(format_header())
    rows = []
    with torch.no_grad():
        for case in cases(dtypes, head_dims, quick=args.quick):
            rows.append(make_row(case, measure(torch, case, BACKENDS, args.reps, args.warmup)))
            print(format_row(rows[-1]), flush=True)
    means = geomean_ratios(rows)
    print("geometric mean: " + ", ".join(f"{key} {_cell(value, '.3f')}" for key, value in means.items()))
    if args.out:
        settings = {"reps": args.reps, "warmup": args.warmup, "quick": args.quick, "flush_bytes": FLUSH_BYTES,
                    "spin_cycles": SPIN_CYCLES}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "settings": settings, "rows": rows, "geomean": means}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
