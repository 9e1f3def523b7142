# Key splits (branch key-splits): dhp against a float32 reference on decode-like shapes; repeat and batch bit checks.
# PYTHONPATH=python python bench/key_split_check.py
import torch, dhp, math
torch.manual_seed(0)
def ref(q, k, v, causal):
    b, sq, hq, d = q.shape; sk, hkv = k.shape[1], k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf = kf.repeat_interleave(hq // hkv, 1); vf = vf.repeat_interleave(hq // hkv, 1)
    s = qf @ kf.transpose(-1, -2) / math.sqrt(d)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]; j = torch.arange(sk, device=q.device)[None]
        s = s.masked_fill(j > i + sk - sq, float('-inf'))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vf).transpose(1, 2), lse
bad = 0
for dt in (torch.bfloat16, torch.float16):
    for hd in (64, 128, 256):
        for causal in (False, True):
            for sq, sk, hq, hkv in ((1, 4500, 8, 2), (16, 8192, 4, 4), (100, 1100, 4, 1), (128, 3000, 2, 2), (40, 2300, 4, 2), (1, 65536, 2, 1), (7, 1025, 3, 3), (128, 2048, 8, 1), (3, 3000, 12, 2)):
                q = torch.randn(2, sq, hq, hd, device='cuda', dtype=dt)
                k = torch.randn(2, sk, hkv, hd, device='cuda', dtype=dt)
                v = torch.randn(2, sk, hkv, hd, device='cuda', dtype=dt)
                out = torch.full_like(q, float('nan'))
                o, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
                r, rl = ref(q, k, v, causal)
                err = (o.float() - r).abs().max().item(); lerr = (lse - rl).abs().max().item()
                o2, l2 = dhp.attention(q, k, v, causal=causal, return_lse=True)
                same = torch.equal(o.view(torch.int16), o2.view(torch.int16)) and torch.equal(lse, l2)
                # batch invariance: sequence 1 alone
                o3, l3 = dhp.attention(q[1:], k[1:], v[1:], causal=causal, return_lse=True)
                inv = torch.equal(o[1:].view(torch.int16), o3.view(torch.int16)) and torch.equal(lse[1:], l3)
                ok = err < 2e-2 and lerr < 1e-3 and same and inv and not torch.isnan(o).any()
                bad += not ok
                if not ok or sk == 65536:
                    print(dt, hd, causal, sq, sk, hq, hkv, 'err %.2e lse %.2e repeat %s batch %s %s' % (err, lerr, same, inv, 'OK' if ok else 'FAIL'))
print('key split checks failed:', bad)
