"""python -m dhp: what this install is and whether it works here.

Prints the version, how the library was built and the GPUs it sees. On a Hopper GPU with torch installed it
also runs a quick self-check against a float64 reference (FlashAttention's rule: error at most twice that of
torch SDPA in the same dtype) and one speed line beside torch SDPA's cuDNN backend. Exits non-zero only when
the self-check fails (or the compiled library is missing).

    python -m dhp               the report
    python -m dhp --cmake-dir   the folder holding dhpConfig.cmake, for CMAKE_PREFIX_PATH / dhp_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# (dtype, head_dim, batch, seqlen_q, seqlen_k, heads_q, heads_kv, causal): ragged lengths, GQA, MQA, masks.
SELF_CHECK_CASES = (
    ("bfloat16", 128, 2, 1000, 1000, 4, 4, False),
    ("bfloat16", 128, 2, 1000, 1000, 8, 2, True),
    ("float16", 64, 1, 113, 203, 4, 1, True),
    ("bfloat16", 256, 1, 799, 3, 2, 2, True),
    ("float16", 128, 1, 1023, 1024, 8, 8, False),
    ("bfloat16", 64, 2, 17, 17, 2, 1, False),
)
SPEED_CASE = ("bfloat16", 128, 4, 4096, 16)  # dtype, head_dim, batch, seqlen, heads: 16k tokens, width 2048


def cmake_dir() -> Path:
    return Path(__file__).resolve().parent / "lib" / "cmake" / "dhp"


def _report_build(dhp) -> None:
    info = dhp.build_info()
    dtypes = ", ".join(map(str, info.get("dtypes", [])))
    head_dims = ", ".join(map(str, info.get("head_dims", [])))
    print(f"build: arch {info.get('arch')}, CUDA {info.get('cuda')}, dtypes {dtypes}, head_dims {head_dims}")


def _report_devices(devices) -> None:
    if not devices:
        print("no CUDA GPU visible")
    for d in devices:
        major, minor = d["compute_capability"]
        support = "supported" if d["supported"] else "not supported by dhp (needs sm_90, Hopper)"
        print(f"GPU {d['index']}: {d['name']}, sm_{major}{minor}, {d['multiprocessors']} SMs, {support}")


def _self_check(torch, device_index: int) -> bool:
    import dhp
    from dhp import _native, reference

    dtypes, head_dims = _native.variants()
    print(f"self-check on GPU {device_index} (torch {torch.__version__}; max abs error vs a float64 reference, "
          "limit 2x torch SDPA's error in the same dtype + 1e-5):")
    ok = True
    generator = torch.Generator(device=f"cuda:{device_index}").manual_seed(0)
    for dtype_name, d, b, sq, sk, hq, hkv, causal in SELF_CHECK_CASES:
        label = f"  {dtype_name:<8} d{d:<3} b{b} sq{sq:<4} sk{sk:<4} h{hq}/{hkv}{' causal' if causal else '':<7}"
        if dtype_name not in dtypes or d not in head_dims:
            print(f"{label} not in this build")
            continue
        dtype = getattr(torch, dtype_name)
        q = torch.randn(b, sq, hq, d, dtype=dtype, device=f"cuda:{device_index}", generator=generator)
        k, v = (torch.randn(b, sk, hkv, d, dtype=dtype, device=q.device, generator=generator) for _ in "kv")
        with torch.no_grad():
            out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
            ref_out, ref_lse = reference.attention_reference(q, k, v, causal)
            budget = reference.error_budget(q, k, v, causal, None, ref_out, ref_lse)
        error = reference.max_abs_error(out, ref_out, ref_lse)
        finite = bool(torch.isfinite(out).all()) and bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)))
        passed = finite and error <= budget
        ok &= passed
        print(f"{label} dhp {error:.2e}  limit {budget:.2e}  {'PASS' if passed else 'FAIL'}")
    return ok


def _speed_line(torch) -> None:
    from dhp import bench

    dtype, d, b, s, h = SPEED_CASE
    case = bench.Case(dtype, d, b, s, h, h, False)
    with torch.no_grad():
        times = bench.measure(torch, case, backends=("dhp", "cudnn"), reps=20, warmup=3)
    row = bench.make_row(case, times)
    cudnn = row["tflops"]["cudnn"]
    peer = "refused" if cudnn is None else f"{cudnn:.0f} TFLOP/s ({times['cudnn']:.3f} ms)"
    ratio = row["ratios"]["dhp/cudnn"]
    print(f"speed ({case.name}): dhp {row['tflops']['dhp']:.0f} TFLOP/s ({times['dhp']:.3f} ms), "
          f"torch SDPA cuDNN {peer}" + ("" if ratio is None else f", ratio {ratio:.2f}x"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dhp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cmake-dir", action="store_true", help="print the folder holding dhpConfig.cmake and exit")
    args = parser.parse_args(argv)
    if args.cmake_dir:
        print(cmake_dir())
        return 0

    import dhp
    from dhp import _native

    print(f"dhp {dhp.__version__}")
    if not _native.available():
        try:
            _native.ext()
        except ImportError as error:
            print(error, file=sys.stderr)
        return 1
    _report_build(dhp)
    devices = dhp.devices()
    _report_devices(devices)
    hopper = [d["index"] for d in devices if d["supported"]]
    if not hopper:
        if devices:
            print("self-check skipped: no supported GPU")
        return 0
    try:
        import torch
    except ImportError:
        print("self-check skipped: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("self-check skipped: torch sees no CUDA GPU")
        return 0
    with torch.cuda.device(hopper[0]):
        ok = _self_check(torch, hopper[0])
        _speed_line(torch)
    print("self-check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
