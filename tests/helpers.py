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
from ml_dtypes import bfloat16, finfo

import mpiring
from mpiring.layout import make_mask

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


def random_problem(seed, batch, seqlen, heads, heads_kv, head_dim, dtype, *, scale=1.0):
    """Global q, k, v, dout (standard normal × scale, rounded to ``dtype``); same on every rank."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, seqlen, heads, head_dim), (batch, seqlen, heads_kv, head_dim),
              (batch, seqlen, heads_kv, head_dim), (batch, seqlen, heads, head_dim)]
    return [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]


def poison_like(x):
    """An array like x full of NaN: elements a kernel fails to write stay NaN."""
    out = np.empty_like(x)
    out[...] = np.nan
    return out


def _round(x, dtype):
    return x.astype(dtype).astype(np.float32)


def dense_same_precision(q, k, v, dout, dtype, **mask_options):
    """Dense attention with fp32 accumulation and P, dS, out, grads rounded to ``dtype``."""
    f = lambda x: np.asarray(x).astype(np.float32)  # noqa: E731
    q, k, v, dout = f(q), f(k), f(v), f(dout)
    group = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = mask_options.pop("softmax_scale", None) or 1.0 / np.sqrt(q.shape[3])
    mask = make_mask(**mask_options)
    pos = np.arange(q.shape[1])
    allowed = mask.allowed(pos, np.arange(k.shape[1]))
    s = np.where(allowed, np.einsum("bqhd,bkhd->bhqk", q, kr) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = np.where(l > 0, p / np.where(l > 0, l, 1), 0)
    p_lp = _round(p, dtype)
    out = _round(np.einsum("bhqk,bkhd->bqhd", p_lp, vr), dtype)
    dv = np.einsum("bhqk,bqhd->bkhd", p_lp, dout)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = _round(p * (dp - delta), dtype)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale

    def gsum(x):
        b, sl, h, d = x.shape
        return x.reshape(b, sl, h // group, group, d).sum(3)

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


def check_ring(comm, seed, *, batch=1, seqlen_local=24, heads=4, heads_kv=2, head_dim=16,
               dtype=np.float32, layout="contiguous", backward=True, xp=np, **options):
    """Run the ring forward (and backward) on shards of a random problem and assert
    every output against the float64 oracle; outputs are compared element-wise so a
    NaN-poisoned or unwritten element fails. ``xp``: the array module the ring runs on
    (NumPy, or CuPy for the GPU path); the oracle always runs on NumPy."""
    size = comm.Get_size()
    q, k, v, dout = random_problem(seed, batch, seqlen_local * size, heads, heads_kv, head_dim, dtype)
    ref_opts = {key: options[key] for key in ("causal", "window", "cu_seqlens", "softmax_scale") if key in options}
    out_ref, lse_ref = mpiring.attention_reference(q, k, v, **ref_opts)
    sh = lambda x, axis=1: mpiring.shard(x, comm, layout=layout, axis=axis)  # noqa: E731
    lowp = [None] * 4
    if np.dtype(dtype) in LOW_PRECISION:
        lowp = dense_same_precision(q, k, v, dout, dtype, **ref_opts)
    dev = lambda x: xp.asarray(sh(x))  # noqa: E731
    out_dev, lse_dev = mpiring.ring_attention(dev(q), dev(k), dev(v), comm, layout=layout, **options)
    out, lse = to_host(out_dev), to_host(lse_dev)
    assert out.dtype == q.dtype and out.shape == sh(q).shape
    assert_close("out", out, sh(out_ref), dtype, lowp[0] if lowp[0] is None else sh(lowp[0]))
    np.testing.assert_allclose(lse, sh(lse_ref, 2), rtol=0, atol=1e-4 if dtype != np.float64 else 1e-10)
    if not backward:
        return
    grads_ref = mpiring.attention_reference_backward(dout, q, k, v, **ref_opts)
    grads = mpiring.ring_attention_backward(dev(dout), dev(q), dev(k), dev(v), out_dev, lse_dev, comm,
                                            layout=layout, **options)
    grads = [to_host(g) for g in grads]
    for name, g, g_ref, g_lp in zip(("dq", "dk", "dv"), grads, grads_ref, lowp[1:]):
        assert g.dtype == q.dtype
        assert_close(name, g, sh(g_ref), dtype, g_lp if g_lp is None else sh(g_lp))
