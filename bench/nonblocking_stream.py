"""`python bench/nonblocking_stream.py BENCH ...`: `python -m mpiring.bench BENCH ...` with
each rank's current CuPy stream a non-blocking one (made current right after the bench
picks the rank's GPU) instead of CUDA's legacy default stream. Produced the ninth session's
"non-blocking" rows (bench/README.md, Long context). Branch ``ring-stream`` has the ring
call move its work off the legacy stream itself (mpiring.transport.gpu.ring_stream), not
yet run through the GPU tests with its ordering fix."""
import runpy
import sys

import mpiring.transport.gpu as gpu

_select = gpu.select_device


def select_device(*args, **kwargs):
    import cupy

    device = _select(*args, **kwargs)
    cupy.cuda.Stream(non_blocking=True).use()
    return device


gpu.select_device = select_device
sys.argv = ["mpiring.bench"] + sys.argv[1:]
runpy.run_module("mpiring.bench", run_name="__main__", alter_sys=True)
