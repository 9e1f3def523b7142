"""Counter invariance: do Nsight Compute's counters of a dhp kernel move with the values of Q, K, V?

Method. For every compiled variant (dtype, head_dim), causal and not, and two small shapes, one child process
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

A derived counter `derived:BRA-minus-waitloop` (executed BRA minus wait-loop instructions) gives the branch
count a chance to be checked when the raw BRA count moves only with the wait loops.

ncu's raw CSV page: a header row ("ID", "Process ID", ..., "Kernel Name", ..., then one column per metric,
metric names contain "__"), a units row (empty ID), then one row per profiled launch. With
--print-metric-instances details an instanced metric's cell reads "TOTAL (NAME: VALUE; NAME: VALUE)".
Metrics ncu does not know on this GPU are dropped (after its "Failed to find metric" error) and the run is
retried; the JSON lists them.

Status: unit-tested on hand-written CSV in that format (tests/fixtures/ncu); NOT yet run under ncu on a GPU.
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
# Launch order of one case: the baseline class three times, spread out, the other classes between.
DEFAULT_ORDER = ("random", "zeros", "ones", "huge", "random", "tiny", "nan", "inf", "random")
# Shapes (batch, seqlen, heads_q, heads_kv): one aligned, one with a sequence tail and GQA.
SHAPES = ((1, 256, 2, 2), (2, 1000, 4, 2))
KERNEL_REGEX = "attention_fwd_kernel"

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
    """Whether a counter is a per-opcode count of an mbarrier wait-loop instruction."""
    match = re.match(r"^sass__inst_executed_per_opcode\w*\[(.*)\]$", counter)
    return bool(match and _WAIT_OPCODE.match(match.group(1)))


def with_derived(counters: dict) -> dict:
    """counters plus derived:BRA-minus-waitloop where per-opcode counts are present."""
    opcode_keys = [k for k in counters if re.match(r"^sass__inst_executed_per_opcode\w*\[", k)]
    if not opcode_keys:
        return dict(counters)
    metric = min(k.split("[", 1)[0] for k in opcode_keys)  # one metric only, should both be present
    keys = [k for k in opcode_keys if k.startswith(metric + "[")]
    branches = sum(counters[k] for k in keys if re.match(r"^BRA(\.|$)", k[len(metric) + 1:-1]))
    waits = sum(counters[k] for k in keys if is_waitloop(k))
    return {**counters, "derived:BRA-minus-waitloop": branches - waits}


def judge(runs: list[tuple[str, dict]], baseline: str = BASELINE) -> dict:
    """Verdict of one case from [(class, counters), ...] in launch order (see the module docstring).

    Returns {"verdict": "pass"|"fail"|"error", "reason", "checked", "timing_dependent": {counter: values
    of the baseline runs}, "waitloop": {counter: {class: values}}, "differences": [{counter, class,
    value, baseline}]}.
    """
    runs = [(cls, with_derived(counters)) for cls, counters in runs]
    base = [counters for cls, counters in runs if cls == baseline]
    result = {"verdict": "error", "reason": "", "checked": [], "timing_dependent": {}, "waitloop": {},
              "differences": []}
    if len(base) < 2:
        result["reason"] = f"need at least 2 runs of the {baseline} input for the noise baseline, got {len(base)}"
        return result
    names = sorted(set().union(*(counters for _, counters in runs)))
    for name in names:
        values = [(cls, counters.get(name)) for cls, counters in runs]
        if is_waitloop(name):
            grouped: dict = {}
            for cls, value in values:
                grouped.setdefault(cls, []).append(value)
            result["waitloop"][name] = grouped
            continue
        base_values = [counters.get(name) for counters in base]
        if any(v != base_values[0] for v in base_values):
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


def run_child(dtype: str, head_dim: int, causal: bool, shape, order, seed: int) -> int:
    """`_run-case`: run dhp.attention once per class of `order`, each on that class's inputs, synchronised."""
    import torch

    import dhp

    from . import inputs

    batch, seqlen, heads_q, heads_kv = shape
    q_shape, kv_shape = (batch, seqlen, heads_q, head_dim), (batch, seqlen, heads_kv, head_dim)
    with torch.no_grad():
        for cls in order:
            q, k, v = inputs.qkv_torch(torch, cls, q_shape, kv_shape, dtype, "cuda", seed)
            torch.cuda.synchronize()
            dhp.attention(q, k, v, causal=causal, return_lse=True)
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


def profile_case(ncu: str, metrics: list, dtype, head_dim, causal, shape, order, seed,
                 timeout: float = 600) -> tuple[list[dict], list[str], list[str]]:
    """Run one case under ncu: (rows, metrics ncu did not know and that were dropped, metrics measured)."""
    child = [sys.executable, "-m", "dhp.audit", "_run-case", "--dtype", dtype, "--head-dim", str(head_dim),
             "--shape", ",".join(map(str, shape)), "--order", ",".join(order), "--seed", str(seed)]
    if causal:
        child.append("--causal")
    dropped: list[str] = []
    metrics = list(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "ncu.csv")
        while True:
            if os.path.exists(log):
                os.remove(log)
            done = subprocess.run(ncu_command(ncu, metrics, len(order), child, log), check=False,
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


def run(args) -> int:
    """`python -m dhp.audit counters`: profile every case, judge it, print the table, write JSON."""
    import json

    from .inputs import gpu_variants

    ncu = find_ncu()
    if ncu is None:
        print("cannot run: Nsight Compute's `ncu` is not on PATH (nor in $CUDA_HOME/bin, /usr/local/cuda/bin)",
              file=sys.stderr)
        return 2
    variants = gpu_variants(args)
    if variants is None:
        return 2
    dtypes, head_dims = variants
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.quick:
        dtypes, head_dims = dtypes[:1], head_dims[:1]
    order = args.order.split(",") if args.order else list(DEFAULT_ORDER)
    metrics = [OPCODE_METRICS[0], *SCALAR_METRICS]
    cases, all_dropped = [], []
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in (False, True):
                for shape in shapes:
                    name = f"{dtype} d{head_dim} {'causal' if causal else 'full'} b{shape[0]} s{shape[1]} " \
                           f"h{shape[2]}/{shape[3]}"
                    print(f"profiling {name} ...", file=sys.stderr, flush=True)
                    try:
                        rows, dropped, metrics = profile_case(ncu, metrics, dtype, head_dim, causal, shape,
                                                              order, args.seed)
                        runs = assign_classes(rows, order)
                    except (NcuOutputError, subprocess.TimeoutExpired) as error:
                        print(f"cannot run: ncu failed on {name}: {error}", file=sys.stderr)
                        return 2
                    all_dropped += [m for m in dropped if m not in all_dropped]
                    cases.append({"name": name, "dtype": dtype, "head_dim": head_dim, "causal": causal,
                                  "shape": list(shape), "order": order,
                                  "kernels": sorted({row["kernel"] for row in rows}),
                                  "runs": [{"class": cls, "counters": counters} for cls, counters in runs],
                                  "judgement": judge(runs)})
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

