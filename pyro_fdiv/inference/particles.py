"""Particles one after another: the sequential path of the importance-trace mechanism."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from pyro import poutine
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import get_rng_state, set_rng_state

__all__ = [
    "LOCAL_PLATE",
    "LocalParticles",
    "ParticleShapeError",
    "SiteRuntimeError",
    "sequential",
    "stack",
    "subsample_trace",
    "vectorized_or_sequential",
]

#: A Pyro handler: maps a model or guide to a wrapped one.
Handler = Callable[[Callable], Callable]


class Weights(Protocol):
    """What a run returns (:class:`~pyro_fdiv.inference.importance.LogWeights`)."""

    # read-only, as the fields of a NamedTuple
    @property
    def log_w(self) -> torch.Tensor: ...
    @property
    def model_trace(self) -> Trace: ...
    @property
    def guide_trace(self) -> Trace: ...


#: The type a run returns (the caller's :class:`Weights`, kept by :func:`sequential`).
W = TypeVar("W", bound=Weights)


class ParticleShapeError(ValueError):
    """A site's log-density has batch dims left of the particle plate."""

    def __init__(self, site: str, message: str) -> None:
        super().__init__(message)
        self.site, self.where = site, f"at site '{site}'"


class SiteRuntimeError(RuntimeError):
    """A ``RuntimeError`` of a site's ``log_prob`` (e.g. shapes that do not broadcast), with
    the original message and the site."""

    def __init__(self, error: Exception, kind: str, name: str) -> None:
        super().__init__(str(error))
        self.kind, self.name, self.where = kind, name, f"at {kind} site '{name}'"


def subsample_trace(*traces: Trace) -> Trace:
    """The plates' subsample sites of ``traces`` (the first trace's where several have one)."""
    pinned = Trace()
    for trace in traces:
        for name, site in trace.nodes.items():
            if site_is_subsample(site) and name not in pinned:
                pinned.add_node(name, **site)
    return pinned


def _pinned(handler: Handler | None, pinned: Trace) -> Handler:
    """``handler`` (if any) inside a replay of the subsample sites ``pinned``."""

    def wrap(fn: Callable) -> Callable:
        return poutine.replay(fn if handler is None else handler(fn), trace=pinned)

    return wrap


def sequential(
    run: Callable[..., W],
    num_particles: int,
    guide_handler: Handler | None,
    model_handler: Handler | None,
    *,
    pin_model: bool = True,
) -> W:
    """
    The ``K`` particles one after another: ``run(num_particles=1, guide_handler=...,
    model_handler=...)`` ``K`` times, every particle after the first replaying the first one's
    subsample sites (the guide's, and the model's own plates' with ``pin_model``; a
    ``GuideMessenger`` runs the model inside the guide), then :func:`stack`.
    """
    draws = [run(num_particles=1)]
    pinned = subsample_trace(draws[0].guide_trace, draws[0].model_trace)
    handlers = {"guide_handler": _pinned(guide_handler, pinned)}
    if pin_model:
        handlers["model_handler"] = _pinned(model_handler, pinned)
    draws += [run(num_particles=1, **handlers) for _ in range(1, num_particles)]
    return stack(draws)


def _cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Particles' tensors of shape ``(1,) + batch_shape`` joined along dim 0 (``None`` when
    every one is ``None``: missing ones count as zeros)."""
    if all(t is None for t in tensors):
        return None
    like = next(t for t in tensors if t is not None)
    return torch.cat([torch.zeros_like(like) if t is None else t for t in tensors])


def stack(draws: Sequence[Any]) -> Any:
    """One :class:`~pyro_fdiv.inference.importance.LogWeights` of ``K`` one-particle draws:
    tensors joined along the particle dim, traces kept per particle in ``particle_traces``."""
    first = draws[0]
    if any(d.plates != first.plates for d in draws):
        raise ValueError(
            "The particles ran with different plates "
            f"({[[f.name for f in d.plates] for d in draws]}): the model's structure depends "
            "on its random draws, so the particles' weights cannot be stacked per data point."
        )

    def terms(field: str) -> dict[str, torch.Tensor | None]:
        names = [n for n in getattr(first, field) if all(n in getattr(d, field) for d in draws)]
        return {n: _cat([getattr(d, field)[n] for d in draws]) for n in names}

    return first._replace(
        log_w=_cat([d.log_w for d in draws]),
        score=_cat([d.score for d in draws]),
        model_terms=terms("model_terms"),
        guide_terms=terms("guide_terms"),
        global_log_w=_cat([d.global_log_w for d in draws]),
        global_score=_cat([d.global_score for d in draws]),
        vectorized=False,
        particle_traces=tuple((d.model_trace, d.guide_trace) for d in draws),
    )


class _LastSite(Messenger):
    """Records the name of the last sample site that completed (to blame in a warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            self.name = msg["name"]


def vectorized_or_sequential(
    run: Callable[..., W], run_sequential: Callable[[], W], num_particles: int
) -> W:
    """``run(num_particles=K)``; if it raises, ``run_sequential()`` from the same random state,
    with one warning naming the site and the reason (its own error, if it fails too)."""
    state = get_rng_state()
    last = _LastSite()
    try:
        with last:
            return run(num_particles=num_particles)
    except Exception as error:  # any failure to broadcast: retry one particle at a time
        where = f"after site '{last.name}'" if last.name else "before any sample site"
        where = getattr(error, "where", where)
        cause = error.__cause__ if hasattr(error, "kind") and error.__cause__ else error
        reason = f"{type(cause).__name__}: {(str(error).splitlines() or [''])[0]}"
    set_rng_state(state)
    weights = run_sequential()
    warnings.warn(
        f"The model or guide does not broadcast over the particle dimension ({where}: "
        f"{reason}); running the {num_particles} particles one after another on the same "
        "minibatch (vectorize_particles=False). Pass vectorize_particles=False to choose this "
        "without the vectorized attempt, or make the model broadcast (e.g. shapes read from "
        "the right, batch dims in pyro.plate) to vectorize.",
        stacklevel=5,
    )
    return weights


#: Name of the plate of local particles (``L`` draws of each data point's local latents).
LOCAL_PLATE = "num_local_particles_vectorized"


class LocalParticles(Messenger):
    """
    Vectorize ``size`` particles of the local latents: every sample site inside all of the
    ``plates`` (the subsampled data plates) gets a plate named :data:`LOCAL_PLATE` at ``dim``
    (left of the particle plate), the global sites outside them do not; for the nested bound
    with ``L`` local particles per global particle.
    """

    def __init__(self, size: int, dim: int, plates: Sequence[str]) -> None:
        super().__init__()
        self.size, self.dim, self.plates = size, dim, frozenset(plates)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        if not self.plates <= {f.name for f in msg["cond_indep_stack"]}:
            return
        frame = CondIndepStackFrame(LOCAL_PLATE, self.dim, self.size, 0, self.size)
        msg["cond_indep_stack"] = (*msg["cond_indep_stack"], frame)
        BroadcastMessenger._pyro_sample(msg)
