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

import logging
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from pyro_fdiv.inference.importance import LogWeights, get_log_weights
from pyro_fdiv.inference.iwae import IWAE
from pyro_fdiv.inference.objective import check_integer, rng_preserved

__all__ = ["log_likelihood"]


def _max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    objective = IWAE(num_particles=1)
    log = logging.getLogger("pyro.infer.elbo")
    level = log.level
    log.setLevel(logging.WARNING)  # no "Guessed max_plate_nesting" line per evaluation
    try:
        with rng_preserved():
            objective._guess_max_plate_nesting(model, guide, args, kwargs)
    finally:
        log.setLevel(level)
    return objective.max_plate_nesting


def _per_data_point(weights: LogWeights, num_rows: int) -> torch.Tensor:
    """``(K, num_rows)`` log weights: the shared plate over the data's rows kept, other shared
    plates (e.g. pixels in a plate inside it) summed into each row."""
    sizes = [frame.size for frame in weights.plates]
    if num_rows not in sizes:
        plates = [f"{frame.name!r} (size {frame.size})" for frame in weights.plates]
        raise ValueError(
            f"log_likelihood needs a plate over the data's first dimension (size {num_rows}) "
            f"that every sample site shares; the shared plates are {plates or 'none'}. A latent "
            "outside it (a global latent) couples the data points, so there is no "
            "per-data-point likelihood: put the global latents in pyro.param, or estimate the "
            "joint log p(x_1..x_n) with batch_size=len(data) and a model without that plate."
        )
    keep = 1 + sizes.index(num_rows)  # the outermost such plate
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
    max_plate_nesting = _max_plate_nesting(model, guide, (data[:batch_size], *args), kwargs)
    results = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="log-likelihood", disable=not progress, leave=False):
        batch_args = (data[start : start + batch_size], *args)
        total = None
        for done in range(0, num_samples, particle_chunk):
            size = min(particle_chunk, num_samples - done)
            weights = get_log_weights(model, guide, batch_args, kwargs, size, max_plate_nesting)
            chunk = torch.logsumexp(_per_data_point(weights, len(batch_args[0])), dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        results.append(total - math.log(num_samples))
    return torch.cat(results)
