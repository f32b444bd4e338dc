"""``python -m mpiring.bench longctx``: memory vs the estimate, the largest context, varlen vs fixed, step timelines.

Run with one rank per GPU (``mpiexec -n 4 python -m mpiring.bench longctx``), or on the
CPU (NumPy arrays, ``--cpu``). Each part writes result rows (``bench`` = its name):

* ``memory`` (``--memory TOKENS,…`` per rank; ``--memory-varlen`` with packed documents):
  the peak of the library's allocations in a forward and in a forward+backward call
  against :func:`mpiring.memory_estimate`.
  Measured with tracemalloc (NumPy) or a CuPy memory hook (device bytes in use through
  CuPy's pool, ``peak_bytes``), plus the pool's growth and ``cudaMemGetInfo``'s (context,
  NCCL and cuBLAS buffers are outside the pool and outside the estimate). With
  ``--memory-window W`` the calls use a causal window of W tokens: the backends
  allocate exactly what a full causal call allocates, at a fraction of the compute, so
  large sizes fit in a benchmark's time.
* ``max_context`` (``--max-context``, GPU): the largest tokens per GPU whose inputs and
  estimated buffers fit in the free device memory, for forward and forward+backward, on
  all ranks and on one; verified by running it (windowed, as above) and by a run 10 %
  larger that must raise MemoryError.
* ``varlen`` (``--varlen TOKENS``): causal attention over packed random documents
  (``cu_seqlens``) against one sequence of the same total length (``--fixed-layout``,
  default ``--layout``); TF/s count the documents' own work (Σ length²), so ``ratio``
  compares useful throughput; ``balance`` (:func:`step_balance`) says how evenly
  ``--layout`` spreads the documents over the ranks and ring steps (zigzag balances one
  causal sequence, striped any documents). ``--pack`` orders the same documents with
  :func:`mpiring.layout.pack_documents` (for ``--layout contiguous``: documents stay on
  their ranks, ``rank_balance`` = max/mean of :func:`mpiring.layout.rank_work`).
* ``timeline`` (``--timeline TOKENS``): one forward+backward ring call per transport;
  per exchange, the compute it overlaps and the transfer (see ``step_times`` of the GPU
  transports; on the host, the time from post to wait and the wait itself). With
  ``--documents N`` (and ``--pack``) over packed documents, every rank's steps.

``--plot DIR`` writes the figures of :mod:`mpiring.bench.plots` from the rows.
"""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.backends import backend_for
from mpiring.bench.common import attention_flops, command_line, heat, make_row, today, write_rows
from mpiring.transport import chosen_transport
from mpiring.transport.base import Transport

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_TAG_KV, _TAG_DKV = 71, 72  # mpiring.api's exchange tags


def add_arguments(p) -> None:
    p.add_argument("--memory", default="", help="tokens per rank for the memory rows, e.g. 65536,262144")
    p.add_argument("--memory-varlen", default="", help="tokens per rank of memory rows with packed documents")
    p.add_argument("--memory-window", type=int, default=0, help="causal window of the memory runs (0: full causal)")
    p.add_argument("--max-context", action="store_true", help="largest tokens per GPU that fit (GPU only)")
    p.add_argument("--varlen", type=int, default=0, help="tokens per rank of the varlen vs fixed comparison")
    p.add_argument("--documents", type=int, default=0, help="documents of the varlen run (default: 4 per rank)")
    p.add_argument("--timeline", type=int, default=0, help="tokens per rank of the per-step timeline")
    p.add_argument("--transports", default="nccl,mpi-staged", help="GPU transports of the timeline")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--fixed-layout", default=None,
                   help="layout of the varlen rows' fixed-length side (default: --layout; zigzag is the balanced one)")
    p.add_argument("--pack", action="store_true",
                   help="varlen: order the documents with mpiring.layout.pack_documents (for --layout contiguous)")
    p.add_argument("--dq", default="deterministic", choices=("deterministic", "atomic"),
                   help="the varlen rows' backward dQ (both sides of the ratio): ordered adds (the default) or atomics")
    p.add_argument("--cpu", action="store_true", help="NumPy arrays (also where a GPU is present)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/longctx-<card>-<date>.json)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write the PNG figures into DIR (needs matplotlib)")


