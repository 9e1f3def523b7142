"""dhp.bench without a GPU, torch or the compiled module: cases and filters, arithmetic, table, JSON, plot.

The timing itself needs a GPU and is exercised by running `python -m dhp.bench` there; everything around it
(what runs, how rows, ratios and geometric means are computed, how they print, how the JSON reads back and
how a plot is redrawn from it) runs here. Only the plot tests need matplotlib, and skip without it. The GPU tests
at the end (what the backward's timed calls compute and launch) skip without a supported GPU.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dhp
import pytest
from dhp import bench

COMMITTED = Path(__file__).resolve().parent.parent / "bench" / "results" / "2026-11-25a-h100.json"  # schema 1: the oldest committed results


def _fake_native(dtypes=("bfloat16", "float16"), head_dims=(64, 128, 256), backward_head_dims=(64, 128)):
    return SimpleNamespace(available=lambda: True, variants=lambda: (list(dtypes), list(head_dims)),
                           build_info=lambda: {"backward_head_dims": list(backward_head_dims)})


def _row(dtype="bfloat16", head_dim=128, seqlen=4096, causal=False, heads=None, ms=None, runs=None,
         direction="fwd"):
    heads_q, heads_kv = heads or (bench.WIDTH // head_dim,) * 2
    case = bench.Case(dtype, head_dim, bench.TOKENS // seqlen, seqlen, heads_q, heads_kv, causal, direction)
    if runs is not None:
        return bench.row_from_runs(case, runs)
    return bench.make_row(case, ms or {"dhp": 1.0, "cudnn": 1.1, "fa2": 2.0})


def _synthetic_results(spread=True, backward=False) -> dict:
    """bf16 and fp16 at head_dim 64 and 128, four seqlens, plus one GQA row; backward=True adds the same rows
    for the backward (dhp a bit slower against cuDNN there) and forward rows at head_dim 256 (no backward)."""
    rows = []
    directions = ("fwd", "bwd") if backward else ("fwd",)
    for direction in directions:
        head_dims = (64, 128, 256) if backward and direction == "fwd" else (64, 128)
        for dtype in ("bfloat16", "float16"):
            for head_dim in head_dims:
                for seqlen in (512, 1024, 4096, 8192):
                    for causal in (False, True):
                        scale = seqlen / 1024 * (0.5 if causal else 1.0) * (2.5 if direction == "bwd" else 1.0)
                        slower = 1.2 if direction == "bwd" else 1.0
                        runs = {"dhp": [scale * slower * t for t in (1.0, 1.02, 0.99)],
                                "cudnn": [scale * t for t in (1.1, 1.12, 1.09)],
                                "fa2": None if head_dim == 64 and seqlen == 8192 else [2.0 * scale] * 3}
                        rows.append(_row(dtype, head_dim, seqlen, causal, runs=runs, direction=direction))
        rows.append(_row("bfloat16", 128, 4096, False, heads=(32, 8), runs={"dhp": [1.0], "cudnn": [1.1], "fa2": [2.0]},
                         direction=direction))
    if not spread:
        for row in rows:
            row.pop("spread", None)
    env = {"device": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "torch": "2.11.0", "cudnn": 91900,
           "dhp": "0.1.0", "date": "2026-11-25T16:29:17+00:00"}
    return bench.make_results(env, {"reps": 3, "warmup": 1}, rows)


# --- imports -------------------------------------------------------------------------------------------------

def test_import_needs_neither_torch_nor_matplotlib():
    package_root = str(Path(dhp.__file__).resolve().parent.parent)
    code = ("import sys, dhp.bench, dhp.bench_plot; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- cases and filters ---------------------------------------------------------------------------------------

def test_default_cases_are_the_papers_family_plus_gqa():
    all_cases = bench.cases(["bfloat16", "float16"], [64, 128, 256])
    assert len(all_cases) == 2 * 3 * 6 * 2 + 2 * 2  # dtypes x head_dims x seqlens x masks, + GQA
    assert len(set(all_cases)) == len(all_cases)
    for case in all_cases:
        assert case.batch * case.seqlen == bench.TOKENS
        if case.heads_q == case.heads_kv:
            assert case.heads_q * case.head_dim == bench.WIDTH
    gqa = [c for c in all_cases if c.heads_q != c.heads_kv]
    assert {(c.dtype, c.head_dim, c.seqlen, c.heads_q, c.heads_kv) for c in gqa} == {
        ("bfloat16", 128, 4096, 32, 8), ("float16", 128, 4096, 32, 8)}


def test_quick_is_a_small_subset():
    quick = bench.cases(["bfloat16", "float16"], [64, 128, 256], quick=True)
    assert [c.name for c in quick] == [
        "bf16 d128 b16 s1024 h16", "bf16 d128 b16 s1024 h16 causal",
        "bf16 d128 b4 s4096 h16", "bf16 d128 b4 s4096 h16 causal",
        "bf16 d128 b4 s4096 h32/8", "bf16 d128 b4 s4096 h32/8 causal",
    ]
    assert bench.select_cases(["bfloat16", "float16"], [64, 128, 256], quick=True) == quick


def test_filters_narrow_the_run():
    built = (["bfloat16", "float16"], [64, 128, 256])
    chosen = bench.select_cases(*built, dtypes=["float16"], head_dims=[64, 256], seqlens=[2048, 512], causal="yes")
    assert {c.dtype for c in chosen} == {"float16"}
    assert {c.head_dim for c in chosen} == {64, 256}
    assert [c.seqlen for c in chosen if c.head_dim == 64] == [512, 2048]  # sorted
    assert all(c.causal for c in chosen)
    assert not [c for c in chosen if c.heads_q != c.heads_kv]  # no head_dim 128: no GQA
    assert len(chosen) == 1 * 2 * 2 * 1

    no_gqa = bench.select_cases(*built, head_dims=[128], seqlens=[1024], causal="no")
    assert [c.name for c in no_gqa] == ["bf16 d128 b16 s1024 h16", "fp16 d128 b16 s1024 h16"]  # 4k not in run
    odd = bench.select_cases(*built, dtypes=["bfloat16"], head_dims=[64], seqlens=[3000, 32768], causal="no")
    assert [(c.batch, c.seqlen) for c in odd] == [(5, 3000), (1, 32768)]  # batch = 16k // seqlen, at least 1


def test_quick_fills_only_what_the_filters_leave_open():
    built = (["bfloat16", "float16"], [64, 128, 256])
    chosen = bench.select_cases(*built, dtypes=["float16"], quick=True)
    assert {(c.dtype, c.head_dim) for c in chosen} == {("float16", 128)}
    assert {c.seqlen for c in chosen} == set(bench.QUICK_SEQLENS)
    chosen = bench.select_cases(*built, head_dims=[64], seqlens=[8192], quick=True)
    assert [c.name for c in chosen] == ["bf16 d64 b2 s8192 h32", "bf16 d64 b2 s8192 h32 causal"]


def test_filters_outside_the_build_are_refused():
    with pytest.raises(ValueError, match="head_dim 96 not in this build"):
        bench.select_cases(["bfloat16"], [64, 128], head_dims=[96])
    with pytest.raises(ValueError, match="dtype float16 not in this build"):
        bench.select_cases(["bfloat16"], [64, 128], dtypes=["float16"])


def test_backward_cases_follow_the_forwards_for_the_backward_head_dims():
    built = (["bfloat16", "float16"], [64, 128, 256])
    both = bench.select_cases(*built, direction="both", backward_head_dims=[64, 128])
    forward = bench.select_cases(*built)  # the default of the function: forward only
    assert both[:len(forward)] == forward
    backward = both[len(forward):]
    assert {c.direction for c in forward} == {"fwd"} and {c.direction for c in backward} == {"bwd"}
    assert {c.head_dim for c in backward} == {64, 128}
    assert [c.name for c in backward] == [c.name + " bwd" for c in forward if c.head_dim != 256]
    assert len(backward) == 2 * 2 * 6 * 2 + 2 * 2  # dtypes x backward head_dims x seqlens x masks, + GQA
    assert bench.select_cases(*built, direction="bwd", backward_head_dims=[64, 128]) == backward

    quick = bench.select_cases(*built, quick=True, direction="both", backward_head_dims=[64, 128])
    assert [c.name for c in quick] == [
        "bf16 d128 b16 s1024 h16", "bf16 d128 b16 s1024 h16 causal",
        "bf16 d128 b4 s4096 h16", "bf16 d128 b4 s4096 h16 causal",
        "bf16 d128 b4 s4096 h32/8", "bf16 d128 b4 s4096 h32/8 causal",
        "bf16 d128 b16 s1024 h16 bwd", "bf16 d128 b16 s1024 h16 causal bwd",
        "bf16 d128 b4 s4096 h16 bwd", "bf16 d128 b4 s4096 h16 causal bwd",
        "bf16 d128 b4 s4096 h32/8 bwd", "bf16 d128 b4 s4096 h32/8 causal bwd",
    ]
    only_64 = bench.select_cases(*built, quick=True, direction="bwd", backward_head_dims=[64])
    assert {(c.head_dim, c.direction) for c in only_64} == {(64, "bwd")}  # quick takes 128 only where it exists

    # A head_dim without a backward: forward only under "both", refused under "bwd".
    wide = bench.select_cases(*built, head_dims=[256], seqlens=[1024], direction="both", backward_head_dims=[64, 128])
    assert [c.name for c in wide] == ["bf16 d256 b16 s1024 h8", "bf16 d256 b16 s1024 h8 causal",
                                      "fp16 d256 b16 s1024 h8", "fp16 d256 b16 s1024 h8 causal"]
    with pytest.raises(ValueError, match=r"head_dim 256 not in this build \(its backward has 64, 128\)"):
        bench.select_cases(*built, head_dims=[256], direction="bwd", backward_head_dims=[64, 128])
    assert bench.select_cases(*built, direction="bwd", backward_head_dims=[]) == []
    # The backward's inputs come from dhp's forward: a backward head_dim without a forward is not run.
    chosen = bench.select_cases(["bfloat16"], [64], direction="bwd", backward_head_dims=[64, 96])
    assert {c.head_dim for c in chosen} == {64}


def test_parsers():
    assert bench.parse_dtypes("bf16, fp16") == ["bfloat16", "float16"]
    assert bench.parse_dtypes("bfloat16,half") == ["bfloat16", "float16"]
    assert bench.parse_ints("512,1k,4096,16K") == [512, 1024, 4096, 16384]
    assert bench.parse_backends("fa2") == ["dhp", "fa2"]
    assert bench.parse_backends("fa2,dhp,cudnn") == ["dhp", "cudnn", "fa2"]
    for parse, text in ((bench.parse_dtypes, "fp32"), (bench.parse_ints, "12x"), (bench.parse_ints, "0"),
                        (bench.parse_backends, "xformers"), (bench.parse_ints, ",")):
        with pytest.raises(Exception, match=r"unknown|whole|positive|empty"):
            parse(text)


def test_fa3_joins_where_its_module_is_installed(monkeypatch):
    monkeypatch.setattr(bench, "fa3_available", lambda: False)
    assert bench.default_backends() == ["dhp", "cudnn", "fa2"]
    with pytest.raises(Exception, match="fa3 needs FlashAttention-3's flash_attn_interface module"):
        bench.parse_backends("cudnn,fa3")
    monkeypatch.setattr(bench, "fa3_available", lambda: True)
    assert bench.default_backends() == ["dhp", "cudnn", "fa2", "fa3"]
    assert bench.parse_backends("fa3,cudnn") == ["dhp", "cudnn", "fa3"]
    assert bench.format_header(["dhp", "fa3"]).split()[-3:] == ["FA3", "/FA3", "iqr%"]


def test_cli_list_and_bad_filters(monkeypatch, capsys):
    monkeypatch.setattr(bench, "fa3_available", lambda: False)
    monkeypatch.setattr(bench, "_native", _fake_native(("bfloat16",), (64, 128)))
    assert bench.main(["--list", "--head-dims", "128", "--seqlens", "4k", "--backends", "cudnn"]) == 0
    out = capsys.readouterr().out.splitlines()
    forward = ["bf16 d128 b4 s4096 h16", "bf16 d128 b4 s4096 h16 causal", "bf16 d128 b4 s4096 h32/8",
               "bf16 d128 b4 s4096 h32/8 causal"]
    assert out == forward + [name + " bwd" for name in forward] + ["8 cases; backends dhp,cudnn"]  # both: default
    assert bench.main(["--list", "--head-dims", "128", "--seqlens", "4k", "--direction", "fwd"]) == 0
    assert capsys.readouterr().out.splitlines() == forward + ["4 cases; backends dhp,cudnn,fa2"]
    for argv in (["--list", "--dtypes", "fp16"], ["--list", "--head-dims", "256"], ["--causal", "maybe"],
                 ["--reps", "0"], ["--direction", "sideways"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2


def test_cli_without_torch_says_so(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_native", _fake_native())
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert bench.main(["--quick"]) == 2
    assert "needs torch" in capsys.readouterr().err


def test_cli_run_writes_table_json_and_plot(monkeypatch, tmp_path, capsys):
    """The run loop with the GPU parts replaced: progress, table, summary, JSON and plot from one command."""
    import contextlib

    fake_torch = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True), no_grad=contextlib.nullcontext)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(bench, "_native", _fake_native())
    monkeypatch.setattr(bench, "environment", lambda torch: {"device": "GPU", "driver": "1", "torch": "2",
                                                             "torch_cuda": "13", "cudnn": 91900, "dhp": "0"})
    timed = []

    def fake_runs(torch, case, backends, reps, warmup, on_backend=None):
        for name in backends:
            on_backend(name)
        timed.append((case.name, tuple(backends), reps, warmup))
        return {name: [case.seqlen / 1000 * (1.0 if name == "dhp" else 1.2)] * reps for name in backends}

    monkeypatch.setattr(bench, "measure_runs", fake_runs)
    out_json = tmp_path / "run.json"
    base = ["--dtypes", "fp16", "--head-dims", "64", "--seqlens", "512,4k", "--backends", "cudnn", "--reps", "4",
            "--warmup", "2"]
    argv = base + ["--out", str(out_json)]
    plotting = bool(_has_matplotlib())
    if plotting:
        argv += ["--plot", str(tmp_path / "run.png")]
    assert bench.main(argv) == 0
    forward = ["fp16 d64 b32 s512 h32", "fp16 d64 b32 s512 h32 causal", "fp16 d64 b4 s4096 h32",
               "fp16 d64 b4 s4096 h32 causal"]
    assert timed == [(name, ("dhp", "cudnn"), 4, 2) for name in forward + [n + " bwd" for n in forward]]
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 8 and captured.err.startswith("[1/8] fp16 d64 b32 s512 h32 ...")
    lines = captured.out.splitlines()
    assert lines[1] == bench.format_header(["dhp", "cudnn"])
    assert lines[2].startswith("fp16 d64 b32 s512 h32 ") and lines[2].split()[-2:] == ["1.20", "0.0"]
    assert lines[6].startswith("fp16 d64 b32 s512 h32 bwd ") and lines[6].split()[-2:] == ["1.20", "0.0"]
    assert any(line.startswith("geometric mean: dhp/cudnn 1.200 (forward dhp/cudnn 1.200; backward") for line in lines)
    results = bench.load_results(out_json)
    assert results["schema"] == bench.SCHEMA
    assert results["settings"]["backends"] == ["dhp", "cudnn"] and results["settings"]["seqlens"] == [512, 4096]
    assert results["settings"]["direction"] == "both" and results["settings"]["timing"] == "interleaved"
    assert [row["direction"] for row in results["rows"]] == ["fwd"] * 4 + ["bwd"] * 4
    assert results["rows"][4]["flops"] == 2.5 * results["rows"][0]["flops"]
    assert results["geomean"] == {"dhp/cudnn": pytest.approx(1.2)}
    assert list(results["geomean_by"]) == ["fp16 d64", "all fwd", "fp16 d64 bwd", "all bwd", "all"]
    assert results["rows"][0]["spread"]["dhp"] == {"min": 0.512, "p25": 0.512, "p75": 0.512, "max": 0.512}
    if plotting:
        _assert_png(tmp_path / "run.png")

    timed.clear()  # one direction: the run, rows and summary of before the backward
    assert bench.main(base + ["--direction", "fwd"]) == 0
    assert [name for name, *_ in timed] == forward
    timed.clear()
    assert bench.main(base + ["--direction", "bwd"]) == 0
    assert [name for name, *_ in timed] == [n + " bwd" for n in forward]
    out = capsys.readouterr().out
    assert "(forward" not in out and "fp16 d64 bwd" in out
    with pytest.raises(SystemExit):  # no backward at head_dim 256 (in the fake build)
        bench.main(["--direction", "bwd", "--head-dims", "256"])
    assert "its backward has 64, 128" in capsys.readouterr().err


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --- arithmetic ----------------------------------------------------------------------------------------------

def test_flops_tflops_and_ratios():
    case = bench.Case("bfloat16", 128, 4, 4096, 16, 16, False)
    assert case.flops == 4.0 * 4 * 16 * 4096 * 4096 * 128
    causal = bench.Case("bfloat16", 128, 4, 4096, 16, 16, True)
    assert causal.flops == case.flops / 2
    row = bench.make_row(case, {"dhp": 1.0, "cudnn": 1.25, "fa2": None})
    assert row["tflops"]["dhp"] == pytest.approx(case.flops / 1e-3 / 1e12)
    assert row["tflops"]["cudnn"] == pytest.approx(row["tflops"]["dhp"] / 1.25)
    assert row["tflops"]["fa2"] is None
    assert row["ratios"] == {"dhp/cudnn": pytest.approx(1.25), "dhp/fa2": None}
    assert "spread" not in row  # the form dhp's self-check (python -m dhp) uses
    for key in ("case", "dtype", "head_dim", "batch", "seqlen", "heads_q", "heads_kv", "causal", "flops", "ms"):
        assert key in row


def test_backward_flops_are_two_and_a_half_forwards():
    forward = bench.Case("bfloat16", 128, 4, 4096, 16, 16, False)
    backward = bench.Case("bfloat16", 128, 4, 4096, 16, 16, False, "bwd")
    assert backward.flops == 2.5 * forward.flops == 2.5 * 4.0 * 4 * 16 * 4096 * 4096 * 128
    causal = bench.Case("bfloat16", 128, 4, 4096, 16, 16, True, "bwd")
    assert causal.flops == backward.flops / 2
    gqa = bench.Case("float16", 128, 4, 4096, 32, 8, False, "bwd")
    assert gqa.flops == 2.5 * 4.0 * 4 * 32 * 4096 * 4096 * 128  # counted over the query heads
    row = bench.make_row(causal, {"dhp": 2.0, "cudnn": 1.0})
    assert row["direction"] == "bwd" and row["case"] == "bf16 d128 b4 s4096 h16 causal bwd"
    assert row["tflops"]["dhp"] == pytest.approx(causal.flops / 2e-3 / 1e12)
    assert row["ratios"] == {"dhp/cudnn": pytest.approx(0.5)}
    assert bench.make_row(forward, {"dhp": 1.0})["direction"] == "fwd"


def test_spread_and_medians():
    assert bench.spread_of([5.0, 1.0, 3.0, 2.0, 4.0]) == {"min": 1.0, "p25": 2.0, "p75": 4.0, "max": 5.0}
    assert bench.spread_of([2.5]) == {"min": 2.5, "p25": 2.5, "p75": 2.5, "max": 2.5}
    assert bench.spread_of(None) is None
    assert bench.medians({"dhp": [3.0, 1.0, 2.0], "fa2": None}) == {"dhp": 2.0, "fa2": None}
    row = _row(runs={"dhp": [1.1, 0.9, 1.0, 1.2, 1.0], "cudnn": [2.0, 2.0, 2.0, 2.4, 1.6], "fa2": None})
    assert row["ms"] == {"dhp": 1.0, "cudnn": 2.0, "fa2": None}
    assert row["spread"]["cudnn"] == {"min": 1.6, "p25": 2.0, "p75": 2.0, "max": 2.4}
    assert row["spread"]["fa2"] is None
    assert row["ratios"]["dhp/cudnn"] == pytest.approx(2.0)
    assert bench.noise(row) == pytest.approx(0.1)  # dhp's IQR 1.0..1.1 over its median 1.0
    assert bench.noise(_row()) is None


def test_geomean_ratios():
    rows = [_row(ms={"dhp": 1.0, "cudnn": 2.0, "fa2": None}), _row(ms={"dhp": 2.0, "cudnn": 1.0, "fa2": 4.0}),
            _row(ms={"dhp": 1.0, "cudnn": 8.0, "fa2": 8.0})]
    means = bench.geomean_ratios(rows)
    assert means["dhp/cudnn"] == pytest.approx((2.0 * 0.5 * 8.0) ** (1 / 3))
    assert means["dhp/fa2"] == pytest.approx(math.sqrt(2.0 * 8.0))  # the refused case is left out
    assert bench.geomean_ratios([_row(ms={"dhp": 1.0, "fa2": None})]) == {"dhp/fa2": None}


def test_geomean_by_variant_and_seqlen_bucket():
    rows = [
        _row("bfloat16", 64, 512, ms={"dhp": 1.0, "cudnn": 0.5}),  # ratio 0.5
        _row("bfloat16", 64, 2048, ms={"dhp": 1.0, "cudnn": 2.0}),  # 2.0
        _row("bfloat16", 64, 8192, ms={"dhp": 1.0, "cudnn": 1.21}),  # 1.21
        _row("float16", 128, 4096, ms={"dhp": 1.0, "cudnn": 1.1}),  # 1.1
        _row("float16", 128, 4096, heads=(32, 8), ms={"dhp": 1.0, "cudnn": 0.9}),  # 0.9, GQA group
        _row("float16", 128, 256, ms={"dhp": 1.0, "cudnn": 3.0}),  # 3.0, outside every bucket
    ]
    by = bench.geomean_by(rows)
    assert list(by) == ["bf16 d64", "fp16 d128", "fp16 d128 gqa", "all"]
    assert by["bf16 d64"]["512-2k"]["dhp/cudnn"] == pytest.approx(1.0)
    assert by["bf16 d64"]["4k+"]["dhp/cudnn"] == pytest.approx(1.21)
    assert by["bf16 d64"]["all"]["dhp/cudnn"] == pytest.approx(1.21 ** (1 / 3))
    assert "512-2k" not in by["fp16 d128 gqa"]
    assert by["fp16 d128"]["all"]["dhp/cudnn"] == pytest.approx(math.sqrt(1.1 * 3.0))
    assert by["all"]["4k+"]["dhp/cudnn"] == pytest.approx((1.21 * 1.1 * 0.9) ** (1 / 3))
    assert by["all"]["all"] == bench.geomean_ratios(rows)
    assert bench.bucket_of(512) == "512-2k" and bench.bucket_of(2048) == "512-2k"
    assert bench.bucket_of(4096) == "4k+" and bench.bucket_of(3000) is None


def test_geomean_by_direction():
    rows = [
        _row("bfloat16", 128, 1024, ms={"dhp": 1.0, "cudnn": 2.0}),  # fwd 2.0
        _row("bfloat16", 128, 4096, ms={"dhp": 1.0, "cudnn": 0.5}),  # fwd 0.5
        _row("bfloat16", 64, 4096, ms={"dhp": 1.0, "cudnn": 0.8}, direction="bwd"),  # bwd 0.8
        _row("bfloat16", 128, 4096, ms={"dhp": 1.0, "cudnn": 0.9}, direction="bwd"),  # bwd 0.9
        _row("bfloat16", 128, 4096, heads=(32, 8), ms={"dhp": 1.0, "cudnn": 1.25}, direction="bwd"),  # bwd 1.25
    ]
    assert [bench.variant_of(row) for row in rows] == ["bf16 d128", "bf16 d128", "bf16 d64 bwd", "bf16 d128 bwd",
                                                       "bf16 d128 gqa bwd"]
    by = bench.geomean_by(rows[::-1])  # the order of the groups does not follow the rows'
    assert list(by) == ["bf16 d128", "all fwd", "bf16 d64 bwd", "bf16 d128 bwd", "bf16 d128 gqa bwd", "all bwd", "all"]
    assert by["all fwd"]["all"]["dhp/cudnn"] == pytest.approx(1.0)
    assert by["all fwd"]["4k+"]["dhp/cudnn"] == pytest.approx(0.5)
    assert by["all bwd"]["all"]["dhp/cudnn"] == pytest.approx((0.8 * 0.9 * 1.25) ** (1 / 3))
    assert "512-2k" not in by["all bwd"]
    assert by["all"]["all"] == bench.geomean_ratios(rows)
    old = {key: value for key, value in rows[0].items() if key != "direction"}  # a row of schema 1 or 2
    assert bench.direction_of(old) == "fwd" and bench.variant_of(old) == "bf16 d128"
    assert list(bench.geomean_by([old, rows[1]])) == ["bf16 d128", "all"]


# --- output --------------------------------------------------------------------------------------------------

def test_table_formatting():
    row = _row(runs={"dhp": [1.0, 1.0, 1.2], "cudnn": [1.25] * 3, "fa2": None})
    three = ["dhp", "cudnn", "fa2"]
    header, line = bench.format_header(three), bench.format_row(row, three)
    assert len(header) == len(line)
    assert header.split() == ["case", "(TFLOP/s)", "dhp", "cuDNN", "FA2", "/cuDNN", "/FA2", "iqr%"]
    cells = line[36:].split()
    assert cells[0] == f"{row['tflops']['dhp']:.1f}" and cells[2] == "-"
    assert cells[3:] == ["1.25", "-", "10.0"]
    assert line.startswith(row["case"])
    two = bench.format_row(row, ["dhp", "cudnn"])
    assert len(two) == len(bench.format_header(["dhp", "cudnn"]))
    assert two[36:].split()[-2:] == ["1.25", "10.0"]


def test_summary_formatting():
    results = _synthetic_results()
    lines = bench.format_summary(results["geomean_by"])
    assert lines[0].split()[-3:] == ["512-2k", "4k+", "all"]
    assert lines[1].split() == ["/cuDNN", "/FA2"] * 3
    by_name = {line[:28].strip(): line[28:].split() for line in lines[2:]}
    assert list(by_name) == list(results["geomean_by"])
    assert by_name["all"][4] == f"{results['geomean']['dhp/cudnn']:.3f}"
    assert by_name["bf16 d128 gqa"] == ["-", "-", "1.100", "2.000", "1.100", "2.000"]  # no 512-2k case
    out = io.StringIO()
    bench.print_results(results, out)
    assert out.getvalue().count("\n") == 1 + len(results["rows"]) + 1 + len(lines) + 1


def test_summary_with_both_directions():
    results = _synthetic_results(backward=True)
    lines = bench.format_summary(results["geomean_by"])
    names = [line[:28].strip() for line in lines[2:]]
    assert names == ["bf16 d64", "bf16 d128", "bf16 d128 gqa", "bf16 d256", "fp16 d64", "fp16 d128", "fp16 d256",
                     "all fwd", "bf16 d64 bwd", "bf16 d128 bwd", "bf16 d128 gqa bwd", "fp16 d64 bwd", "fp16 d128 bwd",
                     "all bwd", "all"]
    by_name = {line[:28].strip(): line[28:].split() for line in lines[2:]}
    assert by_name["all bwd"][4] == f"{results['geomean_by']['all bwd']['all']['dhp/cudnn']:.3f}"
    assert results["geomean_by"]["all bwd"]["all"]["dhp/cudnn"] < results["geomean_by"]["all fwd"]["all"]["dhp/cudnn"]
    out = io.StringIO()
    bench.print_results(results, out)
    text = out.getvalue()
    assert "bf16 d128 b4 s4096 h32/8 bwd" in text
    last = text.splitlines()[-1]
    assert last.startswith("geometric mean: dhp/cudnn ")
    assert "(forward dhp/cudnn " in last and "; backward dhp/cudnn " in last
    table = text.splitlines()[1:1 + len(results["rows"])]
    assert [line.split()[0:5] for line in table] == [row["case"].split()[0:5] for row in results["rows"]]
    assert all(len(line) == len(table[0]) for line in table)  # the longest case names fit the case column


def test_progress_display():
    plain = io.StringIO()
    progress = bench.Progress(3, plain, tty=False)
    progress.show(1, "bf16 d128 b4 s4096 h16")
    progress.show(1, "bf16 d128 b4 s4096 h16", "cudnn")  # off a terminal: one line per case only
    progress.clear()
    progress.show(2, "bf16 d128 b4 s4096 h16 causal")
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/3] bf16 d128 b4 s4096 h16 ... (0:00 elapsed)")
    assert lines[1].startswith("[2/3] bf16 d128 b4 s4096 h16 causal ...") and "left)" in lines[1]
    term = io.StringIO()
    progress = bench.Progress(3, term, tty=True)
    progress.show(1, "case one")
    progress.show(1, "case one", "fa2")
    progress.clear()
    text = term.getvalue()
    assert "\n" not in text
    assert text.count("\r\x1b[K") == 3 and "[1/3] case one: fa2" in text
    assert bench._clock(3725) == "1:02:05" and bench._clock(61.4) == "1:01"


def test_json_round_trip(tmp_path):
    results = _synthetic_results()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results, indent=1))
    loaded = bench.load_results(path)
    assert loaded == json.loads(json.dumps(results))
    assert loaded["schema"] == bench.SCHEMA
    assert set(loaded) >= {"environment", "settings", "rows", "geomean", "geomean_by"}
    assert all(set(row["spread"]) == set(row["ms"]) for row in loaded["rows"])


def test_old_json_without_spread_or_summary_loads(tmp_path):
    results = _synthetic_results(spread=False)
    old = {key: results[key] for key in ("environment", "settings", "rows", "geomean")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = bench.load_results(path)
    assert loaded["geomean_by"] == json.loads(json.dumps(results["geomean_by"]))
    assert "-" == bench.format_row(loaded["rows"][0]).split()[-1]  # no spread: no noise figure


def test_json_round_trip_with_the_backward(tmp_path):
    results = _synthetic_results(backward=True)
    path = tmp_path / "both.json"
    path.write_text(json.dumps(results, indent=1))
    loaded = bench.load_results(path)
    assert loaded == json.loads(json.dumps(results))
    backward = [row for row in loaded["rows"] if row["direction"] == "bwd"]
    assert len(backward) == 2 * 2 * 4 * 2 + 1 and {row["head_dim"] for row in backward} == {64, 128}
    assert all(row["case"].endswith(" bwd") for row in backward)


def test_json_before_the_backward_reads_as_forward(tmp_path):
    results = _synthetic_results()
    for row in results["rows"]:
        del row["direction"]
    results["schema"] = 2
    path = tmp_path / "schema2.json"
    path.write_text(json.dumps(results))
    loaded = bench.load_results(path)
    assert {row["direction"] for row in loaded["rows"]} == {"fwd"}
    assert loaded["geomean_by"] == json.loads(json.dumps(results["geomean_by"]))
    assert bench.geomean_by(loaded["rows"]) == loaded["geomean_by"]


@pytest.mark.skipif(not COMMITTED.exists(), reason="bench/results not in this tree")
def test_committed_results_load():
    loaded = bench.load_results(COMMITTED)
    assert len(loaded["rows"]) == 76
    assert loaded["geomean_by"]["all"]["all"]["dhp/cudnn"] == pytest.approx(loaded["geomean"]["dhp/cudnn"])
    assert set(loaded["geomean_by"]) >= {"bf16 d64", "bf16 d128", "bf16 d256", "fp16 d128 gqa", "all"}
    assert {row["direction"] for row in loaded["rows"]} == {"fwd"}


# --- plot ----------------------------------------------------------------------------------------------------

def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_from_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    source = tmp_path / "small.json"
    source.write_text(json.dumps(_synthetic_results()))
    target = tmp_path / "small-plot.png"
    assert bench.main(["--plot-from", str(source), "--plot", str(target)]) == 0
    _assert_png(target)
    out = capsys.readouterr().out
    assert "bf16 d64 b32 s512 h32" in out and f"wrote {target}" in out
    assert bench.main(["--plot-from", str(source)]) == 0  # default target: the JSON's name, .png
    _assert_png(tmp_path / "small.png")


@pytest.mark.skipif(not COMMITTED.exists(), reason="bench/results not in this tree")
def test_plot_from_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "h100.png"
    assert bench.main(["--plot-from", str(COMMITTED), "--plot", str(target)]) == 0
    _assert_png(target)


def test_plot_pieces():
    from dhp import bench_plot

    rows = _synthetic_results()["rows"]
    assert bench_plot.panels(rows) == (["bfloat16", "float16"], [64, 128])
    x, y = bench_plot.series(rows, "bfloat16", 64, "fa2", False)
    assert x == [512, 1024, 4096]  # 8192 refused; the GQA row is not on the line
    assert y == sorted(y, reverse=True) or len(y) == 3
    assert bench_plot.seqlen_label(16384) == "16k" and bench_plot.seqlen_label(3000) == "3000"
    assert bench_plot.cudnn_version(91900) == "9.19.0" and bench_plot.cudnn_version(8902) == "8.9.2"
    title = bench_plot.title({"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-25T16:29:17+00:00", "cudnn": 91900})
    assert title.splitlines() == ["Attention forward, NVIDIA H100 80GB HBM3, 2026-11-25", "cuDNN 9.19.0"]


def test_plot_with_the_backward(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    source = tmp_path / "both.json"
    source.write_text(json.dumps(_synthetic_results(backward=True)))
    target = tmp_path / "both.png"
    assert bench.main(["--plot-from", str(source), "--plot", str(target)]) == 0
    _assert_png(target)
    assert "bf16 d64 b32 s512 h32 causal bwd" in capsys.readouterr().out
    only = _synthetic_results(backward=True)
    only["rows"] = [row for row in only["rows"] if row["direction"] == "bwd"]
    from dhp import bench_plot

    bench_plot.plot(only, str(tmp_path / "bwd.png"))  # a backward-only run
    _assert_png(tmp_path / "bwd.png")


def test_plot_pieces_with_the_backward():
    from dhp import bench_plot

    rows = _synthetic_results(backward=True)["rows"]
    assert bench_plot.directions(rows) == ["fwd", "bwd"]
    assert bench_plot.panels(rows) == (["bfloat16", "float16"], [64, 128, 256])
    assert bench_plot.panels(rows, "bwd") == (["bfloat16", "float16"], [64, 128])
    x, y = bench_plot.series(rows, "bfloat16", 128, "dhp", True, "bwd")
    x_fwd, y_fwd = bench_plot.series(rows, "bfloat16", 128, "dhp", True)
    assert x == x_fwd == [512, 1024, 4096, 8192]
    assert all(b < f for b, f in zip(y, y_fwd))  # the synthetic backward runs at 1/1.2 of the forward's rate
    assert bench_plot.series(rows, "bfloat16", 256, "dhp", False, "bwd") == ([], [])
    old = [{key: value for key, value in row.items() if key != "direction"}
           for row in rows if row["direction"] == "fwd"]
    assert bench_plot.directions(old) == ["fwd"]
    assert bench_plot.series(old, "bfloat16", 128, "dhp", True) == (x_fwd, y_fwd)
    title = bench_plot.title({"device": "NVIDIA H100 80GB HBM3"}, ["fwd", "bwd"])
    assert title == "Attention forward and backward, NVIDIA H100 80GB HBM3"


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_native", _fake_native())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--plot", "x.png"])
    assert exit_info.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err


# --- GPU: what the backward's timed calls compute and launch -------------------------------------------------

def _backward_case(ext, causal, heads):
    backward_dims = json.loads(ext.build_info()).get("backward_head_dims", [])
    if not backward_dims:
        pytest.skip("this build has no backward")
    head_dim = 128 if 128 in backward_dims else backward_dims[0]
    return bench.Case("bfloat16", head_dim, 2, 1024, heads[0], heads[1], causal, "bwd")


def _profile(torch, fn) -> tuple[list[str], list[str]]:
    """(GPU kernels, memsets and copies; aten ops on the host) of one call of fn, by name."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    gpu = [e.name for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    ops = [e.name for e in events if getattr(e, "device_type", None) == DeviceType.CPU and e.name.startswith("aten::")]
    return gpu, ops


