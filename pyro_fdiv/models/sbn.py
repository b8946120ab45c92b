"""A sigmoid belief network: a Bernoulli-latent variational autoencoder for binary data."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SBN"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be an integer >= 1, actual {value!r}")
    return value


def _mlp(n_in: int, hidden_dim: int | None, n_out: int) -> nn.Module:
    if hidden_dim is None:
        return nn.Linear(n_in, n_out)
    return nn.Sequential(nn.Linear(n_in, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, n_out))


class SBN(nn.Module):
    r"""
    Sigmoid belief network [1] with one layer of binary latent units, and its amortized
    Bernoulli guide (a discrete "VAE"):

    .. math::

        p_\theta(x, z) = \prod_j \mathrm{Bernoulli}(z_j; \sigma(b_j))
            \prod_i \mathrm{Bernoulli}(x_i; \sigma(f_\theta(z)_i)), \qquad
        q_\phi(z \mid x) = \prod_j \mathrm{Bernoulli}(z_j; \sigma(g_\phi(x)_j)),

    with :math:`f_\theta, g_\phi` linear (``hidden_dim=None``: the classic SBN of Neal, with a
    learned prior bias :math:`b`) or with one ``tanh`` hidden layer. The latents cannot be
    reparameterized, so the ELBO's reparameterization gradient does not apply; train it with
    :class:`~pyro_fdiv.inference.JSA` (or score-function estimators).

    Both programs put the batch in a plate named ``"data"`` (``dim=-1``); with ``idx`` (the
    minibatch's indices in a data set of ``num_data`` points) the plate is subsampled at those
    indices, so that per-data-point state (JSA's chains) is addressed by them.

    Example::

        sbn = SBN(x_dim=784, z_dim=200)
        jsa = JSA(num_data=50000, num_particles=4)
        svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 3e-4}), loss=jsa)
        svi.step(x[idx], idx, 50000)
        log_px = sbn.log_likelihood(x_test, num_samples=1000)

    :param int x_dim: number of binary observed units.
    :param int z_dim: number of binary latent units.
    :param int hidden_dim: width of a ``tanh`` hidden layer in both networks, or ``None`` for
        linear ones.
    :param str name: prefix under which the networks enter Pyro's param store.

    **References**

    [1] R. Neal. *Connectionist learning of belief networks*. Artificial Intelligence, 1992.

    [2] A. Mnih, K. Gregor. *Neural variational inference and learning in belief networks*.
    ICML 2014.
    """

    def __init__(
        self, x_dim: int = 784, z_dim: int = 200, hidden_dim: int | None = None, name: str = "sbn"
    ) -> None:
        _check_positive_int("x_dim", x_dim)
        _check_positive_int("z_dim", z_dim)
        if hidden_dim is not None:
            _check_positive_int("hidden_dim", hidden_dim)
        if not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"Expected name to be a non-empty str without '$$$', actual {name!r}")
        super().__init__()
        self.x_dim, self.z_dim, self.hidden_dim, self.name = x_dim, z_dim, hidden_dim, name
        self.prior_logits = nn.Parameter(torch.zeros(z_dim))
        self.decoder = _mlp(z_dim, hidden_dim, x_dim)
        self.encoder = _mlp(x_dim, hidden_dim, z_dim)

    def _plate(self, x: torch.Tensor, idx: torch.Tensor | None, num_data: int | None):
        if idx is None:
            return pyro.plate("data", x.shape[0], dim=-1)
        if num_data is None:
            raise ValueError("Expected num_data (the data set's size) together with idx")
        if len(idx) != x.shape[0]:
            raise ValueError(f"Expected idx of length {x.shape[0]}, actual {len(idx)}")
        return pyro.plate("data", num_data, dim=-1, subsample=idx)

    def model(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None
    ) -> None:
        """
        :param torch.Tensor x: binary observations of shape ``(B, x_dim)``.
        :param torch.Tensor idx: their indices in the data set, or ``None``.
        :param int num_data: the data set's size (needed with ``idx``).
        """
        pyro.module(f"{self.name}_decoder", self.decoder)
        prior = pyro.param(f"{self.name}_prior_logits", self.prior_logits)
        with self._plate(x, idx, num_data):
            logits = prior.expand((x.shape[0], self.z_dim))
            z = pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None
    ) -> None:
        """The amortized guide :math:`q_\\phi(z \\mid x)`; arguments as :meth:`model`."""
        pyro.module(f"{self.name}_encoder", self.encoder)
        with self._plate(x, idx, num_data):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x)).to_event(1))

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        r""":math:`\log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)` for ``num_samples`` draws
        :math:`z_k \sim q_\phi(z \mid x)`, shape ``(num_samples, B)`` (plain tensor code)."""
        q_logits = self.encoder(x)
        z = torch.bernoulli(torch.sigmoid(q_logits).expand((num_samples, *q_logits.shape)))
        log_q = -F.binary_cross_entropy_with_logits(q_logits.expand_as(z), z, reduction="none").sum(
            -1
        )
        log_prior = -F.binary_cross_entropy_with_logits(
            self.prior_logits.expand_as(z), z, reduction="none"
        ).sum(-1)
        x_logits = self.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(
            x_logits, x.expand_as(x_logits), reduction="none"
        ).sum(-1)
        return log_prior + log_lik - log_q

    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, num_samples: int = 1000, chunk_size: int = 100
    ) -> torch.Tensor:
        r"""
        Importance-sampling estimate of :math:`\log p_\theta(x)` per data point with the guide
        as proposal [3],

        .. math::

            \log \frac{1}{K} \sum_{k=1}^K \frac{p_\theta(x, z_k)}{q_\phi(z_k \mid x)},
            \qquad z_k \sim q_\phi(z \mid x),

        a stochastic lower bound whose expectation increases to :math:`\log p_\theta(x)` with
        :math:`K` (``num_samples``), computed ``chunk_size`` samples at a time.

        [3] Y. Burda, R. Grosse, R. Salakhutdinov. *Importance weighted autoencoders*. 2016.
        """
        _check_positive_int("num_samples", num_samples)
        total: torch.Tensor | None = None
        done = 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            chunk = torch.logsumexp(self.log_weights(x, k), dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            done += k
        assert total is not None  # num_samples >= 1: the loop ran
        return total - math.log(num_samples)
