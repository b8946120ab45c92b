"""Per-data-point log importance weights: the mechanism every objective here shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NoReturn

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import Delta, Independent
from pyro.distributions.util import is_identically_one, scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match
from torch.distributions.utils import broadcast_all

from pyro_fdiv.util import check_flag

__all__ = [
    "NON_FINITE_ADVICE",
    "PARTICLE_PLATE",
    "LogWeights",
    "check_flag",
    "checked_value",
    "get_log_weights",
    "guide_log_prob_at_detached",
    "log_mean_exp",
    "log_weights_from_traces",
    "non_finite_sites",
    "raise_non_finite",
    "reparam_roots",
    "site_log_prob",
    "trace_signature",
]

#: Name of the plate that vectorizes particles (shared with Pyro's own ELBOs).
PARTICLE_PLATE = "num_particles_vectorized"


class LogWeights(NamedTuple):
    r"""
    Log importance weights of ``K`` particles, one per element of the shared plates.

    :ivar torch.Tensor log_w: ``log p(x, z_k) - log q(z_k | x)`` of shape ``(K,) + batch_shape``,
        differentiable (pathwise through reparameterized sites), with the subsample scale of the
        shared plates divided out.
    :ivar torch.Tensor score: ``log q`` of the non-reparameterizable guide sites reduced the same
        way (the score-function surrogate), or ``None`` when every guide site is reparameterized.
    :ivar float scale: the subsample scale :math:`\prod N/B` of the shared plates, to be applied to
        the summed per-data-point bound.
    :ivar tuple plates: the shared plate frames, outermost first; ``batch_shape`` follows them.
    :ivar model_trace: the model trace.
    :ivar guide_trace: the guide trace (both keep their subsample sites, so they can be
        replayed).
    """

    log_w: torch.Tensor
    score: torch.Tensor | None
    scale: float
    plates: tuple[CondIndepStackFrame, ...]
    model_trace: Trace
    guide_trace: Trace


def _particle_plate(fn: Callable, num_particles: int, max_plate_nesting: int) -> Callable:
    # One particle needs no plate (as in Pyro's ELBOs): the weights get a leading dim of 1.
    if num_particles == 1:
        return fn
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-max_plate_nesting - 1)(fn)


def _sample_sites(trace: Trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _check_sites(model_sites: dict, guide_sites: dict) -> None:
    for name, site in model_sites.items():
        if site["is_observed"] or name in guide_sites:
            continue
        raise ValueError(
            f"Model sample site '{name}' is neither observed nor sampled by the guide. "
            "Importance weights need q(z) for every latent site: add a site named "
            f"'{name}' to the guide, or pass obs= to the model's site."
        )
    for name, site in {**model_sites, **guide_sites}.items():
        if site["infer"].get("enumerate"):
            raise ValueError(
                f"Site '{name}' is marked for enumeration (infer={site['infer']}); "
                "pyro_fdiv objectives sample every latent site. Remove the 'enumerate' flag "
                "or use pyro.infer.TraceEnum_ELBO."
            )


def _shared_plates(
    sites: list[dict], names: list[str]
) -> tuple[tuple[CondIndepStackFrame, ...], float]:
    """The vectorized plates that every sample site shares, and their subsample scale."""
    stacks = [
        {f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE}
        for site in sites
    ]
    shared = set.intersection(*stacks) if stacks else set()
    for frame in set.union(set(), *stacks) - shared:
        if frame.full_size is not None and frame.full_size > frame.size:
            outside = [n for n, s in zip(names, stacks, strict=True) if frame not in s]
            raise ValueError(
                f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}) but "
                f"sites [{', '.join(outside)}] are outside it. Per-data-point importance weights "
                "need the subsampled plate to enclose every sample site of the model and "
                "guide (a data plate around the whole model); subsample only such a plate, or "
                "move the "
                "global latents' inference to a separate objective."
            )
    scale = 1.0
    for frame in shared:
        if frame.full_size is not None:
            scale *= frame.full_size / frame.size
    return tuple(sorted(shared, key=lambda f: f.dim)), scale


def _log_prob(fn, value: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``fn.log_prob(value)``; for ``Independent(Bernoulli(logits))`` the sum over the event
    dims is taken before the negation (bit-identical, but one full-size pass fewer each way:
    Bernoulli decoders over ``K x B x D`` pixels are the largest tensors of a VAE step)."""
    base = getattr(fn, "base_dist", None)
    if (
        type(fn) in (Independent, torch.distributions.Independent)
        and isinstance(base, torch.distributions.Bernoulli)
        and "logits" in base.__dict__
        and not args
        and not kwargs
    ):
        if fn._validate_args:
            fn._validate_sample(value)
        logits, value = broadcast_all(base.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        dims = tuple(range(-fn.reinterpreted_batch_ndims, 0))
        return -(bce.sum(dims) if dims else bce)
    return fn.log_prob(value, *args, **kwargs)


def site_log_prob(site: dict, scale: float = 1.0) -> torch.Tensor:
    """``log p(value)`` of a trace site with its mask and with its scale divided by ``scale``."""
    log_p = _log_prob(site["fn"], site["value"], site["args"], site["kwargs"])
    site_scale = site["scale"]
    if scale != 1.0:
        site_scale = site_scale / scale
    if is_identically_one(site_scale) and site["mask"] is None:
        return log_p
    return scale_and_mask(log_p, site_scale, site["mask"])


def _reduce(
    log_p: torch.Tensor, name: str, keep_dims: tuple[int, ...], max_plate_nesting: int
) -> torch.Tensor:
    """Sum a site's log-density over everything but the particle dim and ``keep_dims``."""
    ndim = max_plate_nesting + 1
    if log_p.dim() > ndim:
        raise ValueError(
            f"Site '{name}' has log_prob shape {tuple(log_p.shape)}, with batch dims left of the "
            f"particle plate (max_plate_nesting={max_plate_nesting}). Declare event dims with "
            ".to_event(...), put batch dims in a pyro.plate, or raise max_plate_nesting."
        )
    if log_p.dim() < ndim:
        log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + log_p.shape)
    sum_dims = [d for d in range(-max_plate_nesting, 0) if d not in keep_dims]
    if sum_dims:
        log_p = log_p.sum(sum_dims, keepdim=True)
    return log_p.reshape((log_p.shape[0], *tuple(log_p.shape[d] for d in keep_dims)))


