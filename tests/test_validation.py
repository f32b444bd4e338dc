"""Bad input gives the same clear exception on every rank, agreed before any ring step,
and the communicator stays usable for the next call."""

import numpy as np
import pytest
from mpi4py import MPI

import mpiring


def collective_error(comm, fn):
    """Run ``fn`` on every rank; return this rank's exception and every rank's (type, message)."""
    try:
        fn()
        err = None
    except Exception as exc:  # noqa: BLE001 - we compare whatever was raised
        err = exc
    return err, comm.allgather(None if err is None else (type(err).__name__, str(err)))


def assert_raises_everywhere(comm, exc_type, match, fn):
    err, everyone = collective_error(comm, fn)
    assert err is not None, f"no exception on rank {comm.Get_rank()}; ranks saw {everyone}"
    assert len(set(everyone)) == 1, f"ranks disagree: {everyone}"
    assert isinstance(err, exc_type), f"{type(err).__name__}: {err}"
    assert match in str(err), f"{match!r} not in {str(err)!r}"
    # the next call on the same communicator still works
    q = np.ones((1, 4, 2, 8), np.float32)
    out, _ = mpiring.ring_attention(q, q, q, comm)
    np.testing.assert_allclose(out, 1.0)


def arrays(seqlen=4, heads=2, heads_kv=2, head_dim=8, dtype=np.float32, batch=1):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, seqlen, heads, head_dim)).astype(dtype)
    kv = rng.standard_normal((batch, seqlen, heads_kv, head_dim)).astype(dtype)
    return q, kv, kv.copy()


def last_rank(comm):
    return comm.Get_rank() == comm.Get_size() - 1


def test_wrong_ndim(comm):
    q, k, v = arrays()
    assert_raises_everywhere(comm, ValueError, "q.ndim=3 must be 4", lambda: mpiring.ring_attention(q[0], k, v, comm))


def test_wrong_ndim_on_one_rank(comm):
    q, k, v = arrays()
    bad = k[0] if last_rank(comm) else k
    assert_raises_everywhere(comm, ValueError, f"(on rank {comm.Get_size() - 1})",
                             lambda: mpiring.ring_attention(q, bad, v, comm))


def test_heads_not_multiple(comm):
    q, k, v = arrays(heads=3, heads_kv=2)
    assert_raises_everywhere(comm, ValueError, "heads=3 (q) must be a multiple of heads_kv=2",
                             lambda: mpiring.ring_attention(q, k, v, comm))


def test_head_dim_mismatch(comm):
    q, _, _ = arrays(head_dim=8)
    _, k, v = arrays(head_dim=16)
    assert_raises_everywhere(comm, ValueError, "differ in batch or head_dim",
                             lambda: mpiring.ring_attention(q, k, v, comm))


def test_dtypes(comm):
    q, k, v = arrays()
    assert_raises_everywhere(comm, TypeError, "k.dtype=float64 differs from q.dtype=float32",
                             lambda: mpiring.ring_attention(q, k.astype(np.float64), v, comm))
    assert_raises_everywhere(comm, TypeError, "q.dtype=int32 is not supported",
                             lambda: mpiring.ring_attention(*(x.astype(np.int32) for x in (q, k, v)), comm))
    assert_raises_everywhere(comm, TypeError, "q must be a NumPy",
                             lambda: mpiring.ring_attention(q.tolist(), k, v, comm))


@pytest.mark.parametrize("scale", (float("nan"), float("inf"), "0.1"))
def test_non_finite_scale(comm, scale):
    q, k, v = arrays()
    assert_raises_everywhere(comm, ValueError, "softmax_scale=", lambda: mpiring.ring_attention(q, k, v, comm,
                                                                                              softmax_scale=scale))


def test_zigzag_needs_even_local_length(comm):
    q, k, v = arrays(seqlen=5)
    assert_raises_everywhere(comm, ValueError, "must be even for layout='zigzag'",
                             lambda: mpiring.ring_attention(q, k, v, comm, layout="zigzag"))


@pytest.mark.parametrize("option", [{"layout": "diagonal"}, {"window": 0}, {"window": (1, 2, 3)},
                                    {"transport": "carrier-pigeon"}, {"cu_seqlens": [0, 3]}])
def test_bad_options(comm, option):
    q, k, v = arrays()
    name = next(iter(option))
    assert_raises_everywhere(comm, ValueError, name, lambda: mpiring.ring_attention(q, k, v, comm, **option))


@pytest.mark.parametrize("field,per_rank", [
    ("q.shape", lambda r: {"q": arrays(seqlen=4 + (r == 1))[0]}),
    ("q.shape", lambda r: {"q": arrays(heads=2 * (1 + (r == 1)))[0]}),
    ("dtype", lambda r: {"dtype": np.float64 if r == 1 else np.float32}),
    ("layout", lambda r: {"layout": "striped" if r == 1 else "contiguous"}),
    ("causal", lambda r: {"causal": r == 1}),
    ("window", lambda r: {"window": 3 if r == 1 else None}),
    ("softmax_scale", lambda r: {"softmax_scale": 0.5 if r == 1 else None}),
])
def test_disagreement_across_ranks(comm, field, per_rank):
    if comm.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    spec = per_rank(comm.Get_rank())
    dtype = spec.pop("dtype", np.float32)
    q, k, v = arrays(dtype=dtype)
    q = spec.pop("q", q)
    kv_heads = q.shape[2]
    k, v = k[:, :, :1].repeat(kv_heads, 2), v[:, :, :1].repeat(kv_heads, 2)
    k, v = k[:, : q.shape[1]], v[:, : q.shape[1]]
    kind = TypeError if field == "dtype" else ValueError
    assert_raises_everywhere(comm, kind, f"{field} differs across ranks",
                             lambda: mpiring.ring_attention(q, k, v, comm, **spec))


def test_backward_checks(comm):
    q, k, v = arrays()
    out, lse = mpiring.ring_attention(q, k, v, comm)
    assert_raises_everywhere(comm, ValueError, "lse must be a numpy array of shape (1, 2, 4)",
                             lambda: mpiring.ring_attention_backward(q, q, k, v, out, lse[:, :1], comm))
    assert_raises_everywhere(comm, ValueError, "dout.shape=(1, 3, 2, 8) differs from q.shape",
                             lambda: mpiring.ring_attention_backward(q[:, :3], q, k, v, out, lse, comm))


def test_bad_communicators(comm):
    q, k, v = arrays()
    with pytest.raises(ValueError, match="COMM_NULL"):
        mpiring.ring_attention(q, k, v, MPI.COMM_NULL)
    with pytest.raises(TypeError, match="mpi4py communicator"):
        mpiring.ring_attention(q, k, v, comm=42)


def test_intercommunicator(comm):
    if comm.Get_size() < 2:
        pytest.skip("an intercommunicator needs 2 ranks")
    color = comm.Get_rank() % 2
    local = comm.Split(color)
    inter = local.Create_intercomm(0, comm, 1 - color)
    try:
        q, k, v = arrays()
        assert_raises_everywhere(comm, TypeError, "must be an intracommunicator",
                                 lambda: mpiring.ring_attention(q, k, v, inter))
    finally:
        inter.Free()
        local.Free()


def test_size_one_communicator(comm, seed):
    """COMM_SELF: every rank runs the ring on its own, no messages."""
    from helpers import check_ring

    check_ring(MPI.COMM_SELF, seed, causal=True, layout="zigzag")
