"""The dynamic audits (counters, timing, determinism) and their input classes: the parts that run without a GPU.

CPU: input classes, ncu raw-CSV parsing and the counter verdict on hand-written fixtures (tests/fixtures/ncu),
the case plan (forward, and backward where compiled), the timing schedule, settings, pools, host-bound check and
verdict on synthetic timings, the determinism hashing, poison, batching and verdict, the CLI's exit 2.
GPU: each tool end to end, quick settings, and the backward paths alone; skipped without a Hopper GPU (and ncu
for the counters).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from dhp.audit import counters, determinism, inputs, timing
from key_split_rule import key_split_runs_a_cta

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


def test_dout_is_its_own_draw_of_the_class():
    shape = (1, 8, 2, 64)
    q = inputs.class_array("random", shape, "bfloat16", seed=3, index=2, tensor=0)
    dout = inputs.class_array("random", shape, "bfloat16", seed=3, index=2, tensor=inputs.DOUT_TENSOR)
    assert inputs.DOUT_TENSOR not in (0, 1, 2) and not np.array_equal(q, dout)
    nan = inputs.class_array("nan", shape, "float16", seed=3, tensor=inputs.DOUT_TENSOR)
    assert np.isnan(nan).sum() == 1


def test_dout_torch_on_cpu():
    torch = pytest.importorskip("torch")
    dout = inputs.dout_torch(torch, "huge", (1, 4, 2, 64), "float16", "cpu", seed=1)
    expected = inputs.class_array("huge", (1, 4, 2, 64), "float16", 1, 0, inputs.DOUT_TENSOR)
    assert dout.dtype == torch.float16 and np.array_equal(dout.float().numpy(), expected.astype(np.float16))


# The plan of cases: forward everywhere, backward where compiled


def test_plan_has_the_backward_only_where_compiled():
    cases = inputs.plan(["bfloat16", "float16"], [64, 128, 256], [64, 128])
    assert len(cases) == 2 * 3 * 2 + 2 * 2 * 2
    assert {c["head_dim"] for c in cases if c["pass"] == "bwd"} == {64, 128}
    names = [c["name"] for c in cases]
    assert "bfloat16 d128 bwd causal" in names and "float16 d256 fwd full" in names
    assert "float16 d256 bwd full" not in names
    assert len(set(names)) == len(names)
    assert [c["pass"] for c in inputs.plan(["bfloat16"], [64], [64], causals=(False,))] == ["fwd", "bwd"]
    assert inputs.plan(["bfloat16"], [256], [64], passes=("bwd",)) == []


def test_selected_passes():
    assert inputs.selected_passes(None) == inputs.selected_passes("both") == ("fwd", "bwd")
    assert inputs.selected_passes("bwd") == ("bwd",)


def test_selected_causals():
    assert inputs.selected_causals(None) == inputs.selected_causals("both") == (False, True)
    assert inputs.selected_causals("true") == (True,) and inputs.selected_causals("false") == (False,)


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
    assert counters.is_waitloop("sass__inst_executed_per_opcode[BRA]")  # executed once per spin iteration
    assert counters.is_waitloop("sass__inst_executed_per_opcode_with_modifier_all[LDG.E.STRONG.GPU]")
    assert not counters.is_waitloop("sass__inst_executed_per_opcode_with_modifier_all[LDG.E.128]")
    assert not counters.is_waitloop("sass__inst_executed_per_opcode[FFMA]")
    assert not counters.is_waitloop("smsp__inst_executed.sum")


FIXTURE_ORDER = ("random", "zeros", "ones", "huge", "random", "tiny", "nan", "inf", "random")  # of the CSVs


def _judge_fixture(name):
    rows = counters.parse_raw_csv((FIXTURES / name).read_text())
    return counters.judge(counters.assign_classes(rows, FIXTURE_ORDER))


def test_judge_pass_fixture():
    j = _judge_fixture("raw_pass.csv")
    assert j["verdict"] == "pass", j["reason"]
    op = "sass__inst_executed_per_opcode_with_modifier_all"
    # Drifting sectors, the wait loop's count and what it drags along are set apart, not compared; the totals
    # that count wait-loop iterations are listed apart when per-opcode counts are there.
    assert {"dram__sectors_read.sum", op} <= set(j["timing_dependent"])
    assert "smsp__inst_executed.sum" in j["wait_affected"]
    assert set(j["waitloop"]) == {f"{op}[SYNCS.PHASECHK.TRANS64.TRYWAIT]", f"{op}[BRA]"}
    assert {f"{op}[FFMA]", f"{op}[HGMMA.64x128x16.F32.BF16]", "derived:BRA-minus-spins"} <= set(j["checked"])
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


def test_flag_spin_is_set_apart():
    op = "sass__inst_executed_per_opcode_with_modifier_all"

    def run(spins, ffma):
        return {f"{op}[LDG.E.STRONG.GPU]": spins, f"{op}[ISETP.NE.AND]": 10 + spins, f"{op}[BRA]": 5 + spins,
                f"{op}[YIELD]": spins, f"{op}[CCTL.IVALL]": spins, f"{op}[FFMA]": ffma}

    j = counters.judge([("random", run(3, 100)), ("random", run(7, 100)), ("zeros", run(1, 100))])
    assert j["verdict"] == "pass", j
    assert {"derived:ISETP.NE.AND-minus-spins", "derived:BRA-minus-spins", f"{op}[FFMA]"} <= set(j["checked"])
    assert f"{op}[ISETP.NE.AND]" in j["waitloop"]
    j = counters.judge([("random", run(3, 100)), ("random", run(7, 100)), ("nan", run(1, 101))])
    assert j["verdict"] == "fail" and j["differences"][0]["counter"] == f"{op}[FFMA]"


def test_judge_timing_from_other_cases():
    runs = [("random", {"a.sum": 1}), ("random", {"a.sum": 1}), ("zeros", {"a.sum": 2})]
    assert counters.judge(runs)["verdict"] == "fail"
    j = counters.judge(runs, timing=frozenset({"a.sum"}))
    assert j["verdict"] == "error" and "a.sum" in j["timing_dependent"]


def test_judge_only_requested_metrics():
    runs = [("random", {"a.sum": 1, "a.max": 5, "dev__attr": 3}), ("random", {"a.sum": 1, "a.max": 5, "dev__attr": 3}),
            ("zeros", {"a.sum": 1, "a.max": 4, "dev__attr": 3})]
    assert counters.judge(runs)["verdict"] == "fail"  # a.max moved
    j = counters.judge(runs, metrics=["a.sum"])
    assert j["verdict"] == "pass" and j["checked"] == ["a.sum"]


def test_confirmation_order():
    differences = [{"counter": "a", "class": "tiny"}, {"counter": "b", "class": "ones"},
                   {"counter": "a", "class": "ones"}]
    assert counters.confirmation_order(differences) == ["random", "ones", "random", "tiny", "random", "ones", "random",
                                                        "tiny", "random"]
    assert counters.confirmation_order(differences, repeats=1) == ["random", "ones", "random", "tiny", "random"]


def test_second_look_clears_a_short_baseline_and_keeps_a_leak():
    def runs(order, dram, ffma):
        return [(cls, {"dram__sectors_write.sum": d, "ffma.sum": f}) for cls, d, f in zip(order, dram, ffma)]

    first = ["random", "ones", "random", "tiny", "random"]
    noise = runs(first, [8, 16, 8, 16, 8], [100] * 5)  # DRAM writes off in two classes, stable on 3 random runs
    j = counters.judge(noise)
    assert j["verdict"] == "fail" and {d["counter"] for d in j["differences"]} == {"dram__sectors_write.sum"}
    second = counters.confirmation_order(j["differences"])
    j = counters.judge(noise + runs(second, [8, 16, 16, 8, 8, 16, 8, 8, 8], [100] * 9))
    assert j["verdict"] == "pass" and "dram__sectors_write.sum" in j["timing_dependent"]
    leak = runs(first, [8] * 5, [100, 101, 100, 100, 100])  # an instruction count that follows the values
    j = counters.judge(leak)
    assert j["verdict"] == "fail"
    second = counters.confirmation_order(j["differences"])
    assert second == ["random", "ones", "random", "ones", "random"]
    j = counters.judge(leak + runs(second, [8] * 5, [100, 101, 100, 101, 100]))
    assert j["verdict"] == "fail" and {d["class"] for d in j["differences"]} == {"ones"}


def test_counters_run_takes_a_second_look(monkeypatch, tmp_path, capsys):
    """The whole `counters` command with ncu and the GPU replaced: the first case's DRAM write count is off in
    two classes on its first profile and moves on the random input in its second look (a pass); the second
    case's instruction count follows the values every time (still a fail after its second look)."""
    from dhp import _native

    monkeypatch.setattr(counters, "find_ncu", lambda: "ncu")
    monkeypatch.setattr(inputs, "gpu_variants", lambda args: (["bfloat16"], [64]))
    monkeypatch.setattr(_native, "ext", lambda: argparse.Namespace(build_info=lambda: json.dumps({})))
    profiles = []

    def fake_profile_case(ncu, metrics, dtype, head_dim, causal, shape, order, seed, backward=False):
        profiles.append((causal, shape, list(order)))
        first_case = not causal and tuple(shape) == counters.SHAPES[0]
        second_look = len(order) != len(counters.DEFAULT_ORDER)
        rows = []
        for i, cls in enumerate(order):
            dram = 8
            if first_case:
                dram = (16 if i % 3 == 1 else 8) if second_look else (16 if cls in ("ones", "tiny") else 8)
            leak = int(causal and tuple(shape) == counters.SHAPES[1] and cls == "nan")
            rows.append({"kernel": "attention_fwd_kernel", "counters": {
                "dram__sectors_write.sum": dram, "smsp__inst_executed.sum": 1000 + leak}})
        return rows, [], metrics

    monkeypatch.setattr(counters, "profile_case", fake_profile_case)
    out = tmp_path / "counters.json"
    args = argparse.Namespace(dtypes=None, head_dims=None, quick=False, order=None, seed=0, json=out)
    assert counters.run(args) == 1
    cases = 2 * len(counters.SHAPES)  # full and causal on every shape
    assert len(profiles) == cases + 2  # and two second looks
    document = json.loads(out.read_text())
    verdicts = {c["name"]: c["judgement"]["verdict"] for c in document["cases"]}
    assert list(verdicts.values()).count("fail") == 1
    leaky = next(c for c in document["cases"] if c["judgement"]["verdict"] == "fail")
    assert leaky["causal"] and leaky["second_look"]["order"] == ["random", "nan", "random", "nan", "random"]
    assert {d["class"] for d in leaky["judgement"]["differences"]} == {"nan"}
    cleared = document["cases"][0]
    assert cleared["judgement"]["verdict"] == "pass" and "second_look" in cleared
    assert cleared["second_look"]["first_verdict"].startswith("1 counters differ")
    assert len(cleared["runs"]) == len(counters.DEFAULT_ORDER) + 9
    assert "dram__sectors_write.sum" in cleared["judgement"]["timing_dependent"]
    assert "FAIL" in capsys.readouterr().out


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


