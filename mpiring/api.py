"""Public entry points: collective validation, backend and transport choice, the ring loops.

The ring (DESIGN.md §3): each rank keeps its Q; the K/V block in hand at step s
came from rank ``(rank − s) mod N``. Each step posts the exchange of the next
block (send to rank+1, receive from rank−1) *before* computing on the current
one, and waits for it after, so communication overlaps compute. Steps whose
block is fully masked are skipped, and a block travels only as far as some rank
attends to it: the ranks gather each other's step schedules in the validation's
allgather and derive the same send/receive plan (layout.kv_hops).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpiring import interop as _interop
from mpiring import layout as _layout
from mpiring._xp import SUPPORTED_DTYPES, array_module, dtype_name, is_cupy
from mpiring.backends import backend_for
from mpiring.transport import Transport, check_transport_name, select_transport

__all__ = ["ring_attention", "ring_attention_backward", "private_comm"]

_TAG_KV, _TAG_DKV = 71, 72
_KEYVAL = MPI.KEYVAL_INVALID
_FORWARD = object()  # _prepare's lse for a forward call (backward's lse=None must be caught)
# Flops of a ring step per byte of the exchange it overlaps, from which the exchange may
# take a transport's lean path (``Transport.post(background=True)``; nccl: 4 channels,
# ~50 GB/s on H100): attention kernels at ~400 TF/s then hide it 1.5 times over.
BACKGROUND_FLOPS_PER_BYTE = 12_000


def private_comm(comm):
    """A duplicate of ``comm`` cached on it, so that ring messages never match the caller's.

    Created collectively on first use (``MPI_Comm_dup``) and freed with ``comm``.
    """
    global _KEYVAL
    if _KEYVAL == MPI.KEYVAL_INVALID:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=lambda c, k, dup: None if MPI.Is_finalized() else dup.Free())
    dup = comm.Get_attr(_KEYVAL)
    if dup is None:
        dup = comm.Dup()
        comm.Set_attr(_KEYVAL, dup)
    return dup


def _resolve_comm(comm, fn: str):
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"{fn}: comm must be an mpi4py communicator, got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError(f"{fn}: comm is MPI.COMM_NULL")
    if comm.Is_inter():
        raise TypeError(f"{fn}: comm must be an intracommunicator, got an intercommunicator")
    return comm


# --- collective validation --------------------------------------------------------------
class _LocalError(Exception):
    """A check that failed on this rank; re-raised on every rank as ``kind``."""

    def __init__(self, kind: type, message: str):
        super().__init__(message)
        self.kind = kind


_ERROR_KINDS = {k.__name__: k for k in (ValueError, TypeError, MemoryError)}


def _agree(comm, fn: str, error: _LocalError | None, signature: dict, extra=None) -> list:
    """One allgather: every rank raises the same exception if any rank failed a local
    check, or if the ranks disagree on shapes, dtypes or options. Returns every rank's
    ``extra`` (rank order): per-rank facts that ride along, not compared."""
    local = None if error is None else (error.kind.__name__, str(error))
    gathered = comm.allgather((local, signature, extra))
    for rank, (err, _, _) in enumerate(gathered):
        if err is not None:
            raise _ERROR_KINDS[err[0]](f"{fn}: {err[1]} (on rank {rank})")
    first = gathered[0][1]
    for rank, (_, sig, _) in enumerate(gathered[1:], start=1):
        for key, value in first.items():
            if sig[key] != value:
                kind = TypeError if key in ("array", "dtype") else ValueError
                raise kind(f"{fn}: {key} differs across ranks: {value!r} on rank 0, {sig[key]!r} on rank {rank}")
    return [x for _, _, x in gathered]


def refuse_everywhere(comm, fn: str, kind: type, message: str, timeout=None) -> None:
    """Raise ``kind(message)`` on every rank of ``comm`` from a rank that cannot even call
    the ring (a front end such as :mod:`mpiring.torch` refusing its input): it joins the
    validation the other ranks are in, so that they raise the same error instead of waiting.
    The other ranks must be calling :func:`ring_attention` or :func:`ring_attention_backward`."""
    pcomm = private_comm(_resolve_comm(comm, fn))
    _arrive(pcomm, fn, timeout)
    _agree(pcomm, fn, _LocalError(kind, message), {})
    raise AssertionError("unreachable: _agree raises on every rank")  # pragma: no cover


def _array_kind(x) -> str | None:
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_cupy(x):
        return "cupy"
    return None


def _check_arrays(named: dict) -> None:
    """Local checks of q, k, v (and dout, out for backward)."""
    for name, x in named.items():
        if _array_kind(x) is None:
            raise _LocalError(
                TypeError, f"{name} must be a NumPy, CuPy or DLPack (torch, JAX) array, got {type(x).__name__}"
            )
        if x.ndim != 4:
            raise _LocalError(ValueError, f"{name}.ndim={x.ndim} must be 4 (batch, seqlen, heads, head_dim)")
    q, k, v = named["q"], named["k"], named["v"]
    kinds = {name: _array_kind(x) for name, x in named.items()}
    if len(set(kinds.values())) > 1:
        raise _LocalError(TypeError, f"arrays must all be NumPy or all CuPy, got {kinds}")
    devices = {name: x.device.id for name, x in named.items() if is_cupy(x)}
    if len(set(devices.values())) > 1:
        raise _LocalError(ValueError, f"arrays must all be on one GPU, got devices {devices}")
    if devices:
        # The ring's buffers, streams and transport live on the current device.
        import cupy

        on, current = next(iter(devices.values())), cupy.cuda.Device().id
        if on != current:
            raise _LocalError(
                ValueError,
                f"arrays are on GPU {on} but the current CuPy device is GPU {current}: make GPU {on} current "
                f"(cupy.cuda.Device({on}).use()) or allocate on GPU {current} "
                "(mpiring.transport.gpu.select_device() picks one GPU per rank)",
            )
    for name, x in named.items():
        if np.dtype(x.dtype) not in SUPPORTED_DTYPES:
            names = [dtype_name(d) for d in SUPPORTED_DTYPES]
            raise _LocalError(TypeError, f"{name}.dtype={dtype_name(x.dtype)} is not supported; use one of {names}")
        if x.dtype != q.dtype:
            raise _LocalError(
                TypeError, f"{name}.dtype={dtype_name(x.dtype)} differs from q.dtype={dtype_name(q.dtype)}"
            )
    if k.shape != v.shape:
        raise _LocalError(ValueError, f"k.shape={k.shape} differs from v.shape={v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise _LocalError(ValueError, f"q.shape={q.shape} and k.shape={k.shape} differ in batch or head_dim")
    heads, heads_kv = q.shape[2], k.shape[2]
    if q.shape[3] == 0 or heads == 0:  # 1/sqrt(head_dim) and the GQA group need both >= 1
        raise _LocalError(ValueError, f"q.shape={q.shape}: heads and head_dim must be >= 1")
    if heads_kv == 0 or heads % heads_kv:
        raise _LocalError(ValueError, f"heads={heads} (q) must be a multiple of heads_kv={heads_kv} (k, v)")
    for name in ("dout", "out"):
        if name in named and named[name].shape != q.shape:
            raise _LocalError(ValueError, f"{name}.shape={named[name].shape} differs from q.shape={q.shape}")


@dataclass
class _Call:
    """Everything a ring loop needs, agreed on every rank."""

    comm: object
    backend: object
    transport: Transport | None
    mask: _layout.Mask
    scale: float
    heads_kv: int
    q_segs: tuple
    k_segs: list  # k_segs[r]: segments of rank r's K/V block
    active: tuple  # active[s]: step s has work
    kv_hops: tuple = ()  # kv_hops[s]: (send, receive) K/V at exchange s (layout.kv_hops)
    timeout: float | None = None  # seconds per ring wait; None waits forever
    layout: str = "contiguous"
    dkv_plan: _layout.DkvPlan | None = None  # backward only (layout.dkv_plan)
    kv_rows: tuple = ()  # kv_rows[s]: rows (lo, hi) of the blocks sent, received (layout.kv_rows); () all
    background: bool = False  # exchanges hidden by ample compute (_background); the same on every rank


def _prepare(fn, comm, arrays: dict, *, causal, softmax_scale, layout, window, cu_seqlens, transport, timeout=None,
             lse=_FORWARD, problem=None, deterministic=True):
    comm = _resolve_comm(comm, fn)
    pcomm = private_comm(comm)
    _arrive(pcomm, fn, timeout)
    size, rank = pcomm.Get_size(), pcomm.Get_rank()
    error, mask, mask_key, scale, active, needs = None, None, None, None, None, None
    q, k = arrays["q"], arrays["k"]
    try:
        if problem is not None:  # an array that could not be imported (mpiring.interop)
            raise _LocalError(TypeError, problem)
        _check_arrays(arrays)
        if layout not in _layout.LAYOUTS:
            raise _LocalError(ValueError, f"layout={layout!r} must be one of {_layout.LAYOUTS}")
        if layout == "zigzag" and (q.shape[1] % 2 or k.shape[1] % 2):
            raise _LocalError(
                ValueError,
                f"seqlen_local={q.shape[1]} must be even for layout='zigzag' "
                f"(global seqlen divisible by 2*size={2 * size})",
            )
        scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else softmax_scale
        if not isinstance(scale, (int, float, np.floating, np.integer)) or not math.isfinite(scale):
            raise _LocalError(ValueError, f"softmax_scale={softmax_scale!r} must be a finite number")
        scale = float(scale)
        mask = _make_mask(causal, window, cu_seqlens, q.shape[1] * size)
        mask_key = _mask_key(mask)  # (causal, left, right, cu_seqlens bytes): the signature's and the plan's
        if q.shape[1] != k.shape[1] and not mask.is_full:
            raise _LocalError(
                ValueError,
                f"seqlen_q={q.shape[1]} and seqlen_k={k.shape[1]} must be equal with causal, window or cu_seqlens",
            )
        if lse is not _FORWARD:
            _check_lse(lse, q)
        if not isinstance(deterministic, (bool, np.bool_)):
            raise _LocalError(TypeError, f"deterministic={deterministic!r} must be True or False")
        if timeout is not None and not _valid_timeout(timeout):
            raise _LocalError(ValueError, f"timeout={timeout!r} must be None or a positive number of seconds")
        if not isinstance(transport, Transport):
            check_transport_name(transport, _array_kind(q))
        active, needs = _PLANS.get(("own", layout, rank, size, q.shape[1], k.shape[1], q.shape[0], mask_key),
                                   lambda: _own_plan(layout, rank, size, q.shape[1], k.shape[1], q.shape[0], mask))
    except _LocalError as exc:
        error = exc
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        # Malformed input that slipped past the explicit checks (e.g. a ragged
        # cu_seqlens): still agreed, or the other ranks would wait in _agree.
        kind = ValueError if isinstance(exc, (ValueError, IndexError)) else TypeError
        error = _LocalError(kind, f"invalid input ({type(exc).__name__}: {exc})")
    # Built from plain values only: an exception here on one rank would leave the
    # others waiting in _agree's allgather.
    signature = {
        "array": _array_kind(q),
        "dtype": dtype_name(q.dtype) if error is None else _comparable(getattr(q, "dtype", None)),
        "q.shape": _comparable(getattr(q, "shape", None)),
        "k.shape": _comparable(getattr(k, "shape", None)),
        "layout": _comparable(layout),
        "causal": _comparable(causal),
        "window": _comparable(window),
        "softmax_scale": scale,
        "cu_seqlens": None if mask_key is None else mask_key[3],
        "transport": transport if isinstance(transport, str) else type(transport).__name__,
    }
    # Each rank's schedule rides along (packed; None: every step has work, the usual case),
    # and the rows of each block its queries attend to (None: whole blocks where it has work).
    packed = None if active is None or all(active) else np.packbits(active).tobytes()
    rows = None
    if needs is not None and needs != _whole_rows(active, rank, k.shape[1]):
        rows = np.asarray(needs, np.int64).tobytes()
    gathered = tuple(_agree(pcomm, fn, error, signature, (packed, rows)))
    backward = lse is not _FORWARD
    schedules, hops, kv_rows, plan = _PLANS.get(("ring", rank, size, k.shape[1], backward, gathered),
                                                lambda: _ring_plan(gathered, rank, size, k.shape[1], backward))

    xp = array_module(q)
    tr = None
    if size > 1:
        tr = transport if isinstance(transport, Transport) else select_transport(transport, pcomm, xp)
    q_segs = _layout.segments(layout, rank, size, q.shape[1])
    k_segs = [_layout.segments(layout, r, size, k.shape[1]) for r in range(size)]
    timeout = None if timeout is None else float(timeout)
    backend = backend_for(xp, dtype=q.dtype, head_dim=q.shape[3], mask=mask, seqlen_global=q.shape[1] * size,
                          steps=sum(active), deterministic=bool(deterministic))
    return _Call(pcomm, backend, tr, mask, scale, k.shape[2], q_segs, k_segs, active, hops, timeout, layout, plan,
                 kv_rows, _background(mask, schedules, q.shape, k.shape, q.dtype, backward=backward))


# --- the ring's plan, kept per content ----------------------------------------------------
class _Memo:
    """The last few results of the ring's planning (pure functions of agreed, hashable
    values: shapes, layout, mask, the gathered schedules), so that calls with the same
    problem, such as every layer of a model over one batch's documents, forward and
    backward, plan once. At most ``size`` results and ``budget`` bytes of their keys'
    byte strings (``cu_seqlens``, the gathered schedules: what grows with documents and
    ranks, as the results do); least recently used first out. Results are never mutated."""

    def __init__(self, size: int, budget: int = 64 << 20):
        self.size, self.budget, self.items, self.lock = size, budget, {}, threading.Lock()
        self.held = 0  # bytes of the kept keys

    def get(self, key, make):
        with self.lock:
            value = self.items.pop(key, _MISSING)
            if value is _MISSING:
                value = make()
                weight = _key_bytes(key)
                if weight > self.budget:
                    return value  # not kept
                self.held += weight
            while self.items and (len(self.items) >= self.size or self.held > self.budget):
                oldest = next(iter(self.items))
                self.held -= _key_bytes(oldest)
                del self.items[oldest]
            self.items[key] = value  # (re)inserted last: most recently used
            return value


def _key_bytes(key) -> int:
    if isinstance(key, bytes):
        return len(key)
    return sum(_key_bytes(x) for x in key) if isinstance(key, tuple) else 0


_MISSING = object()


_PLANS = _Memo(64)


def _mask_key(mask: _layout.Mask) -> tuple:
    return mask.causal, mask.left, mask.right, mask.cu_bytes


def _own_plan(layout, rank, size, seqlen_q, seqlen_k, batch, mask):
    """This rank's step schedule (layout.step_schedule) and, where blocks may be needed in
    part, the rows of every rank's block its queries attend to (layout.needed_rows)."""
    active = _layout.step_schedule(layout, rank, size, seqlen_q, seqlen_k, mask, batch=batch)
    if size == 1 or mask.is_full:
        return active, None
    own = _layout.segments(layout, rank, size, seqlen_q)
    return active, [_layout.needed_rows(own, _layout.segments(layout, b, size, seqlen_k), mask) for b in range(size)]


