"""dhp.attention: find the caller's framework, allocate the outputs there, run on the caller's stream.

Framework modules are looked up in sys.modules, never imported here unless q already belongs to them, so
`import dhp` stays free of torch, JAX and CuPy.
"""

from __future__ import annotations

import math
import struct
import sys

from . import _native

_KDL_CUDA = 2  # DLPack device type of CUDA device memory


def attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False, out=None):
    """Scaled dot-product attention in FlashAttention's layout, forward only.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim), bfloat16 or float16, on a Hopper (sm_90) GPU.
        k, v: (batch, seqlen_k, heads_kv, head_dim), q's dtype and device; heads_q % heads_kv == 0 (GQA, MQA).
        causal: mask aligned to the bottom-right corner: query i sees key j iff j <= i + seqlen_k - seqlen_q.
            A query row that sees no key gets out = 0 and lse = -inf.
        softmax_scale: factor applied to q·k before the softmax; None means 1/sqrt(head_dim).
        return_lse: also return the float32 log-sum-exp of the scaled scores, shape (batch, heads_q, seqlen_q).
        out: optional output (q's shape, dtype, framework and device), written in place and returned.

    Returns:
        out, or (out, lse) when return_lse: tensors of q's framework on q's device.

    Frameworks:
        torch: runs on torch.cuda.current_stream(q.device), asynchronously like any torch op. No autograd yet.
        cupy: runs on cupy.cuda.get_current_stream(), asynchronously.
        jax: concrete arrays only (not under jit, grad or vmap; an XLA custom call comes later). JAX arrays are
            immutable and XLA's streams are not ours to join, so the outputs are fresh device buffers that JAX
            adopts through DLPack, and the call returns once they are written. out= is not accepted.
        any other DLPack producer: inputs are read on the legacy default stream (the protocol's default) and the
            call returns once the outputs are written. Outputs come from q's array-API namespace when it has
            one (q.__array_namespace__()); otherwise pass out= (and return_lse needs that namespace).

    Raises:
        ValueError (shapes, strides, alignment, devices, options) and TypeError (dtypes, mixed frameworks),
        with the C library's sentence. On any error no output is touched.
    """
    scale = _softmax_scale(softmax_scale)
    kind = _framework(q)
    if kind is None:
        raise TypeError(
            f"q is a {_type_name(q)}: expected a DLPack tensor (torch.Tensor, jax.Array, cupy.ndarray, ...)"
        )
    for name, tensor in (("k", k), ("v", v), ("out", out)):
        if tensor is not None and _framework(tensor) != kind:
            raise TypeError(
                f"{name} is a {_type_name(tensor)} but q is a {_type_name(q)}: pass tensors of one framework"
            )
    out, lse = _RUNNERS[kind](q, k, v, bool(causal), scale, bool(return_lse), out)
    return (out, lse) if return_lse else out


def _run_torch(q, k, v, causal, scale, return_lse, out):
    import torch

    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "dhp.attention has no backward pass yet: call it under torch.no_grad() or on detached tensors"
        )
    for name, tensor in (("k", k), ("v", v), ("out", out)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}: expected one device")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.requires_grad:
        raise ValueError("out requires grad: dhp.attention writes it in place, outside autograd")
    lse = torch.empty(_lse_shape(q.shape), dtype=torch.float32, device=q.device) if return_lse else None

    # stream=-1 asks the producer for no synchronization: the kernel runs on the current stream, where these
    # tensors are already ordered. detach(): torch refuses to export tensors that require grad.
    def capsules():
        return [None if t is None else t.detach().__dlpack__(stream=-1) for t in (q, k, v, out, lse)]

    ext = _native.ext()
    if q.device.type != "cuda":
        ext.forward(*capsules(), causal, scale, 0)  # raises: the C API names what is wrong
    else:
        with torch.cuda.device(q.device):
            ext.forward(*capsules(), causal, scale, torch.cuda.current_stream(q.device).cuda_stream)
    return out, lse


