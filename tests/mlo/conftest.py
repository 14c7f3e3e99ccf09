"""Shared setup for the mlo core tests: float64 by default, fixed seed, one thread
(the problems are tiny; intra-op threading only adds overhead and noise)."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
