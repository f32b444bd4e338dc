"""Hardening (issue 7): bad input answers at once on every rank, the communicator
stays usable, allocation failures are agreed, waits can time out, results are
deterministic, and non-finite inputs propagate only where the reference does.

The basic checks (ndim, dtype, head counts, option values, the disagreements of
q.shape/dtype/layout/causal/window/scale, COMM_NULL, intercommunicators, COMM_SELF)
are in test_validation.py; this file covers the rest of the matrix. Tests that need
several ranks skip at -n 1; GPU cases (parametrized over ``xp``) skip without CuPy.
"""

import time

import numpy as np
import pytest
from hardening_util import (
    ARRAY_MODULES,
    JitteryTransport,
    agree,
    assert_raises_everywhere,
    bitwise_equal,
    check_quietly,
    next_call_works,
)
from helpers import check_ring, random_problem, rel_err, to_host
from ml_dtypes import bfloat16
from mpi4py import MPI

import mpiring
from mpiring.api import private_comm
from mpiring.backends import backend_for
from mpiring.layout import make_mask, positions
from mpiring.transport import Exchange, MpiHostTransport


def arrays(seqlen=4, heads=2, heads_kv=1, head_dim=8, batch=1, dtype=np.float32, xp=np):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((batch, seqlen, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, seqlen, heads_kv, head_dim)).astype(dtype)
    return {"q": xp.asarray(q), "k": xp.asarray(k), "v": xp.asarray(k + 1)}


def needs_ranks(comm, n=2):
    if comm.Get_size() < n:
        pytest.skip(f"needs {n} ranks")


# --- one rank differs from the others ------------------------------------------------------
# (name, exception, message fragment, what the last rank passes instead).
# Several would hang before the fix: the deviating rank raised while building the
# signature, outside the agreed checks, and the others waited in the allgather.
ONE_RANK_DIFFERS = [
    ("heads_kv", ValueError, "k.shape differs across ranks", lambda size: arrays(heads_kv=2)),
    ("head_dim", ValueError, "q.shape differs across ranks", lambda size: arrays(head_dim=16)),
    ("batch", ValueError, "q.shape differs across ranks", lambda size: arrays(batch=2)),
    ("seqlen 0", ValueError, "q.shape differs across ranks", lambda size: arrays(seqlen=0)),
    ("transport", ValueError, "transport differs across ranks", lambda size: {"transport": "mpi-host"}),
    ("cu_seqlens", ValueError, "cu_seqlens differs across ranks", lambda size: {"cu_seqlens": [0, 1, 4 * size]}),
    ("not an array", TypeError, "q must be a", lambda size: {"q": [[1.0]]}),
    ("int dtype", TypeError, "q.dtype=int32 is not supported",
     lambda size: {name: x.astype(np.int32) for name, x in arrays().items()}),
    ("timeout", ValueError, "timeout=0 must be None or a positive number", lambda size: {"timeout": 0}),
    ("window float", ValueError, "window=3.5 must be", lambda size: {"window": 3.5}),
    ("causal array", TypeError, "causal=array([1, 2]) must be a bool", lambda size: {"causal": np.array([1, 2])}),
    ("layout list", ValueError, "layout=['zigzag'] must be one of", lambda size: {"layout": ["zigzag"]}),
    ("cu_seqlens ragged", ValueError, "invalid input", lambda size: {"cu_seqlens": [[0, 1], [4 * size]]}),
    ("scale complex", ValueError, "softmax_scale=1j must be a finite number", lambda size: {"softmax_scale": 1j}),
]


@pytest.mark.parametrize("name,exc,match,deviation", ONE_RANK_DIFFERS, ids=[c[0] for c in ONE_RANK_DIFFERS])
def test_one_rank_differs(comm, name, exc, match, deviation):
    needs_ranks(comm)
    call = {**arrays(), "causal": True}
    if comm.Get_rank() == comm.Get_size() - 1:
        call.update(deviation(comm.Get_size()))
    err = assert_raises_everywhere(comm, exc, match, lambda: mpiring.ring_attention(comm=comm, **call))
    if "differs across ranks" not in match:  # a local check: the message names the rank
        assert f"(on rank {comm.Get_size() - 1})" in str(err)


