r"""Spread noise: the data density :math:`\hat p(y)`, its gradient estimators and the schedule."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from pyro_fdiv.util import check_integer

__all__ = [
    "PCAProjection",
    "SpreadSchedule",
    "pca_spread_log_density",
    "spread_log_density",
]

#: Elements per chunk of the ``points x data`` distance matrix (32 MiB in float64).
CHUNK_ELEMENTS = 2**22


class SpreadSchedule:
    r"""
    The spread width :math:`\sigma_t = \sigma_0 (\sigma_1 / \sigma_0)^{\min(t, T) / T}` [1]:
    geometric annealing from ``start`` to ``end`` over ``num_steps`` model updates, then constant.
    A constant width is ``SpreadSchedule(sigma)``.

    The position ``t`` is state: :meth:`step` advances it, :meth:`state_dict` saves it.

    :param float start: :math:`\sigma_0 > 0`.
    :param float end: :math:`\sigma_1 > 0` (default: ``start``).
    :param int num_steps: :math:`T \ge 1`, the number of steps to anneal over.

    **References**

    [1] M. Zhang, T. Bird, R. Habib, T. Xu, D. Barber. *Variational f-divergence minimization*
    (2019), section 4.1: :math:`\sigma` annealed from 1.0 to 0.1.
    """

    def __init__(self, start: float, end: float | None = None, num_steps: int = 1):
        end = start if end is None else end
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"Expected spread {name} to be a float > 0, actual {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Expected spread {name} to be finite, actual {value!r}")
        self.num_steps = check_integer("num_steps", num_steps, 1)
        self.start, self.end = float(start), float(end)
        self.t = 0

    @property
    def sigma(self) -> float:
        """The current width :math:`\\sigma_t`."""
        frac = min(self.t, self.num_steps) / self.num_steps
        return self.start * (self.end / self.start) ** frac

    def step(self) -> None:
        """Advance the position by one model update."""
        self.t += 1

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])

    def __repr__(self) -> str:
        return (
            f"SpreadSchedule(start={self.start}, end={self.end}, num_steps={self.num_steps}, "
            f"t={self.t})"
        )


def _chunk_size(rows: int, cols_factor: int = 1) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, rows * cols_factor))


def _sq_dist(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(M, C)`` between rows of ``a`` and ``b``, clamped at 0."""
    return (a_sq[:, None] - 2 * a @ b.T + b.square().sum(-1)[None, :]).clamp_min(0)


def _gaussian_const(dim: int, sigma: float) -> float:
    return -0.5 * dim * math.log(2 * math.pi * sigma**2)


class _SpreadLogDensity(torch.autograd.Function):
    r"""Chunked :math:`\log \hat p(y)`; gradient :math:`(\mathbb{E}[x_n | y] - y)/\sigma^2`."""

    @staticmethod
    def forward(y: torch.Tensor, data: torch.Tensor, sigma: float) -> tuple:
        y_sq = y.square().sum(-1)
        total = y.new_full((y.shape[0],), -math.inf)
        mean = torch.zeros_like(y)
        chunk = _chunk_size(y.shape[0])
        for start in range(0, data.shape[0], chunk):
            x = data[start : start + chunk]
            logits = -0.5 * _sq_dist(y, x, y_sq) / sigma**2
            new_total = torch.logaddexp(total, torch.logsumexp(logits, -1))
            mean = (
                mean * (total - new_total).exp()[:, None] + (logits - new_total[:, None]).exp() @ x
            )
            total = new_total
        log_p = total - math.log(data.shape[0]) + _gaussian_const(y.shape[-1], sigma)
        return log_p, mean

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        y, _, sigma = inputs
        ctx.save_for_backward(y, output[1])
        ctx.sigma = sigma
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_mean: torch.Tensor) -> tuple:
        y, mean = ctx.saved_tensors
        return grad[:, None] * (mean - y) / ctx.sigma**2, None, None


