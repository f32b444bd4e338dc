"""Exact causal attention over millions of tokens, forward and backward, with a check that
is feasible at that size.

    mpiexec -n 4 python examples/long_context.py --tokens 4M      # 4 GPUs (CuPy), bf16
    mpiexec -n 4 python examples/long_context.py --tokens 4k      # the same on the CPU (NumPy)

Each rank makes its own shard (zigzag layout by default) on its GPU — the whole
sequence never exists anywhere — and runs :func:`mpiring.ring_attention` and
:func:`mpiring.ring_attention_backward`. Rank 0 prints a line per ring step, the total
times and TF/s per GPU (FlashAttention's flop convention, causal counted as half).

The check: a few hundred query rows at random global positions are recomputed in
float64 over *all* keys. Each rank computes, for every sampled row, the partial softmax
sums over its own keys (chunked, on its own device); the partials are combined over
MPI: first the log-sum-exp, then ``out`` and ``dq`` with the global lse. The same sums
with P and dS rounded to the input dtype give the "same-precision" result; the ring's
error must be at most 2× that one's plus eps/8 (flash-attn's rule, tests/helpers.py).
At small ``--tokens`` on the CPU the sampler itself is checked against
:func:`mpiring.attention_reference` (``q_positions``) on the gathered sequence.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from ml_dtypes import bfloat16, finfo
from mpi4py import MPI

import mpiring
from mpiring._xp import array_module as array_module_of
from mpiring.bench.common import attention_flops
from mpiring.bench.longctx import PeakMemory, run_array_module
from mpiring.layout import make_mask, positions
from mpiring.transport import Transport, select_transport

DTYPES = {"bf16": bfloat16, "fp16": np.float16, "fp32": np.float32}
_TAG_KV = 71  # mpiring.api's tag of the K/V exchange: one per ring step
_KEY_CHUNK = 1 << 15  # keys per float64 chunk of the sampled check (H·n·chunk·8 bytes)


def parse_tokens(text: str) -> int:
    """'4M' → 4·2**20, '4k' → 4096, '1000' → 1000."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class ProgressTransport(Transport):
    """Wraps the ring's transport and prints a line when a ring step's K/V exchange is done
    (rank 0). It synchronises rank 0's compute stream there so that the times are real;
    the kernel of the step is already finished then, so this costs one launch latency."""

    def __init__(self, inner: Transport, label: str, xp, say):
        super().__init__(inner.comm)
        self.inner, self.label, self.xp, self.say = inner, label, xp, say
        self.name = inner.name
        self.step, self.start = 0, time.perf_counter()

    def begin(self, label: str) -> None:
        self.label, self.step, self.start = label, 0, time.perf_counter()

    def _post(self, send, recv, *, tag, **options):
        exchange = self.inner.post(send, recv, tag=tag, **options)
        exchange.ring_tag = tag
        return exchange

    def _wait(self, exchange, deadline):
        self.inner.wait(exchange, None if deadline is None else max(deadline - time.monotonic(), 0.0))
        if exchange.ring_tag == _TAG_KV:
            if self.rank == 0 and self.xp is not np:
                self.xp.cuda.get_current_stream().synchronize()
            self.report()

    def report(self) -> None:
        """One line: ring step ``self.step`` has finished (the last one: after the call)."""
        self.step += 1
        self.say(f"  {self.label} step {self.step}/{self.size} done at {time.perf_counter() - self.start:8.2f} s")


def make_shards(xp, rank, seqlen_local, heads, heads_kv, head_dim, dtype, seed):
    """This rank's q, k, v, dout ``(1, seqlen_local, heads|heads_kv, head_dim)``, standard normal."""
    rng = xp.random.default_rng(seed * 1000 + rank)
    shapes = [(1, seqlen_local, h, head_dim) for h in (heads, heads_kv, heads_kv, heads)]
    return [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in shapes]


