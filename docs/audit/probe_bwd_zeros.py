"""Which inputs make dhp's backward faster? Interleaved per-launch CUDA-event timing of one ext.backward call
(bf16 d128 b2 s1024 h8, 1500 launches per input, random order, a GPU spin before each). Results of 2026-11-25 on
an H100 in 2026-11-25-probe-bwd-zeros.txt; see docs/SECURITY.md, timing test."""
import random, statistics, torch
from dhp import _native
ext = _native.ext()
torch.manual_seed(0)
b, s, h, d = 2, 1024, 8, 128
dt = torch.bfloat16
st = torch.cuda.current_stream().cuda_stream
def make(q0=False, k0=False, v0=False, do0=False, all0=False):
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=dt) for _ in range(4))
    if q0 or all0: q.zero_()
    if k0 or all0: k.zero_()
    if v0 or all0: v.zero_()
    if do0 or all0: do.zero_()
    out = torch.empty_like(q); lse = torch.empty(b, h, s, device="cuda")
    ext.forward(q, k, v, out, lse, False, 0.0, st)
    return q, k, v, out, do, lse
cfgs = {"random": make(), "dout=0": make(do0=True), "v=0": make(v0=True), "q=k=0": make(q0=True, k0=True),
        "all0": make(all0=True), "random2": make()}
ws = torch.empty(ext.backward_workspace_size(cfgs["random"][0], cfgs["random"][1], False, 0.0), dtype=torch.uint8, device="cuda")
dq, dk, dv = (torch.empty(b, s, h, d, device="cuda", dtype=dt) for _ in range(3))
times = {k: [] for k in cfgs}
order = [k for k in cfgs for _ in range(1500)]
random.seed(1); random.shuffle(order)
ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in order]
for i, name in enumerate(order):
    q, k, v, out, do, lse = cfgs[name]
    torch.cuda._sleep(200000)
    ev[i][0].record(); ext.backward(q, k, v, out, do, lse, dq, dk, dv, ws, False, 0.0, st); ev[i][1].record()
torch.cuda.synchronize()
for i, name in enumerate(order):
    times[name].append(ev[i][0].elapsed_time(ev[i][1]) * 1000)
for name, t in times.items():
    t = sorted(t); n = len(t)
    print(f"{name:8s} median {statistics.median(t):7.2f} us  p10 {t[n//10]:7.2f}  p90 {t[9*n//10]:7.2f}  mean(10-90) {statistics.mean(t[n//10:9*n//10]):7.2f}")
