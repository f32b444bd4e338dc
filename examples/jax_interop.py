"""JAX arrays in, JAX arrays out, no copies: calling the ring from JAX code.

    mpiexec -n 4 python -m mpi4py examples/jax_interop.py

Each rank holds its shard of q, k, v as ``jax.Array`` (on a GPU if JAX has one,
else on the CPU). ``mpiring.ring_attention`` takes them through DLPack — a CPU
array is viewed as a NumPy array, a GPU one as a CuPy array, without a copy — and
returns ``jax.Array``s on the same device. The ring is an MPI collective, not a
JAX primitive: call it between jitted functions, not inside ``jax.jit``.

Self-check: mpiring computes on the very buffers JAX holds (same pointer), and
out, lse, dq, dk, dv match ``jax.vjp`` of a dense attention written in
``jax.numpy`` on the whole sequence.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import mpiring
import mpiring.interop

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    print("SKIP examples/jax_interop.py: needs JAX (pip install jax jaxlib)")
    sys.exit(0)


def dense_attention(q, k, v, causal):
    """Attention on the whole sequence in jax.numpy: out ``(b, s, h, d)``, lse ``(b, h, s)``."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[3])
    if causal:
        seqlen = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((seqlen, seqlen), bool)), scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(scores - lse[..., None]), v), lse


def buffer_pointer(x) -> int:
    """Device or host address of a jax.Array, NumPy or CuPy array."""
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    if hasattr(x, "unsafe_buffer_pointer"):
        return x.unsafe_buffer_pointer()
    return x.data.ptr  # CuPy


def check(comm=MPI.COMM_WORLD, *, layout="zigzag", causal=True, seed=0, batch=1, seqlen_local=32, heads=4,
          heads_kv=2, head_dim=16, tol=2e-5):
    """Ring on jax.Array shards vs jax.vjp of :func:`dense_attention`. Returns
    ``{name: relative error}``; raises above ``tol`` (float32, measured ~1e-6) or if
    an input was copied."""
    devices = jax.devices()
    device = devices[comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank() % len(devices)]
    seqlen = seqlen_local * comm.Get_size()
    rng = np.random.default_rng(seed)  # the same global arrays on every rank
    q, dout = (rng.standard_normal((batch, seqlen, heads, head_dim), np.float32) for _ in range(2))
    k, v = (rng.standard_normal((batch, seqlen, heads_kv, head_dim), np.float32) for _ in range(2))

    def shard(x, axis=1):  # this rank's part, as a jax.Array on its device
        return jax.device_put(mpiring.shard(x, comm, layout=layout, axis=axis), device)

    ql, kl, vl, doutl = (shard(x) for x in (q, k, v, dout))
    for name, x in (("q", ql), ("k", kl), ("v", vl)):  # what mpiring will compute on is JAX's buffer
        if buffer_pointer(mpiring.interop.to_native(x, name)) != x.unsafe_buffer_pointer():
            raise AssertionError(f"{name} was copied on its way in")
    out, lse = mpiring.ring_attention(ql, kl, vl, comm, causal=causal, layout=layout)
    dq, dk, dv = mpiring.ring_attention_backward(doutl, ql, kl, vl, out, lse, comm, causal=causal, layout=layout)
    results = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    for name, x in results.items():
        if not isinstance(x, jax.Array) or x.devices() != {device}:
            raise AssertionError(f"{name} is a {type(x).__name__} on {getattr(x, 'devices', lambda: '?')()}")

    @jax.jit  # one XLA program: compiles faster than op-by-op dispatch of the vjp
    def reference(q, k, v, dout):
        (out, lse), vjp = jax.vjp(lambda *a: dense_attention(*a, causal), q, k, v)
        return out, lse, *vjp((dout, jnp.zeros_like(lse)))

    with jax.default_matmul_precision("highest"):
        out_ref, lse_ref, *grads_ref = reference(q, k, v, dout)
    refs = {"out": shard(out_ref), "lse": shard(lse_ref, axis=2), "dq": shard(grads_ref[0]),
            "dk": shard(grads_ref[1]), "dv": shard(grads_ref[2])}
    errors = {name: float(jnp.linalg.norm(results[name] - refs[name]) / jnp.linalg.norm(refs[name]))
              for name in results}
    bad = {name: e for name, e in errors.items() if e > tol}
    if bad:
        raise AssertionError(f"relative error above {tol:.0e}: {bad}")
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="zigzag", choices=list(mpiring.layout.LAYOUTS))
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    errors = check(comm, layout=args.layout)
    if comm.Get_rank() == 0:
        shown = ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
        print(f"OK: {comm.Get_size()} ranks, jax.Array on {jax.devices()[0].platform}, no input copies; "
              f"relative error vs jax.vjp: {shown}")


if __name__ == "__main__":
    sys.exit(main())
