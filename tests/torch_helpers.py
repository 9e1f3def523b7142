"""Helpers shared by the torch GPU suites (test_forward.py, test_backward.py, test_torch_ops.py): random inputs,
bitwise comparison, and the gradient check against the float64 reference with FlashAttention's error rule."""

from __future__ import annotations

from dhp import reference


def randn(torch, shape, dtype, generator):
    return torch.randn(shape, dtype=dtype, device="cuda", generator=generator)


def inputs(torch, dtype_name, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, seed=0):
    """Random q, k, v of dtype_name on the GPU, reproducible from seed."""
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = randn(torch, (batch, seqlen_q, heads_q, head_dim), dtype, generator)
    k = randn(torch, (batch, seqlen_k, heads_kv, head_dim), dtype, generator)
    v = randn(torch, (batch, seqlen_k, heads_kv, head_dim), dtype, generator)
    return q, k, v


def _bits(torch, t):
    """The raw bytes of a tensor, for bitwise comparison (NaN == NaN)."""
    return t.contiguous().view(torch.uint8)


def assert_bitwise_equal(torch, a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(_bits(torch, a), _bits(torch, b)), "results differ bit for bit"


def check_gradients(torch, dout, q, k, v, grads, causal, softmax_scale=None):
    """dq, dk, dv from dhp against the float64 reference; each gradient's budget is FlashAttention's."""
    refs = reference.attention_backward_reference(dout, q, k, v, causal, softmax_scale)
    baselines = reference.attention_backward_sdpa_low_precision(dout, q, k, v, causal, softmax_scale)
    for name, grad, like, ref, baseline in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, baselines):
        assert grad.shape == like.shape and grad.dtype == like.dtype, name
        assert not torch.isnan(grad).any(), f"NaN in {name}: an element was not written"
        error, budget = reference.max_abs_difference(grad, ref), reference.gradient_budget(baseline, ref)
        assert error <= budget, f"{name}: max abs error {error:.3e} > budget {budget:.3e}"
    rows_without_key = max(q.shape[1] - k.shape[1], 0) if causal else 0
    assert (grads[0][:, :rows_without_key] == 0).all(), "dq is 0 on the rows that see no key"
