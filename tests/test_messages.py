"""Message counts per call through a counting transport: catches silent schedule bugs."""

import numpy as np
import pytest

import mpiring
from mpiring._xp import bfloat16
from mpiring.transport import MpiHostTransport


def _expected_sends(comm, layout, causal, seqlen_local, cu_seqlens=None, row_bytes=(0, 0), finished_row=None):
    """(K/V, dK/dV) messages this rank sends, and their bytes, from brute force over
    positions: block b goes on from rank b+s (step s) while a rank further along, b+s+1 …
    b+N−1, attends to it, with the rows that those ranks attend to (hull); its dK/dV
    partial goes with it, with the rows its contributors attend to, and from the last rank
    that attends to it (if not b itself) straight home to b; where no block goes more than
    one hop (two ranks: always), b keeps its own part and only b+1's goes there and back.
    ``row_bytes``: bytes of one K/V row (K and V), one dK/dV row; ``finished_row``: of one
    row of a finished dK/dV sum on its way home (in the output dtype; default: as partials)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    pos = [mpiring.layout.positions(layout, r, size, seqlen_local) for r in range(size)]
    doc = None if cu_seqlens is None else (lambda p: np.searchsorted(cu_seqlens, p, side="right"))

    def rows(r, b):  # block b's rows (local indices) that rank r's Q attends to
        qp, kp = pos[r][:, None], pos[b][None, :]
        ok = kp <= qp if causal else np.ones((qp.size, kp.size), bool)
        if doc is not None:
            ok = ok & (doc(qp) == doc(kp))
        return np.flatnonzero(ok.any(axis=0))

    def hull(b, ts):  # rows in the hull of what ranks b+t (t in ts) attend to, of block b
        found = np.concatenate([rows((b + t) % size, b) for t in ts] + [np.zeros(0, int)])
        return 0 if found.size == 0 else int(found.max() - found.min() + 1)

    def last(b):  # hops to the last rank that attends to block b (0: none but b, or none)
        return max([t for t in range(size) if rows((b + t) % size, b).size], default=0)

    reach = [last(b) for b in range(size)]
    kv = [(rank - s) % size for s in range(size - 1) if reach[(rank - s) % size] > s]
    kv_bytes = sum(hull(b, range((rank - b) % size + 1, reach[b] + 1)) for b in kv) * row_bytes[0]
    # With no block going further than one hop, its owner keeps its own part (no send at step 0)
    short = size > 1 and max(reach) == 1
    dkv = [(s, (rank - s) % size) for s in range(size) if reach[(rank - s) % size] >= max(s, 1)
           and not (s == 0 and short)]
    finished_row = row_bytes[1] if finished_row is None else finished_row
    dkv_bytes = sum(hull(b, range(1 if short else 0, s + 1))
                    * (finished_row if s == reach[b] and not short else row_bytes[1]) for s, b in dkv)
    return len(kv), len(dkv), kv_bytes, dkv_bytes


@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_hops_per_call(comm, seed, layout, causal, dtype):
    """K/V hops forward: N−1, less the steps whose block no rank further along needs
    (causal contiguous: rank r < N−1 forwards blocks 0…r, the last rank none, N(N−1)/2 in
    all); backward adds the dK/dV hops: N on a full ring (the last brings the owner's
    dK/dV home); causal contiguous: r+1 on rank r < N−1 (the partial of block 0…r, sent on
    or home), N−1 on the last rank (none for its own block); none at N=1; at N=2 the
    owner keeps its part: one (rank 0 none with causal contiguous). dK/dV partials travel
    in float32; a finished sum goes home in the input dtype (bfloat16: half the bytes)."""
    size = comm.Get_size()
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((1, 8, 2, 4)).astype(dtype) for _ in range(4))
    transport = MpiHostTransport(mpiring.api.private_comm(comm))
    row = 2 * k[0, 0].nbytes  # a K row and a V row (batch 1), and a finished dK/dV row
    partial_row = 2 * k[0, 0].size * 4  # float32
    kv_sends, dkv_sends, kv_bytes, dkv_bytes = _expected_sends(comm, layout, causal, 8, row_bytes=(row, partial_row),
                                                               finished_row=row)
    rank = comm.Get_rank()
    contiguous_causal = (layout, causal) == ("contiguous", True)
    assert kv_sends == ((rank + 1 if rank < size - 1 else 0) if contiguous_causal else size - 1)
    # two ranks: each block's owner keeps its own part, one partial per block goes home
    full = {1: 0, 2: 1}.get(size, size)
    if contiguous_causal and size > 1:
        full = rank if size == 2 else (rank + 1 if rank < size - 1 else size - 1)
    assert dkv_sends == full
    out, lse = mpiring.ring_attention(q, k, v, comm, causal=causal, layout=layout, transport=transport)
    assert transport.hops == kv_sends and transport.pending == 0
    # zigzag, causal: block 0 is the only one that no rank before it attends to, and ranks
    # after it see its first half only: it travels as that half.
    assert transport.bytes_sent == kv_bytes
    if contiguous_causal:
        assert kv_bytes == kv_sends * 2 * k.nbytes
    mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, causal=causal, layout=layout, transport=transport)
    assert transport.hops == 2 * kv_sends + dkv_sends and transport.pending == 0
    assert transport.bytes_sent == 2 * kv_bytes + dkv_bytes


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_documents_move_only_the_blocks_they_need(comm, seed, layout):
    """Packed documents: a K/V block travels only as far as a rank whose queries share a
    document with it, with only the rows those ranks attend to, its dK/dV one hop further
    (home), and the results still match the oracle (receivers of nothing compute
    nothing). Documents on rank boundaries (contiguous): nothing moves at all, forward or
    backward. (The ring's buffers start as garbage: conftest.poisoned_ring_buffers.)"""
    size = comm.Get_size()
    s_local, total = 8, 8 * size
    rng = np.random.default_rng(seed)
    cases = [(np.arange(0, total + 1, s_local), True)]  # one document per rank (contiguous: stays home)
    inner = np.sort(rng.choice(np.arange(1, total), size=min(3, total - 1), replace=False))
    cases.append((np.concatenate([[0], inner, [total]]), False))  # random boundaries
    # every document spans two ranks: each block goes one hop, its owner keeps its own part
    cases.append((np.concatenate([[0], np.arange(size) * s_local + s_local // 2, [total]]), False))
    for cu, per_rank in cases:
        q, k, v, do = (rng.standard_normal((1, total, 2, 4)) for _ in range(4))
        shard = lambda x: mpiring.shard(x, comm, layout=layout)  # noqa: E731
        transport = MpiHostTransport(mpiring.api.private_comm(comm))
        opts = dict(causal=True, layout=layout, cu_seqlens=cu)
        out, lse = mpiring.ring_attention(shard(q), shard(k), shard(v), comm, transport=transport, **opts)
        row = 2 * k[0, 0].nbytes  # a K and a V row (float64, like dK/dV)
        kv_sends, dkv_sends, kv_bytes, dkv_bytes = _expected_sends(comm, layout, True, s_local, cu, (row, row))
        assert transport.hops == kv_sends
        # contiguous: exactly the hull of the rows attended to; zigzag and striped (two or
        # strided segments): at most whole blocks
        if layout == "contiguous":
            assert transport.bytes_sent == kv_bytes
        assert kv_bytes <= transport.bytes_sent <= kv_sends * s_local * row
        sent = transport.bytes_sent
        if layout == "contiguous" and per_rank:
            assert kv_sends == dkv_sends == 0
        ref, _ = mpiring.attention_reference(q, k, v, causal=True, cu_seqlens=cu)
        np.testing.assert_allclose(out, shard(ref), rtol=1e-10, atol=1e-12)
        grads = mpiring.ring_attention_backward(shard(do), shard(q), shard(k), shard(v), out, lse, comm,
                                                transport=transport, **opts)
        refs = mpiring.attention_reference_backward(do, q, k, v, causal=True, cu_seqlens=cu)
        for g, r in zip(grads, refs):
            np.testing.assert_allclose(g, shard(r), rtol=1e-9, atol=1e-12)
        assert transport.hops == 2 * kv_sends + dkv_sends and transport.pending == 0
        if layout == "contiguous":
            assert transport.bytes_sent == 2 * sent + dkv_bytes


def test_skipped_steps_do_no_compute(comm, seed, monkeypatch):
    """Contiguous causal: rank r computes on r+1 blocks (its own and the r before it)."""
    from mpiring.backends import backend_for

    backend = backend_for(np)
    calls = []
    real_step = backend.fwd_step
    monkeypatch.setattr(backend, "fwd_step", lambda *a, **kw: calls.append(1) or real_step(*a, **kw))
    q = np.random.default_rng(seed).standard_normal((1, 4, 1, 4)).astype(np.float32)
    mpiring.ring_attention(q, q, q, comm, causal=True)
    assert len(calls) == comm.Get_rank() + 1


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_finished_dkv_home_in_the_input_dtype_is_bitwise(comm, seed, layout, monkeypatch):
    """bfloat16: each block's finished dK/dV goes home in bfloat16 (the sender casts what
    the owner would cast): the gradients are bitwise those of the float32 hop."""
    import dataclasses

    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((1, 16, 2, 8)).astype(bfloat16) for _ in range(4))
    opts = dict(causal=True, layout=layout)
    out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
    narrowed = mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, **opts)
    plan = mpiring.layout.dkv_plan

    def float32_hop(*args, **kwargs):
        p = plan(*args, **kwargs)
        steps = tuple(dataclasses.replace(step, finished=False) for step in p.steps)
        return dataclasses.replace(p, steps=steps, home_step=None)

    monkeypatch.setattr(mpiring.layout, "dkv_plan", float32_hop)
    wide = mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, **opts)
    for a, b in zip(narrowed, wide):
        assert a.dtype == b.dtype == bfloat16
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


class _HintTransport(MpiHostTransport):
    """Records each post's tag and ``background`` hint (it takes the hint, as nccl does)."""

    takes_background = True

    def __init__(self, comm):
        super().__init__(comm)
        self.posts = []

    def _post(self, send, recv, *, tag, background=False, **kwargs):
        self.posts.append((tag, background))
        return super()._post(send, recv, tag=tag, **kwargs)


@pytest.mark.parametrize("case", ["dense", "documents", "below"])
def test_background_hint(comm, seed, case, monkeypatch):
    """Exchanges hidden by ample compute go as ``background`` (a lean path: nccl's
    communicator of few channels), on both ends alike: every K/V exchange, and every dK/dV
    exchange but those after the last step (a finished dK/dV going home, which nothing
    hides). Never with documents (little compute per step), nor below the flops per byte."""
    size = comm.Get_size()
    if size == 1:
        pytest.skip("no exchanges at -n 1")
    import mpiring.api

    if case != "below":
        monkeypatch.setattr(mpiring.api, "BACKGROUND_FLOPS_PER_BYTE", 0)
    q, k, v, do = (np.random.default_rng(seed + i).standard_normal((1, 12, 2, 8)) for i in range(4))
    cu = np.array([0, 5, 12 * size]) if case == "documents" else None
    tr = _HintTransport(comm)
    out, lse = mpiring.ring_attention(q, k, v, comm, causal=True, layout="zigzag", cu_seqlens=cu, transport=tr)
    forward, tr.posts = tr.posts, []
    mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, causal=True, layout="zigzag", cu_seqlens=cu,
                                    transport=tr)
    hinted = case == "dense"
    assert forward and all(b == hinted for _, b in forward)
    kv = [b for tag, b in tr.posts if tag == mpiring.api._TAG_KV]
    dkv = [b for tag, b in tr.posts if tag == mpiring.api._TAG_DKV]
    assert kv and all(b == hinted for b in kv)
    assert dkv[-1] is False and all(b == hinted for b in dkv[:-1])
    assert len(dkv) == (size if size > 2 else 1)  # one per step; the last after the last step


def test_background_needs_flops_per_byte():
    """Half a block's flops per byte of its exchange against BACKGROUND_FLOPS_PER_BYTE
    (12,000): bf16 with 32 heads reaches it at 32k tokens per rank, not at 16k; GQA's
    smaller K/V blocks at fewer tokens; float32 needs twice bf16's tokens."""
    from mpiring.api import _background

    dense, docs = mpiring.layout.make_mask(True), mpiring.layout.make_mask(True, cu_seqlens=[0, 5, 10])
    full = [(True,) * 4] * 4

    def hint(tokens, heads_kv=32, dtype=bfloat16, backward=False, mask=dense, schedules=full):
        q, k = (1, tokens, 32, 128), (1, tokens, heads_kv, 128)
        return _background(mask, schedules, q, k, dtype, backward=backward)

    for backward in (False, True):
        assert hint(32768, backward=backward) and not hint(16384, backward=backward)
        assert hint(8192, heads_kv=8, backward=backward) and not hint(8192, backward=backward)
        assert hint(65536, dtype=np.float32, backward=backward) and not hint(32768, dtype=np.float32, backward=backward)
        assert not hint(1 << 20, mask=docs, backward=backward)
        assert not hint(1 << 20, mask=mpiring.layout.make_mask(True, window=128), backward=backward)
        assert not hint(1 << 20, schedules=[(True,) * 4] * 3 + [(True, False, True, True)], backward=backward)


@pytest.mark.parametrize("case", ["spanning documents", "full ring"])
def test_backward_defers_half_of_its_own_step(comm, seed, case, monkeypatch):
    """Where a rank keeps its own block's dK/dV at home and its last exchange sends a
    neighbour's finished partial home (layout.deferred_step), half of its step 0 (KV heads
    [H/2, H)) runs after that post instead of first; the gradients still match the oracle
    (the ring's buffers start as garbage, so a part never computed would show)."""
    from mpiring.backends import backend_for

    size, rank = comm.Get_size(), comm.Get_rank()
    s_local, total, heads, heads_kv = 8, 8 * comm.Get_size(), 4, 2
    if case == "spanning documents":  # every document spans two ranks: blocks go one hop
        cu, causal = np.concatenate([[0], np.arange(size) * s_local + s_local // 2, [total]]), True
    else:  # no documents: a two-rank ring keeps its own part; longer rings send theirs on
        cu, causal = None, False
    rng = np.random.default_rng(seed)
    q, do = (rng.standard_normal((1, total, heads, 4)) for _ in range(2))
    k, v = (rng.standard_normal((1, total, heads_kv, 4)) for _ in range(2))
    shard = lambda x: mpiring.shard(x, comm, layout="contiguous")  # noqa: E731
    opts = dict(causal=causal, layout="contiguous", cu_seqlens=cu)
    out, lse = mpiring.ring_attention(shard(q), shard(k), shard(v), comm, **opts)
    backend = backend_for(np)
    calls, real_step = [], backend.bwd_step
    monkeypatch.setattr(backend, "bwd_step", lambda *a, heads=None, **kw: calls.append(heads) or
                        real_step(*a, heads=heads, **kw))
    planned = []
    real_plan = mpiring.layout.deferred_step
    monkeypatch.setattr(mpiring.layout, "deferred_step", lambda *a: planned.append(real_plan(*a)) or planned[-1])
    grads = mpiring.ring_attention_backward(shard(do), shard(q), shard(k), shard(v), out, lse, comm, **opts)
    refs = mpiring.attention_reference_backward(do, q, k, v, causal=causal, cu_seqlens=cu)
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(g, shard(r), rtol=1e-9, atol=1e-12)
    assert len(planned) == 1
    deferred = planned[0] is not None
    if deferred:
        assert calls[0] == (0, 1) and calls[-1] == (1, 2) and all(h is None for h in calls[1:-1])
        assert len(calls) >= 3
    else:
        assert all(h is None for h in calls)
    # spanning documents: every rank but 0 computes a neighbour's block and sends it home;
    # full ring: only where two ranks make the ring
    expect = (rank > 0 and size > 1) if case == "spanning documents" else size == 2
    assert deferred == expect


def test_deferred_step_plans():
    """layout.deferred_step on the plans it must and must not defer."""
    L = mpiring.layout
    for size in (2, 3, 4):
        full = [(True,) * size] * size
        for rank in range(size):
            got = L.deferred_step(L.dkv_plan(full, rank), full[rank])
            assert got == (1 if size == 2 else None), (size, rank)
    # four ranks, every block needed one hop further (packed documents across each boundary)
    one_hop = [(True, r > 0, False, False) for r in range(4)]
    assert [L.deferred_step(L.dkv_plan(one_hop, r), one_hop[r]) for r in range(4)] == [None, 1, 1, 1]
    # a blockwise ring whose own block would be received into before the deferred part reads it
    plan = L.dkv_plan(one_hop, 1)
    assert L.deferred_step(plan, one_hop[1], [True, False, False, False]) == 1
    assert L.deferred_step(plan, one_hop[1], [True, True, False, False]) is None
    # nothing computed at step 0, or a computed step after the last send: nothing to hide
    assert L.deferred_step(plan, (False, True, False, False)) is None
    assert L.deferred_step(plan, (True, True, True, False)) is None


def test_plan_is_kept_per_problem(comm, seed, monkeypatch):
    """The ring's planning (step schedules, rows, hops, dK/dV plan) runs once per problem
    and is reused by the calls after it, whatever came between: each call below matches
    the oracle and sends exactly what the same call sent when it was planned afresh, and
    only a problem not seen before plans again (layout.step_schedule counted)."""
    size = comm.Get_size()
    s_local, total = 8, 8 * size
    rng = np.random.default_rng(seed)
    cu_a = np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), size=min(3, total - 1), replace=False)),
                           [total]])
    cu_b = np.concatenate([[0], np.arange(size) * s_local + s_local // 2, [total]])
    planned = []
    schedule = mpiring.layout.step_schedule
    monkeypatch.setattr(mpiring.layout, "step_schedule", lambda *a, **kw: planned.append(1) or schedule(*a, **kw))
    monkeypatch.setattr(mpiring.api, "_PLANS", mpiring.api._Memo(64))
    q, k, v, do = (rng.standard_normal((1, total, 2, 4)) for _ in range(4))
    problems = [dict(causal=True, layout="contiguous", cu_seqlens=cu_a),
                dict(causal=True, layout="contiguous", cu_seqlens=cu_b),
                dict(causal=True, layout="contiguous"),
                dict(causal=False, layout="contiguous", window=3),
                dict(causal=True, layout="zigzag", cu_seqlens=cu_a)]
    sent = {}
    for turn, i in enumerate([0, 1, 2, 3, 4, 0, 1, 4, 2, 3]):
        opts = problems[i]
        shard = lambda x, layout=opts["layout"]: mpiring.shard(x, comm, layout=layout)  # noqa: E731
        transport = MpiHostTransport(mpiring.api.private_comm(comm))
        before = len(planned)
        out, lse = mpiring.ring_attention(shard(q), shard(k), shard(v), comm, transport=transport, **opts)
        grads = mpiring.ring_attention_backward(shard(do), shard(q), shard(k), shard(v), out, lse, comm,
                                                transport=transport, **opts)
        # a new problem plans once (its backward shares the forward's schedule), then never
        assert len(planned) - before == (1 if turn < len(problems) else 0), (turn, i)
        messages = (transport.hops, transport.bytes_sent)
        assert sent.setdefault(i, messages) == messages, (turn, i)
        ref_opts = {key: opts[key] for key in ("causal", "window", "cu_seqlens") if key in opts}
        ref, _ = mpiring.attention_reference(q, k, v, **ref_opts)
        np.testing.assert_allclose(out, shard(ref), rtol=1e-10, atol=1e-12)
        refs = mpiring.attention_reference_backward(do, q, k, v, **ref_opts)
        for g, r in zip(grads, refs):
            np.testing.assert_allclose(g, shard(r), rtol=1e-9, atol=1e-12)


def test_plan_memo_keeps_the_most_recent():
    """mpiring.api._Memo: at most ``size`` results and ``budget`` bytes of keys, the least
    recently used out first; a key over the budget is never kept."""
    memo, made = mpiring.api._Memo(2), []
    make = lambda key: lambda: made.append(key) or key * 10  # noqa: E731
    assert [memo.get(key, make(key)) for key in (1, 2, 1, 3, 1, 2)] == [10, 20, 10, 30, 10, 20]
    assert made == [1, 2, 3, 2]  # 1 was used again before 3 came, so 2 went out
    assert list(memo.items) == [1, 2]
    memo, made = mpiring.api._Memo(8, budget=10), []
    keys = [("a", b"x" * 4), ("b", (b"y" * 4,)), ("c", b"z" * 4), ("d", b"w" * 11), ("a", b"x" * 4)]
    assert [memo.get(key, make(key[0])) for key in keys] == ["a" * 10, "b" * 10, "c" * 10, "d" * 10, "a" * 10]
    assert made == ["a", "b", "c", "d", "a"]  # c pushed a out (12 > 10 bytes); d was never kept
    assert list(memo.items) == [keys[2], keys[4]] and memo.held == 8
