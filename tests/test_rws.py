"""ReweightedWakeSleep against closed forms: wake-θ is IWAE's θ-gradient, wake-φ's hand formula
per data point, its expectation zero at the exact posterior, training reaching the exact
posterior (Gaussian and discrete), sleep-φ's closed-form expected gradient, and the
difference from Pyro's batch-pooled ReweightedWakeSleep under subsampling."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer import ReweightedWakeSleep as PyroRWS

from pyro_fdiv.inference import IWAE, ReweightedWakeSleep

D = 2


def gaussian_model(x, subsample_size=None):
    """``z_i ~ N(mu, I)``, ``x_i ~ N(z_i, I)``; ``mu`` is the model's parameter θ."""
    mu = pyro.param("mu", torch.zeros(D))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])


def gaussian_guide(x, subsample_size=None, observations=None):
    """``q(z_i | x_i) = N(a x_i + c, exp(log_s)^2)``; the exact posterior (``mu = 0``) is
    ``a = 1/2, c = 0, exp(log_s) = sqrt(1/2)``."""
    a = pyro.param("a", torch.full((D,), 0.2))
    c = pyro.param("c", torch.full((D,), 0.3))
    log_s = pyro.param("log_s", torch.zeros(D))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        x_i = x[idx] if observations is None else observations["x"]
        pyro.sample("z", dist.Normal(a * x_i + c, log_s.exp()).to_event(1))


def _grads(names):
    store = pyro.get_param_store()
    grads = {n: store.get_param(n).unconstrained().grad.clone() for n in names}
    for n in names:
        store.get_param(n).unconstrained().grad = None
    return grads


def _data(n, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, D) * math.sqrt(2.0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_wake_theta_is_the_iwae_gradient_and_loss(vectorize):
    """Same draws (vectorized, or particles one after another): same loss, same θ-gradient."""
    x = _data(5)
    values, grads = [], []
    options = {"num_particles": 6, "vectorize_particles": vectorize}
    for objective in (IWAE(**options), ReweightedWakeSleep(**options)):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        values.append(objective.loss_and_grads(gaussian_model, gaussian_guide, x, 3))
        grads.append(_grads(["mu"])["mu"])
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)
    assert grads[0].abs().sum() > 1e-3


