"""Joint stochastic approximation: exact stationarity of its chains, the inclusive-KL guide,
maximum likelihood with discrete latents, the cache and its state, errors."""

import copy
import importlib.util
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from scipy import stats
from torch.distributions import constraints

from pyro_fdiv.checkpoint import get_rng_state, set_rng_state
from pyro_fdiv.inference import JSA, make_step
from pyro_fdiv.models.sbn import SBN

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Models with exact posteriors


def linear_gaussian(x, subsample_size=None):
    """``z_n ~ N(0, I)``, ``x_n ~ N(z_n, I)``: posterior ``N(x_n / 2, I / 2)``."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])


def poor_gaussian_guide(x, subsample_size=None):
    """A deliberately poor proposal: shifted by 0.8 and 1.5 times too wide."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2 + 0.8, 1.5 * math.sqrt(0.5)).to_event(1))


def _standardized(jsa, x):
    return ((jsa.samples()["z"] - x / 2) / math.sqrt(0.5)).reshape(-1)


@pytest.mark.parametrize("subsample_size", [None, 250])
def test_chains_are_exact_posterior_samplers_with_a_poor_guide(subsample_size):
    torch.manual_seed(0)
    x = 2.0 * torch.randn(1000, 2)
    jsa = JSA(num_data=1000, num_particles=8)
    steps = 15 if subsample_size is None else 60
    for _ in range(steps):
        jsa.advance(linear_gaussian, poor_gaussian_guide, x, subsample_size)
    assert bool(jsa.initialized.all())
    assert 0.2 < jsa.acceptance_rate["local"] < 0.6  # a poor proposal
    start = (poor_gaussian_guide_draws(x) - x / 2) / math.sqrt(0.5)
    assert stats.kstest(start.reshape(-1).numpy(), "norm").pvalue < 1e-6  # the guide is off
    assert stats.kstest(_standardized(jsa, x).numpy(), "norm").pvalue > 0.01


def poor_gaussian_guide_draws(x):
    return x / 2 + 0.8 + 1.5 * math.sqrt(0.5) * torch.randn_like(x)


def test_wrong_acceptance_ratio_fails_the_stationarity_test(monkeypatch):
    """Power of the test above: weights that ignore log q (a random-walk ratio) are caught."""
    original = JSA._terms

    def without_q(self, *args, **kwargs):
        terms, scale = original(self, *args, **kwargs)
        terms["q"] = tuple(None if t is None else 0.0 * t for t in terms["q"])
        return terms, scale

    monkeypatch.setattr(JSA, "_terms", without_q)
    torch.manual_seed(0)
    x = 2.0 * torch.randn(1000, 2)
    jsa = JSA(num_data=1000, num_particles=8)
    for _ in range(15):
        jsa.advance(linear_gaussian, poor_gaussian_guide, x)
    assert stats.kstest(_standardized(jsa, x).numpy(), "norm").pvalue < 1e-6


# A small discrete model, posterior by enumeration: c ~ Categorical(3), b | c ~ Bernoulli,
# x | c, b ~ N(loc[c] + b, 1). Every data point has the same x: one posterior over 6 states.
LOCS = (-1.0, 0.5, 2.0)
B_PROBS = (0.2, 0.5, 0.9)
C_PROBS = (0.5, 0.3, 0.2)


def discrete_model(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(torch.tensor(C_PROBS)))
        b = pyro.sample("b", dist.Bernoulli(torch.tensor(B_PROBS)[c]))
        pyro.sample("x", dist.Normal(torch.tensor(LOCS)[c] + b, 1.0), obs=x)


def discrete_guide(x):
    """Poor and hierarchical: q(c) ignores x; q(b | c) favours the wrong value."""
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.15, 0.15, 0.7])))
        pyro.sample("b", dist.Bernoulli(torch.tensor([0.9, 0.2, 0.1])[c]))


def exact_discrete_posterior(x: float) -> torch.Tensor:
    joint = torch.zeros(3, 2)
    for c in range(3):
        for b in range(2):
            prior_b = B_PROBS[c] if b else 1 - B_PROBS[c]
            likelihood = dist.Normal(LOCS[c] + b, 1.0).log_prob(torch.tensor(x)).exp()
            joint[c, b] = C_PROBS[c] * prior_b * likelihood
    return joint / joint.sum()


