"""The shared per-data-point log-weight mechanism: plates, autoguides, errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

from pyro_fdiv.inference import IWAE, BlackBoxAlpha, get_log_weights


def test_nested_plates_keep_only_the_shared_ones():
    x = torch.randn(3, 4)

    def model(x):
        with pyro.plate("groups", 3, dim=-2):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("obs", 4, dim=-1):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        with pyro.plate("groups", 3, dim=-2):
            pyro.sample("mu", dist.Normal(0.5, 0.8))

    pyro.set_rng_seed(0)
    w = get_log_weights(model, guide, (x,), {}, 5, 2)
    mu = w.guide_trace.nodes["mu"]["value"]  # (5, 3, 1)
    assert mu.shape == (5, 3, 1)
    expected = (
        dist.Normal(0.0, 1.0).log_prob(mu)
        + dist.Normal(mu, 1.0).log_prob(x).sum(-1, keepdim=True)
        - dist.Normal(0.5, 0.8).log_prob(mu)
    ).reshape(5, 3)
    assert [f.name for f in w.plates] == ["groups"]
    assert torch.allclose(w.log_w, expected)

    # every site inside both plates: one weight per (group, observation)
    def model2(x):
        with pyro.plate("groups", 3, dim=-2), pyro.plate("obs", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide2(x):
        with pyro.plate("groups", 3, dim=-2), pyro.plate("obs", 4, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    w = get_log_weights(model2, guide2, (x,), {}, 5, 2)
    assert w.log_w.shape == (5, 3, 4)
    log_px = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    assert torch.allclose(w.log_w, log_px.expand(5, 3, 4))


def conjugate_model(x):
    """Global latent: ``mu ~ N(0, 1)``, ``x_i ~ N(mu, 1)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def conjugate_log_evidence(x):
    n = len(x)
    cov = torch.eye(n) + torch.ones(n, n)
    return dist.MultivariateNormal(torch.zeros(n), cov).log_prob(x)


def test_global_latent_gives_one_weight_per_particle():
    x = torch.tensor([0.3, 1.2, -0.4, 2.0])
    n = len(x)

    def exact_guide(x):
        pyro.sample("mu", dist.Normal(x.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5))

    w = get_log_weights(conjugate_model, exact_guide, (x,), {}, 7, 1)
    assert w.log_w.shape == (7,) and w.scale == 1.0
    assert torch.allclose(w.log_w, conjugate_log_evidence(x).expand(7))
    assert IWAE(num_particles=7).loss(conjugate_model, exact_guide, x) == pytest.approx(
        -conjugate_log_evidence(x).item(), rel=1e-12
    )


def test_subsampling_outside_a_shared_plate_raises():
    x = torch.randn(5)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=2):
            pass

    match = r"plate 'data' is subsampled .* \[model site 'mu', guide site 'mu'\] are outside"
    with pytest.raises(ValueError, match=match):
        IWAE(num_particles=2, global_latents="error").loss(model, guide, x)
    with pytest.raises(ValueError, match=match):
        BlackBoxAlpha(0.5, num_particles=2, global_latents="error").loss(model, guide, x)
    with pytest.raises(ValueError, match=match):  # the mechanism's default is strict
        get_log_weights(model, guide, (x,), {}, 2, 1)


def test_subsample_shared_by_particles_and_scale_applied():
    x = torch.arange(10.0)

    def model(x):
        with pyro.plate("data", 10, subsample_size=3) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        with pyro.plate("data", 10, subsample_size=3) as idx:
            pyro.sample("z", dist.Normal(x[idx] / 2, math.sqrt(0.5)))

    w = get_log_weights(model, guide, (x,), {}, 6, 1)
    idx = w.guide_trace.nodes["data"]["value"]
    assert w.scale == pytest.approx(10 / 3)
    # unscaled per-data-point log evidence, identical for all particles
    log_px = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x[idx])
    assert torch.allclose(w.log_w, log_px.expand(6, 3))
    assert torch.equal(w.model_trace.nodes["x"]["value"], x[idx])


