"""Soak: back-to-back ring calls (forward and backward) with fresh random inputs, every
result checked against the float64 oracle, and no growth in memory.

CI runs a short soak (60 calls on the CPU); the full one is
``MPIRING_SOAK_CALLS=1000 mpiexec -n 4 python -m mpi4py -m pytest -s --with-mpi tests/test_soak.py``
(and 200 on a GPU machine, the default there). Memory: the process RSS (and CuPy's
pool) after a warm-up round of every configuration, against the end; printed with ``-s``.
"""

import os

import numpy as np
import pytest
from hardening_util import ARRAY_MODULES, agree, check_quietly, rss_bytes
from helpers import check_ring
from ml_dtypes import bfloat16

# (dtype, layout, options): rotated through, so each call differs from the last.
CONFIGS = [
    (np.float32, "zigzag", {"causal": True}),
    (bfloat16, "striped", {"window": 9}),
    (np.float32, "contiguous", {}),
    (np.float16, "zigzag", {"causal": True, "cu_seqlens": "halves"}),
]
# RSS may move by allocator noise (arenas, BLAS buffers); a leak of even 10 kB per call
# over the full 1000 calls exceeds this.
ALLOWED_GROWTH = 8 * 2**20


def _calls(xp) -> int:
    default = "60" if xp is np else "200"
    return int(os.environ.get("MPIRING_SOAK_CALLS", default))


def _pool_bytes(xp) -> int:
    return 0 if xp is np else xp.get_default_memory_pool().used_bytes()


def _one_call(comm, xp, i: int) -> str | None:
    dtype, layout, options = CONFIGS[i % len(CONFIGS)]
    options = dict(options)
    seqlen = 16 * comm.Get_size()
    if options.get("cu_seqlens") == "halves":
        options["cu_seqlens"] = [0, seqlen // 2 + 3, seqlen]
    return check_quietly(lambda: check_ring(comm, 10_000 + i, batch=2, seqlen_local=16, heads=4, heads_kv=2,
                                            head_dim=16, dtype=dtype, layout=layout, xp=xp, **options))


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_soak(comm, xp):
    for i in range(len(CONFIGS)):  # warm-up: caches, pools, the private communicator
        agree(comm, _one_call(comm, xp, i))
    rss_start, pool_start = rss_bytes(), _pool_bytes(xp)
    calls = _calls(xp)
    failures = [f for f in (_one_call(comm, xp, i) for i in range(calls)) if f is not None]
    rss_end, pool_end = rss_bytes(), _pool_bytes(xp)
    mib = 2**20
    print(f"\nsoak rank {comm.Get_rank()}/{comm.Get_size()}: {calls} calls, {len(failures)} wrong; "
          f"RSS {rss_start / mib:.1f} -> {rss_end / mib:.1f} MiB; "
          f"pool {pool_start / mib:.1f} -> {pool_end / mib:.1f} MiB")
    agree(comm, f"{len(failures)} of {calls} calls wrong; first: {failures[0]}" if failures else None)
    grown = max(rss_end - rss_start, pool_end - pool_start)
    agree(comm, f"memory grew by {grown / mib:.1f} MiB over {calls} calls" if grown > ALLOWED_GROWTH else None)
