"""The f-divergence joint upper bound and the f-GAN lower bound against exact answers."""

import contextlib
import copy
import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from closed_form import linear_gaussian_model
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_fdiv.divergences import get_divergence
from pyro_fdiv.inference import FDivergenceBound, FGANBound, SpreadSchedule
from pyro_fdiv.inference.spread import PCAProjection, pca_spread_log_density, spread_log_density
from pyro_fdiv.models.toy import BivariateGaussian

TARGET = dist.Normal(torch.tensor(0.5), torch.tensor(0.8))
GRID = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)


def true_divergence(f: str, mu: float, sigma: float, target=TARGET) -> float:
    """D_f(target || N(mu, sigma^2)) by quadrature."""
    log_p = target.log_prob(GRID)
    log_q = dist.Normal(mu, sigma).log_prob(GRID)
    return torch.trapezoid(log_q.exp() * get_divergence(f).f(log_p - log_q), GRID).item()


def joint(b=-0.3, a=0.9, s=0.6):
    torch.manual_seed(0)
    net = BivariateGaussian().double()
    with torch.no_grad():
        net.joint["b"].fill_(b)
        net.joint["a"].fill_(a)
        net.joint["log_s"].fill_(math.log(s))
    return net


def exact_guide_of(net):
    """The exact posterior p(z | x) of the bivariate Gaussian: the bound is tight."""

    def guide(x):
        b, a = net.joint["b"], net.joint["a"]
        s2 = net.joint["log_s"].exp() ** 2
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * (x - b) / (a**2 + s2), (s2 / (a**2 + s2)).sqrt()))

    return guide


def poor_guide_of(net):
    """The exact posterior shifted by 0.5 and 1.4 times wider: a loose bound."""

    def guide(x):
        b, a = net.joint["b"], net.joint["a"]
        s2 = net.joint["log_s"].exp() ** 2
        loc, scale = a * (x - b) / (a**2 + s2) + 0.5, 1.4 * (s2 / (a**2 + s2)).sqrt()
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, scale))

    return guide


def bound_and_se(objective, model, guide, batch):
    terms, _ = objective._terms(model, guide, (batch,), {})
    terms = terms.detach()
    return terms.mean().item(), terms.std().item() / math.sqrt(terms.numel())


FS = ["forward_kl", "reverse_kl", "js", "squared_hellinger", "pearson_chi2"]


@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("sample_from", ["model", "data"])
def test_bound_is_tight_at_the_exact_posterior(f, sample_from):
    net = joint()
    objective = FDivergenceBound(f, data=TARGET, sample_from=sample_from)
    batch = torch.zeros(200_000)
    value, se = bound_and_se(objective, net.model, exact_guide_of(net), batch)
    exact = true_divergence(f, net.mu, net.sigma)
    assert abs(value - exact) < 4 * se + 1e-3, (value, exact, se)


@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("sample_from", ["model", "data"])
def test_bound_is_never_below_the_divergence(f, sample_from):
    net = joint()
    objective = FDivergenceBound(f, data=TARGET, sample_from=sample_from)
    value, se = bound_and_se(objective, net.model, poor_guide_of(net), torch.zeros(100_000))
    exact = true_divergence(f, net.mu, net.sigma)
    assert value - exact > 4 * se, (value, exact, se)  # a loose encoder: clearly above


def test_bound_with_a_random_encoder_is_above_the_divergence():
    net = joint()
    for f in FS:
        objective = FDivergenceBound(f, data=TARGET)
        value, se = bound_and_se(objective, net.model, net.guide, torch.zeros(100_000))
        assert value > true_divergence(f, net.mu, net.sigma) - 4 * se, f


@pytest.mark.parametrize("sample_from", ["model", "data"])
def test_importance_weighted_bound_is_tight_at_the_exact_posterior(sample_from):
    net = joint()
    for f in ["forward_kl", "js"]:
        objective = FDivergenceBound(
            f, data=TARGET, sample_from=sample_from, num_importance_samples=4
        )
        value, se = bound_and_se(objective, net.model, exact_guide_of(net), torch.zeros(50_000))
        assert abs(value - true_divergence(f, net.mu, net.sigma)) < 4 * se + 1e-3, f


@pytest.mark.parametrize("f", FS)
def test_importance_weighted_bound_tightens_and_both_sides_agree(f):
    """K = 8 latents per y: still above the divergence, below the K = 1 bound, and the same
    expectation whether sampled from the model or from the data."""
    net = joint()
    guide, batch = poor_guide_of(net), torch.zeros(100_000)
    exact = true_divergence(f, net.mu, net.sigma)
    one, one_se = bound_and_se(FDivergenceBound(f, data=TARGET), net.model, guide, batch)
    values = {}
    for side in ["model", "data"]:
        objective = FDivergenceBound(f, data=TARGET, sample_from=side, num_importance_samples=8)
        values[side] = bound_and_se(objective, net.model, guide, batch)
    (model_value, model_se), (data_value, data_se) = values["model"], values["data"]
    assert abs(model_value - data_value) < 4 * math.hypot(model_se, data_se) + 1e-3
    assert model_value - exact > -4 * model_se
    assert one - model_value > 4 * math.hypot(one_se, model_se), (one, model_value, exact)