def test_discrete_chains_match_enumeration_by_chi_square():
    x = torch.full((3000,), 1.2)
    jsa = JSA(num_data=3000, num_particles=4)
    for _ in range(25):
        jsa.advance(discrete_model, discrete_guide, x)
    state = jsa.samples()
    assert state["c"].dtype == torch.long and set(state["b"].unique().tolist()) == {0.0, 1.0}
    cells = (2 * state["c"] + state["b"].long()).bincount(minlength=6)
    expected = exact_discrete_posterior(1.2).reshape(-1) * 3000
    assert stats.chisquare(cells.numpy(), expected.numpy()).pvalue > 0.01
    # the proposal alone is far off
    guide_c = torch.tensor([0.15, 0.15, 0.7])
    assert (guide_c - exact_discrete_posterior(1.2).sum(1)).abs().max() > 0.3


def global_model():
    """``mu ~ N(0, 1)``, ``y_i ~ N(mu, 1)``: posterior ``N(sum y / 6, 1 / 6)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", 5):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9]))


def test_single_chain_without_data_plate_samples_the_posterior():
    def guide():
        pyro.sample("mu", dist.Normal(1.2, 0.8))  # poor: shifted, twice too wide

    jsa = JSA(num_particles=16, record_history=True)
    for _ in range(400):
        jsa.advance(global_model, guide)
    assert jsa.num_recorded == 6400 and set(jsa.acceptance_rate) == {"global"}
    mu = jsa.history(burn_in=400)["mu"]
    batch_means = mu.reshape(60, 100).mean(1)
    mcse = batch_means.std() / math.sqrt(60)
    assert abs(mu.mean() - 4.0 / 6) < 4 * mcse
    assert mu.var() == pytest.approx(1 / 6, rel=0.1)


def test_global_and_local_blocks_sample_the_joint_posterior():
    """``mu ~ N(0, 1)``, ``z_n ~ N(mu, 1)``, ``x_n ~ N(z_n, 0.5^2)``: ``mu`` has posterior
    precision ``1 + N / 1.25``; the local guide depends on ``mu``."""
    torch.manual_seed(0)
    n = 20
    x = torch.randn(n) + 1.0

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        mu = pyro.sample("mu", dist.Normal(0.3, 0.6))
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(0.5 * x + 0.3 * mu, 0.7))

    jsa = JSA(num_data=n, num_particles=32, record_history=True)
    z_sum = torch.zeros(n)
    for step in range(300):
        jsa.advance(model, guide, x)
        if step >= 50:
            z_sum += jsa.samples()["z"]
    assert set(jsa.acceptance_rate) == {"local", "global"}
    precision = 1 + n / 1.25
    mu = jsa.history(burn_in=1600)["mu"]
    mcse = mu.reshape(40, -1).mean(1).std() / math.sqrt(40)
    assert abs(mu.mean() - x.sum() / 1.25 / precision) < 4 * mcse
    assert mu.var() == pytest.approx(1 / precision, rel=0.1)
    # E[z_n | x] = (4 x_n + E[mu | x]) / 5
    exact_z = (4 * x + x.sum() / 1.25 / precision) / 5
    error = (z_sum / 250 - exact_z).abs()  # Monte Carlo error about 0.03 per point
    assert error.max() < 0.12 and error.mean() < 0.05


# ----------------------------------------------------------------------------------------------
# Training


def correlated_model():
    """``z ~ N(0, I_2)``, ``y ~ N(z_1 + z_2, 0.5^2)`` at ``y = 1``: a posterior with correlation
    -0.8, marginal variances 5/9, conditional variances 1/5."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=torch.tensor(1.0))


def mean_field_guide():
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _fit_mean_field(loss, steps, lr):
    pyro.clear_param_store()
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(correlated_model, mean_field_guide, optim, loss=loss)
    for _ in range(steps):
        svi.step()
    return pyro.param("loc").detach(), pyro.param("scale").detach() ** 2


