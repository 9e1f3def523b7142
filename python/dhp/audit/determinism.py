"""Determinism and batch invariance: same inputs give the same bits, whatever else runs or sits in the batch.

Method. For every compiled variant, causal and not, on nine shapes with sequence tails and GQA (SHAPES: the
forward's tiles and grid and the backward's dQ chains depend on shapes; the shapes run each of them), and for
both passes (fwd: the forward's out and lse; bwd, for the head_dims build_info lists under "backward_head_dims": the
backward's dq, dk and dv), the reference is the sha256 of the raw bytes of each output from one call on the
current stream. Then, each compared bitwise (by hash) with the reference:

    repeat      `--repeats` more calls on the current stream
    streams     one call on each of two new torch streams, enqueued together so that they may overlap
    load        `--repeats` calls on a new stream while another stream runs a loop of large matmuls
    batch       the target sequence alone (batch 1) against the same sequence inside batches of 3 and 8,
                at the first, a middle and the last position, with different neighbours: random ones, and
                neighbours of the classes zeros, huge, nan and inf (dhp.audit.inputs). The API has one seqlen
                per batch, so all sequences of a batch share it.

Both passes call the extension (dhp._C's forward and backward, the C API) on an explicit stream. Every call
writes into fresh outputs filled with a poison that differs from the reference's (NaN there, 1, 2, ... after),
so an element a kernel leaves unwritten shows as a difference; the backward's workspace is refilled with a
different byte each call (the C API says its contents need not be initialised).

The backward's inputs per sequence: q, k, v and dout (an independent draw of the sequence's class, see
dhp.audit.inputs), and out and lse from the forward of that sequence alone (batch 1), computed once. A batch
of the backward concatenates these, so the target's inputs are the same bits in every batch and only the
backward is under test (the forward's batch invariance is the fwd case's). dk and dv of a sequence depend on
that sequence only (GQA sums query heads within a batch element), so the target's slices are compared.

`--shapes` checks other sequences instead of SHAPES (seqlen,heads_q,heads_kv[,seqlen_k]), e.g. ones whose batches of
3 and 8 take another grid than the sequence alone (the causal persistent grid's orders and static schedule depend on
the launch's tiles), and `--causal` one mask alone.

Each comparison is one check; the verdict is pass when every check's hashes equal the reference's.
The hashing, poison, batching and verdict logic are unit-tested on the CPU; results of GPU runs are in
docs/audit/.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys

# (seqlen, heads_q, heads_kv): tails and GQA. The forward's launch depends on seqlen_k (dhp_build_info's
# "forward_tiles" and "persistent_causal_max_seqlen_k"), and the backward's dQ summation (one chain or two) on
# seqlen_k and heads (its "backward_two_dq_chains_min_seqlen_k" and "_max_seqlen_k", MHA only; the head_dims of
# "backward_paired_key_blocks_head_dims" add in pairs of key blocks without a causal mask, GQA at every length and MHA
# above "backward_unpaired_max_seqlen_k" (0 at 128 and 256: always), and under one from
# "backward_causal_paired_min_group" query heads per K/V head): the shapes fall on both sides of every such limit, with MHA shapes on both sides of the
# backward's and between them (pairs with two chains), and pairs with an odd number of key blocks; MHA on both
# sides of the causal backward's "backward_causal_split_walks_over"; and GQA on both sides of its
# "backward_causal_heavy_first_min_group" and "backward_causal_head_halves_min_group". A fourth number is seqlen_k
# where it differs from seqlen_q: 16 queries against 4500 keys take the forward's key-split tier, and one query of GQA
# 32/8 against 8200 keys its narrow tiles, whose CTAs take one run of a tile alone, two in the batches of 3 and four in
# those of 8 ("key_split_max_runs", every head_dim).
SHAPES = ((500, 2, 2), (1000, 2, 2), (2100, 2, 2), (2100, 4, 2), (4200, 4, 1), (8300, 1, 1), (1100, 8, 1),
          (16, 8, 2, 4500), (1, 32, 8, 8200))
POOL = 8  # distinct random sequences to build batches from; the target is sequence 0
SPECIAL_NEIGHBOURS = ("zeros", "huge", "nan", "inf")  # classes of the batches' special neighbours
OUTPUTS = {"fwd": ("out", "lse"), "bwd": ("dq", "dk", "dv")}  # what each pass's checks hash


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
    """One check: reference and got are {output: hash} ({"out", "lse"} or {"dq", "dk", "dv"}); equal when every
    hash agrees."""
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


def poison(call: int) -> float:
    """Fill value of the outputs of a case's call-th launch: NaN for the reference (call 0), then 1, 2, ... 64
    (exact in bfloat16 and float16), so an element some launch leaves unwritten differs from the reference."""
    return math.nan if call == 0 else float(1 + (call - 1) % 64)


def workspace_byte(call: int) -> int:
    """The byte the backward's workspace is filled with before the call-th launch: a different one each call."""
    return (37 * call + 11) % 256


