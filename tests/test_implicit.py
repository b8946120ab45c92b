"""Implicit sample sites and the AutoImplicit guide."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import init_to_value
from torch import nn

from pyro_fdiv.inference import AVB, IWAE, AutoImplicit, Implicit, implicit_sample
from pyro_fdiv.inference.implicit import is_implicit

# ---------------------------------------------------------------------------------------------
# implicit_sample / Implicit

X = torch.tensor([[0.3, -1.0], [1.2, 0.4], [-0.5, 0.9]])


def model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2 + 3, 2)

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", len(x)):
            eps = pyro.sample(
                "eps",
                dist.Normal(torch.zeros(3), 1.0).to_event(1),
                infer={"is_auxiliary": True},
            )
            h = torch.cat([x.expand((*eps.shape[:-1], 2)), eps], -1)
            return implicit_sample("z", self.net(h), event_dim=1)


def test_implicit_site_records_the_value_and_passes_gradients():
    enc = Encoder().double()
    trace = poutine.trace(enc.guide).get_trace(X)
    site = trace.nodes["z"]
    assert is_implicit(site) and site["infer"]["implicit"] is True
    assert isinstance(site["fn"], Implicit)
    assert site["fn"].batch_shape == (3,) and site["fn"].event_shape == (2,)
    eps = trace.nodes["eps"]["value"]
    expected = enc.net(torch.cat([X, eps], -1))
    assert torch.equal(site["value"], expected)
    site["value"].sum().backward()
    assert enc.net.weight.grad is not None and enc.net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "objective",
    [Trace_ELBO(), IWAE(num_particles=3)],
    ids=["Trace_ELBO", "IWAE"],
)
def test_objectives_needing_log_q_fail_naming_the_site(objective):
    enc = Encoder().double()
    with pytest.raises(ValueError, match=r"site 'z' is implicit .* pyro_fdiv.inference.AVB"):
        objective.loss(model, enc.guide, X)


def test_implicit_distribution_shapes_and_support():
    value = torch.rand(4, 3) + 0.5
    d = Implicit(value, event_dim=1, support=constraints.positive, name="s")
    assert d.support.event_dim == 1 and bool(d.support.check(value).all())
    assert torch.equal(d.rsample(), value) and d.rsample((2,)).shape == (2, 4, 3)
    e = d.expand((5, 4))
    assert e.batch_shape == (5, 4) and e.event_shape == (3,) and e.site_name == "s"
    assert torch.equal(e.rsample()[2], value)
    with pytest.raises(ValueError, match="site 's' is implicit"):
        e.log_prob(e.rsample())
    simplex = Implicit(torch.full((2, 3), 1 / 3), event_dim=1, support=constraints.simplex)
    assert simplex.support is constraints.simplex


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"event_dim": 3}, r"event_dim to be an integer in \[0, value.dim\(\)=2\]"),
        ({"event_dim": -1}, r"event_dim to be an integer"),
        ({"event_dim": 0, "support": constraints.simplex}, "event_dim >= support.event_dim = 1"),
    ],
)
def test_implicit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Implicit(torch.zeros(2, 3), **kwargs)


# ---------------------------------------------------------------------------------------------
# AutoImplicit on constrained sites

INIT = {
    "loc": torch.tensor(0.7),
    "scale": torch.tensor(2.5),
    "prob": torch.tensor(0.2),
    "weights": torch.tensor([0.2, 0.3, 0.5]),
    "theta": torch.tensor([-1.0, 0.0, 1.0, 2.0]),
}
SUPPORTS = {
    "loc": constraints.real,
    "scale": constraints.positive,
    "prob": constraints.unit_interval,
    "weights": constraints.simplex,
    "theta": constraints.real,
}


def constrained_model():
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    scale = pyro.sample("scale", dist.HalfCauchy(1.0))
    prob = pyro.sample("prob", dist.Beta(2.0, 3.0))
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", 4):
        theta = pyro.sample("theta", dist.Normal(loc, scale))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=torch.tensor([0.1, -0.3, 1.1, 0.4]))
    pyro.sample("k", dist.Categorical(weights), obs=torch.tensor(1))
    pyro.sample("b", dist.Bernoulli(prob), obs=torch.tensor(1.0))


def test_auto_implicit_draws_lie_in_each_support_with_the_right_shapes():
    guide = AutoImplicit(constrained_model, hidden=(16,), init_scale=1.0)
    guide.sample_posterior(1)  # sets up from the model, which takes no arguments
    assert guide.latent_dim == 1 + 1 + 1 + 2 + 4 and guide.noise_dim == 13
    draws = guide.sample_posterior(500)
    predictive = Predictive(
        constrained_model, guide=guide, num_samples=300, return_sites=list(INIT), parallel=True
    )()
    for name, support in SUPPORTS.items():
        shape = INIT[name].shape
        assert draws[name].shape == (500, *shape), name
        assert predictive[name].reshape(300, -1).shape[1] == INIT[name].numel(), name
        for values in (draws[name], predictive[name]):
            assert bool(support.check(values).all()), name
    # widely spread: a scale of 1 in unconstrained space
    assert draws["scale"].log().std() > 0.5 and draws["weights"].std(0).min() > 0.05


def test_auto_implicit_packs_sites_in_order_through_their_bijections():
    """At a vanishing scale every draw is the initial value, mapped exactly back through
    ``biject_to(support)``: the packing order and the bijections are right."""
    guide = AutoImplicit(
        constrained_model, hidden=(8, 8), init_loc_fn=init_to_value(values=INIT), init_scale=1e-9
    )
    draws = guide.sample_posterior(3)
    trace = poutine.trace(guide).get_trace()
    for name, value in INIT.items():
        assert torch.allclose(draws[name], value.expand((3, *value.shape)), atol=1e-7), name
        assert torch.allclose(trace.nodes[name]["value"], value, atol=1e-7), name
        assert is_implicit(trace.nodes[name])
    # and away from the initial value: the site values are the bijections of the sampler output
    guide.init_scale = 1.0
    guide.sampler.linear.weight.data.copy_(torch.eye(9, 13))
    trace = poutine.trace(guide).get_trace()
    latent = guide.sampler(trace.nodes["_AutoImplicit_noise"]["value"])
    pos = 0
    for name, value in INIT.items():
        size = biject_to(SUPPORTS[name]).inv(value).numel()
        expected = biject_to(SUPPORTS[name])(latent[pos : pos + size].reshape(-1)).reshape(
            value.shape
        )
        assert torch.allclose(trace.nodes[name]["value"], expected), name
        pos += size


def test_auto_implicit_vectorizes_under_a_particle_plate():
    guide = AutoImplicit(constrained_model, hidden=(8,), init_scale=1.0)
    with pyro.plate("particles", 5, dim=-2):
        trace = poutine.trace(guide).get_trace()
    assert trace.nodes["_AutoImplicit_noise"]["value"].shape == (5, 1, 13)
    assert trace.nodes["loc"]["value"].shape == (5, 1)
    assert trace.nodes["theta"]["value"].shape == (5, 4)
    assert trace.nodes["weights"]["value"].shape == (5, 1, 3)
    assert len(set(trace.nodes["loc"]["value"].detach().flatten().tolist())) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden": (0,)}, "hidden to be a sequence of positive integers"),
        ({"hidden": 3.5}, "hidden to be a sequence of positive integers"),
        ({"noise_dim": 0}, "noise_dim to be a sequence of positive integers"),
        ({"init_scale": 0.0}, r"init_scale > 0, actual 0.0"),
        ({"init_scale": math.inf}, r"init_scale > 0, actual inf"),
    ],
)
def test_auto_implicit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoImplicit(constrained_model, **kwargs)


def test_auto_implicit_rejects_too_little_noise_and_subsampling():
    with pytest.raises(ValueError, match="noise_dim >= the latent dimension 9, actual 4"):
        AutoImplicit(constrained_model, noise_dim=4)()

    def subsampled():
        with pyro.plate("data", 10, subsample_size=3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="cannot subsample plate 'data'"):
        AutoImplicit(subsampled)()


def lognormal_model():
    """``s ~ Gamma(2, 1)``, ``y ~ N(0, s)`` observed: a positive latent site."""
    s = pyro.sample("s", dist.Gamma(2.0, 1.0))
    pyro.sample("y", dist.Normal(0.0, s), obs=torch.tensor(1.3))


class Zero(nn.Module):
    """A discriminator stuck at T = 0 (the optimum of adaptive contrast for a Gaussian guide)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, z, x=None):
        return 0.0 * self.unused + z.new_zeros(z.shape[:-1])


