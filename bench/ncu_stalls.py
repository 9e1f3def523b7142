"""Where a kernel's warps wait, from Nsight Compute's source page: stall samples and executed instructions by
opcode, one column group per kernel, so that two kernels can be read side by side (dhp beside FlashAttention-3 in
docs/performance.md, "Beside FlashAttention-3").

    ncu --section SourceCounters --section WarpStateStats -o report <program>
    ncu -i report.ncu-rep --page source --csv --print-source sass > page.csv
    python bench/ncu_stalls.py page.csv [other.csv.gz ...] [--kernel REGEX] [--by root|opcode] [--top 25]

Every launch on the pages (a "Kernel Name" line, an "Address" header, then one row per instruction) becomes one
column group, in order; --kernel keeps the launches whose kernel name matches. The first table gives each stall
reason's share of the launch's samples (all samples: a sample names the reason its warp was not issuing, or
"selected" when it was); the second, per opcode (its root, HGMMA, or with --by opcode its full name), the
instructions executed (millions, warp level) and the share of samples, with the two largest reasons. With --loop, a
third table splits each launch's key-block loop (the instructions executed as often as most of the kernel's, within
10%) into the stretches an attention forward's loop is made of, at their first instruction: the GEMM turn and issue
(from a BAR.SYNC), the QK^T wait and the maximum (from `WARPGROUP.DEPBAR.LE gsb0, 0x1`), the exponentials (from the
next MUFU), and what follows the P V wait (`WARPGROUP.DEPBAR.LE gsb0, 0x0`); each with its instructions and its
samples per thousand passes of the loop, so kernels of different lengths compare block for block.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from collections import Counter

from dhp.audit.disasm import parse_instruction
from dhp.audit.instructions import cell_value, source_tables

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
_STALL = re.compile(r"^stall_(\w+)$")  # the all-samples reasons; "(Not Issued)" columns are left out


def read_launches(text: str) -> list[dict]:
    """[{"kernel", "rows": [{"sass", "samples", "executed", "stalls": {reason: samples}}]}] in page order."""
    def number(named: dict, column: str) -> int:
        return int(cell_value(named.get(column, "")) or 0)

    return [{"kernel": table["kernel"], "rows": [{
        "sass": named.get("Source", "").strip(), "samples": number(named, SAMPLES),
        "executed": number(named, EXECUTED),
        "stalls": {m.group(1): number(named, name) for name in named if (m := _STALL.match(name))}}
        for named in table["rows"]]} for table in source_tables(text)]


def read_pages(paths) -> list[dict]:
    launches = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt") as f:
            launches += read_launches(f.read())
    return launches


def summarize(launch: dict, by: str = "root") -> dict:
    """{"kernel", "samples", "executed", "reasons": Counter, "ops": {opcode: {"executed", "samples", "reasons"}}}."""
    reasons: Counter = Counter()
    ops: dict[str, dict] = {}
    for row in launch["rows"]:
        instruction = parse_instruction(0, row["sass"])
        key = instruction.root if by == "root" else instruction.opcode
        op = ops.setdefault(key, {"executed": 0, "samples": 0, "reasons": Counter()})
        op["executed"] += row["executed"]
        op["samples"] += row["samples"]
        op["reasons"].update(row["stalls"])
        reasons.update(row["stalls"])
    return {"kernel": launch["kernel"], "samples": sum(op["samples"] for op in ops.values()),
            "executed": sum(op["executed"] for op in ops.values()), "reasons": reasons, "ops": ops}


LOOP_REGIONS = ("before the turn", "turn and GEMM issue", "QK^T wait, maximum", "exponentials", "after the P V wait")


def loop_regions(launch: dict) -> dict:
    """{"passes": the loop's executed count, "regions": {name: {"instructions", "samples"}}} of the launch's hot loop:
    the rows executed within 10% of the count that the most executed instructions share (weighted by instructions)."""
    counts = Counter(row["executed"] for row in launch["rows"] if row["executed"])
    passes = max(counts, key=lambda n: n * counts[n]) if counts else 0
    regions = {name: {"instructions": 0, "samples": 0} for name in LOOP_REGIONS}
    region = LOOP_REGIONS[0]
    for row in launch["rows"]:
        if not passes or not 0.9 * passes <= row["executed"] <= 1.1 * passes:
            continue
        root = parse_instruction(0, row["sass"]).root
        if root == "BAR" and "BAR.SYNC" in row["sass"]:
            region = LOOP_REGIONS[1]
        elif "DEPBAR.LE gsb0, 0x1" in row["sass"]:
            region = LOOP_REGIONS[2]
        elif root == "MUFU" and region == LOOP_REGIONS[2]:
            region = LOOP_REGIONS[3]
        elif "DEPBAR.LE gsb0, 0x0" in row["sass"]:
            region = LOOP_REGIONS[4]
        regions[region]["instructions"] += 1
        regions[region]["samples"] += row["samples"]
    return {"passes": passes, "regions": regions}


def format_loop_table(launches: list[dict]) -> list[str]:
    loops = [loop_regions(launch) for launch in launches]
    lines = ["", f"{'key-block loop':<28}" + "".join(f"{f'[{i}] instructions, samples / 1k passes':>40}"
                                                     for i in range(len(loops)))]
    for name in LOOP_REGIONS + ("whole loop",):
        cells = []
        for loop in loops:
            parts = loop["regions"].values() if name == "whole loop" else [loop["regions"][name]]
            n, samples = sum(p["instructions"] for p in parts), sum(p["samples"] for p in parts)
            per_k = 1000.0 * samples / loop["passes"] if loop["passes"] else 0.0
            cells.append(f"{n:>20} {per_k:>19.1f}")
        lines.append(f"{name:<28}" + "".join(cells))
    return lines


def short_name(kernel: str, width: int = 24) -> str:
    """The kernel's function name without namespaces and template arguments, cut to width."""
    name = kernel.split("(")[0].split("<")[0].split("::")[-1].removeprefix("void ").strip()
    return name[:width]


def _share(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def format_tables(summaries: list[dict], top: int = 25) -> list[str]:
    names = [short_name(s["kernel"]) for s in summaries]
    lines = [f"[{i}] {s['kernel'][:150]}: {s['samples']} samples, {s['executed'] / 1e6:.1f}M instructions"
             for i, s in enumerate(summaries)]
    reasons = sorted({r for s in summaries for r in s["reasons"]},
                     key=lambda r: -max(_share(s["reasons"][r], s["samples"]) for s in summaries))
    lines += ["", f"{'stall reason, % of samples':<28}" + "".join(f"{f'[{i}] ' + n:>28}" for i, n in enumerate(names))]
    for reason in reasons:
        shares = [_share(s["reasons"][reason], s["samples"]) for s in summaries]
        if max(shares) >= 0.1:
            lines.append(f"{reason:<28}" + "".join(f"{v:>28.1f}" for v in shares))
    ops = sorted({k for s in summaries for k in s["ops"]},
                 key=lambda k: -max(_share(s["ops"].get(k, {}).get("samples", 0), s["samples"]) for s in summaries))
    lines += ["", f"{'opcode':<28}" + "".join(f"{f'[{i}] M inst, % samples, top reasons':>44}"
                                              for i in range(len(summaries)))]
    for key in ops[:top]:
        cells = []
        for s in summaries:
            op = s["ops"].get(key)
            if op is None:
                cells.append(f"{'-':>44}")
                continue
            first = ", ".join(f"{r} {_share(n, s['samples']):.1f}" for r, n in op["reasons"].most_common(2) if n)
            cells.append(f"{op['executed'] / 1e6:>9.2f} {_share(op['samples'], s['samples']):>6.1f}  {first:<26}")
        lines.append(f"{key[:28]:<28}" + "".join(cells))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="+",
                        help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    parser.add_argument("--kernel", help="keep the launches whose kernel name matches this regular expression")
    parser.add_argument("--by", choices=("root", "opcode"), default="root",
                        help="group by opcode root (default) or full opcode")
    parser.add_argument("--top", type=int, default=25, help="opcode rows to print (default 25)")
    parser.add_argument("--loop", action="store_true", help="also split each launch's key-block loop into stretches")
    args = parser.parse_args(argv)
    launches = read_pages(args.pages)
    if args.kernel:
        launches = [launch for launch in launches if re.search(args.kernel, launch["kernel"])]
    if not launches:
        print("ncu_stalls: no launch with a source page (and a matching kernel name) in the input", file=sys.stderr)
        return 2
    lines = format_tables([summarize(launch, args.by) for launch in launches], args.top)
    for line in lines + (format_loop_table(launches) if args.loop else []):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
