"""GPU transports: which one to use, the CUDA-aware-MPI probe, one GPU per rank, and their common base.

Three transports move CuPy buffers around the ring behind the one post/wait protocol
(:class:`~mpiring.transport.base.Transport`):

* ``mpi-cuda`` (:mod:`.mpi_cuda`): Isend/Irecv on device buffers; needs a CUDA-aware MPI.
* ``nccl`` (:mod:`.nccl`): grouped NCCL send/recv on a communication stream.
* ``mpi-staged`` (:mod:`.mpi_staged`): device → pinned host → MPI → device, in chunks; any MPI.

``transport="auto"`` picks ``mpi-cuda`` when the loaded MPI says it is CUDA-aware
(``MPIX_Query_cuda_support``), else ``nccl`` when CuPy has NCCL and every rank of a node
has its own GPU, else ``mpi-staged``. ``MPIRING_TRANSPORT`` overrides ``auto``;
``MPIRING_CUDA_AWARE_MPI=1`` (or ``0``) overrides the probe, for MPIs that are CUDA-aware
without exporting it (or that claim it where the GPU path is broken).

Every decision here is agreed on all ranks (one small allreduce) so that ranks never pick
different transports. Transports are cached per communicator: creating an NCCL
communicator costs a collective and ~100 ms.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import dataclass, field

from mpi4py import MPI

from mpiring.transport.base import Exchange, Transport

__all__ = [
    "GpuTransport",
    "GpuExchange",
    "chosen_gpu_transport",
    "mpi_cuda_support",
    "select_device",
    "select_gpu_transport",
]

_ENV_CUDA_AWARE = "MPIRING_CUDA_AWARE_MPI"
_LIBMPI_NAME = re.compile(r"^libmpi(_\w+)?\.so")


# --- the CUDA-aware-MPI probe -----------------------------------------------------------
def _loaded_libmpi() -> str | None:
    """Path of the libmpi mapped into this process (Linux), whichever mpi4py loaded."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if _LIBMPI_NAME.match(os.path.basename(path)):
                    return path
    except OSError:
        pass
    return None


def _probe_symbol():
    """``MPIX_Query_cuda_support`` of the loaded MPI, or None where it is not exported."""
    candidates = [_loaded_libmpi(), MPI.__file__, None]  # None: the global namespace
    for path in candidates:
        try:
            # RTLD_NOLOAD: only look at what is loaded; never load a second MPI.
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL) if path else ctypes.CDLL(None)
        except OSError:
            continue
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, []
            return fn
    return None


_PROBE: dict = {}


def mpi_cuda_support() -> tuple[bool, str]:
    """Whether the loaded MPI accepts device pointers, and why we think so.

    Returns ``(supported, reason)``. The probe says how MPI was *built* (Open MPI
    answers 1 even where libcuda is missing); ``MPIRING_CUDA_AWARE_MPI=0/1`` overrides it.
    """
    forced = os.environ.get(_ENV_CUDA_AWARE)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{_ENV_CUDA_AWARE}={forced!r} must be '0' or '1'")
        return forced == "1", f"{_ENV_CUDA_AWARE}={forced}"
    if "result" not in _PROBE:
        fn = _probe_symbol()
        if fn is None:
            _PROBE["result"] = (False, f"MPIX_Query_cuda_support not exported by {_loaded_libmpi() or 'libmpi'}")
        else:
            value = fn()
            _PROBE["result"] = (value == 1, f"MPIX_Query_cuda_support()={value} in {_loaded_libmpi() or 'libmpi'}")
    return _PROBE["result"]


# --- one GPU per rank -------------------------------------------------------------------
def select_device(comm=None) -> int:
    """Make GPU ``local_rank mod device_count`` current on this rank and return its id.

    Collective over ``comm`` (default ``MPI.COMM_WORLD``): the local rank is this rank's
    rank among the ranks of its node (``Split_type(COMM_TYPE_SHARED)``).
    ``MPIRING_DEVICE=<id>`` wins (still collective). Call it before allocating arrays:
    the ring runs on the device that holds them.
    """
    import cupy

    comm = MPI.COMM_WORLD if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local_rank = node.Get_rank()
    finally:
        node.Free()
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 1:
        raise RuntimeError("select_device: no CUDA device is visible")
    forced = os.environ.get("MPIRING_DEVICE")
    if forced is not None and not (forced.isdigit() and int(forced) < count):
        raise ValueError(f"MPIRING_DEVICE={forced!r} must be a device id below {count}")
    device = int(forced) if forced is not None else local_rank % count
    cupy.cuda.Device(device).use()
    return device


