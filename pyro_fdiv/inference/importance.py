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

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import Delta, Independent
from pyro.distributions.util import is_identically_one, scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions.utils import broadcast_all

from pyro_fdiv.inference import particles
from pyro_fdiv.inference.enumeration import (
    check_enumeration,
    enum_handler,
    enumerated_terms,
    is_enumerated,
    split_enumerated,
)
from pyro_fdiv.inference.particles import ParticleShapeError, SiteRuntimeError
from pyro_fdiv.util import check_flag, check_integer, rng_preserved

__all__ = [
    "NON_FINITE_ADVICE",
    "PARTICLE_PLATE",
    "LogWeights",
    "SiteError",
    "check_flag",
    "checked_value",
    "get_log_weights",
    "guess_max_plate_nesting",
    "guide_messenger",
    "importance_trace",
    "is_subsampled",
    "log_mean_exp",
    "log_weights_from_traces",
    "non_finite_sites",
    "non_reparam_sites",
    "raise_non_finite",
    "reparam_roots",
    "sample_sites",
    "site_log_prob",
    "subsample_scale",
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
    :ivar torch.Tensor global_log_w: with ``split_global`` and global latents outside a
        subsampled plate, the global sites' ``log p(θ_k) - log q(θ_k)`` of shape
        ``(K,)`` and the sizes of :attr:`global_plates` (``log_w`` then holds the local sites'
        terms, per data point, and :attr:`scale` is the subsample scale of
        :attr:`global_plates` only); ``None`` otherwise.
    :ivar tuple global_plates: the plates every site shares, kept by ``global_log_w`` (the
        local sites' other kept plates are those "global" is relative to).
    :ivar frozenset global_sites: the global sites, as ``"model site 'name'"`` and
        ``"guide site 'name'"``.
    :ivar torch.Tensor global_score: the global sites' part of ``score`` (``None`` when they
        are all reparameterized or there are none).
    :ivar bool vectorized: the particles ran as one tensor dimension (``False``: one after
        another, see ``vectorize_particles``).
    :ivar bool particle_plate: the traces ran inside a particle plate (``False`` with one
        particle per run: dims left of the plates are then summed into the weight).
    :ivar tuple particle_traces: on the sequential path, ``(model_trace, guide_trace)`` of
        each particle (``model_trace``/``guide_trace`` are the first particle's); empty when
        vectorized.
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
    global_log_w: torch.Tensor | None = None
    global_score: torch.Tensor | None = None
    vectorized: bool = True
    particle_traces: tuple[tuple[Trace, Trace], ...] = ()
    particle_plate: bool = True
    global_plates: tuple[CondIndepStackFrame, ...] = ()
    global_sites: frozenset[str] = frozenset()

    def reduce(self, log_p: torch.Tensor, site: dict, name: str) -> torch.Tensor:
        """Any per-site log-density ``log_p`` (of the site's batch shape, e.g. a log-Jacobian)
        masked, scaled and reduced to ``(K,) + batch_shape`` exactly like the site's own term."""
        return _term(log_p, site, name, self.plates, self.max_plate_nesting, self.particle_plate)


def _particle_plate(
    fn: Callable, num_particles: int, max_plate_nesting: int, force: bool = False
) -> Callable:
    # One particle needs no plate (as in Pyro's ELBOs): the weights get a leading dim of 1.
    if num_particles == 1 and not force:
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
    return [
        f
        for f in site["cond_indep_stack"]
        if f.vectorized and f.name not in (PARTICLE_PLATE, particles.LOCAL_PLATE)
    ]


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


def _shared_plates(
    sites: dict[str, dict], split_global: bool = False
) -> tuple[tuple[CondIndepStackFrame, ...], frozenset[str], tuple[CondIndepStackFrame, ...]]:
    """The vectorized plates that every sample site shares (``sites`` named for errors), and
    the sites outside a subsampled plate that not every site shares: empty unless
    ``split_global``, which keeps the plates shared by the other (local) sites instead of
    raising (every site global, where some site is inside some but not all of the subsampled
    plates); third, the plates every site shares, which global sites keep."""
    stacks = [set(vectorized_frames(site)) for site in sites.values()]
    shared = set.intersection(*stacks) if stacks else set()
    subsampled = {frame for frame in set.union(set(), *stacks) - shared if is_subsampled(frame)}
    outer = tuple(sorted(shared, key=lambda f: f.dim))
    if not subsampled:
        return outer, frozenset(), outer
    frame = min(subsampled, key=lambda f: (f.dim, f.name))
    outside = [n for n, s in zip(sites, stacks, strict=True) if frame not in s]
    if not split_global:
        raise ValueError(
            f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}) but "
            f"sites [{', '.join(outside)}] are outside it. Per-data-point importance weights "
            "need the subsampled plate to enclose every sample site of the model and "
            "guide (a data plate around the whole model); subsample only such a plate, use "
            "a global-latent estimator (IWAE(global_latents='nested'), "
            "BlackBoxAlpha(global_latents='energy')), or move the global latents' inference "
            "to a separate objective."
        )
    local = [s for s in stacks if subsampled <= s]
    if any(s & subsampled and not subsampled <= s for s in stacks):
        # subsampled plates that cross (no site set is local to all of them): every site is
        # global, each with its own subsample scale, as in Pyro's RenyiELBO
        return outer, frozenset(sites), outer
    kept = set.intersection(*local)
    global_names = frozenset(n for n, s in zip(sites, stacks, strict=True) if not s & subsampled)
    return tuple(sorted(kept, key=lambda f: f.dim)), global_names, outer


