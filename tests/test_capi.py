"""The C API tests of tests/cpp, built with CMake against the *installed* dhp package.

This is the find_package proof: a separate CMake project finds dhp through the CMake package inside the
wheel (dhp_DIR = `python -m dhp --cmake-dir`), links the C++ validation tests and a plain C consumer, and ctest
runs them. None of that needs a GPU. The same build holds compressible_memory (where a CUDA toolkit is found),
which needs one: test_compressible_memory_refused runs it and skips with its reason without one.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_CPP = Path(__file__).resolve().parent / "cpp"


def dhp_prefix() -> Path:
    """Install prefix of the dhp wheel: the installed package directory (holds lib/, include/, lib/cmake/dhp)."""
    spec = importlib.util.find_spec("dhp")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "dhp is not installed: pip install '.[test]'"
    return Path(list(spec.submodule_search_locations)[0])


def cmake_dir_from_cli():
    """`python -m dhp --cmake-dir`, or None where the package has no such command."""
    if not (dhp_prefix() / "__main__.py").is_file():
        return None
    out = subprocess.run([sys.executable, "-m", "dhp", "--cmake-dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def cmake_dir() -> Path:
    """dhp's CMake package directory (dhpConfig.cmake)."""
    return cmake_dir_from_cli() or dhp_prefix() / "lib" / "cmake" / "dhp"


def test_wheel_layout():
    prefix = dhp_prefix()
    for rel in ["lib/libdhp.so", "include/dhp/dhp.h", "include/dhp/dlpack.h", "lib/cmake/dhp/dhpConfig.cmake",
                "lib/cmake/dhp/dhpConfigVersion.cmake", "lib/cmake/dhp/dhpTargets.cmake"]:
        assert (prefix / rel).is_file(), f"the installed package lacks {rel} (under {prefix})"
    assert list(prefix.glob("_C*.so")), f"the installed package lacks the extension module _C (under {prefix})"


def test_cmake_dir_cli():
    from_cli = cmake_dir_from_cli()
    if from_cli is None:
        pytest.skip("dhp has no __main__ (python -m dhp --cmake-dir) yet")
    assert from_cli.resolve() == (dhp_prefix() / "lib" / "cmake" / "dhp").resolve()


def _tool(*names):
    for name in names:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    """tests/cpp configured and built against the installed package: (build directory, ctest)."""
    cmake = _tool("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    ctest = _tool(str(Path(cmake).with_name("ctest")), "ctest")
    if _tool(os.environ.get("CC"), "cc", "gcc", "clang") is None or _tool(os.environ.get("CXX"), "c++", "g++",
                                                                          "clang++") is None:
        pytest.skip("no C/C++ compiler on PATH (cc, c++)")

    build = tmp_path_factory.mktemp("cpp") / "build"
    steps = [
        [cmake, "-S", str(TESTS_CPP), "-B", str(build), f"-Ddhp_DIR={cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"],
        [cmake, "--build", str(build), "--parallel", "2"],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True)
        print(result.stdout, result.stderr, sep="\n")
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return build, ctest


def test_capi_ctest(cpp_build):
    build, ctest = cpp_build
    cmd = [ctest, "--test-dir", str(build), "--output-on-failure", "--verbose"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert "100% tests passed" in result.stdout
    for host_check in ("fast_div", "tile_order", "dq_turns", "key_splits"):  # host-side index arithmetic ran, found nothing
        assert f"{host_check}: 0 failures" in result.stdout


def test_key_split_rule_in_python_matches_the_library(cpp_build, ext):
    """tests/key_split_rule.py, the key-split rule by which the GPU suites choose their shapes (test_forward,
    test_audit_dynamic), gives what the library's rule (fwd_config.h) gives on the 20,000 shapes of `key_splits
    --table`: the runs of a tile, their length and the runs a CTA takes. A mirror that drifted would leave those suites
    testing other paths than they name."""
    from dhp import _native
    from key_split_rule import key_split_runs_a_cta, key_splits

    build, _ = cpp_build
    result = subprocess.run([str(build / "key_splits"), "--table"], capture_output=True, text=True, check=True)
    info = _native.build_info()
    rows = [[int(x) for x in line.split()] for line in result.stdout.splitlines()]
    assert len(rows) == 20000
    wrong = [row for row in rows
             if key_splits(info, *row[1:5]) != (row[6], row[7])
             or key_split_runs_a_cta(info, row[0], row[5], *row[1:5]) != row[8]]
    assert not wrong, f"{len(wrong)} shapes differ, e.g. (head_dim seqlen_q seqlen_k heads_q heads_kv batch runs " \
                      f"blocks runs_a_cta) {wrong[:3]}"
    assert {row[6] for row in rows} >= {1, 2, 8} and {row[8] for row in rows} >= {1, 2, 3, 4}


SKIP_EXIT = 77  # compressible_memory's exit status when this machine cannot run it


def test_compressible_memory_refused(cpp_build):
    """Tensors in CUDA compressible memory are refused by name before any launch (tests/cpp/compressible_memory.cpp)."""
    build, _ = cpp_build
    exe = build / "compressible_memory"
    if not exe.is_file():
        pytest.skip("tests/cpp/compressible_memory was not built: CMake found no CUDA toolkit (CUDAToolkit)")
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr, sep="\n")
    if result.returncode == SKIP_EXIT:
        reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIP: ")]
        pytest.skip(reasons[-1][len("SKIP: "):] if reasons else "compressible_memory skipped without a reason")
    assert result.returncode == 0, f"compressible_memory failed:\n{result.stdout}\n{result.stderr}"
