"""A self-checking demo: ``mpiexec -n 4 python -m mpiring demo``.

Builds a random problem (the same on every rank from one seed), shards it, runs
the ring forward and backward, prints the time, and checks every output against
the float64 oracle on rank 0.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring._xp import SUPPORTED_DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpiring demo", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen-local", type=int, default=512, help="tokens per rank")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--heads-kv", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=[d.name for d in SUPPORTED_DTYPES])
    p.add_argument("--layout", default="zigzag", choices=mpiring.layout.LAYOUTS)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(args.dtype)
    seqlen = args.seqlen_local * size
    rng = np.random.default_rng(args.seed)
    shapes = [(args.batch, seqlen, args.heads, args.head_dim), (args.batch, seqlen, args.heads_kv, args.head_dim)]
    q, k, v, dout = (rng.standard_normal(shapes[i]).astype(dtype) for i in (0, 1, 1, 0))
    opts = {"causal": args.causal, "layout": args.layout}
    local = [mpiring.shard(x, comm, layout=args.layout) for x in (q, k, v, dout)]

    comm.Barrier()
    t0 = MPI.Wtime()
    out, lse = mpiring.ring_attention(*local[:3], comm, **opts)
    t1 = MPI.Wtime()
    grads = mpiring.ring_attention_backward(local[3], *local[:3], out, lse, comm, **opts)
    t2 = MPI.Wtime()
    times = comm.reduce((t1 - t0, t2 - t1), op=MPI.MAX)

    gathered = [mpiring.unshard(x, comm, layout=args.layout) for x in (out, *grads)]
    lse_all = mpiring.unshard(lse, comm, layout=args.layout, axis=2)
    if rank != 0:
        return 0
    # Causal attention does half the work of full attention: 4·S²·H·D flops forward.
    flops = 4 * args.batch * seqlen**2 * args.heads * args.head_dim * (0.5 if args.causal else 1.0)
    print(f"mpiring {mpiring.__version__}: {size} ranks x {args.seqlen_local} tokens = {seqlen}, "
          f"batch {args.batch}, heads {args.heads}/{args.heads_kv}, head_dim {args.head_dim}, {dtype.name}, "
          f"layout {args.layout}, causal {args.causal}")
    print(f"forward  {times[0] * 1e3:9.2f} ms  {flops / times[0] / 1e9 / size:8.2f} GF/s per rank")
    print(f"backward {times[1] * 1e3:9.2f} ms  {2.5 * flops / times[1] / 1e9 / size:8.2f} GF/s per rank")
    ref = mpiring.attention_reference(q, k, v, causal=args.causal)
    refs = (ref[0], *mpiring.attention_reference_backward(dout, q, k, v, causal=args.causal))
    tol = 1e-10 if dtype == np.float64 else 1e-4 if dtype == np.float32 else 3e-2
    ok = True
    for name, x, r in zip(("out", "dq", "dk", "dv"), gathered, refs):
        err = np.linalg.norm(x.astype(np.float64) - r) / np.linalg.norm(r)
        ok &= bool(err <= tol)
        print(f"{name:4s} relative error vs float64 oracle {err:.2e}  (tolerance {tol:.0e})")
    lse_err = np.abs(lse_all - ref[1]).max()
    print(f"lse  max abs error {lse_err:.2e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
