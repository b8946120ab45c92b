"""Test discipline from Pyro's tests/conftest.py: float64, fresh param store, fixed seed; one
intra-op thread (the tensors are small: more threads only add overhead on a 2-core machine)."""

import numpy as np
import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _pyro_test_setup():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data directory holding a synthetic ``binarized_mnist/binarized_mnist.npz`` (the real
    file's layout): 4×4 binary images, four prototypes with 5% of pixels flipped; 120 train,
    20 valid, 40 test."""
    root = tmp_path_factory.mktemp("data")
    (root / "binarized_mnist").mkdir()
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, 16)) < 0.4

    def draw(n):
        flips = rng.random((n, 16)) < 0.05
        return (prototypes[rng.integers(4, size=n)] ^ flips).astype(np.uint8)

    splits = {"train": draw(120), "valid": draw(20), "test": draw(40)}
    np.savez(root / "binarized_mnist" / "binarized_mnist.npz", **splits)
    return root