def _args(**overrides):
    values = {"launches": 10_000, "block": 1000, "quick": False, "causal": "both", "spin": 100_000,
              "bwd_spin": None, "passes": "both"}
    values.update(overrides)
    return argparse.Namespace(**values)


def test_timing_settings():
    full = timing.settings(_args(), ["bfloat16", "float16"], [64, 128, 256], [64, 128])
    assert len(full["cases"]) == 20 and full["launches"] == 10_000 and full["block"] == 1000
    assert full["spin"] == {"fwd": 100_000, "bwd": 300_000}
    quick = timing.settings(_args(quick=True), ["bfloat16", "float16"], [64, 128, 256], [64, 128])
    assert [c["name"] for c in quick["cases"]] == ["bfloat16 d128 fwd full", "bfloat16 d128 bwd full"]
    assert quick["launches"] == timing.QUICK_LAUNCHES <= 1000 and quick["block"] == timing.QUICK_BLOCK
    assert timing.settings(_args(quick=True, launches=300), ["bfloat16"], [64, 128], [64])["launches"] == 300
    only = timing.settings(_args(passes="bwd", causal="true", bwd_spin=7), ["float16"], [64, 256], [64])
    assert [c["name"] for c in only["cases"]] == ["float16 d64 bwd causal"] and only["spin"]["bwd"] == 7


