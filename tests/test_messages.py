"""Message counts per call through a counting transport: catches silent schedule bugs."""

import numpy as np
import pytest

import mpiring
from mpiring.transport import MpiHostTransport


@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_hops_per_call(comm, seed, layout, causal):
    """N−1 K/V hops forward (even for fully masked steps: K/V still travels);
    N−1 K/V + N dK/dV hops backward (the last brings the owner's dK/dV home); none at N=1."""
    size = comm.Get_size()
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(4))
    transport = MpiHostTransport(mpiring.api.private_comm(comm))
    out, lse = mpiring.ring_attention(q, k, v, comm, causal=causal, layout=layout, transport=transport)
    assert transport.hops == size - 1 and transport.pending == 0
    mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, causal=causal, layout=layout, transport=transport)
    assert transport.hops == (size - 1) + (2 * size - 1 if size > 1 else 0) and transport.pending == 0


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
