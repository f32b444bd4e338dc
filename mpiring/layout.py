"""Sequence layouts: which global tokens a rank holds, shard/unshard, masks, schedule.

Everything here is a pure function of (layout, rank, size, seqlen) so that the
ring schedule is testable without MPI or a GPU.

Layouts (``size`` = N ranks, ``seqlen_local`` = L tokens per rank, S = N·L):

* ``contiguous``: rank r holds tokens ``[r·L, (r+1)·L)``.
* ``zigzag``: the sequence is cut into 2N chunks of L/2; rank r holds chunks
  r and 2N−1−r. Causal work is then the same on every rank.
* ``striped``: token t lives on rank ``t mod N`` (rank r holds r, r+N, …).

A rank's global positions are described by *segments* ``(start, stride,
length)``: contiguous and striped have one, zigzag two. Kernels take segments;
the NumPy backend expands them with :func:`positions`.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LAYOUTS",
    "block_reach",
    "dkv_plan",
    "kv_rows",
    "needed_rows",
    "kv_hops",
    "kv_receive_buffers",
    "pack_documents",
    "rank_work",
    "Mask",
    "make_mask",
    "Segment",
    "segments",
    "positions",
    "step_schedule",
    "segments_have_work",
    "block_has_work",
    "shard",
    "unshard",
]

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Segment:
    """Global positions ``start + stride·i`` for ``i in range(length)``."""

    start: int
    stride: int
    length: int

    @property
    def last(self) -> int:
        return self.start + self.stride * (self.length - 1)


@dataclass(frozen=True)
class Mask:
    """Which (query, key) pairs may attend, on global token positions.

    ``left``/``right`` bound ``pos_q − pos_k ≤ left`` and ``pos_k − pos_q ≤ right``
    (None: unbounded); ``causal`` sets ``right = 0``. ``cu_seqlens`` (int64, global
    document boundaries ``[0, …, S]``) restricts attention to one document.
    """

    causal: bool = False
    left: int | None = None
    right: int | None = None
    cu_seqlens: np.ndarray | None = None

    @property
    def right_bound(self) -> int | None:
        if self.causal:
            return 0 if self.right is None else min(self.right, 0)
        return self.right

    @property
    def is_full(self) -> bool:
        return self.left is None and self.right_bound is None and self.cu_seqlens is None

    @functools.cached_property
    def cu_bytes(self) -> bytes | None:
        """``cu_seqlens`` as int64 bytes (None without documents), made once per mask: the
        key of the caches kept per document content (the ring's plan, the device copy and
        the dQ order of the CUDA backend)."""
        cu = self.cu_seqlens
        return None if cu is None else np.ascontiguousarray(cu, dtype=np.int64).tobytes()

    def documents(self, pos: np.ndarray) -> np.ndarray:
        """Document index of each global position (int64)."""
        return np.searchsorted(self.cu_seqlens, pos, side="right") - 1

    def allowed(self, qpos: np.ndarray, kpos: np.ndarray) -> np.ndarray:
        """Dense boolean mask ``(len(qpos), len(kpos))``: True where attention is allowed."""
        diff = qpos[:, None] - kpos[None, :]
        ok = np.ones(diff.shape, dtype=bool)
        if self.left is not None:
            ok &= diff <= self.left
        right = self.right_bound
        if right is not None:
            ok &= -diff <= right
        if self.cu_seqlens is not None:
            ok &= self.documents(qpos)[:, None] == self.documents(kpos)[None, :]
        return ok


def make_mask(causal=False, window=None, cu_seqlens=None) -> Mask:
    """Normalise the user's mask options: ``window`` is None, an int w (|pos_q − pos_k| < w,
    keys after the query excluded when causal) or a pair ``(left, right)`` as in
    flash-attn (``pos_q − left ≤ pos_k ≤ pos_q + right``; None or −1: unbounded)."""
    left = right = None
    if window is not None:
        if isinstance(window, (tuple, list)):
            left, right = (None if w is None or w < 0 else int(w) for w in window)
        else:
            left = right = int(window) - 1
    cu = None if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int64)
    return Mask(causal=bool(causal), left=left, right=right, cu_seqlens=cu)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")


def segments(layout: str, rank: int, size: int, seqlen_local: int) -> tuple[Segment, ...]:
    """The global positions held by ``rank`` as one or two segments."""
    _check_layout(layout)
    if layout == "contiguous":
        return (Segment(rank * seqlen_local, 1, seqlen_local),)
    if layout == "striped":
        return (Segment(rank, size, seqlen_local),)
    if seqlen_local % 2:
        raise ValueError(f"seqlen_local={seqlen_local} must be even for layout='zigzag'")
    half = seqlen_local // 2
    return (Segment(rank * half, 1, half), Segment((2 * size - 1 - rank) * half, 1, half))


def positions(layout: str, rank: int, size: int, seqlen_local: int) -> np.ndarray:
    """Global token positions (int64, length ``seqlen_local``) held by ``rank``."""
    return _expand(segments(layout, rank, size, seqlen_local))


def block_has_work(qpos: np.ndarray, kpos: np.ndarray, mask: Mask) -> bool:
    """True if at least one (q, k) pair of these position sets is allowed (exact)."""
    if len(qpos) == 0 or len(kpos) == 0:
        return False
    if mask.is_full:
        return True
    ks = np.sort(kpos)
    lo = qpos - mask.left if mask.left is not None else np.full_like(qpos, ks[0])
    right = mask.right_bound
    hi = qpos + right if right is not None else np.full_like(qpos, ks[-1])
    if mask.cu_seqlens is not None:
        doc = mask.documents(qpos)
        lo = np.maximum(lo, mask.cu_seqlens[doc])
        hi = np.minimum(hi, mask.cu_seqlens[doc + 1] - 1)
    counts = np.searchsorted(ks, hi, side="right") - np.searchsorted(ks, lo, side="left")
    return bool(np.any(counts > 0))


def segments_have_work(q_segs: tuple[Segment, ...], k_segs: tuple[Segment, ...], mask: Mask) -> bool:
    """:func:`block_has_work` on segments, without expanding them where it can.

    Two stride-1 segments need one interval test: with ``left, right ≥ 0`` the keys
    that some query of ``[qa, qb]`` may see form the single interval
    ``[qa − left, qb + right]``. With one side unbounded that region is a half-line
    for any strides (causal: some key ≤ the last query + right). Otherwise a strided
    segment (striped layout with a two-sided window) counts, per query,
    the key indices ``j`` with ``lo ≤ start + stride·j ≤ hi`` in closed form. Documents
    (``cu_seqlens``) apply the same tests per document, to each segment's rows in it
    (:func:`_documents_have_work`: O(documents), no expansion to positions).
    """
    q_segs = tuple(s for s in q_segs if s.length > 0)
    k_segs = tuple(s for s in k_segs if s.length > 0)
    if not q_segs or not k_segs:
        return False
    if mask.is_full:
        return True
    if mask.cu_seqlens is not None:
        return _documents_have_work(q_segs, k_segs, mask)
    left, right = mask.left, mask.right_bound
    for qs in q_segs:
        for ks in k_segs:
            if left is None:
                if ks.start <= qs.last + right:
                    return True
                continue
            if right is None:
                if ks.last >= qs.start - left:
                    return True
                continue
            if qs.stride == 1 and ks.stride == 1:
                if max(ks.start, qs.start - left) <= min(ks.last, qs.last + right):
                    return True
                continue
            q = qs.start + qs.stride * np.arange(qs.length, dtype=np.int64)
            lo, hi = q - left, q + right
            j_lo = np.maximum(-((ks.start - lo) // ks.stride), 0)  # ceil((lo − start) / stride)
            j_hi = np.minimum((hi - ks.start) // ks.stride, ks.length - 1)
            if np.any(j_lo <= j_hi):
                return True
    return False


def _documents_have_work(q_segs, k_segs, mask: Mask) -> bool:
    """:func:`segments_have_work` with documents, vectorised over the documents: within a
    document every pair meets the window test of the rows of both segments in it, which are
    again arithmetic (first, last, stride). One unbounded side: a half-line test (any
    strides). Both bounded: the query windows join into the interval [first − left,
    last + right] when the queries in the document are one row or spaced at most
    left + right + 1 apart, and then the first key at or after its start decides; queries
    spaced wider (striped with a narrow two-sided window) take the exact search on positions."""
    cu, left, right = mask.cu_seqlens, mask.left, mask.right_bound
    k_rows = [(ks, *_rows_per_document(ks, cu)) for ks in k_segs]
    for qs in q_segs:
        qf, ql, qn = _rows_per_document(qs, cu)
        for ks, kf, kl, kn in k_rows:
            ok = qn & kn
            if left is None and right is not None:
                ok &= kf <= ql + right
            elif right is None and left is not None:
                ok &= kl >= qf - left
            elif left is not None:
                if qs.stride > left + right + 1 and np.any(ok & (ql > qf)):
                    return block_has_work(_expand(q_segs), _expand(k_segs), mask)
                lo = np.maximum(kf, qf - left)
                ok &= kf + ks.stride * -((kf - lo) // ks.stride) <= np.minimum(kl, ql + right)
            if ok.any():
                return True
    return False


def _rows_per_document(seg: Segment, cu: np.ndarray):
    """Per document [cu[d], cu[d+1]): the first and last position of ``seg``'s rows in it
    and whether it has any."""
    first = np.clip(-((seg.start - cu) // seg.stride), 0, seg.length)  # ceil((cu − start) / stride)
    ia, ib = first[:-1], first[1:]
    return seg.start + seg.stride * ia, seg.start + seg.stride * (ib - 1), ia < ib


def _expand(segs: tuple[Segment, ...]) -> np.ndarray:
    return np.concatenate([s.start + s.stride * np.arange(s.length, dtype=np.int64) for s in segs])


def step_schedule(
    layout: str, rank: int, size: int, seqlen_q: int, seqlen_k: int, mask: Mask, batch: int = 1
) -> tuple[bool, ...]:
    """For ring step s (K/V of rank ``(rank − s) mod size`` in hand): is there any work?

    Steps that are fully masked are skipped by the ring loop; the K/V transfers that
    no rank further along needs are skipped too (:func:`kv_hops`). Exact, and O(1) per
    step for the contiguous and zigzag layouts without documents. ``batch`` 0: no work
    anywhere (so no K/V travels either).
    """
    if batch == 0:
        return (False,) * size
    if mask.is_full:
        return (True,) * size
    q_segs = segments(layout, rank, size, seqlen_q)
    return tuple(
        segments_have_work(q_segs, segments(layout, (rank - s) % size, size, seqlen_k), mask)
        for s in range(size)
    )


Rows = tuple  # (lo, hi): local rows [lo, hi) of a K/V block


def needed_rows(q_segs: tuple[Segment, ...], k_segs: tuple[Segment, ...], mask: Mask) -> Rows:
    """The local rows ``[lo, hi)`` of a K/V block (positions ``k_segs``) that the queries
    ``q_segs`` may attend to: every key row with an allowed pair lies inside (a hull, so it
    may hold rows without one). ``(0, 0)``: none.

    Per pair of segments the keys a query segment may see are one position interval: the
    window around its first and last query, cut to the documents of those two queries
    (the ones between included). Exact for stride-1 segments without documents; with
    documents, the hull of whole documents. O(segments²)."""
    length = sum(s.length for s in k_segs)
    lo, hi, offset = length, 0, 0
    for ks in k_segs:
        for qs in q_segs:
            if qs.length == 0 or ks.length == 0:
                continue
            first = -np.inf if mask.left is None else qs.start - mask.left
            last = np.inf if mask.right_bound is None else qs.last + mask.right_bound
            if mask.cu_seqlens is not None:
                cu = mask.cu_seqlens
                first = max(first, int(cu[np.searchsorted(cu, qs.start, side="right") - 1]))
                last = min(last, int(cu[np.searchsorted(cu, qs.last, side="right")]) - 1)
            if first > last:
                continue
            # key rows j with first <= start + stride·j <= last
            j_lo = 0 if first == -np.inf else max(0, -((ks.start - int(first)) // ks.stride))
            j_hi = ks.length - 1 if last == np.inf else min(ks.length - 1, (int(last) - ks.start) // ks.stride)
            if j_lo <= j_hi:
                lo, hi = min(lo, offset + j_lo), max(hi, offset + j_hi + 1)
        offset += ks.length
    return (lo, hi) if lo < hi else (0, 0)


def _hull(rows) -> Rows:
    rows = [r for r in rows if r[0] < r[1]]
    return (min(r[0] for r in rows), max(r[1] for r in rows)) if rows else (0, 0)


def kv_rows(needs, schedules, rank: int) -> tuple[tuple[Rows | None, Rows | None], ...]:
    """The rows of the K/V blocks that ``rank`` sends and receives at each exchange of
    :func:`kv_hops` (None where it sends or receives nothing): a block carries only the
    rows that the ranks still ahead of it on its path attend to.

    ``needs[r][b]``: :func:`needed_rows` of rank r's queries against block b (every rank
    has the same table)."""
    size, reach = len(schedules), block_reach(schedules)

    def ahead(b: int, s: int) -> Rows:  # block b, sent on by rank b+s at exchange s
        return _hull(needs[(b + t) % size][b] for t in range(s + 1, reach[b] + 1))

    return tuple(
        (ahead((rank - s) % size, s) if send else None, ahead((rank - 1 - s) % size, s) if recv else None)
        for s, (send, recv) in enumerate(kv_hops(schedules, rank))
    )


def block_reach(schedules) -> tuple[int, ...]:
    """``reach[b]``: how many hops rank b's K/V block travels, b → b+1 → … → b+reach[b]: up
    to the last rank that has work with it (0: it stays home).

    ``schedules[r]`` is rank r's :func:`step_schedule` (at step s it holds the K/V block of
    rank (r − s) mod N). Every rank derives the same reach from the same gathered schedules.
    """
    size = len(schedules)
    work = np.asarray(schedules, dtype=bool).reshape(size, size)
    steps = np.arange(size)
    # held[b, s]: rank b+s has work at step s (with block b)
    held = work[(steps[:, None] + steps[None, :]) % size, steps[None, :]]
    return tuple(int(x) for x in np.where(held.any(axis=1), size - 1 - np.argmax(held[:, ::-1], axis=1), 0))


def kv_hops(schedules, rank: int) -> tuple[tuple[bool, bool], ...]:
    """The K/V transfers of ``rank`` at each ring exchange s (0 ≤ s < N−1): (send, receive).

    Block b travels only as far as :func:`block_reach` says; the ring steps after that
    carry nothing (causal contiguous: half the transfers; packed documents that stay on
    their ranks: none). Each send has its receive, and the block a rank sends was received
    (or is its own): ``reach(b) > s`` implies ``reach(b) > s − 1``.
    """
    size, reach = len(schedules), block_reach(schedules)
    return tuple((reach[(rank - s) % size] > s, reach[(rank - 1 - s) % size] > s) for s in range(size - 1))


def kv_receive_buffers(hops) -> int:
    """K/V buffers a rank needs for the blocks that arrive (``hops``: its :func:`kv_hops`)
    where its own block is not one of them: two in turns (a block arrives while the one
    before it is still read), one where at most one block arrives, none where none does."""
    return min(2, sum(recv for _, recv in hops))


@dataclass(frozen=True)
class DkvStep:
    """What one rank does with dK/dV partials at ring step s (buffers are indices)."""

    compute: int | None  # buffer this step's dK/dV is computed into (None: off the block's path)
    zero: bool  # clear ``compute`` first (its ``rows``; all of it where it ends as ``home``)
    add: int | None  # the partial that came from rank−1 with the block, added after the compute
    send: tuple[int, int] | None  # (buffer, rank): on to rank+1, or home to the block's owner
    recv: tuple[tuple[int, int], ...]  # ((buffer, rank), …) received in exchange s
    # Block rows (lo, hi) (dkv_plan's ``needs``; None: all): those of ``compute`` that hold
    # the partial after this step (cleared by ``zero``, sent by ``send``), of ``add``, and of
    # each received buffer. The rest of a buffer is never read.
    rows: Rows | None = None
    add_rows: Rows | None = None
    recv_rows: tuple = ()
    # ``send`` brings its block's finished dK/dV home (the owner keeps no part of its own):
    # it may go in the output dtype (half the bytes of float32 partials; the owner would
    # only cast it), narrowed into the memory of buffer ``narrow``, free for this exchange
    # (None: none is, a new array then).
    finished: bool = False
    narrow: int | None = None


@dataclass(frozen=True)
class DkvPlan:
    """A rank's dK/dV schedule (:func:`dkv_plan`): per step, the buffers in use; in all."""

    steps: tuple[DkvStep, ...]
    buffers: int  # distinct dK/dV buffers the rank allocates
    home: int  # the buffer that ends holding the rank's own block's dK/dV
    final_add: int | None = None  # the others' sum that came home, added into ``home`` at the end
    # Rows of the others' sum that came home (None: all): of ``final_add``, or of ``home``
    # itself where home is the received buffer (whose other rows must then be cleared).
    home_rows: Rows | None = None
    # The exchange in which ``home`` receives the finished dK/dV from the block's last rank
    # (which may send it narrowed, :attr:`DkvStep.finished`: it then lands in the output
    # instead); None: home is not received finished.
    home_step: int | None = None


