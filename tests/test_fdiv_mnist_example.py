"""The f-divergence paper's MNIST recipe, ``examples/fdiv_mnist.py``: a smoke run's outputs, the
reverse run's start and resume, and the guide steps' skipped data density."""

import math
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_fdiv import data
from pyro_fdiv.inference import FDivergenceBound

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import fdiv_mnist

SHARED = Path(os.environ.get(data.DATA_ENV, Path(__file__).resolve().parents[2] / "shared/data"))
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist" / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"MNIST is not in {SHARED} (set ${data.DATA_ENV})",
)
BOUNDS = ["forward_kl_bound", "forward_kl_bound_k4", "reverse_kl_bound", "reverse_kl_bound_k4"]


def _argv(out):
    return ["--smoke", "--out", str(out), "--data", str(SHARED), "--no-progress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (2 forward-KL epochs, the reverse run from epoch 1 for 1 epoch)."""
    out = tmp_path_factory.mktemp("fdiv_mnist")
    return out, fdiv_mnist.main(_argv(out))


@needs_mnist
def test_smoke_outputs_and_reverse_start(smoke):
    out, table = smoke
    assert list(table.index) == ["forward_kl", "reverse_kl", "forward_kl@1"]
    fractions = table[[f"p{c}" for c in range(10)]]
    assert fractions.sum(axis=1).to_numpy() == pytest.approx([1.0] * 3)
    assert ((table.precision >= 0) & (table.precision <= 1)).all()
    for name in ("curves.png", "samples_forward_kl.png", "samples_reverse_kl.png"):
        assert (out / name).stat().st_size > 0
    results = pd.read_csv(out / "results.csv")
    assert list(results.run) == ["forward_kl", "reverse_kl"]
    forward = pd.read_csv(out / "forward_kl" / "log.csv")
    reverse = pd.read_csv(out / "reverse_kl" / "log.csv")
    assert list(forward.epoch) == [0, 1, 2] and list(reverse.epoch) == [0, 1]
    # the reverse run starts from the forward run's parameters after --init-epochs (1): the
    # measurements, drawn from their own seed, are those of the forward run's epoch 1
    measured = [*BOUNDS, "test_log_lik", "entropy", "confidence", "encoder_scale"]
    assert reverse.loc[0, measured].to_numpy() == pytest.approx(
        forward.loc[1, measured].to_numpy(), rel=1e-6
    )
    assert reverse.decoder_change[0] == 0 and reverse.decoder_change[1] > 0
    # upper bounds on divergences are nonnegative
    assert (forward[BOUNDS] > 0).all().all() and (reverse[BOUNDS] > 0).all().all()


@needs_mnist
def test_budget_stop_and_resume_repeat_the_log(smoke, tmp_path):
    """A reverse run (a tagged variant with the same settings) stopped by the budget after its
    start and resumed from its checkpoint repeats the uninterrupted run's log."""
    out, _ = smoke
    shutil.copytree(out / "forward_kl", tmp_path / "forward_kl")
    argv = [*_argv(tmp_path), "--runs", "reverse_kl", "--reverse-tag", "again"]
    assert fdiv_mnist.main([*argv, "--budget-minutes", "0"]).empty
    assert list(pd.read_csv(tmp_path / "reverse_kl-again" / "log.csv").epoch) == [0]
    table = fdiv_mnist.main(argv)
    assert list(table.index) == ["reverse_kl-again", "forward_kl@1"]
    resumed = pd.read_csv(tmp_path / "reverse_kl-again" / "log.csv").drop(columns="seconds")
    reverse = pd.read_csv(out / "reverse_kl" / "log.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(resumed, reverse)


def _linear_pair():
    torch.manual_seed(0)
    decoder, encoder = torch.nn.Linear(2, 4), torch.nn.Linear(4, 3)

    def model(y):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(y), 2), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(decoder(z), 1.0).to_event(1), obs=y)

    def guide(y):
        pyro.module("encoder", encoder)
        out = encoder(y)
        with pyro.plate("data", len(y)):
            scale = torch.nn.functional.softplus(out[:, 2:]).expand(len(y), 2)
            pyro.sample("z", dist.Normal(out[:, :2], scale).to_event(1))

    return model, guide, decoder, encoder, torch.rand(30, 4)


