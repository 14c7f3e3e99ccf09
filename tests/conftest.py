"""Process-wide settings a test may change must not leak into the tests after it."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _flush_denormal_off_after_each_test():
    """Programs run in-process (``tune_cpu``) flush denormals for the whole process, which makes
    hypothesis refuse to generate floats in later tests; every test ends with the default restored."""
    yield
    torch.set_flush_denormal(False)
