"""Compute backends: one object per array module, called once per ring step."""

from __future__ import annotations

import os

from mpiring.backends.numpy_ import BlockwiseBackend

__all__ = ["BlockwiseBackend", "backend_for"]

_BACKENDS: dict = {}


def backend_for(xp, *, dtype=None, head_dim=None, mask=None, seqlen_global=0, steps=None, deterministic=True):
    """The backend for one call: the CUDA kernels for float16/bfloat16 CuPy arrays of a
    head dim they cover (:func:`mpiring.backends.cupy_.kernel_applies`), else the
    blockwise backend of the array module (memoised; on CuPy a cuBLAS fallback).

    ``steps`` (the number of ring steps with work) lets the kernels skip the fp32
    state on the first step and write ``out`` directly on the last.
    ``deterministic=False`` lets the kernels' backward add dQ atomically in any order
    (the blockwise backend is deterministic either way).
    ``MPIRING_BACKEND=blockwise`` forces the blockwise backend.
    """
    if dtype is not None and xp.__name__ == "cupy" and os.environ.get("MPIRING_BACKEND") != "blockwise":
        from mpiring.backends.cupy_ import CudaKernelBackend, kernel_applies

        if kernel_applies(dtype, head_dim, mask, seqlen_global):
            return CudaKernelBackend(steps=steps, deterministic=deterministic)
    if xp not in _BACKENDS:
        _BACKENDS[xp] = BlockwiseBackend(xp)
    return _BACKENDS[xp]
