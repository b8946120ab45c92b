"""Global latents with a subsampled data plate: IWAE's nested bound and BB-α's tied energy."""

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule

from pyro_fdiv.inference import IWAE, BlackBoxAlpha
from pyro_fdiv.inference.black_box_alpha import renyi_log_mean_exp
from pyro_fdiv.inference.importance import importance_trace, log_mean_exp
from pyro_fdiv.inference.particles import LocalParticles

N = 8
X = torch.tensor([0.4, -1.3, 2.1, 0.0, 0.9, -0.2, 1.7, -2.4], dtype=torch.float64)
GLOBAL_WARNING = r"global latent sites sit outside the subsampled plate 'data'"


def model(x, idx):
    """``mu ~ N(0, 1)``, ``z_i ~ N(mu, 1)``, ``x_i ~ N(z_i, 1)``: ``x_i | mu ~ N(mu, 2)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def posterior():
    """The exact ``p(mu | x)``: precision ``1 + N/2``, mean ``sum(x) / 2`` over it."""
    var = 1.0 / (1.0 + N / 2)
    return var * X.sum() / 2, math.sqrt(var)


def exact_guide(x, idx):
    """``q(mu) = p(mu | x)``, ``q(z_i | mu) = p(z_i | x_i, mu) = N((mu + x_i)/2, 1/2)``."""
    loc, scale = posterior()
    mu = pyro.sample("mu", dist.Normal(loc + pyro.param("shift", torch.tensor(0.0)), scale))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("z", dist.Normal((mu + x[idx]) / 2, math.sqrt(0.5)))


def loose_guide(x, idx):
    mu = pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.3)), 0.8))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("z", dist.Normal(0.5 * mu + 0.4 * x[idx], 0.9))


def log_evidence() -> float:
    """``log p(x)``: ``x ~ N(0, 2 I + 1 1^T)``."""
    cov = 2 * torch.eye(N) + torch.ones(N, N)
    return dist.MultivariateNormal(torch.zeros(N), cov).log_prob(X).item()


def by_hand(guide_trace, idx):
    """``log p(mu_k) - log q(mu_k)`` (K,) and each data point's local log weight (K, B)."""
    mu = guide_trace.nodes["mu"]["value"]
    z = guide_trace.nodes["z"]["value"]
    q_mu, q_z = guide_trace.nodes["mu"]["fn"], guide_trace.nodes["z"]["fn"]
    g = dist.Normal(0.0, 1.0).log_prob(mu) - q_mu.log_prob(mu)  # (K, 1): particles, plate
    local = (
        dist.Normal(mu, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(X[idx]) - q_z.log_prob(z)
    )
    return g.reshape(-1), local


def guide_trace_of(guide, idx, k, seed):
    pyro.set_rng_seed(seed)
    with pyro.plate("num_particles_vectorized", k, dim=-2):
        return pyro.poutine.trace(guide).get_trace(X, idx)


@pytest.mark.parametrize("batch", [3, N])
@pytest.mark.parametrize(
    "name", ["iwae", "bbalpha-nested", "bbalpha-energy", "bbalpha-0-energy", "bbalpha-0-nested"]
)
def test_estimators_equal_their_formulas_on_the_same_draws(name, batch):
    idx = torch.tensor([5, 0, 3, 7, 1, 2, 6, 4][:batch])
    k, s = 5, N / batch
    objective = {
        "iwae": lambda: IWAE(num_particles=k),
        "bbalpha-nested": lambda: BlackBoxAlpha(0.5, num_particles=k, global_latents="nested"),
        "bbalpha-energy": lambda: BlackBoxAlpha(0.5, num_particles=k),
        "bbalpha-0-energy": lambda: BlackBoxAlpha(0.0, num_particles=k),
        "bbalpha-0-nested": lambda: BlackBoxAlpha(0.0, num_particles=k, global_latents="nested"),
    }[name]()
    pyro.set_rng_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if batch < N else "error")
        loss = objective.loss(model, loose_guide, X, idx)
    g, local = by_hand(guide_trace_of(loose_guide, idx, k, 7), idx)
    alpha = getattr(objective, "alpha", 1.0)
    if name.endswith("energy") and batch < N:
        expected = g.mean() + s * renyi_log_mean_exp(local, alpha, 0).sum()
    else:  # the nested bound; at B = N it is the joint bound, the objectives' default there
        expected = renyi_log_mean_exp(g + s * local.sum(-1), alpha, 0)
    assert loss == pytest.approx(-expected.item(), rel=1e-12)


