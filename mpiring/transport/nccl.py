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
"""

from __future__ import annotations

import os

from mpiring.transport.gpu import GpuExchange, GpuTransport, device_bytes, poll_until

DEFAULT_CHANNELS = 16
NCCL_CHANNEL_VARS = ("NCCL_MAX_NCHANNELS", "NCCL_MAX_CTAS", "NCCL_MIN_NCHANNELS", "NCCL_MIN_CTAS")


def channels_from_env(environ=os.environ) -> tuple[int | None, str | None]:
    """(channels, None) from ``MPIRING_NCCL_CHANNELS`` (default :data:`DEFAULT_CHANNELS`),
    or (None, why) when it is not an integer ≥ 0."""
    text = environ.get("MPIRING_NCCL_CHANNELS", "").strip()
    if not text:
        return DEFAULT_CHANNELS, None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        return None, f"MPIRING_NCCL_CHANNELS={text!r} must be an integer >= 0 (0: NCCL's own choice)"
    return value, None


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

    def __init__(self, comm):
        super().__init__(comm)
        from cupy.cuda import nccl

        self._nccl = nccl
        channels, problem = channels_from_env()
        problems = [p for p in comm.allgather(problem) if p]  # every rank raises, none waits in bcast
        if problems:
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

    def _post(self, send, recv, *, tag, send_ready, recv_free, send_to, recv_from) -> GpuExchange:
        self.check_buffers((*send, *recv))
        stream, nccl = self.stream, self._nccl
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
                self.nccl_comm.send(view.data.ptr, view.size, nccl.NCCL_INT8, peer, stream.ptr)
            for buf, peer in zip(recv, recv_from):
                view = device_bytes(buf)
                self.nccl_comm.recv(view.data.ptr, view.size, nccl.NCCL_INT8, peer, stream.ptr)
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