def test_forward_kl_with_k_latents_is_the_negative_iwae_bound_on_noisy_data():
    torch.manual_seed(3)
    data, sigma, num_samples = torch.randn(40, 2) * 1.5, 0.7, 5
    loc = nn.Linear(2, 2).double()

    def guide(x):
        pyro.module("loc", loc)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc(x), 0.8).to_event(1))

    objective = FDivergenceBound(
        "forward_kl", data=data, spread=sigma, num_particles=3, num_importance_samples=5
    )
    batch = data[:10]
    pyro.set_rng_seed(11)
    bound = objective.loss(linear_gaussian_model, guide, batch)

    pyro.set_rng_seed(11)  # the same draws: y per particle and row, then 5 latents per y
    y = batch.repeat(3, 1) + sigma * torch.randn(30, 2, dtype=batch.dtype)
    z = poutine.trace(guide).get_trace(y.repeat(num_samples, 1)).nodes["z"]["value"]
    z = z.reshape(num_samples, 30, 2)
    with torch.no_grad():
        log_w = (
            dist.Normal(z, sigma).log_prob(y).sum(-1)
            + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            - dist.Normal(loc(y), 0.8).log_prob(z).sum(-1)
        )
    iwae = (log_w.logsumexp(0) - math.log(num_samples)).mean()
    expected = -iwae + spread_log_density(y, data, sigma).mean()
    assert bound == pytest.approx(expected.item(), rel=1e-12)


def test_forward_kl_is_the_negative_elbo_on_noisy_data_plus_a_constant():
    torch.manual_seed(3)
    data = torch.randn(40, 2) * 1.5
    sigma = 0.7
    loc = nn.Linear(2, 2).double()

    def guide(x):
        pyro.module("loc", loc)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc(x), 0.8).to_event(1))

    def noisy_model(y):  # the model with the spread width as its observation scale
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, sigma).to_event(1), obs=y)

    objective = FDivergenceBound("forward_kl", data=data, spread=sigma, num_particles=1)
    assert objective.sample_from == "data"
    batch = data[:10]
    pyro.set_rng_seed(11)
    bound = objective.differentiable_loss(linear_gaussian_model, guide, batch)
    (grad,) = torch.autograd.grad(bound, loc.weight)

    pyro.set_rng_seed(11)
    y = batch + sigma * torch.randn_like(batch)
    elbo = Trace_ELBO().differentiable_loss(noisy_model, guide, y)
    expected = elbo / len(batch) + spread_log_density(y, data, sigma).mean()
    (expected_grad,) = torch.autograd.grad(expected, loc.weight)
    assert bound.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-10)


def test_extreme_log_ratios_stay_finite():
    """A model 100 standard deviations from a narrow target: log ratios of order -1e8."""
    net = joint(b=0.0, a=0.5, s=0.5)
    far = dist.Normal(torch.tensor(100.0), torch.tensor(0.01))
    guide = exact_guide_of(net)
    batch = torch.zeros(20_000)
    kl = FDivergenceBound("reverse_kl", data=far)
    value, se = bound_and_se(kl, net.model, guide, batch)
    exact = torch.distributions.kl_divergence(dist.Normal(net.mu, net.sigma), far).item()
    assert exact > 1e7 and abs(value - exact) < 4 * se + 1e-6 * exact
    js = FDivergenceBound("js", data=far)
    loss = js.differentiable_loss(net.model, guide, batch)
    assert loss.item() == pytest.approx(0.5 * math.log(2), abs=1e-12)  # f(0) = log(2)/2
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.joint.values())
    for f in FS:
        for side in ("model", "data"):
            objective = FDivergenceBound(f, data=far, sample_from=side)
            terms, _ = objective._terms(net.model, guide, (batch,), {})
            assert not terms.isnan().any(), (f, side)
            if torch.isinf(terms).any():  # only where the exact value exceeds the dtype:
                assert (f, side) == ("pearson_chi2", "data")  # E_P[(q/p - 1)^2 p/q], p/q~e^-5000
                with pytest.raises(ValueError, match="overflowed"):
                    objective.loss(net.model, guide, batch)