def _named_plates(sites: dict[str, dict], names: Sequence[str]) -> tuple[CondIndepStackFrame, ...]:
    frames = {f.name: f for site in sites.values() for f in vectorized_frames(site)}
    missing = [name for name in names if name not in frames]
    if missing:
        raise ValueError(
            f"keep_plates {missing} are not vectorized plates of the model or guide; plates: "
            f"{sorted(frames)}"
        )
    return tuple(sorted((frames[name] for name in names), key=lambda f: f.dim))


def is_subsampled(frame: CondIndepStackFrame) -> bool:
    """The plate ``frame`` holds a minibatch: fewer elements than its full size."""
    return frame.full_size is not None and frame.full_size > frame.size


def subsample_scale(frames: Iterable[CondIndepStackFrame]) -> float:
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
    particle_plate: bool = True,
    leading: int = 1,
) -> torch.Tensor:
    """Sum a site's log-density over everything but the particle dim and ``keep_dims``, then
    lay it out as ``(K,)`` and the sizes at ``out_dims`` (1 where not kept); ``(L, K)`` first
    with ``leading=2`` (a local site with local particles). Without a particle plate (one
    particle), dims left of the plates are batch dims outside any plate: summed into the
    particle's weight, as ``Trace_ELBO`` sums them."""
    ndim = max_plate_nesting + leading
    if not particle_plate and log_p.dim() > max_plate_nesting:
        log_p = log_p.sum(tuple(range(log_p.dim() - max_plate_nesting))).unsqueeze(0)
    if log_p.dim() > ndim:
        raise ParticleShapeError(
            name,
            f"Site '{name}' has log_prob shape {tuple(log_p.shape)}, with batch dims left of the "
            f"particle plate (max_plate_nesting={max_plate_nesting}). Declare event dims with "
            ".to_event(...), put batch dims in a pyro.plate, or raise max_plate_nesting.",
        )
    if log_p.dim() < ndim:
        log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + log_p.shape)
    sum_dims = [d for d in range(-max_plate_nesting, 0) if d not in keep_dims]
    if sum_dims:
        log_p = log_p.sum(sum_dims, keepdim=True)
    return log_p.reshape((*log_p.shape[:leading], *tuple(log_p.shape[d] for d in out_dims)))


def _term(
    log_p: torch.Tensor,
    site: dict,
    name: str,
    plates: tuple[CondIndepStackFrame, ...],
    max_plate_nesting: int,
    particle_plate: bool = True,
    leading: int = 1,
) -> torch.Tensor:
    """A site's ``log_p`` masked and scaled, the subsample scale of the kept plates it is in
    divided out, reduced to ``(K,) + batch_shape``; summed over kept plates it is outside of
    (another plate may use the same dim there)."""
    inside = {f.name for f in site["cond_indep_stack"]}
    kept = tuple(f for f in plates if f.name in inside)
    log_p = _scaled(log_p, site, subsample_scale(kept))
    out_dims = tuple(f.dim for f in plates)
    keep_dims = tuple(f.dim for f in kept)
    return _reduce(log_p, name, keep_dims, out_dims, max_plate_nesting, particle_plate, leading)


