import numpy as np
import pytest
from helpers import DTYPES, check_ring


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_smoke(comm, seed, dtype):
    check_ring(comm, seed, dtype=dtype, causal=True, layout="zigzag")
