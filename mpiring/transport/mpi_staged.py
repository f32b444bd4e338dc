"""Host-staged MPI for any MPI: device → pinned host → MPI → pinned host → device, in chunks.

Per exchange (DESIGN.md §4):

* ``post``: a device-to-host stream waits on ``send_ready``, then copies each send buffer
  into pinned host memory chunk by chunk, with an event per chunk; receives are posted
  for every chunk at once.
* progress (in ``post``, ``wait``): a chunk whose copy has finished is sent (Isend); a
  chunk that has arrived is copied host-to-device on a second stream, which first waits on
  ``recv_free`` so it never overwrites a buffer that a queued kernel still reads.
* ``wait`` returns once MPI has completed; the compute stream waits on an event after the
  last host-to-device copy (no host synchronisation on it).

Chunking pipelines the three legs, and the host drives them while the compute stream runs
the step's kernel. Two copy streams keep one exchange's host-to-device copies from queuing
behind another exchange's device-to-host copies (backward has the K/V and dK/dV exchanges
in flight together).
"""

from __future__ import annotations

from collections import deque

from mpi4py import MPI

from mpiring.transport.gpu import GpuExchange, GpuTransport, byte_pieces, device_bytes, poll_until

# 8 MiB: at PCIe/host-copy rates (~10–50 GB/s) a chunk takes 0.2–0.8 ms, well above the
# ~20 µs of per-chunk Python and MPI overhead, and a 512 MiB block still has 64 chunks to
# pipeline.
DEFAULT_CHUNK_BYTES = 8 << 20


class MpiStagedTransport(GpuTransport):
    """CuPy buffers over a host-memory MPI (not CUDA-aware), through pinned staging buffers."""

    name = "mpi-staged"

    def __init__(self, comm, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__(comm)
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes!r} must be a positive int")
        self.chunk_bytes = chunk_bytes
        with self.device:
            self.d2h_stream = self.high_priority_stream()
            self.h2d_stream = self.high_priority_stream()
        self._free: dict[int, list] = {}  # nbytes -> [(pinned uint8 array, event it is busy until)]
        self._inflight: list[GpuExchange] = []

    # --- pinned staging buffers, reused across calls ----------------------------------
    def _acquire(self, nbytes: int):
        free = self._free.get(nbytes)
        if free:
            host, busy_until = free.pop()
            if busy_until is not None:
                busy_until.synchronize()  # an earlier host-to-device copy may still read it
            return host
        import cupyx

        return cupyx.empty_pinned((nbytes,), dtype="uint8")

    def _release(self, host, busy_until=None) -> None:
        self._free.setdefault(host.size, []).append((host, busy_until))

    # --- the exchange -------------------------------------------------------------------
    def _post(self, send, recv, *, tag, send_ready, recv_free, send_to, recv_from) -> GpuExchange:
        self.check_buffers((*send, *recv))
        rt = self.cupy.cuda.runtime
        ex = GpuExchange()
        st = ex.state
        st.update(tag=tag, recv_free=recv_free, h2d_started=False, to_send=deque(), send_reqs=[],
                  recv_chunks=[], recv_reqs=[], hosts_send=[], hosts_recv=[], complete=False)
        if send_ready is not None:
            self.d2h_stream.wait_event(send_ready)
        for buf, dest in zip(send, send_to):
            dev = device_bytes(buf)
            host = self._acquire(dev.size)
            st["hosts_send"].append(host)
            for lo, hi in byte_pieces(dev.size, self.chunk_bytes):
                if hi > lo:
                    rt.memcpyAsync(host.ctypes.data + lo, dev.data.ptr + lo, hi - lo,
                                   rt.memcpyDeviceToHost, self.d2h_stream.ptr)
                st["to_send"].append((self._event(self.d2h_stream, timing=False), host[lo:hi], dest))
        for buf, source in zip(recv, recv_from):
            dev = device_bytes(buf)
            host = self._acquire(dev.size)
            st["hosts_recv"].append(host)
            for lo, hi in byte_pieces(dev.size, self.chunk_bytes):
                st["recv_reqs"].append(self.comm.Irecv([host[lo:hi], MPI.BYTE], source=source, tag=tag))
                st["recv_chunks"].append((dev, host, lo, hi))
        st["recv_left"] = len(st["recv_reqs"])
        self._inflight.append(ex)
        self._mark_post(ex, tag, comm_start=self.wtime())
        self._progress(ex)
        return ex

    def _progress(self, ex: GpuExchange) -> bool:
        """Move ``ex`` on without blocking; True once its MPI part has completed."""
        st = ex.state
        if st["complete"]:
            return True
        to_send = st["to_send"]
        while to_send and to_send[0][0].done:  # in order: MPI matches chunks in posting order
            _, piece, dest = to_send.popleft()
            st["send_reqs"].append(self.comm.Isend([piece, MPI.BYTE], dest=dest, tag=st["tag"]))
        if st["recv_left"]:
            for i in MPI.Request.Testsome(st["recv_reqs"]) or ():
                self._copy_in(st, *st["recv_chunks"][i])
                st["recv_left"] -= 1
        st["complete"] = not to_send and not st["recv_left"] and MPI.Request.Testall(st["send_reqs"])
        return st["complete"]

    def _copy_in(self, st: dict, dev, host, lo: int, hi: int) -> None:
        if not st["h2d_started"]:
            st["h2d_started"] = True
            if st["recv_free"] is not None:
                self.h2d_stream.wait_event(st["recv_free"])
        if hi > lo:
            rt = self.cupy.cuda.runtime
            rt.memcpyAsync(dev.data.ptr + lo, host.ctypes.data + lo, hi - lo, rt.memcpyHostToDevice,
                           self.h2d_stream.ptr)

    def _wait(self, exchange: GpuExchange, deadline: float | None) -> None:
        self._mark_wait_begin(exchange)

        def done():
            for other in self._inflight:  # keep every exchange in flight moving
                self._progress(other)
            return exchange.state["complete"]

        poll_until(done, deadline, self)
        self._inflight.remove(exchange)
        arrived = self._event(self.h2d_stream, timing=False)
        self.cupy.cuda.get_current_stream().wait_event(arrived)
        st = exchange.state
        for host in st["hosts_send"]:
            self._release(host)  # its copy finished before the Isend, which has completed
        for host in st["hosts_recv"]:
            self._release(host, arrived)
        self._mark_done(exchange, self.wtime())
