"""Draws from a fitted guide and its density, in the unconstrained coordinates of the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from pyro.poutine.util import site_is_subsample

__all__ = ["has_density", "latent_supports", "sample_unconstrained", "unconstrained_log_density"]


def latent_supports(
    model: Callable, *args: Any, **kwargs: Any
) -> dict[str, tuple[object, torch.Size]]:
    """The support and value shape of every latent sample site of ``model``, in execution
    order."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return {
        name: (site["fn"].support, site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("is_auxiliary")
    }


def sample_unconstrained(
    model: Callable, guide: Callable, num_samples: int, *args: Any, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """
    ``num_samples`` joint draws of the guide's latent sites, mapped to unconstrained space with
    each model site's bijection (:func:`~pyro.distributions.transforms.biject_to`), of shape
    ``(num_samples, *site_shape)``. Works for any guide (vectorized with Pyro's
    :class:`~pyro.infer.Predictive`).
    """
    sites = latent_supports(model, *args, **kwargs)
    with torch.no_grad():
        draws = Predictive(
            model, guide=guide, num_samples=num_samples, return_sites=list(sites), parallel=True
        )(*args, **kwargs)
    return {
        name: biject_to(support).inv(draws[name].reshape((num_samples, *shape)))
        for name, (support, shape) in sites.items()
    }


def has_density(guide: Callable) -> bool:
    """Whether :func:`unconstrained_log_density` can evaluate ``guide``."""
    return isinstance(guide, AutoContinuous | AutoNormal)


def unconstrained_log_density(guide: Callable, sites: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""
    :math:`\log q(\zeta)` of an autoguide at unconstrained site values ``sites`` (each with a
    leading sample dimension ``n``), as a tensor of shape ``(n,)``.

    The density is over the unconstrained coordinates :math:`\zeta` themselves (no Jacobian to
    the constrained space), the space in which KL divergences to a reference are compared.

    :raises TypeError: for guides whose density is not available here (implicit guides).
    """
    n = next(iter(sites.values())).shape[0]
    with torch.no_grad():
        if isinstance(guide, AutoContinuous):
            packed = torch.cat(
                [sites[name].reshape(n, -1) for name, _ in _guide_sites(guide)], dim=-1
            )
            return guide.get_posterior().log_prob(packed)
        if isinstance(guide, AutoNormal):
            total = torch.zeros(n, dtype=next(iter(sites.values())).dtype)
            for name, _ in _guide_sites(guide):
                loc, scale = guide._get_loc_and_scale(name)
                log_q = dist.Normal(loc, scale).log_prob(sites[name].reshape((n, *loc.shape)))
                total = total + log_q.reshape(n, -1).sum(-1)
            return total
    raise TypeError(
        f"{type(guide).__name__} has no density available to pyro_fdiv.compare; "
        "use an AutoContinuous guide or AutoNormal for exact KL and PSIS k-hat."
    )


def _guide_sites(guide) -> list:
    if guide.prototype_trace is None:
        raise ValueError(f"{type(guide).__name__} has not been run yet: fit it first.")
    return list(guide.prototype_trace.iter_stochastic_nodes())
