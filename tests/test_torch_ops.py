"""dhp in PyTorch's machinery: the custom ops dhp::attention_forward / dhp::attention_backward (python/dhp/_torch.py),
autograd through dhp.attention, torch.library.opcheck and torch.compile(fullgraph=True).

The first tests need torch but no GPU and no compiled extension: on meta and fake tensors the ops run their fake
implementations, which exercises the registrations, the autograd wiring and graph capture. The GPU tests run the
kernels.
"""

from __future__ import annotations

import math

import dhp
import pytest

torch = pytest.importorskip("torch", reason="the torch integration needs PyTorch (pip install 'dhp[torch]')")
import dhp._torch
from torch_helpers import assert_bitwise_equal, check_gradients, inputs, randn

B, SQ, SK, HQ, HKV, D = 2, 48, 40, 4, 2, 64


def meta_inputs(requires_grad=True, dtype=torch.bfloat16):
    shapes = ((B, SQ, HQ, D), (B, SK, HKV, D), (B, SK, HKV, D))
    return [torch.empty(s, dtype=dtype, device="meta", requires_grad=requires_grad) for s in shapes]


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(B, SQ, HQ, D, dtype=torch.float16, device="cuda")
        k = torch.empty(B, SK, HKV, D, dtype=torch.float16, device="cuda")
        out, lse = torch.ops.dhp.attention_forward(q, k, k, True, 0.0)
        dq, dk, dv = torch.ops.dhp.attention_backward(out, q, k, k, out, lse, True, 0.0)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "cuda")
    assert (lse.shape, lse.dtype) == ((B, HQ, SQ), torch.float32)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
    assert all(t.dtype == torch.float16 for t in (out, dq, dk, dv))
    assert all(t.is_contiguous() for t in (out, lse, dq, dk, dv)), "as the real ops allocate them"


def test_autograd_wiring():
    """dhp.attention on tensors that require grad goes through the op; backward reaches the backward op."""
    q, k, v = meta_inputs()
    out, lse = dhp.attention(q, k, v, causal=True, return_lse=True)
    assert out.grad_fn is not None and "dhp_attention_forward" in type(out.grad_fn).__name__
    assert not lse.requires_grad, "lse is not differentiable"
    out.sum().backward()  # a broadcast dout (strides 0)
    assert [t.grad.shape for t in (q, k, v)] == [t.shape for t in (q, k, v)]
    assert all(t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_out_with_autograd_is_rejected():
    q, k, v = meta_inputs()
    with pytest.raises(ValueError, match="autograd"):
        dhp.attention(q, k, v, out=torch.empty_like(q, requires_grad=False))


def test_opcheck_registrations():
    """opcheck's schema, autograd-registration, fake-tensor and AOT-dispatch checks, on meta tensors."""
    q, k, v = meta_inputs()
    torch.library.opcheck(torch.ops.dhp.attention_forward.default, (q, k, v, True, 0.0))
    out, lse = torch.ops.dhp.attention_forward(q, k, v, True, 0.0)
    args = (out.detach(), q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.125)
    torch.library.opcheck(torch.ops.dhp.attention_backward.default, args)


class TinyAttention(torch.nn.Module):
    """A projection, dhp.attention and a loss: enough graph around the op for the compiler to fuse."""

    def __init__(self, device, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(D, 3 * D, device=device, dtype=dtype)

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, dim=-1)
        return dhp.attention(q, k, v, causal=True).float().square().sum()


def test_compile_fullgraph_captures_forward_and_backward():
    """No graph break (fullgraph=True raises on one), forward and backward through the ops' fake kernels."""
    torch._dynamo.reset()
    model = TinyAttention("meta", torch.bfloat16)
    x = torch.empty(B, SQ, HQ, D, device="meta", dtype=torch.bfloat16)
    loss = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    assert model.proj.weight.grad.shape == model.proj.weight.shape


# On the GPU: the kernels behind the ops.


def gpu_problem(dtype_name="bfloat16", seed=0):
    """dout, q, k, v on the GPU: GQA, ragged seqlens."""
    q, k, v = inputs(torch, dtype_name, B, 300, 257, HQ, HKV, 128, seed=seed)
    dout = randn(torch, q.shape, q.dtype, torch.Generator(device="cuda").manual_seed(seed + 1))
    return dout, q, k, v


def test_autograd_gives_dhp_gradients(torch_cuda, dtype_name):
    for causal in (False, True):
        dout, q, k, v = gpu_problem(dtype_name)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = dhp.attention(*leaves, causal=causal)
        out.backward(dout)
        grads = [t.grad for t in leaves]
        check_gradients(torch, dout, q, k, v, grads, causal)
        with torch.no_grad():
            out_direct, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
        assert_bitwise_equal(torch, out.detach(), out_direct)
        for a, b in zip(grads, dhp.attention_backward(dout, q, k, v, out_direct, lse, causal=causal)):
            assert_bitwise_equal(torch, a, b)


def test_opcheck_on_the_gpu(torch_cuda):
    dout, q, k, v = gpu_problem()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.dhp.attention_forward.default, (*leaves, True, 0.0))
    torch.library.opcheck(torch.ops.dhp.attention_forward.default, (*leaves, False, 0.3))
    out, lse = torch.ops.dhp.attention_forward(q, k, v, True, 0.0)
    torch.library.opcheck(torch.ops.dhp.attention_backward.default, (dout, q, k, v, out, lse, True, 0.0))


def test_compile_fullgraph_on_the_gpu(torch_cuda):
    """Compiled (inductor) forward and backward agree with eager; fullgraph=True means no graph break."""
    torch._dynamo.reset()
    model = TinyAttention("cuda", torch.bfloat16)
    x = torch.randn(B, 300, HQ, D, device="cuda", dtype=torch.bfloat16)
    eager_loss = model(x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss = torch.compile(model, fullgraph=True)(x)
    compiled_loss.backward()
    # The compiler may pick other matmul kernels for the projection, so compiled and eager agree to rounding.
    assert math.isclose(compiled_loss.item(), eager_loss.item(), rel_tol=1e-3)
    for compiled, eager in zip((p.grad for p in model.parameters()), eager_grads):
        assert ((compiled.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-2
