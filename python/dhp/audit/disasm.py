"""SASS as data: run cuobjdump on a library and parse its text into kernels and instructions.

Only cuobjdump's `-sass` format is read (nvdisasm's labels are not). Each instruction line looks like

    /*63c0*/              @!P3 BRA 0x64c0 ;                 /* 0x00000000003cb947 */

and becomes an `Instruction`: address, guard predicate, opcode with modifiers, operands, and the register
sets it defines, reads, and reads as a memory address. Registers are numbered into one bit space
(general R0-R255, uniform UR0-UR63, predicates P0-P6, uniform predicates UP0-UP6) so that a set of them is
a Python int; the zero registers RZ/URZ and the true predicates PT/UPT are constants and have no bit.

Which operands are written is a per-opcode fact of the ISA, encoded in `_dest_count`; how many consecutive
registers an operand names (R10.64 is R10 and R11, HGMMA.64x176x16.F32 writes 88 registers, UTMALDG.4D's
[UR16] is UR16..UR21) is `_operand_widths`. Both err on the side of more registers: an over-wide operand can
only add taint, never hide it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Bit positions of the register files in a register set.
_BASE = {"R": 0, "UR": 256, "P": 320, "UP": 327}
_COUNT = {"R": 256, "UR": 64, "P": 7, "UP": 7}
ALL_PREDICATES = ((1 << 7) - 1) << _BASE["P"]
ALL_UNIFORM_PREDICATES = ((1 << 7) - 1) << _BASE["UP"]
PREDICATE_BITS = ALL_PREDICATES | ALL_UNIFORM_PREDICATES

_REGISTER = re.compile(r"(?<![\w.])(UR|R)(\d+|Z)(\.64)?(?!\w)")
_PREDICATE = re.compile(r"(?<![\w.])(UP|P)([0-6T]|R)(?!\w)")
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")
_GUARD = re.compile(r"^@(!?)(U?P[0-6T])\s+")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_IDENTIFIER = re.compile(r"^identifier\s*=\s*(.*)$")


def register_bit(name: str) -> int | None:
    """Bit of a register name ("R4", "UR8", "P0", "UP1"); None for RZ, URZ, PT, UPT."""
    m = re.fullmatch(r"(UR|R|UP|P)(\d+)", name)
    if not m or int(m.group(2)) >= _COUNT[m.group(1)]:
        return None
    return _BASE[m.group(1)] + int(m.group(2))


def register_names(bits: int) -> list[str]:
    """The names of the registers in a register set, in file order."""
    names = []
    for file, base in _BASE.items():
        for i in range(_COUNT[file]):
            if bits >> (base + i) & 1:
                names.append(f"{file}{i}")
    return names


def _registers(operand: str, width: int) -> int:
    """Register set named by one operand; `width` consecutive registers from each general/uniform one."""
    bits = 0
    operand = re.sub(r"desc\[(UR\d+)\]", r"desc[\1.64]", operand)  # memory descriptors are 64-bit
    for file, index, wide in _REGISTER.findall(operand):
        if index == "Z":
            continue
        count = max(width, 2 if wide else 1)
        for i in range(int(index), min(int(index) + count, _COUNT[file])):
            bits |= 1 << (_BASE[file] + i)
    for file, index in _PREDICATE.findall(operand):
        if index == "R":  # PR / UPR: the whole predicate file (P2R, R2P)
            bits |= ALL_PREDICATES if file == "P" else ALL_UNIFORM_PREDICATES
        elif index != "T":
            bits |= 1 << (_BASE[file] + int(index))
    return bits


def is_address(operand: str) -> bool:
    """A memory operand: [..], desc[..][..], gdesc[..]; a constant c[bank][offset] only when indexed by a register."""
    if "[" not in operand:
        return False
    return not operand.startswith("c[") or bool(_REGISTER.search(operand))


def _is_predicate(operand: str) -> bool:
    return re.fullmatch(r"U?P[0-6T]", operand) is not None


def _is_register(operand: str) -> bool:
    return re.fullmatch(r"U?R(\d+|Z)", operand) is not None


# Opcode families (the part before the first dot).
BRANCH_OPCODES = {"BRA", "BRX", "BRXU", "JMP", "JMX", "JMXU", "CALL", "RET", "EXIT", "BREAK", "KILL", "RTT", "BPT"}
SYNC_OPCODES = {
    "BAR", "BSSY", "BSYNC", "WARPSYNC", "MEMBAR", "FENCE", "ERRBAR", "CGAERRBAR", "DEPBAR", "WARPGROUP",
    "NANOSLEEP", "USETMAXREG", "SYNCS", "UTMACMDFLUSH", "LDGDEPBAR", "ACQBULK", "ARRIVES",
}
MMA_OPCODES = {"HGMMA", "IGMMA", "QGMMA", "BGMMA", "HMMA", "IMMA", "DMMA", "BMMA"}

# Operand layouts that differ from "operand 0 is the one destination".
_TWO_PREDICATE_DESTS = {"ISETP", "UISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "UPLOP3"}
_NO_DEST = BRANCH_OPCODES | SYNC_OPCODES - {"SYNCS", "USETMAXREG"} | {"YIELD", "NOP"}
_DOUBLE = {"DADD", "DMUL", "DFMA", "DMNMX", "DSETP", "DSET"}
_CONVERSIONS = {"F2F", "I2F", "F2I", "I2I", "I2FP", "F2IP"}


def _dest_count(root: str, operands: tuple[str, ...]) -> int:
    """How many leading operands an instruction writes."""
    if root in _NO_DEST or not operands or is_address(operands[0]):
        return 0
    if root in _TWO_PREDICATE_DESTS:
        return 2
    if root in ("VOTE", "VOTEU"):  # VOTE.ANY R5, PT, P0: all but the source predicate
        return len(operands) - 1
    if _is_predicate(operands[0]):
        # SHFL PT, R3, ..; LOP3.LUT P1, RZ, ..; R2UR P0, UR10, ..; ELECT P1, URZ, ..; but FCHK P0, R1, R2.
        return 2 if root != "FCHK" and len(operands) > 1 and _is_register(operands[1]) else 1
    count = 1
    # Carry-out predicates right after the result: IADD3 R2, P0, PT, ..; LEA R6, P2, ..; UIADD3 UR6, UP0, ..
    while count < len(operands) and count < 3 and _is_predicate(operands[count]):
        count += 1
    return count


def _size_width(modifiers: list[str]) -> int:
    """Registers per data operand of a memory instruction from its size modifier (.64, .128, .256)."""
    for modifier, width in (("256", 8), ("128", 4), ("64", 2)):
        if modifier in modifiers:
            return width
    return 1


def _operand_widths(root: str, modifiers: list[str], operands: tuple[str, ...], dests: int) -> list[int]:
    """Registers named by each operand (before the .64 suffix of 64-bit address registers is applied)."""
    widths = [1] * len(operands)
    if root in MMA_OPCODES:
        if root.endswith("GMMA"):  # warpgroup MMA 64xNxK: N/2 accumulators per thread, N/4 when they are fp16
            m = re.match(r"64x(\d+)x\d+", modifiers[0]) if modifiers else None
            n = int(m.group(1)) if m else 256
            acc = n // 4 if "F16" in modifiers[1:2] else n // 2
        else:  # warp MMA m16n8kK: 4 accumulators, 2 when they are fp16
            acc = 2 if "F16" in modifiers[1:2] else 4
        widths[0] = acc
        registers = [i for i in range(1, len(operands)) if _is_register(operands[i])]
        if root.endswith("GMMA"):
            # register-A form: D, A (4 registers), gdesc (A and B descriptors, UR+0..3), C; shared form: D, gdesc, C
            for i, op in enumerate(operands):
                if is_address(op):
                    widths[i] = 4
            for i in registers:
                widths[i] = acc if i == registers[-1] and is_address(operands[i - 1]) else 4
        else:  # D, A (4), B (2), C (accumulator)
            for i, width in zip(registers, (4, 2, acc)):
                widths[i] = width
        return widths
    if root in _DOUBLE:
        return [1 if _is_predicate(op) else 2 for op in operands]
    if root in _CONVERSIONS:
        types = [m for m in modifiers if re.fullmatch(r"[FSU](8|16|32|64)", m)]
        if types and types[0].endswith("64") and dests:
            widths[0] = 2
        if len(types) > 1 and types[1].endswith("64"):
            widths[dests:] = [2] * (len(operands) - dests)
        return widths
    if "WIDE" in modifiers:  # IMAD.WIDE(.U32) R2, R5, 0x4, R2: 64-bit result and addend
        widths[0] = 2
        widths[-1] = 2
        return widths
    if root == "CS2R" and "32" not in modifiers:
        widths[0] = 2
        return widths
    if root in ("LDSM", "STSM"):
        count = next((int(m) for m in reversed(modifiers) if m in ("1", "2", "4")), 1)
        return [1 if is_address(op) else count for op in operands]
    if root.startswith(("UTMA", "UBLK")):
        # UTMALDG.4D [UR16], [UR22]: smem address, mbarrier and 4 coordinates from UR16; 64-bit tensor map
        dims = next((int(m[0]) for m in modifiers if re.fullmatch(r"[1-5]D", m)), 0)
        addresses = [i for i, op in enumerate(operands) if is_address(op)]
        for k, i in enumerate(addresses):
            widths[i] = 2 + dims if k == 0 and len(addresses) > 1 else 2
        return widths
    if root == "LDC" or root == "ULDC" or any(is_address(op) for op in operands):
        size = _size_width(modifiers)
        return [1 if is_address(op) else size for op in operands]
    return widths


def _split_operands(text: str) -> tuple[str, ...]:
    """Operands split at top-level commas (and spaces: RET.REL.NODEC R2 0x0)."""
    operands, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if depth == 0 and (ch == "," or ch.isspace()):
            if current:
                operands.append(current)
            current = ""
        else:
            current += ch
    if current:
        operands.append(current)
    return tuple(operands)


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # as printed, guard included, without the trailing ';'
    guard: int | None  # bit of the guard predicate; None when unguarded, @PT or @!PT
    guard_negated: bool  # @!P0, @!PT
    guarded: bool  # carries a guard other than @PT: it may not execute
    opcode: str  # with modifiers: ISETP.GE.AND, HGMMA.64x64x16.F32.BF16
    operands: tuple[str, ...]
    defs: int  # registers written
    uses: int  # registers read, addresses included
    address_uses: int  # registers read as (part of) a memory address

    @property
    def root(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]

    def targets(self) -> list[int]:
        """Immediate branch targets (BRA 0x64c0, CALL.REL.NOINC 0x8460, BSSY B0, 0x2b0)."""
        return [int(op, 16) for op in self.operands if re.fullmatch(r"0x[0-9a-f]+", op)]


def parse_instruction(address: int, text: str) -> Instruction:
    guard, negated, guarded, body = None, False, False, text
    m = _GUARD.match(text)
    if m:
        guard, negated = register_bit(m.group(2)), m.group(1) == "!"
        guarded = not m.group(2).endswith("PT") or negated
        body = text[m.end():]
    opcode, _, rest = body.strip().partition(" ")
    operands = _split_operands(rest)
    root, modifiers = opcode.split(".")[0], opcode.split(".")[1:]
    dests = _dest_count(root, operands)
    widths = _operand_widths(root, modifiers, operands, dests)
    defs = uses = address_uses = 0
    for i, (operand, width) in enumerate(zip(operands, widths)):
        bits = _registers(operand, width)
        if i < dests:
            defs |= bits
        else:
            uses |= bits
            if is_address(operand):
                address_uses |= bits
    if root == "R2UR" and "OR" in modifiers:  # R2UR.OR P0, UR8, R40 accumulates into P0
        uses |= defs & PREDICATE_BITS
    return Instruction(address, text, guard, negated, guarded, opcode, operands, defs, uses, address_uses)


@dataclass
class Kernel:
    name: str  # mangled, as cuobjdump prints it
    source: str  # the cubin's identifier (its source file), "" when the dump has none
    instructions: list[Instruction]


def parse_sass(text: str) -> list[Kernel]:
    """All kernels of a `cuobjdump -sass` dump, in order."""
    kernels: list[Kernel] = []
    source = ""
    for line in text.splitlines():
        if m := _IDENTIFIER.match(line):
            source = m.group(1).strip()
        elif m := _FUNCTION.match(line):
            kernels.append(Kernel(m.group(1), source, []))
        elif (m := _LINE.match(line)) and kernels:
            kernels[-1].instructions.append(parse_instruction(int(m.group(1), 16), m.group(2)))
    return kernels


def find_cuda_tool(name: str) -> str | None:
    """A CUDA binary tool: PATH, then CUDA_HOME / CUDA_PATH / /usr/local/cuda*, then pip's nvidia/*/bin."""
    if shutil.which(name):
        return shutil.which(name)
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *sorted(glob.glob("/usr/local/cuda*"))]
    sites = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    candidates = [f"{h}/bin/{name}" for h in homes if h] + [
        c for s in sites if s for c in sorted(glob.glob(f"{s}/nvidia/*/bin/{name}"))]
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


class ToolMissing(RuntimeError):
    """cuobjdump or the nvdisasm behind `cuobjdump -sass` is not installed."""


def disassemble(library: Path) -> str:
    """`cuobjdump -sass library`, with nvdisasm on PATH wherever it was found."""
    cuobjdump = find_cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise ToolMissing("cuobjdump not found (PATH, /usr/local/cuda*/bin, pip install nvidia-cuda-cuobjdump)")
    env = dict(os.environ)
    nvdisasm = find_cuda_tool("nvdisasm")
    if nvdisasm:
        env["PATH"] = os.pathsep.join([str(Path(nvdisasm).parent), env.get("PATH", "")])
    result = subprocess.run([cuobjdump, "-sass", str(library)], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        if "nvdisasm" in result.stderr:
            raise ToolMissing(f"cuobjdump -sass needs nvdisasm (pip install nvidia-cuda-nvdisasm): "
                              f"{result.stderr.strip()}")
        raise RuntimeError(f"cuobjdump -sass {library} failed: {result.stderr.strip()}")
    return result.stdout


def demangle(names: list[str]) -> list[str]:
    """C++ names through c++filt where it exists; unchanged otherwise."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=False).stdout.splitlines()
    return out if len(out) == len(names) else names
