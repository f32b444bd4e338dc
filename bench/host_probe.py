"""The host's work per ring call, by phase, and whether any of it waits for the GPU.

Under ``mpiexec -n N`` (one rank per GPU; N = 1 runs the one-GPU path), forward and
forward+backward calls (bf16, causal; the longctx bench's random documents packed on
contiguous ranks with ``--documents D``, else one zigzag sequence), on one transport:

* ``host idle``: ms until the call returns, from an idle GPU (median of the calls);
* ``host busy``: the same with a spin kernel of ``--busy-ms`` queued before each call on
  the compute stream: equal to ``host idle`` where nothing in the call waits for the GPU,
  larger by up to the spin where something does (the phase table says which);
* ``gpu``: ms between CUDA events recorded before and after the call from an idle GPU
  (so the host's work before the first kernel counts);
* per phase: the library's functions wrapped in host timers (inclusive, so nested phases
  overlap), ms per call, on the rank whose call took longest on the host.

    mpiexec -n 4 python3 bench/host_probe.py [--seqlen 32768] [--documents 16] [--calls 20]
        [--busy-ms 20] [--transport nccl] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shlex
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.bench.common import attention_flops, card_name, make_row, today, write_rows
from mpiring.bench.longctx import _bfloat16, _documents

# (module path, attribute, optional class): the phases timed.
PHASES = {
    "mpiring.interop": ["import_arrays"],
    "mpiring.api": ["_prepare", "_arrive", "_agree", "_agree_allocated", "_kv_slots", "_post_kv", "_add_rows",
                    "backend_for", "select_transport"],
    "mpiring.layout": ["step_schedule", "needed_rows", "kv_hops", "kv_rows", "dkv_plan", "deferred_step"],
    "mpiring.backends.cupy_:CudaKernelBackend": ["pack_kv", "kv_buffer", "record", "empty_dkv", "dkv_out",
                                                 "narrow_dkv", "fwd_begin", "fwd_step", "fwd_end", "bwd_begin",
                                                 "bwd_step", "bwd_end", "_launch", "_cu"],
    "mpiring.transport.base:Transport": ["post", "wait"],
}

_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


def _wrap(totals: dict, name: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    return timed


@contextlib.contextmanager
def timed_phases(totals: dict):
    """Every function of :data:`PHASES` (module attribute or class method) wrapped in a
    timer that adds into ``totals`` (name → seconds) inside the block; restored after it,
    so that the host and GPU times measured outside carry no timer overhead."""
    import importlib

    wrapped = []
    for where, names in PHASES.items():
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        for name in names:
            wrapped.append((owner, name, owner.__dict__[name]))
            setattr(owner, name, _wrap(totals, f"{cls or module.rsplit('.', 1)[-1]}.{name}", getattr(owner, name)))
    try:
        yield totals
    finally:
        for owner, name, original in reversed(wrapped):
            setattr(owner, name, original)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=32768, help="tokens per GPU")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--documents", type=int, default=16, help="packed documents on contiguous ranks (0: one sequence)")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--busy-ms", type=float, default=20.0)
    p.add_argument("--transport", default="nccl")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import cupy

    from mpiring.transport.gpu import select_device

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    select_device(comm)
    total = args.seqlen * size
    cu, layout, useful = None, "zigzag", 1.0
    if args.documents:
        cu = mpiring.layout.pack_documents(np.diff(_documents(total, args.documents)), size)[1]
        layout = "contiguous"
        useful = float((np.diff(cu).astype(float) ** 2).sum()) / total**2  # of a causal sequence's pairs
    opts = dict(causal=True, layout=layout, cu_seqlens=cu, transport=args.transport if size > 1 else "auto")
    spin = cupy.RawKernel(_SPIN, "spin")
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    with stream:
        cupy.random.seed(1234 + rank)
        make = lambda: cupy.random.standard_normal((1, args.seqlen, args.heads, args.head_dim),  # noqa: E731
                                                   dtype=np.float32).astype(_bfloat16())
        q, k, v, do = make(), make(), make(), make()

        def fwd():
            return mpiring.ring_attention(q, k, v, comm, **opts)

        def fwd_bwd():
            out, lse = fwd()
            mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, **opts)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            for _ in range(3):
                fn()
            samples = {"idle": [], "busy": [], "gpu": []}
            for busy in (False, True):
                for _ in range(args.calls):
                    stream.synchronize()
                    comm.Barrier()
                    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
                    if busy:
                        spin((1,), (1,), (np.uint64(args.busy_ms * 1e6),))
                    begin.record(stream)
                    start = time.perf_counter()
                    fn()
                    host = time.perf_counter() - start
                    end.record(stream)
                    end.synchronize()
                    samples["busy" if busy else "idle"].append(host * 1e3)
                    if not busy:
                        samples["gpu"].append(cupy.cuda.get_elapsed_time(begin, end))
            with timed_phases({}) as totals:  # the phases of these calls only
                stream.synchronize()
                comm.Barrier()
                for _ in range(args.calls):
                    fn()
                stream.synchronize()
            mine = {
                "host_idle_ms": statistics.median(samples["idle"]),
                "host_busy_ms": statistics.median(samples["busy"]),
                "gpu_ms": statistics.median(samples["gpu"]),
                "phases_ms": {n: t * 1e3 / args.calls for n, t in sorted(totals.items(), key=lambda x: -x[1])},
            }
            every = comm.gather(mine, root=0)
            if rank == 0:
                rows.append(_row(args, size, layout, opts["transport"], mode, every, useful))
    if rank == 0:
        _print(rows)
        if args.out:
            write_rows(args.out, rows)


def _row(args, size, layout, transport, mode, every, useful) -> dict:
    """The result row of one pass: every rank's figures; TF/s per GPU of the useful pairs
    over the slowest rank's ``gpu`` time."""
    slowest = max(range(size), key=lambda r: every[r]["host_idle_ms"])
    gpu_ms = max(r["gpu_ms"] for r in every)
    flops = attention_flops(1, args.seqlen * size, args.seqlen * size, args.heads, args.head_dim, causal=True,
                            mode=mode) / size * useful
    return make_row(
        bench="host-probe", card=card_name(), date=today(),
        command=f"mpiexec -n {size} python3 " + shlex.join(sys.argv), dtype="bf16", heads=args.heads,
        heads_kv=args.heads, head_dim=args.head_dim, seqlen=args.seqlen, n_gpus=size, causal=True,
        layout=layout, transport=transport, documents=args.documents or None, **{"pass": mode},
        tflops_per_gpu=flops / (gpu_ms / 1e3) / 1e12, busy_ms=args.busy_ms, calls=args.calls,
        slowest_rank=slowest, per_rank=every,
    )


def _print(rows) -> None:
    print("| pass | rank | host idle ms | host busy ms (spin before) | gpu ms | phases ms per call (inclusive) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        s = row["per_rank"][row["slowest_rank"]]
        phases = ", ".join(f"{n} {t:.3f}" for n, t in s["phases_ms"].items() if t >= 0.005)
        print(f"| {row['pass']} | {row['slowest_rank']} | {s['host_idle_ms']:.2f} | {s['host_busy_ms']:.2f} | "
              f"{s['gpu_ms']:.2f} | {phases} |")
    for row in rows:
        print(f"{row['pass']}: host idle / busy / gpu ms per rank: " + "; ".join(
            f"{r['host_idle_ms']:.2f} / {r['host_busy_ms']:.2f} / {r['gpu_ms']:.2f}" for r in row["per_rank"]))


if __name__ == "__main__":
    main()
