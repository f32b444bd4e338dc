"""GPU hardening (issue 7): device mismatches answered on every rank, bitwise determinism
over every GPU transport (and on the NumPy path, which CI runs), and a GPU soak with a
memory-pool check.

Run under ``mpiexec -n N python -m mpi4py -m pytest --with-mpi`` on a machine with one
GPU per rank (``bench/gpu_hardening.sh``); GPU tests skip without CuPy and a device.
``-s`` prints the soak's figures; ``MPIRING_SOAK_JSON=path`` appends them as one JSON
line (rank 0), ``MPIRING_GPU_SOAK_CALLS`` sets the number of soak calls (default 200).
"""

import json
import os
import time

import numpy as np
import pytest
from hardening_util import JitteryTransport, agree, assert_raises_everywhere, check_quietly
from helpers import check_ring, gpu_transport_params, random_problem, reference_shards, rel_err, to_host, usable_cupy
from ml_dtypes import bfloat16

import mpiring
from mpiring.api import private_comm
from mpiring.backends import backend_for
from mpiring.transport import chosen_transport

cp = usable_cupy()
gpu = pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device")
pytestmark = pytest.mark.usefixtures("one_gpu_per_rank")

OUTPUTS = ("out", "lse", "dq", "dk", "dv")


def needs_ranks(comm, n=2):
    if comm.Get_size() < n:
        pytest.skip(f"needs {n} ranks")


def needs_gpus(n=2):
    if cp.cuda.runtime.getDeviceCount() < n:
        pytest.skip(f"needs {n} GPUs visible")


def local_problem(seed, xp, heads_kv=2, dtype=np.float32):
    """This rank's q, k, v, dout of a small problem (validation tests never reach the ring)."""
    return [xp.asarray(x) for x in random_problem(seed, 1, 8, 4, heads_kv, 16, dtype)]


# --- a. device mismatches ------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("deviating", ["first", "last"])
def test_numpy_on_one_rank(comm, seed, direction, deviating):
    """One rank passes NumPy arrays, the others CuPy: the same TypeError on every rank
    (naming both kinds and the first rank that differs from rank 0); the next call works."""
    needs_ranks(comm)
    size, rank = comm.Get_size(), comm.Get_rank()
    odd = 0 if deviating == "first" else size - 1
    q, k, v, dout = local_problem(seed, cp)
    if direction == "forward":
        fn_name, call = "ring_attention", {"q": q, "k": k, "v": v}
    else:
        out, lse = mpiring.ring_attention(q, k, v, comm)  # on CuPy everywhere
        fn_name, call = "ring_attention_backward", {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse}
    if rank == odd:
        call = {name: to_host(x) for name, x in call.items()}
    fn = getattr(mpiring, fn_name)
    kinds = "'numpy' on rank 0, 'cupy' on rank 1" if odd == 0 else f"'cupy' on rank 0, 'numpy' on rank {odd}"
    expected = f"{fn_name}: array differs across ranks: {kinds}"
    err = assert_raises_everywhere(comm, TypeError, expected, lambda: fn(comm=comm, **call), xp=cp)
    assert str(err) == expected


@gpu
def test_numpy_and_cupy_on_one_rank(comm, seed):
    """On the last rank k is a NumPy array, q and v CuPy: a TypeError naming the rank
    on every rank (a local check, agreed); the next call works. Runs at -n 1 too."""
    q, k, v, _ = local_problem(seed, cp)
    last = comm.Get_size() - 1
    if comm.Get_rank() == last:
        k = to_host(k)
    expected = (
        "ring_attention: arrays must all be NumPy or all CuPy, got {'q': 'cupy', 'k': 'numpy', 'v': 'cupy'} "
        f"(on rank {last})"
    )
    err = assert_raises_everywhere(comm, TypeError, expected, lambda: mpiring.ring_attention(q, k, v, comm), xp=cp)
    assert str(err) == expected


