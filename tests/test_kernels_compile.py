"""Every CUDA kernel compiles with NVRTC for sm_80 and sm_90, without a GPU.

CI installs ``.[kernels-check]`` (the NVRTC wheel and cuda-pathfinder to find it);
the kernels include no CUDA header, so NVRTC alone is enough. The options are the
launcher's own (:func:`mpiring.backends.cupy_.compile_options`), so what compiles
here is what CuPy compiles on the GPU.
"""

import ctypes
import re

import numpy as np
import pytest
from ml_dtypes import bfloat16

from mpiring import layout as L
from mpiring.backends import cupy_

pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def nvrtc():
    pathfinder = pytest.importorskip("cuda.pathfinder", reason="pip install '.[kernels-check]'")
    try:
        lib = ctypes.CDLL(pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception as exc:  # noqa: BLE001 - any loader failure means: not installed
        pytest.skip(f"NVRTC not found ({exc}); pip install '.[kernels-check]'")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _compile(lib, name: str, code: str, options: list[str]) -> tuple[int, str]:
    """NVRTC result code and log of one compilation."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None)
    assert rc == 0, lib.nvrtcGetErrorString(rc)
    opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


def test_every_kernel_file_is_built():
    names = set(cupy_.kernel_sources())
    assert set(cupy_.KERNEL_FILES) <= names
    assert {n for n in names if n.endswith(".cu")} == set(cupy_.KERNEL_FILES), "a .cu file no launcher builds"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", sorted(cupy_.TILES))
@pytest.mark.parametrize("kernel_file", cupy_.KERNEL_FILES)
def test_nvrtc_compiles(nvrtc, kernel_file, head_dim, arch):
    if arch == "sm_80" and head_dim not in (64, 128):
        pytest.skip("sm_80 checked at the main head dims (CI time)")
    sources = cupy_.kernel_sources()
    code = cupy_._inline_header(sources[kernel_file], sources)
    options = [*cupy_.compile_options(kernel_file, head_dim), f"--gpu-architecture={arch}"]
    rc, log = _compile(nvrtc, kernel_file, code, options)
    assert rc == 0, f"{kernel_file} head_dim={head_dim} {arch}: {nvrtc.nvrtcGetErrorString(rc)}\n{log}"
    assert "warning" not in log, log


@pytest.mark.parametrize("kernel_file,head_dim", [("attention_fwd.cu", 128), ("attention_fwd.cu", 64),
                                                  ("attention_bwd.cu", 128)])
def test_nvrtc_compiles_wgmma_variants(nvrtc, kernel_file, head_dim):
    """Each kernel's Hopper variant (FWD_WGMMA / BWD_WGMMA, sm_90a), with the launcher's
    options, without warnings and without spills (ptxas -v: a spill in these loops costs
    more than the variant gains)."""
    sources = cupy_.kernel_sources()
    code = cupy_._inline_header(sources[kernel_file], sources)
    assert cupy_.wgmma_applies(kernel_file, head_dim, capability="90")
    options = list(cupy_.compile_options(kernel_file, head_dim, wgmma=True))
    assert "--gpu-architecture=sm_90a" in options
    rc, log = _compile(nvrtc, kernel_file, code, [*options, "--ptxas-options=-v"])
    assert rc == 0, f"{nvrtc.nvrtcGetErrorString(rc)}\n{log}"
    assert "warning" not in log, log
    entries = re.findall(r"Compiling entry function '(attn_\w+)'", log)
    assert len(entries) == 4, log  # bf16, f16, each with and without documents
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(n == "0" for n in spills), log
    assert "Performance Loss" not in log, log  # e.g. wgmma serialised by ptxas


def test_wgmma_applies_only_where_it_can(monkeypatch):
    """Hopper (9.0), head_dim 128 (the forward also 64), no tile override of that kernel;
    MPIRING_WGMMA=0 turns both off, =fwd / =bwd keeps one."""
    monkeypatch.delenv("MPIRING_WGMMA", raising=False)
    for f in cupy_.KERNEL_FILES:
        assert cupy_.wgmma_applies(f, 128, capability="90")
        assert not cupy_.wgmma_applies(f, 128, capability="80")
        assert not cupy_.wgmma_applies(f, 128, capability="100")
        assert not cupy_.wgmma_applies(f, 32, capability="90")
        assert not cupy_.wgmma_applies(f, 96, capability="90")
    assert cupy_.wgmma_applies("attention_fwd.cu", 64, capability="90")
    assert not cupy_.wgmma_applies("attention_bwd.cu", 64, capability="90")
    other = {**cupy_.TILES, 128: {**cupy_.TILES[128], "fwd": (4, 2, 32)}}
    assert not cupy_.wgmma_applies("attention_fwd.cu", 128, other, capability="90")
    assert cupy_.wgmma_applies("attention_bwd.cu", 128, other, capability="90")
    other = {**cupy_.TILES, 128: {**cupy_.TILES[128], "bwd": (4, 64, 64)}}
    assert not cupy_.wgmma_applies("attention_bwd.cu", 128, other, capability="90")
    monkeypatch.setenv("MPIRING_WGMMA", "0")
    assert not any(cupy_.wgmma_applies(f, 128, capability="90") for f in cupy_.KERNEL_FILES)
    monkeypatch.setenv("MPIRING_WGMMA", "fwd")
    assert cupy_.wgmma_applies("attention_fwd.cu", 128, capability="90")
    assert not cupy_.wgmma_applies("attention_bwd.cu", 128, capability="90")
    monkeypatch.setenv("MPIRING_WGMMA", "bwd")
    assert not cupy_.wgmma_applies("attention_fwd.cu", 128, capability="90")
    assert cupy_.wgmma_applies("attention_bwd.cu", 128, capability="90")


def test_wgmma_probe_compiles_for_sm90a(nvrtc):
    """bench/wgmma_probe.py's warpgroup kernels (the groundwork for wgmma attention)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "wgmma_probe.py"
    spec = importlib.util.spec_from_file_location("wgmma_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rc, log = _compile(nvrtc, "wgmma_probe.cu", probe.SOURCE, [f"--gpu-architecture={probe.ARCH}"])
    assert rc == 0, f"{nvrtc.nvrtcGetErrorString(rc)}\n{log}"


def test_nvrtc_reports_errors(nvrtc):
    """The check can fail: a broken kernel does not compile."""
    rc, log = _compile(nvrtc, "broken.cu", 'extern "C" __global__ void f() { undefined_name(); }', [])
    assert rc != 0 and "undefined_name" in log


@pytest.mark.parametrize("dtype,head_dim,mask,seqlen,expected", [
    ("bfloat16", 128, L.make_mask(True, 64), 1 << 20, True),
    ("float16", 64, None, 100, True),
    ("float16", 96, None, 100, True),
    ("float32", 64, None, 100, False),  # full fp32 through cuBLAS, not tf32
    ("bfloat16", 256, None, 100, False),
    ("bfloat16", 80, None, 100, False),
    ("bfloat16", 64, L.make_mask(False, None, [0, 50, 100]), 100, True),  # documents (cu_seqlens)
    ("bfloat16", 64, None, 1 << 29, False),  # positions must fit the kernels' int32 arithmetic
])
def test_kernel_applies(dtype, head_dim, mask, seqlen, expected):
    dtype = bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    assert cupy_.kernel_applies(dtype, head_dim, mask, seqlen) is expected


def _spilled(lib, kernel_file: str, head_dim: int, tiles=None) -> dict[str, int]:
    """Entry points that ptxas (through NVRTC, sm_90) spills to local memory: name → bytes stored."""
    sources = cupy_.kernel_sources()
    code = cupy_._inline_header(sources[kernel_file], sources)
    options = [*cupy_.compile_options(kernel_file, head_dim, tiles), "--gpu-architecture=sm_90", "--ptxas-options=-v"]
    rc, log = _compile(lib, kernel_file, code, options)
    assert rc == 0, log
    props = re.findall(r"Function properties for (\w+)\n.*?(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert sum(name.startswith("attn_") for name, _, _ in props) >= 2, log
    return {name: max(int(st), int(ld)) for name, st, ld in props if int(st) or int(ld)}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel_file", cupy_.KERNEL_FILES)
def test_no_register_spills(nvrtc, kernel_file, head_dim):
    """The fast head dims' kernels stay in registers: a change that makes them spill to
    local memory fails here (CI, no GPU), not only in a GPU bench. Exceptions, within a
    budget: the head-dim-128 document variants keep a few values in local memory with
    NVRTC 13 (backward 48 B: two reloads per query tile in the tile's set-up, none in the
    MMA phases; forward 32 B, none in the tile loop; bench/KERNEL_NOTES.md)."""
    budget = SPILL_BUDGET.get((kernel_file, head_dim), 0)
    assert {name: b for name, b in _spilled(nvrtc, kernel_file, head_dim).items() if b > budget} == {}


SPILL_BUDGET = {("attention_bwd.cu", 128): 64, ("attention_fwd.cu", 128): 64}  # bytes per entry point


def test_spill_check_can_fail(nvrtc):
    """The forward at head dim 128 with four 16-row blocks per warp (a 64-row × 128
    accumulator per warp) spills far past the budget: it is seen."""
    tiles = {128: {**cupy_.TILES[128], "fwd": (4, 4, 32)}}
    assert min(_spilled(nvrtc, "attention_fwd.cu", 128, tiles).values()) > max(SPILL_BUDGET.values())


def test_dq_order_follows_document_length():
    """The backward's deterministic dQ order with documents: increasing where the
    work-weighted document length reaches DQ_INCREASING_DOCUMENTS, decreasing below."""
    from mpiring.backends.cupy_ import DQ_INCREASING_DOCUMENTS, dq_increasing
    from mpiring.layout import make_mask

    t = DQ_INCREASING_DOCUMENTS
    assert dq_increasing(make_mask(True, None, np.array([0, t, 2 * t])))
    assert not dq_increasing(make_mask(True, None, np.array([0, t - 1, 2 * t - 2])))
    # one long document among short ones: its work dominates
    assert dq_increasing(make_mask(True, None, np.concatenate([np.arange(0, 64 * 100, 100), [64 * 100 + 4 * t]])))
    assert not dq_increasing(make_mask(True, None, np.array([0, 0])))
