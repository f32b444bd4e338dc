"""Blockwise attention on whole arrays of one array module (BLAS matmuls, tiled).

Written against the NumPy API so that it runs on NumPy (the CPU path) and on
CuPy (a cuBLAS fallback for head dims the CUDA kernels don't cover). The ring
loop in :mod:`mpiring.api` calls it once per ring step; it never holds more than
one ``(batch, heads, tile_q, tile_k)`` tile of scores.

Internal layouts (G = heads // heads_kv, the GQA group; row order (token, g)
so that a query tile is a free reshape and K/V are never repeated):

* ``q``, ``acc``, ``dq``: ``(B, Hkv, Sq, G, D)`` compute dtype
* ``m``, ``l``, ``lse``, ``delta``: ``(B, Hkv, Sq, G)`` compute dtype
* travelling K/V: ``(2, B, Hkv, Sk, D)`` input dtype; dK/dV: same shape, compute dtype

The softmax scale is folded into q once: s = (q·scale)·kᵀ, dk = dsᵀ·(q·scale).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mpiring._xp import compute_dtype
from mpiring.layout import Mask, Segment

# Score-tile budget in elements (batch·heads·tile_q·tile_k). 2**21 fp32 = 8 MiB
# keeps a tile in a CPU's cache hierarchy; a GPU wants fewer, larger launches.
_TILE_BUDGET = {"numpy": 2**21, "cupy": 2**26}


def _tile_size(budget: int, batch_heads: int) -> int:
    side = int((budget / max(batch_heads, 1)) ** 0.5)
    return max(32, min(2048, side - side % 16))


def narrow_view(buf, shape, dtype):
    """An array of ``shape`` and ``dtype`` over the first bytes of the contiguous ``buf``
    (at least as many), e.g. bf16 dK/dV in the memory of a float32 partial buffer."""
    n = int(np.prod(shape))
    return buf.reshape(-1).view(np.uint8)[:n * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


@dataclass
class _Tile:
    lo: int  # local row range [lo, hi)
    hi: int
    pos_first: int  # global position of the first and last row (positions increase)
    pos_last: int


def _tiles(segs: tuple[Segment, ...], size: int, doc: np.ndarray | None = None) -> list[_Tile]:
    """Tiles that never straddle a segment, so each tile's positions are one arithmetic run,
    nor (``doc``: document of each local row) a document: a tile pair is then either in one
    document or skipped, and packed documents cost their own work, not their tiles'."""
    tiles, offset = [], 0
    for seg in segs:
        cuts = list(range(0, seg.length, size))
        if doc is not None and seg.length > 1:
            run = doc[offset : offset + seg.length]
            cuts = sorted(set(cuts).union((np.flatnonzero(run[1:] != run[:-1]) + 1).tolist()))
        cuts.append(seg.length)
        for a, b in zip(cuts, cuts[1:]):
            tiles.append(_Tile(offset + a, offset + b, seg.start + seg.stride * a, seg.start + seg.stride * (b - 1)))
        offset += seg.length
    return tiles


def _positions(segs: tuple[Segment, ...]) -> np.ndarray:
    if not segs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([s.start + s.stride * np.arange(s.length, dtype=np.int64) for s in segs])