BACKWARD_ONE_RANK_DIFFERS = [
    ("out dtype", TypeError, "out.dtype=float64 differs from q.dtype=float32",
     lambda out, lse: {"out": out.astype(np.float64)}),
    ("lse None", ValueError, "lse must be a numpy array of shape (1, 2, 4), got NoneType",
     lambda out, lse: {"lse": None}),
    ("lse int", TypeError, "lse.dtype=int8 must be floating", lambda out, lse: {"lse": lse.astype(np.int8)}),
    ("lse 2-D", ValueError, "lse must be a numpy array of shape (1, 2, 4)", lambda out, lse: {"lse": lse[0]}),
    ("out list", TypeError, "out must be a", lambda out, lse: {"out": out.tolist()}),
]


@pytest.mark.parametrize("name,exc,match,deviation", BACKWARD_ONE_RANK_DIFFERS,
                         ids=[c[0] for c in BACKWARD_ONE_RANK_DIFFERS])
def test_one_rank_differs_in_backward(comm, name, exc, match, deviation):
    """Backward inputs: one rank's out or lse is wrong (lse=None used to hang the others)."""
    a = arrays()
    out, lse = mpiring.ring_attention(comm=comm, **a)
    call = {**a, "dout": a["q"], "out": out, "lse": lse}
    if comm.Get_rank() == comm.Get_size() - 1:
        call.update(deviation(out, lse))
    err = assert_raises_everywhere(comm, exc, match, lambda: mpiring.ring_attention_backward(comm=comm, **call))
    assert f"(on rank {comm.Get_size() - 1})" in str(err)


# --- bad on every rank ---------------------------------------------------------------------
def _global(comm):
    return 4 * comm.Get_size()


EVERY_RANK = [
    ("cu_seqlens decreasing", ValueError, "not decrease", lambda S: {"cu_seqlens": [0, 3, 2, S]}),
    ("cu_seqlens not from 0", ValueError, "must start at 0", lambda S: {"cu_seqlens": [1, S]}),
    ("cu_seqlens short of seqlen", ValueError, "end at the global seqlen", lambda S: {"cu_seqlens": [0, S - 1]}),
    ("cu_seqlens float", ValueError, "1-D integer array", lambda S: {"cu_seqlens": np.array([0.0, S])}),
    ("cu_seqlens 2-D", ValueError, "1-D integer array", lambda S: {"cu_seqlens": [[0, S]]}),
    ("cu_seqlens empty", ValueError, "1-D integer array", lambda S: {"cu_seqlens": []}),
    ("heads_kv 0", ValueError, "heads_kv=0", lambda S: arrays(heads_kv=0)),
    ("heads 0", ValueError, "heads and head_dim must be >= 1", lambda S: arrays(heads=0)),
    ("head_dim 0", ValueError, "heads and head_dim must be >= 1", lambda S: arrays(head_dim=0)),
    ("k, v shapes", ValueError, "differs from v.shape", lambda S: {"v": arrays(heads_kv=2)["v"]}),
    ("seqlen_q != seqlen_k, causal", ValueError, "must be equal with causal",
     lambda S: {"k": arrays(seqlen=2)["k"], "v": arrays(seqlen=2)["v"]}),
    ("causal string", TypeError, "causal='yes' must be a bool", lambda S: {"causal": "yes"}),
    ("timeout negative", ValueError, "timeout=-1", lambda S: {"timeout": -1}),
    ("timeout nan", ValueError, "timeout=nan", lambda S: {"timeout": float("nan")}),
    ("timeout inf", ValueError, "timeout=inf", lambda S: {"timeout": float("inf")}),
    ("timeout string", ValueError, "timeout='1'", lambda S: {"timeout": "1"}),
    ("GPU transport for NumPy", ValueError, "can't move numpy arrays", lambda S: {"transport": "nccl"}),
]


@pytest.mark.parametrize("name,exc,match,options", EVERY_RANK, ids=[c[0] for c in EVERY_RANK])
def test_bad_on_every_rank(comm, name, exc, match, options):
    call = {**arrays(), "causal": True, **options(_global(comm))}
    assert_raises_everywhere(comm, exc, match, lambda: mpiring.ring_attention(comm=comm, **call))