# --- measuring ------------------------------------------------------------------------------
class PeakMemory:
    """Peak bytes allocated inside the ``with`` block, above what was in use at its start.

    NumPy: tracemalloc (NumPy reports its data buffers to it). CuPy: a memory hook on the
    pool's malloc/free (bytes handed out, rounded as the pool rounds them); also the pool's
    growth and the device's (``cudaMemGetInfo``) growth.
    """

    def __init__(self, xp):
        self.xp = xp
        self.peak = self.pool_growth = self.device_growth = 0

    def __enter__(self):
        if self.xp is np:
            tracemalloc.start()
            self._base = tracemalloc.get_traced_memory()[0]
            return self
        from cupy.cuda import memory_hook

        tracker = self

        class Hook(memory_hook.MemoryHook):
            name = "mpiring-peak"

            def __init__(self):
                self.used = 0

            # CuPy calls these with keywords (device_id, size, mem_size, mem_ptr, pmem_id)
            def malloc_postprocess(self, **kw):
                self.used += kw["mem_size"]
                tracker.peak = max(tracker.peak, self.used)

            def free_postprocess(self, **kw):
                self.used -= kw["mem_size"]

        self.xp.cuda.Device().synchronize()
        self._pool = self.xp.get_default_memory_pool()
        self._pool.free_all_blocks()
        self._pool_base = self._pool.total_bytes()
        self._device_base = self._device_used()
        self._hook = Hook()
        self._hook.__enter__()
        return self

    def _device_used(self) -> int:
        free, total = self.xp.cuda.runtime.memGetInfo()
        return total - free

    def __exit__(self, *exc):
        if self.xp is np:
            self.peak = tracemalloc.get_traced_memory()[1] - self._base
            tracemalloc.stop()
            return False
        self.xp.cuda.Device().synchronize()
        self._hook.__exit__(*exc)
        self.pool_growth = self._pool.total_bytes() - self._pool_base
        self.device_growth = self._device_used() - self._device_base
        return False


def run_array_module(cpu: bool):
    """CuPy on this rank's GPU (chosen by local rank) when one is usable and ``cpu`` is
    False, else NumPy."""
    if not cpu:
        try:
            import cupy

            if cupy.is_available():
                from mpiring.transport.gpu import select_device

                select_device(MPI.COMM_WORLD)
                return cupy
        except ImportError:
            pass
    return np


def _inputs(xp, seqlen, args, dtype, *, random=True):
    """q, k, v, dout of one rank ``(1, seqlen, heads|heads_kv, head_dim)``; zeros unless
    ``random`` (the memory runs: values don't change what is allocated)."""
    shapes = [(1, seqlen, h, args.head_dim) for h in (args.heads, args.heads_kv, args.heads_kv, args.heads)]
    if not random:
        return [xp.zeros(s, dtype) for s in shapes]
    rng = xp.random.default_rng(0)
    return [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in shapes]


def _run(comm, arrays, mode, deterministic=True, **options):
    q, k, v, dout = arrays
    out, lse = mpiring.ring_attention(q, k, v, comm, **options)
    if mode == "fwd+bwd":
        mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, deterministic=deterministic, **options)


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _timed(comm, xp, fn, repeat: int = 1, *, until_done: bool = True, warmup: bool = True) -> float:
    """Slowest rank's median seconds of ``fn()`` from an idle GPU (after one warm-up run
    unless ``warmup`` is False). ``until_done`` False: until ``fn()`` returns, not until its
    GPU work is done: the host's work per call (queueing kernels, validation, the ring
    loop), which bounds the rate of calls back to back when it exceeds their GPU time."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        _sync(xp)
        comm.Barrier()
        start = time.perf_counter()
        fn()
        if until_done:
            _sync(xp)
        times.append(time.perf_counter() - start)
        _sync(xp)
    return comm.allreduce(sorted(times)[len(times) // 2], op=MPI.MAX)


def _throughput(comm, xp, fn, calls: int = 5) -> tuple[float, float]:
    """Slowest rank's seconds per call of ``fn()`` called back to back, after one warm-up
    run, as ``(steady, from_idle)``.

    ``steady`` (the rate of a loop that calls it, once running): ``calls`` calls timed with
    CUDA events on the current stream, from the end of a first call queued before them to
    the end of the last; the host queues each of them while the GPU runs the calls before
    it. ``from_idle``: the host's clock from a synchronised, idle GPU over those
    ``calls + 1`` calls, so it also holds the first call's host work before its first
    kernel (the measure of the bench before the sixteenth session, then over 5 calls).
    NumPy: the host's clock for both."""
    fn()
    _sync(xp)
    comm.Barrier()
    gpu = xp is not np
    start = time.perf_counter()
    fn()
    if gpu:
        begin, end = xp.cuda.Event(), xp.cuda.Event()
        begin.record()
    first = time.perf_counter()
    for _ in range(calls):
        fn()
    if gpu:
        end.record()
    _sync(xp)
    done = time.perf_counter()
    steady = xp.cuda.get_elapsed_time(begin, end) / 1e3 / calls if gpu else (done - first) / calls
    return comm.allreduce(steady, op=MPI.MAX), comm.allreduce((done - start) / (calls + 1), op=MPI.MAX)


