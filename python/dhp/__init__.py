"""dhp: constant-time, bit-deterministic FlashAttention for NVIDIA Hopper (sm_90a).

    out = dhp.attention(q, k, v, causal=True)          # q, k, v: (batch, seqlen, heads, head_dim)
    dq, dk, dv = dhp.attention_backward(dout, q, k, v, out, lse, causal=True)  # lse: return_lse=True

Takes PyTorch, JAX and CuPy tensors (anything with __dlpack__) and returns the caller's kind of tensor.
Importing dhp needs neither a GPU nor any of those frameworks; `python -m dhp` reports what this install can do.
"""

from __future__ import annotations

from . import _native
from ._attention import attention, attention_backward

__all__ = ["__version__", "attention", "attention_backward", "build_info", "devices"]


def _version() -> str:
    if _native.available():
        return _native.ext().version()
    from importlib import metadata

    try:
        return metadata.version("dhp")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def build_info() -> dict:
    """How the C library was built: {"version", "cuda", "arch", "dtypes", "head_dims"}."""
    return _native.build_info()


def devices() -> list[dict]:
    """The visible CUDA devices: dicts of index, name, compute_capability, multiprocessors, supported.

    An empty list when there is no GPU or no driver. `supported` is True where dhp's kernels run (sm_90).
    """
    ext = _native.ext()
    return [{"index": i, **ext.device_info(i)} for i in range(ext.device_count())]
