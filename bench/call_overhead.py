"""Host time against GPU time of one-GPU ring_attention calls (fixed length and 8/64
random documents, 65k tokens, 8 heads, head dim 128, bf16, causal, zigzag), per call:
cupyx.profiler.benchmark's CPU and GPU times (each call synchronised), the host time of
10 calls issued without synchronising, their rate back to back, and the attention
kernels' own time (CUDA events around their launches).

    python3 bench/call_overhead.py [--out ROWS.json]     (one GPU; one line per case)
    python3 bench/call_overhead.py --from-text LOG --card C --code X --job J --out ROWS.json

The second form turns the printed lines of an earlier run into the same rows (the fifth
session ran it as .gpu/glue_probe.py, same code, and kept only its printout).
Rows: ``bench = "call_overhead"``; ``tflops_per_gpu`` counts the useful work (Σ document
length², causal) at the back-to-back rate; the ``*_ms`` fields are the columns below."""

import argparse
import re
import sys
import time

import numpy as np

S, H, D = 65536, 8, 128
CASES = {"fixed": 0, "8 docs": 8, "64 docs": 64}
_LINE = re.compile(r"^(fixed|8 docs|64 docs)\s+(fwd\+bwd|fwd)\s+cpu\s+([\d.]+) ms\s+gpu\s+([\d.]+) ms\s+"
                   r"host-only loop\s+([\d.]+) ms/call\s+"
                   r"back-to-back\s+([\d.]+) ms/call\s+attention kernels\s+([\d.]+) ms")


def _row(name, mode, cpu, gpu, host, per, attn, *, card, date, command, **extra):
    from mpiring.bench.common import attention_flops, make_row
    from mpiring.bench.longctx import _documents  # the longctx bench's random documents

    documents = CASES[name]
    useful = 1.0 if not documents else float((np.diff(_documents(S, documents)).astype(float) ** 2).sum()) / S**2
    flops = useful * attention_flops(1, S, S, H, D, causal=True, mode=mode)
    return make_row(
        bench="call_overhead", card=card, date=date, command=command, dtype="bf16", heads=H, heads_kv=H, head_dim=D,
        seqlen=S, n_gpus=1, causal=True, layout="zigzag", transport=None, **{"pass": mode},
        tflops_per_gpu=flops / (per * 1e-3) / 1e12, documents=documents, useful_fraction=useful,
        cpu_ms=cpu, gpu_ms=gpu, host_loop_ms=host, back_to_back_ms=per, attention_kernels_ms=attn, **extra,
    )


def measure(card: str, date: str, command: str) -> list[dict]:
    import cupy
    from cupyx.profiler import benchmark
    from ml_dtypes import bfloat16
    from mpi4py import MPI

    import mpiring
    from mpiring.bench.common import kernel_launch_events, kernel_ms
    from mpiring.bench.longctx import _documents

    comm = MPI.COMM_SELF
    rng = cupy.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, S, H, D), dtype=np.float32).astype(bfloat16) for _ in range(4))
    rows = []
    for name, count in CASES.items():
        opts = dict(causal=True, layout="zigzag", cu_seqlens=_documents(S, count) if count else None)
        f = lambda opts=opts: mpiring.ring_attention(q, k, v, comm, **opts)  # noqa: E731

        def fb(opts=opts):
            o, l_ = mpiring.ring_attention(q, k, v, comm, **opts)
            return mpiring.ring_attention_backward(do, q, k, v, o, l_, comm, **opts)

        f()
        fb()
        for mode, fn in (("fwd", f), ("fwd+bwd", fb)):
            r = benchmark(fn, n_repeat=10, n_warmup=2)
            cpu, gpu = float(np.median(r.cpu_times)) * 1e3, float(np.median(r.gpu_times[0])) * 1e3
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            host = (time.perf_counter() - t0) / 10 * 1e3
            cupy.cuda.Device().synchronize()
            per = (time.perf_counter() - t0) / 10 * 1e3
            with kernel_launch_events() as ev:
                fn()
                cupy.cuda.Device().synchronize()
                attn = kernel_ms(ev, "attn")
            print(f"{name:8s} {mode:7s} cpu {cpu:7.2f} ms  gpu {gpu:7.2f} ms  host-only loop {host:7.2f} ms/call  "
                  f"back-to-back {per:7.2f} ms/call  attention kernels {attn:7.2f} ms", flush=True)
            rows.append(_row(name, mode, cpu, gpu, host, per, attn, card=card, date=date, command=command))
    return rows


def main() -> int:
    from mpiring.bench.common import today, write_rows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON rows")
    p.add_argument("--from-text", default=None, metavar="LOG", help="rows from an earlier run's printed lines")
    p.add_argument("--card", default=None, help="with --from-text: the card it ran on")
    p.add_argument("--date", default=None, help="with --from-text: the day it ran (default today)")
    p.add_argument("--code", default=None, help="the commit whose code ran")
    p.add_argument("--job", default=None, help="which device call ran it")
    args = p.parse_args()
    extra = {k: v for k, v in (("code", args.code), ("job", args.job)) if v}
    if args.from_text:
        if not args.card:
            p.error("--from-text needs --card")
        rows = []
        for line in open(args.from_text):
            m = _LINE.match(line.strip())
            if m:
                name, mode, *ms = m.groups()
                rows.append(_row(name, mode, *map(float, ms), card=args.card, date=args.date or today(),
                                 command="python3 bench/call_overhead.py", **extra))
    else:
        from mpiring.bench.common import card_name

        command = "python3 bench/call_overhead.py " + " ".join(sys.argv[1:])
        rows = [dict(r, **extra) for r in measure(card_name(), today(), command.strip())]
    if args.out:
        write_rows(args.out, rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
