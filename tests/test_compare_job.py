"""The comparison pipeline: guide draws and densities, the method registry, the CLI."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.nn import PyroParam

from pyro_fdiv.cli import main
from pyro_fdiv.compare import metrics
from pyro_fdiv.compare.methods import Method, available_methods, get_method, register_method
from pyro_fdiv.compare.posterior import sample_unconstrained, unconstrained_log_density

Y = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9], dtype=torch.float64)


def conjugate_model():
    """``mu ~ N(0, 1)``, ``sigma ~ LogNormal(0, 1)`` (independent of the data),
    ``y_i ~ N(mu, 1)``: posterior ``N(sum y / (n + 1), 1 / (n + 1)) x LogNormal(0, 1)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(Y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=Y)


def exact_log_evidence():
    n = len(Y)
    return dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(Y)


def log_joint_unconstrained(mu, log_sigma):
    """``log p(y, mu, sigma) + log sigma``: the joint in unconstrained coordinates."""
    sigma = log_sigma.exp()
    log_lik = dist.Normal(mu[:, None], 1.0).log_prob(Y).sum(-1)
    prior = dist.Normal(0.0, 1.0).log_prob(mu) + dist.LogNormal(0.0, 1.0).log_prob(sigma)
    return log_lik + prior + log_sigma


@pytest.mark.parametrize("auto", [AutoNormal, AutoMultivariateNormal])
def test_exact_posterior_guide_has_zero_kl_and_density_matches_pyro(auto):
    guide = auto(conjugate_model)
    guide()  # set up the prototype
    n = len(Y)
    # set the guide to the exact posterior
    loc = torch.tensor([Y.sum() / (n + 1), 0.0])
    scale = torch.tensor([1 / math.sqrt(n + 1), 1.0])
    if auto is AutoNormal:
        for i, name in enumerate(["mu", "sigma"]):
            setattr(guide.locs, name, PyroParam(loc[i]))
            setattr(guide.scales, name, PyroParam(scale[i], constraints.softplus_positive))
    else:
        guide.loc = PyroParam(loc)
        guide.scale = PyroParam(scale, constraints.softplus_positive)
        guide.scale_tril = PyroParam(torch.eye(2), constraints.unit_lower_cholesky)
    sites = sample_unconstrained(conjugate_model, guide, 4000)
    assert sites["mu"].shape == (4000,) and sites["sigma"].shape == (4000,)
    log_q = unconstrained_log_density(guide, sites)
    exact = dist.Normal(loc, scale).log_prob(torch.stack([sites["mu"], sites["sigma"]], -1)).sum(-1)
    assert torch.allclose(log_q, exact)
    log_joint = log_joint_unconstrained(sites["mu"], sites["sigma"])
    kl, se = metrics.exact_kl_q_p(log_joint, log_q, exact_log_evidence())
    assert abs(kl) < 1e-10 and se < 1e-10


def test_fitted_guide_approaches_the_exact_posterior():
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(conjugate_model)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / 500)})
    svi = SVI(conjugate_model, guide, optim, Trace_ELBO())
    for _ in range(500):
        svi.step()
    sites = sample_unconstrained(conjugate_model, guide, 20000)
    log_q = unconstrained_log_density(guide, sites)
    log_joint = log_joint_unconstrained(sites["mu"], sites["sigma"])
    kl, se = metrics.exact_kl_q_p(log_joint, log_q, exact_log_evidence())
    assert -4 * se < kl < 0.03  # measured 0.007 after 1500 steps


def test_density_of_a_guide_without_one_raises():
    def guide():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 1.0))

    with pytest.raises(TypeError, match="has no density"):
        unconstrained_log_density(guide, {"mu": torch.zeros(3)})