@pytest.mark.parametrize("auto", [AutoNormal, AutoMultivariateNormal, AutoIAFNormal])
def test_autoguides_with_a_constrained_site(auto):
    x = torch.tensor([0.3, 1.2, -0.4, 2.0])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, sigma), obs=x)

    guide = auto(model) if auto is not AutoIAFNormal else auto(model, num_transforms=1)
    w = get_log_weights(model, guide, (x,), {}, 5, 1)
    assert w.log_w.shape == (5,)
    # log q of the constrained values, by hand: the guide's density of the unconstrained
    # latent minus the log-Jacobian of sigma = exp(u)
    mu = w.guide_trace.nodes["mu"]["value"].reshape(5)
    sigma = w.guide_trace.nodes["sigma"]["value"].reshape(5)
    log_p = (
        dist.Normal(0.0, 1.0).log_prob(mu)
        + dist.LogNormal(0.0, 0.5).log_prob(sigma)
        + dist.Normal(mu.unsqueeze(-1), sigma.unsqueeze(-1)).log_prob(x).sum(-1)
    )
    log_q = (
        sum(
            site["fn"].log_prob(site["value"])
            for site in w.guide_trace.nodes.values()
            if site["type"] == "sample" and site["infer"].get("is_auxiliary")
        ).reshape(5)
        - sigma.log()
    )
    assert torch.allclose(w.log_w, log_p - log_q)
    for objective in [IWAE(num_particles=4), IWAE(num_particles=4, gradient_estimator="dreg")]:
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), objective)
        for _ in range(3):
            assert math.isfinite(svi.step(x))


def test_model_latent_missing_from_guide_raises():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'b' is neither observed nor sampled by the guide"):
        IWAE(num_particles=2, max_plate_nesting=0).loss(model, guide)


def test_non_finite_loss_names_the_site():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs_site", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.tensor(float("inf"))
    with pyro.validation_enabled(False):
        for method in ("loss", "loss_and_grads"):
            with pytest.raises(ValueError, match="model site 'obs_site'"):
                getattr(BlackBoxAlpha(0.5, num_particles=3, max_plate_nesting=0), method)(
                    model, guide, x
                )


def test_stl_and_dreg_reject_discrete_guides_by_name():
    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.3))
        pyro.sample("coin", dist.Bernoulli(p))

    for estimator in ("stl", "dreg"):
        objective = IWAE(num_particles=2, gradient_estimator=estimator, max_plate_nesting=0)
        with pytest.raises(ValueError, match=r"\['coin'\] cannot be reparameterized"):
            objective.differentiable_loss(model, guide)


def test_dreg_rejects_hierarchical_guides():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        a = pyro.sample("a", dist.Normal(loc, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    objective = IWAE(num_particles=2, gradient_estimator="dreg", max_plate_nesting=0)
    with pytest.raises(ValueError, match=r"guide site 'b' depends on \['a'\]"):
        objective.differentiable_loss(model, guide)
    # STL handles it
    stl = IWAE(num_particles=2, gradient_estimator="stl", max_plate_nesting=0)
    assert torch.isfinite(stl.differentiable_loss(model, guide))


def test_batch_dims_outside_plates_raise_when_vectorized_and_run_sequentially():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(5, 3), 1.0))

    guide = model

    def event_model():  # the same density, the batch dims declared as event dims
        pyro.sample("z", dist.Normal(torch.zeros(5, 3), 1.0).to_event(2))

    vectorized = IWAE(num_particles=3, max_plate_nesting=0, vectorize_particles=True)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match=r"Site 'z'.*to_event"):
        vectorized.loss(model, guide)
    # a batch dim that collides with the particle plate is caught by Pyro's plate itself
    vectorized = IWAE(num_particles=2, max_plate_nesting=0, vectorize_particles=True)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="Shape mismatch"):
        vectorized.loss(model, guide)
    # by default the particles then run one after another, each summing the batch dims
    # outside the plates into its weight, as Trace_ELBO does
    for k, match in ((3, r"at site 'z'"), (2, r"Shape mismatch")):
        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False), pytest.warns(UserWarning, match=match):
            loss = IWAE(num_particles=k, max_plate_nesting=0).loss(model, guide)
        pyro.set_rng_seed(0)
        expected = IWAE(num_particles=k, vectorize_particles=False).loss(event_model, event_model)
        assert loss == pytest.approx(expected, rel=1e-12)


