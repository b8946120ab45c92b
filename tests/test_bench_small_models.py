"""benchmarks/bench_small_models.py: each hand-written reference is the same model, guide and
IWAE bound as ours (equal losses for the same draws, step after step), and the harness runs."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.optim
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_small_models as bench_module

from pyro_fdiv.inference import IWAE


def _three_steps(step) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the logistic model's nested-bound warning
        return [step() for _ in range(3)]


@pytest.mark.parametrize("num_particles", [1, 64])
@pytest.mark.parametrize("name", ["eight_schools", "logistic", "hierarchical"])
def test_handwritten_equals_iwae(name, num_particles):
    # Same seed, same initial parameters: the hand-written step draws its noise (and the
    # logistic model's subsample) as the guide and the plate do, so the two losses agree at
    # every step, which also needs equal gradients and Adam updates on the steps before.
    bench = bench_module.build_bench(name)
    model, guide = bench.pyro_pair("test")
    with pyro.poutine.block():
        guide(*bench.args)  # the autoguide's prototype trace draws from the prior: before seeding
    loss = IWAE(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": bench.lr}), loss)
    handwritten = bench_module.handwritten_step(bench, num_particles, compiled=False)
    pyro.set_rng_seed(1)
    ours = _three_steps(lambda: svi.step(*bench.args))
    pyro.set_rng_seed(1)
    reference = _three_steps(handwritten)
    assert ours == pytest.approx(reference, rel=1e-10)
    assert len(set(ours)) == 3  # the parameters (or the draws) moved


def test_handwritten_vae_equals_iwae():
    # The VAE's reference is bench_vae_step's, reused; its guide creates no lazy parameters.
    bench = bench_module.build_bench("vae")
    model, guide = bench.pyro_pair("test_vae")
    loss = IWAE(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": bench.lr}), loss)
    handwritten = bench_module.handwritten_step(bench, 2, compiled=False)  # draws its init
    pyro.set_rng_seed(1)
    ours = _three_steps(lambda: svi.step(*bench.args))
    pyro.set_rng_seed(1)
    reference = _three_steps(handwritten)
    assert ours == pytest.approx(reference, rel=1e-10)


def test_generic_vae_loss_equals_bench_vae_step():
    # The functional form that the whole-step compiled reference differentiates is the
    # bench_vae_step loss on the same parameters and draws.
    bench = bench_module.build_bench("vae")
    model, guide = bench.pyro_pair("test_vae_loss")
    pyro.set_rng_seed(2)
    functional = bench.loss(bench.init_params(), 3)
    pyro.set_rng_seed(2)
    svi = pyro.infer.SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.0}),
        IWAE(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
    )
    assert svi.evaluate_loss(*bench.args) == pytest.approx(functional.item(), rel=1e-10)


def test_smoke_run_and_resume(tmp_path):
    # One round of one step of the eager methods on every model (the compiled ones take
    # seconds of Inductor compilation each), a JitTrace_ELBO cell, the CSV, and a resume.
    out = tmp_path / "small"
    argv = ["--smoke", "--particles", "1", "--out", str(out), "--models", "eight_schools"]
    argv += ["logistic", "hierarchical", "vae", "--methods", "handwritten", "iwae", "renyi"]
    table = bench_module.main([*argv, "--no-memory"])
    assert set(table.model) == set(bench_module.MODELS)
    assert (table[table.method == "handwritten"].ratio == 1.0).all()
    assert table.step_ms.notna().all()
    saved = (out.with_suffix(".csv")).read_text()
    resumed = bench_module.main([*argv, "--resume", "--models", "eight_schools"])
    assert len(resumed) == len(table)  # every block was kept, none rerun
    assert out.with_suffix(".csv").read_text() == saved


def test_numpyro_column_runs_or_is_skipped(capsys):
    # With jax and numpyro installed (the bench extra) the column has a step time and no peak
    # memory; without them (CI) it is skipped with a printed message.
    argv = ["--smoke", "--particles", "1", "--models", "eight_schools"]
    table = bench_module.main([*argv, "--methods", "handwritten", "numpyro"])
    rows = table[table.method == "numpyro"]
    if bench_module._numpyro_available():
        assert len(rows) == 1
        assert rows.step_ms.notna().all() and rows.first_s.notna().all()
        assert rows.peak_mib.isna().all()  # n/a: see NUMPYRO_PEAK_NOTE
        assert "numpyro peak memory: n/a" in capsys.readouterr().out
    else:
        assert rows.empty
        assert "numpyro: not installed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "num_particles", "draws"),
    [
        ("eight_schools", 1, 2000),
        ("eight_schools", 64, 1000),
        ("logistic", 64, 1000),
        ("hierarchical", 64, 1000),
        ("vae", 8, 60),
    ],
)
def test_numpyro_loss_is_ours(name, num_particles, draws):
    # The NumPyro column computes the same bound: at the same initial parameters NumPyro's
    # RenyiELBO(0) loss and the reference's negated IWAE bound have the same mean (4 standard
    # errors; the draws are seeded, so the test is deterministic).
    pytest.importorskip("numpyro")
    bench = bench_module.build_bench(name)
    pyro.set_rng_seed(0)
    params = bench.init_params()
    with torch.no_grad():
        ours = np.array([bench.loss(params, num_particles).item() for _ in range(draws)])
    theirs = bench_module.numpyro_initial_losses(bench, num_particles, draws)
    assert theirs.shape == (draws,) and np.isfinite(theirs).all()
    standard_error = math.sqrt(ours.var(ddof=1) / draws + theirs.var(ddof=1) / draws)
    assert abs(ours.mean() - theirs.mean()) < 4 * standard_error


def test_unknown_model_and_method_raise():
    with pytest.raises(ValueError, match="Expected model"):
        bench_module.build_bench("radon")
    with pytest.raises(ValueError, match="Expected method"):
        bench_module.make_method(bench_module.build_bench("eight_schools"), "svgd", 1)