class SiteError(ValueError):
    """A sample site's ``log_prob`` failed while the weights were computed; the message is the
    original error's (its ``__cause__``), ``kind`` (``"model"``/``"guide"``), ``name`` and
    ``fn_name`` say where."""

    def __init__(self, error: Exception, kind: str, name: str, fn: Any) -> None:
        super().__init__(str(error))
        self.kind, self.name, self.fn_name = kind, name, type(fn).__name__
        self.where = f"at {kind} site '{name}'"


def _site_terms(
    sites: dict[str, dict],
    plates: tuple[CondIndepStackFrame, ...],
    max_plate_nesting: int,
    kind: str,
    particle_plate: bool = True,
    leading: int = 1,
    uncached: bool = False,
) -> dict[str, torch.Tensor]:
    """Each site's reduced term. ``uncached``: evaluate ``log_prob`` at a view of the value, a
    new tensor with the value's graph, so that a transformed distribution inverts its transform
    instead of reading the pre-image it cached when sampling: the gradient of ``log q`` then
    flows through the sampled value (DReG squares the weights there)."""
    terms = {}
    for name, site in sites.items():
        value = site["value"]
        if uncached and isinstance(value, torch.Tensor) and value.requires_grad:
            value = value.view_as(value)
        try:
            log_p = _log_prob(site["fn"], value, site["args"], site["kwargs"])
        except (ValueError, NotImplementedError) as error:
            raise SiteError(error, kind, name, site["fn"]) from error
        except RuntimeError as error:  # e.g. shapes that do not broadcast: name the site
            raise SiteRuntimeError(error, kind, name) from error
        except KeyError as error:  # a transform's cache without an inverse behind it
            message = (
                f"{kind} site '{name}' ({type(site['fn']).__name__}) cannot evaluate its "
                f"log-density at this value (KeyError {error}): its transform has no inverse "
                "(e.g. a block neural autoregressive flow), so it can be scored only at the "
                "value it has just drawn. Objectives that score it elsewhere (IWAE's "
                "gradient_estimator='stl' or 'dreg', JSA's chain states) need an invertible "
                "guide; use gradient_estimator='reparam', or a guide with an inverse."
            )
            raise SiteError(ValueError(message), kind, name, site["fn"]) from error
        terms[name] = _term(log_p, site, name, plates, max_plate_nesting, particle_plate, leading)
    return terms


def guide_messenger(guide: Callable | None) -> GuideMessenger | None:
    """The :class:`~pyro.poutine.guide.GuideMessenger` behind ``guide`` (e.g.
    ``AutoNormalMessenger``), or ``None`` for an ordinary callable guide."""
    unwrapped = poutine.unwrap(guide) if guide is not None else None
    return unwrapped if isinstance(unwrapped, GuideMessenger) else None


def _messenger_traces(messenger: GuideMessenger) -> tuple[Trace, Trace]:
    """:meth:`GuideMessenger.get_traces` keeping the plates' subsample sites (to replay)."""
    model_trace, guide_trace = messenger.trace.copy(), messenger.trace.copy()
    for name, site in messenger.trace.nodes.items():
        if site_is_subsample(site):
            continue
        if site["type"] != "sample" or site["is_observed"]:
            del guide_trace.nodes[name]
        else:
            model_trace.nodes[name] = {**site, "fn": site["infer"]["prior"]}
    return model_trace, guide_trace


