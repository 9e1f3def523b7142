"""python -m dhp.audit <check>: run one of dhp's audit checks, print its verdict table, optionally write JSON.

    python -m dhp.audit sass                      the installed libdhp.so
    python -m dhp.audit sass --lib PATH           another build of the library
    python -m dhp.audit sass --sass DUMP          a saved `cuobjdump -sass` listing
    python -m dhp.audit sass --json OUT.json      also write the verdicts as JSON

Exit status: 0 every kernel passes, 1 some kernel fails, 2 the check could not run (no tool, no kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import sass
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dhp.audit", description=__doc__.split("\n\n")[0])
    checks = parser.add_subparsers(dest="check", required=True)
    p = checks.add_parser("sass", help="static taint check of every kernel's SASS (no GPU needed)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--lib", type=Path, help="library to disassemble (default: the installed libdhp.so)")
    source.add_argument("--sass", type=Path, help="a saved `cuobjdump -sass` listing instead of a library")
    p.add_argument("--json", type=Path, help="write the verdicts to this JSON file")
    args = parser.parse_args(argv)
    return {"sass": _sass}[args.check](args)


if __name__ == "__main__":
    sys.exit(main())
