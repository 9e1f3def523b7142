"""SASS taint check: does any branch, memory address or synchronisation in a kernel depend on tensor values?

The check reads the machine code that runs (cuobjdump -sass of libdhp.so), not the source: whatever
ptxas made of a `cond ? a : b` (a select, a predicated store or a branch) is what is judged.

Taint is tracked per register and predicate with a forward dataflow analysis over each kernel's control
flow graph, to a fixed point. It is flow-sensitive: the set of tainted registers is computed at every
instruction, because the register allocator reuses a loop counter's register for a tensor value once the
loop is done. A write that surely runs replaces a register's taint; a guarded one (`@P0 MOV R2, ..`) may
not run, so it only adds taint — unless its guard predicate is unknown, in which case the analysis follows
both cases, the write running and not, until the predicate is written again. Predicates set to constants (PLOP3.LUT P1, PT, PT, PT, PT, 0x80, 0x0 is
"P1 = true", how ptxas opens ELECT and R2UR waterfall loops) are tracked, and states with different known
predicate values are kept apart at control-flow merges, so `@P1 R2UR P0, ..` on a loop's first pass, with
P1 known true, surely replaces P0.

Sources of taint (values derived from Q, K, V, dO):
    LD, LDG, LDL, ATOM, ATOMG, SULD, SUATOM, TEX, TLD, TLD4   global / generic / local / texture reads
    LDS, LDSM, ATOMS                  shared-memory reads, once shared memory holds tensor data: a TMA or
                                      bulk copy (UTMALDG, UBLKCP, LDGSTS) is in the kernel, or a store that may
                                      reach shared memory (STS, STSM, ST, ATOMS, ATOM, RED) writes tainted data
    HGMMA, IGMMA, QGMMA, BGMMA,       tensor-core results (HGMMA.64xNx16.F32 writes N/2 registers from its
    HMMA, IMMA, DMMA, BMMA            destination on)
Public: immediates, constants and kernel parameters (c[..][..], LDC, ULDC), special registers (S2R,
S2UR, CS2R; a clock read is public but listed in the kernel's notes), barrier results (SYNCS, ELECT,
USETMAXREG: they follow timing, and the rules below make their operands public), and flag reads: strong
GPU/system-scope loads (LDG.E.STRONG.GPU, from ld.acquire.gpu), with which a kernel polls a counter that other
CTAs publish (the backward's dQ turns). dhp never reads tensor data that way; each flag read is listed in the
kernel's notes for review.

Propagation: an instruction whose guard or any source register/predicate is tainted taints every register
and predicate it writes. This covers MOV, SHFL, PRMT, conversions, and selects: FSEL/SEL on a tainted
predicate taint their result, which is fine, selecting is the constant-time way to decide.

Rules (what is a violation):
    kind      opcodes                                    violation when
    branch    BRA BRX JMP JMX CALL RET EXIT BREAK KILL   guard tainted (a data-dependent branch, early exit or
              RTT BPT                                    loop bound), or a register operand tainted (an
                                                         indirect target, the P2 of `@P0 BRA !P2, 0x1a10`)
    memory    LD* ST* ATOM* RED LDSM STSM LDGSTS SU*     guard tainted (ptxas's `@P0 STG` for a short `if`),
              TEX TLD* CCTL UTMA* UBLK*, and anything    or a register inside an address operand tainted
              with an address operand (HGMMA's gdesc[UR] ([R4+0x10], desc[UR4][R2.64], gdesc[UR8], c[0x0][R2]);
              and an indexed LDC c[0x0][R2] are ones)    a store's data operand may be tainted
    sync      BAR BSSY BSYNC WARPSYNC MEMBAR FENCE       guard tainted, or any register operand tainted
              ERRBAR DEPBAR WARPGROUP NANOSLEEP          (barrier id, thread count, mbarrier address, parity,
              USETMAXREG SYNCS UTMACMDFLUSH LDGDEPBAR    transaction bytes, sleep time)
              ACQBULK ARRIVES
    register  everything else (ALU, FPU, MUFU, SHFL,     never: a register op with a tainted guard or operand
              VOTE, MATCH, conversions, selects)         only taints its results
LDC/ULDC at a fixed address (c[0x0][0x210]) read a parameter or constant exactly as a c[..][..] operand of
an FFMA does: register kind, even under a tainted guard.
A kernel whose control flow cannot be followed (a branch or call to an address outside the kernel) fails
with rule "unanalysable". Indirect branches (BRX, JMX) are assumed to reach every instruction.

Not checked here: whether an instruction's latency depends on its operand values (we assume ALU, MUFU,
SHFL and tensor-core latencies do not), and DRAM traffic that depends on values (compressible memory):
see docs/SECURITY.md.

Each kernel's spin loops are listed too (`spin_loops`): the short loops around a wait that may fail and be
retried (mbarrier try-wait, setmaxnreg.inc, a flag poll), whose execution counts follow timing. Everything else
runs a number of times fixed by the shapes, which is what a per-instruction counters check can hold each other
instruction to. A wait that is neither in such a loop nor an inline first try branching into one is noted.
"""