def _traces(
    model, guide, args, kwargs, guide_handler, model_handler, messenger=None
) -> tuple[Trace, Trace]:
    """Guide first, then the model replaying it (the model alone when ``guide`` is None); a
    ``GuideMessenger`` guide runs the model itself, as Pyro's ``get_importance_trace`` does."""
    guide_trace = Trace()
    if guide is not None:
        guide = guide if guide_handler is None else guide_handler(guide)
        if messenger is not None:
            if model_handler is not None:
                raise ValueError(
                    f"{type(messenger).__name__} is a GuideMessenger: it runs the model inside "
                    "itself, so this objective cannot wrap the model separately. Use a callable "
                    "guide (e.g. the matching AutoGuide: AutoNormal for AutoNormalMessenger)."
                )
            guide(*args, **kwargs)
            return _messenger_traces(messenger)
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
    vectorize_particles: bool | None = True,
    split_global: bool = False,
    num_local_particles: int = 1,
    local_plates: Sequence[str] = (),
    accumulate_dtype: torch.dtype | None = None,
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
    replays it. With Pyro's validation on, the model/guide match is checked here. A
    :class:`~pyro.poutine.guide.GuideMessenger` guide (``AutoNormalMessenger``, ...) runs the
    model itself and gives both traces. An empty model and guide weigh ``log w = 0``.

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
    :param vectorize_particles: ``True`` (default): the particles are one tensor dimension, so
        model and guide must broadcast over it. ``False``: the ``K`` particles run one after
        another, each with one particle and no particle plate, all on the minibatch the first
        one drew (its subsample sites are replayed), and their weights are stacked into the
        same ``(K,) + batch_shape`` tensor, so every bound is unchanged. ``None``: vectorized,
        unless that run fails (an exception inside the model or guide, or a site with batch
        dims left of the particle plate): then sequential, with one warning naming the site and
        the reason (:attr:`LogWeights.vectorized` says which ran; objectives keep the choice).
    :param bool split_global: where a subsampled plate does not enclose every site, keep the
        plates the other (local) sites share and return the outside (global) sites' terms in
        :attr:`LogWeights.global_log_w` instead of raising (the global-latent estimators of
        :class:`~pyro_fdiv.inference.IWAE` and :class:`~pyro_fdiv.inference.BlackBoxAlpha`).
    :param int num_local_particles: ``L`` draws of the local latents per particle: every site
        inside all of ``local_plates`` (the subsampled data plates) gets a plate of size ``L``
        left of the particle plate, and the local log weights are
        :math:`\log \frac{1}{L}\sum_l w_{l,k,i}` (the nested bound's inner mean; its local
        ``model_terms``/``guide_terms`` keep the ``L`` dim in front). Reparameterized local guide
        sites only, no ``detach_guide``.
    :param local_plates: the plates that make a site local, with ``num_local_particles``.
    :param accumulate_dtype: sum the sites' terms into ``log_w`` in this dtype when it is more
        precise than theirs (``torch.float64`` for a reported loss: Pyro's ``Trace_ELBO`` sums
        its sites' log-densities as Python floats).
    :raises ValueError: for subsampling in a plate that not every site shares (default
        ``keep_plates``, without ``split_global``), a latent model site missing from the guide,
        enumeration other than the model's parallel enumeration
        (``enumeration.check_enumeration``), or batch dims outside the plates.
    """
    options = dict(
        max_plate_nesting=max_plate_nesting,
        keep_plates=keep_plates,
        guide_density=guide_density,
        detach_guide=detach_guide,
        guide_handler=guide_handler,
        model_handler=model_handler,
        split_global=split_global,
        num_local_particles=check_integer("num_local_particles", num_local_particles, 1),
        local_plates=tuple(local_plates),
        accumulate_dtype=accumulate_dtype,
    )
    if not (vectorize_particles is None or isinstance(vectorize_particles, bool)):
        raise ValueError(
            f"Expected vectorize_particles in (True, False, None), actual {vectorize_particles!r}"
        )
    run = functools.partial(_vectorized, model, guide, args, kwargs, **options)
    if num_particles == 1 or vectorize_particles is True:
        return run(num_particles=num_particles)
    sequential = functools.partial(
        particles.sequential,
        run,
        num_particles,
        guide_handler,
        model_handler,
        pin_model=guide_messenger(guide) is None,
    )
    if vectorize_particles is False:
        return sequential()
    return particles.vectorized_or_sequential(run, sequential, num_particles)


def _vectorized(
    model,
    guide,
    args,
    kwargs,
    *,
    num_particles,
    max_plate_nesting,
    keep_plates,
    guide_density,
    detach_guide,
    guide_handler,
    model_handler,
    split_global,
    num_local_particles,
    local_plates,
    accumulate_dtype,
) -> LogWeights:
    messenger = guide_messenger(guide)
    local = num_local_particles > 1
    if local:
        if detach_guide:
            raise ValueError(
                "num_local_particles > 1 needs gradient_estimator='reparam' (the STL and DReG "
                "corrections are per particle); use num_local_particles=1 with them."
            )
        add = particles.LocalParticles(num_local_particles, -max_plate_nesting - 2, local_plates)
        guide_handler = _then(guide_handler, add)
        if messenger is None:
            model_handler = _then(model_handler, add)
    model = enum_handler(max_plate_nesting)(
        _particle_plate(model, num_particles, max_plate_nesting, force=local)
    )
    if guide is not None:
        guide = _particle_plate(guide, num_particles, max_plate_nesting, force=local)
    model_trace, guide_trace = _traces(
        model, guide, args, kwargs, guide_handler, model_handler, messenger
    )
    weights = _score(
        model_trace,
        guide_trace,
        max_plate_nesting,
        keep_plates=keep_plates,
        guide_density=guide_density,
        prior_proposal=guide is None,
        split_global=split_global,
        particle_plate=num_particles > 1 or local,
        local_particles=local,
        accumulate_dtype=accumulate_dtype,
        uncached=detach_guide,
    )
    if detach_guide:
        weights = _detach_guide(guide, weights, args, kwargs, messenger)
    return weights


def _then(handler: Handler | None, outer: Handler) -> Handler:
    """``handler`` (if any), then ``outer`` around it."""
    return outer if handler is None else lambda fn: outer(handler(fn))


def _detach_guide(guide, weights: LogWeights, args, kwargs, messenger) -> LogWeights:
    r"""Add :math:`\log q_\phi(\bar z) - \mathrm{sg}(\cdot)` (zero-valued) to the weights."""
    log_q_bar, global_q_bar = _detached_guide_log_prob(guide, weights, args, kwargs, messenger)
    weights = weights._replace(log_w=weights.log_w + (log_q_bar - log_q_bar.detach()))
    if weights.global_log_w is not None:
        global_log_w = weights.global_log_w + (global_q_bar - global_q_bar.detach())
        weights = weights._replace(global_log_w=global_log_w)
    return weights


def _score(
    model_trace: Trace,
    guide_trace: Trace,
    max_plate_nesting: int,
    *,
    keep_plates: Sequence[str] | None = None,
    guide_density: bool = True,
    prior_proposal: bool = False,
    split_global: bool = False,
    particle_plate: bool = True,
    local_particles: bool = False,
    accumulate_dtype: torch.dtype | None = None,
    uncached: bool = False,
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
    global_names: frozenset[str] = frozenset()
    if keep_plates is None:
        plates, global_names, outer = _shared_plates(named, split_global)
    else:
        plates, outer = _named_plates(named, keep_plates), ()
    plain, summed = split_enumerated(model_sites, max_plate_nesting, guided=not prior_proposal)
    if summed and local_particles:
        raise ValueError(
            f"num_local_particles > 1 cannot be combined with enumerated sites {sorted(summed)} "
            "(both use the dims left of the particle plate); use num_local_particles=1."
        )

    def is_global(kind: str, name: str) -> bool:
        return f"{kind} site '{name}'" in global_names

    def terms(sites: dict[str, dict], kind: str) -> dict[str, torch.Tensor]:
        local = {n: s for n, s in sites.items() if not is_global(kind, n)}
        glob = {n: s for n, s in sites.items() if is_global(kind, n)}
        options = {"particle_plate": particle_plate, "uncached": uncached and kind == "guide"}
        leading = 2 if local_particles else 1
        return {
            **_site_terms(local, plates, max_plate_nesting, kind, leading=leading, **options),
            # the plates every site shares kept, the others summed
            **_site_terms(glob, outer, max_plate_nesting, kind, **options),
        }

    model_terms = terms(plain, "model")
    model_terms.update(enumerated_terms(model_trace, summed, plates, max_plate_nesting))
    guide_terms = terms(guide_sites, "guide") if guide_density else {}

    def precise(term: torch.Tensor) -> torch.Tensor:
        if accumulate_dtype is None or term.dtype.itemsize >= accumulate_dtype.itemsize:
            return term
        return term.to(accumulate_dtype)

    parts: dict[bool, list] = {False: [0.0, None], True: [0.0, None]}  # [log_w, score]
    for name, term in model_terms.items():
        if not prior_proposal or model_sites[name]["is_observed"]:
            part = parts[is_global("model", name)]
            part[0] = part[0] + precise(term)
    for name, term in guide_terms.items():
        part = parts[is_global("guide", name)]
        part[0] = part[0] - precise(term)
        if not guide_sites[name]["fn"].has_rsample:
            part[1] = term if part[1] is None else part[1] + term
    (log_w, score), (global_log_w, global_score) = parts[False], parts[True]
    if local_particles:
        log_w, score = _local_mean(log_w, score, guide_sites, is_global)
    if not isinstance(log_w, torch.Tensor):
        # no local term (e.g. an empty model and guide: the weight is 1, as Trace_ELBO's 0)
        log_w = _zeros(model_terms, guide_terms, len(plates))
    return LogWeights(
        log_w,
        score,
        subsample_scale(outer if global_names else plates),
        plates,
        model_trace,
        guide_trace,
        model_terms,
        guide_terms,
        max_plate_nesting,
        global_log_w if global_names else None,
        global_score,
        particle_plate=particle_plate,
        global_plates=outer if global_names else (),
        global_sites=global_names,
    )


def _local_mean(log_w, score, guide_sites, is_global) -> tuple[torch.Tensor, None]:
    """The local log weights of ``L`` local particles, ``(L, K) + batch_shape``, reduced to
    each particle's :math:`\\log \frac{1}{L} \\sum_l w_{l,k,i}`."""
    if score is not None:
        names = [n for n, s in guide_sites.items() if not is_global("guide", n)]
        raise ValueError(
            "num_local_particles > 1 needs reparameterizable local guide sites, but "
            f"{[n for n in names if not guide_sites[n]['fn'].has_rsample]} cannot be "
            "reparameterized. Use num_local_particles=1."
        )
    return log_mean_exp(log_w, 0), None


def _zeros(model_terms, guide_terms, num_plates: int) -> torch.Tensor:
    """Zero log weights shaped like the terms (one particle and no plate when there are none)."""
    for term in (*model_terms.values(), *guide_terms.values()):
        return torch.zeros_like(term)
    return torch.zeros((1,) + (1,) * num_plates)


def _detached_guide_log_prob(
    guide: Callable,
    weights: LogWeights,
    args: tuple,
    kwargs: Mapping[str, Any],
    messenger: GuideMessenger | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\log q_\phi(\bar z)` reduced like ``log_w`` (and, for global sites under
    ``split_global``, like ``global_log_w``): ``guide`` (already in its particle plate) re-run
    at the detached values of ``weights.guide_trace``. Its gradient is the guide's direct
    (score) dependence on :math:`\phi` with every sampled value held fixed, for any guide
    (``pyro.param``, ``pyro.module``, autoguides, flows, hierarchical guides, messengers)."""
    detached = Trace(graph_type=weights.guide_trace.graph_type)
    for name, site in weights.guide_trace.nodes.items():
        site = site.copy()
        if isinstance(site.get("value"), torch.Tensor):
            site["value"] = site["value"].detach()
        detached.add_node(name, **site)
    if messenger is None:
        rerun = poutine.trace(poutine.replay(guide, trace=detached)).get_trace(*args, **kwargs)
    else:
        poutine.replay(guide, trace=detached)(*args, **kwargs)
        rerun = _messenger_traces(messenger)[1]
    sites = sample_sites(rerun)
    glob = {n: s for n, s in sites.items() if f"guide site '{n}'" in weights.global_sites}
    local = {n: s for n, s in sites.items() if n not in glob}
    mpn = weights.max_plate_nesting
    total: torch.Tensor | float = 0.0
    global_total: torch.Tensor | float = 0.0
    plate = weights.particle_plate
    for term in _site_terms(local, weights.plates, mpn, "guide", plate).values():
        total = total + term
    for term in _site_terms(glob, weights.global_plates, mpn, "guide", plate).values():
        global_total = global_total + term
    return torch.as_tensor(total), torch.as_tensor(global_total)


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
        model_trace, guide_trace = _traces(
            model, guide, args, kwargs, None, None, guide_messenger(guide)
        )
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


def non_reparam_sites(guide_trace: Trace) -> list[str]:
    """The guide's sample sites without ``rsample``: latent sites and ``pyro.factor`` sites
    with ``has_rsample=False`` (plates' subsample sites excluded)."""
    return [name for name, site in sample_sites(guide_trace).items() if not site["fn"].has_rsample]


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
