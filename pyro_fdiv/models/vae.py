"""A small Bernoulli variational autoencoder written for :class:`pyro.infer.SVI`."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VAE", "Decoder", "Encoder"]


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {name} to be an int, actual {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Expected {name} >= 1, actual {value}")


class Encoder(nn.Module):
    r"""
    Amortized diagonal-Gaussian encoder :math:`q_\phi(z \mid x)`, a ``x_dim-hidden_dim-2×z_dim``
    multilayer perceptron with one ReLU hidden layer and two linear heads:

    .. math::

        h = \mathrm{relu}(W_1 x + b_1), \qquad
        \mu = W_\mu h + b_\mu, \qquad
        \sigma = \mathrm{softplus}(W_\sigma h + b_\sigma) + \sigma_{\min}.

    ReLU (rather than the tanh of Burda et al.) trains fast with Adam and is what Pyro's
    VAE tutorial uses; the softplus keeps :math:`\sigma` smooth and positive and the floor
    :math:`\sigma_{\min}` keeps :math:`\log \sigma` finite.

    :param int x_dim: dimension of an observation.
    :param int hidden_dim: width of the hidden layer.
    :param int z_dim: dimension of the latent code.
    :param float min_scale: floor :math:`\sigma_{\min}` added to the softplus output.
    """

    def __init__(
        self, x_dim: int = 784, hidden_dim: int = 400, z_dim: int = 20, min_scale: float = 1e-4
    ) -> None:
        for name, value in (("x_dim", x_dim), ("hidden_dim", hidden_dim), ("z_dim", z_dim)):
            _check_positive_int(name, value)
        if not min_scale >= 0:
            raise ValueError(f"Expected min_scale >= 0, actual {min_scale}")
        super().__init__()
        self.min_scale = min_scale
        self.fc_hidden = nn.Linear(x_dim, hidden_dim)
        self.fc_loc = nn.Linear(hidden_dim, z_dim)
        self.fc_scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param torch.Tensor x: observations of shape ``batch_shape + (x_dim,)``.
        :returns: ``(loc, scale)``, each of shape ``batch_shape + (z_dim,)``.
        :rtype: tuple
        """
        hidden = F.relu(self.fc_hidden(x))
        loc = self.fc_loc(hidden)
        scale = F.softplus(self.fc_scale(hidden)) + self.min_scale
        return loc, scale


class Decoder(nn.Module):
    r"""
    Bernoulli decoder :math:`p_\theta(x \mid z)`, a ``z_dim-hidden_dim-x_dim`` multilayer
    perceptron with one ReLU hidden layer that returns the Bernoulli logits.

    :param int z_dim: dimension of the latent code.
    :param int hidden_dim: width of the hidden layer.
    :param int x_dim: dimension of an observation.
    """

    def __init__(self, z_dim: int = 20, hidden_dim: int = 400, x_dim: int = 784) -> None:
        for name, value in (("z_dim", z_dim), ("hidden_dim", hidden_dim), ("x_dim", x_dim)):
            _check_positive_int(name, value)
        super().__init__()
        self.fc_hidden = nn.Linear(z_dim, hidden_dim)
        self.fc_logits = nn.Linear(hidden_dim, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """
        :param torch.Tensor z: latent codes of shape ``batch_shape + (z_dim,)``; any leading
            (e.g. particle) dimensions are kept.
        :returns: Bernoulli logits of shape ``batch_shape + (x_dim,)``.
        :rtype: torch.Tensor
        """
        return self.fc_logits(F.relu(self.fc_hidden(z)))


class VAE(nn.Module):
    r"""
    Variational autoencoder with a standard-normal prior and a Bernoulli likelihood
    [1], as a Pyro ``model``/``guide`` pair:

    .. math::

        p_\theta(x, z) = \mathcal{N}(z; 0, I)\, \mathrm{Bernoulli}(x; \sigma(f_\theta(z))),
        \qquad
        q_\phi(z \mid x) = \mathcal{N}(z; \mu_\phi(x), \mathrm{diag}\, \sigma_\phi(x)^2).

    Both programs put the batch in a plate named ``"data"`` (``dim=-1``), so the
    latent site ``"z"`` and the observed site ``"x"`` have batch shape ``(B,)`` and event
    shapes ``(z_dim,)`` and ``(x_dim,)``; vectorized particle plates may add leading
    dimensions. When ``num_data`` is given, the minibatch ``x`` is a subsample of a data set
    of that size and Pyro scales every site in the plate by ``num_data / B``.

    The networks are registered in Pyro's global param store as ``f"{name}_encoder"`` and
    ``f"{name}_decoder"``; give each instance trained in the same process its own ``name``:
    otherwise :func:`pyro.module` finds the first instance's parameters under those names and
    :class:`~pyro.infer.SVI` silently optimizes them instead of this instance's.

    **Example**::

        vae = VAE()
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                             loss=pyro.infer.Trace_ELBO())
        x = torch.bernoulli(torch.full((128, 784), 0.2))
        loss = svi.step(x, num_data=50000)

    **References**

    1. *Auto-Encoding Variational Bayes*,
       Diederik P. Kingma, Max Welling (2014)

    :param int x_dim: dimension of an observation.
    :param int z_dim: dimension of the latent code.
    :param int hidden_dim: width of the hidden layer of both networks.
    :param str name: prefix of the names under which the networks enter the param store.
    """

    def __init__(
        self, x_dim: int = 784, z_dim: int = 20, hidden_dim: int = 400, name: str = "vae"
    ) -> None:
        if not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"Expected name to be a non-empty str without '$$$', actual {name!r}")
        super().__init__()
        self.x_dim = x_dim
        self.z_dim = z_dim
        self.hidden_dim = hidden_dim
        self.name = name
        self.encoder = Encoder(x_dim, hidden_dim, z_dim)
        self.decoder = Decoder(z_dim, hidden_dim, x_dim)

    def _data_plate(self, x: torch.Tensor, num_data: int | None) -> pyro.plate:
        batch_size = x.shape[0]
        if num_data is None:
            return pyro.plate("data", batch_size, dim=-1, device=x.device)
        _check_positive_int("num_data", num_data)
        if num_data < batch_size:
            raise ValueError(
                f"Expected num_data >= batch size {batch_size}, actual num_data={num_data}"
            )
        # The minibatch already is the subsample: no randperm over the whole data set.
        subsample = torch.arange(batch_size, device=x.device)
        return pyro.plate("data", num_data, dim=-1, subsample=subsample, device=x.device)

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        r"""
        Generative model :math:`p_\theta(x, z)`.

        :param torch.Tensor x: binary observations of shape ``(B, x_dim)``.
        :param int num_data: size of the full data set, if ``x`` is a minibatch of it.
        """
        pyro.module(f"{self.name}_decoder", self.decoder)
        with self._data_plate(x, num_data):
            prior_loc = x.new_zeros((*x.shape[:-1], self.z_dim))
            prior_scale = x.new_ones((*x.shape[:-1], self.z_dim))
            z = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        r"""
        Amortized variational posterior :math:`q_\phi(z \mid x)`.

        :param torch.Tensor x: binary observations of shape ``(B, x_dim)``.
        :param int num_data: size of the full data set, if ``x`` is a minibatch of it.
        """
        pyro.module(f"{self.name}_encoder", self.encoder)
        with self._data_plate(x, num_data):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