def _relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_calls_compute_the_same_gradients_and_launch_only_the_backward(torch_cuda, ext, causal, heads):
    """Every side's timed backward call gets the same q, k, v, dout and computes the same gradients (so the
    timed work is the same), and launches backward kernels only: no forward recompute, no layout copy."""
    torch = torch_cuda
    case = _backward_case(ext, causal, heads)
    torch.manual_seed(0)
    q, k, v = bench.make_inputs(torch, case)
    dout = torch.randn_like(q)
    with torch.no_grad():  # as in the benchmark's run loop
        mine = [t.clone() for t in bench.timed_call(torch, "dhp", case, q, k, v, dout)()]
        kernels, _ = _profile(torch, bench.timed_call(torch, "dhp", case, q, k, v, dout))
        assert kernels and not [n for n in kernels if "fwd" in n.lower()], kernels
        assert any("attention_bwd" in n for n in kernels), kernels
        for peer in bench.default_backends()[1:]:
            try:
                fn = bench.timed_call(torch, peer, case, q, k, v, dout)
                theirs = fn()
                torch.cuda.synchronize()
            except RuntimeError:  # the benchmark records a refusal as None
                continue
            for name, a, b in zip(("dq", "dk", "dv"), mine, theirs):
                assert a.shape == b.shape, (peer, name)
                assert _relative_error(a, b) < 0.03, (peer, name, _relative_error(a, b))
            kernels, ops = _profile(torch, fn)
            assert kernels, peer
            forward = [n for n in kernels if any(w in n.lower() for w in ("fwd", "fprop", "forward"))]
            assert not forward, (peer, kernels)
            # The SDPA ops seen on the host (where the profiler follows autograd's thread) are backward ops.
            sdpa = [n for n in ops if "scaled_dot_product" in n or "flash_attention" in n or "cudnn_attention" in n]
            assert all("backward" in n for n in sdpa), (peer, sdpa)
            if heads[0] == heads[1]:  # GQA may legitimately reduce dk, dv over the group; MHA copies nothing
                assert not [n for n in kernels if "copy" in n.lower()], (peer, kernels)


