"""Determinism and batch invariance: same inputs give the same bits, whatever else runs or sits in the batch.

Method. For every compiled variant, causal and not, on a shape with a sequence tail and GQA, the reference is
the sha256 of the raw bytes of out and of lse from one call on the current stream. Then, each compared
bitwise (by hash) with the reference:

    repeat      `--repeats` more calls on the current stream
    streams     one call on each of two new torch streams
    load        `--repeats` calls on a new stream while another stream runs a loop of large matmuls
    batch       the target sequence alone (batch 1) against the same sequence inside batches of 3 and 8,
                at the first, a middle and the last position, with different neighbours: random ones, and
                neighbours of the classes zeros, huge, nan and inf (dhp.audit.inputs). The API has one seqlen
                per batch, so all sequences of a batch share it.

Each comparison is one check; the verdict is pass when every check's hashes equal the reference's.
Status: the hashing and verdict logic are unit-tested on the CPU; the GPU part has NOT yet run on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import sys

SHAPE = (1000, 4, 2)  # seqlen, heads_q, heads_kv: a tail, and GQA
POOL = 8  # distinct random sequences to build batches from; the target is sequence 0


def digest(data: bytes) -> str:
    """sha256 of raw bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def tensor_digest(tensor) -> str:
    """sha256 of a torch tensor's (or numpy array's) raw bytes in C order, copied to the host.

    A byte view, not values: NaN payloads and the sign of zero count."""
    import numpy as np

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
    return digest(np.ascontiguousarray(tensor).tobytes())


def compare(check: str, label: str, reference: dict, got: dict) -> dict:
    """One check: reference and got are {"out": hash, "lse": hash}; equal when every hash agrees."""
    differing = sorted(k for k in reference if reference[k] != got.get(k))
    return {"check": check, "label": label, "same": not differing, "differing": differing}


def verdict(checks: list[dict]) -> str:
    """pass when there are checks and every one is bitwise the same, else fail."""
    return "pass" if checks and all(c["same"] for c in checks) else "fail"


def batch_layouts(pool: int = POOL) -> list[tuple[str, list]]:
    """(label, batch) with entries: an int (random sequence of the pool; 0 is the target) or a class name."""
    others = list(range(1, pool))
    return [
        ("b1 alone", [0]),
        ("b3 first", [0, 1, 2]),
        ("b3 middle", [3, 0, 4]),
        ("b3 last", [5, 6, 0]),
        ("b8 first", [0] + others),
        ("b8 middle", others[:4] + [0] + others[4:]),
        ("b8 last", others[::-1] + [0]),
        ("b3 special neighbours", ["nan", 0, "inf"]),
        ("b8 special neighbours", ["zeros", "huge", "nan", "inf", 0, "zeros", "huge", "nan"]),
    ]


def report(cases: list[dict]) -> str:
    lines = [f"{'case':<28} {'checks':>6} {'same':>5}  verdict"]
    for case in cases:
        same = sum(c["same"] for c in case["checks"])
        lines.append(f"{case['name']:<28} {len(case['checks']):>6} {same:>5}  {verdict(case['checks']).upper()}")
        for c in case["checks"]:
            if not c["same"]:
                lines.append(f"  {case['name']}: {c['check']} {c['label']}: {', '.join(c['differing'])} differ")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The GPU part


def run_case(torch, dtype: str, head_dim: int, causal: bool, repeats: int, seed: int) -> list[dict]:
    import dhp

    from . import inputs

    seqlen, heads_q, heads_kv = SHAPE
    q_shape, kv_shape = (1, seqlen, heads_q, head_dim), (1, seqlen, heads_kv, head_dim)
    sequences = {i: inputs.qkv_torch(torch, "random", q_shape, kv_shape, dtype, "cuda", seed, i)
                 for i in range(POOL)}
    for name in ("zeros", "huge", "nan", "inf"):
        sequences[name] = inputs.qkv_torch(torch, name, q_shape, kv_shape, dtype, "cuda", seed, 0)
    q, k, v = sequences[0]

    def hashes(out, lse):
        torch.cuda.synchronize()
        return {"out": tensor_digest(out), "lse": tensor_digest(lse)}

    def call(q, k, v):
        return dhp.attention(q, k, v, causal=causal, return_lse=True)

    torch.cuda.synchronize()
    reference = hashes(*call(q, k, v))
    checks = [compare("repeat", f"run {i + 1}", reference, hashes(*call(q, k, v))) for i in range(repeats)]

    for i in range(2):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out, lse = call(q, k, v)
        checks.append(compare("streams", f"stream {i + 1}", reference, hashes(out, lse)))

    load, work = torch.cuda.Stream(), torch.cuda.Stream()
    a, b, c = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    load.wait_stream(torch.cuda.current_stream())
    work.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(load):
        for _ in range(200):  # ~40 ms of matmuls on an H100, enqueued before the attention calls
            torch.matmul(a, b, out=c)
    results = []
    with torch.cuda.stream(work):
        for _ in range(repeats):
            results.append(call(q, k, v))
    torch.cuda.synchronize()
    checks += [compare("load", f"run {i + 1} beside matmuls", reference, hashes(*r)) for i, r in enumerate(results)]

    for label, layout in batch_layouts():
        bq, bk, bv = (torch.cat([sequences[e][j] for e in layout]) for j in range(3))
        out, lse = call(bq, bk, bv)
        position = layout.index(0)
        checks.append(compare("batch", label, reference, hashes(out[position], lse[position])))
    return checks


def run(args) -> int:
    """`python -m dhp.audit determinism`: every variant, causal and not; table, JSON, exit 0/1/2."""
    from .inputs import gpu_variants

    variants = gpu_variants(args)
    if variants is None:
        return 2
    import torch

    dtypes, head_dims = variants
    cases = []
    with torch.no_grad():
        for dtype in dtypes:
            for head_dim in head_dims:
                for causal in (False, True):
                    name = f"{dtype} d{head_dim} {'causal' if causal else 'full'}"
                    checks = run_case(torch, dtype, head_dim, causal, args.repeats, args.seed)
                    cases.append({"name": name, "dtype": dtype, "head_dim": head_dim, "causal": causal,
                                  "verdict": verdict(checks), "checks": checks})
    overall = "pass" if cases and all(c["verdict"] == "pass" for c in cases) else "fail"
    print(f"determinism and batch invariance ({len(cases)} cases, {torch.cuda.get_device_name()}): "
          f"{overall.upper()}")
    print(report(cases))
    if args.json:
        document = {"check": "determinism", "verdict": overall, "device": torch.cuda.get_device_name(),
                    "shape": list(SHAPE), "repeats": args.repeats, "seed": args.seed, "cases": cases}
        with open(args.json, "w") as out:
            out.write(json.dumps(document, indent=1) + "\n")
    return 0 if overall == "pass" else 1