def test_method_registry():
    assert available_methods()[:8] == [
        "nuts",
        "elbo-meanfield",
        "elbo-fullrank",
        "iwae",
        "iwae-sir",
        "bbalpha-0.5",
        "bbalpha-0.5-sir",
        "bbalpha-2",
    ]
    # each -sir method fits exactly as the method before it, then resamples its guide
    for name in ("iwae", "bbalpha-0.5"):
        fit, sir = get_method(name), get_method(f"{name}-sir")
        assert (sir.guide, sir.objective, sir.lr) == (fit.guide, fit.objective, fit.lr)
        assert fit.num_proposals is None and sir.num_proposals == 64
    assert get_method("nuts").is_reference and not get_method("iwae").is_reference
    with pytest.raises(ValueError, match="unknown method 'bogus'; known methods: nuts"):
        get_method("bogus")
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("iwae", "again"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eight-schools", "--methods", "iwae,bogus"], "unknown method(s) bogus; known: nuts"),
        (["eight-schools", "--steps", "0"], "expected a positive integer, got 0"),
        (["eight-schools", "--steps", "ten"], "expected a positive integer, got 'ten'"),
        (["eight-schools", "--parameterization", "sideways"], "invalid choice: 'sideways'"),
        (["demo", "--num-particles", "-2"], "expected a positive integer, got -2"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        main(["eight-schools", "--out", str(blocker / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to" in err


def test_run_writes_results_and_is_deterministic(tmp_path):
    import arviz as az
    import pandas as pd

    from pyro_fdiv.compare.eight_schools import COLUMNS, run

    kw = dict(steps=40, num_draws=1000, seed=3, progress=False)
    first = run(tmp_path / "a", ["nuts", "elbo-meanfield", "iwae"], **kw)
    second = run(tmp_path / "b", ["nuts", "elbo-meanfield", "iwae"], plot=False, **kw)
    assert list(first.columns) == COLUMNS
    assert list(first["method"]) == ["nuts", "elbo-meanfield", "iwae"]
    pd.testing.assert_frame_equal(first.drop(columns="seconds"), second.drop(columns="seconds"))
    saved = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert list(saved.columns) == COLUMNS and len(saved) == 3
    # the noise floor: two independent NUTS runs are close; the reference row has no density
    nuts = first.set_index("method").loc["nuts"]
    assert abs(nuts["kl_ref_q"]) < 0.05 and math.isnan(nuts["exact_kl_ref_q"])
    # a 40-step fit is far from the posterior, and both KL estimates say so
    fit = first.set_index("method").loc["elbo-meanfield"]
    assert fit["kl_ref_q"] > 1.0 and fit["exact_kl_ref_q"] > 1.0 and fit["khat"] > 0.7
    idata = az.from_netcdf(tmp_path / "a" / "samples" / "iwae.nc")
    assert set(idata.posterior.data_vars) == {"mu", "tau", "theta_tilde", "theta"}
    assert idata.posterior["theta"].shape == (1, 1000, 8)
    assert az.from_netcdf(tmp_path / "a" / "samples" / "nuts.nc").posterior["mu"].shape == (
        4,
        2500,
    )
    assert (tmp_path / "a" / "marginals.png").stat().st_size > 10_000


def test_centered_fits_are_compared_in_noncentered_coordinates(tmp_path):
    from pyro_fdiv.compare.eight_schools import run

    table = run(
        tmp_path,
        ["elbo-fullrank"],
        steps=30,
        num_draws=1000,
        parameterization="centered",
        progress=False,
        plot=False,
    ).set_index("method")
    row = table.loc["elbo-fullrank"]
    assert math.isfinite(row["exact_kl_ref_q"]) and math.isfinite(row["kl_ref_q"])


@pytest.mark.slow
def test_main_job_quick(tmp_path, capsys):
    torch.set_default_dtype(torch.float32)
    # a 300-step JSA chain repeats many states after rejections: the kNN estimator warns that it
    # leaves those ties out, and the job goes on
    with pytest.warns(RuntimeWarning, match="zero kNN distance"):
        main(["eight-schools", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    names = ["nuts", "elbo-meanfield", "elbo-fullrank", "iwae", "bbalpha-0.5", "bbalpha-2"]
    for name in [*names, "iwae-sir", "bbalpha-0.5-sir", "avb", "jsa", "jsa-chain"]:
        assert name in out
        assert (tmp_path / "samples" / f"{name}.nc").exists()
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "marginals.png").exists()


def test_resampled_methods_reuse_the_fit_and_have_no_exact_kl(tmp_path):
    import arviz as az
    import numpy as np

    from pyro_fdiv.compare.eight_schools import fit_method, run

    names = ["nuts", "iwae", "iwae-sir", "bbalpha-0.5", "bbalpha-0.5-sir"]
    kw = dict(steps=40, num_draws=1000, seed=3, progress=False)
    table = run(tmp_path, names, **kw).set_index("method")
    for name in ("iwae", "bbalpha-0.5"):
        guide, sir = table.loc[name], table.loc[f"{name}-sir"]
        # the resampled distribution has no density: kNN KL only, and the weights' k-hat, ESS
        assert math.isnan(sir["exact_kl_ref_q"]) and math.isnan(sir["exact_kl_q_ref"])
        assert math.isfinite(guide["exact_kl_ref_q"]) and math.isnan(guide["ess_fraction"])
        assert 1 / 64 < sir["ess_fraction"] < 1 and 0 < sir["khat"] < 2
        # after 40 steps the guides are far off (kNN KL 3.1 / 1.1 for iwae); resampling 64
        # proposals per draw halves both (measured 1.4 / 0.61)
        assert sir["kl_ref_q"] < 0.7 * guide["kl_ref_q"]
        assert sir["kl_q_ref"] < 0.7 * guide["kl_q_ref"]
        assert sir["mean_abs_z"] < guide["mean_abs_z"]
    idata = az.from_netcdf(tmp_path / "samples" / "iwae-sir.nc")
    assert idata.posterior["theta"].shape == (1, 1000, 8)
    # one fit for iwae and iwae-sir run in a row, with the numbers of a fit of its own
    cache = {}
    fit = fit_method(get_method("iwae"), **kw, cache=cache)
    reused = fit_method(get_method("iwae-sir"), **kw, cache=cache)
    fresh = fit_method(get_method("iwae-sir"), **kw)
    assert reused.extra["losses"] is fit.extra["losses"]
    np.testing.assert_array_equal(reused.draws, fresh.draws)
    assert reused.extra["khat"] == fresh.extra["khat"]


def test_marginals_title_is_above_the_panels(tmp_path, monkeypatch):
    """With many rows the suptitle used to overlap the first row (tight_layout ignored it)."""
    from types import SimpleNamespace

    import numpy as np

    from pyro_fdiv.compare import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    rng = np.random.default_rng(0)
    results = {f"m{i}": SimpleNamespace(draws=rng.normal(size=(1, 500, 10))) for i in range(11)}
    plots.plot_marginals(results, rng.normal(size=(2, 500, 10)), tmp_path / "m.png")
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
    assert title.y0 >= top
    plots.plt.close(fig)