# --- the parts ------------------------------------------------------------------------------
def memory_rows(comm, xp, args, dtype, common, sizes: str, documents: int = 0) -> list[dict]:
    """Measured peak vs estimate at each tokens-per-rank of ``sizes``; with ``documents``,
    packed random documents (``cu_seqlens``: the blockwise backend on CuPy too)."""
    rows = []
    window = (args.memory_window, 0) if args.memory_window and not documents else None
    for seqlen in [int(s) for s in sizes.split(",") if s]:
        arrays = _inputs(xp, seqlen, args, dtype, random=False)
        cu = _documents(seqlen * comm.Get_size(), documents) if documents else None
        options = dict(causal=True, layout=args.layout, window=window, cu_seqlens=cu)
        for mode in ("fwd", "fwd+bwd"):
            _run(comm, arrays, mode, **options)  # warm-up: NCCL buffers, kernel compilation
            with PeakMemory(xp) as peak:
                _run(comm, arrays, mode, **options)
            measured = comm.allreduce(peak.peak, op=MPI.MAX)
            estimate = mpiring.memory_estimate(
                1, seqlen, args.heads, args.heads_kv, args.head_dim, dtype, backward=mode == "fwd+bwd",
                array=_kind(xp), comm_size=comm.Get_size(), **options,
            )
            rows.append(make_row(
                **common, bench="memory", seqlen=seqlen, n_gpus=comm.Get_size(), causal=True, layout=args.layout,
                transport=None, **{"pass": mode}, tflops_per_gpu=None, window=window and window[0],
                documents=documents or None,
                peak_bytes=measured, estimate_bytes=estimate, ratio=measured / estimate,
                pool_growth_bytes=comm.allreduce(peak.pool_growth, op=MPI.MAX),
                device_growth_bytes=comm.allreduce(peak.device_growth, op=MPI.MAX),
            ))
            docs = f" {documents} documents" if documents else ""
            _say(comm, f"memory S={seqlen}{docs} {mode}: peak {measured / 2**30:.3f} GiB, estimate "
                       f"{estimate / 2**30:.3f} GiB, ratio {measured / estimate:.3f}")
        del arrays
    return rows


