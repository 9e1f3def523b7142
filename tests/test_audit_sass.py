"""The SASS taint check (dhp.audit.sass): parser facts, planted leaks and clean look-alikes, the real kernels.

Fixtures in tests/fixtures/sass:
- planted.sass: cuobjdump output of planted.cu (nvcc 13.0, sm_90a), so ptxas chose the branches, predicated
  stores and selects; kernels named leak_* must fail, clean_* must pass.
- leaks.sass / clean.sass: hand-written in cuobjdump's layout, for what a compiler will not produce on demand
  (a loop counter's register reused for data, wgmma accumulators, barriers, subroutines).
- spin.sass: hand-written after the wait loops ptxas emits for dhp's kernels (setmaxnreg retry, flag poll, inline
  mbarrier try with an out-of-line retry loop), a long loop holding a try (not a spin loop), and a lone try.
The last test runs the check on the installed libdhp.so: every kernel must pass (skips only without
cuobjdump/nvdisasm).
"""

import json
from pathlib import Path

import pytest
from dhp.audit import sass
from dhp.audit.__main__ import main
from dhp.audit.disasm import ToolMissing, parse_instruction, register_names

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sass"


def verdicts(name):
    return {v.name: v for v in sass.analyse_sass((FIXTURES / name).read_text())}


def regs(prefix, first, count):
    return [f"{prefix}{i}" for i in range(first, first + count)]


# --- the parser: which registers an instruction writes, reads, and reads as an address


def test_parse_guard_opcode_targets():
    ins = parse_instruction(0x63C0, "@!P3 BRA 0x64c0")
    assert (ins.opcode, ins.root, ins.guarded, ins.targets()) == ("BRA", "BRA", True, [0x64C0])
    assert register_names(1 << ins.guard) == ["P3"]
    assert parse_instruction(0, "@PT BRA 0x10").guarded is False
    assert register_names(1 << parse_instruction(0, "@!UP0 UIADD3 UR4, -UR5, 0x100000, URZ").guard) == ["UP0"]


@pytest.mark.parametrize("text, defs, uses, address_uses", [
    ("ISETP.NE.AND P1, PT, R2, RZ, PT", ["P1"], ["R2"], []),
    ("PLOP3.LUT P0, PT, P0, P1, PT, 0xa2, 0x0", ["P0"], ["P0", "P1"], []),
    ("LOP3.LUT P1, RZ, R13, R18, R12.reuse, 0xf8, !PT", ["P1"], ["R12", "R13", "R18"], []),
    ("IADD3 R6, P0, R0, UR6, RZ", ["R6", "P0"], ["R0", "UR6"], []),
    ("LEA.HI.X R7, R5, UR7, R0, 0x2, P2", ["R7"], ["R0", "R5", "UR7", "P2"], []),
    ("IMAD.WIDE.U32 R2, R5, 0x4, R2", ["R2", "R3"], ["R2", "R3", "R5"], []),
    ("FSEL R8, R2, RZ, P0", ["R8"], ["R2", "P0"], []),
    ("SHFL.BFLY PT, R5, R4, 0x1, 0x1f", ["R5"], ["R4"], []),
    ("VOTEU.ALL UP0, P0", ["UP0"], ["P0"], []),
    ("R2UR.OR P0, UR8, R40", ["UR8", "P0"], ["R40", "P0"], []),
    ("P2R R0, PR, RZ, 0x7f", ["R0"], regs("P", 0, 7), []),
    ("CS2R R54, SRZ", ["R54", "R55"], [], []),
    ("LDC.64 R2, c[0x0][0x210]", ["R2", "R3"], [], []),
    ("LDC R6, c[0x3][R3]", ["R6"], ["R3"], ["R3"]),
    ("LDG.E.128 R4, desc[UR4][R2.64]", regs("R", 4, 4), ["R2", "R3", "UR4", "UR5"], ["R2", "R3", "UR4", "UR5"]),
    ("STG.E desc[UR14][R8.64], R4", [], ["R4", "R8", "R9", "UR14", "UR15"], ["R8", "R9", "UR14", "UR15"]),
    ("STS.64 [R2+UR4+0x10], R6", [], ["R2", "R6", "R7", "UR4"], ["R2", "UR4"]),
    ("LDSM.16.M88.4 R8, [R2+UR4]", regs("R", 8, 4), ["R2", "UR4"], ["R2", "UR4"]),
    ("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R18+UR6+0x16008], R17", ["P0"], ["R17", "R18", "UR6"], ["R18", "UR6"]),
    ("UTMALDG.4D [UR16], [UR22]", [], regs("UR", 16, 8), regs("UR", 16, 8)),
    ("RET.REL.NODEC R2 0x0", [], ["R2"], []),
    ("BAR.SYNC.DEFER_BLOCKING R40, 0x80", [], ["R40"], []),
])
def test_parse_operands(text, defs, uses, address_uses):
    ins = parse_instruction(0, text)
    assert set(register_names(ins.defs)) == set(defs)
    assert set(register_names(ins.uses)) == set(uses)
    assert set(register_names(ins.address_uses)) == set(address_uses)