def _run_cupy(q, k, v, causal, scale, return_lse, out):
    import cupy

    with q.device:
        if out is None:
            out = cupy.empty(q.shape, dtype=q.dtype)
        lse = cupy.empty(_lse_shape(q.shape), dtype=cupy.float32) if return_lse else None
        stream = cupy.cuda.get_current_stream().ptr
        # As for torch: the current stream orders everything, so the export asks for no synchronization.
        tensors = [None if t is None else t.__dlpack__(stream=-1) for t in (q, k, v, out, lse)]
        _native.ext().forward(*tensors, causal, scale, stream)
    return out, lse


def _run_jax(q, k, v, causal, scale, return_lse, out):
    import jax
    import jax.dlpack

    if out is not None:
        raise TypeError("out= is not supported for JAX arrays, which are immutable: use the returned array")
    tracer = getattr(jax.core, "Tracer", None)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tracer is not None and isinstance(tensor, tracer):
            raise TypeError(
                f"{name} is a JAX tracer: dhp.attention takes concrete arrays for now, not under jit, grad or vmap"
            )
    device_type, _ = q.__dlpack_device__()
    if int(device_type) != _KDL_CUDA:
        raise ValueError(f"q is on {', '.join(map(str, q.devices()))}: expected an array on a CUDA GPU")

    # Why fresh buffers and a synchronous call: writing into a buffer that JAX owns would break its
    # immutability (buffers may be shared or donated), and there is no XLA stream we may enqueue on. So the
    # binding allocates the outputs (cudaMalloc), runs on the legacy default stream once the inputs are ready
    # (JAX's __dlpack__ without a stream waits for them), waits for the kernel, and JAX adopts the buffers
    # zero-copy. Waiting also keeps the input buffers alive for the whole kernel.
    ext = _native.ext()
    out_buffer = ext.empty(q.shape, q)
    lse_buffer = ext.empty(_lse_shape(q.shape), q, float32=True) if return_lse else None
    ext.forward_synchronous(q, k, v, out_buffer, lse_buffer, causal, scale)
    out = jax.dlpack.from_dlpack(out_buffer)
    lse = jax.dlpack.from_dlpack(lse_buffer) if return_lse else None
    return out, lse


def _run_dlpack(q, k, v, causal, scale, return_lse, out):
    namespace = q.__array_namespace__() if hasattr(q, "__array_namespace__") else None
    if namespace is None and (out is None or return_lse):
        raise TypeError(
            f"dhp.attention cannot allocate a {_type_name(q)} (it has no __array_namespace__): pass out=, "
            "and leave return_lse off"
        )
    if out is None:
        out = namespace.empty(q.shape, dtype=q.dtype, device=q.device)
    elif not getattr(getattr(out, "flags", None), "writeable", True):
        raise ValueError("out is read-only")
    lse = None
    if return_lse:
        lse = namespace.empty(_lse_shape(q.shape), dtype=namespace.float32, device=q.device)
    _native.ext().forward_synchronous(q, k, v, out, lse, causal, scale)
    return out, lse


_RUNNERS = {"torch": _run_torch, "cupy": _run_cupy, "jax": _run_jax, "dlpack": _run_dlpack}


def _framework(x) -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return None


def _type_name(x) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _lse_shape(q_shape) -> tuple:
    # (batch, heads_q, seqlen_q). A q of another rank gets a placeholder: the C API rejects q before lse.
    return (q_shape[0], q_shape[2], q_shape[1]) if len(q_shape) == 4 else (0,)


def _softmax_scale(value) -> float:
    """The C API's softmax_scale: 0.0 stands for 1/sqrt(head_dim), so an explicit value must be positive."""
    if value is None:
        return 0.0
    scale = float(value)
    try:
        as_float32 = struct.unpack("f", struct.pack("f", scale))[0]
    except OverflowError:
        as_float32 = math.inf
    if not (math.isfinite(as_float32) and as_float32 > 0.0):
        raise ValueError(
            f"softmax_scale={value!r}: expected a positive finite float32 value, or None for 1/sqrt(head_dim)"
        )
    return scale