def _ring_plan(gathered, rank, size, seqlen_k, backward):
    """From every rank's (packed schedule, rows) of the validation's allgather: the
    schedules, this rank's K/V hops and rows (layout.kv_hops, kv_rows) and, for the
    backward, its dK/dV plan (layout.dkv_plan)."""
    schedules = [(True,) * size if x is None else
                 tuple(np.unpackbits(np.frombuffer(x, np.uint8), count=size).astype(bool))
                 for x, _ in gathered]
    needs = None
    if any(x is not None for _, x in gathered):
        needs = [_whole_rows(schedules[r], r, seqlen_k) if x is None else
                 [tuple(n) for n in np.frombuffer(x, np.int64).reshape(size, 2).tolist()]
                 for r, (_, x) in enumerate(gathered)]
    plan = _layout.dkv_plan(schedules, rank, needs) if backward else None
    kv_rows = () if needs is None else _layout.kv_rows(needs, schedules, rank)
    return schedules, _layout.kv_hops(schedules, rank), kv_rows, plan


def _background(mask: _layout.Mask, schedules, q_shape, k_shape, dtype, *, backward: bool) -> bool:
    """Whether a call's exchanges are hidden by ample compute, so that a transport may move
    them on a lean path: every rank computes at every step, on dense blocks (no documents,
    no window: a step's block is at least half full, as on the causal diagonal), and half
    a block's flops per byte of its exchange reach :data:`BACKGROUND_FLOPS_PER_BYTE`.
    A function of agreed values only, so the same on every rank (both ends of a message
    must pick the same path)."""
    if mask.cu_seqlens is not None or mask.left is not None or mask.right is not None:
        return False
    if not all(all(steps) for steps in schedules):
        return False
    lq, heads, heads_kv, item = q_shape[1], q_shape[2], k_shape[2], np.dtype(dtype).itemsize
    if backward:  # 2.5x the forward's flops over K/V and the dK/dV partial (float32; float64 for float64)
        per_byte = 2.5 * 4 * lq * heads / (heads_kv * 2 * (item + max(item, 4)))
    else:  # 4·Lq·Lk·H·D flops over 2·Lk·Hkv·D·itemsize bytes
        per_byte = 4 * lq * heads / (heads_kv * 2 * item)
    return 0.5 * per_byte >= BACKGROUND_FLOPS_PER_BYTE


