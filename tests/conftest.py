"""Shared test settings.

The tests run tiny models, where PyTorch's intra-op threads cost more than they bring (a tiny-UNet call is
20-40x faster on one thread on a loaded 2-core machine); the full-size tests (marked slow) set their own.
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def toy_train_dir(tmp_path_factory):
    """One folder for the toy benchmarks' adapters (e2e_toy.py and separability_toy.py --train_dir): an adapter of
    the same settings and seed is trained once per test run, also when the test files run in two processes
    (pytest-xdist: the folder is the run's, not the process's; a process wanting an adapter the other is training
    waits for it, toy_benchmark.train_adapter). TOY_ADAPTERS_DIR=folder reuses the adapters a sweep already
    trained there (run folders are named by a hash of their settings: only the same ones match)."""
    if os.environ.get("TOY_ADAPTERS_DIR"):
        return os.environ["TOY_ADAPTERS_DIR"]
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is <run>/popen-gwN: share <run>/toy_adapters
        folder = tmp_path_factory.getbasetemp().parent / "toy_adapters"
        folder.mkdir(exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("toy_adapters")
