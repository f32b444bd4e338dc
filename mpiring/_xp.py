"""Array-module helpers: NumPy or CuPy, without importing CuPy unless it is in use."""

from __future__ import annotations

import sys

import numpy as np

try:  # ml_dtypes registers bfloat16 with NumPy; CuPy uses the same dtype object.
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency
    bfloat16 = None

SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in (np.float16, bfloat16, np.float32, np.float64) if t is not None
)


def is_cupy(x) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_module(x):
    """``numpy`` or ``cupy``, whichever owns ``x`` (CuPy is only looked up if loaded)."""
    if is_cupy(x):
        return sys.modules["cupy"]
    return np


def compute_dtype(dtype) -> np.dtype:
    """float64 stays float64; every other supported dtype computes in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name