def _devices_distinct_per_node(comm, device_id: int) -> bool:
    """True where no two ranks of one node share a GPU (NCCL refuses that)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ids = node.allgather(device_id)
    finally:
        node.Free()
    return comm.allreduce(int(len(set(ids)) == len(ids)), op=MPI.MIN) == 1


def _nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", False))


def _all(comm, flag: bool) -> bool:
    return comm.allreduce(int(bool(flag)), op=MPI.MIN) == 1


def _resolve(name: str, comm) -> tuple[str, str]:
    """(transport name, why) for a requested name, agreed on all ranks; raises RuntimeError
    (on every rank) for a transport that can't work here."""
    import cupy

    device_id = cupy.cuda.Device().id
    if name in ("auto", "mpi-cuda"):
        supported, reason = mpi_cuda_support()
        if _all(comm, supported):
            return "mpi-cuda", reason
        if name == "mpi-cuda":
            raise RuntimeError(
                f"transport='mpi-cuda' needs a CUDA-aware MPI, but {reason} (on at least one rank; "
                f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}). Sending device buffers "
                f"through it would crash: use transport='nccl' or 'mpi-staged', or set "
                f"{_ENV_CUDA_AWARE}=1 if this MPI is CUDA-aware without saying so"
            )
        auto_reason = reason
    if name in ("auto", "nccl"):
        have_nccl = _all(comm, _nccl_available())
        distinct = have_nccl and _devices_distinct_per_node(comm, device_id)
        if have_nccl and distinct:
            return "nccl", "cupy.cuda.nccl available, one GPU per rank"
        why = "cupy.cuda.nccl is not available" if not have_nccl else "ranks of one node share a GPU"
        if name == "nccl":
            hint = "" if not have_nccl else " (call mpiring.transport.gpu.select_device() before allocating)"
            raise RuntimeError(f"transport='nccl' can't run: {why} on at least one rank{hint}")
        return "mpi-staged", f"{auto_reason}; {why}"
    if name == "mpi-staged":
        return "mpi-staged", "requested"
    raise ValueError(f"transport={name!r} is not a GPU transport; use 'auto', 'mpi-cuda', 'nccl' or 'mpi-staged'")


# --- choice and caching -----------------------------------------------------------------
_KEYVAL = MPI.KEYVAL_INVALID


def _cache(comm) -> dict:
    """Transports cached on ``comm`` (an MPI attribute), dropped when it is freed."""
    global _KEYVAL
    if _KEYVAL == MPI.KEYVAL_INVALID:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=lambda c, k, cache: cache.clear())
    cache = comm.Get_attr(_KEYVAL)
    if cache is None:
        cache = {}
        comm.Set_attr(_KEYVAL, cache)
    return cache


def select_gpu_transport(name: str, comm) -> GpuTransport:
    """The GPU transport ``name`` (``auto`` resolved as in the module docstring) over ``comm``.

    Collective on first use per (communicator, name, device); cached on ``comm`` after.
    """
    import cupy

    from mpiring.transport import _requested  # MPIRING_TRANSPORT, read in one place

    name = _requested(name)
    key = (name, cupy.cuda.Device().id)
    cache = _cache(comm)
    if key not in cache:
        resolved, reason = _resolve(name, comm)
        existing = cache.get((resolved, key[1]))
        if existing is None:
            existing = _construct(resolved, comm)
            existing.reason = reason
            cache[(resolved, key[1])] = existing
        cache[key] = existing
    return cache[key]


def _construct(name: str, comm) -> GpuTransport:
    if name == "mpi-cuda":
        from mpiring.transport.mpi_cuda import MpiCudaTransport

        return MpiCudaTransport(comm)
    if name == "nccl":
        from mpiring.transport.nccl import NcclTransport

        return NcclTransport(comm)
    from mpiring.transport.mpi_staged import MpiStagedTransport

    return MpiStagedTransport(comm)


def chosen_gpu_transport(comm=None, transport: str = "auto") -> tuple[str, str]:
    """``(name, reason)`` of the transport ``ring_attention`` uses for CuPy arrays on ``comm``.

    Collective (default ``MPI.COMM_WORLD``); honours ``MPIRING_TRANSPORT`` like the ring does.
    """
    from mpiring.api import private_comm

    tr = select_gpu_transport(transport, private_comm(MPI.COMM_WORLD if comm is None else comm))
    return tr.name, tr.reason


# --- the common base --------------------------------------------------------------------
@dataclass
class _StepTiming:
    """One exchange's timing: the compute stream's work between post and wait, and the transfer."""

    tag: int
    compute: tuple  # (start event, end event) on the compute stream
    comm: tuple = (None, None)  # events on a stream, or MPI.Wtime() floats


@dataclass
class GpuExchange(Exchange):
    """An exchange of device buffers; transports add what they need to finish it."""

    event: object = None  # nccl / mpi-staged: completion on the transport's stream
    timing: _StepTiming | None = None
    state: dict = field(default_factory=dict)


