"""Where a packed-documents call spends its time on one GPU: host vs device.

For fixed length and for 1, 8 and 64 random documents over the same tokens (causal,
fp16, 8 heads, head_dim 128), times the forward and forward+backward calls: wall time
(synchronised), the attention kernels' own device time (CUDA events around each launch
of ``CudaKernelBackend``), the host validation/planning (``api._prepare``) alone; and
prints the top host functions (cProfile, by own time) of one fwd+bwd call with the most
documents.

    python3 bench/varlen_probe.py [--tokens 65536] [--documents 1,8,64] [--out FILE] [--trace]

``--trace`` (needs torch, for its CUDA profiler): every GPU kernel of ``--trace-calls``
forward+backward calls back to back, per kernel name, device ms per call, beside the
back-to-back time per call: what the calls spend besides attention (zero fills, casts,
delta), which fixed length and documents pay alike over the same tokens.

Wall time well above kernel time: the call is host-bound or spends it outside the
kernels. Kernel time over (useful fraction × fixed-length kernel time) well above 1: the
kernels waste work on documents (the atomic-dQ column: without the deterministic
order's waits).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shlex
import sys
import time

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring import api
from mpiring.bench.common import (
    attention_flops,
    card_name,
    kernel_launch_events,
    kernel_ms,
    make_row,
    today,
    write_rows,
)
from mpiring.bench.longctx import _bfloat16, _documents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--documents", default="1,8,64")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--layout", default="contiguous", help="of the one rank (zigzag: two segments)")
    p.add_argument("--out", default="")
    p.add_argument("--trace", action="store_true", help="per-kernel device time of fwd+bwd calls (torch.profiler)")
    p.add_argument("--trace-calls", type=int, default=5)
    args = p.parse_args()

    with kernel_launch_events() as events:
        _run(args, events)


def _run(args, events) -> None:
    """The probe itself; ``events``: the kernel launches (:func:`kernel_launch_events`)."""
    import cupy

    def measure(fn, repeat=5):
        """Median wall ms and median summed kernel ms of ``fn`` (after one warm-up)."""
        fn()
        walls, kernels = [], []
        for _ in range(repeat):
            cupy.cuda.get_current_stream().synchronize()
            events.clear()
            t = time.perf_counter()
            fn()
            cupy.cuda.get_current_stream().synchronize()
            walls.append(time.perf_counter() - t)
            kernels.append(kernel_ms(events) / 1e3)
        return float(np.median(walls)) * 1e3, float(np.median(kernels)) * 1e3

    rng = cupy.random.default_rng(0)
    shape = (1, args.tokens, args.heads, 128)
    dtype = cupy.float16 if args.dtype == "float16" else _bfloat16()
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4))
    comm = MPI.COMM_WORLD
    rows = []
    counts = [0] + [int(c) for c in args.documents.split(",") if c]
    for count in counts:
        cu = _documents(args.tokens, count) if count else None
        useful = 1.0 if cu is None else float((np.diff(cu).astype(float) ** 2).sum()) / args.tokens**2
        options = dict(causal=True, layout=args.layout, cu_seqlens=cu)
        out, lse = mpiring.ring_attention(q, k, v, comm, **options)

        def fwd(options=options):
            mpiring.ring_attention(q, k, v, comm, **options)

        def fwd_bwd(options=options, out=out, lse=lse):
            mpiring.ring_attention(q, k, v, comm, **options)
            mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **options)

        def fwd_bwd_atomic(options=options, out=out, lse=lse):
            mpiring.ring_attention(q, k, v, comm, **options)
            mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, deterministic=False, **options)

        row = {"documents": count, "useful_fraction": useful}
        for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("fwd+bwd_atomic", fwd_bwd_atomic)):
            row[f"{name}_wall_ms"], row[f"{name}_kernel_ms"] = measure(fn)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            api._prepare("probe", comm, {"q": q, "k": k, "v": v}, causal=True, softmax_scale=None,
                         layout=args.layout, window=None, cu_seqlens=cu, transport="auto")
            ts.append(time.perf_counter() - t)
        row["prepare_ms"] = float(np.median(ts)) * 1e3
        if args.trace:
            row["trace"] = trace(fwd_bwd, args.trace_calls, sync=cupy.cuda.get_current_stream().synchronize)
            print(f"--- {count or 'fixed length'}: fwd+bwd calls back to back, device ms per call by kernel")
            print(f"back to back {row['trace']['back_to_back_ms']:.3f} ms per call, kernels "
                  f"{sum(row['trace']['kernels_ms'].values()):.3f} ms")
            for name, ms in sorted(row["trace"]["kernels_ms"].items(), key=lambda x: -x[1]):
                print(f"  {ms:8.3f}  {name[:110]}")
            print(f"device idle between activities {row['trace']['idle_ms']:.3f} ms per call; largest gaps:")
            for g in row["trace"]["largest_gaps"]:
                print(f"  {g['ms']:8.3f}  after {g['after']}, before {g['before']}")
        rows.append(row)
        if count == counts[-1] and count:
            prof = cProfile.Profile()
            prof.enable()
            fwd_bwd()
            cupy.cuda.get_current_stream().synchronize()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
            print(f"--- cProfile, one fwd+bwd call, {count} documents (by own time)")
            print(s.getvalue())

    fixed = rows[0]
    print("| documents | useful | fwd wall ms | fwd kernel ms | fwd+bwd wall ms | fwd+bwd kernel ms | prepare ms | "
          "fwd kernel / (useful·fixed) | fwd+bwd kernel / (useful·fixed) | same, atomic dQ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        waste = [r[f"{m}_kernel_ms"] / (r["useful_fraction"] * fixed[f"{m}_kernel_ms"])
                 for m in ("fwd", "fwd+bwd", "fwd+bwd_atomic")]
        print(f"| {r['documents'] or 'fixed'} | {r['useful_fraction']:.4f} | {r['fwd_wall_ms']:.2f} | "
              f"{r['fwd_kernel_ms']:.2f} | {r['fwd+bwd_wall_ms']:.2f} | {r['fwd+bwd_kernel_ms']:.2f} | "
              f"{r['prepare_ms']:.2f} | {waste[0]:.2f} | {waste[1]:.2f} | {waste[2]:.2f} |")
    if args.out:
        meta = {"card": card_name(), "date": today(), "command": "python3 " + shlex.join(sys.argv),
                "tokens": args.tokens, "heads": args.heads, "dtype": args.dtype, "layout": args.layout}
        write_rows(args.out, result_rows(meta, rows))


def trace(fn, calls: int, *, sync) -> dict:
    """Device ms per call of every GPU kernel that ``calls`` back-to-back calls of ``fn`` ran
    (torch.profiler's CUDA activity: CuPy's kernels and copies included), by name, and the
    back-to-back wall time per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall = time.perf_counter() - t
    kernels = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0:
            kernels[e.key] = us / 1e3 / calls
    # The device's idle time between one activity's end and the next start (µs stamps),
    # and the largest such gaps with the activities around them.
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if str(getattr(e, "device_type", "")).endswith("CUDA"))
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, before, name))
        if end is None or stop > end:
            end, before = stop, name
    gaps.sort(reverse=True)
    return {"calls": calls, "back_to_back_ms": wall * 1e3 / calls, "kernels_ms": kernels,
            "idle_ms": sum(g for g, _, _ in gaps) / 1e3 / calls,
            "largest_gaps": [{"ms": g / 1e3, "after": a[:80], "before": b[:80]} for g, a, b in gaps[:6]]}


