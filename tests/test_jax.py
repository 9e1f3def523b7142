"""dhp.jax: attention as XLA FFI custom calls under jit, grad and vmap.

Without a GPU these run for real: the build has the handlers (required where DHP_REQUIRE_JAX_FFI=1, as in CI),
JAX's abstract evaluation and CUDA lowering of the calls (shapes, attributes, the vmapped operands), the C library's
trace-time checks, and the custom_vjp / vmap wiring with a float32 JAX stand-in for the two custom calls. With a
Hopper GPU visible to JAX, the handlers themselves: bits equal to the eager (DLPack) path and across vmap, accuracy
against the float64 reference, gradients, determinism.
"""

from __future__ import annotations

import math
import os
import re

import dhp
import numpy as np
import pytest
from dhp import _native, reference

BATCH, SEQLEN_Q, SEQLEN_K, HEADS_Q, HEADS_KV = 2, 257, 300, 4, 2


@pytest.fixture(scope="session")
def dhp_jax(ext):
    pytest.importorskip("jax")
    import dhp.jax

    if not dhp.jax.available():
        reason = "dhp._C was built without jaxlib's XLA FFI headers (see cmake/JaxFfi.cmake)"
        if os.environ.get("DHP_REQUIRE_JAX_FFI") == "1":
            pytest.fail(f"DHP_REQUIRE_JAX_FFI=1 but {reason}")
        pytest.skip(reason)
    return dhp.jax


@pytest.fixture(scope="session")
def gpu(dhp_jax, jax_cuda):
    return jax_cuda.devices("gpu")[0]


def build_dtype_names():
    return _native.variants()[0] if _native.available() else ["bfloat16", "float16"]


def numpy_inputs(dtype_name, head_dim, seed=0, lead=(BATCH,)):
    import ml_dtypes  # jax's own dependency: numpy's bfloat16

    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float16
    rng = np.random.default_rng(seed)
    shapes = [(*lead, SEQLEN_Q, HEADS_Q, head_dim)] + [(*lead, SEQLEN_K, HEADS_KV, head_dim)] * 3
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in shapes[:3] + [shapes[0]])
    return q, k, v, dout


def assert_same_bits(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    unsigned = np.dtype(f"u{actual.dtype.itemsize}")
    np.testing.assert_array_equal(actual.view(unsigned), expected.view(unsigned))


# ---------------------------------------------------------------------------------------------------------------
# Without a GPU


def test_targets(dhp_jax, ext):
    targets = ext.jax_ffi_targets()
    assert set(targets) == {dhp_jax.FORWARD_TARGET, dhp_jax.BACKWARD_TARGET}
    assert all(type(capsule).__name__ == "PyCapsule" for capsule in targets.values())


def test_abstract_evaluation(dhp_jax):
    import jax
    import jax.numpy as jnp

    q = jax.ShapeDtypeStruct((BATCH, SEQLEN_Q, HEADS_Q, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((BATCH, SEQLEN_K, HEADS_KV, 128), jnp.bfloat16)
    out = jax.eval_shape(lambda q, k, v: dhp_jax.attention(q, k, v, causal=True), q, k, k)
    assert (out.shape, out.dtype) == (q.shape, q.dtype)
    out, lse = jax.eval_shape(lambda q, k, v: dhp.attention(q, k, v, return_lse=True), q, k, k)
    assert (out.shape, lse.shape, lse.dtype) == (q.shape, (BATCH, HEADS_Q, SEQLEN_Q), jnp.float32)

    def loss(q, k, v):
        return dhp_jax.attention(q, k, v).astype(jnp.float32).sum()

    grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, k, k)
    assert [(g.shape, g.dtype) for g in grads] == [(q.shape, q.dtype), (k.shape, k.dtype), (k.shape, k.dtype)]
    stacked = [jax.ShapeDtypeStruct((3, *t.shape), t.dtype) for t in (q, k, k)]
    assert jax.eval_shape(jax.vmap(dhp_jax.attention), *stacked).shape == (3, *q.shape)
    grads = jax.eval_shape(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))), *stacked)
    assert [g.shape for g in grads] == [t.shape for t in stacked]