def test_wake_phi_is_the_per_data_point_formula_with_subsample_scale():
    """The guide's gradient is ``-(N/B) sum_i sum_k w_ki ∇φ log q(z_ki | x_i)``, the weights
    normalized over the K particles of each data point, for the draws in the trace."""
    n, b, k = 6, 3, 4
    x = _data(n)
    objective = ReweightedWakeSleep(num_particles=k, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    _, guide_trace = objective._get_trace(gaussian_model, gaussian_guide, (x, b), {})
    pyro.set_rng_seed(5)
    loss = objective.loss_and_grads(gaussian_model, gaussian_guide, x, b)
    grads = _grads(["a", "c", "log_s"])

    z = guide_trace.nodes["z"]["value"]  # (K, B, D)
    x_b = x[guide_trace.nodes["data"]["value"]]
    a, c, log_s = (pyro.param(n).detach().requires_grad_() for n in ("a", "c", "log_s"))
    log_q = dist.Normal(a * x_b + c, log_s.exp()).log_prob(z).sum(-1)
    log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z, 1.0).log_prob(x_b).sum(-1)
    log_w = log_p - log_q.detach()
    w_tilde = torch.softmax(log_w, 0)
    assert w_tilde.shape == (k, b)
    phi = -(n / b) * (w_tilde * log_q).sum()
    expected = torch.autograd.grad(phi, [a, c, log_s])
    for name, value in zip(("a", "c", "log_s"), expected, strict=True):
        torch.testing.assert_close(grads[name], value, rtol=0, atol=1e-10)
    iwae = -(n / b) * (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    assert loss == pytest.approx(iwae.item(), rel=1e-12)


def _exact_guide_params(a, c, s):
    pyro.clear_param_store()
    pyro.param("a", torch.full((D,), a))
    pyro.param("c", torch.full((D,), c))
    pyro.param("log_s", torch.full((D,), math.log(s)))


def test_wake_phi_expectation_vanishes_at_the_exact_posterior():
    """At q = p(z | x) every weight is p(x_i): the normalized weights are 1/K and the update
    (1/K) sum_k ∇ log q(z_k) has mean zero; its sum over N points has standard deviations
    sqrt(N/(K s^2)) (c), sqrt(sum x^2/(K s^2)) (a) and sqrt(2N/K) (log s) per dimension.
    A shifted guide's expected update is far from zero on the same scale."""
    n, k = 4000, 5
    x = _data(n)
    objective = ReweightedWakeSleep(num_particles=k, model_has_params=False)
    s2 = 0.5
    sd = {
        "a": (x.pow(2).sum(0) / (k * s2)).sqrt(),
        "c": torch.full((D,), math.sqrt(n / (k * s2))),
        "log_s": torch.full((D,), math.sqrt(2 * n / k)),
    }
    _exact_guide_params(0.5, 0.0, math.sqrt(s2))
    objective.loss_and_grads(gaussian_model, gaussian_guide, x)
    grads = _grads(sd)
    for name in sd:
        assert (grads[name].abs() < 4.5 * sd[name]).all(), (name, grads[name], sd[name])
    _exact_guide_params(0.5, 0.4, math.sqrt(s2))  # a shifted guide: pulled back towards c = 0
    objective.loss_and_grads(gaussian_model, gaussian_guide, x)
    assert (_grads(sd)["c"] > 10 * sd["c"]).all()


def test_wake_phi_trains_a_gaussian_guide_to_the_exact_posterior():
    x = _data(64)
    pyro.clear_param_store()
    objective = ReweightedWakeSleep(num_particles=10, model_has_params=False)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    svi = SVI(gaussian_model, gaussian_guide, optim, loss=objective)
    for _ in range(500):
        svi.step(x)
    # the posterior is a fixed point for any K; tolerance: the optimizer's noise at the end
    torch.testing.assert_close(pyro.param("a").detach(), torch.full((D,), 0.5), atol=0.05, rtol=0)
    torch.testing.assert_close(pyro.param("c").detach(), torch.zeros(D), atol=0.05, rtol=0)
    s = pyro.param("log_s").detach().exp()
    torch.testing.assert_close(s, torch.full((D,), math.sqrt(0.5)), atol=0.05, rtol=0)


PI, N_MIX = 0.4, 100


def mixture_model(x, subsample_size=None):
    """``z_i ~ Bernoulli(PI)``, ``x_i ~ N(2 z_i - 1, 1)``: the posterior logit is
    ``logit(PI) + 2 x_i``."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Bernoulli(PI))
        pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=x[idx])


def mixture_guide(x, subsample_size=None, a0=1.0, b0=0.0):
    a = pyro.param("a", torch.tensor(a0))
    b = pyro.param("b", torch.tensor(b0))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Bernoulli(logits=a + b * x[idx]))


def test_discrete_guide_converges_to_the_exact_posterior():
    torch.manual_seed(2)
    z = (torch.rand(N_MIX) < PI).double()
    x = 2 * z - 1 + torch.randn(N_MIX)
    svi = SVI(
        mixture_model,
        mixture_guide,
        pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}),
        loss=ReweightedWakeSleep(num_particles=5),
    )
    for _ in range(400):
        svi.step(x)
    exact = torch.sigmoid(math.log(PI / (1 - PI)) + 2 * x)
    fitted = torch.sigmoid(pyro.param("a") + pyro.param("b") * x).detach()
    assert (fitted - exact).abs().max() < 0.03
    assert pyro.param("a").item() == pytest.approx(math.log(PI / (1 - PI)), abs=0.1)
    assert pyro.param("b").item() == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("subsample_size", [None, 1])
def test_sleep_phi_expected_gradient_in_closed_form(subsample_size):
    """insomnia=0: the guide's gradient is -N E_p[∇ log q(z | x)] (a minibatch of one of
    N = 2 scaled by 2); at a, c, s = 1 per dimension E[∂a] = 1 - 2a, E[∂c] = -c,
    E[∂ log s] = 2a^2 - 2a + c^2 (x ~ N(0, 2), cov(z, x) = 1); no gradient reaches the model
    (model_has_params=False)."""
    n, a, c = 2, 0.2, 0.3
    x = _data(n)
    objective = ReweightedWakeSleep(
        num_particles=2, insomnia=0.0, model_has_params=False, num_sleep_particles=40000
    )
    objective.loss_and_grads(gaussian_model, gaussian_guide, x, subsample_size)
    grads = _grads(["a", "c", "log_s"])
    expected = {"a": 1 - 2 * a, "c": -c, "log_s": 2 * a * a - 2 * a + c * c}
    for name, value in expected.items():  # Monte Carlo standard errors below 0.015: 4 of them
        torch.testing.assert_close(grads[name], torch.full((D,), -n * value), atol=0.06, rtol=0)
    assert pyro.param("mu").unconstrained().grad is None


def test_insomnia_mixes_wake_and_sleep_exactly():
    """On the same draws (wake first, then sleep), insomnia=0.3 gives the guide 0.3 times
    wake-φ's gradient plus 0.7 times sleep-φ's, and the model wake-θ's in each case."""
    x = _data(3)
    grads = {}
    for insomnia in (1.0, 0.0, 0.3):
        pyro.clear_param_store()
        pyro.set_rng_seed(4)
        ReweightedWakeSleep(num_particles=3, insomnia=insomnia).loss_and_grads(
            gaussian_model, gaussian_guide, x
        )
        grads[insomnia] = _grads(["mu", "a", "c", "log_s"])
    for name in ("a", "c", "log_s"):
        mix = 0.3 * grads[1.0][name] + 0.7 * grads[0.0][name]
        torch.testing.assert_close(grads[0.3][name], mix, rtol=0, atol=1e-10)
        assert not torch.allclose(grads[1.0][name], grads[0.0][name])
    for insomnia in (0.0, 0.3):
        torch.testing.assert_close(grads[insomnia]["mu"], grads[1.0]["mu"], rtol=0, atol=1e-12)


