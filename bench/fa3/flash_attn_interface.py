"""A stand-in for FlashAttention-3's flash_attn_interface, forward only, over libfa3.so (build.sh here): FA3's own
Hopper forward kernels, called through fa3_shim.cu, for timing them beside dhp without FA3's torch extension.
flash_attn_func takes (batch, seqlen, heads, head_dim) tensors as FA3's does and refuses what the shim lacks
(gradients, other dtypes and head_dims) with RuntimeError, which dhp.bench records as a refusal."""
import ctypes
import math
import os

import torch

_here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_here, "libfa3.version")) as _f:
    __version__ = f"3 ({_f.read().strip()}; forward only, bench/fa3)"
_lib = ctypes.CDLL(os.path.join(_here, "libfa3.so"))
_strides = ctypes.c_longlong * 3
_lib.fa3_fwd.argtypes = [ctypes.c_void_p] * 6 + [_strides] * 4 + [ctypes.c_int] * 8 + [ctypes.c_float, ctypes.c_int,
                                                                                      ctypes.c_void_p]
_lib.fa3_fwd.restype = ctypes.c_int
_semaphores = {}


def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("this FA3 stand-in runs the forward only")
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128, 256):
        raise RuntimeError("this FA3 build has bf16 and fp16 at head_dim 64, 128 and 256 only")
    batch, seqlen_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    # the causal scheduler's tile counter, which the shim zeroes on the stream before each call
    semaphore = _semaphores.setdefault(q.device, torch.zeros(1, dtype=torch.int32, device=q.device))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    status = _lib.fa3_fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), semaphore.data_ptr(),
        *(_strides(*t.stride()[:3]) for t in (q, k, v, out)), batch, seqlen_q, k.shape[1], heads, k.shape[2],
        head_dim, int(q.dtype == torch.bfloat16), int(causal), scale,
        torch.cuda.get_device_properties(q.device).multi_processor_count, torch.cuda.current_stream().cuda_stream)
    if status:
        raise RuntimeError(f"fa3_fwd failed with status {status}")
    return out
