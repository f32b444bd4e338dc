"""``python -m mpiring.bench ring``: the ring on N GPUs, per-GPU TF/s per transport, beside torch context parallel.

Run with one rank per GPU (``mpiexec -n 4 python -m mpiring.bench ring``). For each N of
``--n-gpus`` (at most the number of ranks) the first N ranks form a communicator and, at
a fixed number of tokens per GPU, for each case (layout × causal) and transport:

1. check a small problem against the float64 oracle (out, dq, dk, dv) over that
   transport; a transport that fails is not timed;
2. time forward and forward+backward (CUDA events, median of ``--iters`` after
   ``--warmup`` and a heating phase; the slowest rank's time), and the same ring with a
   transport that moves nothing — the kernels' work at the same local size with no
   communication — in turns with the transports, so that all see the same (power-capped)
   clocks; ``efficiency = TF/s(ring) / TF/s(compute only)``;
3. record, per exchange, the compute stream's time between post and wait and the
   transfer's time (:meth:`mpiring.transport.gpu.GpuTransport.step_times`).

Where torch is installed, torch context parallel (ring rotation over NCCL, SDPA FLASH)
runs in the same job at N = all ranks on the same sizes, as ``peer``. TF/s counts
4·B·H·S²·D for the global S (half for causal), ×3.5 for forward+backward, divided by N.
"""

from __future__ import annotations

import os
import socket
import statistics

import numpy as np
from mpi4py import MPI

from mpiring.bench.common import (
    attention_flops,
    card_name,
    command_line,
    make_row,
    time_cuda_interleaved,
    today,
    write_rows,
)
from mpiring.transport.base import Exchange, Transport

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_CHECK_TOKENS = 256  # per GPU, for the oracle check (float64 on the host)
_CHECK_TOL = {"bf16": 3e-2, "fp16": 5e-3}  # ~4× the error of a dense same-precision run


def add_arguments(p) -> None:
    p.add_argument("--seqlens", default="16384,32768", help="tokens per GPU")
    p.add_argument("--n-gpus", default="1,2,4", help="ring sizes (those above the number of ranks are skipped)")
    p.add_argument("--transports", default="mpi-cuda,nccl,mpi-staged",
                   help="GPU transports to time; those that can't run here are skipped")
    p.add_argument("--cases", default="zigzag:1,contiguous:0", help="layout:causal pairs")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stream", default="non-blocking", choices=("non-blocking", "legacy"),
                   help="the stream the ring computes on: a non-blocking one (default), or CUDA's legacy "
                        "default stream (CuPy's default), which serialises with Open MPI's CUDA IPC copies")
    p.add_argument("--no-peers", action="store_true", help="skip torch context parallel even if installed")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/ring-<card>-<date>.json)")
    p.add_argument("--plot", default=None, metavar="DIR", help="also write the figures (mpiring.bench.plots) into DIR")


class ComputeOnly(Transport):
    """A transport that moves nothing: the ring's kernels alone, for the efficiency baseline.

    Run the ring through :meth:`around`: the buffers that K/V blocks arrive in then hold
    this rank's own block (copied in once, outside the timed calls), like the blocks a
    transport brings. Kernel time depends on the values: the forward skips rescaling once
    the row maxima settle, and values decide the power drawn under the power cap. With
    whatever the memory pool handed out (before the twelfth session) the baseline's
    kernels ran on garbage, faster than on real blocks (``bench/ring_probe.py``), which
    read as a loss of ring efficiency.
    """

    name = "compute-only"

    def __init__(self, comm):
        super().__init__(comm)
        self._blocks: dict = {}

    def _post(self, send, recv, **_) -> Exchange:
        return Exchange()

    def _wait(self, exchange: Exchange, deadline) -> None:
        pass

    def around(self, fn):
        """``fn`` (one or more ring calls over this transport), run with the CUDA backend's
        arrival buffers filled: at most two per call, kept here and reused in turns."""
        from mpiring.backends.cupy_ import CudaKernelBackend

        real, count = CudaKernelBackend.kv_buffer, [0]

        def kv_buffer(backend, kv, zero=False):
            key = (tuple(kv[0].shape), str(kv[0].dtype), count[0] % 2)
            count[0] += 1
            if key not in self._blocks:
                block = real(backend, kv, zero)
                block[0][...] = kv[0]
                block[1][...] = kv[1]
                self._blocks[key] = block
            return self._blocks[key]

        def run():
            CudaKernelBackend.kv_buffer = kv_buffer
            try:
                return fn()
            finally:
                CudaKernelBackend.kv_buffer = real

        return run


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _cases(text: str) -> list[tuple[str, bool]]:
    cases = []
    for item in text.split(","):
        layout, _, causal = item.partition(":")
        cases.append((layout, causal in ("1", "true", "True")))
    return cases


