"""The worked example of docs/adding_an_objective.md (examples/chi_upper_bound.py): in sync
with the page, under 40 lines, and right against closed forms."""

import importlib.util
import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "chi_upper_bound.py"
PAGE = ROOT / "docs" / "adding_an_objective.md"


def _example():
    spec = importlib.util.spec_from_file_location("chi_upper_bound", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_shows_the_example_and_it_is_short():
    source = EXAMPLE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert source in blocks
    assert len(source.splitlines()) < 40


def model(x, subsample_size=None):
    """``z_n ~ N(0, 1)``, ``x_n ~ N(z_n, 1)``: ``p(x_n) = N(0, 2)``, posterior
    ``N(x_n / 2, 1 / 2)``."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def guide(x, subsample_size=None, shift=0.0, scale=0.5**0.5):
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2 + shift, scale))


def test_exact_posterior_gives_the_log_evidence_for_any_k_and_subsample():
    cubo = _example().ChiUpperBound
    x = torch.tensor([0.3, -1.2, 2.0, 0.7])
    log_px = dist.Normal(0.0, 2.0**0.5).log_prob(x)
    for k in (1, 5):
        assert cubo(num_particles=k).loss(model, guide, x) == pytest.approx(log_px.sum().item())
    pyro.set_rng_seed(0)
    objective = cubo(num_particles=3)
    loss = objective.differentiable_loss(model, guide, x, 2)
    pyro.set_rng_seed(0)
    idx = pyro.poutine.trace(guide).get_trace(x, 2).nodes["data"]["value"]
    assert loss.item() == pytest.approx(2 * log_px[idx].sum().item(), rel=1e-12)  # N/B = 2


def test_many_particles_reach_the_closed_form_of_a_wrong_guide():
    r""":math:`\frac12\log E_q[w^2] = \log p(x) + \frac12\log\int N(z;\mu,\sigma^2)^2/N(z;m,s^2)`
    for the posterior :math:`N(\mu, \sigma^2)` and the guide :math:`N(m, s^2)`."""
    x = torch.tensor([0.8])
    mu, var, m, s2 = 0.4, 0.5, 0.4 + 0.3, 1.0
    a, b = 1 / var - 1 / (2 * s2), 2 * mu / var - m / s2
    c = mu**2 / var - m**2 / (2 * s2)
    log_integral = (
        0.5 * math.log(s2 * 2 * math.pi) - math.log(2 * math.pi * var)
        + 0.5 * math.log(math.pi / a) + b**2 / (4 * a) - c
    )  # fmt: skip
    exact = dist.Normal(0.0, 2.0**0.5).log_prob(x).item() + 0.5 * log_integral

    def wrong(x):
        guide(x, shift=0.3, scale=1.0)

    pyro.set_rng_seed(0)
    estimate = _example().ChiUpperBound(num_particles=200_000).loss(model, wrong, x)
    assert estimate == pytest.approx(exact, abs=0.005)  # Monte Carlo error ~0.001
    assert estimate > dist.Normal(0.0, 2.0**0.5).log_prob(x).item() + 0.05  # above log p(x)


def test_it_trains_a_guide_in_svi():
    x = torch.tensor([0.3, -1.2, 2.0, 0.7])

    def learned(x):
        shift = pyro.param("shift", torch.tensor(0.5))
        guide(x, shift=shift)

    svi = pyro.infer.SVI(
        model, learned, pyro.optim.Adam({"lr": 0.05}), _example().ChiUpperBound(num_particles=8)
    )
    for _ in range(200):
        svi.step(x)
    assert abs(pyro.param("shift").item()) < 0.1  # the exact posterior's shift is 0
