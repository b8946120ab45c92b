"""Plots comparing approximate posteriors with a reference."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["PANELS", "plot_marginals"]

#: (x column, y column, x label, y label) of each panel, as in the AVB paper's Figure 4.
PANELS = ((0, 1, r"$\mu$", r"$\log\tau$"), (1, 2, r"$\log\tau$", r"$\tilde\theta_1$"))


def _density(x: np.ndarray, y: np.ndarray, xedges: np.ndarray, yedges: np.ndarray):
    hist, _, _ = np.histogram2d(x, y, bins=(xedges, yedges), density=True)
    return gaussian_filter(hist, sigma=1.5).T


def _levels(density: np.ndarray, count: int) -> np.ndarray:
    """Contour levels from 5 % of the peak upwards (none at zero density)."""
    return np.linspace(0.05, 0.95, count) * density.max()


def plot_marginals(results: Mapping, ref: np.ndarray, path: str | Path) -> Path:
    """
    One row per method of 2-D densities of :math:`(\\mu, \\log\\tau)` and
    :math:`(\\log\\tau, \\tilde\\theta_1)`: the method's draws filled, the reference's as contour
    lines. ``results`` maps a method name to an object with ``draws`` of shape
    ``(chains, draws, 10)``; ``ref`` has the same layout.
    """
    ref = ref.reshape(-1, ref.shape[-1])
    # constrained layout makes room for the suptitle above the first row (tight_layout does
    # not, and the title overlapped the first row's panel titles)
    fig, axes = plt.subplots(
        len(results),
        len(PANELS),
        figsize=(8, 2.6 * len(results) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for row, (name, result) in enumerate(results.items()):
        draws = result.draws.reshape(-1, ref.shape[-1])
        for col, (i, j, xlabel, ylabel) in enumerate(PANELS):
            ax = axes[row, col]
            lo = np.percentile(ref[:, [i, j]], 0.5, axis=0)
            hi = np.percentile(ref[:, [i, j]], 99.5, axis=0)
            pad = 0.15 * (hi - lo)
            xedges = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 61)
            yedges = np.linspace(lo[1] - pad[1], hi[1] + pad[1], 61)
            xc, yc = (xedges[:-1] + xedges[1:]) / 2, (yedges[:-1] + yedges[1:]) / 2
            fill = _density(draws[:, i], draws[:, j], xedges, yedges)
            lines = _density(ref[:, i], ref[:, j], xedges, yedges)
            ax.contourf(xc, yc, fill, _levels(fill, 8), cmap="Blues", extend="max")
            ax.contour(xc, yc, lines, _levels(lines, 6), colors="black", linewidths=0.7)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if col == 0:
                ax.set_title(name, loc="left", fontsize=10)
    fig.suptitle("Eight Schools: method (filled) against the NUTS reference (lines)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
