"""Input classes of the dynamic audits (counters, timing, determinism): Q, K, V whose values differ in kind.

Method: each class is drawn in float32 with numpy from a seed, so a class is the same on every machine and its
definition is testable without a GPU or torch; `to_torch` then converts it to bfloat16/float16 on the device
(torch rounds to nearest; bfloat16 and float16 keep subnormals). Classes:

    random   standard normal
    zeros    all 0
    ones     all 1
    huge     standard normal x 1e4, clamped to the dtype's finite range (float16 overflows past 65504)
    tiny     standard normal x the dtype's smallest normal: about two thirds of the values are subnormal
    nan      standard normal with a few NaN (one per 4096 elements, at least one per tensor)
    inf      standard normal with a few +inf and -inf (as many as nan's NaN, alternating signs)

Q, K and V of one call are three independent draws; `index` tells apart draws of one class (the timing test's
pools of buffers, the determinism test's different sequences).
The backward's dout (q's shape) is a fourth independent draw of the same class (`dout_torch`, tensor 3). None of this has run on a GPU yet.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("random", "zeros", "ones", "huge", "tiny", "nan", "inf")

# Finite range, smallest normal and smallest subnormal of the kernels' dtypes.
LIMITS = {
    "bfloat16": {"max": float(np.float32(3.3895313892515355e38)), "tiny": 2.0**-126, "subnormal": 2.0**-133},
    "float16": {"max": 65504.0, "tiny": 2.0**-14, "subnormal": 2.0**-24},
}

HUGE_SCALE = 1e4
SPECIALS_EVERY = 4096  # one NaN or inf per this many elements


def class_array(name: str, shape, dtype_name: str, seed: int, index: int = 0, tensor: int = 0) -> np.ndarray:
    """float32 values of class `name` for one tensor (tensor 0, 1, 2 = Q, K, V), deterministic in every argument."""
    if name not in CLASSES:
        raise ValueError(f"unknown input class {name!r}: expected one of {', '.join(CLASSES)}")
    if dtype_name not in LIMITS:
        raise ValueError(f"unknown dtype {dtype_name!r}: expected one of {', '.join(LIMITS)}")
    shape = tuple(int(s) for s in shape)
    if name == "zeros":
        return np.zeros(shape, np.float32)
    if name == "ones":
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([int(seed), CLASSES.index(name), int(index), int(tensor)])
    x = rng.standard_normal(shape, dtype=np.float32)
    limits = LIMITS[dtype_name]
    if name == "huge":
        x = np.clip(x * np.float32(HUGE_SCALE), -limits["max"], limits["max"])
    elif name == "tiny":
        x = x * np.float32(limits["tiny"])
    elif name in ("nan", "inf") and x.size:
        count = max(1, x.size // SPECIALS_EVERY)
        positions = rng.choice(x.size, size=count, replace=False)
        flat = x.reshape(-1)
        if name == "nan":
            flat[positions] = np.nan
        else:
            flat[positions] = np.where(np.arange(count) % 2 == 0, np.inf, -np.inf).astype(np.float32)
    return x


def qkv_arrays(name: str, q_shape, kv_shape, dtype_name: str, seed: int, index: int = 0):
    """(q, k, v) float32 arrays of one class."""
    return (class_array(name, q_shape, dtype_name, seed, index, 0),
            class_array(name, kv_shape, dtype_name, seed, index, 1),
            class_array(name, kv_shape, dtype_name, seed, index, 2))


def to_torch(torch, array: np.ndarray, dtype_name: str, device):
    """A contiguous torch tensor of dtype `dtype_name` on `device` holding `array` (rounded to nearest)."""
    # Converted on the CPU, then copied: the conversion keeps subnormals whatever the device's kernels flush.
    return torch.from_numpy(np.ascontiguousarray(array)).to(getattr(torch, dtype_name)).to(device).contiguous()


def qkv_torch(torch, name: str, q_shape, kv_shape, dtype_name: str, device, seed: int, index: int = 0):
    """(q, k, v) torch tensors of one class on `device`."""
    return tuple(to_torch(torch, a, dtype_name, device)
                 for a in qkv_arrays(name, q_shape, kv_shape, dtype_name, seed, index))


DOUT_TENSOR = 3  # dout's draw: a fourth tensor of the class, independent of Q, K, V (tensors 0, 1, 2)


def dout_torch(torch, name: str, q_shape, dtype_name: str, device, seed: int, index: int = 0):
    """The backward's dout (q's shape) of one class on `device`: the class's values, drawn apart from Q, K, V."""
    return to_torch(torch, class_array(name, q_shape, dtype_name, seed, index, DOUT_TENSOR), dtype_name, device)


