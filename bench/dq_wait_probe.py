"""Where the backward waits under the deterministic dQ order: one backward kernel per
order, instrumented (the kernel source is changed in this process only), on one GPU.

Each block records its start and end (``%globaltimer``) and the time its warps spent in
the dQ waits (mean over the warps). Printed per order: the blocks' busy share of the GPU over the kernel's span,
the share of block time spent waiting, and that share by the key tile's place in its
document and by when the block started (tenths of the kernel's span).

    python3 bench/dq_wait_probe.py [--tokens 65536] [--heads 8] [--documents 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.backends import cupy_
from mpiring.bench.common import card_name, make_row, today, write_rows
from mpiring.bench.longctx import _documents

BN = 128  # the backward's key tile (wgmma and mma.sync at d128)
SLOTS = 1 << 16
# (old, new) replacements in attention_bwd.cu: the instrumentation.
PROFILE = [
    ('#include "common.cuh"\n', f'#include "common.cuh"\n__device__ unsigned long long dq_profile[{SLOTS} * 4];\n'),
    ("  int bx = blockIdx.x, jt = blockIdx.z * gridDim.y + blockIdx.y;  // key tiles along y, then z\n",
     "  int bx = blockIdx.x, jt = blockIdx.z * gridDim.y + blockIdx.y;  // key tiles along y, then z\n"
     "  const unsigned long long prof_t0 = global_ns();\n  unsigned long long prof_wait = 0;\n"
     "  int prof_id = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);\n"),
    ("    ticket_item(ticket, gridDim.x, gridDim.y * gridDim.z, TICKET_GROUP, bx, jt);\n",
     "    ticket_item(ticket, gridDim.x, gridDim.y * gridDim.z, TICKET_GROUP, bx, jt);\n    prof_id = ticket;\n"),
    ("      if (lane == 0 && seen < target) wait_at_least(sem, target);\n",
     "      if (lane == 0 && seen < target) {\n        const unsigned long long w0 = global_ns();\n"
     "        WAIT(sem, target);\n        prof_wait += global_ns() - w0;\n      }\n"),
    ("  cp_async_wait<0>();\n  if (added != 0 && threadIdx.x == 0) release_add(added);\n",
     "  cp_async_wait<0>();\n  if (added != 0 && threadIdx.x == 0) release_add(added);\n"
     "  __shared__ unsigned long long prof_sum;\n  if (threadIdx.x == 0) prof_sum = 0;\n  __syncthreads();\n"
     "  if (lane == 0) atomicAdd(&prof_sum, prof_wait);\n  __syncthreads();\n"
     "  if (threadIdx.x == 0 && prof_id < " + str(SLOTS) + ") {\n"
     "    unsigned long long* r = dq_profile + 4 * prof_id;\n"
     "    r[0] = prof_t0; r[1] = global_ns(); r[2] = prof_sum / NW;\n"
     "    r[3] = ((unsigned long long)jt << 32) | bx;\n  }\n"),
]
ORDERS = {"desc": "#define DQ_DESC_DOCS 1\n", "inc": "#define DQ_DESC_DOCS 0\n"}
# "-nowait": the order's bookkeeping without its waits (not deterministic): what the block's
# work costs there, for the blocks' durations.
WAITS = {"": "#define WAIT(p, t) wait_at_least(p, t)\n", "-nowait": "#define WAIT(p, t) (void)0\n"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--orders", default="inc,desc,inc-nowait,desc-nowait")
    p.add_argument("--out", default="")
    args = p.parse_args()
    import cupy

    original = cupy_.kernel_sources()
    cu = _documents(args.tokens, args.documents)
    rng = cupy.random.default_rng(0)
    shape = (1, args.tokens, args.heads, 128)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(cupy.float16) for _ in range(4))
    comm, rows, sms = MPI.COMM_SELF, [], cupy.cuda.Device().attributes["MultiProcessorCount"]
    options = dict(causal=True, cu_seqlens=cu)
    out, lse = mpiring.ring_attention(q, k, v, comm, **options)
    for order in args.orders.split(","):
        sources = dict(original)
        base, dash, nowait = order.partition("-")
        text = sources["attention_bwd.cu"].replace("#define DQ_DESC_DOCS 1\n", ORDERS[base] + WAITS[dash + nowait])
        for old, new in PROFILE:
            if old not in text:
                raise SystemExit(f"instrumentation text not found: {old!r}")
            text = text.replace(old, new)
        sources["attention_bwd.cu"] = text
        modules = {}

        def module(device_id, kernel_file, opts, sources=sources, modules=modules):
            key = (device_id, kernel_file, opts)
            if key not in modules:
                with cupy.cuda.Device(device_id):
                    modules[key] = cupy.RawModule(code=cupy_._inline_header(sources[kernel_file], sources),
                                                  options=opts)
            return modules[key]

        cupy_._module = module  # the module cache is ours (per order); kernels are looked up per launch
        for _ in range(2):  # compile, heat
            mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **options)
        cupy.cuda.Device().synchronize()
        mod = next(m for (_, f, _), m in modules.items() if f == "attention_bwd.cu")
        prof = cupy.ndarray((SLOTS, 4), cupy.uint64, memptr=mod.get_global("dq_profile"))
        prof.fill(0)
        mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **options)
        cupy.cuda.Device().synchronize()
        rec = prof.get()
        rec = rec[rec[:, 0] > 0]
        rows.append(_summary(order, rec, cu, sms, args))
    if args.out:
        write_rows(args.out, rows)


def _summary(order: str, rec: np.ndarray, cu: np.ndarray, sms: int, args) -> dict:
    """Print and return one order's figures."""
    t0 = rec[:, 0].min()
    start, end, wait = (rec[:, 0] - t0) / 1e3, (rec[:, 1] - t0) / 1e3, rec[:, 2] / 1e3  # µs
    jt = (rec[:, 3] >> 32).astype(np.int64)
    span = end.max()
    dur = end - start
    doc = np.searchsorted(cu, jt * BN, side="right") - 1
    local = jt - cu[doc] // BN  # the key tile's place in its document (first tile 0)
    print(f"order {order}: {len(rec)} blocks, kernel span {span / 1e3:.2f} ms, busy {dur.sum() / (sms * span):.3f} "
          f"of {sms} SMs, waiting {wait.sum() / dur.sum():.3f} of block time; "
          f"mean block {dur.mean():.1f} us")
    by_place = {}
    for name, sel in (("first tile of its document", local == 0), ("tiles 1-7", (local >= 1) & (local < 8)),
                      ("tiles 8-31", (local >= 8) & (local < 32)), ("tiles 32+", local >= 32)):
        if sel.any():
            by_place[name] = float(wait[sel].sum() / dur[sel].sum())
    print("  waiting by place in the document: " + ", ".join(f"{k} {v:.3f}" for k, v in by_place.items()))
    bins = np.minimum((start / span * 10).astype(int), 9)
    by_time = [float(wait[bins == b].sum() / max(dur[bins == b].sum(), 1e-9)) for b in range(10)]
    print("  waiting by start time (tenths of the span): " + " ".join(f"{x:.2f}" for x in by_time))
    return make_row(
        bench="dq-wait-probe", card=card_name(), date=today(), command="python3 " + shlex.join(sys.argv),
        dtype="fp16", heads=args.heads, heads_kv=args.heads, head_dim=128, seqlen=args.tokens, n_gpus=1,
        causal=True, layout="contiguous", transport=None, **{"pass": "fwd+bwd"}, tflops_per_gpu=None,
        documents=args.documents, order=order, blocks=len(rec), span_ms=span / 1e3,
        busy_share=float(dur.sum() / (sms * span)), wait_share=float(wait.sum() / dur.sum()),
        wait_share_by_place=by_place, wait_share_by_start_tenth=by_time,
    )


if __name__ == "__main__":
    main()
