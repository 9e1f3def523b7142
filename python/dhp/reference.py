"""Reference attention for checking dhp, and FlashAttention's error budget.

attention_reference (torch, CPU or GPU) and attention_reference_numpy compute, in float64, exactly what dhp
promises: GQA by repeating each kv head for heads_q // heads_kv consecutive q heads, a causal mask aligned to the
bottom-right corner (key j visible to query i iff j <= i + seqlen_k - seqlen_q), and out = 0, lse = -inf for a
query row that sees no key. Layout (batch, seqlen, heads, head_dim); lse is (batch, heads_q, seqlen_q).

error_budget is FlashAttention's oracle: dhp's max abs error against the float64 reference may be at most twice
that of the same attention computed by the framework in the input dtype (torch SDPA, math backend, without its
float32 upcast), plus 1e-5.
"""

from __future__ import annotations

import contextlib
import math


def attention_reference(q, k, v, causal=False, softmax_scale=None):
    """(out, lse) in float64 on q's device, from torch tensors of any float dtype."""
    import torch

    batch, seqlen_q, heads_q, head_dim = q.shape
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
    batch, seqlen_q, heads_q, head_dim = q64.shape
    seqlen_k, heads_kv = k64.shape[1], k64.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    k64 = np.repeat(k64, heads_q // heads_kv, axis=2)
    v64 = np.repeat(v64, heads_q // heads_kv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if causal:
        visible = np.arange(seqlen_k)[None, :] <= np.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
        scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf for a row without a visible key
        lse = (shift + np.log(np.exp(scores - shift).sum(axis=-1, keepdims=True)))[..., 0]
    probs = np.exp(scores - np.where(np.isneginf(lse), 0.0, lse)[..., None])
    return np.einsum("bhqk,bkhd->bqhd", probs, v64), lse


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
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    repeat = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
    mask = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _low_precision_math_sdpa():
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
    baseline = attention_sdpa_low_precision(q, k, v, causal, softmax_scale)
    return 2.0 * max_abs_error(baseline, ref_out, ref_lse) + 1e-5
