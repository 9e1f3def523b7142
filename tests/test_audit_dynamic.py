"""The dynamic audits (counters, timing, determinism) and their input classes: the parts that run without a GPU.

CPU: input classes, ncu raw-CSV parsing and the counter verdict on hand-written fixtures (tests/fixtures/ncu),
the timing schedule and verdict on synthetic timings, the determinism hashing and verdict, the CLI's exit 2.
GPU: each tool end to end, quick settings; skipped without a Hopper GPU (and ncu for the counters).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dhp.audit import counters, determinism, inputs, timing

FIXTURES = Path(__file__).parent / "fixtures" / "ncu"


# Input classes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_input_classes(dtype):
    shape = (2, 64, 2, 64)
    limits = inputs.LIMITS[dtype]
    arrays = {name: inputs.class_array(name, shape, dtype, seed=1) for name in inputs.CLASSES}
    assert all(a.shape == shape and a.dtype == np.float32 for a in arrays.values())
    assert not arrays["zeros"].any() and (arrays["ones"] == 1).all()
    assert np.isfinite(arrays["random"]).all() and 0.5 < arrays["random"].std() < 2
    huge = arrays["huge"]
    assert np.isfinite(huge).all() and np.abs(huge).max() <= limits["max"] and np.abs(huge).mean() > 1e3
    tiny = np.abs(arrays["tiny"])
    assert tiny.max() < 8 * limits["tiny"]
    assert ((tiny > 0) & (tiny < limits["tiny"])).any() and (tiny >= limits["tiny"]).any()  # subnormal and normal
    for name, special in (("nan", np.isnan), ("inf", np.isinf)):
        a = arrays[name]
        count = int(special(a).sum())
        assert count == max(1, a.size // inputs.SPECIALS_EVERY)
        assert np.isfinite(a[~special(a)]).all()
    assert (arrays["inf"] == np.inf).any() and (arrays["inf"] == -np.inf).any()


def test_input_classes_are_deterministic_and_distinct():
    a = inputs.qkv_arrays("random", (1, 8, 2, 64), (1, 8, 1, 64), "bfloat16", seed=3)
    b = inputs.qkv_arrays("random", (1, 8, 2, 64), (1, 8, 1, 64), "bfloat16", seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], a[2])  # q, k, v are independent draws
    other = inputs.class_array("random", (1, 8, 1, 64), "bfloat16", seed=3, index=1, tensor=1)
    assert not np.array_equal(a[1], other)
    with pytest.raises(ValueError, match="unknown input class"):
        inputs.class_array("denormal", (2,), "bfloat16", 0)


# ncu CSV and the counter verdict


def test_parse_cell():
    assert counters.parse_cell("m.sum", "1,234") == {"m.sum": 1234}
    assert counters.parse_cell("m.sum", "n/a") == {}
    assert counters.parse_cell("op", "7 (FFMA: 4; BRA: 3)") == {"op": 7, "op[FFMA]": 4, "op[BRA]": 3}
    assert counters.parse_cell("op", "1,003 (A.B: 1,000; C: 3)") == {"op": 1003, "op[A.B]": 1000, "op[C]": 3}


def test_parse_raw_csv_fixture():
    rows = counters.parse_raw_csv((FIXTURES / "raw_pass.csv").read_text())
    assert [r["id"] for r in rows] == list(range(9))
    first = rows[0]["counters"]
    assert first["dram__sectors_read.sum"] == 5120
    assert first["sass__inst_executed_per_opcode_with_modifier_all[FFMA]"] == 1048576
    assert first["sass__inst_executed_per_opcode_with_modifier_all[SYNCS.PHASECHK.TRANS64.TRYWAIT]"] == 1200
    assert first["smsp__inst_executed.sum"] == first["sass__inst_executed_per_opcode_with_modifier_all"]
    assert rows[0]["kernel"] == "attention_fwd_kernel"
    with pytest.raises(counters.NcuOutputError):
        counters.parse_raw_csv("==PROF== nothing profiled\n")


def test_waitloop_classification():
    assert counters.is_waitloop("sass__inst_executed_per_opcode_with_modifier_all[SYNCS.PHASECHK.TRANS64.TRYWAIT]")
    assert counters.is_waitloop("sass__inst_executed_per_opcode[SYNCS]")
    assert not counters.is_waitloop("sass__inst_executed_per_opcode_with_modifier_all[SYNCS.ARRIVE.TRANS64.A1T0]")
    assert not counters.is_waitloop("sass__inst_executed_per_opcode[BRA]")
    assert not counters.is_waitloop("smsp__inst_executed.sum")


def _judge_fixture(name):
    rows = counters.parse_raw_csv((FIXTURES / name).read_text())
    return counters.judge(counters.assign_classes(rows, counters.DEFAULT_ORDER))


def test_judge_pass_fixture():
    j = _judge_fixture("raw_pass.csv")
    assert j["verdict"] == "pass", j["reason"]
    op = "sass__inst_executed_per_opcode_with_modifier_all"
    # Drifting sectors, the wait loop's count and what it drags along are set apart, not compared.
    assert {"dram__sectors_read.sum", "smsp__inst_executed.sum", op, f"{op}[BRA]"} <= set(j["timing_dependent"])
    assert list(j["waitloop"]) == [f"{op}[SYNCS.PHASECHK.TRANS64.TRYWAIT]"]
    assert {f"{op}[FFMA]", f"{op}[HGMMA.64x128x16.F32.BF16]", "derived:BRA-minus-waitloop"} <= set(j["checked"])
    assert not j["differences"]


def test_judge_leak_fixture():
    j = _judge_fixture("raw_leak.csv")
    assert j["verdict"] == "fail"
    op = "sass__inst_executed_per_opcode_with_modifier_all"
    found = {(d["counter"], d["class"]) for d in j["differences"]}
    assert (f"{op}[FFMA]", "nan") in found
    assert (f"{op}[BSSY]", "inf") in found  # an opcode only one class executes
    nan = next(d for d in j["differences"] if d["counter"] == f"{op}[FFMA]")
    assert (nan["value"], nan["baseline"]) == (1048576 + 64, 1048576)
    assert "nan" in counters.report([{"name": "case", "judgement": j}])


def test_judge_needs_a_baseline_and_a_stable_counter():
    assert counters.judge([("random", {"a": 1}), ("zeros", {"a": 1})])["verdict"] == "error"
    unstable = [("random", {"a": 1}), ("random", {"a": 2}), ("zeros", {"a": 1})]
    assert counters.judge(unstable)["verdict"] == "error"
    with pytest.raises(counters.NcuOutputError, match="expected 3"):
        counters.assign_classes([{"counters": {}}], ["random", "zeros", "random"])


def test_unknown_metrics_and_command():
    out = "==ERROR== Failed to find metric sass__inst_executed_per_opcode_with_modifier_all\n"
    metrics = [*counters.OPCODE_METRICS, "smsp__inst_executed.sum"]
    assert counters.unknown_metrics(out, metrics) == ["sass__inst_executed_per_opcode_with_modifier_all"]
    command = counters.ncu_command("ncu", ["a.sum", "b.sum"], 9, ["python", "-m", "x"], "/tmp/log")
    assert command[command.index("--clock-control") + 1] == "none"
    assert command[command.index("--launch-count") + 1] == "9" and command[-3:] == ["python", "-m", "x"]


# Timing: schedule and verdict


def test_schedule_is_balanced_shuffled_and_seeded():
    a = timing.schedule(8, 1000, seed=5)
    assert np.array_equal(np.bincount(a), np.full(8, 1000))
    assert np.array_equal(a, timing.schedule(8, 1000, seed=5))
    assert not np.array_equal(a, timing.schedule(8, 1000, seed=6))
    assert (np.diff(a) != 0).mean() > 0.8  # interleaved, not in blocks


def _synthetic(shift_class=None, shift=0.0, n=5000, seed=0):
    rng = np.random.default_rng(seed)
    times = {}
    for name in timing.TIMING_CLASSES:
        body = 0.100 + 0.001 * rng.standard_normal(n)  # ms
        tail = rng.random(n) < 0.01
        body[tail] += rng.exponential(0.05, tail.sum())  # preemption-like outliers
        times[name] = body + (shift if name == shift_class else 0.0)
    return times


def test_analyse_no_leak():
    result = timing.analyse(_synthetic())
    assert not result["leak"]
    assert set(result["tests"]) == {f"fixed vs {c}" for c in timing.TIMING_CLASSES if c != "fixed"}
    assert result["classes"]["zeros"]["n"] == 5000


def test_analyse_finds_a_shifted_class():
    result = timing.analyse(_synthetic("zeros", shift=0.0002))  # 0.2% slower
    assert result["leak"] and result["tests"]["fixed vs zeros"]["leak"]
    assert not result["tests"]["fixed vs nan"]["leak"]
    case = {"name": "bfloat16 d128 full", "impls": {"dhp": {"analysis": result}, "cudnn": {"error": "nope"}}}
    table = timing.report([case])
    assert "LEAK" in table and "unavailable: nope" in table


# Determinism: hashing and verdict


def test_digest_sees_bits_not_values():
    assert determinism.tensor_digest(np.array([0.0], np.float32)) != determinism.tensor_digest(
        np.array([-0.0], np.float32))
    nan = np.array([np.nan], np.float32)
    other_nan = nan.view(np.uint32) ^ np.uint32(1)
    assert determinism.tensor_digest(nan) != determinism.tensor_digest(other_nan.view(np.float32))
    assert determinism.tensor_digest(np.arange(4)) == determinism.tensor_digest(np.arange(4))


def test_determinism_verdict():
    ref = {"out": "a", "lse": "b"}
    same = determinism.compare("repeat", "run 1", ref, {"out": "a", "lse": "b"})
    differs = determinism.compare("batch", "b8 last", ref, {"out": "a", "lse": "c"})
    assert same["same"] and not differs["same"] and differs["differing"] == ["lse"]
    assert determinism.verdict([same]) == "pass"
    assert determinism.verdict([same, differs]) == "fail"
    assert determinism.verdict([]) == "fail"
    assert "lse differ" in determinism.report([{"name": "x", "checks": [same, differs]}])


def test_batch_layouts_hold_the_target_once():
    layouts = determinism.batch_layouts()
    assert {len(b) for _, b in layouts} == {1, 3, 8}
    assert all(b.count(0) == 1 for _, b in layouts)
    assert len({b.index(0) for _, b in layouts if len(b) == 8}) == 3  # first, middle, last


# CLI


@pytest.mark.parametrize("check", ["counters", "timing", "determinism"])
def test_cli_exit_2_without_what_it_needs(check):
    """Where the GPU tool cannot run here, it exits 2 with a sentence (and never 0)."""
    done = subprocess.run([sys.executable, "-m", "dhp.audit", check, "--quick"] if check != "determinism"
                          else [sys.executable, "-m", "dhp.audit", check], check=False, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 2:
        pytest.skip(f"{check} can run here (exit {done.returncode}); the GPU tests below cover it")
    assert "cannot run:" in done.stderr


# GPU: end to end, quick


def test_determinism_on_gpu(torch_cuda, tmp_path):
    out = tmp_path / "determinism.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "determinism", "--repeats", "3", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.is_file()


def test_timing_quick_on_gpu(torch_cuda, tmp_path):
    out = tmp_path / "timing.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "timing", "--quick", "--launches", "300",
                           "--block", "50", "--json", str(out)], check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode in (0, 1), done.stdout + done.stderr  # too few launches for a verdict to mean much
    assert out.is_file()


def test_counters_quick_on_gpu(torch_cuda, tmp_path):
    if counters.find_ncu() is None:
        pytest.skip("Nsight Compute's ncu is not installed")
    out = tmp_path / "counters.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "counters", "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