# ----------------------------------------------------------------------------------------------------------
# Shared by the GPU checks (counters, timing, determinism)


def gpu_problem() -> str | None:
    """Why the GPU checks cannot run here (no dhp extension, no torch, no CUDA GPU), or None."""
    from .. import _native

    if not _native.available():
        try:
            _native.ext()
        except ImportError as error:
            return str(error)
    try:
        import torch
    except ImportError:
        return "torch is not installed (the dynamic audits drive dhp through PyTorch tensors)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the GPU is sm_{major}{minor}: dhp's kernels need sm_90 (Hopper)"
    return None


def gpu_variants(args) -> tuple[list, list] | None:
    """Compiled (dtypes, head_dims), narrowed by args.dtypes / args.head_dims (comma lists); None, after printing
    "cannot run: <why>" on stderr, where the GPU checks cannot run."""
    import sys

    from .. import _native

    problem = gpu_problem()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return None
    dtypes, head_dims = _native.variants()
    wanted_dtypes, wanted_dims = getattr(args, "dtypes", None), getattr(args, "head_dims", None)
    dtypes = [d for d in dtypes if not wanted_dtypes or d in wanted_dtypes.split(",")]
    head_dims = [d for d in head_dims if not wanted_dims or str(d) in wanted_dims.split(",")]
    if not dtypes or not head_dims:
        print("cannot run: no compiled variant matches --dtypes/--head-dims", file=sys.stderr)
        return None
    return dtypes, head_dims


# The passes of a variant: the forward, and the backward where the build has one for that head_dim.
PASSES = ("fwd", "bwd")
PASS_NAMES = {"fwd": "forward", "bwd": "backward"}


def backward_head_dims() -> list[int]:
    """head_dims that the build has a backward for (build_info's "backward_head_dims"; none if it lacks the key)."""
    import json

    from .. import _native

    return sorted(int(d) for d in json.loads(_native.ext().build_info()).get("backward_head_dims", []))


def plan(dtypes, head_dims, backward_dims, passes=PASSES, causals=(False, True)) -> list[dict]:
    """The cases of a dynamic check, in run order: {"name", "dtype", "head_dim", "pass" ("fwd"|"bwd"), "causal"};
    the backward only for head_dims in backward_dims. Names read "bfloat16 d128 bwd causal"."""
    cases = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for direction in PASSES:
                if direction not in passes or (direction == "bwd" and head_dim not in backward_dims):
                    continue
                for causal in causals:
                    cases.append({"name": f"{dtype} d{head_dim} {direction} {'causal' if causal else 'full'}",
                                  "dtype": dtype, "head_dim": head_dim, "pass": direction, "causal": causal})
    return cases


def selected_passes(choice: str | None) -> tuple[str, ...]:
    """--pass both|fwd|bwd (None: both) as a tuple of passes."""
    return PASSES if choice in (None, "both") else (choice,)


def selected_causals(choice: str | None) -> tuple[bool, ...]:
    """--causal both|true|false (None: both) as a tuple of masks."""
    return {None: (False, True), "both": (False, True), "true": (True,), "false": (False,)}[choice]