def locate(samples, layout, size, seqlen_local):
    """For global positions ``samples``: the owner rank and the local row of each."""
    owner, row = np.empty(len(samples), int), np.empty(len(samples), int)
    for r in range(size):
        pos = positions(layout, r, size, seqlen_local)
        order = np.argsort(pos)
        idx = np.searchsorted(pos, samples, sorter=order)
        idx = np.minimum(idx, len(pos) - 1)
        hit = pos[order[idx]] == samples
        owner[hit], row[hit] = r, order[idx[hit]]
    return owner, row


def gather_rows(comm, arrays, owner, row, rank):
    """Rows ``row`` of this rank's ``arrays`` (axis 1 of ``(1, S, H, D)``, axis 2 of lse) for
    the samples it owns, in float64 on the host, assembled on every rank in sample order."""
    mine = np.flatnonzero(owner == rank)
    local = []
    for x in arrays:
        idx = array_module_of(x).asarray(row[mine])
        picked = x[:, :, idx] if x.ndim == 3 else x[:, idx]
        local.append(np.asarray(picked.get() if hasattr(picked, "get") else picked, dtype=np.float64))
    everyone = comm.allgather((mine, local))
    out = []
    for i, x in enumerate(arrays):
        shape = (x.shape[1], len(owner)) if x.ndim == 3 else (len(owner),) + tuple(x.shape[2:])
        full = np.empty(shape)
        for idx, parts in everyone:
            if x.ndim == 3:
                full[:, idx] = parts[i][0]
            else:
                full[idx] = parts[i][0]
        out.append(full)
    return out


def causal_allowed(xp, mask, qpos, kpos):
    """Boolean ``(len(qpos), len(kpos))`` on the array module's device: key not after the
    query and in the same document (:meth:`mpiring.layout.Mask.allowed` for a causal
    mask, without building it on the host)."""
    allowed = xp.asarray(qpos)[:, None] >= xp.asarray(kpos)[None, :]
    if mask.cu_seqlens is not None:
        allowed &= xp.asarray(mask.documents(qpos))[:, None] == xp.asarray(mask.documents(kpos))[None, :]
    return allowed


