"""Test helpers: random problems, the same-precision dense baseline and tolerances.

Tolerance rule (flash-attn's): for float16/bfloat16 the error against the float64
oracle must be at most 2x the error of a dense computation in the same precision
on the same inputs (P and dS rounded to the input dtype before their matmuls, as
tensor-core kernels do), plus a floor of one unit in the last place of the output
scale. float32 inputs: relative error 2e-5 (measured ~1e-6; accumulation order
differs from the oracle's). float64: 1e-11.
"""

from __future__ import annotations

import numpy as np
import pytest
from ml_dtypes import bfloat16, finfo
from mpi4py import MPI

import mpiring
from mpiring.layout import make_mask, positions

LOW_PRECISION = (np.dtype(np.float16), np.dtype(bfloat16))
DTYPES = (np.float64, np.float32, np.float16, bfloat16)
REL_TOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 2e-5}


def usable_cupy():
    """The cupy module if it imports and sees a GPU, else None (GPU tests then skip)."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as "no GPU"
        return None


def gpu_transport_params(*leading):
    """The GPU transports as ``pytest.param``s, id'd by name (``-k nccl`` selects them):
    ``mpi-cuda`` skipped where the loaded MPI is not CUDA-aware, all of them without
    CuPy and a GPU. ``leading`` values come before the name in each param."""
    from mpiring.transport.gpu import mpi_cuda_support

    no_gpu = pytest.mark.skipif(usable_cupy() is None, reason="needs CuPy and a CUDA device")
    not_aware = pytest.mark.skipif(not mpi_cuda_support()[0], reason="the loaded MPI is not CUDA-aware")
    return [pytest.param(*leading, name, id=name, marks=[no_gpu, not_aware] if name == "mpi-cuda" else [no_gpu])
            for name in ("mpi-cuda", "mpi-staged", "nccl")]


def random_problem(seed, batch, seqlen, heads, heads_kv, head_dim, dtype, *, scale=1.0):
    """Global q, k, v, dout (standard normal × scale, rounded to ``dtype``); same on every rank."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, seqlen, heads, head_dim), (batch, seqlen, heads_kv, head_dim),
              (batch, seqlen, heads_kv, head_dim), (batch, seqlen, heads, head_dim)]
    return [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]