@gpu
def test_k_on_another_gpu(comm, seed):
    """On the last rank k lives on another GPU than q and v: ValueError naming the devices
    and the rank, on every rank; the next call works. (Caught today by _check_arrays.)"""
    needs_gpus()
    current = cp.cuda.Device().id
    other = (current + 1) % cp.cuda.runtime.getDeviceCount()
    q, k, v, _ = local_problem(seed, cp)
    last = comm.Get_size() - 1
    if comm.Get_rank() == last:
        with cp.cuda.Device(other):
            k = cp.asarray(k.get())
    err = assert_raises_everywhere(
        comm,
        ValueError,
        "arrays must all be on one GPU, got devices {",
        lambda: mpiring.ring_attention(q, k, v, comm),
        xp=cp,
    )
    assert f"(on rank {last})" in str(err), str(err)


# What api.py should raise when every array of a rank is on one GPU but that GPU is not the
# rank's current CuPy device (the transports, the NCCL communicator and the buffers the
# ring allocates follow the current device; the kernels follow the arrays).
def expected_other_gpu_message(other, current):
    return f"arrays are on GPU {other} but the current CuPy device is GPU {current}"


@gpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_all_arrays_on_another_gpu(comm, seed, direction):
    """On the last rank q, k, v (and dout, out, lse) all live on a GPU other than the
    rank's current device: a ValueError naming both devices and the rank on every rank
    (``expected_other_gpu_message``); the next call works.

    _check_arrays rejects this before any communication. Were that check lost, the rank
    would run its kernels on the arrays' GPU and hand the buffers to a transport built for
    the current one, which raises on that rank alone inside the ring while the others
    wait: a hang. So the test asks _check_arrays first (locally), agrees on the answer and
    fails on every rank if it accepts the arrays, before running the collective call."""
    from mpiring.api import _check_arrays, _LocalError

    needs_gpus()
    current = cp.cuda.Device().id
    other = (current + 1) % cp.cuda.runtime.getDeviceCount()
    q, k, v, dout = local_problem(seed, cp)
    out, lse = mpiring.ring_attention(q, k, v, comm)  # on the current device everywhere
    call = {"q": q, "k": k, "v": v}
    if direction == "backward":
        call.update(dout=dout, out=out, lse=lse)
    last = comm.Get_size() - 1
    missed = None
    if comm.Get_rank() == last:
        with cp.cuda.Device(other):
            call = {name: cp.asarray(x.get()) for name, x in call.items()}
        try:
            _check_arrays({name: x for name, x in call.items() if name != "lse"})
            missed = f"api.py's _check_arrays accepts arrays on GPU {other} with GPU {current} current"
        except _LocalError:
            pass  # rejected before any communication: safe to run the collective call
    missed, (other, current) = comm.bcast((missed, (other, current)), root=last)  # the message names rank last's GPUs
    if missed:
        pytest.fail(missed)
    fn = mpiring.ring_attention if direction == "forward" else mpiring.ring_attention_backward
    err = assert_raises_everywhere(
        comm, ValueError, expected_other_gpu_message(other, current), lambda: fn(comm=comm, **call), xp=cp
    )
    assert f"(on rank {last})" in str(err), str(err)


# --- b. determinism ------------------------------------------------------------------------
# NumPy: 100 tokens per rank with 32-token tiles (a smaller tile budget), so that every block
# has several key tiles at CI cost; GPU: 1000 tokens per rank (not a multiple of any tile),
# the kernels' own tiles. Both: head_dim 128, GQA (8 heads, 2 KV heads), batch 2.
DETERMINISM_CASES = [pytest.param(np, "mpi-host", id="numpy"), *gpu_transport_params(cp)]
CPU_TILE_BUDGET = 2**14  # batch·heads·tile² elements: 32×32 tiles for batch 2, 8 heads


def _dirty_pool(xp):
    """Return a large block full of 0xFF bytes (NaN in every float dtype) to CuPy's pool, so
    that memory a kernel reads without writing holds something else on the next run."""
    if xp is not np:
        junk = xp.empty(256 * 2**20, dtype=np.uint8)
        junk.fill(0xFF)
        del junk