def test_guide_steps_without_log_p_hat_take_the_same_steps():
    """The reverse-KL bound's last term, -log p_hat(y), does not depend on the guide: the
    guide steps that skip it move the guide exactly as the full bound's do."""
    model, guide, _, encoder, train = _linear_pair()

    after = {}
    for cls in (FDivergenceBound, fdiv_mnist.PaperReverseKL):
        pyro.clear_param_store()
        start = {k: v.clone() for k, v in encoder.state_dict().items()}
        bound = cls("reverse_kl", data=train, spread=0.7, guide_steps=3, max_plate_nesting=1)
        pyro.set_rng_seed(1)
        bound.step_inner(model, guide, train[:10])
        after[cls] = {k: v.clone() for k, v in encoder.state_dict().items()}
        assert any(not torch.equal(start[k], after[cls][k]) for k in start)
        encoder.load_state_dict(start)
    for name, value in after[FDivergenceBound].items():
        torch.testing.assert_close(after[fdiv_mnist.PaperReverseKL][name], value)


def test_log_p_hat_scale_scales_only_that_gradient():
    """Appendix B's factor: the bound's value is unchanged and the model's gradient is
    A + scale * B (B the gradient through log p_hat), so it is affine in the scale."""
    model, guide, decoder, _, train = _linear_pair()
    values, grads = [], []
    for scale in (1.0, 0.5, 0.25):
        pyro.clear_param_store()
        bound = fdiv_mnist.PaperReverseKL(
            "reverse_kl", data=train, spread=0.7, max_plate_nesting=1, log_p_hat_scale=scale
        )
        pyro.set_rng_seed(2)
        loss = bound.differentiable_loss(model, guide, train[:10])
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, decoder.weight)[0])
    assert values == pytest.approx([values[0]] * 3, rel=1e-12)
    torch.testing.assert_close(grads[0] - grads[1], 2 * (grads[1] - grads[2]))
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="log_p_hat_scale"):
        fdiv_mnist.PaperReverseKL("reverse_kl", data=train, spread=0.7, log_p_hat_scale=0.0)


def test_isotropic_encoder_and_bad_arguments():
    encoder = fdiv_mnist.IsotropicEncoder(784, 16, 5, 20)
    loc, scale = encoder(torch.rand(3, 784, dtype=torch.float32).to(torch.get_default_dtype()))
    assert loc.shape == scale.shape == (3, 20)
    assert (scale == scale[:, :1]).all() and (scale > 0).all()
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in encoder.modules()) == 5
    with pytest.raises(ValueError, match="--init-epochs"):
        fdiv_mnist.parse_args(["--forward-epochs", "2", "--init-epochs", "3"])
    with pytest.raises(ValueError, match="--spread-variance"):
        fdiv_mnist.parse_args(["--spread-variance", "0"])


@pytest.mark.parametrize("z_dim", [0, 2, 6])
def test_linear_gaussian_reference_is_the_fixed_noise_ppca_density(z_dim):
    """The reference density equals a Gaussian with the training covariance's top ``z_dim``
    eigenvalues raised by sigma^2 and sigma^2 elsewhere (with z_dim = D: covariance + sigma^2 I)."""
    torch.manual_seed(0)
    train = torch.randn(200, 6) @ torch.randn(6, 6) + 1.0
    y = torch.randn(5, 6)
    sigma = 0.7
    cov = torch.cov(train.T)
    lam, u = torch.linalg.eigh(cov)
    lam, u = lam.flip(0), u.flip(1)
    full = u @ torch.diag(torch.cat([lam[:z_dim], torch.zeros(6 - z_dim)])) @ u.T
    expected = dist.MultivariateNormal(train.mean(0), full + sigma**2 * torch.eye(6)).log_prob(y)
    got = fdiv_mnist.linear_gaussian_log_lik(train, y, sigma, z_dim)
    torch.testing.assert_close(got, expected)
    if z_dim == 6:
        exact = dist.MultivariateNormal(train.mean(0), cov + sigma**2 * torch.eye(6))
        torch.testing.assert_close(got, exact.log_prob(y))


def test_one_image_reverse_kl_closed_forms():
    """KL(N(x, s^2) || p_hat) is 0 when p_hat is that image alone, and log 2 when p_hat has a
    second image far away (its component adds nothing where the model's draws fall)."""
    x = torch.rand(1, 20)
    far = torch.cat([x, x + 100.0])
    kl = fdiv_mnist.one_image_reverse_kl(x, x, 0.7)
    assert kl.item() == pytest.approx(0.0, abs=1e-9)
    kl = fdiv_mnist.one_image_reverse_kl(x, far, 0.7)
    assert kl.item() == pytest.approx(math.log(2), abs=1e-9)
