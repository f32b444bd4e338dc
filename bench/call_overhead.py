"""Host time against GPU time of one-GPU ring_attention calls (fixed length and 8/64
random documents, 65k tokens, 8 heads, head dim 128, bf16, causal, zigzag), per call:
cupyx.profiler.benchmark's CPU and GPU times (each call synchronised), the host time of
10 calls issued without synchronising, their rate back to back, and the attention
kernels' own time (CUDA events around their launches).

    python3 bench/call_overhead.py       (one GPU; prints one line per case)

Run in the fifth session as .gpu/glue_probe.py (same code); bench/README.md quotes it."""
import sys
import time

import cupy
import numpy as np
from cupyx.profiler import benchmark
from ml_dtypes import bfloat16
from mpi4py import MPI

import mpiring
from mpiring.bench.common import kernel_launch_events, kernel_ms
from mpiring.bench.longctx import _documents  # the longctx bench's random documents

comm = MPI.COMM_SELF
S, H, D = 65536, 8, 128
rng = cupy.random.default_rng(0)
q, k, v, do = (rng.standard_normal((1, S, H, D), dtype=np.float32).astype(bfloat16) for _ in range(4))


for name, cu in (("fixed", None), ("8 docs", _documents(S, 8)), ("64 docs", _documents(S, 64))):
    opts = dict(causal=True, layout="zigzag", cu_seqlens=cu)
    f = lambda opts=opts: mpiring.ring_attention(q, k, v, comm, **opts)  # noqa: E731
    out, lse = f()

    def fb(opts=opts):
        o, l_ = mpiring.ring_attention(q, k, v, comm, **opts)
        return mpiring.ring_attention_backward(do, q, k, v, o, l_, comm, **opts)

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
        t1 = time.perf_counter()
        per = (t1 - t0) / 10 * 1e3
        with kernel_launch_events() as ev:
            fn()
            cupy.cuda.Device().synchronize()
            attn = kernel_ms(ev, "attn")
        print(f"{name:8s} {mode:7s} cpu {cpu:7.2f} ms  gpu {gpu:7.2f} ms  host-only loop {host:7.2f} ms/call  "
              f"back-to-back {per:7.2f} ms/call  attention kernels {attn:7.2f} ms", flush=True)
sys.exit(0)