def batch_inputs(sequences: dict, layout: list, cat) -> dict:
    """{tensor name: cat([the layout's sequences' tensors])}: one batch from per-sequence tensors (batch 1 each,
    batch first: q, k, v, dout, out (b, s, h, d), lse (b, h, s)). `cat` joins along the batch dimension."""
    names = sequences[layout[0]].keys()
    return {name: cat([sequences[entry][name] for entry in layout]) for name in names}


# ----------------------------------------------------------------------------------------------------------
# The GPU part


def sequence_inputs(torch, ext, direction: str, dtype: str, head_dim: int, causal: bool, shape: tuple,
                    seed: int) -> dict:
    """{pool index or class name: {tensor name: tensor}} of single sequences (batch 1): the target (0), the
    random neighbours (1 .. POOL-1) and one sequence per special neighbour class; for the backward with dout,
    and out and lse from each sequence's own forward."""
    from . import inputs

    seqlen, heads_q, heads_kv, *keys = shape
    q_shape, kv_shape = (1, seqlen, heads_q, head_dim), (1, keys[0] if keys else seqlen, heads_kv, head_dim)
    draws = {i: ("random", i) for i in range(POOL)}
    draws.update({name: (name, 0) for name in SPECIAL_NEIGHBOURS})
    sequences = {}
    for key, (cls, index) in draws.items():
        q, k, v = inputs.qkv_torch(torch, cls, q_shape, kv_shape, dtype, "cuda", seed, index)
        tensors = {"q": q, "k": k, "v": v}
        if direction == "bwd":
            tensors["dout"] = inputs.dout_torch(torch, cls, q_shape, dtype, "cuda", seed, index)
            tensors.update(launch(torch, ext, "fwd", causal, tensors, 0))
        sequences[key] = tensors
    torch.cuda.synchronize()
    return sequences


def launch(torch, ext, direction: str, causal: bool, tensors: dict, call: int) -> dict:
    """One forward ({"out", "lse"}) or backward ({"dq", "dk", "dv"}) on torch's current stream, into fresh outputs
    poisoned for the call-th launch (see `poison`)."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    stream = torch.cuda.current_stream().cuda_stream
    fill = poison(call)
    if direction == "fwd":
        batch, seqlen, heads_q, _ = q.shape
        out = torch.full_like(q, fill)
        lse = torch.full((batch, heads_q, seqlen), fill, dtype=torch.float32, device=q.device)
        ext.forward(q, k, v, out, lse, causal, 0.0, stream)
        return {"out": out, "lse": lse}
    dq, dk, dv = torch.full_like(q, fill), torch.full_like(k, fill), torch.full_like(v, fill)
    size = ext.backward_workspace_size(q, k, causal, 0.0)
    workspace = (torch.full((size,), workspace_byte(call), dtype=torch.uint8, device=q.device) if size else None)
    ext.backward(q, k, v, tensors["out"], tensors["dout"], tensors["lse"], dq, dk, dv, workspace, causal, 0.0,
                 stream)
    return {"dq": dq, "dk": dk, "dv": dv}


def run_case(torch, ext, direction: str, dtype: str, head_dim: int, causal: bool, repeats: int,
             seed: int, shapes: tuple = SHAPES) -> list[dict]:
    """Every check of one case (one pass of one variant), per shape, against that shape's reference call; see
    the module docstring. Labels start with the shape's seqlen."""
    return [{**check, "label": f"s{shape[0]} {check['label']}"}
            for shape in shapes
            for check in run_shape(torch, ext, direction, dtype, head_dim, causal, shape, repeats, seed)]