def test_bbalpha_energy_at_alpha_zero_is_the_negative_elbo():
    idx = torch.tensor([2, 6, 0])
    for seed in range(3):
        pyro.set_rng_seed(seed)
        elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
        expected = elbo.loss(model, loose_guide, X, idx)
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the energy is unbiased: no warning
            loss = BlackBoxAlpha(0.0, num_particles=4).loss(model, loose_guide, X, idx)
            assert loss == pytest.approx(expected, rel=1e-12)  # the same sums, another order
            pyro.set_rng_seed(seed)
            near = BlackBoxAlpha(1e-9, num_particles=4).loss(model, loose_guide, X, idx)
            assert near == pytest.approx(expected, rel=1e-7)


def global_model(x, idx):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])


def global_guide(x, idx):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.2)), 0.7))


@pytest.mark.parametrize("alpha", [0.5, 2.0, -1.0])
def test_energy_minibatch_estimate_is_unbiased_in_the_sum(alpha):
    """Given the particles of ``mu``, the mean of the minibatch energies over every subset of
    size B is the full-data energy (computed by hand: at B = N the objective's default is the
    joint bound, not the energy)."""
    k, batch = 6, 3
    objective = BlackBoxAlpha(alpha, num_particles=k)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for subset in itertools.combinations(range(N), batch):
            pyro.set_rng_seed(11)  # the same particles of mu for every subset
            losses.append(objective.loss(global_model, global_guide, X, torch.tensor(subset)))
    trace = guide_trace_of(global_guide, torch.arange(N), k, 11)
    mu = trace.nodes["mu"]["value"].reshape(-1)
    neg_kl = dist.Normal(0.0, 1.0).log_prob(mu) - dist.Normal(0.2, 0.7).log_prob(mu)
    likelihood = dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(X)  # (K, N)
    full = neg_kl.mean() + renyi_log_mean_exp(likelihood, alpha, 0).sum()
    assert sum(losses) / len(losses) == pytest.approx(-full.item(), rel=1e-12)
    assert len(set(losses)) > 1  # the minibatches do differ


def test_nested_bias_against_the_exact_evidence_shrinks_as_the_batch_grows():
    """With the exact posterior as guide every joint weight is ``p(x)``: at B = N the bound
    is ``log p(x)`` with no variance. At B < N the minibatch noise inside the log-mean-exp
    biases it (upward here: log-mean-exp of a zero-mean noise is positive on average), less as
    B grows."""
    exact = log_evidence()
    objective = IWAE(num_particles=8)
    pyro.set_rng_seed(0)
    assert -objective.loss(model, exact_guide, X, torch.arange(N)) == pytest.approx(exact, 1e-12)
    bias = {}
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (1, 2, 4):
            values = []
            for _ in range(400):
                idx = torch.randperm(N, generator=generator)[:batch]
                values.append(-objective.loss(model, exact_guide, X, idx))
            bias[batch] = sum(values) / len(values) - exact
    assert bias[1] > bias[2] > bias[4] > 0.0


