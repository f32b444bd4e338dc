"""The CUDA kernel backend against the float64 oracle (skipped without a GPU).

The ring is emulated in one process: for each of ``size`` virtual ranks, the
backend runs every ring step on the K/V block that rank would hold, with that
block's global-position segments, and dK/dV partials are summed per owning
block in fp32 as they would be while travelling. So zigzag (two segments) and
striped (stride N) masks run through the kernels without MPI; the public
``ring_attention`` on CuPy arrays is checked at ``-n 1`` on top.
"""

import functools
import os

import numpy as np
import pytest
from helpers import (
    LOW_PRECISION,
    assert_close,
    dense_same_precision,
    random_cu_seqlens,
    random_problem,
    rel_err,
)
from ml_dtypes import bfloat16
from mpi4py import MPI

import mpiring
from mpiring import layout as L

cupy = pytest.importorskip("cupy")
if not cupy.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import mpiring.backends.cupy_ as cupy_backend  # noqa: E402
from mpiring.backends import backend_for  # noqa: E402
from mpiring.backends.cupy_ import TILES, CudaKernelBackend  # noqa: E402

pytestmark = [pytest.mark.serial, pytest.mark.gpu]
DTYPES = (np.float16, bfloat16)


@pytest.fixture(autouse=True)
def poison_pool():
    """Fill free pool memory with NaN, so any output element a kernel fails to write stays NaN."""
    junk = cupy.full(1 << 26, np.nan, dtype=np.float32)
    del junk
    yield


def _emulated_ring(q, k, v, dout, *, size, layout, mask, scale):
    """Per-rank out, lse, dq and per-owner dk, dv (host arrays, rank order)."""
    seqlen_local = q.shape[1] // size
    pos = [L.positions(layout, r, size, seqlen_local) for r in range(size)]
    segs = [L.segments(layout, r, size, seqlen_local) for r in range(size)]
    dev = lambda x, r: cupy.asarray(np.ascontiguousarray(x[:, pos[r]]))  # noqa: E731
    heads_kv = k.shape[2]
    kv = [CudaKernelBackend().pack_kv(dev(k, r), dev(v, r)) for r in range(size)]
    dkv = [CudaKernelBackend().zeros_dkv(kv[r]) for r in range(size)]
    results = []
    for r in range(size):
        active = L.step_schedule(layout, r, size, seqlen_local, seqlen_local, mask)
        be = CudaKernelBackend(steps=sum(active))
        qr = dev(q, r)
        st = be.fwd_begin(qr, heads_kv, scale)
        for s in range(size):
            if active[s]:
                be.fwd_step(st, kv[(r - s) % size], segs[r], segs[(r - s) % size], mask)
        out, lse = be.fwd_end(st)
        bst = be.bwd_begin(dev(dout, r), qr, out, lse, heads_kv, scale)
        for s in range(size):
            if active[s]:
                be.bwd_step(bst, kv[(r - s) % size], dkv[(r - s) % size], segs[r], segs[(r - s) % size], mask)
        dq, _, _ = be.bwd_end(bst, dkv[r], k.dtype)
        results.append((out.get(), lse.get(), dq.get()))
    dk = [dkv[r][0].astype(k.dtype).get() for r in range(size)]
    dv = [dkv[r][1].astype(k.dtype).get() for r in range(size)]
    return pos, results, dk, dv


