"""Shared pieces of the benchmarks: result rows, the card's name, flop counts, timing."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shlex
import sys
import time

__all__ = ["REQUIRED", "attention_flops", "card_name", "command_line", "kernel_launch_events", "kernel_ms", "make_row",
           "write_rows", "heat", "time_cuda_interleaved"]

# Every row of bench/results/*.json has at least these keys (bench/README.md).
REQUIRED = ("bench", "card", "date", "command", "dtype", "heads", "heads_kv", "head_dim", "seqlen", "n_gpus",
            "causal", "layout", "transport", "pass", "tflops_per_gpu")


def attention_flops(batch: int, seqlen_q: int, seqlen_k: int, heads: int, head_dim: int, *, causal: bool,
                    mode: str) -> float:
    """Matmul flops of attention, FlashAttention's convention: forward 2 matmuls
    (4·B·Sq·Sk·H·D), backward 2.5× that, causal half (whether or not a kernel skips)."""
    fwd = 4.0 * batch * seqlen_q * seqlen_k * heads * head_dim * (0.5 if causal else 1.0)
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"mode={mode!r} must be 'fwd', 'bwd' or 'fwd+bwd'")
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def card_name(device_id: int | None = None) -> str:
    """The GPU's name as ``nvidia-smi`` prints it (e.g. 'NVIDIA H100 80GB HBM3')."""
    import cupy

    dev = cupy.cuda.Device() if device_id is None else cupy.cuda.Device(device_id)
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def command_line() -> str:
    return "python -m mpiring.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def make_row(**fields) -> dict:
    """One result row; raises ValueError naming any missing required key."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"result row misses {missing}")
    return fields


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def write_rows(path: str, rows: list[dict]) -> None:
    """Write ``rows`` as a JSON list (replacing the file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def heat(fns, seconds: float, *, sync, agree=None) -> None:
    """Run ``fns`` in turns for about ``seconds``: a GPU reaches its power cap, and its
    lower clocks, within about a second of full load (see :func:`time_cuda_interleaved`).
    The number of rounds comes from the first round's time (``sync()`` waits for the
    device); ``agree`` makes it the same on every rank (e.g. an allreduce with MAX), as
    collective functions need."""
    start = time.perf_counter()
    for fn in fns:
        fn()
    sync()
    rounds = max(0, math.ceil(seconds / max(time.perf_counter() - start, 1e-6)) - 1)
    for _ in range(rounds if agree is None else agree(rounds)):
        for fn in fns:
            fn()
    sync()


def time_cuda_interleaved(fns: dict, *, warmup: int = 1, iters: int = 10, heat_s: float = 2.0, stream=None,
                          before=None, agree=None) -> dict:
    """Median seconds of each ``fns[name]()``, the functions timed in turns (one run of
    each per round, the order rotating), after ``heat_s`` seconds of running them.

    Why: an H100 at full load reaches its power cap within about a second and then runs
    at lower clocks (seen on 4x H100: 1980 MHz idle, 1605-1700 MHz under the ring,
    throttle reason SW power cap). Timed one after the other, whichever runs first gets
    the faster clocks: the ring bench's compute-only baseline (timed first) and the
    kernel bench's own kernels (timed before torch's) were favoured by this. ``before``,
    if given, runs before each timed call (e.g. a barrier of the ranks); ``agree`` makes
    the number of heating rounds the same on every rank (e.g. an allreduce with MAX), as
    collective functions need."""
    import cupy

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    heat(list(fns.values()), heat_s, sync=cupy.cuda.get_current_stream().synchronize, agree=agree)
    times = {name: [] for name in names}
    for r in range(iters):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before is not None:
                before()
            begin, end = cupy.cuda.Event(), cupy.cuda.Event()
            begin.record(stream)
            fns[name]()
            end.record(stream)
            end.synchronize()
            times[name].append(cupy.cuda.get_elapsed_time(begin, end) / 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


@contextlib.contextmanager
def kernel_launch_events():
    """While active, CUDA events around every kernel launch of the CUDA kernel backend:
    yields the list they go to, ``(kernel name, start event, end event)`` in launch order
    (clear it between timed calls; :func:`kernel_ms` sums it). For the probe scripts:
    the kernels' own device time, apart from the host and the other work of a call."""
    import cupy

    from mpiring.backends.cupy_ import CudaKernelBackend

    events, launch = [], CudaKernelBackend._launch

    def timed(self, kernel_file, name, *args, **kwargs):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        launch(self, kernel_file, name, *args, **kwargs)
        end.record()
        events.append((name, start, end))

    CudaKernelBackend._launch = timed
    try:
        yield events
    finally:
        CudaKernelBackend._launch = launch


def kernel_ms(events, prefix: str = "") -> float:
    """Milliseconds of the launches in ``events`` (synchronised) whose kernel name starts with ``prefix``."""
    import cupy

    return sum(cupy.cuda.get_elapsed_time(start, end) for name, start, end in events if name.startswith(prefix))