def test_inclusive_kl_guide_covers_the_posterior_unlike_the_elbo():
    pyro.set_rng_seed(0)
    loc, var = _fit_mean_field(JSA(num_particles=16), steps=600, lr=0.05)
    # inclusive KL over mean-field Gaussians matches the marginals: mean 4/9, variance 5/9
    # (tolerances: the spread over seeds of this stochastic approximation)
    assert torch.allclose(loc, torch.full((2,), 4 / 9), atol=0.1)
    assert torch.allclose(var, torch.full((2,), 5 / 9), rtol=0.2)
    _, elbo_var = _fit_mean_field(Trace_ELBO(), steps=600, lr=0.05)
    # the ELBO's mean-field variances shrink to the conditional ones, 1/5
    assert torch.allclose(elbo_var, torch.full((2,), 0.2), rtol=0.3)
    assert bool((var > 2 * elbo_var).all())


def test_full_rank_guide_learns_the_posterior_covariance():
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(correlated_model, init_scale=1.0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / 600)})
    svi = SVI(correlated_model, guide, optim, loss=JSA(num_particles=16))
    for _ in range(600):
        svi.step()
    cov = guide.get_posterior().covariance_matrix.detach()
    exact = torch.tensor([[5.0, -4.0], [-4.0, 5.0]]) / 9
    assert torch.allclose(cov, exact, atol=0.08)


def test_discrete_mixture_weight_reaches_the_maximum_likelihood():
    """``c_n ~ Bernoulli(pi)``, ``x_n ~ N(4 c_n - 2, 1)``: theta = pi is learned by JSA with an
    amortized Bernoulli guide (no reparameterization) and compared with the exact MLE."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(140) + 2.0, torch.randn(60) - 2.0])

    def model(x):
        pi = pyro.param("pi", torch.tensor(0.5), constraint=constraints.unit_interval)
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(pi))
            pyro.sample("x", dist.Normal(4.0 * c - 2.0, 1.0), obs=x)

    def guide(x):
        w = pyro.param("w", torch.zeros(2))
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(logits=w[0] * x + w[1]))

    grid = torch.linspace(0.01, 0.99, 9801)
    likelihood = torch.stack(
        [dist.Normal(-2.0, 1.0).log_prob(x).exp(), dist.Normal(2.0, 1.0).log_prob(x).exp()]
    )
    log_lik = ((1 - grid[:, None]) * likelihood[0] + grid[:, None] * likelihood[1]).log().sum(1)
    mle = grid[log_lik.argmax()]
    jsa = JSA(num_data=len(x), num_particles=2)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / 400)})
    svi = SVI(model, guide, optim, loss=jsa)
    for _ in range(400):
        svi.step(x)
    assert pyro.param("pi").item() == pytest.approx(mle.item(), abs=0.03)
    assert jsa.acceptance_rate["local"] > 0.9  # the guide learned the posterior


# ----------------------------------------------------------------------------------------------
# The cache: rows, entry points, state


def sharp_model(x, idx):
    """``x_n ~ N(z_n, 0.001^2)``: the chains' states are ``x[idx]`` to 3 decimals."""
    with pyro.plate("data", 10, subsample=idx):
        z = pyro.sample("z", dist.Normal(0.0, 10.0))
        pyro.sample("x", dist.Normal(z, 1e-3), obs=x)


def sharp_guide(x, idx):
    with pyro.plate("data", 10, subsample=idx):
        pyro.sample("z", dist.Normal(x, 1e-3))


def test_rows_are_read_and_written_at_the_subsample_indices():
    data = torch.arange(10.0) * 10
    jsa = JSA(num_data=10)
    idx = torch.tensor([3, 7, 1])
    jsa.loss_and_grads(sharp_model, sharp_guide, data[idx], idx)
    assert jsa.initialized.nonzero().reshape(-1).tolist() == [1, 3, 7]
    z = jsa.samples()["z"]
    assert torch.allclose(z[idx], data[idx], atol=0.01)
    assert bool((z[[0, 2, 4, 5, 6, 8, 9]] == 0).all())
    # rows read back: with data shifted by 0.5 a cached row gives a tiny weight, so the MH
    # move accepts the guide's proposal; the new state moved to the new data
    idx2 = torch.tensor([7, 5])
    jsa.loss_and_grads(sharp_model, sharp_guide, data[idx2] + 0.5, idx2)
    z = jsa.samples()["z"]
    assert torch.allclose(z[idx2], data[idx2] + 0.5, atol=0.01)
    assert torch.allclose(z[[1, 3]], data[[1, 3]], atol=0.01)


