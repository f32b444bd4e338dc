"""Message counts per call through a counting transport: catches silent schedule bugs."""

import numpy as np
import pytest

import mpiring
from mpiring.transport import MpiHostTransport


def _expected_sends(comm, layout, causal, seqlen_local, cu_seqlens=None):
    """(K/V, dK/dV) messages this rank sends, from brute force over positions: block b
    goes on from rank b+s (step s) while a rank further along, b+s+1 … b+N−1, attends to
    it; its dK/dV partial goes with it, and from the last rank that attends to it (if
    not b itself) straight home to b; where no block goes more than one hop, b keeps its
    own part and only b+1's goes there and back."""
    size, rank = comm.Get_size(), comm.Get_rank()
    pos = [mpiring.layout.positions(layout, r, size, seqlen_local) for r in range(size)]
    doc = None if cu_seqlens is None else (lambda p: np.searchsorted(cu_seqlens, p, side="right"))

    def sees(r, b):  # does rank r's Q attend to any key of rank b's block?
        qp, kp = pos[r][:, None], pos[b][None, :]
        ok = kp <= qp if causal else np.ones((qp.size, kp.size), bool)
        if doc is not None:
            ok = ok & (doc(qp) == doc(kp))
        return bool(ok.any())

    def last(b):  # hops to the last rank that attends to block b (0: none but b, or none)
        return max([t for t in range(size) if sees((b + t) % size, b)], default=0)

    reach = [last(b) for b in range(size)]
    kv = sum(reach[(rank - s) % size] > s for s in range(size - 1))
    # With no block going further than one hop, its owner keeps its own part (no send at step 0)
    short = size > 2 and max(reach) == 1
    dkv = sum(reach[(rank - s) % size] >= max(s, 1) and not (s == 0 and short) for s in range(size))
    return kv, dkv


@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_hops_per_call(comm, seed, layout, causal):
    """K/V hops forward: N−1, less the steps whose block no rank further along needs
    (causal contiguous: rank r < N−1 forwards blocks 0…r, the last rank none, N(N−1)/2 in
    all); backward adds the dK/dV hops: N on a full ring (the last brings the owner's
    dK/dV home); causal contiguous: r+1 on rank r < N−1 (the partial of block 0…r, sent on
    or home), N−1 on the last rank (none for its own block); none at N=1."""
    size = comm.Get_size()
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(4))
    transport = MpiHostTransport(mpiring.api.private_comm(comm))
    kv_sends, dkv_sends = _expected_sends(comm, layout, causal, 8)
    rank = comm.Get_rank()
    contiguous_causal = (layout, causal) == ("contiguous", True)
    assert kv_sends == ((rank + 1 if rank < size - 1 else 0) if contiguous_causal else size - 1)
    full = size if size > 1 else 0
    assert dkv_sends == ((rank + 1 if rank < size - 1 else size - 1) if contiguous_causal and size > 1 else full)
    out, lse = mpiring.ring_attention(q, k, v, comm, causal=causal, layout=layout, transport=transport)
    assert transport.hops == kv_sends and transport.pending == 0
    assert transport.bytes_sent == kv_sends * 2 * k.nbytes
    mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, causal=causal, layout=layout, transport=transport)
    assert transport.hops == 2 * kv_sends + dkv_sends and transport.pending == 0


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_documents_move_only_the_blocks_they_need(comm, seed, layout):
    """Packed documents: a K/V block travels only as far as a rank whose queries share a
    document with it, its dK/dV one hop further (home), and the results still match the
    oracle (receivers of nothing compute nothing). Documents on rank boundaries
    (contiguous): nothing moves at all, forward or backward."""
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
        kv_sends, dkv_sends = _expected_sends(comm, layout, True, s_local, cu)
        assert transport.hops == kv_sends
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