def test_trace_time_errors(dhp_jax):
    """The C library's sentences, raised where JAX traces the call (no GPU needed)."""
    import jax
    import jax.numpy as jnp

    def sds(shape, dtype=jnp.float16):
        return jax.ShapeDtypeStruct(shape, dtype)

    def trace(*args, **kwargs):
        return jax.eval_shape(lambda *a: dhp_jax.attention(*a, **kwargs), *args)

    with pytest.raises(ValueError, match="head_dim"):
        trace(sds((1, 16, 2, 96)), sds((1, 16, 2, 96)), sds((1, 16, 2, 96)))
    with pytest.raises(TypeError):
        trace(sds((1, 16, 2, 128), jnp.float32), sds((1, 16, 2, 128), jnp.float32), sds((1, 16, 2, 128), jnp.float32))
    with pytest.raises(TypeError):
        trace(sds((1, 16, 2, 128)), sds((1, 16, 2, 128), jnp.bfloat16), sds((1, 16, 2, 128)))
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        trace(sds((1, 16, 3, 128)), sds((1, 16, 2, 128)), sds((1, 16, 2, 128)))
    with pytest.raises(ValueError, match="ndim"):
        trace(sds((16, 2, 128)), sds((16, 2, 128)), sds((16, 2, 128)))
    with pytest.raises(ValueError, match="softmax_scale"):
        trace(sds((1, 16, 2, 128)), sds((1, 16, 2, 128)), sds((1, 16, 2, 128)), softmax_scale=-1.0)
    q = sds((1, 16, 2, 128))
    lse = sds((1, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="dout"):
        jax.eval_shape(lambda *a: dhp_jax.attention_backward(*a), sds((1, 8, 2, 128)), q, q, q, q, lse)


def test_concrete_cpu_arrays_are_refused(dhp_jax):
    import jax
    import jax.numpy as jnp

    q = jax.device_put(jnp.zeros((1, 16, 2, 128), jnp.float16), jax.devices("cpu")[0])
    with pytest.raises(ValueError, match="CUDA GPU"):
        dhp_jax.attention(q, q, q)


def _export_text(fn, *args):
    import jax
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call(t) for t in ("dhp_attention_forward", "dhp_attention_backward")]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()


def test_cuda_lowering(dhp_jax):
    """What XLA gets: the targets, their typed attributes, and the vmapped operands' extra leading axis."""
    import jax
    import jax.numpy as jnp

    q = jax.ShapeDtypeStruct((2, 17, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 33, 2, 64), jnp.bfloat16)
    text = _export_text(lambda q, k, v: dhp_jax.attention(q, k, v, causal=True, softmax_scale=0.125), q, k, k)
    assert "custom_call @dhp_attention_forward" in text and "dhp_attention_backward" not in text
    assert "causal = true" in text and "softmax_scale = 1.250000e-01 : f32" in text
    assert "-> (tensor<2x17x4x64xbf16>, tensor<2x4x17xf32>)" in text

    def loss(q, k, v):
        return dhp_jax.attention(q, k, v).astype(jnp.float32).sum()

    qs = jax.ShapeDtypeStruct((3, *q.shape), q.dtype)
    text = _export_text(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None)), qs, k, k)
    assert "custom_call @dhp_attention_forward" in text and "custom_call @dhp_attention_backward" in text
    assert "softmax_scale = 0.000000e+00 : f32" in text  # 0: the C API's 1/sqrt(head_dim)
    # expand_dims: the unbatched k and v get a leading 1, the outputs the vmapped size; the backward's fourth
    # output is its workspace (uint8), sized at trace time.
    assert "(tensor<3x2x17x4x64xbf16>, tensor<1x2x33x2x64xbf16>, tensor<1x2x33x2x64xbf16>)" in text
    assert re.search(r"-> \(tensor<3x2x17x4x64xbf16>, tensor<3x2x33x2x64xbf16>, tensor<3x2x33x2x64xbf16>, "
                     r"tensor<3x\d+xui8>\)", text)


