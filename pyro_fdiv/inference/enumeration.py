"""Exact summation of the model's enumerated discrete sites inside each particle's log weight."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.traceenum_elbo import _get_common_scale
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.trace_struct import Trace

__all__ = [
    "check_enumeration",
    "enum_handler",
    "enumerated_log_joint",
    "enumerated_terms",
    "is_enumerated",
    "split_enumerated",
]


class _LazyEnumMessenger(EnumMessenger):
    """Pyro's ``EnumMessenger`` that skips its bookkeeping at sites before the first enumerated
    one (unmarked, outside any ``pyro.markov`` scope, no global enumeration dim allocated yet):
    there it would record empty dims only. A model without enumerated sites then runs at the
    cost of a plain messenger (the full bookkeeping costs ~8% of a step of a model with 40
    scalar sites)."""

    @staticmethod
    def _idle(msg: dict) -> bool:
        return (
            not _ENUM_ALLOCATOR.dim_to_id
            and msg["infer"].get("enumerate") != "parallel"
            and msg["infer"].get("_markov_scope") is None
        )

    def _pyro_sample(self, msg: dict) -> None:
        if not self._idle(msg):
            super()._pyro_sample(msg)

    def _pyro_post_sample(self, msg: dict) -> None:
        if not self._idle(msg):
            super()._pyro_post_sample(msg)


def enum_handler(max_plate_nesting: int) -> Callable[[Callable], Callable]:
    r"""
    The handler to wrap the model with (outside its particle plate, inside the replay of the
    guide, as :class:`~pyro.infer.TraceEnum_ELBO` does): Pyro's ``poutine.enum``, so that
    sites marked ``infer={"enumerate": "parallel"}`` that the guide does not sample take their
    whole support, at dims left of the particle plate (from ``-max_plate_nesting - 2`` on).
    Sites without the mark are left alone: no value, shape or random draw changes.
    """
    return _LazyEnumMessenger(first_available_dim=-max_plate_nesting - 2)


def is_enumerated(site: dict) -> bool:
    """Whether a model trace site was enumerated in parallel (not sampled)."""
    return site["infer"].get("_enumerate_dim") is not None


def _enum_message(name: str, site: dict, where: str) -> str | None:
    mark = site["infer"].get("enumerate")
    if not mark or site["is_observed"]:
        return None
    head = f"{where} site '{name}' is marked for enumeration (infer={site['infer']}): "
    if where == "Guide":
        return head + (
            "pyro_fdiv objectives sum out discrete latents only in the model. Enumerate "
            "discrete latents in the model only, or sample them in the guide (remove the "
            "'enumerate' flag from the guide's site)."
        )
    if mark != "parallel":
        return head + (
            f"{mark!r} enumeration is not supported. Mark the model's site "
            "infer={'enumerate': 'parallel'} (config_enumerate's default), or sample it in "
            "the guide."
        )
    if site["infer"].get("num_samples") is not None:
        return head + (
            "Monte Carlo enumeration (num_samples) is not supported: the sum must be exact. "
            "Drop num_samples, or sample the site in the guide."
        )
    return None


def check_enumeration(model_sites: dict[str, dict], guide_sites: dict[str, dict]) -> None:
    """
    Raise a ``ValueError`` naming the site and the fix for enumeration this package does not
    support: any enumerated guide site, and model sites left to the model with ``"sequential"``
    or Monte Carlo (``num_samples``) enumeration.
    """
    sites = [("Guide", name, site) for name, site in guide_sites.items()]
    sites += [("Model", n, s) for n, s in model_sites.items() if n not in guide_sites]
    for where, name, site in sites:
        message = _enum_message(name, site, where)
        if message is not None:
            raise ValueError(message)


def _batch_ndim(site: dict) -> int:
    fn, value = site["fn"], site["value"]
    ndim = len(fn.batch_shape)
    if isinstance(value, torch.Tensor):
        ndim = max(ndim, value.dim() - fn.event_dim)
    return ndim


def split_enumerated(
    model_sites: dict[str, dict], max_plate_nesting: int, *, guided: bool = True
) -> tuple[dict[str, dict], dict[str, dict]]:
    """
    Split the model's sample sites into those scored one by one and those summed out together:
    the enumerated sites and every site whose batch shape reaches the enumeration dims (left of
    the particle plate) in a model that enumerates. Without enumerated sites the second part is
    empty and the first is ``model_sites`` itself.

    :param bool guided: the latents come from a guide; ``False`` (likelihood weighting) with
        enumerated sites raises a ``ValueError``.
    """
    if not any(is_enumerated(site) for site in model_sites.values()):
        return model_sites, {}
    if not guided:
        names = [n for n, s in model_sites.items() if is_enumerated(s)]
        raise ValueError(
            f"Model sites {names} are enumerated, but there is no guide (likelihood "
            "weighting): pass a guide, or remove the 'enumerate' flags."
        )
    ndim = max_plate_nesting + 1
    summed = {
        name: site
        for name, site in model_sites.items()
        if is_enumerated(site) or (_batch_ndim(site) > ndim and site["infer"].get("_dim_to_id"))
    }
    plain = {name: site for name, site in model_sites.items() if name not in summed}
    return plain, summed


def _check_kept(sites: dict[str, dict], plates: Sequence[CondIndepStackFrame]) -> None:
    for name, site in sites.items():
        outside = [f.name for f in plates if f not in site["cond_indep_stack"]]
        if outside and is_enumerated(site):
            raise ValueError(
                f"Enumerated model site '{name}' is outside the kept plates {outside}: its sum "
                "couples their elements, so there is no log weight per element. Keep only plates "
                "that enclose every enumerated site (keep_plates), or sample the site in the guide."
            )


def _ordinal(trace: Trace, site: dict) -> frozenset[str]:
    return frozenset(
        trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
    )


def _log_factors(trace: Trace, sites: dict[str, dict]) -> tuple[OrderedDict, set[str], list]:
    """Packed masked ``log p`` of ``sites`` by ordinal (plate symbols), the enumeration
    symbols and the sites' scales (applied outside the sum, as in ``TraceEnum_ELBO``)."""
    factors: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    sum_dims: set[str] = set()
    scales: list = []
    for site in sites.values():
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        log_p = packed.pack(
            scale_and_mask(log_p, mask=site["mask"]), site["infer"]["_dim_to_symbol"]
        )
        factors.setdefault(_ordinal(trace, site), []).append(log_p)
        scales.append(site["scale"])
        if is_enumerated(site):
            sum_dims.add(site["infer"]["_enumerate_symbol"])
    return factors, sum_dims, scales