@np.errstate(divide="ignore")  # log(0) = −inf for rows with no allowed key in a chunk
def sampled_reference(comm, xp, k, v, kpos, q_rows, do_rows, qpos, mask, scale, dtype):
    """float64 ``out``, ``lse``, ``dq`` of the sampled rows over all keys of all ranks, and
    the same-precision ``out``, ``dq`` (P and dS rounded to ``dtype``).

    q_rows, do_rows: ``(n, H, D)`` float64 host arrays, the same on every rank; k, v this
    rank's ``(1, S, Hkv, D)`` shard, ``kpos`` its global positions. Returns host arrays:
    out, out_lp, dq, dq_lp ``(n, H, D)``; lse ``(H, n)``.
    """
    heads, group = q_rows.shape[1], q_rows.shape[1] // k.shape[2]
    q = xp.asarray(q_rows).transpose(1, 0, 2)  # (H, n, D)
    do = xp.asarray(do_rows).transpose(1, 0, 2)
    rnd = lambda x: x.astype(dtype).astype(np.float64)  # noqa: E731

    def chunks():
        """(allowed (1, n, c), K (H, c, D), V (H, c, D)) per chunk of local keys, float64."""
        for lo in range(0, k.shape[1], _KEY_CHUNK):
            hi = min(lo + _KEY_CHUNK, k.shape[1])
            allowed = causal_allowed(xp, mask, qpos, kpos[lo:hi])[None]
            kc = xp.repeat(k[0, lo:hi].astype(np.float64), group, axis=1).transpose(1, 0, 2)
            vc = xp.repeat(v[0, lo:hi].astype(np.float64), group, axis=1).transpose(1, 0, 2)
            yield allowed, kc, vc

    def scores(allowed, kc):
        return xp.where(allowed, q @ kc.transpose(0, 2, 1) * scale, -np.inf)

    # pass 1: log-sum-exp of this rank's keys, then over ranks
    lse_local = xp.full((heads, len(qpos)), -np.inf)
    for allowed, kc, _ in chunks():
        s = scores(allowed, kc)
        m = s.max(axis=-1)
        m_safe = xp.where(xp.isfinite(m), m, 0)
        lse_local = xp.logaddexp(lse_local, xp.log(xp.exp(s - m_safe[..., None]).sum(-1)) + m_safe)
    lse = np.logaddexp.reduce(np.stack(comm.allgather(_host(lse_local))), axis=0)
    lse_dev = xp.asarray(np.where(np.isfinite(lse), lse, np.inf))[..., None]  # +inf: p = 0 on empty rows

    def summed(partial):
        return comm.allreduce(_host(partial), op=MPI.SUM)

    # pass 2: out = Σ p·v (and with p rounded to the input dtype)
    out, out_lp = xp.zeros_like(q), xp.zeros_like(q)
    for allowed, kc, vc in chunks():
        p = xp.exp(scores(allowed, kc) - lse_dev)
        out += p @ vc
        out_lp += rnd(p) @ vc
    out, out_lp = summed(out), rnd(summed(out_lp))
    # pass 3: dq = scale·Σ p·(dp − δ)·k with δ = rowsum(dout·out)
    delta = xp.asarray((do_rows.transpose(1, 0, 2) * out).sum(-1))[..., None]
    delta_lp = xp.asarray((do_rows.transpose(1, 0, 2) * out_lp).sum(-1))[..., None]
    dq, dq_lp = xp.zeros_like(q), xp.zeros_like(q)
    for allowed, kc, vc in chunks():
        p = xp.exp(scores(allowed, kc) - lse_dev)
        dp = do @ vc.transpose(0, 2, 1)
        dq += (p * (dp - delta)) @ kc
        dq_lp += rnd(p * (dp - delta_lp)) @ kc
    dq, dq_lp = summed(dq) * scale, rnd(summed(dq_lp) * scale)
    to_rows = lambda x: x.transpose(1, 0, 2)  # noqa: E731
    return to_rows(out), to_rows(out_lp), lse, to_rows(dq), to_rows(dq_lp)


def _host(x):
    return np.asarray(x.get() if hasattr(x, "get") else x)


def rel_err(x, ref) -> float:
    return float(np.linalg.norm(x - ref) / (np.linalg.norm(ref) or 1.0))


def tolerance(dtype, err_same_precision: float) -> float:
    """tests/helpers.py's rule: 2× the same-precision error + eps/8 (fp16/bf16); 2e-5 (fp32)."""
    if np.dtype(dtype) == np.float32:
        return 2e-5
    return 2 * err_same_precision + float(finfo(dtype).eps) / 8