def _reference_jax(q, k, v, causal, scale):
    """(out, lse) in float32 JAX: the stand-in for the forward custom call in the wiring test."""
    import jax
    import jax.numpy as jnp

    head_dim = q.shape[-1]
    scale = scale or 1.0 / math.sqrt(head_dim)
    group = q.shape[-2] // k.shape[-2]
    k, v = (jnp.repeat(t.astype(jnp.float32), group, axis=-2) for t in (k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        visible = jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq)
        scores = jnp.where(visible, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(scores - lse[..., None]), v)
    return out.astype(q.dtype), lse


def test_autodiff_and_vmap_wiring(dhp_jax, monkeypatch):
    """custom_vjp and vmap around the custom calls, on the CPU: the calls are replaced by a float32 reference whose
    backward is JAX's own, so dhp.jax's gradients must equal JAX's gradients of that reference."""
    import jax
    import jax.numpy as jnp

    def backward(dout, q, k, v, out, lse, causal, scale):
        _, vjp = jax.vjp(lambda q, k, v: _reference_jax(q, k, v, causal, scale)[0], q, k, v)
        return vjp(dout)

    monkeypatch.setattr(dhp_jax, "_forward_call", _reference_jax)
    monkeypatch.setattr(dhp_jax, "_backward_call", backward)
    rng = np.random.default_rng(0)
    q, k, v, weight = (
        jnp.asarray(rng.standard_normal(s), jnp.float16)
        for s in ((3, 2, 9, 4, 64), (3, 2, 11, 2, 64), (3, 2, 11, 2, 64), (2, 9, 4, 64))
    )

    def gradients(attend):
        def loss(q, k, v):
            return (attend(q, k, v) * weight).astype(jnp.float32).sum()

        # q and v vmapped, k shared.
        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, 0)))(q, k[0], v)

    for causal in (False, True):
        got = gradients(lambda q, k, v, causal=causal: dhp_jax.attention(q, k, v, causal=causal))
        want = gradients(lambda q, k, v, causal=causal: _reference_jax(q, k, v, causal, 0.0)[0])
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))

    def lse_loss(q, k, v):
        return dhp_jax.attention(q, k, v, return_lse=True)[1].sum()

    with pytest.raises(NotImplementedError, match="lse is not differentiable"):
        jax.grad(lse_loss)(q[0], k[0], v[0])

    def out_loss(q, k, v):
        out, lse = dhp_jax.attention(q, k, v, return_lse=True)
        return (out * weight).astype(jnp.float32).sum() + jax.lax.stop_gradient(lse).sum()

    def reference_loss(q, k, v):
        return (_reference_jax(q, k, v, False, 0.0)[0] * weight).astype(jnp.float32).sum()

    got = jax.grad(out_loss, argnums=(0, 1, 2))(q[0], k[0], v[0])
    want = jax.grad(reference_loss, argnums=(0, 1, 2))(q[0], k[0], v[0])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# ---------------------------------------------------------------------------------------------------------------
# On a Hopper GPU


def eager_forward(ext, q, k, v, causal, scale=0.0):
    """The DLPack path that predates the custom calls: fresh buffers, synchronous on the legacy default stream."""
    import jax.dlpack

    out, lse = ext.empty(q.shape, q), ext.empty((q.shape[0], q.shape[2], q.shape[1]), q, float32=True)
    ext.forward_synchronous(q, k, v, out, lse, causal, scale)
    return jax.dlpack.from_dlpack(out), jax.dlpack.from_dlpack(lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_jit_forward(dhp_jax, gpu, ext, torch_cuda, dtype_name, head_dim, causal):
    """jit equals the eager DLPack path to the bit, and is as accurate as FlashAttention's oracle asks."""
    import jax

    q, k, v, _ = (jax.device_put(a, gpu) for a in numpy_inputs(dtype_name, head_dim))
    fn = jax.jit(lambda q, k, v: dhp_jax.attention(q, k, v, causal=causal, return_lse=True))
    out, lse = fn(q, k, v)
    eager_out, eager_lse = eager_forward(ext, q, k, v, causal)
    assert_same_bits(out, eager_out)
    assert_same_bits(lse, eager_lse)
    assert_same_bits(jax.jit(lambda q, k, v: dhp.attention(q, k, v, causal=causal))(q, k, v), eager_out)

    torch = torch_cuda
    qt, kt, vt = (torch.from_numpy(np.asarray(t).astype(np.float32)).cuda().to(getattr(torch, dtype_name))
                  for t in (q, k, v))
    ref_out, ref_lse = reference.attention_reference(qt, kt, vt, causal)
    budget = reference.error_budget(qt, kt, vt, causal, None, ref_out, ref_lse)
    out_t = torch.from_numpy(np.asarray(out).astype(np.float32)).cuda()
    assert reference.max_abs_error(out_t, ref_out, ref_lse) <= budget


@pytest.mark.backward
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_grad(dhp_jax, gpu, torch_cuda, head_dim, causal):
    """jax.grad through dhp.jax.attention against the float64 reference gradients, within FlashAttention's oracle."""
    import jax
    import jax.numpy as jnp

    dtype_name = build_dtype_names()[0]
    q, k, v, dout = (jax.device_put(a, gpu) for a in numpy_inputs(dtype_name, head_dim))

    def loss(q, k, v):
        return (dhp_jax.attention(q, k, v, causal=causal).astype(jnp.float32) * dout.astype(jnp.float32)).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    torch = torch_cuda
    tdtype = getattr(torch, dtype_name)
    qt, kt, vt, doutt = (torch.from_numpy(np.asarray(t).astype(np.float32)).cuda().to(tdtype) for t in (q, k, v, dout))
    ref = reference.attention_backward_reference(doutt, qt, kt, vt, causal)
    baseline = reference.attention_backward_sdpa_low_precision(doutt, qt, kt, vt, causal)
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, ref, baseline):
        got_t = torch.from_numpy(np.asarray(got).astype(np.float32)).cuda()
        error = reference.max_abs_difference(got_t, want)
        assert error <= reference.gradient_budget(base, want), f"{name}: max abs error {error}"