from __future__ import annotations

import functools
import heapq
import operator
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .disasm import (
    BRANCH_OPCODES,
    MMA_OPCODES,
    PREDICATE_BITS,
    SYNC_OPCODES,
    Instruction,
    Kernel,
    demangle,
    disassemble,
    is_address,
    parse_sass,
    register_bit,
    register_names,
)

MEMORY_OPCODES = {
    "LD", "LDG", "LDS", "LDL", "LDSM", "ST", "STG", "STS", "STL", "STSM", "ATOM", "ATOMG",
    "ATOMS", "RED", "LDGSTS", "SULD", "SUST", "SUATOM", "SURED", "TEX", "TLD", "TLD4", "CCTL",
}
GLOBAL_LOADS = {"LD", "LDG", "LDL", "ATOM", "ATOMG", "SULD", "SUATOM", "TEX", "TLD", "TLD4"}
SHARED_LOADS = {"LDS", "LDSM", "ATOMS"}
SHARED_FILLERS = {"UTMALDG", "UBLKCP", "LDGSTS"}  # copy tensor data into shared memory
MAYBE_SHARED_STORES = {"STS", "STSM", "ST", "ATOMS", "ATOM", "RED"}
_CLOCK = re.compile(r"SR_(CLOCK|GLOBALTIMER)")


def kind(ins: Instruction) -> str:
    """'branch', 'sync', 'memory' or 'register': which rule of the table applies."""
    root = ins.root
    if root in BRANCH_OPCODES:
        return "branch"
    if root in SYNC_OPCODES:
        return "sync"
    if root in MEMORY_OPCODES or root.startswith(("UTMA", "UBLK")) or any(map(is_address, ins.operands)):
        return "memory"
    return "register"


@dataclass
class Violation:
    address: int
    instruction: str
    rule: str  # branch | memory | sync | unanalysable
    reason: str
    origin: list[str] = field(default_factory=list)  # "0x6380 FADD R11, R3, R2", .. back to the source (last)

    def to_json(self) -> dict:
        return {"address": f"0x{self.address:04x}", "instruction": self.instruction, "rule": self.rule,
                "reason": self.reason, "origin": self.origin}


@dataclass
class KernelVerdict:
    name: str
    demangled: str
    source: str
    instructions: int  # in the dump
    analysed: int  # reachable from the entry
    violations: list[Violation]
    notes: list[str]
    spin_loops: list[SpinLoop] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_json(self) -> dict:
        return {"name": self.name, "demangled": self.demangled, "source": self.source,
                "instructions": self.instructions, "analysed": self.analysed,
                "verdict": "pass" if self.passed else "fail",
                "violations": [v.to_json() for v in self.violations], "notes": self.notes,
                "spin_loops": [loop.to_json() for loop in self.spin_loops]}


