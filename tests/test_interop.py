"""DLPack in and out (mpiring.interop), without any framework: a generic DLPack
producer, the bfloat16 relabelling, errors (collective), lazy imports, and the
NumPy and CuPy examples. torch and JAX: tests/test_torch.py, tests/test_jax.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_problem
from ml_dtypes import bfloat16

import mpiring
from mpiring import interop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pointer(x) -> int:
    """Address of the first element of a NumPy, CuPy, torch or JAX array."""
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    if hasattr(x, "data_ptr"):  # torch
        return x.data_ptr()
    if hasattr(x, "unsafe_buffer_pointer"):  # JAX
        return x.unsafe_buffer_pointer()
    return x.data.ptr  # CuPy


class Producer:
    """A minimal DLPack producer (not NumPy, CuPy, torch or JAX) around an array."""

    def __init__(self, array, device=None, versioned=True):
        self.array, self.device, self.versioned = array, device, versioned

    def __dlpack_device__(self):
        return self.device or self.array.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        if not self.versioned:  # a pre-1.0 producer: plain "dltensor" capsules only
            kwargs.pop("max_version", None)
            if kwargs.pop("copy", None) is not None or kwargs.pop("dl_device", None) is not None:
                raise TypeError("copy and dl_device are not supported")
        return self.array.__dlpack__(**kwargs)


@pytest.mark.serial
@pytest.mark.parametrize("versioned", [True, False])
def test_generic_producer_is_zero_copy(versioned):
    a = np.arange(24, dtype=np.float32).reshape(1, 4, 2, 3)
    x = interop.to_native(Producer(a, versioned=versioned))
    assert isinstance(x, np.ndarray) and x.ctypes.data == a.ctypes.data and x.shape == a.shape
    assert interop.array_kind(Producer(a)) == "dlpack"
    assert interop.export_like(x, "dlpack") is x  # other producers get NumPy back


@pytest.mark.serial
def test_numpy_and_non_dlpack_pass_through():
    a = np.zeros(3)
    assert interop.to_native(a) is a
    assert interop.to_native([1, 2]) == [1, 2]  # left for the API's type check
    assert interop.array_kind([1, 2]) is None


@pytest.mark.serial
@pytest.mark.parametrize("versioned", [True, False])
def test_bfloat16_relabelling_round_trip(versioned):
    """uint16 → bfloat16 → uint16 relabelling of the capsule: same memory, same bits."""
    bits = np.arange(8, dtype=np.uint16)
    as_bf16 = interop._Relabelled(Producer(bits, versioned=versioned), interop._DL_UINT, interop._DL_BFLOAT)
    back = np.from_dlpack(interop._Relabelled(as_bf16, interop._DL_BFLOAT, interop._DL_UINT))
    assert back.dtype == np.uint16 and back.ctypes.data == bits.ctypes.data
    np.testing.assert_array_equal(back, bits)


@pytest.mark.serial
def test_relabelling_checks_the_dtype():
    with pytest.raises(BufferError, match="expected 16-bit dtype code 4"):
        np.from_dlpack(interop._Relabelled(np.zeros(2, np.float32), interop._DL_BFLOAT, interop._DL_UINT))


@pytest.mark.serial
def test_unversioned_withholds_max_version():
    """The fallback for consumers that refuse read-only (versioned) capsules."""
    a = np.arange(4, dtype=np.float32)
    assert interop._capsule_name(a.__dlpack__(max_version=(1, 0))) == b"dltensor_versioned"
    capsule = interop._Unversioned(a).__dlpack__(stream=None, max_version=(1, 0), copy=None)
    assert interop._capsule_name(capsule) == b"dltensor"
    assert np.from_dlpack(interop._Unversioned(a)).ctypes.data == a.ctypes.data


@pytest.mark.serial
def test_exportable_bfloat16_is_a_view():
    """A bfloat16 NumPy result is exported as bfloat16 through a uint16 view (no copy)."""
    a = np.arange(6, dtype=np.float32).astype(bfloat16)
    capsule = interop._exportable(a).__dlpack__()
    assert interop._capsule_name(capsule) == b"dltensor"
    tensor = interop._DLTensor.from_address(interop._capsule_pointer(capsule, b"dltensor"))
    assert (tensor.dtype.code, tensor.dtype.bits) == (interop._DL_BFLOAT, 16) and tensor.data == a.ctypes.data


@pytest.mark.serial
def test_unsupported_devices_raise_type_error():
    a = np.zeros(2, np.float32)
    with pytest.raises(TypeError, match="on a OpenCL device is not supported"):
        interop.to_native(Producer(a, device=(4, 0)), "q")
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(TypeError, match="q is a Producer on a CUDA device: install CuPy"):
            interop.to_native(Producer(a, device=(2, 0)), "q")


@pytest.mark.serial
def test_import_arrays_never_raises():
    a = np.zeros(2, np.float32)
    arrays, export, problem = interop.import_arrays({"q": Producer(a), "k": Producer(a, device=(4, 0)), "v": None})
    assert isinstance(arrays["q"], np.ndarray) and arrays["k"] is None and arrays["v"] is None
    assert problem.startswith("k: Producer on a OpenCL device")
    assert export(a) is a


@pytest.mark.serial
def test_import_mpiring_imports_no_framework():
    code = "import sys, mpiring, mpiring.interop; assert not {'torch', 'jax'} & set(sys.modules), sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generic_producer_through_the_ring(comm, seed):
    """A DLPack producer gives the same numbers as NumPy, forward and backward (any size)."""
    q, k, v, dout = (mpiring.shard(x, comm, layout="zigzag")
                     for x in random_problem(seed, 1, 8 * comm.Get_size(), 4, 2, 8, np.float32))
    opts = dict(causal=True, layout="zigzag")
    out, lse = mpiring.ring_attention(q, k, v, comm, **opts)
    grads = mpiring.ring_attention_backward(dout, q, k, v, out, lse, comm, **opts)
    wrapped = [Producer(x) for x in (q, k, v)]
    out_p, lse_p = mpiring.ring_attention(*wrapped, comm, **opts)
    grads_p = mpiring.ring_attention_backward(Producer(dout), *wrapped, Producer(out), Producer(lse), comm, **opts)
    for x, y in zip((out, lse, *grads), (out_p, lse_p, *grads_p)):
        assert isinstance(y, np.ndarray)
        np.testing.assert_array_equal(x, y)


def test_import_failure_on_one_rank_raises_everywhere(comm):
    """A conversion that fails on rank 0 only is agreed: every rank raises, none waits."""
    a = np.zeros((1, 4, 2, 8), np.float32)
    q = Producer(a, device=(4, 0)) if comm.Get_rank() == 0 else a
    with pytest.raises(TypeError, match=r"q: Producer on a OpenCL device is not supported .*\(on rank 0\)"):
        mpiring.ring_attention(q, a, a, comm)


def test_numpy_example(comm):
    errors = load_example("numpy_cpu").check(comm, seqlen_local=16)
    assert max(errors.values()) < 2e-5


def test_cupy_hpc_example_loop_on_numpy(comm):
    """The HPC loop of examples/cupy_hpc.py on the CPU (its CuPy run is in the GPU tests)."""
    name, err, residuals = load_example("cupy_hpc").check(comm, use_numpy=True, seqlen_local=32, steps=3)
    assert name == "numpy" and err < 1e-4 and residuals[-1] < residuals[0]


@pytest.mark.gpu
def test_cupy_hpc_example_on_gpu(comm):
    cupy = pytest.importorskip("cupy", reason="needs CuPy")
    if not cupy.is_available():
        pytest.skip("needs a CUDA device")
    name, err, _ = load_example("cupy_hpc").check(comm, steps=3)
    assert name == "cupy" and err < 1e-4