@pytest.mark.backward
def test_grad_is_deterministic_and_matches_attention_backward(dhp_jax, gpu, head_dim):
    import jax
    import jax.numpy as jnp

    q, k, v, dout = (jax.device_put(a, gpu) for a in numpy_inputs(build_dtype_names()[0], head_dim, seed=3))

    def loss(q, k, v):
        return (dhp_jax.attention(q, k, v, causal=True) * dout).astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    first = [np.asarray(g) for g in grad(q, k, v)]
    for _ in range(3):
        for got, want in zip(grad(q, k, v), first):
            assert_same_bits(got, want)
    # The same backward, called directly with the cotangent of that loss (dout itself, in out's dtype).
    out, lse = dhp_jax.attention(q, k, v, causal=True, return_lse=True)
    direct = jax.jit(lambda *a: dhp_jax.attention_backward(*a, causal=True))(dout, q, k, v, out, lse)
    for got, want in zip(direct, first):
        assert_same_bits(got, want)


@pytest.mark.backward
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_vmap_equals_unbatched_calls(dhp_jax, gpu, head_dim, causal):
    """vmap over a stack of batches gives each batch's bits, forward and backward, with k and v batched (folded
    into one call) or shared (one call per vmapped index)."""
    import jax
    import jax.numpy as jnp

    n = 3
    q, k, v, dout = (jax.device_put(a, gpu) for a in numpy_inputs(build_dtype_names()[0], head_dim, lead=(n, BATCH)))

    def attend(q, k, v):
        return dhp_jax.attention(q, k, v, causal=causal)

    def grads(q, k, v, dout):
        return jax.grad(lambda q, k, v: (attend(q, k, v) * dout).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    one = jax.jit(attend)
    one_grads = jax.jit(grads)
    for in_axes in ((0, 0, 0), (0, None, None)):
        k_i = (lambda i: k[i]) if in_axes[1] == 0 else (lambda i: k[0])
        v_i = (lambda i: v[i]) if in_axes[2] == 0 else (lambda i: v[0])
        k_arg, v_arg = (k, v) if in_axes[1] == 0 else (k[0], v[0])
        stacked = jax.jit(jax.vmap(attend, in_axes=in_axes))(q, k_arg, v_arg)
        stacked_grads = jax.jit(jax.vmap(grads, in_axes=(*in_axes, 0)))(q, k_arg, v_arg, dout)
        for i in range(n):
            assert_same_bits(stacked[i], one(q[i], k_i(i), v_i(i)))
            for got, want in zip(stacked_grads, one_grads(q[i], k_i(i), v_i(i), dout[i])):
                assert_same_bits(got[i], want)


def test_runs_on_xla_stream(dhp_jax, gpu, ext):
    """Inputs made and results consumed inside one jitted computation: no synchronization is needed around the
    custom call, which XLA orders on its own stream (the result equals the eager path's)."""
    import jax
    import jax.numpy as jnp

    q, k, v, _ = (jax.device_put(a, gpu) for a in numpy_inputs(build_dtype_names()[0], 128, seed=5))

    @jax.jit
    def pipeline(q, k, v):
        for _ in range(20):  # a chain of kernels ahead of the call, on XLA's stream
            q = (q.astype(jnp.float32) * 1.0001).astype(q.dtype)
        out = dhp_jax.attention(q, k, v)
        return q, out, out.astype(jnp.float32).sum()

    q2, out, total = pipeline(q, k, v)
    expected, _ = eager_forward(ext, q2, k, v, False)
    assert_same_bits(out, expected)
    assert math.isclose(float(total), float(np.asarray(expected, np.float64).sum()), rel_tol=1e-3, abs_tol=1e-2)
