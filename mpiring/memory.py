"""How many bytes one rank allocates in a ring call: a model of what the backends allocate.

:func:`memory_estimate` answers "does this fit?" before a call. It walks the phases of
a ring call (allocate, ring step, finish) and adds up the buffers that are alive
together in each phase; the estimate is the largest phase. Every term is named in
:func:`memory_breakdown`, which says what each one is.

What is counted, and what is not:

* **Not counted: the caller's inputs** ``q, k, v`` (and ``dout`` for backward). They exist
  before the call; a user adds them (``(2·H + 2·Hkv)·B·S·D`` input-dtype bytes) if they
  want the total footprint.
* **Counted: everything the library allocates**, outputs included (``out``, ``lse``;
  ``dq, dk, dv``): ring buffers (K/V in flight, dK/dV partials), fp32 accumulators,
  compute-dtype copies, the backend's score-tile temporaries and the mask tiles.
* With ``backward=True`` the estimate is for a training step: the forward call, then the
  backward call while ``out`` and ``lse`` of the forward are held (they are library
  allocations too).
* Not counted: MPI's and NCCL's internal buffers, the CUDA context and cuBLAS's
  workspace (allocated outside CuPy's memory pool; the GPU benchmark reports them
  separately), Python objects (kilobytes).
* ``transport="mpi-staged"`` keeps pinned *host* staging buffers; they are listed by
  :func:`memory_breakdown` under ``host_pinned`` and not added to the device bytes.

Nothing grows with seqlen²: score tiles are at most ``tile × tile`` per (batch, head),
with ``tile`` fixed by the backend's tile budget (:mod:`mpiring.backends.numpy_`).

Symbols used in the docstrings below (per rank): ``Q = B·S·H·D`` (elements of q),
``KV = B·S·Hkv·D`` (of k, or of v), ``R = B·H·S`` (rows), ``e`` the input itemsize,
``c`` the compute itemsize (4; 8 for float64).
"""

from __future__ import annotations

import numpy as np

from mpiring import layout as _layout
from mpiring._xp import SUPPORTED_DTYPES, compute_dtype, dtype_name
from mpiring.backends.numpy_ import _TILE_BUDGET, _tile_size

__all__ = ["memory_estimate", "memory_breakdown"]

_ARRAYS = ("numpy", "cupy")
_INT64 = 8
# Bytes per (q, k) pair of a mask tile: the position differences (int64), their
# negation (int64), the mask and one comparison result (bool) — the largest set alive
# at once in BlockwiseBackend's ``_TilePairs.allowed``.
_MASK_PAIR_BYTES = 8 + 8 + 1 + 1


def memory_estimate(
    batch: int, seqlen_local: int, heads: int, heads_kv: int, head_dim: int, dtype, *,
    layout: str = "contiguous", transport: str = "auto", backward: bool = False, array: str = "numpy",
    causal: bool = False, window=None, cu_seqlens=None, comm_size: int | None = None,
    backend: str = "auto",
) -> int:
    """Peak bytes one rank allocates in :func:`mpiring.ring_attention` (and backward).

    Parameters
    ----------
    batch, seqlen_local, heads, heads_kv, head_dim : the shapes of this rank's shards,
        q ``(batch, seqlen_local, heads, head_dim)``, k/v ``(batch, seqlen_local, heads_kv, head_dim)``.
    dtype : the input dtype (float16, bfloat16, float32, float64).
    layout : ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (sets the tile shapes).
    transport : a transport name or ``"auto"``; only ``"mpi-staged"`` changes anything
        (pinned host buffers, reported by :func:`memory_breakdown`, not added here).
    backward : False: one forward call. True: forward, then backward while the
        forward's ``out``/``lse`` are held (a training step's peak).
    array : ``"numpy"`` (host bytes) or ``"cupy"`` (device bytes).
    causal, window, cu_seqlens : as for the ring call; any of them makes the blockwise
        backend build mask tiles (and ``cu_seqlens`` picks the blockwise backend on CuPy
        while the CUDA kernels have no per-document masks).
    comm_size : number of ranks (None: more than one, with two K/V buffers; a single
        rank keeps one K/V buffer and one dK/dV buffer instead of two and up to four:
        :func:`mpiring.layout.dkv_plan`, 3 on a full ring, fewer where packed documents
        keep blocks home). The CUDA kernels read the caller's k and v in place: other
        ranks' blocks arrive in two buffers, one where a rank receives at most one block
        (two ranks, packed documents), none on one rank.
    backend : ``"auto"`` (the one the ring call would pick), ``"blockwise"`` or ``"cuda"``.

    Returns
    -------
    int, bytes: the caller's q, k, v (dout) not included, outputs included.
    """
    phases = memory_breakdown(
        batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout=layout, transport=transport,
        backward=backward, array=array, causal=causal, window=window, cu_seqlens=cu_seqlens,
        comm_size=comm_size, backend=backend,
    )
    return max(sum(terms.values()) for name, terms in phases.items() if name != "host_pinned")


