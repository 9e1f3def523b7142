"""The committed generated sources match their generators (CPU only)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wgmma_ops_is_current():
    spec = importlib.util.spec_from_file_location("gen_wgmma", ROOT / "tools" / "gen_wgmma.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "src" / "hopper" / "wgmma_ops.inc").read_text()
    assert committed == gen.render(), "src/hopper/wgmma_ops.inc is stale: run python tools/gen_wgmma.py"
