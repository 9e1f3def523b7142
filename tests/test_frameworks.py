"""One attention, three frameworks: torch, CuPy and JAX get their own tensors back, on the inputs' device, with
results identical to the bit; each framework's stream rules hold. A missing framework skips its tests. The
backward likewise for CuPy and for DLPack producers without a framework (torch's is in test_backward.py).
"""

from __future__ import annotations

import gc
import math

import dhp
import numpy as np
import pytest
from dhp import _native

BATCH, SEQLEN_Q, SEQLEN_K, HEADS_Q, HEADS_KV = 2, 257, 300, 4, 2


@pytest.fixture
def float16_build(ext):
    if "float16" not in _native.variants()[0]:
        pytest.skip("this build has no float16 kernels")


def numpy_inputs(head_dim, seed=0):
    """float16: the one half-precision dtype all three frameworks share."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BATCH, SEQLEN_Q, HEADS_Q, head_dim)).astype(np.float16)
    k = rng.standard_normal((BATCH, SEQLEN_K, HEADS_KV, head_dim)).astype(np.float16)
    v = rng.standard_normal((BATCH, SEQLEN_K, HEADS_KV, head_dim)).astype(np.float16)
    return q, k, v


def numpy_dout(head_dim, seed=1):
    return np.random.default_rng(seed).standard_normal((BATCH, SEQLEN_Q, HEADS_Q, head_dim)).astype(np.float16)


class BareProducer:
    """A DLPack producer and nothing else (no array-API namespace, no stream to join)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def torch_result(torch, arrays, causal):
    q, k, v = (torch.from_numpy(a).cuda() for a in arrays)
    with torch.no_grad():
        out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
    return out.cpu().numpy(), lse.cpu().numpy()


def torch_gradients(torch, arrays, causal):
    """dhp's (dq, dk, dv) through torch for arrays = (q, k, v, dout), as NumPy arrays."""
    q, k, v, dout = (torch.from_numpy(a).cuda() for a in arrays)
    with torch.no_grad():
        out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
    return [g.cpu().numpy() for g in dhp.attention_backward(dout, q, k, v, out, lse, causal=causal)]


def assert_same_bits(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    unsigned = np.dtype(f"u{actual.dtype.itemsize}")
    np.testing.assert_array_equal(actual.view(unsigned), expected.view(unsigned))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_on_a_side_stream(torch_cuda, float16_build, head_dim, causal):
    """q is produced on a side stream behind a long sleep: only a kernel on that stream can see it."""
    torch = torch_cuda
    q_src, k, v = (torch.from_numpy(a).cuda() for a in numpy_inputs(head_dim))
    with torch.no_grad():
        expected = dhp.attention(q_src, k, v, causal=causal)
        q = torch.full_like(q_src, math.nan)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time, on this stream only
            q.copy_(q_src)
            out = dhp.attention(q, k, v, causal=causal)
        stream.synchronize()
    assert_same_bits(out.cpu().numpy(), expected.cpu().numpy())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cupy(torch_cuda, cupy_cuda, float16_build, head_dim, causal):
    cupy = cupy_cuda
    arrays = numpy_inputs(head_dim)
    expected_out, expected_lse = torch_result(torch_cuda, arrays, causal)
    q, k, v = (cupy.asarray(a) for a in arrays)

    out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    assert out.device.id == q.device.id and out.dtype == q.dtype and lse.dtype == cupy.float32
    assert_same_bits(cupy.asnumpy(out), expected_out)
    assert_same_bits(cupy.asnumpy(lse), expected_lse)

    poisoned = cupy.full(q.shape, cupy.nan, dtype=q.dtype)
    assert dhp.attention(q, k, v, causal=causal, out=poisoned) is poisoned
    assert_same_bits(cupy.asnumpy(poisoned), expected_out)

    with cupy.cuda.Stream(non_blocking=True) as stream:
        q_on_stream = q * 1  # produced on the side stream
        on_stream = dhp.attention(q_on_stream, k, v, causal=causal)
        stream.synchronize()
    assert_same_bits(cupy.asnumpy(on_stream), expected_out)


@pytest.mark.backward
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cupy_backward(torch_cuda, cupy_cuda, float16_build, head_dim, causal):
    cupy = cupy_cuda
    arrays = (*numpy_inputs(head_dim), numpy_dout(head_dim))
    expected = torch_gradients(torch_cuda, arrays, causal)
    q, k, v, dout = (cupy.asarray(a) for a in arrays)
    out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)

    grads = dhp.attention_backward(dout, q, k, v, out, lse, causal=causal)
    assert all(isinstance(g, cupy.ndarray) and g.device.id == q.device.id for g in grads)
    for grad, want in zip(grads, expected):
        assert_same_bits(cupy.asnumpy(grad), want)

    poisoned = [cupy.full(t.shape, cupy.nan, dtype=t.dtype) for t in (q, k, v)]
    returned = dhp.attention_backward(dout, q, k, v, out, lse, causal=causal, dq=poisoned[0], dk=poisoned[1],
                                      dv=poisoned[2])
    assert all(r is p for r, p in zip(returned, poisoned))
    for grad, want in zip(poisoned, expected):
        assert_same_bits(cupy.asnumpy(grad), want)

    with cupy.cuda.Stream(non_blocking=True) as stream:
        dout_on_stream = dout * 1  # produced on the side stream
        on_stream = dhp.attention_backward(dout_on_stream, q, k, v, out, lse, causal=causal)
        stream.synchronize()
    for grad, want in zip(on_stream, expected):
        assert_same_bits(cupy.asnumpy(grad), want)


