"""importance_resample: sampling-importance-resampling from a guide, checked on conjugate
Gaussian models whose posteriors are known exactly."""

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroParam

from pyro_fdiv.inference import AutoImplicit, importance_resample

Y = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9], dtype=torch.float64)
#: The posterior of mu in global_model: N(sum y / (n + 1), 1 / (n + 1)).
POST_LOC, POST_SCALE = (Y.sum() / (len(Y) + 1)).item(), 1 / math.sqrt(len(Y) + 1)
#: local_model: z_i ~ N(0, 1), x_i ~ N(z_i, 0.5^2): the posterior of z_i is N(0.8 x_i, 0.2).
X = torch.tensor([-1.5, 0.0, 0.7, 2.5], dtype=torch.float64)
LOCAL_LOC, LOCAL_SCALE = 0.8 * X, math.sqrt(0.2)


def global_model():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(Y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=Y)


def wide_guide(loc=POST_LOC, scale=2 * POST_SCALE):
    """A fixed guide, over-dispersed by default: the posterior mean, twice its sd."""
    pyro.sample("mu", dist.Normal(torch.tensor(loc), scale))


def local_model():
    with pyro.plate("data", len(X)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=X)


def local_guide(scale=2 * LOCAL_SCALE):
    with pyro.plate("data", len(X)):
        pyro.sample("z", dist.Normal(LOCAL_LOC, scale))


def hierarchical_model():
    """A global ``mu``, local ``z`` and a deterministic site: weights are joint."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(X)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.deterministic("s", mu + z)
        pyro.sample("x", dist.Normal(z, 0.5), obs=X)


def hierarchical_guide():
    pyro.sample("mu", dist.Normal(0.3, 1.0))
    with pyro.plate("data", len(X)):
        pyro.sample("z", dist.Normal(LOCAL_LOC, 1.0))


def check_moments(draws, loc, scale):
    """Mean and variance within 4.5 Monte Carlo standard errors of independent draws (the SIR
    draws are independent): ``scale / sqrt(n)`` for the mean and ``scale^2 sqrt(2 / n)`` for
    the variance of a Gaussian, plus the resampled distribution's own O(1/K) excess variance
    (with K = 256 proposals from a guide twice as wide, about 0.65 / K = 0.25%)."""
    n = draws.shape[0]
    mean, var = draws.mean(0), draws.var(0)
    assert ((mean - loc).abs() < 4.5 * scale / math.sqrt(n)).all(), (mean, loc)
    assert ((var / scale**2 - 1).abs() < 4.5 * math.sqrt(2 / n) + 0.0025).all(), (var, scale**2)


def test_over_dispersed_guide_is_resampled_to_the_exact_posterior():
    # the guide's own variance is 4x the posterior's: an unresampled draw fails by far
    # (tolerance 4.5 * sqrt(2 / 10000) + 0.0025 = 0.066 relative)
    result = importance_resample(global_model, wide_guide, num_samples=10_000, num_proposals=256)
    assert result.samples["mu"].shape == (10_000,)
    assert result.log_weights.shape == (10_000, 256)
    check_moments(result.samples["mu"], POST_LOC, POST_SCALE)
    # Gaussians with sd ratio 2: E_q[w^2] / E_q[w]^2 = 4 / sqrt(7), so ESS / K -> sqrt(7) / 4
    assert result.ess_fraction == pytest.approx(math.sqrt(7) / 4, abs=0.01)
    assert result.ess == pytest.approx(256 * result.ess_fraction)
    assert result.khat < 0.5  # a wider Gaussian is a good proposal (weights are bounded)


def test_exact_posterior_guide_gives_constant_weights():
    result = importance_resample(
        global_model, lambda: wide_guide(scale=POST_SCALE), num_samples=50, num_proposals=32
    )
    assert abs(result.ess_fraction - 1) < 1e-10 and abs(result.ess - 32) < 1e-8
    assert result.khat == -math.inf
    log_z = dist.MultivariateNormal(torch.zeros(5), torch.eye(5) + 1).log_prob(Y)
    assert torch.allclose(result.log_weights, log_z.expand(50, 32))


def test_autonormal_values_are_the_model_sites_constrained_values():
    """AutoNormal set to the exact posterior of a model with a positive latent: the weights
    (including its Delta sites' log-Jacobians) are constant, and the samples are the model's
    constrained values."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(Y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=Y)

    guide = AutoNormal(model)
    guide()
    for name, loc, scale in (("mu", POST_LOC, POST_SCALE), ("sigma", 0.0, 1.0)):
        setattr(guide.locs, name, PyroParam(torch.tensor(loc)))
        setattr(guide.scales, name, PyroParam(torch.tensor(scale), constraints.softplus_positive))
    result = importance_resample(model, guide, num_samples=4000, num_proposals=4)
    assert set(result.samples) == {"mu", "sigma"}
    assert abs(result.ess_fraction - 1) < 1e-10
    assert (result.samples["sigma"] > 0).all()
    check_moments(result.samples["sigma"].log(), 0.0, 1.0)
    check_moments(result.samples["mu"], POST_LOC, POST_SCALE)


def test_local_latents_are_resampled_per_data_point():
    result = importance_resample(local_model, local_guide, num_samples=10_000, num_proposals=256)
    assert result.log_weights.shape == (10_000, 256, len(X))
    assert result.samples["z"].shape == (10_000, len(X))
    check_moments(result.samples["z"], LOCAL_LOC, LOCAL_SCALE)
    # per data point, each draw's ESS is that of one 1-D weight (joint resampling of four
    # points would have about (sqrt(7) / 4)^4 = 0.19)
    assert result.ess_fraction == pytest.approx(math.sqrt(7) / 4, abs=0.01)
    # the data points' draws are independent (joint resampling would correlate them)
    corr = torch.corrcoef(result.samples["z"].T)
    assert (corr - torch.eye(len(X))).abs().max() < 4.5 / math.sqrt(10_000)


def test_global_latents_resample_jointly_with_deterministic_sites():
    result = importance_resample(
        hierarchical_model, hierarchical_guide, num_samples=500, num_proposals=16, chunk_size=64
    )
    samples = result.samples
    assert result.log_weights.shape == (500, 16)  # one weight per proposal: joint
    assert samples["mu"].shape == (500,) and samples["z"].shape == (500, len(X))
    # the deterministic site comes from the same proposal as the sites it is computed from
    assert torch.allclose(samples["s"], samples["mu"][:, None] + samples["z"])


def test_predictive_and_arviz_take_the_samples():
    result = importance_resample(
        hierarchical_model, hierarchical_guide, num_samples=300, num_proposals=8
    )
    predictive = Predictive(hierarchical_model, posterior_samples=result.samples)()
    assert set(predictive) == {"x"} and predictive["x"].shape == (300, len(X))
    # without the deterministic site, Predictive recomputes it: the same values
    latents = {name: result.samples[name] for name in ("mu", "z")}
    recomputed = Predictive(hierarchical_model, posterior_samples=latents)()
    assert torch.allclose(recomputed["s"], result.samples["s"])
    for parallel in (False, True):
        draws = Predictive(
            local_model, posterior_samples={"z": result.samples["z"]}, parallel=parallel
        )()
        assert draws["x"].shape == (300, len(X))
    idata = az.from_dict(posterior={k: v.numpy()[None] for k, v in result.samples.items()})
    assert idata.posterior["z"].shape == (1, 300, len(X))


def test_one_draw_one_proposal_and_determinism():
    result = importance_resample(local_model, local_guide, num_samples=1, num_proposals=1)
    assert result.samples["z"].shape == (1, len(X)) and result.log_weights.shape == (1, 1, 4)
    assert result.ess_fraction == 1.0
    pyro.set_rng_seed(3)
    first = importance_resample(local_model, local_guide, num_samples=30, num_proposals=5)
    pyro.set_rng_seed(3)
    second = importance_resample(local_model, local_guide, num_samples=30, num_proposals=5)
    assert torch.equal(first.samples["z"], second.samples["z"])
    assert not first.samples["z"].requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "Expected num_samples to be an integer >= 1, actual 0"),
        ({"num_samples": 10, "num_proposals": 0}, "Expected num_proposals to be an integer >= 1"),
        ({"num_samples": 10, "num_proposals": 2.5}, "num_proposals .* actual 2.5"),
        ({"num_samples": 10, "chunk_size": -1}, "Expected chunk_size to be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        importance_resample(global_model, wide_guide, **kwargs)


def test_implicit_guide_has_no_density():
    guide = AutoImplicit(global_model, hidden=(4,))
    with pytest.raises(ValueError, match="importance_resample needs the guide's density"):
        importance_resample(global_model, guide, num_samples=5, num_proposals=4)


def test_subsampled_plate_raises():
    def model():
        with pyro.plate("data", len(X), subsample_size=2) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=X[idx])

    def guide():
        with pyro.plate("data", len(X), subsample_size=2):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="plate 'data' is subsampled \\(2 of 4\\)"):
        importance_resample(model, guide, num_samples=5, num_proposals=4)


