"""Counter invariance: do Nsight Compute's counters of a dhp kernel move with the values of Q, K, V?

Method. For every compiled variant (dtype, head_dim), causal and not, and the shapes in SHAPES, one child process
(`python -m dhp.audit _run-case`) runs dhp.attention once per input class (dhp.audit.inputs) in a fixed order,
under

    ncu --clock-control none --cache-control all --csv --page raw --print-units base
        --print-metric-instances details --kernel-name regex:<kernel> --launch-count <launches> --metrics <list>

so the n-th profiled launch is the n-th class of the order (checked: as many rows as launches). The order
holds the random input three times (the same tensor values each time), spread over the run: those runs are
the noise baseline. Then, per counter:

    waitloop          per-opcode counts of mbarrier wait-loop instructions (SYNCS.PHASECHK*, or the whole
                      SYNCS opcode where ncu gives opcodes without modifiers): their count follows timing by
                      design (docs/SECURITY.md); set apart, listed, never compared
    timing-dependent  any other counter that differs between the baseline runs: listed, not compared
    checked           the rest: must be identical in every class, else the case FAILs with counter, class, values

Spin loops (SPIN_LOOPS: the mbarrier try-wait, the backward's wait for its dQ turn) execute a few other opcodes
once per iteration (BRA, ISETP.NE.AND, ...). Their raw counts are set apart with the wait loops, and derived
counters `derived:<opcode>-minus-spins` (the count less one per spin iteration) are checked instead.
A counter that varies on the baseline in any case counts as timing-dependent in every case: four baseline runs per
case are too few to see every noisy counter move (seen on an H100: DRAM sectors stable over one case's baseline,
then off by 64 in another class, and varying on another case's baseline).

Second look. A case that fails is profiled once more, in the order `confirmation_order` gives: the baseline input
before, between and after two more launches of every class that differed. Its runs join the case's, and the
verdicts are recomputed. A counter that follows the values is still off in those classes and stable on the
(now nine) baseline runs, so it still fails; one that only looked off because the baseline was short (seen on an
H100: DRAM write sectors 16 against 8 in two classes of one case, then 8 and 16 on the random input too) moves on
the longer baseline and counts as timing-dependent. The JSON keeps both orders and the first verdict.

ncu's raw CSV page: a header row ("ID", "Process ID", ..., "Kernel Name", ..., then one column per metric,
metric names contain "__"), a units row (empty ID), then one row per profiled launch. With
--print-metric-instances details an instanced metric's cell reads "TOTAL (NAME: VALUE; NAME: VALUE)".
Metrics ncu does not know on this GPU are dropped (after its "Failed to find metric" error) and the run is
retried; the JSON lists them.

Only the requested metrics are judged. Every class runs in the same tensors (its values copied in before the
launch), so addresses are the same for all classes and address-dependent splits cannot pass for value effects.

Run on an H100 (ncu 2025.x): see docs/SECURITY.md for the results.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Per-opcode executed instructions; the first that this ncu knows is used (see METRIC_TIERS).
OPCODE_METRICS = ("sass__inst_executed_per_opcode_with_modifier_all", "sass__inst_executed_per_opcode")
SCALAR_METRICS = (
    "smsp__inst_executed.sum",
    "smsp__sass_inst_executed_op_branch.sum",
    "smsp__sass_branch_targets_threads_divergent.sum",
    "smsp__sass_inst_executed_op_global_ld.sum",
    "smsp__sass_inst_executed_op_global_st.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "lts__t_sectors_op_read.sum",
    "lts__t_sectors_op_write.sum",
    "dram__sectors_read.sum",
    "dram__sectors_write.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
)

BASELINE = "random"
# Totals that count every wait-loop iteration. ncu collects metrics over several replays of the kernel, and
# these come from a different replay than the per-opcode counts, with its own waits (seen on an H100: 1075
# and 1076 branches on identical inputs). Where per-opcode counts exist, they check instructions and branches
# with the wait loops set apart, and these totals are listed, not compared.
WAIT_AFFECTED = ("smsp__inst_executed.sum", "smsp__sass_inst_executed_op_branch.sum",
                 "smsp__sass_inst_executed_op_global_ld.sum")
# Launch order of one case: the baseline class three times, spread out, the other classes between.
DEFAULT_ORDER = ("random", "zeros", "ones", "random", "huge", "tiny", "random", "nan", "inf", "random")
# Shapes (batch, seqlen, heads_q, heads_kv): one aligned, the others with a sequence tail, three GQA. The forward's
# launch depends on seqlen_k (dhp_build_info's "forward_tiles" and "persistent_causal_max_seqlen_k"), the causal
# backward's on GQA (heavy first from "backward_causal_heavy_first_min_group" query heads per K/V head, in halves of
# the query heads from "backward_causal_head_halves_min_group", in pairs of key blocks from
# "backward_causal_paired_min_group") and, for MHA, on seqlen_q
# ("backward_causal_split_walks_over"), and head_dim 64's forward on seqlen_q (its split tiers, "max_seqlen_q":
# seqlen 2305, one row past twelve 192-row tiles): the shapes fall on both sides of every such limit, so each
# compiled kernel, grid and walk runs (tests check this). A fifth number is seqlen_k where it differs from seqlen_q:
# 16 queries against 4500 keys take the forward's key-split tier (four CTAs a tile, four query heads packed), a
# batch of 8 single queries of GQA 32/8 against 8200 keys its narrow tiles with four runs a CTA (every head_dim), and
# 300 queries against 8300 keys head_dim 128's long-key tier without a mask ("min_seqlen_k").
SHAPES = ((1, 256, 2, 2), (1, 2100, 4, 2), (1, 4200, 2, 2), (1, 1100, 8, 1), (1, 2305, 4, 1), (1, 16, 8, 2, 4500),
          (8, 1, 32, 8, 8200), (1, 300, 2, 1, 8300))
KERNEL_REGEX = "attention_fwd_kernel"


def parse_shapes(text: str, batch: bool = True) -> tuple[tuple[int, ...], ...]:
    """--shapes: semicolon-separated shapes as SHAPES writes them, batch,seqlen,heads_q,heads_kv[,seqlen_k]
    ("1,300,2,1,8300;1,4200,2,2"): to profile the shapes that reach a given kernel alone. Without `batch`, as the
    determinism check's SHAPES write them (it builds its own batches): seqlen,heads_q,heads_kv[,seqlen_k]. ValueError
    names the shape that is not one."""
    lead = int(batch)
    fields = ("batch," if batch else "") + "seqlen,heads_q,heads_kv[,seqlen_k]"
    shapes = []
    for item in text.split(";"):
        try:
            shape = tuple(int(n) for n in item.split(","))
        except ValueError:
            shape = ()
        if len(shape) not in (3 + lead, 4 + lead) or min(shape) < 1 or shape[1 + lead] % shape[2 + lead]:
            raise ValueError(f"{item.strip()!r} is not {fields} with "
                             "positive integers and heads_q a multiple of heads_kv")
        shapes.append(shape)
    return tuple(shapes)
BACKWARD_KERNEL_REGEX = "attention_bwd_kernel"  # the backward's main kernel (not its prep and post kernels)

_WAIT_OPCODE = re.compile(r"^SYNCS(\.PHASECHK.*)?$")
_INSTANCED = re.compile(r"^\s*([-+0-9.,eE]+)\s*\((.*)\)\s*$", re.DOTALL)


class NcuOutputError(ValueError):
    """The text holds no ncu raw CSV, or one that cannot be read."""


def _number(text: str):
    """An ncu value as int/float, or None for n/a and empty cells. Thousands separators are dropped."""
    text = text.strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:  # n/a, an empty cell, a note
        return None
    if math.isnan(value):
        return None
    return int(value) if value.is_integer() else value


def parse_cell(metric: str, cell: str) -> dict:
    """Counters of one CSV cell: {metric: total} and, for an instanced cell, {metric[NAME]: value} per instance."""
    match = _INSTANCED.match(cell)
    if not match:
        value = _number(cell)
        return {} if value is None else {metric: value}
    result = {metric: _number(match.group(1))}
    for item in match.group(2).split(";"):
        if not item.strip():
            continue
        name, sep, value = item.rpartition(":")
        if not sep or not name.strip():
            raise NcuOutputError(f"{metric}: instance {item.strip()!r} is not NAME: VALUE")
        key = f"{metric}[{name.strip()}]"
        parsed = _number(value)
        if parsed is not None:
            result[key] = result.get(key, 0) + parsed
    return result


def parse_raw_csv(text: str) -> list[dict]:
    """Rows of `ncu --csv --page raw` in launch order: {"id", "kernel", "counters": {name: value}}.

    Lines before the header (==PROF== messages, the program's own output) and after the table are skipped.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        raise NcuOutputError("no ncu raw CSV header (a line starting with \"ID\",) in the output")
    table = [line for line in lines[start:] if line.startswith('"')]
    reader = csv.reader(io.StringIO("\n".join(table)))
    header = next(reader)
    metric_columns = [i for i, name in enumerate(header) if "__" in name]
    kernel_column = header.index("Kernel Name") if "Kernel Name" in header else None
    rows = []
    for cells in reader:
        if len(cells) != len(header) or not cells[0].strip().isdigit():
            continue  # the units row, or a line that is not a launch
        counters = {}
        for i in metric_columns:
            counters.update(parse_cell(header[i], cells[i]))
        rows.append({"id": int(cells[0]), "kernel": cells[kernel_column] if kernel_column is not None else "",
                     "counters": counters})
    rows.sort(key=lambda row: row["id"])
    return rows


def is_waitloop(counter: str) -> bool:
    """Whether a counter is a per-opcode count of a spin-loop instruction (SPIN_LOOPS and what they execute)."""
    match = re.match(r"^sass__inst_executed_per_opcode\w*\[(.*)\]$", counter)
    if not match:
        return False
    opcode = match.group(1)
    return bool(_WAIT_OPCODE.match(opcode)) or any(
        opcode == loop or opcode.startswith(loop + ".") or opcode in others for loop, others in SPIN_LOOPS.items())


# Spin loops whose trip count follows timing, by the opcode executed once per iteration, with the other opcodes
# one iteration executes once each (read off the SASS). SYNCS.PHASECHK is the mbarrier try-wait
# (`SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [..]; @!P0 BRA`); LDG.E.STRONG.GPU is the backward's wait for its dQ
# turn (`LDG.E.STRONG.GPU; CCTL.IVALL; YIELD; ISETP.NE.AND; @P0 BRA`). Seen on an H100: each of these moved by
# one on identical inputs.
SPIN_LOOPS = {
    "SYNCS.PHASECHK": ("BRA",),
    "LDG.E.STRONG.GPU": ("CCTL.IVALL", "YIELD", "ISETP.NE.AND", "BRA"),
    # setmaxnreg.inc waits until the producer has given registers back:
    # `WARPSYNC.ALL; USETMAXREG.TRY_ALLOC.CTAPOOL UP0, ..; PLOP3.LUT P0, .., UP0, ..; @!P0 BRA`
    "USETMAXREG.TRY_ALLOC": ("WARPSYNC.ALL", "PLOP3.LUT", "BRA"),
}


def with_derived(counters: dict) -> dict:
    """counters plus, per opcode that spin loops execute, `derived:<opcode>-minus-spins`: its executed count less
    one per spin-loop iteration (see SPIN_LOOPS). The raw counts follow timing; the derived ones must not."""
    opcode_keys = [k for k in counters if re.match(r"^sass__inst_executed_per_opcode\w*\[", k)]
    if not opcode_keys:
        return dict(counters)
    metric = min(k.split("[", 1)[0] for k in opcode_keys)  # one metric only, should both be present
    by_opcode = {k[len(metric) + 1:-1]: counters[k] for k in opcode_keys if k.startswith(metric + "[")}
    derived = {}
    for loop_opcode, others in SPIN_LOOPS.items():
        iterations = sum(v for op, v in by_opcode.items() if op == loop_opcode or op.startswith(loop_opcode + "."))
        for op in others:
            derived[op] = derived.get(op, by_opcode.get(op, 0)) - iterations
    return {**counters, **{f"derived:{op}-minus-spins": value for op, value in derived.items()}}


def requested(name: str, metrics) -> bool:
    """Whether a counter of ncu's raw page is one of the requested metrics (or an instance of one, or derived).
    The raw page also lists what was not asked for: device attributes, launch settings, and .min/.max/.avg
    over units, whose split across units follows physical addresses, not the kernel."""
    return name.startswith("derived:") or any(name == m or name.startswith(m + "[") for m in metrics)


def judge(runs: list[tuple[str, dict]], baseline: str = BASELINE, metrics=None, timing=frozenset()) -> dict:
    """Verdict of one case from [(class, counters), ...] in launch order (see the module docstring); only the
    requested `metrics` are judged when given, and counters in `timing` (seen to vary on another case's
    baseline) count as timing-dependent.

    Returns {"verdict": "pass"|"fail"|"error", "reason", "checked", "timing_dependent": {counter: values
    of the baseline runs}, "waitloop": {counter: {class: values}}, "wait_affected": {counter: {class:
    values}}, "differences": [{counter, class, value, baseline}]}.
    """
    runs = [(cls, with_derived(counters)) for cls, counters in runs]
    base = [counters for cls, counters in runs if cls == baseline]
    result = {"verdict": "error", "reason": "", "checked": [], "timing_dependent": {}, "waitloop": {},
              "wait_affected": {}, "differences": []}
    if len(base) < 2:
        result["reason"] = f"need at least 2 runs of the {baseline} input for the noise baseline, got {len(base)}"
        return result
    names = sorted(set().union(*(counters for _, counters in runs)))
    if metrics is not None:
        names = [n for n in names if requested(n, metrics)]
    has_opcodes = any(n.startswith(OPCODE_METRICS) for n in names)
    for name in names:
        values = [(cls, counters.get(name)) for cls, counters in runs]
        if has_opcodes and name in WAIT_AFFECTED:
            result["wait_affected"][name] = {cls: [v for c, v in values if c == cls] for cls, _ in values}
            continue
        if is_waitloop(name):
            grouped: dict = {}
            for cls, value in values:
                grouped.setdefault(cls, []).append(value)
            result["waitloop"][name] = grouped
            continue
        base_values = [counters.get(name) for counters in base]
        if name in timing or any(v != base_values[0] for v in base_values):
            result["timing_dependent"][name] = base_values
            continue
        result["checked"].append(name)
        for cls, value in values:
            if value != base_values[0]:
                result["differences"].append({"counter": name, "class": cls, "value": value,
                                              "baseline": base_values[0]})
    if not result["checked"]:
        result["reason"] = "no counter is stable on the baseline runs: nothing could be compared"
    elif result["differences"]:
        result["verdict"] = "fail"
        classes = sorted({d["class"] for d in result["differences"]})
        result["reason"] = (f"{len({d['counter'] for d in result['differences']})} counters differ "
                            f"(classes {', '.join(classes)})")
    else:
        result["verdict"] = "pass"
        result["reason"] = f"{len(result['checked'])} counters identical in every class"
    return result


CONFIRM_REPEATS = 2  # launches of each differing class in a second look


def confirmation_order(differences: list[dict], baseline: str = BASELINE, repeats: int = CONFIRM_REPEATS) -> list[str]:
    """Launch order of the second look at a failing case: the baseline input first, then each class that
    differed followed by the baseline again, all of that `repeats` times."""
    classes = sorted({d["class"] for d in differences} - {baseline})
    order = [baseline]
    for _ in range(repeats):
        for cls in classes:
            order += [cls, baseline]
    return order


def assign_classes(rows: list[dict], order) -> list[tuple[str, dict]]:
    """Pair the profiled launches with the classes of the launch order; an error unless the counts agree."""
    order = list(order)
    if len(rows) != len(order):
        raise NcuOutputError(f"ncu profiled {len(rows)} launches, expected {len(order)} (one per class run)")
    return [(cls, row["counters"]) for cls, row in zip(order, rows)]


def ncu_command(ncu: str, metrics, launches: int, child: list[str], log_file: str,
                kernel_regex: str = KERNEL_REGEX) -> list[str]:
    """The ncu command line that profiles `launches` launches of the kernel in the child command."""
    return [ncu, "--clock-control", "none", "--cache-control", "all", "--csv", "--page", "raw",
            "--print-units", "base", "--print-metric-instances", "details",
            "--kernel-name", f"regex:{kernel_regex}", "--launch-count", str(launches),
            "--metrics", ",".join(metrics), "--log-file", log_file, *child]


def unknown_metrics(output: str, metrics) -> list[str]:
    """Metrics of the list that ncu's output names as unknown ("Failed to find metric ...")."""
    return [m for m in metrics
            if re.search(r"(?i)(fail|not found|invalid|unknown)[^\n]*" + re.escape(m) + r"(?![\w])", output)]


def report(cases: list[dict]) -> str:
    """The verdict table: one line per case, then each failing case's differences."""
    lines = [f"{'case':<44} {'verdict':<7} {'checked':>7} {'timing':>6} {'wait':>4}  reason"]
    for case in cases:
        j = case["judgement"]
        lines.append(f"{case['name']:<44} {j['verdict'].upper():<7} {len(j['checked']):>7} "
                     f"{len(j['timing_dependent']):>6} {len(j['waitloop']):>4}  {j['reason']}")
    for case in cases:
        j = case["judgement"]
        for d in j["differences"][:40]:
            lines.append(f"  {case['name']}: {d['counter']} [{d['class']}] = {d['value']} "
                         f"(baseline {d['baseline']})")
        if len(j["differences"]) > 40:
            lines.append(f"  {case['name']}: ... {len(j['differences']) - 40} more in the JSON")
    timing = sorted(set().union(*(c["judgement"]["timing_dependent"] for c in cases))) if cases else []
    if timing:
        lines.append("timing-dependent (varied on the repeated random input, not compared): " + ", ".join(timing))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running it (GPU): the child that launches the kernels, and the parent that runs ncu over it.


def run_child(dtype: str, head_dim: int, causal: bool, shape, order, seed: int, backward: bool = False) -> int:
    """`_run-case`: one launch per class of `order` (the forward, or with `backward` the forward and then the
    backward, whose dout is the class's q values), all in the same tensors, synchronised around each."""
    import torch

    from .. import _native
    from . import inputs

    ext = _native.ext()
    batch, seqlen, heads_q, heads_kv, *keys = shape
    q_shape, kv_shape = (batch, seqlen, heads_q, head_dim), (batch, keys[0] if keys else seqlen, heads_kv, head_dim)
    q, k, v = inputs.qkv_torch(torch, BASELINE, q_shape, kv_shape, dtype, "cuda", seed)
    out, dout, dq = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lse = torch.empty((batch, heads_q, seqlen), dtype=torch.float32, device="cuda")
    workspace = None
    if backward:
        workspace = torch.empty(max(1, ext.backward_workspace_size(q, k, causal, 0.0)), dtype=torch.uint8,
                                device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    for cls in order:
        for target, source in zip((q, k, v), inputs.qkv_torch(torch, cls, q_shape, kv_shape, dtype, "cuda", seed)):
            target.copy_(source)
        dout.copy_(q)
        torch.cuda.synchronize()
        ext.forward(q, k, v, out, lse, causal, 0.0, stream)
        if backward:
            ext.backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, causal, 0.0, stream)
        torch.cuda.synchronize()
    print(f"_run-case: {len(order)} launches ({', '.join(order)})", file=sys.stderr)
    return 0


def find_ncu() -> str | None:
    """ncu on PATH, else in the usual CUDA install places."""
    found = shutil.which("ncu")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "ncu")):
            return os.path.join(root, "bin", "ncu")
    return None


