"""Eight Schools: the model, its exact evidence and posterior moments, and the HMC reference."""

import dataclasses
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import special, stats

from pyro_fdiv.compare import reference
from pyro_fdiv.compare.reference import (
    NUTSSettings,
    ReferenceCacheWarning,
    ReferenceQualityWarning,
    diagnostics,
    load_reference,
    reference_draws,
    run_nuts,
)
from pyro_fdiv.models import eight_schools
from pyro_fdiv.models.eight_schools import (
    SIGMA,
    UNCONSTRAINED_NAMES,
    Y,
    exact_posterior_summary,
    from_unconstrained,
    log_evidence,
    log_joint,
    model,
    to_unconstrained,
)

TINY = NUTSSettings(num_chains=1, warmup_steps=20, num_samples=20)


@pytest.fixture(scope="module")
def exact():
    return exact_posterior_summary()


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def shipped(request):
    return request.param, load_reference(seed=request.param, progress=False)


def _random_z(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=gen) * torch.tensor([3.0, 1.0] + [1.0] * 8) + torch.tensor(
        [4.0, 1.0] + [0.0] * 8
    )


def _sample_sites(tr):
    return [
        (n, s) for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    ]


def _trace(parameterization, **values):
    conditioned = poutine.condition(model, data=values)
    tr = poutine.trace(conditioned).get_trace(Y, SIGMA, parameterization)
    tr.compute_log_prob()
    return tr


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("parameterization", ["noncentered", "centered"])
def test_model_sites(parameterization):
    tr = poutine.trace(model).get_trace(parameterization=parameterization)
    latent = {n for n, s in _sample_sites(tr) if not s["is_observed"]}
    sampled = "theta_tilde" if parameterization == "noncentered" else "theta"
    assert latent == {"mu", "tau", sampled}
    assert tr.nodes["theta"]["value"].shape == (8,)
    assert tr.nodes["obs"]["is_observed"] and torch.equal(tr.nodes["obs"]["value"], Y)
    assert tr.nodes["mu"]["fn"].batch_shape == () and tr.nodes["tau"]["fn"].batch_shape == ()
    assert tr.nodes["tau"]["value"] > 0


def test_bad_parameterization():
    with pytest.raises(ValueError, match=r"noncentered.*centered.*'funnel'"):
        model(parameterization="funnel")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\)"):
        model(y=torch.zeros(7))


def test_model_broadcasts_under_a_particle_plate():
    num_particles = 5
    z = _random_z(num_particles)
    values = from_unconstrained(z)
    data = {"mu": values["mu"][:, None], "tau": values["tau"][:, None]}
    data["theta_tilde"] = values["theta_tilde"]

    def vectorized():
        with pyro.plate("num_particles_vectorized", num_particles, dim=-2):
            return model(Y, SIGMA)

    tr = poutine.trace(poutine.condition(vectorized, data=data)).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["mu"]["value"].shape == (num_particles, 1)
    assert tr.nodes["theta"]["value"].shape == (num_particles, 8)
    per_particle = sum(
        site["log_prob"].reshape(num_particles, -1).sum(-1) for _, site in _sample_sites(tr)
    )
    expected = log_joint(z) - z[:, 1]  # without the Jacobian
    assert torch.allclose(per_particle, expected, rtol=1e-12)


def test_model_follows_the_dtype_of_y():
    torch.set_default_dtype(torch.float32)
    tr = poutine.trace(model).get_trace(Y.float())
    assert all(site["value"].dtype == torch.float32 for _, site in _sample_sites(tr))
    tr = poutine.trace(model).get_trace(Y)  # float64 data under a float32 default
    assert tr.nodes["theta"]["value"].dtype == torch.float64
    assert tr.nodes["mu"]["value"].dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Unconstrained coordinates and the log joint


def test_unconstrained_round_trip():
    z = _random_z(7)
    values = from_unconstrained(z)
    assert torch.allclose(
        values["theta"], values["mu"][:, None] + values["tau"][:, None] * z[:, 2:]
    )
    assert torch.allclose(to_unconstrained(values), z, rtol=1e-14, atol=1e-14)
    centered = {k: values[k].numpy() for k in ("mu", "tau", "theta")}  # ndarrays, no theta_tilde
    assert torch.allclose(to_unconstrained(centered), z, rtol=1e-12, atol=1e-12)
    assert len(UNCONSTRAINED_NAMES) == 10 and UNCONSTRAINED_NAMES[1] == "log_tau"
    assert UNCONSTRAINED_NAMES[-1] == "theta_tilde[7]"