def test_guide_outside_the_support_raises():
    def model():
        pyro.sample("r", dist.Uniform(0.0, 1.0))

    def guide():
        pyro.sample("r", dist.Normal(5.0, 0.01))

    with pyro.validation_enabled(False), pytest.raises(ValueError, match="weight zero"):
        importance_resample(model, guide, num_samples=5, num_proposals=4)


def test_nested_plates_resample_per_element_of_the_shared_plate():
    """``u`` in plate ``a`` (dim -2), ``v`` in ``a`` and ``b``: the shared plate is ``a``, and
    each of its elements takes ``u``, ``v`` and the deterministic ``d`` from one proposal."""
    obs = torch.arange(6.0).reshape(3, 2)

    def model():
        with pyro.plate("a", 3, dim=-2):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            with pyro.plate("b", 2, dim=-1):
                v = pyro.sample("v", dist.Normal(u, 1.0))
                pyro.deterministic("d", u + v)
                pyro.sample("x", dist.Normal(v, 1.0), obs=obs)

    def guide():
        with pyro.plate("a", 3, dim=-2):
            pyro.sample("u", dist.Normal(0.5, 1.5))
            with pyro.plate("b", 2, dim=-1):
                pyro.sample("v", dist.Normal(1.0, 2.0))

    result = importance_resample(model, guide, num_samples=200, num_proposals=16)
    samples = result.samples
    assert result.log_weights.shape == (200, 16, 3)
    assert samples["u"].shape == (200, 3, 1) and samples["v"].shape == (200, 3, 2)
    assert torch.allclose(samples["d"], samples["u"] + samples["v"])
    predictive = Predictive(model, posterior_samples=samples)()
    assert predictive["x"].shape == (200, 3, 2)
