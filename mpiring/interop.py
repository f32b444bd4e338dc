"""DLPack in and out: torch, JAX, CuPy and NumPy arrays, zero-copy.

:func:`import_arrays` turns what the caller passed into the two kinds the ring
computes on, and gives back an ``export`` function that turns results into the
caller's kind again:

* NumPy and CuPy arrays pass through untouched.
* Anything with ``__dlpack__`` on a CUDA device (torch, JAX, CuPy-like) becomes a
  CuPy array through ``cupy.from_dlpack``. CuPy passes its current stream to the
  producer's ``__dlpack__(stream=…)``, and the producer (per the DLPack protocol)
  makes that stream wait for the work it queued on its own current stream, so a
  write the caller made on a side stream right before the call is seen.
* Anything with ``__dlpack__`` on the CPU (torch, JAX CPU) becomes a NumPy array
  through ``numpy.from_dlpack``. NumPy can't import bfloat16 through DLPack, so
  bfloat16 is relabelled as uint16 inside the DLPack capsule (same bits, same
  memory) and viewed as ``ml_dtypes.bfloat16``: still zero-copy.
* Results go back with ``torch.from_dlpack`` or ``jax.dlpack.from_dlpack``, which
  pass *their* current stream, so CuPy makes the caller's stream wait for the ring.
  XLA on the CPU imports only 64-byte aligned buffers without a copy; NumPy's
  are often 16-byte aligned, so a JAX CPU result may be one copy.

torch and JAX are never imported here: a torch tensor is recognised only if
``torch`` is already in ``sys.modules`` (the caller made one), likewise JAX.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import numpy as np

from mpiring._xp import bfloat16, is_cupy

__all__ = ["import_arrays", "to_native", "export_like", "array_kind"]

# DLPack constants (dlpack.h): device types and dtype codes.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_DL_UINT, _DL_BFLOAT = 1, 4
_DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 10: "ROCm",
                 13: "CUDA managed", 14: "oneAPI"}


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("dtype", _DLDataType), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensorVersioned(ctypes.Structure):  # DLPack >= 1.0; the older DLManagedTensor starts with the tensor
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _relabel_capsule(capsule, old_code: int, new_code: int):
    """Change the dtype code of a not-yet-consumed DLPack capsule of 16-bit scalars in place."""
    name = _capsule_name(capsule)
    address = _capsule_pointer(capsule, name)
    if name == b"dltensor_versioned":
        tensor = _DLManagedTensorVersioned.from_address(address).dl_tensor
    elif name == b"dltensor":
        tensor = _DLTensor.from_address(address)
    else:
        raise BufferError(f"not an unconsumed DLPack capsule: {name!r}")
    dt = tensor.dtype
    if (dt.code, dt.bits, dt.lanes) != (old_code, 16, 1):
        raise BufferError(f"expected 16-bit dtype code {old_code}, got code={dt.code} bits={dt.bits} lanes={dt.lanes}")
    dt.code = new_code
    return capsule


class _Relabelled:
    """A DLPack producer that hands out ``producer``'s capsule with bfloat16 ↔ uint16
    relabelled (same 16-bit elements, same memory): lets NumPy import bfloat16 and
    export ``ml_dtypes.bfloat16``, which its DLPack code does not know."""

    def __init__(self, producer, old_code: int, new_code: int):
        self._producer, self._codes = producer, (old_code, new_code)

    def __dlpack_device__(self):
        return self._producer.__dlpack_device__()

    def __dlpack__(self, *args, **kwargs):
        return _relabel_capsule(self._producer.__dlpack__(*args, **kwargs), *self._codes)


class _Unversioned:
    """``producer`` seen as a pre-1.0 DLPack producer (``max_version`` withheld): its
    capsule carries no read-only flag. For a consumer that refuses read-only imports
    (JAX arrays are immutable); mpiring only reads its inputs."""

    def __init__(self, producer):
        self._producer = producer

    def __dlpack_device__(self):
        return self._producer.__dlpack_device__()

    def __dlpack__(self, stream=None, **_ignored):
        return self._producer.__dlpack__(stream=stream)


# --- array kinds ----------------------------------------------------------------------------
def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_jax(x) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def array_kind(x) -> str | None:
    """``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"``, ``"dlpack"`` (another DLPack producer) or None."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_cupy(x):
        return "cupy"
    if _is_torch(x):
        return "torch"
    if _is_jax(x):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return "dlpack"
    return None


