"""Adversarial variational Bayes: implicit guides trained against a discriminator."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import Delta
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.infer.elbo import ELBO
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.func import functional_call

from pyro_fdiv.inference.compiled import Compilable
from pyro_fdiv.inference.importance import (
    LogWeights,
    check_flag,
    checked_value,
    guess_max_plate_nesting,
    importance_trace,
    sample_sites,
)
from pyro_fdiv.util import check_integer, check_num_particles

__all__ = ["AVB", "Discriminator"]

#: Floor on the Monte Carlo standard deviations of adaptive contrast.
MIN_SCALE = 1e-8


class Discriminator(nn.Module):
    r"""
    The default discriminator :math:`T_\psi(x, z)`: a multilayer perceptron with ELU hidden
    layers on the concatenation of the latent features ``z`` and, for amortized guides over a
    data plate, the observed features ``x``, returning one logit per row. ELU keeps
    :math:`\nabla_z T` continuous, which the guide's gradient goes through.

    :param int z_dim: number of latent features.
    :param int x_dim: number of observed features (0: :math:`T(z)` only).
    :param hidden: widths of the hidden layers.
    """

    def __init__(self, z_dim: int, x_dim: int = 0, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.z_dim, self.x_dim = int(z_dim), int(x_dim)
        layers: list[nn.Module] = []
        width = self.z_dim + self.x_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ELU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param z: ``batch_shape + (z_dim,)``.
        :param x: ``batch_shape + (x_dim,)`` or ``None``.
        :returns: logits of shape ``batch_shape``.
        """
        h = z if x is None else torch.cat([z, x], dim=-1)
        return self.net(h).squeeze(-1)


class _Draw(NamedTuple):
    """One vectorized run of guide and model, reduced to ``(K,) + batch_shape`` terms."""

    weights: LogWeights  # the guide's density is not evaluated: log_w is log p(x, z)
    log_joint: torch.Tensor  # log p(x, z), every model site
    log_lik: torch.Tensor  # observed sites only
    log_jac: torch.Tensor  # log |d z / d zeta| of the latent sites' bijections
    z: torch.Tensor  # (K,) + batch_shape + (z_dim,): unconstrained latent features
    x: torch.Tensor | None  # (K,) + batch_shape + (x_dim,) observed features, amortized only


def _flatten(
    value: torch.Tensor,
    event_dim: int,
    plates: tuple[CondIndepStackFrame, ...],
    num_particles: int,
    max_plate_nesting: int,
    name: str,
) -> torch.Tensor:
    """A site's value as ``(K,) + batch_shape + (features,)``: the shared plates' dims kept,
    every other batch dim (a plate not shared by all sites) and the event flattened."""
    nb = max_plate_nesting + 1
    batch_ndim = value.dim() - event_dim
    if batch_ndim > nb:
        raise ValueError(
            f"Site '{name}' has batch shape {tuple(value.shape[:batch_ndim])}, with dims left of "
            f"the particle plate (max_plate_nesting={max_plate_nesting}). Declare event dims "
            "with .to_event(...), put batch dims in a pyro.plate, or raise max_plate_nesting."
        )
    batch = tuple(value.shape[:batch_ndim])
    v = value.reshape((1,) * (nb - batch_ndim) + batch + (-1,))
    target = list(v.shape)
    target[0] = num_particles
    for frame in plates:
        target[nb + frame.dim] = frame.size
    v = v.expand(target)
    keep = [nb + frame.dim for frame in plates]
    rest = [i for i in range(1, nb) if i not in keep]
    v = v.permute(0, *keep, *rest, nb)
    return v.reshape(num_particles, *(frame.size for frame in plates), -1)


def _describe(fn: Any) -> str:
    """``Independent(Bernoulli)`` for a distribution wrapped in ``.to_event``."""
    base = getattr(fn, "base_dist", None)
    return type(fn).__name__ + (f"({_describe(base)})" if base is not None else "")