def dkv_plan(schedules, rank: int, needs=None) -> DkvPlan:
    """How ``rank`` moves dK/dV partials in the backward ring (``schedules`` as for
    :func:`block_reach`).

    Block b's partial sum follows its K/V block: rank b+s adds its contribution at step s
    to the sum that came from rank b+s−1 (summation order fixed by the ring, never by
    arrival) and passes it on to rank b+s+1 while the block goes further; the last rank
    on the path, b+reach[b], sends it straight home to b (on a full ring, the ring's next
    hop). Where no block goes more than one hop (packed documents that span at most two
    ranks; any two-rank ring), b keeps its own contribution at home instead: b+1's
    partial alone goes there and back, and b adds it to its own at the end (one transfer
    less, none right after step 0, and only the rows b+1 attends to). A block that stays
    home moves no dK/dV at all.

    Exchange s (after step s's compute) carries at most one dK/dV message per pair of
    ranks, and every rank issues its exchanges in the same order (NCCL matches by order).
    Buffers are reused once free (a sent one after its exchange completed, an added one
    at once) and start uninitialised (``zero`` clears what a step computes into): 3 for a
    full ring (computed into, in flight, arriving), as before; paths of different lengths
    can need a fourth (:attr:`DkvPlan.buffers`).

    ``needs`` (as for :func:`kv_rows`): a partial then holds, and a message carries, only
    the hull of the rows its contributors attend to (the steps' ``rows``).
    """
    plan = _dkv_plan(schedules, rank, needs, reserve=True)
    # a free buffer kept for a narrowed message must not cost a buffer more
    return plan if plan.buffers <= _dkv_plan(schedules, rank, None, reserve=False).buffers else \
        _dkv_plan(schedules, rank, needs, reserve=False)