def result_rows(meta: dict, probe_rows: list[dict]) -> list[dict]:
    """The bench/results rows of one probe: per document count and pass (fwd, fwd+bwd,
    fwd+bwd with atomic dQ), useful TF/s over wall time and over kernel time, the times,
    and the kernel time against the useful fraction of fixed length's (``kernel_waste``)."""
    fixed = next(r for r in probe_rows if r["documents"] == 0)
    out = []
    for r in probe_rows:
        for name in ("fwd", "fwd+bwd", "fwd+bwd_atomic"):
            if f"{name}_kernel_ms" not in r:
                continue
            mode = name.split("_")[0]
            flops = r["useful_fraction"] * attention_flops(1, meta["tokens"], meta["tokens"], meta["heads"], 128,
                                                           causal=True, mode=mode)
            out.append(make_row(
                bench="varlen-probe", card=meta["card"], date=meta["date"], command=meta["command"],
                dtype=meta.get("dtype", "float16"),
                heads=meta["heads"], heads_kv=meta["heads"], head_dim=128, seqlen=meta["tokens"], n_gpus=1,
                causal=True, layout=meta.get("layout", "contiguous"), transport=None, **{"pass": mode},
                dq="atomic" if name.endswith("atomic") else "deterministic", documents=r["documents"],
                useful_fraction=r["useful_fraction"], tflops_per_gpu=flops / r[f"{name}_wall_ms"] / 1e9,
                kernel_tflops_per_gpu=flops / r[f"{name}_kernel_ms"] / 1e9, wall_ms=r.get(f"{name}_wall_ms"),
                kernel_ms=r[f"{name}_kernel_ms"], prepare_ms=r["prepare_ms"],
                kernel_waste=r[f"{name}_kernel_ms"] / (r["useful_fraction"] * fixed[f"{name}_kernel_ms"]),
                **({"trace": r["trace"]} if name == "fwd+bwd" and "trace" in r else {}),
                **{k: meta[k] for k in ("code", "job") if k in meta},
            ))
    return out


if __name__ == "__main__":
    main()
