"""Reference attention for checking dhp, and FlashAttention's error budget.

attention_reference (torch, CPU or GPU) and attention_reference_numpy compute, in float64, exactly what dhp
promises: GQA by repeating each kv head for heads_q // heads_kv consecutive q heads, a causal mask aligned to the
bottom-right corner (key j visible to query i iff j <= i + seqlen_k - seqlen_q), and out = 0, lse = -inf for a
query row that sees no key. Layout (batch, seqlen, heads, head_dim); lse is (batch, heads_q, seqlen_q).

attention_backward_reference gives the float64 gradients of the same (dk, dv of a kv head summed over its
group of q heads; zero gradients from a row that sees no key), for torch tensors or NumPy arrays.

error_budget is FlashAttention's oracle: dhp's max abs error against the float64 reference may be at most twice
that of the same attention computed by the framework in the input dtype (torch SDPA, math backend, without its
float32 upcast), plus 1e-5. gradient_budget applies it to each gradient, with attention_backward_sdpa_low_precision
as the framework's attention and one rounding to the dtype as slack.
"""

from __future__ import annotations

import contextlib
import math
import sys


def attention_reference(q, k, v, causal=False, softmax_scale=None):
    """(out, lse) in float64 on q's device, from torch tensors of any float dtype."""
    import torch

    _, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(heads_q // heads_kv, dim=2)
    v64 = v.to(torch.float64).repeat_interleave(heads_q // heads_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(seqlen_q, seqlen_k, q.device), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a row without a visible key
    # exp(-inf - 0) = 0 leaves such a row all zeros, where exp(scores - lse) would be NaN.
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    return out, lse


def causal_mask(seqlen_q, seqlen_k, device=None):
    """Boolean (seqlen_q, seqlen_k): True where key j is visible to query i (bottom-right aligned)."""
    import torch

    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def attention_reference_numpy(q, k, v, causal=False, softmax_scale=None):
    """attention_reference for NumPy arrays: (out, lse) as float64 NumPy arrays."""
    import numpy as np

    q64, k64, v64 = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    _, seqlen_q, heads_q, head_dim = q64.shape
    seqlen_k, heads_kv = k64.shape[1], k64.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    k64 = np.repeat(k64, heads_q // heads_kv, axis=2)
    v64 = np.repeat(v64, heads_q // heads_kv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if causal:
        scores = np.where(_causal_mask_numpy(seqlen_q, seqlen_k), scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf for a row without a visible key
        lse = (shift + np.log(np.exp(scores - shift).sum(axis=-1, keepdims=True)))[..., 0]
    probs = np.exp(scores - np.where(np.isneginf(lse), 0.0, lse)[..., None])
    return np.einsum("bhqk,bkhd->bqhd", probs, v64), lse


def attention_backward_reference(dout, q, k, v, causal=False, softmax_scale=None):
    """(dq, dk, dv) in float64: the gradients of sum(dout * out) for the reference out.

    Takes torch tensors (the results are on q's device) or NumPy arrays (the results are NumPy arrays).
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor):
        xp = torch
        dout, q, k, v = (t.to(torch.float64) for t in (dout, q, k, v))
        out, lse = attention_reference(q, k, v, causal, softmax_scale)
        visible = causal_mask(seqlen_q, seqlen_k, q.device)
    else:
        import numpy as xp

        dout, q, k, v = (xp.asarray(t, dtype=xp.float64) for t in (dout, q, k, v))
        out, lse = attention_reference_numpy(q, k, v, causal, softmax_scale)
        visible = _causal_mask_numpy(seqlen_q, seqlen_k)

    # q heads as (kv head, member of its group): the sums over g below are GQA's sums over a kv head's q heads.
    grouped = (batch, seqlen_q, heads_kv, heads_q // heads_kv, head_dim)
    qg, dout_g, out_g = (t.reshape(grouped) for t in (q, dout, out))
    lse_g = lse.reshape(batch, heads_kv, heads_q // heads_kv, seqlen_q)
    scores = xp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    if causal:
        scores = xp.where(visible, scores, -math.inf)
    # exp(-inf - 0) = 0: a row that sees no key has no probabilities, hence no gradient (as in the forward).
    probs = xp.exp(scores - xp.where(xp.isneginf(lse_g), 0.0, lse_g)[..., None])
    dv = xp.einsum("bhgqk,bqhgd->bkhd", probs, dout_g)
    dprobs = xp.einsum("bqhgd,bkhd->bhgqk", dout_g, v)
    # Softmax backward: dscores = probs * (dprobs - sum_k probs * dprobs), and that sum is rowsum(dout * out).
    row_dot = xp.einsum("bqhgd,bqhgd->bhgq", dout_g, out_g)
    dscores = probs * (dprobs - row_dot[..., None]) * scale
    dq = xp.einsum("bhgqk,bkhd->bqhgd", dscores, k).reshape(q.shape)
    dk = xp.einsum("bhgqk,bqhgd->bkhd", dscores, qg)
    return dq, dk, dv


def _causal_mask_numpy(seqlen_q, seqlen_k):
    """causal_mask as a NumPy array."""
    import numpy as np

    return np.arange(seqlen_k)[None, :] <= np.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)


@contextlib.contextmanager
def _low_precision_math_sdpa():
    """SDPA's math backend computes half-precision inputs in float32 unless told otherwise (torch >= 2.5)."""
    import torch

    backends = torch.backends.cuda
    if not hasattr(backends, "allow_fp16_bf16_reduction_math_sdp"):
        yield
        return
    previous = backends.fp16_bf16_reduction_math_sdp_allowed()
    backends.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        yield
    finally:
        backends.allow_fp16_bf16_reduction_math_sdp(previous)


def attention_sdpa_low_precision(q, k, v, causal=False, softmax_scale=None):
    """torch SDPA (math backend) in q's dtype: the framework's own low-precision attention, layout (b, s, h, d).

    Rows without a visible key are whatever SDPA makes of them (0 or NaN); error_budget leaves them out.
    Differentiable: autograd through it is the framework's own low-precision backward.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    repeat = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
    mask = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    with sdpa_kernel(SDPBackend.MATH), _low_precision_math_sdpa():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
        )
    return out.transpose(1, 2)


def max_abs_error(out, ref_out, ref_lse):
    """Max |out - ref_out| over the query rows that see at least one key (ref_lse finite), as a float."""
    import torch

    rows = torch.isfinite(ref_lse).permute(0, 2, 1)[..., None]  # (batch, seqlen_q, heads_q, 1)
    diff = torch.where(rows, (out.to(torch.float64) - ref_out).abs(), 0.0)
    return diff.max().item() if diff.numel() else 0.0


def error_budget(q, k, v, causal, softmax_scale, ref_out, ref_lse):
    """FlashAttention's tolerance: 2 x (max abs error of low-precision torch SDPA) + 1e-5."""
    import torch

    with torch.no_grad():
        baseline = attention_sdpa_low_precision(q, k, v, causal, softmax_scale)
    return 2.0 * max_abs_error(baseline, ref_out, ref_lse) + 1e-5


def attention_backward_sdpa_low_precision(dout, q, k, v, causal=False, softmax_scale=None):
    """(dq, dk, dv) of attention_sdpa_low_precision by torch autograd, in q's dtype.

    Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k query rows see no key. SDPA would make them NaN,
    and the NaN would spread into every dk and dv, so they are left out: the other rows see the same keys in the
    square causal problem of the last seqlen_k rows, and the rows left out get dq = 0, as in the definition.
    """
    import torch

    first_row = max(q.shape[1] - k.shape[1], 0) if causal else 0
    leaves = [t.detach().requires_grad_() for t in (q[:, first_row:], k, v)]
    with torch.enable_grad():
        out = attention_sdpa_low_precision(*leaves, causal, softmax_scale)
        dq_rows, dk, dv = torch.autograd.grad(out, leaves, dout[:, first_row:])
    dq = torch.zeros_like(q)
    dq[:, first_row:] = dq_rows
    return dq, dk, dv


def max_abs_difference(grad, ref_grad):
    """Max |grad - ref_grad| over all elements, as a float (0 for empty tensors)."""
    return (grad.double() - ref_grad).abs().max().item() if grad.numel() else 0.0


def gradient_budget(baseline_grad, ref_grad):
    """error_budget for one gradient, from the low-precision baseline's gradient: 2 x its max abs error + 1e-5,
    plus one rounding to the dtype at the largest reference value, which the baseline may have been lucky to miss
    (a tiny sum such as seqlen 1's can come out exact in SDPA)."""
    import torch

    rounding = torch.finfo(baseline_grad.dtype).eps / 2 * (ref_grad.abs().max().item() if ref_grad.numel() else 0.0)
    return 2.0 * max_abs_difference(baseline_grad, ref_grad) + 1e-5 + rounding
