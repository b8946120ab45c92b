"""The autoguide × objective matrix: every Pyro autoguide fitted by every posterior-inference
objective on one conjugate Gaussian model whose posterior is known exactly.

Shared by ``tests/test_autoguide_matrix.py`` (which checks each cell) and
``scripts/autoguide_matrix.py`` (which prints the table of ``docs/supports.md``), so that the
documented table and the tests are the same cases.

Model: ``a ~ N(0, I_2)``, ``b ~ N(0, 1)``, and ``N = 5`` observations ``xa_i ~ N(a, I_2)``,
``xb_i ~ N(b, 1)``. The posterior is Gaussian and factorizes: each of the three coordinates has
mean ``sum_i x_i / (N + 1)`` and standard deviation ``(N + 1) ** -0.5 = 0.408``.

Each cell trains from a fixed seed, then measures the guide's posterior mean and standard
deviation from ``NUM_DRAWS`` draws of the guide (vectorized in a plate, as Pyro's own
``test_exact``; the Laplace approximation's Gaussian for ``AutoLaplaceApproximation``), and
compares them with the exact values: the largest absolute error over the three coordinates.
Point-estimate guides (``AutoDelta``, and the ``AutoDelta`` part of the ``AutoGuideList``) have
no spread: only their mean (the posterior mode, equal to the mean here) is compared.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import block_autoregressive, iterated
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGaussian,
    AutoGuideList,
    AutoHierarchicalNormalMessenger,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
    AutoNormalMessenger,
    AutoRegressiveMessenger,
    AutoStructured,
)

from pyro_fdiv.inference import AVB, IWAE, JSA, BlackBoxAlpha

N = 5
NUM_DRAWS = 4000


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2024)
    xa = torch.randn(N, 2, generator=gen, dtype=torch.float64) + torch.tensor([0.8, -0.5])
    xb = torch.randn(N, generator=gen, dtype=torch.float64) + 0.3
    return xa.to(torch.get_default_dtype()), xb.to(torch.get_default_dtype())


def model(xa, xb):
    a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(xb)):
        pyro.sample("xa", dist.Normal(a, 1.0).to_event(1), obs=xa)
        pyro.sample("xb", dist.Normal(b, 1.0), obs=xb)


def exact_posterior(xa, xb) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of ``(a_1, a_2, b)``."""
    mean = torch.cat([xa.sum(0), xb.sum(0, keepdim=True)]) / (N + 1)
    return mean, torch.full((3,), (N + 1) ** -0.5)


# ---------------------------------------------------------------------------------------------
# Guides: name -> (constructor, point_estimate_sites)
# ---------------------------------------------------------------------------------------------


def _guide_list(m):
    guide = AutoGuideList(m)
    guide.append(AutoDelta(poutine.block(m, expose=["b"])))
    guide.append(AutoNormal(poutine.block(m, hide=["b"])))
    return guide


GUIDES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "AutoNormal": (AutoNormal, ()),
    "AutoDiagonalNormal": (AutoDiagonalNormal, ()),
    "AutoMultivariateNormal": (AutoMultivariateNormal, ()),
    "AutoLowRankMultivariateNormal": (functools.partial(AutoLowRankMultivariateNormal, rank=1), ()),
    "AutoIAFNormal": (AutoIAFNormal, ()),
    "AutoNormalizingFlow": (
        lambda m: AutoNormalizingFlow(m, functools.partial(iterated, 2, block_autoregressive)),
        (),
    ),
    "AutoStructured": (AutoStructured, ()),
    "AutoGaussian": (AutoGaussian, ()),
    "AutoDelta": (AutoDelta, ("a", "b")),
    "AutoLaplaceApproximation": (AutoLaplaceApproximation, ()),
    "AutoGuideList": (_guide_list, ("b",)),
    "AutoNormalMessenger": (AutoNormalMessenger, ()),
    "AutoHierarchicalNormalMessenger": (AutoHierarchicalNormalMessenger, ()),
    "AutoRegressiveMessenger": (AutoRegressiveMessenger, ()),
}

