"""JAX arrays through the ring: zero-copy in (CPU and GPU) and out (GPU; CPU where the
buffer is 64-byte aligned, as XLA requires), bfloat16, and examples/jax_interop.py."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from helpers import random_problem
from ml_dtypes import bfloat16
from test_interop import load_example, pointer

import mpiring

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with CuPy
jax = pytest.importorskip("jax", reason="needs JAX (pip install jax jaxlib)")
import jax.numpy as jnp  # noqa: E402 - only with jax


def gpu_devices():
    """JAX's GPUs, where CuPy is there to compute on them."""
    try:
        return jax.devices("gpu") if importlib.util.find_spec("cupy") else []
    except RuntimeError:  # no GPU backend
        return []


DEVICES = [jax.devices("cpu")[0]] + gpu_devices()[:1]


def aligned_empty(shape, dtype, alignment=64):
    """A NumPy array whose buffer starts on an ``alignment``-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


@pytest.mark.serial
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.platform)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_copy_in(device, dtype):
    x = jax.device_put(jnp.arange(48, dtype=dtype).reshape(2, 3, 2, 4), device)
    native = mpiring.interop.to_native(x, "q")
    assert pointer(native) == x.unsafe_buffer_pointer() and tuple(native.shape) == x.shape
    assert np.dtype(native.dtype) == np.dtype(dtype)


@pytest.mark.serial
@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
def test_zero_copy_out_cpu_aligned(dtype):
    result = aligned_empty((2, 3, 2, 4), dtype)
    result[...] = np.arange(48).reshape(result.shape)
    x = mpiring.interop.export_like(result, "jax")
    assert isinstance(x, jax.Array) and x.unsafe_buffer_pointer() == result.ctypes.data
    assert x.dtype == result.dtype
    np.testing.assert_array_equal(np.asarray(x), result)


@pytest.mark.serial
@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a JAX GPU device and CuPy")
def test_zero_copy_out_gpu():
    import cupy

    with cupy.cuda.Device(DEVICES[1].id):
        for dtype in (np.float32, bfloat16):
            result = cupy.arange(48, dtype=np.float32).astype(dtype).reshape(2, 3, 2, 4)
            x = mpiring.interop.export_like(result, "jax")
            assert isinstance(x, jax.Array) and x.unsafe_buffer_pointer() == result.data.ptr
            assert x.devices() == {DEVICES[1]}


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.platform)
@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
def test_jax_arrays_give_the_numpy_numbers(comm, seed, device, dtype):
    """The ring on jax.Arrays returns jax.Arrays (same device) with exactly the NumPy/CuPy results."""
    arrays = [mpiring.shard(x, comm, layout="striped") for x in random_problem(seed, 1, 8 * comm.Get_size(), 4, 2,
                                                                                8, dtype)]
    xs = [jax.device_put(a, device) for a in arrays]
    native = [mpiring.interop.to_native(x) for x in xs]
    opts = dict(causal=True, layout="striped")
    out, lse = mpiring.ring_attention(*xs[:3], comm, **opts)
    grads = mpiring.ring_attention_backward(xs[3], *xs[:3], out, lse, comm, **opts)
    out_n, lse_n = mpiring.ring_attention(*native[:3], comm, **opts)
    grads_n = mpiring.ring_attention_backward(native[3], *native[:3], out_n, lse_n, comm, **opts)
    for name, x, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (out_n, lse_n, *grads_n)):
        assert isinstance(x, jax.Array) and x.devices() == {device}, name
        ref = ref.get() if hasattr(ref, "get") else ref
        np.testing.assert_array_equal(np.asarray(x), ref, err_msg=name)


def test_jax_example(comm):
    errors = load_example("jax_interop").check(comm, seqlen_local=8)
    assert max(errors.values()) < 2e-5