def test_enumerated_site_raises():
    def model():
        pyro.sample("c", dist.Categorical(torch.ones(3)), infer={"enumerate": "parallel"})

    def guide():
        pyro.sample("c", dist.Categorical(torch.ones(3)), infer={"enumerate": "parallel"})

    # model-side enumeration is summed out (tests/test_enumeration.py); guide-side raises
    with pytest.raises(ValueError, match="Guide site 'c' is marked for enumeration"):
        IWAE(num_particles=2, max_plate_nesting=0).loss(model, guide)


def bernoulli_decoder_model(x):
    logits = pyro.param("logits", torch.linspace(-3.0, 3.0, 6))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Bernoulli(logits=logits * z.unsqueeze(-1)).to_event(1), obs=x)


def normal_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.3, 1.2))


def test_bernoulli_log_prob_path_is_bit_identical():
    from pyro_fdiv.inference.importance import site_log_prob

    x = torch.bernoulli(torch.full((4, 6), 0.4))
    w = get_log_weights(bernoulli_decoder_model, normal_guide, (x,), {}, 3, 1)
    site = w.model_trace.nodes["x"]
    assert torch.equal(site_log_prob(site), site["fn"].log_prob(site["value"]))
    # with probs instead of logits, or masked, the general path gives the same numbers
    site = dict(site, mask=torch.tensor([True, False, True, True]))
    expected = torch.where(site["mask"], site["fn"].log_prob(site["value"]), 0.0)
    assert torch.equal(site_log_prob(site), expected)
    with pytest.raises(ValueError, match="Expected value argument"):
        site_log_prob(dict(site, value=torch.full((3, 4, 6), 0.5)))


@pytest.mark.parametrize("validation", ["first", "always"])
def test_validation_first_or_always(validation):
    objective = IWAE(num_particles=3, max_plate_nesting=1, validation=validation)
    good = torch.bernoulli(torch.full((4, 6), 0.4))
    bad = good.clone()
    bad[0, 0] = 0.5  # not a Bernoulli value
    with pytest.raises(ValueError, match="Expected value argument"):
        objective.loss(bernoulli_decoder_model, normal_guide, bad)  # first step validates
    objective.loss(bernoulli_decoder_model, normal_guide, good)
    if validation == "always":
        with pytest.raises(ValueError, match="Expected value argument"):
            objective.loss(bernoulli_decoder_model, normal_guide, bad)
    else:  # same structure: this step runs without Pyro's checks, as a JIT objective would
        assert math.isfinite(objective.loss(bernoulli_decoder_model, normal_guide, bad))
        # a new structure (batch size 3) is validated again
        with pytest.raises(ValueError, match="Expected value argument"):
            objective.loss(bernoulli_decoder_model, normal_guide, bad[:3])
    with pytest.raises(ValueError, match="validation in"):
        IWAE(validation="never")


def test_non_finite_loss_blames_only_sites_non_finite_where_unmasked():
    x = torch.tensor([float("inf"), 0.5, -0.2])

    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.poutine.mask(mask=torch.isfinite(x)):  # the inf is masked out: finite
                pyro.sample("masked", dist.Normal(z, 1.0), obs=x)
            pyro.sample("bad", dist.Normal(z, 1.0), obs=x.flip(0))

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(False), pytest.raises(ValueError) as info:
        IWAE(num_particles=2, max_plate_nesting=1).loss(model, guide, x)
    assert "model site 'bad' (2 non-finite" in str(info.value)
    assert "'masked'" not in str(info.value)