def _np_dtype(name: str):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bf16" else np.dtype(np.float16)


def _max(comm, x: float) -> float:
    return comm.allreduce(x, op=MPI.MAX)


# --- correctness first --------------------------------------------------------------------
def _check(comm, transport, layout: str, causal: bool, args) -> float:
    """Worst relative error of out/dq/dk/dv against the float64 oracle (all ranks)."""
    import cupy

    import mpiring

    n = comm.Get_size()
    rng = np.random.default_rng(1234)
    heads, heads_kv = 4, max(1, 4 * args.heads_kv // args.heads)
    shape_q, shape_kv = (1, _CHECK_TOKENS * n, heads, args.head_dim), (1, _CHECK_TOKENS * n, heads_kv, args.head_dim)
    q, k, v, do = (rng.standard_normal(s).astype(_np_dtype(args.dtype)) for s in (shape_q, shape_kv, shape_kv, shape_q))
    sh = lambda x: mpiring.shard(x, comm, layout=layout, axis=1)  # noqa: E731
    dev = lambda x: cupy.asarray(sh(x))  # noqa: E731
    opts = dict(causal=causal, layout=layout, transport=transport)
    out, lse = mpiring.ring_attention(dev(q), dev(k), dev(v), comm, **opts)
    grads = mpiring.ring_attention_backward(dev(do), dev(q), dev(k), dev(v), out, lse, comm, **opts)
    refs = [mpiring.attention_reference(q, k, v, causal=causal)[0],
            *mpiring.attention_reference_backward(do, q, k, v, causal=causal)]
    worst = 0.0
    for x, ref in zip((out, *grads), refs):
        x, ref = x.get().astype(np.float64), sh(ref)
        err = np.linalg.norm(x - ref) / np.linalg.norm(ref) if np.all(np.isfinite(x)) else float("inf")
        worst = max(worst, float(err))
    return _max(comm, worst)


# --- timing ---------------------------------------------------------------------------------
def _inputs(args, seqlen: int):
    import cupy

    dtype = _np_dtype(args.dtype)
    b, h, hkv, d = args.batch, args.heads, args.heads_kv, args.head_dim
    make = lambda heads: cupy.random.standard_normal((b, seqlen, heads, d), dtype=np.float32).astype(dtype)  # noqa: E731
    return make(h), make(hkv), make(hkv), make(h)


def _runner(comm, inputs, layout: str, causal: bool, transport, mode: str):
    """A function that runs one forward (and backward) pass of the ring."""
    import mpiring

    q, k, v, do = inputs
    opts = dict(causal=causal, layout=layout, transport=transport)
    if mode == "fwd":
        return lambda: mpiring.ring_attention(q, k, v, comm, **opts)

    def fwd_bwd():
        out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
        mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, **opts)

    return fwd_bwd


def _step_times(comm, transport_obj, fn) -> dict:
    """Median per-exchange compute and transfer times (ms) of one run, slowest rank."""
    from mpiring.api import _TAG_DKV, _TAG_KV

    transport_obj.start_timing()
    fn()
    rows = transport_obj.step_times()
    result = {}
    for tag, label in ((_TAG_KV, "kv"), (_TAG_DKV, "dkv")):
        mine = [r for r in rows if r["tag"] == tag]
        if mine:
            result[f"step_compute_ms_{label}"] = 1e3 * _max(comm, statistics.median(r["compute_s"] for r in mine))
            result[f"step_comm_ms_{label}"] = 1e3 * _max(comm, statistics.median(r["comm_s"] for r in mine))
    return result


def _usable(comm, name: str) -> tuple[object | None, str]:
    """The cached transport object for ``name`` on ``comm``, or None and why not."""
    from mpiring.api import private_comm
    from mpiring.transport.gpu import select_gpu_transport

    try:
        return select_gpu_transport(name, private_comm(comm)), ""
    except RuntimeError as exc:  # raised on every rank alike (agreed inside)
        return None, str(exc)


# --- torch context parallel -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torch_case(torch, comm, mesh, seqlen_global: int, causal: bool, passes, args) -> dict:
    """{pass: seconds} of torch SDPA (FLASH) under context_parallel on ``mesh``."""
    import torch.distributed.tensor.experimental._attention as cp_attention
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (args.batch, args.heads, seqlen_global, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, DTYPES[args.dtype])) for _ in range(3))
    # torch 2.11 pitfalls: load balancing only works causal; buffers handed to
    # context_parallel must not require grad (it shards them in place).
    cp_attention._cp_options.enable_load_balance = causal
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        grad = torch.randn_like(attend())
        fns = {"fwd": attend, "fwd+bwd": lambda: torch.autograd.grad(attend(), (q, k, v), grad)}
        # heated and in turns, as our ring's timings (time_cuda_interleaved)
        times = time_cuda_interleaved({mode: fns[mode] for mode in passes}, warmup=args.warmup, iters=args.iters,
                                      before=comm.Barrier, agree=lambda x: comm.allreduce(x, op=MPI.MAX))
        times = {mode: _max(comm, t) for mode, t in times.items()}
    return times