def _site_term(
    name: str, site: dict, scale: float, keep_dims: tuple[int, ...], max_plate_nesting: int
) -> torch.Tensor:
    """A site's log-density, subsample scale divided out, reduced to ``(K,) + batch_shape``."""
    return _reduce(site_log_prob(site, scale), name, keep_dims, max_plate_nesting)


def _trace_pair(model, guide, args, kwargs) -> tuple[Trace, Trace]:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def get_log_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
) -> LogWeights:
    r"""
    Run ``guide`` once with ``num_particles`` particles vectorized in a plate, replay ``model``
    against it, and return per-data-point log importance weights.

    .. math::

        \log w_{k,i} = \frac{1}{s}\Big(\log p(x_i, z_{k,i}) - \log q(z_{k,i} \mid x_i)\Big)

    for each element ``i`` of the plates that every sample site shares (a VAE's data plate),
    summing all other dimensions, where :math:`s = \prod N/B` is the subsample scale of those
    plates (NumPyro's ``RenyiELBO`` rule: divide it out before any log-mean-exp, apply it to the
    bound afterwards). A model with only global latents gets one weight per particle. All
    particles share one subsample: the guide draws it, the model replays it.

    :raises ValueError: for subsampling in a plate that not every site shares, a latent model
        site missing from the guide, enumerated sites, or batch dims outside the plates.
    """
    model_trace, guide_trace = _trace_pair(
        _particle_plate(model, num_particles, max_plate_nesting),
        _particle_plate(guide, num_particles, max_plate_nesting),
        args,
        kwargs,
    )
    return log_weights_from_traces(model_trace, guide_trace, max_plate_nesting)


def log_weights_from_traces(
    model_trace: Trace, guide_trace: Trace, max_plate_nesting: int
) -> LogWeights:
    """
    :func:`get_log_weights` for traces already run: ``model_trace`` holds every latent site at
    the guide's values (the guide ran first and the model replayed it, or the model ran first and
    the guide replayed it at the model's values).
    """
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    _check_sites(model_sites, guide_sites)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    names = [f"model site '{n}'" for n in model_sites] + [f"guide site '{n}'" for n in guide_sites]
    plates, scale = _shared_plates(list(model_sites.values()) + list(guide_sites.values()), names)
    keep_dims = tuple(f.dim for f in plates)

    log_w, score = 0.0, None
    for sign, sites in ((1.0, model_sites), (-1.0, guide_sites)):
        for name, site in sites.items():
            log_p = _site_term(name, site, scale, keep_dims, max_plate_nesting)
            log_w = log_w + sign * log_p
            if sign < 0 and not site["fn"].has_rsample:
                score = log_p if score is None else score + log_p
    if not isinstance(log_w, torch.Tensor):
        raise ValueError("The model and guide have no sample sites: nothing to weight.")
    return LogWeights(log_w, score, scale, plates, model_trace, guide_trace)


def trace_signature(weights: LogWeights) -> tuple:
    """Names, distribution types and shapes of every sample site: the structure validated."""
    return tuple(
        (kind, name, type(site["fn"]).__name__, tuple(site["value"].shape))
        for kind, trace in (("model", weights.model_trace), ("guide", weights.guide_trace))
        for name, site in _sample_sites(trace).items()
    )


