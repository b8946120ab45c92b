r"""The Metropolis independence sampler: pure ``init``/``step`` functions over explicit state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = ["MISInfo", "MISState", "build_kernel", "init", "step", "step_many"]


class MISState(NamedTuple):
    r"""
    State of a batch of independent Metropolis chains.

    :ivar position: the chains' current values: a tensor or a ``dict`` of tensors, each with
        the chains' ``batch_shape`` as its leading dimensions.
    :ivar torch.Tensor log_weight: :math:`\log w(z) = \log \pi(z) - \log q(z)` of the current
        values, shape ``batch_shape`` (the target :math:`\pi` may be unnormalized).
    """

    position: Any
    log_weight: torch.Tensor


class MISInfo(NamedTuple):
    r"""
    What one transition did, per chain.

    :ivar torch.Tensor acceptance_rate: :math:`\min\{1, w(z')/w(z)\}`, the probability that the
        proposal was accepted (``0`` for a proposal whose log weight is ``nan``).
    :ivar torch.Tensor is_accepted: whether it was.
    :ivar MISState proposal: the proposal and its log weight.
    """

    acceptance_rate: torch.Tensor
    is_accepted: torch.Tensor
    proposal: MISState


def init(position: Any, log_weight: torch.Tensor) -> MISState:
    r"""
    Start chains at ``position``, whose log weight
    :math:`\log \pi(z) - \log q(z)` is ``log_weight``.
    """
    return MISState(position, torch.as_tensor(log_weight))


def _log_accept_ratio(current: torch.Tensor, proposed: torch.Tensor) -> torch.Tensor:
    log_ratio = proposed - current
    # -inf -> -inf is nan: such a proposal is no better than the state, reject it; a finite
    # proposal from a zero-density state (current = -inf) has ratio +inf and is accepted.
    return torch.where(torch.isnan(log_ratio), torch.full_like(log_ratio, -torch.inf), log_ratio)


def _select(accept: torch.Tensor, proposed: Any, current: Any) -> Any:
    if isinstance(current, dict):
        return {name: _select(accept, proposed[name], value) for name, value in current.items()}
    mask = accept.reshape(accept.shape + (1,) * (current.dim() - accept.dim()))
    return torch.where(mask, proposed, current)


def step(
    state: MISState, proposal: MISState, uniform: torch.Tensor | None = None
) -> tuple[MISState, MISInfo]:
    r"""
    One Metropolis independence transition of every chain [1, 2]: accept the proposal
    :math:`z' \sim q` with probability

    .. math::

        \alpha(z, z') = \min\Big\{1, \frac{w(z')}{w(z)}\Big\}, \qquad
        w(z) = \frac{\pi(z)}{q(z)},

    which leaves :math:`\pi` invariant because the proposal does not depend on the state. The
    comparison is done in log space (``log u < log w(z') - log w(z)``), so unnormalized targets
    of any scale work. A proposal whose log weight is ``nan`` is rejected.

    :param MISState state: the chains, ``batch_shape`` leading.
    :param MISState proposal: a draw from :math:`q` per chain and its log weight.
    :param torch.Tensor uniform: ``U(0, 1)`` draws of shape ``batch_shape``; drawn with
        :func:`torch.rand` if omitted (pass them to make a transition a pure function).
    :returns: the new state and the transition's :class:`MISInfo`.

    **References**

    [1] L. Tierney. *Markov chains for exploring posterior distributions*. Ann. Statist., 1994.

    [2] BlackJAX, ``blackjax.mcmc.random_walk.build_irmh``: the same kernel over JAX pytrees.
    """
    log_ratio = _log_accept_ratio(state.log_weight, proposal.log_weight)
    if uniform is None:
        uniform = torch.rand(log_ratio.shape, dtype=log_ratio.dtype, device=log_ratio.device)
    is_accepted = uniform.log() < log_ratio
    acceptance_rate = log_ratio.clamp(max=0.0).exp()
    new = MISState(
        _select(is_accepted, proposal.position, state.position),
        torch.where(is_accepted, proposal.log_weight, state.log_weight),
    )
    return new, MISInfo(acceptance_rate, is_accepted, proposal)


def step_many(
    state: MISState, proposals: MISState, uniform: torch.Tensor | None = None
) -> tuple[MISState, MISInfo]:
    r"""
    ``K`` transitions in sequence, the ``k``-th against ``proposals[k]``: for an independence
    sampler the proposals do not depend on the state, so all ``K`` can be drawn and weighted
    in one vectorized pass beforehand and only the accept/reject decisions run in order (three
    elementwise operations per transition; the positions are gathered once at the end).
    Identical to ``K`` calls of :func:`step` with the same uniforms.

    :param MISState state: the chains, ``batch_shape`` leading.
    :param MISState proposals: ``K`` proposals per chain, with a leading dimension ``K``
        before ``batch_shape`` in every position leaf and in the log weights.
    :param torch.Tensor uniform: ``U(0, 1)`` draws of shape ``(K,) + batch_shape``.
    :returns: the state after the last transition and the :class:`MISInfo` of every transition,
        stacked along a leading dimension ``K`` (its ``proposal`` is ``proposals``).
    """
    log_w = proposals.log_weight
    if uniform is None:
        uniform = torch.rand(log_w.shape, dtype=log_w.dtype, device=log_w.device)
    log_u = uniform.log()
    current = state.log_weight.expand(log_w.shape[1:])
    before, accepted = [], []
    for k in range(log_w.shape[0]):
        # a nan ratio compares False: rejected, as in step()
        is_accepted = log_u[k] < log_w[k] - current
        before.append(current)
        accepted.append(is_accepted)
        current = torch.where(is_accepted, log_w[k], current)
    is_accepted = torch.stack(accepted)
    acceptance_rate = _log_accept_ratio(torch.stack(before), log_w).clamp(max=0.0).exp()
    # which proposal each chain holds at the end (0: none, it kept its state)
    steps = torch.arange(1, len(log_w) + 1, device=log_w.device)
    held = torch.where(is_accepted, steps.reshape((-1,) + (1,) * (log_w.dim() - 1)), 0)
    last = held.amax(0)
    position = _gather(state.position, proposals.position, last)
    return MISState(position, current), MISInfo(acceptance_rate, is_accepted, proposals)


def _gather(initial: Any, stacked: Any, last: torch.Tensor) -> Any:
    """``initial`` where ``last == 0``, else ``stacked[last - 1]``, per chain."""
    if isinstance(initial, dict):
        return {name: _gather(value, stacked[name], last) for name, value in initial.items()}
    index = (last - 1).clamp(min=0)
    index = index.reshape((1, *index.shape) + (1,) * (stacked.dim() - 1 - index.dim()))
    taken = stacked.gather(0, index.expand((1, *stacked.shape[1:]))).squeeze(0)
    return _select(last > 0, taken, initial)


def build_kernel(
    log_density_fn: Callable[[Any], torch.Tensor],
    proposal_sample_fn: Callable[[], Any],
    proposal_log_density_fn: Callable[[Any], torch.Tensor],
) -> tuple[Callable[[Any], MISState], Callable[[MISState], tuple[MISState, MISInfo]]]:
    r"""
    A Metropolis independence sampler for a fixed target and proposal, in BlackJAX's style:
    returns ``(init_fn, step_fn)`` with ``init_fn(position) -> MISState`` and
    ``step_fn(state) -> (MISState, MISInfo)``.

    :param log_density_fn: :math:`\log \pi(z)` (unnormalized), vectorized over a batch of
        chains.
    :param proposal_sample_fn: draws one proposal per chain.
    :param proposal_log_density_fn: :math:`\log q(z)`, vectorized like ``log_density_fn``.

    Example::

        target, proposal = dist.Normal(1.0, 0.5), dist.Normal(0.0, 2.0)
        init_fn, step_fn = build_kernel(
            target.log_prob, lambda: proposal.sample((100,)), proposal.log_prob
        )
        state = init_fn(proposal.sample((100,)))  # 100 chains
        for _ in range(1000):
            state, info = step_fn(state)
    """

    def log_weight(position: Any) -> torch.Tensor:
        return log_density_fn(position) - proposal_log_density_fn(position)

    def init_fn(position: Any) -> MISState:
        return init(position, log_weight(position))

    def step_fn(state: MISState) -> tuple[MISState, MISInfo]:
        position = proposal_sample_fn()
        return step(state, MISState(position, log_weight(position)))

    return init_fn, step_fn
