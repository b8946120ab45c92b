r"""
Per-data-point log importance weights: the one mechanism every objective here shares.

Where are log weights computed? In :func:`importance_trace`::

    guide ──trace──▶ guide_trace ──replay──▶ model ──trace──▶ model_trace
      (both inside the particle plate "num_particles_vectorized", optional handlers around them)
    every sample site ──▶ log p or log q, mask and scale applied, subsample scale divided out,
      summed over everything but the particle dim and the kept plates ──▶ per-site terms
    log_w = Σ model terms − Σ guide terms,  score = Σ non-reparameterizable guide terms

and :func:`guess_max_plate_nesting` is the one guess of ``max_plate_nesting``. Objectives
reduce :attr:`LogWeights.log_w` over its particle dim (IWAE, BB-α), read the per-site terms
(AVB's likelihood, JSA's local and global blocks) or the traces (AVB's latent features, JSA's
chain states); see ``docs/adding_an_objective.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions.utils import broadcast_all

from pyro_fdiv.inference.enumeration import (
    check_enumeration,
    enum_handler,
    enumerated_terms,
    is_enumerated,
    split_enumerated,
)
from pyro_fdiv.util import check_flag, rng_preserved

__all__ = [
    "NON_FINITE_ADVICE",
    "PARTICLE_PLATE",
    "LogWeights",
    "SiteError",
    "check_flag",
    "checked_value",
    "get_log_weights",
    "guess_max_plate_nesting",
    "importance_trace",
    "log_mean_exp",
    "log_weights_from_traces",
    "non_finite_sites",
    "raise_non_finite",
    "reparam_roots",
    "sample_sites",
    "site_log_prob",
    "trace_signature",
    "vectorized_frames",
]

#: Name of the plate that vectorizes particles (shared with Pyro's own ELBOs).
PARTICLE_PLATE = "num_particles_vectorized"

#: A Pyro handler: maps a model or guide to a wrapped one (a ``Messenger`` instance, or e.g.
#: ``poutine.replay(trace=...)`` called without its function).
Handler = Callable[[Callable], Callable]


class LogWeights(NamedTuple):
    r"""
    What :func:`importance_trace` returns: log importance weights of ``K`` particles, one per
    element of the kept plates, and what objectives need beside them.

    :ivar torch.Tensor log_w: ``log p(x, z_k) - log q(z_k | x)`` of shape ``(K,) + batch_shape``,
        differentiable (pathwise through reparameterized sites), with the subsample scale of the
        kept plates divided out (with ``detach_guide``, its gradient omits the guide's direct
        dependence on its parameters; its value is unchanged).
    :ivar torch.Tensor score: ``log q`` of the non-reparameterizable guide sites reduced the same
        way (the score-function surrogate), or ``None`` when every guide site is reparameterized.
    :ivar float scale: the subsample scale :math:`\prod N/B` of the kept plates, to be applied to
        the summed per-data-point bound.
    :ivar tuple plates: the kept plate frames, outermost first; ``batch_shape`` follows them.
    :ivar model_trace: the model trace.
    :ivar guide_trace: the guide trace (both keep their subsample sites, so they can be
        replayed).
    :ivar dict model_terms: each model sample site's ``log p``, masked and scaled like the site,
        subsample scale divided out, reduced to ``(K,) + batch_shape`` (size 1 in a kept plate
        that the site is outside of). The model's enumerated sites and the sites whose ``log p``
        depends on them are summed out together (``enumeration.enumerated_log_joint``): their
        joint term is listed once, under the first enumerated site's name.
    :ivar dict guide_terms: the same for the guide's ``log q`` (empty without ``guide_density``);
        ``log_w`` is ``sum(model_terms) - sum(guide_terms)``.
    :ivar int max_plate_nesting: the plates' bound the traces ran with.
    """

    log_w: torch.Tensor
    score: torch.Tensor | None
    scale: float
    plates: tuple[CondIndepStackFrame, ...]
    model_trace: Trace
    guide_trace: Trace
    model_terms: Mapping[str, torch.Tensor] = {}
    guide_terms: Mapping[str, torch.Tensor] = {}
    max_plate_nesting: int = 0

    def reduce(self, log_p: torch.Tensor, site: dict, name: str) -> torch.Tensor:
        """Any per-site log-density ``log_p`` (of the site's batch shape, e.g. a log-Jacobian)
        masked, scaled and reduced to ``(K,) + batch_shape`` exactly like the site's own term."""
        return _term(log_p, site, name, self.plates, self.max_plate_nesting)


def _particle_plate(fn: Callable, num_particles: int, max_plate_nesting: int) -> Callable:
    # One particle needs no plate (as in Pyro's ELBOs): the weights get a leading dim of 1.
    if num_particles == 1:
        return fn
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-max_plate_nesting - 1)(fn)


