"""Plumbing shared by the objectives that learn a generative model from data samples."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_fdiv.util import rng_preserved

__all__ = [
    "DataArgument",
    "ObservationMessenger",
    "find_observation",
    "gaussian_observation",
    "trace_params",
]


class DataArgument:
    """
    Where the observed tensor sits in a ``model(*args, **kwargs)`` call: a positional index
    (default ``0``, the first argument) or a keyword name.
    """

    def __init__(self, where: int | str = 0):
        if isinstance(where, bool) or not isinstance(where, (numbers.Integral, str)):
            raise ValueError(
                f"Expected data_arg to be a positional index or a keyword name, actual {where!r}"
            )
        self.where = where

    def get(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if isinstance(self.where, str):
            if self.where not in kwargs:
                raise ValueError(
                    f"data_arg={self.where!r} but the model was called with keywords "
                    f"{sorted(kwargs)}: pass the batch as {self.where}=..., or set data_arg to "
                    "its position"
                )
            value = kwargs[self.where]
        else:
            if not -len(args) <= self.where < len(args):
                raise ValueError(
                    f"data_arg={self.where} but the model was called with {len(args)} "
                    "positional arguments: pass the batch there, or set data_arg to the keyword "
                    "name of the data argument"
                )
            value = args[self.where]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"Expected the data argument ({self.describe()}) to be a tensor batch, actual "
                f"{type(value).__name__}"
            )
        return value

    def substitute(self, args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
        """``args, kwargs`` with the data argument replaced by ``value``."""
        if isinstance(self.where, str):
            return args, {**kwargs, self.where: value}
        args = list(args)
        args[self.where] = value
        return tuple(args), kwargs

    def describe(self) -> str:
        if isinstance(self.where, str):
            return f"keyword {self.where!r}"
        return f"positional argument {self.where}"


def find_observation(trace: Trace, name: str | None = None) -> dict:
    """The model's observed sample site: the one named ``name``, or the only observed one."""
    observed = {
        n: s
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and s["is_observed"] and not site_is_subsample(s)
    }
    if name is not None:
        if name not in observed:
            raise ValueError(
                f"obs_site={name!r} is not an observed sample site of the model; observed "
                f"sites: {sorted(observed)}"
            )
        return observed[name]
    if len(observed) != 1:
        raise ValueError(
            f"Expected the model to have exactly one observed sample site (the data), found "
            f"{sorted(observed)}: pass obs_site=... to name it"
        )
    return next(iter(observed.values()))


def gaussian_observation(fn: Any, sigma: float, name: str) -> dist.TorchDistribution:
    r"""
    :math:`\mathcal{N}(\mu_\theta(z), \sigma^2 I)` with the mean of the model's Gaussian
    observation distribution ``fn`` and its event dims, but the spread width ``sigma``.

    :raises ValueError: if ``fn`` is not a (possibly ``to_event``) ``Normal``.
    """
    base, event_dims = fn, 0
    while isinstance(base, torch.distributions.Independent):
        event_dims += base.reinterpreted_batch_ndims
        base = base.base_dist
    if type(base) not in (dist.Normal, torch.distributions.Normal):
        raise ValueError(
            f"Observation site '{name}' has distribution {type(fn).__name__}"
            f"{'(' + type(base).__name__ + ')' if base is not fn else ''}; spread noise needs "
            "a Gaussian observation N(mu_theta(z), sigma^2 I) (its scale is replaced by the "
            "spread width): write pyro.sample(name, dist.Normal(mean, 1.0).to_event(k), obs=x)"
        )
    loc = base.loc.expand(base.batch_shape)
    return dist.Normal(loc, torch.as_tensor(sigma, dtype=loc.dtype, device=loc.device)).to_event(
        event_dims
    )


class ObservationMessenger(Messenger):
    """
    Rewrites the model's observation site ``name``: with ``sigma``, its distribution becomes the
    spread-noise Gaussian :func:`gaussian_observation`; with ``resample=True`` its value is
    drawn from the model (reparameterized where possible) instead of observed.
    """

    def __init__(self, name: str, sigma: float | None = None, resample: bool = False):
        super().__init__()
        self.name, self.sigma, self.resample = name, sigma, resample

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] != self.name:
            return
        if self.sigma is not None:
            msg["fn"] = gaussian_observation(msg["fn"], self.sigma, self.name)
        if self.resample:
            msg["is_observed"] = False
            msg["value"] = None


def trace_params(trace: Trace) -> list[torch.Tensor]:
    """The unconstrained leaf tensors of the ``pyro.param`` sites in ``trace``."""
    params: list[torch.Tensor] = []
    for site in trace.nodes.values():
        if site["type"] == "param":
            value = site["value"]
            leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
            if leaf.requires_grad and all(leaf is not p for p in params):
                params.append(leaf)
    return params


def trace_param_names(trace: Trace) -> list[str]:
    """The names of the ``pyro.param`` sites in ``trace``."""
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


def reparameterized_or_raise(sites: dict[str, dict], side: str, objective: str) -> None:
    """Raise ``NotImplementedError`` for sampled sites without ``rsample``."""
    for name, site in sites.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise NotImplementedError(
                f"{objective} samples '{name}' from the {side} and differentiates through the "
                f"sample, but {type(site['fn']).__name__} has no rsample. Use a reparameterizable "
                "distribution there (e.g. a relaxed Bernoulli), or an objective with "
                "score-function gradients (IWAE, BlackBoxAlpha, JSA)."
            )


def repeat_batch(x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """``num_particles`` copies of the batch stacked along its first dim (particles in the
    batch: each data point gets ``num_particles`` samples)."""
    if num_particles == 1:
        return x
    return x.expand(num_particles, *x.shape).reshape(num_particles * x.shape[0], *x.shape[1:])


def traced_once(fn: Callable, *args: Any, **kwargs: Any) -> Trace:
    """One trace of ``fn`` that leaves the caller's random stream untouched."""
    with rng_preserved(), pyro.validation_enabled(False):
        return poutine.trace(fn).get_trace(*args, **kwargs)
