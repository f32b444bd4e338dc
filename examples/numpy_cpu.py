"""Ring attention on the CPU with NumPy arrays: shard, forward, backward, unshard, check.

    mpiexec -n 4 python -m mpi4py examples/numpy_cpu.py

Every rank builds the same global problem (same seed), keeps its shard
(``mpiring.shard``, zigzag layout so that causal work is balanced), runs the
ring forward and backward, gathers the results (``mpiring.unshard``) and checks
them against the dense float64 oracle (``mpiring.attention_reference``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import mpiring


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(comm=MPI.COMM_WORLD, *, layout="zigzag", causal=True, seed=0, batch=2, seqlen_local=64,
          heads=4, heads_kv=2, head_dim=32, dtype=np.float32, tol=2e-5):
    """Run the ring on shards of a random problem; return ``{name: relative error}`` of
    out, dq, dk, dv against the float64 oracle (on the whole sequence). Raises if any
    exceeds ``tol`` (float32 measured ~1e-6)."""
    seqlen = seqlen_local * comm.Get_size()
    rng = np.random.default_rng(seed)  # the same global arrays on every rank
    q, dout = (rng.standard_normal((batch, seqlen, heads, head_dim)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((batch, seqlen, heads_kv, head_dim)).astype(dtype) for _ in range(2))

    def shard(x):
        return mpiring.shard(x, comm, layout=layout)  # (batch, seqlen_local, ...)

    def unshard(x):
        return mpiring.unshard(x, comm, layout=layout)

    out, lse = mpiring.ring_attention(shard(q), shard(k), shard(v), comm, causal=causal, layout=layout)
    dq, dk, dv = mpiring.ring_attention_backward(shard(dout), shard(q), shard(k), shard(v), out, lse, comm,
                                                 causal=causal, layout=layout)
    out_ref, _ = mpiring.attention_reference(q, k, v, causal=causal)
    grads_ref = mpiring.attention_reference_backward(dout, q, k, v, causal=causal)
    errors = {name: rel_err(unshard(x), ref)
              for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (out_ref, *grads_ref))}
    bad = {name: e for name, e in errors.items() if e > tol}
    if bad:
        raise AssertionError(f"relative error above {tol:.0e}: {bad}")
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="zigzag", choices=list(mpiring.layout.LAYOUTS))
    parser.add_argument("--seqlen-local", type=int, default=64)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    errors = check(comm, layout=args.layout, seqlen_local=args.seqlen_local)
    if comm.Get_rank() == 0:
        shown = ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
        print(f"OK: {comm.Get_size()} ranks, layout={args.layout}, causal; relative error vs float64: {shown}")


if __name__ == "__main__":
    sys.exit(main())
