r"""The Fenchel-conjugate (f-GAN) lower bound of Nowozin, Cseke and Tomioka."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.infer.elbo import ELBO
from torch import nn

from pyro_fdiv.divergences import Divergence
from pyro_fdiv.inference.fdiv_bound import _as_divergence
from pyro_fdiv.inference.generative import (
    DataArgument,
    ObservationMessenger,
    find_observation,
    reparameterized_or_raise,
    repeat_batch,
    trace_params,
    traced_once,
)
from pyro_fdiv.inference.objective import check_integer, check_num_particles

__all__ = ["FGANBound"]


class FGANBound(ELBO):
    r"""
    The variational lower bound of [1] on :math:`D_f(P \| Q_\theta)` between the data
    distribution :math:`P` and the model's marginal :math:`Q_\theta = p_\theta(x)`,

    .. math::

        D_f(P \| Q_\theta) \ge \sup_\psi\; \mathbb{E}_P\big[g_f(V_\psi(x))\big]
        - \mathbb{E}_{Q_\theta}\big[f^*(g_f(V_\psi(x)))\big],

    with :math:`f^*` the convex conjugate and :math:`g_f` the output activation of
    :meth:`~pyro_fdiv.divergences.Divergence.critic_activation` (the optimal critic is
    :math:`g_f(V) = f'(P/Q)`). A minimax game: the critic ascends the bound, the model
    descends it. It is the comparison point of :class:`FDivergenceBound` [2], which bounds the
    same divergence from above.

    Model samples come from the model itself, its observation site resampled (``rsample``, so
    :math:`\theta` gets pathwise gradients); the guide is not used (pass an empty function).
    Data samples are the batch passed to the model (the data argument, ``data_arg``), or draws
    from ``data`` when a target distribution is given.

    :meth:`loss_and_grads` takes ``critic_steps`` critic updates with ``critic_optim``, then
    back-propagates the bound into the model's parameters only; :meth:`loss` changes nothing.
    :meth:`critic_loss` reports the critic's own loss (the negated bound) for monitoring.

    :param f: the divergence, a name or a :class:`~pyro_fdiv.divergences.Divergence`.
    :param torch.nn.Module critic: :math:`V_\psi`, mapping a batch of observations of shape
        ``(B,) + event_shape`` to ``(B,)`` or ``(B, 1)``.
    :param data: ``None`` (the batch is the data sample) or a target distribution.
    :param critic_optim: a ``torch.optim.Optimizer`` over the critic's parameters, or a function
        building one from them (default ``Adam(lr=1e-3)``).
    :param int critic_steps: critic updates per model update.
    :param int num_particles: model samples per element of the batch.

    **References**

    [1] S. Nowozin, B. Cseke, R. Tomioka. *f-GAN: Training generative neural samplers using
    variational divergence minimization*. NeurIPS 2016.

    [2] M. Zhang, T. Bird, R. Habib, T. Xu, D. Barber. *Variational f-divergence minimization*
    (2019), section 4.4.
    """

    def __init__(
        self,
        f: str | Divergence = "js",
        critic: nn.Module | None = None,
        data: Distribution | None = None,
        critic_optim: torch.optim.Optimizer | Callable | None = None,
        critic_steps: int = 1,
        num_particles: int = 1,
        data_arg: int | str = 0,
        obs_site: str | None = None,
    ):
        super().__init__(num_particles=check_num_particles(num_particles))
        self.divergence = _as_divergence(f)
        if not isinstance(critic, nn.Module):
            raise ValueError(
                f"Expected critic to be a torch.nn.Module V(x), actual {type(critic).__name__}"
            )
        self.critic = critic
        if data is not None and not hasattr(data, "sample"):
            raise ValueError(
                f"Expected data to be None or a distribution with sample(), actual {data!r}"
            )
        self.data = data
        if critic_optim is None:
            critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
        elif not isinstance(critic_optim, torch.optim.Optimizer):
            critic_optim = critic_optim(critic.parameters())
        self.critic_optim = critic_optim
        self.critic_steps = check_integer("critic_steps", critic_steps, 1)
        self.data_arg = DataArgument(data_arg)
        self.obs_site = obs_site
        self._obs_name = None

    def _samples(self, model, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Data samples, model samples (differentiable in theta) and the model's parameters."""
        x = self.data_arg.get(args, kwargs)
        if self._obs_name is None:
            self._obs_name = find_observation(traced_once(model, *args, **kwargs), self.obs_site)[
                "name"
            ]
        if self.data is not None:
            x = self.data.sample(x.shape[: x.dim() - len(self.data.event_shape)]).to(x)
        batch = repeat_batch(x, self.num_particles)
        model_args, model_kwargs = self.data_arg.substitute(args, kwargs, batch)
        sampler = ObservationMessenger(self._obs_name, resample=True)
        trace = poutine.trace(sampler(model)).get_trace(*model_args, **model_kwargs)
        reparameterized_or_raise(trace.nodes, "model", type(self).__name__)
        return x, trace.nodes[self._obs_name]["value"], trace_params(trace)

    def _critic(self, x: torch.Tensor) -> torch.Tensor:
        v = self.critic(x)
        if v.shape == (x.shape[0], 1):
            v = v.squeeze(-1)
        if v.shape != x.shape[:1]:
            raise ValueError(
                f"Expected the critic to map a batch of shape {tuple(x.shape)} to "
                f"({x.shape[0]},) or ({x.shape[0]}, 1), actual {tuple(v.shape)}"
            )
        return v

    def bound(self, x_data: torch.Tensor, x_model: torch.Tensor) -> torch.Tensor:
        """The bound's Monte Carlo estimate at the current critic."""
        v_data, v_model = self._critic(x_data), self._critic(x_model)
        return (
            self.divergence.critic_activation(v_data).mean()
            - self.divergence.critic_conjugate(v_model).mean()
        )

    def _finite(self, bound: torch.Tensor) -> float:
        value = bound.item()
        if not torch.isfinite(bound):
            raise ValueError(
                f"{type(self).__name__} bound is {value}: the critic's outputs left the domain "
                "of f* or overflowed; lower the critic's learning rate"
            )
        return value

    def _get_trace(self, model, guide, args, kwargs):
        """Pyro's ``ELBO`` interface: the model's trace with the observation resampled."""
        raise NotImplementedError("FGANBound has no guide trace; call loss or loss_and_grads")

    def loss(self, model, guide, *args, **kwargs) -> float:
        """:returns: the lower-bound estimate (the model minimizes it); changes no state."""
        with torch.no_grad():
            x_data, x_model, _ = self._samples(model, args, kwargs)
            return self._finite(self.bound(x_data, x_model))

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """:returns: the lower-bound estimate, differentiable in the model's (and critic's)
        parameters."""
        x_data, x_model, _ = self._samples(model, args, kwargs)
        return self.bound(x_data, x_model)

    @torch.no_grad()
    def critic_loss(self, model, guide, *args, **kwargs) -> float:
        """The critic's loss, the negated bound, for monitoring; changes no state."""
        return -self.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """``critic_steps`` critic updates, then the bound's gradient into the model only."""
        for _ in range(self.critic_steps):
            with torch.no_grad():
                x_data, x_model, _ = self._samples(model, args, kwargs)
            critic_loss = -self.bound(x_data, x_model)
            self._finite(critic_loss)
            self.critic_optim.zero_grad()
            critic_loss.backward()
            self.critic_optim.step()
            self.critic_optim.zero_grad()
        x_data, x_model, params = self._samples(model, args, kwargs)
        bound = self.bound(x_data, x_model)
        value = self._finite(bound)
        if params and bound.requires_grad:
            bound.backward(inputs=params)
        return value

    def state_dict(self) -> dict:
        """The critic's parameters and its optimizer's state."""
        return copy.deepcopy(
            {"critic": self.critic.state_dict(), "critic_optim": self.critic_optim.state_dict()}
        )

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_optim.load_state_dict(state["critic_optim"])
