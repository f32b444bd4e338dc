"""Benchmarks as library subcommands: ``python -m mpiring.bench <name> [options]``.

Each subcommand checks correctness first, warms up, times with CUDA events and
writes result rows (see :mod:`mpiring.bench.common`). Subcommands register
themselves with :func:`register`; ``kernel`` (one GPU, the CUDA kernels beside
torch SDPA) lives in :mod:`mpiring.bench.kernel`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mpiring._entry import run_or_abort

__all__ = ["COMMANDS", "register", "main"]

# name -> (module that defines it, one-line help); modules import lazily so that
# ``--help`` needs neither CuPy nor torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "kernel": ("mpiring.bench.kernel", "one GPU: CUDA kernels vs torch SDPA (FLASH, cuDNN), TF/s"),
    "ring": ("mpiring.bench.ring", "N GPUs under mpiexec: the ring per transport vs torch context parallel, TF/s"),
    "longctx": ("mpiring.bench.longctx", "memory vs memory_estimate, largest context, varlen vs fixed, step timelines"),
    "plot": ("mpiring.bench.plots", "figures from result JSON files: --plot DIR FILE.json ..."),
}


def register(name: str, module: str, help: str) -> None:
    """Add a subcommand: ``module`` defines ``add_arguments(parser)`` and ``run(args)``."""
    COMMANDS[name] = (module, help)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: python -m mpiring.bench {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:{width}}  {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(prog=f"python -m mpiring.bench {argv[0]}",
                                     description=module.__doc__.strip().splitlines()[0])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return run_or_abort(lambda: module.run(args)) or 0