def max_context_rows(comm, xp, args, dtype, common) -> list[dict]:
    """Largest tokens per GPU that fit: predicted from the free memory and the estimate,
    then run at that size (must succeed) and at 1.1× (must raise MemoryError)."""
    rows = []
    world_rank = comm.Get_rank()
    for ring in (comm,) if comm.Get_size() == 1 else (comm, MPI.COMM_SELF):
        size = ring.Get_size()
        if ring == MPI.COMM_SELF and world_rank != 0:
            continue
        for mode in ("fwd", "fwd+bwd"):
            seqlen = _predicted_max(ring, xp, args, dtype, mode)
            bigger = (int(seqlen * 1.1) // 4096) * 4096
            error = None
            try:
                fits = _fits(ring, xp, args, dtype, mode, seqlen)
                refused = not _fits(ring, xp, args, dtype, mode, bigger)
            except Exception as exc:  # noqa: BLE001 - one GPU alone (rank 0): record it, keep the other rows
                if size > 1:
                    raise
                fits = refused = None
                error = f"{type(exc).__name__}: {exc}"
            if error:  # after the except block: its traceback held the inputs
                xp.get_default_memory_pool().free_all_blocks()
            rows.append(make_row(
                **common, bench="max_context", seqlen=seqlen, n_gpus=size, causal=True, layout=args.layout,
                transport=None, **{"pass": mode}, tflops_per_gpu=None, total_tokens=seqlen * size, fits=fits,
                larger_seqlen=bigger, larger_refused=refused, window=args.memory_window or 1024, error=error,
            ))
            if error:
                _say(ring, f"max context N={size} {mode}: {seqlen:,} tokens/GPU failed: {error}")
                continue
            _say(ring, f"max context N={size} {mode}: {seqlen:,} tokens/GPU ({seqlen * size:,} total) fits={fits}; "
                       f"{bigger:,} raises MemoryError: {refused}")
    comm.Barrier()
    return rows


def _predicted_max(ring, xp, args, dtype, mode) -> int:
    xp.get_default_memory_pool().free_all_blocks()
    free = ring.allreduce(xp.cuda.runtime.memGetInfo()[0], op=MPI.MIN)
    budget = free - (1 << 30)  # NCCL's and cuBLAS's own buffers, the pool's rounding
    inputs = (2 if mode == "fwd" else 3) * args.heads + 2 * args.heads_kv  # q, k, v (+ dout)

    def need(s):
        return inputs * s * args.head_dim * np.dtype(dtype).itemsize + mpiring.memory_estimate(
            1, s, args.heads, args.heads_kv, args.head_dim, dtype, layout=args.layout, causal=True,
            backward=mode == "fwd+bwd", array="cupy", comm_size=ring.Get_size())

    lo, hi = 4096, 4096
    while need(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 4096:
        mid = (lo + hi) // 2 // 4096 * 4096
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid)
    return lo


def _fits(ring, xp, args, dtype, mode, seqlen) -> bool:
    """Run the windowed call at ``seqlen`` on ``ring``; False if any rank ran out of memory.

    The inputs are agreed on before the ring starts (a rank whose inputs don't fit must
    not leave the others waiting in the ring); the ring agrees on its own buffers.
    """
    arrays, failed = None, 0
    try:
        arrays = _inputs(xp, seqlen, args, dtype, random=False)
    except MemoryError:
        failed = 1
    if ring.allreduce(failed, op=MPI.SUM) == 0:
        try:
            _run(ring, arrays, mode, causal=True, layout=args.layout, window=(args.memory_window or 1024, 0))
            _sync(xp)
        except MemoryError:
            failed = 1
    del arrays
    xp.get_default_memory_pool().free_all_blocks()
    return ring.allreduce(failed, op=MPI.SUM) == 0


def varlen_rows(comm, xp, args, dtype, common) -> list[dict]:
    """Packed documents vs one sequence of the same total length, same backend."""
    size, seqlen = comm.Get_size(), args.varlen
    total = seqlen * size
    count = args.documents or 4 * size
    cu = _documents(total, count)
    if args.pack:  # the same documents, in the order that evens out contiguous ranks' work
        cu = mpiring.layout.pack_documents(np.diff(cu), size)[1]
    fixed_layout = args.fixed_layout or args.layout
    useful = float((np.diff(cu).astype(float) ** 2).sum()) / total**2
    balance = step_balance(args.layout, size, seqlen, cu)
    work = mpiring.layout.rank_work(cu, size) if args.layout == "contiguous" else None
    rank_balance = None if work is None else float(work.max() / work.mean())
    ring_transport = None if size == 1 else chosen_transport(_kind(xp), comm)
    arrays = _inputs(xp, seqlen, args, dtype)
    backend = type(backend_for(xp, dtype=np.dtype(dtype), head_dim=args.head_dim,
                               mask=mpiring.layout.make_mask(True, None, cu), seqlen_global=total)).__name__
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        flops = attention_flops(1, total, total, args.heads, args.head_dim, causal=True, mode=mode) / size

        def call(mode=mode, layout=args.layout, **options):
            return lambda: _run(comm, arrays, mode, causal=True, layout=layout,
                                deterministic=args.dq == "deterministic", **options)

        # Throughput (the measure): calls back to back, the steady rate and the rate
        # from an idle GPU (_throughput); fixed and varlen in turns, 3 times each (median),
        # after a heating phase, so that both run at the clocks of a GPU at its power cap.
        # Latency: the median of 3 single synchronised calls (host work before the first
        # kernel included).
        fns = {"fixed": call(layout=fixed_layout), "varlen": call(cu_seqlens=cu)}
        heat(list(fns.values()), 2.0, sync=lambda: _sync(xp), agree=lambda n: comm.allreduce(n, op=MPI.MAX))
        rates = {name: [] for name in fns}
        for r in range(3):
            for name in (("fixed", "varlen") if r % 2 == 0 else ("varlen", "fixed")):
                rates[name].append(_throughput(comm, xp, fns[name]))
        (fixed, fixed_idle), (varlen, varlen_idle) = (
            [sorted(t[i] for t in rates[name])[1] for i in (0, 1)] for name in ("fixed", "varlen"))
        fixed_lat, varlen_lat = (_timed(comm, xp, call(**o), repeat=3)
                                 for o in ({"layout": fixed_layout}, {"cu_seqlens": cu}))
        host = _timed(comm, xp, fns["varlen"], repeat=3, until_done=False, warmup=False)
        fixed_tf, varlen_tf = flops / fixed / 1e12, useful * flops / varlen / 1e12
        ratio_idle = useful * fixed_idle / varlen_idle
        rows.append(make_row(
            **common, bench="varlen", seqlen=seqlen, n_gpus=size, causal=True, layout=args.layout, transport=None,
            **{"pass": mode}, tflops_per_gpu=varlen_tf, fixed_tflops_per_gpu=fixed_tf, ratio=varlen_tf / fixed_tf,
            documents=count, useful_fraction=useful, time_s=varlen, fixed_time_s=fixed, timing="steady",
            time_from_idle_s=varlen_idle, fixed_time_from_idle_s=fixed_idle, ratio_from_idle=ratio_idle,
            latency_s=varlen_lat, fixed_latency_s=fixed_lat, latency_ratio=useful * fixed_lat / varlen_lat,
            varlen_backend=backend, balance=balance, dq=args.dq, ring_transport=ring_transport,
            fixed_layout=fixed_layout, packed=bool(args.pack), rank_balance=rank_balance, host_s=host,
        ))
        _say(comm, f"varlen S={seqlen}/rank {count} docs {mode}: {varlen_tf:.2f} vs fixed {fixed_tf:.2f} TF/s "
                   f"per GPU (useful work, calls back to back), ratio {varlen_tf / fixed_tf:.3f}; backend {backend}; "
                   f"{varlen * 1e3:.2f} vs {fixed * 1e3:.2f} ms per call, useful fraction {useful:.4f}; "
                   f"from an idle GPU: ratio {ratio_idle:.3f} ({varlen_idle * 1e3:.2f} vs {fixed_idle * 1e3:.2f} ms); "
                   f"single synchronised calls: {varlen_lat * 1e3:.2f} vs {fixed_lat * 1e3:.2f} ms, "
                   f"ratio {useful * fixed_lat / varlen_lat:.3f}; step balance ({args.layout}) {balance:.3f}"
                   + ("" if rank_balance is None else f", rank work max/mean {rank_balance:.3f}")
                   + f"; fixed layout {fixed_layout}" + (", documents packed" if args.pack else "")
                   + f"; host time per varlen call {host * 1e3:.2f} ms")
    return rows


def step_balance(layout: str, size: int, seqlen: int, cu: np.ndarray) -> float:
    """How the ring spreads causal attention over documents ``cu`` (host count, exact):
    Σ over ring steps of the busiest rank's query–key pairs, over the mean rank's pairs
    over all steps. 1 is perfect balance; since each ring step waits for its K/V block,
    the ring takes about this factor of the balanced time (``varlen`` rows' ``balance``)."""
    total = seqlen * size
    doc = np.searchsorted(cu, np.arange(total), side="right") - 1
    pos = [mpiring.layout.positions(layout, r, size, seqlen) for r in range(size)]
    work = np.zeros((size, size))
    for r in range(size):
        qd = doc[pos[r]]
        for s in range(size):
            kp = pos[(r - s) % size]
            kd = doc[kp]
            for d in np.unique(qd):
                keys = np.sort(kp[kd == d])
                work[r, s] += np.searchsorted(keys, pos[r][qd == d], side="right").sum()
    return float(work.max(axis=0).sum() / work.sum(axis=1).mean())


def _documents(total: int, count: int) -> np.ndarray:
    """``cu_seqlens`` of ``count`` random documents over ``total`` tokens (fixed seed)."""
    rng = np.random.default_rng(0)
    return np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), size=count - 1, replace=False)), [total]])


