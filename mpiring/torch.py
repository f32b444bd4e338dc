"""PyTorch autograd for the ring: :func:`ring_attention` as a ``torch.autograd.Function``.

Optional: ``import mpiring`` never imports this module, and this module imports
torch only when :func:`ring_attention` is first called. The ranks are those of an
MPI communicator (mpi4py), not a ``torch.distributed`` group: mpiring runs on MPI.

Tensors go through :mod:`mpiring.interop` with no copy (CPU tensors as NumPy
arrays, CUDA tensors as CuPy arrays), so this works wherever
:func:`mpiring.ring_attention` does. Typical use inside a model whose sequence is
sharded over the ranks::

    import mpiring.torch
    out = mpiring.torch.ring_attention(q, k, v, comm=comm, causal=True, layout="zigzag")
    # q: (batch, seqlen_local, heads, head_dim); out has q's shape, dtype and device

The parameters are replicated on every rank, so their gradients must be summed
over the ranks after ``backward()`` (as data parallelism does); the gradients of
q, k, v are exact per shard: the backward ring sends each dK/dV home.
"""

from __future__ import annotations

import contextlib
import functools

import mpiring
from mpiring.api import refuse_everywhere

__all__ = ["ring_attention"]


def ring_attention(
    q, k, v, *, comm=None, causal=False, softmax_scale=None, layout="contiguous", window=None,
    cu_seqlens=None, transport="auto", timeout=None, deterministic=True,
):
    """Exact attention over a sequence sharded across the ranks of ``comm``, differentiable.

    Collective, forward and backward: every rank of ``comm`` calls it (and later
    runs ``backward()`` through it) with its own shard.

    Parameters
    ----------
    q : torch.Tensor ``(batch, seqlen_local, heads, head_dim)``, CPU or CUDA.
    k, v : torch.Tensor ``(batch, seqlen_local, heads_kv, head_dim)``, ``heads % heads_kv == 0``;
        float16, bfloat16, float32 or float64, all q's dtype and device.
    comm : mpi4py intracommunicator (default ``MPI.COMM_WORLD``).
    causal, softmax_scale, layout, window, cu_seqlens, transport, timeout :
        as in :func:`mpiring.ring_attention` (``softmax_scale`` default ``1/sqrt(head_dim)``;
        ``layout`` is how the sequence was split, see :func:`mpiring.shard`).
    deterministic : passed to :func:`mpiring.ring_attention_backward` (default True:
        bitwise reproducible gradients; False: the CUDA kernels add dQ with atomics).

    Returns
    -------
    out : torch.Tensor ``(batch, seqlen_local, heads, head_dim)``, q's dtype and device.
    Gradients flow to q, k and v through :func:`mpiring.ring_attention_backward`;
    forward saves q, k, v, out and the float32 log-sum-exp ``(batch, heads, seqlen_local)``.
    """
    torch = _import_torch()
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):  # raised on every rank: the others are in the ring's validation
            refuse_everywhere(comm, "ring_attention", TypeError,
                              f"{name} must be a torch.Tensor, got {type(x).__name__} (use mpiring.ring_attention)",
                              timeout)
    options = dict(comm=comm, causal=causal, softmax_scale=softmax_scale, layout=layout, window=window,
                   cu_seqlens=cu_seqlens, transport=transport, timeout=timeout)
    return _function().apply(q, k, v, options, deterministic)


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("mpiring.torch needs PyTorch (pip install torch)") from exc
    return torch


def _device_scope(tensor):
    """Make a CUDA tensor's device CuPy's current one: backward may run on an autograd
    worker thread, whose CuPy device is thread-local and defaults to 0."""
    if getattr(tensor, "is_cuda", False):
        import cupy

        return cupy.cuda.Device(tensor.get_device())
    return contextlib.nullcontext()


def _ready(x):
    """Detached (DLPack refuses tensors that require grad) and contiguous (what the kernels read)."""
    torch = _import_torch()
    return x.detach().contiguous() if isinstance(x, torch.Tensor) else x


@functools.cache
def _function():
    torch = _import_torch()

    class RingAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, options, deterministic):
            q, k, v = _ready(q), _ready(k), _ready(v)
            with _device_scope(q):
                out, lse = mpiring.ring_attention(q, k, v, return_lse=True, **options)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.options, ctx.deterministic = options, deterministic
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable  # the ring backward is not itself differentiable
        def backward(ctx, dout):
            q, k, v, out, lse = (_ready(t) for t in ctx.saved_tensors)  # out comes back requiring grad
            with _device_scope(q):
                dq, dk, dv = mpiring.ring_attention_backward(_ready(dout), q, k, v, out, lse,
                                                             deterministic=ctx.deterministic, **ctx.options)
            return dq, dk, dv, None, None

    return RingAttention
