"""The machine code of the installed libdhp.so, read with cuobjdump (no GPU needed).

- every kernel: registers / stack / shared / local memory, printed as a table (pytest -s shows it), and no
  local memory or stack (a spill would be both slow and a data-dependent memory access pattern risk);
- every variant of the build (dhp_build_info) has its kernels, and their SASS holds HGMMA (wgmma) and
  UTMALDG (TMA loads);
- no kernel makes a generic load or store (LD/ST): shared memory goes through LDS/STS, global memory through
  LDG/STG or TMA;
- forward kernels: the softmax's place around the P V wait, mask code only in causal loops, and Q's fragments
  (`q_registers` tiles) never overwritten inside a loop whose QK^Ts read them;
- the library exports only the C API and needs neither libcuda nor a shared CUDA runtime.

cuobjdump comes from PATH, /usr/local/cuda*/bin or the pip packages nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm (cuobjdump -sass runs nvdisasm).
"""

import ctypes
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dhp.audit.disasm import find_cuda_tool
from test_capi import dhp_prefix


def libdhp() -> Path:
    path = dhp_prefix() / "lib" / "libdhp.so"
    assert path.is_file(), f"{path} is missing"
    return path


@functools.cache
def cuobjdump(*args) -> str:
    tool = find_cuda_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, /usr/local/cuda*/bin, pip install nvidia-cuda-cuobjdump)")
    env = dict(os.environ)
    nvdisasm = find_cuda_tool("nvdisasm")
    if nvdisasm:
        env["PATH"] = os.pathsep.join([str(Path(nvdisasm).parent), env.get("PATH", "")])
    result = subprocess.run([tool, *args, str(libdhp())], capture_output=True, text=True, env=env)
    if "nvdisasm" in result.stderr and result.returncode != 0:
        pytest.skip(f"cuobjdump needs nvdisasm (pip install nvidia-cuda-nvdisasm): {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def build_info() -> dict:
    lib = ctypes.CDLL(str(libdhp()))
    lib.dhp_build_info.restype = ctypes.c_char_p
    return json.loads(lib.dhp_build_info())


def built_variants():
    info = build_info()
    return [(dt, hd) for dt in info["dtypes"] for hd in info["head_dims"]]


def variant_of(source):
    """(dtype, head_dim) of a generated instance file fwd_<dtype>_hd<head_dim>.cu, else None."""
    m = re.search(r"fwd_(\w+)_hd(\d+)\.cu$", source or "")
    return (m.group(1), int(m.group(2))) if m else None


def sections(dump):
    """cuobjdump output split per embedded cubin: [(identifier = source file, text)]."""
    parts = re.split(r"^Fatbin elf code:\s*$", dump, flags=re.MULTILINE)[1:]
    identifiers = [re.search(r"^identifier = (.*)$", p, re.MULTILINE) for p in parts]
    return [(m.group(1).strip() if m else "", p) for m, p in zip(identifiers, parts)]


def kernels():
    """One row per kernel: name, source, variant and its resource counts."""
    rows = []
    for source, text in sections(cuobjdump("--dump-resource-usage")):
        for name, usage in re.findall(r"^\s*Function (\S+):\s*\n\s*(.*)$", text, re.MULTILINE):
            counts = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage)}
            rows.append({"name": name, "source": source, "variant": variant_of(source), **counts})
    return rows


def demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def test_kernel_resources():
    rows = kernels()
    names = demangle([r["name"] for r in rows])
    print(f"\n{'variant':<12} {'REG':>4} {'STACK':>6} {'SHARED':>7} {'LOCAL':>6}  kernel")
    for r, name in zip(rows, names):
        variant = f"{r['variant'][0]} hd{r['variant'][1]}" if r["variant"] else Path(r["source"]).name
        print(f"{variant:<12} {r['REG']:>4} {r['STACK']:>6} {r['SHARED']:>7} {r['LOCAL']:>6}  {name}")

    assert rows, "libdhp.so holds no kernels"
    spills = [(name, r["LOCAL"], r["STACK"]) for r, name in zip(rows, names) if r["LOCAL"] or r["STACK"]]
    assert not spills, f"kernels with local memory / stack (name, LOCAL, STACK): {spills}"
    missing = set(built_variants()) - {r["variant"] for r in rows}
    assert not missing, f"built variants without a kernel in libdhp.so: {sorted(missing)}"