def _check(seed, *, size, seqlen_local, heads, heads_kv, head_dim, dtype, layout, causal=False, window=None,
           batch=1, documents=False, cu=None):
    q, k, v, dout = random_problem(seed, batch, seqlen_local * size, heads, heads_kv, head_dim, dtype)
    if documents and cu is None:
        cu = random_cu_seqlens(np.random.default_rng(seed + 1), seqlen_local * size)
    opts = {"causal": causal, "window": window, "cu_seqlens": cu}
    out_ref, lse_ref = mpiring.attention_reference(q, k, v, **opts)
    grads_ref = mpiring.attention_reference_backward(dout, q, k, v, **opts)
    lowp = dense_same_precision(q, k, v, dout, dtype, **opts)
    mask = L.make_mask(causal, window, cu)
    pos, results, dk, dv = _emulated_ring(q, k, v, dout, size=size, layout=layout, mask=mask,
                                          scale=1 / np.sqrt(head_dim))
    cat = lambda xs, axis=1: np.concatenate(xs, axis=axis)  # noqa: E731
    order = np.concatenate(pos)
    got = {"out": cat([r[0] for r in results]), "dq": cat([r[2] for r in results]), "dk": cat(dk), "dv": cat(dv)}
    refs = {"out": (out_ref, lowp[0]), "dq": (grads_ref[0], lowp[1]), "dk": (grads_ref[1], lowp[2]),
            "dv": (grads_ref[2], lowp[3])}
    for name, x in got.items():
        assert x.dtype == np.dtype(dtype)
        ref, ref_lp = refs[name]
        assert_close(name, x, ref[:, order], dtype, ref_lp[:, order])
    np.testing.assert_allclose(cat([r[1] for r in results], axis=2), lse_ref[:, :, order], rtol=0, atol=1e-4)


MASKS = [(False, None), (True, None), (False, (37, 20)), (True, 50)]


@pytest.mark.parametrize("head_dim", sorted(TILES))
@pytest.mark.parametrize("heads,heads_kv", [(2, 2), (4, 1)])
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_oracle(seed, dtype, layout, causal, window, heads, heads_kv, head_dim):
    # 3 virtual ranks; odd lengths, no multiple of any tile: 97 tokens each (zigzag needs an
    # even count: 98, two segments of 49).
    _check(seed, size=3, seqlen_local=98 if layout == "zigzag" else 97, heads=heads, heads_kv=heads_kv,
           head_dim=head_dim, dtype=dtype, layout=layout, causal=causal, window=window)


@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_many_tiles(seed, dtype, causal, window, head_dim):
    """Lengths spanning many tiles (pipelining, skipped tiles; zigzag segments of 265) and batch > 1."""
    _check(seed, size=2, seqlen_local=530, heads=4, heads_kv=2, head_dim=head_dim, dtype=dtype,
           layout="zigzag", causal=causal, window=window, batch=2)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_sync_kernels_where_wgmma_is_the_default(seed, monkeypatch, dtype, causal, window, head_dim):
    """MPIRING_WGMMA=0: the mma.sync kernels Hopper no longer runs by default (d128 forward
    and backward, d64 forward), over many tiles and with documents (on other GPUs every
    test above runs them)."""
    monkeypatch.setenv("MPIRING_WGMMA", "0")
    _check(seed, size=2, seqlen_local=530, heads=4, heads_kv=2, head_dim=head_dim, dtype=dtype,
           layout="zigzag", causal=causal, window=window, batch=2)
    _check(seed, size=2, seqlen_local=260, heads=4, heads_kv=2, head_dim=head_dim, dtype=dtype,
           layout="contiguous", causal=causal, window=window, documents=True)


def test_hopper_runs_the_wgmma_kernels():
    """On compute capability 9.0 the d128 tests above run the wgmma forward and backward, and
    the d64 ones the wgmma forward (so they check those, not a silent fallback); elsewhere
    the mma.sync kernels."""
    if os.environ.get("MPIRING_WGMMA", "1").strip() != "1":
        pytest.skip("MPIRING_WGMMA is set: not the default kernels")
    dev = cupy.cuda.Device()
    hopper = dev.compute_capability == "90"
    for f in cupy_backend.KERNEL_FILES:
        assert cupy_backend._use_wgmma(dev.id, f, 128) == hopper, f
        assert not cupy_backend._use_wgmma(dev.id, f, 32), f
    assert cupy_backend._use_wgmma(dev.id, "attention_fwd.cu", 64) == hopper
    assert not cupy_backend._use_wgmma(dev.id, "attention_bwd.cu", 64)