def sample_sites(trace: Trace) -> dict[str, dict]:
    """The sample sites of ``trace`` by name, plates' subsample sites left out."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def vectorized_frames(site: dict) -> list[CondIndepStackFrame]:
    """The vectorized plates of a site, the particle plate left out, outermost first."""
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]


def _check_sites(model_sites: dict, guide_sites: dict) -> None:
    check_enumeration(model_sites, guide_sites)
    for name, site in model_sites.items():
        if site["is_observed"] or name in guide_sites or is_enumerated(site):
            continue
        raise ValueError(
            f"Model sample site '{name}' is neither observed nor sampled by the guide. "
            "Importance weights need q(z) for every latent site: add a site named "
            f"'{name}' to the guide, or pass obs= to the model's site."
        )


def _shared_plates(sites: dict[str, dict]) -> tuple[CondIndepStackFrame, ...]:
    """The vectorized plates that every sample site shares (``sites`` named for errors)."""
    stacks = [set(vectorized_frames(site)) for site in sites.values()]
    shared = set.intersection(*stacks) if stacks else set()
    for frame in set.union(set(), *stacks) - shared:
        if frame.full_size is not None and frame.full_size > frame.size:
            outside = [n for n, s in zip(sites, stacks, strict=True) if frame not in s]
            raise ValueError(
                f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}) but "
                f"sites [{', '.join(outside)}] are outside it. Per-data-point importance weights "
                "need the subsampled plate to enclose every sample site of the model and "
                "guide (a data plate around the whole model); subsample only such a plate, or "
                "move the global latents' inference to a separate objective."
            )
    return tuple(sorted(shared, key=lambda f: f.dim))


def _named_plates(sites: dict[str, dict], names: Sequence[str]) -> tuple[CondIndepStackFrame, ...]:
    frames = {f.name: f for site in sites.values() for f in vectorized_frames(site)}
    missing = [name for name in names if name not in frames]
    if missing:
        raise ValueError(
            f"keep_plates {missing} are not vectorized plates of the model or guide; plates: "
            f"{sorted(frames)}"
        )
    return tuple(sorted((frames[name] for name in names), key=lambda f: f.dim))


def _subsample_scale(frames) -> float:
    r""":math:`\prod N/B` over the subsampled ``frames``."""
    scale = 1.0
    for frame in frames:
        if frame.full_size is not None:
            scale *= frame.full_size / frame.size
    return scale


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


def _scaled(log_p: torch.Tensor, site: dict, scale: float) -> torch.Tensor:
    site_scale = site["scale"]
    if scale != 1.0:
        site_scale = site_scale / scale
    if is_identically_one(site_scale) and site["mask"] is None:
        return log_p
    return scale_and_mask(log_p, site_scale, site["mask"])


def site_log_prob(site: dict, scale: float = 1.0) -> torch.Tensor:
    """``log p(value)`` of a trace site with its mask and with its scale divided by ``scale``."""
    return _scaled(_log_prob(site["fn"], site["value"], site["args"], site["kwargs"]), site, scale)


def _reduce(
    log_p: torch.Tensor,
    name: str,
    keep_dims: tuple[int, ...],
    out_dims: tuple[int, ...],
    max_plate_nesting: int,
) -> torch.Tensor:
    """Sum a site's log-density over everything but the particle dim and ``keep_dims``, then
    lay it out as ``(K,)`` and the sizes at ``out_dims`` (1 where not kept)."""
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
    return log_p.reshape((log_p.shape[0], *tuple(log_p.shape[d] for d in out_dims)))


def _term(
    log_p: torch.Tensor,
    site: dict,
    name: str,
    plates: tuple[CondIndepStackFrame, ...],
    max_plate_nesting: int,
) -> torch.Tensor:
    """A site's ``log_p`` masked and scaled, the subsample scale of the kept plates it is in
    divided out, reduced to ``(K,) + batch_shape``; summed over kept plates it is outside of
    (another plate may use the same dim there)."""
    inside = {f.name for f in site["cond_indep_stack"]}
    kept = tuple(f for f in plates if f.name in inside)
    log_p = _scaled(log_p, site, _subsample_scale(kept))
    out_dims = tuple(f.dim for f in plates)
    return _reduce(log_p, name, tuple(f.dim for f in kept), out_dims, max_plate_nesting)


class SiteError(ValueError):
    """A sample site's ``log_prob`` failed while the weights were computed; the message is the
    original error's (its ``__cause__``), ``kind`` (``"model"``/``"guide"``), ``name`` and
    ``fn_name`` say where."""

    def __init__(self, error: Exception, kind: str, name: str, fn: Any) -> None:
        super().__init__(str(error))
        self.kind, self.name, self.fn_name = kind, name, type(fn).__name__


def _site_terms(
    sites: dict[str, dict],
    plates: tuple[CondIndepStackFrame, ...],
    max_plate_nesting: int,
    kind: str,
) -> dict[str, torch.Tensor]:
    terms = {}
    for name, site in sites.items():
        try:
            log_p = _log_prob(site["fn"], site["value"], site["args"], site["kwargs"])
        except (ValueError, NotImplementedError) as error:
            raise SiteError(error, kind, name, site["fn"]) from error
        terms[name] = _term(log_p, site, name, plates, max_plate_nesting)
    return terms


def _traces(model, guide, args, kwargs, guide_handler, model_handler) -> tuple[Trace, Trace]:
    """Guide first, then the model replaying it (the model alone when ``guide`` is None)."""
    guide_trace = Trace()
    if guide is not None:
        guide = guide if guide_handler is None else guide_handler(guide)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model = poutine.replay(model, trace=guide_trace)
    model = model if model_handler is None else model_handler(model)
    return poutine.trace(model).get_trace(*args, **kwargs), guide_trace


def importance_trace(
    model: Callable,
    guide: Callable | None,
    args: tuple,
    kwargs: Mapping[str, Any],
    *,
    num_particles: int,
    max_plate_nesting: int,
    keep_plates: Sequence[str] | None = None,
    guide_density: bool = True,
    detach_guide: bool = False,
    guide_handler: Handler | None = None,
    model_handler: Handler | None = None,
) -> LogWeights:
    r"""
    Run ``guide`` once with ``num_particles`` particles vectorized in a plate, replay ``model``
    against it, and return per-data-point log importance weights: the one place where log
    weights are computed.

    .. math::

        \log w_{k,i} = \frac{1}{s}\Big(\log p(x_i, z_{k,i}) - \log q(z_{k,i} \mid x_i)\Big)

    for each element ``i`` of the kept plates (by default those that every sample site shares,
    a VAE's data plate), summing all other dimensions, where :math:`s = \prod N/B` is the
    subsample scale of those plates (NumPyro's ``RenyiELBO`` rule: divide it out before any
    log-mean-exp, apply it to the bound afterwards). A model with only global latents gets one
    weight per particle. All particles share one subsample: the guide draws it, the model
    replays it. With Pyro's validation on, the model/guide match is checked here.

    :param model: the model; its latent sites take the guide's values.
    :param guide: the proposal; ``None`` draws the latents from the model's prior, and the log
        weights are then the observed sites' log-likelihood (likelihood weighting).
    :param int num_particles: particles ``K`` (1: no particle plate, a leading dim of 1).
    :param int max_plate_nesting: the number of plates the model and guide nest (see
        :func:`guess_max_plate_nesting`); the particle plate goes left of them.
    :param keep_plates: names of the plates whose dims are kept (instead of the shared ones);
        each site's subsample scale is divided out only for the kept plates it is in, and a site
        outside a kept plate gets size 1 there (JSA keeps its data plate so: its local sites'
        terms are per data point, its global sites' are not).
    :param bool guide_density: evaluate ``log q`` (``False`` for implicit guides: AVB; the
        guide's auxiliary sites then do not decide the shared plates).
    :param bool detach_guide: re-run the guide at the detached sample values and add
        :math:`\log q_\phi(\bar z) - \mathrm{sg}(\cdot)` to ``log_w``, removing the guide's direct
        (score) dependence on its parameters from the gradient (STL and DReG; one guide pass).
    :param guide_handler: a Pyro handler around the guide inside the particle plate (JSA's chain
        messenger, which sets the guide's latent values to the chains' states).
    :param model_handler: a Pyro handler around the replayed model (e.g. ``poutine.replay``
        of a subsample for a prior draw, or a messenger pinning subsamples).
    :raises ValueError: for subsampling in a plate that not every site shares (default
        ``keep_plates``), a latent model site missing from the guide, enumeration other than the
        model's parallel enumeration (``enumeration.check_enumeration``), or batch dims outside
        the plates.
    """
    model = enum_handler(max_plate_nesting)(
        _particle_plate(model, num_particles, max_plate_nesting)
    )
    if guide is not None:
        guide = _particle_plate(guide, num_particles, max_plate_nesting)
    model_trace, guide_trace = _traces(model, guide, args, kwargs, guide_handler, model_handler)
    weights = _score(
        model_trace,
        guide_trace,
        max_plate_nesting,
        keep_plates=keep_plates,
        guide_density=guide_density,
        prior_proposal=guide is None,
    )
    if detach_guide:
        log_q_bar = _detached_guide_log_prob(guide, weights, args, kwargs)
        weights = weights._replace(log_w=weights.log_w + (log_q_bar - log_q_bar.detach()))
    return weights


def _score(
    model_trace: Trace,
    guide_trace: Trace,
    max_plate_nesting: int,
    *,
    keep_plates: Sequence[str] | None = None,
    guide_density: bool = True,
    prior_proposal: bool = False,
) -> LogWeights:
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
    if not prior_proposal:
        _check_sites(model_sites, guide_sites)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    scored = guide_sites
    if not guide_density:
        scored = {n: s for n, s in guide_sites.items() if not s["infer"].get("is_auxiliary")}
    named = {f"model site '{n}'": s for n, s in model_sites.items()}
    named.update({f"guide site '{n}'": s for n, s in scored.items()})
    if keep_plates is None:
        plates = _shared_plates(named)
    else:
        plates = _named_plates(named, keep_plates)
    plain, summed = split_enumerated(model_sites, max_plate_nesting, guided=not prior_proposal)
    model_terms = _site_terms(plain, plates, max_plate_nesting, "model")
    model_terms.update(enumerated_terms(model_trace, summed, plates, max_plate_nesting))
    guide_terms = {}
    if guide_density:
        guide_terms = _site_terms(guide_sites, plates, max_plate_nesting, "guide")

    log_w, score = 0.0, None
    for name, term in model_terms.items():
        if not prior_proposal or model_sites[name]["is_observed"]:
            log_w = log_w + term
    for name, term in guide_terms.items():
        log_w = log_w - term
        if not guide_sites[name]["fn"].has_rsample:
            score = term if score is None else score + term
    if not isinstance(log_w, torch.Tensor):
        if not model_terms:
            raise ValueError("The model and guide have no sample sites: nothing to weight.")
        log_w = torch.zeros_like(next(iter(model_terms.values())))
    return LogWeights(
        log_w,
        score,
        _subsample_scale(plates),
        plates,
        model_trace,
        guide_trace,
        model_terms,
        guide_terms,
        max_plate_nesting,
    )


def _detached_guide_log_prob(
    guide: Callable, weights: LogWeights, args: tuple, kwargs: Mapping[str, Any]
) -> torch.Tensor:
    r""":math:`\log q_\phi(\bar z)` reduced like ``log_w``: ``guide`` (already in its particle
    plate) re-run at the detached values of ``weights.guide_trace``. Its gradient is the
    guide's direct (score) dependence on :math:`\phi` with every sampled value held fixed, for
    any guide (``pyro.param``, ``pyro.module``, autoguides, flows, hierarchical guides)."""
    detached = Trace(graph_type=weights.guide_trace.graph_type)
    for name, site in weights.guide_trace.nodes.items():
        site = site.copy()
        if isinstance(site.get("value"), torch.Tensor):
            site["value"] = site["value"].detach()
        detached.add_node(name, **site)
    rerun = poutine.trace(poutine.replay(guide, trace=detached)).get_trace(*args, **kwargs)
    terms = _site_terms(sample_sites(rerun), weights.plates, weights.max_plate_nesting, "guide")
    total = 0.0
    for term in terms.values():
        total = total + term
    return total


def get_log_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
) -> LogWeights:
    """:func:`importance_trace` with its defaults (positional form, kept for callers)."""
    return importance_trace(
        model,
        guide,
        args,
        kwargs,
        num_particles=num_particles,
        max_plate_nesting=max_plate_nesting,
    )


def log_weights_from_traces(
    model_trace: Trace, guide_trace: Trace, max_plate_nesting: int
) -> LogWeights:
    """
    The scoring half of :func:`importance_trace`, for traces already run: ``model_trace``
    holds every latent site at the guide's values (the guide ran first and the model replayed
    it, or the model ran first and the guide replayed it at the model's values).
    """
    return _score(model_trace, guide_trace, max_plate_nesting)


def guess_max_plate_nesting(
    model: Callable, guide: Callable | None, args: tuple, kwargs: Mapping[str, Any]
) -> int:
    """
    The number of plates that ``model`` and ``guide`` nest, from one run of each (the guide
    first, the model replaying it; the model alone when ``guide`` is None): the one guess of
    ``max_plate_nesting`` that every objective uses. It runs hidden from outer handlers
    (``poutine.block``), evaluates no density (implicit guides have none) and restores Pyro's
    random state (torch, numpy, random) afterwards, so the caller's stream is untouched. With
    Pyro's validation on, each site's batch shape is checked against its plates.
    """
    with rng_preserved(), poutine.block():
        model_trace, guide_trace = _traces(model, guide, args, kwargs, None, None)
    sites = [
        site
        for trace in (model_trace, guide_trace)
        for site in prune_subsample_sites(trace).nodes.values()
        if site["type"] == "sample"
    ]
    if is_validation_enabled():
        for site in sites:
            shape = _batch_shape(site)
            check_site_shape({**site, "log_prob": torch.empty(shape, device="meta")}, math.inf)
    dims = [frame.dim for site in sites for frame in vectorized_frames(site)]
    return -min(dims) if dims else 0


def _batch_shape(site: dict) -> torch.Size:
    fn, value = site["fn"], site["value"]
    shape = fn.batch_shape
    if isinstance(value, torch.Tensor):
        shape = torch.broadcast_shapes(shape, value.shape[: max(0, value.dim() - fn.event_dim)])
    return shape


def trace_signature(weights: LogWeights) -> tuple:
    """Names, distribution types and shapes of every sample site: the structure validated."""
    return tuple(
        (kind, name, type(site["fn"]).__name__, tuple(site["value"].shape))
        for kind, trace in (("model", weights.model_trace), ("guide", weights.guide_trace))
        for name, site in sample_sites(trace).items()
    )


def reparam_roots(guide_trace: Trace) -> dict[str, torch.Tensor]:
    """Reparameterized, non-``Delta`` guide sample values that carry gradients."""
    return {
        name: site["value"]
        for name, site in sample_sites(guide_trace).items()
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
    ``{kind: trace}`` mapping whose log-density is not finite where the site's mask keeps it
    (masked-out entries never enter a loss)."""
    bad = []
    for kind, trace in traces.items():
        for name, site in sample_sites(trace).items():
            with torch.no_grad():
                log_p = _log_prob(site["fn"], site["value"], site["args"], site["kwargs"])
                finite = torch.isfinite(log_p)
                if site["mask"] is not None:
                    finite = finite | ~torch.as_tensor(site["mask"], device=log_p.device)
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
