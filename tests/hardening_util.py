"""Helpers for the hardening tests (test_hardening, test_gpu_hardening, test_fuzz,
test_soak): array modules to run on, outcomes agreed across ranks, bitwise comparison,
a host transport with random delays, process memory.

A test that fails on one rank only must fail on every rank, or the ranks that
passed go on to the next collective and wait for the failed one until the
pytest timeout. ``agree`` and ``outcome_everywhere`` gather each rank's result so
that every rank raises the same assertion.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import to_host, usable_cupy

import mpiring
from mpiring.transport import MpiHostTransport


def array_module_params():
    """``pytest.param`` for NumPy, and for CuPy (marked ``gpu``, skipped without a GPU)."""
    cupy = usable_cupy()
    skip = pytest.mark.skipif(cupy is None, reason="needs CuPy and a CUDA device")
    return [pytest.param(np, id="numpy"), pytest.param(cupy, id="cupy", marks=[pytest.mark.gpu, skip])]


ARRAY_MODULES = array_module_params()


class JitteryTransport(MpiHostTransport):
    """Host transport that waits a random 0–2 ms before each wait: other arrival orders."""

    name = "jittery"

    def __init__(self, comm, seed):
        super().__init__(comm)
        self.rng = np.random.default_rng(seed + self.rank)

    def _wait(self, exchange, deadline):
        time.sleep(self.rng.uniform(0, 2e-3))
        super()._wait(exchange, deadline)


def bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bytes (NaN payloads included): determinism, not closeness."""
    a, b = np.ascontiguousarray(to_host(a)), np.ascontiguousarray(to_host(b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def agree(comm, failure: str | None) -> None:
    """Raise the same AssertionError on every rank if ``failure`` is set on any rank."""
    everyone = comm.allgather(failure)
    failed = [(rank, f) for rank, f in enumerate(everyone) if f is not None]
    if failed:
        rank, first = failed[0]
        raise AssertionError(f"{len(failed)} rank(s) failed; rank {rank}: {first}")


def outcome_everywhere(comm, fn):
    """Run ``fn()`` on every rank; return (result, exception, every rank's (type, message))."""
    try:
        result, err = fn(), None
    except Exception as exc:  # noqa: BLE001 - the caller judges what was raised
        result, err = None, exc
    return result, err, comm.allgather(None if err is None else (type(err).__name__, str(err)))


def check_quietly(fn) -> str | None:
    """What ``fn()`` raised, as text (None if it passed), for :func:`agree`: an unexpected
    exception on one rank must fail every rank too, not leave them in the next collective."""
    try:
        fn()
    except AssertionError as exc:
        return (str(exc) or repr(exc))[:400]  # numpy's reports carry whole arrays
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:400]}"
    return None


def next_call_works(comm, xp=np) -> None:
    """A small causal forward on ``comm`` matches the oracle (the communicator is still usable)."""
    size = comm.Get_size()
    rng = np.random.default_rng(1234)
    q, k, v = (rng.standard_normal((1, 4 * size, 2, 8)) for _ in range(3))
    out_ref, _ = mpiring.attention_reference(q, k, v, causal=True)
    sh = lambda x: xp.asarray(mpiring.shard(x, comm, layout="contiguous"))  # noqa: E731
    out, _ = mpiring.ring_attention(sh(q), sh(k), sh(v), comm, causal=True, layout="contiguous")
    failure = check_quietly(lambda: np.testing.assert_allclose(to_host(out), to_host(sh(out_ref)), atol=1e-12))
    agree(comm, failure)


def assert_raises_everywhere(comm, exc_type, match: str, fn, xp=np, *, then=None):
    """``fn`` raises ``exc_type`` with the same message on every rank, containing ``match``;
    then (after ``then()``, e.g. undoing a fault injection) the next call on ``comm``
    still works. Returns this rank's exception."""
    _, err, everyone = outcome_everywhere(comm, fn)
    if then is not None:
        then()
    failure = None
    if err is None or len(set(everyone)) != 1:
        failure = f"expected the same {exc_type.__name__} on every rank, got {everyone}"
    elif not isinstance(err, exc_type) or match not in str(err):
        failure = f"expected {exc_type.__name__} containing {match!r}, got {type(err).__name__}: {err}"
    agree(comm, failure)
    next_call_works(comm, xp)
    return err


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:  # pragma: no cover - not Linux
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