def test_sass_has_wgmma_and_tma():
    per_variant = {variant_of(source): text for source, text in sections(cuobjdump("-sass"))}
    for variant in built_variants():
        sass = per_variant.get(variant)
        assert sass is not None, f"no SASS for variant {variant}"
        for op in ("HGMMA", "UTMALDG"):
            assert re.search(rf"\b{op}\b", sass), f"variant {variant}: no {op} in its SASS"


GENERIC_ACCESS = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?((?:LD|ST)(?:\.[\w.]+)?)\s")


def generic_accesses(sass):
    """{kernel: [instruction, ...]} of generic LD/ST instructions in a `cuobjdump -sass` listing."""
    found, kernel = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            kernel = m.group(1)
        else:
            m = GENERIC_ACCESS.match(line)
            if m:
                found.setdefault(kernel, []).append(m.group(1))
    return found


def test_generic_access_pattern():
    sass = """
        Function : k
        /*0010*/                   LD.E.64 R120, desc[UR22][R2.64+0x500] ;
        /*0020*/              @!P0 ST.E [R4.64], R6 ;
        /*0030*/                   LDS.64 R2, [R3+UR4] ;
        /*0040*/                   STS.128 [R7], R8 ;
        /*0050*/                   LDG.E.STRONG.GPU R3, desc[UR4][R2.64] ;
        /*0060*/                   LDSM.16.M88.4 R8, [R2+UR4] ;
        /*0070*/                   STL.64 [R1], R2 ;
    """
    assert generic_accesses(sass) == {"k": ["LD.E.64", "ST.E"]}


DSMEM_READ = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+LD\.E R\d+, \[R\d+(?:\+0x[0-9a-f]+)?\] ;", re.MULTILINE)


def test_no_generic_memory_access():
    """A generic LD/ST means the compiler lost the state space of a pointer (e.g. one rounded up as an integer):
    64-bit addresses, more registers, a slower path. The backward had them for every shared-memory access until
    the dynamic shared memory was aligned by pointer arithmetic (hopper/smem.cuh). Distributed shared memory has no
    load of its own: the forward's key-split tier joins the other CTAs' partial results with generic loads of 32-bit
    shared::cluster addresses (`LD.E R2, [R3+0x200]`, from mapa), the only generic accesses allowed, and only there."""
    sass = cuobjdump("-sass")
    found = generic_accesses(sass)
    tiles = build_info()["forward_tiles"]
    for name, text in functions(sass).items():
        m = FWD_KERNEL.search(name)
        tier = m and next(t for t in tiles if (t["head_dim"], t["causal"], t["tier"]) ==
                          (int(m.group(1)), m.group(2) == "1", int(m.group(3))))
        if tier and tier["key_splits"] and name in found:
            reads = len(DSMEM_READ.findall(text))
            assert reads and found[name] == ["LD.E"] * reads, f"{name}: generic accesses besides its join's reads"
            del found[name]
    assert not found, f"generic loads/stores per kernel: {dict(zip(demangle(list(found)), found.values()))}"


def test_exports_only_the_c_api():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found")
    out = subprocess.run([nm, "-D", "--defined-only", str(libdhp())], capture_output=True, text=True, check=True)
    symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    linker_symbols = {"_init", "_fini", "_edata", "_end", "__bss_start"}
    assert "dhp_attention_forward" in symbols
    assert [s for s in symbols if not s.startswith("dhp_") and s not in linker_symbols] == []


