"""Base class of the per-data-point importance-weighted objectives."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled

from pyro_fdiv.checkpoint import get_rng_state, set_rng_state
from pyro_fdiv.inference.importance import (
    LogWeights,
    checked_value,
    guess_max_plate_nesting,
    importance_trace,
    trace_signature,
)
from pyro_fdiv.util import check_flag, check_integer, check_num_particles, rng_preserved

__all__ = [
    "ImportanceObjective",
    "check_integer",
    "check_num_particles",
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


class ImportanceObjective(ELBO):
    r"""
    Base class for objectives built on per-data-point log importance weights.

    A subclass defines :meth:`bound`, a reduction of the particle dimension of the log weights
    :math:`\log w_{k,i}` (see :func:`~pyro_fdiv.inference.importance.importance_trace`) to one
    bound per element of the shared plates. This class turns it into Pyro's three entry points:
    :meth:`loss` (the negated bound summed over the batch and scaled by the subsample scale),
    :meth:`differentiable_loss` (a tensor whose value is that loss and whose gradient is the
    estimator, usable through :meth:`~pyro.infer.elbo.ELBO.__call__` as a
    :class:`torch.nn.Module`) and :meth:`loss_and_grads` (for :class:`~pyro.infer.SVI`).

    Particles are always vectorized in an outermost plate named ``num_particles_vectorized``,
    so model and guide must have static structure and broadcast correctly.

    :param int num_particles: number of particles :math:`K` per data point.
    :param int max_plate_nesting: bound on the number of nested plates; guessed from one run of
        model and guide if omitted
        (:func:`~pyro_fdiv.inference.importance.guess_max_plate_nesting`, which leaves the
        random stream untouched).
    :param bool vectorize_particles: accepted for compatibility with Pyro; must be ``True``.
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
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
        retain_graph: bool | None = None,
        validation: str = "first",
        check_finite: bool = True,
    ):
        num_particles = check_num_particles(num_particles)
        self.check_finite = check_flag("check_finite", check_finite)
        if validation not in ("first", "always"):
            raise ValueError(f"Expected validation in ('first', 'always'), actual {validation!r}")
        self.validation = validation
        self._validated: tuple | None = None
        if vectorize_particles is not True:
            raise ValueError(
                "Expected vectorize_particles=True (particles are always a tensor dimension in "
                f"pyro_fdiv objectives), actual {vectorize_particles!r}"
            )
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
        run = functools.partial(
            importance_trace,
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            max_plate_nesting=self.max_plate_nesting,
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

    def _checked(self, loss: torch.Tensor, weights: LogWeights) -> float:
        return checked_value(loss, type(self).__name__, weights, check_finite=self.check_finite)

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """
        :returns: the negated bound, summed over the batch and scaled by the subsample scale.
        :rtype: float
        """
        weights = self._log_weights(model, guide, args, kwargs)
        loss = -self.bound(weights.log_w).sum() * weights.scale
        return self._checked(loss, weights)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """
        :returns: a scalar tensor equal to :meth:`loss` whose gradient is the estimator.
        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        weights = self._log_weights(model, guide, args, kwargs, differentiable=True)
        loss = -self._surrogate(weights).sum() * weights.scale
        if self.check_finite:
            self._checked(loss.detach(), weights)
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """
        Compute :meth:`loss` and back-propagate the estimator into every parameter.

        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        weights = self._log_weights(model, guide, args, kwargs, differentiable=True)
        loss = -self._surrogate(weights).sum() * weights.scale
        value = self._checked(loss, weights)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return value