def test_guide_subsample_wins_over_the_models_as_in_replay():
    """Pyro's replay gives the model the guide's subsample indices; the chains use them."""
    data = torch.arange(10.0) * 10
    seen = []

    def model(x, idx):
        with pyro.plate("data", 10, subsample=torch.arange(len(idx))) as i:  # overridden
            seen.append(i.clone())
            z = pyro.sample("z", dist.Normal(0.0, 10.0))
            pyro.sample("x", dist.Normal(z, 1e-3), obs=x)

    idx = torch.tensor([9, 4])
    JSA(num_data=10).loss(model, sharp_guide, data[idx], idx)
    jsa = JSA(num_data=10)
    jsa.loss_and_grads(model, sharp_guide, data[idx], idx)
    assert all(i.tolist() == [9, 4] for i in seen)
    assert jsa.initialized.nonzero().reshape(-1).tolist() == [4, 9]


def test_random_subsample_rows_follow_the_guides_indices():
    data = torch.arange(10.0) * 10
    drawn = []

    def model(x):
        with pyro.plate("data", 10, subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 10.0))
            pyro.sample("x", dist.Normal(z, 1e-3), obs=x[idx])

    def guide(x):
        with pyro.plate("data", 10, subsample_size=4) as idx:
            drawn.append(idx.clone())
            pyro.sample("z", dist.Normal(x[idx], 1e-3))

    jsa = JSA(num_data=10, num_moves=3)
    jsa.loss_and_grads(model, guide, data)
    assert all(torch.equal(d, drawn[-1]) for d in drawn[-3:])  # one subsample for all moves
    rows = drawn[-1].sort().values
    assert jsa.initialized.nonzero().reshape(-1).tolist() == rows.tolist()
    assert torch.allclose(jsa.samples()["z"][rows], data[rows], atol=0.01)


def test_loss_never_changes_state_and_entry_points_agree():
    torch.manual_seed(0)
    x = torch.randn(6, 2)
    jsa = JSA(num_data=6, num_particles=3)
    for _ in range(2):
        jsa.loss_and_grads(linear_gaussian, poor_gaussian_guide, x)
    before = {k: v.clone() for k, v in jsa.state_dict().items() if torch.is_tensor(v)}
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(7)
        out = getattr(jsa, method)(linear_gaussian, poor_gaussian_guide, x)
        values.append(float(out))
        if method != "loss_and_grads":
            state = jsa.state_dict()
            assert all(torch.equal(state[k], v) for k, v in before.items())
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert values[0] == pytest.approx(values[2], rel=1e-12)
    assert not torch.equal(jsa.state_dict()["num_steps"], before["num_steps"])


def test_differentiable_loss_then_commit_equals_loss_and_grads():
    x = torch.randn(6, 2)
    states = []
    for use_commit in (True, False):
        jsa = JSA(num_data=6, num_particles=3)
        pyro.set_rng_seed(1)
        if use_commit:
            jsa.differentiable_loss(linear_gaussian, poor_gaussian_guide, x)
            jsa.commit()
            with pytest.raises(ValueError, match="nothing to commit"):
                jsa.commit()
        else:
            jsa.loss_and_grads(linear_gaussian, poor_gaussian_guide, x)
        states.append(jsa.samples()["z"])
    assert torch.equal(states[0], states[1])


def test_gradient_is_that_of_log_p_plus_log_q_at_the_accepted_states():
    """One chain, one proposal, no averaging: the loss is -log p(y, z) - log q(z) at the new
    state and its gradient in the guide's loc is -(z - loc) / scale^2."""

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("mu", dist.Normal(loc, 0.5))

    jsa = JSA(average_visited=False)
    pyro.set_rng_seed(0)
    loss = jsa.differentiable_loss(global_model, guide)
    jsa.commit()
    mu = jsa.samples()["mu"]
    y = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9])
    log_p = dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu, 1.0).log_prob(y).sum()
    log_q = dist.Normal(0.2, 0.5).log_prob(mu)
    assert loss.item() == pytest.approx(-(log_p + log_q).item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, pyro.param("loc"))
    assert grad.item() == pytest.approx(-((mu - 0.2) / 0.25).item(), rel=1e-10)


