"""``python -m mpiring.bench kernel``: the CUDA kernels on one GPU beside torch SDPA.

For each dtype × head dim × seqlen × causal: check the kernel's output against
torch's (and, once per dtype and head dim, a small case against the float64
oracle through the public ``ring_attention``), then time forward and
forward+backward of the backend's kernels as the ring runs them at one rank (one
step: K/V already in the travelling buffer; out, lse, dq, dk, dv in the input
dtype), and torch ``scaled_dot_product_attention`` with the FLASH and cuDNN
backends in the same process. ``--api`` also times the public functions (their
Python overhead included). torch is optional: without it the peer columns are
left out.
"""

from __future__ import annotations

import numpy as np

from mpiring.bench.common import (
    attention_flops,
    card_name,
    command_line,
    make_row,
    time_cuda_interleaved,
    today,
    write_rows,
)

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def add_arguments(p) -> None:
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlens", default="4096,16384,65536")
    p.add_argument("--causal", default="0,1", help="comma list of 0/1")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--iters", type=int, default=0, help="timed runs (0: by size)")
    p.add_argument("--no-peers", action="store_true", help="skip torch even if installed")
    p.add_argument("--api", action="store_true", help="also time ring_attention(_backward) at one rank")
    p.add_argument("--tiles", default=None,
                   help="tile override, e.g. '128:fwd=4,2,32;bwd=8,64,128' (see mpiring.backends.cupy_.TILES)")
    p.add_argument("--dq", default="deterministic", choices=("deterministic", "atomic"),
                   help="backward dQ: ordered adds (the default of ring_attention_backward) or atomics in any order")
    p.add_argument("--out", default=None, help="JSON results path (default bench/results/kernel-<card>-<date>.json)")


def _np_dtype(name):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bf16" else np.dtype(np.float16)


def _torch_peers():
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    return torch, SDPBackend, sdpa_kernel


def _oracle_check(dtype, head_dim) -> float:
    """Worst relative error of out/dq/dk/dv against the float64 oracle on a small causal GQA case."""
    import cupy
    from mpi4py import MPI

    import mpiring

    rng = np.random.default_rng(0)
    shapes = [(1, 333, 4, head_dim), (1, 333, 2, head_dim), (1, 333, 2, head_dim), (1, 333, 4, head_dim)]
    q, k, v, do = (rng.standard_normal(s).astype(dtype) for s in shapes)
    out, lse = mpiring.ring_attention(*(cupy.asarray(x) for x in (q, k, v)), MPI.COMM_SELF, causal=True)
    grads = mpiring.ring_attention_backward(*(cupy.asarray(x) for x in (do, q, k, v)), out, lse, MPI.COMM_SELF,
                                            causal=True)
    refs = [mpiring.attention_reference(q, k, v, causal=True)[0],
            *mpiring.attention_reference_backward(do, q, k, v, causal=True)]
    errs = []
    for x, r in zip([out, *grads], refs):
        x = x.get().astype(np.float64)
        if not np.all(np.isfinite(x)):
            return float("inf")
        errs.append(np.linalg.norm(x - r) / np.linalg.norm(r))
    return max(errs)


def _parse_tiles(text):
    """'128:fwd=4,2,32;bwd=8,64' -> {128: {'fwd': (4, 2, 32), 'bwd': (8, 64)}} over the defaults."""
    from mpiring.backends.cupy_ import TILES

    tiles = {d: dict(t) for d, t in TILES.items()}
    if text:
        dim, _, spec = text.partition(":")
        for part in spec.split(";"):
            key, _, vals = part.partition("=")
            tiles[int(dim)][key] = tuple(int(x) for x in vals.split(","))
    return tiles