class _TilePairs:
    """Which (q tile, k tile) pairs of one ring step have work, and which need a mask."""

    def __init__(self, xp, q_segs, k_segs, mask: Mask, tile_q: int, tile_k: int):
        self.xp, self.mask = xp, mask
        qpos, kpos = _positions(q_segs), _positions(k_segs)
        self.qpos, self.kpos = xp.asarray(qpos), xp.asarray(kpos)
        qdoc = kdoc = None
        if mask.cu_seqlens is not None:
            self.qdoc_host, self.kdoc_host = qdoc, kdoc = mask.documents(qpos), mask.documents(kpos)
            self.qdoc, self.kdoc = xp.asarray(qdoc), xp.asarray(kdoc)
        self.q_tiles, self.k_tiles = _tiles(q_segs, tile_q, qdoc), _tiles(k_segs, tile_k, kdoc)
        self._k_by_doc = None
        if kdoc is not None:  # each tile lies in one document: pair tiles of the same one
            self._k_by_doc = {}
            for kt in self.k_tiles:
                self._k_by_doc.setdefault(int(kdoc[kt.lo]), []).append(kt)

    def work(self, qt: _Tile) -> list[tuple[_Tile, str]]:
        """The key tiles that query tile ``qt`` attends to, with their class ('full', 'mask')."""
        cands = self.k_tiles if self._k_by_doc is None else self._k_by_doc.get(int(self.qdoc_host[qt.lo]), [])
        return [(kt, kind) for kt in cands if (kind := self.classify(qt, kt)) != "skip"]

    def classify(self, qt: _Tile, kt: _Tile) -> str:
        """'skip' (no allowed pair), 'full' (all allowed) or 'mask'."""
        m, right = self.mask, self.mask.right_bound
        if right is not None and kt.pos_first > qt.pos_last + right:
            return "skip"
        if m.left is not None and kt.pos_last < qt.pos_first - m.left:
            return "skip"
        full = (right is None or kt.pos_last <= qt.pos_first + right) and (
            m.left is None or kt.pos_first >= qt.pos_last - m.left
        )
        if m.cu_seqlens is not None:
            qd = self.qdoc_host[qt.lo], self.qdoc_host[qt.hi - 1]
            kd = self.kdoc_host[kt.lo], self.kdoc_host[kt.hi - 1]
            if qd[1] < kd[0] or kd[1] < qd[0]:
                return "skip"
            full = full and qd[0] == qd[1] == kd[0] == kd[1]
        return "full" if full else "mask"

    def allowed(self, qt: _Tile, kt: _Tile):
        """Boolean ``(tile_q, 1, tile_k)``, broadcast over the GQA group axis."""
        xp, m, right = self.xp, self.mask, self.mask.right_bound
        diff = self.qpos[qt.lo : qt.hi, None] - self.kpos[None, kt.lo : kt.hi]
        ok = xp.ones(diff.shape, dtype=bool)
        if m.left is not None:
            ok &= diff <= m.left
        if right is not None:
            ok &= -diff <= right
        if m.cu_seqlens is not None:
            ok &= self.qdoc[qt.lo : qt.hi, None] == self.kdoc[None, kt.lo : kt.hi]
        return ok[:, None, :]


def record_event(xp):
    """None on NumPy (synchronous); on CuPy an event recorded on the current stream after
    the work queued so far, which the GPU transports wait on (their readiness tokens)."""
    if xp is np:
        return None
    event = xp.cuda.Event(block=False, disable_timing=True)
    event.record()
    return event


@dataclass
class FwdState:
    q: object  # (B, Hkv, Sq, G, D), pre-scaled
    acc: object
    m: object
    l: object
    out_dtype: np.dtype
    shape: tuple  # (B, Sq, H, D)


@dataclass
class BwdState:
    q: object  # pre-scaled, as FwdState.q
    dout: object  # (B, Hkv, Sq, G, D)
    lse: object  # (B, Hkv, Sq, G); +inf where the row had no keys (so p = 0)
    delta: object  # rowsum(dout * out)
    dq: object
    scale: float
    out_dtype: np.dtype
    shape: tuple