def child_command(dtype, head_dim, causal, shape, order, seed, backward: bool = False) -> list[str]:
    """The `_run-case` child process that launches one case's kernels, one launch per class of `order`."""
    child = [sys.executable, "-m", "dhp.audit", "_run-case", "--dtype", dtype, "--head-dim", str(head_dim),
             "--shape", ",".join(map(str, shape)), "--order", ",".join(order), "--seed", str(seed)]
    return child + (["--causal"] if causal else []) + (["--backward"] if backward else [])


def profile_case(ncu: str, metrics: list, dtype, head_dim, causal, shape, order, seed, backward: bool = False,
                 timeout: float = 600) -> tuple[list[dict], list[str], list[str]]:
    """Run one case under ncu: (rows, metrics ncu did not know and that were dropped, metrics measured)."""
    child = child_command(dtype, head_dim, causal, shape, order, seed, backward)
    dropped: list[str] = []
    metrics = list(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "ncu.csv")
        while True:
            if os.path.exists(log):
                os.remove(log)
            regex = BACKWARD_KERNEL_REGEX if backward else KERNEL_REGEX
            done = subprocess.run(ncu_command(ncu, metrics, len(order), child, log, regex), check=False,
                                  capture_output=True, text=True, timeout=timeout)
            text = (Path(log).read_text() if os.path.exists(log) else "") + "\n" + done.stdout
            output = text + "\n" + done.stderr
            try:
                rows = parse_raw_csv(text)
            except NcuOutputError:
                rows = None
            if done.returncode == 0 and rows:
                return rows, dropped, metrics
            unknown = [m for m in unknown_metrics(output, metrics) if m not in dropped]
            if not unknown:
                raise NcuOutputError(f"ncu exited {done.returncode} without a usable CSV:\n" + output[-3000:])
            dropped += unknown
            metrics = [m for m in metrics if m not in unknown]
            if OPCODE_METRICS[0] in unknown and OPCODE_METRICS[1] not in dropped + metrics:
                metrics.insert(0, OPCODE_METRICS[1])  # opcodes without modifiers: SYNCS set apart whole
            if not metrics:
                raise NcuOutputError("ncu knows none of the requested metrics:\n" + output[-3000:])