@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_documents(seed, dtype, layout, causal, window):
    """Packed documents (cu_seqlens) through the kernels: length-1 and empty documents,
    one spanning the virtual ranks, boundaries inside tiles; GQA."""
    _check(seed, size=3, seqlen_local=98 if layout == "zigzag" else 97, heads=4, heads_kv=2, head_dim=64,
           dtype=dtype, layout=layout, causal=causal, window=window, documents=True)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 300)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_documents_many_tiles(seed, causal, window, head_dim):
    """Documents over many tiles: whole tiles inside one document (no per-element mask),
    tiles skipped between documents, and the deterministic dQ order across them."""
    _check(seed, size=2, seqlen_local=1030, heads=4, heads_kv=2, head_dim=head_dim, dtype=bfloat16,
           layout="zigzag", causal=causal, window=window, documents=True)


@pytest.mark.parametrize("increasing", [False, True])
def test_kernels_documents_dq_orders(seed, monkeypatch, increasing):
    """Both deterministic dQ orders with documents (the launcher takes the increasing one
    for long documents, cupy_.DQ_INCREASING_DOCUMENTS) against the oracle, over many tiles."""
    monkeypatch.setattr(cupy_backend, "DQ_INCREASING_DOCUMENTS", 0 if increasing else np.inf)
    assert cupy_backend.dq_increasing(L.make_mask(True, None, np.array([0, 5, 2060]))) == increasing
    _check(seed, size=2, seqlen_local=1030, heads=4, heads_kv=2, head_dim=128, dtype=bfloat16, layout="zigzag",
           causal=True, documents=True)


@pytest.mark.parametrize("entries", [1024, 1025])
def test_kernels_documents_past_the_shared_copy(seed, entries):
    """The backward copies cu_seqlens to shared memory up to 1024 entries (CU_SMEM in
    attention_bwd.cu) and reads it from global memory past that: both against the oracle,
    with the deterministic dQ order across ~1000 short documents."""
    total = 2 * 1030
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), entries - 2, replace=False)), [total]])
    _check(seed, size=2, seqlen_local=1030, heads=4, heads_kv=2, head_dim=64, dtype=bfloat16, layout="zigzag",
           causal=True, documents=True, cu=cu)


@pytest.mark.parametrize("documents", [False, True])
def test_grid_split_along_z(seed, monkeypatch, documents):
    """More tiles than gridDim.y holds (65535 in CUDA; 2 here) continue along gridDim.z,
    in both kernels and both dQ modes (the ticketed and the plain block order)."""
    monkeypatch.setattr(cupy_backend, "MAX_GRID_Y", 2)
    _check(seed, size=2, seqlen_local=530, heads=4, heads_kv=2, head_dim=64, dtype=bfloat16, layout="zigzag",
           causal=True, documents=documents)
    monkeypatch.setattr(CudaKernelBackend, "__init__", functools.partialmethod(CudaKernelBackend.__init__,
                                                                                 deterministic=False))
    _check(seed, size=2, seqlen_local=530, heads=4, heads_kv=2, head_dim=128, dtype=np.float16, layout="contiguous",
           causal=False, window=(100, 30), documents=documents)


def _one_causal_step(seed, batch, seqlen_local, heads, heads_kv, head_dim, documents, be):
    """Rank 1 of 2 (zigzag, causal, bf16) against rank 0's K/V block through ``be``: the
    forward run, then (kv, bwd_begin() → a fresh backward state, (q_segs, k_segs, mask):
    the rest of a ``bwd_step``'s arguments)."""
    size = 2
    q, k, v, dout = (cupy.asarray(x) for x in random_problem(seed, batch, seqlen_local, heads, heads_kv, head_dim,
                                                             bfloat16))
    cu = random_cu_seqlens(np.random.default_rng(seed), seqlen_local * size) if documents else None
    mask = L.make_mask(True, None, cu)
    q_segs, k_segs = L.segments("zigzag", 1, size, seqlen_local), L.segments("zigzag", 0, size, seqlen_local)
    kv = be.pack_kv(k, v)
    st = be.fwd_begin(q, heads_kv, 0.1)
    be.fwd_step(st, kv, q_segs, k_segs, mask)
    out, lse = be.fwd_end(st)
    return kv, lambda: be.bwd_begin(dout, q, out, lse, heads_kv, 0.1), (q_segs, k_segs, mask)


