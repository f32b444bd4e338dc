"""Source variants of the CUDA kernels, timed against the current ones in one process.

Each variant is a list of text replacements in ``mpiring/kernels`` (the script swaps the
sources the backend compiles: no change to the library) or environment settings
(:data:`VARIANT_ENV`, e.g. the ``mma.sync`` backward where ``wgmma`` is the default); it runs causal and non-causal
forward+backward through ``mpiring.ring_attention(_backward)`` at one rank, and reports
each kernel's own time (CUDA events around the backend's launches, median of
``--iters``) and whether dq/dk/dv equal the current kernels' bitwise (variants that
only reorder the schedule must).

    python3 bench/kernel_variants.py [--tokens 16384] [--heads 16] [--variants a,b]
        [--baseline DIR]   # DIR: another commit's mpiring/kernels, timed as variant "baseline"

Prints one table: per variant and case, forward and backward kernel ms and the speedup
against ``current``.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from pathlib import Path
from unittest import mock

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.backends import cupy_
from mpiring.bench.common import (
    attention_flops,
    card_name,
    heat,
    kernel_launch_events,
    kernel_ms,
    make_row,
    today,
    write_rows,
)
from mpiring.bench.longctx import _documents

_P1 = "#pragma unroll\n      for (int kk = 0; kk < D / 16; ++kk) {\n        u32 aq[2][4]"
_P3 = "#pragma unroll\n      for (int kk = 0; kk < BN / 16; ++kk) {"
_FWD_MAP = """  const int b = blockIdx.x / H, h = blockIdx.x % H, hk = h / (H / Hkv);
  // Query tiles along y, continued along z past the grid's y limit (65535).
  const int nqt = (Sq + BM - 1) / BM, tile = blockIdx.z * gridDim.y + blockIdx.y;
  if (tile >= nqt) return;"""
_FWD_TILES_FASTEST = """  const int nqt = (Sq + BM - 1) / BM;
  const unsigned lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int bh = lin / nqt, tile = lin % nqt;
  if (bh >= B * H) return;
  const int b = bh / H, h = bh % H, hk = h / (H / Hkv);"""
_BWD_GRID = "  int bx = blockIdx.x, jt = blockIdx.z * gridDim.y + blockIdx.y;  // key tiles along y, then z\n"
_BWD_KEYS_FASTEST_ATOMIC = _BWD_GRID + """  if (dq_sem == 0) {
    const int nk = (Sk + BN - 1) / BN;
    const unsigned lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    bx = lin / nk;
    jt = lin % nk;
    if (bx >= (int)gridDim.x) return;
  }
