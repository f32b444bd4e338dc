"""An MPI time-stepping code that keeps its state in CuPy and calls the ring in its loop.

    mpiexec -n 2 python -m mpi4py examples/cupy_hpc.py            # one GPU per rank
    mpiexec -n 4 python -m mpi4py examples/cupy_hpc.py --numpy    # the same loop on the CPU

The state ``x`` ``(batch, seqlen_local, heads, dim)`` is a 1-D domain split over the
ranks (contiguous layout, as domain decompositions usually are). Each step
relaxes every point towards a softmax-weighted average of *all* points of the
domain: ``x ← x + dt·(attention(x·Wq, x·Wk, x) − x)`` — a global coupling that is
one ``mpiring.ring_attention`` call on the arrays the code already holds. Nothing
leaves the GPU in the loop but one scalar residual per step (``MPI.allreduce``).

Without CuPy or a GPU it runs the same loop with NumPy (and says so).
Self-check: every rank reruns the loop serially in float64 on the whole domain with
``mpiring.attention_reference`` and compares the final state.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import mpiring


def array_module(use_numpy: bool, comm):
    """CuPy on one GPU per rank (local rank mod device count) if present, else NumPy."""
    if not use_numpy:
        try:
            import cupy

            if cupy.is_available():
                local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
                cupy.cuda.Device(local_rank % cupy.cuda.runtime.getDeviceCount()).use()
                return cupy
        except ImportError:
            pass
        if comm.Get_rank() == 0:
            print("CuPy or a CUDA device is not available: running the same loop with NumPy")
    return np


def relax(x, wq, wk, *, steps, dt, attention):
    """``steps`` explicit steps of x ← x + dt·(attention(x·Wq, x·Wk, x) − x), in place.

    x : ``(batch, seqlen, heads, dim)``; wq, wk : ``(heads, dim, dim)``.
    ``attention(q, k, v)`` returns the attention output and the squared norm of the
    update (summed over the whole domain). Returns the residual of each step.
    """
    residuals = []
    for _ in range(steps):
        q = (x[..., None, :] @ wq)[..., 0, :]  # per-head linear maps, (batch, seqlen, heads, dim)
        k = (x[..., None, :] @ wk)[..., 0, :]
        update, norm2 = attention(q, k, x)
        x += dt * update
        residuals.append(norm2 ** 0.5)
    return residuals


def check(comm=MPI.COMM_WORLD, *, use_numpy=False, steps=5, dt=0.5, seed=0, batch=1, seqlen_local=256,
          heads=2, dim=16, tol=1e-4):
    """Run the distributed loop and compare with the serial float64 loop. Returns
    ``(array module name, relative error of the final state, residuals)``; raises
    above ``tol`` (float32 steps, measured ~1e-6)."""
    xp = array_module(use_numpy, comm)
    size = comm.Get_size()
    rng = np.random.default_rng(seed)  # the same initial domain and maps on every rank
    x0 = rng.standard_normal((batch, seqlen_local * size, heads, dim))
    wq, wk = (rng.standard_normal((heads, dim, dim)) / dim ** 0.5 for _ in range(2))

    def ring(q, k, v):
        out = mpiring.ring_attention(q, k, v, comm, layout="contiguous", return_lse=False)
        update = out - v
        return update, comm.allreduce(float((update * update).sum()))

    x = xp.asarray(mpiring.shard(x0, comm, layout="contiguous"), dtype=xp.float32)  # this rank's slab
    residuals = relax(x, xp.asarray(wq, xp.float32), xp.asarray(wk, xp.float32), steps=steps, dt=dt,
                      attention=ring)
    x_final = mpiring.unshard(x, comm, layout="contiguous")
    x_final = x_final.get() if hasattr(x_final, "get") else x_final  # CuPy → NumPy, for the check only

    def serial(q, k, v):
        update = mpiring.attention_reference(q, k, v)[0] - v
        return update, float((update * update).sum())

    x_ref = x0.copy()
    relax(x_ref, wq, wk, steps=steps, dt=dt, attention=serial)
    err = float(np.linalg.norm(x_final - x_ref) / np.linalg.norm(x_ref))
    if err > tol:
        raise AssertionError(f"final state: relative error {err:.2e} > {tol:.0e} vs the serial float64 loop")
    return xp.__name__, err, residuals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numpy", action="store_true", help="run on the CPU even if CuPy is present")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    name, err, residuals = check(comm, use_numpy=args.numpy, steps=args.steps)
    if comm.Get_rank() == 0:
        shown = " ".join(f"{r:.3g}" for r in residuals)
        print(f"OK: {comm.Get_size()} ranks, {name}; residuals {shown}; final state vs serial float64: {err:.1e}")


if __name__ == "__main__":
    sys.exit(main())
