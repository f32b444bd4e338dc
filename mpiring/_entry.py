"""The library's command-line entry points (``python -m mpiring demo``, ``python -m
mpiring.bench ...``) end the whole MPI job when one rank fails."""

from __future__ import annotations

import sys
import traceback


def run_or_abort(fn):
    """``fn()``. If it raises on one rank of a job of several ranks, print the traceback and
    call ``MPI_Abort``, which ends every rank at once, as ``python -m mpi4py`` does for a
    script: otherwise the other ranks would wait in a ring step (or a collective) for the
    failed one until their ``timeout=``, or forever. Without MPI initialised, or on one
    rank, the exception propagates as usual."""
    try:
        return fn()
    except Exception:
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
                traceback.print_exc()
                sys.stderr.flush()
                MPI.COMM_WORLD.Abort(1)
        raise