@pytest.mark.parametrize("documents", [False, True])
def test_fresh_dkv_partial_is_written_whole(seed, documents):
    """bwd_step(fresh=True) writes its dK/dV partial whole over NaN, bitwise what adding into
    zeros gives; the keys that no query meets (zigzag, causal: rank 0's second chunk against
    rank 1's queries; with documents more) are written zero by blocks that have no work."""
    be = CudaKernelBackend(steps=1)
    kv, bwd_begin, step = _one_causal_step(seed, 1, 1030, 4, 2, 128, documents, be)
    parts = []
    for fresh in (False, True):
        bst = bwd_begin()
        dkv = cupy.full((2, *kv[0].shape), np.nan, np.float32) if fresh else be.zeros_dkv(kv)
        be.bwd_step(bst, kv, dkv, *step, fresh=fresh)
        parts.append(dkv.get())
    added, written = parts
    assert np.abs(added).max() > 0
    assert (written[:, :, 640:] == 0).all(), "keys that no query meets"
    assert np.array_equal(added.view(np.uint32), written.view(np.uint32))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("documents,head_dim,batch", [(False, 128, 1), (True, 128, 2), (True, 64, 1)])
def test_bwd_step_by_heads(seed, documents, head_dim, batch, deterministic):
    """bwd_step over KV heads [0, h) then [h, Hkv) (the ring's deferred half of step 0)
    writes every head's dQ and fresh dK/dV partial, bitwise what the whole step gives
    (deterministic dQ; atomic: close), over NaN-poisoned partials; GQA, batch 2."""
    be = CudaKernelBackend(steps=1, deterministic=deterministic)
    kv, bwd_begin, step = _one_causal_step(seed, batch, 530, 6, 3, head_dim, documents, be)
    results = []
    for parts in ([None], [(0, 1), (1, 3)], [(0, 2), (2, 3)]):
        bst = bwd_begin()
        dkv = cupy.full((2, *kv[0].shape), np.nan, np.float32)
        for heads in parts:
            be.bwd_step(bst, kv, dkv, *step, fresh=True, heads=heads)
        results.append((bst.dq.get(), dkv.get()))
    whole = results[0]
    assert np.isfinite(whole[1]).all() and np.abs(whole[1]).max() > 0 and np.abs(whole[0]).max() > 0
    for split in results[1:]:
        for a, b in zip(whole, split):
            if deterministic:
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
            else:
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mul", [1, -1, 0])
def test_cast_out_rounds_like_astype(seed, dtype, mul):
    """The backward's fp32 → input dtype kernel (dQ with its sign, dK/dV): NumPy's / ml_dtypes'
    conversion bitwise (round to nearest even; inf, NaN, overflow; fp32 subnormals may flush
    to zero), every element written over a poisoned pool; sizes not a multiple of 4 fall
    back to CuPy's astype."""
    rng = np.random.default_rng(seed)
    shape = (3, 1000, 2, 64)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-30, 30, shape)).astype(np.float32)
    x.flat[:7] = [np.inf, -np.inf, np.nan, 1e-40, 65520.0, 3.4e38, -0.0]
    be = CudaKernelBackend()
    for shape in (x.shape, (7, 3)):
        xs = cupy.asarray(x.ravel()[:int(np.prod(shape))].reshape(shape))
        with np.errstate(invalid="ignore", over="ignore"):  # 0 · inf; beyond float16
            want = (xs.get() * np.float32(mul)).astype(dtype)
        got = be._cast_out(xs, dtype, mul).get()
        assert got.dtype == np.dtype(dtype) and got.shape == shape
        nan = np.isnan(want.astype(np.float32))
        assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
        # fp32 subnormals (below 1.2e-38, bf16 subnormals too) may come out zero: the GPU's
        # conversion flushes them; every other value bitwise.
        tiny = np.abs(want.astype(np.float32)) < np.finfo(np.float32).tiny
        assert np.array_equal(got[~nan & ~tiny].view(np.uint16), want[~nan & ~tiny].view(np.uint16)), "values differ"
        flushed = got[tiny].astype(np.float32)
        assert ((flushed == 0) | (flushed == want[tiny].astype(np.float32))).all()