def _flatten(y: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    event_shape = data.shape[1:]
    if y.shape[y.dim() - len(event_shape) :] != event_shape:
        raise ValueError(
            f"Expected points of shape (..., {', '.join(map(str, event_shape))}) to match the "
            f"training set's rows, actual {tuple(y.shape)}"
        )
    batch_shape = y.shape[: y.dim() - len(event_shape)]
    return y.reshape(-1, event_shape.numel()), data.reshape(data.shape[0], -1), batch_shape


def spread_log_density(y: torch.Tensor, data: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""
    The exact spread data density

    .. math::

        \log \hat p(y) = \log \frac{1}{N} \sum_{n=1}^N \mathcal{N}(y \mid x_n, \sigma^2 I),

    a logsumexp over all ``N`` rows of ``data`` taken in chunks, so memory stays bounded by the
    chunk size whatever ``N``. It is differentiable in ``y``, with the gradient
    :math:`(\mathbb{E}_{p(n|y)}[x_n] - y)/\sigma^2` computed in the same pass (no ``N``-sized
    graph is kept).

    :param torch.Tensor y: points of shape ``batch_shape + data.shape[1:]``.
    :param torch.Tensor data: the training set ``x_{1:N}``, shape ``(N,) + event_shape``.
    :param float sigma: the spread width.
    :returns: :math:`\log \hat p(y)` of shape ``batch_shape``.
    """
    flat, data, batch_shape = _flatten(y, data)
    log_p, _ = _SpreadLogDensity.apply(flat, data.to(flat), float(sigma))
    return log_p.reshape(batch_shape)


class PCAProjection(nn.Module):
    r"""
    A PCA basis :math:`U \in \mathbb{R}^{D \times k}` of a training set, fitted once, with the
    projected data :math:`U^\top (x_n - \bar x)` precomputed.

    The mean :math:`\bar x`, the basis and the projected data are buffers: ``.to()``,
    ``.double()`` and ``.float()`` move them, and ``state_dict`` holds them.

    :param torch.Tensor data: the training set, shape ``(N,) + event_shape``.
    :param int dim: :math:`k`, clipped to ``min(N, D)``.
    """

    # buffers (declared for the type checker; registered in __init__)
    mean: torch.Tensor
    basis: torch.Tensor
    projected: torch.Tensor

    def __init__(self, data: torch.Tensor, dim: int = 50) -> None:
        super().__init__()
        dim = check_integer("pca_dim", dim, 1)
        flat = data.reshape(data.shape[0], -1)
        mean = flat.mean(0)
        centered = flat - mean
        dim = min(dim, *centered.shape)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        basis = vh[:dim].T.contiguous()
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)
        self.register_buffer("projected", centered @ basis)

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        return (flat - self.mean) @ self.basis

    def residual(self, flat: torch.Tensor) -> torch.Tensor:
        centered = flat - self.mean
        return centered - (centered @ self.basis) @ self.basis.T


def _sample_neighbours(
    y_proj: torch.Tensor, projection: PCAProjection, sigma: float, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n ~ softmax(-|U'y - U'x_n|^2 / 2 sigma^2)`` (Gumbel-max, chunked) and return the
    indices ``(M, T)`` and the projected log-normalizer ``(M,)``."""
    num_points = y_proj.shape[0]
    y_sq = y_proj.square().sum(-1)
    best = y_proj.new_full((num_points, num_samples), -math.inf)
    index = torch.zeros((num_points, num_samples), dtype=torch.long, device=y_proj.device)
    total = y_proj.new_full((num_points,), -math.inf)
    chunk = _chunk_size(num_points, num_samples)
    for start in range(0, projection.projected.shape[0], chunk):
        x = projection.projected[start : start + chunk]
        logits = -0.5 * _sq_dist(y_proj, x, y_sq) / sigma**2
        total = torch.logaddexp(total, torch.logsumexp(logits, -1))
        uniform = torch.rand((*logits.shape, num_samples), dtype=logits.dtype, device=x.device)
        gumbel = logits[..., None] - torch.log(-torch.log(uniform.clamp_min(1e-30)))
        value, arg = gumbel.max(1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, arg + start, index)
    return index, total


def pca_spread_log_density(
    y: torch.Tensor,
    data: torch.Tensor,
    sigma: float,
    projection: PCAProjection,
    num_samples: int = 10,
) -> torch.Tensor:
    r"""
    :math:`\log \hat p(y)` with the sampled gradient estimator of [1, appendix B].

    The gradient is

    .. math::

        \nabla_y \log \hat p(y) = \frac{1}{\sigma^2}\Big(\mathbb{E}_{p(n \mid y)}[x_n] - y\Big)
        \approx \frac{1}{\sigma^2}\Big(\frac{1}{T}\sum_{t=1}^T x_{n_t} - y\Big),
        \quad n_t \sim q(n \mid y) \propto
        \exp\Big(-\frac{\|U^\top y - U^\top x_n\|^2}{2\sigma^2}\Big),

    where the softmax over the training set is taken in a ``k``-dimensional PCA space (cheaper
    than ``D`` dimensions; exact when the data lie in that subspace). The value is an
    approximation for monitoring: the projected log-density plus the out-of-subspace residual
    averaged over the sampled :math:`x_{n_t}` (exact when ``k = D``).

    **References**

    [1] M. Zhang, T. Bird, R. Habib, T. Xu, D. Barber. *Variational f-divergence minimization*
    (2019), appendix B: ``k = 50``, ``T = 10``.
    """
    flat, data, batch_shape = _flatten(y, data)
    data = data.to(flat)
    with torch.no_grad():
        detached = flat.detach()
        index, total = _sample_neighbours(
            projection.project(detached), projection, float(sigma), num_samples
        )
        neighbours = data[index]  # (M, T, D)
        residual = projection.residual(detached)[:, None] - projection.residual(neighbours)
        value = (
            total
            - math.log(data.shape[0])
            + _gaussian_const(flat.shape[-1], float(sigma))
            - 0.5 * residual.square().sum(-1).mean(-1) / sigma**2
        )
        direction = (neighbours.mean(1) - detached) / sigma**2
    surrogate = (direction * flat).sum(-1)
    return (value + surrogate - surrogate.detach()).reshape(batch_shape)
