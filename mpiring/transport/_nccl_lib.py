"""The few NCCL calls that ``cupy.cuda.nccl`` does not offer, through ctypes.

CuPy makes a communicator with ``ncclCommInitRank`` only, so its channel count (each
channel is a block of NCCL's kernel on an SM) can be set only by ``NCCL_MAX_NCHANNELS``,
which NCCL reads once per process. :class:`NcclLib` makes a second communicator with
``ncclCommInitRankConfig`` and ``maxCTAs`` instead, and sends and receives on it, in
the very library CuPy loaded (found by its path in ``/proc/self/maps``), so that
CuPy's ``groupStart``/``groupEnd`` group its operations too.

``ncclConfig_t`` is declared as NCCL 2.17 laid it out (the fields up to ``splitShare``)
with that version in its ``version`` field: NCCL copies ``size`` bytes of it and keeps
its defaults for the fields added since (``src/init.cc``, ``parseCommConfig``).
"""

from __future__ import annotations

import ctypes
import os

CONFIG_VERSION = 21700  # NCCL_VERSION(2, 17, 0): the first with minCTAs/maxCTAs
_UNDEF_INT = -(2**31)  # NCCL_CONFIG_UNDEF_INT (INT_MIN)
_MAGIC = 0xCAFEBEEF
_INT8 = 0  # ncclInt8


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]  # NCCL_UNIQUE_ID_BYTES


class _Config(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
        ("splitShare", ctypes.c_int),
    ]


def config(max_ctas: int) -> _Config:
    """``NCCL_CONFIG_INITIALIZER`` (2.17 layout) with ``maxCTAs`` set."""
    return _Config(ctypes.sizeof(_Config), _MAGIC, CONFIG_VERSION, *(_UNDEF_INT,) * 3, int(max_ctas), None, _UNDEF_INT)


def loaded_path(maps: str = "/proc/self/maps") -> str | None:
    """The file of the one NCCL library mapped into this process; None if none or several."""
    paths = set()
    try:
        with open(maps) as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libnccl.so"):
                    paths.add(fields[5].strip())
    except OSError:
        return None
    return paths.pop() if len(paths) == 1 else None


class NcclLib:
    """ctypes view of a loaded libnccl: config'd communicators, send, receive."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)  # the mapped library: dlopen hands back the same handle
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for name, args in {
            "ncclGetVersion": [ctypes.POINTER(i)],
            "ncclGetUniqueId": [ctypes.POINTER(_UniqueId)],
            "ncclCommInitRankConfig": [ctypes.POINTER(vp), i, _UniqueId, i, ctypes.POINTER(_Config)],
            "ncclCommDestroy": [vp],
            "ncclSend": [vp, sz, i, i, vp, vp],
            "ncclRecv": [vp, sz, i, i, vp, vp],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, i
        lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [i], ctypes.c_char_p
        self._lib = lib

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: NCCL error {code} ({self._lib.ncclGetErrorString(code).decode()})")

    def version(self) -> int:
        v = ctypes.c_int()
        self._check(self._lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self._check(self._lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), ctypes.sizeof(uid))

    def init_rank(self, nranks: int, uid: bytes, rank: int, max_ctas: int) -> int:
        """A communicator of at most ``max_ctas`` channels on the current device (collective)."""
        comm, cid, cfg = ctypes.c_void_p(), _UniqueId(), config(max_ctas)
        ctypes.memmove(ctypes.addressof(cid), uid, ctypes.sizeof(cid))
        self._check(self._lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, cid, rank, ctypes.byref(cfg)),
                    "ncclCommInitRankConfig")
        return comm.value

    def send(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self._check(self._lib.ncclSend(ptr, nbytes, _INT8, peer, comm, stream), "ncclSend")

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self._check(self._lib.ncclRecv(ptr, nbytes, _INT8, peer, comm, stream), "ncclRecv")

    def destroy(self, comm: int) -> None:
        self._lib.ncclCommDestroy(comm)