def enumerated_log_joint(
    model_trace: Trace,
    sites: dict[str, dict],
    plates: Sequence[CondIndepStackFrame],
    max_plate_nesting: int,
) -> torch.Tensor:
    r"""
    The log joint of ``sites`` (enumerated sites and the sites depending on them) with the
    enumerated values summed out, per particle and per element of the kept ``plates``:

    .. math::

        \ell_{k,i} = \frac{s}{s_\text{kept}} \log \sum_{c} \prod_{j}
            p_j(\cdot \mid c, z_k)\big|_{i},

    by tensor variable elimination [1] (Pyro's ``contract_to_tensor`` in the log semiring):
    enumeration dims are sum-reduced (log-sum-exp), plates other than the particle plate and
    the kept ones are product-reduced, masks apply inside the sum and the sites' common scale
    :math:`s` outside it, with the kept plates' subsample scale :math:`s_\text{kept}` divided
    out. The result has shape ``(K,) + batch_shape`` like the other terms of ``log_w``.

    :param model_trace: the model trace, run under :func:`enum_handler`; its dims get symbols
        (:meth:`~pyro.poutine.Trace.symbolize_dims`).
    :param sites: the summed part of :func:`split_enumerated`.
    :param plates: the kept plate frames, outermost first; every enumerated site must be in all.
    :param int max_plate_nesting: the particle plate sits at ``-max_plate_nesting - 1``.

    **References**

    [1] F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush, N. Goodman.
    *Tensor Variable Elimination for Plated Factor Graphs*. ICML 2019.
    """
    _check_kept(sites, plates)
    model_trace.symbolize_dims()
    factors, sum_dims, scales = _log_factors(model_trace, sites)
    dim_to_size = {
        d: s
        for fs in factors.values()
        for f in fs
        for d, s in zip(f._pyro_dims, f.shape, strict=True)
    }
    kept = {f.name for f in plates}
    target = frozenset(
        symbol
        for name, symbol in model_trace.plate_to_symbol.items()
        if name in kept or model_trace.symbol_to_dim[symbol] == -max_plate_nesting - 1
    )
    term = contract_to_tensor(factors, sum_dims, target, ring=LogRing(dim_to_size=dim_to_size))
    term = packed.unpack(term, model_trace.symbol_to_dim)
    kept_scale = math.prod(f.full_size / f.size for f in plates if f.full_size is not None)
    term = term * (_get_common_scale(scales) / kept_scale)
    ndim = max_plate_nesting + 1
    term = term.reshape((1,) * (ndim - term.dim()) + term.shape)
    return term.reshape((term.shape[0], *(term.shape[f.dim] for f in plates)))


def enumerated_terms(
    model_trace: Trace,
    sites: dict[str, dict],
    plates: Sequence[CondIndepStackFrame],
    max_plate_nesting: int,
) -> dict[str, torch.Tensor]:
    """
    ``{name: term}``: :func:`enumerated_log_joint` of the summed ``sites`` under the name of
    their first enumerated site (the other summed sites get no term of their own); ``{}`` when
    nothing is enumerated.
    """
    if not sites:
        return {}
    first = next(name for name, site in sites.items() if is_enumerated(site))
    return {first: enumerated_log_joint(model_trace, sites, plates, max_plate_nesting)}