def _bit_differences(a, b) -> int:
    """How many elements of a and b differ in their bits (all of them if the shapes differ)."""
    a, b = np.ascontiguousarray(to_host(a)), np.ascontiguousarray(to_host(b))
    if a.dtype != b.dtype or a.shape != b.shape:
        return max(a.size, b.size)
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return int(np.count_nonzero(a.view(bits) != b.view(bits)))


@pytest.mark.parametrize("xp,transport", DETERMINISM_CASES)
@pytest.mark.parametrize("dtype", [bfloat16, np.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    "layout,options", [("zigzag", {"causal": True}), ("contiguous", {})], ids=["causal-zigzag", "full-contiguous"]
)
def test_deterministic_bits(comm, seed, monkeypatch, xp, transport, dtype, layout, options):
    """out, lse, dq, dk, dv bitwise identical over two runs on ``transport`` and a run on a
    reference transport (GPU: mpi-staged, so every transport is compared with the same one;
    NumPy: a host transport with random delays, i.e. other arrival orders). The backward
    runs with its default (``deterministic=True``). Between the GPU runs CuPy's pool is
    refilled with NaN bits, so that reading unwritten memory shows as a difference."""
    size = comm.Get_size()
    seqlen_local = 100 if xp is np else 1000
    if xp is np:
        monkeypatch.setattr(backend_for(np), "_budget", CPU_TILE_BUDGET)
    q, k, v, dout = (
        xp.asarray(mpiring.shard(x, comm, layout=layout))
        for x in random_problem(seed, 2, seqlen_local * size, 8, 2, 128, dtype)
    )

    def run(tr):
        out, lse = mpiring.ring_attention(q, k, v, comm, layout=layout, transport=tr, **options)
        grads = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, layout=layout, transport=tr, **options)
        return [to_host(x) for x in (out, lse, *grads)]

    reference = JitteryTransport(private_comm(comm), seed) if xp is np else "mpi-staged"
    first = run(transport)
    _dirty_pool(xp)
    runs = {"a second run": run(transport), f"a run on {getattr(reference, 'name', reference)}": run(reference)}
    differ = [
        f"{name} ({n} of {a.size} elements) with {what}"
        for what, other in runs.items()
        for name, a, b in zip(OUTPUTS, first, other)
        if (n := _bit_differences(a, b))
    ]
    not_finite = [name for name, x in zip(OUTPUTS, first) if not np.isfinite(x.astype(np.float32)).all()]
    failure = "; ".join(differ + [f"{name} not finite" for name in not_finite]) or None
    agree(comm, None if failure is None else f"{transport}: {failure}")


# --- c. soak on the GPU --------------------------------------------------------------------
# check_ring options, rotated through. Sized so that the float64 oracle (each rank computes its
# own rows, see reference_shards) stays under ~0.2 s per call on one core: 200 calls at -n 4
# take well under a minute. Kernel paths: bf16 and fp16, head_dim 64 and 128, MQA/GQA/MHA.
SOAK_CONFIGS = [
    dict(dtype=bfloat16, seqlen_local=256, heads=2, heads_kv=1, head_dim=64, layout="zigzag", causal=True),
    dict(dtype=bfloat16, seqlen_local=130, heads=4, heads_kv=2, head_dim=128, layout="contiguous"),
    dict(dtype=np.float16, seqlen_local=192, heads=4, heads_kv=2, head_dim=64, layout="striped", window=100),
    dict(dtype=bfloat16, seqlen_local=144, heads=4, heads_kv=4, head_dim=128, layout="zigzag", causal=True),
]
# A leak of one call's smallest ring buffer over 200 calls is far more than these.
USED_SLACK = 4 * 2**20
TOTAL_SLACK = 64 * 2**20  # the pool may keep a few more cached blocks after splitting


def _soak_call(comm, i: int, seed: int, transport: str) -> str | None:
    config = SOAK_CONFIGS[i % len(SOAK_CONFIGS)]
    return check_quietly(lambda: check_ring(comm, seed + i, xp=cp, sharded_oracle=True, transport=transport, **config))


def _pool():
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    return pool.used_bytes(), pool.total_bytes()


