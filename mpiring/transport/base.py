"""The transport protocol: the ring loop's only view of communication.

A ring step *posts* one exchange (send buffers to ``send_rank`` = rank+1,
receive buffers from ``recv_rank`` = rank−1, unless the post names other peers: a
dK/dV partial going home) before its compute and *waits* for it after. Each post is
one hop of one message per send buffer (a block's rows still needed, maybe in parts:
``mpiring.layout.kv_rows``); transports count hops and bytes so that
tests can check the schedule (at most N−1 K/V hops forward, N−1 K/V + N dK/dV
backward: a K/V block travels only as far as some rank has work with it, and its
dK/dV partial one hop further, see ``mpiring.layout.kv_hops`` and ``dkv_plan``).

GPU transports receive two readiness tokens from the backend: ``send_ready``
(an event after which the send buffers hold their data) and ``recv_free`` (an
event after which no queued kernel reads the receive buffers). Host transports
ignore them: NumPy compute is synchronous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Transport", "Exchange"]


@dataclass
class Exchange:
    """One posted exchange; ``wait`` it exactly once."""

    requests: list = field(default_factory=list)
    done: bool = False


class Transport:
    """Base class: subclasses implement ``_post`` and ``_wait``."""

    name = "base"
    takes_background = False  # True: ``_post`` takes the ``background`` hint of :meth:`post`

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.send_rank = (self.rank + 1) % self.size
        self.recv_rank = (self.rank - 1) % self.size
        self.hops = 0  # messages posted since construction (one per send buffer per post)
        self.bytes_sent = 0  # their bytes
        self._pending = 0

    def post(self, send, recv, *, tag: int, send_ready=None, recv_free=None, send_to=None,
             recv_from=None, background: bool = False) -> Exchange:
        """Send ``send`` (list of messages) to rank+1 and receive ``recv`` from rank−1.

        A message is an array, or a tuple of arrays sent as its parts (the rows of a block
        that are still needed: one contiguous piece per batch and head); the receiver
        names the same parts. Either list may be empty (a ring step whose block goes no
        further, or whose next block is not needed here), not both; rank+1 posts the
        matching receives. ``send_to`` / ``recv_from``: one peer rank per message instead
        (same order); the peers post the matching operations in their exchange of the
        same ring step.

        ``background``: the caller has compute queued that hides this exchange even on a
        slower path; a transport may then move it with fewer GPU resources (``nccl``: a
        communicator of fewer channels). Both ends of every message must pass the same
        value: it may choose the channel the message travels on."""
        if not (send or recv):
            raise ValueError("post needs a buffer to send or to receive")
        send_to = [self.send_rank] * len(send) if send_to is None else [int(r) for r in send_to]
        recv_from = [self.recv_rank] * len(recv) if recv_from is None else [int(r) for r in recv_from]
        if len(send_to) != len(send) or len(recv_from) != len(recv):
            raise ValueError("send_to/recv_from need one peer rank per buffer")
        hops = len(send)
        send, send_to = _parts(send, send_to)
        recv, recv_from = _parts(recv, recv_from)
        hint = {"background": bool(background)} if self.takes_background else {}
        exchange = self._post(send, recv, tag=tag, send_ready=send_ready, recv_free=recv_free,
                              send_to=send_to, recv_from=recv_from, **hint)
        self.hops += hops
        self.bytes_sent += sum(int(buf.nbytes) for buf in send)
        self._pending += 1
        return exchange

    def wait(self, exchange: Exchange, timeout: float | None = None) -> None:
        """Block until the exchange completed (or make the compute stream wait for it).

        With ``timeout`` (seconds), raise :class:`TimeoutError` instead of waiting longer.
        """
        if exchange.done:
            raise RuntimeError("exchange already waited")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait(exchange, deadline)
        exchange.done = True
        self._pending -= 1

    @property
    def pending(self) -> int:
        """Exchanges posted and not yet waited (0 after every complete ring call)."""
        return self._pending

    def _post(self, send, recv, *, tag, send_ready, recv_free, send_to, recv_from) -> Exchange:  # pragma: no cover
        raise NotImplementedError

    def _wait(self, exchange: Exchange, deadline: float | None) -> None:  # pragma: no cover
        raise NotImplementedError


def _parts(messages, peers):
    """Messages and their peers as one list of arrays (a message in parts: each part)."""
    bufs, to = [], []
    for msg, peer in zip(messages, peers):
        parts = msg if isinstance(msg, tuple) else (msg,)
        bufs += parts
        to += [peer] * len(parts)
    return bufs, to