def test_pool_draws():
    assert timing.pool_draws("random", 3) == [("random", 0, False), ("random", 1, False), ("random", 2, False)]
    assert timing.pool_draws("fixed", 2) == [("random", timing.FIXED_INDEX, False),
                                             ("random", timing.FIXED_INDEX, True)]
    assert timing.FIXED_INDEX >= 8  # apart from the random pool's draws
    assert timing.pool_draws("nan", 3) == [("nan", 0, False), ("nan", 0, True), ("nan", 0, True)]


def test_host_bound():
    fed = {"enqueue_ms": 20.0, "gpu_span_ms": 60.0}  # the GPU ran long after the host was done: a backlog
    starved = {"enqueue_ms": 50.0, "gpu_span_ms": 50.2}  # the GPU followed the host
    assert timing.host_bound([fed, fed]) == 0
    assert timing.host_bound([fed, starved, starved]) == 2
    assert timing.host_bound([{"first": 0}]) == 0  # batches without the measure (older JSON)


def test_timing_report_names_the_pass():
    result = timing.analyse(_synthetic())
    table = timing.report([{"name": "bfloat16 d128 bwd full", "impls": {"dhp": {"analysis": result}}}])
    assert "bfloat16 d128 bwd full" in table and "fixed vs random" in table


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
    specials = {e for _, b in layouts for e in b if isinstance(e, str)}
    assert specials == set(determinism.SPECIAL_NEIGHBOURS) <= set(inputs.CLASSES)


