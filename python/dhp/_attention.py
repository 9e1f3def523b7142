"""dhp.attention and dhp.attention_backward: find the caller's framework, allocate the outputs there, run on the
caller's stream.

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
    """Scaled dot-product attention in FlashAttention's layout.

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
        torch: runs on torch.cuda.current_stream(q.device), asynchronously like any torch op. Differentiable:
            when q, k or v requires grad (and under torch.compile) the call goes through the custom op
            torch.ops.dhp.attention_forward, whose backward is dhp's (see dhp/_torch.py); lse is not
            differentiable, and out= (written in place) is refused when autograd is on.
        cupy: runs on cupy.cuda.get_current_stream(), asynchronously.
        jax: an XLA custom call (dhp.jax): works under jit, grad (w.r.t. q, k, v; lse is not differentiable)
            and vmap, asynchronously on XLA's stream. out= is not accepted: JAX arrays are immutable. Where dhp._C
            was built without jaxlib's XLA FFI headers (dhp.jax.available() is False): concrete arrays only, the
            outputs are fresh device buffers that JAX adopts through DLPack, and the call returns once they are
            written.
        any other DLPack producer: inputs are read on the legacy default stream (the protocol's default) and the
            call returns once the outputs are written. Outputs come from q's array-API namespace when it has
            one (q.__array_namespace__()); otherwise pass out= (and return_lse needs that namespace).

    Raises:
        ValueError (shapes, strides, alignment, devices, options) and TypeError (dtypes, mixed frameworks),
        with the C library's sentence. On any error no output is touched.
    """
    scale = _softmax_scale(softmax_scale)
    kind = _framework_of(q, k=k, v=v, out=out)
    out, lse = _FORWARD[kind](q, k, v, bool(causal), scale, bool(return_lse), out)
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, dq=None, dk=None, dv=None):
    """Gradients of dhp.attention: (dq, dk, dv) for the upstream gradient dout = dL/d(out).

    Args:
        dout: q's shape and dtype.
        q, k, v, causal, softmax_scale: as given to dhp.attention.
        out, lse: what dhp.attention(q, k, v, ..., return_lse=True) returned for them.
        dq, dk, dv: optional outputs (q's and k's shapes and dtype), written in place and returned.

    Returns:
        (dq, dk, dv), tensors of q's framework on q's device. dk and dv of a KV head sum its query heads (GQA) in
        a fixed order: like the forward, the results are the same bits on every run.

    Frameworks: as for dhp.attention (torch and CuPy on their current stream, other DLPack producers synchronously
    on the legacy default stream). The result is not itself differentiable. JAX arrays go to dhp.jax's XLA custom
    call (dhp.jax.available() must be True); dq=, dk=, dv= are not accepted for them.

    Raises:
        ValueError and TypeError as dhp.attention does; on any error no output is touched.
    """
    scale = _softmax_scale(softmax_scale)
    kind = _framework_of(q, dout=dout, k=k, v=v, out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    return _BACKWARD[kind](dout, q, k, v, out, lse, bool(causal), scale, dq, dk, dv)


def _run_torch(q, k, v, causal, scale, return_lse, out):
    import torch

    # The custom op dhp::attention_forward is what autograd and torch.compile see; eager calls without autograd
    # skip its dispatch overhead, and out= (an in-place write that autograd cannot track) needs the direct call.
    needs_autograd = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if out is None and (needs_autograd or torch.compiler.is_compiling()):
        out, lse = _torch_ops(torch).attention_forward(q, k, v, causal, scale)
        return out, (lse if return_lse else None)
    if needs_autograd:
        raise ValueError("out= is written in place, outside autograd: leave it off to get gradients")
    if out is not None and out.requires_grad:
        raise ValueError("out requires grad: dhp.attention writes it in place, outside autograd")
    return forward_torch(q, k, v, causal, scale, return_lse, out)


def forward_torch(q, k, v, causal, scale, return_lse=True, out=None):
    """The forward on torch's current stream of q's device, outside autograd; dhp::attention_forward's kernel."""
    import torch

    _same_torch_device(q, k=k, v=v, out=out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q.shape), dtype=torch.float32, device=q.device) if return_lse else None
    _call_on_torch_stream(_native.ext().forward, q, (q, k, v, out, lse), causal, scale)
    return out, lse


def _run_torch_backward(dout, q, k, v, out, lse, causal, scale, dq, dk, dv):
    import torch

    if torch.compiler.is_compiling() and (dq, dk, dv) == (None, None, None):
        return _torch_ops(torch).attention_backward(dout, q, k, v, out, lse, causal, scale)
    for name, tensor in (("dq", dq), ("dk", dk), ("dv", dv)):
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{name} requires grad: dhp.attention_backward writes it in place, outside autograd")
    return backward_torch(dout, q, k, v, out, lse, causal, scale, dq, dk, dv)


def backward_torch(dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None):
    """The backward on torch's current stream of q's device, outside autograd; dhp::attention_backward's kernel."""
    import torch

    _same_torch_device(q, dout=dout, k=k, v=v, out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    workspace = None  # a non-CUDA q gets the C API's sentence, not one about the workspace
    if q.device.type == "cuda":
        # Allocated on the current stream: the caching allocator hands this memory out again only to work
        # ordered after this call's kernels.
        workspace = torch.empty(_workspace_bytes(q, k, causal, scale), dtype=torch.uint8, device=q.device)
    tensors = (q, k, v, out, dout, lse, dq, dk, dv, workspace)
    _call_on_torch_stream(_native.ext().backward, q, tensors, causal, scale)
    return dq, dk, dv


def _call_on_torch_stream(entry, q, tensors, causal, scale):
    """entry(*tensors, causal, scale, stream) on torch's current stream of q's device."""
    import torch

    # stream=-1 asks the producer for no synchronization: the kernel runs on the current stream, where these
    # tensors are already ordered. detach(): torch refuses to export tensors that require grad.
    capsules = [None if t is None else t.detach().__dlpack__(stream=-1) for t in tensors]
    if q.device.type != "cuda":
        entry(*capsules, causal, scale, 0)  # raises: the C API names what is wrong
        return
    with torch.cuda.device(q.device):
        entry(*capsules, causal, scale, torch.cuda.current_stream(q.device).cuda_stream)


def _same_torch_device(q, **tensors):
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}: expected one device")