def random_cu_seqlens(rng, total: int) -> np.ndarray:
    """Boundaries ``[0, …, total]`` with length-1 documents, an empty one (a repeated
    boundary) and one long document of about a third of the sequence, which spans ranks
    whenever there are several; the rest random."""
    long_doc = max(2, total // 3)
    lengths = [1, 1, 0, long_doc, 1]
    rest = total - sum(lengths)
    while rest > 0:
        n = int(min(rest, rng.integers(1, max(2, total // 6))))
        lengths.append(n)
        rest -= n
    lengths = [lengths[i] for i in rng.permutation(len(lengths))]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def poison_like(x):
    """An array like x full of NaN: elements a kernel fails to write stay NaN."""
    out = np.empty_like(x)
    out[...] = np.nan
    return out


def _round(x, dtype):
    return x.astype(dtype).astype(np.float32)


def dense_same_precision(q, k, v, dout, dtype, *, q_positions=None, kv_sum=None, **mask_options):
    """Dense attention with fp32 accumulation and P, dS, out, grads rounded to ``dtype``.

    ``q_positions``: q and dout hold only these rows (global positions) of the sequence;
    out and dq are then those rows, and dk, dv partial sums over them, which
    ``kv_sum`` (e.g. a sum over the ranks that hold the other rows) completes before
    they are rounded."""
    f = lambda x: np.asarray(x).astype(np.float32)  # noqa: E731
    q, k, v, dout = f(q), f(k), f(v), f(dout)
    group = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = mask_options.pop("softmax_scale", None)
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else scale  # (0 is a scale, not "unset")
    mask = make_mask(**mask_options)
    pos = np.arange(q.shape[1]) if q_positions is None else np.asarray(q_positions)
    allowed = mask.allowed(pos, np.arange(k.shape[1]))
    einsum = lambda *a: np.einsum(*a, optimize=True)  # noqa: E731 - BLAS, not einsum's own loops
    s = np.where(allowed, einsum("bqhd,bkhd->bhqk", q, kr) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = np.where(l > 0, p / np.where(l > 0, l, 1), 0)
    p_lp = _round(p, dtype)
    out = _round(einsum("bhqk,bkhd->bqhd", p_lp, vr), dtype)
    dv = einsum("bhqk,bqhd->bkhd", p_lp, dout)
    dp = einsum("bqhd,bkhd->bhqk", dout, vr)
    delta = einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = _round(p * (dp - delta), dtype)
    dq = einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = einsum("bhqk,bqhd->bkhd", ds, q) * scale

    def gsum(x):
        b, sl, h, d = x.shape
        x = x.reshape(b, sl, h // group, group, d).sum(3)
        return x if kv_sum is None else kv_sum(x)

    return [_round(x, dtype) for x in (out, dq, gsum(dk), gsum(dv))]


def rel_err(x, ref) -> float:
    x = np.asarray(x).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    if not np.all(np.isfinite(x) == np.isfinite(ref)):
        return float("inf")
    fin = np.isfinite(ref)
    denom = np.linalg.norm(ref[fin]) or 1.0
    return float(np.linalg.norm((x - ref)[fin]) / denom)


def assert_close(name, x, ref, dtype, lowp_ref=None):
    """Assert x matches the float64 ``ref`` within the dtype's tolerance (module docstring)."""
    dtype = np.dtype(dtype)
    err = rel_err(x, ref)
    if dtype in LOW_PRECISION:
        base = rel_err(lowp_ref, ref) if lowp_ref is not None else float(finfo(dtype).eps)
        tol = 2 * base + float(finfo(dtype).eps) / 8
    else:
        tol = REL_TOL[dtype]
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.3e} ({dtype.name})"


def to_host(x):
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x


def reference_shards(comm, q, k, v, dout, dtype, *, layout, backward=True, sharded=False, **ref_opts):
    """This rank's shards of the float64 oracle and of the same-precision baseline for the
    global problem ``q, k, v, dout``: ``(refs, lse_ref, lowp)``, ``refs`` and ``lowp`` being
    ``[out, dq, dk, dv]`` (grads None without ``backward``; ``lowp`` all None for float32/64).

    ``sharded``: each rank computes only its own query rows (1/N of the work) and the
    dk/dv partial sums are added over ``comm`` (collective, before anything can fail);
    otherwise every rank computes the whole problem and takes its shard."""
    sh = lambda x, axis=1: mpiring.shard(x, comm, layout=layout, axis=axis)  # noqa: E731
    low = np.dtype(dtype) in LOW_PRECISION
    if not sharded:
        out_ref, lse_ref = mpiring.attention_reference(q, k, v, **ref_opts)
        grads = mpiring.attention_reference_backward(dout, q, k, v, **ref_opts) if backward else (None,) * 3
        lowp = dense_same_precision(q, k, v, dout, dtype, **ref_opts) if low else [None] * 4
        return [sh(x) if x is not None else None for x in (out_ref, *grads)], sh(lse_ref, 2), \
            [sh(x) if x is not None else None for x in lowp]

    def kv_sum(x):
        x = np.ascontiguousarray(x)
        comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
        return sh(x)

    rows = dict(q_positions=positions(layout, comm.Get_rank(), comm.Get_size(), q.shape[1] // comm.Get_size()))
    q_l, dout_l = sh(q), sh(dout)
    out_ref, lse_ref = mpiring.attention_reference(q_l, k, v, **rows, **ref_opts)
    grads = (None,) * 3
    if backward:
        dq, dk, dv = mpiring.attention_reference_backward(dout_l, q_l, k, v, **rows, **ref_opts)
        grads = (dq, kv_sum(dk), kv_sum(dv))
    lowp = [None] * 4
    if low:
        lowp = dense_same_precision(q_l, k, v, dout_l, dtype, kv_sum=kv_sum, **rows, **ref_opts)
    return [out_ref, *grads], lse_ref, lowp


def check_ring(comm, seed, *, batch=1, seqlen_local=24, heads=4, heads_kv=2, head_dim=16,
               dtype=np.float32, layout="contiguous", backward=True, xp=np, sharded_oracle=False, **options):
    """Run the ring forward (and backward) on shards of a random problem and assert
    every output against the float64 oracle; outputs are compared element-wise so a
    NaN-poisoned or unwritten element fails. ``xp``: the array module the ring runs on
    (NumPy, or CuPy for the GPU path); the oracle always runs on NumPy, on all of the
    problem or (``sharded_oracle``) on this rank's rows (see :func:`reference_shards`).
    Every collective (oracle, forward, backward) runs before the first assertion, so a
    result wrong on one rank only fails that rank and never leaves the others waiting."""
    size = comm.Get_size()
    q, k, v, dout = random_problem(seed, batch, seqlen_local * size, heads, heads_kv, head_dim, dtype)
    ref_opts = {key: options[key] for key in ("causal", "window", "cu_seqlens", "softmax_scale") if key in options}
    refs, lse_ref, lowp = reference_shards(comm, q, k, v, dout, dtype, layout=layout, backward=backward,
                                           sharded=sharded_oracle, **ref_opts)
    sh = lambda x: mpiring.shard(x, comm, layout=layout)  # noqa: E731
    dev = lambda x: xp.asarray(sh(x))  # noqa: E731
    q_dev, k_dev, v_dev = dev(q), dev(k), dev(v)
    out_dev, lse_dev = mpiring.ring_attention(q_dev, k_dev, v_dev, comm, layout=layout, **options)
    grads = []
    if backward:
        grads = mpiring.ring_attention_backward(dev(dout), q_dev, k_dev, v_dev, out_dev, lse_dev, comm,
                                                layout=layout, **options)
    out, lse = to_host(out_dev), to_host(lse_dev)
    assert out.dtype == q.dtype and out.shape == sh(q).shape
    assert_close("out", out, refs[0], dtype, lowp[0])
    np.testing.assert_allclose(lse, lse_ref, rtol=0, atol=1e-4 if dtype != np.float64 else 1e-10)
    for name, g, g_ref, g_lp in zip(("dq", "dk", "dv"), grads, refs[1:], lowp[1:]):
        g = to_host(g)
        assert g.dtype == q.dtype
        assert_close(name, g, g_ref, dtype, g_lp)
