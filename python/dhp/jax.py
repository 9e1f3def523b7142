"""dhp for JAX: attention as XLA custom calls, so it runs under jit, grad and vmap on XLA's own stream.

    import dhp.jax
    out = dhp.jax.attention(q, k, v, causal=True)                      # q, k, v: (batch, seqlen, heads, head_dim)
    loss = lambda q, k, v: dhp.jax.attention(q, k, v).astype(jnp.float32).sum()
    dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)   # dhp's deterministic backward
    outs = jax.vmap(dhp.jax.attention)(qs, ks, vs)                     # the vmapped axis joins the batch

dhp.attention takes JAX arrays through this module too, when it is available. The handlers are compiled into dhp._C
(python/src/jax_ffi.cpp) where the build found jaxlib's XLA FFI headers; `available()` says whether it did. They are
registered with XLA (platform CUDA) on first use. Importing `dhp` does not import this module or JAX.

How it fits JAX:
- Each call is an ffi_call: XLA allocates the outputs and runs the kernel on its stream, asynchronously, in order
  with the rest of the computation. The forward always produces lse (the backward needs it).
- grad: jax.custom_vjp, residuals (q, k, v, out, lse); the backward is one more custom call. lse (return_lse=True)
  is not differentiable: a gradient flowing into it raises NotImplementedError instead of being dropped.
- vmap: vmap_method="expand_dims"; the handler folds the vmapped axes into the batch (or loops where an unbatched
  operand prevents folding), and since a sequence's result does not depend on its batch, the bits equal those of
  unbatched calls.
- Shapes and dtypes are checked by the C library where JAX traces the call (ValueError, TypeError); the device
  checks (an sm_90 GPU) happen when XLA runs it.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from . import _native
from ._attention import _lse_shape, _softmax_scale

try:
    from jax import ffi as _ffi
except ImportError:  # jax < 0.4.38 kept the FFI API in jax.extend
    from jax.extend import ffi as _ffi

__all__ = ["attention", "attention_backward", "available"]

FORWARD_TARGET = "dhp_attention_forward"
BACKWARD_TARGET = "dhp_attention_backward"

_KDL_FLOAT, _KDL_BFLOAT = 2, 4  # DLPack type codes
_DLPACK_CODES = {"i": 0, "u": 1, "f": _KDL_FLOAT, "c": 5, "b": 6}

_register_lock = threading.Lock()
_registered = False


def available() -> bool:
    """True when dhp._C has the XLA FFI handlers (jaxlib's headers were found when it was built)."""
    return _native.available() and hasattr(_native.ext(), "jax_ffi_targets")


def attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False):
    """dhp.attention for JAX arrays and tracers: jit, grad (w.r.t. q, k, v) and vmap work.

    Args and results as dhp.attention (without out=): q (batch, seqlen_q, heads_q, head_dim), k and v
    (batch, seqlen_k, heads_kv, head_dim), bfloat16 or float16; returns out, or (out, lse) when return_lse,
    lse (batch, heads_q, seqlen_q) float32. softmax_scale is a Python number (static), None for 1/sqrt(head_dim).
    """
    return _attention(q, k, v, bool(causal), _scale(softmax_scale), bool(return_lse))


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None):
    """(dq, dk, dv) for dout = dL/d(out), from the forward's q, k, v, out and lse: dhp.attention_backward for JAX.

    Runs as a custom call like attention() (jit and vmap work); the result is not differentiable again.
    softmax_scale: None or 0.0 (the C API's spelling, which dhp.attention_backward passes) for 1/sqrt(head_dim).
    """
    causal, scale = bool(causal), _scale(softmax_scale)
    _check_forward(q, k, v, causal, scale, out=out, lse=lse)
    if tuple(dout.shape) != tuple(q.shape) or dout.dtype != q.dtype:
        raise ValueError(
            f"dout is {dout.dtype}{list(dout.shape)}: expected q's shape and dtype, {q.dtype}{list(q.shape)}"
        )
    return _backward_call(dout, q, k, v, out, lse, causal, scale)


def _run(q, k, v, causal, scale, return_lse, out):
    """dhp.attention's runner for JAX (python/dhp/_attention.py): scale is the C API's (0.0: default)."""
    if out is not None:
        raise TypeError("out= is not supported for JAX arrays, which are immutable: use the returned array")
    result = _attention(q, k, v, causal, scale, return_lse)
    return result if return_lse else (result, None)


def _attention(q, k, v, causal, scale, return_lse):
    _check_forward(q, k, v, causal, scale)
    if return_lse:
        return _attention_with_lse(q, k, v, causal, scale)
    return _attention_out(q, k, v, causal, scale)


def _scale(value) -> float:
    """softmax_scale as the C API takes it: 0.0 for 1/sqrt(head_dim), else a positive finite float32 value."""
    if value is not None and float(value) == 0.0:
        return 0.0
    return _softmax_scale(value)


# ---------------------------------------------------------------------------------------------------------------
# Registration and trace-time checks


