r"""
Test log-likelihood of a latent-variable model by importance sampling.

For each data point :math:`x_n` and a proposal :math:`q(z \mid x_n)` (the guide),

.. math::

    \log \hat p(x_n) = \log \frac{1}{S} \sum_{s=1}^{S}
        \frac{p_\theta(x_n, z_s)}{q(z_s \mid x_n)}, \qquad z_s \sim q(z \mid x_n),

the IWAE bound with :math:`K = S` (Burda et al. 2016, section 5: :math:`S = 5000`). It is a
stochastic lower bound, :math:`\mathbb{E} \log \hat p(x_n) \le \log p_\theta(x_n)`, whose gap
shrinks as :math:`S` grows (and vanishes when :math:`q` is the exact posterior).

The :math:`S` samples are drawn in chunks of particles and the data in batches, combined with a
streaming ``logsumexp``, so memory is bounded by ``batch_size × particle_chunk`` model
evaluations whatever :math:`S` and the data size. No gradients are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame
from tqdm.auto import tqdm

from pyro_fdiv.inference.importance import (
    LogWeights,
    guess_max_plate_nesting,
    importance_trace,
    sample_sites,
)
from pyro_fdiv.util import check_integer

__all__ = ["log_likelihood"]


def _data_plate(weights: LogWeights, num_rows: int, name: str | None) -> CondIndepStackFrame:
    """The plate over the data's rows: the one named ``name``, else the plate at the leading
    batch dim of an observed site holding the rows (a row's other dims are its event or inner
    plates), as JSA and the f-divergence bound find theirs; never one that only has the size."""
    frames = {
        f.name: f for s in sample_sites(weights.model_trace).values() for f in s["cond_indep_stack"]
    }
    if name is not None:
        if name not in frames or not frames[name].vectorized:
            raise ValueError(
                f"data_plate {name!r} is not a vectorized plate of the model; plates: "
                f"{sorted(n for n, f in frames.items() if f.vectorized)}"
            )
        return frames[name]
    for site in sample_sites(weights.model_trace).values():
        value = site["value"]
        if not site["is_observed"] or value.dim() <= site["fn"].event_dim:
            continue
        dim = site["fn"].event_dim - value.dim()  # the value's leading batch dim
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim == dim and value.shape[0] == num_rows:
                return frame
    raise ValueError(
        f"log_likelihood needs a plate over the data's first dimension (size {num_rows}) "
        "around an observed site whose leading batch dim holds the rows; none found. Observe "
        "the batch (obs=x) inside pyro.plate('data', len(x)), or name the plate with data_plate=."
    )


def _per_data_point(weights: LogWeights, num_rows: int, name: str | None) -> torch.Tensor:
    """``(K, num_rows)`` log weights: the data plate kept, other shared plates (e.g. pixels in a
    plate inside it) summed into each row."""
    frame = _data_plate(weights, num_rows, name)
    if frame not in weights.plates:
        plates = [f"{f.name!r} (size {f.size})" for f in weights.plates]
        raise ValueError(
            f"log_likelihood needs the data plate {frame.name!r} (size {num_rows}) to enclose "
            f"every sample site; the shared plates are {plates or 'none'}. A latent outside it "
            "(a global latent) couples the data points, so there is no per-data-point "
            "likelihood: put the global latents in pyro.param, or estimate the joint "
            "log p(x_1..x_n) with batch_size=len(data) and a model without that plate."
        )
    keep = 1 + weights.plates.index(frame)
    others = [d for d in range(1, weights.log_w.dim()) if d != keep]
    return weights.log_w.sum(others) if others else weights.log_w


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *args,
    num_samples: int = 5000,
    batch_size: int = 100,
    particle_chunk: int | None = None,
    progress: bool = False,
    data_plate: str | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""
    Importance-sampling estimate of :math:`\log p_\theta(x_n)` for every row of ``data``.

    ``model(x, *args, **kwargs)`` and ``guide(x, *args, **kwargs)`` are called on batches
    ``x = data[i : i + batch_size]`` without subsampling (no ``num_data``); every sample site
    must sit in the plates they share, as for :class:`~pyro_fdiv.inference.IWAE`, so there is one
    weight per data point and particle. The guide must have a density: for an implicit guide
    (AVB) pass a proposal with one, e.g. :meth:`pyro_fdiv.models.vae.VAE.gaussian_proposal`.

    :param model: the generative model.
    :param guide: the proposal :math:`q(z \mid x)`.
    :param torch.Tensor data: the data points, first dimension indexing them.
    :param int num_samples: importance samples :math:`S` per data point.
    :param int batch_size: data points per batch.
    :param int particle_chunk: particles per vectorized pass (default: as many as keep
        ``batch_size × particle_chunk ≤ 20,000``).
    :param bool progress: show a progress bar over the batches.
    :param str data_plate: the name of the plate over the data's rows; by default the plate at
        the leading batch dim of the observed site that holds the rows.
    :returns: a tensor of shape ``(len(data),)``.
    :raises ValueError: for bad sizes, an implicit guide (named by its site), or no plate over
        the data's first dimension shared by every site (global latents).
    """
    check_integer("num_samples", num_samples, 1)
    check_integer("batch_size", batch_size, 1)
    if particle_chunk is None:
        particle_chunk = max(1, 20_000 // batch_size)
    check_integer("particle_chunk", particle_chunk, 1)
    particle_chunk = min(particle_chunk, num_samples)
    max_plate_nesting = guess_max_plate_nesting(model, guide, (data[:batch_size], *args), kwargs)
    results = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="log-likelihood", disable=not progress, leave=False):
        batch_args = (data[start : start + batch_size], *args)
        total = None
        for done in range(0, num_samples, particle_chunk):
            size = min(particle_chunk, num_samples - done)
            weights = importance_trace(
                model,
                guide,
                batch_args,
                kwargs,
                num_particles=size,
                max_plate_nesting=max_plate_nesting,
            )
            log_w = _per_data_point(weights, len(batch_args[0]), data_plate)
            chunk = torch.logsumexp(log_w, dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        results.append(total - math.log(num_samples))
    return torch.cat(results)