class AVB(Compilable, ELBO):
    r"""
    Adversarial variational Bayes of Mescheder et al. [1]: trains guides whose density is
    unknown (neural samplers :math:`z = g_\phi(x, \epsilon)`, see
    :func:`~pyro_fdiv.inference.implicit_sample` and
    :class:`~pyro_fdiv.inference.AutoImplicit`) by estimating the log-density ratio that the ELBO
    needs with a discriminator :math:`T_\psi`.

    All latent sites are compared in the unconstrained coordinates
    :math:`\zeta = T_s^{-1}(z)` of the model's supports (``biject_to``), flattened per element
    of the plates that every site shares (one feature vector per data point of an amortized
    guide; one vector of all latents for global latents). The guide's own density is never
    evaluated: every guide site, implicit or explicit, is treated as a sample.

    **Without adaptive contrast** the discriminator separates guide samples from prior samples
    (the model run with its latents drawn from the prior and the same data),

    .. math::

        \max_\psi\; \mathbb{E}_{q_\phi(\zeta \mid x)} \log\sigma(T_\psi(x, \zeta))
        + \mathbb{E}_{p(\zeta)} \log(1 - \sigma(T_\psi(x, \zeta))),

    whose optimum is :math:`T^* = \log q_\phi(\zeta \mid x) - \log p(\zeta)` [1, Prop. 1], and
    the model and guide maximize

    .. math::

        \mathcal{L} = \mathbb{E}_{q_\phi}\big[\log p_\theta(x \mid z) - T_\psi(x, \zeta)\big].

    **With adaptive contrast** (the default) the guide's per-data-point mean :math:`\mu` and
    standard deviation :math:`\sigma` are estimated from the ``num_particles`` particles and
    not back-propagated, the discriminator separates :math:`\bar\zeta = (\zeta - \mu)/\sigma`
    from :math:`\eta \sim \mathcal{N}(0, I)`, so :math:`T^* = \log q(\zeta \mid x)
    - \log r(\zeta \mid x)` with :math:`r = \mathcal{N}(\mu, \operatorname{diag}\sigma^2)`, and

    .. math::

        \mathcal{L} = \mathbb{E}_{q_\phi}\Big[\log p_\theta(x, z)
        + \log\Big|\frac{\partial z}{\partial \zeta}\Big| - \log r(\zeta \mid x)
        - T_\psi(x, \bar\zeta)\Big],

    the log-Jacobian turning the density of :math:`\zeta` into that of :math:`z`. Without
    adaptive contrast it cancels between :math:`\log p(x, z)` and the prior's density over
    :math:`\zeta`, which leaves :math:`\log p(x \mid z) - T`; the parameters of the latent
    sites' prior then get no gradient, as in [1] (use adaptive contrast for learned priors).

    In both, :math:`T_\psi` enters the guide's gradient only through :math:`z` (its parameters
    are detached: the expected gradient through :math:`\psi`'s dependence on :math:`\phi` is
    zero at the optimum, [1, Prop. 2]); the discriminator is trained only by its own loss, with
    its own optimizer, on detached samples. :meth:`loss` returns :math:`-\mathcal{L}` summed
    over the batch (scaled by the subsample scale), an ELBO estimate, and changes no state;
    :meth:`differentiable_loss` its differentiable version; :meth:`loss_and_grads` also takes
    ``num_adversary_steps`` discriminator steps, the first on the same guide draw (the paper's
    simultaneous updates), the others on fresh draws. In a plain PyTorch loop call
    :meth:`adversary_step` after each model step. The discriminator's last loss is
    :attr:`adversary_loss` (:math:`2\log 2` when it cannot tell the two apart);
    :meth:`discriminator_loss` evaluates it without training.

    The default discriminator (:class:`Discriminator`) is built on first use from the numbers
    of latent and (amortized guides only) observed features, from a forked random stream so
    that building it draws nothing from the caller's. :meth:`state_dict` and
    :meth:`load_state_dict` hold the discriminator and its optimizer, so training resumes
    exactly (with Pyro's param store, the SVI optimizer's state and the RNG state).

    Example::

        guide = AutoImplicit(model)
        avb = AVB(num_particles=64, num_adversary_steps=2)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), loss=avb)
        for step in range(2000):
            elbo = -svi.step()
            critic = avb.adversary_loss

    :param discriminator: an :class:`torch.nn.Module` called as ``discriminator(z, x)``
        (``x`` is ``None`` for global latents) returning logits of shape ``z.shape[:-1]``, or
        ``None`` for the default.
    :param bool adaptive_contrast: contrast standardized guide samples with
        :math:`\mathcal{N}(0, I)` instead of guide samples with prior samples.
    :param int num_adversary_steps: discriminator steps per :meth:`loss_and_grads` (the paper
        used 2 for Eight Schools); 0 freezes the discriminator.
    :param adversary_optim: the discriminator's optimizer: a callable taking its parameters
        (e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``), a dict of
        :class:`torch.optim.Adam` arguments, or ``None`` for ``Adam(lr=1e-3)``.
    :param int num_particles: guide samples :math:`K` per data point per step (at least 2 with
        adaptive contrast, whose moments they estimate).
    :param discriminator_hidden: hidden widths of the default discriminator.
    :param max_plate_nesting: as for :class:`~pyro.infer.elbo.ELBO`; guessed if omitted.
    :param retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads` and
        :meth:`differentiable_loss` raise a ``ValueError`` naming the model sites whose
        log-densities are not finite whenever the loss is not finite (the guide has no density
        to check), and a discriminator update raises when the discriminator's loss is not
        finite; ``False`` skips these checks (no device synchronization in
        :meth:`differentiable_loss`).
    :param bool compile: when ``True``, the gradient step of the model's and guide's loss in
        :meth:`loss_and_grads` runs as a compiled program
        (:class:`~pyro_fdiv.inference.compiled.CompiledLoss`), with the discriminator's
        parameters as its inputs, and so do the fresh guide draws of the later discriminator
        steps; the discriminator's own updates stay eager (plain PyTorch), the first on the
        program's latent draws as before. Adaptive contrast only: the prior
        contrast draws its samples from the step's guide trace, which the program does not
        return, so those steps stay eager with one warning.
    :param dict compile_options: keyword arguments of ``torch.compile``.

    **References**

    [1] L. Mescheder, S. Nowozin, A. Geiger. *Adversarial Variational Bayes: Unifying
    Variational Autoencoders and Generative Adversarial Networks*. ICML 2017.
    """

    #: Pyro's :class:`~pyro.infer.elbo.ELBO` attribute: ``float("inf")`` until the first call
    #: guesses it, an int from then on.
    max_plate_nesting: float

    def __init__(
        self,
        discriminator: nn.Module | None = None,
        adaptive_contrast: bool = True,
        num_adversary_steps: int = 1,
        adversary_optim: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
        | Mapping[str, Any]
        | None = None,
        num_particles: int = 16,
        *,
        discriminator_hidden: Sequence[int] = (256, 256),
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
        check_finite: bool = True,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        self.check_finite = check_flag("check_finite", check_finite)
        self._init_compile(compile, compile_options)
        self._elbo_draw: _Draw | None = None  # the last eager step's draw, for the adversary
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise ValueError(
                "Expected discriminator to be a torch.nn.Module or None, actual "
                f"{type(discriminator).__name__}"
            )
        if not isinstance(adaptive_contrast, bool):
            raise ValueError(
                f"Expected adaptive_contrast to be a bool, actual {adaptive_contrast!r}"
            )
        check_integer("num_adversary_steps", num_adversary_steps, 0)
        num_particles = check_num_particles(num_particles)
        if adaptive_contrast and num_particles < 2:
            raise ValueError(
                f"Expected num_particles >= 2 with adaptive_contrast=True (the guide's moments "
                f"are estimated from the particles), actual {num_particles}; raise num_particles "
                "or pass adaptive_contrast=False"
            )
        if adversary_optim is None:
            adversary_optim = {"lr": 1e-3}
        if isinstance(adversary_optim, Mapping):
            adam_kwargs = dict(adversary_optim)
            adversary_optim = _AdamFactory(adam_kwargs)
        elif not callable(adversary_optim):
            raise ValueError(
                "Expected adversary_optim to be a callable taking the discriminator's parameters, "
                f"a dict of Adam arguments, or None, actual {adversary_optim!r}"
            )
        hidden = tuple(discriminator_hidden)
        if not all(
            isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1 for h in hidden
        ):
            raise ValueError(
                "Expected discriminator_hidden to be a sequence of positive integers, actual "
                f"{discriminator_hidden!r}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            retain_graph=retain_graph,
        )
        self.adaptive_contrast = adaptive_contrast
        self.num_adversary_steps = int(num_adversary_steps)
        self.discriminator_hidden = hidden
        self._make_optim = adversary_optim
        self.discriminator = discriminator
        self.adversary_optim: torch.optim.Optimizer | None = None
        if discriminator is not None:
            self.adversary_optim = self._make_optim(discriminator.parameters())
        self._pending_state: dict | None = None
        #: The discriminator's loss at its last update (``nan`` before the first).
        self.adversary_loss = math.nan
        #: Number of discriminator updates taken.
        self.num_adversary_updates = 0
        self._spread_checked = False

    # ---------------------------------------------------------------------------------------
    # Traces and features

    def _latent_features(
        self, trace: Trace, plates, weights: LogWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The latent sites' unconstrained values as features and, given the ``weights`` of
        the draw, the log-Jacobian of their bijections reduced like its terms."""
        k, mpn = self.num_particles, cast(int, self.max_plate_nesting)  # guessed by _prepare
        features: list[torch.Tensor] = []
        log_jac: torch.Tensor | float = 0.0
        for name, site in sample_sites(trace).items():
            if site["is_observed"]:
                continue
            fn, value = site["fn"], site["value"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"AVB cannot handle discrete sample site '{name}' ({_describe(fn)}): it "
                    "compares latents in the unconstrained coordinates of their supports, which "
                    "discrete supports lack, and enumerating the site does not apply to AVB "
                    "either. Use JSA, IWAE or BlackBoxAlpha (score-function gradients) for "
                    "discrete latents."
                )
            with helpful_support_errors(site):
                transform = biject_to(fn.support)
            zeta = transform.inv(value)
            event_dim = fn.event_dim + zeta.dim() - value.dim()
            features.append(_flatten(zeta, event_dim, plates, k, mpn, name))
            if weights is not None:
                ldj = transform.log_abs_det_jacobian(zeta, value)
                ldj = sum_rightmost(ldj, ldj.dim() - value.dim() + fn.event_dim)
                log_jac = log_jac + weights.reduce(ldj, site, name)
        if not features:
            raise ValueError(
                "The model has no latent sample sites: AVB has nothing to infer. Leave out the "
                "guide and fit the parameters by maximum likelihood instead."
            )
        return torch.cat(features, dim=-1), log_jac

    def _draw(self, model, guide, args, kwargs) -> _Draw:
        """Run the guide with ``K`` vectorized particles and replay the model against it."""
        k, mpn = self.num_particles, cast(int, self.max_plate_nesting)  # guessed by _prepare
        weights = importance_trace(
            model, guide, args, kwargs, num_particles=k, max_plate_nesting=mpn, guide_density=False
        )
        if k > 1 and not self._spread_checked:
            _refuse_point_masses(weights.guide_trace, mpn)
            self._spread_checked = True
        model_sites = sample_sites(weights.model_trace)
        log_lik: torch.Tensor | float = 0.0
        x_features: list[torch.Tensor] = []
        for name, term in weights.model_terms.items():
            site = model_sites[name]
            if site["is_observed"]:
                log_lik = log_lik + term
                if weights.plates and not site["infer"].get("_deterministic"):
                    value, event_dim = site["value"], site["fn"].event_dim
                    x_features.append(_flatten(value, event_dim, weights.plates, k, mpn, name))
        z, log_jac = self._latent_features(weights.model_trace, weights.plates, weights)
        x = torch.cat([f.to(z) for f in x_features], dim=-1) if x_features else None
        zero = z.new_zeros(z.shape[:-1])
        return _Draw(weights, weights.log_w + zero, log_lik + zero, log_jac + zero, z, x)

    def _prior_features(self, model, draw: _Draw, args, kwargs) -> torch.Tensor:
        """Latent features of the model run with its latents drawn from the prior (the same
        data and subsample), detached."""
        guide_trace = draw.weights.guide_trace
        subsample = Trace(graph_type=guide_trace.graph_type)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and site_is_subsample(site):
                subsample.add_node(name, **site)
        with torch.no_grad(), poutine.block():
            prior = importance_trace(
                model,
                None,
                args,
                kwargs,
                num_particles=self.num_particles,
                max_plate_nesting=cast(int, self.max_plate_nesting),  # guessed by _prepare
                model_handler=poutine.replay(trace=subsample),
            )
        z, _ = self._latent_features(prior.model_trace, draw.weights.plates)
        if z.shape != draw.z.shape:
            raise ValueError(
                f"Prior samples have latent features of shape {tuple(z.shape)}, guide samples "
                f"{tuple(draw.z.shape)}: the model's latent sites must not depend on the guide."
            )
        return z

    # ---------------------------------------------------------------------------------------
    # The discriminator

    def _ensure_discriminator(self, draw: _Draw) -> None:
        z_dim = draw.z.shape[-1]
        x_dim = 0 if draw.x is None else draw.x.shape[-1]
        if self.discriminator is None:
            with torch.random.fork_rng(devices=[]):
                disc = Discriminator(z_dim, x_dim, self.discriminator_hidden)
            self.discriminator = disc.to(dtype=draw.z.dtype, device=draw.z.device)
            self.adversary_optim = self._make_optim(self.discriminator.parameters())
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        expected = (
            getattr(self.discriminator, "z_dim", z_dim),
            getattr(self.discriminator, "x_dim", x_dim),
        )
        if expected != (z_dim, x_dim):
            raise ValueError(
                f"The discriminator was built for {expected[0]} latent and {expected[1]} observed "
                f"features, actual {z_dim} and {x_dim}: the model's shapes changed. Use a new AVB "
                "objective for a different model."
            )

    def _logits(self, z: torch.Tensor, x: torch.Tensor | None, detach: bool) -> torch.Tensor:
        disc = self.discriminator
        assert disc is not None  # built by _prepare
        if not detach:
            return disc(z, x)
        params = {name: p.detach() for name, p in disc.named_parameters()}
        params.update(dict(disc.named_buffers()))
        return functional_call(disc, params, (z, x))

    @staticmethod
    def _standardize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z - mu) / sd`` and ``log r(z) = log N(z; mu, sd^2)`` summed over features, with
        the moments over the particle dim detached."""
        zd = z.detach()
        mu = zd.mean(0)
        sd = zd.std(0).clamp_min(MIN_SCALE)
        z_bar = (z - mu) / sd
        log_r = (-0.5 * z_bar**2 - sd.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        return z_bar, log_r

    def _elbo(self, draw: _Draw) -> torch.Tensor:
        """Per-particle, per-data-point ELBO estimate; gradients reach the guide through z only
        and never reach the discriminator."""
        if self.adaptive_contrast:
            z_bar, log_r = self._standardize(draw.z)
            t = self._logits(z_bar, draw.x, detach=True)
            return draw.log_joint + draw.log_jac - log_r - t
        return draw.log_lik - self._logits(draw.z, draw.x, detach=True)

    def _adversary_logits(self, model, draw: _Draw, args, kwargs):
        z = draw.z.detach()
        x = None if draw.x is None else draw.x.detach()
        if self.adaptive_contrast:
            z_q = self._standardize(z)[0]
            z_p = torch.randn_like(z_q)
        else:
            z_q, z_p = z, self._prior_features(model, draw, args, kwargs)
        return self._logits(z_q, x, detach=False), self._logits(z_p, x, detach=False)

    @staticmethod
    def _adversary_objective(t_q: torch.Tensor, t_p: torch.Tensor) -> torch.Tensor:
        r""":math:`-\mathbb{E}_q\log\sigma(T) - \mathbb{E}_p\log(1 - \sigma(T))`."""
        return F.softplus(-t_q).mean() + F.softplus(t_p).mean()

    def _adversary_update(self, model, draw: _Draw, args, kwargs) -> float:
        t_q, t_p = self._adversary_logits(model, draw, args, kwargs)
        loss = self._adversary_objective(t_q, t_p)
        value = loss.item()
        if self.check_finite and not math.isfinite(value):
            raise ValueError(
                f"AVB discriminator loss is {value}: its logits are not finite. Lower the "
                "adversary learning rate (adversary_optim) or check the latent values."
            )
        optim = self.adversary_optim
        assert optim is not None  # built with the discriminator, by _prepare
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        self.adversary_loss = value
        self.num_adversary_updates += 1
        return value

    # ---------------------------------------------------------------------------------------
    # Entry points

    def _prepare(self, model, guide, args, kwargs) -> _Draw:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        draw = self._draw(model, guide, args, kwargs)
        self._ensure_discriminator(draw)
        return draw

    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of one vectorized run (Pyro's ``ELBO`` interface)."""
        draw = self._prepare(model, guide, args, kwargs)
        return draw.weights.model_trace, draw.weights.guide_trace

    def _checked(self, loss: torch.Tensor, draw: _Draw) -> float:
        # the guide's sites may be implicit (no density): only the model's are scored
        return checked_value(
            loss,
            "AVB",
            traces={"model": draw.weights.model_trace},
            check_finite=self.check_finite,
            otherwise="no model site: the discriminator output or log r",
        )

    @torch.no_grad()
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        r"""
        :returns: the negated ELBO estimate, summed over the batch and scaled by the subsample
            scale. Takes no adversary step and changes no state.
        :rtype: float

        The estimate is only as good as the discriminator's :math:`\log q - \log p`: once the
        discriminator separates the guide's draws from the contrast almost perfectly (its
        loss near 0) the logistic loss stops pulling it towards the log ratio, and the
        estimate can lie tens of nats above the true ELBO (measured on the digits VAE: −96.2
        here against at most −139.7, ``docs/experiments/avb_gap``). Report a log-likelihood
        with :func:`~pyro_fdiv.evaluate.ais_log_likelihood`, not this.
        """
        draw = self._prepare(model, guide, args, kwargs)
        return self._checked(-self._elbo(draw).mean(0).sum() * draw.weights.scale, draw)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: a scalar tensor equal to :meth:`loss` whose gradient is AVB's estimator for
            the model's and guide's parameters (none reaches the discriminator). Takes no
            adversary step: call :meth:`adversary_step` for that.
        :raises ValueError: naming the model sites involved if the loss is not finite (with
            ``check_finite``).
        """
        draw = self._prepare(model, guide, args, kwargs)
        loss = -self._elbo(draw).mean(0).sum() * draw.weights.scale
        if self.check_finite:
            self._checked(loss.detach(), draw)
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        Back-propagate the model's and guide's loss into their parameters, then take
        ``num_adversary_steps`` discriminator steps (the first on the same guide draw).

        :returns: :meth:`loss`, evaluated before the discriminator steps.
        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        value, _ = self._grads(model, guide, args, kwargs)
        for step in range(self.num_adversary_steps):
            if step > 0:  # a fresh guide draw (with compile=True, a program of its own)
                self._grads(model, guide, args, kwargs, "draw")
            self._adversary_update(model, self._last_draw(), args, kwargs)
        self._elbo_draw = None
        return value

    def _last_draw(self) -> _Draw:
        """The draw of the last ELBO step or fresh draw: the eager one, or the compiled
        program's latent (and observed) features."""
        draw, self._elbo_draw = self._elbo_draw, None
        if draw is None:
            compiled = self._compiled
            assert compiled is not None and compiled.aux is not None  # a compiled step ran
            z, *x = compiled.aux
            # the program returns only the features the adversary reads
            missing: Any = None
            draw = _Draw(missing, missing, missing, missing, z, x[0] if x else None)
        return draw

    # the compiled path's protocol (pyro_fdiv.inference.compiled.Compilable): the ELBO step
    # (part "") and the discriminator's fresh draws (part "draw", no gradient)
    def _eager_grads(self, model, guide, args, kwargs, part=""):
        if part == "draw":
            with torch.no_grad():
                self._elbo_draw = self._draw(model, guide, args, kwargs)
            return 0.0, []
        draw = self._prepare(model, guide, args, kwargs)
        loss = -self._elbo(draw).mean(0).sum() * draw.weights.scale
        value = self._checked(loss, draw)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        self._elbo_draw = draw
        return value, None

    def _traced_loss(self, model, guide, args, kwargs, part=""):
        draw = self._prepare(model, guide, args, kwargs)
        loss = -self._elbo(draw).mean(0).sum() * draw.weights.scale  # "draw": checks the program
        return loss, None, (draw.z,) if draw.x is None else (draw.z, draw.x)

    def _program_wrt(self, part: str) -> list[str] | None:
        return [] if part == "draw" else None

    def _program_modules(self) -> list[nn.Module]:
        return [self.discriminator] if self.discriminator is not None else []

    def _compile_refusal(self, part: str = "") -> str | None:
        if not self.adaptive_contrast and self.num_adversary_steps:
            return (
                "the prior contrast (adaptive_contrast=False) draws the discriminator's prior "
                "samples from the step's guide trace"
            )
        return None

    def _raise_non_finite(self, value, model, guide, args, kwargs, part="") -> None:
        if part == "draw":
            return  # its loss is only the program's check; the eager draw has none
        with torch.no_grad():  # the same draw, eagerly: the check names the sites
            draw = self._prepare(model, guide, args, kwargs)
            self._checked(-self._elbo(draw).mean(0).sum() * draw.weights.scale, draw)
        raise ValueError(
            f"AVB: the compiled loss is {value}, but the same draw's loss is finite eagerly: "
            "the compiled program's arithmetic overflowed. Run with compile=False, or in float64."
        )

    def adversary_step(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        One discriminator update on a fresh guide draw (and fresh prior or
        :math:`\\mathcal{N}(0, I)` samples), leaving the model's and guide's parameters and
        gradients untouched.

        :returns: the discriminator's loss before the update.
        """
        with torch.no_grad():
            draw = self._prepare(model, guide, args, kwargs)
        return self._adversary_update(model, draw, args, kwargs)

    @torch.no_grad()
    def discriminator_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float:
        r"""
        The discriminator's logistic loss
        :math:`-\mathbb{E}_q\log\sigma(T) - \mathbb{E}_{p}\log(1 - \sigma(T))` on a fresh draw,
        without training it (:math:`2\log 2` for a discriminator that cannot tell the two
        apart; for the optimal one, :math:`2\log 2 - 2\,\mathrm{JS}`).
        """
        draw = self._prepare(model, guide, args, kwargs)
        return self._adversary_objective(*self._adversary_logits(model, draw, args, kwargs)).item()

    # ---------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        """The discriminator's and its optimizer's state, and the update count."""
        if self.discriminator is None:
            return (
                dict(self._pending_state)
                if self._pending_state is not None
                else {
                    "discriminator": None,
                    "adversary_optim": None,
                    "num_adversary_updates": self.num_adversary_updates,
                    "adversary_loss": self.adversary_loss,
                }
            )
        assert self.adversary_optim is not None  # built with the discriminator
        return {
            "discriminator": self.discriminator.state_dict(),
            "adversary_optim": self.adversary_optim.state_dict(),
            "num_adversary_updates": self.num_adversary_updates,
            "adversary_loss": self.adversary_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. A default discriminator not built yet is loaded when it
        is built, on first use."""
        missing = {"discriminator", "adversary_optim", "num_adversary_updates"} - set(state)
        if missing:
            raise ValueError(f"Expected an AVB state_dict, missing keys {sorted(missing)}")
        self.num_adversary_updates = int(state["num_adversary_updates"])
        self.adversary_loss = float(state.get("adversary_loss", math.nan))
        if state["discriminator"] is None:
            return
        if self.discriminator is None:
            self._pending_state = dict(state)
            return
        assert self.adversary_optim is not None  # built with the discriminator
        self.discriminator.load_state_dict(state["discriminator"])
        self.adversary_optim.load_state_dict(state["adversary_optim"])

    # the inner-training convention (pyro_fdiv.inference.inner.InnerTraining)
    def inner_parameters(self) -> list[torch.Tensor]:
        """The discriminator's parameters (``[]`` before it is built, on first use)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def step_inner(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float | None:
        """``num_adversary_steps`` :meth:`adversary_step` updates, each on a fresh draw; the
        last one's loss (``None`` for none)."""
        value = None
        for _ in range(self.num_adversary_steps):
            value = self.adversary_step(model, guide, *args, **kwargs)
        return value

    def to(self, *args: Any, **kwargs: Any) -> AVB:
        """Move the discriminator and its optimizer's state (one not built yet is built where
        the guide's samples are)."""
        if self.discriminator is not None:
            assert self.adversary_optim is not None  # built with the discriminator
            self.discriminator.to(*args, **kwargs)
            self.adversary_optim.load_state_dict(self.adversary_optim.state_dict())
        return self


class _AdamFactory:
    """Picklable ``params -> Adam(params, **kwargs)``."""

    def __init__(self, kwargs: dict[str, Any]):
        self.kwargs = kwargs

    def __call__(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, **self.kwargs)


def _refuse_point_masses(guide_trace: Trace, max_plate_nesting: int) -> None:
    """A ``Delta`` guide site whose ``K`` vectorized particles are all equal is a point mass
    (``AutoDelta``, ``AutoLaplaceApproximation`` while training): its density against the
    prior's is infinite, the discriminator separates it perfectly and AVB diverges, so it is
    refused."""
    for name, site in sample_sites(guide_trace).items():
        value = site["value"]
        if not isinstance(site["fn"], Delta) or site["is_observed"]:
            continue
        dim = -max_plate_nesting - 1 - site["fn"].event_dim
        if not isinstance(value, torch.Tensor) or value.dim() < -dim or value.shape[dim] < 2:
            continue
        if torch.equal(value, value.narrow(dim, 0, 1).expand_as(value)):
            raise ValueError(
                f"AVB: the guide's site '{name}' puts all its mass on one point (its particles "
                f"are equal; {type(site['fn']).__name__}, e.g. AutoDelta or "
                "AutoLaplaceApproximation): the discriminator separates a point mass from any "
                "density and training diverges. Use a guide that samples (AutoImplicit, "
                "AutoNormal, ...), or MAP with Trace_ELBO."
            )