def _train(jsa, x, steps, seed):
    pyro.set_rng_seed(seed)
    losses = []
    for _ in range(steps):
        losses.append(jsa.loss_and_grads(linear_gaussian, poor_gaussian_guide, x, 4))
    return losses


def test_state_dict_round_trips_and_resumes_exactly():
    x = torch.randn(12, 2)
    jsa = JSA(num_data=12, num_particles=2, warmup_without_cache=1)
    _train(jsa, x, 3, seed=0)
    state = jsa.state_dict()
    assert set(state) >= {"initialized", "num_steps", "cache_0", "_extra_state"}
    restored = JSA(num_data=12, num_particles=2, warmup_without_cache=1)
    restored.load_state_dict(state)
    assert torch.equal(restored.samples()["z"], jsa.samples()["z"])
    assert restored.acceptance_rate == jsa.acceptance_rate
    assert _train(restored, x, 3, seed=5) == _train(jsa, x, 3, seed=5)
    assert torch.equal(restored.samples()["z"], jsa.samples()["z"])
    with pytest.raises(ValueError, match="settings"):
        JSA(num_data=13).load_state_dict(state)


def test_history_round_trips_and_buffers_follow_to():
    jsa = JSA(num_particles=2, record_history=True)

    def guide():
        pyro.sample("mu", dist.Normal(0.5, 0.5))

    for _ in range(3):
        jsa.advance(global_model, guide)
    restored = JSA(num_particles=2, record_history=True)
    restored.load_state_dict(jsa.state_dict())
    assert torch.equal(restored.history()["mu"], jsa.history()["mu"])
    assert restored.history(burn_in=4)["mu"].shape == (2,)
    assert {name for name, _ in jsa.named_buffers()} >= {"cache_0", "global_initialized"}
    jsa.to(torch.float32)
    assert jsa.samples()["mu"].dtype == torch.float32
    jsa.reset()
    assert jsa.samples() == {} and jsa.num_recorded == 0 and int(jsa.num_steps) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_follows_the_module_to_cuda():
    x = torch.randn(6, 2, device="cuda")
    jsa = JSA(num_data=6).to("cuda")
    assert jsa.initialized.is_cuda
    jsa.loss_and_grads(linear_gaussian, poor_gaussian_guide, x)
    assert jsa.samples()["z"].is_cuda
    jsa.to("cpu")
    assert not jsa.samples()["z"].is_cuda


def test_warmup_without_cache_restarts_from_the_guide():
    data = torch.arange(10.0) * 10
    idx = torch.arange(10)
    jsa = JSA(num_data=10, warmup_without_cache=2)
    jsa.loss_and_grads(sharp_model, sharp_guide, data, idx)
    # during warm-up the cached (now far-off) state is not used as the start: with data moved
    # by 1 the sharp guide's draw is always taken, cached or not; the counter counts
    jsa.loss_and_grads(sharp_model, sharp_guide, data + 1, idx)
    assert int(jsa.num_steps) == 2
    assert torch.allclose(jsa.samples()["z"], data + 1, atol=0.01)


