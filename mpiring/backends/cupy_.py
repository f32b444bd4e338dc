"""CUDA kernel backend: thin launchers over the tensor-core kernels in ``mpiring/kernels``.

The kernels are compiled by CuPy's ``RawModule`` (NVRTC), one module per
(device, kernel file, head dim, tile shape), memoised. Every launch goes to
CuPy's current stream on the arrays' device; :meth:`CudaKernelBackend.record`
returns an event on that stream (the GPU transports wait on it).

Internal layouts (all contiguous; B batch, S tokens, H q heads, Hkv kv heads, D head dim):

* ``q``, ``out``, ``dout``: ``(B, Sq, H, D)`` input dtype, as the caller gives them
* K/V: the rank's own block is the caller's k and v (not copied), blocks of other ranks
  arrive in ``(2, B, Sk, Hkv, D)`` input dtype; travelling dK/dV: ``(2, B, Sk, Hkv, D)`` float32
* forward state: ``acc`` ``(B, Sq, H, D)`` float32; ``m`` (log2 units, scale folded in)
  and ``l`` ``(B, H, Sq)`` float32
* backward: ``dq_acc`` ``(B, Sq, H, D)`` float32 (scale applied), ``delta`` ``(B, H, Sq)``;
  deterministic dQ: ``dq_sem`` int32 ``(1 + B·H·ceil(Sq/BM),)``, zeroed before each step
* packed documents (``cu_seqlens``): int32 document id per local row of Q and of the
  K/V block in hand, computed on the device from the block's segments

When the backend knows how many ring steps will run (``steps``), the first step
starts the softmax from nothing and the last one writes ``out``/``lse`` directly,
so a single-step call (``-n 1``) is one kernel with FlashAttention's memory traffic.

The per-rank device choice (DESIGN.md §4) is :func:`mpiring.transport.gpu.select_device`;
launches follow the current device, which holds the arrays (api.py checks they share one).
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np

from mpiring._xp import bfloat16
from mpiring.backends.numpy_ import narrow_view, record_event
from mpiring.layout import Mask, Segment

__all__ = ["CudaKernelBackend", "TILES", "kernel_applies", "kernel_sources", "compile_options"]

KERNEL_FILES = ("attention_fwd.cu", "attention_bwd.cu")
KERNEL_DTYPES = {np.dtype(np.float16): "f16", np.dtype(bfloat16): "bf16"}

# Tile shape per head dim.
# fwd: (warps, 16-row blocks per warp, keys per tile); rows per block = 16·MI·warps.
#   Two row blocks per warp reuse each K/V fragment twice (half the shared-memory
#   traffic per MMA); BN is what fits in 255 registers with (almost) no spills (ptxas -v).
# bwd: (warps, query rows per tile, keys per block); each warp computes 32×32-or-wider
#   tiles of the three phases (see attention_bwd.cu), which must split evenly.
TILES = {
    32: {"fwd": (4, 2, 64), "bwd": (4, 64, 64)},
    64: {"fwd": (4, 2, 64), "bwd": (8, 128, 128)},
    96: {"fwd": (4, 2, 32), "bwd": (4, 64, 64)},
    128: {"fwd": (4, 2, 64), "bwd": (8, 64, 128)},
}
NO_BOUND = 1 << 30  # kernels' "unbounded" window side; positions must stay below 2**29
# Packed documents whose work-weighted length (Σ L³ / Σ L², the length of the document an
# average query-key pair lies in) reaches this many tokens take the deterministic backward's
# increasing dQ order, as one sequence does; shorter ones the decreasing order (the
# kernel's DQ_DESC_DOCS). The decreasing order starts a document's longest key tiles (its
# first) last, so long documents end a launch on them. Measured (bench/README.md, Long
# context, "Sixteenth session"): 4 H100s, 128k tokens per GPU, 64 documents (26k): the
# ring's forward+backward 56.4 ms decreasing, 48.9 increasing; 32k per GPU, 16 documents
# (18.7k): 12.08 / 11.85 ms. One H100, 131,072 tokens, 8 heads, backward kernels
# (bench/kernel_variants.py): 8 documents (24.3k) 51.0 / 50.3 ms, 16 (18.7k) 31.0 / 32.0,
# 32 (10.3k) 15.95 / 15.97; the fourteenth session's 4 (56k) 100.2 / 85.1 (H200), the
# tenth's 64 in 65k (3.2k) 1.18x for decreasing.
DQ_INCREASING_DOCUMENTS = 16384
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (tests lower it to exercise the z split)
_NEG_INF = float("-inf")


def kernel_applies(dtype, head_dim: int, mask: Mask | None = None, seqlen_global: int = 0) -> bool:
    """True where the CUDA kernels cover the call: float16/bfloat16, head dims 32, 64, 96,
    128 (64 and 128 tuned), fewer than 2**29 tokens (any mask, ``cu_seqlens`` included).
    Elsewhere (float32 — full fp32, not tf32 —, float64, head dim 256) the blockwise
    backend runs on CuPy through cuBLAS: correct, slower."""
    return np.dtype(dtype) in KERNEL_DTYPES and head_dim in TILES and seqlen_global < 2**29


def kernel_sources() -> dict[str, str]:
    """Every ``.cu``/``.cuh`` file of ``mpiring/kernels``, name → text."""
    root = resources.files("mpiring") / "kernels"
    return {p.name: p.read_text() for p in root.iterdir() if p.name.endswith((".cu", ".cuh"))}


def compile_options(kernel_file: str, head_dim: int, tiles: dict | None = None, wgmma: bool = False) -> tuple[str, ...]:
    """NVRTC options (defines) of one kernel file at one head dim; ``wgmma``: the file's
    Hopper variant (:func:`wgmma_applies`), compiled for ``sm_90a``."""
    t = (tiles or TILES)[head_dim]
    opts = [f"-DHEAD_DIM={head_dim}"]
    if kernel_file == "attention_fwd.cu":
        nw, mi, bn = WGMMA_FWD_TILES if wgmma else t["fwd"]
        opts += [f"-DFWD_NW={nw}", f"-DFWD_MI={mi}", f"-DFWD_BN={bn}"]
        if wgmma:
            opts += ["-DFWD_WGMMA=1", f"-DFWD_WG_STAGES={wgmma_stages()}", "--gpu-architecture=sm_90a"]
    else:
        nw, bm, bn = WGMMA_BWD_TILES if wgmma else t["bwd"]
        opts += [f"-DBWD_NW={nw}", f"-DBWD_BM={bm}", f"-DBWD_BN={bn}"]
        if wgmma:
            opts += ["-DBWD_WGMMA=1", "--gpu-architecture=sm_90a"]
    return tuple(opts)


# The wgmma forward's tiles (warps, m64 row blocks per warpgroup, keys): two warpgroups of
# 64 query rows each, 128 keys per tile.
WGMMA_FWD_TILES = (8, 1, 128)
# The wgmma backward's tiles (warps, query rows per tile, keys per block): two warpgroups of
# 64 keys each (the mma.sync backward's d128 shape).
WGMMA_BWD_TILES = (8, 64, 128)


def wgmma_stages() -> int:
    """K/V pipeline stages of the wgmma forward: ``MPIRING_WGMMA_STAGES`` (2 or 3; default 2)."""
    return 3 if os.environ.get("MPIRING_WGMMA_STAGES", "2").strip() == "3" else 2


def wgmma_applies(kernel_file: str, head_dim: int, tiles: dict | None = None, capability: str | None = None) -> bool:
    """The kernel file's Hopper variant (warpgroup MMA, ``wgmma``, ``mpiring/kernels/wgmma.cuh``):
    compute capability 9.0, head_dim 128 (the forward also 64), no tile override of that kernel (its tiles are
    :data:`WGMMA_FWD_TILES` / :data:`WGMMA_BWD_TILES`). ``MPIRING_WGMMA``: ``1`` (default)
    both kernels, ``0`` neither, ``fwd`` / ``bwd`` only that one. ``capability``: e.g.
    ``"90"`` (default: the current device's). Where CuPy's NVRTC can't build it, the
    mma.sync kernel runs instead (with a warning)."""
    key = "fwd" if kernel_file == "attention_fwd.cu" else "bwd"
    if head_dim not in ((64, 128) if key == "fwd" else (128,)):
        return False
    if tiles is not None and tuple(tiles[head_dim][key]) != tuple(TILES[head_dim][key]):
        return False
    if os.environ.get("MPIRING_WGMMA", "1").strip() not in ("1", key):
        return False
    if capability is None:
        import cupy

        capability = cupy.cuda.Device().compute_capability
    return capability == "90"


def _inline_header(source: str, sources: dict[str, str]) -> str:
    # The headers are pasted in (not -I): NVRTC then needs no file system path,
    # and the compile key is the text itself. Each is pasted once (they are #pragma once).
    seen = set()

    def paste(match):
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(paste, sources[name])

    return _INCLUDE.sub(paste, source)


_INCLUDE = re.compile(r'^#include "([^"]+)"$', re.MULTILINE)


@functools.cache
def _module(device_id: int, kernel_file: str, options: tuple[str, ...]):
    import cupy

    sources = kernel_sources()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=_inline_header(sources[kernel_file], sources), options=options)


def _settings(tiles) -> tuple:
    """What a launch's kernel choice depends on besides its arguments: the tile override
    (None: :data:`TILES`) and the environment variables that select kernel variants."""
    frozen = None if tiles is None else tuple(sorted((h, tuple(sorted(t.items()))) for h, t in tiles.items()))
    return frozen, os.environ.get("MPIRING_WGMMA"), os.environ.get("MPIRING_WGMMA_STAGES")


# Launch-time lookups kept per key (a few per process): the host's work per launch was a
# dozen dictionary lookups, option strings and two driver queries (bench/host_probe.py).
_CHOSEN: dict = {}


def _use_wgmma(device_id: int, kernel_file: str, head_dim: int, tiles=None) -> bool:
    """:func:`wgmma_applies` on this device, and the wgmma variant compiles there."""
    key = ("wgmma", device_id, kernel_file, head_dim, _settings(tiles))
    if key not in _CHOSEN:
        _CHOSEN[key] = _wgmma_usable(device_id, kernel_file, head_dim, tiles)
    return _CHOSEN[key]


def _wgmma_usable(device_id: int, kernel_file: str, head_dim: int, tiles) -> bool:
    import cupy

    if not wgmma_applies(kernel_file, head_dim, tiles, cupy.cuda.Device(device_id).compute_capability):
        return False
    return _wgmma_compiles(device_id, kernel_file, compile_options(kernel_file, head_dim, wgmma=True))


@functools.cache
def _wgmma_compiles(device_id: int, kernel_file: str, options: tuple[str, ...]) -> bool:
    try:
        _module(device_id, kernel_file, options)
        return True
    except Exception as exc:  # noqa: BLE001 - e.g. an NVRTC without sm_90a: fall back, say so
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        what = "forward" if kernel_file == "attention_fwd.cu" else "backward"
        warnings.warn(f"mpiring: the wgmma {what} did not compile ({type(exc).__name__}: {first}); "
                      f"using the mma.sync {what}", RuntimeWarning, stacklevel=2)
        return False


def _kernel(device_id: int, kernel_file: str, name: str, head_dim: int, smem: int, tiles=None, extra=()):
    key = ("kernel", device_id, kernel_file, name, head_dim, smem, tuple(extra), _settings(tiles))
    if key not in _CHOSEN:
        _CHOSEN[key] = _make_kernel(device_id, kernel_file, name, head_dim, smem, tiles, extra)
    return _CHOSEN[key]


def _make_kernel(device_id: int, kernel_file: str, name: str, head_dim: int, smem: int, tiles, extra):
    wg = _use_wgmma(device_id, kernel_file, head_dim, tiles)
    mod = _module(device_id, kernel_file, compile_options(kernel_file, head_dim, tiles, wgmma=wg) + tuple(extra))
    fn = mod.get_function(name)
    if smem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def dq_increasing(mask: Mask) -> bool:
    """Whether the deterministic backward adds dQ in increasing key-tile order with the
    documents of ``mask`` (:data:`DQ_INCREASING_DOCUMENTS`); a function of ``cu_seqlens``
    only, so the same on every rank and run."""
    length = _weighted_length(mask.cu_bytes)
    return length is not None and length >= DQ_INCREASING_DOCUMENTS


@functools.lru_cache(maxsize=16)
def _weighted_length(cu_int64: bytes) -> float | None:
    """Σ L³ / Σ L² of the documents (``cu_seqlens`` as int64 bytes), once per content (the
    backward asks at every launch); None where they hold no pairs."""
    lengths = np.diff(np.frombuffer(cu_int64, dtype=np.int64).astype(np.float64))
    pairs = float((lengths**2).sum())
    return float((lengths**3).sum()) / pairs if pairs > 0 else None


def _segs(segs: tuple[Segment, ...], length: int):
    """Kernel arguments (start0, stride0, len0, start1, stride1) of one or two segments,
    whose positions must increase along the rows (the kernels' tile skipping relies on it)."""
    if not _increasing(segs):
        raise ValueError("the CUDA kernels need positions that increase along each block")
    s0 = segs[0]
    if len(segs) == 1:
        return (s0.start, s0.stride, length, 0, 0)
    if len(segs) != 2:
        raise ValueError(f"the CUDA kernels take at most 2 segments, got {len(segs)}")
    return (s0.start, s0.stride, s0.length, segs[1].start, segs[1].stride)


def _increasing(segs: tuple[Segment, ...]) -> bool:
    """Positions increase with the local row (every layout's segments do): what the
    kernels' tile skipping and the deterministic dQ order rely on."""
    return all(s.stride > 0 for s in segs) and all(a.last < b.start for a, b in zip(segs, segs[1:]))


@functools.lru_cache(maxsize=16)
def _device_cu(device_id: int, cu_int64: bytes):
    """``cu_seqlens`` (given as int64 bytes) as an int32 array on device ``device_id``, made
    once per content and kept (a few bytes per document, 16 packings at most). A copy from
    pageable host memory waits for all the work queued on the stream before it, so calls
    back to back would each wait for the previous one's kernels (and expose their host
    work). Synchronised once when made, so any stream may read it after."""
    import cupy

    with cupy.cuda.Device(device_id):
        cu = cupy.asarray(np.frombuffer(cu_int64, dtype=np.int64).astype(np.int32))
        cupy.cuda.get_current_stream().synchronize()
    return cu


def _mask_args(mask: Mask, cu=None):
    # A window wider than any distance is no bound (and must fit the kernels' int32).
    left = NO_BOUND if mask.left is None else min(mask.left, NO_BOUND)
    right = NO_BOUND if mask.right_bound is None else min(mask.right_bound, NO_BOUND)
    if cu is None:
        return np.int32(left), np.int32(right), np.uint64(0), np.int32(0)
    return np.int32(left), np.int32(right), cu, np.int32(cu.size)


def _grid(rows: int, tiles: int) -> tuple[int, int, int]:
    """(rows, y, z) with y·z ≥ tiles and y within CUDA's limit: the kernels read their
    tile as z·gridDim.y + y and skip the few past ``tiles``."""
    y = min(tiles, MAX_GRID_Y)
    return (rows, y, -(-tiles // y))


def _entry(kernel: str, dtype, cu) -> str:
    """Kernel entry point: per dtype, and ``_doc`` where document ids are passed."""
    return f"{kernel}_{KERNEL_DTYPES[dtype]}" + ("" if cu is None else "_doc")


def _i32(*xs):
    return tuple(np.int32(x) for x in xs)


def _positive_scale(xp, q, scale: float):
    """``(q', scale', sign)``: the same scores ``q'·k·scale' = q·k·scale`` with scale' > 0,
    and ``sign`` such that dQ = sign · (the dQ computed with q', scale'). The forward kernel
    takes each row's maximum of the unscaled scores and scales it, which is the maximum of
    the scaled scores only for a positive scale. Negative: −q (the sign bit flipped, for
    float16 and bfloat16 alike); zero: every score is 0, as with zero queries and scale 1
    (and dQ = 0)."""
    q = xp.ascontiguousarray(q)
    if scale > 0:
        return q, scale, 1
    bits = q.view(np.uint16)
    if scale < 0:
        return (bits ^ np.uint16(0x8000)).view(q.dtype), -scale, -1
    return xp.zeros_like(bits).view(q.dtype), 1.0, 0


@dataclass
class FwdState:
    q: object  # (B, Sq, H, D) input dtype, contiguous
    heads_kv: int
    scale: float
    acc: object  # (B, Sq, H, D) float32, or None for a single-step call
    m: object  # (B, H, Sq) float32
    l: object
    out: object  # (B, Sq, H, D) input dtype
    lse: object  # (B, H, Sq) float32
    steps_done: int = 0
    finished: bool = False


@dataclass
class BwdState:
    q: object
    dout: object
    lse2: object  # (B, H, Sq) float32: lse·log2(e), +1e30 where lse = −inf
    delta: object  # (B, H, Sq) float32
    dq: object  # (B, Sq, H, D) float32, scale applied
    heads_kv: int
    scale: float
    dq_sign: int = 1  # dQ = dq_sign · dq (a non-positive softmax scale: see _positive_scale)
    dq_sem: object = None  # deterministic dQ: per (B, H, query tile) counters, after one ticket


class CudaKernelBackend:
    """Tensor-core forward/backward kernels for float16/bfloat16 CuPy arrays.

    Parameters
    ----------
    steps : number of ``fwd_step`` calls this ring call will make (None: unknown; the
        state is then finalised by :meth:`fwd_end`).
    tiles : override of :data:`TILES` (benchmarks of other tile shapes).
    deterministic : the backward adds the dQ contributions of the key tiles in a fixed
        order (bitwise reproducible); False: atomic adds in whatever order they land.
    """

    name = "cuda"
    seq_axis = 2  # of the travelling K/V and dK/dV buffers
    owns_packed_kv = False  # pack_kv returns the caller's k, v (never received into)

    def __init__(self, steps: int | None = None, tiles: dict | None = None, deterministic: bool = True):
        import cupy

        self.xp = cupy
        self.steps = steps
        self.tiles = tiles
        self.deterministic = deterministic

    def _cu(self, mask: Mask):
        """``cu_seqlens`` as a device int32 array where the mask has documents, else None
        (the kernels find each row's document from its position by binary search)."""
        if mask.cu_seqlens is None:
            return None
        return _device_cu(self.xp.cuda.Device().id, mask.cu_bytes)

    def _tiles(self, head_dim: int):
        return (self.tiles or TILES)[head_dim]

    def _launch(self, kernel_file, name, head_dim, smem, grid, block, args, like, extra=()):
        """Launch on the device of ``like`` (current stream there), compiling on first use
        (``extra``: more NVRTC options, a variant of the file)."""
        with like.device:
            fn = _kernel(like.device.id, kernel_file, name, head_dim, smem, self.tiles, extra)
            fn(grid, block, args, shared_mem=smem)

    # --- buffers ------------------------------------------------------------------------
    def pack_kv(self, k, v):
        """The rank's own K/V block: the pair ``(k, v)`` itself, not copied where contiguous
        (the kernels take K and V as two pointers, ``kv[0]``, ``kv[1]``; the ring sends them
        from there). Blocks from other ranks arrive in :meth:`kv_buffer`."""
        xp = self.xp
        return xp.ascontiguousarray(k), xp.ascontiguousarray(v)

    def kv_buffer(self, kv, zero: bool = False):
        """A buffer ``(2, B, Sk, Hkv, D)`` that K/V blocks like ``kv`` arrive in (zeroed: ``zero``)."""
        make = self.xp.zeros if zero else self.xp.empty
        return make((2,) + tuple(kv[0].shape), dtype=kv[0].dtype)

    def record(self):
        """An event recorded on the current stream after the work queued so far."""
        return record_event(self.xp)

    def empty_dkv(self, kv):
        """dK/dV partials like :meth:`zeros_dkv`, uninitialised (the ring clears what it uses)."""
        return self.xp.empty((2,) + tuple(kv[0].shape), dtype=np.float32)

    def zeros_dkv(self, kv):
        """dK/dV partials ``(2, B, Sk, Hkv, D)`` float32, zero (``kv``: as from :meth:`pack_kv`)."""
        return self.xp.zeros((2,) + tuple(kv[0].shape), dtype=np.float32)

    def dkv_out(self, dkv, dtype):
        """An uninitialised array like the partials ``dkv`` in the output ``dtype`` (where a
        block's finished dK/dV comes home narrowed; :meth:`bwd_end` takes it as is)."""
        return self.xp.empty(dkv.shape, dtype=dtype)

    def narrow_dkv(self, dkv, scratch, dtype, rows=None):
        """The partials ``dkv`` in ``dtype`` as :meth:`bwd_end` would cast them (the cast
        kernel), written into the memory of ``scratch`` (a free partial buffer; None: a new
        array). All rows are cast (``rows``, those sent, is not needed: the others are never
        read, and casting them is harmless)."""
        out = self.dkv_out(dkv, dtype) if scratch is None else narrow_view(scratch, dkv.shape, dtype)
        return self._cast_out(dkv, dtype, out=out)

    # --- forward ------------------------------------------------------------------------
    def fwd_begin(self, q, heads_kv: int, scale: float) -> FwdState:
        xp = self.xp
        b, s, h, d = q.shape
        single = self.steps == 1
        q, scale, _ = _positive_scale(xp, q, scale)
        return FwdState(
            q=q, heads_kv=heads_kv, scale=scale,
            acc=None if single else xp.empty((b, s, h, d), np.float32),
            m=None if single else xp.empty((b, h, s), np.float32),
            l=None if single else xp.empty((b, h, s), np.float32),
            out=xp.empty(q.shape, q.dtype), lse=xp.empty((b, h, s), np.float32),
        )

    def fwd_step(self, st: FwdState, kv, q_segs, k_segs, mask: Mask) -> None:
        """Continue the online softmax of the local Q against one K/V block (in place)."""
        if st.finished:
            raise RuntimeError("fwd_step after the step announced as last (steps hint was wrong)")
        st.steps_done += 1
        first = st.steps_done == 1
        last = self.steps is not None and st.steps_done == self.steps
        b, sq, h, d = st.q.shape
        sk = kv[0].shape[1]
        if b * h * sq * sk == 0:
            return
        wg = _use_wgmma(st.q.device.id, "attention_fwd.cu", d, self.tiles)
        nw, mi, bn = WGMMA_FWD_TILES if wg else self._tiles(d)["fwd"]
        bm = 16 * mi * nw
        null = np.uint64(0)
        acc, m, l = (null, null, null) if st.acc is None else (st.acc, st.m, st.l)
        cu = self._cu(mask)
        # Q; K, V in 2 stages (3 with wgmma; rows padded by 8 for ldmatrix, wgmma's are not);
        # each query row's allowed key positions (int2).
        ld, stages = (d, wgmma_stages()) if wg else (d + 8, 2)
        smem = (bm + 2 * stages * bn) * ld * 2 + 8 * bm
        args = (
            (st.q, kv[0], kv[1], acc, m, l, st.out, st.lse) + _i32(b, h, st.heads_kv, sq, sk)
            + (np.float32(st.scale * math.log2(math.e)),) + _i32(*_segs(q_segs, sq), *_segs(k_segs, sk))
            + _mask_args(mask, cu) + _i32(first, last)
        )
        self._launch("attention_fwd.cu", _entry("attn_fwd", st.q.dtype, cu), d, smem, _grid(b * h, -(-sq // bm)),
                     (32 * nw,), args, st.q)
        st.finished = last

    def fwd_end(self, st: FwdState):
        """``out`` (B, Sq, H, D) in the input dtype; ``lse`` (B, H, Sq) float32, natural log,
        −inf and out = 0 on rows with no allowed key."""
        xp = self.xp
        if st.finished:
            return st.out, st.lse
        if st.steps_done == 0:
            st.out.fill(0)
            st.lse.fill(_NEG_INF)
            return st.out, st.lse
        has_keys = st.l > 0
        safe_l = xp.where(has_keys, st.l, 1)
        norm = (1 / safe_l).transpose(0, 2, 1)[..., None]
        st.out[...] = (st.acc * norm).astype(st.out.dtype)
        st.lse[...] = xp.where(has_keys, (st.m + xp.log2(safe_l)) * math.log(2), _NEG_INF)
        return st.out, st.lse

    # --- backward -----------------------------------------------------------------------
    def bwd_begin(self, dout, q, out, lse, heads_kv: int, scale: float) -> BwdState:
        xp = self.xp
        b, s, h, d = q.shape
        dout, out = xp.ascontiguousarray(dout), xp.ascontiguousarray(out)
        delta = xp.empty((b, h, s), np.float32)
        rows, per_block = b * s * h, 4
        if rows:
            self._launch("attention_bwd.cu", f"bwd_delta_{KERNEL_DTYPES[q.dtype]}", d, 0, (-(-rows // per_block),),
                         (32 * per_block,), (dout, out, delta) + _i32(b, h, s), q)
        # The kernel's row constant: lse in log2 units, +1e30 on rows with no key (so p = 0 there).
        # (xp.where makes a new contiguous float32 array.)
        log2_lse = lse.astype(np.float32, copy=False) * np.float32(math.log2(math.e))
        lse2 = xp.where(lse == _NEG_INF, np.float32(1e30), log2_lse)
        q, scale, sign = _positive_scale(xp, q, scale)
        return BwdState(
            q=q, dout=dout, lse2=lse2, delta=delta,
            dq=xp.zeros((b, s, h, d), np.float32), heads_kv=heads_kv, scale=scale, dq_sign=sign,
        )

    def bwd_step(self, st: BwdState, kv, dkv, q_segs, k_segs, mask: Mask, fresh: bool = False,
                 heads: tuple[int, int] | None = None) -> None:
        """Add this block's dQ into the local accumulator and its dK/dV into ``dkv``;
        ``fresh``: ``dkv`` holds nothing yet (not read; every element written, so the caller
        need not zero it). ``heads``: only KV heads [lo, hi) and their query heads (None:
        all); each head's results are bitwise those of the whole step."""
        b, sq, h, d = st.q.shape
        sk = kv[0].shape[1]
        lo, hi = (0, st.heads_kv) if heads is None else heads
        if b * (hi - lo) * sq * sk == 0:
            if fresh:
                dkv[:, :, :, lo:hi].fill(0)
            return
        wg = _use_wgmma(st.q.device.id, "attention_bwd.cu", d, self.tiles)
        nw, bm, bn = WGMMA_BWD_TILES if wg else self._tiles(d)["bwd"]
        cu = self._cu(mask)
        # K, V; Q, dO double-buffered (mma.sync: rows padded by 8 for ldmatrix); mma.sync: P
        # and dS, wgmma: dSᵀ and 1 KB to align the swizzled tiles; lse and delta
        # double-buffered; each key's allowed query positions (int2).
        ld, scores = (d, bm * bn * 2 + 1024) if wg else (d + 8, 2 * bm * (bn + 8) * 2)
        smem = (2 * bn + 4 * bm) * ld * 2 + scores + 4 * bm * 4 + 8 * bn
        sem = np.uint64(0)
        if self.deterministic:
            if st.dq_sem is None:
                st.dq_sem = self.xp.empty(1 + b * h * -(-sq // bm), np.int32)
            st.dq_sem.fill(0)
            sem = st.dq_sem
        args = (
            (st.q, kv[0], kv[1], st.dout, st.lse2, st.delta, st.dq, dkv, sem) + _i32(b, h, st.heads_kv, sq, sk)
            + (np.float32(st.scale * math.log2(math.e)), np.float32(st.scale))
            + _i32(*_segs(q_segs, sq), *_segs(k_segs, sk)) + _mask_args(mask, cu) + _i32(fresh, lo)
        )
        self._launch("attention_bwd.cu", _entry("attn_bwd", st.q.dtype, cu), d, smem,
                     _grid(b * (hi - lo), -(-sk // bn)), (32 * nw,), args, st.q,
                     ("-DDQ_DESC_DOCS=0",) if cu is not None and dq_increasing(mask) else ())

    def bwd_end(self, st: BwdState, dkv, kv_dtype):
        """``dq`` (B, Sq, H, D) and ``dk``, ``dv`` (B, Sk, Hkv, D), all in the input dtype."""
        dq = self._cast_out(st.dq, st.q.dtype, st.dq_sign)
        # one launch for both halves; already cast where the finished sum came home narrowed
        dk_dv = dkv if dkv.dtype == np.dtype(kv_dtype) else self._cast_out(dkv, kv_dtype)
        return dq, dk_dv[0], dk_dv[1]

    def _cast_out(self, x, dtype, mul=1, out=None):
        """``x`` (float32, contiguous) · ``mul`` in ``dtype`` (float16/bfloat16), by the
        backward file's cast kernel (CuPy's astype to bfloat16 is several times slower);
        into ``out`` (contiguous, x's shape) where given."""
        xp = self.xp
        dtype = np.dtype(dtype)
        if dtype not in KERNEL_DTYPES or x.size % 4 or not x.flags.c_contiguous:
            y = (x * mul if mul != 1 else x).astype(dtype)
            if out is None:
                return y
            out[...] = y
            return out
        out = xp.empty(x.shape, dtype) if out is None else out
        n4 = x.size // 4
        if n4:
            threads = 256
            self._launch("attention_bwd.cu", f"cast_out_{KERNEL_DTYPES[dtype]}", x.shape[-1], 0,
                         (min(-(-n4 // threads), 8192),), (threads,), (x, out, np.int64(n4), np.float32(mul)), x)
        return out