def random_documents(rng, total: int, count: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, total), size=count - 1, replace=False))
    return np.concatenate([[0], cuts, [total]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tokens", default="4M", help="global sequence length, e.g. 4M, 64k, 4096")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--layout", default="zigzag", choices=mpiring.layout.LAYOUTS)
    p.add_argument("--documents", type=int, default=0, help="pack this many random documents (cu_seqlens)")
    p.add_argument("--samples", type=int, default=256, help="query rows checked in float64")
    p.add_argument("--transport", default="auto")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--cpu", action="store_true", help="NumPy even where CuPy and a GPU are present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write result rows (bench/README.md format) to this path")
    args = p.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    tokens, dtype = parse_tokens(args.tokens), DTYPES[args.dtype]
    chunks = 2 * size if args.layout == "zigzag" else size
    if tokens % chunks:
        raise SystemExit(f"--tokens={tokens} must be divisible by {chunks} for layout={args.layout!r} on {size} ranks")
    seqlen_local = tokens // size
    xp = run_array_module(args.cpu)
    rng = np.random.default_rng(args.seed)
    cu_seqlens = random_documents(rng, tokens, args.documents) if args.documents > 1 else None
    options = dict(causal=True, layout=args.layout, cu_seqlens=cu_seqlens)
    shape = (1, seqlen_local, args.heads, args.heads_kv, args.head_dim, dtype)
    kind = "cupy" if xp is not np else "numpy"
    inputs = (2 * args.heads + 2 * args.heads_kv) * seqlen_local * args.head_dim * np.dtype(dtype).itemsize
    estimates = {}
    for mode in ("fwd", "fwd+bwd"):
        estimates[mode] = mpiring.memory_estimate(*shape, backward=mode == "fwd+bwd", array=kind, comm_size=size,
                                                  **options)
        say(f"memory estimate per rank ({mode}): {estimates[mode] / 2**30:.2f} GiB + inputs {inputs / 2**30:.2f} GiB")

    q, k, v, dout = make_shards(xp, rank, *shape[1:], seed=args.seed)
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()  # the float32 temporaries of make_shards
    transport = select_transport(args.transport, comm.Dup(), xp) if size > 1 else args.transport
    if size > 1:
        transport = ProgressTransport(transport, "forward", xp, say)
    documents = f"{args.documents} documents, " if cu_seqlens is not None else ""
    say(f"{tokens:,} tokens on {size} rank(s) ({kind}, {seqlen_local:,} per rank), {args.dtype}, "
        f"heads {args.heads}/{args.heads_kv}, head_dim {args.head_dim}, {args.layout}, causal, {documents}"
        f"transport {getattr(transport, 'name', transport)}")

    peaks = {}

    def timed(fn, label):
        """Run ``fn`` on every rank: the slowest rank's seconds; the peak of what the library
        allocated meanwhile (max over ranks) goes to ``peaks[label]``."""
        if isinstance(transport, ProgressTransport):
            transport.begin(label)
        with PeakMemory(xp) as peak:
            comm.Barrier()
            start = time.perf_counter()
            result = fn()
            if xp is not np:
                xp.cuda.get_current_stream().synchronize()
            elapsed = time.perf_counter() - start
        if isinstance(transport, ProgressTransport):
            transport.report()
        elapsed = comm.allreduce(elapsed, op=MPI.MAX)
        peaks[label] = comm.allreduce(peak.peak, op=MPI.MAX)
        say(f"{label}: {elapsed:.2f} s")
        return result, elapsed

    (out, lse), t_fwd = timed(lambda: mpiring.ring_attention(q, k, v, comm, transport=transport, **options),
                              "forward")
    grads, t_bwd = None, 0.0
    if not args.forward_only:
        grads, t_bwd = timed(lambda: mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm,
                                                                     transport=transport, **options), "backward")
    # fwd+bwd as memory_estimate counts it: backward runs while forward's out and lse are held
    measured = {"fwd": peaks["forward"]}
    if grads is not None:
        measured["fwd+bwd"] = max(peaks["forward"], out.nbytes + lse.nbytes + peaks["backward"])
    for mode, peak in measured.items():
        say(f"peak memory per rank ({mode}, library allocations): {peak / 2**30:.2f} GiB, estimate "
            f"{estimates[mode] / 2**30:.2f} GiB, ratio {peak / estimates[mode]:.3f}")
    useful = 1.0 if cu_seqlens is None else float((np.diff(cu_seqlens).astype(float) ** 2).sum()) / tokens**2
    unit = "GPU" if xp is not np else "rank"
    results = []
    for mode, seconds in (("fwd", t_fwd), ("fwd+bwd", t_fwd + t_bwd)):
        if mode == "fwd+bwd" and args.forward_only:
            continue
        flops = attention_flops(1, tokens, tokens, args.heads, args.head_dim, causal=True, mode=mode) * useful
        say(f"{mode}: {seconds:.2f} s, {flops / seconds / size / 1e12:.3g} TF/s per {unit}")
        results.append({"pass": mode, "time_s": seconds, "tflops_per_gpu": flops / seconds / size / 1e12,
                        "peak_bytes": measured[mode], "estimate_bytes": estimates[mode]})

    # --- the sampled-row check ------------------------------------------------------------
    start = time.perf_counter()
    samples = np.sort(rng.choice(tokens, size=min(args.samples, tokens), replace=False))
    owner, row = locate(samples, args.layout, size, seqlen_local)
    rows = gather_rows(comm, [q, dout, out, lse] + ([grads[0]] if grads else []), owner, row, rank)
    q_rows, do_rows, out_rows, lse_rows = rows[:4]
    kpos = positions(args.layout, rank, size, seqlen_local)
    mask = make_mask(True, None, cu_seqlens)
    scale = 1.0 / math.sqrt(args.head_dim)
    ref_out, lp_out, ref_lse, ref_dq, lp_dq = sampled_reference(comm, xp, k, v, kpos, q_rows, do_rows, samples,
                                                                mask, scale, dtype)
    say(f"check: {len(samples)} query rows at random positions, float64 over all {tokens:,} keys "
        f"({time.perf_counter() - start:.1f} s)")
    ok = True
    checks = [("out", out_rows, ref_out, lp_out)] + ([("dq", rows[4], ref_dq, lp_dq)] if grads else [])
    for name, got, ref, lowp in checks:
        err, tol = rel_err(got, ref), tolerance(dtype, rel_err(lowp, ref))
        ok &= err <= tol
        say(f"  {name}: relative error {err:.3e}  (same-precision {rel_err(lowp, ref):.3e}, tolerance {tol:.3e})"
            f"  {'ok' if err <= tol else 'FAILED'}")
    lse_err = float(np.max(np.abs(lse_rows - ref_lse)))
    ok &= lse_err <= 1e-3
    say(f"  lse: max abs error {lse_err:.3e}  (tolerance 1e-3)  {'ok' if lse_err <= 1e-3 else 'FAILED'}")

    if xp is np and tokens <= 1 << 14:  # the sampler itself, against the dense oracle
        full = [mpiring.unshard(x, comm, layout=args.layout) for x in (q, k, v)]
        dense_out, dense_lse = mpiring.attention_reference(full[0][:, samples], full[1], full[2], causal=True,
                                                           cu_seqlens=cu_seqlens, q_positions=samples)
        sampler_err = max(rel_err(ref_out, dense_out[0]), float(np.max(np.abs(ref_lse - dense_lse[0]))))
        ok &= sampler_err < 1e-10
        say(f"  sampler vs mpiring.attention_reference: {sampler_err:.1e}")
    say("PASSED" if ok else "FAILED")
    if args.json and rank == 0:
        write_json(args, results, checks, lse_err, ok, tokens, size, kind, transport, cu_seqlens)
    return 0 if ok else 1


def write_json(args, results, checks, lse_err, ok, tokens, size, kind, transport, cu_seqlens) -> None:
    from mpiring.bench.common import card_name, make_row, today, write_rows

    errors = {name: rel_err(got, ref) for name, got, ref, _ in checks}
    tolerances = {name: tolerance(DTYPES[args.dtype], rel_err(lowp, ref)) for name, _, ref, lowp in checks}
    card = card_name() if kind == "cupy" else "CPU"
    rows = [make_row(
        bench="long_context", card=card, date=today(), command=f"mpiexec -n {size} python {' '.join(sys.argv)}",
        dtype=args.dtype, heads=args.heads, heads_kv=args.heads_kv, head_dim=args.head_dim, seqlen=tokens // size,
        n_gpus=size, causal=True, layout=args.layout, transport=getattr(transport, "name", transport),
        total_tokens=tokens, documents=None if cu_seqlens is None else len(cu_seqlens) - 1, samples=args.samples,
        rel_errors=errors, tolerances=tolerances, lse_max_abs_error=lse_err, passed=bool(ok), **r,
    ) for r in results]
    write_rows(args.json, rows)


if __name__ == "__main__":
    sys.exit(main())