def plan(args) -> tuple[str, list[dict]] | None:
    """ncu and the cases of an ncu check (this one, dhp.audit.instructions): every compiled variant narrowed by
    args, forward and (where compiled) backward, full and causal (narrowed by --pass and --causal), each shape;
    None, after saying why on stderr, where it cannot run."""
    import json

    from .. import _native
    from .inputs import gpu_variants, selected_causals, selected_passes

    ncu = find_ncu()
    if ncu is None:
        print("cannot run: Nsight Compute's `ncu` is not on PATH (nor in $CUDA_HOME/bin, /usr/local/cuda/bin)",
              file=sys.stderr)
        return None
    variants = gpu_variants(args)
    if variants is None:
        return None
    dtypes, head_dims = variants
    shapes = getattr(args, "shapes", None) or SHAPES
    shapes = shapes[:1] if args.quick else shapes
    if args.quick:
        dtypes, head_dims = dtypes[:1], head_dims[:1]
    order = args.order.split(",") if args.order else list(DEFAULT_ORDER)
    backward_dims = set(json.loads(_native.ext().build_info()).get("backward_head_dims", []))
    passes = selected_passes(getattr(args, "passes", None))
    causals = selected_causals(getattr(args, "causal", None))
    cases = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for backward in (False, True) if head_dim in backward_dims else (False,):
                if ("bwd" if backward else "fwd") not in passes:
                    continue
                for causal in causals:
                    for shape in shapes:
                        name = f"{dtype} d{head_dim} {'bwd' if backward else 'fwd'} {'causal' if causal else 'full'} " \
                               f"b{shape[0]} s{'x'.join(map(str, shape[1:2] + shape[4:]))} h{shape[2]}/{shape[3]}"
                        cases.append({"name": name, "dtype": dtype, "head_dim": head_dim, "causal": causal,
                                      "pass": "backward" if backward else "forward", "shape": list(shape),
                                      "order": order})
    return ncu, cases