def _control_flow(instructions: list[Instruction]) -> tuple[list[list[int]], list[Violation], list[str]]:
    """Successors of every instruction, control flow that cannot be followed, and notes."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    n = len(instructions)
    succ: list[list[int]] = []
    problems: list[Violation] = []
    notes: list[str] = []
    return_sites: list[int] = []
    callers: dict[int, list[int]] = {}  # subroutine entry -> its call sites' return sites
    returns: list[int] = []
    for i, ins in enumerate(instructions):
        root, after = ins.root, [i + 1] if i + 1 < n else []
        falls = after if ins.guarded else []
        if root in ("BRA", "JMP", "CALL"):
            targets = ins.targets()
            if "ABS" in ins.modifiers or not targets or targets[-1] not in index:  # CALL.ABS: another function
                problems.append(Violation(ins.address, ins.text, "unanalysable", "target is not in this kernel"))
                succ.append(after)
                continue
            succ.append([index[targets[-1]], *falls])
            if root == "CALL":
                return_sites += after
                callers.setdefault(index[targets[-1]], []).extend(after)
        elif root in ("BRX", "BRXU", "JMX", "JMXU"):
            notes.append(f"indirect branch at 0x{ins.address:04x}: assumed to reach every instruction")
            succ.append(list(range(n)))
        elif root == "RET":
            returns.append(i)
            succ.append(falls)
        elif root in ("EXIT", "KILL"):
            succ.append(falls)
        else:
            succ.append(after)
    # A RET returns to the call sites of the subroutines it ends: those from whose entry it is reached without
    # entering a callee (a call goes on at its return site). A RET that no entry reaches may return anywhere.
    ends: dict[int, set[int]] = {i: set() for i in returns}
    for entry, sites in callers.items():
        seen, todo = {entry}, [entry]
        while todo:
            i = todo.pop()
            if instructions[i].root == "RET":
                ends[i].update(sites)
            following = [i + 1] if instructions[i].root == "CALL" and i + 1 < n else succ[i]
            for j in following:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
    for i in returns:
        succ[i] = sorted(set(succ[i]) | (ends[i] or set(return_sites)))
    return succ, problems, notes


# Spin loops: the only code whose execution count follows timing. A loop is a backward branch and the
# instructions from its target up to it; it spins when it is short and holds a wait that may fail and be
# retried: an mbarrier try-wait, the retry of setmaxnreg.inc, or a poll of a flag other CTAs publish, with the
# backward branch taken on the wait's result. In kernels launched as clusters ptxas recomputes the barrier's
# shared-window address inside the loop (S2UR SR_CgaCtaId and four uniform instructions): nine instructions.
MAX_SPIN_BODY = 12


@dataclass
class SpinLoop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the backward branch
    kind: str  # "mbarrier wait" | "register allocation retry" | "flag poll"
    # address of an unguarded BRA or EXIT right after the loop: runs once per slow-path wait (a first try that
    # succeeds jumps or exits past the loop, _first_try_sites)
    exit_jump: int | None

    def addresses(self, instructions: list[Instruction]) -> set[int]:
        """The addresses whose execution count depends on how long the waits last."""
        inside = {ins.address for ins in instructions if self.start <= ins.address <= self.end}
        return inside | ({self.exit_jump} if self.exit_jump is not None else set())

    def to_json(self) -> dict:
        return {"start": f"0x{self.start:04x}", "end": f"0x{self.end:04x}", "kind": self.kind,
                "exit_jump": None if self.exit_jump is None else f"0x{self.exit_jump:04x}"}


def _spin_kind(ins: Instruction) -> str | None:
    if ins.root == "SYNCS" and "PHASECHK" in ins.modifiers:
        return "mbarrier wait"
    if ins.root == "USETMAXREG" and "TRY_ALLOC" in ins.modifiers:
        return "register allocation retry"
    if is_flag_read(ins):
        return "flag poll"
    return None


def _repeats_on_wait(body: list[Instruction]) -> bool:
    """Whether the loop's backward branch (body[-1]) is guarded by a predicate computed from the wait's result
    within the body (a loop counted by anything else runs a fixed number of times, whatever waits it holds)."""
    branch = body[-1]
    if branch.guard is None:
        return False
    needed = 1 << branch.guard
    for ins in reversed(body[:-1]):
        if ins.defs & needed:
            if _spin_kind(ins):
                return True
            needed = (needed & ~ins.defs) | ins.uses
    return False


def spin_loops(instructions: list[Instruction]) -> list[SpinLoop]:
    """The kernel's spin loops, by address (see MAX_SPIN_BODY)."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    loops = []
    for i, ins in enumerate(instructions):
        targets = ins.targets() if ins.root == "BRA" else []
        if not targets or targets[-1] not in index or targets[-1] > ins.address:
            continue
        first = index[targets[-1]]
        body = instructions[first:i + 1]
        kinds = {k for k in map(_spin_kind, body) if k}
        if len(body) > MAX_SPIN_BODY or len(kinds) != 1 or not _repeats_on_wait(body):
            continue
        after = instructions[i + 1] if i + 1 < len(instructions) else None
        exit_jump = after.address if after is not None and after.root in ("BRA", "EXIT") and not after.guarded else None
        loops.append(SpinLoop(body[0].address, ins.address, kinds.pop(), exit_jump))
    return loops