def test_exact_spread_density_matches_a_dense_logsumexp(monkeypatch):
    from pyro_fdiv.inference import spread

    monkeypatch.setattr(spread, "CHUNK_ELEMENTS", 7)  # many chunks
    torch.manual_seed(0)
    data = torch.randn(23, 3)
    y = torch.randn(4, 5, 3, requires_grad=True)
    value = spread_log_density(y, data, 0.7)
    dense = dist.Normal(data, 0.7).log_prob(y[..., None, :]).sum(-1).logsumexp(-1) - math.log(23)
    assert torch.allclose(value, dense, atol=1e-12)
    (g1,) = torch.autograd.grad(value.sum(), y)
    (g2,) = torch.autograd.grad(dense.sum(), y)
    assert torch.allclose(g1, g2, atol=1e-12)
    # far from every point: finite value and gradient (-|y - x|^2 / 2 sigma^2 ~ -1e6)
    far = torch.full((2, 3), 1e3, requires_grad=True)
    value = spread_log_density(far, data, 0.7)
    (grad,) = torch.autograd.grad(value.sum(), far)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert value.max() < -1e6


@pytest.mark.parametrize("pca_dim", [3, 2])
def test_pca_gradient_agrees_with_the_exact_one_on_average(pca_dim):
    torch.manual_seed(1)
    # data in a 3-D subspace of R^6: a 3-dim PCA is exact, a 2-dim one is an approximation
    basis = torch.linalg.qr(torch.randn(6, 3))[0]
    data = torch.randn(300, 3) @ torch.diag(torch.tensor([2.0, 1.0, 0.05])) @ basis.T
    y = (data[:8] + 0.3 * torch.randn(8, 6)).requires_grad_()
    projection = PCAProjection(data, pca_dim)
    (exact,) = torch.autograd.grad(spread_log_density(y, data, 0.5).sum(), y)
    draws = torch.stack(
        [
            torch.autograd.grad(pca_spread_log_density(y, data, 0.5, projection, 10).sum(), y)[0]
            for _ in range(400)
        ]
    )
    se = draws.std(0) / math.sqrt(len(draws))
    error = (draws.mean(0) - exact).abs()
    if pca_dim == 3:
        assert (error < 4.5 * se + 1e-9).all()
        value = pca_spread_log_density(y, data, 0.5, projection)
        assert torch.allclose(value, spread_log_density(y, data, 0.5), atol=1e-10)
    else:  # the third direction has variance 0.05^2 << sigma^2: a small bias
        assert (error < 0.05 * exact.abs().max()).all()


def test_pca_bound_gradient_agrees_with_the_exact_bound():
    torch.manual_seed(2)
    data = torch.randn(200, 2)
    decoder = nn.Linear(2, 2).double()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 0.8).to_event(1))

    grads = {}
    for mode in ("exact", "pca"):
        objective = FDivergenceBound(
            "reverse_kl", data=data, spread=0.5, num_particles=50, log_density=mode, pca_dim=2
        )
        draws = []
        for seed in range(60):
            pyro.set_rng_seed(seed)
            loss = objective.differentiable_loss(model, guide, data[:20])
            draws.append(torch.autograd.grad(loss, decoder.weight)[0])
        grads[mode] = torch.stack(draws)
    diff = grads["pca"] - grads["exact"]  # same seeds: same samples up to the n draws
    assert (diff.mean(0).abs() < 4 * diff.std(0) / math.sqrt(len(diff)) + 1e-9).all()
    assert grads["exact"].mean(0).abs().max() > 10 * diff.mean(0).abs().max()


def test_pca_projection_is_a_module_whose_buffers_round_trip():
    torch.manual_seed(3)
    projection = PCAProjection(torch.randn(40, 3), 2)
    assert isinstance(projection, nn.Module)
    assert dict(projection.named_buffers()).keys() == {"mean", "basis", "projected"}
    other = PCAProjection(torch.randn(40, 3), 2)
    other.load_state_dict(projection.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(other.buffers(), projection.buffers(), strict=True)
    )
    assert all(t.dtype == torch.float32 for t in projection.float().buffers())