def memory_breakdown(
    batch: int, seqlen_local: int, heads: int, heads_kv: int, head_dim: int, dtype, *,
    layout: str = "contiguous", transport: str = "auto", backward: bool = False, array: str = "numpy",
    causal: bool = False, window=None, cu_seqlens=None, comm_size: int | None = None,
    backend: str = "auto",
) -> dict[str, dict[str, int]]:
    """The terms of :func:`memory_estimate`, phase by phase: ``{phase: {term: bytes}}``.

    Same parameters. Each phase lists the buffers alive together at its high point; the
    estimate is the largest phase sum. ``"host_pinned"`` (mpi-staged only) is pinned host
    memory, not part of any phase.
    """
    _check(batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout, array, comm_size, backend)
    dtype = np.dtype(dtype)
    masked = bool(causal) or window is not None or cu_seqlens is not None
    size = 2 if comm_size is None else int(comm_size)
    if backend == "auto":
        backend = _auto_backend(array, dtype, head_dim, cu_seqlens is not None, seqlen_local * size)
    mask = _layout.make_mask(causal, window, cu_seqlens)
    # every rank's step schedule (layout.step_schedule), where a buffer count depends on it
    schedules = None
    if size > 1 and (backward or (backend == "cuda" and comm_size is not None)):
        schedules = [_layout.step_schedule(layout, r, size, seqlen_local, seqlen_local, mask, batch=batch)
                     for r in range(size)]
    sizes = _Sizes(batch, seqlen_local, heads, heads_kv, head_dim, dtype, size,
                   _dkv_buffers(schedules, size) if backward else 0)
    if backend == "cuda":
        # The caller's k, v are the own block; blocks of other ranks arrive in 1 or 2 buffers
        # (2 where the size is not given).
        if comm_size is not None:
            sizes.kv_buffers = _kv_receive_buffers(schedules, size)
        phases = _cuda_phases(sizes, backward)
    else:
        phases = _blockwise_phases(sizes, backward, layout, array, masked, mask)
    if size > 1 and _transport_name(transport, array) == "mpi-staged":
        phases["host_pinned"] = _staging(sizes, backward)
    return phases