def test_timed_runs_take_turns(monkeypatch):
    """Each backend is warmed up, then the backends take turns run by run, the round's first rotating; every run
    is a spin, a flush and the call between its two events."""
    log = []

    class Event:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            self.at = len(log)
            log.append("event")

        def elapsed_time(self, end):
            return float(end.at - self.at)

    class Flush:
        def zero_(self):
            log.append("flush")

    cuda = SimpleNamespace(Event=Event, current_device=lambda: 0, synchronize=lambda: log.append("sync"),
                           _sleep=lambda cycles: log.append("spin"))
    fake_torch = SimpleNamespace(cuda=cuda)
    monkeypatch.setattr(bench, "_flush_buffer", lambda torch, device: Flush())
    fns = {name: functools.partial(log.append, name) for name in ("dhp", "cudnn", "fa3")}
    runs = bench.time_runs_interleaved(fake_torch, fns, reps=4, warmup=2)
    calls = [entry for entry in log if entry in fns]
    assert calls[:6] == ["dhp", "dhp", "cudnn", "cudnn", "fa3", "fa3"]
    assert calls[6:] == ["dhp", "cudnn", "fa3", "cudnn", "fa3", "dhp", "fa3", "dhp", "cudnn", "dhp", "cudnn", "fa3"]
    timed = log[6:]
    assert timed[-1] == "sync" and timed[:-1] == [x for call in calls[6:] for x in ("spin", "flush", "event", call,
                                                                                      "event")]
    assert runs == {name: [2.0] * 4 for name in fns}  # each run's events enclose its call alone
    assert bench.time_runs(fake_torch, fns["dhp"], reps=2, warmup=0) == [2.0, 2.0]