def test_sleep_needs_a_guide_with_observations():
    def guide(x):
        gaussian_guide(x)

    with pytest.raises(ValueError, match="observations="):
        ReweightedWakeSleep(num_particles=2, insomnia=0.5).loss_and_grads(
            gaussian_model, guide, _data(3)
        )


def test_agrees_with_pyro_for_one_data_point():
    """One data point (B = N = 1): a batch of one has nothing to pool, so Pyro's RWS and this
    one are the same estimator: same loss, same gradients on the same draws."""
    x = _data(1)
    out = []
    for objective in (
        ReweightedWakeSleep(num_particles=5, max_plate_nesting=1),
        PyroRWS(num_particles=5, max_plate_nesting=1),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(6)
        loss = objective.loss_and_grads(gaussian_model, gaussian_guide, x)
        out.append((loss if isinstance(loss, float) else loss[0], _grads(["mu", "a", "c"])))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-12)
    for name in out[0][1]:
        torch.testing.assert_close(out[0][1][name], out[1][1][name], rtol=0, atol=1e-10)


N_SUB, B_SUB, K_SUB = 8, 4, 3
X_SUB = torch.linspace(-2.5, 2.5, N_SUB, dtype=torch.float64)


def sub_model(x):
    with pyro.plate("data", N_SUB, subsample_size=B_SUB) as idx:
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=x[idx])


