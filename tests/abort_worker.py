"""One rank fails inside a ring step; run by tests/test_abort.py as

    mpiexec -n 4 python -m mpi4py tests/abort_worker.py MODE STAMP_FILE

MODE: ``raise`` (an exception in a forward ring step), ``raise-backward`` (in a
backward ring step), ``exit`` (``os._exit`` in a forward ring step, as a crash
would) or ``raise-entry`` (``raise``, the work run by the library's entry points'
``mpiring._entry.run_or_abort``, for a launch without ``python -m mpi4py``). With
MPIRING_ABORT_TIMEOUT set (seconds), the ring calls pass it as ``timeout=``. Rank 1
fails at ring step 1, when the other ranks are in the ring waiting for it; it writes
``time.time()`` to STAMP_FILE just before failing. Exiting normally is an error (exit
code 0 would mean nobody failed).
"""

import os
import sys
import time

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.backends.numpy_ import BlockwiseBackend

FAILING_RANK, FAILING_STEP = 1, 1


def fail_at_step(method: str, mode: str, stamp_file: str) -> None:
    """Wrap ``BlockwiseBackend.<method>`` so that its call number FAILING_STEP fails."""
    real = getattr(BlockwiseBackend, method)
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == FAILING_STEP + 1:
            with open(stamp_file, "w") as f:
                f.write(repr(time.time()))
            if mode == "exit":
                os._exit(3)
            raise RuntimeError(f"injected failure in {method} on rank {FAILING_RANK}, ring step {FAILING_STEP}")
        return real(self, *args, **kwargs)

    setattr(BlockwiseBackend, method, step)


def main(mode: str, stamp_file: str) -> None:
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.Get_rank())
    q, k, v, dout = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(4))
    out, lse = mpiring.ring_attention(q, k, v, comm)  # warm-up: every rank is up and in step
    comm.Barrier()
    if comm.Get_rank() == FAILING_RANK:
        fail_at_step("bwd_step" if mode == "raise-backward" else "fwd_step", mode, stamp_file)
    timeout = float(os.environ.get("MPIRING_ABORT_TIMEOUT", "0")) or None
    for _ in range(3):
        out, lse = mpiring.ring_attention(q, k, v, comm, timeout=timeout)
        mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, timeout=timeout)
    sys.exit(f"rank {comm.Get_rank()}: the injected failure did not happen")


if __name__ == "__main__":
    if sys.argv[1] == "raise-entry":
        from mpiring._entry import run_or_abort

        run_or_abort(lambda: main("raise", sys.argv[2]))
    else:
        main(*sys.argv[1:3])
