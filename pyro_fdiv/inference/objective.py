"""Base class of the per-data-point importance-weighted objectives."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled

from pyro_fdiv.checkpoint import get_rng_state, set_rng_state
from pyro_fdiv.inference.compiled import Compilable
from pyro_fdiv.inference.importance import (
    LogWeights,
    checked_value,
    guess_max_plate_nesting,
    importance_trace,
    is_subsampled,
    raise_non_finite,
    sample_sites,
    subsample_scale,
    trace_signature,
)
from pyro_fdiv.util import check_flag, check_integer, check_num_particles, rng_preserved

__all__ = [
    "ImportanceObjective",
    "check_integer",
    "check_num_particles",
    "joint_score",
    "local_split",
    "nested_log_weights",
    "rng_preserved",
    "score_function_surrogate",
]


def score_function_surrogate(
    bound: Callable[..., torch.Tensor], log_w: torch.Tensor, score: torch.Tensor
) -> torch.Tensor:
    r"""
    Zero-valued surrogate whose gradient is the score-function term of a bound
    :math:`F(\log w_1, \dots, \log w_K)` over non-reparameterized guide sites,

    .. math::

        \sum_k \big(F(\log w_{1:K}) - F(\log w_{1:K}^{(-k)})\big)\,\nabla_\phi \log q(z_k),

    with the leave-one-out baseline of VIMCO [1]: :math:`\log w^{(-k)}` replaces
    :math:`\log w_k` by the mean of the other particles' log weights, so the baseline does not
    depend on :math:`z_k` and the estimator stays unbiased. With one particle no baseline exists.

    :param bound: ``bound(log_w, dim)`` reducing the particle dimension ``dim``.
    :param log_w: detached log weights of shape ``(K,) + batch_shape``.
    :param score: ``log q`` of the non-reparameterized sites, same shape, differentiable.

    **References**

    [1] A. Mnih, D. Rezende. *Variational inference for Monte Carlo objectives*. ICML 2016.
    """
    num_particles = log_w.shape[0]
    signal = bound(log_w, 0).unsqueeze(0)
    if num_particles > 1:
        mean_others = (log_w.sum(0, keepdim=True) - log_w) / (num_particles - 1)
        loo = log_w.unsqueeze(0).expand((num_particles, *log_w.shape)).clone()
        index = torch.arange(num_particles, device=log_w.device)
        loo[index, index] = mean_others
        signal = signal - bound(loo, 1)
    term = (signal.detach() * score).sum(0)
    return term - term.detach()


def local_split(weights: LogWeights) -> tuple[tuple[int, ...], float]:
    """The dims of ``weights.log_w`` (particle dim 0) of the kept plates that the global sites
    are outside of, and their subsample scale :math:`N/B`."""
    local = [
        (p, f) for p, f in enumerate(weights.plates, start=1) if f not in weights.global_plates
    ]
    return tuple(p for p, _ in local), subsample_scale(f for _, f in local)


def nested_log_weights(weights: LogWeights) -> torch.Tensor:
    r"""One log weight per particle of the global latents (and element of the plates every
    site shares): :math:`\log p(\theta_k) - \log q(\theta_k) + s \sum_i \log w_{i,k}`, the
    local log weights summed over the plates the global sites are outside of and scaled by
    their subsample scale :math:`s = N/B`."""
    assert weights.global_log_w is not None  # called for weights with global latents only
    dims, scale = local_split(weights)
    local = weights.log_w.sum(dims) if dims else weights.log_w
    return weights.global_log_w + (local * scale if scale != 1.0 else local)


def joint_score(weights: LogWeights) -> torch.Tensor | None:
    """The score of each particle's global and local draws together (unscaled: it is the log
    density of what was sampled)."""
    dims, _ = local_split(weights)
    parts = [weights.global_score]
    if weights.score is not None:
        parts.append(weights.score.sum(dims) if dims else weights.score)
    scores = [p for p in parts if p is not None]
    return sum(scores[1:], scores[0]) if scores else None


class ImportanceObjective(Compilable, ELBO):
    r"""
    Base class for objectives built on per-data-point log importance weights.

    A subclass defines :meth:`bound`, a reduction of the particle dimension of the log weights
    :math:`\log w_{k,i}` (see :func:`~pyro_fdiv.inference.importance.importance_trace`) to one
    bound per element of the shared plates. This class turns it into Pyro's three entry points:
    :meth:`loss` (the negated bound summed over the batch and scaled by the subsample scale),
    :meth:`differentiable_loss` (a tensor whose value is that loss and whose gradient is the
    estimator, usable through :meth:`~pyro.infer.elbo.ELBO.__call__` as a
    :class:`torch.nn.Module`) and :meth:`loss_and_grads` (for :class:`~pyro.infer.SVI`).

    Particles are vectorized in an outermost plate named ``num_particles_vectorized`` when the
    model and guide broadcast over it, and run one after another on the same minibatch when
    they do not (``vectorize_particles``); the bound is the same either way.

    **Global latents under subsampling.** When a subsampled plate (a minibatch of ``B`` of
    ``N`` data points) does not enclose every site, a per-data-point bound does not exist. The
    default (``global_latents="nested"``) is the nested multi-sample bound: ``K`` particles of
    the global latents :math:`\theta`, one draw of each data point's local latents per
    particle,

    .. math::

        \mathcal{L} = \log \frac{1}{K} \sum_{k=1}^K \exp\Big[\log p(\theta_k)
            - \log q(\theta_k) + \frac{N}{B} \sum_{i \in \text{batch}}
            \log w_{i,k}\Big],
        \qquad w_{i,k} = \frac{p(x_i, z_{i,k} \mid \theta_k)}{q(z_{i,k} \mid x_i, \theta_k)}.

    With the whole data set (:math:`B = N`) it is the importance-weighted bound of the joint,
    a lower bound on :math:`\log p(x)`; with :math:`B < N` the :math:`N/B` scale inside the
    log-mean-exp makes it a consistent but biased estimate (Pyro's ``RenyiELBO`` does the same
    for every model), and a warning says so once. ``global_latents="error"`` raises instead.
    :class:`~pyro_fdiv.inference.BlackBoxAlpha` defaults to its own unbiased global-latent
    energy. Models whose global latents are all outside every subsampled plate and whose local
    latents are all inside it qualify; a model without global latents is unchanged.

    :param int num_particles: number of particles :math:`K` per data point.
    :param int max_plate_nesting: bound on the number of nested plates; guessed from one run of
        model and guide if omitted
        (:func:`~pyro_fdiv.inference.importance.guess_max_plate_nesting`, which leaves the
        random stream untouched).
    :param vectorize_particles: ``None`` (default): vectorized, and if the first vectorized
        step fails to broadcast (an exception inside the model or guide, or a site with batch
        dims left of the particle plate), the particles run one after another from then on,
        with one warning naming the site and the reason. ``True``: always vectorized (errors
        are raised). ``False``: always one after another, each particle on the minibatch the
        first one drew (Pyro's ``Trace_ELBO(vectorize_particles=False)`` and ``RenyiELBO`` let
        each particle draw its own minibatch, which biases a multi-sample bound).
    :param str global_latents: the estimator for global latents under subsampling:
        ``"nested"`` (above) or ``"error"`` (a ``ValueError`` naming the plate and the sites
        outside it); :class:`~pyro_fdiv.inference.BlackBoxAlpha` also has ``"energy"``.
    :param int num_local_particles: ``L``, the draws of each data point's local latents per
        particle of the global latents in the global-latent estimators: the local weight
        :math:`w_{i,k}` above becomes :math:`\frac{1}{L}\sum_{l=1}^L w_{i,k,l}`, an unbiased
        estimate of :math:`p(x_i \mid \theta_k)` that tightens the bound as ``L`` grows
        (vectorized in a plate left of the particle plate; reparameterized local guide sites and
        ``gradient_estimator="reparam"``). Models without global latents under subsampling
        ignore it: their ``num_particles`` are already per data point.
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    :param str validation: when Pyro's validation is enabled, ``"first"`` (default) validates
        distribution arguments, supports and the model/guide match on the first step and
        again whenever the sample sites' names, types or shapes change, and runs other steps
        without it, as Pyro's JIT objectives do (it costs 5-15% of a step); ``"always"``
        validates every step. ``check_finite`` applies on every step either way.
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads` and
        :meth:`differentiable_loss` raise a ``ValueError`` naming the model and guide sites whose
        log-densities are not finite if the loss is not finite
        (:func:`~pyro_fdiv.inference.importance.raise_non_finite`); when ``False`` there is no
        check: a non-finite loss is returned (and back-propagated) as is, and
        :meth:`differentiable_loss` never synchronizes with the device.
    :param bool compile: when ``True``, :meth:`loss_and_grads` (what ``SVI.step`` calls) runs
        the model and guide's Python once and then one compiled program of loss and gradient
        (:class:`~pyro_fdiv.inference.compiled.CompiledLoss`): the first step for each argument
        shape is eager and validated, the program is traced after it and compiled on the next
        call; models whose structure depends on sampled values, and sequential particles, stay
        eager with one warning. :meth:`loss` and :meth:`differentiable_loss` stay eager. For
        the optimizer inside the program as well, use
        :func:`~pyro_fdiv.inference.make_step`.
    :param dict compile_options: keyword arguments of ``torch.compile`` (default
        ``{"options": {"fallback_random": True}}``: the same draws as the eager step).
    """

    max_plate_nesting: float  # Pyro's ELBO attribute (inf until guessed)

    #: The ``global_latents`` estimators this objective offers (the first is the default).
    GLOBAL_ESTIMATORS: tuple[str, ...] = ("nested", "error")

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool | None = None,
        strict_enumeration_warning: bool = True,
        retain_graph: bool | None = None,
        validation: str = "first",
        check_finite: bool = True,
        global_latents: str | None = None,
        num_local_particles: int = 1,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        num_particles = check_num_particles(num_particles)
        self._init_compile(compile, compile_options)
        self.check_finite = check_flag("check_finite", check_finite)
        if validation not in ("first", "always"):
            raise ValueError(f"Expected validation in ('first', 'always'), actual {validation!r}")
        self.validation = validation
        self._validated: tuple | None = None
        if vectorize_particles is not None and not isinstance(vectorize_particles, bool):
            raise ValueError(
                "Expected vectorize_particles in (None, True, False), actual "
                f"{vectorize_particles!r}"
            )
        self._vectorize: bool | None = vectorize_particles
        if global_latents is None:
            global_latents = self.GLOBAL_ESTIMATORS[0]
        if global_latents not in self.GLOBAL_ESTIMATORS:
            raise ValueError(
                f"Expected global_latents in {self.GLOBAL_ESTIMATORS}, actual {global_latents!r}"
            )
        self.global_latents = global_latents
        self.num_local_particles = check_integer("num_local_particles", num_local_particles, 1)
        self._local_plates: tuple[str, ...] | None = None
        self._warned_global = False
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            strict_enumeration_warning=strict_enumeration_warning,
            retain_graph=retain_graph,
        )

    def bound(self, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Reduce the particle dimension ``dim`` of log weights to a per-data-point bound."""
        raise NotImplementedError

    def _trace_options(self, differentiable: bool) -> dict[str, Any]:
        """Options of :func:`~pyro_fdiv.inference.importance.importance_trace` for this
        objective (e.g. ``detach_guide``); ``differentiable``: the draw will be
        back-propagated."""
        return {}

    def _log_weights(self, model, guide, args, kwargs, differentiable: bool = False) -> LogWeights:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        state = get_rng_state() if self._finding_local_plates() else None
        weights = self._validated_run(model, guide, args, kwargs, differentiable)
        if state is not None and weights.global_log_w is not None:
            # L local particles: the plates that make a site local are known now; redraw
            self._local_plates = tuple(f.name for f in weights.plates if is_subsampled(f))
            if not self._local_plates:
                raise ValueError(
                    f"num_local_particles={self.num_local_particles} needs one data plate "
                    "enclosing every local site, but the model's subsampled plates cross (a "
                    "site is inside some of them but not all); use num_local_particles=1."
                )
            set_rng_state(state)
            weights = self._validated_run(model, guide, args, kwargs, differentiable)
        if self._vectorize is None and self.num_particles > 1:
            self._vectorize = weights.vectorized  # decided on the first step, kept from then on
        return weights

    def _validated_run(self, model, guide, args, kwargs, differentiable: bool) -> LogWeights:
        run = functools.partial(
            importance_trace,
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            max_plate_nesting=int(self.max_plate_nesting),  # guessed above when inf
            vectorize_particles=self._vectorize,
            split_global=self.global_latents != "error",
            num_local_particles=self.num_local_particles if self._local_plates else 1,
            local_plates=self._local_plates or (),
            accumulate_dtype=None if differentiable else torch.float64,  # a reported loss
            **self._trace_options(differentiable),
        )
        if self.validation == "always" or not is_validation_enabled():
            return run()
        if self._validated is not None:
            state = get_rng_state()
            with pyro.validation_enabled(False):
                weights = run()
            if trace_signature(weights) == self._validated:
                return weights
            # the structure changed: validate a rerun with the same draws, so that the random
            # stream (and an exact resume from a checkpoint) does not depend on validation
            set_rng_state(state)
        weights = run()  # first step, or the structure changed: validate
        self._validated = trace_signature(weights)
        return weights

    def _finding_local_plates(self) -> bool:
        return self.num_local_particles > 1 and self._local_plates is None

    def _warn_global(self, weights: LogWeights) -> None:
        if self._warned_global:
            return
        self._warned_global = True
        frames = {
            f: None
            for site in sample_sites(weights.model_trace).values()
            for f in site["cond_indep_stack"]
            if is_subsampled(f)
        }
        sizes = ", ".join(f"'{f.name}' ({f.size} of {f.full_size})" for f in frames)
        warnings.warn(
            f"{type(self).__name__}: global latent sites sit outside the subsampled plate "
            f"{sizes}; the {self.global_latents!r} global-latent estimator is used. "
            "With a minibatch (B < N) the nested bound is a consistent but biased estimate of "
            "log p(x) (exact as a lower bound only at B = N). Pass global_latents='error' to "
            "refuse such models.",
            UserWarning,
            stacklevel=4,
        )

    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of one vectorized run (Pyro's ``ELBO`` interface)."""
        weights = self._log_weights(model, guide, args, kwargs)
        return weights.model_trace, weights.guide_trace

    def _surrogate(self, weights: LogWeights) -> torch.Tensor:
        """Per-data-point tensor whose value is the bound and whose gradient is the estimator."""
        surrogate = self.bound(weights.log_w)
        if weights.score is not None:
            surrogate = surrogate + score_function_surrogate(
                self.bound, weights.log_w.detach(), weights.score
            )
        return surrogate

    def _total(self, weights: LogWeights, differentiable: bool) -> torch.Tensor:
        """The bound of the batch, scaled to the data set: a scalar whose gradient is the
        estimator when ``differentiable``."""
        if weights.global_log_w is not None:
            return self._global_total(weights, differentiable)
        per_point = self._surrogate(weights) if differentiable else self.bound(weights.log_w)
        return per_point.sum() * weights.scale

    def _global_total(self, weights: LogWeights, differentiable: bool) -> torch.Tensor:
        """The nested bound: one weight per particle, ``log p(θ_k) - log q(θ_k)`` plus the
        scaled sum of the batch's local log weights, reduced by :meth:`bound`."""
        if self.num_particles > 1:
            self._warn_global(weights)  # biased (with one particle it is linear: unbiased)
        joint = weights._replace(
            log_w=nested_log_weights(weights),
            score=joint_score(weights),
            global_log_w=None,
            global_score=None,
            plates=weights.global_plates,
        )
        return self._total(joint, differentiable)

    def _checked(self, loss: torch.Tensor, weights: LogWeights) -> float:
        return checked_value(loss, type(self).__name__, weights, check_finite=self.check_finite)

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """
        :returns: the negated bound, summed over the batch and scaled by the subsample scale.
        :rtype: float
        """
        weights = self._log_weights(model, guide, args, kwargs)
        return self._checked(-self._total(weights, differentiable=False), weights)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """
        :returns: a scalar tensor equal to :meth:`loss` whose gradient is the estimator.
        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        weights = self._log_weights(model, guide, args, kwargs, differentiable=True)
        loss = -self._total(weights, differentiable=True)
        if self.check_finite:
            self._checked(loss.detach(), weights)
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """
        Compute :meth:`loss` and back-propagate the estimator into every parameter (with
        ``compile=True``: from the compiled program, writing the gradients into the
        unconstrained parameters' ``.grad``).

        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        return self._grads(model, guide, args, kwargs)[0]

    # the protocol of the compiled path (pyro_fdiv.inference.compiled.CompiledLoss); one part
    _whole_step = True  # make_step may compile loss, gradient and optimizer as one program

    def _traced_loss(self, model, guide, args, kwargs, part="") -> tuple[torch.Tensor, tuple]:
        """The differentiable loss without its finite check, and the sample sites'
        signature: what the compiled program captures."""
        weights = self._log_weights(model, guide, args, kwargs, differentiable=True)
        return -self._total(weights, differentiable=True), trace_signature(weights)

    def _compile_refusal(self, part: str = "") -> str | None:
        """Why the step cannot be one traced program (after an eager step), or ``None``."""
        if self.num_particles > 1 and self._vectorize is False:
            return "the particles run one after another (the sequential-particle path)"
        return None

    def _raise_non_finite(self, value: float, model, guide, args, kwargs, part="") -> None:
        """Re-run the step's draw eagerly to name the sites of a non-finite compiled loss."""
        with torch.no_grad():
            weights = self._log_weights(model, guide, args, kwargs)
            self._checked(-self._total(weights, differentiable=False), weights)
        raise_non_finite(value, type(self).__name__, weights)

    def _eager_grads(self, model, guide, args, kwargs, part="") -> tuple[float, None]:
        return self._eager_loss_and_grads(model, guide, args, kwargs), None

    def _eager_loss_and_grads(self, model, guide, args, kwargs) -> float:
        weights = self._log_weights(model, guide, args, kwargs, differentiable=True)
        loss = -self._total(weights, differentiable=True)
        value = self._checked(loss, weights)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return value
