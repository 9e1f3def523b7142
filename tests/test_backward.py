"""dhp.attention_backward on the GPU (torch) against the float64 reference, with FlashAttention's error rule.

Each gradient's max abs error may be at most twice that of torch SDPA computed in the input dtype, against the same
float64 reference (torch_helpers.check_gradients). dq, dk, dv are poisoned with NaN beforehand, so an element the
kernels leave unwritten shows. The full cross product of compiled (dtype, head_dim) x causal x GQA ratio runs on
small and ragged seqlens; long sequences run on a sample of (causal, GQA ratio) for every variant. Then bit
determinism (repeats, streams, a busy GPU), batch invariance, strided tensors, empty calls and errors; the last
tests need no GPU.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import dhp
import numpy as np
import pytest
from torch_helpers import assert_bitwise_equal, check_gradients, inputs, randn

pytestmark = pytest.mark.backward

# (heads_q, heads_kv); causal, the GQA shapes run heavy first at head_dims 64 and 128, gqa4 and mqa at 256
# (backward_causal_heavy_first_min_group); gqa4 runs each walk in two halves of the query heads at head_dim 128, mqa at
# head_dims 64 and 128 and, at head_dim 128, in pairs of key blocks too (dhp_build_info's
# backward_causal_head_halves_min_group, backward_causal_paired_min_group), the others whole
HEADS = {"mha": (2, 2), "gqa2": (4, 2), "gqa4": (4, 1), "mqa": (8, 1)}
SMALL_SEQLENS = [(1, 1), (17, 17), (128, 128), (113, 203), (239, 17), (1, 239)]
# (seqlen_q, seqlen_k, causal, heads): causal with seqlen_q > seqlen_k leaves the first rows without a key.
LARGE_CASES = [
    (1000, 1000, True, "gqa2"),
    (1000, 1000, False, "mqa"),
    (1023, 1024, True, "mha"),
    (4097, 4097, True, "mqa"),
    (4097, 4097, False, "gqa2"),
    (4097, 1000, True, "gqa2"),
    (1000, 4097, True, "mqa"),
    (2100, 2100, True, "gqa4"),
    (799, 3, False, "mha"),
    (4200, 4200, True, "mha"),  # head_dim 128: key block 0's walk split in two (BwdSplit)
    (5000, 8300, True, "mha"),  # head_dim 128: the walks of the lowest key blocks split, seqlen_q < seqlen_k
    (2100, 2900, False, "mha"),  # head_dim 128: kSplitDq pairs (23 key blocks: one past the keys) in two dQ chains
]
LARGE_IDS = [f"sq{sq}_sk{sk}_{'causal' if causal else 'full'}_{h}" for sq, sk, causal, h in LARGE_CASES]


def problem(torch, dtype_name, batch, seqlen_q, seqlen_k, heads, head_dim, causal, softmax_scale=None, seed=0):
    """Inputs of a backward call: dout, q, k, v and the forward's out, lse for them."""
    q, k, v = inputs(torch, dtype_name, batch, seqlen_q, seqlen_k, *heads, head_dim, seed=seed)
    dout = randn(torch, q.shape, q.dtype, torch.Generator(device="cuda").manual_seed(seed + 1))
    with torch.no_grad():
        out, lse = dhp.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    return dout, q, k, v, out, lse


def backward(dout, q, k, v, out, lse, causal, softmax_scale=None, **grads):
    return dhp.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, **grads)


def poisoned_like(torch, *tensors):
    return [torch.full_like(t, math.nan) for t in tensors]


def run_and_check(torch, dout, q, k, v, out, lse, causal, softmax_scale=None):
    """Poisoned dq=, dk=, dv= and the allocating path: both checked, and identical to the bit."""
    dq, dk, dv = poisoned_like(torch, q, k, v)
    grads = backward(dout, q, k, v, out, lse, causal, softmax_scale, dq=dq, dk=dk, dv=dv)
    assert all(g is p for g, p in zip(grads, (dq, dk, dv)))
    check_gradients(torch, dout, q, k, v, grads, causal, softmax_scale)
    for a, b in zip(grads, backward(dout, q, k, v, out, lse, causal, softmax_scale)):
        assert b.is_contiguous() and b.device == q.device
        assert_bitwise_equal(torch, a, b)
    return grads


