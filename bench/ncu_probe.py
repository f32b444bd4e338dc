"""Kernels to profile with Nsight Compute (``ncu``) on one GPU: ours and torch SDPA FLASH's.

Runs, once each and in this order: mpiring forward+backward (causal unless ``--causal 0``),
fixed length at ``--tokens`` (default 16k); the same over ``--documents`` (default 8; 0:
skipped) random packed documents at 4x the tokens (the varlen case at the probe's size);
torch SDPA (FLASH backend) forward+backward on the fixed-length case when torch is installed.
Meant to be run under ncu, e.g.

    ncu --kernel-name regex:'attn_(fwd|bwd)|flash' --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section ComputeWorkloadAnalysis python3 bench/ncu_probe.py

so that the stall reasons, pipe utilisation and occupancy of our kernels sit beside
FLASH's on the same card.
"""

from __future__ import annotations

import argparse

import numpy as np
from mpi4py import MPI

import mpiring
from mpiring.bench.longctx import _documents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--causal", type=int, default=1, choices=(0, 1))
    p.add_argument("--documents", type=int, default=8, help="packed documents of the second case (0: none)")
    args = p.parse_args()
    import cupy

    comm = MPI.COMM_WORLD
    rng = cupy.random.default_rng(0)
    causal = bool(args.causal)
    cases = [(args.tokens, None)]
    if args.documents:
        cases.append((4 * args.tokens, _documents(4 * args.tokens, args.documents)))
    for tokens, cu in cases:
        shape = (1, tokens, args.heads, 128)
        q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(cupy.float16) for _ in range(4))
        out, lse = mpiring.ring_attention(q, k, v, comm, causal=causal, cu_seqlens=cu)
        mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, causal=causal, cu_seqlens=cu)
        cupy.cuda.get_current_stream().synchronize()
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return
    shape = (1, args.heads, args.tokens, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
