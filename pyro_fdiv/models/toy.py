r"""Toy targets and small latent generative models for the f-divergence experiments."""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar, cast

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

__all__ = [
    "BivariateGaussian",
    "FlowEncoder",
    "GaussianEncoder",
    "LatentGenerator",
    "mlp",
    "mode_shares",
    "ring_data",
    "ring_modes",
    "two_gaussians",
]


def two_gaussians() -> dist.MixtureSameFamily:
    r"""The f-GAN comparison target of [1]: :math:`0.3\,\mathcal{N}(1, 0.1^2) +
    0.7\,\mathcal{N}(2, 0.5^2)`.

    [1] M. Zhang et al. *Variational f-divergence minimization* (2019), section 4.4.
    """
    return dist.MixtureSameFamily(
        dist.Categorical(torch.tensor([0.3, 0.7])),
        dist.Normal(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.5])),
    )


def ring_modes(
    num_modes: int = 7, radius: float = 1.0, dim: int = 3, seed: int = 0
) -> torch.Tensor:
    """Centres of ``num_modes`` equally spaced modes on a circle, embedded in ``dim``-D space by
    a fixed random orthonormal map (Roth et al. 2017's ring), shape ``(num_modes, dim)``."""
    angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    circle = radius * torch.stack([angle.cos(), angle.sin()], -1)
    if dim == 2:
        return circle
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64))
    return circle @ basis.T


