"""NCCL point-to-point through ``cupy.cuda.nccl``, entirely on streams.

The NCCL communicator is made from the MPI communicator (rank 0's unique id broadcast
over MPI) once per communicator and device, and cached (see
:func:`mpiring.transport.gpu.select_gpu_transport`). Each exchange is one NCCL group
(send to rank+1, receive from rank−1) on a high-priority communication stream:

* the communication stream waits on ``send_ready`` and ``recv_free`` (events of the
  compute stream), so the send reads finished data and the receive never overwrites a
  buffer that a queued kernel still reads;
* ``wait`` makes the current (compute) stream wait on an event recorded after the group.

No host synchronisation anywhere in the ring loop (DESIGN.md §4): the host only queues.
"""

from __future__ import annotations

from mpiring.transport.gpu import GpuExchange, GpuTransport, device_bytes, poll_until


class NcclTransport(GpuTransport):
    """Grouped ncclSend/ncclRecv of CuPy buffers on a communication stream (collective to create)."""

    name = "nccl"

    def __init__(self, comm):
        super().__init__(comm)
        from cupy.cuda import nccl

        self._nccl = nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        with self.device:
            self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
            self.stream = self.high_priority_stream()

    def _post(self, send, recv, *, tag, send_ready=None, recv_free=None) -> GpuExchange:
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
            for buf in send:
                view = device_bytes(buf)
                self.nccl_comm.send(view.data.ptr, view.size, nccl.NCCL_INT8, self.send_rank, stream.ptr)
            for buf in recv:
                view = device_bytes(buf)
                self.nccl_comm.recv(view.data.ptr, view.size, nccl.NCCL_INT8, self.recv_rank, stream.ptr)
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
