"""Test discipline from Pyro's tests/conftest.py: float64, fresh param store, fixed seed; one
intra-op thread (the tensors are small: more threads only add overhead on a 2-core machine)."""

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