def test_dtype_moves_of_the_bound_reach_the_pca_projection_and_its_state_round_trips():
    """Regression: the PCA projection was a plain object that the objective's .to() / .double()
    (and so a float32 or CUDA model) never reached."""
    torch.manual_seed(3)
    data = torch.randn(40, 2)

    def make():
        return FDivergenceBound(
            "reverse_kl",
            data=data,
            spread=SpreadSchedule(1.0, 0.5, 4),
            num_particles=2,
            log_density="pca",
            pca_dim=2,
            guide_steps=1,
        )

    objective = make()
    assert objective.to(torch.float32) is objective
    assert objective.data.points.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in objective.projection.buffers())
    torch.set_default_dtype(torch.float32)  # conftest restores float64
    model, guide = _decoder_model(), _linear_guide()
    model.decoder.float(), guide.encoder.float()
    batches = data.float()
    losses, optim = _svi_run(objective, model, guide, batches, 2)
    assert all(math.isfinite(v) for v in losses)
    assert model.decoder.weight.grad.dtype == torch.float32
    # the state (schedule, guide optimizer) round-trips into a fresh objective moved alike
    saved = copy.deepcopy(
        {
            "params": pyro.get_param_store().get_state(),
            "optim": optim.get_state(),
            "objective": objective.state_dict(),
            "rng": pyro.util.get_rng_state(),
        }
    )
    expected, _ = _svi_run(objective, model, guide, batches, 2, optim, start=2)
    pyro.get_param_store().set_state(saved["params"])
    resumed = make().float()
    resumed.load_state_dict(saved["objective"])
    assert resumed.schedule.t == 2
    optim = pyro.optim.Adam({"lr": 0.01})
    optim.set_state(saved["optim"])
    pyro.util.set_rng_state(saved["rng"])
    got, _ = _svi_run(resumed, model, guide, batches, 2, optim, start=2)
    assert got == expected
    resumed.double()
    assert resumed.data.points.dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in resumed.projection.buffers())


def test_spread_schedule_and_state():
    schedule = SpreadSchedule(1.0, 0.1, 4)
    sigmas = []
    for _ in range(6):
        sigmas.append(schedule.sigma)
        schedule.step()
    expected = [1.0, 0.1**0.25, 0.1**0.5, 0.1**0.75, 0.1, 0.1]
    assert sigmas == pytest.approx(expected, rel=1e-12)
    fresh = SpreadSchedule(1.0, 0.1, 4)
    fresh.load_state_dict(schedule.state_dict())
    assert fresh.sigma == schedule.sigma and fresh.t == 6
    assert SpreadSchedule(0.5).sigma == 0.5
    for bad in (0.0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="spread start"):
            SpreadSchedule(bad)
    with pytest.raises(ValueError, match="num_steps"):
        SpreadSchedule(1.0, 0.1, 0)


def test_loss_changes_nothing_and_loss_and_grads_advances_the_schedule():
    data = torch.randn(30, 2)
    objective = FDivergenceBound(
        "reverse_kl", data=data, spread=SpreadSchedule(1.0, 0.5, 10), num_particles=2
    )
    guide = _linear_guide()
    for _ in range(3):
        objective.loss(linear_gaussian_model, guide, data[:5])
    assert objective.schedule.t == 0
    objective.loss_and_grads(linear_gaussian_model, guide, data[:5])
    assert objective.schedule.t == 1 and objective.sigma == pytest.approx(0.5**0.1)


def _linear_guide():
    torch.manual_seed(0)
    encoder = nn.Linear(2, 2).double()

    def guide(x):
        pyro.module("encoder", encoder, update_module_params=True)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(encoder(x), 0.9).to_event(1))

    guide.encoder = encoder
    return guide


def _decoder_model():
    torch.manual_seed(1)
    decoder = nn.Linear(2, 2).double()

    def model(x):
        pyro.module("decoder", decoder, update_module_params=True)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    model.decoder = decoder
    return model


def test_guide_steps_update_the_guide_and_route_the_model_gradient():
    data = torch.randn(30, 2)
    model, guide = _decoder_model(), _linear_guide()
    objective = FDivergenceBound(
        "js", data=data, spread=0.5, guide_steps=3, guide_optim=pyro.optim.Adam({"lr": 0.05})
    )
    enc_before = guide.encoder.weight.detach().clone()
    dec_before = model.decoder.weight.detach().clone()
    objective.loss_and_grads(model, guide, data[:6])
    assert not torch.equal(guide.encoder.weight, enc_before)  # three guide updates
    assert guide.encoder.weight.grad is None  # none left for SVI's optimizer
    assert torch.equal(model.decoder.weight, dec_before)  # the model is SVI's to update
    assert model.decoder.weight.grad is not None and model.decoder.weight.grad.abs().sum() > 0
    # the inner optimizer's state is the objective's state
    state = objective.state_dict()
    assert state["guide_optim"] and state["schedule"] == {"t": 1}


@pytest.mark.parametrize("guide_f", [None, "reverse_kl", "forward_kl"])
def test_guide_steps_minimize_the_bound_of_guide_f(guide_f):
    """One SGD guide step moves the encoder by -lr times the gradient of guide_f's bound (the
    same draws), on its own side: the model for reverse KL, the data for forward KL."""
    data = torch.randn(30, 2)
    model, guide = _decoder_model(), _linear_guide()
    objective = FDivergenceBound(
        "js",
        data=data,
        spread=0.5,
        num_particles=4,
        guide_steps=1,
        guide_optim=pyro.optim.SGD({"lr": 0.1}),
        guide_f=guide_f,
    )
    side = {None: "model", "reverse_kl": "model", "forward_kl": "data"}[guide_f]
    assert objective.guide_sample_from == side
    reference = FDivergenceBound(guide_f or "js", data=data, spread=0.5, num_particles=4)
    assert reference.sample_from == side
    before = guide.encoder.weight.detach().clone()
    pyro.set_rng_seed(5)
    (grad,) = torch.autograd.grad(
        reference.differentiable_loss(model, guide, data[:6]), guide.encoder.weight
    )
    pyro.set_rng_seed(5)
    objective.loss_and_grads(model, guide, data[:6])
    assert torch.allclose(guide.encoder.weight - before, -0.1 * grad, atol=1e-6)


