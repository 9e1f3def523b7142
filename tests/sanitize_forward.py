"""A few small forward calls for NVIDIA compute-sanitizer (not a pytest module):

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/sanitize_forward.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/sanitize_forward.py

bfloat16, every compiled head_dim, causal and not, MHA and MQA, seqlen 17 and 130 (full tiles and tails).
Exits non-zero if an output holds NaN; the sanitizer's own findings set its exit code.
"""

from __future__ import annotations

import sys

import dhp
import torch
from dhp import _native

SEQLENS = [(17, 17), (130, 130), (17, 130), (130, 17)]
HEADS = [(2, 2), (4, 1)]


def main() -> int:
    _, head_dims = _native.variants()
    generator = torch.Generator(device="cuda").manual_seed(0)
    failures = 0
    launches = 0
    with torch.no_grad():
        for head_dim in head_dims:
            for causal in (False, True):
                for heads_q, heads_kv in HEADS:
                    for seqlen_q, seqlen_k in SEQLENS:
                        shape_q = (1, seqlen_q, heads_q, head_dim)
                        shape_kv = (1, seqlen_k, heads_kv, head_dim)
                        q = torch.randn(shape_q, dtype=torch.bfloat16, device="cuda", generator=generator)
                        k = torch.randn(shape_kv, dtype=torch.bfloat16, device="cuda", generator=generator)
                        v = torch.randn(shape_kv, dtype=torch.bfloat16, device="cuda", generator=generator)
                        out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
                        torch.cuda.synchronize()
                        launches += 1
                        if torch.isnan(out).any() or torch.isnan(lse).any():
                            failures += 1
                            print(f"NaN: d{head_dim} causal={causal} h{heads_q}/{heads_kv} sq{seqlen_q} sk{seqlen_k}")
    print(f"sanitize_forward: {launches} launches, {failures} with NaN")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