def test_backward_verdict_names_its_gradients():
    ref = {"dq": "a", "dk": "b", "dv": "c"}
    check = determinism.compare("streams", "stream 2", ref, {"dq": "a", "dk": "x", "dv": "y"})
    assert check["differing"] == ["dk", "dv"]
    assert "dk, dv differ" in determinism.report([{"name": "float16 d64 bwd causal", "checks": [check]}])
    assert set(determinism.OUTPUTS) == set(inputs.PASSES)


def test_poison_differs_from_the_reference_and_between_calls():
    assert math.isnan(determinism.poison(0))
    later = [determinism.poison(i) for i in range(1, 65)]
    assert len(set(later)) == 64 and all(x == int(x) and 1 <= x <= 64 for x in later)  # exact in bf16/fp16
    assert determinism.poison(1) != determinism.poison(2)
    bytes_ = [determinism.workspace_byte(i) for i in range(256)]
    assert len(set(bytes_)) == 256 and all(0 <= b < 256 for b in bytes_)


def test_batch_inputs_put_the_target_where_the_layout_says():
    rng = np.random.default_rng(0)
    sequences = {key: {"q": rng.standard_normal((1, 5, 4, 8)), "lse": rng.standard_normal((1, 4, 5))}
                 for key in [*range(determinism.POOL), *determinism.SPECIAL_NEIGHBOURS]}
    for _, layout in determinism.batch_layouts():
        batch = determinism.batch_inputs(sequences, layout, np.concatenate)
        assert batch["q"].shape == (len(layout), 5, 4, 8) and batch["lse"].shape == (len(layout), 4, 5)
        position = layout.index(0)
        for name in ("q", "lse"):
            assert determinism.tensor_digest(batch[name][position]) == determinism.tensor_digest(sequences[0][name])