def device_bytes(buf):
    """A flat uint8 view of a contiguous CuPy array: MPI and NCCL can't describe bfloat16."""
    return buf.reshape(-1).view("uint8")


def byte_pieces(nbytes: int, piece: int) -> list[tuple[int, int]]:
    """``[(lo, hi), …]`` covering ``nbytes`` in runs of at most ``piece`` (one empty run for 0)."""
    return [(lo, min(lo + piece, nbytes)) for lo in range(0, nbytes, piece)] or [(0, 0)]


class GpuTransport(Transport):
    """Base of the CuPy transports: buffer checks, the device, optional per-step timing.

    Timing is off unless :meth:`start_timing` is called; then every exchange records two
    events on the compute stream (post → wait: the compute it overlaps) and the transfer's
    start and end, without any host synchronisation until :meth:`step_times`.
    """

    name = "gpu"
    reason = "constructed directly"

    def __init__(self, comm):
        super().__init__(comm)
        import cupy

        self.cupy = cupy
        self.device = cupy.cuda.Device()
        self._timeline: list | None = None

    def high_priority_stream(self):
        """A non-blocking stream whose blocks are scheduled before the compute stream's, so a
        transfer is not starved by a kernel that fills every SM. CUDA clamps a priority
        beyond its range to the highest (numerically lowest) one."""
        return self.cupy.cuda.Stream(non_blocking=True, priority=-(1 << 20))

    def check_buffers(self, buffers) -> None:
        for buf in buffers:
            if not isinstance(buf, self.cupy.ndarray):
                raise TypeError(f"{self.name}: transport buffers must be CuPy arrays, got {type(buf).__name__}")
            if not buf.flags.c_contiguous:
                raise ValueError(f"{self.name}: transport buffers must be C-contiguous")
            if buf.device.id != self.device.id:
                raise ValueError(f"{self.name}: buffer on device {buf.device.id}, transport on {self.device.id}")

    # --- timing (bench only) ------------------------------------------------------------
    def start_timing(self) -> None:
        """Record per-exchange timing from now on (see :meth:`step_times`)."""
        self._timeline = []

    def _mark_post(self, ex: GpuExchange, tag: int, comm_start=None) -> None:
        if self._timeline is not None:
            ex.timing = _StepTiming(tag, (self._event(), None), (comm_start, None))

    def _mark_wait_begin(self, ex: GpuExchange) -> None:
        if ex.timing is not None:
            ex.timing.compute = (ex.timing.compute[0], self._event())

    def _mark_done(self, ex: GpuExchange, comm_end) -> None:
        if ex.timing is not None:
            ex.timing.comm = (ex.timing.comm[0], comm_end)
            self._timeline.append(ex.timing)

    def _event(self, stream=None, *, timing=True):
        """An event recorded now on ``stream`` (default: the current stream)."""
        event = self.cupy.cuda.Event(disable_timing=not timing)
        event.record(stream)
        return event

    def step_times(self) -> list[dict]:
        """Synchronise, then ``[{"tag", "compute_s", "comm_s"}, …]`` per exchange since
        :meth:`start_timing`, and stop timing. ``compute_s``: the compute stream's time
        from post to wait; ``comm_s``: the transfer (stream events, or host time from
        post until MPI completed)."""
        cp = self.cupy
        self.device.synchronize()
        rows = []
        for t in self._timeline or []:
            compute = cp.cuda.get_elapsed_time(*t.compute) / 1e3
            a, b = t.comm
            comm = b - a if isinstance(a, float) else cp.cuda.get_elapsed_time(a, b) / 1e3
            rows.append({"tag": t.tag, "compute_s": compute, "comm_s": comm})
        self._timeline = None
        return rows

    @staticmethod
    def wtime() -> float:
        return MPI.Wtime()


def poll_until(done, deadline: float | None, transport, *, pause: float = 0.0) -> None:
    """Call ``done()`` until it is true; TimeoutError past ``deadline`` (time.monotonic).

    No pause by default: MPI moves a large host message only as fast as it is polled
    (shared-memory fragments), and a GPU rank owns its core.
    """
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"{transport.name}: ring exchange with ranks {transport.recv_rank} -> {transport.rank} -> "
                f"{transport.send_rank} did not complete in time"
            )
        if pause:
            time.sleep(pause)


def wait_all(requests: list, deadline: float | None, transport) -> None:
    """MPI Waitall (MPI's own progress loop, full speed), or Testall polling up to ``deadline``."""
    if deadline is None:
        MPI.Request.Waitall(requests)
    else:
        poll_until(lambda: MPI.Request.Testall(requests), deadline, transport)
