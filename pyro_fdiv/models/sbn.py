"""Sigmoid belief networks: Bernoulli-latent variational autoencoders for binary data."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SBN", "TwoLayerSBN"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be an integer >= 1, actual {value!r}")
    return value


def _mlp(n_in: int, hidden_dim: int | None, n_out: int) -> nn.Module:
    if hidden_dim is None:
        return nn.Linear(n_in, n_out)
    return nn.Sequential(nn.Linear(n_in, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, n_out))


def _bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_i \log \mathrm{Bernoulli}(v_i; \sigma(l_i))` over the last dim."""
    logits, value = torch.broadcast_tensors(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def _draw(logits: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
    probs = torch.sigmoid(logits)
    if num_samples is not None:
        probs = probs.expand((num_samples, *logits.shape))
    return torch.bernoulli(probs)


class _BernoulliLatentModel(nn.Module):
    """What the sigmoid belief networks share: the param store's names, resuming, and the
    importance-sampling log-likelihood from :meth:`log_weights`."""

    name: str
    prior_logits: nn.Parameter
    encoder: nn.Module
    decoder: nn.Module

    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        raise NotImplementedError

    def _plate(self, x: torch.Tensor, idx: torch.Tensor | None, num_data: int | None):
        if idx is None:
            return pyro.plate("data", x.shape[0], dim=-1)
        if num_data is None:
            raise ValueError("Expected num_data (the data set's size) together with idx")
        if len(idx) != x.shape[0]:
            raise ValueError(f"Expected idx of length {x.shape[0]}, actual {len(idx)}")
        return pyro.plate("data", num_data, dim=-1, subsample=idx)

    def pyro_modules(self) -> dict[str, nn.Module]:
        """The networks by the names :meth:`model` and :meth:`guide` register them under with
        :func:`pyro.module` (``modules=`` of :func:`pyro_fdiv.checkpoint.restore`)."""
        return {f"{self.name}_encoder": self.encoder, f"{self.name}_decoder": self.decoder}

    def sync_params(self) -> None:
        """Make the networks and the prior use the param store's tensors, after a checkpoint
        was restored into the store (:func:`pyro_fdiv.checkpoint.restore` replaced them): the
        networks take the store's tensors, and the store takes :attr:`prior_logits` with the
        restored value, so that the module's own methods (:meth:`log_weights`) and the
        optimizer see the same tensors."""
        for name, module in self.pyro_modules().items():
            pyro.module(name, module, update_module_params=True)
        store = pyro.get_param_store()
        key = f"{self.name}_prior_logits"
        if key in store and store[key] is not self.prior_logits:
            with torch.no_grad():
                self.prior_logits.copy_(store[key])
            store[key] = self.prior_logits

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
        _check_positive_int("chunk_size", chunk_size)
        total = None
        done = 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            chunk = torch.logsumexp(self.log_weights(x, k), dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            done += k
        assert total is not None  # num_samples >= 1: the loop ran
        return total - math.log(num_samples)


class SBN(_BernoulliLatentModel):
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
        z = _draw(q_logits, num_samples)
        log_q = _bernoulli_log_prob(q_logits, z)
        log_prior = _bernoulli_log_prob(self.prior_logits, z)
        return log_prior + _bernoulli_log_prob(self.decoder(z), x) - log_q


class TwoLayerSBN(_BernoulliLatentModel):
    r"""
    Sigmoid belief network with two layers of binary latent units, :math:`z_2 \to z_1 \to x`
    (the "200-200" SBN of [1, 2]), and a guide of the same shape in the other direction:

    .. math::

        p_\theta(x, z_1, z_2) = \mathrm{Bernoulli}(z_2; \sigma(b))\,
            \mathrm{Bernoulli}(z_1; \sigma(W_2 z_2 + c_2))\,
            \mathrm{Bernoulli}(x; \sigma(W_1 z_1 + c_1)),

        q_\phi(z_1, z_2 \mid x) = \mathrm{Bernoulli}(z_1; \sigma(U_1 x + d_1))\,
            \mathrm{Bernoulli}(z_2; \sigma(U_2 z_1 + d_2)),

    every layer linear and factorized given the layer above (model) or below (guide), as in the
    SBN experiments of NVIL, VIMCO, RWS and JSA [1-4]. Plates, ``idx`` and ``num_data`` work as
    for :class:`SBN`; the latent sites are ``"z2"`` and ``"z1"`` (in the model's order), the
    networks ``decoder["z1"], decoder["x"]`` and ``encoder["z1"], encoder["z2"]``.

    Example::

        sbn = TwoLayerSBN(x_dim=784, z1_dim=200, z2_dim=200)
        svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 3e-4}),
                  loss=JSA(num_data=50000, num_particles=10))
        svi.step(x[idx], idx, 50000)
        log_px = sbn.log_likelihood(x_test, num_samples=1000)

    :param int x_dim: number of binary observed units.
    :param int z1_dim: number of binary latent units next to the data.
    :param int z2_dim: number of binary latent units in the top layer.
    :param str name: prefix under which the networks enter Pyro's param store.

    **References**

    [1] A. Mnih, K. Gregor. *Neural variational inference and learning in belief networks*.
    ICML 2014.

    [2] A. Mnih, D. Rezende. *Variational inference for Monte Carlo objectives*. ICML 2016.

    [3] J. Bornschein, Y. Bengio. *Reweighted wake-sleep*. ICLR 2015.

    [4] Z. Ou, Y. Song. *Joint stochastic approximation and its application to learning
    discrete latent variable models*. UAI 2020.
    """

    def __init__(
        self, x_dim: int = 784, z1_dim: int = 200, z2_dim: int = 200, name: str = "sbn2"
    ) -> None:
        _check_positive_int("x_dim", x_dim)
        _check_positive_int("z1_dim", z1_dim)
        _check_positive_int("z2_dim", z2_dim)
        if not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"Expected name to be a non-empty str without '$$$', actual {name!r}")
        super().__init__()
        self.decoder: nn.ModuleDict
        self.encoder: nn.ModuleDict
        self.x_dim, self.z1_dim, self.z2_dim, self.name = x_dim, z1_dim, z2_dim, name
        self.prior_logits = nn.Parameter(torch.zeros(z2_dim))
        self.decoder = nn.ModuleDict(
            {"z1": nn.Linear(z2_dim, z1_dim), "x": nn.Linear(z1_dim, x_dim)}
        )
        self.encoder = nn.ModuleDict(
            {"z1": nn.Linear(x_dim, z1_dim), "z2": nn.Linear(z1_dim, z2_dim)}
        )

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
            logits = prior.expand((x.shape[0], self.z2_dim))
            z2 = pyro.sample("z2", dist.Bernoulli(logits=logits).to_event(1))
            z1 = pyro.sample("z1", dist.Bernoulli(logits=self.decoder["z1"](z2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder["x"](z1)).to_event(1), obs=x)

    def guide(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None
    ) -> None:
        r"""The guide :math:`q_\phi(z_1 \mid x) q_\phi(z_2 \mid z_1)`; arguments as
        :meth:`model`."""
        pyro.module(f"{self.name}_encoder", self.encoder)
        with self._plate(x, idx, num_data):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=self.encoder["z1"](x)).to_event(1))
            pyro.sample("z2", dist.Bernoulli(logits=self.encoder["z2"](z1)).to_event(1))

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        r""":math:`\log p_\theta(x, z_{1k}, z_{2k}) - \log q_\phi(z_{1k}, z_{2k} \mid x)` for
        ``num_samples`` draws from the guide, shape ``(num_samples, B)`` (plain tensor code)."""
        q1_logits = self.encoder["z1"](x)
        z1 = _draw(q1_logits, num_samples)
        q2_logits = self.encoder["z2"](z1)
        z2 = _draw(q2_logits)
        log_q = _bernoulli_log_prob(q1_logits, z1) + _bernoulli_log_prob(q2_logits, z2)
        log_p = (
            _bernoulli_log_prob(self.prior_logits, z2)
            + _bernoulli_log_prob(self.decoder["z1"](z2), z1)
            + _bernoulli_log_prob(self.decoder["x"](z1), x)
        )
        return log_p - log_q