# --- helpers ------------------------------------------------------------------------------
def _check(batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout, array, comm_size, backend) -> None:
    dims = {"batch": batch, "seqlen_local": seqlen_local, "heads": heads, "heads_kv": heads_kv, "head_dim": head_dim}
    for name, value in dims.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{name}={value!r} must be a non-negative int")
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(f"heads={heads} must be a multiple of heads_kv={heads_kv}")
    try:
        ok = np.dtype(dtype) in SUPPORTED_DTYPES
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"dtype={dtype!r} is not supported; use one of {[dtype_name(d) for d in SUPPORTED_DTYPES]}")
    if layout not in _layout.LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {_layout.LAYOUTS}")
    if layout == "zigzag" and seqlen_local % 2:
        raise ValueError(f"seqlen_local={seqlen_local} must be even for layout='zigzag'")
    if array not in _ARRAYS:
        raise ValueError(f"array={array!r} must be one of {_ARRAYS}")
    if comm_size is not None and (not isinstance(comm_size, (int, np.integer)) or comm_size < 1):
        raise ValueError(f"comm_size={comm_size!r} must be None or an int >= 1")
    if backend not in ("auto", "blockwise", "cuda"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'blockwise' or 'cuda'")
    if backend == "cuda" and array != "cupy":
        raise ValueError("backend='cuda' needs array='cupy'")


def _auto_backend(array: str, dtype, head_dim: int, varlen: bool, seqlen_global: int) -> str:
    """The backend :func:`mpiring.backends.backend_for` would pick (without importing CuPy)."""
    if array != "cupy":
        return "blockwise"
    try:
        from mpiring.backends.cupy_ import kernel_applies
    except ImportError:  # a tree without the CUDA kernel backend
        return "blockwise"
    mask = _layout.make_mask(cu_seqlens=np.array([0, 1]) if varlen else None)
    return "cuda" if kernel_applies(dtype, head_dim, mask, seqlen_global) else "blockwise"


def _transport_name(transport, array: str) -> str:
    if not isinstance(transport, str):
        return getattr(transport, "name", "custom")
    if transport == "auto":
        import os

        transport = os.environ.get("MPIRING_TRANSPORT", "auto")
    return "mpi-host" if array == "numpy" else transport


class _Sizes:
    """Element counts and itemsizes of one rank's problem (see the module docstring)."""

    def __init__(self, batch, seqlen, heads, heads_kv, head_dim, dtype, size, dkv_buffers):
        self.batch, self.seqlen, self.heads, self.heads_kv, self.head_dim = batch, seqlen, heads, heads_kv, head_dim
        self.size = size
        self.e = dtype.itemsize
        self.c = compute_dtype(dtype).itemsize
        self.lse = 8 if dtype == np.float64 else 4  # lse is float32 (float64 for float64 inputs)
        self.converts = self.e != self.c  # the blockwise backend casts inputs to the compute dtype
        self.Q = batch * seqlen * heads * head_dim
        self.KV = batch * seqlen * heads_kv * head_dim
        self.R = batch * heads * seqlen
        self.kv_buffers = 2 if size > 1 else 1  # the block in hand and the one arriving
        self.dkv_buffers = dkv_buffers  # _dkv_buffers


def _kv_receive_buffers(schedules, size: int) -> int:
    """K/V buffers that blocks arrive in with the CUDA kernels (their own block is the
    caller's k, v), on the rank that needs most (layout.kv_receive_buffers), none on one rank."""
    if size == 1:
        return 0
    return max(_layout.kv_receive_buffers(_layout.kv_hops(schedules, r)) for r in range(size))


def _dkv_buffers(schedules, size: int) -> int:
    """dK/dV buffers of the backward on the rank that needs most (layout.dkv_plan): 3 on
    a full ring (computed into, in flight, arriving), 1 where every block stays home."""
    if size == 1:
        return 1
    return max(_layout.dkv_plan(schedules, r).buffers for r in range(size))


def _staging(z: _Sizes, backward: bool) -> dict[str, int]:
    """mpi-staged: one pinned host buffer per send and receive buffer in flight."""
    terms = {"K/V send and receive staging": 2 * 2 * z.KV * z.e}
    if backward:
        terms["dK/dV send and receive staging"] = 2 * 2 * z.KV * 4
    return terms


# --- the blockwise backend (mpiring/backends/numpy_.py), NumPy or CuPy ---------------------
def _tile_rows(length: int, tile: int) -> list[int]:
    """Rows of the backend's tiles over one segment: full tiles, then the remainder."""
    return [min(tile, length - a) for a in range(0, length, tile)]


def _pair_bytes(cur: int, prev: int, pairs: int, masked: bool, backward: bool) -> int:
    """Score-tile temporaries of one tile pair (``cur`` bytes of scores) with the previous
    pair's arrays (``prev``) still bound: the formulas of :func:`_tile_terms`."""
    if backward:
        need = max(3 * cur + 2 * prev, 4 * cur + prev)
        mask = max(cur + 2 * prev + _MASK_PAIR_BYTES * pairs, 2 * cur + 2 * prev + pairs)
    else:
        need = 3 * cur + prev
        mask = max(cur + prev + _MASK_PAIR_BYTES * pairs, 2 * cur + prev + pairs)
    return max(need, mask) if masked else need


def _document_pairs(z: _Sizes, layout: str, tile: int, mask) -> list[list[tuple[int, int, bool]]]:
    """With documents the backend's tiles also end at document boundaries, so tile shapes
    depend on where the documents fall: the (rows_q, rows_k, masked) of every tile pair
    it computes, in its order, one list per (rank, ring step)."""
    from mpiring.backends.numpy_ import _TilePairs

    size = max(z.size, 1)
    steps = []
    for r in range(size):
        q_segs = _layout.segments(layout, r, size, z.seqlen)
        for b in range(size):
            pairs = _TilePairs(np, q_segs, _layout.segments(layout, b, size, z.seqlen), mask, tile, tile)
            steps.append([(qt.hi - qt.lo, kt.hi - kt.lo, kind == "mask")
                          for qt in pairs.q_tiles for kt, kind in pairs.work(qt)])
    return steps


def _tile_terms(z: _Sizes, layout: str, array: str, masked: bool, backward: bool, mask=None) -> dict[str, int]:
    """Score-tile temporaries of one ring step: independent of seqlen once it exceeds a tile.

    For the tile pair in hand (``cur`` bytes of scores ``(B, H, rows_q, rows_k)``) with the
    previous pair's arrays still bound (``prev``; the backend visits pairs q-tile-major):

    * forward: s, s − max, p and the previous p: ``3·cur + prev``; with a mask, s, the
      previous p and the mask temporaries (int64 position differences …): ``cur + prev +
      18 B/pair``, then s, the mask, where(mask, s, −inf): ``2·cur + prev + 1 B/pair``;
    * backward: s, s − lse, p, and the previous p and dS: ``3·cur + 2·prev``; forming dS:
      s, p, dO·Vᵀ, dO·Vᵀ − δ and the previous dS: ``4·cur + prev``; masks as forward.

    Pairs skipped by the mask allocate nothing; counting them keeps this an upper bound.
    With documents (``mask.cu_seqlens``) the pairs the backend computes are walked exactly
    (:func:`_document_pairs`; the largest over the ranks).
    """
    bh = z.batch * z.heads
    tile = _tile_size(_TILE_BUDGET.get(array, _TILE_BUDGET["numpy"]), bh)
    if mask is not None and mask.cu_seqlens is not None:
        scores, tq, tk = 0, 0, 0
        for step in _document_pairs(z, layout, tile, mask):
            prev = 0  # the step's arrays are freed between steps
            for q_rows, k_rows, is_masked in step:
                cur = bh * q_rows * k_rows * z.c
                scores = max(scores, _pair_bytes(cur, prev, q_rows * k_rows, is_masked, backward))
                prev, tq, tk = cur, max(tq, q_rows), max(tk, k_rows)
        return _tile_tail(z, bh, scores, tq, tk, backward)
    segs = _layout.segments(layout, 0, max(z.size, 1), z.seqlen)
    rows = [r for seg in segs for r in _tile_rows(seg.length, tile)]
    if len(rows) > 64:  # long steps: full tiles follow full tiles; the remainders are smaller
        rows = [tile] * 3
    scores, prev = 0, 0
    for q_rows in rows:
        for k_rows in rows:
            cur = bh * q_rows * k_rows * z.c
            scores = max(scores, _pair_bytes(cur, prev, q_rows * k_rows, masked, backward))
            prev = cur
    tq = tk = max(rows, default=0)
    return _tile_tail(z, bh, scores, tq, tk, backward)


def _tile_tail(z: _Sizes, bh: int, scores: int, tq: int, tk: int, backward: bool) -> dict[str, int]:
    acc_tile = bh * tq * z.head_dim * z.c
    kv_tile = z.batch * z.heads_kv * tk * z.head_dim * z.c
    terms = {"score tiles": scores, "row temporaries": 6 * bh * tq * z.c}
    # The online-softmax update: α·acc, p·V and the previous acc tile (forward); the
    # dQ, dK and dV contributions of one tile pair (backward).
    terms["accumulator tiles"] = 2 * kv_tile + acc_tile if backward else 3 * acc_tile
    return terms


def _blockwise_phases(z: _Sizes, backward: bool, layout: str, array: str, masked: bool, mask):
    Q, KV, R, e, c = z.Q, z.KV, z.R, z.e, z.c
    kv = {"K/V ring buffers": z.kv_buffers * 2 * KV * e}
    step_extra = {
        # global positions of the local rows and of the block in hand (and document ids)
        "positions": _INT64 * 2 * z.seqlen * (2 if mask.cu_seqlens is not None else 1),
        "k, v in the compute dtype": 2 * KV * c if z.converts else 0,
    }
    fwd_state = {
        "q (compute dtype, scaled)": Q * c, "acc (fp32 accumulator)": Q * c, "m, l (running max, sum)": 2 * R * c,
    }
    phases = {
        "forward: allocate": {
            "q (compute dtype, scaled)": Q * c, "q cast temporary": Q * c if z.converts else 0,
        },
        "forward: pack K/V": {**fwd_state, "K/V stack temporary": 2 * KV * e, "K/V ring buffer": 2 * KV * e},
        "forward: ring step": {
            **fwd_state, **kv, **step_extra, **_tile_terms(z, layout, array, masked, False, mask),
        },
        "forward: finish": {
            **fwd_state, **kv, "acc / l": Q * c, "head-merge copy": Q * c, "out": Q * e, "l > 0, safe l": R * (1 + c),
        },
    }
    if not backward:
        return phases
    held = {"out, lse (held from forward)": Q * e + R * z.lse}
    bwd_state = {
        "q (compute dtype, scaled)": Q * c, "dout (compute dtype)": Q * c, "dq (accumulator)": Q * c,
        "lse, delta rows": 2 * R * c,
    }
    dkv = {"dK/dV partials (fp32)": z.dkv_buffers * 2 * KV * c}
    phases.update({
        "backward: begin": {
            **held, "q (compute dtype, scaled)": Q * c, "dout (compute dtype)": Q * c,
            "out (compute dtype)": Q * c, "dout·out product": Q * c, "delta": R * c,
        },
        "backward: ring step": {
            **held, **bwd_state, **kv, **dkv, **step_extra, **_tile_terms(z, layout, array, masked, True, mask),
        },
        "backward: finish": {
            **held, **bwd_state, **kv, **dkv,
            # dq·scale, its head-merge copy and the cast dq; later dq, dk and dv's cast and
            # contiguous copy: whichever is larger
            "dq, dk, dv and their temporaries": max(2 * Q * c + Q * e, Q * e + 3 * KV * e),
        },
    })
    return phases


# --- the CUDA kernel backend (mpiring/backends/cupy_.py) ---------------------------------
def _cuda_phases(z: _Sizes, backward: bool):
    """The kernels read q, k, v in place (the own K/V block too) and keep fp32 state; no
    score tiles in memory."""
    Q, KV, R, e = z.Q, z.KV, z.R, z.e
    multi_step = z.size > 1  # a single-step call needs no fp32 state
    kv = {"K/V receive buffers": z.kv_buffers * 2 * KV * e if multi_step else 0}
    phases = {
        "forward": {
            **kv, "out": Q * e, "lse": R * 4,
            "acc (fp32 accumulator)": Q * 4 if multi_step else 0, "m, l": 2 * R * 4 if multi_step else 0,
        }
    }
    if backward:
        phases["backward"] = {
            **kv, "out, lse (held from forward)": Q * e + R * 4, "delta, lse·log2(e)": 2 * R * 4,
            "dq (fp32 accumulator)": Q * 4,
            "dK/dV partials (fp32)": z.dkv_buffers * 2 * KV * 4, "dq, dk, dv": Q * e + 2 * KV * e,
        }
    return phases
