"""mpiring.memory_estimate against what the NumPy path really allocates.

NumPy reports its data buffers to tracemalloc, so the peak of traced memory during a
ring call is the library's allocation peak (the caller's q, k, v, dout are allocated
before tracing starts, as the estimate excludes them). The estimate must hold: measured
≤ 1.10 × estimate, and stay tight: measured ≥ 0.80 × estimate.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from helpers import random_problem
from ml_dtypes import bfloat16
from mpi4py import MPI

import mpiring
from mpiring.memory import memory_breakdown, memory_estimate

ABOVE, BELOW = 1.10, 0.80  # measured / estimate must lie in [BELOW, ABOVE]


def measure_peaks(comm, q, k, v, dout, **options):
    """Traced peak bytes (max over ranks) of a forward call, and of forward then backward."""
    peaks = []
    for backward in (False, True):
        comm.Barrier()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            out, lse = mpiring.ring_attention(q, k, v, comm, **options)
            if backward:
                mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **options)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
        del out, lse
    return [comm.allreduce(p, op=MPI.MAX) for p in peaks]


def assert_within(measured, estimate, what):
    ratio = measured / estimate
    assert BELOW <= ratio <= ABOVE, (
        f"{what}: measured peak {measured / 2**20:.2f} MiB / estimate {estimate / 2**20:.2f} MiB = {ratio:.3f} "
        f"not in [{BELOW}, {ABOVE}]"
    )


def local_problem(comm, seed, batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout):
    q, k, v, dout = random_problem(seed, batch, seqlen_local * comm.size, heads, heads_kv, head_dim, dtype)
    return [mpiring.shard(x, comm, layout=layout) for x in (q, k, v, dout)]


CASES = [
    # (batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout, mask options)
    (1, 512, 4, 2, 32, np.float32, "contiguous", {}),
    (1, 512, 4, 2, 32, bfloat16, "zigzag", {"causal": True}),
    (2, 384, 2, 1, 64, np.float64, "striped", {"window": 100}),
    (1, 1536, 1, 1, 32, np.float32, "zigzag", {"causal": True, "cu_seqlens": "random"}),
    # dK/dV buffers (layout.dkv_plan): 4 on some ranks of a causal contiguous ring (N ≥ 4),
    # 1 where documents end on rank boundaries
    (1, 1024, 2, 2, 32, np.float32, "contiguous", {"causal": True}),
    (1, 1024, 2, 2, 32, np.float32, "contiguous", {"causal": True, "cu_seqlens": "per-rank"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{np.dtype(c[5]).name}-{c[6]}-{'-'.join(c[7]) or 'full'}")
def test_estimate_holds_numpy(comm, seed, case):
    batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout, options = case
    options = dict(options)
    if options.get("cu_seqlens") == "random":
        total = seqlen_local * comm.size
        rng = np.random.default_rng(seed)
        cuts = np.sort(rng.choice(np.arange(1, total), size=min(9, total - 1), replace=False))
        options["cu_seqlens"] = np.concatenate([[0], cuts, [total]])
    elif options.get("cu_seqlens") == "per-rank":
        options["cu_seqlens"] = np.arange(comm.size + 1) * seqlen_local
    arrays = local_problem(comm, seed, batch, seqlen_local, heads, heads_kv, head_dim, dtype, layout)
    fwd, fwd_bwd = measure_peaks(comm, *arrays, layout=layout, **options)
    shape = (batch, seqlen_local, heads, heads_kv, head_dim, dtype)
    common = {"layout": layout, "comm_size": comm.size, **options}
    assert_within(fwd, memory_estimate(*shape, **common), "forward")
    assert_within(fwd_bwd, memory_estimate(*shape, backward=True, **common), "forward+backward")


@pytest.mark.serial
def test_peak_does_not_grow_with_seqlen_squared(seed):
    """Measured forward+backward peaks at S, 2S, 4S on one rank: each doubling at most
    doubles the peak (a seqlen² term would quadruple it), and each matches the estimate."""
    comm = MPI.COMM_SELF
    peaks = []
    for seqlen in (1024, 2048, 4096):
        arrays = local_problem(comm, seed, 1, seqlen, 2, 1, 32, np.float32, "contiguous")
        peak = measure_peaks(comm, *arrays, causal=True)[1]
        assert_within(peak, memory_estimate(1, seqlen, 2, 1, 32, np.float32, causal=True, comm_size=1,
                                            backward=True), f"seqlen={seqlen}")
        peaks.append(peak)
    growth = [b / a for a, b in zip(peaks, peaks[1:])]
    assert max(growth) <= 2.05, f"peaks {[p >> 20 for p in peaks]} MiB grow by {growth} per seqlen doubling"


@pytest.mark.serial
@pytest.mark.parametrize("array", ["numpy", "cupy"])
@pytest.mark.parametrize("backward", [False, True])
def test_estimate_is_linear_beyond_a_tile(array, backward):
    """Past the tile size every phase is linear in seqlen: equal steps give equal increments."""
    parts = [memory_breakdown(2, s, 8, 2, 128, bfloat16, layout="zigzag", causal=True, array=array,
                              backward=backward, cu_seqlens=[0, 5]) for s in (1 << 16, 2 << 16, 3 << 16)]
    for phase in parts[0]:
        a, b, c = (sum(p[phase].values()) for p in parts)
        assert c - b == b - a >= 0, phase


@pytest.mark.serial
def test_cuda_backend_model():
    """The kernel backend keeps no score tiles: K/V double buffer, fp32 state, outputs; on
    one rank it reads k and v in place (no K/V buffer) and keeps no fp32 state."""
    b, s, h, hkv, d = 1, 4096, 8, 2, 128
    q_bytes, kv_bytes, rows = b * s * h * d * 2, b * s * hkv * d * 2, b * h * s * 4
    fwd = memory_estimate(b, s, h, hkv, d, bfloat16, array="cupy", backend="cuda")
    assert fwd == 2 * 2 * kv_bytes + q_bytes + rows + 2 * q_bytes + 2 * rows
    single = memory_estimate(b, s, h, hkv, d, bfloat16, array="cupy", backend="cuda", comm_size=1)
    assert single == q_bytes + rows
    # the own block is the caller's k, v: blocks of others arrive in two buffers in turns,
    # in one where each rank receives one block at most
    cuda = dict(array="cupy", backend="cuda")
    assert memory_estimate(b, s, h, hkv, d, bfloat16, comm_size=4, **cuda) == fwd
    assert memory_estimate(b, s, h, hkv, d, bfloat16, comm_size=2, **cuda) == fwd - 2 * kv_bytes
    packed = memory_estimate(b, s, h, hkv, d, bfloat16, comm_size=4, causal=True,
                             cu_seqlens=[0, *range(s // 4, 4 * s, s // 2), 4 * s], **cuda)
    assert packed == fwd - 2 * kv_bytes  # documents across rank boundaries: one block arrives
    home = memory_estimate(b, s, h, hkv, d, bfloat16, comm_size=4, causal=True,
                           cu_seqlens=np.arange(0, 4 * s + 1, s // 2), **cuda)
    assert home == fwd - 4 * kv_bytes  # documents inside ranks: nothing arrives


@pytest.mark.serial
def test_staging_is_host_memory():
    options = dict(array="cupy", backward=True, backend="cuda")
    parts = memory_breakdown(1, 1024, 4, 4, 64, np.float16, transport="mpi-staged", **options)
    kv = 1024 * 4 * 64
    want = {"K/V send and receive staging": 4 * kv * 2, "dK/dV send and receive staging": 4 * kv * 4}
    assert parts["host_pinned"] == want
    assert memory_estimate(1, 1024, 4, 4, 64, np.float16, transport="mpi-staged", **options) == memory_estimate(
        1, 1024, 4, 4, 64, np.float16, transport="nccl", **options)


@pytest.mark.serial
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch": -1}, TypeError, "batch=-1"),
        ({"heads_kv": 3}, ValueError, "heads=4 must be a multiple of heads_kv=3"),
        ({"dtype": np.int32}, TypeError, "dtype="),
        ({"layout": "diagonal"}, ValueError, "layout='diagonal'"),
        ({"layout": "zigzag", "seqlen_local": 7}, ValueError, "seqlen_local=7"),
        ({"array": "torch"}, ValueError, "array='torch'"),
        ({"comm_size": 0}, ValueError, "comm_size=0"),
        ({"backend": "cuda"}, ValueError, "array='cupy'"),
    ],
)
def test_estimate_rejects_bad_arguments(kwargs, error, match):
    args = {"batch": 1, "seqlen_local": 8, "heads": 4, "heads_kv": 2, "head_dim": 16, "dtype": np.float32}
    args.update(kwargs)
    positional = [args.pop(name) for name in ("batch", "seqlen_local", "heads", "heads_kv", "head_dim", "dtype")]
    with pytest.raises(error, match=match):
        memory_estimate(*positional, **args)


@pytest.mark.serial
def test_plots_from_rows(tmp_path):
    """Every figure of mpiring.bench.plots is drawn from rows of each kind (matplotlib optional)."""
    pytest.importorskip("matplotlib")
    from mpiring.bench.plots import plot_rows

    base = dict(card="CPU", heads=8, head_dim=128, causal=True, layout="zigzag")
    rows = [dict(base, bench="ring", transport=t, n_gpus=n, seqlen=s, tflops_per_gpu=100.0 + n, efficiency=0.97,
                 **{"pass": p}) for t in ("nccl", "mpi-cuda") for n in (2, 4) for s in (16384, 32768)
            for p in ("fwd", "fwd+bwd")]
    rows += [dict(base, bench="long_context", n_gpus=4, seqlen=1 << 20, total_tokens=1 << 22, tflops_per_gpu=150.0,
                  **{"pass": "fwd+bwd"})]
    rows += [dict(base, bench="memory", n_gpus=4, seqlen=s, peak_bytes=3 * s, estimate_bytes=3 * s + 1,
                  documents=d, **{"pass": p}) for s in (1024, 4096) for p in ("fwd", "fwd+bwd") for d in (None, 8)]
    rows += [dict(base, bench="timeline", n_gpus=4, seqlen=4096, transport="nccl", **{"pass": "fwd+bwd"},
                  steps=[{"kind": k, "compute_ms": 2.0, "comm_ms": c, "wait_ms": max(c - 2.0, 0)}
                         for k, c in (("kv", 1.0), ("kv", 3.0), ("dkv", 2.5))])]
    written = plot_rows(rows, str(tmp_path))
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["efficiency_vs_n.png", "memory_vs_tokens.png", "tflops_vs_tokens.png", "timeline.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