def _torch_context_parallel(comm, device: int, args, seqlens, cases, passes) -> tuple[dict, str]:
    """{(seqlen, causal, pass): TF/s per GPU} of torch context parallel (ring rotation,
    SDPA FLASH) on all ranks of ``comm``; and a note (empty, or why it did not run)."""
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError as exc:
        return {}, f"torch context parallel unavailable: {exc}"
    if args.heads_kv != args.heads:
        return {}, "torch context parallel: GQA not compared (heads_kv != heads)"
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    rank, n = comm.Get_rank(), comm.Get_size()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(comm.bcast(_free_port() if rank == 0 else None, root=0))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=n, device_id=torch.device("cuda", device))
    results = {}
    try:
        mesh = init_device_mesh("cuda", (n,))
        set_rotate_method("alltoall")  # the ring: K/V shards rotate between neighbours
        for seqlen in seqlens:
            for causal in sorted({c for _, c in cases}):
                for mode, t in _torch_case(torch, comm, mesh, seqlen * n, causal, passes, args).items():
                    flops = attention_flops(args.batch, seqlen * n, seqlen * n, args.heads, args.head_dim,
                                            causal=causal, mode=mode)
                    results[(seqlen, causal, mode)] = flops / n / t / 1e12
                torch.cuda.empty_cache()
    except Exception as exc:  # a peer that fails must not lose our own rows
        return results, f"torch context parallel failed: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        dist.destroy_process_group()
    return results, ""


# --- the command --------------------------------------------------------------------------
def run(args) -> int:
    import cupy

    from mpiring.transport import chosen_transport
    from mpiring.transport.gpu import mpi_cuda_support, select_device

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    device = select_device(world)
    card = card_name()
    seqlens, cases = _ints(args.seqlens), _cases(args.cases)
    passes = [p for p in args.passes.split(",") if p]
    n_gpus = [n for n in _ints(args.n_gpus) if n <= size]
    transports = [t for t in args.transports.split(",") if t]
    mpi_library = MPI.Get_library_version().splitlines()[0].strip().rstrip("\x00")
    auto = chosen_transport("cupy", world)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"ring bench: {size} ranks, card {card}, MPI {mpi_library}; CUDA-aware: {mpi_cuda_support()}; "
        f"auto -> {auto}", flush=True)
    common = dict(bench="ring", card=card, date=today(), command=f"mpiexec -n {size} {command_line()}",
                  dtype=args.dtype, heads=args.heads, heads_kv=args.heads_kv, head_dim=args.head_dim,
                  batch=args.batch, mpi=mpi_library, auto_transport=auto, stream=args.stream)
    rows, notes = [], []
    # On CUDA's legacy default stream, mpi-cuda's transfers took the step's compute time
    # plus the copy (4xH200, 2026-11-26): they did not overlap, consistent with Open MPI
    # running its CUDA IPC copies on a blocking stream, which waits for legacy-stream kernels.
    stream = cupy.cuda.Stream(non_blocking=True) if args.stream == "non-blocking" else cupy.cuda.Stream.null
    with stream:
        for n in n_gpus:
            sub = world.Split(0 if rank < n else MPI.UNDEFINED, rank)
            if sub != MPI.COMM_NULL:
                rows += _ring_rows(sub, n, seqlens, cases, passes, transports, args, common, notes)
                sub.Free()
            world.Barrier()
    peers, note = {}, ""
    if not args.no_peers:
        peers, note = _torch_context_parallel(world, device, args, seqlens, cases, passes)
        if note:
            notes.append(note)
    for row in rows:
        tf = peers.get((row["seqlen"], row["causal"], row["pass"])) if row["n_gpus"] == size else None
        if tf is not None:
            row.update(peer="torch-cp-flash", peer_tflops_per_gpu=tf, vs_peer=row["tflops_per_gpu"] / tf)
    if rank == 0:
        path = args.out or os.path.join("bench", "results", f"ring-{card.replace(' ', '_')}-{today()}.json")
        write_rows(path, rows)
        _print_table(rows, notes, path)
        if args.plot:
            from mpiring.bench.plots import plot_rows

            print("\n".join(f"wrote {png}" for png in plot_rows(rows, args.plot)))
    return 0


