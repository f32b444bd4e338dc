"""Where the ring's time goes on N GPUs: its kernels, and everything else, per transport.

Under ``mpiexec -n N`` (one rank per GPU), forward+backward ring calls (bf16, zigzag
causal, contiguous non-causal with ``--noncausal``, or the longctx bench's packed documents
on contiguous ranks with ``--documents D``) for each transport in turns, with
the ring bench's compute-only baseline (a transport that moves nothing) among them, after
a heating phase. Per call and rank:

* ``wall``: the call on the compute stream (CUDA events around it);
* ``attention``: the attention kernels' own device time (CUDA events around each launch
  of the kernel backend), and their sum per ring step in launch order;
* ``other kernels``: the backend's other launches (the output cast, ...);
* ``outside``: wall minus all launches: the adds and fills, the compute stream waiting
  for a transfer or for the host, and the tail after the last kernel (the final dK/dV
  hop home).

What the ring loses against its baseline then splits into kernels that ran slower (the
transfers taking SMs or memory bandwidth) and time outside the kernels (waits).

    mpiexec -n 4 python3 bench/ring_probe.py [--seqlen 32768] [--heads 32] [--noncausal | --documents 16]
        [--transports nccl,mpi-cuda] [--dq deterministic,atomic] [--rounds 5] [--profile CALLS] [--out FILE]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.bench.common import (
    attention_flops,
    card_name,
    heat,
    kernel_launch_events,
    make_row,
    today,
    write_rows,
)
from mpiring.bench.longctx import _bfloat16, _documents
from mpiring.bench.ring import ComputeOnly


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=32768, help="tokens per GPU")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--noncausal", action="store_true", help="contiguous, non-causal (default: zigzag, causal)")
    p.add_argument("--documents", type=int, default=0,
                   help="causal packed documents on contiguous ranks: the longctx bench's random documents, "
                        "ordered by mpiring.layout.pack_documents (0: one sequence)")
    p.add_argument("--transports", default="nccl,mpi-cuda", help="those that can't run here are skipped")
    p.add_argument("--dq", default="deterministic",
                   help="comma-separated backward dQ modes, each timed per transport: deterministic, atomic")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--heat", type=float, default=3.0, help="seconds of heating before the timed rounds")
    p.add_argument("--garbage-baseline", action="store_true",
                   help="also the compute-only baseline as it ran before the twelfth session (arrival buffers "
                        "holding whatever the memory pool handed out)")
    p.add_argument("--profile", type=int, default=0, metavar="CALLS",
                   help="then the host's work of CALLS back-to-back calls per transport (cProfile, rank 0 prints)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import cupy

    from mpiring.api import private_comm
    from mpiring.transport.gpu import select_device, select_gpu_transport

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    select_device(comm)
    causal, layout = (False, "contiguous") if args.noncausal else (True, "zigzag")
    cu, useful = None, 1.0
    if args.documents:
        total = args.seqlen * size
        causal, layout = True, "contiguous"
        cu = mpiring.layout.pack_documents(np.diff(_documents(total, args.documents)), size)[1]
        useful = float((np.diff(cu).astype(float) ** 2).sum()) / total**2  # of a causal sequence's pairs
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cupy.random.seed(1234 + rank)
        make = lambda: cupy.random.standard_normal((1, args.seqlen, args.heads, args.head_dim),  # noqa: E731
                                                   dtype=np.float32)
        q, k, v, do = (make().astype(_bfloat16()) for _ in range(4))
        transports = {"compute-only": ComputeOnly(comm)}
        for name in [t for t in args.transports.split(",") if t]:
            try:
                transports[name] = select_gpu_transport(name, private_comm(comm))
            except RuntimeError as exc:  # agreed on every rank
                if rank == 0:
                    print(f"{name} skipped: {exc}", flush=True)

        def call(tr, deterministic):
            opts = dict(causal=causal, layout=layout, transport=tr, cu_seqlens=cu)
            out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
            mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, deterministic=deterministic, **opts)

        fns = {}
        for dq in [m for m in args.dq.split(",") if m]:
            if dq not in ("deterministic", "atomic"):
                raise SystemExit(f"--dq: {dq!r} is not deterministic or atomic")
            for name, tr in transports.items():
                fn = lambda tr=tr, det=dq == "deterministic": call(tr, det)  # noqa: E731
                fns[name + ("" if dq == "deterministic" else " (atomic dQ)")] = (
                    transports["compute-only"].around(fn) if name == "compute-only" else fn)
        if args.garbage_baseline:  # as before the twelfth session: whatever the pool handed out
            fns["compute-only (garbage)"] = lambda: call(transports["compute-only"], True)
        for fn in fns.values():
            fn()
        heat(list(fns.values()), args.heat, sync=stream.synchronize,
             agree=lambda x: comm.allreduce(x, op=MPI.MAX))
        names, samples = list(fns), {name: [] for name in fns}
        with kernel_launch_events() as events:
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    comm.Barrier()
                    events.clear()
                    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
                    begin.record(stream)
                    fns[name]()
                    end.record(stream)
                    end.synchronize()
                    samples[name].append(_sample(cupy, begin, end, events))
        for name in names if args.profile else ():
            _profile(comm, stream, name, fns[name], args.profile)
    mine = {name: _summary(s) for name, s in samples.items()}
    every = comm.gather(mine, root=0)
    if rank != 0:
        return
    flops = attention_flops(1, args.seqlen * size, args.seqlen * size, args.heads, args.head_dim,
                            causal=causal, mode="fwd+bwd") / size * useful  # with documents: their pairs only
    rows = []
    for name in names:
        per_rank = [e[name] for e in every]
        slowest = max(range(size), key=lambda i: per_rank[i]["wall_ms"])
        s = per_rank[slowest]
        rows.append(make_row(
            bench="ring-probe", card=card_name(), date=today(),
            command=f"mpiexec -n {size} python3 " + shlex.join(sys.argv), dtype="bf16", heads=args.heads,
            heads_kv=args.heads, head_dim=args.head_dim, seqlen=args.seqlen, n_gpus=size, causal=causal,
            layout=layout, transport=None if name.startswith("compute-only") else name, **{"pass": "fwd+bwd"},
            tflops_per_gpu=flops / (s["wall_ms"] / 1e3) / 1e12, probe_transport=name, rounds=args.rounds,
            slowest_rank=slowest, per_rank=per_rank, documents=args.documents or None,
        ))
    _print(rows)
    if args.out:
        write_rows(args.out, rows)


def _profile(comm, stream, name, fn, calls: int) -> None:
    """The host's work of ``calls`` calls back to back (one synchronisation at the end),
    by function (cProfile on every rank; rank 0 prints its own)."""
    import cProfile
    import io
    import pstats
    import time

    stream.synchronize()
    comm.Barrier()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    host = (time.perf_counter() - start) / calls
    stream.synchronize()
    if comm.Get_rank() == 0:
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(18)
        stats.sort_stats("cumulative").print_stats(30)
        print(f"== host profile {name}: {host * 1e3:.2f} ms per call (profiled)\n" + text.getvalue(), flush=True)


def _sample(cupy, begin, end, events) -> dict:
    """One call: its wall time and each launch's (name, ms, gap before it) in order."""
    wall = cupy.cuda.get_elapsed_time(begin, end)
    launches, last = [], begin
    for name, start, stop in events:
        launches.append((name, cupy.cuda.get_elapsed_time(start, stop), cupy.cuda.get_elapsed_time(last, start)))
        last = stop
    return {"wall": wall, "launches": launches, "tail": cupy.cuda.get_elapsed_time(last, end)}


