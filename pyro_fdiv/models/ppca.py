"""Probabilistic PCA: a local-latent model whose likelihood and its maximum are closed forms."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PPCA", "ppca_max_log_likelihood", "simulate_ppca"]


class PPCA(nn.Module):
    r"""
    Probabilistic PCA (Tipping & Bishop [1]) with an amortized mean-field Gaussian guide:

    .. math::

        z_i \sim \mathcal{N}(0, I_d), \qquad
        x_i \mid z_i \sim \mathcal{N}(W z_i + b, \sigma^2 I_D), \qquad
        q(z_i \mid x_i) = \mathcal{N}(A x_i + c, \operatorname{diag}(s)^2).

    The marginal :math:`p(x) = \mathcal{N}(b, W W^\top + \sigma^2 I)` is exact
    (:meth:`log_likelihood`) and so is its maximum over :math:`W, b, \sigma`
    (:func:`ppca_max_log_likelihood`), which makes the model a yardstick for objectives.

    :param int x_dim: observed dimension :math:`D`.
    :param int z_dim: latent dimension :math:`d`.
    :param str name: prefix of the parameter names in Pyro's param store.

    **References**

    [1] M. Tipping, C. Bishop. *Probabilistic Principal Component Analysis*. JRSS B, 1999.
    """

    def __init__(self, x_dim: int, z_dim: int, name: str = "ppca"):
        super().__init__()
        self.x_dim, self.z_dim, self.name = x_dim, z_dim, name
        self.decoder = nn.Linear(z_dim, x_dim)
        self.raw_noise = nn.Parameter(torch.tensor(0.0))
        self.encoder = nn.Linear(x_dim, z_dim)
        self.raw_scale = nn.Parameter(torch.zeros(z_dim))

    @property
    def noise(self) -> torch.Tensor:
        """Observation noise standard deviation :math:`\\sigma`."""
        return F.softplus(self.raw_noise) + 1e-4

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.module(self.name, self)
        batch = x.shape[0]
        subsample = None if num_data is None else torch.arange(batch, device=x.device)
        with pyro.plate("data", num_data or batch, subsample=subsample):
            prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(self.decoder(z), self.noise).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.module(self.name, self)
        batch = x.shape[0]
        subsample = None if num_data is None else torch.arange(batch, device=x.device)
        with pyro.plate("data", num_data or batch, subsample=subsample):
            scale = F.softplus(self.raw_scale) + 1e-4
            pyro.sample("z", dist.Normal(self.encoder(x), scale).to_event(1))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact :math:`\\log p(x_i)` per data point."""
        w = self.decoder.weight
        cov = w @ w.T + self.noise**2 * torch.eye(self.x_dim, dtype=w.dtype, device=w.device)
        return dist.MultivariateNormal(self.decoder.bias, covariance_matrix=cov).log_prob(x)


def ppca_max_log_likelihood(x: torch.Tensor, z_dim: int) -> float:
    r"""
    The maximum over :math:`W, b, \sigma` of the average PPCA log-likelihood of ``x``:

    .. math::

        -\tfrac12\Big[D \log 2\pi + \sum_{j \le d} \log\lambda_j + (D - d)\log\sigma^2_{ML}
        + D\Big], \qquad \sigma^2_{ML} = \frac{1}{D - d}\sum_{j > d} \lambda_j,

    with :math:`\lambda_j` the eigenvalues of the sample covariance, largest first [1].
    """
    n, d_x = x.shape
    centred = x - x.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / n).flip(0)
    sigma2 = eig[z_dim:].mean()
    log_det = eig[:z_dim].log().sum() + (d_x - z_dim) * sigma2.log()
    return float(-0.5 * (d_x * math.log(2 * math.pi) + log_det + d_x))


def simulate_ppca(
    num_data: int, x_dim: int, z_dim: int, noise: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """Draw a data set from a random PPCA model (deterministic given ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(x_dim, z_dim, generator=gen) * 1.5
    z = torch.randn(num_data, z_dim, generator=gen)
    return z @ w.T + noise * torch.randn(num_data, x_dim, generator=gen)