def _svi_run(objective, model, guide, data, steps, optim=None, start=0):
    optim = optim or pyro.optim.Adam({"lr": 0.01})
    svi = SVI(model, guide, optim, loss=objective)
    batches = [data[i % 3 * 5 : i % 3 * 5 + 5] for i in range(start, start + steps)]
    return [svi.step(batch) for batch in batches], optim


def test_state_round_trip_resumes_exactly():
    data = torch.randn(15, 2)

    def make():
        return FDivergenceBound(
            "js",
            data=data,
            spread=SpreadSchedule(1.0, 0.2, 6),
            num_particles=3,
            guide_steps=2,
            guide_optim=pyro.optim.Adam({"lr": 0.02}),
        )

    model, guide = _decoder_model(), _linear_guide()
    objective = make()
    _, optim = _svi_run(objective, model, guide, data, 3)
    buffer = io.BytesIO()  # a checkpoint, as a file would hold it
    torch.save(
        {
            "params": pyro.get_param_store().get_state(),
            "optim": optim.get_state(),
            "objective": objective.state_dict(),
            "rng": pyro.util.get_rng_state(),
        },
        buffer,
    )
    expected, _ = _svi_run(objective, model, guide, data, 3, optim, start=3)
    # a fresh objective, model, guide and param store from the saved state
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    pyro.clear_param_store()
    model, guide = _decoder_model(), _linear_guide()
    pyro.get_param_store().set_state(saved["params"])
    resumed = make()
    resumed.load_state_dict(saved["objective"])
    optim = pyro.optim.Adam({"lr": 0.01})
    optim.set_state(saved["optim"])
    pyro.util.set_rng_state(saved["rng"])
    got, _ = _svi_run(resumed, model, guide, data, 3, optim, start=3)
    assert got == expected
    assert resumed.schedule.t == 6


def test_training_set_with_the_batch_of_a_distribution_side():
    # a training set with spread: model-side bound, the PCA estimator and every f run in SVI
    data = torch.randn(50, 2)
    for f, mode in (("reverse_kl", "pca"), ("reverse_kl", "exact"), ("js", "exact")):
        model, guide = _decoder_model(), _linear_guide()
        objective = FDivergenceBound(f, data=data, spread=0.5, num_particles=4, log_density=mode)
        losses, _ = _svi_run(objective, model, guide, data, 4)
        assert all(math.isfinite(v) for v in losses)


def test_bad_input_raises_clear_errors():
    data = torch.randn(20, 2)
    model, guide = _decoder_model(), _linear_guide()
    with pytest.raises(ValueError, match="needs spread noise"):
        FDivergenceBound("js", data=data)
    with pytest.raises(ValueError, match="pass spread=None"):
        FDivergenceBound("js", data=TARGET, spread=0.5)
    with pytest.raises(ValueError, match="training set tensor"):
        FDivergenceBound("js", data=[1.0, 2.0], spread=0.5)
    with pytest.raises(ValueError, match="sample_from"):
        FDivergenceBound("js", data=data, spread=0.5, sample_from="both")
    with pytest.raises(ValueError, match="log_density='pca'"):
        FDivergenceBound("forward_kl", data=data, spread=0.5, log_density="pca")
    with pytest.raises(ValueError, match="guide_steps"):
        FDivergenceBound("js", data=data, spread=0.5, guide_steps=-1)
    with pytest.raises(ValueError, match="Unknown divergence"):
        FDivergenceBound("renyi", data=data, spread=0.5)
    with pytest.raises(ValueError, match="pass guide_steps >= 1"):
        FDivergenceBound("js", data=data, spread=0.5, guide_f="reverse_kl")
    with pytest.raises(ValueError, match="use guide_f='reverse_kl'"):
        FDivergenceBound(data=data, spread=0.5, log_density="pca", guide_steps=1, guide_f="js")
    with pytest.raises(ValueError, match="num_importance_samples"):
        FDivergenceBound("js", data=data, spread=0.5, num_importance_samples=0)

    def bernoulli_model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z).to_event(1), obs=x)

    objective = FDivergenceBound("js", data=data.gt(0).double(), spread=0.5)
    with pytest.raises(ValueError, match="Observation site 'x' has distribution Independent"):
        objective.loss(bernoulli_model, guide, data[:4].gt(0).double())

    objective = FDivergenceBound("js", data=torch.randn(20, 3), spread=0.5)
    with pytest.raises(ValueError, match=r"rows have shape \(3,\).*'x' has rows of shape \(2,\)"):
        objective.loss(model, guide, data[:4])

    objective = FDivergenceBound("js", data=data, spread=0.5, data_arg="batch")
    with pytest.raises(ValueError, match="data_arg='batch'"):
        objective.loss(model, guide, data[:4])

    def global_model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(w * torch.ones(2), 1.0).to_event(1), obs=x)

    def global_guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    objective = FDivergenceBound("js", data=data, spread=0.5)
    with pytest.raises(ValueError, match="one data plate"):
        objective.loss(global_model, global_guide, data[:4])

    def discrete_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))

    objective = FDivergenceBound("forward_kl", data=data, spread=0.5)
    with pytest.raises(NotImplementedError, match="'z' from the guide"):
        objective.loss(model, discrete_guide, data[:4])