def test_parse_wgmma_register_blocks():
    # m64n176k16 with fp32 accumulators: 88 registers from R24; register-A form reads 4 A registers.
    ss = parse_instruction(0, "HGMMA.64x176x16.F32.BF16 R24, gdesc[UR16], R24, gsb0")
    assert register_names(ss.defs) == regs("R", 24, 88)
    assert register_names(ss.address_uses) == regs("UR", 16, 4)
    rs = parse_instruction(0, "HGMMA.64x64x16.F32.BF16 R24, R148, gdesc[UR8].tnspB, R24")
    assert register_names(rs.defs) == regs("R", 24, 32)
    assert register_names(rs.uses) == regs("R", 24, 32) + regs("R", 148, 4) + regs("UR", 8, 4)
    assert register_names(parse_instruction(0, "HGMMA.64x64x16.F16 R24, gdesc[UR8], RZ, !UPT").defs) == regs("R", 24, 16)


# --- planted leaks (compiled) and clean look-alikes


def flagged(verdict):
    """{(rule, opcode without modifiers)} of a verdict's violations."""
    return {(v.rule, parse_instruction(v.address, v.instruction).root) for v in verdict.violations}


@pytest.mark.parametrize("kernel, expected", [
    ("leak_exit_on_nan", {("branch", "EXIT")}),  # if (isnan(v)) return;
    ("leak_branch_on_load", {("branch", "BRA")}),  # if (v > 1) { loop }, and sqrtf's slow-path call
    ("leak_trip_count_from_smem", {("branch", "BRA")}),  # for (k < s[..]) with s filled from global memory
    ("leak_store_address_from_load", {("memory", "STG")}),  # y[idx[i]] = 1
    ("leak_table_lookup", {("memory", "LDG")}),  # table[x[i] & 255]
    ("leak_predicated_store", {("memory", "STG")}),  # if (v > 3) y[i] = 1: @P0 STG (its @P0 LDC.64 of y
    # reads a kernel parameter like any c[..][..] operand: not a memory access)
])
def test_planted_leaks_are_caught(kernel, expected):
    verdict = verdicts("planted.sass")[kernel]
    assert not verdict.passed
    assert flagged(verdict) == expected, sass.report([verdict])
    assert all(v.origin and ("LDG" in v.origin[-1] or "LDS" in v.origin[-1]) for v in verdict.violations)


def test_predicated_store_is_the_store_itself():
    verdict = verdicts("planted.sass")["leak_predicated_store"]
    stores = [v for v in verdict.violations if "STG" in v.instruction]
    assert [v.instruction.split()[0] for v in stores] == ["@P0"]
    assert stores[0].reason == "memory access made or not by tainted P0"


@pytest.mark.parametrize("fixture, kernel", [
    ("planted.sass", "clean_select"),  # v > 3 ? v : 0 and m > 7 ? m : -m: FSEL and a guarded IADD3
    ("planted.sass", "clean_mbarrier_wait"),  # SYNCS.PHASECHK.TRANS64.TRYWAIT, @!P0 BRA back
    ("planted.sass", "clean_smem_tid_store"),  # exp2(max(x, 0)) to shared memory at threadIdx, read back
    ("clean.sass", "clean_loop_counter_reuse"),  # flow sensitivity: R2 counts the loop, then holds data
    ("clean.sass", "clean_hgmma_softmax"),
    ("clean.sass", "clean_waterfall_loop"),  # known P1 = true on entry; leaks.sass has it from data
    ("clean.sass", "clean_same_guard_address"),  # @!P1 MOV R10.. then @!P1 STG [R10.64]: the new, public address
    ("clean.sass", "clean_flag_wait"),  # spin on an ld.acquire.gpu flag (LDG.E.STRONG.GPU): public
    ("clean.sass", "clean_returns_to_own_callers"),  # a subroutine on data returns to its caller, not the other's
])
def test_clean_kernels_pass(fixture, kernel):
    verdict = verdicts(fixture)[kernel]
    assert verdict.passed, sass.report([verdict])
    assert verdict.analysed > 0


