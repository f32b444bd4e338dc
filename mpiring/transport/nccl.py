"""NCCL point-to-point through ``cupy.cuda.nccl``, entirely on streams.

The NCCL communicator is made from the MPI communicator (rank 0's unique id broadcast
over MPI) once per communicator and device, and cached (see
:func:`mpiring.transport.gpu.select_gpu_transport`). Each exchange is one NCCL group
(send to rank+1, receive from rank−1, or the peers the post names) on a high-priority communication stream:

* the communication stream waits on ``send_ready`` and ``recv_free`` (events of the
  compute stream), so the send reads finished data and the receive never overwrites a
  buffer that a queued kernel still reads;
* ``wait`` makes the current (compute) stream wait on an event recorded after the group.

No host synchronisation anywhere in the ring loop (DESIGN.md §4): the host only queues.

Channels: each NCCL channel of a transfer is a block of NCCL's kernel on an SM that the
attention kernels then lack. Unless the user chose NCCL's channels (``NCCL_MAX_NCHANNELS``,
``NCCL_MAX_CTAS``, ``NCCL_MIN_NCHANNELS``, ``NCCL_MIN_CTAS``) ``NCCL_MAX_NCHANNELS`` is set
to ``MPIRING_NCCL_CHANNELS`` (default 16; 0 leaves NCCL's own choice) while mpiring creates
its communicator, and removed again: NCCL reads it then (once per process and NCCL library:
CuPy's; a communicator CuPy's NCCL made earlier in the process fixes it before us), so
torch's NCCL and the rest of the process never see it.
Measured on 4x H100, 32k tokens per GPU, timed fairly (bench/README.md, "Long context",
sixth session): 16 channels against 4 cost the fixed-length forward 1.5-2 % and gained
forward+backward 0.2-0.8 %, and packed documents (striped, 16 documents) 0.42 -> 0.60 of
fixed-length throughput: with documents a step has little compute to hide its transfer
under, and 4 channels moved a K/V block at ~50 GB/s, 16 at ~100-120 GB/s. (The earlier
default of 4 rested on H200 runs timed with the compute-only baseline first, which
favoured it.)

A second, lean communicator (``MPIRING_NCCL_LEAN_CHANNELS``, default 4; 0: none) carries
the exchanges that the ring posts with ``background=True``: those with enough compute
queued to hide them even at a lean communicator's pace (``mpiring.api``). Its fewer
channels take less SM time from the attention kernels for the same bytes (4x H200,
non-causal forward+backward at 32k tokens per GPU, ``bench/ring_probe.py``: the kernels
of the rank that set the pace ran 21-23 ms longer than without transfers beside 4
channels, 33-35 ms beside 16; efficiency 0.946-0.957 before, 0.958-0.964 after), while
the exchange that nothing hides (a block's dK/dV going home after the last compute) keeps
the fast one. It is made with ``ncclCommInitRankConfig`` (``maxCTAs``), which CuPy does not
wrap (:mod:`mpiring.transport._nccl_lib`); where that library call is not available on
every rank (no single libnccl found, NCCL older than 2.17) all exchanges use the one
communicator.
"""

from __future__ import annotations

import os
import weakref

from mpiring.transport.gpu import GpuExchange, GpuTransport, device_bytes, poll_until

DEFAULT_CHANNELS = 16
DEFAULT_LEAN_CHANNELS = 4
NCCL_CHANNEL_VARS = ("NCCL_MAX_NCHANNELS", "NCCL_MAX_CTAS", "NCCL_MIN_NCHANNELS", "NCCL_MIN_CTAS")


def channels_from_env(environ=os.environ, *, name="MPIRING_NCCL_CHANNELS",
                      default=DEFAULT_CHANNELS) -> tuple[int | None, str | None]:
    """(channels, None) from ``MPIRING_NCCL_CHANNELS`` (default :data:`DEFAULT_CHANNELS`),
    or another variable ``name``, or (None, why) when it is not an integer ≥ 0."""
    text = environ.get(name, "").strip()
    if not text:
        return default, None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        what = "NCCL's own choice" if name == "MPIRING_NCCL_CHANNELS" else "none"
        return None, f"{name}={text!r} must be an integer >= 0 (0: {what})"
    return value, None


def lean_library():
    """:class:`~mpiring.transport._nccl_lib.NcclLib` over the libnccl CuPy loaded, or None
    where it can't make a config'd communicator (not one libnccl mapped, older than 2.17)."""
    from mpiring.transport import _nccl_lib

    path = _nccl_lib.loaded_path()
    if path is None:
        return None
    try:
        lib = _nccl_lib.NcclLib(path)
        return lib if lib.version() >= _nccl_lib.CONFIG_VERSION else None
    except (OSError, AttributeError, RuntimeError):
        return None


