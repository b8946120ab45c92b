"""The registry of inference methods that ``pyro-fdiv eight-schools`` compares."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_fdiv.inference import AVB, IWAE, JSA, AutoImplicit, BlackBoxAlpha
from pyro_fdiv.models import eight_schools as es

__all__ = ["METHODS", "Method", "available_methods", "get_method", "register_method"]


@dataclass(frozen=True)
class Method:
    """
    An inference method: a guide family and an objective for :class:`~pyro.infer.SVI`, or the
    HMC reference itself (``guide`` and ``objective`` both ``None``).

    :param str name: the name used on the command line and in the results.
    :param str description: one line for ``--help`` and the README.
    :param guide: builds a guide from the model (e.g. an autoguide class).
    :param objective: builds the loss passed to ``SVI(..., loss=...)``.
    :param float lr: initial Adam learning rate; decays tenfold over the run.
    :param draws: optional ``draws(objective, num_draws)`` returning the method's draws in the
        unconstrained coordinates, shape ``(chains, draws, 10)``, from a Markov chain the fitted
        objective ran (autocorrelated: the kNN metrics window them) instead of from the guide.
    :param int num_proposals: if given, the draws are made by
        :func:`~pyro_fdiv.inference.importance_resample` from the fitted guide with this many
        proposals per draw (independent draws of the resampled distribution, which has no
        density in closed form: no exact KL).
    """

    name: str
    description: str
    guide: Callable[[Callable], Callable] | None = None
    objective: Callable[[], ELBO] | None = None
    lr: float = 0.02
    draws: Callable[[ELBO, int], np.ndarray] | None = None
    num_proposals: int | None = None

    @property
    def is_reference(self) -> bool:
        return self.guide is None


#: The registry of Eight Schools methods by name (:func:`register_method` adds one).
METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` (so it runs by default)."""
    if method.name in METHODS and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered; pass overwrite=True")
    METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


#: Full-rank Gaussian guide started at scale 1 rather than Pyro's 0.1: the Eight Schools
#: posterior is wider than 0.1 in every coordinate, and importance-weighted objectives with
#: DReG gradients have a high-variance guide gradient while the guide is much narrower than
#: the posterior (measured: IWAE-DReG reaches exact KL(p||q) 0.37 from scale 1, 0.76 from 0.1;
#: the ELBO fits are the same from either).
FullRank = functools.partial(AutoMultivariateNormal, init_scale=1.0)

#: K of the importance-weighted objectives, and of the resampling from their guides.
IWAE_PARTICLES = 64


def iwae_objective() -> IWAE:
    """The Eight Schools IWAE: K = 64, DReG gradients."""
    return IWAE(num_particles=IWAE_PARTICLES, gradient_estimator="dreg")


def bbalpha_half_objective() -> BlackBoxAlpha:
    """The Eight Schools black-box alpha with alpha = 0.5, K = 64."""
    return BlackBoxAlpha(0.5, num_particles=IWAE_PARTICLES)


# The objectives of later issues add their methods here, in one place. Each `-sir` method fits
# exactly as the method before it (the job reuses that fit when they run one after the other)
# and draws by sampling-importance-resampling from its guide with K = the objective's K: the
# distribution whose ELBO the importance-weighted bound bounds (measured: see the README).
for _method in (
    Method("nuts", "Pyro's NUTS: the reference (an independent second run gives the noise floor)"),
    Method("elbo-meanfield", "Trace_ELBO with AutoNormal", AutoNormal, Trace_ELBO),
    Method("elbo-fullrank", "Trace_ELBO with AutoMultivariateNormal", FullRank, Trace_ELBO),
    Method("iwae", "IWAE, K=64, DReG gradients, AutoMultivariateNormal", FullRank, iwae_objective),
    Method(
        "iwae-sir",
        "the iwae guide resampled: importance_resample with K=64 proposals per draw",
        FullRank,
        iwae_objective,
        num_proposals=IWAE_PARTICLES,
    ),
    Method(
        "bbalpha-0.5",
        "black-box alpha, alpha=0.5, K=64, AutoMultivariateNormal",
        FullRank,
        bbalpha_half_objective,
    ),
    Method(
        "bbalpha-0.5-sir",
        "the bbalpha-0.5 guide resampled: importance_resample with K=64 proposals per draw",
        FullRank,
        bbalpha_half_objective,
        num_proposals=IWAE_PARTICLES,
    ),
    Method(
        "bbalpha-2",
        "black-box alpha, alpha=2, K=64, AutoMultivariateNormal",
        FullRank,
        lambda: BlackBoxAlpha(2.0, num_particles=IWAE_PARTICLES),
    ),
):
    register_method(_method)

# Adversarial variational Bayes (issue 5): a neural sampler (noise 14 -> 64 -> 64 -> 10 plus a
# Gaussian part) against an MLP discriminator (128, 128) with adaptive contrast, K = 64, two
# adversary steps per step as in the paper. Measured (5000 steps, about 50 s): kl_ref_q 0.032,
# kl_q_ref 0.108 at seed 0 against the full-rank ELBO's 0.104 and 0.192.
register_method(
    Method(
        "avb",
        "adversarial variational Bayes, AutoImplicit guide, adaptive contrast, K=64",
        functools.partial(AutoImplicit, hidden=(64, 64)),
        lambda: AVB(num_particles=64, num_adversary_steps=2, discriminator_hidden=(128, 128)),
        lr=0.005,
    )
)


# Joint stochastic approximation (issue 6): one Metropolis independence chain over all latent
# sites with the full-rank guide as its proposal, 16 proposals (transitions) per step; the guide
# climbs log q at the chain's states (inclusive KL). `jsa` reports the fitted guide, `jsa-chain`
# the chain's states after a burn-in of the first fifth of the run (the job fits them once).
# Measured (seed 0, 5000 steps): jsa-chain kNN KL -0.000 / 0.007, mean |z| 0.011, max W1 0.031
# (NUTS against NUTS: -0.002 / 0.014, 0.010, 0.044); the jsa guide exact KL(p||q) 0.216.
def jsa_objective() -> JSA:
    """The Eight Schools JSA: one chain, 16 transitions per step, its states recorded."""
    return JSA(num_particles=16, record_history=True)


def jsa_chain_draws(objective: JSA, num_draws: int) -> np.ndarray:
    """The JSA chain's states after the first fifth of the run, evenly thinned to
    ``num_draws``, in Eight Schools' unconstrained coordinates: shape ``(1, num_draws, 10)``."""
    states = objective.history(burn_in=objective.num_recorded // 5)
    sites = ("mu", "tau", "theta_tilde", "theta")  # theta: the centered parameterization
    z = es.to_unconstrained({name: states[name] for name in sites if name in states})
    index = torch.linspace(0, len(z) - 1, num_draws).round().long()
    return z[index].to(torch.float64).numpy()[None]


for _method in (
    Method(
        "jsa",
        "JSA (inclusive KL at a Metropolis independence chain), K=16, AutoMultivariateNormal",
        FullRank,
        jsa_objective,
    ),
    Method(
        "jsa-chain",
        "the JSA chain's states after burn-in (the first fifth of the run), as MCMC draws",
        FullRank,
        jsa_objective,
        draws=jsa_chain_draws,
    ),
):
    register_method(_method)
