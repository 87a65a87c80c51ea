"""Shared test settings.

The tests run tiny models, where PyTorch's intra-op threads cost more than they bring (a tiny-UNet call is
20-40x faster on one thread on a loaded 2-core machine); the full-size tests (marked slow) set their own.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield
