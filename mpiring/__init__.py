"""mpiring: exact Ring Attention over MPI ranks, for NumPy and CuPy arrays.

Public API::

    out, lse = ring_attention(q, k, v, comm, *, causal=..., layout=..., ...)
    dq, dk, dv = ring_attention_backward(dout, q, k, v, out, lse, comm, *, ...)
    q_local = shard(q_global, comm, layout=...);  q_global = unshard(q_local, comm, layout=...)
    out_ref, lse_ref = attention_reference(q, k, v, *, causal=..., ...)   # float64 oracle

Arrays are ``(batch, seqlen_local, heads, head_dim)``; see :func:`ring_attention`.
"""

from importlib.metadata import PackageNotFoundError, version

from mpiring.api import ring_attention, ring_attention_backward
from mpiring.layout import shard, unshard
from mpiring.memory import memory_estimate
from mpiring.merge import merge_partials
from mpiring.reference import attention_reference, attention_reference_backward

try:
    __version__ = version("mpiring")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ring_attention",
    "ring_attention_backward",
    "shard",
    "unshard",
    "attention_reference",
    "attention_reference_backward",
    "merge_partials",
    "memory_estimate",
    "__version__",
]
