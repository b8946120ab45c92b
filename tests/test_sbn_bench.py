"""The SBN comparison (benchmarks/sbn.py) and the two-layer SBN: the importance-sampling
log-likelihood of every architecture trained by every method agrees with exact enumeration,
the Pyro programs score what the plain tensor code scores, and the script runs, resumes and
writes its tables."""

import importlib.util
import itertools
import math
from pathlib import Path

import pandas as pd
import pyro
import pytest
import torch
from pyro.distributions import Bernoulli
from pyro.infer import SVI

from pyro_fdiv.evaluate import log_likelihood
from pyro_fdiv.inference import JSA
from pyro_fdiv.models.sbn import SBN, TwoLayerSBN

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sbn.py"
spec = importlib.util.spec_from_file_location("bench_sbn", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _states(dim: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=dim)))


def _bern(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return Bernoulli(logits=logits).log_prob(value).sum(-1)


@torch.no_grad()
def exact_log_likelihood(sbn, x: torch.Tensor) -> torch.Tensor:
    """log p(x) per row of x by summing the joint over every latent state (written from the
    model's definition, independently of the package's code)."""
    if isinstance(sbn, TwoLayerSBN):
        z2 = _states(sbn.z2_dim)[:, None, None]  # (S2, 1, 1, z2)
        z1 = _states(sbn.z1_dim)[None, :, None]  # (1, S1, 1, z1)
        log_joint = (
            _bern(sbn.prior_logits, z2)
            + _bern(sbn.decoder["z1"](z2), z1)
            + _bern(sbn.decoder["x"](z1), x)
        )
        return log_joint.reshape(-1, len(x)).logsumexp(0)
    z = _states(sbn.z_dim)[:, None]  # (S, 1, z)
    return (_bern(sbn.prior_logits, z) + _bern(sbn.decoder(z), x)).logsumexp(0)


def _is_estimate_and_se(sbn, x: torch.Tensor, num_samples: int):
    """The IS estimate and its delta-method standard error, std(w) / (mean(w) sqrt(K))."""
    log_w = sbn.log_weights(x, num_samples)
    estimate = log_w.logsumexp(0) - math.log(num_samples)
    w = (log_w - log_w.max(0).values).exp()
    return estimate, w.std(0) / (w.mean(0) * math.sqrt(num_samples))


def _args(data_root, out, *extra):
    return bench.parse(["--data", str(data_root), "--out", str(out), "--quiet", *extra])


# ----------------------------------------------------------------------------------------------
# The models' log-likelihood against enumeration


@pytest.mark.parametrize("arch, z_dim", [("linear", 8), ("two-layer", 4), ("nonlinear", 8)])
@pytest.mark.parametrize("method", bench.METHODS)
def test_each_method_trains_a_model_whose_is_estimate_matches_enumeration(
    data_root, tmp_path, arch, method, z_dim
):
    # the script's own training (a few epochs on 16-pixel images) and evaluation (K = 1,000)
    args = _args(data_root, tmp_path, "--epochs", "3", "--z-dim", str(z_dim),
                 "--num-train", "120", "--batch-size", "20", "--num-particles", "5",
                 "--lr", "0.01", "--num-curve", "5", "--curve-samples", "5")  # fmt: skip
    data = bench.load_data(args)
    sbn, log = bench.train(arch, method, data, args)
    assert [row["step"] for row in log] == [6, 12, 18]
    x = data["test"][:10]
    exact = exact_log_likelihood(sbn, x)
    assert torch.isfinite(exact).all() and bool((exact < 0).all())
    torch.manual_seed(0)
    estimate = bench.evaluate(sbn, x, 1000)
    _, se = _is_estimate_and_se(sbn, x, 1000)
    assert bool((se < 0.3).all()), se  # a precise enough estimate for the check to bite
    assert bool(((estimate - exact).abs() < 5 * se + 1e-3).all()), (estimate - exact, se)
    # training moved the model away from its initial state: the likelihood went up
    fresh = bench.build_model(arch, x.shape[1], z_dim)
    with torch.no_grad():
        mean = data["train"].mean(0).clamp(1e-3, 1 - 1e-3)
        bench.output_bias(fresh).copy_(mean.log() - (-mean).log1p())
    assert (
        exact_log_likelihood(fresh, data["test"]).mean()
        < exact_log_likelihood(sbn, data["test"]).mean()
    )


@pytest.mark.parametrize("sbn", [SBN(10, 6), TwoLayerSBN(10, 3, 4)], ids=["one", "two-layer"])
def test_pyro_programs_and_tensor_code_agree_with_enumeration(sbn):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0.0, 0.5)  # away from the zero initialization
    x = (torch.rand(7, 10) < 0.4).double()
    sbn.double()
    exact = exact_log_likelihood(sbn, x)
    # the model and guide programs through the package's generic IS estimator
    generic = log_likelihood(sbn.model, sbn.guide, x, num_samples=4000)
    plain, se = _is_estimate_and_se(sbn, x, 4000)
    assert bool((se < 0.2).all())
    assert bool(((generic - exact).abs() < 5 * se + 1e-3).all()), (generic - exact, se)
    assert bool(((plain - exact).abs() < 5 * se + 1e-3).all()), (plain - exact, se)