def _ring_rows(comm, n, seqlens, cases, passes, transports, args, common, notes) -> list[dict]:
    say = print if comm.Get_rank() == 0 else (lambda *a, **k: None)
    rows = []
    usable = {}
    if n > 1:
        for name in transports:
            tr, why = _usable(comm, name)
            if tr is None:
                notes.append(f"n={n}: {name} skipped: {why}")
            else:
                usable[name] = tr
    for layout, causal in cases:
        checked = {}
        for name in usable:
            err = _check(comm, name, layout, causal, args)
            checked[name] = err
            if not err <= _CHECK_TOL[args.dtype]:
                notes.append(f"n={n} {layout} causal={causal}: {name} FAILED the oracle check (rel err {err:.2e})")
        for seqlen in seqlens:
            inputs = _inputs(args, seqlen)
            s = seqlen * n
            for mode in passes:
                flops = attention_flops(args.batch, s, s, args.heads, args.head_dim, causal=causal, mode=mode) / n
                base = dict(common, seqlen=seqlen, n_gpus=n, causal=causal, layout=layout, **{"pass": mode})
                # The compute-only baseline and every transport timed in turns after a heating
                # phase (time_cuda_interleaved): timed first, the baseline ran at the clocks of a
                # GPU not yet at its power cap, which read as a loss of ring efficiency.
                ok = [name for name in usable if checked[name] <= _CHECK_TOL[args.dtype]]
                baseline = ComputeOnly(comm)
                fns = {None: baseline.around(_runner(comm, inputs, layout, causal, baseline, mode))}
                fns.update({name: _runner(comm, inputs, layout, causal, name, mode) for name in ok})
                times = time_cuda_interleaved(fns, warmup=args.warmup, iters=args.iters, before=comm.Barrier,
                                              agree=lambda x: comm.allreduce(x, op=MPI.MAX))
                times = {name: _max(comm, t) for name, t in times.items()}
                t_compute = times[None]
                compute_tf = flops / t_compute / 1e12
                if n == 1:
                    rows.append(make_row(**base, transport=None, tflops_per_gpu=compute_tf, time_ms=1e3 * t_compute,
                                         efficiency=1.0, compute_only_tflops_per_gpu=compute_tf))
                    say(f"n=1 S={seqlen} {layout} causal={causal} {mode}: {compute_tf:.1f} TF/s", flush=True)
                for name in ok:
                    tr, fn, t = usable[name], fns[name], times[name]
                    tf = flops / t / 1e12
                    row = make_row(**base, transport=name, tflops_per_gpu=tf, time_ms=1e3 * t,
                                   efficiency=tf / compute_tf, compute_only_tflops_per_gpu=compute_tf,
                                   check_rel_err=checked[name])
                    lean_before = getattr(tr, "lean_hops", 0)
                    row.update(_step_times(comm, tr, fn))
                    if name == "nccl":  # NCCL_MAX_NCHANNELS while the communicator was made (None: NCCL's choice)
                        row["nccl_channels"] = getattr(tr, "channels", None)
                        # the lean communicator's channels (None: none), and whether that call used it
                        row["nccl_lean_channels"] = getattr(tr, "lean_channels", None)
                        row["background"] = _max(comm, tr.lean_hops - lean_before) > 0
                    rows.append(row)
                    say(f"n={n} S={seqlen} {layout} causal={causal} {mode} {name}: {tf:.1f} TF/s/GPU, "
                        f"efficiency {tf / compute_tf:.3f}", flush=True)
            del inputs
    return rows


def _print_table(rows, notes, path) -> None:
    print(f"\nwrote {len(rows)} rows to {path}")
    for note in notes:
        print("note:", note)
    head = ("N", "S/GPU", "layout", "causal", "pass", "transport", "TF/s/GPU", "eff", "step compute ms",
            "step comm ms", "torch-CP TF/s", "vs CP")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        step = r.get("step_compute_ms_kv")
        comm = r.get("step_comm_ms_kv")
        if "step_compute_ms_dkv" in r:
            step = f"{step:.2f} / dkv {r['step_compute_ms_dkv']:.2f}"
            comm = f"{comm:.2f} / dkv {r['step_comm_ms_dkv']:.2f}"
        cells = (r["n_gpus"], r["seqlen"], r["layout"], int(r["causal"]), r["pass"], r["transport"] or "-",
                 f"{r['tflops_per_gpu']:.1f}", f"{r['efficiency']:.3f}",
                 step if isinstance(step, str) else ("-" if step is None else f"{step:.2f}"),
                 comm if isinstance(comm, str) else ("-" if comm is None else f"{comm:.2f}"),
                 f"{r['peer_tflops_per_gpu']:.1f}" if "peer_tflops_per_gpu" in r else "-",
                 f"{r['vs_peer']:.2f}" if "vs_peer" in r else "-")
        print("| " + " | ".join(str(c) for c in cells) + " |")