def _whole_rows(active, rank: int, seqlen_k: int) -> list:
    """needs[b] where a rank attends to all of every block it has work with (no range)."""
    size = len(active)
    return [(0, seqlen_k) if active[(rank - b) % size] else (0, 0) for b in range(size)]


def _rows(buf, rows, axis: int):
    """Rows [lo, hi) of a travelling buffer along its sequence ``axis`` (a view); all: None."""
    return buf if rows is None else buf[(slice(None),) * axis + (slice(*rows),)]


def _add_rows(dst, src, rows, axis: int) -> None:
    """dst += src over rows [lo, hi) of two travelling buffers (all: None), in place."""
    part = _rows(dst, rows, axis)
    part += _rows(src, rows, axis)


def _message(buf, rows, axis: int):
    """What goes on the wire for rows [lo, hi) of a travelling buffer (K and V, or dK and
    dV: an array or a pair): one message in contiguous parts, K's then V's, each whole or
    one per index between it and the sequence axis. Both ends cut the same parts from
    buffers of the same shape (a pair or an array alike)."""
    if rows is None or rows == (0, buf[0].shape[axis - 1]):
        return buf[0], buf[1]
    return tuple(buf[i][index + (slice(*rows),)] for i in range(2) for index in np.ndindex(*buf[0].shape[:axis - 1]))