def test_keyword_data_argument():
    data = torch.randn(20, 2)

    def model(scale, batch=None):
        with pyro.plate("data", len(batch)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), scale).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=batch)

    def guide(scale, batch=None):
        with pyro.plate("data", len(batch)):
            pyro.sample("z", dist.Normal(batch / 2, 0.7).to_event(1))

    objective = FDivergenceBound("reverse_kl", data=data, spread=0.5, data_arg="batch")
    pyro.set_rng_seed(0)
    a = objective.loss(model, guide, 1.0, batch=data[:5])
    pyro.set_rng_seed(0)
    b = FDivergenceBound("reverse_kl", data=data, spread=0.5).loss(
        lambda x: model(1.0, batch=x), lambda x: guide(1.0, batch=x), data[:5]
    )
    assert a == b and math.isfinite(a)


@pytest.mark.parametrize("f", ["reverse_kl", "forward_kl"])  # model side, data side
@pytest.mark.parametrize("training_set", [False, True])
def test_a_plate_nested_in_the_data_plate_is_part_of_the_row(f, training_set):
    # rows of shape (3, 2): an inner plate of 3 around the latent and the observation gives the
    # same bound as declaring the whole row an event (the inner plate is summed per row)
    decoder = nn.Linear(2, 2).double()
    encoder = nn.Linear(2, 2).double()

    def make(nested: bool):
        def rows():
            return pyro.plate("inner", 3, dim=-1) if nested else contextlib.nullcontext()

        event = 1 if nested else 2

        def model(x):
            pyro.module("decoder", decoder)
            with pyro.plate("data", len(x), dim=-2 if nested else -1), rows():
                z = pyro.sample("z", dist.Normal(torch.zeros_like(x[0]), 1.0).to_event(event))
                pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(event), obs=x)

        def guide(x):
            pyro.module("encoder", encoder)
            with pyro.plate("data", len(x), dim=-2 if nested else -1), rows():
                pyro.sample("z", dist.Normal(encoder(x), 0.8).to_event(event))

        return model, guide

    data = torch.randn(10, 3, 2)
    target = dist.Normal(torch.zeros(3, 2), 1.5).to_event(2)
    kwargs = {"data": data, "spread": 0.7} if training_set else {"data": target}
    values, grads = [], []
    for nested in (True, False):
        model, guide = make(nested)
        objective = FDivergenceBound(f, num_particles=3, **kwargs)
        pyro.set_rng_seed(4)
        loss = objective.differentiable_loss(model, guide, data[:4])
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, [decoder.weight, encoder.weight]))
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10)


def test_structure_errors_name_the_sites_and_the_users_batch():
    target = dist.Normal(torch.zeros(2), 1.5).to_event(1)
    batch = torch.randn(4, 2)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def per_point_guide(x):  # a fitted posterior of this batch, not an encoder
        loc = pyro.param("loc", torch.zeros(4, 2))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    objective = FDivergenceBound("forward_kl", data=target, num_particles=3)
    match = (
        r"(?s)num_particles=3 stacked copies of the batch \(4 rows -> 12\).*site z.*amortized.*"
        r"posterior-inference objective \(IWAE, BlackBoxAlpha\)"
    )
    with pytest.raises(ValueError, match=match):
        objective.loss(model, per_point_guide, batch)

    def fixed_model(x):  # a data plate of a fixed size: num_particles would be ignored
        with pyro.plate("data", 4):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 1.0).to_event(1))

    objective = FDivergenceBound("reverse_kl", data=target, num_particles=3)
    with pytest.raises(ValueError, match=r"\(4 rows -> 12\).*drew shape \(4, 2\).*len\(x\)"):
        objective.loss(fixed_model, guide, batch)

    def unplated_model(x):  # the batch is one event: no term per row
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(2), obs=x)

    def unplated_guide(x):
        pyro.sample("z", dist.Normal(x / 2, 1.0).to_event(2))

    with pytest.raises(ValueError, match=r"observation 'x' inside a data plate over the batch"):
        FDivergenceBound("reverse_kl", data=target).loss(unplated_model, unplated_guide, batch)


