"""Smoke runs of the f-divergence examples (the full runs are in the README)."""

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import gaussian_fit
import ring


def test_gaussian_fit_smoke(tmp_path):
    table = gaussian_fit.main(["--out", str(tmp_path), "--smoke", "--no-progress"])
    saved = pd.read_csv(tmp_path / "results.csv")
    expected = [
        "method",
        "divergence",
        "mu",
        "sigma",
        "true_divergence_at_fit",
        "mu_star",
        "sigma_star",
        "divergence_at_optimum",
    ]
    assert list(saved.columns[: len(expected)]) == expected
    assert len(saved) == len(table) == 6
    assert (tmp_path / "bounds.png").stat().st_size > 0
    # the exact optima by quadrature (the paper's Table 2: 1.70/0.62, 1.85/0.57, 1.76/0.60)
    optima = saved.groupby("divergence")[["mu_star", "sigma_star"]].first()
    assert optima.loc["forward_kl"].tolist() == pytest.approx([1.7, 0.6229], abs=1e-3)
    assert optima.loc["reverse_kl"].tolist() == pytest.approx([1.8501, 0.5679], abs=1e-3)
    assert optima.loc["js"].tolist() == pytest.approx([1.7764, 0.6009], abs=1e-3)
    # the fit's divergence is never below the optimum's
    assert (saved.true_divergence_at_fit >= saved.divergence_at_optimum - 1e-9).all()


def test_forward_kl_optimum_is_moment_matching():
    mu, sigma, _ = gaussian_fit.exact_optimum("forward_kl")
    mean = 0.3 * 1.0 + 0.7 * 2.0
    var = 0.3 * (0.1**2 + 1.0) + 0.7 * (0.5**2 + 4.0) - mean**2
    assert mu == pytest.approx(mean, abs=1e-5) and sigma == pytest.approx(var**0.5, abs=1e-5)


def test_ring_smoke(tmp_path):
    table = ring.main(["--out", str(tmp_path), "--smoke", "--no-progress"])
    saved = pd.read_csv(tmp_path / "results.csv")
    assert list(saved.divergence) == ["forward_kl", "reverse_kl", "js"] == list(table.divergence)
    shares = saved[[f"mode_{k}" for k in range(7)]]
    assert ((shares >= 0) & (shares <= 1)).all().all()
    assert saved.near_any_mode.to_numpy() == pytest.approx(shares.sum(axis=1).to_numpy())
    assert (tmp_path / "samples.png").stat().st_size > 0
