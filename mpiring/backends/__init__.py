"""Compute backends: one object per array module, called once per ring step."""

from __future__ import annotations

from mpiring.backends.numpy_ import BlockwiseBackend

__all__ = ["BlockwiseBackend", "backend_for"]

_BACKENDS: dict = {}


def backend_for(xp) -> BlockwiseBackend:
    """The backend for an array module (memoised)."""
    if xp not in _BACKENDS:
        _BACKENDS[xp] = BlockwiseBackend(xp)
    return _BACKENDS[xp]