def test_avb_adds_the_log_jacobian_of_constrained_sites():
    r"""With no hidden layer AutoImplicit is Gaussian in :math:`\zeta = \log s`, i.e.
    ``q(s) = LogNormal(loc, scale)``; with adaptive contrast the optimal discriminator is 0, so
    AVB's estimate is :math:`E_q[\log p(y, s) + \log s - \log r(\log s)]` with ``r`` the
    moment-matched Gaussian: the ELBO of the log-normal guide. Leaving out the log-Jacobian
    would be off by :math:`E[\log s] = 0.8`."""
    loc, scale = 0.8, 0.4
    guide = AutoImplicit(
        lognormal_model,
        hidden=(),
        init_loc_fn=init_to_value(values={"s": torch.tensor(math.exp(loc))}),
        init_scale=scale,
    )
    avb = AVB(Zero(), num_particles=200_000, num_adversary_steps=0)
    estimate = -avb.loss(lognormal_model, guide)

    def explicit_guide():
        pyro.sample("s", dist.LogNormal(loc, scale))

    q = dist.LogNormal(loc, scale)
    s = q.sample((400_000,))
    exact = (
        dist.Gamma(2.0, 1.0).log_prob(s)
        + dist.Normal(0.0, s).log_prob(torch.tensor(1.3))
        - q.log_prob(s)
    ).mean()
    trace_elbo = -Trace_ELBO(num_particles=100_000, vectorize_particles=True).loss(
        lognormal_model, explicit_guide
    )
    assert trace_elbo == pytest.approx(exact.item(), abs=0.01)
    assert estimate == pytest.approx(exact.item(), abs=0.01)