class _HostTimed(Transport):
    """Host timestamps of each exchange of an inner transport (NumPy ring)."""

    def __init__(self, inner):
        super().__init__(inner.comm)
        self.inner, self.name, self.steps = inner, inner.name, []

    def _post(self, send, recv, *, tag, **options):
        ex = self.inner.post(send, recv, tag=tag, **options)
        ex.stamps = [tag, time.perf_counter()]
        return ex

    def _wait(self, ex, deadline):
        begin = time.perf_counter()
        self.inner.wait(ex, None if deadline is None else max(deadline - time.monotonic(), 0.0))
        tag, posted = ex.stamps
        self.steps.append({"tag": tag, "compute_s": begin - posted, "comm_s": time.perf_counter() - posted})


def timeline_rows(comm, xp, args, dtype, common) -> list[dict]:
    from mpiring.transport import select_transport

    seqlen, size = args.timeline, comm.Get_size()
    arrays = _inputs(xp, seqlen, args, dtype)
    cu = None
    if args.documents:  # packed documents (as the varlen rows have them); every rank's steps differ
        cu = _documents(seqlen * size, args.documents)
        if args.pack:
            cu = mpiring.layout.pack_documents(np.diff(cu), size)[1]
    options = {} if cu is None else {"cu_seqlens": cu}
    names = ["mpi-host"] if xp is np else [t for t in args.transports.split(",") if t]
    rows = []
    for name in names:
        tr = select_transport(name, comm.Dup(), xp)
        if xp is np:
            tr = _HostTimed(tr)
        run = lambda tr=tr: _run(comm, arrays, "fwd+bwd", causal=True, layout=args.layout,  # noqa: E731
                                 transport=tr, **options)
        if xp is np:
            run()
            tr.steps.clear()
            run()
            steps = tr.steps
        else:
            run()
            tr.start_timing()
            run()
            steps = tr.step_times()
        # the slowest rank's steps (rank 0's order: all ranks run the same schedule length)
        per_rank = comm.allgather(steps)
        slowest = max(per_rank, key=lambda s: sum(x["compute_s"] + x["comm_s"] for x in s))
        def table(steps):
            return [{"kind": "kv" if s["tag"] == _TAG_KV else "dkv", "compute_ms": 1e3 * s["compute_s"],
                     "comm_ms": 1e3 * s["comm_s"], "wait_ms": 1e3 * max(s["comm_s"] - s["compute_s"], 0.0)}
                    for s in steps]

        timeline = table(slowest)
        extra = {} if cu is None else {"documents": args.documents, "packed": bool(args.pack),
                                       "steps_per_rank": [table(steps) for steps in per_rank]}
        rows.append(make_row(
            **common, bench="timeline", seqlen=seqlen, n_gpus=size, causal=True, layout=args.layout, transport=name,
            **{"pass": "fwd+bwd"}, tflops_per_gpu=None, steps=timeline, **extra,
        ))
        for r, steps in enumerate([slowest] if cu is None else per_rank):
            _say(comm, f"timeline {name}{'' if cu is None else f' rank {r}'}: "
                       + ", ".join(f"{s['kind']} {s['compute_ms']:.2f}/{s['comm_ms']:.2f} ms" for s in table(steps)))
    return rows