def _dkv_plan(schedules, rank: int, needs, *, reserve: bool) -> DkvPlan:
    size, reach = len(schedules), block_reach(schedules)
    # b keeps its own contribution where every block goes at most one hop (documents that
    # span two ranks at most, two ranks): then that costs no buffer, elsewhere it could cost two.
    short = size > 1 and max(reach) == 1
    keeps = [short and reach[b] == 1 for b in range(size)]
    free: list[int] = []
    used = [0]  # buffers created so far
    steps = []

    def take() -> int:  # a free buffer, else a new one (uninitialised either way)
        if free:
            return free.pop()
        used[0] += 1
        return used[0] - 1

    def acc(b: int, s: int) -> Rows | None:  # rows of block b's partial after rank b+s added to it
        if needs is None:
            return None
        return _hull(needs[(b + t) % size][b] for t in range(1 if keeps[b] else 0, s + 1))

    arriving = None  # the partial received in the previous exchange (for this step's block)
    in_flight: list[int] = []  # buffers sent from in the previous exchange (free once it completes)
    home = final_add = home_rows = home_step = None
    for s in range(size):
        b = (rank - s) % size
        compute, zero, add, send, finished, narrow = None, False, None, None, False, None
        on_path = s == 0 or reach[b] >= s
        if on_path and (s == 0 or schedules[rank][s] or arriving is None):
            compute, zero = take(), True  # (a rank on the path without work forwards what came)
        free.extend(in_flight)  # the exchange is waited before the add
        in_flight = []
        if on_path:
            if compute is None:
                compute, arriving = arriving, None  # forwarded as it came
            elif arriving is not None:
                add, arriving = arriving, None
                free.append(add)
            if s == 0 and (reach[b] == 0 or keeps[b]):
                home = compute  # complete here, or waiting for the others' sum to come home
            elif reach[b] > s:
                send = (compute, (rank + 1) % size)
            else:  # home from the last rank on the path: finished unless b keeps its own part
                send, finished = (compute, b), not keeps[b]
            in_flight = [] if send is None else [compute]
        recv, recv_rows = [], []
        ahead = (rank - 1 - s) % size  # the block rank−1 holds at step s
        if s < size - 1 and reach[ahead] > s and not (s == 0 and keeps[ahead]):
            arriving = take()
            recv.append((arriving, (rank - 1) % size))
            recv_rows.append(acc(ahead, s))
        if s >= 1 and reach[rank] == s:
            back = take()
            recv.append((back, (rank + s) % size))
            recv_rows.append(home_rows := acc(rank, s))
            if keeps[rank]:
                final_add = back
            else:
                home, home_step = back, s
        if finished:
            # the finished sum goes home: narrowed into the memory of this exchange's
            # finished-home receive (which then lands in the output instead), else of a
            # free buffer, kept from the next step's compute until the exchange completed;
            # None: no buffer is free (the ring narrows into a new array then)
            if home_step == s:
                narrow = back
            elif reserve and free:
                narrow = free.pop()
                in_flight.append(narrow)
        # rows of compute (None: all): a home buffer is read whole, so it is cleared whole
        rows = None if compute is None or compute == home else acc(b, s)
        steps.append(DkvStep(compute, zero, add, send, tuple(recv), rows=rows,
                             add_rows=None if add is None else acc(b, s - 1), recv_rows=tuple(recv_rows),
                             finished=finished, narrow=narrow))
    return DkvPlan(tuple(steps), used[0], home, final_add, home_rows, home_step)