FIRST_TRY_WINDOW = 512  # ptxas schedules up to hundreds of instructions between an inline first try and its branch
# (257 in head_dim 128's causal main tier on 192-key blocks: a row half's softmax; the search stops at any branch)


MAX_LANDING_PAD = 4  # register-only instructions ptxas may put between a first try's branch target and its loop


def _landing_pad(instructions: list[Instruction], target: int, starts: set[int]) -> set[int] | None:
    """The addresses from a first try's branch target up to the spin loop it falls into (empty when the target is
    the loop's start): at most MAX_LANDING_PAD register-only instructions (`SHF.L.U32 R10, R7, 0x1f, RZ`, the
    parity rebuilt for the retry); None if the target leads into no loop that way."""
    index = {ins.address: k for k, ins in enumerate(instructions)}
    if target not in index:
        return None
    pad: set[int] = set()
    for ins in instructions[index[target]:index[target] + MAX_LANDING_PAD + 1]:
        if ins.address in starts:
            return pad
        if kind(ins) != "register" or ins.root in BRANCH_OPCODES or ins.guarded or _spin_kind(ins):
            return None
        pad.add(ins.address)
    return None


def _first_try_sites(instructions: list[Instruction], i: int, starts: set[int]) -> set[int] | None:
    """If the wait at i is an inline first try, the addresses whose counts follow its result: the later branch
    that, on its (unchanged) result predicate, either jumps into a spin loop retrying it out of line (directly, or
    through a landing pad of register-only instructions, which run only when the first try fails) or skips a spin
    loop that follows it (on success; on failure it falls into the loop), and instructions guarded by that
    predicate in between (a cluster-scope acquire's L1 invalidation, `@P0 CCTL.IVALL`); else None."""
    wait = instructions[i]
    predicates = wait.defs & PREDICATE_BITS
    guarded = set()
    for j in range(i + 1, min(len(instructions), i + 1 + FIRST_TRY_WINDOW)):
        ins = instructions[j]
        if ins.root in ("BRA", "EXIT") and ins.guard is not None and predicates >> ins.guard & 1:
            pad = _landing_pad(instructions, ins.targets()[-1], starts) if ins.root == "BRA" and ins.targets() else None
            skips_loop = j + 1 < len(instructions) and instructions[j + 1].address in starts
            if pad is not None:
                return guarded | pad | {ins.address}
            return guarded | {ins.address} if skips_loop else None
        if ins.defs & predicates or ins.root in BRANCH_OPCODES:
            return None
        if ins.guard is not None and predicates >> ins.guard & 1:
            guarded.add(ins.address)
    return None


def _outside(instructions: list[Instruction], loops: list[SpinLoop]) -> list[int]:
    """Indices of the wait instructions that lie in no spin loop."""
    inside = {ins.address for loop in loops for ins in instructions if loop.start <= ins.address <= loop.end}
    return [i for i, ins in enumerate(instructions) if _spin_kind(ins) and ins.address not in inside]


def unrecognised_waits(instructions: list[Instruction], loops: list[SpinLoop]) -> list[Instruction]:
    """Wait instructions outside every spin loop that are not an inline first try either (see _first_try_sites).
    Their retries would go unrecognised."""
    starts = {loop.start for loop in loops}
    return [instructions[i] for i in _outside(instructions, loops)
            if _first_try_sites(instructions, i, starts) is None]


def first_try_branches(instructions: list[Instruction], loops: list[SpinLoop]) -> set[int]:
    """Addresses of the branches by which inline first tries enter or skip their spin loops, and of instructions
    guarded by a first try's result: how often each is taken (or predicated on) follows timing (how often the
    first try fails), how often it executes does not."""
    starts = {loop.start for loop in loops}
    found = (_first_try_sites(instructions, i, starts) for i in _outside(instructions, loops))
    return set().union(*(sites for sites in found if sites is not None))


def is_flag_read(ins: Instruction) -> bool:
    """A GPU- or system-scope strong load (ld.acquire / ld.relaxed / ld.volatile .gpu or .sys): how kernels read
    the counters other CTAs publish. dhp reads tensor data only with weak loads, TMA and shared-memory loads."""
    return ins.root in ("LD", "LDG") and "STRONG" in ins.modifiers and bool({"GPU", "SYS"} & set(ins.modifiers))