def test_measure_runs_times_the_backward(torch_cuda, ext):
    torch = torch_cuda
    case = _backward_case(ext, True, (4, 4))
    with torch.no_grad():
        runs = bench.measure_runs(torch, case, reps=3, warmup=1)
    assert set(runs) == set(bench.default_backends())
    assert len(runs["dhp"]) == 3 and all(ms > 0 for ms in runs["dhp"])
    row = bench.row_from_runs(case, runs)
    assert row["direction"] == "bwd" and row["tflops"]["dhp"] > 0
    assert row["case"] == f"bf16 d{case.head_dim} b2 s1024 h4 causal bwd"


def test_peer_backward_call_runs_only_autograds_backward(monkeypatch):
    """The peers' timed backward, on the CPU with SDPA's math backend standing in for cuDNN: it builds the graph
    once, and each call returns the gradients of the same graph for dout without running the forward again."""
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(bench.SDPA_BACKENDS, "cudnn", "MATH")
    case = bench.Case("float32", 16, 2, 40, 4, 2, True, "bwd")  # GQA, causal
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, h, 16, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():  # as in the benchmark's run loop
        call = bench.timed_call(torch, "cudnn", case, q, k, v, dout)

    def no_forward(*args, **kwargs):
        raise AssertionError("the timed call ran the forward")

    monkeypatch.setattr(bench, "_sdpa_forward", no_forward)
    with torch.no_grad():
        first, second = call(), call()  # retain_graph: the graph serves every timed run
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    keys = torch.repeat_interleave(leaves[1], 2, dim=2)
    values = torch.repeat_interleave(leaves[2], 2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", leaves[0], keys) / 4.0
    scores = scores.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values)
    expected = torch.autograd.grad(out, leaves, dout)
    for got, again, want in zip(first, second, expected):
        assert got.shape == want.shape  # (batch, seqlen, heads, head_dim), as dhp's
        torch.testing.assert_close(got, want)
        assert torch.equal(got, again)