def cap_channels(channels: int, environ=os.environ) -> bool:
    """Set ``NCCL_MAX_NCHANNELS`` to ``channels`` unless it is 0 or the user set one of
    :data:`NCCL_CHANNEL_VARS`; True if it was set."""
    if channels == 0 or any(name in environ for name in NCCL_CHANNEL_VARS):
        return False
    environ["NCCL_MAX_NCHANNELS"] = str(channels)
    return True


class NcclTransport(GpuTransport):
    """Grouped ncclSend/ncclRecv of CuPy buffers on a communication stream (collective to create)."""

    name = "nccl"
    takes_background = True

    def __init__(self, comm):
        super().__init__(comm)
        from cupy.cuda import nccl

        self._nccl = nccl
        channels, problem = channels_from_env()
        lean, lean_problem = channels_from_env(name="MPIRING_NCCL_LEAN_CHANNELS", default=DEFAULT_LEAN_CHANNELS)
        problems = [p for pair in comm.allgather((problem, lean_problem)) for p in pair if p]
        if problems:  # every rank raises, none waits in bcast
            raise ValueError(f"transport='nccl': {problems[0]} (on at least one rank)")
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        capped = cap_channels(channels)
        try:
            with self.device:
                self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
                self.stream = self.high_priority_stream()
        finally:
            if capped:
                del os.environ["NCCL_MAX_NCHANNELS"]
        self.channels = channels if capped else None  # None: NCCL's (or the user's) choice
        self._fast = _CupyComm(self.nccl_comm, nccl.NCCL_INT8)
        # The lean communicator: on every rank or on none (each rank's library decides).
        lib = lean_library() if lean else None
        self._lean, self.lean_channels = None, None
        if all(comm.allgather(lib is not None)):
            lean_uid = comm.bcast(lib.unique_id() if self.rank == 0 else None, root=0)
            with self.device:
                self._lean = _LeanComm(lib, lib.init_rank(self.size, lean_uid, self.rank, lean))
            self.lean_channels = lean
            # Destroyed with the transport; not at exit, where the peers may be gone.
            weakref.finalize(self, lib.destroy, self._lean.handle).atexit = False
        self.lean_hops = 0  # message parts sent over the lean communicator

    def _post(self, send, recv, *, tag, send_ready, recv_free, send_to, recv_from, background=False) -> GpuExchange:
        self.check_buffers((*send, *recv))
        stream, nccl = self.stream, self._nccl
        if background and self._lean is not None:  # both ends of a message choose alike (``post``)
            comm, self.lean_hops = self._lean, self.lean_hops + len(send)
        else:
            comm = self._fast
        for event in (send_ready, recv_free):
            if event is not None:
                stream.wait_event(event)
        ex, timing = GpuExchange(), self._timeline is not None
        self._mark_post(ex, tag, comm_start=self._event(stream) if timing else None)
        # Bytes (NCCL_INT8): bfloat16 and the fp32 dK/dV travel alike; the tag is not needed,
        # NCCL matches sends and receives in issue order per peer.
        nccl.groupStart()
        try:
            for buf, peer in zip(send, send_to):
                view = device_bytes(buf)
                comm.send(view.data.ptr, view.size, peer, stream.ptr)
            for buf, peer in zip(recv, recv_from):
                view = device_bytes(buf)
                comm.recv(view.data.ptr, view.size, peer, stream.ptr)
        finally:
            nccl.groupEnd()
        ex.event = self._event(stream, timing=timing)
        return ex

    def _wait(self, exchange: GpuExchange, deadline: float | None) -> None:
        self._mark_wait_begin(exchange)
        if deadline is not None:  # only a caller that asked for a timeout pays a host poll
            poll_until(lambda: exchange.event.done, deadline, self, pause=1e-4)
        self.cupy.cuda.get_current_stream().wait_event(exchange.event)
        self._mark_done(exchange, exchange.event)


class _CupyComm:
    """A ``cupy.cuda.nccl`` communicator, sending and receiving bytes."""

    def __init__(self, comm, int8):
        self.comm, self.int8 = comm, int8

    def send(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        self.comm.send(ptr, nbytes, self.int8, peer, stream)

    def recv(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        self.comm.recv(ptr, nbytes, self.int8, peer, stream)


class _LeanComm:
    """A communicator made by :class:`~mpiring.transport._nccl_lib.NcclLib`, likewise."""

    def __init__(self, lib, handle: int):
        self.lib, self.handle = lib, handle

    def send(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        self.lib.send(ptr, nbytes, peer, self.handle, stream)

    def recv(self, ptr: int, nbytes: int, peer: int, stream: int) -> None:
        self.lib.recv(ptr, nbytes, peer, self.handle, stream)