def run(args) -> int:
    try:
        import cupy
    except ImportError:
        raise SystemExit("the kernel bench needs CuPy and a CUDA GPU: pip install 'mpiring[cuda13]'") from None
    if not cupy.is_available():
        raise SystemExit("the kernel bench needs a CUDA GPU (cupy.is_available() is False)")
    from mpi4py import MPI

    import mpiring

    comm = MPI.COMM_SELF
    args.tile_table = _parse_tiles(args.tiles)
    peers = None if args.no_peers else _torch_peers()
    card = card_name()
    rows, table = [], []
    path = args.out or f"bench/results/kernel-{card.replace(' ', '_')}-{today()}.json"
    print(f"# {card}; peers: {'torch ' + peers[0].__version__ if peers else 'none'}", flush=True)
    for dname in args.dtypes.split(","):
        dtype = _np_dtype(dname)
        for head_dim in (int(x) for x in args.head_dims.split(",")):
            err = _oracle_check(dtype, head_dim)
            tol = 2e-2 if dname == "bf16" else 4e-3
            print(f"# oracle check {dname} d{head_dim}: max rel err {err:.2e}", flush=True)
            print(f"# resources {_resources(dname, head_dim, args.tile_table)}", flush=True)
            if not err < tol:
                raise SystemExit(f"kernel disagrees with the float64 oracle: {err:.3e} >= {tol}")
            heads = args.hidden // head_dim
            for seqlen in (int(x) for x in args.seqlens.split(",")):
                shape = (args.batch, seqlen, heads, head_dim)
                rng = cupy.random.default_rng(seqlen)
                q, k, v, do = (rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4))
                for causal in (bool(int(c)) for c in args.causal.split(",")):
                    rows += _one(args, comm, mpiring, peers, card, dname, q, k, v, do, causal, table)
                write_rows(path, rows)  # after each size: a job cut short keeps what it measured
    print(f"# wrote {len(rows)} rows to {path}")
    print(f"{'dtype':5} {'d':>4} {'seqlen':>6} {'causal':>6} {'pass':>7} {'TF/s':>7} {'FLASH':>7} {'ratio':>6}"
          f" {'cuDNN':>7}")
    for line in table:
        print(line)
    return 0


def _resources(dname, head_dim, tiles) -> str:
    """Registers, spilled (local) bytes and static shared memory of the compiled kernels."""
    import cupy

    from mpiring.backends.cupy_ import KERNEL_FILES, _kernel

    dev = cupy.cuda.Device().id
    parts = []
    for kernel_file in KERNEL_FILES:
        name = f"attn_{kernel_file.split('_')[1][:3]}_{'bf16' if dname == 'bf16' else 'f16'}"
        fn = _kernel(dev, kernel_file, name, head_dim, 0, tiles)
        parts.append(f"{name}: {fn.num_regs} regs, {fn.local_size_bytes} B local, {fn.shared_size_bytes} B static smem")
    return "; ".join(parts)