def test_only_failures_of_the_stacked_batch_are_explained_as_such():
    # the decision is by shapes: does the same run succeed on the batch as given (unstacked)?
    target = dist.Normal(torch.zeros(2), 1.5).to_event(1)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def failing_guide(x):  # fails whatever the batch: Pyro's error, passed on as it is
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    objective = FDivergenceBound("forward_kl", data=target, num_particles=3, max_plate_nesting=1)
    with pytest.raises(ValueError, match=r"^Model and guide shapes disagree at site 'z'"):
        objective.loss(model, failing_guide, torch.randn(4, 2))

    def fixed_subsample_guide(x):  # subsamples the stacked copies: refused by name, not wrapped
        with pyro.plate("data", len(x), subsample_size=4):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"^FDivergenceBound: plate 'data' is subsampled"):
        objective.loss(model, fixed_subsample_guide, torch.randn(4, 2))


def test_the_data_side_is_one_interface():
    from pyro_fdiv.inference.data_density import DensityData, EmpiricalData, as_data_density

    data = torch.randn(20, 2)
    empirical = as_data_density(data, 0.5)
    assert isinstance(empirical, EmpiricalData) and empirical.can_sample
    assert empirical.sigma == 0.5 and empirical.schedule.sigma == 0.5
    batch = data[:4]
    pyro.set_rng_seed(0)
    y = empirical.sample_like(batch)  # the batch is the sample of the training set: add noise
    pyro.set_rng_seed(0)
    assert torch.equal(y, batch + 0.5 * torch.randn_like(batch))
    assert torch.equal(empirical.log_prob(y), spread_log_density(y, data, 0.5))
    with pytest.raises(ValueError, match=r"rows have shape \(2,\).*'x' has rows of shape \(3,\)"):
        empirical.check_rows(torch.Size([3]), "x")
    empirical.replace_points(data + 1.0)
    assert torch.equal(empirical.points, data + 1.0)
    with pytest.raises(ValueError, match=r"training set of shape \(20, 2\)"):
        empirical.replace_points(data[:5])

    density = as_data_density(TARGET, None)
    assert isinstance(density, DensityData) and density.can_sample
    assert density.sigma is None and density.schedule is None and density.projection is None
    pyro.set_rng_seed(0)
    y = density.sample_like(torch.zeros(5))
    pyro.set_rng_seed(0)
    assert torch.equal(y, TARGET.sample((5,)))
    assert torch.equal(density.log_prob(y), TARGET.log_prob(y))
    density.check_rows(torch.Size([7]), "x")  # a density's log_prob defines its rows
    with pytest.raises(ValueError, match="log_density='pca' needs a training set"):
        density.use_pca(2, 10)

    class LogProbOnly:
        def log_prob(self, y):
            return -(y**2)

    assert not as_data_density(LogProbOnly(), None).can_sample
    objective = FDivergenceBound("js", data=data, spread=0.5)
    assert isinstance(objective.data, EmpiricalData) and objective.sigma == 0.5


def test_a_subsampled_plate_is_refused_before_the_model_indexes_the_batch():
    def model(x, idx):
        with pyro.plate("data", 100, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])  # an IndexError

    def guide(x, idx):
        with pyro.plate("data", 100, subsample=idx):
            pyro.sample("z", dist.Normal(x[idx] / 2, 1.0).to_event(1))

    objective = FDivergenceBound("reverse_kl", data=torch.randn(100, 2), spread=0.5)
    with pytest.raises(ValueError, match=r"plate 'data' is subsampled \(subsample= gives 3 of"):
        objective.loss(model, guide, torch.randn(3, 2), torch.tensor([5, 50, 99]))


def test_parametrized_divergence_names_need_an_instance():
    with pytest.raises(ValueError, match=r"'amari_alpha' needs parameters.*alpha=0\.5"):
        FDivergenceBound("amari_alpha", data=TARGET)
    with pytest.raises(ValueError, match=r"'amari_alpha' needs parameters"):
        FGANBound("amari_alpha", critic=_critic())
    objective = FDivergenceBound(get_divergence("amari_alpha", alpha=0.5), data=TARGET)
    assert objective.divergence.alpha == 0.5


