r"""One convention for objectives that train parts of their own (inner optimizers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

__all__ = ["InnerTraining", "InnerTrainingProtocol", "inner_parameters", "move", "step_inner"]

T = TypeVar("T")
_InnerT = TypeVar("_InnerT", bound="InnerTraining")


@runtime_checkable
class InnerTrainingProtocol(Protocol):
    r"""
    What an objective with trainable parts of its own provides (see :class:`InnerTraining`).
    """

    def inner_parameters(self) -> list[torch.Tensor]: ...

    def step_inner(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float | None: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class InnerTraining:
    r"""
    The convention for objectives that own trainable parts, or tensors, besides the model's
    and guide's parameters that :class:`~pyro.infer.SVI`'s optimizer steps, and a mixin that
    implements its device and dtype moves.

    Some objectives update parameters with an optimizer of their own: the guide steps of
    :class:`~pyro_fdiv.inference.FDivergenceBound` (``guide_steps > 0``, with ``guide_optim``),
    the critic of :class:`~pyro_fdiv.inference.FGANBound` (``critic_optim``) and the
    discriminator of :class:`~pyro_fdiv.inference.AVB` (``adversary_optim``). Each of them,
    and every objective with tensors of its own (JSA's chains), provides the same members:

    - ``inner_parameters() -> list[Tensor]``: the tensors the objective's own optimizer
      updates (the critic's, the discriminator's once built, the guide parameters the guide
      optimizer has stepped); ``[]`` when every update is SVI's (JSA: SVI's optimizer steps its
      guide through the surrogate loss, and its chains are buffers, not parameters).
    - ``step_inner(model, guide, *args, **kwargs) -> float | None``: the inner updates of one
      training step alone (``guide_steps``, ``critic_steps``, ``num_adversary_steps``), on
      fresh draws; returns the inner loss of the last update, or ``None`` when it takes none.
      :meth:`~pyro.infer.ELBO.loss_and_grads` takes these updates as part of every step, so
      ``SVI.step`` is one whole training step for every objective, and a training loop steps
      them all alike; ``loss`` and ``differentiable_loss`` never update them.
    - ``to(*args, **kwargs) -> self`` (and, with this mixin, ``double()`` and ``float()``): move
      the objective's own tensors (modules, buffers and its optimizer's state) like
      :meth:`torch.nn.Module.to`. Tensors in Pyro's param store are the caller's to move.
    - ``state_dict()`` / ``load_state_dict(state)``: the objective's state including the
      inner optimizer's, so a checkpoint resumes exactly.

    The functions :func:`inner_parameters`, :func:`step_inner` and :func:`move` apply the
    convention to any objective: one outside it (Pyro's ELBOs, IWAE, BlackBoxAlpha) has no
    parts of its own.

    A subclass of the mixin lists its modules in :meth:`_inner_modules` and its
    ``torch.optim`` optimizers in :meth:`_inner_optimizers`; it implements
    ``inner_parameters`` and ``step_inner`` itself.
    """

    def _inner_modules(self) -> list[nn.Module]:
        """The modules holding the objective's own tensors."""
        return []

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The ``torch.optim`` optimizers over those modules' parameters."""
        return []

    def inner_parameters(self) -> list[torch.Tensor]:
        """The tensors the objective's own optimizer updates (none by default)."""
        return []

    def step_inner(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float | None:
        """The inner updates of one training step alone (none by default)."""
        return None

    def to(self: _InnerT, *args: Any, **kwargs: Any) -> _InnerT:
        """Move the objective's modules and buffers like :meth:`torch.nn.Module.to`, and its
        optimizers' state to their parameters' device and dtype."""
        for module in self._inner_modules():
            module.to(*args, **kwargs)
        for optim in self._inner_optimizers():
            # load_state_dict casts the state to each parameter's device and dtype
            optim.load_state_dict(optim.state_dict())
        return self

    def double(self: _InnerT) -> _InnerT:
        """``to(torch.float64)``."""
        return self.to(torch.float64)

    def float(self: _InnerT) -> _InnerT:
        """``to(torch.float32)``."""
        return self.to(torch.float32)


def inner_parameters(objective: Any) -> list[torch.Tensor]:
    """``objective.inner_parameters()``, or ``[]`` for an objective without parts of its own."""
    method = getattr(objective, "inner_parameters", None)
    return [] if method is None else list(method())


def step_inner(
    objective: Any, model: Callable, guide: Callable, *args: Any, **kwargs: Any
) -> float | None:
    """``objective.step_inner(model, guide, *args, **kwargs)``, or ``None`` for an objective
    without parts of its own."""
    method = getattr(objective, "step_inner", None)
    return None if method is None else method(model, guide, *args, **kwargs)


def move(objective: T, *args: Any, **kwargs: Any) -> T:
    """``objective.to(*args, **kwargs)`` for an objective with tensors of its own; one without
    has nothing to move. Returns ``objective``."""
    method = getattr(objective, "to", None)
    if method is not None:
        method(*args, **kwargs)
    return objective