@pytest.mark.parametrize("kernel, expected", [
    ("leak_guarded_overwrite", [(0x80, "branch", "branch taken or not by tainted P0")]),
    ("leak_constant_table_lookup", [(0x50, "memory", "address depends on tainted R3")]),
    ("leak_wgmma_descriptor_from_data", [(0xC0, "memory", "address depends on tainted UR10")]),
    ("leak_barrier_on_data", [(0x70, "sync", "synchronisation made or not by tainted P0"),
                              (0x90, "sync", "synchronisation operand from tainted R3")]),
    ("leak_in_subroutine", [(0x90, "branch", "branch taken or not by tainted P0")]),
    ("leak_waterfall_on_data", [(0x100, "memory", "address depends on tainted UR8, UR10"),
                                (0x110, "branch", "branch taken or not by tainted P1")]),
    ("unanalysable_external_call", [(0x30, "unanalysable", "target is not in this kernel")]),
    ("leak_other_guard_address", [(0x80, "memory", "address depends on tainted R10, R11")]),
    ("leak_spin_on_weak_load", [(0x50, "branch", "branch taken or not by tainted P0")]),
    ("leak_address_from_subroutine", [(0x50, "memory", "address depends on tainted R4, R5")]),
])
def test_hand_written_leaks(kernel, expected):
    verdict = verdicts("leaks.sass")[kernel]
    assert [(v.address, v.rule, v.reason) for v in verdict.violations] == expected, sass.report([verdict])


def test_flag_reads_are_listed():
    notes = verdicts("clean.sass")["clean_flag_wait"].notes
    assert notes == [("reads a synchronisation flag at 0x0030 (LDG.E.STRONG.GPU R2, desc[UR4][R4.64]): public, "
                      "listed for review")]


def test_shared_memory_becomes_a_source():
    notes = verdicts("planted.sass")["leak_trip_count_from_smem"].notes
    assert any(note.startswith("shared memory holds tensor data (STS at") for note in notes)
    assert any("UTMALDG.4D at 0x00c0" in note for note in verdicts("clean.sass")["clean_hgmma_softmax"].notes)


