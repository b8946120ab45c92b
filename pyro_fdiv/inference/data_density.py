r"""The data side :math:`\hat p` of the f-divergence bound: a training set under spread noise or
a known target density, behind one interface."""

from __future__ import annotations

import torch
from pyro.distributions import Distribution
from torch import nn

from pyro_fdiv.inference.spread import (
    PCAProjection,
    SpreadSchedule,
    pca_spread_log_density,
    spread_log_density,
)
from pyro_fdiv.util import check_integer

__all__ = ["DataDensity", "DensityData", "EmpiricalData", "as_data_density"]


class DataDensity(nn.Module):
    r"""
    The interface of :math:`\hat p`, the data distribution a generative bound compares the model
    with. Everything the bound needs from its data side goes through these members, so the bound
    never asks which kind it holds. It is an :class:`~torch.nn.Module`: ``.to()`` moves its
    tensors (as buffers, outside the objective's ``state_dict``).

    - :attr:`schedule`, :attr:`sigma`: the spread noise (``None`` for a target density);
    - :attr:`can_sample`: whether :meth:`sample_like` can draw :math:`y \sim \hat p`;
    - :meth:`sample_like`: one draw :math:`y \sim \hat p` per row of a (stacked) batch;
    - :meth:`log_prob`: :math:`\log \hat p(y)`, reduced over the event;
    - :meth:`check_rows`: raise if the model's rows cannot be compared with the data's;
    - :meth:`non_finite_advice`: what a non-finite :math:`\log \hat p(y)` means, and the fix;
    - :meth:`use_pca`: switch :meth:`log_prob` to the PCA gradient estimator (a training set
      only).
    """

    def __init__(self, schedule: SpreadSchedule | None = None, can_sample: bool = True):
        super().__init__()
        #: The spread schedule (``None`` for a target density).
        self.schedule = schedule
        #: Whether :meth:`sample_like` is available.
        self.can_sample = can_sample
        #: The PCA projection of :meth:`use_pca` (``None`` otherwise), a submodule.
        self.projection: PCAProjection | None = None
        self.num_pca_samples: int | None = None

    @property
    def sigma(self) -> float | None:
        """The current spread width (``None`` for a target density)."""
        return None if self.schedule is None else self.schedule.sigma

    def sample_like(self, batch: torch.Tensor) -> torch.Tensor:
        r"""One :math:`y \sim \hat p` per row of ``batch``, with its shape, dtype and device."""
        raise NotImplementedError

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \hat p(y)`, reduced over the event."""
        raise NotImplementedError

    def check_rows(self, event_shape: torch.Size, site: str) -> None:
        """Raise a ``ValueError`` if the observation ``site``'s rows of shape ``event_shape``
        do not match the data's (a density checks nothing: its ``log_prob`` defines them)."""

    def non_finite_advice(self) -> tuple[str, str]:
        r"""``(what, advice)``: the name of :math:`\log \hat p(y)` in error messages, and what to
        change when it is not finite."""
        raise NotImplementedError

    def use_pca(self, dim: int, num_samples: int) -> None:
        """Estimate :meth:`log_prob`'s gradient in a ``dim``-dimensional PCA space from
        ``num_samples`` sampled neighbours
        (:func:`~pyro_fdiv.inference.spread.pca_spread_log_density`)."""
        raise ValueError("log_density='pca' needs a training set tensor as data")


class EmpiricalData(DataDensity):
    r"""
    A training set :math:`x_{1:N}` smoothed by spread noise,
    :math:`\hat p(y) = \frac1N \sum_n \mathcal{N}(y \mid x_n, \sigma^2 I)`, with the width
    :math:`\sigma` of a :class:`~pyro_fdiv.inference.spread.SpreadSchedule`. A sample of
    :math:`\hat p` is a row of the training set plus noise, so :meth:`sample_like` adds the
    noise to the batch it is given (a uniform minibatch of the training set).

    :param torch.Tensor points: the training set, shape ``(N,) + event_shape``; a
        non-persistent buffer (moved by ``.to()``, never saved in a ``state_dict``).
    :param SpreadSchedule schedule: the spread width.
    """

    points: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, points: torch.Tensor, schedule: SpreadSchedule | None) -> None:
        if points.dim() < 1 or points.shape[0] < 1:
            raise ValueError(
                f"Expected data to be a training set of shape (N, ...) with N >= 1, actual "
                f"shape {tuple(points.shape)}"
            )
        if schedule is None:
            raise ValueError(
                "A training set needs spread noise: pass spread=sigma (or a SpreadSchedule); "
                "without it p_hat(y) is a sum of point masses"
            )
        super().__init__(schedule)
        self.register_buffer("points", points, persistent=False)

    def replace_points(self, points: torch.Tensor) -> None:
        """Use another training set of the same shape from now on (e.g. a fresh binarization
        each epoch). A PCA projection stays the one fitted at construction."""
        if points.shape != self.points.shape:
            raise ValueError(
                f"Expected a training set of shape {tuple(self.points.shape)}, actual "
                f"{tuple(points.shape)}"
            )
        self.points = points

    def use_pca(self, dim: int, num_samples: int) -> None:
        self.num_pca_samples = check_integer("num_pca_samples", num_samples, 1)
        self.projection = PCAProjection(self.points, dim)

    def sample_like(self, batch: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma
        assert sigma is not None  # a training set has a schedule (checked in __init__)
        return batch + sigma * torch.randn_like(batch)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma
        assert sigma is not None  # a training set has a schedule (checked in __init__)
        if self.projection is not None:
            assert self.num_pca_samples is not None  # use_pca sets both
            return pca_spread_log_density(
                y, self.points, sigma, self.projection, self.num_pca_samples
            )
        return spread_log_density(y, self.points, sigma)

    def check_rows(self, event_shape: torch.Size, site: str) -> None:
        if self.points.shape[1:] != event_shape:
            raise ValueError(
                f"The training set's rows have shape {tuple(self.points.shape[1:])} but "
                f"observation site '{site}' has rows of shape {tuple(event_shape)}"
            )

    def non_finite_advice(self) -> tuple[str, str]:
        return (
            "the data density log p_hat(y), the training set under spread noise of width "
            f"sigma={self.sigma:g}",
            "The samples y are far from every training point at this spread: pass a larger "
            "spread (or anneal it from a wider start) so that p_hat covers the model's "
            "samples, or initialize the model closer to the data.",
        )

    def extra_repr(self) -> str:
        return f"points={tuple(self.points.shape)}, schedule={self.schedule}"


class DensityData(DataDensity):
    r"""
    A known target density :math:`\hat p`: an object with ``log_prob`` (a Pyro or PyTorch
    distribution), and ``sample`` for :meth:`sample_like`. Its tensors are the caller's: ``.to()``
    leaves them alone.

    :param target: the target distribution.
    """

    def __init__(self, target: Distribution):
        super().__init__(can_sample=hasattr(target, "sample"))
        self.target = target

    def sample_like(self, batch: torch.Tensor) -> torch.Tensor:
        event_dim = len(self.target.event_shape)
        return self.target.sample(batch.shape[: batch.dim() - event_dim]).to(batch)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        return self.target.log_prob(y)

    def non_finite_advice(self) -> tuple[str, str]:
        return (
            "the data density log p_hat(y), the target distribution's log_prob",
            "The samples y lie where the target's density is 0 or underflows: initialize "
            "the model closer to the data.",
        )

    def extra_repr(self) -> str:
        return f"target={self.target!r}"


def as_data_density(
    data: torch.Tensor | Distribution | None, spread: float | SpreadSchedule | None
) -> DataDensity:
    """Wrap a bound's ``data`` argument once: a training set tensor with its ``spread`` (a width
    or a :class:`~pyro_fdiv.inference.spread.SpreadSchedule`) as :class:`EmpiricalData`, an
    object with ``log_prob`` as :class:`DensityData`.

    :raises ValueError: for a training set without spread, a density with spread, or another
        kind of ``data``.
    """
    schedule = (
        spread if spread is None or isinstance(spread, SpreadSchedule) else SpreadSchedule(spread)
    )
    if isinstance(data, torch.Tensor):
        return EmpiricalData(data, schedule)
    if isinstance(data, Distribution) or hasattr(data, "log_prob"):
        if schedule is not None:
            raise ValueError(
                "spread applies to a training set; a target distribution's log_prob is used "
                "as is: pass spread=None"
            )
        return DensityData(data)
    raise ValueError(
        "Expected data to be a training set tensor (N, ...) or a distribution with "
        f"log_prob, actual {type(data).__name__}"
    )
