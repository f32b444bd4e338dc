"""The GPU ring over each GPU transport (mpi-cuda, mpi-staged, nccl) against the float64 oracle.

Run on a GPU machine at ``mpiexec -n 2`` and ``-n 4`` (one GPU per rank, see
``bench/gpu_check.sh``); GPU tests skip where CuPy or a device is missing, and the
``mpi-cuda`` ones where the loaded MPI is not CUDA-aware. The probe and the choice logic
are also tested without a GPU.
"""

import os

import numpy as np
import pytest
from helpers import (
    assert_close,
    check_ring,
    dense_same_precision,
    gpu_transport_params,
    random_problem,
    to_host,
    usable_cupy,
)
from ml_dtypes import bfloat16

import mpiring
from mpiring.api import private_comm
from mpiring.transport import chosen_transport
from mpiring.transport.gpu import byte_pieces, mpi_cuda_support, select_gpu_transport

cp = usable_cupy()
gpu = pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device")
CUDA_AWARE = mpi_cuda_support()[0]
TRANSPORTS = gpu_transport_params()
pytestmark = pytest.mark.usefixtures("one_gpu_per_rank")


# --- without a GPU --------------------------------------------------------------------
@pytest.mark.serial
def test_probe_reports_a_reason(monkeypatch):
    monkeypatch.delenv("MPIRING_CUDA_AWARE_MPI", raising=False)
    supported, reason = mpi_cuda_support()
    assert isinstance(supported, bool) and "MPIX_Query_cuda_support" in reason
    monkeypatch.setenv("MPIRING_CUDA_AWARE_MPI", "1")
    assert mpi_cuda_support() == (True, "MPIRING_CUDA_AWARE_MPI=1")
    monkeypatch.setenv("MPIRING_CUDA_AWARE_MPI", "yes")
    with pytest.raises(ValueError, match="MPIRING_CUDA_AWARE_MPI"):
        mpi_cuda_support()


@pytest.mark.serial
def test_byte_pieces():
    assert byte_pieces(0, 4) == [(0, 0)]
    assert byte_pieces(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert byte_pieces(8, 4) == [(0, 4), (4, 8)]


def test_chosen_transport_numpy(comm):
    assert chosen_transport("numpy", comm) == "mpi-host"
    with pytest.raises(ValueError, match="can't move numpy"):
        chosen_transport("numpy", comm, "nccl")


# --- on a GPU -------------------------------------------------------------------------
@gpu
def test_auto_choice(comm, monkeypatch):
    """auto: mpi-cuda where MPI is CUDA-aware, else nccl (CuPy has it on the test machines);
    MPIRING_TRANSPORT overrides."""
    monkeypatch.delenv("MPIRING_TRANSPORT", raising=False)
    name = chosen_transport("cupy", comm)
    assert name == ("mpi-cuda" if CUDA_AWARE else "nccl")
    monkeypatch.setenv("MPIRING_TRANSPORT", "mpi-staged")
    assert chosen_transport("cupy", comm) == "mpi-staged"


@gpu
@pytest.mark.skipif(CUDA_AWARE, reason="the loaded MPI is CUDA-aware")
def test_mpi_cuda_refused_without_cuda_aware_mpi(comm, seed):
    """A clear error on every rank, never a segfault inside MPI."""
    if comm.Get_size() == 1:
        pytest.skip("no transport at -n 1")
    x = cp.asarray(random_problem(seed, 1, 8, 2, 2, 16, np.float32)[0])
    with pytest.raises(RuntimeError, match="CUDA-aware"):
        mpiring.ring_attention(x, x, x, comm, transport="mpi-cuda")


@gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_oracle(comm, seed, transport, dtype, heads_kv, causal, layout):
    """Forward and backward of every layout × causal × GQA × dtype, against the oracle.
    130 tokens per rank: not a multiple of any tile size, even for zigzag."""
    check_ring(comm, seed, seqlen_local=130, heads=4, heads_kv=heads_kv, head_dim=64, dtype=dtype,
               layout=layout, causal=causal, transport=transport, xp=cp)


@gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("documents", ["random", "per-rank", "packed"])
@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_documents(comm, seed, transport, documents, layout):
    """Packed documents through each transport, forward and backward against the oracle:
    random boundaries, documents that end on rank boundaries (contiguous: nothing moves)
    and random documents ordered by pack_documents (split over neighbouring ranks: K/V
    goes a hop or two, dK/dV comes straight home, layout.dkv_plan)."""
    size, seqlen_local = comm.Get_size(), 130
    total = seqlen_local * size
    rng = np.random.default_rng(seed + 7)
    if documents == "per-rank":
        cu = np.arange(size + 1) * seqlen_local
    else:
        cu = np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), size=3 * size, replace=False)), [total]])
        if documents == "packed":
            cu = mpiring.layout.pack_documents(np.diff(cu), size)[1]
    check_ring(comm, seed, seqlen_local=seqlen_local, heads=4, heads_kv=2, head_dim=64, dtype=bfloat16,
               layout=layout, causal=True, cu_seqlens=cu, transport=transport, xp=cp)


@gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("increasing", [False, True], ids=["dq-decreasing", "dq-increasing"])
def test_documents_dq_orders(comm, seed, transport, increasing, monkeypatch):
    """Both orders of the deterministic backward's dQ adds with packed documents that span
    ranks (the launcher picks one from the documents' lengths, cupy_.DQ_INCREASING_DOCUMENTS;
    forced here), head dim 128 (the wgmma backward on Hopper) and 1000 tokens per rank
    (several key and query tiles per document), against the oracle."""
    import mpiring.backends.cupy_ as cupy_backend

    size, seqlen_local = comm.Get_size(), 1000
    rng = np.random.default_rng(seed + 11)
    total = seqlen_local * size
    cu = np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), size=2 * size, replace=False)), [total]])
    cu = mpiring.layout.pack_documents(np.diff(cu), size)[1]
    monkeypatch.setattr(cupy_backend, "DQ_INCREASING_DOCUMENTS", 0 if increasing else np.inf)
    chosen, real = [], cupy_backend.dq_increasing
    monkeypatch.setattr(cupy_backend, "dq_increasing", lambda mask: chosen.append(real(mask)) or chosen[-1])
    check_ring(comm, seed, seqlen_local=seqlen_local, heads=4, heads_kv=2, head_dim=128, dtype=bfloat16,
               layout="contiguous", causal=True, cu_seqlens=cu, transport=transport, xp=cp)
    assert chosen and set(chosen) == {increasing}


@gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_message_counts(comm, seed, transport):
    """N−1 K/V hops forward; N−1 K/V + N dK/dV hops backward (N = 2: one); nothing left pending."""
    size = comm.Get_size()
    if size == 1:
        pytest.skip("no transport at -n 1")
    tr = select_gpu_transport(transport, private_comm(comm))
    q, k, v, do = (cp.asarray(x) for x in random_problem(seed, 1, 16, 2, 1, 16, np.float32))
    before = tr.hops
    out, lse = mpiring.ring_attention(q, k, v, comm, causal=True, layout="zigzag", transport=transport)
    assert tr.hops - before == size - 1 and tr.pending == 0
    mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, causal=True, layout="zigzag", transport=transport)
    dkv = size if size > 2 else 1  # two ranks: the owner keeps its own part (layout.dkv_plan)
    assert tr.hops - before == (size - 1) + (size - 1) + dkv and tr.pending == 0


@gpu
def test_nccl_channel_cap_stays_inside(comm):
    """The NCCL transport caps its channels (MPIRING_NCCL_CHANNELS, default 16) only while
    it makes its communicator: the process environment is as it was afterwards, so torch's
    NCCL (or anything else) never inherits the cap."""
    if comm.Get_size() == 1:
        pytest.skip("no transport at -n 1")
    from mpiring.transport.nccl import NCCL_CHANNEL_VARS, NcclTransport, channels_from_env

    before = dict(os.environ)
    tr = NcclTransport(private_comm(comm).Dup())  # a fresh communicator, not the cached one
    assert dict(os.environ) == before
    user_set = any(name in before for name in NCCL_CHANNEL_VARS)
    assert tr.channels == (None if user_set or channels_from_env()[0] == 0 else channels_from_env()[0])


