"""The float64 references against the definition, written out as loops on tiny inputs, and the backward reference
against finite differences of the forward one (CPU only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dhp.reference import (
    attention_backward_reference,
    attention_reference,
    attention_reference_numpy,
)

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)
SHAPES = [
    (1, 1, 1, 1, 1, 4),
    (2, 3, 5, 2, 2, 4),  # seqlen_q < seqlen_k: causal rows see extra keys
    (1, 5, 3, 4, 2, 3),  # seqlen_q > seqlen_k: the first causal rows see no key; GQA
    (2, 4, 4, 3, 1, 2),  # MQA
    (1, 2, 0, 1, 1, 2),  # no keys at all
]


def naive_attention(q, k, v, causal, scale):
    """The definition, one query row at a time."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    out = np.zeros((batch, seqlen_q, heads_q, head_dim))
    lse = np.full((batch, heads_q, seqlen_q), -math.inf)
    for b in range(batch):
        for h in range(heads_q):
            kv = h // group
            for i in range(seqlen_q):
                keys = [j for j in range(seqlen_k) if not causal or j <= i + seqlen_k - seqlen_q]
                if not keys:
                    continue
                scores = [scale * sum(q[b, i, h, c] * k[b, j, kv, c] for c in range(head_dim)) for j in keys]
                lse[b, h, i] = math.log(sum(math.exp(s) for s in scores))
                for s, j in zip(scores, keys):
                    out[b, i, h] += math.exp(s - lse[b, h, i]) * v[b, j, kv]
    return out, lse


def _inputs(shape, seed):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, heads_q, head_dim))
    k = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    v = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    return q, k, v


def _assert_matches(out, lse, expected_out, expected_lse):
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    rows_without_keys = np.isneginf(expected_lse).transpose(0, 2, 1)
    assert (out[rows_without_keys] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}-{}_d{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_numpy_reference(shape, causal, scale):
    q, k, v = _inputs(shape, seed=sum(shape))
    resolved = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    expected = naive_attention(q, k, v, causal, resolved)
    _assert_matches(*attention_reference_numpy(q, k, v, causal, scale), *expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}-{}_d{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_reference(shape, causal):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(t).to(torch.bfloat16) for t in _inputs(shape, seed=sum(shape)))
    out, lse = attention_reference(q, k, v, causal)
    assert out.dtype == lse.dtype == torch.float64
    # The reference upcasts its bfloat16 inputs: the definition gets the same (rounded) values.
    expected = naive_attention(*(t.double().numpy() for t in (q, k, v)), causal, 1.0 / math.sqrt(q.shape[-1]))
    _assert_matches(out.numpy(), lse.numpy(), *expected)


def test_causal_mask_is_bottom_right_aligned():
    torch = pytest.importorskip("torch")
    from dhp.reference import causal_mask

    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(4, 2).tolist() == [[False, False], [False, False], [True, False], [True, True]]
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


def numerical_gradient(loss, x, step=1e-6):
    """Central finite differences of loss() with respect to each element of x (changed in place, then restored)."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + step
        above = loss()
        x[index] = saved - step
        below = loss()
        x[index] = saved
        grad[index] = (above - below) / (2 * step)
    return grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}-{}_d{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_backward_reference_matches_finite_differences(shape, causal, scale):
    """The gradients of sum(dout * out), with out from the forward reference (itself checked above)."""
    q, k, v = _inputs(shape, seed=sum(shape))
    dout = np.random.default_rng(sum(shape) + 1).standard_normal(q.shape)
    dq, dk, dv = attention_backward_reference(dout, q, k, v, causal, scale)

    def loss():
        return float((attention_reference_numpy(q, k, v, causal, scale)[0] * dout).sum())

    for grad, x in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == x.shape and grad.dtype == np.float64
        np.testing.assert_allclose(grad, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    _, lse = attention_reference_numpy(q, k, v, causal, scale)
    rows_without_keys = np.isneginf(lse).transpose(0, 2, 1)
    assert (dq[rows_without_keys] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_sq{}_sk{}_h{}-{}_d{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_reference_torch_matches_numpy(shape, causal):
    torch = pytest.importorskip("torch")
    q, k, v = _inputs(shape, seed=sum(shape))
    dout = np.random.default_rng(sum(shape) + 1).standard_normal(q.shape)
    # bfloat16 inputs: the reference upcasts them, so NumPy gets the same rounded values.
    tensors = [torch.from_numpy(t).to(torch.bfloat16) for t in (dout, q, k, v)]
    actual = attention_backward_reference(*tensors, causal)
    expected = attention_backward_reference(*(t.double().numpy() for t in tensors), causal)
    for grad, want in zip(actual, expected):
        assert grad.dtype == torch.float64
        np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_sdpa_backward_baseline_is_finite_and_close():
    """The GPU tests' error baseline (torch SDPA in bfloat16), here on the CPU: no NaN from rows without a key."""
    torch = pytest.importorskip("torch")
    from dhp.reference import attention_backward_sdpa_low_precision, max_abs_difference

    for shape in [(2, 7, 3, 4, 2, 16), (1, 3, 7, 4, 1, 16)]:
        q, k, v = (torch.from_numpy(t).to(torch.bfloat16) for t in _inputs(shape, seed=1))
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        refs = attention_backward_reference(dout, q, k, v, causal=True)
        for grad, ref in zip(attention_backward_sdpa_low_precision(dout, q, k, v, causal=True), refs):
            assert grad.dtype == torch.bfloat16 and grad.shape == ref.shape
            assert torch.isfinite(grad).all()
            assert max_abs_difference(grad, ref) <= 0.05 * ref.abs().max().item()
