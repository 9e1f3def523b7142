"""Per-instruction counter invariance: Nsight Compute's SASS source page, instruction by instruction.

Why. The counters check (dhp.audit.counters) compares totals: instructions per opcode, branches, sectors. A
kernel whose spin loops run as long as timing makes them has totals that move on identical input, so some totals
(plain BRA, YIELD) cannot be compared at all, and a value-dependent path could hide in them. Here each SASS
instruction's own counts are compared, and only the instructions whose counts follow timing *by construction*
are set apart, found statically in the same SASS (dhp.audit.sass): the spin loops (mbarrier retries, the
setmaxnreg retry, the dQ turn poll) with the jump that leaves each, and, of an inline first try that branches
into a spin loop, how often that branch is taken. Every other instruction must execute the same number of times,
by the same threads, with the same memory traffic, in every input class.

Method. For every compiled variant, causal and not, and the counters check's shapes and launch order, one child
process (`python -m dhp.audit _run-case`) launches the kernel once per input class, under

    ncu --clock-control none --cache-control all --section SourceCounters --kernel-name regex:<kernel>
        --launch-count <launches> --export <report>

and `ncu --import <report> --page source --csv --print-source sass` prints, per profiled launch, a line
`"Kernel Name","<name>"`, a header line starting with `"Address"`, and one row per SASS instruction: its
address, its SASS text, and its counters (COMPARED_COLUMNS among them). Where the import prints fewer tables
than launches, each launch is imported on its own (`--launch-skip i --launch-count 1`).

Per case: addresses become offsets from the kernel's first instruction (branch targets in the SASS text too),
the spin loops are found in that SASS, and then per (instruction, column):

    spin              inside a spin loop, or the taken count of a first try: set apart, never compared
    unexplained       varies between the runs of the baseline (random) input although it is not a spin site:
                      the static model of what follows timing is wrong there; the case fails
    checked           identical on the baseline runs: must be identical in every class, else the case fails

"Predicated-On Thread Instructions Executed" counts the threads whose guard was true. For a branch that is how
often it was taken, and for a memory instruction which threads accessed memory: both are compared. For other
instructions a guard is a select (the same issue slots whatever it holds), so their differences are listed as
notes and do not fail the case; the SASS taint check says which guards may depend on values.

Written from the source page of one profiled launch (tests/fixtures/ncu/source_fwd_d64.csv.gz, an H100, ncu
2025.x). On its first GPU run (H200, 2026-11-25) ncu printed every launch's table twice in a row, identical:
one_table_per_launch keeps one of each such pair and refuses any other mismatch.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import counters
from .disasm import BRANCH_OPCODES, Instruction, parse_instruction
from .sass import first_try_branches, spin_loops

# Per-instruction counters compared between input classes, where this ncu prints them.
COUNT_COLUMNS = ("Instructions Executed", "Thread Instructions Executed", "Divergent Branches")
MEMORY_COLUMNS = (
    "L1 Tag Requests Global",
    "L1 Wavefronts Shared",
    "L1 Wavefronts Shared Ideal",
    "L1 Wavefronts Shared Excessive",
    "L2 Theoretical Sectors Global",
    "L2 Theoretical Sectors Global Ideal",
    "L2 Theoretical Sectors Global Excessive",
)
PREDICATED_ON = "Predicated-On Thread Instructions Executed"
COMPARED_COLUMNS = COUNT_COLUMNS + MEMORY_COLUMNS + (PREDICATED_ON,)
ADDRESS_SPACE = "Address Space"  # "-" for an instruction that does not access memory

_HEX = re.compile(r"0x[0-9a-fA-F]+")


class SourcePageError(ValueError):
    """The text holds no ncu source page, or one that cannot be read."""


def cell_value(cell: str):
    """A counter cell as int/float; None for "-", "n/a" and empty cells. Thousands separators are dropped."""
    text = cell.strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


def source_tables(text: str) -> list[dict]:
    """The per-launch tables of `ncu --page source --csv --print-source sass` output, in order: {"kernel", "rows"},
    each row {column: cell} as printed. Lines that are not part of a table (==PROF== messages, the program's output)
    are skipped, and so are launches without rows."""
    launches: list[dict] = []
    header: list[str] | None = None
    for cells in csv.reader(io.StringIO(text)):
        if not cells:
            continue
        if cells[0] == "Kernel Name":
            launches.append({"kernel": cells[1] if len(cells) > 1 else "", "rows": []})
            header = None
        elif cells[0] == "Address":
            header = cells
        elif header is not None and launches and cells[0].startswith("0x") and len(cells) >= len(header):
            launches[-1]["rows"].append(dict(zip(header, cells)))
    return [launch for launch in launches if launch["rows"]]


def parse_source_page(text: str) -> list[dict]:
    """The launches of `ncu --page source --csv --print-source sass` output, in order: {"kernel", "rows"}, each
    row {"offset": address - the kernel's first address, "sass": text with branch targets as offsets,
    "memory": whether it accesses memory, "counts": {column: value}}."""
    launches = [{"kernel": table["kernel"], "rows": [{
        "address": int(named["Address"], 16), "sass": named.get("Source", "").strip(),
        "memory": named.get(ADDRESS_SPACE, "-").strip() not in ("-", ""),
        "counts": {c: cell_value(named[c]) for c in COMPARED_COLUMNS if c in named}} for named in table["rows"]]}
        for table in source_tables(text)]
    if not launches:
        raise SourcePageError("no ncu source page (a \"Kernel Name\" line, an \"Address\" header and rows)")
    for launch in launches:
        base = min(row["address"] for row in launch["rows"])
        end = max(row["address"] for row in launch["rows"])
        for row in launch["rows"]:
            row["offset"] = row.pop("address") - base
            row["sass"] = _HEX.sub(lambda m: _rebase(m.group(0), base, end), row["sass"])
    return launches


def _rebase(literal: str, base: int, end: int) -> str:
    """A code address inside the kernel as its offset (cuobjdump's form), any other literal unchanged."""
    value = int(literal, 16)
    return f"0x{value - base:x}" if base <= value <= end + 16 else literal


def instructions_of(launch: dict) -> list[Instruction]:
    return [parse_instruction(row["offset"], row["sass"]) for row in launch["rows"]]


def spin_sites(instructions: list[Instruction]) -> tuple[set[int], set[int]]:
    """(offsets whose every count follows timing: the spin loops and their exit jumps, offsets of the first-try
    branches into them, whose taken count follows timing)."""
    loops = spin_loops(instructions)
    inside = set().union(*(loop.addresses(instructions) for loop in loops)) if loops else set()
    return inside, first_try_branches(instructions, loops)


def judge(runs: list[tuple[str, dict]], baseline: str = counters.BASELINE) -> dict:
    """Verdict of one case from [(class, launch), ...] in launch order (launch as parse_source_page gives it).

    Returns {"verdict": "pass"|"fail"|"error", "reason", "instructions", "spin_loop_instructions",
    "first_try_branches", "checked" (number of (instruction, column) pairs compared), "unexplained",
    "differences", "notes"}; the last three are lists of {offset, sass, column, class, value, baseline}
    ("unexplained" lists the baseline values instead of class and value).
    """
    result = {"verdict": "error", "reason": "", "instructions": 0, "spin_loop_instructions": 0,
              "first_try_branches": 0, "checked": 0, "unexplained": [], "differences": [], "notes": []}
    base_runs = [launch for cls, launch in runs if cls == baseline]
    if len(base_runs) < 2:
        result["reason"] = f"need at least 2 runs of the {baseline} input for the noise baseline, got {len(base_runs)}"
        return result
    layout = [(row["offset"], row["sass"]) for row in base_runs[0]["rows"]]
    for cls, launch in runs:
        if [(row["offset"], row["sass"]) for row in launch["rows"]] != layout:
            result["reason"] = f"the {cls} launch profiled other code than the first {baseline} launch"
            return result
    instructions = instructions_of(base_runs[0])
    spins, first_tries = spin_sites(instructions)
    result.update(instructions=len(instructions), spin_loop_instructions=len(spins),
                  first_try_branches=len(first_tries))
    for i, ins in enumerate(instructions):
        if ins.address in spins:
            continue
        row0 = base_runs[0]["rows"][i]
        for column in row0["counts"]:
            predicated = column == PREDICATED_ON
            if predicated and ins.address in first_tries:
                continue
            compared = not predicated or ins.root in BRANCH_OPCODES or row0["memory"]
            base_values = [launch["rows"][i]["counts"][column] for launch in base_runs]
            where = {"offset": f"0x{ins.address:04x}", "sass": ins.text, "column": column}
            if any(v != base_values[0] for v in base_values):
                (result["unexplained"] if compared else result["notes"]).append({**where, "baseline": base_values})
                continue
            result["checked"] += compared
            for cls, launch in runs:
                value = launch["rows"][i]["counts"][column]
                if value != base_values[0]:
                    (result["differences"] if compared else result["notes"]).append(
                        {**where, "class": cls, "value": value, "baseline": base_values[0]})
    if result["differences"]:
        result["verdict"] = "fail"
        classes = sorted({d["class"] for d in result["differences"]})
        result["reason"] = (f"{len({d['offset'] for d in result['differences']})} instructions count differently "
                            f"(classes {', '.join(classes)})")
    elif result["unexplained"]:
        result["verdict"] = "fail"
        result["reason"] = (f"{len({d['offset'] for d in result['unexplained']})} instructions outside the spin "
                            "loops vary on identical input")
    elif not result["checked"]:
        result["reason"] = "no per-instruction counter to compare in the source page"
    else:
        result["verdict"] = "pass"
        result["reason"] = (f"{result['checked']} counts of {result['instructions'] - result['spin_loop_instructions']}"
                            " instructions identical in every class")
    return result


def report(cases: list[dict]) -> str:
    """The verdict table: one line per case, then each failing case's first differences."""
    lines = [f"{'case':<44} {'verdict':<7} {'instr':>6} {'spin':>5} {'checked':>8}  reason"]
    for case in cases:
        j = case["judgement"]
        lines.append(f"{case['name']:<44} {j['verdict'].upper():<7} {j['instructions']:>6} "
                     f"{j['spin_loop_instructions']:>5} {j['checked']:>8}  {j['reason']}")
    for case in cases:
        j = case["judgement"]
        listed = j["differences"] + j["unexplained"]
        for d in listed[:30]:
            what = f"[{d['class']}] = {d['value']}" if "class" in d else "varies on the baseline"
            lines.append(f"  {case['name']}: {d['offset']} {d['sass']}: {d['column']} {what} (baseline {d['baseline']})")
        if len(listed) > 30:
            lines.append(f"  {case['name']}: ... {len(listed) - 30} more in the JSON")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running it (GPU): ncu over the counters check's child process, then the source page of each launch.


def profile_command(ncu: str, launches: int, child: list[str], report_file: str, kernel_regex: str) -> list[str]:
    return [ncu, "--clock-control", "none", "--cache-control", "all", "--section", "SourceCounters",
            "--kernel-name", f"regex:{kernel_regex}", "--launch-count", str(launches),
            "--export", report_file, "--force-overwrite", *child]


def import_command(ncu: str, report_file: str, launch: int | None = None) -> list[str]:
    only = [] if launch is None else ["--launch-skip", str(launch), "--launch-count", "1"]
    return [ncu, "--import", report_file, *only, "--page", "source", "--csv", "--print-source", "sass"]


def profile_case(ncu: str, case: dict, order, seed: int, timeout: float = 900) -> list[dict]:
    """The launches of one case, one per class of `order`, as parse_source_page gives them."""
    child = counters.child_command(case["dtype"], case["head_dim"], case["causal"], case["shape"], order, seed,
                                   case["pass"] == "backward")
    regex = counters.BACKWARD_KERNEL_REGEX if case["pass"] == "backward" else counters.KERNEL_REGEX
    with tempfile.TemporaryDirectory() as tmp:
        report_file = os.path.join(tmp, "source.ncu-rep")
        done = subprocess.run(profile_command(ncu, len(order), child, report_file, regex), check=False,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not os.path.exists(report_file):
            raise SourcePageError(f"ncu exited {done.returncode}:\n" + (done.stdout + done.stderr)[-3000:])

        def source_page(launch: int | None) -> list[dict]:
            out = subprocess.run(import_command(ncu, report_file, launch), check=False, capture_output=True,
                                 text=True, timeout=timeout)
            if out.returncode != 0:
                raise SourcePageError(f"ncu --import exited {out.returncode}:\n" + (out.stdout + out.stderr)[-3000:])
            return parse_source_page(out.stdout)

        launches = one_table_per_launch(source_page(None), len(order))
        if launches is None:
            launches = [page for i in range(len(order)) for page in one_table_per_launch(source_page(i), 1) or []]
        if len(launches) != len(order):
            raise SourcePageError(f"ncu's report holds {len(launches)} launches, expected {len(order)}")
        return launches


def one_table_per_launch(tables: list[dict], launches: int) -> list[dict] | None:
    """The source page's tables as one per launch, or None where they cannot be matched to the launches.
    ncu 2025.x (H200, driver 580) prints each launch's table twice in a row, identical cell for cell (measured
    2026-11-25: 3 launches, 6 tables, tables 2i and 2i+1 equal, launches unequal in their stall samples)."""
    if len(tables) == launches:
        return tables
    if len(tables) == 2 * launches and all(tables[2 * i] == tables[2 * i + 1] for i in range(launches)):
        return tables[::2]
    return None


def run(args) -> int:
    """`python -m dhp.audit instructions`: profile every case, judge it, print the table, write JSON."""
    planned = counters.plan(args)
    if planned is None:
        return 2
    ncu, cases = planned
    for case in cases:
        print(f"profiling {case['name']} ...", file=sys.stderr, flush=True)
        try:
            launches = profile_case(ncu, case, case["order"], args.seed)
        except (SourcePageError, subprocess.TimeoutExpired) as error:
            print(f"cannot run: ncu failed on {case['name']}: {error}", file=sys.stderr)
            return 2
        case["kernel"] = launches[0]["kernel"]
        case["judgement"] = judge(list(zip(case["order"], launches)))
    verdicts = {c["judgement"]["verdict"] for c in cases}
    verdict = "fail" if "fail" in verdicts else "error" if "error" in verdicts else "pass"
    print(f"per-instruction counter invariance ({len(cases)} cases, ncu {ncu}): {verdict.upper()}")
    print(report(cases))
    if args.json:
        import json

        document = {"check": "instructions", "verdict": verdict, "ncu": ncu, "columns": list(COMPARED_COLUMNS),
                    "cases": cases}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    return {"pass": 0, "fail": 1}.get(verdict, 2)
