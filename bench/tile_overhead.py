"""What a thread block costs apart from its tiles: the attention kernels' time at a fixed
number of tile pairs, spread over more or fewer blocks.

Non-causal, one GPU, bf16, 8 heads, head_dim 128: batch × sequence length chosen so that
every size has the same query–key tile pairs (``batch · (seqlen / 128)² `` constant), so
a block (a 128-row query tile in the forward, a 128-key tile in the backward) sweeps
seqlen / 128 tiles. Kernel time = a · blocks + b · tiles; ``a / b`` is a block's fixed cost
in tiles. Packed documents of ~8k tokens give each block ~40 tiles, one long causal sequence
~250: the fixed cost weighs that much more on them.

    python3 bench/tile_overhead.py [--pairs-of 16384] [--seqlens 1024,2048,4096,8192,16384]
                                   [--variants wgmma,mma.sync] [--out FILE]

Prints a row per variant × seqlen (kernel ms, µs per tile pair) and the fit per variant
and kernel; ``--out`` writes result rows (bench/README.md's format).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from unittest import mock

import numpy as np
from mpi4py import MPI

import mpiring
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

TILE = 128  # rows of the forward's query tile and the backward's key tile (wgmma and mma.sync at d128)
VARIANTS = {"wgmma": {"MPIRING_WGMMA": "1"}, "mma.sync": {"MPIRING_WGMMA": "0"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs-of", type=int, default=16384, help="tile pairs of 2 sequences of this length")
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    p.add_argument("--variants", default="wgmma,mma.sync")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--out", default="")
    args = p.parse_args()
    import cupy

    heads, d = args.heads, 128
    rows, fits = [], []
    for variant in args.variants.split(","):
        points = []
        with mock.patch.dict(os.environ, VARIANTS[variant]):
            for s in (int(x) for x in args.seqlens.split(",")):
                batch = 2 * (args.pairs_of // s) ** 2
                fwd, bwd = _kernel_times(s, batch, heads, d, args.iters)
                cupy.get_default_memory_pool().free_all_blocks()  # this size's arrays
                blocks = batch * heads * s // TILE
                tiles = batch * heads * (s // TILE) ** 2
                point = {"seqlen": s, "batch": batch, "blocks": blocks, "tiles": tiles,
                         "fwd_ms": float(np.median(fwd)), "bwd_ms": float(np.median(bwd))}
                points.append(point)
                print(f"{variant:8s} S={s:6d} B={batch:4d} blocks {blocks:7d} tiles/block {s // TILE:4d}: "
                      f"fwd {point['fwd_ms']:7.3f} ms ({point['fwd_ms'] * 1e3 / tiles:.4f} us/tile)  "
                      f"bwd {point['bwd_ms']:7.3f} ms ({point['bwd_ms'] * 1e3 / tiles:.4f} us/tile)", flush=True)
        for kernel in ("fwd", "bwd"):
            x = np.array([pt["blocks"] for pt in points], float)
            y = np.array([pt[f"{kernel}_ms"] for pt in points]) * 1e3  # µs
            a, c = np.polyfit(x, y, 1)  # µs per block; µs for the tiles (constant)
            per_tile = c / points[0]["tiles"]
            fit = {"variant": variant, "kernel": kernel, "us_per_block": a, "us_per_tile": per_tile,
                   "block_cost_in_tiles": a / per_tile}
            fits.append(fit)
            print(f"fit {variant:8s} {kernel}: {a:.3f} us per block + {per_tile:.4f} us per tile pair "
                  f"-> a block's fixed cost = {a / per_tile:.2f} tiles", flush=True)
        for pt in points:
            for mode, ms in (("fwd", pt["fwd_ms"]), ("fwd+bwd", pt["fwd_ms"] + pt["bwd_ms"])):
                flops = attention_flops(pt["batch"], pt["seqlen"], pt["seqlen"], heads, d, causal=False, mode=mode)
                rows.append(make_row(
                    bench="tile-overhead", card=card_name(), date=today(),
                    command="python3 " + shlex.join(sys.argv), dtype="bf16", heads=heads, heads_kv=heads,
                    head_dim=d, seqlen=pt["seqlen"], n_gpus=1, causal=False, layout="contiguous", transport=None,
                    **{"pass": mode}, tflops_per_gpu=flops / (ms * 1e-3) / 1e12, batch=pt["batch"], variant=variant,
                    blocks=pt["blocks"], tiles=pt["tiles"], fwd_kernel_ms=pt["fwd_ms"], bwd_kernel_ms=pt["bwd_ms"],
                    fits=[f for f in fits if f["variant"] == variant],
                ))
    if args.out:
        write_rows(args.out, rows)


def _kernel_times(s: int, batch: int, heads: int, d: int, iters: int) -> tuple[list, list]:
    """The attention kernels' ms of ``iters`` forward+backward calls (after heating)."""
    import cupy

    from mpiring.bench.longctx import _bfloat16

    rng, comm = cupy.random.default_rng(s), MPI.COMM_SELF
    q, k, v, dout = (rng.standard_normal((batch, s, heads, d), np.float32).astype(_bfloat16()) for _ in range(4))

    def call():
        out, lse = mpiring.ring_attention(q, k, v, comm, return_lse=True)
        return mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm)

    call()
    heat([call], 1.0, sync=cupy.cuda.Device().synchronize)
    fwd, bwd = [], []
    with kernel_launch_events() as events:
        for _ in range(iters):
            events.clear()
            call()
            cupy.cuda.Device().synchronize()
            fwd.append(kernel_ms(events, "attn_fwd"))
            bwd.append(kernel_ms(events, "attn_bwd"))
    return fwd, bwd


if __name__ == "__main__":
    main()
