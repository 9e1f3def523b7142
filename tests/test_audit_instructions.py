"""The per-instruction counter check (dhp.audit.instructions) on Nsight Compute's source page.

Fixture: tests/fixtures/ncu/source_fwd_d64.csv.gz, the source page (`ncu --page source --csv --print-source sass`)
of one launch of the bf16 head_dim 64 forward kernel, profiled with the SourceCounters section on an H100
(2026-11-25, ncu 2025.x). The judge's cases are built from it: every class gets the same counts, and then one
count is changed where a spin loop, a value-dependent path or an unexplained timing effect would change it.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
from pathlib import Path

import pytest
from dhp.audit import counters, inputs, instructions

FIXTURE = Path(__file__).parent / "fixtures" / "ncu" / "source_fwd_d64.csv.gz"


@pytest.fixture(scope="module")
def page() -> str:
    return gzip.open(FIXTURE, "rt").read()


@pytest.fixture(scope="module")
def launch(page) -> dict:
    (only,) = instructions.parse_source_page(page)
    return only


def runs_of(launch, order=counters.DEFAULT_ORDER):
    return [(cls, copy.deepcopy(launch)) for cls in order]


def row_at(launch, offset):
    return next(row for row in launch["rows"] if row["offset"] == offset)


def test_parse_the_real_page(launch):
    rows = launch["rows"]
    assert launch["kernel"].startswith("void dhp::kernels::attention_fwd_kernel<__nv_bfloat16, (int)64")
    assert len(rows) == 2024 and [r["offset"] for r in rows] == [16 * i for i in range(2024)]
    assert rows[0]["sass"] == "LDC R1, c[0x0][0x28]"
    assert rows[2]["sass"] == "BSSY B0, 0x260"  # a code address, now an offset as cuobjdump prints it
    assert rows[0]["counts"]["Instructions Executed"] == 2112 and rows[0]["counts"]["Divergent Branches"] == 0
    assert set(instructions.COMPARED_COLUMNS) <= set(rows[0]["counts"])
    assert any(r["memory"] for r in rows) and not rows[0]["memory"]


def test_parse_several_launches_and_noise_around_them(page):
    text = "==PROF== Connected to process 1\n" + page + "program output\n" + page
    launches = instructions.parse_source_page(text)
    assert len(launches) == 2 and launches[0]["rows"] == launches[1]["rows"]
    with pytest.raises(instructions.SourcePageError):
        instructions.parse_source_page("==PROF== nothing profiled\n")


def test_a_table_printed_twice_per_launch_counts_once(launch):
    other = copy.deepcopy(launch)
    other["rows"][0]["counts"]["Instructions Executed"] += 1
    assert instructions.one_table_per_launch([launch, other], 2) == [launch, other]
    doubled = [launch, copy.deepcopy(launch), other, copy.deepcopy(other)]
    assert instructions.one_table_per_launch(doubled, 2) == [launch, other]
    assert instructions.one_table_per_launch([launch, other, launch, other], 2) is None  # not pairs: refused
    assert instructions.one_table_per_launch([launch, launch, other], 2) is None


def test_spin_sites_of_the_real_kernel(launch):
    """The same nine spin loops the SASS audit finds in every forward kernel, and the first try of each
    mbarrier wait (the setmaxnreg retry has none)."""
    ins = instructions.instructions_of(launch)
    spins, first_tries = instructions.spin_sites(ins)
    kinds = sorted(loop.kind for loop in instructions.spin_loops(ins))
    assert kinds == ["mbarrier wait"] * 8 + ["register allocation retry"]
    assert len(first_tries) == 8 and not first_tries & spins
    for offset in first_tries:
        assert row_at(launch, offset)["sass"].startswith("@!P") and " BRA " in row_at(launch, offset)["sass"]
    # How often a first try fails follows timing: here 50688 of 1179648 thread executions branched.
    assert row_at(launch, 0x960)["counts"][instructions.PREDICATED_ON] == 50688


def test_identical_classes_pass(launch):
    j = instructions.judge(runs_of(launch))
    assert j["verdict"] == "pass", j["reason"]
    assert j["instructions"] == 2024 and j["spin_loop_instructions"] > 0 and j["checked"] > 2024 * 3


def test_spin_loops_and_first_tries_follow_timing(launch):
    """Counts that follow timing by construction may differ in every run, baseline included."""
    runs = runs_of(launch)
    ins = instructions.instructions_of(launch)
    spins, first_tries = instructions.spin_sites(ins)
    for n, (_, run) in enumerate(runs):
        for row in run["rows"]:
            if row["offset"] in spins:
                row["counts"]["Instructions Executed"] += n
            if row["offset"] in first_tries:
                row["counts"][instructions.PREDICATED_ON] += n
    assert instructions.judge(runs)["verdict"] == "pass"


def test_a_value_dependent_count_fails(launch):
    runs = runs_of(launch)
    leaky = next(run for cls, run in runs if cls == "nan")
    row = leaky["rows"][100]
    row["counts"]["Instructions Executed"] -= 1
    j = instructions.judge(runs)
    assert j["verdict"] == "fail" and "classes nan" in j["reason"]
    (d,) = j["differences"]
    assert d["offset"] == f"0x{row['offset']:04x}" and d["class"] == "nan" and d["sass"] == row["sass"]
    assert "nan" in instructions.report([{"name": "case", "judgement": j}])


def test_a_count_outside_the_spin_loops_that_moves_on_identical_input_fails(launch):
    runs = runs_of(launch)
    next(run for cls, run in reversed(runs) if cls == "random")["rows"][100]["counts"]["Instructions Executed"] += 1
    j = instructions.judge(runs)
    assert j["verdict"] == "fail" and "identical input" in j["reason"] and len(j["unexplained"]) == 1


def test_guards_count_on_branches_and_memory_only(launch):
    """A guard that differs on an ALU instruction is a select: a note. On a memory instruction it fails."""
    ins = instructions.instructions_of(launch)
    alu = next(i for i, x in enumerate(ins) if x.root == "FSEL" or (x.guarded and x.root in ("MOV", "FMUL")))
    memory = next(i for i, row in enumerate(launch["rows"]) if row["memory"])
    runs = runs_of(launch)
    next(run for cls, run in runs if cls == "inf")["rows"][alu]["counts"][instructions.PREDICATED_ON] -= 32
    j = instructions.judge(runs)
    assert j["verdict"] == "pass" and len(j["notes"]) == 1
    next(run for cls, run in runs if cls == "inf")["rows"][memory]["counts"][instructions.PREDICATED_ON] -= 32
    assert instructions.judge(runs)["verdict"] == "fail"


def test_other_code_or_no_baseline_is_an_error(launch):
    runs = runs_of(launch)
    runs[1][1]["rows"][5]["sass"] = "NOP"
    assert instructions.judge(runs)["verdict"] == "error"
    assert instructions.judge(runs_of(launch, ("random", "zeros")))["verdict"] == "error"


def test_commands():
    profile = instructions.profile_command("ncu", 10, ["python", "child"], "/tmp/r.ncu-rep", "attention_fwd_kernel")
    assert profile[:5] == ["ncu", "--clock-control", "none", "--cache-control", "all"]
    assert "SourceCounters" in profile and profile[-2:] == ["python", "child"]
    assert instructions.import_command("ncu", "r.ncu-rep", 3)[3:7] == ["--launch-skip", "3", "--launch-count", "1"]


def test_instructions_run_without_a_gpu(monkeypatch, tmp_path, launch, capsys):
    """The whole command with ncu and the GPU replaced: every case passes but one, whose nan launch leaks."""
    from dhp import _native

    monkeypatch.setattr(counters, "find_ncu", lambda: "ncu")
    monkeypatch.setattr(inputs, "gpu_variants", lambda args: (["bfloat16"], [64]))
    monkeypatch.setattr(_native, "ext", lambda: argparse.Namespace(build_info=lambda: json.dumps({})))

    def fake_profile_case(ncu, case, order, seed):
        launches = [copy.deepcopy(launch) for _ in order]
        if case["causal"] and tuple(case["shape"]) == counters.SHAPES[1]:
            launches[list(order).index("nan")]["rows"][7]["counts"]["Thread Instructions Executed"] += 1
        return launches

    monkeypatch.setattr(instructions, "profile_case", fake_profile_case)
    out = tmp_path / "instructions.json"
    args = argparse.Namespace(dtypes=None, head_dims=None, quick=False, order=None, seed=0, json=out)
    assert instructions.run(args) == 1
    document = json.loads(out.read_text())
    assert len(document["cases"]) == 2 * len(counters.SHAPES)
    assert [c["judgement"]["verdict"] for c in document["cases"]].count("fail") == 1
    assert "FAIL" in capsys.readouterr().out
