"""torch tensors through the ring (zero-copy, bfloat16, stream-safe on CUDA) and the
autograd adapter mpiring.torch, down to a transformer block trained with its
sequence sharded (examples/torch_training_step.py) against SDPA unsharded."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import random_problem
from test_interop import load_example, pointer

import mpiring

torch = pytest.importorskip("torch", reason="needs PyTorch (pip install torch==2.13.0 for the CPU build)")
import mpiring.torch  # noqa: E402 - only with torch

CUDA = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")


def device_for(comm, device: str) -> str:
    return f"cuda:{comm.Get_rank() % torch.cuda.device_count()}" if device == "cuda" else device


@pytest.mark.serial
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_copy_both_ways(device, dtype):
    t = torch.randn(2, 5, 3, 4, device=device).to(dtype)
    x = mpiring.interop.to_native(t, "q")
    assert pointer(x) == t.data_ptr() and tuple(x.shape) == tuple(t.shape)
    assert str(x.dtype) == str(dtype).removeprefix("torch.")
    back = mpiring.interop.export_like(x, "torch")
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype and back.device == t.device
    assert torch.equal(back, t)
    strided = t.transpose(1, 2)  # DLPack carries strides: still no copy
    assert pointer(mpiring.interop.to_native(strided)) == t.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_torch_tensors_give_the_numpy_numbers(comm, seed, device, dtype):
    """The ring on torch tensors returns torch tensors with exactly the NumPy (or CuPy) results."""
    dev = device_for(comm, device)
    dtype = np.dtype(dtype)
    arrays = [mpiring.shard(x, comm, layout="zigzag") for x in random_problem(seed, 2, 8 * comm.Get_size(), 4, 2,
                                                                               8, dtype)]
    tensors = [torch.from_numpy(a.view(np.uint16) if dtype.name == "bfloat16" else a) for a in arrays]
    if dtype.name == "bfloat16":
        tensors = [t.view(torch.bfloat16) for t in tensors]
    tensors = [t.to(dev) for t in tensors]
    native = [mpiring.interop.to_native(t) for t in tensors]  # NumPy (CPU) or CuPy (CUDA) views
    opts = dict(causal=True, layout="zigzag")
    q, k, v, dout = tensors
    out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
    grads = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **opts)
    out_n, lse_n = mpiring.ring_attention(*native[:3], comm, **opts)
    grads_n = mpiring.ring_attention_backward(native[3], *native[:3], out_n, lse_n, comm, **opts)
    for name, x, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (out_n, lse_n, *grads_n)):
        assert isinstance(x, torch.Tensor) and str(x.device) == dev, name
        assert torch.equal(x, mpiring.interop.export_like(ref, "torch")), name


@pytest.mark.parametrize("device", DEVICES)
def test_cu_seqlens_tensor(comm, seed, device):
    """cu_seqlens as an int32 torch tensor on the arrays' device (flash-attn's habit)."""
    dev = device_for(comm, device)
    seqlen = 8 * comm.Get_size()
    cu = np.array([0, 3, seqlen // 2 + 1, seqlen], np.int32)
    arrays = [mpiring.shard(x, comm, layout="zigzag") for x in random_problem(seed, 1, seqlen, 4, 2, 8, np.float32)]
    opts = dict(causal=True, layout="zigzag")
    out_n, lse_n = mpiring.ring_attention(*arrays[:3], comm, cu_seqlens=cu, **opts)
    grads_n = mpiring.ring_attention_backward(arrays[3], *arrays[:3], out_n, lse_n, comm, cu_seqlens=cu, **opts)
    q, k, v, dout = (torch.from_numpy(a).to(dev) for a in arrays)
    cu_t = torch.from_numpy(cu).to(dev)
    out, lse = mpiring.ring_attention(q, k, v, comm, cu_seqlens=cu_t, **opts)
    grads = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, cu_seqlens=cu_t, **opts)
    for x, ref in zip((out, lse, *grads), (out_n, lse_n, *grads_n)):
        np.testing.assert_allclose(x.cpu().numpy(), ref, rtol=1e-5, atol=1e-6)


def sdpa(q, k, v, **options):
    """torch's attention on the whole sequence, (batch, seqlen, heads, head_dim) in and out."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True, **options)
    return out.transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("causal", [False, True])
