"""Access to the compiled module dhp._C, imported once and guarded.

`import dhp` works where the extension is missing or cannot load (a source checkout, a machine without CUDA
libraries): the error is kept and raised, with what to do about it, by the first call that needs the library.
"""

from __future__ import annotations

import importlib
import json
from types import ModuleType

try:
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as error:  # no compiled module, or its shared libraries do not load
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

# build_info() spells dtypes the way C does; Python callers get NumPy/PyTorch/JAX names.
_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}


def ext() -> ModuleType:
    """The compiled module dhp._C, or ImportError saying why it is unavailable."""
    if _C is None:
        raise ImportError(
            f"dhp's compiled extension dhp._C is not available ({_IMPORT_ERROR}). "
            "Install the dhp wheel (pip install dhp) or build it from the source tree with `pip install .`."
        ) from _IMPORT_ERROR
    return _C


def available() -> bool:
    return _C is not None


def build_info() -> dict:
    """How the C library was built (dhp_build_info in dhp.h): {"version", "cuda", "arch", "dtypes", "head_dims",
    "backward_head_dims", "forward_tiles", "persistent_causal_max_seqlen_k", "causal_section_bytes",
    "backward_two_dq_chains_max_seqlen_k", "backward_two_dq_chains_min_seqlen_k", "backward_paired_key_blocks_head_dims",
    "backward_unpaired_max_seqlen_k", "backward_causal_paired_min_group", "backward_causal_split_walks_over",
    "backward_causal_heavy_first_min_group", "backward_causal_head_halves_min_group"}."""
    return json.loads(ext().build_info())


def variants() -> tuple[list[str], list[int]]:
    """The compiled forward variants as (dtype names such as "bfloat16", head_dims); tests and bench use them."""
    info = build_info()
    dtypes = [_DTYPE_NAMES.get(str(name).lower(), str(name).lower()) for name in info["dtypes"]]
    return dtypes, sorted(int(d) for d in info["head_dims"])