def test_works_in_svi_with_a_bernoulli_vae():
    from pyro_fdiv.models.sbn import SBN

    torch.manual_seed(0)
    x = (torch.rand(32, 12) < 0.3).double()
    sbn = SBN(x_dim=12, z_dim=5, hidden_dim=8).double()
    jsa = JSA(num_data=32, num_particles=2)
    svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 0.01}), loss=jsa)
    idx = torch.arange(32)
    first = svi.step(x[:16], idx[:16], 32)
    for _ in range(30):
        svi.step(x[:16], idx[:16], 32)
        svi.step(x[16:], idx[16:], 32)
    assert math.isfinite(first) and bool(jsa.initialized.all())
    assert jsa.samples()["z"].shape == (32, 5)
    assert set(jsa.samples()["z"].unique().tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_data": 0}, "num_data"),
        ({"num_moves": 0}, "num_moves"),
        ({"num_particles": 1.5}, "num_particles"),
        ({"warmup_without_cache": -1}, "warmup_without_cache"),
        ({"data_plate": "data"}, "data_plate"),
        ({"validation": "never"}, "validation"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JSA(**kwargs)


def test_data_plate_size_must_match_num_data():
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"data plate 'data' has size 8 but JSA\(num_data=10\)"):
        JSA(num_data=10).loss(linear_gaussian, poor_gaussian_guide, x)
    with pytest.raises(ValueError, match=r"subsampled .* but num_data=None"):
        JSA().loss(linear_gaussian, poor_gaussian_guide, x, 4)
    with pytest.raises(ValueError, match="data_plate 'rows' is not a vectorized plate"):
        JSA(num_data=8, data_plate="rows").loss(linear_gaussian, poor_gaussian_guide, x)


def test_latent_sites_must_not_change_between_steps():
    x = torch.randn(8, 2)

    def guide(x, extra=False):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 1.0).to_event(1))
            if extra:
                pyro.sample("w", dist.Normal(0.0, 1.0))

    def model(x, extra=False):
        linear_gaussian(x)
        if extra:
            with pyro.plate("data", len(x)):
                pyro.sample("w", dist.Normal(0.0, 1.0))

    jsa = JSA(num_data=8)
    jsa.loss_and_grads(model, guide, x)
    with pytest.raises(ValueError, match=r"site 'w'.*same latent sites"):
        jsa.loss_and_grads(model, guide, x, True)

    def wider_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 3), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"site 'z'.*same latent sites"):
        jsa.loss(lambda x: None, wider_guide, x)


def test_guide_that_cannot_score_the_cached_state_raises():
    def model():
        pyro.sample("u", dist.Uniform(0.0, 1.0))

    def guide():
        high = pyro.param("high", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("u", dist.Uniform(0.0, high))

    jsa = JSA()
    pyro.set_rng_seed(0)
    jsa.advance(model, guide)
    pyro.param("high").unconstrained().data.fill_(math.log(1e-3))  # the support shrinks
    with pytest.raises(ValueError, match=r"site 'u'.*cannot score"):
        jsa.loss(model, guide)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match=r"site 'u'.*cannot"):
        jsa.loss(model, guide)  # without torch's support check: a -inf log q


def test_delta_guide_at_a_parameter_raises():
    def guide():
        pyro.sample("mu", dist.Delta(pyro.param("m", torch.tensor(0.0))))

    with pytest.raises(ValueError, match="Delta whose value depends on parameters"):
        JSA().loss(global_model, guide)


# ----------------------------------------------------------------------------------------------
# The example


