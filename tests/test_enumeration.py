"""Discrete model sites enumerated (config_enumerate) and summed out inside each log weight:
closed forms, agreement with TraceEnum_ELBO and with the analytically marginalized model, the
bound's gain over sampled assignments, SVI and the errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.constraints import simplex
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from pyro_fdiv.inference import IWAE, BlackBoxAlpha, importance_trace
from pyro_fdiv.inference.importance import log_mean_exp

X = [-2.0, 0.1, 1.5, 3.0, -0.4, 0.9]
LOCS = [-1.0, 2.0]


def data():
    # built inside a test: float64 (conftest)
    return torch.tensor(X)


def weights():
    """The mixture weights, a parameter of the model (π = softmax(logits))."""
    return pyro.param("logits", torch.tensor([0.2, -0.3])).softmax(-1)


# A two-component mixture with a global mean: mu ~ N(0, 1), c_i ~ Cat(π), x_i ~ N(loc_c + mu, 1)


@config_enumerate
def mixture_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pi = weights()
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(pi))
        pyro.sample("x", dist.Normal(torch.tensor(LOCS)[c] + mu, 1.0), obs=x)


def mixture_guide(x):
    loc = pyro.param("q_loc", torch.tensor(0.3))
    scale = pyro.param("q_scale", torch.tensor(0.4), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def log_joint(x, mu):
    """``log p(x, mu)`` of the mixture model in closed form, for ``mu`` of shape ``(M,)``."""
    comp = dist.Normal(torch.tensor(LOCS) + mu[:, None, None], 1.0).log_prob(x[:, None])
    log_lik = torch.logsumexp(weights().log() + comp, -1).sum(-1)
    return log_lik + dist.Normal(0.0, 1.0).log_prob(mu)


def mixture_log_w(x, mu):
    r"""``log p(x, mu) - log q(mu)`` per particle, ``mu`` of shape ``(K,)``, with
    :math:`\log p(x_i \mid \mu) = \mathrm{logsumexp}_c\, \log \pi_c + \log N(x_i; l_c + \mu, 1)`."""
    q = dist.Normal(pyro.param("q_loc"), pyro.param("q_scale"))
    return log_joint(x, mu) - q.log_prob(mu)


def objectives(num_particles, **kwargs):
    return [
        IWAE(num_particles=num_particles, **kwargs),
        BlackBoxAlpha(0.5, num_particles=num_particles, **kwargs),
        BlackBoxAlpha(-1.0, num_particles=num_particles, **kwargs),
    ]


@pytest.mark.parametrize("num_particles", [1, 5])
def test_mixture_log_weights_closed_form(num_particles):
    x = data()
    for objective in objectives(num_particles):  # max_plate_nesting guessed
        pyro.set_rng_seed(3)
        loss = objective.loss(mixture_model, mixture_guide, x)
        pyro.set_rng_seed(3)
        draw = objective._log_weights(mixture_model, mixture_guide, (x,), {})
        assert objective.max_plate_nesting == 1
        mu = draw.guide_trace.nodes["mu"]["value"].reshape(-1)
        expected = mixture_log_w(x, mu)
        assert draw.log_w.shape == (num_particles,)  # mu is global: one weight per particle
        assert torch.allclose(draw.log_w, expected, rtol=0, atol=1e-10)
        assert loss == pytest.approx(-objective.bound(expected).item(), rel=1e-12)
        assert draw.score is None  # the enumerated site is not sampled: no score terms
        # one term for the enumerated site and the sites depending on it
        assert sorted(draw.model_terms) == ["c", "mu"]


def test_mixture_per_data_point_evidence_with_fixed_mu():
    # mu fixed by a Delta guide, the data plate kept: the enumerated term of each data point is
    # its exact log evidence log p(x_i | mu) = logsumexp_c log π_c + log N(x_i; l_c + mu, 1)
    x = data()
    draw = importance_trace(
        mixture_model,
        delta_guide,
        (x,),
        {},
        num_particles=3,
        max_plate_nesting=1,
        keep_plates=["data"],
    )
    comp = dist.Normal(torch.tensor(LOCS) + 0.25, 1.0).log_prob(x[:, None])
    evidence = torch.logsumexp(weights().log() + comp, -1)
    assert draw.log_w.shape == draw.model_terms["c"].shape == (3, len(X))
    assert torch.allclose(draw.model_terms["c"], evidence.expand(3, -1), rtol=0, atol=1e-10)
    prior = dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.25))  # global: size 1 in the plate
    assert torch.allclose(draw.log_w, evidence + prior, rtol=0, atol=1e-10)


# Local latents only: c_i ~ Cat(π) enumerated, z_i ~ N(loc_c, 1), x_i ~ N(z_i, 0.5)


@config_enumerate
def local_model(x, subsample_size=None):
    pi = weights()
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        c = pyro.sample("c", dist.Categorical(pi))
        z = pyro.sample("z", dist.Normal(torch.tensor(LOCS)[c], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x[idx])


def local_guide(x, subsample_size=None):
    a = pyro.param("a", torch.tensor(0.8))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(a * x[idx], 0.7))


def marginal_model(x, subsample_size=None):
    """``local_model`` with ``c`` summed out by hand: ``z_i`` from the two-component mixture."""
    mixture = dist.MixtureSameFamily(
        dist.Categorical(weights()), dist.Normal(torch.tensor(LOCS), 1.0)
    )
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", mixture)
        pyro.sample("x", dist.Normal(z, 0.5), obs=x[idx])


@pytest.mark.parametrize("num_particles", [1, 4])
def test_local_latents_per_data_point(num_particles):
    x = data()
    for objective in objectives(num_particles, max_plate_nesting=1):
        draw = objective._log_weights(local_model, local_guide, (x,), {})
        assert draw.log_w.shape == (num_particles, len(X))
        assert [f.name for f in draw.plates] == ["data"]
        z = draw.guide_trace.nodes["z"]["value"].reshape(num_particles, len(X))
        comp = dist.Normal(torch.tensor(LOCS), 1.0).log_prob(z[..., None])
        expected = (
            torch.logsumexp(weights().log() + comp, -1)
            + dist.Normal(z, 0.5).log_prob(x)
            - dist.Normal(pyro.param("a") * x, 0.7).log_prob(z)
        )
        assert torch.allclose(draw.log_w, expected, rtol=0, atol=1e-10)
        assert sorted(draw.model_terms) == ["c", "x"]  # "c" holds log p(c, z) with c summed out


def grads(*names):
    return [pyro.param(name).unconstrained().grad.clone() for name in names]


def zero_grads(*names):
    for name in names:
        pyro.param(name).unconstrained().grad = None


@pytest.mark.parametrize("estimator", ["reparam", "stl", "dreg"])
@pytest.mark.parametrize("subsample_size", [None, 4])
def test_enumerated_equals_marginalized_model(estimator, subsample_size):
    # the same log weights and gradients as the model with c summed out by hand, for every
    # gradient estimator (STL and DReG apply: the summed term is a density of the continuous z)
    x, names = data(), ("logits", "a")
    results = []
    for model in (local_model, marginal_model):
        objective = IWAE(num_particles=5, gradient_estimator=estimator, max_plate_nesting=1)
        pyro.set_rng_seed(7)
        value = objective.loss_and_grads(model, local_guide, x, subsample_size)
        results.append((value, grads(*names)))
        zero_grads(*names)
    (enum_value, enum_grads), (marg_value, marg_grads) = results
    assert enum_value == pytest.approx(marg_value, rel=1e-12)
    for g_enum, g_marg in zip(enum_grads, marg_grads, strict=True):
        assert torch.allclose(g_enum, g_marg, rtol=1e-10, atol=1e-12)


# Models against TraceEnum_ELBO


@config_enumerate
def hierarchical_model(x):
    """A global enumerated regime g, local enumerated c_i | g in a nested plate, masked data."""
    pi = weights()
    g = pyro.sample("g", dist.Bernoulli(0.3))
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("rows", 2, dim=-2):
        with pyro.plate("data", len(x), dim=-1):
            c = pyro.sample("c", dist.Categorical(pi))
            loc = torch.tensor(LOCS)[c] * (1.0 + g) + shift
            mask = torch.arange(len(x)) != 2
            with poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(loc, 1.0), obs=x.expand(2, len(x)))


def hierarchical_guide(x):
    pyro.sample("shift", dist.Normal(pyro.param("s", torch.tensor(0.1)), 0.5))


@config_enumerate
def hmm_model(x):
    """Sequences of a two-state hidden Markov chain (``pyro.markov``), state means global."""
    trans = pyro.param("trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=simplex)
    locs = pyro.sample("locs", dist.Normal(torch.tensor(LOCS), 1.0).to_event(1))
    with pyro.plate("seqs", x.shape[0], dim=-1):
        state = 0
        for t in pyro.markov(range(x.shape[1])):
            state = pyro.sample(f"s_{t}", dist.Categorical(trans[state]))
            pyro.sample(f"x_{t}", dist.Normal(Vindex(locs)[..., state], 1.0), obs=x[:, t])


def hmm_guide(x):
    loc = pyro.param("l", torch.tensor([-0.5, 1.5]))
    pyro.sample("locs", dist.Normal(loc, 0.3).to_event(1))


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize(
    "model,guide,subsample_size",
    [
        (mixture_model, mixture_guide, None),
        (local_model, local_guide, None),
        (local_model, local_guide, 4),
        (hierarchical_model, hierarchical_guide, None),
        (hmm_model, hmm_guide, None),
    ],
)
def test_mean_log_weight_is_trace_enum_elbo(model, guide, subsample_size, num_particles):
    # the particles' ELBO, the mean over k of sum_i log w_ki times the subsample scale, is
    # TraceEnum_ELBO's estimate from the same draws (the same particle plate): value, gradient
    x = data() if model is not hmm_model else data().reshape(2, 3)
    args = (x,) if subsample_size is None else (x, subsample_size)
    pyro.set_rng_seed(11)
    draw = importance_trace(
        model, guide, args, {}, num_particles=num_particles, max_plate_nesting=2
    )
    ours = -draw.log_w.mean(0).sum() * draw.scale
    pyro.set_rng_seed(11)
    elbo = TraceEnum_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=2
    )
    theirs = elbo.differentiable_loss(model, guide, *args)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    params = [pyro.param(name).unconstrained() for name in pyro.get_param_store().keys()]
    for g_ours, g_theirs in zip(
        *(torch.autograd.grad(v, params) for v in (ours, theirs)), strict=True
    ):
        assert torch.allclose(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


# Enumerated vs sampled assignments, the guide's mu a fixed point (Delta)


def delta_guide(x):
    pyro.sample("mu", dist.Delta(pyro.param("m", torch.tensor(0.25))))


def sampling_guide(x):
    """``delta_guide`` that also samples the assignments, from the prior π."""
    delta_guide(x)
    with pyro.plate("data", len(x)):
        pyro.sample("c", dist.Categorical(weights().detach()))


def test_enumeration_tightens_the_bound_without_variance():
    x = data()
    objective = IWAE(num_particles=8, max_plate_nesting=1)
    enumerated = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        enumerated.append(
            (objective.loss_and_grads(mixture_model, delta_guide, x), grads("logits", "m"))
        )
        zero_grads("logits", "m")
    # deterministic: two seeds give the identical loss and gradients (no score-function noise)
    assert enumerated[0][0] == enumerated[1][0]
    for g0, g1 in zip(enumerated[0][1], enumerated[1][1], strict=True):
        assert torch.equal(g0, g1)
    exact = log_joint(x, torch.tensor([0.25])).item()
    assert -enumerated[0][0] == pytest.approx(exact, rel=1e-12)  # the exact log p(x, m)

    sampled, sampled_grads = [], []
    for seed in range(400):
        pyro.set_rng_seed(seed)
        sampled.append(objective.loss_and_grads(mixture_model, sampling_guide, x))
        sampled_grads.append(grads("logits")[0])
        zero_grads("logits", "m")
    assert not torch.equal(sampled_grads[0], sampled_grads[1])  # sampled c: gradient noise
    sampled = torch.tensor(sampled)
    gap = sampled.mean() - enumerated[0][0]  # loss = -bound: the sampled bound is lower
    stderr = sampled.std() / len(sampled) ** 0.5
    assert gap > 10 * stderr  # measured: 1.72 +- 0.12 nats (K=8, N=6)


@pytest.mark.parametrize(
    "make", [lambda: IWAE(num_particles=4), lambda: BlackBoxAlpha(0.5, num_particles=4)]
)
def test_svi_trains_and_entry_points_agree(make):
    x = data()
    objective = make()
    names = ("logits", "q_loc", "q_scale")
    pyro.set_rng_seed(5)
    loss = objective.loss(mixture_model, mixture_guide, x)
    pyro.set_rng_seed(5)
    differentiable = objective.differentiable_loss(mixture_model, mixture_guide, x)
    differentiable.backward()
    expected_grads = grads(*names)
    zero_grads(*names)
    pyro.set_rng_seed(5)
    value = objective.loss_and_grads(mixture_model, mixture_guide, x)
    assert loss == pytest.approx(differentiable.item(), rel=1e-12)
    assert value == pytest.approx(loss, rel=1e-12)
    for g, e in zip(grads(*names), expected_grads, strict=True):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-14)
    zero_grads(*names)

    pyro.clear_param_store()
    pyro.param("q_loc", torch.tensor(3.0))  # far from the posterior of mu
    svi = SVI(mixture_model, mixture_guide, pyro.optim.Adam({"lr": 0.05}), loss=objective)
    losses = [svi.step(x) for _ in range(300)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 2.0
    # q_loc moved to the posterior mean of mu (by quadrature, at the learnt weights)
    with torch.no_grad():
        grid = torch.linspace(-6.0, 6.0, 4001)
        mean = (log_joint(x, grid).softmax(0) * grid).sum().item()
    assert pyro.param("q_loc").item() == pytest.approx(mean, abs=0.25)


# Errors: enumeration this package does not sum out


def test_guide_enumeration_raises():
    def guide(x):
        mixture_guide(x)
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Categorical(weights()), infer={"enumerate": "parallel"})

    with pytest.raises(
        ValueError,
        match=r"Guide site 'c' is marked.*Enumerate discrete latents in the model only, or "
        r"sample them in the guide",
    ):
        IWAE(num_particles=2).loss(mixture_model, guide, data())


@pytest.mark.parametrize(
    "infer,match",
    [
        ({"enumerate": "sequential"}, r"Model site 'c'.*'sequential' enumeration is not supported"),
        (
            {"enumerate": "parallel", "num_samples": 3},
            r"Model site 'c'.*num_samples.*not supported",
        ),
    ],
)
def test_unsupported_model_enumeration_raises(infer, match):
    def model(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(weights()), infer=infer)
            pyro.sample("x", dist.Normal(torch.tensor(LOCS)[c], 1.0), obs=x)

    with pytest.raises(ValueError, match=match):
        IWAE(num_particles=2, max_plate_nesting=1).loss(model, mixture_guide, data())


def test_enumerated_site_outside_kept_plate_raises():
    with pytest.raises(
        ValueError, match=r"Enumerated model site 'g' is outside the kept plates \['data'\]"
    ):
        importance_trace(
            hierarchical_model,
            hierarchical_guide,
            (data(),),
            {},
            num_particles=2,
            max_plate_nesting=2,
            keep_plates=["data"],
        )


def test_likelihood_weighting_with_enumeration_raises():
    with pytest.raises(
        ValueError, match=r"Model sites \['c'\] are enumerated, but there is no guide"
    ):
        importance_trace(local_model, None, (data(),), {}, num_particles=2, max_plate_nesting=1)


def test_model_site_sampled_by_the_guide_is_not_enumerated():
    # config_enumerate marks every discrete model site; one the guide samples keeps its value
    x = data()
    draw = importance_trace(
        mixture_model, sampling_guide, (x,), {}, num_particles=3, max_plate_nesting=1
    )
    assert draw.model_trace.nodes["c"]["value"].shape == (3, len(X))
    assert draw.score is not None  # sampled: score-function terms for c
    assert torch.isfinite(log_mean_exp(draw.log_w)).all()


def test_log_likelihood_estimate_per_data_point():
    # pyro_fdiv.evaluate.log_likelihood (importance sampling over z, c summed out) approaches
    # log p(x_i) = logsumexp_c log π_c + log N(x_i; l_c, sqrt(1 + 0.5²)) for every data point
    from pyro_fdiv.evaluate import log_likelihood

    x = data()
    estimate = log_likelihood(local_model, local_guide, x, num_samples=4000)
    comp = dist.Normal(torch.tensor(LOCS), (1.0 + 0.25) ** 0.5).log_prob(x[:, None])
    exact = torch.logsumexp(weights().log() + comp, -1)
    assert estimate.shape == (len(X),)
    assert torch.allclose(estimate, exact.detach(), rtol=0, atol=0.05)  # measured: 0.015


PYRO_ENUM = {
    "pyro's poutine.enum": lambda mpn: poutine.enum(first_available_dim=-mpn - 2),
    "no handler": lambda mpn: lambda fn: fn,
}


@pytest.mark.parametrize(
    "model,guide,handler",
    [
        (marginal_model, local_guide, "no handler"),
        (marginal_model, local_guide, "pyro's poutine.enum"),
        (hierarchical_model, hierarchical_guide, "pyro's poutine.enum"),
    ],
)
def test_enum_handler_is_bit_identical(monkeypatch, model, guide, handler):
    # the model always runs under enumeration.enum_handler (Pyro's EnumMessenger, idle before
    # the first enumerated site): the same numbers and random draws as Pyro's poutine.enum,
    # and, for a model without enumerated sites, as no handler at all
    import pyro_fdiv.inference.importance as importance

    x = data()
    results = []
    for replace in (False, True):
        if replace:
            monkeypatch.setattr(importance, "enum_handler", PYRO_ENUM[handler])
        objective = IWAE(num_particles=4, max_plate_nesting=2)
        pyro.set_rng_seed(2)
        value = objective.loss_and_grads(model, guide, x)
        names = sorted(pyro.get_param_store().keys())
        results.append((value, grads(*names), torch.rand(())))
        zero_grads(*names)
    (v0, g0, r0), (v1, g1, r1) = results
    assert v0 == v1 and torch.equal(r0, r1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
