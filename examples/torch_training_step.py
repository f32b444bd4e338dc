"""Train a small transformer block with its sequence sharded over MPI ranks (PyTorch).

    mpiexec -n 4 python -m mpi4py examples/torch_training_step.py
    mpiexec -n 1 python -m mpi4py examples/torch_training_step.py --device cuda --dtype bfloat16

Each rank holds ``seqlen / size`` tokens (zigzag layout, causal) and calls
``mpiring.torch.ring_attention`` where a one-device model calls
``torch.nn.functional.scaled_dot_product_attention``; nothing else in the block
changes, because everything but attention works token by token. The parameters
are the same on every rank, so their gradients are summed over the ranks
(``MPI.Allreduce``) before the optimizer step, as data parallelism does.

Self-check: every rank also trains the unsharded block with SDPA from the same
start, in the same dtype and in float64. The ring's losses and gradients must be
as close to the float64 run as SDPA's are (at most 2x SDPA's error, plus a floor).
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
from mpi4py import MPI

import mpiring

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("SKIP examples/torch_training_step.py: needs PyTorch (pip install torch)")
    sys.exit(0)

import mpiring.torch  # noqa: E402 - after the check above


def sdpa(q, k, v):
    """Unsharded causal attention, ``(batch, seqlen, heads, head_dim)`` in and out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def ring(comm, layout):
    """Sequence-sharded causal attention over ``comm``: a drop-in for :func:`sdpa`."""
    return lambda q, k, v: mpiring.torch.ring_attention(q, k, v, comm=comm, causal=True, layout=layout)


class Block(torch.nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). x: ``(batch, seqlen, dim)``."""

    def __init__(self, dim=32, heads=4, heads_kv=2):
        super().__init__()
        self.heads, self.heads_kv, self.head_dim = heads, heads_kv, dim // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * heads_kv) * self.head_dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x, attention):
        b, s, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * d, self.heads_kv * d, self.heads_kv * d], dim=-1)
        a = attention(q.view(b, s, self.heads, d), k.view(b, s, self.heads_kv, d), v.view(b, s, self.heads_kv, d))
        x = x + self.proj(a.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


def allreduce_grads(params, comm):
    """Sum the gradients over the ranks, in float32 at least, on the host (one Allreduce)."""
    grads = [p.grad for p in params]
    wide = torch.promote_types(grads[0].dtype, torch.float32)
    flat = torch.cat([g.reshape(-1).to(wide) for g in grads]).cpu().numpy()
    comm.Allreduce(MPI.IN_PLACE, flat)
    offset = 0
    for g in grads:
        g.copy_(torch.from_numpy(flat[offset:offset + g.numel()]).view_as(g))
        offset += g.numel()


def train(block, x, target, attention, *, steps, lr, comm=None):
    """``steps`` SGD steps on the mean squared error over the whole sequence.

    With ``comm``, ``x`` and ``target`` are this rank's shards and gradients and
    losses are summed over the ranks. Returns the losses (floats) and, per step,
    the flat float64 gradient of all parameters.
    """
    params = list(block.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    count = target.numel() * (comm.Get_size() if comm is not None else 1)
    wide = torch.promote_types(x.dtype, torch.float32)  # the loss in float32 at least
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((block(x, attention).to(wide) - target.to(wide)) ** 2).sum() / count  # this rank's share
        loss.backward()
        loss = loss.item()
        if comm is not None:
            allreduce_grads(params, comm)
            loss = comm.allreduce(loss)
        losses.append(loss)
        grads.append(torch.cat([p.grad.reshape(-1).double().cpu() for p in params]).numpy())
        opt.step()
    return np.array(losses), grads


def rel_err(x, ref):
    return float(np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref))


def check(comm=MPI.COMM_WORLD, *, dtype="float32", device="cpu", layout="zigzag", steps=3, seed=0,
          batch=2, seqlen_local=16, dim=32, heads=4, heads_kv=2, lr=0.5):
    """Train the sharded block (ring) and the unsharded one (SDPA) and compare them.

    Returns ``{name: (ring error, SDPA error, tolerance)}`` against the float64 SDPA
    run (losses, then each step's gradients); raises AssertionError on a mismatch.
    """
    dtype, size = getattr(torch, dtype), comm.Get_size()
    seqlen = seqlen_local * size
    torch.manual_seed(seed)
    block = Block(dim, heads, heads_kv)
    rng = np.random.default_rng(seed)  # the same global data on every rank
    x, target = (rng.standard_normal((batch, seqlen, dim)).astype(np.float32) for _ in range(2))

    def run(tensors_dtype, attention, sharded):
        local = [mpiring.shard(a, comm, layout=layout, axis=1) if sharded else a for a in (x, target)]
        local = [torch.from_numpy(a).to(device=device, dtype=tensors_dtype) for a in local]
        model = copy.deepcopy(block).to(device=device, dtype=tensors_dtype)
        return train(model, *local, attention, steps=steps, lr=lr, comm=comm if sharded else None)

    ring_losses, ring_grads = run(dtype, ring(comm, layout), sharded=True)
    sdpa_losses, sdpa_grads = run(dtype, sdpa, sharded=False)
    ref_losses, ref_grads = run(torch.float64, sdpa, sharded=False)
    # Floor: half a unit of float16/bfloat16 rounding; float32 leaves room for GPU kernels
    # whose accumulation order differs from SDPA's (measured on CPU: ~2e-7 for both).
    floor = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, torch.finfo(dtype).eps / 2)
    report = {"losses": (rel_err(ring_losses, ref_losses), rel_err(sdpa_losses, ref_losses))}
    for step in range(steps):
        report[f"grads[{step}]"] = (rel_err(ring_grads[step], ref_grads[step]),
                                    rel_err(sdpa_grads[step], ref_grads[step]))
    report = {name: (ring_e, sdpa_e, 2 * sdpa_e + floor) for name, (ring_e, sdpa_e) in report.items()}
    bad = {name: errs for name, errs in report.items() if errs[0] > errs[2]}
    assert not bad, f"ring vs float64 error above 2x SDPA's ({dtype}): {bad}"
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA needs CuPy)")
    parser.add_argument("--layout", default="zigzag", choices=list(mpiring.layout.LAYOUTS))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    if args.device == "cuda":
        torch.cuda.set_device(comm.Get_rank() % torch.cuda.device_count())
    report = check(comm, dtype=args.dtype, device=args.device, layout=args.layout, steps=args.steps)
    if comm.Get_rank() == 0:
        print(f"OK: {comm.Get_size()} ranks, {args.dtype} on {args.device}, layout={args.layout}; "
              "relative error vs float64 (ring, SDPA same dtype, tolerance):")
        for name, (ring_e, sdpa_e, tol) in report.items():
            print(f"  {name:10s} ring {ring_e:.2e}  sdpa {sdpa_e:.2e}  tol {tol:.2e}")


if __name__ == "__main__":
    sys.exit(main())