def test_mixed_devices(comm):
    """One rank on the CPU, the others on a GPU (and, with 2 GPUs, k on another GPU)."""
    needs_ranks(comm)
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("needs a CUDA device")
    cpu = comm.Get_rank() == comm.Get_size() - 1
    call = arrays(xp=np if cpu else cupy)
    assert_raises_everywhere(comm, TypeError, "array differs across ranks",
                             lambda: mpiring.ring_attention(comm=comm, **call))
    if cupy.cuda.runtime.getDeviceCount() >= 2:
        call = arrays(xp=cupy)
        other = (cupy.cuda.Device().id + 1) % cupy.cuda.runtime.getDeviceCount()  # never this rank's own
        with cupy.cuda.Device(other):
            call["k"] = cupy.asarray(call["k"])
        assert_raises_everywhere(comm, ValueError, "arrays must all be on one GPU",
                                 lambda: mpiring.ring_attention(comm=comm, **call), xp=cupy)


# --- inputs that are valid and must be handled ------------------------------------------
def _views(x, xp, how):
    """The same values as ``x`` in a non-contiguous (or negative-stride) array."""
    if how == "transposed":  # (B, H, S, D) memory, viewed as (B, S, H, D)
        return xp.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if how == "reversed":  # negative stride along the sequence
        return xp.ascontiguousarray(x[:, ::-1])[:, ::-1]
    if how == "every other":
        wide = xp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return xp.asfortranarray(x)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("how", ["transposed", "reversed", "every other", "fortran"])
def test_non_contiguous_inputs(comm, seed, xp, how):
    """Strided views give bitwise the same outputs and gradients as contiguous copies."""
    size = comm.Get_size()
    q, k, v, dout = random_problem(seed, 1, 6 * size, 4, 2, 8, np.float32)
    sh = lambda x: xp.asarray(mpiring.shard(x, comm, layout="zigzag"))  # noqa: E731
    q, k, v, dout = sh(q), sh(k), sh(v), sh(dout)
    opts = {"causal": True, "layout": "zigzag"}
    out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
    grads = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **opts)
    strided = [_views(x, xp, how) for x in (q, k, v, dout, out)]
    assert not any(x.flags.c_contiguous for x in strided)
    lse_view = xp.ascontiguousarray(lse[:, ::-1])[:, ::-1]
    out2, lse2 = mpiring.ring_attention(*strided[:3], comm, **opts)
    grads2 = mpiring.ring_attention_backward(strided[3], *strided[:3], strided[4], lse_view, comm, **opts)
    same = all(bitwise_equal(a, b) for a, b in zip((out, lse, *grads), (out2, lse2, *grads2)))
    agree(comm, None if same else f"{how} inputs changed the result")


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_seqlen_zero_everywhere(comm, xp, layout):
    a = arrays(seqlen=0, heads=4, heads_kv=2, xp=xp)
    out, lse = mpiring.ring_attention(comm=comm, causal=True, layout=layout, **a)
    dq, dk, dv = mpiring.ring_attention_backward(a["q"], comm=comm, out=out, lse=lse, causal=True, layout=layout,
                                                 **a)
    assert out.shape == (1, 0, 4, 8) and lse.shape == (1, 4, 0) and lse.dtype == np.float32
    assert dq.shape == (1, 0, 4, 8) and dk.shape == dv.shape == (1, 0, 2, 8)
    next_call_works(comm, xp)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("causal", [False, True])
def test_batch_zero(comm, xp, causal):
    a = arrays(batch=0, heads=4, heads_kv=2, xp=xp)
    out, lse = mpiring.ring_attention(comm=comm, causal=causal, **a)
    dq, dk, dv = mpiring.ring_attention_backward(a["q"], comm=comm, out=out, lse=lse, causal=causal, **a)
    assert out.shape == (0, 4, 4, 8) and lse.shape == (0, 4, 4)
    assert dq.shape == (0, 4, 4, 8) and dk.shape == dv.shape == (0, 4, 2, 8)
    next_call_works(comm, xp)


def test_independent_sub_communicators(comm, seed):
    """Two halves of the world run different rings at once without crosstalk."""
    color = comm.Get_rank() % 2
    half = comm.Split(color)
    try:
        failure = check_quietly(lambda: check_ring(half, seed + color, seqlen_local=8, causal=color == 1,
                                                   layout=("zigzag", "striped")[color]))
        agree(comm, failure)
    finally:
        half.Free()