def _is_bfloat16(x) -> bool:
    return str(getattr(x, "dtype", "")).rsplit(".", 1)[-1] == "bfloat16"


def to_native(x, name: str = "array"):
    """``x`` as a NumPy or CuPy array sharing its memory (see the module docstring).

    NumPy/CuPy arrays and objects without DLPack are returned unchanged.
    Raises TypeError (with the reason) if a DLPack object can't be imported.
    """
    kind, typename = array_kind(x), type(x).__name__
    if kind in (None, "numpy", "cupy"):
        return x
    if kind == "torch" and x.requires_grad:
        raise TypeError(f"{name} is a torch tensor that requires grad; use mpiring.torch.ring_attention "
                        f"for autograd, or pass {name}.detach()")
    try:
        device_type = int(x.__dlpack_device__()[0])
    except Exception as exc:  # noqa: BLE001 - any producer error becomes a TypeError
        raise TypeError(f"{name}: {typename}.__dlpack_device__() failed: {exc}") from exc
    if device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        # CuPy passes the current stream of x's device to x.__dlpack__(stream=...).
        from_dlpack = _import_cupy(name, typename).from_dlpack

        def importer(y):
            try:
                return from_dlpack(y)
            except BufferError:  # e.g. a read-only capsule: ask for an unversioned one
                return from_dlpack(_Unversioned(y))
    elif device_type in (_DL_CPU, _DL_CUDA_HOST):
        importer = np.from_dlpack
        if _is_bfloat16(x):
            x, importer = _Relabelled(x, _DL_BFLOAT, _DL_UINT), lambda y: np.from_dlpack(y).view(bfloat16)
    else:
        device = _DEVICE_NAMES.get(device_type, f"device type {device_type}")
        raise TypeError(f"{name}: {typename} on a {device} device is not supported (CPU and CUDA are)")
    try:
        return importer(x)
    except (BufferError, RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        raise TypeError(f"{name}: importing {typename} through DLPack failed: {exc}") from exc


def _import_cupy(name: str, typename: str):
    try:
        import cupy
    except ImportError as exc:
        raise TypeError(f"{name} is a {typename} on a CUDA device: install CuPy (the mpiring[cuda12] or "
                        f"mpiring[cuda13] extra) to use CUDA arrays") from exc
    return cupy


def export_like(x, kind: str | None):
    """A NumPy/CuPy result ``x`` as an array of ``kind`` (as :func:`array_kind` names it), zero-copy."""
    if kind == "torch":
        import torch

        return torch.from_dlpack(_exportable(x))
    if kind == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(_exportable(x))
    return x  # numpy, cupy, and other DLPack producers get NumPy/CuPy back


def _exportable(x):
    if isinstance(x, np.ndarray) and x.dtype == bfloat16:
        return _Relabelled(x.view(np.uint16), _DL_UINT, _DL_BFLOAT)
    return x


def import_arrays(named: dict) -> tuple[dict, Callable, str | None]:
    """Convert the caller's arrays for the ring (never raises, so the check stays collective).

    Parameters
    ----------
    named : ``{name: array}``; the first entry's kind decides the kind of the results.
        None values pass through.

    Returns
    -------
    arrays : ``{name: NumPy or CuPy array}`` (None where the conversion failed).
    export : turns a NumPy/CuPy result into the first entry's kind.
    problem : the first failure's message, or None.
    """
    arrays, problem = {}, None
    for name, x in named.items():
        try:
            arrays[name] = None if x is None else to_native(x, name)
        except TypeError as exc:
            arrays[name], problem = None, problem or str(exc)
    kind = array_kind(next(iter(named.values())))
    return arrays, lambda result: export_like(result, kind), problem
