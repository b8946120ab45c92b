"""``benchmarks/avb_gap.py``: the smoke run trains a VAE and AVB on the synthetic digits and
writes every table with the right form; AVB's schedule options reach the objective and are
restored with the run."""

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from pyro_fdiv import train as training

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "avb_gap.py"
spec = importlib.util.spec_from_file_location("avb_gap", SCRIPT)
avb_gap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(avb_gap)


@pytest.fixture(scope="module")
def smoke(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("avb_gap")
    summary, paired = avb_gap.main(["smoke", "--out", str(out), "--data", str(data_root)])
    return out, summary, paired


def test_smoke_tables(smoke):
    out, summary, paired = smoke
    measured = out / "measure"
    assert list(summary.columns) == ["quantity", "column", "vae", "vae_se", "avb", "avb_se"]
    rows = summary.set_index("column")
    for column in ("is_log_lik", "ais_log_lik", "loglik"):  # both runs
        assert math.isfinite(rows.loc[column, "vae"]) and math.isfinite(rows.loc[column, "avb"])
    for column in ("elbo_T", "kl_T256", "kl_fresh"):  # AVB only
        assert math.isfinite(rows.loc[column, "avb"]) and math.isnan(rows.loc[column, "vae"])
    for column in ("kl_full", "kl_jac", "elbo_jac"):  # both
        assert math.isfinite(rows.loc[column, "avb"]) and math.isfinite(rows.loc[column, "vae"])
    # the Gaussian encoder's change of variables is exact: its KL, up to Monte Carlo error
    vae = avb_gap.per_image_table(measured, "vae")
    assert ((vae.kl_jac - vae.kl_exact).abs() < 4 * vae.kl_jac_se + 1e-6).all()
    # the objective's KL is its two parts, and the ELBO its complement
    t = avb_gap.per_image_table(measured, "avb")
    assert len(t) == 6 and list(t.index) == list(range(6))
    assert (t.kl_T - t.kl_gauss_part_T - t.kl_t_part_T).abs().max() < 1e-3
    labels = set(zip(paired.difference, paired.run, strict=True))
    assert {("AIS - IS", "vae"), ("AIS - IS", "avb"), ("KL_jac - KL_T", "avb")} <= labels
    assert ("ais_log_lik: avb - vae", "avb") in labels
    assert (paired.n == 6).all()
    curve = pd.read_csv(measured / "fresh_avb.csv")
    assert list(curve.step) == [0, 2, 4]
    assert (measured / "kl_estimates.png").stat().st_size > 0
    # every chunk joined, none left behind
    assert not list((measured / "per_image").glob("*.*.csv"))


def test_smoke_resumes_from_its_files(smoke, data_root):
    """A second measurement reads the cached stages: the same tables."""
    out, summary, _ = smoke
    again, _ = avb_gap.summarize(out / "measure", ["vae", "avb"])
    pd.testing.assert_frame_equal(again, summary)


def test_schedule_options_reach_the_objective(smoke, data_root):
    out, _, _ = smoke
    options = {"adversary_steps": 3, "adversary_lr": 2e-4, "adversary_beta1": 0.5}
    saved = training.RECIPES["avb"]
    with avb_gap.avb_recipe(options):
        config = training.TrainConfig(objective="avb", num_particles=4)
        avb = training.build_objective(config, None, 1)
    assert training.RECIPES["avb"] is saved  # restored
    assert avb.num_adversary_steps == 3 and avb.num_particles == 4
    assert avb._make_optim.kwargs == {"lr": 2e-4, "betas": (0.5, 0.999)}
    # the smoke AVB run saved its options, and loading it rebuilds the objective from them
    trainer = avb_gap.load_run(out / "avb", str(data_root))
    assert trainer.epoch == 1 and trainer.objective.num_adversary_steps == 1
    # the discriminator's state came with it: 2 warm-up steps, then one per model step
    assert trainer.objective.num_adversary_updates == 2 + 2