def _register() -> None:
    """Registers the handlers with XLA once per process (jaxlib defers it until its CUDA backend loads)."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        if not available():
            raise NotImplementedError(
                "dhp.jax needs dhp._C built with jaxlib's XLA FFI headers: rebuild with jax importable by the "
                "build's Python (pip install --no-build-isolation .) or pass "
                "-C cmake.define.DHP_XLA_FFI_INCLUDE_DIR=$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')"
            )
        for name, capsule in _native.ext().jax_ffi_targets().items():
            _ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


def _dlpack_dtype(dtype) -> tuple[int, int]:
    dtype = np.dtype(dtype)
    if dtype == jnp.bfloat16:
        return _KDL_BFLOAT, 16
    return _DLPACK_CODES.get(dtype.kind, 3), 8 * dtype.itemsize


def _check_forward(q, k, v, causal, scale, out=None, lse=None) -> None:
    """The C library's shape and dtype checks (dhp_attention_forward_check), at trace time; registers the handlers.

    Works on tracers: under vmap they carry the per-example shapes. A concrete array off the GPU is refused here,
    where eager dhp.attention refused it (under jit, XLA reports that no CUDA handler exists for its platform).
    """
    _register()
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not hasattr(tensor, "shape") or not hasattr(tensor, "dtype"):
            raise TypeError(f"{name} is a {type(tensor).__name__}: expected a JAX array")
    if isinstance(q, jax.Array) and not isinstance(q, jax.core.Tracer):
        platforms = {device.platform for device in q.devices()}
        if not platforms <= {"gpu", "cuda"}:
            raise ValueError(f"q is on {', '.join(map(str, q.devices()))}: expected an array on a CUDA GPU")
    out_aval = out if out is not None else jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse_aval = lse if lse is not None else jax.ShapeDtypeStruct(_lse_shape(q.shape), jnp.float32)
    tensors = (q, k, v, out_aval, lse_aval)
    _native.ext().jax_check_forward(
        [[int(d) for d in t.shape] for t in tensors], [_dlpack_dtype(t.dtype) for t in tensors], causal, scale
    )


# ---------------------------------------------------------------------------------------------------------------
# The custom calls


def _forward_call(q, k, v, causal, scale):
    """(out, lse) from the forward handler."""
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(_lse_shape(q.shape), jnp.float32))
    call = _ffi.ffi_call(FORWARD_TARGET, results, vmap_method="expand_dims")
    out, lse = call(q, k, v, causal=bool(causal), softmax_scale=np.float32(scale))
    return out, lse


def _backward_call(dout, q, k, v, out, lse, causal, scale):
    """(dq, dk, dv) from the backward handler, whose scratch memory is a fourth output, dropped here."""
    bytes_ = _native.ext().jax_backward_workspace_size(
        [int(d) for d in q.shape[-4:]], [int(d) for d in k.shape[-4:]], _dlpack_dtype(q.dtype), causal, scale
    )
    results = tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (q, k, v))
    results += (jax.ShapeDtypeStruct((max(bytes_, 1),), jnp.uint8),)
    call = _ffi.ffi_call(BACKWARD_TARGET, results, vmap_method="expand_dims")
    dq, dk, dv, _ = call(q, k, v, out, dout, lse, causal=bool(causal), softmax_scale=np.float32(scale))
    return dq, dk, dv


# out only: the plain custom_vjp.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_out(q, k, v, causal, scale):
    return _forward_call(q, k, v, causal, scale)[0]


def _attention_out_fwd(q, k, v, causal, scale):
    out, lse = _forward_call(q, k, v, causal, scale)
    return out, (q, k, v, out, lse)


def _attention_out_bwd(causal, scale, residuals, dout):
    q, k, v, out, lse = residuals
    return _backward_call(dout, q, k, v, out, lse, causal, scale)


_attention_out.defvjp(_attention_out_fwd, _attention_out_bwd)


# (out, lse): symbolic zeros tell an unused lse (fine) from a gradient flowing into it (which dhp cannot give).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_with_lse(q, k, v, causal, scale):
    return _forward_call(q, k, v, causal, scale)


def _attention_with_lse_fwd(q, k, v, causal, scale):
    q, k, v = (p.value for p in (q, k, v))  # symbolic_zeros=True: CustomVJPPrimal(value, perturbed)
    out, lse = _forward_call(q, k, v, causal, scale)
    return (out, lse), (q, k, v, out, lse)


def _attention_with_lse_bwd(causal, scale, residuals, cotangents):
    from jax.custom_derivatives import SymbolicZero

    q, k, v, out, lse = residuals
    dout, dlse = cotangents
    if not isinstance(dlse, SymbolicZero):
        raise NotImplementedError(
            "dhp.attention's lse is not differentiable: use it outside the differentiated function "
            "(jax.lax.stop_gradient(lse)) or take gradients through out only"
        )
    if isinstance(dout, SymbolicZero):
        return None, None, None
    return _backward_call(dout, q, k, v, out, lse, causal, scale)


_attention_with_lse.defvjp(_attention_with_lse_fwd, _attention_with_lse_bwd, symbolic_zeros=True)