"""
_BWD_TICKET = "#define TICKET_GROUP 4\n"
_RAISE_LATER = "    added = sem;  // the next key tile's turn (raised after the next tile's phase 1)\n"
_DQ_WAIT = "      if (lane == 0 && seen < target) wait_at_least(sem, target);\n"
_PEEK_LANE0 = "      if (sem != 0 && lane == 0) seen = ld_relaxed(sem);\n"
_WAIT_SLOW = "__device__ __noinline__ void wait_slow(const int* p, int target) {\n"
_RAISE_NOW = "    __syncthreads();\n    if (sem != 0 && threadIdx.x == 0) release_add(sem);\n"


VARIANTS = {
    "current": [],
    # backward k-loops of phases 1 (S, dP) and 3 (dQ) not unrolled (the kernels before 2026-11-26's fifth session)
    "bwd-unroll1": [("attention_bwd.cu", _P1, _P1.replace("unroll", "unroll 1")),
                    ("attention_bwd.cu", _P3, _P3.replace("unroll", "unroll 1"))],
    # the same loops unrolled by two
    "bwd-unroll2": [("attention_bwd.cu", _P1, _P1.replace("unroll", "unroll 2")),
                    ("attention_bwd.cu", _P3, _P3.replace("unroll", "unroll 2"))],
    # (removed: "bwd-block-wait", thread 0 reading the counter at the wait and the block waiting
    # at a barrier, as before the fifth session; the text it replaced left the kernel in 589b325)
    # forward: query tiles fastest, heads slowest (FLASH's grid order: the blocks side by
    # side share one head's K/V in L2); the current grid has heads fastest
    "fwd-tiles-fastest": [("attention_fwd.cu", _FWD_MAP, _FWD_TILES_FASTEST)],
    # backward, atomic dQ: key tiles fastest (one head's blocks side by side: its Q, dO, dQ in L2)
    "bwd-keys-fastest-atomic": [("attention_bwd.cu", _BWD_GRID, _BWD_KEYS_FASTEST_ATOMIC)],
    # backward, deterministic dQ: tickets in groups of G heads, key tiles in order (groups of
    # 4 are the kernel's since the eighth session; TICKET_GROUP = the rows of the grid gives
    # the earlier order, heads fastest). Eighth session, 32k tokens, 32 heads, wgmma
    # backward: groups of 4 1.31 / 1.20x, one head at a time 1.31 / 1.13x against heads fastest
    # (kernel-variants-…-589b325-tickets.json; those variants were written out in the script)
    "bwd-det-heads-fastest": [("attention_bwd.cu", _BWD_TICKET, "#define TICKET_GROUP (1 << 30)\n")],
    "bwd-det-keys-fastest": [("attention_bwd.cu", _BWD_TICKET, "#define TICKET_GROUP 1\n")],
    "bwd-det-groups16": [("attention_bwd.cu", _BWD_TICKET, "#define TICKET_GROUP 16\n")],
    # deterministic dQ: a query tile's counter raised right after the block's dQ adds (a block
    # barrier per query tile more), not after the next query tile's phase 1
    "bwd-raise-now": [("attention_bwd.cu", _RAISE_LATER, _RAISE_NOW)],
    # deterministic dQ with documents in increasing key-tile order, query tiles descending
    # (the kernels before the tenth session); and one sequence in decreasing order
    "bwd-dq-inc-docs": [("attention_bwd.cu", "#define DQ_DESC_DOCS 1\n", "#define DQ_DESC_DOCS 0\n")],
    # documents: cu_seqlens read from global memory in the backward (before the tenth session)
    "bwd-cu-global": [("attention_bwd.cu", "#define CU_SMEM 1024\n", "#define CU_SMEM 0\n")],
    "bwd-dq-inc-docs-cu-global": [("attention_bwd.cu", "#define DQ_DESC_DOCS 1\n", "#define DQ_DESC_DOCS 0\n"),
                                  ("attention_bwd.cu", "#define CU_SMEM 1024\n", "#define CU_SMEM 0\n")],
    "bwd-dq-desc-plain": [("attention_bwd.cu", "#define DQ_DESC_PLAIN 0\n", "#define DQ_DESC_PLAIN 1\n")],
    # diagnostic, not deterministic: the deterministic path (tickets, counters, fences) without
    # its waits, i.e. what the waiting itself costs
    "bwd-det-nowait": [("attention_bwd.cu", _DQ_WAIT, "")],
    # (tenth session, calls 11-12: the dQ target computed after thread 0's copies, or by warp 1:
    # 0.96-1.05x, not consistent; the target is now stepped from the last query tile's for one
    # sequence, c2f83f4: 1.02-1.07x, bitwise the same)
    # deterministic dQ: the wait's slow path (spin with nanosleep, trap past WAIT_LIMIT_NS)
    # inlined, not a call in the query-tile loop; and with the target on warp 1
    "bwd-wait-inline": [("common.cuh", _WAIT_SLOW, _WAIT_SLOW.replace("__noinline__", "__forceinline__"))],
    # deterministic dQ: the whole warp peeks at the counter and waits (one load for the warp,
    # a warp-uniform branch), not lane 0 then __syncwarp
    "bwd-wait-warp": [("attention_bwd.cu", _PEEK_LANE0, _PEEK_LANE0.replace(" && lane == 0", "")),
                      ("attention_bwd.cu", _DQ_WAIT + "      __syncwarp();\n",
                       _DQ_WAIT.replace("lane == 0 && ", ""))],
    # (removed: "bwd-plain-row-loads", lse/delta rows with plain loads as before 571079d, and
    # "bwd-dq-full-tile", the dQ reds of a full query tile without row checks; the text they
    # replaced left the kernel in 32745cb)
    # (sixth session) The relaxed early counter read and the two barriers per query tile,
    # measured here as "bwd-peek-relaxed" and "bwd-two-barriers", are now the kernel's
    # (bench/results/kernel-variants-…-b7c7d4e.json; the variants are in f9a14b5's script).
    # (sixth session: "bwd-target-shortcut", thread 0's binary search for a query tile's
    # first key tile cut short: 0.997 / 0.997x, kernel-variants-…-96fdf3e.json; the search is
    # O(1) since the tenth session)
}


# Variants that call the backward with atomic dQ (deterministic=False), the same kernels.
ATOMIC_DQ = {"bwd-atomic-dq"}

# Variants made by environment variables read at each call (set around that variant's calls).
VARIANT_ENV = {
    # the mma.sync backward beside the wgmma one (Hopper, d128: MPIRING_WGMMA's default is both)
    "bwd-mma-sync": {"MPIRING_WGMMA": "fwd"},
    # the mma.sync forward beside the wgmma one (Hopper, d64 and d128)
    "fwd-mma-sync": {"MPIRING_WGMMA": "bwd"},
    # the mma.sync forward and backward
    "mma-sync": {"MPIRING_WGMMA": "0"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--heat", type=float, default=3.0, help="seconds of calls before the timed rounds")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join([*VARIANTS, *VARIANT_ENV])}")
    p.add_argument("--atomic", action="store_true", help="backward with atomic dQ (deterministic=False)")
    p.add_argument("--documents", type=int, default=0,
                   help="causal only, over this many packed random documents (mpiring.bench.longctx's)")
    p.add_argument("--baseline", default="",
                   help="a folder of kernel sources (another commit's mpiring/kernels), timed as variant 'baseline'")
    p.add_argument("--out", default="")
    args = p.parse_args()
    with kernel_launch_events() as events:
        _run(args, events)


def _run(args, events) -> None:
    """Every variant timed; ``events``: the kernel launches (:func:`kernel_launch_events`).

    All variants' modules are loaded side by side and timed in turns (one call of each per
    round, the order rotating) after a heating phase of ``--heat`` seconds: timed one after
    the other, the first ran on a GPU not yet at its power cap, at faster clocks
    (mpiring.bench.common.time_cuda_interleaved says more)."""
    import cupy

    original = cupy_.kernel_sources()
    rng = cupy.random.default_rng(0)
    shape = (1, args.tokens, args.heads, args.head_dim)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(cupy.float16) for _ in range(4))
    comm, rows = MPI.COMM_SELF, []
    names = args.variants.split(",") + (["baseline"] if args.baseline else [])
    variant_sources = {}
    for name in names:
        sources = dict(original)
        if name == "baseline":
            root = Path(args.baseline)
            sources = {f: (root / f).read_text() for f in original}
        if name not in VARIANTS and name not in VARIANT_ENV and name not in ATOMIC_DQ and name != "baseline":
            raise SystemExit(f"unknown variant {name!r}")
        for file, old, new in VARIANTS.get(name, []):
            if old not in sources[file]:
                raise SystemExit(f"variant {name}: text not found in {file}: {old!r}")
            sources[file] = sources[file].replace(old, new)
        variant_sources[name] = sources
    state, modules = {"variant": names[0]}, {}

    def module(device_id, kernel_file, options):  # replaces cupy_._module: one module per variant
        key = (state["variant"], device_id, kernel_file, options)
        if key not in modules:
            sources = variant_sources[state["variant"]]
            with cupy.cuda.Device(device_id):
                modules[key] = cupy.RawModule(code=cupy_._inline_header(sources[kernel_file], sources),
                                              options=options)
        return modules[key]

    cupy_._module = module
    cu = _documents(args.tokens, args.documents) if args.documents else None
    for causal in (True,) if args.documents else (False, True):
        def call(name, causal=causal):
            state["variant"] = name
            with mock.patch.dict(os.environ, VARIANT_ENV.get(name, {})):  # restored after the call
                out, lse = mpiring.ring_attention(q, k, v, comm, causal=causal, cu_seqlens=cu)
                return mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, causal=causal, cu_seqlens=cu,
                                                       deterministic=not args.atomic and name not in ATOMIC_DQ)

        grads = {name: [g.copy() for g in call(name)] for name in names}  # compiles
        heat([functools.partial(call, name) for name in names], args.heat,
             sync=cupy.cuda.get_current_stream().synchronize)
        times = {name: {"fwd": [], "bwd": []} for name in names}
        for r in range(args.iters):
            for name in names[r % len(names):] + names[:r % len(names)]:
                events.clear()
                call(name)
                cupy.cuda.get_current_stream().synchronize()
                for part in ("fwd", "bwd"):
                    times[name][part].append(kernel_ms(events, f"attn_{part}"))
        for name in names:
            same = None
            if name != "current" and "current" in grads:
                same = all(bool((g == r).all()) for g, r in zip(grads[name], grads["current"]))
            rows.append({"variant": name, "causal": causal, "fwd_ms": float(np.median(times[name]["fwd"])),
                         "bwd_ms": float(np.median(times[name]["bwd"])), "bitwise_same_grads": same})
    base = {r["causal"]: r for r in rows if r["variant"] == "current"}
    print("| variant | causal | fwd ms | bwd ms | bwd speedup vs current | grads bitwise same |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = base.get(r["causal"])
        speedup = f"{b['bwd_ms'] / r['bwd_ms']:.3f}" if b else "-"
        print(f"| {r['variant']} | {int(r['causal'])} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {speedup} | "
              f"{r['bitwise_same_grads']} |")
    if args.out:
        meta = {"card": card_name(), "date": today(), "command": "python3 " + shlex.join(sys.argv),
                "tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim,
                "dq": "atomic" if args.atomic else "deterministic", "documents": args.documents,
                "useful_fraction": 1.0 if cu is None else float(np.square(np.diff(cu) / args.tokens).sum())}
        write_rows(args.out, result_rows(meta, rows))


def result_rows(meta: dict, variant_rows: list[dict]) -> list[dict]:
    """The bench/results rows: per variant and causal, fwd+bwd TF/s over the kernels' own
    time (forward + backward kernels), the two times and the speed-up against ``current``."""
    base = {r["causal"]: r for r in variant_rows if r["variant"] == "current"}
    out = []
    for r in variant_rows:
        flops = attention_flops(1, meta["tokens"], meta["tokens"], meta["heads"], meta["head_dim"], causal=r["causal"],
                                mode="fwd+bwd") * meta.get("useful_fraction", 1.0)  # documents: their own pairs
        b = base.get(r["causal"])
        out.append(make_row(
            bench="kernel-variant", card=meta["card"], date=meta["date"], command=meta["command"], dtype="float16",
            heads=meta["heads"], heads_kv=meta["heads"], head_dim=meta["head_dim"], seqlen=meta["tokens"], n_gpus=1,
            causal=r["causal"], layout="contiguous", transport=None, **{"pass": "fwd+bwd"}, dq=meta["dq"],
            variant=r["variant"], documents=meta.get("documents", 0),
            tflops_per_gpu=flops / (r["fwd_ms"] + r["bwd_ms"]) / 1e9, fwd_ms=r["fwd_ms"],
            bwd_ms=r["bwd_ms"], bwd_speedup_vs_current=None if b is None else b["bwd_ms"] / r["bwd_ms"],
            bitwise_same_grads=r["bitwise_same_grads"], **{k: meta[k] for k in ("code", "job") if k in meta},
        ))
    return out


if __name__ == "__main__":
    main()