def run_shape(torch, ext, direction: str, dtype: str, head_dim: int, causal: bool, shape: tuple, repeats: int,
              seed: int) -> list[dict]:
    """The checks of one case on one shape."""
    sequences = sequence_inputs(torch, ext, direction, dtype, head_dim, causal, shape, seed)
    target = sequences[0]
    calls = itertools.count()

    def call(tensors):
        return launch(torch, ext, direction, causal, tensors, next(calls))

    def hashes(outputs, position=None):
        torch.cuda.synchronize()
        return {name: tensor_digest(t if position is None else t[position]) for name, t in outputs.items()}

    torch.cuda.synchronize()
    reference = hashes(call(target))
    checks = [compare("repeat", f"run {i + 1}", reference, hashes(call(target))) for i in range(repeats)]

    streams = [torch.cuda.Stream() for _ in range(2)]
    results = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for stream in streams:  # both enqueued before either is waited for: they may run at the same time
        with torch.cuda.stream(stream):
            results.append(call(target))
    checks += [compare("streams", f"stream {i + 1}", reference, hashes(r)) for i, r in enumerate(results)]

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
            results.append(call(target))
    torch.cuda.synchronize()
    checks += [compare("load", f"run {i + 1} beside matmuls", reference, hashes(r)) for i, r in enumerate(results)]

    for label, layout in batch_layouts():
        outputs = call(batch_inputs(sequences, layout, torch.cat))
        checks.append(compare("batch", label, reference, hashes(outputs, layout.index(0))))
    return checks


def run(args) -> int:
    """`python -m dhp.audit determinism`: every variant and pass, causal and not; table, JSON, exit 0/1/2."""
    from .. import _native
    from .inputs import (
        PASS_NAMES,
        backward_head_dims,
        gpu_variants,
        plan,
        selected_causals,
        selected_passes,
    )

    variants = gpu_variants(args)
    if variants is None:
        return 2
    import torch

    ext = _native.ext()
    planned = plan(*variants, backward_head_dims(), selected_passes(getattr(args, "passes", None)),
                   selected_causals(getattr(args, "causal", None)))
    shapes = getattr(args, "shapes", None) or SHAPES
    if not planned:
        print("cannot run: no case to check (this build has no backward for the selected head_dims)",
              file=sys.stderr)
        return 2
    cases = []
    with torch.no_grad():
        for case in planned:
            print(f"determinism {case['name']} ...", file=sys.stderr, flush=True)
            checks = run_case(torch, ext, case["pass"], case["dtype"], case["head_dim"], case["causal"],
                              args.repeats, args.seed, shapes)
            cases.append({**case, "pass": PASS_NAMES[case["pass"]], "outputs": list(OUTPUTS[case["pass"]]),
                          "verdict": verdict(checks), "checks": checks})
            torch.cuda.empty_cache()
    overall = "pass" if cases and all(c["verdict"] == "pass" for c in cases) else "fail"
    print(f"determinism and batch invariance ({len(cases)} cases, {torch.cuda.get_device_name()}): "
          f"{overall.upper()}")
    print(report(cases))
    if args.json:
        document = {"check": "determinism", "verdict": overall, "device": torch.cuda.get_device_name(),
                    "shapes": [list(shape) for shape in shapes], "repeats": args.repeats, "seed": args.seed, "cases": cases}
        with open(args.json, "w") as out:
            out.write(json.dumps(document, indent=1) + "\n")
    return 0 if overall == "pass" else 1
