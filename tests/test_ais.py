"""``pyro_fdiv.evaluate.ais_log_likelihood`` against models whose marginal likelihood is exact."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_fdiv.evaluate import (
    SCHEDULES,
    ais_log_likelihood,
    annealing_schedule,
    log_likelihood,
)
from pyro_fdiv.models.vae import VAE

D, Z, NOISE = 6, 3, 0.3


def _linear_gaussian():
    """``z ~ N(0, I_3)``, ``x | z ~ N(W z + b, 0.3² I_6)``: a posterior much narrower than the
    prior, so importance sampling from the prior is poor; the marginal and posterior are exact."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(D, Z, generator=generator)
    bias = torch.randn(D, generator=generator)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + bias, NOISE).to_event(1), obs=x)

    def prior(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))

    marginal = dist.MultivariateNormal(bias, weight @ weight.T + NOISE**2 * torch.eye(D))
    cov = torch.linalg.inv(torch.eye(Z) + weight.T @ weight / NOISE**2)

    def posterior(x, widen=1.0):
        loc = (x - bias) @ weight @ cov / NOISE**2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, widen**2 * cov))

    return model, prior, posterior, marginal


def test_agrees_with_the_exact_marginal_and_brackets_importance_sampling():
    model, prior, _, marginal = _linear_gaussian()
    x = marginal.sample((6,))
    exact = marginal.log_prob(x)
    result = ais_log_likelihood(model, x, num_chains=128, num_steps=200, num_leapfrog=5)
    assert result.log_likelihood.shape == result.stderr.shape == (6,)
    assert result.log_weights.shape == (128, 6)
    assert not result.log_likelihood.requires_grad
    torch.testing.assert_close(
        result.log_likelihood, torch.logsumexp(result.log_weights, 0) - math.log(128)
    )
    # within a few standard errors of the exact value, each of which is small
    assert ((result.log_likelihood - exact).abs() < 4 * result.stderr).all(), (
        result.log_likelihood - exact,
        result.stderr,
    )
    assert (result.stderr < 0.3).all()
    assert ((result.acceptance > 0.5) & (result.acceptance < 0.95)).all()
    # importance sampling from the prior with as many samples, E log p̂ from 20 repetitions:
    # below AIS for every point (within AIS's error), by nats on average, and below the exact
    # value; AIS at most the exact value plus its Monte Carlo error (both are lower bounds)
    draws = torch.stack([log_likelihood(model, prior, x, num_samples=128) for _ in range(20)])
    is_mean = draws.mean(0)
    assert (is_mean < exact).all()
    assert (is_mean < result.log_likelihood + 4 * result.stderr).all()
    assert (exact - is_mean).mean() > 2.0 + (exact - result.log_likelihood).mean()
    assert (result.log_likelihood <= exact + 4 * result.stderr).all()


def test_longer_schedules_tighten_the_chains_lower_bound():
    model, _, _, marginal = _linear_gaussian()
    x = marginal.sample((6,))
    exact = marginal.log_prob(x)
    options = dict(num_chains=32, num_leapfrog=3, step_size=0.1)
    bounds = {}
    for num_steps in (1, 10, 100):
        log_w = ais_log_likelihood(model, x, num_steps=num_steps, **options).log_weights
        bounds[num_steps] = (exact - log_w.mean(0)).mean()  # E log w ≤ log p(x)
    # the prior's gap (an ELBO with q = prior) is large; annealing closes most of it
    assert bounds[1] > 5 * bounds[10] > 0
    assert bounds[10] > 2 * bounds[100] > 0


def test_one_step_is_importance_sampling_with_the_same_draws():
    model, prior, posterior, marginal = _linear_gaussian()
    x = marginal.sample((5,))

    def wide(x):
        posterior(x, widen=1.5)

    for initial, guide in [("prior", prior), (wide, wide)]:
        pyro.set_rng_seed(4)
        result = ais_log_likelihood(model, x, initial=initial, num_chains=40, num_steps=1)
        pyro.set_rng_seed(4)
        expected = log_likelihood(model, guide, x, num_samples=40)
        torch.testing.assert_close(result.log_likelihood, expected, rtol=0, atol=1e-12)
        assert torch.isnan(result.acceptance).all()