# --- non-finite inputs -------------------------------------------------------------------
# Documented rule (ring_attention's docstring): forward out/lse are non-finite exactly on
# the rows where the float64 reference has them for non-finite q or k (a bad k row j
# poisons exactly the query rows allowed to attend j); a non-finite v, or any non-finite
# input of the backward, stays within its (batch, kv-head group) slice (0·NaN in a
# matmul spreads it along that slice; the reference spreads it to the whole slice).
quiet_nan = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
NONFINITE_OPTIONS = [
    {"layout": "zigzag", "causal": True},
    {"layout": "striped", "window": 5},
    {"layout": "contiguous", "cu_seqlens": "thirds"},
]


def _poison_problem(comm, seed, where, value, options):
    size = comm.Get_size()
    seqlen = 6 * size
    q, k, v, dout = random_problem(seed, 2, seqlen, 4, 2, 8, np.float64)
    options = dict(options)
    if options.get("cu_seqlens") == "thirds":
        options["cu_seqlens"] = [0, seqlen // 3, 2 * seqlen // 3, seqlen]
    row = seqlen // 2 + 1
    # Batch 0, kv head 1 and its GQA group, q heads 2 and 3.
    {"q": q, "k": k, "v": v}[where][0, row, 3 if where == "q" else 1, 3] = value
    return q, k, v, dout, row, options


@quiet_nan
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("options", NONFINITE_OPTIONS, ids=lambda o: o["layout"])
def test_non_finite_forward(comm, seed, where, value, options):
    q, k, v, _, row, options = _poison_problem(comm, seed, where, value, options)
    layout = options.pop("layout")
    out_ref, lse_ref = mpiring.attention_reference(q, k, v, **options)
    sh = lambda x, axis=1: mpiring.shard(x, comm, layout=layout, axis=axis)  # noqa: E731
    out, lse = mpiring.ring_attention(sh(q), sh(k), sh(v), comm, layout=layout, **options)
    bad_rows = ~np.isfinite(out).all(-1)  # (B, S_local, H)
    if where == "v":
        # Attending rows are poisoned; nothing outside batch 0, kv head 1 (q heads 2, 3).
        qpos = np.arange(q.shape[1])
        attends = make_mask(options.get("causal", False), options.get("window"), options.get("cu_seqlens")).allowed(
            qpos, np.array([row]))[:, 0]
        must = np.zeros(bad_rows.shape, bool)
        must[0, :, 2:] = sh(attends[None, :, None].repeat(2, 2))[0]
        inside = np.zeros(bad_rows.shape, bool)
        inside[0, :, 2:] = True
        ok = np.all(bad_rows >= must) and not np.any(bad_rows & ~inside)
        clean = ~inside[..., None].repeat(8, -1)
        ok = ok and rel_err(out[clean], sh(out_ref)[clean]) <= 1e-11
        agree(comm, None if ok else f"v poison spread wrongly: {np.argwhere(bad_rows).tolist()}")
        return
    # q or k: the same non-finite pattern as the reference, the same values elsewhere.
    failure = check_quietly(lambda: _assert_same_pattern(out, sh(out_ref), lse, sh(lse_ref, 2)))
    agree(comm, failure)


def _poisoned_rows(lse_ref):
    """(B, H, S): rows the reference poisons, read from its lse (NaN or +inf; −inf means no
    allowed key). Its ``out`` hides a NaN row as 0 (``where(denom > 0, …)``)."""
    return ~np.isfinite(lse_ref) & (lse_ref != -np.inf)


def _assert_same_pattern(out, out_ref, lse, lse_ref):
    poisoned = _poisoned_rows(lse_ref)
    out_bad = ~np.isfinite(out).all(-1).transpose(0, 2, 1)
    assert np.array_equal(out_bad, poisoned), f"out poisoned at {np.argwhere(out_bad ^ poisoned).tolist()[:4]}…"
    # lse of a poisoned row: never a finite number (NaN, see test_nan_reaches_lse).
    assert not np.isfinite(lse[poisoned]).any(), "lse is finite on a poisoned row"
    clean = ~poisoned.transpose(0, 2, 1)
    assert rel_err(out[clean], out_ref[clean]) <= 1e-11, "out differs from the reference on clean rows"
    np.testing.assert_allclose(lse[~poisoned], lse_ref[~poisoned], rtol=1e-11)


@quiet_nan
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_reaches_lse(comm, seed, where):
    q, k, v, _, row, options = _poison_problem(comm, seed, where, np.nan, NONFINITE_OPTIONS[0])
    layout = options.pop("layout")
    sh = lambda x: mpiring.shard(x, comm, layout=layout)  # noqa: E731
    _, lse = mpiring.ring_attention(sh(q), sh(k), sh(v), comm, layout=layout, **options)
    _, lse_ref = mpiring.attention_reference(q, k, v, **options)
    poisoned = mpiring.shard(_poisoned_rows(lse_ref), comm, layout=layout, axis=2)
    agree(comm, None if np.isnan(lse[poisoned]).all() else "lse of a NaN row is not NaN")


@quiet_nan
def test_non_finite_k_poisons_exactly_the_attending_rows(comm, seed):
    """The documented rule, stated directly (not through the reference)."""
    q, k, v, _, row, options = _poison_problem(comm, seed, "k", np.nan, NONFINITE_OPTIONS[0])
    layout = options.pop("layout")
    sh = lambda x: mpiring.shard(x, comm, layout=layout)  # noqa: E731
    out, _ = mpiring.ring_attention(sh(q), sh(k), sh(v), comm, layout=layout, **options)
    qpos = positions(layout, comm.Get_rank(), comm.Get_size(), out.shape[1])
    attends = make_mask(**options).allowed(qpos, np.array([row]))[:, 0]
    expected = np.zeros(out.shape[:3], bool)
    expected[0, :, 2:] = attends[:, None]
    agree(comm, None if np.array_equal(~np.isfinite(out).all(-1), expected) else "k poison: wrong rows")


@quiet_nan
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_non_finite_backward_stays_in_its_slice(comm, seed, where):
    q, k, v, dout, row, options = _poison_problem(comm, seed, where, np.nan, NONFINITE_OPTIONS[0])
    layout = options.pop("layout")
    sh = lambda x: mpiring.shard(x, comm, layout=layout)  # noqa: E731
    out, lse = mpiring.ring_attention(sh(q), sh(k), sh(v), comm, layout=layout, **options)
    grads = mpiring.ring_attention_backward(sh(dout), sh(q), sh(k), sh(v), out, lse, comm, layout=layout, **options)
    grads_ref = mpiring.attention_reference_backward(dout, q, k, v, **options)
    failures = []
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        heads = slice(2, 4) if name == "dq" else slice(1, 2)  # the poisoned kv-head group
        outside = np.ones(g.shape, bool)
        outside[0, :, heads] = False
        if rel_err(g[outside], sh(g_ref)[outside]) > 1e-11:
            failures.append(f"{name} changed outside the poisoned slice")
    poisoned = comm.allreduce(int(not np.isfinite(grads[0][0, :, 2:]).all()), op=MPI.SUM)
    if not poisoned:
        failures.append("dq shows no trace of the poison")
    agree(comm, "; ".join(failures) or None)


# --- allocate, then agree -----------------------------------------------------------------
def _huge(*args, **kwargs):
    return np.empty((2**40, 2**22), np.uint8)  # 4 EiB: NumPy's real MemoryError, at once


@pytest.mark.parametrize("stage", ["pack_kv", "empty_dkv"])
def test_allocation_failure_on_one_rank(comm, monkeypatch, stage):
    """MemoryError on every rank, naming the rank, the bytes it asked for and memory_estimate's
    figure; no rank reached a ring step; the next call works."""
    a = arrays()
    out, lse = mpiring.ring_attention(comm=comm, **a)
    last = comm.Get_size() - 1
    if comm.Get_rank() == last:
        monkeypatch.setattr(backend_for(np), stage, _huge)
    transport = MpiHostTransport(private_comm(comm))
    if stage == "pack_kv":
        fn = lambda: mpiring.ring_attention(comm=comm, transport=transport, **a)  # noqa: E731
    else:
        fn = lambda: mpiring.ring_attention_backward(  # noqa: E731
            a["q"], comm=comm, out=out, lse=lse, transport=transport, **a)
    err = assert_raises_everywhere(comm, MemoryError, f"failed on rank {last} (4,611,686,018,427,387,904 bytes",
                                   fn, then=monkeypatch.undo)
    assert transport.hops == 0 and transport.pending == 0, "a rank entered the ring"
    estimate = mpiring.memory_estimate(1, 4, 2, 1, 8, np.float32, backward=stage == "empty_dkv",
                                       comm_size=comm.Get_size())
    assert f"the call needs about {estimate:,} bytes per rank (memory_estimate)" in str(err), str(err)


# --- timeouts -----------------------------------------------------------------------------
# Each runs on a throwaway duplicate of the world: the abandoned receives stay posted on
# it, so it is deliberately never used (or freed) again. Messages are tiny, so sends
# complete eagerly and nothing blocks at exit.
class MuteTransport(MpiHostTransport):
    """On a ``mute`` rank, posts nothing: the rank is in the ring but never sends."""

    def __init__(self, comm, mute):
        super().__init__(comm)
        self.mute = mute

    def _post(self, send, recv, **kwargs):
        return Exchange() if self.mute else super()._post(send, recv, **kwargs)


def _time_out_without_rank_0(comm, expected: str, **kwargs) -> None:
    """Every rank but 0 raises TimeoutError containing ``expected`` within 5 s (0.3 s per wait;
    the slack is for loaded CI machines)."""
    needs_ranks(comm)
    dup = comm.Dup()
    private_comm(dup)  # collective: created while everyone is here
    transport = kwargs.pop("transport", lambda c: "auto")(private_comm(dup))
    result = None
    if comm.Get_rank() != 0 or transport != "auto":
        start = time.monotonic()
        try:
            mpiring.ring_attention(comm=dup, timeout=0.3, transport=transport, **arrays(), **kwargs)
            if comm.Get_rank() != 0:
                result = "returned without rank 0"
        except TimeoutError as exc:
            elapsed = time.monotonic() - start
            if comm.Get_rank() == 0 or elapsed > 5.0 or expected not in str(exc):
                result = f"TimeoutError after {elapsed:.2f} s: {exc}"
    agree(comm, result)
    next_call_works(comm)


def test_timeout_when_a_rank_never_calls(comm):
    _time_out_without_rank_0(comm, "not every rank of the communicator called within timeout=0.3 s")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mute rank computes on unreceived buffers
def test_timeout_when_a_rank_stops_sending(comm):
    """Rank 0 enters the ring but never sends (as if it died there): the ring waits time out."""
    _time_out_without_rank_0(comm, "did not complete in time",
                             transport=lambda pcomm: MuteTransport(pcomm, mute=comm.Get_rank() == 0))


# --- determinism ------------------------------------------------------------------------
@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("dtype", [np.float32, bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout,options", [("zigzag", {"causal": True}), ("striped", {"window": (7, 2)}),
                                            ("contiguous", {})])
def test_deterministic(comm, seed, xp, dtype, layout, options):
    """Bitwise identical outputs and gradients across repeated runs and across transports
    (NumPy: auto, mpi-host and a jittery host transport; CuPy: repeated runs, head_dim 64
    so that the CUDA kernels run where they cover the dtype)."""
    size = comm.Get_size()
    head_dim = 16 if xp is np else 64
    q, k, v, dout = (xp.asarray(mpiring.shard(x, comm, layout=layout))
                     for x in random_problem(seed, 2, 8 * size, 4, 2, head_dim, dtype))

    def run(transport):
        out, lse = mpiring.ring_attention(q, k, v, comm, layout=layout, transport=transport, **options)
        grads = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, layout=layout, transport=transport,
                                                **options)
        return [out, lse, *grads]

    transports = ["auto", "mpi-host", JitteryTransport(private_comm(comm), seed)] if xp is np else ["auto"] * 3
    first, *others = (run(t) for t in transports)
    differ = [name for other in others for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, other)
              if not bitwise_equal(a, b)]
    agree(comm, f"{sorted(set(differ))} differ bitwise between runs or transports" if differ else None)
    assert all(np.isfinite(to_host(x).astype(np.float32)).all() for x in first)


@pytest.mark.parametrize("heads_kv", [2, 1])
def test_inputs_unchanged(comm, seed, heads_kv):
    """The ring never writes into the caller's arrays (MQA, float32)."""
    q, k, v, dout = random_problem(seed, 1, 8 * comm.Get_size(), 4, heads_kv, 8, np.float32)
    sh = lambda x: mpiring.shard(x, comm, layout="zigzag")  # noqa: E731
    args = [sh(x) for x in (dout, q, k, v)]
    copies = [x.copy() for x in args]
    out, lse = mpiring.ring_attention(*args[1:], comm, layout="zigzag", causal=True)
    results = [out.copy(), lse.copy()]
    mpiring.ring_attention_backward(*args, out, lse, comm, layout="zigzag", causal=True)
    same = all(bitwise_equal(a, b) for a, b in zip(args + results, copies + [out, lse]))
    agree(comm, None if same else "an input array was modified")
