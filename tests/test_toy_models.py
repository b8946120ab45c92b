"""The toy latent generative model's encoders: densities that integrate to one and agree with
their samples."""

import pytest
import torch

from pyro_fdiv.models.toy import FlowEncoder, GaussianEncoder, LatentGenerator


def _perturbed_flow_encoder(seed: int = 0) -> FlowEncoder:
    torch.manual_seed(seed)
    encoder = FlowEncoder(3, 2, [16], count_bins=6, bound=3.0).double()
    with torch.no_grad():  # splines far from the identity at which they are initialized
        for p in encoder.flows.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder


def _grid(limit: float = 8.0, num: int = 401) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(-limit, limit, num, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return zz, (axis[1] - axis[0]).item() ** 2


@pytest.mark.parametrize("encoder_cls", [GaussianEncoder, FlowEncoder])
def test_encoder_density_integrates_to_one(encoder_cls):
    encoder = (
        _perturbed_flow_encoder() if encoder_cls is FlowEncoder else GaussianEncoder(3, 2, [16])
    ).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    zz, cell = _grid()
    with torch.no_grad():
        log_q = torch.stack([encoder.q(row.expand(len(zz), 3)).log_prob(zz) for row in x])
    mass = log_q.exp().sum(-1) * cell
    assert mass.numpy() == pytest.approx([1.0, 1.0, 1.0], abs=2e-3)


def test_flow_encoder_samples_follow_its_density():
    encoder = _perturbed_flow_encoder(1)
    x = torch.randn(1, 3, dtype=torch.float64)
    zz, cell = _grid()
    with torch.no_grad():
        density = encoder.q(x.expand(len(zz), 3)).log_prob(zz).exp() * cell
        mean = (density[:, None] * zz).sum(0)
        second = (density[:, None] * zz**2).sum(0)
        z = encoder.q(x.expand(40_000, 3)).sample()
    se = ((second - mean**2) / len(z)).sqrt()
    assert (z.mean(0) - mean).abs().max() < 4 * se.max()
    # not the base Gaussian: the splines moved the mean by many standard errors
    with torch.no_grad():
        base_mean = encoder.base(x)[0][0]
    assert (base_mean - mean).abs().max() > 20 * se.max()


def test_flow_encoder_is_reparameterized():
    encoder = _perturbed_flow_encoder()
    x = torch.randn(5, 3, dtype=torch.float64)
    z = encoder.q(x).rsample()
    assert z.shape == (5, 2)
    z.sum().backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_latent_generator_names_its_encoders():
    assert isinstance(LatentGenerator(3, 2, [8], encoder="flow").encoder, FlowEncoder)
    with pytest.raises(ValueError, match="encoder in \\('gaussian', 'flow'\\)"):
        LatentGenerator(3, 2, [8], encoder="maf")