def sub_guide(x):
    a = pyro.param("a", torch.tensor(1.0))
    b = pyro.param("b", torch.tensor(0.0))
    with pyro.plate("data", N_SUB, subsample_size=B_SUB) as idx:
        pyro.sample("z", dist.Bernoulli(logits=a + b * x[idx]))


def _expected_wake_phi(pooled: bool) -> torch.Tensor:
    r"""The exact expectation (over minibatches and draws, enumerated) of the wake-φ update
    in (a, b) at a = 1, b = 0: per data point (``pooled=False``, the full-data target
    :math:`\sum_i E[\sum_k \tilde w_{ki} \nabla \log q(z_{ki})]`, which a per-data-point
    minibatch estimate matches in expectation) or Pyro's, over the batch
    (:math:`\frac{N}{B} \sum_k \tilde W_k \sum_{i \in b} \nabla \log q(z_{ki})`,
    :math:`\log W_k = \frac{N}{B}\sum_{i \in b} \log w_{ki}`)."""
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.0, requires_grad=True)
    batches = (
        itertools.combinations(range(N_SUB), B_SUB) if pooled else ((i,) for i in range(N_SUB))
    )
    batches = list(batches)
    size, scale = (B_SUB, N_SUB / B_SUB) if pooled else (1, 1.0)
    z = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K_SUB * size)))
    z = z.reshape(-1, K_SUB, size)
    total = torch.zeros(())
    for batch in batches:
        x = X_SUB[list(batch)].expand(z.shape)
        log_q = dist.Bernoulli(logits=a + b * x).log_prob(z).sum(-1)  # (configs, K)
        log_p = (dist.Bernoulli(0.5).log_prob(z) + dist.Normal(2 * z - 1, 1.0).log_prob(x)).sum(-1)
        prob = log_q.sum(-1).exp().detach()
        w_tilde = torch.softmax(scale * (log_p - log_q).detach(), -1)
        total = total + (prob * (w_tilde * scale * log_q).sum(-1)).sum()
    total = total / len(batches) if pooled else total
    return torch.stack(torch.autograd.grad(total, [a, b]))


def _monte_carlo_wake_phi(objective, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    draws = []
    for _ in range(runs):
        objective.loss_and_grads(sub_model, sub_guide, X_SUB)
        grads = _grads(["a", "b"])
        draws.append(-torch.stack([grads["a"], grads["b"]]))
    draws = torch.stack(draws)
    return draws.mean(0), draws.std(0) / math.sqrt(runs)


def test_subsampling_per_data_point_is_unbiased_and_pyros_pooled_is_not():
    """N = 8, minibatches of B = 4, K = 3, a discrete guide away from the posterior. The
    full-data per-data-point wake-φ target is (-0.642, 2.940) in (a, b); Pyro's RWS, which
    normalizes over the batch with weights tempered by N/B, has expectation (-0.512, 2.239)
    (both enumerated exactly). 800 steps of each estimator, in this test, match their own
    expectation within 4 standard errors, and Pyro's misses the target by more than 4."""
    target, pooled = _expected_wake_phi(pooled=False), _expected_wake_phi(pooled=True)
    assert (target - pooled)[1] > 0.5
    ours, ours_se = _monte_carlo_wake_phi(ReweightedWakeSleep(K_SUB, max_plate_nesting=1), 800)
    pyros, pyros_se = _monte_carlo_wake_phi(PyroRWS(K_SUB, max_plate_nesting=1), 800)
    assert ((ours - target).abs() < 4 * ours_se).all(), (ours, target, ours_se)
    assert ((pyros - pooled).abs() < 4 * pyros_se).all(), (pyros, pooled, pyros_se)
    assert (target - pyros)[1] > 4 * pyros_se[1], (pyros, target, pyros_se)


def test_loss_is_the_iwae_bound_scaled_under_subsampling():
    x = _data(10)
    losses = []
    for objective in (IWAE(num_particles=4), ReweightedWakeSleep(num_particles=4)):
        pyro.set_rng_seed(8)
        losses.append(objective.loss(gaussian_model, gaussian_guide, x, 5))
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)


