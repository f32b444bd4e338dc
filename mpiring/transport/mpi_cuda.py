"""CUDA-aware MPI: Isend/Irecv straight on device buffers.

MPI is stream-unaware (DESIGN.md §4): it reads and writes device memory whenever it
progresses, outside any CUDA stream. So before posting, the host synchronises

* ``send_ready`` — the stream that produced the send buffer has finished writing it;
* ``recv_free`` — no queued kernel still reads the receive buffer (the previous step's).

At step s both are events of work already queued *before* step s's kernel is launched,
so the wait is short; once ``Waitall`` returns, the data is in device memory (CUDA-aware
MPIs complete a request only after their own copies finished), and the compute stream
can read it without an event.

Compute on a non-blocking stream: on CUDA's legacy default stream (CuPy's default) the
transfers measured as long as the step's compute plus the copy (Open MPI 4.1 smcuda,
4×H200), i.e. they did not overlap — consistent with MPI's CUDA IPC copies running on
a blocking stream, which waits for kernels on the legacy stream.

Only constructed where :func:`mpiring.transport.gpu.mpi_cuda_support` is true: a
non-CUDA-aware MPI segfaults on a device pointer.
"""

from __future__ import annotations

from mpi4py import MPI

from mpiring.transport.gpu import GpuExchange, GpuTransport, byte_pieces, device_bytes, wait_all

# MPI counts are C ints in MPI-3 libraries (Open MPI 4.x): split larger messages.
_MAX_MESSAGE = 1 << 30


class MpiCudaTransport(GpuTransport):
    """Isend to rank+1 / Irecv from rank−1 on CuPy arrays (CUDA-aware MPI only)."""

    name = "mpi-cuda"

    def _post(self, send, recv, *, tag, send_ready, recv_free, send_to, recv_from) -> GpuExchange:
        self.check_buffers((*send, *recv))
        for event in (send_ready, recv_free):
            if event is not None:
                event.synchronize()
        reqs = [
            self.comm.Irecv([view[lo:hi], MPI.BYTE], source=src, tag=tag)
            for view, src in zip(map(device_bytes, recv), recv_from) for lo, hi in byte_pieces(view.size, _MAX_MESSAGE)
        ]
        reqs += [
            self.comm.Isend([view[lo:hi], MPI.BYTE], dest=dst, tag=tag)
            for view, dst in zip(map(device_bytes, send), send_to) for lo, hi in byte_pieces(view.size, _MAX_MESSAGE)
        ]
        ex = GpuExchange(requests=reqs)
        self._mark_post(ex, tag, comm_start=self.wtime())
        return ex

    def _wait(self, exchange: GpuExchange, deadline: float | None) -> None:
        self._mark_wait_begin(exchange)
        wait_all(exchange.requests, deadline, self)
        self._mark_done(exchange, self.wtime())