# CLI


@pytest.mark.parametrize("tool", ["counters", "determinism"])
def test_audit_shapes_fall_on_both_sides_of_every_launch_limit(ext, tool):
    """The forward's tiles and grid change with seqlen_k (dhp_build_info): every kernel and grid must run."""
    from dhp import _native

    info = _native.build_info()
    limits = {t["max_seqlen_k"] for t in info["forward_tiles"] if t["max_seqlen_k"] is not None}
    limits |= {t["min_seqlen_k"] - 1 for t in info["forward_tiles"] if t["min_seqlen_k"] is not None}
    limits |= set(info["persistent_causal_max_seqlen_k"].values())
    seqlens = [s[-1] if len(s) > 4 else s[1] for s in counters.SHAPES] if tool == "counters" else \
        [s[-1] if len(s) > 3 else s[0] for s in determinism.SHAPES]  # seqlen_k
    for limit in sorted(limits):
        assert any(s <= limit for s in seqlens) and any(s > limit for s in seqlens), (tool, limit, seqlens)
    split_tiers = (t for t in info["forward_tiles"] if t["split_tile"] and not t["key_splits"])
    for tile in split_tiers:  # and the split tier by seqlen_q
        short = max((t["max_seqlen_k"] or 0 for t in info["forward_tiles"]
                     if (t["head_dim"], t["causal"]) == (tile["head_dim"], tile["causal"])), default=0)
        split = [short < s <= tile["max_seqlen_q"] and (s - 1) % tile["block_m"] < 64 for s in seqlens]
        assert any(split) and not all(split), (tool, tile, seqlens)