def _is_source(ins: Instruction, shared_tainted: bool) -> bool:
    root = ins.root
    return ((root in GLOBAL_LOADS and not is_flag_read(ins)) or root in MMA_OPCODES
            or (shared_tainted and root in SHARED_LOADS))


def _result_tainted(ins: Instruction, taint: int, shared_tainted: bool) -> bool:
    guard_tainted = ins.guard is not None and taint >> ins.guard & 1
    return bool(guard_tainted or taint & ins.uses) or _is_source(ins, shared_tainted)


# Known predicate values. ptxas opens ELECT and R2UR waterfall loops by setting a predicate to a constant
# (PLOP3.LUT P1, PT, PT, PT, PT, 0x80, 0x0 is "P1 = true"); knowing that `@P1 R2UR P0, UR10, R2` runs on
# the first pass lets it replace P0 there, so whatever P0 held before the loop does not appear to steer the
# loop. States are kept apart per set of known predicate values (a partition), so that a loop's entry
# (P1 known true) is not merged with its back edge (P1 unknown); past _MAX_PARTITIONS they are merged.
Known = tuple[int, int]  # (predicates known true, predicates known false), as register bits
_MAX_PARTITIONS = 16


def _known_value(bit: int | None, known: Known) -> bool | None:
    if bit is None:
        return None
    return True if known[0] >> bit & 1 else False if known[1] >> bit & 1 else None


def _operand_value(operand: str, known: Known) -> bool | None:
    """Value of a predicate operand (P1, !P0, PT, !UPT) where it is known."""
    name = operand.lstrip("!")
    value = True if name in ("PT", "UPT") else _known_value(register_bit(name), known)
    return None if value is None else value != operand.startswith("!")


def _executes(ins: Instruction, known: Known) -> bool | None:
    """Whether the instruction runs: True, False, or None when its guard is not known."""
    if ins.guard is None:
        return not ins.guarded  # unguarded or @PT; @!PT never runs
    value = _known_value(ins.guard, known)
    return None if value is None else value != ins.guard_negated


def _known_after(ins: Instruction, known: Known, executes: bool | None) -> Known:
    written = ins.defs & PREDICATE_BITS
    if not written or executes is False:
        return known
    values = {}
    if ins.root in ("PLOP3", "UPLOP3") and len(ins.operands) == 7:  # Pd, Pq, Pa, Pb, Pc, lut_d, lut_q
        inputs = [_operand_value(op, known) for op in ins.operands[2:5]]
        if None not in inputs:
            index = inputs[0] << 2 | inputs[1] << 1 | inputs[2]
            for dest, lut in zip(ins.operands[:2], ins.operands[5:]):
                values[register_bit(dest)] = bool(int(lut, 16) >> index & 1)
    true_bits, false_bits = known
    for bit in range(written.bit_length()):
        if written >> bit & 1:
            value = values.get(bit)
            if not executes and value != _known_value(bit, known):
                value = None  # may or may not have been written
            true_bits = true_bits | 1 << bit if value is True else true_bits & ~(1 << bit)
            false_bits = false_bits | 1 << bit if value is False else false_bits & ~(1 << bit)
    return true_bits, false_bits


def _step(ins: Instruction, known: Known, taint: int, shared_tainted: bool) -> tuple[Known, int]:
    """One instruction's effect on one partition. A write that surely runs replaces the taint of what it
    writes; one that may not run only adds to it."""
    executes = _executes(ins, known)
    if executes is False:
        return known, taint
    tainted = _result_tainted(ins, taint, shared_tainted)
    if executes:
        taint &= ~ins.defs
    return _known_after(ins, known, executes), taint | ins.defs if tainted else taint


def _cases(ins: Instruction, known: Known) -> list[Known]:
    """The partition, split on the guard of a guarded write whose guard is not known: once where it runs and
    once where it does not, so that a later instruction under the same guard (`@!P1 MOV R10, R6` then
    `@!P1 STG [R10.64]`) sees the value written, not a mix of old and new."""
    if ins.guard is None or not ins.defs or _executes(ins, known) is not None:
        return [known]
    bit = 1 << ins.guard
    as_true, as_false = (known[0] | bit, known[1]), (known[0], known[1] | bit)
    return [as_true, as_false]