@pytest.mark.parametrize("seqlens", SMALL_SEQLENS, ids=[f"sq{a}_sk{b}" for a, b in SMALL_SEQLENS])
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(torch_cuda, dtype_name, head_dim, causal, heads, seqlens):
    seqlen_q, seqlen_k = seqlens
    args = problem(torch_cuda, dtype_name, 2, seqlen_q, seqlen_k, HEADS[heads], head_dim, causal, seed=seqlen_q)
    run_and_check(torch_cuda, *args, causal)


@pytest.mark.parametrize("case", LARGE_CASES, ids=LARGE_IDS)
def test_matches_reference_long(torch_cuda, dtype_name, head_dim, case):
    seqlen_q, seqlen_k, causal, heads = case
    args = problem(torch_cuda, dtype_name, 1, seqlen_q, seqlen_k, HEADS[heads], head_dim, causal, seed=seqlen_k)
    run_and_check(torch_cuda, *args, causal)


@pytest.mark.parametrize("softmax_scale", [0.05, 1.0])
def test_explicit_softmax_scale(torch_cuda, dtype_name, head_dim, softmax_scale):
    args = problem(torch_cuda, dtype_name, 2, 333, 400, HEADS["gqa2"], head_dim, True, softmax_scale, seed=3)
    run_and_check(torch_cuda, *args, True, softmax_scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_strided_tensors(torch_cuda, dtype_name, head_dim, causal):
    """q, k, v views of one packed (batch, seqlen, 3, heads, head_dim) tensor; dout and dq, dk, dv (batch, heads,
    seqlen, head_dim) transposed. Checked, and the same bits as with compact tensors."""
    torch = torch_cuda
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cuda").manual_seed(21)
    batch, seqlen, heads = 2, 300, 4
    q, k, v = randn(torch, (batch, seqlen, 3, heads, head_dim), dtype, generator).unbind(2)
    dout = randn(torch, (batch, heads, seqlen, head_dim), dtype, generator).transpose(1, 2)
    assert not (q.is_contiguous() or dout.is_contiguous())
    with torch.no_grad():
        out, lse = dhp.attention(q, k, v, causal=causal, return_lse=True)
    dq, dk, dv = (torch.full((batch, heads, seqlen, head_dim), math.nan, dtype=dtype, device="cuda").transpose(1, 2)
                  for _ in range(3))
    grads = backward(dout, q, k, v, out, lse, causal, dq=dq, dk=dk, dv=dv)
    check_gradients(torch, dout, q, k, v, grads, causal)
    compact = backward(*(t.contiguous() for t in (dout, q, k, v, out, lse)), causal)
    for a, b in zip(grads, compact):
        assert_bitwise_equal(torch, a, b)


# Bit determinism and batch invariance: the promise is the same bits, so every comparison is bitwise.


def determinism_problem(torch, dtype_name, head_dim, causal):
    """4 q heads per kv head: dk and dv are sums over the group."""
    return problem(torch, dtype_name, 2, 1000, 1000, (8, 2), head_dim, causal, seed=5)


def assert_same_grads(torch, expected, results):
    for grads in results:
        for a, b in zip(expected, grads):
            assert_bitwise_equal(torch, a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bit_determinism(torch_cuda, dtype_name, head_dim, causal):
    """50 calls, the same bits."""
    torch = torch_cuda
    args = determinism_problem(torch, dtype_name, head_dim, causal)
    first = backward(*args, causal)
    assert_same_grads(torch, first, (backward(*args, causal) for _ in range(49)))


def test_same_bits_on_other_streams(torch_cuda, dtype_name, head_dim):
    torch = torch_cuda
    args = determinism_problem(torch, dtype_name, head_dim, True)
    expected = backward(*args, True)
    torch.cuda.synchronize()  # the inputs are ready for every stream
    results = []
    for stream in (torch.cuda.Stream(), torch.cuda.Stream()):  # queued together, they may overlap
        with torch.cuda.stream(stream):
            results.append(backward(*args, True))
    torch.cuda.synchronize()
    assert_same_grads(torch, expected, results)


def test_same_bits_while_the_gpu_is_busy(torch_cuda, dtype_name, head_dim):
    """A matmul loop on another stream takes SMs away from the backward: the bits must not change."""
    torch = torch_cuda
    args = determinism_problem(torch, dtype_name, head_dim, True)
    expected = backward(*args, True)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    busy = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(busy):
        for _ in range(30):  # about 2 ms each on an H100
            a @ a
    results = [backward(*args, True) for _ in range(10)]
    torch.cuda.synchronize()
    assert_same_grads(torch, expected, results)


def test_batch_invariance(torch_cuda, dtype_name, head_dim):
    """A sequence's gradients do not depend on the rest of the batch."""
    torch = torch_cuda
    args = problem(torch, dtype_name, 4, 777, 777, HEADS["gqa2"], head_dim, True, seed=9)
    whole = backward(*args, True)
    one = backward(*(t[2:3] for t in args), True)
    for a, b in zip(whole, one):
        assert_bitwise_equal(torch, a[2:3], b)


# The post kernel may start while the main kernel runs and waits for each tile's turn counters to count every adder
# (bwd_dq_chain_adders): a wrong count makes it read early or wait forever. Grids with CTAs that exit at once (a pair's
# missing key block with an odd key-block count, heavy first's cluster past the keys) run in a child process, so a
# hang fails the test.
EARLY_EXIT_SHAPES = [
    (1, 1, (8, 2), False),
    (17, 17, (8, 1), False),
    (300, 300, (4, 2), False),
    (1100, 1100, (8, 1), True),
    (1, 239, (16, 1), True),
    (333, 777, (8, 2), True),
]


def test_writer_count_with_early_exits(torch_cuda, dtype_name, head_dim):
    """100 calls of each shape, the same bits as the first, within a time limit."""
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_backward as t
        for sq, sk, heads, causal in t.EARLY_EXIT_SHAPES:
            args = t.problem(torch, {dtype_name!r}, 2, sq, sk, heads, {head_dim}, causal, seed=3)
            first = [g.clone() for g in t.backward(*args, causal)]
            for _ in range(100):
                grads = t.backward(*args, causal)
            torch.cuda.synchronize()
            assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(first, grads)), (sq, sk)
        print("done")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)  # ~5 s on an H100
    assert done.returncode == 0 and "done" in done.stdout, done.stdout + done.stderr