# ---------------------------------------------------------------- f-GAN lower bound
class OptimalCritic(nn.Module):
    """V with g_f(V) = f'(p/q): the exact log ratio pushed through the inverse activation."""

    def __init__(self, f, model_dist):
        super().__init__()
        self.f, self.model_dist = get_divergence(f), model_dist
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        log_u = TARGET.log_prob(x) - self.model_dist.log_prob(x)
        # solve g_f(v) = f'(u) by bisection (g_f is increasing)
        target = self.f.f_prime(log_u)
        lo, hi = torch.full_like(x, -60.0), torch.full_like(x, 60.0)
        for _ in range(200):
            mid = (lo + hi) / 2
            low = self.f.critic_activation(mid) < target
            lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
        return (lo + hi) / 2 + 0 * self.unused


@pytest.mark.parametrize("f", ["forward_kl", "reverse_kl", "js", "squared_hellinger"])
def test_fgan_bound_equals_the_divergence_at_the_optimal_critic(f):
    net = joint()
    model_dist = dist.Normal(net.mu, net.sigma)
    objective = FGANBound(f, critic=OptimalCritic(f, model_dist), data=TARGET)
    draws = [objective.loss(net.model, None, torch.zeros(50_000)) for _ in range(8)]
    mean = sum(draws) / len(draws)
    se = torch.tensor(draws).std().item() / math.sqrt(len(draws))
    assert abs(mean - true_divergence(f, net.mu, net.sigma)) < 4 * se + 2e-3


def _critic():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x[:, None])

    return Critic()


def test_fgan_trained_critic_approaches_the_divergence_from_below():
    net = joint()
    critic = _critic()
    objective = FGANBound(
        "js", critic=critic, data=TARGET, critic_optim=lambda p: torch.optim.Adam(p, lr=0.02)
    )
    exact = true_divergence("js", net.mu, net.sigma)
    before = objective.loss(net.model, None, torch.zeros(20_000))
    for _ in range(300):  # critic steps only: the model's gradients are discarded
        objective.loss_and_grads(net.model, None, torch.zeros(500))
        for p in net.joint.values():
            p.grad = None
    after = sum(objective.loss(net.model, None, torch.zeros(20_000)) for _ in range(5)) / 5
    assert before < after <= exact + 0.005
    assert after > exact - 0.02


def test_fgan_routes_gradients_and_round_trips_state():
    net = joint()
    critic = _critic()
    objective = FGANBound("reverse_kl", critic=critic, data=TARGET, critic_steps=2)
    critic_before = [p.detach().clone() for p in critic.parameters()]
    model_before = [p.detach().clone() for p in net.joint.values()]
    value = objective.loss_and_grads(net.model, None, torch.zeros(64))
    assert math.isfinite(value)
    assert all(
        not torch.equal(a, b) for a, b in zip(critic.parameters(), critic_before, strict=True)
    )
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in critic.parameters())
    assert all(torch.equal(a, b) for a, b in zip(net.joint.values(), model_before, strict=True))
    assert all(p.grad is not None and p.grad.abs() > 0 for p in net.joint.values())
    # loss() leaves the critic alone; state round-trips into a fresh objective
    state = objective.state_dict()
    objective.loss(net.model, None, torch.zeros(64))
    assert all(
        torch.equal(a, b)
        for a, b in zip(critic.parameters(), state["critic"].values(), strict=True)
    )
    fresh = FGANBound("reverse_kl", critic=_critic(), data=TARGET, critic_steps=2)
    fresh.load_state_dict(state)
    pyro.set_rng_seed(5)
    a = objective.loss_and_grads(net.model, None, torch.zeros(64))
    pyro.set_rng_seed(5)
    b = fresh.loss_and_grads(net.model, None, torch.zeros(64))
    assert a == b


def test_fgan_bad_input():
    with pytest.raises(ValueError, match="critic"):
        FGANBound("js", critic=lambda x: x)
    with pytest.raises(ValueError, match="critic_steps"):
        FGANBound("js", critic=_critic(), critic_steps=0)

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return x[:, None] * self.w

    objective = FGANBound("js", critic=Wide(), data=TARGET)
    with pytest.raises(ValueError, match=r"critic to map a batch of shape \(8,\)"):
        objective.loss(joint().model, None, torch.zeros(8))


def test_fgan_takes_no_guide():
    net = joint()
    objective = FGANBound("js", critic=_critic(), data=TARGET)
    for empty in (None, lambda x: None):
        assert math.isfinite(objective.loss_and_grads(net.model, empty, torch.zeros(16)))

    def guide_with_a_param(x):
        pyro.param("unused", torch.zeros(()))

    for method in ("loss", "loss_and_grads", "differentiable_loss"):
        with pytest.raises(ValueError, match=r"(?s)trains the model only.*\['unused'\].*"):
            getattr(objective, method)(net.model, guide_with_a_param, torch.zeros(16))
    with pytest.raises(ValueError, match=r"sample sites \['z'\].*Use FDivergenceBound"):
        objective.loss(net.model, net.guide, torch.zeros(16))
