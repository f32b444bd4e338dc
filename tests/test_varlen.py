"""Packed variable-length sequences (``cu_seqlens``) against the float64 oracle, and the
schedule and tile skipping that make them cheap.

Documents have any length (1 included, 0 too: repeated boundaries), span ranks, and
ranks hold parts of documents; every layout, causal and not, GQA/MQA, forward and
backward, on NumPy and (where there is a GPU) CuPy.
"""

import numpy as np
import pytest
from hardening_util import ARRAY_MODULES
from helpers import check_ring, random_cu_seqlens, random_problem
from ml_dtypes import bfloat16

import mpiring
import mpiring.backends.numpy_ as numpy_backend
from mpiring.backends.numpy_ import _TilePairs
from mpiring.layout import LAYOUTS, make_mask, positions, segments, step_schedule


def seqlen_for(layout: str, odd: int) -> int:
    """An odd local length, or the next even one for zigzag (which needs halves)."""
    return odd + 1 if layout == "zigzag" else odd


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 rows, so that documents start and end inside tiles."""
    monkeypatch.setitem(numpy_backend._TILE_BUDGET, "numpy", 1)
    monkeypatch.setitem(numpy_backend._TILE_BUDGET, "cupy", 1)


# --- against the oracle -------------------------------------------------------------------
@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_documents(comm, seed, xp, layout, causal):
    seqlen_local = seqlen_for(layout, 13)
    cu = random_cu_seqlens(np.random.default_rng(seed), seqlen_local * comm.size)
    check_ring(comm, seed, batch=2, seqlen_local=seqlen_local, heads=4, heads_kv=2, head_dim=8, layout=layout,
               causal=causal, cu_seqlens=cu, xp=xp)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("dtype", (bfloat16, np.float16, np.float64), ids=lambda d: np.dtype(d).name)
def test_dtypes(comm, seed, xp, dtype):
    cu = random_cu_seqlens(np.random.default_rng(seed), 10 * comm.size)
    check_ring(comm, seed, seqlen_local=10, heads=3, heads_kv=1, head_dim=16, dtype=dtype, layout="zigzag",
               causal=True, cu_seqlens=cu, xp=xp)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_documents_across_tiles(comm, seed, small_tiles, xp, layout):
    """97 tokens per rank over tiles of 32: documents begin and end inside tiles and
    blocks; combined with a window, MQA."""
    seqlen_local = seqlen_for(layout, 97)
    cu = random_cu_seqlens(np.random.default_rng(seed), seqlen_local * comm.size)
    check_ring(comm, seed, seqlen_local=seqlen_local, heads=4, heads_kv=1, head_dim=16, layout=layout, causal=True,
               window=(40, 0), cu_seqlens=cu, xp=xp)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_with_no_keys_in_some_steps(comm, seed, layout):
    """Documents that each lie inside one rank's block (contiguous) or inside one zigzag
    half: a rank's queries find keys only in its own block, so the other steps have no
    work (on every rank where there are several), yet the K/V still travel."""
    size = comm.Get_size()
    seqlen_local = 12
    piece = seqlen_local // 2 if layout == "zigzag" else seqlen_local
    if layout == "striped":  # tokens of a rank are N apart: documents of length 1
        cu = np.arange(seqlen_local * size + 1)
    else:
        cu = np.concatenate([[0], np.arange(piece, seqlen_local * size + 1, piece)])
        cu = np.sort(np.concatenate([cu, cu[1:-1] - 5]))  # split each piece in two documents
    mask = make_mask(True, None, cu)
    schedule = step_schedule(layout, comm.Get_rank(), size, seqlen_local, seqlen_local, mask)
    assert schedule == (True,) + (False,) * (size - 1)
    check_ring(comm, seed, seqlen_local=seqlen_local, layout=layout, causal=True, cu_seqlens=cu)


def test_one_document_is_no_mask(comm, seed):
    """cu_seqlens = [0, S] takes the unmasked tile path: bitwise the same as no cu_seqlens."""
    size = comm.Get_size()
    q, k, v, _ = (mpiring.shard(x, comm, layout="striped") for x in random_problem(seed, 1, 9 * size, 4, 2, 8,
                                                                                  np.float32))
    plain = mpiring.ring_attention(q, k, v, comm, layout="striped")
    varlen = mpiring.ring_attention(q, k, v, comm, layout="striped", cu_seqlens=[0, 9 * size])
    for a, b in zip(plain, varlen):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("int_type", (np.int32, np.int64, list), ids=lambda t: t.__name__)
def test_every_token_its_own_document(comm, seed, int_type):
    """Length-1 documents: each query sees only its own key, so out = v (of its KV head),
    lse = q·k·scale, dq = dk = 0 and dv = dout summed over the GQA group."""
    size, heads, heads_kv, d = comm.Get_size(), 4, 2, 8
    q, k, v, dout = (mpiring.shard(x, comm, layout="zigzag")
                     for x in random_problem(seed, 2, 6 * size, heads, heads_kv, d, np.float64))
    cu = int_type(np.arange(6 * size + 1).astype(np.int64 if int_type is list else int_type))
    out, lse = mpiring.ring_attention(q, k, v, comm, layout="zigzag", cu_seqlens=cu)
    group = heads // heads_kv
    np.testing.assert_allclose(out, np.repeat(v, group, axis=2), rtol=1e-13)
    logits = np.einsum("bshd,bshd->bhs", q, np.repeat(k, group, axis=2)) / np.sqrt(d)
    np.testing.assert_allclose(lse, logits, rtol=1e-12, atol=1e-12)
    dq, dk, dv = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, layout="zigzag", cu_seqlens=cu)
    np.testing.assert_allclose(dq, 0, atol=1e-12)
    np.testing.assert_allclose(dk, 0, atol=1e-12)
    np.testing.assert_allclose(dv, dout.reshape(dout.shape[:2] + (heads_kv, group, d)).sum(3), rtol=1e-12)


# --- schedule and tile skipping (pure) -------------------------------------------------------
@pytest.mark.serial
def test_schedule_follows_documents():
    """A document spanning every rank makes every step (non-causal) or every earlier step
    (causal) active; documents inside blocks leave only step 0."""
    size, seqlen_local = 4, 8
    spanning = make_mask(False, None, [0, 3, 3 + 3 * seqlen_local, size * seqlen_local])
    for rank in range(size):
        assert all(step_schedule("contiguous", rank, size, seqlen_local, seqlen_local, spanning))
    causal = make_mask(True, None, [0, 1, size * seqlen_local])
    for rank in range(size):
        expected = tuple(s <= rank for s in range(size))
        assert step_schedule("contiguous", rank, size, seqlen_local, seqlen_local, causal) == expected
    inside = make_mask(True, None, np.arange(0, size * seqlen_local + 1, seqlen_local))
    for rank in range(size):
        assert step_schedule("contiguous", rank, size, seqlen_local, seqlen_local, inside) == (True,) + (False,) * 3


def tile_kinds(layout, rank, src, size, seqlen_local, mask, tile):
    pairs = _TilePairs(np, segments(layout, rank, size, seqlen_local), segments(layout, src, size, seqlen_local),
                       mask, tile, tile)
    return [pairs.classify(qt, kt) for qt in pairs.q_tiles for kt in pairs.k_tiles]


@pytest.mark.serial
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_tiles_skip_other_documents(causal):
    """Documents of one tile each: only the diagonal tiles are computed (unmasked when
    non-causal); documents straddling tiles add at most one neighbour per tile."""
    seqlen, tile = 1024, 32
    n = seqlen // tile
    aligned = make_mask(causal, None, np.arange(0, seqlen + 1, tile))
    kinds = tile_kinds("contiguous", 0, 0, 1, seqlen, aligned, tile)
    assert kinds.count("skip") == n * n - n
    assert kinds.count("mask" if causal else "full") == n
    shifted = make_mask(causal, None, np.concatenate([[0], np.arange(tile // 2, seqlen, tile), [seqlen]]))
    kinds = tile_kinds("contiguous", 0, 0, 1, seqlen, shifted, tile)
    assert n * n - kinds.count("skip") <= (2 if causal else 3) * n


@pytest.mark.serial
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tile_work_follows_document_lengths(layout):
    """Tiles end at document boundaries, so the key-query pairs the backend computes are
    exactly the allowed pairs (Σ length² of the documents), on every layout: varlen
    costs what its documents cost. (Before tiles were cut at documents: 2.5x contiguous
    and zigzag, 8.2x striped at N=4.) Every row is in exactly one tile."""
    size, seqlen_local, tile = 4, 512, 32
    rng = np.random.default_rng(0)
    cu = np.concatenate([[0], np.cumsum(rng.integers(16, 64, size=200))])
    cu = np.append(cu[cu < size * seqlen_local], size * seqlen_local)
    mask = make_mask(False, None, cu)
    computed = allowed = 0
    for rank in range(size):
        for src in range(size):
            pairs = _TilePairs(np, segments(layout, rank, size, seqlen_local),
                               segments(layout, src, size, seqlen_local), mask, tile, tile)
            for tiles in (pairs.q_tiles, pairs.k_tiles):
                assert [r for t in tiles for r in range(t.lo, t.hi)] == list(range(seqlen_local))
                assert all(t.hi - t.lo <= tile for t in tiles)
            for qt in pairs.q_tiles:
                for kt, kind in pairs.work(qt):
                    assert kind == "full"
                    computed += (qt.hi - qt.lo) * (kt.hi - kt.lo)
            qpos = positions(layout, rank, size, seqlen_local)
            allowed += int(mask.allowed(qpos, positions(layout, src, size, seqlen_local)).sum())
    assert allowed == int((np.diff(cu) ** 2).sum())
    assert computed == allowed, f"{layout}: tiles compute {computed / allowed:.2f}x the allowed pairs"


# --- the long-context example --------------------------------------------------------------
def test_long_context_example(comm):
    """examples/long_context.py end to end at a small size with packed documents: ring
    forward and backward, the distributed sampled-row check, the sampler against the oracle."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "long_context.py"
    spec = importlib.util.spec_from_file_location("long_context_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    size = comm.Get_size()
    argv = ["--tokens", str(96 * size), "--heads", "2", "--heads-kv", "1", "--head-dim", "16", "--samples", "40",
            "--documents", "7", "--cpu"]
    assert example.main(argv) == 0


def test_step_balance_counts_pairs():
    """The bench's load measure against hand counts: one causal sequence of 2L tokens on
    two ranks, contiguous: rank 0 has L(L+1)/2 pairs at step 0 and none at step 1, rank 1
    the same at step 0 and L² at step 1, so Σ max = L(L+1)/2 + L² over the mean
    (L(L+1) + L²)/2. Striped splits any documents evenly; zigzag does not."""
    from mpiring.bench.longctx import _documents, step_balance

    L = 64
    want = (L * (L + 1) / 2 + L * L) / ((L * (L + 1) + L * L) / 2)
    assert step_balance("contiguous", 2, L, np.array([0, 2 * L])) == pytest.approx(want, rel=1e-12)
    assert step_balance("zigzag", 4, 2 * L, np.array([0, 8 * L])) < 1.01
    cu = _documents(4 * 1024, 16)
    assert step_balance("striped", 4, 1024, cu) < 1.01
    assert step_balance("zigzag", 4, 1024, cu) > 1.2