def _bench_script(name: str):
    """bench/<name>.py, loaded as a module (bench/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_model():
    """bench/grid_model.py, the list-scheduling model the docs quote: its tile list holds every (head, rank) once in
    tile_order.h's order, one head per section is head by head, and sections end the causal forward on light tiles."""
    model = _bench_script("grid_model")
    order = model.tile_list(6, 5, 3)
    assert sorted(order) == [(h, r) for h in range(6) for r in range(5)]
    assert order[:4] == [(0, 0), (1, 0), (2, 0), (0, 1)] and order[15] == (3, 0)
    assert model.tile_list(4, 3, 1) == [(h, r) for h in range(4) for r in range(3)]
    assert model.forward_costs(512, 128, 160) == [1, 2, 3, 4]
    head_by_head, sections = model.forward(32, 8192, 128, 160, 1), model.forward(32, 8192, 128, 160, 4)
    assert 0.9 < head_by_head < sections <= 1.0
    # the persistent causal grid with a tail table: head_dim 128 at 512 keys, 2048 tiles of 1-4 key blocks on 132 SMs,
    # where snake rounds to the end leave the partial last round's CTAs a tile over the rest
    listed = [c + 1.0 for _, r in model.tile_list(512, 4, 1) for c in [model.forward_costs(512, 128, 128)[::-1][r]]]
    assert model.persistent_snake(listed) < 0.975 < 0.985 < model.persistent_tail(listed) <= 1.0
    # head_dim 256's pairs: one head of 4 pairs (walks 2, 4, 6, 8) on 66 slots ends on the heaviest walk; split walks
    # (over 4 steps: 6 and 8 in halves) shorten it
    assert model.backward_pairs(1, 8, overhead=0.0) == pytest.approx(20 / 66 / 8)
    assert model.backward_pairs(1, 8, split_over=4, overhead=0.0) == pytest.approx(20 / 66 / 4)
    assert 0.9 < model.backward_pairs(32, 64) < model.backward_pairs(32, 64, split_over=32) <= 1.0
    # head_dim 128 MHA, lightest first: split walks (BwdSplit, over 64 query blocks) end the grid on shorter CTAs; below
    # the threshold the list is the same
    light = model.backward(16, 128, 256, 1, heavy_first=False)
    assert 0.85 < light < model.backward(16, 128, 256, 1, heavy_first=False, split_over=64) <= 1.0
    assert model.backward(8, 32, 64, 1, heavy_first=False, split_over=64) == model.backward(8, 32, 64, 1, False)