@gpu
@pytest.mark.parametrize("transport", ["auto"])
def test_gpu_soak(comm, seed, transport):
    """``MPIRING_GPU_SOAK_CALLS`` (200) forward+backward calls back to back, fresh random
    inputs each (seed per call, the same on every rank), every output against the float64
    oracle with the usual tolerances; CuPy's pool (used and total bytes) after a warm-up
    round of every configuration, against the end: no growth beyond a small slack."""
    calls = int(os.environ.get("MPIRING_GPU_SOAK_CALLS", "200"))
    for i in range(len(SOAK_CONFIGS)):  # warm-up: kernels, transports, pool blocks of every size
        agree(comm, _soak_call(comm, i, seed, transport))
    used_start, total_start = _pool()
    start = time.perf_counter()
    failures = [(i, f) for i in range(calls) if (f := _soak_call(comm, i, seed + 1000, transport)) is not None]
    seconds = time.perf_counter() - start
    used_end, total_end = _pool()
    mib = 2**20
    name = chosen_transport("cupy", comm, transport) if comm.Get_size() > 1 else "none"
    print(
        f"\ngpu soak rank {comm.Get_rank()}/{comm.Get_size()} ({name}): {calls} calls in {seconds:.1f} s, "
        f"{len(failures)} wrong; pool used {used_start / mib:.1f} -> {used_end / mib:.1f} MiB, "
        f"total {total_start / mib:.1f} -> {total_end / mib:.1f} MiB"
    )
    stats = comm.gather(
        {
            "used_start": used_start,
            "used_end": used_end,
            "total_start": total_start,
            "total_end": total_end,
            "wrong": len(failures),
        },
        root=0,
    )
    path = os.environ.get("MPIRING_SOAK_JSON")
    if comm.Get_rank() == 0 and path:
        record = {
            "test": "gpu_soak",
            "ranks": comm.Get_size(),
            "transport": name,
            "calls": calls,
            "seconds": round(seconds, 2),
            "per_rank": stats,
        }
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    agree(
        comm,
        f"{len(failures)} of {calls} calls wrong; first (call {failures[0][0]}): {failures[0][1]}"
        if failures
        else None,
    )
    grown = []
    if used_end > used_start + USED_SLACK:
        grown.append(f"pool used bytes grew by {(used_end - used_start) / mib:.1f} MiB")
    if total_end > total_start + TOTAL_SLACK:
        grown.append(f"pool total bytes grew by {(total_end - total_start) / mib:.1f} MiB")
    agree(comm, f"over {calls} calls: {'; '.join(grown)}" if grown else None)


# --- the sharded oracle the soak relies on ---------------------------------------------------
@pytest.mark.parametrize(
    "layout,options", [("zigzag", {"causal": True}), ("striped", {"window": 5}), ("contiguous", {})]
)
def test_sharded_oracle(comm, seed, layout, options):
    """reference_shards(sharded=True) (each rank its own query rows, dk/dv summed over the
    ranks) gives this rank's shards of the whole-problem oracle (to 1e-12) and of the bf16
    baseline (at most one bf16 ulp apart: dk/dv are summed in another order, then rounded)."""
    problem = random_problem(seed, 2, 6 * comm.Get_size(), 4, 2, 16, bfloat16)
    (refs, lse, lowp), (refs_s, lse_s, lowp_s) = (
        reference_shards(comm, *problem, bfloat16, layout=layout, sharded=sharded, **options)
        for sharded in (False, True)
    )
    names = ("out", "dq", "dk", "dv")
    failures = [
        f"oracle {name}: relative error {err:.2e}"
        for name, a, b in zip((*names, "lse"), (*refs, lse), (*refs_s, lse_s))
        if (err := rel_err(b, a)) > 1e-12
    ]
    for name, a, b in zip(names, lowp, lowp_s):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if np.any(np.abs(a - b) > 2.0**-7 * np.maximum(np.abs(a), np.abs(b))):
            failures.append(f"baseline {name}: {np.count_nonzero(a != b)} elements more than one ulp apart")
    agree(comm, "; ".join(failures) or None)