def _merge(states: list[dict[Known, int]], collapsed: set[int], s: int, incoming: dict[Known, int]) -> bool:
    merged = dict(states[s])
    for known, taint in incoming.items():
        merged[known] = merged.get(known, 0) | taint
    if s in collapsed or len(merged) > _MAX_PARTITIONS:  # one partition: what all know, what any taints
        collapsed.add(s)
        true_bits = false_bits = -1
        taint = 0
        for (t, f), bits in merged.items():
            true_bits, false_bits, taint = true_bits & t, false_bits & f, taint | bits
        merged = {(true_bits, false_bits): taint}
    changed = merged != states[s]
    states[s] = merged
    return changed


def _fixpoint(instructions: list[Instruction], succ: list[list[int]], shared_tainted: bool) -> list[dict[Known, int]]:
    """Partitions {known predicate values: tainted registers} on entry to every instruction; empty where
    unreachable. At kernel entry nothing is tainted and no predicate is known."""
    states: list[dict[Known, int]] = [{} for _ in instructions]
    if not instructions:
        return states
    states[0] = {(0, 0): 0}
    collapsed: set[int] = set()
    pending, queued = [0], {0}
    while pending:  # lowest address first: loops settle in a few passes
        i = heapq.heappop(pending)
        queued.discard(i)
        out: dict[Known, int] = {}
        for known, taint in states[i].items():
            for case in _cases(instructions[i], known):
                case, taint_out = _step(instructions[i], case, taint, shared_tainted)
                out[case] = out.get(case, 0) | taint_out
        for s in succ[i]:
            if _merge(states, collapsed, s, out) and s not in queued:
                queued.add(s)
                heapq.heappush(pending, s)
    return states


def _shared_writer(ins: Instruction, taint: int) -> bool:
    """Does this instruction put tensor data (or data-dependent content) into shared memory?"""
    if ins.root in SHARED_FILLERS:
        return True
    if ins.root not in MAYBE_SHARED_STORES:
        return False
    guard_tainted = ins.guard is not None and taint >> ins.guard & 1
    return bool(guard_tainted or taint & ins.uses & ~ins.address_uses)


def _tainting_definitions(instructions, preds, taint_at, shared_tainted, i, bit) -> list[int]:
    """The instructions that wrote a tainted value into register `bit` and reach instruction i unoverwritten."""
    found, seen, frontier = [], set(), deque(preds[i])
    while frontier:
        p = frontier.popleft()
        if p in seen or taint_at[p] is None:
            continue
        seen.add(p)
        ins = instructions[p]
        if ins.defs >> bit & 1 and _result_tainted(ins, taint_at[p], shared_tainted):
            found.append(p)
            if not ins.guarded:
                continue
        if taint_at[p] >> bit & 1:
            frontier += preds[p]
    return found


def _origin(instructions, preds, taint_at, shared_tainted, i, bit) -> list[str]:
    """The shortest chain of tainting definitions from register `bit` at instruction i back to a source."""
    parent = dict.fromkeys(_tainting_definitions(instructions, preds, taint_at, shared_tainted, i, bit))
    queue = deque(parent)
    while queue:
        j = queue.popleft()
        ins, taint = instructions[j], taint_at[j]
        if _is_source(ins, shared_tainted):
            chain = [j]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return [f"0x{instructions[k].address:04x} {instructions[k].text}" for k in reversed(chain)]
        tainted = taint & ins.uses
        if ins.guard is not None and taint >> ins.guard & 1:
            tainted |= 1 << ins.guard
        for b in (b for b in range(tainted.bit_length()) if tainted >> b & 1):
            for k in _tainting_definitions(instructions, preds, taint_at, shared_tainted, j, b):
                if k not in parent:
                    parent[k] = j
                    queue.append(k)
    return []


_PHRASES = {
    "branch": ("branch taken or not by tainted", "branch condition or target from tainted"),
    "memory": ("memory access made or not by tainted", "address depends on tainted"),
    "sync": ("synchronisation made or not by tainted", "synchronisation operand from tainted"),
}


def _solve(instructions: list[Instruction], succ: list[list[int]]):
    """The fixed point, and the first instruction that puts tensor data into shared memory (None if none)."""
    fillers = [ins for ins in instructions if ins.root in SHARED_FILLERS]
    states = _fixpoint(instructions, succ, bool(fillers))
    if not fillers:  # a store of tainted data may reach shared memory: then solve again, shared loads tainted
        fillers = [ins for ins, partitions in zip(instructions, states) for known, taint in partitions.items()
                   if _executes(ins, known) is not False and _shared_writer(ins, taint)][:1]
        if fillers:
            states = _fixpoint(instructions, succ, True)
    return (fillers[0] if fillers else None), states


