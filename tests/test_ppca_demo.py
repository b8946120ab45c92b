"""PPCA's closed forms and the demo command."""

import pyro
import pytest
import torch

from pyro_fdiv.cli import main
from pyro_fdiv.inference import IWAE
from pyro_fdiv.models.ppca import PPCA, ppca_max_log_likelihood, simulate_ppca


def test_ppca_maximum_is_attained_by_the_tipping_bishop_solution():
    x = simulate_ppca(400, x_dim=6, z_dim=2, seed=1).double()
    best = ppca_max_log_likelihood(x, 2)
    net = PPCA(6, 2).double()
    centred = x - x.mean(0)
    eig, vec = torch.linalg.eigh(centred.T @ centred / len(x))
    eig, vec = eig.flip(0), vec.flip(1)
    sigma2 = eig[2:].mean()
    with torch.no_grad():
        net.decoder.weight.copy_(vec[:, :2] * (eig[:2] - sigma2).sqrt())
        net.decoder.bias.copy_(x.mean(0))
        net.raw_noise.copy_(torch.log(torch.expm1(sigma2.sqrt() - 1e-4)))
        at_mle = net.log_likelihood(x).mean().item()
        assert at_mle == pytest.approx(best, rel=1e-10)
        net.decoder.weight.mul_(1.1)  # any other W does worse
        assert net.log_likelihood(x).mean().item() < best - 1e-3


def test_ppca_exact_guide_makes_iwae_exact():
    x = simulate_ppca(50, x_dim=4, z_dim=2, seed=2).double()
    net = PPCA(4, 2).double()
    # make the posterior diagonal: W with orthogonal columns, then set the exact encoder
    with torch.no_grad():
        net.decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
        s2 = net.noise**2
        w = net.decoder.weight
        post_cov = torch.linalg.inv(torch.eye(2) + w.T @ w / s2)
        net.encoder.weight.copy_(post_cov @ w.T / s2)
        net.encoder.bias.copy_(-(post_cov @ w.T / s2) @ net.decoder.bias)
        net.raw_scale.copy_(torch.log(torch.expm1(post_cov.diagonal().sqrt() - 1e-4)))
        loss = IWAE(num_particles=3).loss(net.model, net.guide, x)
        assert loss == pytest.approx(-net.log_likelihood(x).sum().item(), rel=1e-10)


def test_demo_smoke(capsys, tmp_path):
    torch.set_default_dtype(torch.float32)
    main(["demo", "--smoke", "--out", str(tmp_path / "demo.csv")])
    out = capsys.readouterr().out
    assert "closed-form maximum" in out and "iwae-dreg" in out
    assert (tmp_path / "demo.csv").read_text().count("\n") == 5
    pyro.clear_param_store()