class BlockwiseBackend:
    """The CPU ring's compute (and a CuPy fallback): one method per ring-loop stage."""

    seq_axis = 3  # of the travelling K/V and dK/dV buffers (head-major)
    owns_packed_kv = True  # pack_kv makes a copy, which later blocks may arrive in

    def __init__(self, xp):
        self.xp = xp
        self.name = "numpy" if xp is np else xp.__name__
        self._budget = _TILE_BUDGET.get(self.name, _TILE_BUDGET["numpy"])

    # --- layout conversions -------------------------------------------------------------
    def _split_heads(self, x, heads_kv: int, dtype):
        """(B, S, H, D) → (B, Hkv, S, G, D) contiguous in ``dtype``: a view of ``x`` where
        no copy is needed (one KV head, same dtype), so never modify it in place."""
        b, s, h, d = x.shape
        y = x.reshape(b, s, heads_kv, h // heads_kv, d).transpose(0, 2, 1, 3, 4)
        return self.xp.ascontiguousarray(y.astype(dtype, copy=False))

    def _merge_heads(self, x, dtype):
        """(B, Hkv, S, G, D) → (B, S, H, D) in ``dtype``."""
        b, hkv, s, g, d = x.shape
        return self.xp.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(b, s, hkv * g, d).astype(dtype))

    def _rows(self, x, heads_kv: int):
        """(B, H, S) → (B, Hkv, S, G)."""
        b, h, s = x.shape
        return x.reshape(b, heads_kv, h // heads_kv, s).transpose(0, 1, 3, 2)

    def pack_kv(self, k, v):
        """The travelling K/V buffer ``(2, B, Hkv, Sk, D)`` in the input dtype (made for one
        rank too: the blockwise steps read it head-major)."""
        xp = self.xp
        return xp.ascontiguousarray(xp.stack([k, v]).transpose(0, 1, 3, 2, 4))

    def record(self):
        """A completion token for the work queued so far (see :func:`record_event`)."""
        return record_event(self.xp)

    def kv_buffer(self, kv, zero: bool = False):
        """A buffer that K/V blocks like ``kv`` (:meth:`pack_kv`) arrive in (zeroed: ``zero``)."""
        return self.xp.zeros_like(kv) if zero else self.xp.empty_like(kv)

    def empty_dkv(self, kv):
        """dK/dV partials like :meth:`zeros_dkv`, uninitialised (the ring clears what it uses)."""
        return self.xp.empty(kv.shape, dtype=compute_dtype(kv.dtype))

    def zeros_dkv(self, kv):
        return self.xp.zeros(kv.shape, dtype=compute_dtype(kv.dtype))

    def dkv_out(self, dkv, dtype):
        """An uninitialised array like the partials ``dkv`` in the output ``dtype`` (where a
        block's finished dK/dV comes home narrowed; :meth:`bwd_end` takes it as is)."""
        return self.xp.empty(dkv.shape, dtype=dtype)

    def narrow_dkv(self, dkv, scratch, dtype, rows=None):
        """The partials ``dkv`` (rows [lo, hi) along :attr:`seq_axis`; None: all) in ``dtype``
        as :meth:`bwd_end` would cast them, written into the memory of ``scratch`` (a free
        partial buffer; None: a new array). The other rows are left as they are."""
        out = self.dkv_out(dkv, dtype) if scratch is None else narrow_view(scratch, dkv.shape, dtype)
        part = (slice(None),) * self.seq_axis + (slice(*rows) if rows is not None else slice(None),)
        out[part] = dkv[part]
        return out

    def _tile_pairs(self, batch_heads, q_segs, k_segs, mask):
        tile = _tile_size(self._budget, batch_heads)
        return _TilePairs(self.xp, q_segs, k_segs, mask, tile, tile)

    # --- forward ------------------------------------------------------------------------
    def fwd_begin(self, q, heads_kv: int, scale: float) -> FwdState:
        xp, cdt = self.xp, compute_dtype(q.dtype)
        # Not in place: with one KV head the split is a view of the caller's q.
        qc = self._split_heads(q, heads_kv, cdt) * cdt.type(scale)
        rows = qc.shape[:4]
        return FwdState(
            q=qc, acc=xp.zeros(qc.shape, cdt), m=xp.full(rows, -np.inf, cdt), l=xp.zeros(rows, cdt),
            out_dtype=q.dtype, shape=q.shape,
        )

    def fwd_step(self, st: FwdState, kv, q_segs, k_segs, mask: Mask) -> None:
        """Continue the online softmax of the local Q against one K/V block, in place."""
        xp = self.xp
        cdt = st.q.dtype
        k, v = kv[0].astype(cdt, copy=False), kv[1].astype(cdt, copy=False)
        b, hkv, _, g, d = st.q.shape
        pairs = self._tile_pairs(b * hkv * g, q_segs, k_segs, mask)
        for qt in pairs.q_tiles:
            tq = qt.hi - qt.lo
            work = pairs.work(qt)
            if not work:
                continue
            q_t = st.q[:, :, qt.lo : qt.hi].reshape(b, hkv, tq * g, d)
            m = st.m[:, :, qt.lo : qt.hi].reshape(b, hkv, tq * g)
            l = st.l[:, :, qt.lo : qt.hi].reshape(b, hkv, tq * g)
            acc = st.acc[:, :, qt.lo : qt.hi].reshape(b, hkv, tq * g, d)
            for kt, kind in work:
                s = q_t @ k[:, :, kt.lo : kt.hi].swapaxes(-1, -2)
                if kind == "mask":
                    s = s.reshape(b, hkv, tq, g, -1)
                    s = xp.where(pairs.allowed(qt, kt), s, -np.inf).reshape(b, hkv, tq * g, kt.hi - kt.lo)
                m_new = xp.maximum(m, s.max(axis=-1))
                # Rows with no allowed key so far keep m = −inf; shift them by 0 so
                # that exp(−inf − 0) = 0 instead of exp(−inf + inf) = NaN.
                shift = xp.where(xp.isfinite(m_new), m_new, 0)
                p = xp.exp(s - shift[..., None])
                alpha = xp.exp(m - shift)
                l = alpha * l + p.sum(axis=-1)
                acc = alpha[..., None] * acc + p @ v[:, :, kt.lo : kt.hi]
                m = m_new
            st.m[:, :, qt.lo : qt.hi] = m.reshape(b, hkv, tq, g)
            st.l[:, :, qt.lo : qt.hi] = l.reshape(b, hkv, tq, g)
            st.acc[:, :, qt.lo : qt.hi] = acc.reshape(b, hkv, tq, g, d)

    def fwd_end(self, st: FwdState):
        """``out`` (B, Sq, H, D) in the input dtype; ``lse`` (B, H, Sq): float32 (float64 for
        float64 inputs), −inf and out = 0 on rows with no allowed key."""
        xp = self.xp
        has_keys = st.l != 0  # NaN (a poisoned row) is not "no keys": it stays NaN
        safe_l = xp.where(has_keys, st.l, 1)
        out = self._merge_heads(st.acc / safe_l[..., None], st.out_dtype)
        lse = xp.where(has_keys, st.m + xp.log(safe_l), -np.inf)
        b, hkv, s, g = lse.shape
        lse_dtype = np.float64 if st.q.dtype == np.float64 else np.float32
        lse = xp.ascontiguousarray(lse.transpose(0, 1, 3, 2).reshape(b, hkv * g, s).astype(lse_dtype))
        return out, lse

    # --- backward -----------------------------------------------------------------------
    def bwd_begin(self, dout, q, out, lse, heads_kv: int, scale: float) -> BwdState:
        xp, cdt = self.xp, compute_dtype(q.dtype)
        # Not in place: with one KV head the split is a view of the caller's q.
        qc = self._split_heads(q, heads_kv, cdt) * cdt.type(scale)
        do = self._split_heads(dout, heads_kv, cdt)
        delta = (do * self._split_heads(out, heads_kv, cdt)).sum(axis=-1)
        lse_rows = self._rows(lse, heads_kv).astype(cdt)
        lse_rows = xp.ascontiguousarray(xp.where(xp.isfinite(lse_rows), lse_rows, np.inf))
        return BwdState(
            q=qc, dout=do, lse=lse_rows, delta=delta, dq=xp.zeros(qc.shape, cdt), scale=scale,
            out_dtype=q.dtype, shape=q.shape,
        )

    def bwd_step(self, st: BwdState, kv, dkv, q_segs, k_segs, mask: Mask, fresh: bool = False,
                 heads: tuple[int, int] | None = None) -> None:
        """Add this block's dQ to the local accumulator and its dK/dV into ``dkv``;
        ``fresh``: ``dkv`` holds nothing yet (zeroed here, so the caller need not).
        ``heads``: only KV heads [lo, hi) and their query heads (None: all)."""
        if heads is not None:  # the same step on views of those heads (KV-head-major: axis 1)
            part = slice(*heads)
            sub = replace(st, q=st.q[:, part], dout=st.dout[:, part], lse=st.lse[:, part],
                          delta=st.delta[:, part], dq=st.dq[:, part])
            st, kv, dkv = sub, kv[:, :, part], dkv[:, :, part]
        xp = self.xp
        if fresh:
            dkv[...] = 0
        cdt = st.q.dtype
        k, v = kv[0].astype(cdt, copy=False), kv[1].astype(cdt, copy=False)
        dk, dv = dkv[0], dkv[1]
        b, hkv, _, g, d = st.q.shape
        pairs = self._tile_pairs(b * hkv * g, q_segs, k_segs, mask)
        for qt in pairs.q_tiles:
            tq = qt.hi - qt.lo
            work = pairs.work(qt)
            if not work:
                continue
            rows = slice(qt.lo, qt.hi)
            q_t = st.q[:, :, rows].reshape(b, hkv, tq * g, d)
            do_t = st.dout[:, :, rows].reshape(b, hkv, tq * g, d)
            lse_t = st.lse[:, :, rows].reshape(b, hkv, tq * g, 1)
            delta_t = st.delta[:, :, rows].reshape(b, hkv, tq * g, 1)
            dq_t = st.dq[:, :, rows].reshape(b, hkv, tq * g, d)
            for kt, kind in work:
                cols = slice(kt.lo, kt.hi)
                s = q_t @ k[:, :, cols].swapaxes(-1, -2)
                if kind == "mask":
                    s = s.reshape(b, hkv, tq, g, -1)
                    s = xp.where(pairs.allowed(qt, kt), s, -np.inf).reshape(b, hkv, tq * g, kt.hi - kt.lo)
                p = xp.exp(s - lse_t)
                dv[:, :, cols] += p.swapaxes(-1, -2) @ do_t
                ds = p * (do_t @ v[:, :, cols].swapaxes(-1, -2) - delta_t)
                dq_t += ds @ k[:, :, cols]
                dk[:, :, cols] += ds.swapaxes(-1, -2) @ q_t
            st.dq[:, :, rows] = dq_t.reshape(b, hkv, tq, g, d)

    def bwd_end(self, st: BwdState, dkv, kv_dtype):
        """``dq`` (B, Sq, H, D) and ``dk``, ``dv`` (B, Sk, Hkv, D), all in the input dtype
        (``dkv``: the float partials, or already in the input dtype)."""
        dq = self._merge_heads(st.dq * st.q.dtype.type(st.scale), st.out_dtype)
        dk = self.xp.ascontiguousarray(dkv[0].transpose(0, 2, 1, 3).astype(kv_dtype, copy=False))
        dv = self.xp.ascontiguousarray(dkv[1].transpose(0, 2, 1, 3).astype(kv_dtype, copy=False))
        return dq, dk, dv