def test_log_joint_matches_pyro_trace_plus_jacobian():
    z = _random_z(6, seed=1)
    values = from_unconstrained(z)
    for i in range(len(z)):
        site_values = {k: values[k][i] for k in ("mu", "tau", "theta_tilde")}
        expected = _trace("noncentered", **site_values).log_prob_sum() + z[i, 1]
        assert log_joint(z[i]).item() == pytest.approx(expected.item(), rel=1e-12)
    assert log_joint(z.reshape(2, 3, 10)).shape == (2, 3)


def test_centered_density_is_the_noncentered_one_over_the_jacobian():
    z = _random_z(4, seed=2)
    values = from_unconstrained(z)
    for i in range(len(z)):
        noncentered = _trace(
            "noncentered", **{k: values[k][i] for k in ("mu", "tau", "theta_tilde")}
        )
        centered = _trace("centered", **{k: values[k][i] for k in ("mu", "tau", "theta")})
        jacobian = 8 * values["tau"][i].log()  # theta = mu + tau theta_tilde in 8 dimensions
        assert centered.log_prob_sum().item() == pytest.approx(
            (noncentered.log_prob_sum() - jacobian).item(), rel=1e-12
        )


def test_log_joint_gradient():
    z = _random_z(3, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: log_joint(x).sum(), (z,))
    # the score of the half-Cauchy plus Jacobian in log tau: 1 - 2 tau^2 / (25 + tau^2)
    z0 = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    sigma2 = SIGMA**2
    (grad,) = torch.autograd.grad(log_joint(z0), z0)
    assert grad[1].item() == pytest.approx(1 - 2 * 1 / 26, rel=1e-12)  # theta = mu = 0, tau = 1
    assert torch.allclose(grad[2:], Y / sigma2, rtol=1e-12)
    assert grad[0].item() == pytest.approx((Y / sigma2).sum().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Exact evidence and posterior moments


@pytest.mark.parametrize("tau", [0.0, 1.0, 7.5, 100.0])
def test_marginal_given_tau_is_the_gaussian_integral(tau):
    cov = 25.0 * torch.ones(8, 8) + torch.diag(SIGMA**2 + tau**2)
    expected = dist.MultivariateNormal(torch.zeros(8), covariance_matrix=cov).log_prob(Y)
    assert eight_schools._log_marginal_given_tau(tau) == pytest.approx(expected.item(), rel=1e-13)


def test_log_evidence_value():
    log_z, error = log_evidence(return_error=True)
    assert isinstance(log_z, float) and log_z == pytest.approx(-31.3113, abs=5e-4)
    assert error < 1e-10


def test_log_evidence_agrees_with_importance_sampling(exact):
    """10^6 draws from a Student-t (5 d.o.f.) fitted to the shipped reference, inflated by 1.2."""
    draws = reference_draws(load_reference(progress=False)).reshape(-1, 10)
    proposal = stats.multivariate_t(
        loc=draws.mean(0), shape=1.2**2 * np.cov(draws.T) * 3 / 5, df=5, seed=0
    )
    z = proposal.rvs(size=1_000_000)
    log_w = log_joint(torch.from_numpy(z)).numpy() - proposal.logpdf(z)
    estimate = special.logsumexp(log_w) - math.log(len(z))
    w = np.exp(log_w - log_w.max())
    std_error = w.std() / (w.mean() * math.sqrt(len(z)))  # delta method for log of a mean
    assert std_error < 2e-3
    assert abs(estimate - log_evidence()) < 4 * std_error
    # the self-normalized posterior means of mu and log tau agree with the quadrature too
    for column, name in ((0, "mu"), (1, "log_tau")):
        mean = np.sum(w * z[:, column]) / w.sum()
        assert mean == pytest.approx(exact.loc[name, "mean"], abs=0.01)


def test_exact_posterior_summary_matches_published_values(exact):
    """posteriordb's eight_schools_noncentered: mu 4.4 (3.3), tau 3.6 (3.2), theta[0] 6.2 (5.6)."""
    for name, mean, sd in (("mu", 4.4, 3.3), ("tau", 3.6, 3.2), ("theta[0]", 6.2, 5.6)):
        assert exact.loc[name, "mean"] == pytest.approx(mean, abs=0.05)
        assert exact.loc[name, "sd"] == pytest.approx(sd, abs=0.05)
    assert exact.loc["theta_tilde[2]", "sd"] < 1.0  # the data shrink each school's prior sd


# ---------------------------------------------------------------------------------------------
# The shipped HMC reference


def test_shipped_reference_is_loaded_without_sampling(monkeypatch, shipped):
    seed, idata = shipped
    monkeypatch.setattr(reference, "run_nuts", _forbidden)
    again = load_reference(settings=NUTSSettings(seed=seed))
    assert np.array_equal(again.posterior["mu"].values, idata.posterior["mu"].values)
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert idata.posterior["theta"].shape == (4, 2500, 8)
    assert idata.posterior["mu"].dtype == np.float32
    assert idata.attrs["key"] == NUTSSettings(seed=seed).key()
    assert idata.attrs["settings"] == reference.json.dumps(
        NUTSSettings(seed=seed).to_dict(), sort_keys=True
    )
    assert idata.attrs["pyro_version"] and idata.attrs["wall_time_s"] > 0


def test_shipped_runs_are_independent():
    first, second = (load_reference(seed=s).posterior["mu"].values for s in (0, 1))
    assert not np.allclose(first, second)


def test_shipped_reference_diagnostics(shipped):
    _, idata = shipped
    table = diagnostics(idata)  # a ReferenceQualityWarning would fail the test
    assert table.attrs["divergences"] == 0
    assert (table["r_hat"] <= 1.01).all()
    assert (table["ess_bulk"] > 4000).all()
    assert set(table.index) >= {"mu", "tau", "theta_tilde[0]", "theta[7]"}


def test_shipped_reference_matches_quadrature(exact, shipped):
    """Posterior means and sds within 4 Monte Carlo standard errors (ArviZ) of the exact values."""
    _, idata = shipped
    table = diagnostics(idata)
    assert len(table) == 18
    for name, row in table.iterrows():
        assert abs(row["mean"] - exact.loc[name, "mean"]) < 4 * row["mcse_mean"], name
        assert abs(row["sd"] - exact.loc[name, "sd"]) < 4 * row["mcse_sd"], name
    log_tau = reference_draws(idata)[..., 1]
    mcse = float(az.mcse(log_tau, method="mean"))
    assert abs(log_tau.mean() - exact.loc["log_tau", "mean"]) < 4 * mcse
    assert table.loc["mu", "mcse_mean"] < 0.05  # the comparison is sharp


def test_reference_draws_are_in_unconstrained_order(shipped):
    _, idata = shipped
    draws = reference_draws(idata)
    post = idata.posterior
    assert draws.shape == (4, 2500, 10) and draws.dtype == np.float64
    assert np.allclose(draws[..., 0], post["mu"].values)
    assert np.allclose(draws[..., 1], np.log(post["tau"].values.astype(np.float64)))
    assert np.allclose(draws[..., 2:], post["theta_tilde"].values)
    theta = post["mu"].values[..., None] + post["tau"].values[..., None] * draws[..., 2:]
    assert np.allclose(theta, post["theta"].values, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Settings, cache and tiny runs


def _forbidden(*args, **kwargs):
    raise AssertionError("NUTS must not run")


def test_settings_key_is_stable():
    assert NUTSSettings().key() == "eight_schools_noncentered_seed0_aa087323c991"
    assert NUTSSettings(seed=1).key() == "eight_schools_noncentered_seed1_c5550c44f013"
    keys = {
        NUTSSettings().key(),
        NUTSSettings(num_samples=2499).key(),
        NUTSSettings(jit_compile=False).key(),
        NUTSSettings(target_accept_prob=0.9).key(),
        NUTSSettings(parameterization="centered").key(),
    }
    assert len(keys) == 5
    assert NUTSSettings().chain_seeds() == NUTSSettings().chain_seeds()
    assert len(set(NUTSSettings().chain_seeds() + NUTSSettings(seed=1).chain_seeds())) == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_chains": 0}, "num_chains"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"parameterization": "funnel"}, "parameterization"),
        ({"target_accept_prob": 1.0}, "target_accept_prob"),
        ({"seed": -1}, "seed"),
    ],
)
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NUTSSettings(**kwargs)


