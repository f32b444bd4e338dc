"""Transports behind one post/wait protocol (:class:`~mpiring.transport.base.Transport`).

Names: ``mpi-host`` (NumPy arrays, any MPI); the GPU transports ``mpi-cuda``,
``mpi-staged`` and ``nccl`` (CuPy arrays). ``auto`` picks per array kind;
the environment variable ``MPIRING_TRANSPORT`` overrides ``auto``.
"""

from __future__ import annotations

import os

from mpiring.transport.base import Exchange, Transport
from mpiring.transport.mpi_host import MpiHostTransport

__all__ = [
    "Exchange", "Transport", "MpiHostTransport", "TRANSPORTS", "check_transport_name", "chosen_transport",
    "select_transport",
]

HOST_TRANSPORTS = ("mpi-host",)
GPU_TRANSPORTS = ("mpi-cuda", "mpi-staged", "nccl")
TRANSPORTS = HOST_TRANSPORTS + GPU_TRANSPORTS


def _requested(name: str) -> str:
    return os.environ.get("MPIRING_TRANSPORT", "auto") if name == "auto" else name


def check_transport_name(name, array_kind: str | None) -> None:
    """Raise ValueError if ``name`` can't move arrays of ``array_kind`` ("numpy"/"cupy")."""
    if not isinstance(name, str) or name not in ("auto",) + TRANSPORTS:
        raise ValueError(f"transport={name!r} must be 'auto', one of {TRANSPORTS} or a Transport instance")
    name = _requested(name)
    if name == "auto":
        return
    allowed = HOST_TRANSPORTS if array_kind == "numpy" else GPU_TRANSPORTS
    if name not in allowed:
        raise ValueError(f"transport={name!r} can't move {array_kind} arrays; use one of {allowed}")


def select_transport(name: str, comm, xp) -> Transport:
    """A transport for arrays of module ``xp`` over ``comm`` (names checked already)."""
    name = _requested(name)
    if xp.__name__ == "numpy":
        return MpiHostTransport(comm)
    from mpiring.transport.gpu import select_gpu_transport

    return select_gpu_transport(name, comm)


def chosen_transport(array_kind: str = "cupy", comm=None, name: str = "auto") -> str:
    """The transport the ring uses for ``array_kind`` ("numpy"/"cupy") arrays on ``comm``.

    Collective for "cupy" (default ``MPI.COMM_WORLD``; honours ``MPIRING_TRANSPORT``);
    :func:`mpiring.transport.gpu.chosen_gpu_transport` also says why.
    """
    check_transport_name(name, array_kind)
    if array_kind == "numpy":
        return MpiHostTransport.name
    from mpiring.transport.gpu import chosen_gpu_transport

    return chosen_gpu_transport(comm, name)[0]