def test_cli_exit_status_and_json(tmp_path, capsys):
    out = tmp_path / "verdicts.json"
    assert main(["sass", "--sass", str(FIXTURES / "clean.sass"), "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["verdict"] == "pass" and len(document["kernels"]) == 6
    assert main(["sass", "--sass", str(FIXTURES / "leaks.sass"), "--json", str(out)]) == 1
    kernels = {k["name"]: k for k in json.loads(out.read_text())["kernels"]}
    violation = kernels["leak_guarded_overwrite"]["violations"][0]
    assert violation["address"] == "0x0080" and violation["origin"][-1].startswith("0x0040 LDG.E R2")
    assert main(["sass", "--lib", str(tmp_path / "missing.so")]) == 2
    assert "FAIL" in capsys.readouterr().out


# --- the real kernels


# --- spin loops: the code whose execution count follows timing, which the counters check sets apart


def test_spin_loops_of_the_fixture():
    from dhp.audit.disasm import parse_sass

    v = verdicts("spin.sass")["spin_waits"]
    loops = {(loop.start, loop.end): (loop.kind, loop.exit_jump) for loop in v.spin_loops}
    assert loops == {(0x10, 0x40): ("register allocation retry", None), (0x70, 0xB0): ("flag poll", None),
                     (0x160, 0x170): ("mbarrier wait", 0x180), (0x190, 0x1B0): ("mbarrier wait", 0x1C0)}
    kernels = parse_sass((FIXTURES / "spin.sass").read_text())
    instructions = next(k for k in kernels if k.name == "spin_waits").instructions
    timed = set().union(*(loop.addresses(instructions) for loop in v.spin_loops))
    assert {0x10, 0x20, 0x30, 0x40, 0x90, 0x160, 0x170, 0x180, 0x190, 0x1C0} <= timed
    assert not {0x50, 0x60, 0xC0, 0xD0, 0xE0, 0x140, 0x1D0} & timed  # first tries and the long loop run a fixed count
    assert not any("no recognised spin loop" in note for note in v.notes)
    assert [loop["kind"] for loop in v.to_json()["spin_loops"]][0] == "register allocation retry"


def test_first_tries_that_skip_their_loop():
    """A cluster-scope acquire wait: the first try, an L1 invalidation on success, a branch (or exit) past the
    retry loop that follows. The branch's taken count and the invalidation's predicated-on count follow timing."""
    from dhp.audit.disasm import parse_sass
    from dhp.audit.sass import first_try_branches

    v = verdicts("spin.sass")["spin_cluster_acquire"]
    assert {(loop.start, loop.end) for loop in v.spin_loops} == {(0x50, 0x70), (0xB0, 0xD0)}
    assert not any("no recognised spin loop" in note for note in v.notes)
    kernels = parse_sass((FIXTURES / "spin.sass").read_text())
    instructions = next(k for k in kernels if k.name == "spin_cluster_acquire").instructions
    assert first_try_branches(instructions, v.spin_loops) == {0x20, 0x40, 0x90, 0xA0}
    # The exit after the second loop runs once per slow-path wait (a first try that succeeds exits at 0xa0): as
    # timed as the loop (ptxas writes the backward kernels' final waits so).
    assert {(loop.start, loop.exit_jump) for loop in v.spin_loops} == {(0x50, None), (0xB0, 0xE0)}


def test_first_tries_through_a_landing_pad():
    """A first try may branch to register-only instructions that fall into its retry loop (ptxas rebuilds the parity
    there): they run only when the first try fails, so their counts follow timing, as the branch's do. A pad with a
    memory access is no landing pad: that wait is noted."""
    from dhp.audit.disasm import parse_sass
    from dhp.audit.sass import first_try_branches

    v = verdicts("spin.sass")["spin_landing_pad"]
    assert {(loop.start, loop.end) for loop in v.spin_loops} == {(0x80, 0x90), (0xB0, 0xC0)}
    kernels = parse_sass((FIXTURES / "spin.sass").read_text())
    instructions = next(k for k in kernels if k.name == "spin_landing_pad").instructions
    assert first_try_branches(instructions, v.spin_loops) == {0x20, 0x70}
    assert [n for n in v.notes if "no recognised spin loop" in n] == [n for n in v.notes if "0x0040" in n] != []


def test_first_try_whose_branch_lies_hundreds_of_instructions_later():
    """ptxas may schedule a whole row half's softmax between a first try and its branch into the retry loop (257
    instructions in head_dim 128's causal main forward tier): still a first try, within FIRST_TRY_WINDOW."""
    from dhp.audit.disasm import parse_sass
    from dhp.audit.sass import FIRST_TRY_WINDOW, analyse_sass, first_try_branches

    def listing(gap):
        body = ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR20+0x38030], R12"] + ["FADD R2, R2, R3"] * gap
        retry = 16 * (gap + 3)  # after the branch and an EXIT
        body += [f"@!P1 BRA 0x{retry:x}", "EXIT", "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR20+0x38030], R12",
                 f"@!P1 BRA 0x{retry:x}", f"BRA 0x{16 * (gap + 2):x}"]
        lines = [f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(body)]
        return "\t\tFunction : far_first_try\n" + "\n".join(lines) + "\n", 16 * (gap + 1)

    for gap, recognised in ((300, True), (FIRST_TRY_WINDOW, False)):
        text, branch = listing(gap)
        v = analyse_sass(text)[0]
        instructions = parse_sass(text)[0].instructions
        assert (branch in first_try_branches(instructions, v.spin_loops)) == recognised, gap
        assert any("no recognised spin loop" in n for n in v.notes) != recognised, (gap, v.notes)


def test_a_wait_without_a_retry_loop_is_noted():
    v = verdicts("spin.sass")["spin_lone_wait"]
    assert v.spin_loops == [] and v.passed
    assert [n for n in v.notes if "no recognised spin loop" in n and "0x0010" in n]


def test_installed_kernels_pass():
    library = sass.installed_library()
    assert library.is_file(), f"{library} is missing: pip install '.[test]'"
    try:
        results = sass.audit_library(library)
    except ToolMissing as error:
        pytest.skip(str(error))
    print("\n" + sass.report(results))
    assert results, "libdhp.so holds no kernels"
    assert all(v.passed for v in results), "kernels with value-dependent control flow or addresses:\n" + \
        sass.report([v for v in results if not v.passed])
    unrecognised = [f"{v.demangled}: {n}" for v in results for n in v.notes if "no recognised spin loop" in n]
    assert not unrecognised, "\n".join(unrecognised)
    assert all(v.spin_loops for v in results if "attention_fwd_kernel" in v.name or "attention_bwd_kernel" in v.name)