def test_cache(tmp_path, monkeypatch):
    calls = []

    def counting_run_nuts(settings, progress=True):
        calls.append(settings)
        return run_nuts(settings, progress=progress)

    monkeypatch.setattr(reference, "run_nuts", counting_run_nuts)
    first = load_reference(settings=TINY, cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{TINY.key()}.nc"
    assert len(calls) == 1 and path.exists() and path.with_suffix(".json").exists()
    assert first.posterior["theta_tilde"].shape == (1, 20, 8)

    monkeypatch.setattr(reference, "run_nuts", _forbidden)
    monkeypatch.setenv("PYRO_FDIV_CACHE", str(tmp_path))
    second = load_reference(settings=TINY)  # from $PYRO_FDIV_CACHE, no NUTS
    assert second.posterior.equals(first.posterior)

    monkeypatch.setattr(reference, "run_nuts", counting_run_nuts)
    third = load_reference(settings=TINY, cache_dir=tmp_path, recompute=True, progress=False)
    assert len(calls) == 2 and third.posterior.equals(first.posterior)  # deterministic

    path.write_bytes(b"not a netcdf file")
    with pytest.warns(ReferenceCacheWarning, match="Rerunning NUTS"):
        fourth = load_reference(settings=TINY, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3 and fourth.posterior.equals(first.posterior)
    assert load_reference(settings=TINY, cache_dir=tmp_path).posterior.equals(first.posterior)
    assert len(calls) == 3


def test_tiny_centered_run_records_theta():
    rng_before = torch.get_rng_state()
    settings = dataclasses.replace(TINY, num_chains=2, parameterization="centered")
    idata = run_nuts(settings, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    post = idata.posterior
    assert post["theta"].shape == (2, 20, 8) and post["theta"].dims[-1] == "school"
    assert np.allclose(
        post["theta_tilde"].values,
        (post["theta"] - post["mu"]).values / post["tau"].values[..., None],
    )
    assert not np.allclose(post["theta"].values[0], post["theta"].values[1])  # distinct chains
    assert idata.sample_stats["diverging"].shape == (2, 20)
    assert reference.json.loads(idata.attrs["settings"])["parameterization"] == "centered"


def test_diagnostics_warns_on_divergences_and_r_hat():
    rng = np.random.default_rng(0)
    posterior = {
        "mu": rng.normal(size=(2, 200)),
        "tau": rng.exponential(size=(2, 200)),
        "theta_tilde": rng.normal(size=(2, 200, 8)),
        "theta": rng.normal(size=(2, 200, 8)),
    }
    diverging = np.zeros((2, 200), dtype=bool)
    diverging[1, 7] = True
    dims = {"theta": ["school"], "theta_tilde": ["school"]}
    idata = az.from_dict(posterior=posterior, sample_stats={"diverging": diverging}, dims=dims)
    with pytest.warns(ReferenceQualityWarning, match="1 divergent"):
        assert diagnostics(idata).attrs["divergences"] == 1
    posterior["mu"] = posterior["mu"] + np.array([[0.0], [3.0]])  # chains disagree
    idata = az.from_dict(posterior=posterior, sample_stats={"diverging": 0 * diverging}, dims=dims)
    with pytest.warns(ReferenceQualityWarning, match="R-hat"):
        table = diagnostics(idata)
    assert table.loc["mu", "r_hat"] > 1.01


@pytest.mark.slow
def test_worker_processes_give_the_same_draws():
    settings = NUTSSettings(num_chains=2, warmup_steps=30, num_samples=30)
    one = run_nuts(settings, progress=False, num_workers=1)
    two = run_nuts(settings, progress=False, num_workers=2)
    assert one.posterior.equals(two.posterior)


@pytest.mark.slow
def test_shipped_seed0_is_reproducible():
    shipped = load_reference(seed=0)
    rerun = run_nuts(NUTSSettings(seed=0), progress=False)
    assert np.array_equal(
        rerun.posterior["mu"].values.astype(np.float32), shipped.posterior["mu"].values
    )