def ring_data(num_data: int, sd: float = 0.05, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """``num_data`` samples of the ring mixture (equal weights, isotropic ``sd``)."""
    centres = ring_modes(seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    which = torch.randint(len(centres), (num_data,), generator=generator)
    noise = sd * torch.randn(num_data, centres.shape[1], generator=generator, dtype=torch.float64)
    return centres[which] + noise


def mode_shares(samples: torch.Tensor, centres: torch.Tensor, radius: float) -> torch.Tensor:
    """Fraction of ``samples`` within ``radius`` of each centre, shape ``(num_modes,)``."""
    dist_to = torch.cdist(samples.to(centres), centres)
    nearest = dist_to.argmin(-1)
    near = dist_to.min(-1).values <= radius
    return torch.stack([(near & (nearest == k)).double().mean() for k in range(len(centres))])


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A multilayer perceptron with ``activation`` between the linear layers."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    r""":math:`q_\phi(z \mid x) = \mathcal{N}(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2)` from an
    MLP with ``hidden`` units per layer."""

    def __init__(
        self, x_dim: int, z_dim: int, hidden: list[int], activation: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.net = mlp([x_dim, *hidden, 2 * z_dim], activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[..., : self.z_dim], nn.functional.softplus(out[..., self.z_dim :]) + 1e-4

    def q(self, x: torch.Tensor) -> dist.TorchDistribution:
        r"""The distribution :math:`q_\phi(z \mid x)`, batch shape ``x.shape[:-1]``."""
        loc, scale = self(x)
        return dist.Normal(loc, scale).to_event(1)


class FlowEncoder(nn.Module):
    r"""
    A normalizing-flow encoder: the :class:`GaussianEncoder`'s
    :math:`\mathcal{N}(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2)` pushed through
    ``num_flows`` rational-quadratic spline autoregressive transforms conditioned on :math:`x`
    (Durkan et al. 2019; Pyro's ``conditional_spline_autoregressive``), with the coordinates
    reversed between them. Reparameterized, with an exact ``log_prob``, so it drops in wherever
    the Gaussian encoder does; it can represent the non-Gaussian posteriors
    :math:`p_\theta(z \mid x)` of a decoder that is piecewise constant in :math:`z` (a model
    of separated modes), whose Gaussian approximation leaves a large gap in the bound.

    :param int x_dim: data (context) dimension.
    :param int z_dim: latent dimension.
    :param list hidden: hidden layer sizes of the Gaussian base's MLP.
    :param int num_flows: number of spline transforms.
    :param list flow_hidden: hidden layer sizes of each transform's autoregressive network.
    :param int count_bins: spline segments per coordinate.
    :param float bound: the splines act on :math:`[-b, b]` per coordinate, identity outside.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: list[int],
        activation: type[nn.Module] = nn.ReLU,
        num_flows: int = 2,
        flow_hidden: tuple[int, ...] = (64, 64),
        count_bins: int = 8,
        bound: float = 4.0,
    ) -> None:
        super().__init__()
        self.base = GaussianEncoder(x_dim, z_dim, hidden, activation)
        self.flows = nn.ModuleList(
            T.conditional_spline_autoregressive(
                z_dim, x_dim, hidden_dims=list(flow_hidden), count_bins=count_bins, bound=bound
            )
            for _ in range(num_flows)
        )
        self.register_buffer("reverse", torch.arange(z_dim - 1, -1, -1))

    def q(self, x: torch.Tensor) -> dist.TorchDistribution:
        r"""The distribution :math:`q_\phi(z \mid x)`, batch shape ``x.shape[:-1]``."""
        transforms = []
        for i, flow in enumerate(self.flows):
            if i:
                transforms.append(T.Permute(self.reverse))
            transforms.append(flow)
        base = self.base.q(x)
        return dist.ConditionalTransformedDistribution(base, transforms).condition(x)


class LatentGenerator(nn.Module):
    r"""
    A latent generative model with a deterministic decoder mean,
    :math:`z \sim \mathcal{N}(0, I)`, :math:`x = \mu_\theta(z)`, written for Pyro with a Gaussian
    observation :math:`\mathcal{N}(x \mid \mu_\theta(z), 1)` whose scale
    :class:`~pyro_fdiv.inference.FDivergenceBound` replaces by the spread width, and an
    encoder guide :math:`q_\phi(z \mid x)` (Gaussian or a normalizing flow).

    :param int x_dim: data dimension.
    :param int z_dim: latent dimension.
    :param list hidden: hidden layer sizes of both networks.
    :param str encoder: ``"gaussian"`` (:class:`GaussianEncoder`) or ``"flow"``
        (:class:`FlowEncoder`).
    """

    ENCODERS: ClassVar[dict[str, type[GaussianEncoder] | type[FlowEncoder]]] = {
        "gaussian": GaussianEncoder,
        "flow": FlowEncoder,
    }

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: list[int],
        activation: type[nn.Module] = nn.ReLU,
        encoder: str = "gaussian",
    ) -> None:
        super().__init__()
        if encoder not in self.ENCODERS:
            raise ValueError(f"Expected encoder in {tuple(self.ENCODERS)}, actual {encoder!r}")
        self.z_dim = z_dim
        self.decoder = mlp([z_dim, *hidden, x_dim], activation)
        self.encoder = self.ENCODERS[encoder](x_dim, z_dim, hidden, activation)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        q = self.encoder.q(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q)

    @torch.no_grad()
    def sample(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, z)``: ``num_samples`` draws of the noise-free model :math:`x = \\mu_\\theta(z)`."""
        weight = cast(nn.Linear, self.decoder[0]).weight
        z = torch.randn(num_samples, self.z_dim, dtype=weight.dtype, device=weight.device)
        return self.decoder(z), z


class BivariateGaussian(nn.Module):
    r"""
    The joint :math:`z \sim \mathcal{N}(0, 1)`, :math:`x \mid z \sim \mathcal{N}(b + a z, s^2)`,
    whose marginal is :math:`\mathcal{N}(b, a^2 + s^2)` (the upper-bound model of [1],
    section 4.4), with an MLP encoder guide :math:`q_\phi(z \mid x)` (two hidden layers of 50).
    The exact posterior :math:`p(z \mid x)` is Gaussian with a mean linear in ``x``, so the
    encoder family contains it and the bound can be tight.
    """

    def __init__(
        self, hidden: int = 50, loc: float = 0.0, weight: float = 1.0, noise: float = 1.0
    ) -> None:
        super().__init__()
        self.joint = nn.ParameterDict(
            {
                "b": nn.Parameter(torch.tensor(float(loc))),
                "a": nn.Parameter(torch.tensor(float(weight))),
                "log_s": nn.Parameter(torch.tensor(math.log(noise))),
            }
        )
        self.encoder = GaussianEncoder(1, 1, [hidden, hidden], nn.Tanh)

    @property
    def mu(self) -> float:
        """Mean of the marginal :math:`p_\theta(x)`."""
        return self.joint["b"].item()

    @property
    def sigma(self) -> float:
        """Standard deviation of the marginal :math:`p_\theta(x)`."""
        return math.hypot(self.joint["a"].item(), self.joint["log_s"].exp().item())

    def model(self, x: torch.Tensor) -> None:
        pyro.module("joint", self.joint)
        b, a, s = self.joint["b"], self.joint["a"], self.joint["log_s"].exp()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(b.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(b + a * z, s), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        loc, scale = self.encoder(x[:, None])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc[:, 0], scale[:, 0]))
