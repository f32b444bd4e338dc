"""Shared fixtures. Every test runs at any communicator size: plain ``pytest`` is
``-n 1``; ``mpiexec -n N python -m mpi4py -m pytest --with-mpi`` runs each test on
all N ranks together (collective tests) — see tests/run.sh."""

import zlib

import numpy as np
import pytest
from mpi4py import MPI


def pytest_collection_modifyitems(config, items):
    # Pure (non-MPI) tests run once, at -n 1, not N times under mpiexec.
    if MPI.COMM_WORLD.Get_size() > 1:
        skip = pytest.mark.skip(reason="serial test: runs at -n 1 only")
        for item in items:
            if "serial" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: a pure test without MPI, run only at -n 1")


@pytest.fixture(autouse=True)
def poisoned_ring_buffers(monkeypatch):
    """The ring's uninitialised buffers start as garbage in every test, not as whatever
    the allocator gives (often zeros, which would hide a missed write): NaN where every
    element read must have been written first (K/V blocks that arrive whole, dK/dV
    partials: the ring clears the rows it computes into), a large finite value in the
    buffer that K/V blocks arrive in part (``mpiring.layout.kv_rows``), whose other rows
    the mask hides but P·V still multiplies by 0."""
    from mpiring._xp import compute_dtype
    from mpiring.backends.cupy_ import CudaKernelBackend
    from mpiring.backends.numpy_ import BlockwiseBackend

    def dkv_blockwise(self, kv):
        return self.xp.full(kv.shape, np.nan, compute_dtype(kv.dtype))

    def dkv_kernels(self, kv):
        return self.xp.full((2,) + tuple(kv[0].shape), np.nan, np.float32)

    def kv_blockwise(self, kv, zero=False):
        return self.xp.full_like(kv, 1e4 if zero else np.nan)

    def kv_kernels(self, kv, zero=False):
        return self.xp.full((2,) + tuple(kv[0].shape), 1e4 if zero else np.nan, kv[0].dtype)

    for cls, dkv, kv in ((BlockwiseBackend, dkv_blockwise, kv_blockwise), (CudaKernelBackend, dkv_kernels, kv_kernels)):
        monkeypatch.setattr(cls, "kv_buffer", kv)
        monkeypatch.setattr(cls, "empty_dkv", dkv)
    # The CUDA forward's outputs and fp32 state too: a row that no launch writes shows as NaN.
    fwd_begin = CudaKernelBackend.fwd_begin

    def fwd_begin_poisoned(self, *args, **kwargs):
        st = fwd_begin(self, *args, **kwargs)
        for x in (st.acc, st.m, st.l, st.out, st.lse):
            if x is not None:
                x.fill(np.nan)
        return st

    monkeypatch.setattr(CudaKernelBackend, "fwd_begin", fwd_begin_poisoned)


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture
def seed(request):
    """Same on every rank (so all ranks build the same global problem), new per test."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(scope="module")
def one_gpu_per_rank():
    """GPU ``local_rank mod device_count`` current on each rank (collective; nothing
    without a GPU). GPU test modules use it for all their tests:
    ``pytestmark = pytest.mark.usefixtures("one_gpu_per_rank")``."""
    from helpers import usable_cupy

    if usable_cupy() is not None:
        from mpiring.transport.gpu import select_device

        select_device(MPI.COMM_WORLD)