@pytest.mark.backward
def test_bare_dlpack_producer_backward(torch_cuda, float16_build, head_dim):
    """A producer without a namespace: synchronous, into the dq=, dk=, dv= it must pass."""
    torch = torch_cuda
    arrays = (*numpy_inputs(head_dim), numpy_dout(head_dim))
    expected = torch_gradients(torch, arrays, True)
    q, k, v, dout = (torch.from_numpy(a).cuda() for a in arrays)
    with torch.no_grad():
        out, lse = dhp.attention(q, k, v, causal=True, return_lse=True)
    grads = [torch.full_like(t, math.nan) for t in (q, k, v)]
    bare = [BareProducer(t) for t in (dout, q, k, v, out, lse)]
    dhp.attention_backward(*bare, causal=True, dq=BareProducer(grads[0]), dk=BareProducer(grads[1]),
                           dv=BareProducer(grads[2]))
    for grad, want in zip(grads, expected):
        assert_same_bits(grad.cpu().numpy(), want)


def test_bare_dlpack_producer_backward_needs_outputs():
    q, k, v = numpy_inputs(64)
    lse = np.zeros((BATCH, HEADS_Q, SEQLEN_Q), np.float32)
    with pytest.raises(TypeError, match="dq="):
        dhp.attention_backward(*(BareProducer(t) for t in (q, q, k, v, q, lse)))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_jax(torch_cuda, jax_cuda, float16_build, head_dim, causal):
    jax = jax_cuda
    import jax.numpy as jnp

    arrays = numpy_inputs(head_dim)
    expected_out, expected_lse = torch_result(torch_cuda, arrays, causal)
    device = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(a, device) for a in arrays)

    out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    assert out.devices() == {device} and lse.devices() == {device}
    assert out.dtype == jnp.float16 and lse.dtype == jnp.float32
    assert out.shape == q.shape and lse.shape == (BATCH, HEADS_Q, SEQLEN_Q)
    assert_same_bits(np.asarray(out), expected_out)
    assert_same_bits(np.asarray(lse), expected_lse)

    # An ordinary JAX array: it outlives the inputs and feeds jitted computations.
    del q, k, v
    gc.collect()
    total = jax.jit(lambda x: x.astype(jnp.float32).sum())(out)
    assert math.isclose(float(total), float(expected_out.astype(np.float64).sum()), rel_tol=1e-3, abs_tol=1e-2)


def test_jax_output_memory_is_released(torch_cuda, jax_cuda, float16_build):
    """Dropped results give their memory back: 40 calls of 64 MB outputs must not keep 2.5 GB."""
    torch, jax = torch_cuda, jax_cuda
    if 128 not in _native.variants()[1]:
        pytest.skip("this build has no head_dim 128 kernels")
    device = jax.devices("gpu")[0]
    rng = np.random.default_rng(1)
    q = jax.device_put(rng.standard_normal((4, 4096, 16, 128)).astype(np.float16), device)
    dhp.attention(q, q, q).block_until_ready()
    free_before, _ = torch.cuda.mem_get_info()
    for _ in range(40):
        out = dhp.attention(q, q, q)
        del out
    gc.collect()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_before - free_after < 1 << 30


def test_jax_rejects_tracers_and_out(jax_cuda):
    """Tracers need the XLA FFI handlers (tests/test_jax.py covers jit, grad and vmap where they are built)."""
    jax = jax_cuda
    import dhp.jax

    q = jax.device_put(np.zeros((1, 16, 2, 128), np.float16), jax.devices("gpu")[0])
    if not dhp.jax.available():
        with pytest.raises(TypeError, match="jit"):
            jax.jit(lambda x: dhp.attention(x, x, x))(q)
    with pytest.raises(TypeError, match="immutable"):
        dhp.attention(q, q, q, out=q)


def test_jax_validation_errors(jax_cuda):
    jax = jax_cuda
    device = jax.devices("gpu")[0]
    q = jax.device_put(np.zeros((1, 16, 2, 96), np.float16), device)
    with pytest.raises(ValueError, match="head_dim"):
        dhp.attention(q, q, q)
    q32 = jax.device_put(np.zeros((1, 16, 2, 128), np.float32), device)
    with pytest.raises(TypeError):
        dhp.attention(q32, q32, q32)


def test_mixed_frameworks_are_rejected(torch_cuda, cupy_cuda):
    q = torch_cuda.zeros(1, 16, 2, 128, dtype=torch_cuda.float16, device="cuda")
    k = cupy_cuda.zeros((1, 16, 2, 128), dtype=cupy_cuda.float16)
    with pytest.raises(TypeError, match="one framework"):
        dhp.attention(q, k, q)
