"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every tensor in the suite is tiny: a second BLAS/OpenMP thread only adds
    spin-waits, which on a loaded 2-core machine make a 40 x 40 product take
    milliseconds (10x slower test files were measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