def deferred_step(plan: DkvPlan, active, kv_receives=None) -> int | None:
    """Where the backward ring may finish part of its own block's step: the step after
    whose dK/dV post the rest of step 0 can run (None: nowhere useful).

    Where a rank keeps its own block's dK/dV at home (:func:`dkv_plan`: packed documents
    that span two ranks at most, any two-rank ring), its last exchange sends a finished
    partial home and nothing computes after it: the owner waits for that transfer. Step 0
    touches only the home buffer, which nothing else reads before the end, so part of it
    (some heads) can run after that post instead, hiding the transfer; the rest still runs
    first, under the first K/V block's arrival.

    ``active``: the rank's schedule (step s has work); ``kv_receives``: for ring loops whose
    own K/V block may be received into by later exchanges (the blockwise backend's two
    buffers in turns), whether exchange s receives a block (the block must not change
    before the deferred part reads it); None where the own block is never received into.
    """
    steps = plan.steps
    first = steps[0]
    if not active[0] or first.compute is None or first.compute != plan.home or plan.home_step is not None:
        return None
    if first.add is not None or first.send is not None:
        return None
    sends = [s for s, step in enumerate(steps) if step.send is not None]
    if not sends or sends[-1] < 1 or any(active[sends[-1] + 1:]):
        return None
    last, home = sends[-1], first.compute
    for step in steps[1:]:
        used = {step.compute, step.add, step.narrow, *(i for i, _ in step.recv)}
        if step.send is not None:
            used.add(step.send[0])
        if home in used:
            return None
    if kv_receives is not None and any(kv_receives[1:last + 1]):
        return None
    return last


