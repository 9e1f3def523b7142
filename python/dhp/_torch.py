"""dhp as PyTorch custom operators (torch.library), so that autograd and torch.compile see through it.

    torch.ops.dhp.attention_forward(q, k, v, causal, softmax_scale) -> (out, lse)
    torch.ops.dhp.attention_backward(dout, q, k, v, out, lse, causal, softmax_scale) -> (dq, dk, dv)

Both run on torch's current stream and return fresh contiguous tensors. softmax_scale is the C API's: 0.0 stands
for 1/sqrt(head_dim), which the library computes itself, so the op gives the same bits as dhp.attention.
The forward's autograd formula is the backward op; lse is an output that autograd does not differentiate.

Registered when this module is first imported: dhp.attention and dhp.attention_backward import it the first time
they get a torch tensor that needs it (so `import dhp` never imports torch). Code that calls torch.ops.dhp.*
before that imports dhp._torch itself.
"""

import torch
from torch import Tensor

from . import _attention


@torch.library.custom_op("dhp::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor]:
    return _attention.forward_torch(q, k, v, causal, softmax_scale)


@attention_forward.register_fake
def _(q, k, v, causal, softmax_scale):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("dhp::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _attention.backward_torch(dout, q, k, v, out, lse, causal, softmax_scale)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    # The C API's backward takes no gradient for lse (it would shift each row's rowsum(dout * out) term).
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # Autograd's dout may be a broadcast (the gradient of out.sum() has all strides 0); the kernels read rows.
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