def test_needs_no_cuda_libraries():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not found")
    out = subprocess.run([readelf, "-d", str(libdhp())], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    assert needed, out
    assert not [n for n in needed if n.startswith(("libcuda", "libcudart"))], needed


FWD_KERNEL = re.compile(r"attention_fwd_kernelI\w+?Li(\d+)ELb([01])ELi(\d+)EE")


def functions(sass):
    """{kernel: its SASS text} of a `cuobjdump -sass` listing."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def forward_kernels():
    """(name, SASS, its entry of the build info's forward_tiles) of every forward kernel in the library."""
    tiles = build_info()["forward_tiles"]
    for name, sass in functions(cuobjdump("-sass")).items():
        m = FWD_KERNEL.search(name)
        if m:
            key = (int(m.group(1)), m.group(2) == "1", int(m.group(3)))
            (tile,) = (t for t in tiles if (t["head_dim"], t["causal"], t["tier"]) == key)
            yield name, sass, tile


def exp2_between_waits(sass):
    """MUFU.EX2 count in each stretch from a `wgmma.wait_group 1` to the next `wait_group 0`."""
    counts, inside = [], False
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            counts.append(0)
            inside = True
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            inside = False
        elif inside and "MUFU.EX2" in line:
            counts[-1] += 1
    return counts


def test_exp2_between_waits_pattern():
    sass = """
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0020*/                   MUFU.EX2 R1, R1 ;
        /*0030*/                   MUFU.EX2 R2, R2 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   MUFU.EX2 R3, R3 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    assert exp2_between_waits(sass) == [2, 0]


def test_forward_softmax_runs_under_its_pv():
    """Forward tiles compute softmax_under_pv row halves of the softmax of S(j+1) while their own P(j) V(j) is in
    flight: that many halves' exponentials of the key block sit between the wgmma waits for QK^T (wait_group 1)
    and for PV (wait_group 0), and with fewer than two some follow the second wait. ptxas hoists the second wait
    above the softmax unless a branch separates them, so this is checked on the machine code, where a source
    change or a new ptxas could silently undo it."""
    checked = 0
    for name, sass, tile in forward_kernels():
        per_block = tile["block_n"] // 2  # exponentials of one key block per thread (its S fragment)
        counts = exp2_between_waits(sass)
        assert counts, f"{name}: no wgmma wait_group 1 in its SASS"
        under = per_block * tile["softmax_under_pv"] // 2
        assert max(counts) >= under, f"{name}: at most {max(counts)} of {per_block} exp2 under PV, tile says {under}"
        if tile["softmax_under_pv"] < 2:
            assert max(counts) < per_block, f"{name}: {max(counts)} exp2 under PV, tile says {under} of {per_block}"
        checked += 1
    assert checked, "no forward kernel found"


SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;", re.MULTILINE)


def key_block_loops(sass):
    """The instructions of each innermost loop that holds a `wgmma.wait_group 1`, in address order (the unconditional
    jumps back from the out-of-line retry stubs of barrier waits close no loop)."""
    return innermost_loops_with(sass, re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1"))


def innermost_loops_with(sass, pattern):
    """The instructions of each innermost loop (a conditional backward branch's range holding no other such range)
    that holds an instruction matching `pattern`, in address order."""
    lines = [(int(a, 16), text) for a, text in SASS_LINE.findall(sass)]
    index = {address: i for i, (address, _) in enumerate(lines)}
    ranges = []
    for i, (address, text) in enumerate(lines):
        m = re.match(r"@!?U?P\w+\s+BRA\s+`?\(?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= address or int(m.group(1), 16) not in index:
            continue
        start = index[int(m.group(1), 16)]
        if any(pattern.search(t) for _, t in lines[start:i + 1]):
            ranges.append((start, i))
    innermost = [(a, b) for a, b in ranges if not any((c, d) != (a, b) and a <= c and d <= b for c, d in ranges)]
    return [[t for _, t in lines[a:b + 1]] for a, b in sorted(innermost)]


def masking_selects(body):
    """Selects of a score to -inf (the position mask) among the instructions `body`."""
    return sum(1 for t in body if re.match(r"(@!?U?P\w+\s+)?FSEL\b.*-INF\b", t))


def test_key_block_loop_pattern():
    sass = """
        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0020*/                   FSEL R24, R24, -INF , !P0 ;
        /*0030*/                   FSEL R10, R10, RZ, P0 ;
        /*0040*/              @!P1 BRA 0x10 ;
        /*0050*/                   BRA 0x0 ;
    """
    (body,) = key_block_loops(sass)
    assert body[0].startswith("WARPGROUP.DEPBAR") and body[-1].startswith("@!P1 BRA") and len(body) == 4
    assert masking_selects(body) == 1


def test_forward_loop_masks_only_under_a_causal_mask():
    """Without a causal mask only a tile's first key block (the seqlen_k tail) can need masking, and it is peeled out
    of the key-block loop: the loop must hold no mask code at all (a never-taken branch around it cost 1-4%,
    docs/performance.md). Causal tiles mask the diagonal blocks they reach: with `masked_loop` in a loop of their own
    beside a loop without mask code, otherwise in their one loop."""
    checked = 0
    for name, sass, tile in forward_kernels():
        selects = sorted(masking_selects(body) for body in key_block_loops(sass))
        if not tile["causal"]:
            ok = selects == [0]
        elif tile["masked_loop"]:
            ok = len(selects) == 2 and selects[0] == 0 < selects[1]
        else:
            ok = len(selects) == 1 and selects[0] > 0
        assert ok, f"{name}: masking selects per key-block loop {selects} (tile {tile})"
        checked += 1
    assert checked, "no forward kernel found"


def vector_lop3(body):
    """Vector-register LOP3s (bitwise ops, not the uniform datapath's ULOP3) among the instructions `body`."""
    return sum(1 for t in body if re.match(r"(@!?U?P\w+\s+)?LOP3\b", t))


def test_vector_lop3_pattern():
    body = ["LOP3.LUT R4, R4, 0x3, RZ, 0xc0, !PT", "ULOP3.LUT UR4, UR4, 0x3, URZ, 0xc0, !UPT",
            "@!P0 LOP3.LUT R5, R2, R3, RZ, 0xfc, !PT", "FSEL R24, R24, -INF , !P0"]
    assert vector_lop3(body) == 2


def test_forward_mask_compares_with_constants():
    """The position mask takes the lane's column offset off the limit, so each score register is compared with a
    compile-time column (one ISETP with an immediate): no per-register column arithmetic in a masking loop. Building
    each register's column instead cost 18-43 LOP3s a masked loop (29-37 instructions a key block, causal head_dim 64
    +0.7..+1.7%, docs/performance.md); the mask leaves 3-4."""
    checked = 0
    for name, sass in functions(cuobjdump("-sass")).items():
        if not FWD_KERNEL.search(name):
            continue
        for body in key_block_loops(sass):
            selects = masking_selects(body)
            if selects:
                assert 4 * vector_lop3(body) < selects, f"{name}: {vector_lop3(body)} LOP3 beside {selects} mask selects"
                checked += 1
    assert checked, "no masking forward loop found"


ATTENTION_KERNEL = re.compile(r"attention_(fwd|bwd)_kernel")


def uniformity_report(sass):
    """{kernel: (WARPSYNC count, descriptor encodes (the 0x3fff0 start-address mask), HGMMA count)}."""
    return {name: (len(re.findall(r"\bWARPSYNC\b", body)), len(re.findall(r"\b0x3fff0\b", body)),
                   len(re.findall(r"\bHGMMA\b", body)))
            for name, body in functions(sass).items() if ATTENTION_KERNEL.search(name)}


def test_uniformity_report_pattern():
    sass = """
        Function : _ZN3dhp7kernels20attention_fwd_kernelIiEEvv
        /*0010*/                   WARPSYNC.ALL ;
        /*0020*/                   ULOP3.LUT UR8, UR8, 0x3fff0, URZ, 0xc0, !UPT ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR16], R88 ;
        Function : _ZN3dhp7kernels15other_kernelEv
        /*0010*/                   WARPSYNC.ALL ;
    """
    assert uniformity_report(sass) == {"_ZN3dhp7kernels20attention_fwd_kernelIiEEvv": (1, 1, 1)}


# Head_dim 256's key-split kernels (R235-R237 of 240 registers): ptxas builds the K and V descriptors of the narrow
# split path's key blocks (decoding) from the shared-memory base in vector registers and fences each block's two wgmma
# groups with a WARPSYNC; measured (docs/performance.md, "Head_dim 256's narrow tiles split over both warpgroups"), that
# path is bound by K and V's stream. Those kernels may have that many, no other kernel any.
KEY_SPLIT_WARPSYNCS = {256: 2}


def test_collective_operands_are_warp_uniform():
    """wgmma, TMA and the named barriers take warp-uniform operands. Anything derived from threadIdx.x / 128 is not
    provably uniform to ptxas (it does not assume a 1-D block), so it kept such values in vector registers, moved
    them with R2UR before every use and fenced some uses with WARPSYNC; the kernels read the warpgroup index
    through __shfl_sync instead (KEY_SPLIT_WARPSYNCS: the one exception). And a wgmma descriptor is encoded once per
    GEMM and advanced by one add (hopper::advance), not re-encoded per k16 step: encodes stay far below the wgmma
    count."""
    report = uniformity_report(cuobjdump("-sass"))
    assert report, "no attention kernel found"
    tiles = build_info()["forward_tiles"]
    for (mangled, (warpsyncs, encodes, wgmmas)), name in zip(report.items(), demangle(list(report))):
        m = FWD_KERNEL.search(mangled)
        tier = m and next(t for t in tiles if (t["head_dim"], t["causal"], t["tier"]) ==
                          (int(m.group(1)), m.group(2) == "1", int(m.group(3))))
        allowed = KEY_SPLIT_WARPSYNCS.get(tier["head_dim"], 0) if tier and tier["key_splits"] else 0
        assert warpsyncs <= allowed, f"{name}: {warpsyncs} WARPSYNC (an operand not provably warp-uniform)"
        assert encodes * 4 <= wgmmas, f"{name}: {encodes} descriptor encodes for {wgmmas} wgmmas"


# A QK^T wgmma with Q from registers: A a register quad, B (K) not transposed.
QK_FROM_REGISTERS = re.compile(r"HGMMA\.\S+ R\d+, R(\d+), gdesc\[UR\d+\](?!\.tnspB)")


def q_fragment_writes(body):
    """(registers the QK^Ts of `body` read Q from, the instructions of `body` that write one of them)."""
    q = set()
    for t in body:
        m = QK_FROM_REGISTERS.search(t)
        if m:
            q.update(range(int(m.group(1)), int(m.group(1)) + 4))
    writes = []
    for t in body:
        m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s+R(\d+)\b", t)
        if not m or m.group(1).startswith(("HGMMA", "ST")):
            continue
        width = 4 if m.group(1).startswith("LDSM") or ".128" in m.group(1) else 2 if ".64" in m.group(1) else 1
        if q & set(range(int(m.group(2)), int(m.group(2)) + width)):
            writes.append(t)
    return q, writes


def test_q_fragment_writes_pattern():
    sass = """
        /*0000*/                   LDSM.16.M88.4 R180, [R6] ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, R180, gdesc[UR12], RZ, !UPT ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88 ;
        /*0030*/                   FFMA R182, R24, UR6, -R10 ;
        /*0040*/                   F2FP.BF16.F32.PACK_AB R152, R25, R24 ;
        /*0050*/              @!P0 BRA 0x10 ;
    """
    (body,) = innermost_loops_with(sass, QK_FROM_REGISTERS)
    q, writes = q_fragment_writes(body)
    assert q == {180, 181, 182, 183} and writes == ["FFMA R182, R24, UR6, -R10"]


def test_forward_q_fragments_stay_in_their_registers():
    """Tiles with `q_registers` keep Q's k16 fragments in registers across their key-block loop, loaded once a tile
    (LDSM), and their QK^T wgmmas read them there: no instruction of a loop that reads them may write one of those
    registers. ptxas did, once (the key-split tier's split loop: the softmax took the fragments' registers, and the next
    QK^T read its values; attention_fwd.cuh), so this is checked on the machine code. Tiles without `q_registers`
    read Q from shared memory alone."""
    checked = 0
    for name, sass, tile in forward_kernels():
        checked += 1
        loops = innermost_loops_with(sass, QK_FROM_REGISTERS)
        if not tile["q_registers"]:
            assert not QK_FROM_REGISTERS.search(sass), f"{name}: QK^T from registers, tile says shared memory"
            continue
        assert loops, f"{name}: no loop with a QK^T from registers (tile {tile})"
        for body in loops:
            q, writes = q_fragment_writes(body)
            expected = tile["head_dim"] // 4  # head_dim / 16 k16 steps of four registers
            assert len(q) == expected, f"{name}: QK^T reads {len(q)} registers of Q, not {expected}"
            assert not writes, f"{name}: a loop writes Q's fragment registers: {writes[:4]}"
    assert checked, "no forward kernel found"