def _check(ins: Instruction, partitions: dict[Known, int]) -> tuple[str, str, int] | None:
    """(rule, reason, offending registers) if the instruction breaks its rule where it may run, else None."""
    rule = kind(ins)
    if rule == "register":
        return None
    operands = ins.address_uses if rule == "memory" else ins.uses
    guard = tainted = 0
    for known, taint in partitions.items():
        if _executes(ins, known) is not False:
            if ins.guard is not None and taint >> ins.guard & 1:
                guard = 1 << ins.guard
            tainted |= taint & operands
    if guard:
        return rule, _PHRASES[rule][0], guard
    if tainted:
        return rule, _PHRASES[rule][1], tainted
    return None


def analyse_kernel(kernel: Kernel, demangled: str | None = None) -> KernelVerdict:
    instructions = kernel.instructions
    succ, violations, notes = _control_flow(instructions)
    preds: list[list[int]] = [[] for _ in instructions]
    for i, successors in enumerate(succ):
        for s in successors:
            preds[s].append(i)
    filler, states = _solve(instructions, succ)
    if filler is not None:
        notes.append(f"shared memory holds tensor data ({filler.opcode} at 0x{filler.address:04x}): "
                     "every shared-memory load is a source")

    taint_at = [functools.reduce(operator.or_, p.values()) if p else None for p in states]
    for i, ins in enumerate(instructions):
        if taint_at[i] is None:
            continue
        if is_flag_read(ins):
            notes.append(f"reads a synchronisation flag at 0x{ins.address:04x} ({ins.text}): public, listed for "
                         "review")
        if any(_CLOCK.search(op) for op in ins.operands):
            notes.append(f"reads a clock at 0x{ins.address:04x} ({ins.text}): public, listed for review")
        broken = _check(ins, states[i])
        if broken:
            rule, phrase, bits = broken
            first = (bits & -bits).bit_length() - 1
            origin = _origin(instructions, preds, taint_at, filler is not None, i, first)
            violations.append(Violation(ins.address, ins.text, rule, f"{phrase} {', '.join(register_names(bits))}",
                                        origin))
    violations.sort(key=lambda v: v.address)
    analysed = sum(t is not None for t in taint_at)
    loops = spin_loops(instructions)
    notes += [f"wait at 0x{ins.address:04x} ({ins.text}) is in no recognised spin loop: the counters check would "
              "not set its retries apart" for ins in unrecognised_waits(instructions, loops)]
    return KernelVerdict(kernel.name, demangled or kernel.name, kernel.source, len(instructions), analysed,
                         violations, notes, loops)


def analyse_sass(text: str) -> list[KernelVerdict]:
    """Verdicts for every kernel of a `cuobjdump -sass` dump."""
    kernels = parse_sass(text)
    names = demangle([k.name for k in kernels])
    return [analyse_kernel(k, name) for k, name in zip(kernels, names)]


def installed_library() -> Path:
    """The libdhp.so of the installed dhp package."""
    return Path(__file__).parent.parent / "lib" / "libdhp.so"


def audit_library(library: Path) -> list[KernelVerdict]:
    """Disassemble a library (cuobjdump -sass) and judge every kernel in it."""
    return analyse_sass(disassemble(library))


def report(verdicts: list[KernelVerdict]) -> str:
    """The verdict table, then each violation with where its taint came from."""
    lines = [f"{'verdict':<8} {'analysed':>8} {'violations':>10} {'spin loops':>10}  kernel"]
    for v in verdicts:
        lines.append(f"{'PASS' if v.passed else 'FAIL':<8} {v.analysed:>8} {len(v.violations):>10} "
                     f"{len(v.spin_loops):>10}  {v.demangled}")
    for v in verdicts:
        if v.violations:
            lines += ["", f"{v.demangled}:"]
        for x in v.violations:
            source = f" (taint from {x.origin[-1]}, {len(x.origin)} steps)" if x.origin else ""
            lines.append(f"  0x{x.address:04x}  {x.instruction:<36} {x.rule}: {x.reason}{source}")
    return "\n".join(lines)