def _kind(xp) -> str:
    return "numpy" if xp is np else "cupy"


def _say(comm, text: str) -> None:
    if comm.Get_rank() == 0:
        print(text, flush=True)


def run(args) -> int:
    comm = MPI.COMM_WORLD
    xp = run_array_module(args.cpu)
    dtype = np.dtype(getattr(np, DTYPES[args.dtype], None) or _bfloat16())
    if xp is np:
        card = f"CPU ({os.cpu_count()} cores)"
    else:
        from mpiring.bench.common import card_name

        card = card_name()
    common = dict(card=card, date=today(), command=f"mpiexec -n {comm.Get_size()} {command_line()}", dtype=args.dtype,
                  heads=args.heads, heads_kv=args.heads_kv, head_dim=args.head_dim, array=_kind(xp))
    name = card.split(" (")[0].replace(" ", "_")
    path = args.out or os.path.join("bench", "results", f"longctx-{name}-{today()}.json")
    # Most telling first; the rows are rewritten after each part, so a job cut short keeps them.
    parts = [
        (args.memory, lambda: memory_rows(comm, xp, args, dtype, common, args.memory)),
        (args.max_context and xp is not np, lambda: max_context_rows(comm, xp, args, dtype, common)),
        (args.varlen, lambda: varlen_rows(comm, xp, args, dtype, common)),
        (args.timeline, lambda: timeline_rows(comm, xp, args, dtype, common)),
        (args.memory_varlen, lambda: memory_rows(comm, xp, args, dtype, common, args.memory_varlen,
                                                 args.documents or 16 * comm.Get_size())),
    ]
    rows = []
    for wanted, part in parts:
        if wanted:
            rows += part()
            if comm.Get_rank() == 0:
                write_rows(path, rows)
    if comm.Get_rank() == 0:
        print(f"wrote {len(rows)} rows to {path}")
        if args.plot:
            from mpiring.bench.plots import plot_rows

            for png in plot_rows(rows, args.plot):
                print(f"wrote {png}")
    return 0


def _bfloat16():
    from ml_dtypes import bfloat16

    return bfloat16

