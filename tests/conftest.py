"""Shared fixtures. Every test runs at any communicator size: plain ``pytest`` is
``-n 1``; ``mpiexec -n N python -m mpi4py -m pytest --with-mpi`` runs each test on
all N ranks together (collective tests) — see tests/run.sh."""

import zlib

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
