"""The kernels' tile skipping (mpiring/kernels/mask.cuh) against brute force, on the host.

mask.cuh is integer code that compiles both under NVRTC and as plain C++: the harness
(tests/mask_harness.cpp) draws random layouts, windows, tile sizes and packed documents
and checks tile classes, both sweeps and the deterministic dQ order for every tile pair.
A wrong bound there would silently drop work on the GPU; here it fails on any machine
with a C++ compiler (skipped without one).
"""

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("mask") / "mask_harness"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "mpiring" / "kernels"),
                    str(ROOT / "tests" / "mask_harness.cpp"), "-o", str(exe)], check=True)
    return exe


def test_mask_logic_matches_brute_force(harness, seed):
    run = subprocess.run([str(harness), "4000", str(seed % 2**31)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok 4000 cases"), run.stdout


# Mutations of mask.cuh that the harness must catch: a sweep bound one row short, and the
# exact-but-empty sweep end (a918716) that left the deterministic dQ order waiting forever
# on the GPU (zigzag and striped gaps, document spans).
MUTATIONS = [
    ("if (p <= start1) return len0;", "if (p <= start1) return len0 + 1;", "sweep misses"),
    ("return (segs.row_end(hi, n) + tile - 1) / tile;",
     "return segs.row_end(hi, n) <= segs.row_from(lo, n) ? 0 : (segs.row_end(hi, n) + tile - 1) / tile;",
     "skips a query tile the dQ order counts"),
    # the backward's tickets: the last, partial group of rows dropped; key tiles in reverse
    ("const int gh = in_full ? group : rows - full,", "const int gh = group,", "ticket"),
    ("  slot = rem / gh;", "  slot = slots - 1 - rem / gh;", "ticket order"),
    # the decreasing dQ order's j_hi (documents): a key tile that starts at the queries' last
    # position counted as wholly after them
    ("return klo > qhi + right ||", "return klo >= qhi + right ||", "decreasing order"),
    # j_lo stepped down from the next query tile's: one step short
    ("while (j > 0 && !keys_before(", "while (j > 1 && !keys_before(", "stepped down"),
    # j_hi stepped up from the previous query tile's: one step short
    ("while (j < nt && !keys_after(", "while (j + 1 < nt && !keys_after(", "stepped up"),
]


@pytest.mark.parametrize("old,new,message", MUTATIONS,
                         ids=["row-bound", "empty-sweep", "ticket-last-group", "ticket-order", "j-hi", "j-lo-step",
                              "j-hi-step"])
def test_harness_catches_a_wrong_bound(tmp_path, seed, old, new, message):
    """The check can fail: each mutation of the tile logic is caught, with its own message."""
    cxx = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = (ROOT / "mpiring" / "kernels" / "mask.cuh").read_text()
    broken = src.replace(old, new)
    assert broken != src
    (tmp_path / "mask.cuh").write_text(broken)
    exe = tmp_path / "mask_harness"
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", str(tmp_path), str(ROOT / "tests" / "mask_harness.cpp"),
                    "-o", str(exe)], check=True)
    run = subprocess.run([str(exe), "4000", str(seed % 2**31)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and message in run.stdout, run.stdout
