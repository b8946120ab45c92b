r"""
Variational autoencoders for binarized images, written as Pyro ``model``/``guide`` pairs that
every objective of :mod:`pyro_fdiv.inference` accepts unchanged.

- :class:`VAE` with a Bernoulli decoder (the default), or a Gaussian decoder with a fixed
  observation scale (``likelihood="normal"``, for :class:`~pyro_fdiv.inference.FDivergenceBound`,
  which replaces the scale by its spread width), and a diagonal-Gaussian encoder or an implicit
  noise-input encoder (``encoder="implicit"``, for :class:`~pyro_fdiv.inference.AVB`).
- The papers' architectures as presets (:data:`ARCHITECTURES`): Burda et al.'s two layers of 200
  ``tanh`` units with 50 latents (``"iwae"``) and the BB-α paper's one layer of 400 (``"bbalpha"``).
- A Bernoulli-latent model for JSA is :class:`pyro_fdiv.models.sbn.SBN`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import cast

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_fdiv.inference.implicit import implicit_sample
from pyro_fdiv.models.toy import mlp
from pyro_fdiv.util import check_integer

__all__ = ["ARCHITECTURES", "VAE", "Decoder", "Encoder", "ImplicitEncoder"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}

#: The papers' architectures as keyword arguments of :class:`VAE`, by name.
ARCHITECTURES = {
    # Burda, Grosse, Salakhutdinov (2016), one stochastic layer: 784-200-200-50 (tanh).
    "iwae": {"z_dim": 50, "hidden_dim": (200, 200), "activation": "tanh"},
    # Li & Turner (2016) / Hernández-Lobato et al. (2016): one hidden layer of 400.
    "bbalpha": {"z_dim": 50, "hidden_dim": (400,), "activation": "relu"},
    # the package's small default (Pyro's VAE tutorial size).
    "small": {"z_dim": 20, "hidden_dim": (400,), "activation": "relu"},
}


def _hidden(hidden_dim: int | Sequence[int]) -> tuple[int, ...]:
    if not isinstance(hidden_dim, int | Sequence):
        raise TypeError(
            f"Expected hidden_dim to be an int or a sequence of ints, actual {hidden_dim!r}"
        )
    sizes = (hidden_dim,) if isinstance(hidden_dim, int) else tuple(hidden_dim)
    if not sizes:
        raise ValueError("Expected at least one hidden layer, actual hidden_dim=()")
    for size in sizes:
        check_integer("hidden_dim", size, 1)
    return sizes


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Expected activation in {sorted(ACTIVATIONS)}, actual {name!r}")
    return ACTIVATIONS[name]


def _trunk(n_in: int, hidden: tuple[int, ...], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers with ``activation`` after each: ``n_in → hidden[0] → … → hidden[-1]``."""
    return nn.Sequential(*mlp([n_in, *hidden], activation), activation())