@gpu
@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("contiguous", False)])
def test_nccl_lean_communicator(comm, seed, monkeypatch, layout, causal):
    """Exchanges posted as ``background`` go over nccl's lean communicator (made with
    ncclCommInitRankConfig through ctypes, MPIRING_NCCL_LEAN_CHANNELS channels): forced
    here for small shapes, forward and backward against the oracle, the lean path taken."""
    if comm.Get_size() == 1:
        pytest.skip("no transport at -n 1")
    import mpiring.api

    tr = select_gpu_transport("nccl", private_comm(comm))
    if tr.lean_channels is None:
        pytest.skip("no lean communicator here (one libnccl >= 2.17 needed on every rank)")
    monkeypatch.setattr(mpiring.api, "BACKGROUND_FLOPS_PER_BYTE", 0)
    before = tr.lean_hops
    check_ring(comm, seed, seqlen_local=130, heads=4, heads_kv=2, head_dim=64, dtype=bfloat16,
               layout=layout, causal=causal, transport="nccl", xp=cp)
    assert tr.lean_hops > before and tr.pending == 0


@gpu
def test_chunked_staging(comm, seed):
    """mpi-staged: messages split in many pieces (tiny staging chunks) arrive whole and in order."""
    from mpiring.transport.mpi_staged import MpiStagedTransport

    tr = MpiStagedTransport(private_comm(comm), chunk_bytes=1000)
    check_ring(comm, seed, seqlen_local=64, heads=4, heads_kv=2, head_dim=32, dtype=bfloat16,
               layout="zigzag", causal=True, transport=tr, xp=cp)


@gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_back_to_back_under_load(comm, seed, transport):
    """200 forward+backward calls queued back to back on fresh inputs, with no host
    synchronisation between them, then every output checked: a receive landing in a
    buffer that a queued kernel still reads, or a send of unfinished data, shows here."""
    calls = int(os.environ.get("MPIRING_LOAD_CALLS", "200"))
    size = comm.Get_size()
    dtype, shape = bfloat16, dict(batch=1, heads=4, heads_kv=2, head_dim=64)
    opts = dict(causal=True, layout="zigzag", transport=transport)
    sh = lambda x, axis=1: mpiring.shard(x, comm, layout="zigzag", axis=axis)  # noqa: E731
    problems = [random_problem(seed + i, seqlen=64 * size, dtype=dtype, **shape) for i in range(calls)]
    results = []
    for q, k, v, do in problems:  # everything queued; results stay on the GPU
        q, k, v, do = (cp.asarray(sh(x)) for x in (q, k, v, do))
        out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
        results.append((out, lse, mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, **opts)))
    for i, ((q, k, v, do), (out, lse, grads)) in enumerate(zip(problems, results)):
        out_ref, lse_ref = mpiring.attention_reference(q, k, v, causal=True)
        refs = [out_ref, *mpiring.attention_reference_backward(do, q, k, v, causal=True)]
        lowp = dense_same_precision(q, k, v, do, dtype, causal=True)
        np.testing.assert_allclose(to_host(lse), sh(lse_ref, 2), rtol=0, atol=1e-4, err_msg=f"call {i}")
        for name, x, ref, lp in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, lowp):
            assert_close(f"call {i}: {name}", to_host(x), sh(ref), dtype, sh(lp))


@gpu
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_step_timing(comm, seed, transport):
    """The bench's per-exchange timing: one row per exchange, positive times."""
    size = comm.Get_size()
    if size == 1:
        pytest.skip("no transport at -n 1")
    tr = select_gpu_transport(transport, private_comm(comm))
    q, k, v, _ = (cp.asarray(x) for x in random_problem(seed, 1, 256, 4, 4, 64, bfloat16))
    tr.start_timing()
    mpiring.ring_attention(q, k, v, comm, transport=transport)
    rows = tr.step_times()
    assert len(rows) == size - 1
    assert all(r["compute_s"] > 0 and r["comm_s"] > 0 for r in rows)
