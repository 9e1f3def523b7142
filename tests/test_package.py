"""The package without a GPU: import, build report, CLI, and C validation errors reaching Python.

Validation is exercised with inputs that fail before the C API queries any device: NumPy (CPU) arrays, and
"CUDA" tensors that are DLPack descriptions only (their data pointer is never dereferenced), which fail on
dtype, rank or head_dim, checked before anything touches a device.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import dhp
import numpy as np
import pytest

FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy")


def _run(*args, **env):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def test_import_needs_no_framework():
    code = (
        "import sys, dhp\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print(dhp.__version__)\n"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_version_and_build_info(ext):
    info = dhp.build_info()
    assert {"version", "cuda", "arch", "dtypes", "head_dims"} <= info.keys()
    assert info["version"] == dhp.__version__ == ext.version()
    assert len(dhp.__version__.split(".")) == 3
    assert "90" in str(info["arch"])
    dtypes, head_dims = dhp._native.variants()
    assert dtypes and set(dtypes) <= {"bfloat16", "float16"}
    assert head_dims and set(head_dims) <= {64, 128, 256}


def test_build_info_lists_the_forward_tiles(ext):
    """One main tile configuration (any seqlen_k) per compiled head_dim and mask, at most one short-key tier, one
    scheduled short tier (the short tier's tile from min_seqlen_k up to its max_seqlen_k), one split tier (the main
    tier's tiles with split_tile, up to max_seqlen_q), one long-key tier (from min_seqlen_k, past the short tier's limit)
    and one key-split tier (128-row tiles with key_splits, up to max_seqlen_q; split tiles of 64 rows, or of
    "key_split_narrow_rows" where shared memory holds no more); "scheduled" only on causal tiers that never run below
    2049 keys."""
    info = dhp.build_info()
    tiles = info["forward_tiles"]
    keys = {"head_dim", "causal", "tier", "max_seqlen_k", "min_seqlen_k", "max_seqlen_q", "block_m", "block_n", "stages",
            "q_buffers",
            "consumer_warpgroups", "softmax_under_pv", "softmax_chains", "half_first_block", "o_stage_boxes",
            "masked_loop", "split_tile", "split_rows", "key_splits", "scheduled", "q_registers", "q_o_evict_first"}
    assert tiles and all(set(t) == keys for t in tiles)
    for head_dim in info["head_dims"]:
        for causal in (False, True):
            family = [t for t in tiles if t["head_dim"] == head_dim and t["causal"] == causal]
            assert [t["tier"] for t in family] == list(range(len(family))), family
            main = [t for t in family if t["max_seqlen_k"] is None and t["max_seqlen_q"] is None and
                    t["min_seqlen_k"] is None]
            assert len(main) == 1 and not main[0]["split_tile"], family
            long_keys = [t for t in family if t["min_seqlen_k"] is not None and t["max_seqlen_k"] is None]
            short = max((t["max_seqlen_k"] for t in family if t["max_seqlen_k"] is not None), default=0)
            # the scheduled short tier: the short tier's tile from min_seqlen_k up to its limit
            short_tier = [t for t in family if t["max_seqlen_k"] is not None and t["min_seqlen_k"] is None]
            scheduled = [t for t in family if t["max_seqlen_k"] is not None and t["min_seqlen_k"] is not None]
            assert len(scheduled) <= 1 and all(
                len(short_tier) == 1 and 1 < t["min_seqlen_k"] <= t["max_seqlen_k"] == short_tier[0]["max_seqlen_k"]
                and {**t, "tier": 1, "min_seqlen_k": None, "scheduled": False} == short_tier[0] and t["scheduled"]
                for t in scheduled), family
            # a static schedule of the causal persistent grid only in tiers that never run below 2049 keys (fwd_scheduled)
            least = {t["tier"]: t["min_seqlen_k"] or (1 if t in short_tier else short + 1) for t in family}
            assert all(causal and not t["key_splits"] and least[t["tier"]] >= 2049 for t in family if t["scheduled"]), family
            assert len(long_keys) <= 1 and all(t["min_seqlen_k"] > short and t["max_seqlen_k"] is None and
                                               not t["split_tile"] and not t["key_splits"] for t in long_keys), family
            split = [t for t in family if t["split_tile"] and not t["key_splits"]]
            assert all(t["max_seqlen_q"] > 0 and t["max_seqlen_k"] is None for t in split) and len(split) <= 1
            assert all({**t, "tier": 0, "max_seqlen_q": None, "split_tile": False, "split_rows": None} == main[0]
                       for t in split), family
            assert all(t["split_rows"] == 64 for t in split) and all(t["split_rows"] is None for t in family
                                                                     if not t["split_tile"]), family
            keys_split = [t for t in family if t["key_splits"]]
            assert len(keys_split) <= 1 and all(t["max_seqlen_q"] > 0 and t["max_seqlen_k"] is None for t in keys_split)
            assert all((t["block_m"], t["consumer_warpgroups"], t["o_stage_boxes"], 128 % t["block_n"]) == (128, 2, 0, 0)
                       and t["split_tile"] for t in keys_split), family
            assert all(t["split_rows"] in (64, info["key_split_narrow_rows"]) for t in keys_split), family
            assert all((t["max_seqlen_q"] is None) == (not t["split_tile"] and not t["key_splits"]) for t in family)
            assert len(family) <= 5 and all(t["max_seqlen_k"] is None or t["max_seqlen_k"] > 0 for t in family)
            assert all(t["block_m"] == 64 * t["consumer_warpgroups"] and t["block_n"] % 16 == 0 for t in family)
            assert all(t["stages"] >= 2 for t in family if t["softmax_under_pv"])
            assert all(t["softmax_chains"] in (1, 2, 4, 8) for t in family)
            assert all(t["block_n"] // 2 % 16 == 0 for t in family if t["half_first_block"])
            assert causal or not any(t["half_first_block"] or t["masked_loop"] for t in family)
            assert all(t["o_stage_boxes"] == 0 or head_dim // 64 % t["o_stage_boxes"] == 0 for t in family)
    assert {t["head_dim"] for t in tiles} == set(info["head_dims"])
    assert {str(d) for d in info["head_dims"]} <= set(info["persistent_causal_max_seqlen_k"])
    assert all(limit > 0 for limit in info["persistent_causal_max_seqlen_k"].values())
    assert info["causal_section_bytes"] >= 1 << 20
    assert 1 <= info["key_split_narrow_min_blocks"] <= info["key_split_min_blocks"]
    assert 2 <= info["key_split_max_ctas"] <= 8
    waves = info["key_split_waves"]  # [cluster size, clusters at once]: from the largest cluster down to one CTA
    assert waves[0][0] == info["key_split_max_ctas"] and waves[-1][0] == 1, waves
    assert set(info["key_split_max_runs"]) == {str(d) for d in info["head_dims"]}, info["key_split_max_runs"]
    assert all(1 <= r <= 8 for r in info["key_split_max_runs"].values()) and info["key_split_narrow_rows"] == 8
    assert info["key_split_stream_ctas"] >= 1 and info["key_split_wave_blocks"] >= 0
    assert all(a[0] > b[0] and a[1] < b[1] for a, b in zip(waves, waves[1:])), waves
    backward = {str(d) for d in info["backward_head_dims"]}
    assert set(info["backward_two_dq_chains_max_seqlen_k"]) == backward
    assert set(info["backward_two_dq_chains_min_seqlen_k"]) == backward
    assert all(0 <= info["backward_two_dq_chains_min_seqlen_k"][d] <= info["backward_two_dq_chains_max_seqlen_k"][d]
               for d in backward)
    assert {str(d) for d in info["backward_paired_key_blocks_head_dims"]} <= backward
    assert set(info["backward_unpaired_max_seqlen_k"]) == {str(d) for d in info["backward_paired_key_blocks_head_dims"]}
    assert all(limit >= 0 for limit in info["backward_unpaired_max_seqlen_k"].values())
    assert set(info["backward_causal_paired_min_group"]) == set(info["backward_unpaired_max_seqlen_k"])
    assert all(group >= 1 for group in info["backward_causal_paired_min_group"].values())
    assert set(info["backward_causal_heavy_first_min_group"]) == backward
    assert all(group == 0 or group >= 2 for group in info["backward_causal_heavy_first_min_group"].values())
    assert set(info["backward_causal_head_halves_min_group"]) == backward
    assert all(group == 0 or group >= 2 for group in info["backward_causal_head_halves_min_group"].values())
    assert set(info["backward_causal_split_walks_over"]) == backward
    assert all(rows >= 0 for rows in info["backward_causal_split_walks_over"].values())


def test_devices(ext):
    devices = dhp.devices()
    assert len(devices) == ext.device_count()
    for i, d in enumerate(devices):
        assert d["index"] == i and d["name"]
        assert isinstance(d["compute_capability"], tuple) and len(d["compute_capability"]) == 2
        assert d["multiprocessors"] > 0
        assert d["supported"] == (d["compute_capability"] == (9, 0))


def test_cli_report(ext):
    done = _run("-m", "dhp")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"dhp {dhp.__version__}\n")
    assert "build: arch" in done.stdout
    if ext.device_count() == 0:
        assert "no CUDA GPU visible" in done.stdout
    else:
        assert "GPU 0:" in done.stdout


def test_cli_cmake_dir(ext):
    done = _run("-m", "dhp", "--cmake-dir")
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder.is_dir(), folder
    assert (folder / "dhpConfig.cmake").is_file() or (folder / "dhp-config.cmake").is_file()


def _numpy_inputs(dtype=np.float16):
    q = np.zeros((1, 16, 2, 64), dtype)
    k = np.zeros((1, 16, 2, 64), dtype)
    v = np.zeros((1, 16, 2, 64), dtype)
    return q, k, v


def test_cpu_arrays_rejected_by_the_c_api(ext):
    q, k, v = _numpy_inputs()
    out = np.full(q.shape, np.nan, q.dtype)
    for call in (
        lambda: ext.forward(q, k, v, out, None, False, 0.0, 0),
        lambda: ext.forward_check(q, k, v, out, None, False, 0.0),
        lambda: ext.forward_synchronous(q, k, v, out, None, False, 0.0),
        lambda: dhp.attention(q, k, v, out=out),
        lambda: dhp.attention(q, k, v, return_lse=True),
    ):
        with pytest.raises(ValueError, match="CUDA") as caught:
            call()
        assert "q" in str(caught.value)
    assert np.isnan(out).all()


# DLPack descriptions of device memory that is never touched: the C API rejects them before any device query.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_CODES = {"bfloat16": (4, 16), "float16": (2, 16), "float32": (2, 32)}


class FakeCudaTensor:
    """A compact CUDA tensor as far as DLPack can tell; `capsule()` gives a fresh one-shot capsule."""

    _next_address = 0x7F0000000000

    def __init__(self, shape, dtype="bfloat16"):
        code, bits = _CODES[dtype]
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._strides = (ctypes.c_int64 * len(shape))(*strides)
        FakeCudaTensor._next_address += 1 << 30  # distinct, 1 GiB apart: no two fakes overlap
        tensor = _DLTensor(FakeCudaTensor._next_address, _DLDevice(2, 0), len(shape), _DLDataType(code, bits, 1),
                           self._shape, self._strides, 0)
        self._managed = _DLManagedTensor(tensor, None, None)

    def capsule(self):
        return _PyCapsule_New(ctypes.addressof(self._managed), b"dltensor", None)


def _check_error(ext, q, k, v, out):
    """Runs forward and forward_check on fresh capsules of the fakes; both must raise the same way."""
    errors = []
    for call in (
        lambda: ext.forward(q.capsule(), k.capsule(), v.capsule(), out.capsule(), None, False, 0.0, 0),
        lambda: ext.forward_check(q.capsule(), k.capsule(), v.capsule(), out.capsule(), None, True, 0.0),
    ):
        with pytest.raises((ValueError, TypeError)) as caught:
            call()
        errors.append(caught)
    assert errors[0].type is errors[1].type
    return errors[0]


def test_unsupported_dtype_is_a_type_error(ext):
    shape = (1, 16, 2, 64)
    t = [FakeCudaTensor(shape, "float32") for _ in range(4)]
    caught = _check_error(ext, *t)
    assert caught.type is TypeError and str(caught.value)


def test_mismatched_dtypes_are_a_type_error(ext):
    shape = (1, 16, 2, 64)
    q, v, out = (FakeCudaTensor(shape, "bfloat16") for _ in range(3))
    k = FakeCudaTensor(shape, "float16")
    caught = _check_error(ext, q, k, v, out)
    assert caught.type is TypeError and "k" in str(caught.value)


def test_wrong_rank_is_a_value_error(ext):
    q, k, v, out = (FakeCudaTensor((16, 2, 64)) for _ in range(4))
    caught = _check_error(ext, q, k, v, out)
    assert caught.type is ValueError and "q" in str(caught.value)


def test_bad_head_dim_is_a_value_error(ext):
    q, k, v, out = (FakeCudaTensor((1, 16, 2, 96)) for _ in range(4))
    caught = _check_error(ext, q, k, v, out)
    assert caught.type is ValueError and "head_dim" in str(caught.value)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), 1e-60, 1e300])
def test_softmax_scale_must_be_positive_and_finite(scale):
    q, k, v = _numpy_inputs()
    with pytest.raises(ValueError, match="softmax_scale"):
        dhp.attention(q, k, v, softmax_scale=scale)


def test_non_tensors_are_rejected():
    with pytest.raises(TypeError, match="DLPack"):
        dhp.attention([[1.0]], [[1.0]], [[1.0]])


def test_generic_producer_without_namespace_needs_out():
    q, k, v = _numpy_inputs()

    class Bare:  # a DLPack producer with no array-API namespace
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kwargs):
            return self._a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    with pytest.raises(TypeError, match="out="):
        dhp.attention(Bare(q), Bare(k), Bare(v))
