r"""The Fenchel-conjugate (f-GAN) lower bound of Nowozin, Cseke and Tomioka."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.infer.elbo import ELBO
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_fdiv.divergences import Divergence, as_divergence
from pyro_fdiv.inference.compiled import Compilable
from pyro_fdiv.inference.data_density import DensityData
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
from pyro_fdiv.inference.importance import checked_value
from pyro_fdiv.inference.inner import InnerTraining
from pyro_fdiv.util import check_flag, check_integer, check_num_particles

__all__ = ["FGANBound"]


class FGANBound(Compilable, InnerTraining, ELBO):
    r"""
    The variational lower bound of [1] on :math:`D_f(P \| Q_\theta)` between the data
    distribution :math:`P` and the model's marginal :math:`Q_\theta = p_\theta(x)`,

    .. math::

        D_f(P \| Q_\theta) \ge \sup_\psi\; \mathbb{E}_P\big[g_f(V_\psi(x))\big]
        - \mathbb{E}_{Q_\theta}\big[f^*(g_f(V_\psi(x)))\big],

    with :math:`f^*` the convex conjugate and :math:`g_f` the output activation of
    :meth:`~pyro_fdiv.divergences.Divergence.critic_activation` (the optimal critic is
    :math:`g_f(V) = f'(P/Q)`). A minimax game: the critic ascends the bound, the model
    descends it. It is the comparison point of
    :class:`~pyro_fdiv.inference.fdiv_bound.FDivergenceBound` [2], which bounds the same
    divergence from above.

    Model samples come from the model itself, its observation site resampled (``rsample``, so
    :math:`\theta` gets pathwise gradients). FGANBound trains the model only: there is no
    guide (pass ``None`` or a function without sample sites or parameters; a guide that has
    them raises a ``ValueError`` naming them, since it would get no gradient: use
    :class:`~pyro_fdiv.inference.fdiv_bound.FDivergenceBound` for a model with an encoder,
    and ``IWAE``, ``BlackBoxAlpha``, ``AVB`` or ``JSA`` for posterior inference).
    Data samples are the batch passed to the model (the data argument, ``data_arg``), or draws
    from ``data`` when a target distribution is given.

    :meth:`loss_and_grads` takes ``critic_steps`` critic updates with ``critic_optim``
    (:meth:`step_inner`), then back-propagates the bound into the model's parameters only;
    :meth:`loss` changes nothing. The critic is the objective's own trainable part
    (:meth:`inner_parameters`, :class:`~pyro_fdiv.inference.inner.InnerTraining`): ``.to()``
    moves it with its optimizer's state, and :meth:`state_dict` holds both.
    :meth:`critic_loss` reports the critic's own loss (the negated bound) for monitoring.

    :param f: the divergence, a name or a :class:`~pyro_fdiv.divergences.Divergence`.
    :param torch.nn.Module critic: :math:`V_\psi`, mapping a batch of observations of shape
        ``(B,) + event_shape`` to ``(B,)`` or ``(B, 1)``.
    :param data: ``None`` (the batch is the data sample) or a target distribution.
    :param critic_optim: a ``torch.optim.Optimizer`` over the critic's parameters, or a function
        building one from them (default ``Adam(lr=1e-3)``).
    :param int critic_steps: critic updates per model update.
    :param int num_particles: model samples per element of the batch.
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads`
        (also before each critic update) and :meth:`differentiable_loss` raise a ``ValueError``
        if the bound is not finite, naming the model sites whose log-densities are not finite
        at the model's samples (e.g. an observation drawn at ``inf``), or else blaming the
        critic; ``False`` skips the check (no device synchronization in
        :meth:`differentiable_loss`).

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
        critic_optim: torch.optim.Optimizer
        | Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
        | None = None,
        critic_steps: int = 1,
        num_particles: int = 1,
        data_arg: int | str = 0,
        obs_site: str | None = None,
        check_finite: bool = True,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        super().__init__(num_particles=check_num_particles(num_particles))
        self.check_finite = check_flag("check_finite", check_finite)
        self._init_compile(compile, compile_options)
        self._param_names: list[str] = []
        self.divergence = as_divergence(f)
        if not isinstance(critic, nn.Module):
            raise ValueError(
                f"Expected critic to be a torch.nn.Module V(x), actual {type(critic).__name__}"
            )
        self.critic = critic
        if data is not None and not hasattr(data, "sample"):
            raise ValueError(
                f"Expected data to be None or a distribution with sample(), actual {data!r}"
            )
        self.data = None if data is None else DensityData(data)
        if critic_optim is None:
            critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
        elif not isinstance(critic_optim, torch.optim.Optimizer):
            critic_optim = critic_optim(critic.parameters())
        self.critic_optim: torch.optim.Optimizer = critic_optim
        self.critic_steps = check_integer("critic_steps", critic_steps, 1)
        self.data_arg = DataArgument(data_arg)
        self.obs_site = obs_site
        self._obs_name: str | None = None

    def _check_guide(self, guide, args, kwargs) -> None:
        """Raise if ``guide`` has sample sites or parameters: they would silently get nothing.
        An empty guide costs one trivial traced call."""
        if guide is None:
            return
        trace = traced_once(guide, *args, **kwargs)
        sites = [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        ]
        params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
        if sites or params:
            raise ValueError(
                f"{type(self).__name__} trains the model only and never runs the guide, but the "
                f"guide has sample sites {sites} and parameters {params}, which would get no "
                "gradient. Use FDivergenceBound for a model with an encoder (q(z | x) as the "
                "guide), IWAE, BlackBoxAlpha, AVB or JSA for posterior inference, or pass no "
                "guide (None, or a function without sites)."
            )

    def _samples(self, model, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, Trace]:
        """Data samples, model samples (differentiable in theta) and the model's trace."""
        x = self.data_arg.get(args, kwargs)
        if self._obs_name is None:
            self._obs_name = find_observation(traced_once(model, *args, **kwargs), self.obs_site)[
                "name"
            ]
        if self.data is not None:
            x = self.data.sample_like(x)
        batch = repeat_batch(x, self.num_particles)
        model_args, model_kwargs = self.data_arg.substitute(args, kwargs, batch)
        sampler = ObservationMessenger(self._obs_name, resample=True)
        trace = poutine.trace(sampler(model)).get_trace(*model_args, **model_kwargs)
        reparameterized_or_raise(trace.nodes, "model", type(self).__name__)
        return x, trace.nodes[self._obs_name]["value"], trace

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

    def _checked(self, bound: torch.Tensor, trace: Trace) -> float:
        return checked_value(
            bound.detach(),
            type(self).__name__,
            traces={"model": trace},
            check_finite=self.check_finite,
            quantity="bound",
            cause="the critic's inputs or outputs are not finite",
            otherwise=(
                "no model site, so the critic's outputs left the domain of f* or overflowed"
            ),
            advice="Check the model's parameters, or lower the critic's learning rate.",
        )

    def _get_trace(self, model, guide, args, kwargs):
        """Pyro's ``ELBO`` interface: the model's trace with the observation resampled."""
        raise NotImplementedError("FGANBound has no guide trace; call loss or loss_and_grads")

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """:returns: the lower-bound estimate (the model minimizes it); changes no state."""
        self._check_guide(guide, args, kwargs)
        with torch.no_grad():
            x_data, x_model, trace = self._samples(model, args, kwargs)
            return self._checked(self.bound(x_data, x_model), trace)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: the lower-bound estimate, differentiable in the model's (and critic's)
            parameters.
        :raises ValueError: if the bound is not finite (with ``check_finite``).
        """
        self._check_guide(guide, args, kwargs)
        x_data, x_model, trace = self._samples(model, args, kwargs)
        bound = self.bound(x_data, x_model)
        if self.check_finite:
            self._checked(bound, trace)
        return bound

    @torch.no_grad()
    def critic_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The critic's loss, the negated bound, for monitoring; changes no state."""
        return -self.loss(model, guide, *args, **kwargs)

    # ---------------------------------------------------------------- the inner convention
    def _inner_modules(self) -> list[nn.Module]:
        return [self.critic]

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.critic_optim]

    def inner_parameters(self) -> list[torch.Tensor]:
        """The critic's parameters, which ``critic_optim`` updates."""
        return list(self.critic.parameters())

    def step_inner(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        The ``critic_steps`` critic updates of one :meth:`loss_and_grads` alone, each on fresh
        data and model samples; the model's parameters are left alone.

        :returns: the critic's loss (the negated bound) before the last update.
        :raises ValueError: if the bound is not finite (with ``check_finite``).
        """
        for _ in range(self.critic_steps):
            with torch.no_grad():
                x_data, x_model, trace = self._samples(model, args, kwargs)
            critic_loss = -self.bound(x_data, x_model)
            if self.check_finite:
                self._checked(critic_loss, trace)
            self.critic_optim.zero_grad()
            critic_loss.backward()
            self.critic_optim.step()
            self.critic_optim.zero_grad()
        return critic_loss.item()

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """``critic_steps`` critic updates (:meth:`step_inner`), then the bound's gradient into
        the model only.

        :raises ValueError: if the bound is not finite (with ``check_finite``)."""
        self._check_guide(guide, args, kwargs)
        self.step_inner(model, guide, *args, **kwargs)
        return self._grads(model, guide, args, kwargs)[0]

    # the compiled path's protocol (pyro_fdiv.inference.compiled.Compilable)
    def _eager_grads(self, model, guide, args, kwargs, part=""):
        x_data, x_model, trace = self._samples(model, args, kwargs)
        bound = self.bound(x_data, x_model)
        value = self._checked(bound, trace)
        self._param_names = trace_param_names(trace)
        params = trace_params(trace)
        if params and bound.requires_grad:
            bound.backward(inputs=params)
        return value, None

    def _traced_loss(self, model, guide, args, kwargs, part=""):
        x_data, x_model, _ = self._samples(model, args, kwargs)
        return self.bound(x_data, x_model), None

    def _program_wrt(self, part: str) -> list[str]:
        return self._param_names  # the model's: the critic is the inner player's

    def _program_modules(self) -> list[nn.Module]:
        return [self.critic] + ([self.data] if self.data is not None else [])

    def _raise_non_finite(self, value, model, guide, args, kwargs, part="") -> None:
        with torch.no_grad():  # the same draw, eagerly: the check names the sites
            x_data, x_model, trace = self._samples(model, args, kwargs)
            self._checked(self.bound(x_data, x_model), trace)
        raise ValueError(
            f"{type(self).__name__}: the compiled bound is {value}, but the same draw's bound is "
            "finite eagerly: the compiled program's arithmetic overflowed. Run with "
            "compile=False, or in float64."
        )

    def state_dict(self) -> dict:
        """The critic's parameters and its optimizer's state."""
        return copy.deepcopy(
            {"critic": self.critic.state_dict(), "critic_optim": self.critic_optim.state_dict()}
        )

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_optim.load_state_dict(state["critic_optim"])