def test_the_exact_posterior_as_initial_gives_every_chain_the_exact_weight():
    # f_t = q^(1-β) p(x, ·)^β = p(x)^β q: the increments sum to log p(x) whatever HMC does
    model, _, posterior, marginal = _linear_gaussian()
    x = marginal.sample((4,))
    for schedule in SCHEDULES:
        result = ais_log_likelihood(
            model, x, initial=posterior, num_chains=8, num_steps=7, schedule=schedule
        )
        expected = marginal.log_prob(x).expand(8, 4)
        torch.testing.assert_close(result.log_weights, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(result.stderr, torch.zeros(4), rtol=0, atol=1e-10)
        assert (result.acceptance > 0.5).all()  # HMC did run, at the posterior


def test_a_positive_latent_through_its_jacobian():
    # λ ~ Gamma(a, b), x_j | λ ~ Exponential(λ), j ≤ m: p(x) = Γ(a+m)/Γ(a) b^a / (b + Σx)^(a+m)
    a, b, m = 3.0, 2.0, 5

    def model(x):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(a, b))
            pyro.sample("x", dist.Exponential(rate.unsqueeze(-1)).to_event(1), obs=x)

    x = dist.Exponential(torch.tensor([[0.5], [1.0], [2.0], [4.0]]).expand(4, m)).sample()
    exact = math.lgamma(a + m) - math.lgamma(a) + a * math.log(b) - (a + m) * (b + x.sum(-1)).log()
    result = ais_log_likelihood(
        model, x, num_chains=128, num_steps=100, num_leapfrog=4, step_size=0.2
    )
    # (without the log-Jacobian of exp in log q0 the errors are 0.2 to 0.9 nats, stderr 0.02)
    assert ((result.log_likelihood - exact).abs() < 4 * result.stderr + 0.02).all(), (
        result.log_likelihood - exact,
        result.stderr,
    )


def test_inner_plates_and_a_named_data_plate():
    # one latent per pixel in a plate inside the data plate: z ~ N(0, 1), x | z ~ N(z, 1), so
    # log p(x_n) = Σ_pixels log N(x; 0, 2); the rows are at dim -2 of every site
    x = 2.0 * torch.randn(5, 4)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("pixels", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    exact = dist.Normal(0.0, 2.0**0.5).log_prob(x).sum(-1)
    result = ais_log_likelihood(
        model, x, num_chains=32, num_steps=50, num_leapfrog=3, data_plate="data", batch_size=2
    )
    assert result.log_likelihood.shape == (5,)
    assert ((result.log_likelihood - exact).abs() < 4 * result.stderr + 0.02).all()


def test_discrete_latents_and_density_free_guides_are_refused_by_site():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"model site 'c' .* is discrete"):
        ais_log_likelihood(model, torch.randn(3), num_steps=2)
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5, encoder="implicit")
    x = torch.bernoulli(torch.full((3, 6), 0.4))
    with pytest.raises(ValueError, match="initial guide site 'eps'"):
        ais_log_likelihood(vae.model, x, initial=vae.guide, num_steps=2)
    proposal = vae.gaussian_proposal(num_fit=500)
    result = ais_log_likelihood(vae.model, x, initial=proposal, num_chains=4, num_steps=3)
    assert torch.isfinite(result.log_likelihood).all()


def test_annealing_schedules():
    for kind in SCHEDULES:
        assert annealing_schedule(1, kind).tolist() == [0.0, 1.0]
        beta = annealing_schedule(20, kind)
        assert beta.shape == (21,) and beta[0] == 0 and beta[-1] == 1
        assert (beta.diff() > 0).all()
    sigmoid = annealing_schedule(20, "sigmoid")
    torch.testing.assert_close(sigmoid + sigmoid.flip(0), torch.ones(21))  # symmetric
    geometric = annealing_schedule(20, "geometric", beta_min=1e-3)
    ratios = geometric[2:] / geometric[1:-1]
    torch.testing.assert_close(ratios, torch.full((19,), 1e-3 ** (-1 / 20)))
    torch.testing.assert_close(annealing_schedule(4, "linear"), torch.linspace(0, 1, 5))


def test_bad_arguments():
    model, _, _, marginal = _linear_gaussian()
    x = marginal.sample((3,))
    for kwargs, match in [
        ({"num_chains": 0}, "num_chains"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_leapfrog": 0}, "num_leapfrog"),
        ({"step_size": 0.0}, "step_size"),
        ({"target_accept": 1.0}, "target_accept"),
        ({"schedule": "cosine"}, "schedule"),
        ({"num_steps": 3, "schedule": [0.0, 0.5, 1.0]}, "num_steps=len"),
        ({"num_steps": 2, "schedule": [0.0, 0.7, 0.5]}, "increase from 0 to 1"),
        ({"initial": "posterior"}, "initial"),
        ({"data_plate": "rows", "num_steps": 2}, "data_plate 'rows'"),
    ]:
        with pytest.raises(ValueError, match=match):
            ais_log_likelihood(model, x, **kwargs)

    def global_model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x[:, 0])

    with pytest.raises(ValueError, match=r"ais_log_likelihood needs the data plate .* global"):
        ais_log_likelihood(global_model, x, num_steps=2)
    # a custom schedule of the right length runs
    ais_log_likelihood(model, x, num_steps=2, schedule=[0.0, 0.5, 1.0], num_chains=2)


def test_runtime_benchmark_smoke(data_root):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ais.py"
    spec = importlib.util.spec_from_file_location("bench_ais", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--smoke", "--root", str(data_root), "--threads", "1"])
    assert list(table["estimator"]) == ["IS (encoder, S=10)", "AIS (prior, T=3, M=2, L=2)"]
    assert (table["wall_s"] > 0).all() and table["log_likelihood"].notna().all()