def global_model(x):
    """A global latent ``theta`` outside the subsampled data plate."""
    theta = pyro.sample("theta", dist.Normal(pyro.param("mu", torch.zeros(())), 1.0))
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        z = pyro.sample("z", dist.Normal(theta, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def global_guide(x):
    loc = pyro.param("loc", torch.tensor(0.3))
    theta = pyro.sample("theta", dist.Normal(loc, 0.8))
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        pyro.sample("z", dist.Normal(0.5 * (x[idx] + theta), pyro.param("s", torch.tensor(0.9))))


def test_global_latents_error_or_nested():
    x = _data(5)[:, 0]
    with pytest.raises(ValueError, match="plate 'data' is subsampled"):
        ReweightedWakeSleep(num_particles=3, global_latents="error").loss(
            global_model, global_guide, x
        )
    out = []
    for objective in (IWAE(num_particles=3), ReweightedWakeSleep(num_particles=3)):
        pyro.clear_param_store()
        pyro.set_rng_seed(9)
        with pytest.warns(UserWarning, match="nested"):
            loss = objective.loss_and_grads(global_model, global_guide, x)
        out.append((loss, _grads(["mu", "loc", "s"])))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-12)
    torch.testing.assert_close(out[1][1]["mu"], out[0][1]["mu"], rtol=0, atol=1e-10)
    assert out[1][1]["loc"].abs() > 0 and out[1][1]["s"].abs() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_particles": 1}, "num_particles >= 2"),
        ({"num_particles": 0}, "num_particles to be an integer"),
        ({"insomnia": 1.5}, r"insomnia in \[0, 1\]"),
        ({"insomnia": -0.1}, r"insomnia in \[0, 1\]"),
        ({"insomnia": True}, r"insomnia in \[0, 1\]"),
        ({"num_sleep_particles": 0}, "num_sleep_particles"),
        ({"model_has_params": 1}, "model_has_params"),
        ({"num_local_particles": 3}, "num_local_particles=1"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReweightedWakeSleep(**kwargs)


def test_global_latents_nested_wake_phi_formula():
    """Nested weights, one per particle of the global latent: the guide's gradient is
    ``-sum_k W_k ∇φ [log q(θ_k) + (N/B) sum_i log q(z_ik | x_i, θ_k)]``, ``W`` normalized from
    ``log p(θ_k)/q(θ_k) + (N/B) sum_i log w_ik``."""
    n, k = 5, 3
    x = _data(n)[:, 0]
    objective = ReweightedWakeSleep(num_particles=k, max_plate_nesting=1)
    pyro.set_rng_seed(10)
    _, guide_trace = objective._get_trace(global_model, global_guide, (x,), {})
    pyro.set_rng_seed(10)
    with pytest.warns(UserWarning, match="nested"):
        objective.loss_and_grads(global_model, global_guide, x)
    grads = _grads(["loc", "s"])
    theta = guide_trace.nodes["theta"]["value"]  # (K, 1)
    z = guide_trace.nodes["z"]["value"]  # (K, 2)
    x_b = x[guide_trace.nodes["data"]["value"]]
    loc, s = (pyro.param(n).detach().requires_grad_() for n in ("loc", "s"))
    scale = n / 2
    log_q = dist.Normal(loc, 0.8).log_prob(theta).sum(-1) + scale * dist.Normal(
        0.5 * (x_b + theta), s
    ).log_prob(z).sum(-1)
    log_p = dist.Normal(0.0, 1.0).log_prob(theta).sum(-1) + scale * (
        dist.Normal(theta, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x_b)
    ).sum(-1)
    w_tilde = torch.softmax(log_p - log_q.detach(), 0)
    expected = torch.autograd.grad(-(w_tilde * log_q).sum(), [loc, s])
    torch.testing.assert_close(grads["loc"], expected[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads["s"], expected[1], rtol=0, atol=1e-10)
