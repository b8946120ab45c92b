"""Particles vectorized or one after another: the same bound, the same minibatch, one warning."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalMessenger

from pyro_fdiv.inference import IWAE, BlackBoxAlpha, importance_trace

OBJECTIVES = {
    "iwae": lambda **kw: IWAE(**kw),
    "iwae-stl": lambda **kw: IWAE(gradient_estimator="stl", **kw),
    "iwae-dreg": lambda **kw: IWAE(gradient_estimator="dreg", **kw),
    "bbalpha": lambda **kw: BlackBoxAlpha(0.5, **kw),
    "bbalpha-neg": lambda **kw: BlackBoxAlpha(-1.0, **kw),
}

#: N x D = 16: torch's CPU normal sampler fills blocks of 16, so K draws of 16 normals one after
#: another consume the random stream exactly like one draw of K x 16
N, D = 8, 2


def data():
    return torch.linspace(-1.0, 2.0, N * D).reshape(N, D)


def model(x):
    """One latent site and one observation per data point: vectorized and sequential draws
    then consume the random stream in the same order (``K x N x D`` normals, see ``N, D``)."""
    w = pyro.param("w", torch.tensor(0.7))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(w * z, 1.0).to_event(1), obs=x)


def guide(x):
    a = pyro.param("a", torch.tensor(0.3))
    scale = pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * x, scale).to_event(1))


def loss_and_grads(objective, model, guide, *args):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    loss = objective.loss_and_grads(model, guide, *args)
    grads = {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters()}
    return loss, grads


@pytest.mark.parametrize("name", OBJECTIVES)
def test_sequential_equals_vectorized_on_the_same_draws(name):
    vectorized = OBJECTIVES[name](num_particles=4, vectorize_particles=True)
    sequential = OBJECTIVES[name](num_particles=4, vectorize_particles=False)
    loss_v, grads_v = loss_and_grads(vectorized, model, guide, data())
    loss_s, grads_s = loss_and_grads(sequential, model, guide, data())
    assert loss_s == pytest.approx(loss_v, rel=1e-12)
    assert set(grads_s) == {"w", "a", "scale"}
    for name_, grad in grads_v.items():
        assert torch.allclose(grads_s[name_], grad, rtol=1e-10, atol=1e-12), name_
    # the same loss through the other entry points
    pyro.set_rng_seed(3)
    assert sequential.loss(model, guide, data()) == pytest.approx(loss_v, rel=1e-12)
    pyro.set_rng_seed(3)
    value = sequential.differentiable_loss(model, guide, data()).item()
    assert value == pytest.approx(loss_v, rel=1e-12)


def test_sequential_weights_have_the_vectorized_layout():
    args = (data(),)
    pyro.set_rng_seed(0)
    vec = importance_trace(model, guide, args, {}, num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    seq = importance_trace(
        model, guide, args, {}, num_particles=3, max_plate_nesting=1, vectorize_particles=False
    )
    assert vec.vectorized and not seq.vectorized
    assert seq.log_w.shape == vec.log_w.shape == (3, N)
    assert torch.allclose(seq.log_w, vec.log_w, rtol=1e-12)
    assert set(seq.model_terms) == {"z", "x"} and seq.model_terms["x"].shape == (3, N)
    assert len(seq.particle_traces) == 3 and vec.particle_traces == ()


def subsampled_model(x, seen):
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        seen.append(idx.tolist())
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def subsampled_guide(x, seen):
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2, 0.7))


def test_sequential_particles_share_one_minibatch_unlike_pyros_renyi_elbo():
    x = torch.arange(20.0)
    seen = []
    pyro.set_rng_seed(0)
    weights = importance_trace(
        subsampled_model,
        subsampled_guide,
        (x, seen),
        {},
        num_particles=6,
        max_plate_nesting=1,
        vectorize_particles=False,
    )
    assert len(seen) == 6 and all(batch == seen[0] for batch in seen)
    for model_trace, guide_trace in weights.particle_traces:
        assert guide_trace.nodes["data"]["value"].tolist() == seen[0]
        assert model_trace.nodes["data"]["value"].tolist() == seen[0]
    # the bound is the per-data-point bound of that minibatch: log_w by hand
    idx = torch.tensor(seen[0])
    z = torch.stack([g.nodes["z"]["value"] for _, g in weights.particle_traces])
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(x[idx])
        - dist.Normal(x[idx] / 2, 0.7).log_prob(z)
    )
    assert torch.allclose(weights.log_w, expected, rtol=1e-12)
    assert weights.scale == pytest.approx(10.0)

    # Pyro's RenyiELBO with vectorize_particles=False gives each particle its own minibatch
    seen.clear()
    pyro.set_rng_seed(0)
    RenyiELBO(alpha=0.0, num_particles=6).loss(subsampled_model, subsampled_guide, x, seen)
    guide_batches = seen[1::2]  # each particle runs the guide, then the model replaying it
    assert len({tuple(b) for b in guide_batches}) > 1


def asserting_model(x):
    """A model that asserts its own shapes: it cannot broadcast a particle dim."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        assert z.shape == (len(x),)
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def asserting_guide(x):
    loc = pyro.param("loc", torch.zeros(len(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize("name", ["iwae", "bbalpha", "iwae-dreg"])
def test_default_falls_back_once_with_a_warning_naming_the_site(name):
    x = torch.tensor([0.5, -1.0, 2.0])
    auto = OBJECTIVES[name](num_particles=4)
    match = r"does not broadcast over the particle dimension \(after site 'z': AssertionError"
    pyro.set_rng_seed(1)
    with pytest.warns(UserWarning, match=match):
        first = auto.loss_and_grads(asserting_model, asserting_guide, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only: the choice is kept
        auto.loss_and_grads(asserting_model, asserting_guide, x)
    # the fallback is the sequential path, with the same draws
    sequential = OBJECTIVES[name](num_particles=4, vectorize_particles=False)
    pyro.set_rng_seed(1)
    assert sequential.loss_and_grads(asserting_model, asserting_guide, x) == first
    # vectorize_particles=True keeps the model's own error
    with pytest.raises(AssertionError):
        OBJECTIVES[name](num_particles=4, vectorize_particles=True).loss(
            asserting_model, asserting_guide, x
        )


def test_plateless_batch_dims_are_summed_into_each_particle_as_by_trace_elbo():
    obs = torch.tensor([0.3, -1.2, 0.8])

    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=obs)  # a batch of 3, in no plate

    def event_model():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(loc.unsqueeze(-1), 1.0).to_event(1), obs=obs)

    def guide():
        pyro.sample("loc", dist.Normal(pyro.param("q_loc", torch.tensor(0.1)), 0.6))

    pyro.enable_validation(False)  # Pyro's validation wants a plate around the batch
    pyro.set_rng_seed(0)
    expected = Trace_ELBO().loss(model, guide)
    pyro.set_rng_seed(0)
    assert IWAE().loss(model, guide) == pytest.approx(expected, rel=1e-12)
    pyro.set_rng_seed(0)
    match = r"\(at model site 'obs': RuntimeError"  # loc (K,) against 3 observations
    with pytest.warns(UserWarning, match=match):
        loss = IWAE(num_particles=4).loss(model, guide)
    pyro.set_rng_seed(0)
    assert loss == pytest.approx(IWAE(num_particles=4).loss(event_model, guide), rel=1e-12)


def test_one_particle_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = IWAE().loss(asserting_model, asserting_guide, torch.tensor([0.5, -1.0, 2.0]))
    assert math.isfinite(loss)


def test_messenger_guides_sequential_equals_vectorized():
    x = data()[:, 0]

    def scalar_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    guide = AutoNormalMessenger(scalar_model)
    results = []
    for vectorize in (True, False):
        pyro.set_rng_seed(5)
        objective = IWAE(num_particles=5, vectorize_particles=vectorize)
        results.append(objective.loss(scalar_model, guide, x))
    assert results[1] == pytest.approx(results[0], rel=1e-12)


def test_messenger_guide_with_one_particle_is_trace_elbo():
    def factor_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -0.5 * mu**2)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    x = data()[:, 1]
    guide = AutoNormalMessenger(factor_model)
    for objective in (IWAE(), BlackBoxAlpha(0.5), IWAE(gradient_estimator="stl")):
        pyro.set_rng_seed(2)
        expected = Trace_ELBO().loss(factor_model, guide, x)
        pyro.set_rng_seed(2)
        assert objective.loss(factor_model, guide, x) == pytest.approx(expected, rel=1e-12)


def test_empty_model_and_guide_give_zero_and_no_gradient():
    def empty(*args):
        pass

    for objective in (IWAE(num_particles=3), BlackBoxAlpha(0.5, num_particles=3)):
        assert objective.loss(empty, empty) == 0.0 == Trace_ELBO().loss(empty, empty)
        assert objective.loss_and_grads(empty, empty) == 0.0
        loss = objective.differentiable_loss(empty, empty)
        assert loss.item() == 0.0 and not loss.requires_grad


@pytest.mark.parametrize("has_rsample", [True, False])
def test_factor_sites_in_model_and_guide_match_trace_elbo(has_rsample):
    x = torch.tensor([0.3, -0.4, 1.1])

    def factor_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.factor("prior_penalty", -0.25 * mu**2)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def factor_guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        mu = pyro.sample("mu", dist.Normal(loc, 0.5))
        pyro.factor("guide_factor", 0.1 * (mu - loc) ** 2, has_rsample=has_rsample)

    pyro.set_rng_seed(4)
    expected = Trace_ELBO().loss_and_grads(factor_model, factor_guide, x)
    expected_grad = pyro.param("loc").grad.clone()
    pyro.param("loc").grad = None
    pyro.set_rng_seed(4)
    assert IWAE().loss_and_grads(factor_model, factor_guide, x) == pytest.approx(expected)
    if has_rsample:  # pathwise through the factor, as Trace_ELBO
        assert torch.allclose(pyro.param("loc").grad, expected_grad, rtol=1e-10)

    # a guide factor without has_rsample is refused, naming it, as by Trace_ELBO
    def unmarked_guide(x):
        pyro.sample("mu", dist.Normal(0.0, 0.5))
        pyro.factor("guide_factor", torch.tensor(0.1))

    with pytest.raises(ValueError, match=r'pyro.factor\("guide_factor".*has_rsample'):
        IWAE(num_particles=2).loss(factor_model, unmarked_guide, x)


def test_autonormal_sequential_on_a_non_broadcasting_regression_trains():
    from pyro.nn import PyroModule, PyroSample
    from torch import nn

    class Regression(PyroModule):
        def __init__(self):
            super().__init__()
            self.linear = PyroModule[nn.Linear](2, 1)
            self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
            self.linear.bias = PyroSample(dist.Normal(0.0, 5.0).expand([1]).to_event(1))

        def forward(self, x, y=None):
            mean = self.linear(x).squeeze(-1)  # nn.Linear: at most 2-D weights
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)

    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.5, -0.5]) + 0.2
    regression = Regression()
    guide = AutoNormal(regression)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})
    svi = pyro.infer.SVI(regression, guide, optim, IWAE(num_particles=4))
    with pytest.warns(UserWarning, match=r"after site 'linear.bias'.*RuntimeError"):
        first = svi.step(x, y)
    losses = [svi.step(x, y) for _ in range(300)]
    assert sum(losses[-10:]) / 10 < first
    # conjugate Gaussian linear regression: the posterior mean is the ridge solution
    design = torch.cat([x, torch.ones(20, 1)], 1)
    prior_precision = torch.diag(torch.tensor([1.0, 1.0, 1 / 25]))
    precision = design.T @ design / 0.25 + prior_precision
    mean = torch.linalg.solve(precision, design.T @ y / 0.25)
    median = guide.median()
    fitted = torch.cat([median["linear.weight"].reshape(-1), median["linear.bias"]])
    assert torch.allclose(fitted, mean, atol=0.05)
