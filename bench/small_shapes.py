"""Small batches and decode-like shapes (seqlen_q != seqlen_k), which `python -m dhp.bench` does not cover.

Times dhp's forward without a mask beside torch SDPA's cuDNN and FlashAttention-2 backends and FlashAttention-3 (where
`flash_attn_interface` imports, bench/fa3; its flash_attn_func with its defaults), interleaved run by run after an L2
flush (dhp.bench.time_runs_interleaved), and prints one line per shape: microseconds, TFLOP/s (4 * b * hq * sq * sk *
d / time) and dhp against the fastest peer. With --out, also writes the rows (milliseconds of every run per backend)
and dhp.bench's environment (device, driver, versions, date) as JSON.

    PYTHONPATH=bench/fa3 python bench/small_shapes.py [--out PATH.json] [b/sq/sk/hq/hkv/d ...]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dhp
from dhp import bench

SHAPES = [  # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim
    (1, 1, 4096, 32, 8, 128), (1, 1, 16384, 32, 8, 128), (1, 1, 65536, 32, 8, 128), (8, 1, 8192, 32, 8, 128),
    (8, 1, 4096, 32, 8, 128), (2, 1, 8192, 32, 8, 128), (4, 1, 16384, 32, 8, 128), (16, 1, 8192, 32, 8, 128),
    (1, 1, 16384, 32, 32, 128), (4, 1, 16384, 32, 32, 128), (1, 1, 16384, 16, 16, 128), (1, 16, 8192, 32, 8, 128),
    (1, 64, 8192, 32, 8, 128), (1, 128, 8192, 32, 8, 128), (1, 512, 8192, 32, 8, 128),
    (1, 1, 16384, 32, 8, 64), (8, 1, 8192, 32, 8, 64), (1, 1, 16384, 32, 32, 64),
    (1, 1, 16384, 16, 8, 256), (8, 1, 8192, 16, 8, 256), (1, 1, 16384, 16, 16, 256), (1, 16, 8192, 16, 8, 256),
    (1, 2048, 2048, 16, 16, 128), (1, 1024, 1024, 8, 8, 128), (1, 1024, 1024, 32, 32, 64), (2, 4096, 4096, 8, 8, 128),
    (1, 4096, 4096, 32, 8, 128), (1, 8192, 8192, 8, 8, 256),
]


def calls(q, k, v) -> dict:
    """{backend: a call of it on q, k, v in (b, s, h, d)}, the peers that refuse the shape left out."""
    out = torch.empty_like(q)
    fns = {"dhp": lambda: dhp.attention(q, k, v, out=out)}
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=q.shape[2] != k.shape[2])
        try:
            sdpa()
            torch.cuda.synchronize()
            fns[name] = sdpa
        except RuntimeError:
            pass
    try:
        from flash_attn_interface import flash_attn_func
        fns["fa3"] = lambda: flash_attn_func(q, k, v)
    except ImportError:
        pass
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="PATH.json", help="also write the rows and the environment as JSON")
    parser.add_argument("shapes", nargs="*", metavar="b/sq/sk/hq/hkv/d", help="default: SHAPES")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in arg.split("/")) for arg in args.shapes] or SHAPES
    rows = []
    for b, sq, sk, hq, hkv, d in shapes:
        torch.manual_seed(0)
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        runs = bench.time_runs_interleaved(torch, calls(q, k, v), reps=30, warmup=5)
        ms = {name: statistics.median(r) for name, r in runs.items()}
        flops = 4 * b * hq * sq * sk * d
        best = min(t for name, t in ms.items() if name != "dhp")
        print(f"b{b} sq{sq} sk{sk} h{hq}/{hkv} d{d}  "
              + "  ".join(f"{name} {t * 1e3:8.1f}us {flops / t / 1e9:6.1f}TF" for name, t in ms.items())
              + f"   dhp/best {best / ms['dhp']:.2f}", flush=True)
        rows.append({"batch": b, "seqlen_q": sq, "seqlen_k": sk, "heads_q": hq, "heads_kv": hkv, "head_dim": d,
                     "dtype": "bfloat16", "causal": False, "flops": flops, "ms": ms, "runs_ms": runs})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": bench.environment(torch), "settings": {"reps": 30, "warmup": 5}, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