def test_autograd_matches_sdpa(comm, seed, device, layout, causal):
    """mpiring.torch.ring_attention on shards: out and the grads of q, k, v equal
    SDPA's on the whole sequence (float64: to rounding)."""
    dev = device_for(comm, device)
    q, k, v, dout = (torch.from_numpy(x).to(dev) for x in random_problem(seed, 2, 6 * comm.Get_size(), 4, 2, 8,
                                                                        np.float64))
    for t in (q, k, v):
        t.requires_grad_()
    out_ref = sdpa(q, k, v, is_causal=causal)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout)

    def shard(t):
        return torch.from_numpy(mpiring.shard(t.detach().cpu().numpy(), comm, layout=layout)).to(dev)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out = mpiring.torch.ring_attention(ql, kl, vl, comm=comm, causal=causal, layout=layout)
    assert out.requires_grad and out.shape == ql.shape and out.device == ql.device
    grads = torch.autograd.grad(out, (ql, kl, vl), shard(dout))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        torch.testing.assert_close(x, shard(ref), rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_reaches_the_backward(comm, seed, monkeypatch, deterministic):
    """``deterministic`` goes to ring_attention_backward (and not to the forward)."""
    seen = []
    backward = mpiring.ring_attention_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return backward(*args, **kwargs)

    monkeypatch.setattr(mpiring, "ring_attention_backward", spy)
    q, k, v, dout = (torch.from_numpy(mpiring.shard(x, comm)) for x in random_problem(seed, 1, 4 * comm.Get_size(),
                                                                                       2, 2, 8, np.float64))
    ql, kl, vl = (t.requires_grad_() for t in (q, k, v))
    out = mpiring.torch.ring_attention(ql, kl, vl, comm=comm, deterministic=deterministic)
    out.backward(dout)
    assert seen == [deterministic] and ql.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_step_example(comm, device, dtype):
    """examples/torch_training_step.py: losses and grads of 3 SGD steps of a sharded
    transformer block are as close to float64 SDPA as same-dtype SDPA is (2x + floor)."""
    example = load_example("torch_training_step")
    if device == "cuda":
        torch.cuda.set_device(device_for(comm, device))
    report = example.check(comm, dtype=dtype, device=device, layout="zigzag", steps=3, seqlen_local=8)
    assert all(ring_e <= tol for ring_e, _, tol in report.values())


def test_requires_grad_is_refused_everywhere(comm):
    q = torch.zeros(1, 4, 2, 8, requires_grad=comm.Get_rank() == 0)
    k = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match=r"q is a torch tensor that requires grad; use mpiring.torch.*\(on rank 0\)"):
        mpiring.ring_attention(q, k, k, comm)


def test_adapter_refuses_non_tensors_everywhere(comm):
    """A NumPy q on the last rank only: every rank raises (no rank left in the ring), and
    the next call works."""
    t = torch.randn(1, 4, 2, 8)
    q = t.numpy() if comm.Get_rank() == comm.Get_size() - 1 else t
    with pytest.raises(TypeError, match=rf"q must be a torch.Tensor, got ndarray.*\(on rank {comm.Get_size() - 1}\)"):
        mpiring.torch.ring_attention(q, t, t, comm=comm)
    assert mpiring.torch.ring_attention(t, t, t, comm=comm).shape == t.shape


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16 d=64: the CUDA kernels
def test_stream_safety(comm, dtype):
    """The caller writes q on a side stream right before the call and reads out on it
    right after: DLPack's stream handshake orders both against the ring's stream."""
    dev = device_for(comm, "cuda")
    q_src, k, v, _ = (torch.from_numpy(mpiring.shard(x, comm, layout="zigzag")).to(dev, dtype)
                      for x in random_problem(0, 2, 256 * comm.Get_size(), 4, 2, 64, np.float32))
    expected = mpiring.ring_attention(q_src, k, v, comm, causal=True, layout="zigzag")[0]
    q = torch.zeros_like(q_src)
    torch.cuda.synchronize(dev)
    side = torch.cuda.Stream(dev)  # torch's streams don't sync with the legacy default stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the real q lands
        q.copy_(q_src)
        out = mpiring.ring_attention(q, k, v, comm, causal=True, layout="zigzag")[0]
        out_on_side = out.clone()  # ordered after the ring by the export handshake
    torch.cuda.synchronize(dev)
    assert out.data_ptr() != q.data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # same inputs, same path: only atomics' order differs
    torch.testing.assert_close(out_on_side, expected, rtol=tol, atol=tol)