def _one(args, comm, mpiring, peers, card, dname, q, k, v, do, causal, table):
    from mpiring.backends.cupy_ import CudaKernelBackend
    from mpiring.layout import Segment, make_mask

    b, s, h, d = q.shape
    flops = {p: attention_flops(b, s, s, h, d, causal=causal, mode=p) for p in ("fwd", "fwd+bwd")}
    iters = args.iters or max(3, min(20, int(2e14 / flops["fwd"])))
    be = CudaKernelBackend(steps=1, tiles=args.tile_table, deterministic=args.dq == "deterministic")
    segs, mask, scale = (Segment(0, 1, s),), make_mask(causal), 1 / d**0.5
    kv = be.pack_kv(k, v)

    def fwd():
        st = be.fwd_begin(q, h, scale)
        be.fwd_step(st, kv, segs, segs, mask)
        return be.fwd_end(st)

    def fwd_bwd():
        out, lse = fwd()
        st, dkv = be.bwd_begin(do, q, out, lse, h, scale), be.zeros_dkv(kv)
        be.bwd_step(st, kv, dkv, segs, segs, mask)
        return be.bwd_end(st, dkv, k.dtype)

    fns = {("ours", "fwd"): fwd, ("ours", "fwd+bwd"): fwd_bwd}
    if args.api:
        def api_fwd():
            return mpiring.ring_attention(q, k, v, comm, causal=causal)

        def api_fwd_bwd():
            out, lse = api_fwd()
            return mpiring.ring_attention_backward(do, q, k, v, out, lse, comm, causal=causal)

        fns.update({("api", "fwd"): api_fwd, ("api", "fwd+bwd"): api_fwd_bwd})
    if peers is not None:
        fns.update(_peer_functions(peers, q, k, v, do, causal, fwd()[0]))
    # Every function timed in turns, after a heating phase: whichever ran first used to get
    # the clocks of a GPU not yet at its power cap (time_cuda_interleaved).
    times = time_cuda_interleaved(fns, iters=iters)
    ours = {p: times[("ours", p)] for p in ("fwd", "fwd+bwd")}
    api = {p: times[("api", p)] for p in ("fwd", "fwd+bwd")} if args.api else {}
    peer_t = {}
    for (name, p), t in times.items():
        if name not in ("ours", "api"):
            peer_t.setdefault(name, {})[p] = t
    rows = []
    for p in args.passes.split(","):
        tf = flops[p] / ours[p] / 1e12
        row = make_row(
            bench="kernel", card=card, date=today(), command=command_line(), dtype=dname, heads=h, heads_kv=h,
            head_dim=d, seqlen=s, batch=b, n_gpus=1, causal=causal, layout="contiguous", transport=None, **{"pass": p},
            tflops_per_gpu=round(tf, 1), seconds=ours[p],
            tiles={key: list(val) for key, val in args.tile_table[d].items()}, dq=args.dq,
        )
        if api:
            row["api_tflops_per_gpu"] = round(flops[p] / api[p] / 1e12, 1)
        cells = {}
        for name, times in peer_t.items():
            cells[name] = flops[p] / times[p] / 1e12
        if "torch-sdpa-flash" in cells:
            row.update(peer="torch-sdpa-flash", peer_tflops_per_gpu=round(cells["torch-sdpa-flash"], 1),
                       ratio=round(tf / cells["torch-sdpa-flash"], 3))
        if "torch-sdpa-cudnn" in cells:
            row["cudnn_tflops_per_gpu"] = round(cells["torch-sdpa-cudnn"], 1)
        rows.append(row)
        fl, cu = cells.get("torch-sdpa-flash"), cells.get("torch-sdpa-cudnn")
        line = (f"{dname:5} {d:4d} {s:6d} {int(causal):6d} {p:>7} {tf:7.1f} "
                f"{fl if fl else float('nan'):7.1f} {tf / fl if fl else float('nan'):6.2f} "
                f"{cu if cu else float('nan'):7.1f}")
        table.append(line)
        print(line, flush=True)
    return rows


def _peer_functions(peers, q, k, v, do, causal, our_out) -> dict:
    """torch SDPA (FLASH, cuDNN) on the same inputs, each checked against our output:
    ``{(name, pass): function}`` for the backends this torch and card have."""
    torch, SDPBackend, sdpa_kernel = peers
    import cupy

    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))  # (B, H, S, D) views
    tq, tk, tv = (x.detach().requires_grad_(True) for x in (tq, tk, tv))
    fns = {}
    for name, backend in (("torch-sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("torch-sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def fwd(backend=backend):
            with sdpa_kernel([backend]), torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        def fwd_bwd(backend=backend):
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            out.backward(tdo)

        try:
            ref = cupy.from_dlpack(fwd().transpose(1, 2).contiguous())
            fwd_bwd()
        except RuntimeError as exc:  # backend not available on this card/build
            print(f"# {name} unavailable: {str(exc).splitlines()[0]}")
            continue
        diff = float(cupy.linalg.norm((ref.astype(np.float32) - our_out.astype(np.float32)).ravel()))
        rel = diff / float(cupy.linalg.norm(ref.astype(np.float32).ravel()))
        if not rel < 2e-2:
            raise SystemExit(f"kernel output differs from {name}: relative {rel:.3e}")
        fns.update({(name, "fwd"): fwd, (name, "fwd+bwd"): fwd_bwd})
    return fns