class Encoder(nn.Module):
    r"""
    Amortized diagonal-Gaussian encoder :math:`q_\phi(z \mid x)`: a multilayer perceptron
    (``hidden_dim`` units per layer) and two linear heads,

    .. math::

        \mu = W_\mu h(x) + b_\mu, \qquad
        \sigma = \mathrm{softplus}(W_\sigma h(x) + b_\sigma) + \sigma_{\min}.

    The softplus keeps :math:`\sigma` smooth and positive and the floor :math:`\sigma_{\min}`
    keeps :math:`\log \sigma` finite.

    :param int x_dim: dimension of an observation.
    :param hidden_dim: width of the hidden layer, or a sequence of widths.
    :param int z_dim: dimension of the latent code.
    :param float min_scale: floor :math:`\sigma_{\min}` added to the softplus output.
    :param str activation: ``"relu"``, ``"tanh"`` or ``"softplus"``.
    """

    def __init__(
        self,
        x_dim: int = 784,
        hidden_dim: int | Sequence[int] = 400,
        z_dim: int = 20,
        min_scale: float = 1e-4,
        activation: str = "relu",
    ) -> None:
        check_integer("x_dim", x_dim, 1)
        check_integer("z_dim", z_dim, 1)
        hidden = _hidden(hidden_dim)
        if not min_scale >= 0:
            raise ValueError(f"Expected min_scale >= 0, actual {min_scale}")
        super().__init__()
        self.min_scale = min_scale
        self.hidden = _trunk(x_dim, hidden, _activation(activation))
        self.fc_loc = nn.Linear(hidden[-1], z_dim)
        self.fc_scale = nn.Linear(hidden[-1], z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param torch.Tensor x: observations of shape ``batch_shape + (x_dim,)``.
        :returns: ``(loc, scale)``, each of shape ``batch_shape + (z_dim,)``.
        """
        hidden = self.hidden(x)
        return self.fc_loc(hidden), F.softplus(self.fc_scale(hidden)) + self.min_scale


class ImplicitEncoder(nn.Module):
    r"""
    Implicit encoder for adversarial variational Bayes: a sample is a deterministic function
    of the observation and of noise :math:`\epsilon \sim \mathcal{N}(0, I)`,

    .. math::

        h = \mathrm{MLP}_\phi([x, \epsilon]), \qquad
        z = g_\phi(x, \epsilon) = W_\mu h + \mathrm{softplus}(W_s h) \odot A \epsilon,

    where the linear map :math:`A` of the noise, scaled elementwise by a function of
    :math:`(x, \epsilon)`, gives a Gaussian-like start and the MLP on the concatenation makes
    :math:`q_\phi(z \mid x)` any distribution; its density is never needed (Mescheder et al.
    2017, section 3).

    :param int x_dim: dimension of an observation.
    :param hidden_dim: hidden width(s).
    :param int z_dim: dimension of the latent code.
    :param int noise_dim: dimension of :math:`\epsilon` (default ``z_dim``).
    :param str activation: hidden activation.
    """

    def __init__(
        self,
        x_dim: int = 784,
        hidden_dim: int | Sequence[int] = 400,
        z_dim: int = 20,
        noise_dim: int | None = None,
        activation: str = "relu",
    ) -> None:
        check_integer("x_dim", x_dim, 1)
        check_integer("z_dim", z_dim, 1)
        noise_dim = z_dim if noise_dim is None else check_integer("noise_dim", noise_dim, 1)
        hidden = _hidden(hidden_dim)
        super().__init__()
        self.noise_dim = noise_dim
        self.hidden = _trunk(x_dim + noise_dim, hidden, _activation(activation))
        self.fc_loc = nn.Linear(hidden[-1], z_dim)
        self.fc_noise = nn.Linear(hidden[-1], z_dim)
        self.noise_to_z = nn.Linear(noise_dim, z_dim, bias=False)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """
        :param torch.Tensor x: observations, ``batch_shape + (x_dim,)``.
        :param torch.Tensor eps: noise, ``sample_shape + batch_shape + (noise_dim,)``.
        :returns: latent samples of shape ``sample_shape + batch_shape + (z_dim,)``.
        """
        x = x.expand((*eps.shape[:-1], x.shape[-1]))
        hidden = self.hidden(torch.cat([x, eps], dim=-1))
        return self.fc_loc(hidden) + F.softplus(self.fc_noise(hidden)) * self.noise_to_z(eps)


class Decoder(nn.Module):
    r"""
    Decoder :math:`z \mapsto` pixel logits: a multilayer perceptron with ``hidden_dim`` units per
    layer. The Bernoulli likelihood uses the logits, the Gaussian one their sigmoid as mean.

    :param int z_dim: dimension of the latent code.
    :param hidden_dim: hidden width(s).
    :param int x_dim: dimension of an observation.
    :param str activation: hidden activation.
    """

    def __init__(
        self,
        z_dim: int = 20,
        hidden_dim: int | Sequence[int] = 400,
        x_dim: int = 784,
        activation: str = "relu",
    ) -> None:
        check_integer("z_dim", z_dim, 1)
        check_integer("x_dim", x_dim, 1)
        hidden = _hidden(hidden_dim)
        super().__init__()
        self.hidden = _trunk(z_dim, hidden, _activation(activation))
        self.fc_logits = nn.Linear(hidden[-1], x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """
        :param torch.Tensor z: latent codes of shape ``batch_shape + (z_dim,)``; any leading
            (e.g. particle) dimensions are kept.
        :returns: logits of shape ``batch_shape + (x_dim,)``.
        """
        return self.fc_logits(self.hidden(z))


class VAE(nn.Module):
    r"""
    Variational autoencoder with a standard-normal prior [1], as a Pyro ``model``/``guide`` pair:

    .. math::

        p_\theta(x, z) = \mathcal{N}(z; 0, I)\, p_\theta(x \mid z), \qquad
        q_\phi(z \mid x) = \mathcal{N}(z; \mu_\phi(x), \mathrm{diag}\, \sigma_\phi(x)^2),

    with :math:`p_\theta(x \mid z) = \mathrm{Bernoulli}(x; \mathrm{sigmoid}(f_\theta(z)))`
    (``likelihood="bernoulli"``) or :math:`\mathcal{N}(x; \mathrm{sigmoid}(f_\theta(z)),
    s^2 I)` with a fixed scale :math:`s` (``likelihood="normal"``; the f-divergence bound
    replaces :math:`s` by its spread width). With ``encoder="implicit"`` the guide draws
    :math:`z = g_\phi(x, \epsilon)` (:class:`ImplicitEncoder`) through
    :func:`~pyro_fdiv.inference.implicit_sample`: it has no density, so only
    :class:`~pyro_fdiv.inference.AVB` trains it.

    Both programs put the batch in a plate named ``"data"`` (``dim=-1``): ``"z"`` and ``"x"``
    have batch shape ``(B,)``; vectorized particle plates may add leading dimensions. With
    ``num_data`` the minibatch is a subsample of a data set of that size (every site scaled by
    ``num_data / B``); ``idx`` gives its rows in the data set (JSA caches one chain per row;
    without ``idx`` the rows are ``0..B-1``).

    The networks enter Pyro's param store as ``f"{name}_encoder"`` and ``f"{name}_decoder"``,
    with ``update_module_params=True``: after the param store is restored from a checkpoint, the
    next call puts the restored tensors into the modules. Give each instance trained in the same
    process its own ``name``.

    **Example**::

        vae = VAE(**ARCHITECTURES["iwae"])
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                             loss=IWAE(num_particles=5))
        loss = svi.step(x, num_data=50000)

    **References**

    1. *Auto-Encoding Variational Bayes*, Diederik P. Kingma, Max Welling (2014)

    :param int x_dim: dimension of an observation.
    :param int z_dim: dimension of the latent code.
    :param hidden_dim: hidden width(s) of both networks.
    :param str name: prefix of the names under which the networks enter the param store.
    :param str activation: ``"relu"``, ``"tanh"`` or ``"softplus"``.
    :param str likelihood: ``"bernoulli"`` or ``"normal"``.
    :param float obs_scale: the Gaussian decoder's fixed scale :math:`s`.
    :param str encoder: ``"gaussian"`` or ``"implicit"``.
    :param int noise_dim: the implicit encoder's noise dimension (default ``z_dim``).
    """

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 20,
        hidden_dim: int | Sequence[int] = 400,
        name: str = "vae",
        activation: str = "relu",
        likelihood: str = "bernoulli",
        obs_scale: float = 0.1,
        encoder: str = "gaussian",
        noise_dim: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"Expected name to be a non-empty str without '$$$', actual {name!r}")
        if likelihood not in ("bernoulli", "normal"):
            raise ValueError(f"Expected likelihood 'bernoulli' or 'normal', actual {likelihood!r}")
        if not obs_scale > 0:
            raise ValueError(f"Expected obs_scale > 0, actual {obs_scale}")
        if encoder not in ("gaussian", "implicit"):
            raise ValueError(f"Expected encoder 'gaussian' or 'implicit', actual {encoder!r}")
        super().__init__()
        self.x_dim, self.z_dim, self.name = x_dim, z_dim, name
        self.hidden_dim = hidden_dim
        self.likelihood, self.obs_scale, self.encoder_type = likelihood, obs_scale, encoder
        self.encoder: Encoder | ImplicitEncoder
        if encoder == "gaussian":
            self.encoder = Encoder(x_dim, hidden_dim, z_dim, activation=activation)
        else:
            self.encoder = ImplicitEncoder(x_dim, hidden_dim, z_dim, noise_dim, activation)
        self.decoder = Decoder(z_dim, hidden_dim, x_dim, activation)

    def _data_plate(
        self, x: torch.Tensor, num_data: int | None, idx: torch.Tensor | None
    ) -> pyro.plate:
        batch_size = x.shape[0]
        if num_data is None:
            if idx is not None:
                raise ValueError("Expected num_data (the data set's size) together with idx")
            return pyro.plate("data", batch_size, dim=-1, device=x.device)
        check_integer("num_data", num_data, 1)
        if num_data < batch_size:
            raise ValueError(
                f"Expected num_data >= batch size {batch_size}, actual num_data={num_data}"
            )
        if idx is None:  # the minibatch already is the subsample: no randperm over the data set
            idx = torch.arange(batch_size, device=x.device)
        elif idx.shape != (batch_size,):
            raise ValueError(f"Expected idx of shape ({batch_size},), actual {tuple(idx.shape)}")
        return pyro.plate("data", num_data, dim=-1, subsample=idx, device=x.device)

    def likelihood_dist(self, logits: torch.Tensor) -> dist.Distribution:
        """:math:`p_\\theta(x \\mid z)` from the decoder's output, one event per image."""
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=logits).to_event(1)
        return dist.Normal(torch.sigmoid(logits), self.obs_scale).to_event(1)

    def model(
        self, x: torch.Tensor, num_data: int | None = None, idx: torch.Tensor | None = None
    ) -> None:
        r"""
        Generative model :math:`p_\theta(x, z)`.

        :param torch.Tensor x: observations of shape ``(B, x_dim)``.
        :param int num_data: size of the full data set, if ``x`` is a minibatch of it.
        :param torch.Tensor idx: the minibatch's rows in the data set (with ``num_data``).
        """
        pyro.module(f"{self.name}_decoder", self.decoder, update_module_params=True)
        with self._data_plate(x, num_data, idx):
            prior_loc = x.new_zeros((*x.shape[:-1], self.z_dim))
            z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            pyro.sample("x", self.likelihood_dist(self.decoder(z)), obs=x)

    def guide(
        self, x: torch.Tensor, num_data: int | None = None, idx: torch.Tensor | None = None
    ) -> None:
        r"""
        Amortized variational posterior :math:`q_\phi(z \mid x)`; arguments as :meth:`model`.
        """
        pyro.module(f"{self.name}_encoder", self.encoder, update_module_params=True)
        with self._data_plate(x, num_data, idx):
            if self.encoder_type == "gaussian":
                loc, scale = self.encoder(x)
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))
                return
            encoder = cast(ImplicitEncoder, self.encoder)  # encoder_type == "implicit"
            noise = x.new_zeros((*x.shape[:-1], encoder.noise_dim))
            eps = pyro.sample(
                "eps", dist.Normal(noise, 1.0).to_event(1), infer={"is_auxiliary": True}
            )
            implicit_sample("z", self.encoder(x, eps), event_dim=1)

    def pyro_modules(self) -> dict[str, nn.Module]:
        """The networks by the names :meth:`model` and :meth:`guide` register them under with
        :func:`pyro.module` (``modules=`` of :func:`pyro_fdiv.checkpoint.restore`)."""
        return {f"{self.name}_encoder": self.encoder, f"{self.name}_decoder": self.decoder}

    def sync_params(self) -> None:
        """Put the param store's tensors into the networks (after a checkpoint was restored):
        what the next :meth:`model`/:meth:`guide` call does anyway, for direct network use."""
        for name, module in self.pyro_modules().items():
            pyro.module(name, module, update_module_params=True)

    def as_bernoulli(self) -> VAE:
        """The same networks (shared, not copied) read with a Bernoulli likelihood on the
        decoder's logits: how a Gaussian-decoder VAE is evaluated on binary data."""
        view = copy.copy(self)  # a shallow copy: same modules, parameters and names
        view.likelihood = "bernoulli"
        return view

    def gaussian_proposal(
        self, num_fit: int = 2000, widen: float = 1.0, shrinkage: float = 0.05
    ) -> Callable:
        r"""
        A guide with a density for importance sampling with an implicit encoder: per data point
        the defensive mixture (Hesterberg 1995)

        .. math::

            \tfrac12\, \mathcal{N}(m_n, c^2 S_n) + \tfrac12\, \mathcal{N}(m_n, 4 c^2\,
            \mathrm{diag}\, \hat\Sigma_n)

        of a full-covariance Gaussian fitted to ``num_fit`` draws of :math:`q_\phi(z \mid x_n)`
        (sample covariance shrunk towards its diagonal, :math:`S_n = (1 - \lambda)
        \hat\Sigma_n + \lambda\, \mathrm{diag}\, \hat\Sigma_n`, ``shrinkage`` :math:`=
        \lambda`) and a diagonal one twice as wide; ``widen`` :math:`= c` scales both. Any
        proposal keeps the estimate a stochastic lower bound on :math:`\log p_\theta(x_n)`;
        the closer it is to the model's posterior, the tighter. Each component alone fails
        somewhere: an AVB model's posteriors on binarized MNIST are strongly correlated (a
        diagonal fit alone gave -149.5 nats where the full one gives -111.3), while an encoder
        narrower than the posterior needs the wide one; the mixture's weights are at most twice
        those of the better component.

        The fit is made once per batch tensor and reused while the same tensor is passed (as
        :func:`~pyro_fdiv.evaluate.log_likelihood` does for its particle chunks); make a new
        proposal after training further. For the Gaussian encoder it returns :meth:`guide`.
        """
        if self.encoder_type == "gaussian":
            return self.guide
        check_integer("num_fit", num_fit, 2)
        if not widen > 0:
            raise ValueError(f"Expected widen > 0, actual {widen}")
        if not 0 <= shrinkage <= 1:
            raise ValueError(f"Expected 0 <= shrinkage <= 1, actual {shrinkage}")
        cache: dict[str, torch.Tensor] = {}

        def fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if cache.get("x") is not x:
                with torch.no_grad():
                    self.sync_params()
                    shape = (num_fit, *x.shape[:-1], self.encoder.noise_dim)
                    z = self.encoder(x, torch.randn(shape, dtype=x.dtype, device=x.device))
                    loc, centred = z.mean(0), z - z.mean(0)
                    cov = torch.einsum("s...i,s...j->...ij", centred, centred) / (num_fit - 1)
                    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
                    cov = (1 - shrinkage) * cov + torch.diag_embed(shrinkage * diag + 1e-8)
                    full = widen * torch.linalg.cholesky(cov)
                    wide = torch.diag_embed(2 * widen * (diag + 1e-8).sqrt())
                cache.update(x=x, loc=loc, scale_tril=torch.stack([full, wide], -3))
            return cache["loc"], cache["scale_tril"]

        def proposal(
            x: torch.Tensor, num_data: int | None = None, idx: torch.Tensor | None = None
        ) -> None:
            loc, scale_tril = fit(x)
            components = dist.MultivariateNormal(
                loc.unsqueeze(-2).expand(scale_tril.shape[:-1]), scale_tril=scale_tril
            )
            mixing = dist.Categorical(logits=loc.new_zeros(scale_tril.shape[:-2]))
            with self._data_plate(x, num_data, idx):
                pyro.sample("z", dist.MixtureSameFamily(mixing, components))

        return proposal

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Pixel means (probabilities) of ``num_samples`` images drawn from the model."""
        self.sync_params()
        weight = self.decoder.fc_logits.weight
        z = torch.randn(num_samples, self.z_dim, dtype=weight.dtype, device=weight.device)
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel means of the decoder at the encoder's mean (Gaussian) or one draw (implicit)."""
        self.sync_params()
        if self.encoder_type == "gaussian":
            z = self.encoder(x)[0]
        else:
            shape = (*x.shape[:-1], self.encoder.noise_dim)
            z = self.encoder(x, torch.randn(shape, dtype=x.dtype, device=x.device))
        return torch.sigmoid(self.decoder(z))
