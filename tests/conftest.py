"""Test discipline from Pyro's tests/conftest.py: float64, fresh param store, fixed seed."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _pyro_test_setup():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()
