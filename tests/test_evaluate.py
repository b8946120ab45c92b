"""``pyro_fdiv.evaluate.log_likelihood`` against models whose marginal likelihood is exact."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_fdiv.evaluate import log_likelihood
from pyro_fdiv.inference.importance import get_log_weights
from pyro_fdiv.models.vae import VAE

D, Z = 4, 2


def _linear_gaussian():
    """``z ~ N(0, I)``, ``x | z ~ N(W z + b, s² I)``: the marginal and posterior are exact."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(D, Z, generator=generator)
    bias = torch.randn(D, generator=generator)
    noise = 0.7

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + bias, noise).to_event(1), obs=x)

    marginal = dist.MultivariateNormal(bias, weight @ weight.T + noise**2 * torch.eye(D))
    # posterior: precision I + WᵀW/s², mean Σ Wᵀ(x − b)/s²
    cov = torch.linalg.inv(torch.eye(Z) + weight.T @ weight / noise**2)

    def posterior_guide(x, widen=1.0):
        loc = (x - bias) @ weight @ cov / noise**2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, widen**2 * cov))

    return model, posterior_guide, marginal


def test_exact_posterior_gives_the_exact_marginal_for_any_sample_size():
    model, guide, marginal = _linear_gaussian()
    x = marginal.sample((37,))
    exact = marginal.log_prob(x)
    for num_samples, batch_size, chunk in [(1, 37, None), (10, 8, 3), (250, 5, 64)]:
        estimate = log_likelihood(
            model, guide, x, num_samples=num_samples, batch_size=batch_size, particle_chunk=chunk
        )
        assert estimate.shape == (37,)
        assert not estimate.requires_grad
        torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-10)


def test_wide_proposal_is_a_lower_bound_that_converges():
    model, guide, marginal = _linear_gaussian()
    x = marginal.sample((20,))
    exact = marginal.log_prob(x)

    def wide(x):
        guide(x, widen=2.0)

    few = torch.stack([log_likelihood(model, wide, x, num_samples=2) for _ in range(200)])
    gap = (exact - few).mean(0)  # E log p̂ ≤ log p: Jensen
    assert (gap > 0.05).all(), gap
    many = log_likelihood(model, wide, x, num_samples=20_000, batch_size=10)
    # relative variance of p/q for q = N(m, 4Σ), p = N(m, Σ) in 2-D: (c²/(2c − 1))^{d/2} − 1
    # with c = 4, i.e. 16/7 − 1; the log-estimate's standard error is its root over S
    standard_error = math.sqrt((16 / 7 - 1) / 20_000)
    assert (many - exact).abs().max() < 5 * standard_error


def test_chunks_combine_exactly_like_one_logsumexp():
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5)
    x = torch.bernoulli(torch.full((9, 6), 0.4))
    pyro.set_rng_seed(3)
    estimate = log_likelihood(
        vae.model, vae.guide, x, num_samples=12, batch_size=4, particle_chunk=5
    )
    pyro.set_rng_seed(3)
    # the same draws by hand: batches of 4, 4, 1; particle chunks of 5, 5, 2 in each batch
    expected = []
    for start in range(0, 9, 4):
        chunks = [
            get_log_weights(vae.model, vae.guide, (x[start : start + 4],), {}, k, 1).log_w
            for k in (5, 5, 2)
        ]
        expected.append(torch.logsumexp(torch.cat(chunks), 0) - math.log(12))
    torch.testing.assert_close(estimate, torch.cat(expected).detach(), rtol=1e-12, atol=1e-12)


def test_implicit_guide_is_refused_and_its_gaussian_proposal_works():
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5, encoder="implicit")
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    with pytest.raises(ValueError, match="'z'"):
        log_likelihood(vae.model, vae.guide, x, num_samples=3)
    proposal = vae.gaussian_proposal(num_fit=20_000, widen=1.5, shrinkage=0.0)
    values = log_likelihood(vae.model, proposal, x, num_samples=200)
    assert values.shape == (5,) and torch.isfinite(values).all()
    # a defensive mixture of the fitted full-covariance Gaussian and a diagonal one twice as
    # wide, both widened by `widen`, each with the encoder draws' mean
    fn = pyro.poutine.trace(proposal).get_trace(x).nodes["z"]["fn"]
    draws = vae.encoder(x, torch.randn(20_000, 5, vae.encoder.noise_dim))
    centred = draws - draws.mean(0)
    cov = torch.einsum("sbi,sbj->bij", centred, centred) / 20_000
    components = fn.component_distribution
    torch.testing.assert_close(fn.mixture_distribution.probs, torch.full((5, 2), 0.5))
    torch.testing.assert_close(components.loc[:, 0], draws.mean(0), rtol=0, atol=0.03)
    torch.testing.assert_close(components.loc[:, 1], components.loc[:, 0])
    full, wide = components.covariance_matrix.unbind(-3)
    torch.testing.assert_close(full, 1.5**2 * cov, rtol=0.05, atol=0.01)
    torch.testing.assert_close(wide, torch.diag_embed(4 * torch.diagonal(full, dim1=-2, dim2=-1)))


def test_bad_arguments():
    model, guide, marginal = _linear_gaussian()
    x = marginal.sample((3,))
    for name, kwargs in [("num_samples", {"num_samples": 0}), ("batch_size", {"batch_size": 0})]:
        with pytest.raises(ValueError, match=name):
            log_likelihood(model, guide, x, **kwargs)


def test_inner_plates_are_summed_into_each_row_and_global_latents_are_refused():
    # one latent per pixel: z ~ N(0, 1), x | z ~ N(z, 1), so x ~ N(0, 2) per pixel and the
    # posterior is N(x/2, 1/2); the pixel plate is shared by every site, the row plate outside
    x = 2.0 * torch.randn(7, D)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("pixels", D, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("pixels", D, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    estimate = log_likelihood(model, guide, x, num_samples=6, batch_size=3)
    exact = dist.Normal(0.0, 2.0**0.5).log_prob(x).sum(-1)
    assert estimate.shape == (7,)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-10)

    def global_model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x[:, 0])

    def global_guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="global latent"):
        log_likelihood(global_model, global_guide, x, num_samples=3)


def test_data_plate_is_found_by_the_datas_dimension_not_by_its_size():
    """An outer plate that happens to have as many elements as the batch has rows is not the
    data plate: the rows are the observation's leading batch dim (or the plate named)."""
    x = 2.0 * torch.randn(3)

    def model(x):  # three independent replicates of every data point, each with its own z
        with pyro.plate("replicates", 3, dim=-2), pyro.plate("data", len(x), dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("replicates", 3, dim=-2), pyro.plate("data", len(x), dim=-1):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))  # the exact posterior

    exact = 3 * dist.Normal(0.0, 2.0**0.5).log_prob(x)
    for kwargs in ({}, {"data_plate": "data"}):
        estimate = log_likelihood(model, guide, x, num_samples=4, **kwargs)
        torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="data_plate 'rows' is not a vectorized plate"):
        log_likelihood(model, guide, x, num_samples=4, data_plate="rows")