@pytest.mark.parametrize("tool", ["counters", "determinism"])
def test_audit_shapes_reach_the_key_splits(ext, tool):
    """Both audits run the forward's key-split tier: a seqlen_q up to its max_seqlen_q against keys enough to split
    (dhp_build_info), with query heads to pack."""
    from dhp import _native

    info = _native.build_info()
    limit = next(t["max_seqlen_q"] for t in info["forward_tiles"] if t["key_splits"])
    shapes = [(s[1], s[-1], s[2] // s[3]) for s in counters.SHAPES] if tool == "counters" else \
        [(s[0], s[-1], s[1] // s[2]) for s in determinism.SHAPES]
    assert any(q <= limit and -(-k // 128) >= 2 * info["key_split_min_blocks"] and g > 1 for q, k, g in shapes)


def test_determinism_batches_change_the_runs_a_cta(ext):
    """The determinism audit's batches of 3 and 8 give the CTAs of a key-split shape more runs of a tile than the
    sequence alone (fwd_key_split_runs: they follow the batch, the bits must not), at every head_dim that has them."""
    from dhp import _native

    info = _native.build_info()
    for head_dim, most in info["key_split_max_runs"].items():
        if most > 1:
            counts = {tuple(key_split_runs_a_cta(info, int(head_dim), batch, q, k, hq, hkv) for batch in (1, 3, 8))
                      for q, hq, hkv, k in (s for s in determinism.SHAPES if len(s) > 3)}
            assert any(alone == 1 and 1 < three < eight for alone, three, eight in counts), (head_dim, counts)


def test_determinism_shapes_fall_on_both_sides_of_the_backward_dq_chains_limits(ext):
    """The backward sums dQ in two chains for MHA without a causal mask for seqlen_k in (min, max] per head_dim
    (dhp_build_info; max 0: one chain at every length), else in one: the determinism audit must run both summations
    at every head_dim that has both, on both sides of each limit."""
    from dhp import _native

    info = _native.build_info()
    limits, lows = info["backward_two_dq_chains_max_seqlen_k"], info["backward_two_dq_chains_min_seqlen_k"]
    assert set(limits) == set(lows) == {str(d) for d in info["backward_head_dims"]}
    assert all(limit >= 0 for limit in limits.values()), limits
    mha = [seqlen for seqlen, heads_q, heads_kv, *_ in determinism.SHAPES if heads_q == heads_kv]
    for head_dim, limit in limits.items():
        low = lows[head_dim]
        assert any(s > limit for s in mha), (head_dim, limit, mha)
        assert limit == 0 or any(low < s <= limit for s in mha), (head_dim, low, limit, mha)
        assert low == 0 or any(s <= low for s in mha), (head_dim, low, mha)


def test_determinism_shapes_fall_on_both_sides_of_the_backward_pairs_limits(ext):
    """Without a causal mask, MHA backwards of head_dims that pair key blocks run unpaired up to a seqlen_k
    (dhp_build_info), paired beyond it, with two dQ chains up to the chains' limit: the determinism audit must run
    each of these summations."""
    from dhp import _native

    info = _native.build_info()
    unpaired, chains = info["backward_unpaired_max_seqlen_k"], info["backward_two_dq_chains_max_seqlen_k"]
    lows = info["backward_two_dq_chains_min_seqlen_k"]
    mha = [seqlen for seqlen, heads_q, heads_kv, *_ in determinism.SHAPES if heads_q == heads_kv]
    for head_dim, limit in unpaired.items():
        assert limit == 0 or any(s <= limit for s in mha), (head_dim, limit, mha)
        assert any(s > limit for s in mha), (head_dim, limit, mha)
        low = max(limit, lows[head_dim])
        if chains[head_dim] > low:
            assert any(low < s <= chains[head_dim] for s in mha), (head_dim, low, chains[head_dim], mha)


@pytest.mark.parametrize("tool", ["counters", "determinism"])
def test_audit_shapes_fall_on_both_sides_of_the_backward_split_walks_limits(ext, tool):
    """A causal MHA backward splits the walks of its heaviest key blocks from a seqlen_q on (dhp_build_info; 0: never):
    both audits must run the split and the unsplit walks at every head_dim that has both."""
    from dhp import _native

    info = _native.build_info()
    limits = info["backward_causal_split_walks_over"]
    assert set(limits) == {str(d) for d in info["backward_head_dims"]}
    shapes = [(s[1], s[2], s[3]) for s in counters.SHAPES] if tool == "counters" else [s[:3] for s in determinism.SHAPES]
    mha = [seqlen for seqlen, heads_q, heads_kv in shapes if heads_q == heads_kv]
    for head_dim, rows in limits.items():
        if rows:
            assert any(s <= rows for s in mha) and any(s > rows for s in mha), (tool, head_dim, rows, mha)


@pytest.mark.parametrize("tool", ["counters", "determinism"])
def test_audit_shapes_fall_on_both_sides_of_the_causal_pairs_limit(ext, tool):
    """A causal GQA backward runs its key blocks heavy first, in pairs, and each key block's walk in two halves of the
    query heads, from numbers of query heads per K/V head on (dhp_build_info; pairs 1: always; halves 0: never): both
    audits must
    run GQA shapes on both sides of each at every head_dim where it is above 1, a paired one with an odd number of key
    blocks (a cluster with one key block), and one in halves without pairs where halves start lower."""
    from dhp import _native

    info = _native.build_info()
    groups = info["backward_causal_paired_min_group"]
    shapes = [(s[1], s[2], s[3]) for s in counters.SHAPES] if tool == "counters" else [s[:3] for s in determinism.SHAPES]
    gqa = [(seqlen, heads_q // heads_kv) for seqlen, heads_q, heads_kv in shapes if heads_q > heads_kv]
    for head_dim, group in groups.items():
        if group > 1:
            assert any(g < group for _, g in gqa), (tool, head_dim, group, gqa)
            # (head_dim 128: 128-key blocks)
            assert any(g >= group and -(-s // 128) % 2 == 1 for s, g in gqa), (tool, head_dim, group, gqa)
    # heavy first, likewise (MHA shapes below every limit)
    every = [heads_q // heads_kv for _, heads_q, heads_kv in shapes]
    for head_dim, group in info["backward_causal_heavy_first_min_group"].items():
        if group > 1:
            assert any(g < group for g in every) and any(g >= group for g in every), (tool, head_dim, group, every)
    # the walks in halves of the query heads, likewise
    for head_dim, group in info["backward_causal_head_halves_min_group"].items():
        if group > 1:
            assert any(g < group for _, g in gqa) and any(g >= group for _, g in gqa), (tool, head_dim, group, gqa)
            paired_from = groups.get(head_dim, 0)
            if paired_from > group:  # halves without pairs, too
                assert any(group <= g < paired_from for _, g in gqa), (tool, head_dim, group, paired_from, gqa)


def test_shapes_option_narrows_the_ncu_checks(monkeypatch, capsys):
    """--shapes (counters, instructions) profiles the shapes given instead of SHAPES, --quick the first of them;
    a malformed shape is argparse's error (exit 2) naming it."""
    from dhp import _native
    from dhp.audit.__main__ import main

    assert counters.parse_shapes("1,300,2,1,8300; 1,4200,2,2") == ((1, 300, 2, 1, 8300), (1, 4200, 2, 2))
    for bad in ("1,300,2", "1,300,2,1,8300,7", "1,0,2,2", "1,300,3,2", "1,x,2,2", ""):
        with pytest.raises(ValueError, match="is not batch,seqlen,heads_q,heads_kv"):
            counters.parse_shapes(bad)
    monkeypatch.setattr(counters, "find_ncu", lambda: "ncu")
    monkeypatch.setattr(inputs, "gpu_variants", lambda args: (["bfloat16"], [128]))
    monkeypatch.setattr(_native, "ext", lambda: argparse.Namespace(build_info=lambda: json.dumps({})))
    shapes = ((1, 300, 2, 1, 8300), (1, 4200, 2, 2))
    args = argparse.Namespace(dtypes=None, head_dims=None, quick=False, order=None, causal="false", shapes=shapes)
    assert [c["shape"] for c in counters.plan(args)[1]] == [list(s) for s in shapes]
    args.quick = True
    assert [c["shape"] for c in counters.plan(args)[1]] == [[1, 300, 2, 1, 8300]]
    args.shapes, args.quick = None, False
    assert [tuple(c["shape"]) for c in counters.plan(args)[1]] == list(counters.SHAPES)
    for check in ("counters", "instructions"):
        with pytest.raises(SystemExit) as exit_:
            main([check, "--shapes", "1,300,3,2"])
        assert exit_.value.code == 2 and "argument --shapes: '1,300,3,2' is not" in capsys.readouterr().err


def test_shapes_option_of_the_determinism_check(monkeypatch, capsys):
    """determinism --shapes checks the sequences given (no batch: the check builds its batches) instead of SHAPES,
    --causal one mask alone; a malformed sequence is argparse's error (exit 2) naming it."""
    from dhp import _native
    from dhp.audit.__main__ import main

    assert counters.parse_shapes("4096,16,16; 16,8,2,4500", batch=False) == ((4096, 16, 16), (16, 8, 2, 4500))
    for bad in ("4096,16", "1,4096,16,16,4096", "0,2,2", "300,3,2"):
        with pytest.raises(ValueError, match="is not seqlen,heads_q,heads_kv"):
            counters.parse_shapes(bad, batch=False)
    with pytest.raises(SystemExit) as exit_:
        main(["determinism", "--shapes", "300,3,2"])
    assert exit_.value.code == 2 and "argument --shapes: '300,3,2' is not seqlen" in capsys.readouterr().err

    calls = []
    monkeypatch.setattr(inputs, "gpu_variants", lambda args: (["bfloat16"], [128]))
    monkeypatch.setattr(inputs, "backward_head_dims", lambda: [])
    monkeypatch.setattr(_native, "ext", lambda: None)
    monkeypatch.setattr(determinism, "run_case", lambda torch, ext, direction, dtype, head_dim, causal, repeats,
                        seed, shapes: calls.append((direction, causal, shapes)) or [
                            determinism.compare("repeat", "run 1", {"out": "a"}, {"out": "a"})])
    cuda = types.SimpleNamespace(get_device_name=lambda: "test", empty_cache=lambda: None)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(no_grad=contextlib.nullcontext, cuda=cuda))
    assert main(["determinism", "--shapes", "4096,16,16;8192,32,32", "--causal", "true"]) == 0
    assert calls == [("fwd", True, ((4096, 16, 16), (8192, 32, 32)))]
    calls.clear()
    assert main(["determinism"]) == 0
    assert calls == [("fwd", False, determinism.SHAPES), ("fwd", True, determinism.SHAPES)]


@pytest.mark.parametrize("check", ["counters", "instructions", "timing", "determinism"])
def test_cli_exit_2_without_what_it_needs(check):
    """Where the GPU tool cannot run here, it exits 2 with a sentence (and never 0)."""
    problem = inputs.gpu_problem()
    if problem is None and (check not in ("counters", "instructions") or counters.find_ncu() is not None):
        pytest.skip(f"{check} can run here; the GPU tests below cover it")
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


def _backward_dims_or_skip():
    dims = inputs.backward_head_dims()
    if not dims:
        pytest.skip("this build has no backward (build_info lists no backward_head_dims)")
    return dims


def test_determinism_backward_on_gpu(torch_cuda, tmp_path):
    dims = _backward_dims_or_skip()
    out = tmp_path / "determinism-bwd.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "determinism", "--pass", "bwd", "--repeats", "2",
                           "--head-dims", str(dims[0]), "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(out.read_text())
    assert document["cases"] and all(c["pass"] == "backward" and c["outputs"] == ["dq", "dk", "dv"]
                                     for c in document["cases"])
    case = document["cases"][0]
    assert {c["check"] for c in case["checks"]} == {"repeat", "streams", "load", "batch"}
    assert len(case["checks"]) == len(determinism.SHAPES) * (2 + 2 + 2 + len(determinism.batch_layouts()))
    assert " bwd " in done.stdout


def test_timing_backward_quick_on_gpu(torch_cuda, tmp_path):
    _backward_dims_or_skip()
    out = tmp_path / "timing-bwd.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "timing", "--quick", "--pass", "bwd", "--peers",
                           "--launches", "200", "--block", "20", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=1200)
    if done.returncode == 2 and "no case to time" in done.stderr:
        pytest.skip("the quick variant's head_dim has no backward in this build")
    assert done.returncode in (0, 1), done.stdout + done.stderr  # too few launches for a verdict to mean much
    document = json.loads(out.read_text())
    assert document["cases"] and all(c["pass"] == "backward" for c in document["cases"])
    for case in document["cases"]:
        assert set(case["impls"]) == {"dhp", "cudnn", "flash"}
        dhp_result = case["impls"]["dhp"]
        assert dhp_result["analysis"]["classes"]["fixed"]["n"] == 200
        assert all("gpu_span_ms" in b for b in dhp_result["batches"])
        for peer in ("cudnn", "flash"):  # measured, or a sentence why not
            assert "analysis" in case["impls"][peer] or case["impls"][peer]["error"]


def test_instructions_quick_on_gpu(torch_cuda, tmp_path):
    if counters.find_ncu() is None:
        pytest.skip("Nsight Compute's ncu is not installed")
    out = tmp_path / "instructions.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "instructions", "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(out.read_text())
    assert document["verdict"] == "pass" and all(c["judgement"]["checked"] > 0 for c in document["cases"])


def test_counters_quick_on_gpu(torch_cuda, tmp_path):
    if counters.find_ncu() is None:
        pytest.skip("Nsight Compute's ncu is not installed")
    out = tmp_path / "counters.json"
    done = subprocess.run([sys.executable, "-m", "dhp.audit", "counters", "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
