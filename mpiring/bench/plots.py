"""Figures from benchmark result rows (``bench/results/*.json``); matplotlib is imported only here.

``python -m mpiring.bench plot --plot DIR FILE.json …`` redraws them from saved rows;
``python -m mpiring.bench ring|longctx … --plot DIR`` draws them from the rows just made.
Each figure is written only where its rows exist:

* ``tflops_vs_tokens.png``: TF/s per GPU against tokens per GPU (``ring`` rows at the
  largest N, per transport and pass; ``long_context`` rows as points);
* ``efficiency_vs_n.png``: ring efficiency against N (``ring`` rows);
* ``memory_vs_tokens.png``: measured peak and :func:`mpiring.memory_estimate` against
  tokens per GPU, log-log, with a seqlen² slope for reference (``memory`` rows and the
  ``long_context`` example's);
* ``timeline.png``: one forward+backward ring call per transport, per exchange: the
  compute it overlaps, the transfer, and the time the ring waited (``timeline`` rows).
"""

from __future__ import annotations

import json
import os

__all__ = ["plot_rows", "add_arguments", "run"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # optional dependency: say what to install
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or mpiring[bench])") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _card(rows) -> str:
    cards = sorted({r.get("card", "?") for r in rows})
    return ", ".join(cards)


def plot_rows(rows: list[dict], directory: str) -> list[str]:
    """Write every figure that ``rows`` have data for into ``directory``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    plt = _pyplot()
    written = []
    for name, draw in (("tflops_vs_tokens", _tflops_vs_tokens), ("efficiency_vs_n", _efficiency_vs_n),
                       ("memory_vs_tokens", _memory_vs_tokens), ("timeline", _timeline)):
        fig = draw(plt, rows)
        if fig is None:
            continue
        path = os.path.join(directory, f"{name}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _series(rows, key):
    """{label: sorted [(x, y)]} grouping rows by ``key(row)`` → (label, x, y) or None."""
    groups: dict[str, list] = {}
    for r in rows:
        item = key(r)
        if item is not None:
            label, x, y = item
            groups.setdefault(label, []).append((x, y))
    return {label: sorted(points) for label, points in sorted(groups.items())}


def _tflops_vs_tokens(plt, rows):
    ring = [r for r in rows if r.get("bench") == "ring" and r.get("tflops_per_gpu")]
    longc = [r for r in rows if r.get("bench") == "long_context" and r.get("tflops_per_gpu")]
    if not ring and not longc:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if ring:
        n_max = max(r["n_gpus"] for r in ring)
        series = _series(ring, lambda r: (
            f"{r['transport'] or 'kernels'}, {r['layout']}{' causal' if r['causal'] else ''}, {r['pass']}",
            r["seqlen"], r["tflops_per_gpu"]) if r["n_gpus"] == n_max else None)
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"N={n_max} {label}")
    for r in longc:
        ax.scatter([r["seqlen"]], [r["tflops_per_gpu"]], marker="*", s=150, zorder=3,
                   label=f"long_context {_tokens(r['total_tokens'])}, N={r['n_gpus']}, {r['pass']} ({r['card']})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens per GPU", ylabel="TF/s per GPU", title=f"Ring attention throughput ({_card(ring + longc)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _efficiency_vs_n(plt, rows):
    ring = [r for r in rows if r.get("bench") == "ring" and r.get("efficiency") is not None and r["transport"]]
    if not ring:
        return None
    passes = sorted({r["pass"] for r in ring})
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False, sharey=True)
    styles = {"mpi-cuda": "-", "nccl": "--", "mpi-staged": ":"}
    for ax, mode in zip(axes[0], passes):
        series = _series(ring, lambda r, mode=mode: (
            f"{r['transport']}, {_tokens(r['seqlen'])}/GPU, {r['layout']}{' causal' if r['causal'] else ''}",
            r["n_gpus"], r["efficiency"]) if r["pass"] == mode and r["transport"] != "mpi-staged" else None)
        for label, pts in series.items():
            pts = [(1, 1.0)] + pts  # N = 1 is the compute-only baseline itself
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=styles.get(label.split(",")[0], "-"),
                    label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="N (GPUs)", title=f"{mode} ({_card(ring)})")
        ax.set_xticks([1] + sorted({r["n_gpus"] for r in ring}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("efficiency = TF/s(ring) / TF/s(compute only)")
    fig.suptitle("Ring efficiency vs N (mpi-staged left out: 0.1-0.4)")
    fig.tight_layout()
    return fig


def _memory_vs_tokens(plt, rows):
    # memory rows, and the long-context example's runs (which record their peak too)
    mem = [r for r in rows if r.get("bench") in ("memory", "long_context") and r.get("peak_bytes")]
    if not mem:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = iter(f"C{i}" for i in range(10))
    for varlen in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            pts = sorted((r["seqlen"], r["peak_bytes"], r["estimate_bytes"]) for r in mem
                         if r["pass"] == mode and bool(r.get("documents")) == varlen)
            if not pts:
                continue
            xs, color, what = [p[0] for p in pts], next(colors), f"{mode}{', documents' if varlen else ''}"
            ax.plot(xs, [p[1] / 2**30 for p in pts], marker="o", color=color, label=f"{what}: measured peak")
            ax.plot(xs, [p[2] / 2**30 for p in pts], ls="--", color=color, label=f"{what}: memory_estimate")
    xs = sorted({r["seqlen"] for r in mem})
    first = min(r["peak_bytes"] for r in mem if r["seqlen"] == xs[0]) / 2**30
    ax.plot(xs, [first * (x / xs[0]) ** 2 for x in xs], color="gray", lw=0.8, ls=":", label="∝ seqlen² (reference)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["peak_bytes"] for r in mem) / 2**30 * 4)
    ax.set(xlabel="tokens per GPU", ylabel="GiB per rank (inputs not included)",
           title=f"Peak memory per rank vs the estimate ({_card(mem)}, N={mem[0]['n_gpus']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def _timeline(plt, rows):
    lines = [r for r in rows if r.get("bench") == "timeline" and r.get("steps")]
    if not lines:
        return None
    fig, axes = plt.subplots(len(lines), 1, figsize=(8, 1.6 + 1.4 * len(lines)), squeeze=False)
    for ax, r in zip(axes[:, 0], lines):
        t = 0.0
        for i, step in enumerate(r["steps"]):
            y = 1 if step["kind"] == "kv" else 0
            ax.barh(y + 0.2, step["compute_ms"], left=t, height=0.35, color="C0",
                    label="compute (post → wait)" if i == 0 else None)
            ax.barh(y - 0.2, step["comm_ms"], left=t, height=0.35, color="C1",
                    label="send/recv (transfer)" if i == 0 else None)
            if step["wait_ms"] > 0:
                ax.barh(y + 0.2, step["wait_ms"], left=t + step["compute_ms"], height=0.35, color="C3",
                        label="waiting" if not any(s["wait_ms"] > 0 for s in r["steps"][:i]) else None)
            t += max(step["compute_ms"], step["comm_ms"])
        ax.set_yticks([0, 1], ["dK/dV", "K/V"])
        ax.set_title(f"{r['transport']}: one fwd+bwd ring call, {_tokens(r['seqlen'])} tokens/GPU, "
                     f"N={r['n_gpus']} ({r['card']})", fontsize=9)
        ax.set_xlabel("ms (exchanges laid end to end)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# --- ``python -m mpiring.bench plot`` --------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="result JSON files (lists of rows)")
    p.add_argument("--plot", required=True, metavar="DIR", help="directory for the PNG files")


def run(args) -> int:
    rows = []
    for path in args.files:
        with open(path) as f:
            rows += json.load(f)
    for png in plot_rows(rows, args.plot):
        print(f"wrote {png}")
    return 0
