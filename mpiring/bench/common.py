"""Shared pieces of the benchmarks: result rows, the card's name, flop counts, timing."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import sys

__all__ = ["REQUIRED", "attention_flops", "card_name", "command_line", "kernel_launch_events", "kernel_ms", "make_row",
           "write_rows", "time_cuda"]

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


def time_cuda(fn, *, warmup: int = 2, iters: int = 10, stream=None) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, timed with CUDA events on the current stream."""
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    times.sort()
    return times[len(times) // 2]


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