def _backward_bits(seed, *, layout, causal, window=None, documents=False, deterministic=True, runs=2):
    """dq, dk, dv of ``runs`` identical backward calls (as uint16 bits), one K/V block of 2 virtual ranks."""
    size, seqlen_local, heads, heads_kv, head_dim = 2, 2050, 8, 2, 128
    q, k, v, dout = (cupy.asarray(x) for x in random_problem(seed, 1, seqlen_local, heads, heads_kv, head_dim,
                                                             bfloat16))
    cu = random_cu_seqlens(np.random.default_rng(seed), seqlen_local * size) if documents else None
    mask = L.make_mask(causal, window, cu)
    q_segs = L.segments(layout, 1, size, seqlen_local)
    results = []
    for _ in range(runs):
        be = CudaKernelBackend(steps=2, deterministic=deterministic)
        kv = [be.pack_kv(k, v), be.pack_kv(v, k)]
        segs = [q_segs, L.segments(layout, 0, size, seqlen_local)]
        st = be.fwd_begin(q, heads_kv, 0.1)
        for s in range(2):
            be.fwd_step(st, kv[s], q_segs, segs[s], mask)
        out, lse = be.fwd_end(st)
        bst = be.bwd_begin(dout, q, out, lse, heads_kv, 0.1)
        dkv = [be.zeros_dkv(kv[0]) for _ in range(2)]
        for s in range(2):
            be.bwd_step(bst, kv[s], dkv[s], q_segs, segs[s], mask)
        grads = be.bwd_end(bst, dkv[0], k.dtype)
        results.append([g.view(np.uint16).get() for g in grads] + [dkv[1].get()])
    return results


@pytest.mark.parametrize("layout,causal,window,documents", [
    ("contiguous", False, None, False), ("zigzag", True, None, False), ("striped", True, 256, False),
    ("zigzag", True, None, True),
])
def test_backward_is_deterministic(seed, layout, causal, window, documents):
    """Identical inputs give bitwise identical dq, dk, dv: the key tiles add into dQ in a fixed order."""
    first, *others = _backward_bits(seed, layout=layout, causal=causal, window=window, documents=documents, runs=3)
    for other in others:
        for name, a, b in zip(("dq", "dk", "dv", "dkv partial"), first, other):
            assert np.array_equal(a, b), f"{name} differs between identical calls"


def test_atomic_dq_agrees_with_deterministic(seed):
    """deterministic=False (atomic adds in any order) computes the same gradients up to fp32 rounding."""
    (det,) = _backward_bits(seed, layout="zigzag", causal=True, runs=1)
    (fast,) = _backward_bits(seed, layout="zigzag", causal=True, deterministic=False, runs=1)
    for name, a, b in zip(("dq", "dk", "dv"), det, fast):
        a, b = a.view(bfloat16).astype(np.float32), b.view(bfloat16).astype(np.float32)
        assert rel_err(b, a) < 1e-2, name


