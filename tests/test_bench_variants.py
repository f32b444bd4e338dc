"""bench/kernel_variants.py's source variants still apply to today's kernels: each replaces
text that ``mpiring/kernels`` holds (the script stops at the first variant whose text is
gone, so one stale variant broke its default run; no GPU needed to check)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial
ROOT = Path(__file__).resolve().parent.parent


def _variants() -> dict:
    spec = importlib.util.spec_from_file_location("kernel_variants", ROOT / "bench" / "kernel_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


def stale(variants: dict) -> list[str]:
    """The variants with a replacement whose text the kernel file lacks, or that changes nothing."""
    found = []
    for name, edits in variants.items():
        for file, old, new in edits:
            if old not in (ROOT / "mpiring" / "kernels" / file).read_text() or new == old:
                found.append(name)
                break
    return found


def test_every_variant_applies():
    assert stale(_variants()) == []


def test_the_check_can_fail():
    gone = "      cp_async4((r < BM ? sL : sD) + st * BM + rr, (r < BM ? lse2 : delta) + srow, i < Sq);"
    assert stale({"ok": [("attention_bwd.cu", "#define CU_SMEM 1024\n", "#define CU_SMEM 0\n")],
                  "gone": [("attention_bwd.cu", gone, "")],
                  "same": [("attention_fwd.cu", "#", "#")]}) == ["gone", "same"]