def _torch_ops(torch):
    """torch.ops.dhp, with dhp's custom ops registered (python/dhp/_torch.py does it when first imported)."""
    from . import _torch  # noqa: F401

    return torch.ops.dhp


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


def _run_cupy_backward(dout, q, k, v, out, lse, causal, scale, dq, dk, dv):
    import cupy

    with q.device:
        dq = cupy.empty(q.shape, dtype=q.dtype) if dq is None else dq
        dk = cupy.empty(k.shape, dtype=k.dtype) if dk is None else dk
        dv = cupy.empty(v.shape, dtype=v.dtype) if dv is None else dv
        # CuPy's memory pool, like torch's, reuses the workspace only after this call's work on the stream.
        workspace = cupy.empty(_workspace_bytes(q, k, causal, scale), dtype=cupy.uint8)
        stream = cupy.cuda.get_current_stream().ptr
        tensors = [t.__dlpack__(stream=-1) for t in (q, k, v, out, dout, lse, dq, dk, dv, workspace)]
        _native.ext().backward(*tensors, causal, scale, stream)
    return dq, dk, dv


def _run_jax(q, k, v, causal, scale, return_lse, out):
    from . import jax as dhp_jax

    if dhp_jax.available():  # XLA custom calls: jit, grad and vmap on XLA's stream (python/dhp/jax.py)
        return dhp_jax._run(q, k, v, causal, scale, return_lse, out)

    import jax
    import jax.dlpack

    if out is not None:
        raise TypeError("out= is not supported for JAX arrays, which are immutable: use the returned array")
    tracer = getattr(jax.core, "Tracer", None)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tracer is not None and isinstance(tensor, tracer):
            raise TypeError(
                f"{name} is a JAX tracer: this dhp._C has no XLA FFI handlers (dhp.jax.available() is False), so "
                "dhp.attention takes concrete arrays only, not under jit, grad or vmap"
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


def _run_jax_backward(dout, q, k, v, out, lse, causal, scale, dq, dk, dv):
    from . import jax as dhp_jax

    if any(t is not None for t in (dq, dk, dv)):
        raise TypeError("dq=, dk=, dv= are not supported for JAX arrays, which are immutable: use the returned arrays")
    # JAX's backward is an XLA custom call (python/dhp/jax.py); there is no eager fallback as for the forward.
    if not dhp_jax.available():
        raise NotImplementedError(
            "dhp.attention_backward takes JAX arrays only where dhp._C has the XLA FFI handlers "
            "(dhp.jax.available() is False: jaxlib's headers were not found when dhp was built)"
        )
    return dhp_jax.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale)


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


def _run_dlpack_backward(dout, q, k, v, out, lse, causal, scale, dq, dk, dv):
    namespace = q.__array_namespace__() if hasattr(q, "__array_namespace__") else None
    if namespace is None and any(t is None for t in (dq, dk, dv)):
        raise TypeError(
            f"dhp.attention_backward cannot allocate a {_type_name(q)} (it has no __array_namespace__): "
            "pass dq=, dk= and dv="
        )
    dq = namespace.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = namespace.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = namespace.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    for name, tensor in (("dq", dq), ("dk", dk), ("dv", dv)):
        if not getattr(getattr(tensor, "flags", None), "writeable", True):
            raise ValueError(f"{name} is read-only")
    ext = _native.ext()
    workspace = None  # a non-CUDA q gets the C API's sentence, not one about the workspace
    if int(q.__dlpack_device__()[0]) == _KDL_CUDA:
        # The framework's allocator may not be ours to use (or absent): cudaMalloc'd memory, freed once dropped,
        # after the synchronous call. float32 elements: any dtype will do, and the size is a multiple of 256 bytes.
        workspace = ext.empty(((_workspace_bytes(q, k, causal, scale) + 3) // 4,), q, float32=True)
    ext.backward_synchronous(q, k, v, out, dout, lse, dq, dk, dv, workspace, causal, scale)
    return dq, dk, dv


_FORWARD = {"torch": _run_torch, "cupy": _run_cupy, "jax": _run_jax, "dlpack": _run_dlpack}
_BACKWARD = {
    "torch": _run_torch_backward,
    "cupy": _run_cupy_backward,
    "jax": _run_jax_backward,
    "dlpack": _run_dlpack_backward,
}


def _framework_of(q, **others) -> str:
    """The framework of q, which every other tensor given (not None) must share."""
    kind = _framework(q)
    if kind is None:
        raise TypeError(
            f"q is a {_type_name(q)}: expected a DLPack tensor (torch.Tensor, jax.Array, cupy.ndarray, ...)"
        )
    for name, tensor in others.items():
        if tensor is not None and _framework(tensor) != kind:
            raise TypeError(
                f"{name} is a {_type_name(tensor)} but q is a {_type_name(q)}: pass tensors of one framework"
            )
    return kind


def _workspace_bytes(q, k, causal, scale) -> int:
    return _native.ext().backward_workspace_size(q, k, causal, scale)


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