def test_two_layer_guide_with_exact_posterior_makes_every_weight_p_of_x():
    # one latent unit per layer: set the guide to the exact posterior, then each importance
    # weight equals p(x), whatever was drawn (a zero-variance identity)
    sbn = TwoLayerSBN(x_dim=1, z1_dim=1, z2_dim=1).double()
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0.0, 1.0)
    x = torch.tensor([[1.0]])
    z = torch.tensor([0.0, 1.0])
    log_joint = (
        _bern(sbn.prior_logits, z[:, None, None])  # z2 on dim 0
        + _bern(sbn.decoder["z1"](z[:, None, None]), z[None, :, None])  # z1 on dim 1
        + _bern(sbn.decoder["x"](z[None, :, None]), x)
    )  # (z2, z1)
    post_z1 = log_joint.logsumexp(0) - log_joint.logsumexp((0, 1))  # log p(z1 | x)
    post_z2 = log_joint - log_joint.logsumexp(0, keepdim=True)  # log p(z2 | z1, x)
    with torch.no_grad():  # logits of q(z1 = 1 | x) and q(z2 = 1 | z1)
        sbn.encoder["z1"].weight.zero_()
        sbn.encoder["z1"].bias.fill_(float(post_z1[1] - post_z1[0]))
        a0, a1 = post_z2[1, 0] - post_z2[0, 0], post_z2[1, 1] - post_z2[0, 1]
        sbn.encoder["z2"].bias.fill_(float(a0))
        sbn.encoder["z2"].weight.fill_(float(a1 - a0))
    log_w = sbn.log_weights(x, 50)
    assert torch.allclose(log_w, log_joint.logsumexp((0, 1)).expand_as(log_w), atol=1e-10)


def test_two_layer_sbn_caches_both_sites_with_jsa():
    x = (torch.rand(12, 10) < 0.3).double()
    sbn = TwoLayerSBN(10, 5, 3).double()
    jsa = JSA(num_data=12, num_particles=3)
    svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 0.01}), loss=jsa)
    for idx in torch.arange(12).split(6):
        assert math.isfinite(svi.step(x[idx], idx, 12))
    samples = jsa.samples()
    assert samples["z1"].shape == (12, 5) and samples["z2"].shape == (12, 3)
    assert set(torch.cat([samples["z1"], samples["z2"]], 1).unique().tolist()) <= {0.0, 1.0}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="z1_dim"):
        TwoLayerSBN(z1_dim=0)
    with pytest.raises(ValueError, match="name"):
        TwoLayerSBN(name="a$$$b")
    with pytest.raises(ValueError, match="arch"):
        bench.build_model("deep", 4, 2)
    with pytest.raises(ValueError, match="method"):
        bench.build_objective("vi", 4, 2, 10)
    with pytest.raises(SystemExit):
        bench.parse(["--methods", "jsa,nvil"])


# ----------------------------------------------------------------------------------------------
# The script


def test_smoke_run_writes_tables_and_resumes_exactly(data_root, tmp_path):
    common = ["--epochs", "2", "--num-train", "60", "--z-dim", "4", "--num-particles", "3",
              "--num-test", "12", "--eval-samples", "20", "--num-curve", "6",
              "--curve-samples", "5", "--batch-size", "20"]  # fmt: skip
    straight = tmp_path / "straight"
    results, pairs = bench.main(["--data", str(data_root), "--out", str(straight), "--quiet",
                                 "--tightness", "4", *common])  # fmt: skip
    assert len(results) == 9 and set(results.method) == set(bench.METHODS)
    assert set(results.arch) == set(bench.ARCHS) and (results.steps == 6).all()
    assert results.test_log_lik.lt(0).all() and results.se.gt(0).all()
    assert list(pairs.difference.unique()) == ["jsa - vimco", "jsa - rws"] and len(pairs) == 6
    for name in ("results.csv", "paired.csv", "tables.md", "curves.png", "settings.csv"):
        assert (straight / name).stat().st_size > 0
    tight = pd.read_csv(straight / "tightness.csv")
    assert len(tight) == 27 and set(tight.eval_samples) == {100, 1000, 5000}
    assert (tight.num_test == 4).all() and tight.log_lik.lt(0).all()
    # paired differences are the per-image differences of the runs' own files
    linear = {
        m: pd.read_csv(straight / "runs" / "linear" / m / "test_log_lik.csv")
        for m in ("jsa", "vimco")
    }
    assert (linear["jsa"].image == linear["vimco"].image).all()
    diff = linear["jsa"].log_lik - linear["vimco"].log_lik
    assert pairs["mean"].iloc[0] == pytest.approx(diff.mean())
    assert pairs.se.iloc[0] == pytest.approx(diff.std() / math.sqrt(len(diff)))
    # interrupted after one epoch by the budget, then resumed: the same runs
    resumed = tmp_path / "resumed"
    args = ["--data", str(data_root), "--out", str(resumed), "--quiet", "--archs", "linear"]
    first, _ = bench.main([*args, *common, "--budget", "1e-9"])
    assert (first.steps == 3).all()
    again, _ = bench.main([*args, *common])
    assert (again.steps == 6).all()
    for method in bench.METHODS:
        a = pd.read_csv(straight / "runs" / "linear" / method / "log.csv")
        b = pd.read_csv(resumed / "runs" / "linear" / method / "log.csv")
        pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))
    expected = results[results.arch == "linear"].test_log_lik.to_numpy()
    assert again.test_log_lik.to_numpy() == pytest.approx(expected, abs=1e-9)