def test_digits_example_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("jsa_digits", ROOT / "examples" / "jsa_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    table = example.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "samples.png").is_file()
    assert "test log-likelihood" in capsys.readouterr().out
    row = table.iloc[0]
    # a real estimate (between the all-pixels-0.5 model's -784 log 2 and 0), chains moving
    assert -784 * math.log(2) < row.test_ll < 0 and 0 < row.acceptance_rate <= 1
    assert "cannot be reparameterized" in row.reparameterized_objective


# ----------------------------------------------------------------------------------------------
# Eight Schools: the fitted guide (`jsa`) and the chain's states (`jsa-chain`)


def test_eight_schools_methods_share_one_fit(tmp_path):
    import arviz as az

    from pyro_fdiv.compare.eight_schools import run

    # a 60-step chain repeats its states often: the kNN estimator says it leaves ties out
    with pytest.warns(RuntimeWarning, match="zero kNN distance"):
        table = run(
            tmp_path, ["jsa", "jsa-chain"], steps=60, num_draws=300, progress=False, plot=False
        )
    table = table.set_index("method")
    assert table.loc["jsa", "seconds"] == table.loc["jsa-chain", "seconds"]  # fitted once
    assert math.isfinite(table.loc["jsa", "exact_kl_ref_q"])
    assert math.isnan(table.loc["jsa-chain", "exact_kl_ref_q"])  # a chain has no density
    chain = az.from_netcdf(tmp_path / "samples" / "jsa-chain.nc").posterior
    guide = az.from_netcdf(tmp_path / "samples" / "jsa.nc").posterior
    assert chain["mu"].shape == guide["mu"].shape == (1, 300)
    # 60 steps x 16 transitions, the first fifth dropped, thinned to 300: repeats of rejected
    # proposals appear in the chain, never among independent guide draws
    assert len(set(chain["mu"].values.ravel().tolist())) < 300
    assert len(set(guide["mu"].values.ravel().tolist())) == 300


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:knn_kl.*zero kNN distance:RuntimeWarning")  # a few repeats
def test_eight_schools_chain_is_close_to_nuts(tmp_path):
    from pyro_fdiv.compare.eight_schools import run

    table = run(tmp_path, ["jsa", "jsa-chain"], progress=False, plot=False).set_index("method")
    chain, guide = table.loc["jsa-chain"], table.loc["jsa"]
    # NUTS against NUTS (the noise floor): kNN KL -0.002 / 0.014, mean |z| 0.010, max W1 0.044
    assert abs(chain["kl_ref_q"]) < 0.06 and abs(chain["kl_q_ref"]) < 0.06
    assert chain["mean_abs_z"] < 0.02 and chain["max_w1"] < 0.06
    # the inclusive-KL guide covers the posterior better than the full-rank ELBO (0.364)
    assert guide["exact_kl_ref_q"] < 0.3 and guide["khat"] < 0.8  # k-hat: 0.49-0.71 seen


# ----------------------------------------------------------------------------------------------
# Regressions


def test_load_state_dict_keeps_the_modules_dtype_and_device():
    """A checkpoint's cache lands on the module's device and in its dtype, not the
    checkpoint's (a CPU checkpoint loaded into a CUDA model: the meta device shows the same)."""
    x = torch.randn(6, 2)
    jsa = JSA(num_data=6, num_particles=2)
    jsa.loss_and_grads(linear_gaussian, poor_gaussian_guide, x)
    state = jsa.state_dict()  # float64, CPU
    trained = JSA(num_data=6, num_particles=2)
    trained.load_state_dict(state)
    trained.to(torch.float32)
    trained.load_state_dict(state)
    fresh = JSA(num_data=6, num_particles=2).to(torch.float32)
    fresh.load_state_dict(state)
    for restored in (trained, fresh):
        assert restored.samples()["z"].dtype == torch.float32
        torch.testing.assert_close(restored.samples()["z"], jsa.samples()["z"].float())
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores it
    fresh.loss_and_grads(linear_gaussian, poor_gaussian_guide, x.float())  # the chains' dtype
    meta = JSA(num_data=6, num_particles=2).to("meta")
    with pytest.warns(UserWarning, match="to a meta parameter"):  # torch: a no-op copy
        meta.load_state_dict(state)
    assert {buf.device.type for buf in meta.buffers()} == {"meta"}


def test_reset_starts_like_a_freshly_constructed_jsa():
    """reset() also forgets the data plate, the blocks and a guessed max_plate_nesting."""

    def grid_model(x):
        with pyro.plate("rows", 6, dim=-2), pyro.plate("cols", 2, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def grid_guide(x):
        with pyro.plate("rows", 6, dim=-2), pyro.plate("cols", 2, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, 1.0))

    x = torch.randn(6, 2)
    jsa = JSA(num_data=6, num_particles=3)
    jsa.loss_and_grads(linear_gaussian, poor_gaussian_guide, x)  # data plate "data", 1 plate
    jsa.reset()
    runs = []
    for objective in (jsa, JSA(num_data=6, num_particles=3)):
        pyro.set_rng_seed(4)
        losses = [objective.loss_and_grads(grid_model, grid_guide, x) for _ in range(2)]
        runs.append((losses, objective.samples()["z"]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]) and runs[0][1].shape == (6, 2)


# ----------------------------------------------------------------------------------------------
# Compiled steps (compile=True, make_step)


def _sbn_case():
    """Bernoulli latents in a subsampled data plate (the SBN JSA was made for)."""
    net = SBN(x_dim=6, z_dim=3)
    data = torch.bernoulli(torch.full((10, 6), 0.3, dtype=torch.float64))
    jsa = JSA(num_data=10, num_particles=3)

    def batch(i):
        idx = torch.arange(5) + 5 * (i % 2)
        return data[idx], idx, 10

    return net.double().model, net.guide, jsa, batch


def _mixed_model(x, idx):
    mu = pyro.sample("mu", dist.Normal(x.new_tensor(0.0), 3.0))
    with pyro.plate("data", 8, subsample=idx):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def _mixed_guide(x, idx):
    m = pyro.param("m", x.new_tensor(0.0))
    s = pyro.param("s", x.new_tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))
    with pyro.plate("data", 8, subsample=idx):
        pyro.sample("z", dist.Normal(pyro.param("a", x.new_zeros(8))[idx], 1.0))


