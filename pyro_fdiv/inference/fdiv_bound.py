r"""The f-divergence joint upper bound with spread noise (Zhang, Bird, Habib, Xu, Barber)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.infer.elbo import ELBO
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_fdiv.divergences import Divergence, ForwardKL, ReverseKL, as_divergence
from pyro_fdiv.inference.compiled import Compilable
from pyro_fdiv.inference.data_density import DataDensity, as_data_density
from pyro_fdiv.inference.generative import (
    DataArgument,
    ObservationMessenger,
    find_observation,
    reparameterized_or_raise,
    repeat_batch,
    trace_param_names,
    trace_params,
    traced_once,
)
from pyro_fdiv.inference.importance import (
    LogWeights,
    checked_value,
    guess_max_plate_nesting,
    log_mean_exp,
    log_weights_from_traces,
)
from pyro_fdiv.inference.inner import InnerTraining
from pyro_fdiv.inference.spread import PCAProjection, SpreadSchedule
from pyro_fdiv.util import check_flag, check_integer, check_num_particles, rng_preserved

__all__ = ["FDivergenceBound"]


class _SubsampledPlate(ValueError):
    """A plate subsamples the batch: raised by :class:`_NoSubsampling`, never wrapped."""


class _NoSubsampling(Messenger):
    r"""Raises at a plate that subsamples: the batch is the sample of :math:`\hat p`. Applied
    innermost, so it sees ``subsample=`` before any replay and before the model body runs
    (which would index the batch with the subsample)."""

    def __init__(self, objective: str, data_arg: DataArgument):
        super().__init__()
        self.objective, self.data_arg = objective, data_arg

    def _pyro_sample(self, msg: dict) -> None:
        if not site_is_subsample(msg):
            return
        fn, indices = msg["fn"], msg["value"]
        if indices is not None:
            how = f"subsample= gives {len(indices)} of its {fn.size} indices"
        elif fn.subsample_size is not None and fn.subsample_size < fn.size:
            how = f"subsample_size={fn.subsample_size} of {fn.size}"
        else:
            return
        raise _SubsampledPlate(
            f"{self.objective}: plate '{msg['name']}' is subsampled ({how}). The batch is the "
            "sample of p_hat: pass the minibatch itself as the data argument "
            f"({self.data_arg.describe()}) and declare the plate without subsample or "
            f"subsample_size, e.g. pyro.plate('{msg['name']}', len(x)) (each call stacks "
            "num_particles copies of the batch and replaces it)."
        )


class _Draw(NamedTuple):
    """One evaluation of the bound: the log weights (of the traces that hold every parameter),
    the data density at the samples, and all traces by kind (for naming non-finite sites)."""

    weights: LogWeights
    log_data_density: torch.Tensor
    traces: dict[str, Trace]


class FDivergenceBound(Compilable, InnerTraining, ELBO):
    r"""
    The auxiliary f-divergence upper bound of [1] for learning a latent generative model
    :math:`p_\theta(x, z) = p_\theta(x \mid z) p(z)` by any f-divergence, with an encoder
    :math:`q_\phi(z \mid x)` (the guide) that tightens the bound:

    .. math::

        D_f\big(\hat p(y) \,\|\, p_\theta(y)\big) \le
        U(\theta, \phi) = D_f\big(q_\phi(z \mid y)\hat p(y) \,\|\, p_\theta(y \mid z)p(z)\big)
        = \mathbb{E}_{p_\theta(y, z)}\big[f(e^{r})\big]
        = \mathbb{E}_{\hat p(y) q_\phi(z \mid y)}\big[\tilde f(e^{-r})\big],

    .. math::

        r = \log \hat p(y) + \log q_\phi(z \mid y) - \log p_\theta(y \mid z) - \log p(z),

    with equality when :math:`q_\phi(z \mid y) = p_\theta(z \mid y)`, and
    :math:`\tilde f(u) = u f(1/u)` the dual.

    ``sample_from="model"`` averages over
    :math:`(z, y) \sim p_\theta` (``y`` reparameterized through the model), ``"data"`` over
    :math:`y \sim \hat p`, :math:`z \sim q_\phi(z \mid y)`; ``"auto"`` takes the data side for
    forward KL, where the bound is the negative ELBO on noisy data plus
    :math:`\mathbb{E}\log \hat p(y)`, and the model side otherwise. Every :math:`f` is evaluated
    from :math:`\log u`, so extreme log ratios neither overflow nor give NaN.

    **Importance-weighted joints** (``num_importance_samples=K > 1``, beyond [1]): the same
    bound between the extended joints :math:`\hat p(y) \prod_k q_\phi(z_k \mid y)` and
    :math:`p_\theta(y) \frac1K \sum_k p_\theta(z_k \mid y) \prod_{j \ne k} q_\phi(z_j \mid y)`
    of [3], whose ratio is :math:`e^{r_K} = \hat p(y) / \hat w_K(y)` with the importance
    estimate :math:`\hat w_K(y) = \frac1K \sum_k p_\theta(y \mid z_k) p(z_k) /
    q_\phi(z_k \mid y)` of :math:`p_\theta(y)`. Its marginals are still :math:`\hat p` and
    :math:`p_\theta`, so it bounds the same divergence for every ``K``; ``K = 1`` is the
    paper's bound, and as ``K`` grows :math:`\hat w_K(y) \to p_\theta(y)` and the bound
    approaches :math:`D_f(\hat p \| p_\theta)` even when the encoder cannot represent the
    posterior. Forward KL becomes the negative IWAE bound on noisy data plus a constant
    (monotone in ``K``, Burda et al.). On the data side the ``K`` latents share one ``y``; on
    the model side :math:`z_1 \sim p(z)`, :math:`y \sim p_\theta(y \mid z_1)` and
    :math:`z_{2..K} \sim q_\phi(z \mid y)`. Each of the ``num_particles`` terms costs ``K``
    model and guide evaluations.

    **The data side** is either

    - a training set ``data`` of shape ``(N,) + event_shape``, smoothed by spread noise,
      :math:`\hat p(y) = \frac1N\sum_n \mathcal{N}(y \mid x_n, \sigma^2 I)`. The model's
      observation site must be Gaussian: its scale is replaced by the same :math:`\sigma`
      (a deterministic decoder mean with spread noise), so the model may write any scale.
      :math:`\log \hat p(y)` is exact (a chunked logsumexp over all ``N`` points) or, with
      ``log_density="pca"``, the paper's PCA-projected sampled gradient estimator (reverse KL
      only: its bound is linear in :math:`\log \hat p`); never a minibatch estimate.
    - or a distribution with ``log_prob`` (and ``sample`` for the data side), when the target
      density is known; its observation site is used as the model writes it.

    Either is wrapped once, at construction, into :attr:`data`, a
    :class:`~pyro_fdiv.inference.data_density.DataDensity` (``EmpiricalData`` or
    ``DensityData``) through which the bound samples and evaluates :math:`\hat p`.

    **The data argument.** The model and guide take the batch as one argument: the first
    positional one by default, or ``data_arg`` (an index or a keyword name). Every latent
    site and the observation must sit in one data plate sized by that batch, the plate of the
    observation's first dim (plates nested inside it are summed into each row's term; no
    ``subsample`` or ``subsample_size``: the bound is an expectation, and the batch *is* the
    sample of :math:`\hat p`; a plate that subsamples raises a ``ValueError`` naming it), and
    the guide must compute its parameters from the data argument (amortized). Each call stacks
    ``num_particles`` copies of the batch and replaces the argument: on the data side by
    :math:`y = x + \sigma\epsilon` (or draws from the target distribution), fed to guide and
    model; on the model side the model samples ``y`` itself
    (the batch only fixes the shape) and the guide is run on it at the model's latent values.
    Pass a uniform minibatch of ``data`` (or all of it) to :class:`~pyro.infer.SVI`.

    **Training.** :meth:`loss_and_grads` first takes ``guide_steps`` updates of the guide's
    parameters with its own ``guide_optim`` (the paper tightens the bound with 20 Adam steps
    per model step; their bound can be another f's, ``guide_f``), then back-propagates the
    bound into the model's parameters only (into all parameters when ``guide_steps=0``), and
    advances the spread schedule; :meth:`loss` changes nothing. The schedule's position and the
    guide optimizer are in :meth:`state_dict`. The guide steps follow the convention of
    :class:`~pyro_fdiv.inference.inner.InnerTraining` (:meth:`step_inner`,
    :meth:`inner_parameters`), and ``.to()``, ``.double()``, ``.float()`` move the training set
    and the PCA projection (the model's and guide's parameters are the caller's to move).

    Example::

        def model(x):
            pyro.module("decoder", decoder)
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
                pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

        def guide(x):
            pyro.module("encoder", encoder)
            loc, scale = encoder(x)
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

        loss = FDivergenceBound("reverse_kl", data=train, spread=SpreadSchedule(1.0, 0.1, 5000),
                                num_particles=10, guide_steps=5)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        for step in range(5000):
            svi.step(train[torch.randint(len(train), (100,))])

    :param f: the divergence :math:`D_f(\hat p \| p_\theta)`: a name from
        :func:`~pyro_fdiv.divergences.available_divergences` or a
        :class:`~pyro_fdiv.divergences.Divergence`. ``"reverse_kl"`` is
        :math:`\mathrm{KL}(p_\theta \| \hat p)`, ``"forward_kl"`` maximum likelihood.
    :param data: the training set (tensor) or the target distribution.
    :param spread: :math:`\sigma` (float) or a :class:`~pyro_fdiv.inference.spread.SpreadSchedule`;
        required for a training set, not allowed with a distribution.
    :param int num_particles: samples per element of the batch.
    :param int num_importance_samples: ``K``, latent samples per ``y`` in the
        importance-weighted joint (1: the paper's bound).
    :param str sample_from: ``"model"``, ``"data"`` or ``"auto"``.
    :param str log_density: ``"exact"`` or ``"pca"``.
    :param int pca_dim: PCA dimension :math:`k` of the ``"pca"`` estimator.
    :param int num_pca_samples: :math:`T`, sampled neighbours per point.
    :param int guide_steps: guide updates per model update (0: one joint update).
    :param guide_optim: a :class:`~pyro.optim.PyroOptim` for those updates
        (default ``Adam(lr=1e-3)``).
    :param guide_f: the divergence whose bound those updates minimize (default ``f``; sampled
        from the data for forward KL, from the model otherwise). Every f's bound is tightest at
        :math:`q_\phi = p_\theta(z \mid y)`, so any choice tightens it; ``"reverse_kl"``
        minimizes :math:`\mathbb{E}_{p_\theta(y)} \mathrm{KL}(p_\theta(z \mid y) \|
        q_\phi(z \mid y))` (at ``K = 1``), mass-covering and with a gradient that does not vanish
        where a bounded f (Jensen-Shannon) saturates and leaves the encoder behind the model.
    :param data_arg: position or keyword of the data argument.
    :param str obs_site: name of the observation site (default: the only observed site).
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads`
        (also before each guide step) and :meth:`differentiable_loss` raise a ``ValueError``
        naming the model and guide sites, and the data density :math:`\log \hat p(y)`, whose
        log-densities are not finite whenever the bound is not finite; ``False`` skips the
        check (no device synchronization in :meth:`differentiable_loss`).
    :param bool compile: when ``True``, both players' gradient steps in :meth:`loss_and_grads`
        (each guide step and the model step) run as compiled programs
        (:class:`~pyro_fdiv.inference.compiled.CompiledLoss`), the optimizers eagerly; the
        spread width is a constant of a program, so while a
        :class:`~pyro_fdiv.inference.spread.SpreadSchedule` anneals the steps are eager, and
        they compile once it is constant (the paper's MNIST recipe keeps it fixed).
    :param dict compile_options: keyword arguments of ``torch.compile``.

    **References**

    [1] M. Zhang, T. Bird, R. Habib, T. Xu, D. Barber. *Variational f-divergence
    minimization*. arXiv:1907.11891 (2019; ICLR 2019 submission "Training generative latent
    models by variational f-divergence minimization").

    [2] D. Barber, M. Zhang, R. Habib, T. Bird. *Spread divergence*. ICML 2020.

    [3] J. Domke, D. Sheldon. *Importance weighting and variational inference*. NeurIPS 2018.
    """

    #: Pyro's :class:`~pyro.infer.elbo.ELBO` attribute: ``float("inf")`` until the first call
    #: guesses it, an int from then on.
    max_plate_nesting: float

    def __init__(
        self,
        f: str | Divergence = "reverse_kl",
        data: torch.Tensor | Distribution | None = None,
        spread: float | SpreadSchedule | None = None,
        num_particles: int = 1,
        num_importance_samples: int = 1,
        sample_from: str = "auto",
        log_density: str = "exact",
        pca_dim: int = 50,
        num_pca_samples: int = 10,
        guide_steps: int = 0,
        guide_optim: PyroOptim | None = None,
        guide_f: str | Divergence | None = None,
        data_arg: int | str = 0,
        obs_site: str | None = None,
        max_plate_nesting: float = float("inf"),
        check_finite: bool = True,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        super().__init__(
            num_particles=check_num_particles(num_particles), max_plate_nesting=max_plate_nesting
        )
        self.check_finite = check_flag("check_finite", check_finite)
        self._init_compile(compile, compile_options)
        self._param_names: dict[str, list[str]] = {}  # per trace kind, for the programs
        self.num_importance_samples = check_integer(
            "num_importance_samples", num_importance_samples, 1
        )
        self.divergence = as_divergence(f)
        #: The data side :math:`\hat p`: an :class:`~pyro_fdiv.inference.data_density.EmpiricalData`
        #: (a training set under spread noise) or a
        #: :class:`~pyro_fdiv.inference.data_density.DensityData` (a target density).
        self.data: DataDensity = as_data_density(data, spread)
        if sample_from not in ("model", "data", "auto"):
            raise ValueError(
                f"Expected sample_from in ('model', 'data', 'auto'), actual {sample_from!r}"
            )
        if sample_from == "auto":
            sample_from = "data" if isinstance(self.divergence, ForwardKL) else "model"
        self.sample_from = sample_from
        if sample_from == "data" and not self.data.can_sample:
            raise ValueError("sample_from='data' needs a target distribution with sample()")
        self._check_log_density(log_density)
        if log_density == "pca":  # a target density raises: the estimator needs a training set
            self.data.use_pca(pca_dim, num_pca_samples)
        self.log_density = log_density
        self.num_pca_samples = check_integer("num_pca_samples", num_pca_samples, 1)
        self.guide_steps = check_integer("guide_steps", guide_steps, 0)
        if guide_optim is not None and not isinstance(guide_optim, PyroOptim):
            raise ValueError(
                f"Expected guide_optim to be a pyro.optim optimizer, actual {guide_optim!r}"
            )
        self.guide_optim = guide_optim or pyro.optim.Adam({"lr": 1e-3})
        self.guide_divergence, self.guide_sample_from = self._guide_objective(guide_f)
        self.data_arg = DataArgument(data_arg)
        self.obs_site = obs_site

    def _guide_objective(self, guide_f) -> tuple[Divergence, str]:
        """The divergence whose bound the guide steps minimize, and the side it samples."""
        if guide_f is None:
            return self.divergence, self.sample_from
        if self.guide_steps == 0:
            raise ValueError(
                "guide_f is the divergence of the guide steps: pass guide_steps >= 1 (with "
                "guide_steps=0 one joint update minimizes f's bound in all parameters)"
            )
        divergence = as_divergence(guide_f, "guide_f")
        if self.log_density == "pca" and not isinstance(divergence, ReverseKL):
            raise ValueError(
                "log_density='pca' estimates gradients of a bound linear in log p_hat: use "
                f"guide_f='reverse_kl' (or None) with it, actual {divergence.name!r}"
            )
        data_side = isinstance(divergence, ForwardKL) and self.data.can_sample
        return divergence, "data" if data_side else "model"

    def _check_log_density(self, log_density: str) -> None:
        if log_density not in ("exact", "pca"):
            raise ValueError(f"Expected log_density in ('exact', 'pca'), actual {log_density!r}")
        if log_density == "pca":
            if not isinstance(self.divergence, ReverseKL) or self.sample_from != "model":
                raise ValueError(
                    "log_density='pca' is the gradient estimator of the reverse-KL bound sampled "
                    "from the model (its bound is linear in log p_hat(y)); use "
                    f"log_density='exact' for f={self.divergence.name!r}, "
                    f"sample_from={self.sample_from!r}"
                )

    @property
    def schedule(self) -> SpreadSchedule | None:
        """The spread schedule (``None`` for a target distribution)."""
        return self.data.schedule

    @property
    def sigma(self) -> float | None:
        """The current spread width (``None`` for a target distribution)."""
        return self.data.sigma

    @property
    def projection(self) -> PCAProjection | None:
        """The PCA projection of ``log_density="pca"`` (``None`` otherwise)."""
        return self.data.projection

    def log_data_density(self, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \hat p(y)` (or the target's ``log_prob``), reduced over the event."""
        return self.data.log_prob(y)

    # ---------------------------------------------------------------- the bound
    def _guarded(self, fn):
        return _NoSubsampling(type(self).__name__, self.data_arg)(fn)

    def _setup(self, model, guide, args, kwargs) -> None:
        """On the first call: ``max_plate_nesting``, the observation site and the data plate,
        checked on the batch as given (before any stacking)."""
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(
                self._guarded(model), self._guarded(guide), args, kwargs
            )
        if getattr(self, "_obs_name", None) is None:
            x = self.data_arg.get(args, kwargs)
            trace = traced_once(self._guarded(model), *args, **kwargs)
            site = find_observation(trace, self.obs_site)
            self._check_shapes(site, x)
            plate = self._data_plate_of(site, x)
            self._check_latents_in_plate(plate, site["name"], len(x), {"model": trace})
            self._obs_name, self._data_plate = site["name"], plate

    def _data_plate_of(self, site: dict, x: torch.Tensor) -> str:
        """The name of the plate over the observation's first (batch) dim."""
        dim = -(x.dim() - site["fn"].event_dim)
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim == dim and frame.size == len(x) and dim < 0:
                return frame.name
        raise ValueError(
            f"{type(self).__name__} needs the observation '{site['name']}' inside a data plate "
            f"over the batch's first dim (size {len(x)}); it has plates "
            f"{[(f.name, f.dim, f.size) for f in site['cond_indep_stack'] if f.vectorized]} and "
            f"event_dim {site['fn'].event_dim}. Wrap the model's and guide's sites in "
            "pyro.plate('data', len(x)) and declare the other dims of a row with .to_event(...) "
            "or nested plates."
        )

    def _check_latents_in_plate(
        self, plate: str, obs: str, batch: int, traces: dict[str, Trace]
    ) -> None:
        outside = [
            f"{'observed' if site['is_observed'] else 'latent'} {kind} site '{name}'"
            for kind, trace in traces.items()
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
            and not site_is_subsample(site)
            and all(f.name != plate for f in site["cond_indep_stack"])
        ]
        if outside:
            raise ValueError(
                f"{type(self).__name__} needs every latent site and the observation '{obs}' "
                f"inside one data plate over the batch (plate '{plate}', size {batch}), but the "
                f"{', '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside it: a "
                "global site, one value shared by the whole batch, has no term per row of the "
                "bound. Move global latents into pyro.param, or use a posterior-inference "
                "objective (IWAE, BlackBoxAlpha)."
            )

    def _check_shapes(self, site: dict, x: torch.Tensor) -> None:
        value = site["value"]
        if value.shape != x.shape:
            raise ValueError(
                f"The data argument ({self.data_arg.describe()}) has shape {tuple(x.shape)} but "
                f"observation site '{site['name']}' holds shape {tuple(value.shape)}: the model "
                "must observe the batch it is given (obs=x)"
            )
        self.data.check_rows(x.shape[1:], site["name"])

    def _traces(self, model, guide, args, kwargs, sample_from: str):
        """``{kind: (model trace, guide trace)}`` of one vectorized draw (the first holding every
        parameter), and the sampled ``y``, one per particle and row."""
        batch = self.data_arg.get(args, kwargs)
        x = repeat_batch(batch, self.num_particles)
        model, guide = self._guarded(model), self._guarded(guide)
        try:
            pairs, y = self._run(
                model, guide, args, kwargs, x, sample_from, self.num_importance_samples
            )
        except _SubsampledPlate:
            raise
        except ValueError as err:
            if len(x) == len(batch) or not self._runs_unstacked(
                model, guide, args, kwargs, batch, sample_from
            ):
                raise
            raise ValueError(
                f"{type(self).__name__} runs the model and guide on num_particles="
                f"{self.num_particles} stacked copies of the batch ({len(batch)} rows -> "
                f"{len(x)}), and a site did not follow the batch: {str(err).splitlines()[0]}. "
                "Every site in the data plate must be sized by the data argument, and the guide "
                "must compute its parameters from it (an amortized q(z | x)); a guide with "
                "per-data-point parameters is posterior inference of a fixed batch: use a "
                "posterior-inference objective (IWAE, BlackBoxAlpha)."
            ) from err
        if y.shape[: x.dim()] != x.shape:
            raise ValueError(
                f"{type(self).__name__} stacks num_particles={self.num_particles} copies of the "
                f"batch ({len(batch)} rows -> {len(x)}), but the model's observation "
                f"'{self._obs_name}' drew shape {tuple(y.shape)}: size the data plate by the data "
                "argument, pyro.plate('data', len(x)), not by a fixed number."
            )
        return pairs, y

    def _runs_unstacked(self, model, guide, args, kwargs, batch, sample_from: str) -> bool:
        """Whether the run that failed on the stacked batch succeeds on the batch as given (one
        latent per ``y``): then the failure came from the stacking, i.e. a site whose shape
        follows something other than the data argument (e.g. per-data-point parameters)."""
        with rng_preserved(), torch.no_grad():
            try:
                self._run(model, guide, args, kwargs, batch, sample_from, 1)
            except ValueError:
                return False
        return True

    def _run(self, model, guide, args, kwargs, x: torch.Tensor, sample_from: str, copies: int):
        """``({kind: (model trace, guide trace)}, y)`` of the stacked batch ``x``, with
        ``copies`` latents per ``y``."""
        if sample_from == "model":
            sampler = ObservationMessenger(self._obs_name, self.sigma, resample=True)
            model_args = self.data_arg.substitute(args, kwargs, x)
            model_trace = poutine.trace(sampler(model)).get_trace(*model_args[0], **model_args[1])
            reparameterized_or_raise(model_trace.nodes, "model", type(self).__name__)
            y = model_trace.nodes[self._obs_name]["value"]
            model_trace.nodes[self._obs_name]["is_observed"] = True  # y is the data from here on
            guide_args = self.data_arg.substitute(args, kwargs, y)
            guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace)).get_trace(
                *guide_args[0], **guide_args[1]
            )
            pairs = {"": (model_trace, guide_trace)}
            if copies > 1:
                extra = self._given_y(model, guide, args, kwargs, y, copies - 1)
                pairs[" (importance samples)"] = extra
            return pairs, y
        y = self.data.sample_like(x)
        return {"": self._given_y(model, guide, args, kwargs, y, copies)}, y

    def _given_y(self, model, guide, args, kwargs, y: torch.Tensor, copies: int):
        """Traces of ``z ~ q(z | y)`` and the model observing ``y``, ``copies`` latents per y."""
        y_args, y_kwargs = self.data_arg.substitute(args, kwargs, repeat_batch(y, copies))
        guide_trace = poutine.trace(guide).get_trace(*y_args, **y_kwargs)
        observed = ObservationMessenger(self._obs_name, self.sigma)(model)
        model_trace = poutine.trace(poutine.replay(observed, trace=guide_trace)).get_trace(
            *y_args, **y_kwargs
        )
        reparameterized_or_raise(guide_trace.nodes, "guide", type(self).__name__)
        return model_trace, guide_trace

    def _terms(self, model, guide, args, kwargs, for_guide=False) -> tuple[torch.Tensor, _Draw]:
        """Per-sample :math:`f(e^r)` (model side) or :math:`\tilde f(e^{-r})` (data side), of
        ``f`` or, ``for_guide``, of ``guide_f``."""
        divergence, sample_from = (
            (self.guide_divergence, self.guide_sample_from)
            if for_guide
            else (self.divergence, self.sample_from)
        )
        self._setup(model, guide, args, kwargs)
        pairs, y = self._traces(model, guide, args, kwargs, sample_from)
        mpn = cast(int, self.max_plate_nesting)  # guessed by _setup
        weights: LogWeights | None = None
        rows: list[torch.Tensor] = []
        for model_trace, guide_trace in pairs.values():
            pair_weights = log_weights_from_traces(model_trace, guide_trace, mpn)
            weights = weights or pair_weights
            rows.append(self._row_log_weights(pair_weights, model_trace, guide_trace, y))
        assert weights is not None  # num_importance_samples >= 1 pairs
        # K latents per y: the importance estimate log w_K(y) of log p_theta(y)
        log_w = log_mean_exp(torch.cat(rows).reshape(self.num_importance_samples, len(y)))
        log_p_hat = self.log_data_density(y)
        traces = {
            f"{kind}{suffix}": trace
            for suffix, pair in pairs.items()
            for kind, trace in zip(("model", "guide"), pair, strict=True)
        }
        draw = _Draw(weights, log_p_hat, traces)
        if sample_from == "model":
            return divergence.f(log_p_hat - log_w), draw
        return divergence.dual().f(log_w - log_p_hat), draw

    def _row_log_weights(self, weights: LogWeights, model_trace, guide_trace, y) -> torch.Tensor:
        """One log weight per stacked row (plates nested in the data plate are part of it)."""
        batch = y.shape[0] // self.num_particles
        plates = [f.name for f in weights.plates]
        if self._data_plate not in plates:  # a structure that changed since the first call
            traces = {"model": model_trace, "guide": guide_trace}
            self._check_latents_in_plate(self._data_plate, self._obs_name, batch, traces)
            raise ValueError(
                f"{type(self).__name__} needs every site inside the data plate "
                f"'{self._data_plate}'; the sites share plates {plates}"
            )
        row = plates.index(self._data_plate) + 1
        log_w = weights.log_w
        inner = [d for d in range(1, log_w.dim()) if d != row]
        log_w = (log_w.sum(inner) if inner else log_w).reshape(-1)
        rows = model_trace.nodes[self._obs_name]["value"].shape[0]
        if log_w.numel() != rows:
            raise ValueError(
                f"{type(self).__name__} needs one log weight per row of the batch (size {batch}, "
                f"stacked num_particles={self.num_particles} times), actual {log_w.numel()}: "
                f"check that the data plate '{self._data_plate}' is sized by the data argument"
            )
        return log_w

    def _bound(self, model, guide, args, kwargs, for_guide=False) -> tuple[torch.Tensor, _Draw]:
        terms, draw = self._terms(model, guide, args, kwargs, for_guide)
        return terms.mean(), draw

    def _checked(self, bound: torch.Tensor, draw: _Draw) -> float:
        density, advice = self.data.non_finite_advice()
        return checked_value(
            bound.detach(),
            type(self).__name__,
            draw.weights,
            check_finite=self.check_finite,
            traces=draw.traces,
            densities={density: (draw.log_data_density, advice)},
            otherwise="no single site: the log weights or f overflowed when combined",
        )

    # ---------------------------------------------------------------- Pyro's entry points
    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of one draw (Pyro's ``ELBO`` interface)."""
        self._setup(model, guide, args, kwargs)
        pairs, _ = self._traces(model, guide, args, kwargs, self.sample_from)
        return pairs[""]

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """:returns: an estimate of the bound :math:`U(\\theta, \\phi)`; changes no state."""
        with torch.no_grad():
            bound, draw = self._bound(model, guide, args, kwargs)
            return self._checked(bound, draw)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: the bound estimate as a differentiable scalar (gradient to all params).
        :raises ValueError: naming the sites (and the data density) if the bound is not finite
            (with ``check_finite``).
        """
        bound, draw = self._bound(model, guide, args, kwargs)
        if self.check_finite:
            self._checked(bound, draw)
        return bound

    def _guide_step(self, model, guide, args, kwargs) -> float:
        """One update of the guide's parameters with ``guide_optim``; the bound's value."""
        value, params = self._grads(model, guide, args, kwargs, "guide")
        params = params or []  # the guide part always names the parameters it wrote
        self.guide_optim(params)
        for p in params:
            p.grad = None
        return value

    # ---------------------------------------------------------------- the two players' steps
    def _eager_grads(self, model, guide, args, kwargs, part: str):
        """The gradient step of the guide (``part="guide"``: into the guide's own parameters,
        which it returns) or of the model (``"model"``: into the model's parameters, or all
        with ``guide_steps=0``)."""
        bound, draw = self._bound(model, guide, args, kwargs, for_guide=part == "guide")
        value = self._checked(bound, draw)
        model_trace = draw.weights.model_trace
        self._param_names = {
            "model": trace_param_names(model_trace),
            "guide": trace_param_names(draw.weights.guide_trace),
        }
        if part == "guide":
            model_params = trace_params(model_trace)
            params = [
                p
                for p in trace_params(draw.weights.guide_trace)
                if all(p is not q for q in model_params)
            ]
            if not params:
                raise ValueError("guide_steps > 0 but the guide has no parameters to update")
            grads = torch.autograd.grad(bound, params, allow_unused=True)
            stepped = []
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
                    stepped.append(p)
            return value, stepped
        if bound.requires_grad:
            if self.guide_steps:
                params = trace_params(model_trace)
                if params:
                    bound.backward(inputs=params, retain_graph=self.retain_graph)
            else:
                bound.backward(retain_graph=self.retain_graph)
        return value, None

    def _traced_loss(self, model, guide, args, kwargs, part=""):
        return self._bound(model, guide, args, kwargs, for_guide=part == "guide")[0], None

    def _program_key(self, part: str) -> tuple | None:
        schedule = self.schedule
        if schedule is None:
            return ()
        if schedule.start != schedule.end and schedule.t < schedule.num_steps:
            return None  # sigma changes every step: eager until the schedule ends
        return (schedule.sigma,)

    def _program_wrt(self, part: str) -> list[str] | None:
        names = self._param_names
        if part == "guide":
            return [n for n in names["guide"] if n not in names["model"]]
        return names["model"] if self.guide_steps else None

    def _program_modules(self) -> list[torch.nn.Module]:
        return [self.data]  # the training set and the PCA projection: inputs, not constants

    def _raise_non_finite(self, value, model, guide, args, kwargs, part="") -> None:
        with torch.no_grad():  # the same draw, eagerly: the check names the sites
            bound, draw = self._bound(model, guide, args, kwargs, for_guide=part == "guide")
            self._checked(bound, draw)
        raise ValueError(
            f"{type(self).__name__}: the compiled bound is {value}, but the same draw's bound "
            "is finite eagerly: the compiled program's arithmetic overflowed. Run with "
            "compile=False, or in float64."
        )

    # ---------------------------------------------------------------- the inner convention
    def _inner_modules(self) -> list[torch.nn.Module]:
        return [self.data]  # the training set and the PCA projection

    def inner_parameters(self) -> list[torch.Tensor]:
        """The guide parameters that ``guide_optim`` has updated (``[]`` before the first guide
        step, and with ``guide_steps=0``: then SVI's optimizer steps the guide)."""
        return list(self.guide_optim.optim_objs)

    def step_inner(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float | None:
        """
        The ``guide_steps`` guide updates of one :meth:`loss_and_grads` alone (each on a fresh
        draw, minimizing ``guide_f``'s bound); the model's parameters are left alone.

        :returns: the bound of the last update's draw, ``None`` with ``guide_steps=0``.
        :raises ValueError: naming the sites if the bound is not finite (with
            ``check_finite``).
        """
        value = None
        for _ in range(self.guide_steps):
            value = self._guide_step(model, guide, args, kwargs)
        return value

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        Take ``guide_steps`` guide updates (:meth:`step_inner`), then back-propagate the bound
        (into the model's parameters, or all parameters when ``guide_steps=0``) and advance the
        spread schedule.

        :returns: the bound estimate of the final evaluation.
        :raises ValueError: naming the sites (and the data density) if the bound is not finite
            (with ``check_finite``).
        """
        self.step_inner(model, guide, *args, **kwargs)
        value, _ = self._grads(model, guide, args, kwargs, "model")
        if self.schedule is not None:
            self.schedule.step()
        return value

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The spread schedule's position and the guide optimizer's state."""
        return copy.deepcopy(
            {
                "schedule": None if self.schedule is None else self.schedule.state_dict(),
                "guide_optim": self.guide_optim.get_state(),
            }
        )

    def load_state_dict(self, state: dict) -> None:
        if (state["schedule"] is None) != (self.schedule is None):
            raise ValueError("state_dict's spread schedule does not match this objective's")
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.guide_optim.optim_objs.clear()  # those of the parameters the restore replaces
        self.guide_optim.grad_clip.clear()
        self.guide_optim.set_state(state["guide_optim"])