def guide_log_prob_at_detached(
    guide: Callable,
    weights: LogWeights,
    args: tuple,
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
) -> torch.Tensor:
    r"""
    Re-run ``guide`` at the detached values of ``weights.guide_trace`` and return
    :math:`\log q_\phi(\bar z)` reduced like :attr:`LogWeights.log_w`.

    Its gradient is the guide's *direct* (score) dependence on :math:`\phi` with every sampled
    value held fixed, which "sticking the landing" and DReG subtract from the total gradient.
    Works for any guide (``pyro.param``, ``pyro.module``, autoguides, flows, hierarchical guides)
    at the cost of one extra guide pass.
    """
    detached = Trace(graph_type=weights.guide_trace.graph_type)
    for name, site in weights.guide_trace.nodes.items():
        site = site.copy()
        if isinstance(site.get("value"), torch.Tensor):
            site["value"] = site["value"].detach()
        detached.add_node(name, **site)
    rerun = poutine.trace(
        poutine.replay(_particle_plate(guide, num_particles, max_plate_nesting), trace=detached)
    ).get_trace(*args, **kwargs)
    keep_dims = tuple(f.dim for f in weights.plates)
    total = 0.0
    for name, site in _sample_sites(rerun).items():
        total = total + _site_term(name, site, weights.scale, keep_dims, max_plate_nesting)
    return total


def reparam_roots(guide_trace: Trace) -> dict[str, torch.Tensor]:
    """Reparameterized, non-``Delta`` guide sample values that carry gradients."""
    return {
        name: site["value"]
        for name, site in _sample_sites(guide_trace).items()
        if site["fn"].has_rsample
        and not isinstance(site["fn"], Delta)
        and isinstance(site["value"], torch.Tensor)
        and site["value"].requires_grad
    }


#: What to do about non-finite log-densities, unless an objective knows better.
NON_FINITE_ADVICE = (
    "Check the sites' parameters (e.g. a scale that reached 0, a value outside the support), "
    "lower the learning rate, or constrain the parameters."
)


def non_finite_sites(traces: Mapping[str, Trace]) -> list[str]:
    """``"{kind} site '{name}' (n non-finite log_prob entries)"`` for every sample site of the
    ``{kind: trace}`` mapping whose log-density is not finite everywhere."""
    bad = []
    for kind, trace in traces.items():
        for name, site in _sample_sites(trace).items():
            with torch.no_grad():
                log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            finite = torch.isfinite(log_p)
            if not finite.all():
                count = int((~finite).sum())
                bad.append(f"{kind} site '{name}' ({count} non-finite log_prob entries)")
    return bad


def raise_non_finite(
    loss: float,
    objective: str,
    weights: LogWeights | None = None,
    *,
    traces: Mapping[str, Trace] | None = None,
    densities: Mapping[str, tuple[torch.Tensor, str]] | None = None,
    quantity: str = "loss",
    cause: str | None = None,
    otherwise: str = "no single site: the log weights overflowed when combined",
    advice: str = NON_FINITE_ADVICE,
) -> NoReturn:
    """
    Raise a ``ValueError`` naming the sites whose log-densities are not finite: the mechanism
    behind every objective's ``check_finite`` option.

    :param float loss: the non-finite value, for the message.
    :param str objective: the objective's name, for the message.
    :param weights: the draw; its model and guide traces are searched unless ``traces`` is given.
    :param traces: ``{kind: trace}`` to search instead (e.g. the model only, when the guide has
        no density).
    :param densities: other log-densities of the objective, ``{description: (tensor, advice)}``
        (e.g. a data density); those that are not finite are named, with their advice.
    :param str quantity: what ``loss`` is (``"loss"``, ``"bound"``).
    :param str cause: a clause placed after the value (``"FGANBound bound is nan: ..."``).
    :param str otherwise: the text when no site or density is to blame.
    :param str advice: the closing advice.
    """
    if traces is None:
        if weights is None:
            raise TypeError("raise_non_finite needs weights or traces")
        traces = {"model": weights.model_trace, "guide": weights.guide_trace}
    sites, bad, hints = non_finite_sites(traces), [], []
    for description, (log_p, hint) in (densities or {}).items():
        finite = torch.isfinite(log_p.detach())
        if not finite.all():
            bad.append(f"{description} ({int((~finite).sum())} of {finite.numel()} not finite)")
            hints.append(hint)
    where = "; ".join(sites + bad) if sites or bad else otherwise
    if sites or not bad:  # the closing advice is about the sites
        hints.append(advice)
    head = f"{objective} {quantity} is {loss}" + (f": {cause}" if cause else "")
    raise ValueError(f"{head}. Non-finite log-densities at: {where}. {' '.join(hints)}")


def checked_value(
    loss: torch.Tensor,
    objective: str,
    weights: LogWeights | None = None,
    *,
    check_finite: bool = True,
    **details: Any,
) -> float:
    """
    ``loss.item()``; with ``check_finite``, :func:`raise_non_finite` (given ``details``) if it
    is not finite.
    """
    value = loss.item()
    if check_finite and not math.isfinite(value):
        raise_non_finite(value, objective, weights, **details)
    return value


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(x)))`` along ``dim``, stable for any magnitude."""
    if x.shape[dim] == 1:
        return x.squeeze(dim)
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])