def _mixed_case():
    """Local and global chains (two blocks), two moves, the global chain's history."""
    data = torch.randn(8, dtype=torch.float64)
    jsa = JSA(num_data=8, num_particles=3, num_moves=2, record_history=True)

    def batch(i):
        idx = torch.arange(4) + 4 * (i % 2)
        return data[idx], idx

    return _mixed_model, _mixed_guide, jsa, batch


def _global_case():
    """One global chain (num_data=None, as Eight Schools), a warm-up phase, its history."""
    data = torch.randn(8, dtype=torch.float64)
    jsa = JSA(num_particles=3, warmup_without_cache=3, record_history=True)
    return _mixed_model, _mixed_guide, jsa, lambda i: (data, torch.arange(8))


def _compiled_run(case, compile, steps, start=None):
    """``steps`` make_step steps of a case; ``start``: a state to resume from."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide, jsa, batch = case()
    optim = pyro.optim.Adam({"lr": 0.05})
    step = make_step(model, guide, optim, jsa, compile=compile)
    first = 0
    if start is not None:
        first, params, optim_state, chains, rng = start
        pyro.get_param_store().set_state(params)
        optim.set_state(optim_state)
        jsa.load_state_dict(chains)
        set_rng_state(rng)
    else:
        pyro.set_rng_seed(1)
    losses = [step(*batch(i)) for i in range(first, first + steps)]
    state = (
        first + steps,
        copy.deepcopy(pyro.get_param_store().get_state()),
        copy.deepcopy(optim.get_state()),
        copy.deepcopy(jsa.state_dict()),
        get_rng_state(),
    )
    return losses, jsa, state


def _assert_same_state(want, got, tol=1e-10):
    for name, value in want[1]["params"].items():
        torch.testing.assert_close(got[1]["params"][name], value, atol=tol, rtol=tol)
    for name, value in want[3].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(got[3][name], value, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("case", [_sbn_case, _global_case], ids=["sbn", "global"])
def test_compiled_steps_equal_eager(case):
    """Under make_step JSA's step (moves, transitions, gradient) is one compiled program per
    phase (warm-up, cached), captured after the first step creates the chains; it draws what
    the eager step draws (Bernoulli latents included), so losses, parameters, chains,
    acceptance statistics and history agree to float rounding."""
    eager_losses, eager_jsa, eager = _compiled_run(case, False, 7)
    losses, jsa, compiled = _compiled_run(case, True, 7)
    assert losses == pytest.approx(eager_losses, rel=1e-10, abs=1e-10)
    _assert_same_state(eager, compiled)
    phases = 1 + (jsa.warmup_without_cache > 1)  # the first step is eager, then one per phase
    assert len(jsa._compiled.programs) == phases and not jsa._compiled.eager_keys
    if jsa.record_history:
        torch.testing.assert_close(jsa.history()["mu"], eager_jsa.history()["mu"])


def test_compiled_local_and_global_chains_equal_eager():
    """Local and global chains, two moves, the history recorded: each block's pass draws
    every site, independent draws that Inductor schedules in another order than eager unless
    the capture chains them; with the chain, the compiled steps are the eager ones."""
    eager_losses, _, eager = _compiled_run(_mixed_case, False, 5)
    losses, jsa, compiled = _compiled_run(_mixed_case, True, 5)
    assert losses == pytest.approx(eager_losses, rel=1e-10, abs=1e-10)
    _assert_same_state(eager, compiled)
    assert jsa._compiled.programs and not jsa._compiled.eager_keys


def test_compiled_resume_is_exact():
    """A compiled run stopped after 4 steps and resumed from its state (parameters, Adam
    state, chains, random state; not the program) takes the uninterrupted run's steps."""
    whole, _, end = _compiled_run(_global_case, True, 7)
    first, _, middle = _compiled_run(_global_case, True, 4)
    rest, _, resumed = _compiled_run(_global_case, True, 3, start=middle)
    assert first + rest == pytest.approx(whole, rel=1e-12, abs=1e-12)
    _assert_same_state(end, resumed, tol=1e-12)
