"""python -m dhp.audit <check>: run one of dhp's audit checks, print its verdict table, optionally write JSON.

    python -m dhp.audit sass                      the installed libdhp.so
    python -m dhp.audit sass --lib PATH           another build of the library
    python -m dhp.audit sass --sass DUMP          a saved `cuobjdump -sass` listing
    python -m dhp.audit sass --json OUT.json      also write the verdicts as JSON
    python -m dhp.audit counters [--quick]        Nsight Compute counters across input classes (GPU, ncu)
    python -m dhp.audit instructions [--quick]    the same, instruction by instruction (GPU, ncu source page)
    python -m dhp.audit timing [--quick] [--peers] fixed-vs-random / fixed-vs-class Welch t (GPU)
    python -m dhp.audit determinism               repeated runs, two streams, concurrent load, batches (GPU)

timing and determinism cover the forward and, for the head_dims that have one, the backward (--pass narrows).

Every check takes --json OUT.json. Exit status: 0 pass, 1 fail, 2 the check could not run (no tool, no
kernels, no GPU, no torch), with a sentence saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import counters, determinism, instructions, sass, timing
from .disasm import ToolMissing, disassemble


def _sass(args) -> int:
    if args.sass:
        target = args.sass
        text = Path(target).read_text()
    else:
        target = args.lib or sass.installed_library()
        if not Path(target).is_file():
            print(f"{target}: no such library (build and install dhp, or pass --lib)", file=sys.stderr)
            return 2
        try:
            text = disassemble(Path(target))
        except ToolMissing as error:
            print(error, file=sys.stderr)
            return 2
    verdicts = sass.analyse_sass(text)
    if not verdicts:
        print(f"{target}: no kernels found in its SASS", file=sys.stderr)
        return 2
    passed = all(v.passed for v in verdicts)
    print(f"SASS taint check of {target}: {len(verdicts)} kernels, {'PASS' if passed else 'FAIL'}")
    print(sass.report(verdicts))
    if args.json:
        document = {"check": "sass", "target": str(target), "verdict": "pass" if passed else "fail",
                    "kernels": [v.to_json() for v in verdicts]}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    return 0 if passed else 1


def shapes_argument(text: str, batch: bool = True) -> tuple[tuple[int, ...], ...]:
    """--shapes of the ncu checks (counters.parse_shapes), its error as argparse's."""
    try:
        return counters.parse_shapes(text, batch)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def sequence_shapes_argument(text: str) -> tuple[tuple[int, ...], ...]:
    """--shapes of the determinism check: single sequences, without a batch."""
    return shapes_argument(text, batch=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dhp.audit", description=__doc__.split("\n\n")[0])
    checks = parser.add_subparsers(dest="check", required=True)
    p = checks.add_parser("sass", help="static taint check of every kernel's SASS (no GPU needed)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--lib", type=Path, help="library to disassemble (default: the installed libdhp.so)")
    source.add_argument("--sass", type=Path, help="a saved `cuobjdump -sass` listing instead of a library")
    p.add_argument("--json", type=Path, help="write the verdicts to this JSON file")

    def variant_filters(p):
        p.add_argument("--dtypes", help="comma list of dtypes to check (default: every compiled one)")
        p.add_argument("--head-dims", help="comma list of head_dims to check (default: every compiled one)")

    def pass_and_mask(p):
        p.add_argument("--pass", dest="passes", choices=["both", "fwd", "bwd"], default="both",
                       help="forward, backward or both (default; the backward where the build has one)")
        p.add_argument("--causal", choices=["both", "true", "false"], default="both")

    for name, help_text, json_help in (
            ("counters", "ncu counter invariance across input classes (GPU, ncu)",
             "write the verdicts and every counter to this JSON file"),
            ("instructions", "per-instruction ncu counts across input classes (GPU, ncu)",
             "write the verdicts to this JSON file")):
        p = checks.add_parser(name, help=help_text)
        variant_filters(p)
        p.add_argument("--quick", action="store_true", help="first variant and first shape only")
        p.add_argument("--shapes", type=shapes_argument, metavar="B,S,HQ,HKV[,SK];...",
                       help="profile these shapes instead of the audit's own (dhp.audit.counters.SHAPES)")
        pass_and_mask(p)
        p.add_argument("--order", help=f"launch order of classes (default {','.join(counters.DEFAULT_ORDER)}; "
                                       "random runs are the noise baseline)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", type=Path, help=json_help)

    p = checks.add_parser("timing", help="fixed-vs-random and fixed-vs-class Welch t-tests (GPU)")
    variant_filters(p)
    p.add_argument("--launches", type=int, default=10_000, help="launches per class (default 10000)")
    p.add_argument("--quick", action="store_true",
                   help=f"one variant, non-causal, at most {timing.QUICK_LAUNCHES} launches per class")
    pass_and_mask(p)
    p.add_argument("--peers", action="store_true", help="also time torch SDPA's cuDNN and flash backends")
    p.add_argument("--pool", type=int, default=8, help="buffers per class, used round robin (default 8)")
    p.add_argument("--batch", type=int, default=500, help="launches between synchronisations (default 500)")
    p.add_argument("--spin", type=int, default=100_000, help="GPU spin cycles ahead of each launch")
    p.add_argument("--bwd-spin", type=int, help="GPU spin cycles ahead of each backward launch (default 3x --spin)")
    p.add_argument("--block", type=int, default=1000, help="launches of each class alone, for clocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the t statistics, clocks and settings to this JSON file")

    p = checks.add_parser("determinism", help="bitwise determinism and batch invariance (GPU)")
    variant_filters(p)
    p.add_argument("--repeats", type=int, default=20, help="repeated runs per check (default 20)")
    p.add_argument("--shapes", type=sequence_shapes_argument, metavar="S,HQ,HKV[,SK];...",
                   help="check these sequences instead of the audit's own (dhp.audit.determinism.SHAPES)")
    pass_and_mask(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every check's result to this JSON file")

    p = checks.add_parser("_run-case", help="internal: the child process that the counters check profiles")
    p.add_argument("--dtype", required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="also run the backward, whose kernel is profiled")
    p.add_argument("--shape", required=True, help="batch,seqlen,heads_q,heads_kv[,seqlen_k]")
    p.add_argument("--order", required=True, help="comma list of input classes, one launch each")
    p.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    return {"sass": _sass, "counters": counters.run, "instructions": instructions.run, "timing": timing.run,
            "determinism": determinism.run, "_run-case": _run_case}[args.check](args)


def _run_case(args) -> int:
    shape = tuple(int(x) for x in args.shape.split(","))
    return counters.run_child(args.dtype, args.head_dim, args.causal, shape, args.order.split(","), args.seed,
                              args.backward)


if __name__ == "__main__":
    sys.exit(main())