def test_empty_calls(torch_cuda):
    """batch == 0 does nothing; seqlen_q == 0 still writes dk = dv = 0 (no query, no gradient)."""
    torch = torch_cuda
    for batch, seqlen_q in ((0, 16), (2, 0)):
        dout, q, k, v, out, lse = problem(torch, "bfloat16", batch, seqlen_q, 16, (2, 2), 128, False)
        dq, dk, dv = poisoned_like(torch, q, k, v)
        backward(dout, q, k, v, out, lse, False, dq=dq, dk=dk, dv=dv)
        torch.cuda.synchronize()
        assert (dk == 0).all() and (dv == 0).all()


# Errors: the C sentence reaches Python as the right exception, and no output is touched.


def assert_rejected(torch, error, match, args, **overrides):
    dout, q, k, v, out, lse = args
    grads = dict(zip(("dq", "dk", "dv"), poisoned_like(torch, q, k, v)), **overrides)
    before = {name: t.detach().clone() for name, t in grads.items()}
    with pytest.raises(error, match=match):
        backward(dout, q, k, v, out, lse, False, **grads)
    for name, t in grads.items():
        assert_bitwise_equal(torch, t.detach(), before[name])


def test_errors(torch_cuda):
    torch = torch_cuda
    args = problem(torch, "bfloat16", 1, 64, 64, (4, 2), 128, False)
    dout, q, k, v, out, lse = args
    assert_rejected(torch, ValueError, "lse", (dout, q, k, v, out, lse[:, :, :32]))
    assert_rejected(torch, TypeError, "lse", (dout, q, k, v, out, lse.to(torch.bfloat16)))
    assert_rejected(torch, ValueError, "dout", (dout[:, :32], q, k, v, out, lse))
    assert_rejected(torch, ValueError, "dq", args, dq=torch.full_like(k, math.nan))
    assert_rejected(torch, ValueError, "dv", args, dv=k)  # an output that aliases an input
    requires_grad = torch.full_like(q, math.nan).requires_grad_()
    assert_rejected(torch, ValueError, "requires grad", args, dq=requires_grad)


