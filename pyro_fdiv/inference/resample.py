r"""
Posterior draws from any guide with a density by sampling-importance-resampling (SIR).

Each draw takes ``K`` fresh proposals from the guide, weights them by
:func:`~pyro_fdiv.inference.importance.importance_trace` (the one mechanism every objective
shares) and keeps one in proportion to its weight. Draws are independent of each other, so they
are used like a guide's own draws: :class:`~pyro.infer.Predictive`, ArviZ, the kNN metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro.distributions import Categorical
from pyro.poutine.indep_messenger import CondIndepStackFrame

from pyro_fdiv.inference.importance import (
    LogWeights,
    SiteError,
    get_log_weights,
    guess_max_plate_nesting,
    is_subsampled,
    sample_sites,
    vectorized_frames,
)
from pyro_fdiv.util import check_integer

__all__ = ["ResampledPosterior", "importance_resample"]

#: Proposals per vectorized pass when ``chunk_size`` is not given (draws x K, at least one draw).
PROPOSALS_PER_PASS = 2**16


class ResampledPosterior(NamedTuple):
    r"""
    What :func:`importance_resample` returns.

    :ivar dict samples: site name to the resampled values, shape ``(num_samples,) + site shape``
        (the site's shape in one run of the model): every latent sample site of the model and
        every :func:`pyro.deterministic` site, at the model trace's (constrained) values. The
        layout of ``Predictive(model, posterior_samples=...)`` and :func:`arviz.from_dict`.
    :ivar torch.Tensor log_weights: :math:`\log w` of every proposal, shape
        ``(num_samples, K) + batch_shape`` (``batch_shape``: the plates every site shares when
        resampling per data point, else empty).
    :ivar float ess: the effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2` of each
        draw's ``K`` weights, averaged over draws (and data points).
    :ivar float ess_fraction: ``ess / K``, in :math:`[1/K, 1]`; 1 when the guide is the posterior.
    :ivar float khat: the PSIS :math:`\hat k` of all ``num_samples * K`` weights
        (:func:`pyro_fdiv.compare.metrics.psis_khat`; the largest over data points): below 0.7
        the guide is a reliable proposal, :math:`-\infty` for constant weights.
    """

    samples: dict[str, torch.Tensor]
    log_weights: torch.Tensor
    ess: float
    ess_fraction: float
    khat: float


@torch.no_grad()
def importance_resample(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int,
    num_proposals: int = 64,
    chunk_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> ResampledPosterior:
    r"""
    Draw ``num_samples`` posterior samples by sampling-importance-resampling [1] from a trained
    guide: for each draw, ``K = num_proposals`` proposals from the guide, and one of them kept
    with probability proportional to its importance weight,

    .. math::

        z_1, \dots, z_K \sim q(z \mid x), \qquad
        w_k = \frac{p(x, z_k)}{q(z_k \mid x)}, \qquad
        z = z_j, \quad j \sim \mathrm{Categorical}\Big(\frac{w_1}{\sum_k w_k}, \dots,
        \frac{w_K}{\sum_k w_k}\Big).

    The draws follow the *importance-weighted* distribution :math:`q_K` [2], which tends to the
    posterior as :math:`K \to \infty` and, for each :math:`K`, satisfies [2, 3]

    .. math::

        \mathcal{L}_K = \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^K w_k\Big]
        \le \mathbb{E}_{q_K}\Big[\log \frac{p(x, z)}{q_K(z)}\Big] \le \log p(x),
        \quad\text{so}\quad
        \mathrm{KL}\big(q_K \,\|\, p(z \mid x)\big) \le \log p(x) - \mathcal{L}_K.

    This is what the sampler is for: IWAE maximizes :math:`\mathcal{L}_K` (and BB-α, with
    :math:`\alpha > 0`, a bound of the same kind), which makes :math:`q_K`, not the guide
    :math:`q` itself, close to the posterior; :math:`q` is over-dispersed (mass-covering), and
    resampling its draws with :math:`K` equal to the training ``num_particles`` gives the
    distribution the bound describes. It works for any guide with a density.

    **Per data point.** The weights are those of
    :func:`~pyro_fdiv.inference.importance.importance_trace`: one per element of the plates that
    every sample site shares (a data plate around the whole model, each data point with its own
    local latents). Each element is then resampled independently: the value of every site at a
    data point is taken from that data point's chosen proposal (the posterior factorizes over
    such a plate). A model with global latents (or any site outside the data plate) has one
    weight per proposal, and all its sites are resampled jointly, as one vector.

    Diagnostics: the effective sample size of each draw's ``K`` weights (Kong's
    :math:`(\sum_k w_k)^2 / \sum_k w_k^2`, reported as its mean and as a fraction of :math:`K`)
    and the PSIS :math:`\hat k` [4] of all weights (how good :math:`q` is as a proposal; above
    0.7 the weights have too heavy a tail for the resampled draws to be trusted at any
    :math:`K`).

    Draws are made in vectorized passes of ``chunk_size`` draws times ``K`` proposals (the
    particle plate of ``importance_trace``), without gradients, from torch's global random
    stream.

    Example::

        svi = SVI(model, guide, optim, loss=IWAE(num_particles=64))
        ...
        result = importance_resample(model, guide, data, num_samples=1000, num_proposals=64)
        predictive = Predictive(model, posterior_samples=result.samples)(data)
        print(result.ess_fraction, result.khat)

    :param model: the model; ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` with
        every keyword argument but the four below.
    :param guide: the trained guide, with a density at every site (not an implicit guide).
    :param int num_samples: draws to return.
    :param int num_proposals: proposals :math:`K` per draw.
    :param int chunk_size: draws per vectorized pass (default: as many as keep
        ``chunk_size × K ≤ 65,536`` proposals); memory grows with ``chunk_size × K`` model runs.
    :param int max_plate_nesting: the model's and guide's plate nesting; guessed by default.
    :returns: a :class:`ResampledPosterior`.
    :raises ValueError: for ``num_samples``, ``num_proposals`` or ``chunk_size`` below 1, a
        guide without a density (an implicit guide, e.g. ``AutoImplicit``), a subsampled plate,
        non-finite log weights, or a draw whose ``K`` weights are all zero.

    **References**

    [1] D. B. Rubin. *Using the SIR algorithm to simulate posterior distributions*. Bayesian
    Statistics 3, 1988.

    [2] C. Cremer, Q. Morris, D. Duvenaud. *Reinterpreting importance-weighted autoencoders*.
    ICLR Workshop, 2017.

    [3] J. Domke, D. Sheldon. *Importance weighting and variational inference*. NeurIPS, 2018.

    [4] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry. *Pareto smoothed importance
    sampling*. JMLR 25(72), 2024.
    """
    num_samples = check_integer("num_samples", num_samples, 1)
    num_proposals = check_integer("num_proposals", num_proposals, 1)
    if chunk_size is None:
        chunk_size = max(1, PROPOSALS_PER_PASS // num_proposals)
    chunk_size = min(check_integer("chunk_size", chunk_size, 1), num_samples)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    passes = []
    for done in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - done)
        weights = _weights(model, guide, args, kwargs, size * num_proposals, max_plate_nesting)
        passes.append(_resample(weights, size, num_proposals))
    samples = {name: torch.cat([p[0][name] for p in passes]) for name in passes[0][0]}
    log_w = torch.cat([p[1] for p in passes])
    ess = _ess(log_w).mean().item()
    return ResampledPosterior(samples, log_w, ess, ess / num_proposals, _khat(log_w))


def _weights(model, guide, args, kwargs, num_particles: int, max_plate_nesting: int):
    try:
        weights = get_log_weights(model, guide, args, kwargs, num_particles, max_plate_nesting)
    except SiteError as error:
        if error.kind != "guide":
            raise
        raise ValueError(
            f"importance_resample needs the guide's density log q(z), and the guide cannot "
            f"score its site '{error.name}' ({error.fn_name}): {error} For a guide without a "
            "density (AutoImplicit, implicit_sample) take its draws directly, e.g. "
            "Predictive(model, guide=guide, num_samples=...)."
        ) from error.__cause__
    _check_not_subsampled(weights)
    return weights


def _check_not_subsampled(weights: LogWeights) -> None:
    for site in sample_sites(weights.model_trace).values():
        for frame in vectorized_frames(site):
            if is_subsampled(frame):
                raise ValueError(
                    f"importance_resample: plate '{frame.name}' is subsampled ({frame.size} of "
                    f"{frame.full_size}), so each pass would see other data. Run the model and "
                    "guide on the data whose posterior you want, without subsample_size."
                )


def _check_log_weights(log_w: torch.Tensor) -> None:
    bad = torch.isnan(log_w) | torch.isposinf(log_w)
    if bad.any():
        raise ValueError(
            f"importance_resample: {int(bad.sum())} log weights are NaN or +inf; check the "
            "model's and guide's log-densities at the guide's draws."
        )
    if torch.isneginf(log_w).all(1).any():
        raise ValueError(
            "importance_resample: every one of a draw's proposals has weight zero (log w = "
            "-inf: the guide proposes outside the model's support); raise num_proposals or "
            "fix the guide's support."
        )


def _resample(
    weights: LogWeights, num_draws: int, num_proposals: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass: ``num_draws`` resampled values of every latent and deterministic site, and
    the log weights laid out as ``(num_draws, K) + batch_shape``."""
    log_w = weights.log_w.reshape((num_draws, num_proposals, *weights.log_w.shape[1:]))
    _check_log_weights(log_w)
    index = Categorical(logits=log_w.movedim(1, -1)).sample()  # (num_draws,) + batch_shape
    samples = {}
    for name, site in sample_sites(weights.model_trace).items():
        if site["is_observed"] and not site["infer"].get("_deterministic"):
            continue
        values = _particle_values(site, name, num_draws, num_proposals, weights)
        samples[name] = _gather(values, index, site, weights.plates)
    return samples, log_w


def _site_ndim(site: dict) -> int:
    """The number of batch dims of the site in one run of the model (its plates' extent)."""
    return max((-f.dim for f in vectorized_frames(site)), default=0)


def _event_ndim(site: dict, max_plate_nesting: int) -> int:
    """The site's event dims. A :func:`pyro.deterministic` site's ``Delta`` takes its whole
    value as the event by default; its value is laid out like the batch (the particle dim and
    the plates first), so only the dims right of those are its event."""
    if site["infer"].get("_deterministic"):
        return max(0, site["value"].dim() - max_plate_nesting - 1)
    return site["fn"].event_dim


def _particle_values(
    site: dict, name: str, num_draws: int, num_proposals: int, weights: LogWeights
) -> torch.Tensor:
    """The site's values as ``(num_draws, K) + site shape``."""
    value = site["value"]
    if num_draws * num_proposals == 1:  # no particle plate: the trace is one run of the model
        return value.reshape((1, 1, *value.shape))
    event_ndim = _event_ndim(site, weights.max_plate_nesting)
    if not site["infer"].get("_deterministic"):
        fn = site["fn"]
        value = value.expand(torch.broadcast_shapes(value.shape, fn.batch_shape + fn.event_shape))
    ndim = weights.max_plate_nesting + 1 + event_ndim
    value = value.reshape((1,) * (ndim - value.dim()) + value.shape)
    value = value.expand((num_draws * num_proposals, *value.shape[1:]))
    tail = _site_ndim(site) + event_ndim
    middle = value.shape[1 : value.dim() - tail]
    if any(size != 1 for size in middle):
        raise ValueError(
            f"importance_resample: site '{name}' has value shape {tuple(site['value'].shape)} "
            f"with batch dims outside its plates ({tuple(middle)}); declare event dims with "
            ".to_event(...) or put batch dims in a pyro.plate."
        )
    return value.reshape((num_draws, num_proposals, *value.shape[value.dim() - tail :]))


def _gather(
    values: torch.Tensor,
    index: torch.Tensor,
    site: dict,
    plates: tuple[CondIndepStackFrame, ...],
) -> torch.Tensor:
    """Each draw's (and data point's) chosen proposal: ``values[i, index[i, ...]]`` broadcast
    over the site's other dims; ``values`` is ``(num_draws, K) + site shape``."""
    ndim = _site_ndim(site)
    shape = [1] * ndim
    for frame in plates:
        shape[ndim + frame.dim] = frame.size
    event = (1,) * (values.dim() - 2 - ndim)
    index = index.reshape((index.shape[0], 1, *shape, *event))
    index = index.expand((values.shape[0], 1, *values.shape[2:]))
    return values.gather(1, index).squeeze(1)


def _ess(log_w: torch.Tensor) -> torch.Tensor:
    r"""Kong's :math:`(\sum_k w_k)^2 / \sum_k w_k^2` over the proposal dim (dim 1)."""
    return (2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1)).exp()


def _khat(log_w: torch.Tensor) -> float:
    """PSIS k-hat of all draws' weights, the largest over the data points."""
    from pyro_fdiv.compare.metrics import psis_khat  # arviz: imported only when needed

    per_point = log_w.reshape(log_w.shape[0] * log_w.shape[1], -1).T
    return max(psis_khat(column) for column in per_point)
