"""How much of its tile work the wgmma forward spends on packed documents: a model, not a
measurement (CPU only, exact counts).

The forward kernel gives each query tile (128 rows) one block, which sweeps the key tiles
(128 keys, aligned to the block's rows) that hold any key its rows may see, and costs a
fixed amount besides (prologue and epilogue: about 1.5 tiles, bench/README.md, tenth
session). Tiles cut by a document's start or by the causal diagonal compute in full. So a
block's useful fraction is its allowed query–key pairs over (tiles + 1.5) · 128 · 128.
This script sums that over every block of a call, per ring step as the ring launches
them, for the bench's documents (`mpiring.bench.longctx`: random boundaries, seed 0) and
for one causal sequence of the same length, and prints their ratio: what packed
documents can reach against one sequence if every tile ran as fast as in one sequence.

    python bench/varlen_tile_model.py [--tokens 65536] [--documents 8,64] [--ranks 1]
        [--pack] [--overhead 1.5] [--waves SMS --heads 8]

``--waves``: each rank's forward launches scheduled on that many SMs, blocks in the
kernel's order, against the same work without partial waves.
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np

import mpiring
from mpiring.bench.longctx import _documents

TILE = 128  # the wgmma forward's query rows and keys per tile


def step_blocks(cu: np.ndarray, q_rows: tuple[int, int], k_rows: tuple[int, int]) -> list[tuple[int, int]]:
    """(allowed pairs, key tiles swept) of each block with work, query tiles ascending, of
    contiguous query rows ``q_rows`` against contiguous keys ``k_rows`` (global positions),
    causal within the documents ``cu``: one kernel launch of a ring step, one head."""
    blocks = []
    k0, k1 = k_rows
    for i0 in range(q_rows[0], q_rows[1], TILE):
        i1 = min(i0 + TILE, q_rows[1])
        rows = np.arange(i0, i1)
        start = cu[np.searchsorted(cu, rows, side="right") - 1]  # each row's document start
        lo, hi = np.maximum(start, k0), np.minimum(rows, k1 - 1)  # allowed keys [lo, hi] in this block
        ok = lo <= hi
        if not ok.any():
            continue
        swept = set()
        for a, b in zip(lo[ok], hi[ok]):
            swept.update(range((a - k0) // TILE, (b - k0) // TILE + 1))
        blocks.append((int((hi - lo + 1)[ok].sum()), len(swept)))
    return blocks


def step_work(cu: np.ndarray, q_rows: tuple[int, int], k_rows: tuple[int, int]) -> tuple[int, int, int]:
    """(allowed pairs, key tiles swept, blocks with work) of one launch (:func:`step_blocks`)."""
    blocks = step_blocks(cu, q_rows, k_rows)
    return sum(p for p, _ in blocks), sum(t for _, t in blocks), len(blocks)


def makespan(costs: list[float], sms: int) -> float:
    """The end of a launch whose blocks (``costs``, in launch order) each take the first SM
    that frees up."""
    ends = [0.0] * sms
    for c in costs:
        heapq.heappush(ends, heapq.heappop(ends) + c)
    return max(ends)


def waves(cu: np.ndarray, ranks: int, overhead: float, heads: int, sms: int) -> None:
    """Per rank and ring step, the forward launch's time in tile-times on ``sms`` SMs (blocks
    heaviest first, as the kernel orders them: the last query tile first, all heads of a
    tile together) against its work spread evenly over them (no partial waves)."""
    seqlen = int(cu[-1]) // ranks
    for r in range(ranks):
        steps, total, even = [], 0.0, 0.0
        for s in range(r + 1):
            b = r - s
            blocks = step_blocks(cu, (r * seqlen, (r + 1) * seqlen), (b * seqlen, (b + 1) * seqlen))
            costs = [t + overhead for _, t in reversed(blocks) for _ in range(heads)]
            if costs:
                span, spread = makespan(costs, sms), sum(costs) / sms
                total, even = total + span, even + spread
                steps.append(f"step {s}: {len(costs)} blocks ({len(costs) / sms:.2f} waves) {span:.0f} "
                             f"(evenly {spread:.0f})")
        print(f"rank {r}: {total:.0f} tile-times (evenly {even:.0f}); " + "; ".join(steps))


def useful_fraction(cu: np.ndarray, ranks: int, overhead: float) -> float:
    """Allowed pairs over the model's tile work, summed over every rank's ring steps
    (``contiguous`` layout: rank r holds rows [r·S, (r+1)·S); step s brings block r − s)."""
    seqlen = int(cu[-1]) // ranks
    pairs = work = 0.0
    for r in range(ranks):
        for s in range(r + 1):  # causal: blocks after r hold no key r's rows may see
            b = r - s
            p, t, n = step_work(cu, (r * seqlen, (r + 1) * seqlen), (b * seqlen, (b + 1) * seqlen))
            pairs, work = pairs + p, work + (t + overhead * n) * TILE * TILE
    return pairs / work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536, help="total tokens (all ranks)")
    p.add_argument("--documents", default="8,64")
    p.add_argument("--ranks", type=int, default=1, help="ring size (contiguous layout)")
    p.add_argument("--pack", action="store_true", help="documents ordered by mpiring.layout.pack_documents")
    p.add_argument("--overhead", type=float, default=1.5, help="a block's fixed cost, in key tiles")
    p.add_argument("--waves", type=int, default=0, metavar="SMS",
                   help="also each rank's launches scheduled on this many SMs (132: H100), per step")
    p.add_argument("--heads", type=int, default=8, help="heads (blocks per query tile), for --waves")
    args = p.parse_args()
    one = useful_fraction(np.array([0, args.tokens]), 1, args.overhead)
    print(f"one causal sequence of {args.tokens:,} tokens: useful fraction of the tile work {one:.3f}")
    for count in (int(x) for x in args.documents.split(",")):
        cu = _documents(args.tokens, count)
        if args.pack:
            cu = mpiring.layout.pack_documents(np.diff(cu), args.ranks)[1]
        f = useful_fraction(cu, args.ranks, args.overhead)
        print(f"{count} documents on {args.ranks} rank(s){' (packed)' if args.pack else ''}: {f:.3f}, "
              f"against one sequence {f / one:.3f}")
        if args.waves:
            waves(cu, args.ranks, args.overhead, args.heads, args.waves)


if __name__ == "__main__":
    main()
