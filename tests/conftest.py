"""Fixtures shared by the Python suites.

- `ext`: the compiled module dhp._C. Missing, tests that need it skip with the import error, unless
  DHP_REQUIRE_EXT=1 (set it wherever the wheel was built and installed: then a missing module fails).
- `torch_cuda`, `cupy_cuda`, `jax_cuda`: the framework module, once a supported GPU (sm_90) is visible to it;
  otherwise the test skips and says why. GPU tests never fail for lack of a GPU and never pass without one.
- `dtype_name`, `head_dim`: parametrized from the build's variant list (dhp.build_info()); in tests marked
  `backward`, `head_dim` takes the head dims the build has a backward for ("backward_head_dims").
"""

from __future__ import annotations

import os

# JAX would otherwise reserve 75% of the GPU on first use, starving torch and dhp's own allocations.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest

ALL_DTYPES = ["bfloat16", "float16"]
ALL_HEAD_DIMS = [64, 128, 256]
ALL_BACKWARD_HEAD_DIMS = [64, 128, 256]


def _variants(backward: bool):
    from dhp import _native

    if not _native.available():  # collected anyway; the tests skip through `ext`
        return ALL_DTYPES, ALL_BACKWARD_HEAD_DIMS if backward else ALL_HEAD_DIMS
    dtypes, head_dims = _native.variants()
    if backward:
        head_dims = sorted(int(d) for d in _native.build_info().get("backward_head_dims", []))
    return dtypes, head_dims


def pytest_configure(config):
    config.addinivalue_line("markers", "backward: runs the backward; head_dim takes the backward's head dims")


def pytest_generate_tests(metafunc):
    dtypes, head_dims = _variants(metafunc.definition.get_closest_marker("backward") is not None)
    if "dtype_name" in metafunc.fixturenames:
        metafunc.parametrize("dtype_name", dtypes)
    if "head_dim" in metafunc.fixturenames:
        metafunc.parametrize("head_dim", head_dims, ids=[f"d{d}" for d in head_dims])


@pytest.fixture(scope="session")
def ext():
    from dhp import _native

    if not _native.available():
        try:
            _native.ext()
        except ImportError as error:
            if os.environ.get("DHP_REQUIRE_EXT") == "1":
                pytest.fail(f"DHP_REQUIRE_EXT=1 but {error}")
            pytest.skip(str(error))
    return _native.ext()


def _supported_device_or_skip(ext, index: int, who: str) -> None:
    info = ext.device_info(index)
    if not info["supported"]:
        major, minor = info["compute_capability"]
        pytest.skip(f"{who}'s GPU {index} ({info['name']}) is sm_{major}{minor}: dhp's kernels need sm_90 (Hopper)")


@pytest.fixture(scope="session")
def torch_cuda(ext):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    _supported_device_or_skip(ext, torch.cuda.current_device(), "torch")
    return torch


@pytest.fixture(scope="session")
def cupy_cuda(ext):
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        pytest.skip(f"cupy sees no CUDA GPU ({error})")
    if count == 0:
        pytest.skip("cupy sees no CUDA GPU")
    _supported_device_or_skip(ext, cupy.cuda.Device().id, "cupy")
    return cupy


@pytest.fixture(scope="session")
def jax_cuda(ext):
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as error:
        pytest.skip(f"jax has no GPU backend ({error})")
    _supported_device_or_skip(ext, device.local_hardware_id, "jax")
    return jax
