"""Fixtures for the end-to-end tests of the digits applications."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """The apps set one thread for their tiny problems; restore the caller's setting afterwards."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