def test_without_global_latents_the_per_data_point_bound_is_unchanged():
    def local_model(x, idx):
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def local_guide(x, idx):
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("z", dist.Normal(x[idx] / 2, 0.8))

    idx = torch.tensor([1, 4, 6])
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no global-latent warning
        for global_latents in ("nested", "error"):
            pyro.set_rng_seed(3)
            objective = IWAE(num_particles=6, global_latents=global_latents)
            losses.append(objective.loss(local_model, local_guide, X, idx))
    pyro.set_rng_seed(3)
    trace = guide_trace_of(local_guide, idx, 6, 3)
    z = trace.nodes["z"]["value"]
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(X[idx])
        - dist.Normal(X[idx] / 2, 0.8).log_prob(z)
    )
    expected = -(N / 3) * log_mean_exp(log_w, 0).sum()  # per data point, scaled outside
    assert losses[0] == losses[1] == pytest.approx(expected.item(), rel=1e-12)


def test_the_warning_comes_once_where_the_estimate_is_biased_and_dreg_is_refused():
    idx = torch.tensor([0, 1])
    objective = IWAE(num_particles=3)
    with pytest.warns(UserWarning, match=GLOBAL_WARNING + r" \(2 of 8\).*biased"):
        objective.loss(model, loose_guide, X, idx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective.loss_and_grads(model, loose_guide, X, idx)
        # one particle: the nested bound is the ELBO's estimate, linear in the minibatch sum
        IWAE(num_particles=1, num_local_particles=3).loss(model, loose_guide, X, idx)
        BlackBoxAlpha(0.5, num_particles=3).loss(model, loose_guide, X, idx)  # the energy
    with pytest.warns(UserWarning, match=GLOBAL_WARNING):
        BlackBoxAlpha(0.5, 3, global_latents="nested").loss(model, loose_guide, X, idx)
    with pytest.raises(ValueError, match="gradient_estimator='dreg' needs untempered"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            IWAE(num_particles=3, gradient_estimator="dreg").loss_and_grads(
                model, loose_guide, X, idx
            )


class Regression(PyroModule):
    """Pyro's ``svi_torch.py`` pattern: global ``coeff``, ``bias``, ``scale``, a data plate
    whose minibatch is passed in (the plate's subsample size is the batch's length)."""

    def __init__(self, size):
        super().__init__()
        self.size = size
        self.register_buffer("zero", torch.tensor(0.0))

    def forward(self, covariates, data=None):
        coeff = pyro.sample("coeff", dist.Normal(self.zero, 1.0))
        bias = pyro.sample("bias", dist.Normal(self.zero, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(self.zero, 1.0))
        with pyro.plate("data", self.size, len(covariates)):
            return pyro.sample("obs", dist.Normal(bias + coeff * covariates, scale), obs=data)


def fit_regression(objective, covariates, data, epochs=20, batch=50):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    regression = Regression(len(data))
    guide = AutoNormal(regression)
    loss_fn = objective(regression, guide)  # an ELBOModule, as in svi_torch.py
    loss_fn(covariates[:batch], data[:batch])
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.99)  # to 1e-3 over 400
    losses = []
    for _ in range(epochs):
        for start in range(0, len(data), batch):
            optimizer.zero_grad()
            loss = loss_fn(covariates[start : start + batch], data[start : start + batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return guide, losses


def test_svi_torch_pattern_trains_to_trace_elbos_posterior_mean():
    generator = torch.Generator().manual_seed(1)
    covariates = torch.randn(1000, generator=generator)
    data = 0.5 - 1.2 * covariates + 0.8 * torch.randn(1000, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the once-only global-latent warning
        guide_iwae, losses = fit_regression(IWAE(num_particles=8), covariates, data)
        guide_bba, _ = fit_regression(BlackBoxAlpha(0.5, num_particles=8), covariates, data)
    guide_elbo, _ = fit_regression(Trace_ELBO(), covariates, data)
    assert sum(losses[-20:]) / 20 < sum(losses[:5]) / 5  # the loss falls
    reference = guide_elbo.median()
    # posterior sds are about 0.8 / sqrt(1000) = 0.025 (0.018 for the scale): agree within
    # about one of them (the remaining difference is the last steps' SGD noise)
    for guide in (guide_iwae, guide_bba):
        for name, value in guide.median().items():
            assert value.item() == pytest.approx(reference[name].item(), abs=0.03), name
    assert reference["coeff"].item() == pytest.approx(-1.2, abs=0.1)


def test_local_particles_equal_their_formula_and_tend_to_the_local_marginals():
    idx = torch.tensor([6, 2, 3, 0])
    k, num_local, s = 3, 5, N / 4
    objective = IWAE(num_particles=k, num_local_particles=num_local)
    pyro.set_rng_seed(9)
    with pytest.warns(UserWarning, match=GLOBAL_WARNING):
        loss = objective.loss(model, loose_guide, X, idx)
    pyro.set_rng_seed(9)
    local_particles = LocalParticles(num_local, -3, ["data"])  # only the sites in "data"
    with pyro.plate("num_particles_vectorized", k, dim=-2):
        trace = pyro.poutine.trace(local_particles(loose_guide)).get_trace(X, idx)
    g, local = by_hand(trace, idx)  # local: (L, K, B); the global draws are not repeated
    assert trace.nodes["mu"]["value"].shape == (k, 1)
    assert local.shape == (num_local, k, 4)
    expected = log_mean_exp(g.reshape(-1) + s * log_mean_exp(local, 0).sum(-1), 0)
    assert loss == pytest.approx(-expected.item(), rel=1e-12)

    # many local particles: each local weight tends to the marginal p(x_i | mu_k) = N(mu_k, 2)
    pyro.set_rng_seed(0)
    weights = importance_trace(
        model,
        loose_guide,
        (X, idx),
        {},
        num_particles=k,
        max_plate_nesting=1,
        split_global=True,
        num_local_particles=4000,
        local_plates=["data"],
    )
    mu = weights.guide_trace.nodes["mu"]["value"]  # (K, 1)
    marginal = dist.Normal(mu, math.sqrt(2.0)).log_prob(X[idx])
    assert weights.log_w.shape == (k, 4)
    assert torch.allclose(weights.log_w, marginal, atol=0.03)


def test_local_particles_train_and_refuse_what_they_cannot_do():
    idx = torch.tensor([1, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for objective in (
            IWAE(num_particles=3, num_local_particles=4),
            BlackBoxAlpha(0.5, num_particles=3, num_local_particles=4),
            BlackBoxAlpha(0.5, num_particles=3, num_local_particles=4, global_latents="nested"),
        ):
            pyro.clear_param_store()
            assert math.isfinite(objective.loss_and_grads(model, loose_guide, X, idx))
            assert torch.isfinite(pyro.param("m").grad)
        with pytest.raises(ValueError, match="num_local_particles > 1 needs gradient_estimator"):
            IWAE(3, "stl", num_local_particles=4).loss_and_grads(model, loose_guide, X, idx)
    with pytest.raises(ValueError, match=r"Expected num_local_particles to be an integer >= 1"):
        IWAE(num_local_particles=0)


def nested_model():
    """``x`` in a data plate, ``y`` in a subsampled plate nested in it (global to ``y``'s
    plate, local to the data plate)."""
    p = pyro.param("p", torch.tensor(0.4), constraint=dist.constraints.unit_interval)
    with pyro.plate("outer", 5):
        pyro.sample("x", dist.Normal(p, 1.0))
        with pyro.plate("inner", 11, 6, dim=-2):
            pyro.sample("y", dist.Normal(p, 1.0))


def nested_guide():
    loc = pyro.param("loc", torch.tensor(0.1))
    with pyro.plate("outer", 5):
        pyro.sample("x", dist.Normal(loc, 1.5))
        with pyro.plate("inner", 11, 6, dim=-2):
            pyro.sample("y", dist.Normal(loc, 0.5))


def crossed_model():
    """Two subsampled plates that cross: no site is inside both."""
    p = pyro.param("p", torch.tensor(0.4), constraint=dist.constraints.unit_interval)
    with pyro.plate("a", 10, 5):
        pyro.sample("x", dist.Normal(p, 1.0))
    with pyro.plate("b", 11, 6, dim=-2):
        pyro.sample("y", dist.Normal(p, 1.0))


def crossed_guide():
    loc = pyro.param("loc", torch.tensor(0.1))
    with pyro.plate("a", 10, 5):
        pyro.sample("x", dist.Normal(loc, 1.5))
    with pyro.plate("b", 11, 6, dim=-2):
        pyro.sample("y", dist.Normal(loc, 0.5))


@pytest.mark.parametrize(
    "model_, guide_, args",
    [
        (model, loose_guide, (X, torch.tensor([4, 1, 7]))),
        (nested_model, nested_guide, ()),
        (crossed_model, crossed_guide, ()),
    ],
    ids=["global-and-local", "nested-plates", "crossed-plates"],
)
def test_nested_bound_is_pyros_renyi_elbo_on_the_same_draws(model_, guide_, args):
    """With one local draw per particle and no subsampled plate shared by every site, the
    nested bound is the importance-weighted bound of the minibatch-scaled joint weight per
    element of the shared plates, which is what Pyro's RenyiELBO(alpha=0) computes (where a
    shared plate is subsampled, Pyro tempers the weights by its N/B and we do not)."""
    from pyro.infer import RenyiELBO

    for k in (1, 6):
        pyro.set_rng_seed(4)
        renyi = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True, max_plate_nesting=2)
        expected = renyi.loss(model_, guide_, *args)
        pyro.set_rng_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the once-only global-latent warning (k > 1)
            loss = IWAE(num_particles=k, max_plate_nesting=2).loss(model_, guide_, *args)
        assert loss == pytest.approx(expected, rel=1e-10)


def test_crossed_plates_warn_naming_them_and_refuse_local_particles():
    with pytest.warns(UserWarning, match=r"plate 'a' \(5 of 10\), 'b' \(6 of 11\)"):
        IWAE(num_particles=2).loss(crossed_model, crossed_guide)
    with pytest.raises(ValueError, match=r"num_local_particles=3 needs one data plate"):
        IWAE(num_particles=2, num_local_particles=3).loss(crossed_model, crossed_guide)


def test_energy_score_function_gradient_is_unbiased_for_a_discrete_global_latent():
    """A Bernoulli global latent (no rsample): the energy's score-function terms (VIMCO's
    baseline over each particle's global and local draws) give an unbiased gradient of the
    expected minibatch energy, which K = 2 particles let us enumerate exactly."""
    idx, k, alpha = torch.tensor([1, 6, 3]), 2, 0.5

    def discrete_model(x, idx):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x[idx])

    def discrete_guide(x, idx):
        logit = pyro.param("logit", torch.tensor(0.2))
        pyro.sample("z", dist.Bernoulli(logits=logit))

    logit = torch.tensor(0.2, requires_grad=True)
    q = dist.Bernoulli(logits=logit)
    expected = 0.0
    for z in itertools.product([0.0, 1.0], repeat=k):
        z = torch.tensor(z)
        g = dist.Bernoulli(0.3).log_prob(z) - q.log_prob(z)
        local = dist.Normal(2.0 * z.unsqueeze(-1) - 1.0, 1.0).log_prob(X[idx])  # (K, B)
        bound = g.mean() + (N / 3) * renyi_log_mean_exp(local, alpha, 0).sum()
        expected = expected + q.log_prob(z).sum().exp() * bound
    (exact,) = torch.autograd.grad(-expected, logit)

    objective = BlackBoxAlpha(alpha, num_particles=k)
    grads = []
    for seed in range(800):
        pyro.set_rng_seed(seed)
        objective.loss_and_grads(discrete_model, discrete_guide, X, idx)
        grads.append(pyro.param("logit").grad.item())
        pyro.param("logit").grad = None
    grads = torch.tensor(grads)
    stderr = grads.std() / math.sqrt(len(grads))
    assert abs(grads.mean() - exact) < 4 * stderr  # measured: -0.126 against -0.131
    # the test can tell a wrong gradient: without the score terms the mean would be about 0
    assert stderr < 0.15 * abs(exact)