def test_workspace_errors(torch_cuda, ext):
    """The binding's workspace: too small (the C API says so) or a strided view (the binding says so)."""
    torch = torch_cuda
    dout, q, k, v, out, lse = problem(torch, "bfloat16", 1, 64, 64, (2, 2), 128, False)
    needed = ext.backward_workspace_size(q, k, False, 0.0)
    assert needed > 0 and needed % 256 == 0
    stream = torch.cuda.current_stream().cuda_stream
    dq, dk, dv = poisoned_like(torch, q, k, v)
    too_small = torch.empty(needed - 256, dtype=torch.uint8, device="cuda")
    strided = torch.empty(2 * needed + 512, dtype=torch.uint8, device="cuda")[::2]
    for workspace, match in ((too_small, "workspace"), (strided, "strided")):
        with pytest.raises(ValueError, match=match):
            ext.backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, False, 0.0, stream)
    assert all(torch.isnan(t).all() for t in (dq, dk, dv))


# Without a GPU: arguments rejected before anything reaches a device.


def _numpy_problem():
    q = np.zeros((1, 16, 2, 64), np.float16)
    return q, q, q, q, q, np.zeros((1, 2, 16), np.float32)


def test_cpu_arrays_rejected_by_the_c_api(ext):
    dout, q, k, v, out, lse = _numpy_problem()
    grads = [np.full(q.shape, np.nan, q.dtype) for _ in range(3)]
    for call in (
        lambda: ext.backward(q, k, v, out, dout, lse, *grads, None, False, 0.0, 0),
        lambda: ext.backward_check(q, k, v, out, dout, lse, *grads, None, False, 0.0),
        lambda: ext.backward_synchronous(q, k, v, out, dout, lse, *grads, None, False, 0.0),
        lambda: dhp.attention_backward(dout, q, k, v, out, lse, dq=grads[0], dk=grads[1], dv=grads[2]),
        lambda: dhp.attention_backward(dout, q, k, v, out, lse, causal=True),
    ):
        with pytest.raises(ValueError, match="CUDA") as caught:
            call()
        assert "q" in str(caught.value)
    assert all(np.isnan(g).all() for g in grads)


def test_python_argument_errors():
    dout, q, k, v, out, lse = _numpy_problem()
    with pytest.raises(TypeError, match="DLPack"):
        dhp.attention_backward(dout, [[1.0]], k, v, out, lse)
    with pytest.raises(TypeError, match="lse is a builtins.list"):
        dhp.attention_backward(dout, q, k, v, out, [[1.0]])
    with pytest.raises(ValueError, match="softmax_scale"):
        dhp.attention_backward(dout, q, k, v, out, lse, softmax_scale=-1.0)


def test_head_dim_without_backward_is_refused(torch_cuda, ext):
    """A head_dim the forward has but the backward does not (256, for now) gets a clear error, not a wrong answer."""
    import json

    torch = torch_cuda
    info = json.loads(ext.build_info())
    missing = sorted(set(info["head_dims"]) - set(info["backward_head_dims"]))
    if not missing:
        pytest.skip("every forward head_dim of this build has a backward")
    q, k, v = inputs(torch, "bfloat16", 1, 64, 64, 2, 2, missing[0])
    out, lse = dhp.attention(q, k, v, return_lse=True)
    with pytest.raises(RuntimeError, match=f"no backward kernel for head_dim {missing[0]}"):
        dhp.attention_backward(torch.ones_like(out), q, k, v, out, lse)