def rank_work(cu_seqlens, size: int, *, causal: bool = True) -> np.ndarray:
    """Query–key pairs each rank attends to with ``layout="contiguous"`` over ``size``
    ranks, for documents ``cu_seqlens`` (global boundaries; the total must divide by
    ``size``). Exact (integer counts, :class:`_Packing`), O(documents + size · log documents)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    total = int(cu[-1])
    if total % size:
        raise ValueError(f"the total length {total} must be divisible by size={size}")
    return np.diff(np.array(_Packing(np.diff(cu).tolist(), size, causal).f, dtype=np.float64))


def pack_documents(lengths, size: int, *, causal: bool = True, seed: int = 0, iterations: int | None = None):
    """An order of documents that evens out the ranks' work with ``layout="contiguous"``.

    Attention never crosses a document, so the order of packed documents is free. With
    ``layout="contiguous"`` a document stays on its rank unless it crosses a rank
    boundary, and then only the ranks it spans exchange K/V (the ring skips the rest,
    :func:`kv_hops`, :func:`dkv_plan`), unlike ``striped``/``zigzag``, which spread every
    document over every rank and move every K/V block around the whole ring. What
    ``contiguous`` lacks is balance: a rank with long documents has more causal work (it
    grows with length²). This picks an order that evens it out (long documents end up
    split over ranks): a local search of swaps from a few starting orders, deterministic
    for a given ``seed``, so every rank computes the same order.

    Parameters
    ----------
    lengths : document lengths (ints ≥ 0); their sum must divide by ``size``.
    size : number of ranks.
    causal : balance causal work (True) or full attention within documents.
    seed, iterations : the search's random seed and its number of tried swaps per
        phase (default ``min(40 · documents², 20000)``).

    Returns
    -------
    order : int64 array, ``order[i]`` is the index (into ``lengths``) of the i-th
        document of the packed sequence.
    cu_seqlens : int64 array, the boundaries of the packed sequence, for
        :func:`mpiring.ring_attention`'s ``cu_seqlens`` with ``layout="contiguous"``.

    :func:`rank_work` gives the resulting work per rank. Where a document is longer than
    a rank's block, no order evens it out (its causal work grows along it); ``striped``
    then balances better (bench/README.md, Long context, "Fourteenth session").

    Where that search leaves the busiest rank more than 5 % above the mean (many
    documents on many ranks: random swaps of far-apart documents move every boundary
    between them), a second phase starts from a greedy assignment (largest work first,
    to the least loaded rank with room) and anneals swaps of a document of the busiest
    or idlest rank with any other; the better order is kept. Orders within 5 % are
    those of the first phase alone.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or np.any(lengths < 0):
        raise ValueError(f"lengths must be a 1-D array of non-negative ints, got {lengths!r}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size={size!r} must be an int >= 1")
    lengths = lengths.astype(np.int64)
    total, count = int(lengths.sum()), len(lengths)
    if total % size:
        raise ValueError(f"the documents' total length {total} must be divisible by size={size}")
    rng = np.random.default_rng(seed)
    by_length = np.argsort(-lengths, kind="stable")
    starts = [np.arange(count), by_length, np.concatenate([by_length[0::2], by_length[1::2][::-1]])]
    starts += [rng.permutation(count) for _ in range(2)]
    tries = min(40 * count * count, 20000) if iterations is None else int(iterations)
    best_order, best = None, None
    for order in starts:
        packing = _Packing(lengths[order].tolist(), size, causal)
        current = packing.cost(packing.f)
        # The pairs of positions to swap, drawn at once: the same pairs as one draw of two per
        # try wherever NumPy's bounded draws reject nothing (always for a power-of-two count).
        for i, j in rng.integers(count, size=(tries // len(starts) if count > 1 else 0, 2)).tolist():
            if i == j or packing.lens[i] == packing.lens[j]:
                continue
            i, j = min(i, j), max(i, j)
            f = packing.swapped(i, j)
            trial = packing.cost(f)
            if trial <= current:
                current = trial
                packing.swap(i, j, f)
                order[i], order[j] = order[j], order[i]
        if best is None or current < best:
            best_order, best = order.copy(), current
    pairs = sum(_pairs(n, n, causal) for n in lengths.tolist())
    if count > 1 and size > 1 and best[0] * size > _PACK_BALANCED * pairs:
        order, current = _anneal(lengths, _greedy_order(lengths, size, causal), size, causal, tries, rng)
        if current < best:
            best_order, best = order, current
    return best_order, np.concatenate([[0], np.cumsum(lengths[best_order])])


# pack_documents' second phase runs where the first leaves the busiest rank's work above
# this many times the mean (bench/README.md, Long context, "Seventeenth session": 1000
# random documents on 64 ranks 1.47 -> 1.11-1.18, 4096 on 64 ranks 1.13 -> 1.003).
_PACK_BALANCED = 1.05
_PACK_TEMPERATURE = 0.01  # the annealing's starting temperature, in units of the mean work


def _pairs(n: int, length: int, causal: bool) -> int:
    """Query–key pairs of the first ``n`` queries of a document of ``length`` tokens."""
    return n * (n + 1) // 2 if causal else n * length


def _greedy_order(lengths: np.ndarray, size: int, causal: bool) -> np.ndarray:
    """Documents by work, largest first, each to the least loaded rank whose block still
    has room for it (else the one with the most room), ranks in order, each rank's
    documents longest first: the annealing's start (:func:`pack_documents`)."""
    lens = lengths.tolist()
    block = sum(lens) // size
    work = [_pairs(n, n, causal) for n in lens]
    tokens, load, ranks = [0] * size, [0] * size, [[] for _ in range(size)]
    for d in sorted(range(len(lens)), key=lambda d: -work[d]):
        fits = [r for r in range(size) if tokens[r] + lens[d] <= block]
        r = min(fits, key=load.__getitem__) if fits else min(range(size), key=tokens.__getitem__)
        ranks[r].append(d)
        tokens[r] += lens[d]
        load[r] += work[d]
    return np.array([d for docs in ranks for d in sorted(docs, key=lambda d: -lens[d])], dtype=np.int64)


def _anneal(lengths: np.ndarray, order: np.ndarray, size: int, causal: bool, tries: int, rng):
    """Simulated annealing of ``order``: ``tries`` swaps of a document on the busiest
    (even tries) or idlest (odd) rank with one drawn anywhere, a worse order accepted with
    probability exp(−Δ / T), Δ the busiest rank's work over the mean and T falling
    linearly from :data:`_PACK_TEMPERATURE` to 0. Returns the best order seen and its
    :meth:`_Packing.cost`."""
    order = order.copy()
    count = len(order)
    packing = _Packing(lengths[order].tolist(), size, causal)
    mean = packing.f[-1] / size
    work = packing.works(packing.f)
    current = packing.cost(packing.f)
    best, best_order = current, order.copy()
    picks, others, accept = rng.random(tries).tolist(), rng.integers(count, size=tries).tolist(), rng.random(tries)
    for t in range(tries):
        r = work.index(max(work) if t % 2 == 0 else min(work))
        first = max(bisect.bisect_right(packing.cu, r * packing.block, 0, count) - 1, 0)
        end = bisect.bisect_left(packing.cu, (r + 1) * packing.block, first + 1, count + 1)
        i, j = first + int(picks[t] * (end - first)), others[t]
        if i == j or packing.lens[i] == packing.lens[j]:
            continue
        i, j = min(i, j), max(i, j)
        f = packing.swapped(i, j)
        trial = packing.cost(f)
        temperature = _PACK_TEMPERATURE * (1 - t / tries)
        worse = (trial[0] - current[0]) / mean
        if trial <= current or (temperature > 0 and accept[t] < math.exp(-worse / temperature)):
            current = trial
            packing.swap(i, j, f)
            order[i], order[j] = order[j], order[i]
            work = packing.works(f)
            if current < best:
                best, best_order = current, order.copy()
    return best_order, best


class _Packing:
    """Documents in one order on ``contiguous`` ranks, for :func:`pack_documents`'s search:
    the pairs before each rank boundary (``f``, from which :func:`rank_work` takes each
    rank's work), kept up to date under swaps of two documents. A tried swap evaluates
    only the boundaries between the two documents, each by one search; exact integers."""

    def __init__(self, lens: list, size: int, causal: bool):
        self.lens, self.size, self.causal = lens, size, causal
        self.cu, self.before = [0], [0]  # document starts; pairs of the documents before each
        for n in lens:
            self.cu.append(self.cu[-1] + n)
            self.before.append(self.before[-1] + self._pairs(n, n))
        self.block = self.cu[-1] // size
        self.f = [self._f(r * self.block) for r in range(size)] + [self.before[-1]]

    def _pairs(self, n: int, length: int) -> int:
        return _pairs(n, length, self.causal)

    def _f(self, t: int) -> int:
        """Pairs of the queries before position ``t``."""
        if not self.lens:
            return 0
        d = min(max(bisect.bisect_right(self.cu, t, 0, len(self.lens)) - 1, 0), len(self.lens) - 1)
        return self.before[d] + self._pairs(t - self.cu[d], self.lens[d])

    def _moved(self, i: int, j: int) -> range:
        """The rank boundaries (1 … size − 1) from document ``i``'s start to ``j``'s end."""
        return range(max(1, -(-self.cu[i] // self.block)), min(self.size, -(-self.cu[j + 1] // self.block)))

    def swapped(self, i: int, j: int) -> list:
        """``f`` with the documents at positions ``i`` < ``j`` swapped (nothing changes)."""
        lens, cu, before = self.lens, self.cu, self.before
        a, b = lens[i], lens[j]
        shift, extra = b - a, self._pairs(b, b) - self._pairs(a, a)
        f = list(self.f)
        for r in self._moved(i, j):
            t = r * self.block
            if t < cu[i] + b:  # in the document now at i (b tokens)
                f[r] = before[i] + self._pairs(t - cu[i], b)
            else:  # documents i + 1 … j, moved by shift; the one at j is now a tokens long
                d = bisect.bisect_right(cu, t - shift, i + 1, j + 1) - 1
                f[r] = before[d] + extra + self._pairs(t - cu[d] - shift, a if d == j else lens[d])
        return f

    def swap(self, i: int, j: int, f: list) -> None:
        """Swap the documents at positions ``i`` < ``j``; ``f``: :meth:`swapped`'s."""
        lens, cu, before = self.lens, self.cu, self.before
        shift = lens[j] - lens[i]
        extra = self._pairs(lens[j], lens[j]) - self._pairs(lens[i], lens[i])
        lens[i], lens[j] = lens[j], lens[i]
        cu[i + 1:j + 1] = [c + shift for c in cu[i + 1:j + 1]]
        before[i + 1:j + 1] = [p + extra for p in before[i + 1:j + 1]]
        self.f = f

    @staticmethod
    def works(f: list) -> list:
        """Each rank's work, from ``f`` (:attr:`f` or :meth:`swapped`'s)."""
        return [f[r + 1] - f[r] for r in range(len(f) - 1)]

    @staticmethod
    def cost(f: list) -> tuple[int, int]:
        """(the largest rank's work, the sum of the squared works)."""
        work = _Packing.works(f)
        return max(work), sum(w * w for w in work)


def _global_length(seqlen: int, size: int, layout: str) -> int:
    chunks = 2 * size if layout == "zigzag" else size
    if seqlen % chunks:
        raise ValueError(f"seqlen={seqlen} must be divisible by {chunks} for layout={layout!r} on {size} ranks")
    return seqlen // size


def _comm(comm):
    if comm is None:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return comm


def shard(x, comm=None, *, layout: str = "zigzag", axis: int = 1):
    """This rank's part of a global array, as a new contiguous array.

    Parameters
    ----------
    x : array, the whole sequence on every rank, e.g. ``(batch, seqlen, heads, head_dim)``.
    comm : MPI intracommunicator (default ``MPI.COMM_WORLD``).
    layout : ``"contiguous"``, ``"zigzag"`` or ``"striped"``.
    axis : the sequence axis (1 for q/k/v, 2 for lse ``(batch, heads, seqlen)``).

    Returns
    -------
    The same kind of array with ``seqlen / size`` tokens along ``axis``.
    """
    comm = _comm(comm)
    _check_layout(layout)
    axis = axis % x.ndim
    seqlen_local = _global_length(x.shape[axis], comm.size, layout)
    index = [slice(None)] * x.ndim
    parts = []
    for seg in segments(layout, comm.rank, comm.size, seqlen_local):
        index[axis] = slice(seg.start, seg.last + 1, seg.stride)
        parts.append(x[tuple(index)])
    xp = _array_module(x)
    return xp.ascontiguousarray(xp.concatenate(parts, axis=axis))


def unshard(x_local, comm=None, *, layout: str = "zigzag", axis: int = 1):
    """Gather every rank's part into the whole sequence (on every rank); inverse of :func:`shard`.

    CuPy arrays are gathered through host memory (this is a utility, not a hot path).
    """
    comm = _comm(comm)
    _check_layout(layout)
    axis = axis % x_local.ndim
    xp = _array_module(x_local)
    host = np.ascontiguousarray(x_local.get() if xp is not np else x_local)
    gathered = np.empty((comm.size,) + host.shape, dtype=host.dtype)
    comm.Allgather(host.view(np.uint8), gathered.view(np.uint8))
    seqlen_local = host.shape[axis]
    shape = list(host.shape)
    shape[axis] = seqlen_local * comm.size
    out = np.empty(shape, dtype=host.dtype)
    index = [slice(None)] * host.ndim
    for r in range(comm.size):
        index[axis] = positions(layout, r, comm.size, seqlen_local)
        out[tuple(index)] = gathered[r]
    return out if xp is np else xp.asarray(out)


def _array_module(x):
    from mpiring._xp import array_module

    return array_module(x)