def _dense(q, k, v, dout, allowed, scale):
    """float64 dense attention with an explicit mask: out, lse, dq, dk, dv (no GQA)."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    s = np.where(allowed, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1), 0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    lse = np.where(den[..., 0] > 0, np.log(np.where(den[..., 0] > 0, den[..., 0], 1)) + m[..., 0], -np.inf)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, v)
    ds = p * (dp - np.einsum("bqhd,bqhd->bhq", dout, out)[..., None])
    return out, lse, np.einsum("bhqk,bkhd->bqhd", ds, k) * scale, np.einsum("bhqk,bqhd->bkhd", ds, q) * scale, \
        np.einsum("bhqk,bqhd->bkhd", p, dout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fully_masked_rows(seed, dtype, head_dim):
    """Rows with no allowed key (inside mixed tiles and in skipped tiles): out 0, lse −inf, no NaN."""
    sq = sk = 150
    q, k, v, dout = random_problem(seed, 1, sq, 2, 2, head_dim, dtype)
    q_segs, k_segs = (L.Segment(0, 1, sq),), (L.Segment(70, 1, sk),)  # causal: rows 0..69 see nothing
    mask = L.make_mask(True, None)
    allowed = mask.allowed(np.arange(sq), np.arange(70, 70 + sk))
    scale = 1 / np.sqrt(head_dim)
    ref = _dense(q, k, v, dout, allowed, scale)
    be = CudaKernelBackend(steps=1)
    kv = be.pack_kv(cupy.asarray(k), cupy.asarray(v))
    st = be.fwd_begin(cupy.asarray(q), 2, scale)
    be.fwd_step(st, kv, q_segs, k_segs, mask)
    out, lse = (x.get() for x in be.fwd_end(st))
    assert np.all(out[:, :70] == 0) and np.all(lse[:, :, :70] == -np.inf)
    assert rel_err(out, ref[0]) < 2e-2
    np.testing.assert_allclose(lse, ref[1], rtol=0, atol=1e-4)
    dkv = be.zeros_dkv(kv)
    bst = be.bwd_begin(cupy.asarray(dout), cupy.asarray(q), cupy.asarray(out), cupy.asarray(lse), 2, scale)
    be.bwd_step(bst, kv, dkv, q_segs, k_segs, mask)
    dq, dk, dv = (x.get() for x in be.bwd_end(bst, dkv, k.dtype))
    for name, x, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:]):
        assert np.all(np.isfinite(x.astype(np.float32))), name
        assert rel_err(x, r) < 3e-2, name


def test_unknown_step_count_finalises_from_state(seed):
    """Without a steps hint the state stays fp32 and fwd_end normalises it."""
    q, k, v, _ = random_problem(seed, 1, 200, 2, 1, 64, bfloat16)
    mask = L.make_mask(True, None)
    segs = (L.Segment(0, 1, 200),)
    results = []
    for steps in (None, 1):
        be = CudaKernelBackend(steps=steps)
        st = be.fwd_begin(cupy.asarray(q), 1, 0.125)
        be.fwd_step(st, be.pack_kv(cupy.asarray(k), cupy.asarray(v)), segs, segs, mask)
        results.append([x.get() for x in be.fwd_end(st)])
    assert rel_err(results[0][0], results[1][0]) < 1e-2
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,head_dim,kernel", [
    (bfloat16, 128, True), (np.float16, 64, True), (np.float32, 64, False), (bfloat16, 256, False),
])
def test_public_api_one_gpu(seed, dtype, head_dim, kernel):
    """ring_attention on CuPy arrays at -n 1: kernels where they apply, the cuBLAS fallback elsewhere."""
    comm = MPI.COMM_SELF
    be = backend_for(cupy, dtype=np.dtype(dtype), head_dim=head_dim, mask=L.make_mask(True), steps=1)
    assert not isinstance(be, CudaKernelBackend) or be.deterministic
    assert isinstance(be, CudaKernelBackend) == kernel
    q, k, v, dout = random_problem(seed, 2, 1025, 4, 2, head_dim, dtype)
    opts = {"causal": True}
    out_ref, lse_ref = mpiring.attention_reference(q, k, v, **opts)
    grads_ref = mpiring.attention_reference_backward(dout, q, k, v, **opts)
    lowp = dense_same_precision(q, k, v, dout, dtype, **opts) if np.dtype(dtype) in LOW_PRECISION else [None] * 4
    dq_, dk_, dv_, ddo = (cupy.asarray(x) for x in (q, k, v, dout))
    out, lse = mpiring.ring_attention(dq_, dk_, dv_, comm, **opts)
    assert isinstance(out, cupy.ndarray) and out.dtype == np.dtype(dtype)
    grads = mpiring.ring_attention_backward(ddo, dq_, dk_, dv_, out, lse, comm, **opts)
    assert_close("out", out.get(), out_ref, dtype, lowp[0])
    np.testing.assert_allclose(lse.get(), lse_ref, rtol=0, atol=1e-4)
    for name, g, r, r_lp in zip(("dq", "dk", "dv"), grads, grads_ref, lowp[1:]):
        assert isinstance(g, cupy.ndarray)
        assert_close(name, g.get(), r, dtype, r_lp)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_positive_softmax_scale(seed, dtype, scale):
    """The forward kernel scales each row's maximum of the unscaled scores, which needs a
    positive scale: the backend runs a negative one as −q with −scale and zero as zero
    queries (dQ sign-corrected). Fresh inputs against the float64 oracle, fwd and bwd."""
    comm = MPI.COMM_SELF
    q, k, v, dout = random_problem(seed, 1, 333, 4, 2, 64, dtype)
    opts = {"causal": True, "softmax_scale": scale}
    out_ref, lse_ref = mpiring.attention_reference(q, k, v, **opts)
    grads_ref = mpiring.attention_reference_backward(dout, q, k, v, **opts)
    lowp = dense_same_precision(q, k, v, dout, dtype, **opts)
    dq_, dk_, dv_, ddo = (cupy.asarray(x) for x in (q, k, v, dout))
    out, lse = mpiring.ring_attention(dq_, dk_, dv_, comm, **opts)
    grads = mpiring.ring_attention_backward(ddo, dq_, dk_, dv_, out, lse, comm, **opts)
    assert_close("out", out.get(), out_ref, dtype, lowp[0])
    np.testing.assert_allclose(lse.get(), lse_ref, rtol=0, atol=1e-4)
    for name, g, r, r_lp in zip(("dq", "dk", "dv"), grads, grads_ref, lowp[1:]):
        assert_close(name, g.get(), r, dtype, r_lp)
    if scale == 0:
        assert not cupy.any(grads[0]) and not cupy.any(grads[1])  # the scores do not depend on q or k


def test_record_is_an_event_on_the_current_stream():
    be = CudaKernelBackend()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.zeros((2, 8, 64), np.float16)
        x += 1
        event = be.record()
    assert isinstance(event, cupy.cuda.Event)
    event.synchronize()
    assert event.done and float(x.sum()) == 2 * 8 * 64


def test_dq_wait_traps_instead_of_hanging(tmp_path):
    """A deterministic-dQ counter that is never raised (a tile-order bug) ends the launch
    with an error after WAIT_LIMIT_NS, instead of hanging the GPU and the job. Run in a
    child process: the trap leaves that CUDA context unusable."""
    import subprocess
    import sys

    script = (
        "import sys, cupy\n"
        "from mpiring.backends import cupy_\n"
        "code = cupy_._inline_header('#include \"common.cuh\"\\n'\n"
        "    'extern \"C\" __global__ void w(const int* p, int target) { wait_at_least(p, target); }',\n"
        "    cupy_.kernel_sources())\n"
        "k = cupy.RawKernel(code, 'w', options=('-DWAIT_LIMIT_NS=300000000ull',))\n"
        "c = cupy.ones(1, cupy.int32)\n"
        "k((1,), (1,), (c, cupy.int32(1)))\n"  # already reached: returns at once
        "cupy.cuda.runtime.deviceSynchronize()\n"
        "print('reached', flush=True)\n"
        "k((1,), (1,), (c, cupy.int32(2)))\n"  # never reached: traps after 0.3 s
        "try:\n"
        "    cupy.cuda.runtime.deviceSynchronize()\n"
        "except Exception as exc:\n"
        "    print('trapped:', type(exc).__name__, exc, flush=True)\n"
        "    sys.exit(3)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert run.returncode == 3 and "reached" in run.stdout and "trapped" in run.stdout, run.stdout + run.stderr