def _arrive(comm, fn: str, timeout) -> None:
    """Wait until every rank has called (a nonblocking barrier), for at most ``timeout``
    seconds where that is a valid number: a rank that never calls then gives TimeoutError
    rather than a hang in the validation allgather. Always entered, so that ranks that
    disagree on ``timeout`` still meet; an invalid value is reported by the agreed checks."""
    request = comm.Ibarrier()
    if not _valid_timeout(timeout):
        request.Wait()
        return
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{fn}: not every rank of the communicator called within timeout={timeout} s")
        time.sleep(1e-4)


def _valid_timeout(timeout) -> bool:
    return isinstance(timeout, (int, float, np.integer, np.floating)) and 0 < timeout < math.inf


def _comparable(x):
    """A picklable value that compares with ``!=`` without raising (for the signature)."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.bool_, np.integer, np.floating)):
        return x.item()
    if isinstance(x, (tuple, list)) and len(x) <= 8:
        return tuple(_comparable(e) for e in x)
    return f"<{type(x).__name__}>"


def _check_lse(lse, q) -> None:
    want = (q.shape[0], q.shape[2], q.shape[1])
    if _array_kind(lse) != _array_kind(q) or tuple(lse.shape) != want:
        raise _LocalError(ValueError, f"lse must be a {_array_kind(q)} array of shape {want}, got "
                          f"{type(lse).__name__} {tuple(getattr(lse, 'shape', ()))}")
    if np.dtype(lse.dtype) not in SUPPORTED_DTYPES:  # an integer lse would be cast silently
        raise _LocalError(TypeError, f"lse.dtype={dtype_name(lse.dtype)} must be floating (float32 as returned)")


def _make_mask(causal, window, cu_seqlens, seqlen_global: int) -> _layout.Mask:
    if not isinstance(causal, (bool, np.bool_, int, np.integer)) or causal not in (0, 1):
        raise _LocalError(TypeError, f"causal={causal!r} must be a bool")
    if window is not None:
        pair = window if isinstance(window, (tuple, list)) else None
        if pair is None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise _LocalError(ValueError, f"window={window!r} must be None, an int >= 1 or a pair (left, right)")
        ints = pair is not None and all(w is None or isinstance(w, (int, np.integer)) for w in pair)
        if pair is not None and (len(pair) != 2 or not ints):
            raise _LocalError(ValueError, f"window={window!r} must be a pair of ints (or None) (left, right)")
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens.get() if is_cupy(cu_seqlens) else cu_seqlens)
        if cu.ndim != 1 or cu.dtype.kind not in "iu" or len(cu) < 2:
            raise _LocalError(ValueError, f"cu_seqlens must be a 1-D integer array [0, ..., seqlen], got {cu!r}")
        if cu[0] != 0 or cu[-1] != seqlen_global or np.any(np.diff(cu) < 0):
            raise _LocalError(
                ValueError,
                f"cu_seqlens must start at 0, not decrease and end at the global seqlen={seqlen_global}, "
                f"got {cu.tolist() if len(cu) <= 8 else cu[:4].tolist() + ['...'] + cu[-2:].tolist()}",
            )
        cu_seqlens = cu
    return _layout.make_mask(causal, window, cu_seqlens)


def _agree_allocated(comm, fn: str, allocate, estimate=None):
    """Allocate, then agree: every rank allocates its ring buffers before the first
    exchange; if any rank failed, every rank raises the same MemoryError (which ranks,
    the bytes each asked for, and ``estimate()``, the bytes per rank of the whole call).

    One allreduce either way; ``estimate`` runs only on failure and must give the same
    figure on every rank (it is a function of the agreed shapes and options).
    """
    try:
        result, failed = allocate(), []
    except MemoryError as exc:  # CuPy's OutOfMemoryError is a MemoryError too
        result, failed = None, [(comm.Get_rank(), _requested_bytes(exc))]
    # SUM of lists concatenates: every rank learns every failure.
    failures = sorted(comm.allreduce(failed, op=MPI.SUM))
    if failures:
        result = None  # free what this rank did allocate before raising
        asked = ", ".join(f"rank {r}" + (f" ({b:,} bytes requested)" if b else "") for r, b in failures)
        needed = None if estimate is None else estimate()
        total = "" if needed is None else f"; the call needs about {needed:,} bytes per rank (memory_estimate)"
        raise MemoryError(f"{fn}: allocating the ring buffers failed on {asked}{total}")
    return result


def _estimate(call: _Call, q, k, backward: bool) -> int | None:
    """:func:`mpiring.memory_estimate` for this call (None if it can't say): the same on
    every rank, since shapes and options are agreed."""
    from mpiring.memory import memory_estimate  # only on the failure path

    m = call.mask
    window = None if m.left is None and m.right is None else (m.left, m.right)
    try:
        return memory_estimate(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, layout=call.layout,
            transport=call.transport or "auto", backward=backward, array=_array_kind(q), causal=m.causal,
            window=window, cu_seqlens=m.cu_seqlens, comm_size=call.comm.Get_size(),
        )
    except (TypeError, ValueError):
        return None


def _requested_bytes(exc: MemoryError) -> int | None:
    """The size of the allocation that failed, where the array library says it."""
    size = getattr(exc, "_total_size", None)  # NumPy's _ArrayMemoryError
    if isinstance(size, int):
        return size
    found = re.search(r"allocating ([\d,]+) bytes", str(exc))  # CuPy's OutOfMemoryError
    return int(found.group(1).replace(",", "")) if found else None


# --- the ring loops -----------------------------------------------------------------------
def ring_attention(
    q, k, v, comm=None, *, causal=False, softmax_scale=None, layout="contiguous", window=None,
    cu_seqlens=None, transport="auto", return_lse=True, timeout=None,
):
    """Exact attention over a sequence split across the ranks of ``comm``.

    Collective: every rank of ``comm`` calls it with its own shard.

    Parameters
    ----------
    q : ``(batch, seqlen_local, heads, head_dim)``, this rank's queries.
    k, v : ``(batch, seqlen_local, heads_kv, head_dim)``, ``heads % heads_kv == 0`` (GQA/MQA).
        float16, bfloat16 (``ml_dtypes``), float32 or float64, all the same dtype.
    comm : MPI intracommunicator (default ``MPI.COMM_WORLD``).
    causal : mask keys after the query, on global token positions.
    softmax_scale : default ``1 / sqrt(head_dim)``.
    layout : how the sequence is split: ``"contiguous"``, ``"zigzag"`` or ``"striped"``
        (see :mod:`mpiring.layout`; :func:`mpiring.shard` produces it).
    window : sliding window: an int w (``|pos_q − pos_k| < w``, one-sided when causal) or
        flash-attn's pair ``(left, right)`` (``pos_q − left ≤ pos_k ≤ pos_q + right``).
    cu_seqlens : packed documents: global boundaries ``[0, …, seqlen]`` (ints, same on
        every rank); attention never crosses a document.
    transport : ``"auto"``, a transport name, or a :class:`mpiring.transport.Transport`.
    return_lse : also return the log-sum-exp.
    timeout : seconds to wait for every rank to arrive, and for any one ring exchange,
        before this rank raises :class:`TimeoutError` (default None: wait forever). For a
        rank that died or never called; after a timeout the communicator's ring messages
        are out of step, so end the job (or never use ``comm`` with mpiring again). Not
        covered: the first call on a communicator, which duplicates it (a blocking
        ``MPI_Comm_dup``).

    Returns
    -------
    out : ``(batch, seqlen_local, heads, head_dim)``, q's dtype and array kind.
    lse : ``(batch, heads, seqlen_local)`` float32 (float64 for float64 inputs), natural
        log; −inf (and out = 0) on rows with no allowed key. Only if ``return_lse``.

    Notes
    -----
    Non-finite inputs propagate like the float64 reference: NaN/Inf in q row i makes
    row i of ``out`` non-finite; in k row j, exactly the rows allowed to attend j. In v
    (or any input of the backward) it stays within its (batch, kv-head group) slice:
    ``0·NaN`` in a matmul spreads it along that slice, as in the reference.
    Deterministic on NumPy: the same inputs give bitwise the same outputs and gradients
    on every run and with every host transport (summation order is fixed by the ring
    step and the tile, never by message arrival).
    """
    arrays, export, problem = _interop.import_arrays({"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens})
    cu_seqlens = arrays.pop("cu_seqlens")  # may be a torch/JAX/CuPy index array too
    call = _prepare(
        "ring_attention", comm, arrays, problem=problem, causal=causal, softmax_scale=softmax_scale,
        layout=layout, window=window, cu_seqlens=cu_seqlens, transport=transport, timeout=timeout,
    )
    out, lse = _forward(call, arrays["q"], arrays["k"], arrays["v"])
    return (export(out), export(lse)) if return_lse else export(out)


def _forward(call: _Call, q, k, v):
    be, tr = call.backend, call.transport
    size, rank = call.comm.Get_size(), call.comm.Get_rank()

    def allocate():
        state = be.fwd_begin(q, call.heads_kv, call.scale)
        return state, _kv_slots(call, be.pack_kv(k, v))

    state, kv = _agree_allocated(call.comm, "ring_attention", allocate, lambda: _estimate(call, q, k, False))
    fence = None  # the last compute step's completion (GPU: an event; NumPy: None)
    for s in range(size):
        cur, nxt = kv[s], kv[s + 1]
        ex = _post_kv(call, s, cur, nxt, fence)
        if call.active[s]:
            be.fwd_step(state, cur, call.q_segs, call.k_segs[(rank - s) % size], call.mask)
            fence = be.record()
        if ex is not None:
            tr.wait(ex, timeout=call.timeout)
    return be.fwd_end(state)


def _kv_slots(call: _Call, own) -> list:
    """The K/V block in hand at each ring step (``slots[s]``, s = 0…N; ``slots[s + 1]`` is
    where exchange s receives): ``own`` (this rank's block, from ``pack_kv``) at step 0,
    then buffers that blocks arrive in, two in turns (a receive never lands in the block
    a queued step still reads: the ring's fence), one where at most one block arrives.
    Where the backend's own block is its private copy, that copy is one of the two.

    Zeroed where blocks arrive in part (``kv_rows``): the rows no message writes hold zeros
    or earlier blocks' rows, which the mask hides from every query, never uninitialised
    memory (0·NaN in P·V)."""
    size, be = call.comm.Get_size(), call.backend
    if size == 1:
        return [own, None]
    if be.owns_packed_kv:
        turns = [own, be.kv_buffer(own, zero=bool(call.kv_rows))]
        return [turns[s % 2] for s in range(size + 1)]
    receive = _layout.kv_receive_buffers(call.kv_hops)
    turns = [be.kv_buffer(own, zero=bool(call.kv_rows)) for _ in range(receive)] or [None]
    return [own] + [turns[(s - 1) % len(turns)] for s in range(1, size + 1)]


def _post_kv(call: _Call, s: int, cur, nxt, fence):
    """Post exchange s of the K/V blocks (send ``cur`` on, receive into ``nxt``) as far as
    the plan has them travel, only the rows still needed; None where this rank neither
    sends nor receives."""
    if s >= len(call.kv_hops):
        return None
    send, recv = call.kv_hops[s]
    if not (send or recv):
        return None
    rows, axis = call.kv_rows[s] if call.kv_rows else (None, None), call.backend.seq_axis
    ready = call.backend.record()
    # The receive may land once no queued step reads ``nxt`` (``fence``) and, before the
    # first step, once what was queued to make it (its zero fill) is done: a transport may
    # write it from a stream of its own that waits for nothing else (mpi-staged's copies).
    return call.transport.post([_message(cur, rows[0], axis)] if send else [],
                               [_message(nxt, rows[1], axis)] if recv else [], tag=_TAG_KV,
                               send_ready=ready, recv_free=ready if fence is None else fence,
                               background=call.background)


def ring_attention_backward(
    dout, q, k, v, out, lse, comm=None, *, causal=False, softmax_scale=None, layout="contiguous",
    window=None, cu_seqlens=None, transport="auto", timeout=None, deterministic=True,
):
    """Gradients of :func:`ring_attention` (same options, same shards).

    Parameters
    ----------
    dout : ``(batch, seqlen_local, heads, head_dim)``, gradient of ``out``.
    q, k, v : as passed to :func:`ring_attention`.
    out, lse : as returned by :func:`ring_attention`.
    timeout : as in :func:`ring_attention`.
    deterministic : True (default): bitwise identical gradients for identical inputs, on
        every run and every transport. False lets the CUDA kernels add dQ with atomics
        in whatever order they land (a little faster; results vary in the last bits).

    Returns
    -------
    dq : ``(batch, seqlen_local, heads, head_dim)``; dk, dv : ``(batch, seqlen_local,
    heads_kv, head_dim)``, summed over each KV group; all in q's dtype.

    The dK/dV partials travel with their K/V block in the compute dtype (float32 at
    least), summed in ring order, and go straight home from the last rank that used
    the block (:func:`mpiring.layout.dkv_plan`), so error does not grow with N. A
    finished sum goes home in the input dtype (bf16/fp16: half the bytes of that last
    hop, which no compute hides): the owner would only cast it, so the gradients are
    bitwise the same.
    """
    arrays, export, problem = _interop.import_arrays(
        {"q": q, "k": k, "v": v, "dout": dout, "out": out, "lse": lse, "cu_seqlens": cu_seqlens})
    lse, cu_seqlens = arrays.pop("lse"), arrays.pop("cu_seqlens")  # checked apart: not (B, S, H, D)
    call = _prepare(
        "ring_attention_backward", comm, arrays, problem=problem,
        causal=causal, softmax_scale=softmax_scale, layout=layout, window=window,
        cu_seqlens=cu_seqlens, transport=transport, timeout=timeout, lse=lse, deterministic=deterministic,
    )
    grads = _backward(call, arrays["dout"], arrays["q"], arrays["k"], arrays["v"], arrays["out"], lse)
    return tuple(export(g) for g in grads)


def _backward(call: _Call, dout, q, k, v, out, lse):
    be, tr = call.backend, call.transport
    size, rank = call.comm.Get_size(), call.comm.Get_rank()

    plan = call.dkv_plan

    def allocate():
        state = be.bwd_begin(dout, q, out, lse, call.heads_kv, call.scale)
        kv = _kv_slots(call, be.pack_kv(k, v))
        # dK/dV partials (layout.dkv_plan): 3 buffers for a full ring (computed into, in
        # flight, arriving), fewer where blocks stay home, at most 4.
        return state, kv, [be.empty_dkv(kv[0]) for _ in range(plan.buffers)]

    state, kv, dkv = _agree_allocated(call.comm, "ring_attention_backward", allocate,
                                      lambda: _estimate(call, q, k, True))
    axis = be.seq_axis
    # A block's finished dK/dV goes home in the output dtype where that is narrower than
    # the partials (bf16/fp16: half the bytes of the one hop after the last compute). The
    # owner would only cast it: the gradients are bitwise the same.
    narrow = np.dtype(k.dtype).itemsize < dkv[0].dtype.itemsize
    home = dkv[plan.home]
    # Where this rank's last exchange sends a finished partial home and nothing computes
    # after it, the second half of step 0 (KV heads split, home buffer only) runs after that
    # post and hides it (layout.deferred_step); the first half hides the first K/V arrival.
    later = _layout.deferred_step(plan, call.active, [r for _, r in call.kv_hops] if be.owns_packed_kv else None)
    split = call.heads_kv // 2 if later is not None else 0
    fence, ex_dkv = None, None
    for s, step in enumerate(plan.steps):
        cur, nxt = kv[s], kv[s + 1]
        ex_kv = _post_kv(call, s, cur, nxt, fence)
        if step.zero and not call.active[s]:  # the rows the partial will hold; the others are never read
            _rows(dkv[step.compute], step.rows, axis).fill(0)
        if call.active[s]:  # into a fresh partial: written, not added (no zero fill before it)
            be.bwd_step(state, cur, dkv[step.compute], call.q_segs, call.k_segs[(rank - s) % size], call.mask,
                        fresh=step.zero, heads=(0, split) if s == 0 and split else None)
        if ex_dkv is not None:
            tr.wait(ex_dkv, timeout=call.timeout)
            ex_dkv = None
        if step.add is not None:  # the partial sum that came with the block, from rank−1
            _add_rows(dkv[step.compute], dkv[step.add], step.add_rows, axis)
        if ex_kv is not None:
            # Before the fence and the dK/dV post: a host-side transport (MPI) moves the
            # next block while this step computes only if polled then. Posting dK/dV first
            # waits for the step's end and left the block to move after it (mpi-cuda: the
            # GPU idled 2-6 ms before each step, 4x H200, bench/ring_probe.py).
            tr.wait(ex_kv, timeout=call.timeout)
            ex_kv = None
        if size > 1:
            fence = be.record()
        if step.send is not None or step.recv:
            # Send the partial on (or home); receive the next block's partial (or our own
            # block's finished dK/dV) into buffers whose last send has completed.
            sent = [] if step.send is None else [dkv[step.send[0]]]
            if sent and narrow and step.finished:
                # into the memory of a buffer free for this exchange, else a new array
                # (referenced by ``sent`` until the exchange is waited, at the next step)
                sent = [be.narrow_dkv(sent[0], None if step.narrow is None else dkv[step.narrow], k.dtype,
                                      step.rows)]
                fence = be.record()
            recv_rows = step.recv_rows or (None,) * len(step.recv)
            received = [dkv[i] for i, _ in step.recv]
            if narrow and plan.home_step == s:  # the finished dK/dV lands in the output
                for j, (i, _) in enumerate(step.recv):
                    if i == plan.home:
                        home = received[j] = be.dkv_out(dkv[i], k.dtype)
            ex_dkv = tr.post([_message(buf, step.rows, axis) for buf in sent],
                             [_message(buf, r, axis) for buf, r in zip(received, recv_rows)], tag=_TAG_DKV,
                             send_ready=fence, recv_free=fence, send_to=[] if step.send is None else [step.send[1]],
                             recv_from=[r for _, r in step.recv],
                             # after the last step nothing hides it: a block's dK/dV going home
                             background=call.background and s + 1 < len(plan.steps))
        if split and s == later:  # the rest of step 0, under that post
            first = plan.steps[0]
            be.bwd_step(state, kv[0], dkv[first.compute], call.q_segs, call.k_segs[rank], call.mask,
                        fresh=first.zero, heads=(split, call.heads_kv))
    if ex_dkv is not None:
        tr.wait(ex_dkv, timeout=call.timeout)  # the last exchange may bring our own block's dK/dV home
    if plan.final_add is not None:  # the other ranks' sum, added to our own contribution
        _add_rows(home, dkv[plan.final_add], plan.home_rows, axis)
    elif plan.home_rows is not None:  # the finished sum came home in part: clear the rest
        lo, hi = plan.home_rows
        _rows(home, (0, lo), axis).fill(0)
        _rows(home, (hi, home.shape[axis]), axis).fill(0)
    return be.bwd_end(state, home, k.dtype)