def run(args) -> int:
    """`python -m dhp.audit counters`: profile every case, judge it, print the table, write JSON."""
    import json

    planned = plan(args)
    if planned is None:
        return 2
    ncu, cases = planned
    metrics = [OPCODE_METRICS[0], *SCALAR_METRICS]
    all_dropped = []

    def profile(case: dict, order) -> list[tuple[str, dict]]:
        nonlocal metrics
        rows, dropped, metrics = profile_case(ncu, metrics, case["dtype"], case["head_dim"], case["causal"],
                                              case["shape"], order, args.seed, case["pass"] == "backward")
        all_dropped.extend(m for m in dropped if m not in all_dropped)
        case["kernels"] = sorted(set(case.get("kernels", [])) | {row["kernel"] for row in rows})
        return assign_classes(rows, order)

    def judge_all():
        noisy = frozenset().union(*(c["judgement"]["timing_dependent"] for c in cases))
        for c in cases:
            c["judgement"] = judge([(r["class"], r["counters"]) for r in c["runs"]], metrics=metrics, timing=noisy)

    def add_runs(case: dict, runs) -> None:
        case["runs"] += [{"class": cls, "counters": {k: v for k, v in counters.items() if requested(k, metrics)}}
                         for cls, counters in runs]
        case["judgement"] = judge([(r["class"], r["counters"]) for r in case["runs"]], metrics=metrics)

    for case in cases:
        case["runs"] = []
        print(f"profiling {case['name']} ...", file=sys.stderr, flush=True)
        try:
            add_runs(case, profile(case, case["order"]))
        except (NcuOutputError, subprocess.TimeoutExpired) as error:
            print(f"cannot run: ncu failed on {case['name']}: {error}", file=sys.stderr)
            return 2
    judge_all()
    for case in [c for c in cases if c["judgement"]["verdict"] == "fail"]:
        second = confirmation_order(case["judgement"]["differences"])
        print(f"second look at {case['name']} ({case['judgement']['reason']}) ...", file=sys.stderr, flush=True)
        try:
            runs = profile(case, second)
        except (NcuOutputError, subprocess.TimeoutExpired) as error:
            print(f"cannot run: ncu failed on {case['name']}: {error}", file=sys.stderr)
            return 2
        case["second_look"] = {"order": second, "first_verdict": case["judgement"]["reason"]}
        add_runs(case, runs)
    judge_all()
    verdicts = {c["judgement"]["verdict"] for c in cases}
    verdict = "fail" if "fail" in verdicts else "error" if "error" in verdicts else "pass"
    print(f"counter invariance ({len(cases)} cases, ncu {ncu}): {verdict.upper()}")
    if all_dropped:
        print("metrics this ncu does not know (not measured): " + ", ".join(all_dropped))
    print(report(cases))
    if args.json:
        document = {"check": "counters", "verdict": verdict, "ncu": ncu, "metrics": metrics,
                    "unknown_metrics": all_dropped, "cases": cases}
        with open(args.json, "w") as out:
            out.write(json.dumps(document, indent=1) + "\n")
    return {"pass": 0, "fail": 1}.get(verdict, 2)