def test_steady_clocks_summary():
    """bench/steady_clocks.py's NVML summary (no GPU needed): medians, the lowest clock, reasons decoded by bit."""
    clocks = _bench_script("steady_clocks")
    assert clocks.reason_names(0) == ["none"]
    assert clocks.reason_names(0x4) == ["software power cap"]
    assert clocks.reason_names(0x4 | 0x40 | 0x10000) == ["software power cap", "hardware thermal slowdown", "0x10000"]
    s = clocks.summarize([(1650, 690.0, 56, 0x4), (1545, 699.5, 57, 0x4), (1710, 650.0, 58, 0)])
    assert s == {"sm_mhz": 1650, "sm_mhz_min": 1545, "watts": 690.0, "celsius": 58,
                 "reasons": {"software power cap": 2, "none": 1}}
    assert clocks.parse_case("bf16/128/4/4096/32/8/1") == ("bf16", 128, 4, 4096, 32, 8, True)


def _reference_attention(torch, q, k, v, causal):
    """(b, s, h, d) attention in the inputs' dtype, GQA by repeating K/V heads, scale 1/sqrt(d)."""
    group = q.shape[2] // k.shape[2]
    keys, values = (torch.repeat_interleave(t, group, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values)


@pytest.mark.parametrize("returns_lse", [False, True], ids=["out", "out_lse"])
def test_fa3_calls_use_its_interface(monkeypatch, returns_lse):
    """FA3's timed calls, on the CPU with a stand-in flash_attn_interface: the forward passes the (b, s, h, d)
    tensors and the mask as they are and takes out from either return form; the backward builds its graph
    once and each call returns the same graph's gradients for dout, without running the forward again."""
    torch = pytest.importorskip("torch")
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append((q, k, v, causal))
        out = _reference_attention(torch, q, k, v, causal)
        return (out, None) if returns_lse else out

    monkeypatch.setitem(sys.modules, "flash_attn_interface", SimpleNamespace(flash_attn_func=flash_attn_func))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, h, 16, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    forward = bench.Case("float32", 16, 2, 40, 4, 2, True, "fwd")
    with torch.no_grad():
        out = bench.timed_call(torch, "fa3", forward, q, k, v)()
    assert len(calls) == 1 and calls[0][0] is q and calls[0][2] is v and calls[0][3] is True
    torch.testing.assert_close(out, _reference_attention(torch, q, k, v, True))

    backward = bench.Case("float32", 16, 2, 40, 4, 2, True, "bwd")
    with torch.no_grad():  # as in the benchmark's run loop
        call = bench.timed_call(torch, "fa3", backward, q, k, v, dout)
    assert len(calls) == 2
    with torch.no_grad():
        first, second = call(), call()
    assert len(calls) == 2  # the timed calls run autograd's backward only
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(_reference_attention(torch, *leaves, True), leaves, dout)
    for got, again, want in zip(first, second, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
        assert torch.equal(got, again)


def test_fa3_version_in_the_environment(monkeypatch):
    monkeypatch.setattr(bench, "fa3_available", lambda: False)
    assert bench._fa3_version() is None
    monkeypatch.setattr(bench, "fa3_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", SimpleNamespace(__version__="3.0.0"))
    assert bench._fa3_version() == "3.0.0"


def test_ncu_stalls_tables(capsys):
    """bench/ncu_stalls.py on the committed source-page fixture: totals match the page's columns, opcodes group
    by root, and the CLI prints a column group per launch (the same launch twice here)."""
    stalls = _bench_script("ncu_stalls")
    fixture = Path(__file__).parent / "fixtures" / "ncu" / "source_fwd_d64.csv.gz"
    launches = stalls.read_pages([fixture])
    assert len(launches) == 1 and "attention_fwd_kernel" in launches[0]["kernel"]
    rows = launches[0]["rows"]
    summary = stalls.summarize(launches[0])
    assert summary["samples"] == sum(r["samples"] for r in rows) == 20823
    assert summary["executed"] == sum(r["executed"] for r in rows)
    assert 0.99 * summary["samples"] <= sum(summary["reasons"].values()) <= summary["samples"]
    assert {"HGMMA", "MUFU", "FMNMX", "BAR"} <= set(summary["ops"])
    assert sum(op["samples"] for op in summary["ops"].values()) == summary["samples"]
    full = stalls.summarize(launches[0], by="opcode")
    assert any(key.startswith("HGMMA.64x") for key in full["ops"]) and "HGMMA" not in full["ops"]
    assert stalls.short_name(launches[0]["kernel"]) == "attention_fwd_kernel"
    assert stalls.main([str(fixture), str(fixture), "--top", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[0] void dhp::kernels::attention_fwd_kernel") and out[1].startswith("[1] ")
    header = next(line for line in out if line.startswith("stall reason"))
    assert "[0] attention_fwd_kernel" in header and "[1] attention_fwd_kernel" in header
    opcode_rows = out[out.index(next(line for line in out if line.startswith("opcode"))) + 1:]
    assert len(opcode_rows) == 5
    assert stalls.main([str(fixture), "--kernel", "no_such_kernel"]) == 2


def test_ncu_stalls_loop_regions(capsys):
    """bench/ncu_stalls.py --loop: the hot loop's rows (executed within 10% of the count most instructions share) fall
    into the forward loop's stretches at their markers, in order; cold rows stay out."""
    stalls = _bench_script("ncu_stalls")

    def row(sass, executed, samples):
        return {"sass": sass, "executed": executed, "samples": samples, "stalls": {}}

    launch = {"kernel": "k", "rows": [
        row("MOV R1, R2", 3, 50),  # the prologue: run once a tile
        row("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x100], R3", 100, 7),
        row("BAR.SYNC.DEFER_BLOCKING R5, 0x100", 101, 11),
        row("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT", 100, 13),
        row("WARPGROUP.DEPBAR.LE gsb0, 0x1", 99, 17),
        row("FMNMX R3, R24, R25, !PT", 100, 19),
        row("MUFU.EX2 R24, R24", 100, 23),
        row("FADD R6, R6, R24", 100, 29),
        row("WARPGROUP.DEPBAR.LE gsb0, 0x0", 100, 31),
        row("F2FP.BF16.F32.PACK_AB R40, R25, R24", 100, 37),
        row("EXIT", 1, 41)]}
    loop = stalls.loop_regions(launch)
    assert loop["passes"] == 100
    assert [(r["instructions"], r["samples"]) for r in loop["regions"].values()] == [
        (1, 7), (2, 24), (2, 36), (2, 52), (2, 68)]

    fixture = Path(__file__).parent / "fixtures" / "ncu" / "source_fwd_d64.csv.gz"
    (page,) = stalls.read_pages([fixture])
    loop = stalls.loop_regions(page)
    hot = [r for r in page["rows"] if 0.9 * loop["passes"] <= r["executed"] <= 1.1 * loop["passes"]]
    regions = loop["regions"]
    assert sum(r["instructions"] for r in regions.values()) == len(hot) > 400
    assert sum(r["samples"] for r in regions.values()) == sum(r["samples"] for r in hot)
    # That build waited for P V right after QK^T (ptxas hoisted the wait above the softmax): every exponential follows it.
    assert regions["exponentials"]["instructions"] == 0 and regions["after the P V wait"]["instructions"] > 300
    assert stalls.main([str(fixture), "--top", "1", "--loop"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("key-block loop"))) + 1:]
    assert [line[:28].strip() for line in table] == list(stalls.LOOP_REGIONS) + ["whole loop"]


def _ab_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "ab.py"
    spec = importlib.util.spec_from_file_location("bench_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_schedule_times_every_tree_alike():
    """bench/ab.py: each round runs every tree's dhp once in a process of its own, in alternating order, and the
    peers last in a process of their own, so no tree's dhp runs right after a peer in its own process."""
    schedule = _ab_module().schedule
    trees = [("main", "/t/main"), ("variant", "/t/variant"), ("aa", "/t/main")]
    runs = schedule(trees, 4, peers=True)
    assert len(runs) == 4 * 4
    rounds = [runs[4 * r:4 * r + 4] for r in range(4)]
    for r, round_runs in enumerate(rounds):
        dhp_runs = [(name, path) for name, path, times_peers in round_runs if not times_peers]
        assert dhp_runs == (trees if r % 2 == 0 else trees[::-1])
        assert round_runs[-1] == ("peers", "/t/main", True)
    assert all(not times_peers for _, _, times_peers in schedule(trees, 3, peers=False))
    assert len(schedule(trees, 3, peers=False)) == 9


def _fake_ab_call(monkeypatch, tmp_path, ab, times: dict, before=None) -> Path:
    """bench/ab.py's worker processes replaced: tree <name> (TREES main and fast under tmp_path) times its dhp at
    times[name][round] ms, the peers' cuDNN at 2 ms, each on 4 GFLOP; before(call index) runs ahead of each call.
    Three rounds; returns the JSON= path."""
    calls = {name: 0 for name in times}
    count = [0]

    def fake_run(argv, env, capture_output, text):
        count[0] += 1
        if before:
            before(count[0])
        tree = Path(env["PYTHONPATH"].split(os.pathsep)[0]).parent.name
        machine = {"device": "GPU X", "driver": "1.2", "torch": "t", "cudnn": 9, "date": "d",
                   "dhp_build": {"tree": tree}}
        if env["AB_PEERS"]:
            out = {"bf16 case|cudnn": [2.0, 4e9]}
        else:
            out = {"bf16 case|dhp": [times[tree][calls[tree]], 4e9]}
            calls[tree] += 1
        return SimpleNamespace(stdout=f"noise\nENV {json.dumps(machine)}\nJSON {json.dumps(out)}\n", stderr="")

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    path = tmp_path / "ab.json"
    monkeypatch.setenv("TREES", f"main={tmp_path}/main fast={tmp_path}/fast")
    monkeypatch.setenv("SHAPES", "unused")
    monkeypatch.setenv("PEERS", "cudnn")
    monkeypatch.setenv("ROUNDS", "3")
    monkeypatch.setenv("JSON", str(path))
    return path


def test_ab_summarizes_rounds_and_writes_json(monkeypatch, tmp_path, capsys):
    """bench/ab.py end to end with the worker processes replaced: each tree's TFLOP/s is the median of its rounds, the
    ratio is to the first tree's time, and JSON= keeps every round, the device and each tree's build."""
    ab = _ab_module()
    # ms per round (medians 1.1, 0.55); peers 2.0
    path = _fake_ab_call(monkeypatch, tmp_path, ab, {"main": [1.0, 1.3, 1.1], "fast": [0.5, 0.55, 0.7]})
    ab.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("GPU X, driver 1.2")
    assert lines[1].split() == ["bf16", "case", "main", "3.6", "(1.000)", "fast", "7.3", "(2.000)", "cudnn", "2.0"]
    doc = json.loads(path.read_text())
    assert doc["rounds_ms"]["bf16 case|dhp|fast"] == [0.5, 0.55, 0.7]
    assert doc["builds"] == {"main": {"tree": "main"}, "fast": {"tree": "fast"}}
    assert doc["rows"][0]["ratio"] == {"main": 1.0, "fast": 2.0}
    assert doc["environment"]["device"] == "GPU X" and "dhp_build" not in doc["environment"]


def test_ab_stopped_reports_its_whole_rounds(monkeypatch, tmp_path, capsys):
    """bench/ab.py stopped in its third round (SIGTERM from `timeout`): the table and JSON hold the two whole rounds,
    the JSON was written after each, and the exit status is 1."""
    ab = _ab_module()
    written = []

    def before(call):
        if call == 8:  # round 3's second process
            raise ab.Stopped
        written.append(json.loads(path.read_text())["rounds"] if path.exists() else None)

    path = _fake_ab_call(monkeypatch, tmp_path, ab, {"main": [1.0, 1.2, 9.0], "fast": [0.5, 0.7, 9.0]}, before)
    with pytest.raises(SystemExit) as stopped:
        ab.main()
    assert stopped.value.code == 1
    assert written == [None, None, None, 1, 1, 1, 2]
    captured = capsys.readouterr()
    assert "2 whole rounds" in captured.err
    assert captured.out.splitlines()[1].split() == ["bf16", "case", "main", "3.6", "(1.000)", "fast", "6.7", "(1.833)",
                                                    "cudnn", "2.0"]
    doc = json.loads(path.read_text())
    assert doc["rounds"] == 2 and doc["rounds_ms"]["bf16 case|dhp|fast"] == [0.5, 0.7]
