"""A small case of every CUDA kernel, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python3 bench/sanitize_case.py
    compute-sanitizer --tool racecheck python3 bench/sanitize_case.py

Two ring steps on zigzag segments (two per side), causal, GQA, ragged lengths, so
the masked, skipped and padded-tile paths all run; both dtypes, head dims 64 and 128;
without and with packed documents (cu_seqlens); the backward's dQ in its ordered
(deterministic) and atomic modes.
"""

import itertools

import cupy
import numpy as np
from ml_dtypes import bfloat16

from mpiring.backends.cupy_ import CudaKernelBackend
from mpiring.layout import make_mask, segments

rng = np.random.default_rng(0)
DOCS = [0, 1, 40, 41, 170, 300]  # documents of length 1 and 0, boundaries inside tiles
for i, (dtype, d, docs) in enumerate(itertools.product((np.float16, bfloat16), (64, 128), (None, DOCS))):
    q, k, v, do = (cupy.asarray(rng.standard_normal((1, 150, h, d)).astype(dtype)) for h in (4, 2, 2, 4))
    mask = make_mask(True, None, docs)
    be = CudaKernelBackend(steps=2, deterministic=i // 2 % 2 == 0)
    kv = be.pack_kv(k, v)
    q_segs, k_segs = segments("zigzag", 1, 2, 150), segments("zigzag", 0, 2, 150)
    st = be.fwd_begin(q, 2, d**-0.5)
    for _ in range(2):
        be.fwd_step(st, kv, q_segs, k_segs, mask)
    out, lse = be.fwd_end(st)
    bst, dkv = be.bwd_begin(do, q, out, lse, 2, d**-0.5), be.zeros_dkv(kv)
    be.bwd_step(bst, kv, dkv, q_segs, k_segs, mask)
    grads = be.bwd_end(bst, dkv, k.dtype)
    cupy.cuda.Device().synchronize()
    assert all(bool(cupy.isfinite(x.astype(np.float32)).all()) for x in (out, *grads))
print("sanitize case done")