def _summary(samples: list[dict]) -> dict:
    """Medians over the calls of one rank and transport (ms)."""
    med = statistics.median
    attention = [[ms for name, ms, _ in s["launches"] if name.startswith("attn_")] for s in samples]
    fwd = [sum(ms for name, ms, _ in s["launches"] if name.startswith("attn_fwd")) for s in samples]
    bwd = [sum(ms for name, ms, _ in s["launches"] if name.startswith("attn_bwd")) for s in samples]
    kernels = [sum(ms for _, ms, _ in s["launches"]) for s in samples]
    walls = [s["wall"] for s in samples]
    steps = len(attention[0]) if all(len(a) == len(attention[0]) for a in attention) else 0
    gaps = [[gap for _, _, gap in s["launches"]] for s in samples]
    return {
        "wall_ms": med(walls),
        "attention_ms": med(sum(a) for a in attention),
        "fwd_ms": med(fwd),
        "bwd_ms": med(bwd),
        "other_kernels_ms": med(k - sum(a) for k, a in zip(kernels, attention)),
        "outside_ms": med(w - k for w, k in zip(walls, kernels)),
        "tail_ms": med(s["tail"] for s in samples),
        "attention_steps_ms": [med(a[i] for a in attention) for i in range(steps)],
        "launch_names": [name for name, _, _ in samples[0]["launches"]],
        "gaps_ms": [med(g[i] for g in gaps) for i in range(len(gaps[0]))] if steps else [],
    }


def _print(rows) -> None:
    base = rows[0]["per_rank"][rows[0]["slowest_rank"]]
    print("| transport | wall ms | attention ms (fwd / bwd) | other kernels | outside kernels | tail | "
          "vs compute-only: wall, attention, outside |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        s = row["per_rank"][row["slowest_rank"]]
        print(f"| {row['probe_transport']} (rank {row['slowest_rank']}) | {s['wall_ms']:.2f} | "
              f"{s['attention_ms']:.2f} ({s['fwd_ms']:.2f} / {s['bwd_ms']:.2f}) | {s['other_kernels_ms']:.2f} | "
              f"{s['outside_ms']:.2f} | {s['tail_ms']:.2f} | {s['wall_ms'] - base['wall_ms']:+.2f}, "
              f"{s['attention_ms'] - base['attention_ms']:+.2f}, {s['outside_ms'] - base['outside_ms']:+.2f} |")
    for row in rows:
        s = row["per_rank"][row["slowest_rank"]]
        print(f"{row['probe_transport']}: attention per launch "
              + " ".join(f"{x:.2f}" for x in s["attention_steps_ms"]))
        print(f"{row['probe_transport']}: gap before each launch "
              + " ".join(f"{n.split('_')[1]}:{g:.2f}" for n, g in zip(s["launch_names"], s["gaps_ms"])))
    print("per rank backward kernels ms: " + "; ".join(
        f"{row['probe_transport']} " + " ".join(f"{r['bwd_ms']:.1f}" for r in row["per_rank"]) for row in rows))
    print("per rank wall ms: " + "; ".join(
        f"{row['probe_transport']} " + " ".join(f"{r['wall_ms']:.1f}" for r in row["per_rank"]) for row in rows))


if __name__ == "__main__":
    main()