# ---------------------------------------------------------------------------------------------
# Objectives: name -> constructor (the same K for the multi-sample ones)
# ---------------------------------------------------------------------------------------------

K = 8

OBJECTIVES: dict[str, Callable] = {
    "Trace_ELBO": lambda: Trace_ELBO(num_particles=K, vectorize_particles=True),
    "IWAE": lambda: IWAE(num_particles=K),
    "IWAE (dreg)": lambda: IWAE(num_particles=K, gradient_estimator="dreg"),
    "BlackBoxAlpha(0.5)": lambda: BlackBoxAlpha(0.5, num_particles=K),
    "AVB": lambda: AVB(num_particles=K, discriminator_hidden=(32, 32)),
    "JSA": lambda: JSA(num_data=None, num_particles=K),
}


@dataclass
class Fit:
    """What a cell measured: errors of the guide's posterior mean and sd (``None`` where the
    guide has no spread), or the error a cell raised."""

    mean_err: float | None = None
    sd_err: float | None = None
    error: BaseException | None = None
    seconds: float = 0.0


# Tolerances (see tests/test_autoguide_matrix.py for their justification).
MEAN_TOL = 0.1
SD_TOL = 0.1

NUM_STEPS = 250


def _draws(guide, xa, xb) -> dict[str, torch.Tensor]:
    with torch.no_grad(), poutine.block():
        if isinstance(guide, AutoLaplaceApproximation):
            guide = guide.laplace_approximation(xa, xb)
        plate = pyro.plate("_matrix_draws", NUM_DRAWS, dim=-2)
        tr = poutine.trace(plate(guide)).get_trace(xa, xb)
        return {name: tr.nodes[name]["value"].reshape(NUM_DRAWS, -1) for name in ("a", "b")}


def fit(guide_name: str, objective_name: str, *, seed: int = 0, num_steps: int = NUM_STEPS) -> Fit:
    """Train ``guide_name`` with ``objective_name`` and measure it (or record its error)."""
    start = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    xa, xb = data()
    make_guide, points = GUIDES[guide_name]
    try:
        guide = make_guide(model)
        elbo = OBJECTIVES[objective_name]()
        optim = pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.02 ** (1 / num_steps)})
        svi = SVI(model, guide, optim, elbo)
        for _ in range(num_steps):
            loss = svi.step(xa, xb)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss}")
        draws = _draws(guide, xa, xb)
    except Exception as error:  # a cell that refuses the guide: recorded, checked by the test
        return Fit(error=error, seconds=time.perf_counter() - start)
    mean, sd = exact_posterior(xa, xb)
    sample = torch.cat([draws["a"], draws["b"]], dim=-1)
    mean_err = (sample.mean(0) - mean).abs().max().item()
    spread = [i for i, site in enumerate(("a", "a", "b")) if site not in points]
    sd_err = (sample.std(0) - sd)[spread].abs().max().item() if spread else None
    return Fit(mean_err=mean_err, sd_err=sd_err, seconds=time.perf_counter() - start)


def describe(result: Fit) -> str:
    """One table cell."""
    if result.error is not None:
        message = str(result.error).splitlines()[0] if str(result.error) else ""
        if len(message) > 160:
            message = message[:157] + "..."
        return f"`{type(result.error).__name__}`: {message}".replace("|", "\\|")
    sd = "n/a (point estimate)" if result.sd_err is None else f"≤ {result.sd_err:.3f}"
    return f"fits (mean err ≤ {result.mean_err:.3f}, sd err {sd})"


def table(results: dict[tuple[str, str], Fit]) -> str:
    """The markdown table: rows autoguides, columns objectives."""
    columns = list(OBJECTIVES)
    lines = [
        "| autoguide | " + " | ".join(f"`{c}`" for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for guide_name in GUIDES:
        cells = [describe(results[guide_name, c]) for c in columns]
        lines.append(f"| `{guide_name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
