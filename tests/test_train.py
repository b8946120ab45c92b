"""``pyro_fdiv.train`` and ``pyro-fdiv train``: every objective trains, improves its bound, logs,
checkpoints and resumes exactly. The data are conftest's synthetic binarized-MNIST file (4×4
images from four noisy prototypes) in the layout of the real one: these tests need no data."""

import functools
import gzip

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

from pyro_fdiv.cli import main
from pyro_fdiv.serialization import content_digest
from pyro_fdiv.train import COUNTS, OBJECTIVES, RECIPES, TrainConfig, Trainer
from pyro_fdiv.util import rng_preserved

SETTINGS = {
    "elbo": {"num_elbo_samples": 1},
    "iwae": {"num_importance_samples": 4, "gradient_estimator": "dreg"},
    "bbalpha": {"num_importance_samples": 4, "alpha": 2.0},
    "avb": {"num_elbo_samples": 4},
    "jsa": {"num_proposals": 3},
    "fdiv": {"num_bound_samples": 2, "spread": (0.3, 0.3, 1)},
}


def _config(objective, data_root, out, **kwargs) -> TrainConfig:
    options = {
        "objective": objective,
        "architecture": "small",
        "batch_size": 25,  # 120 images: four batches of 25 and one of 20
        "lr": 0.01,
        "epochs": 2,
        "num_test": 40,
        "eval_samples": 100,
        "data_root": str(data_root),
        "out": str(out),
        "compile": False,  # eager: compiled training is tested on its own below
        **SETTINGS[objective],
        **kwargs,
    }
    return TrainConfig(**options)


def _bound(trainer: Trainer) -> float:
    """The objective's own loss on the whole training set (mean of 5 draws), RNG untouched."""
    x = trainer.train_x
    with rng_preserved(), torch.no_grad():
        if trainer.config.objective == "jsa":  # JSA's loss is no bound: the IS log-likelihood
            return -float(trainer.test_log_likelihood(50, x).mean())
        args = trainer._args(x, torch.arange(len(x)))
        model, guide = trainer.vae.model, trainer.vae.guide
        return float(np.mean([trainer.objective.loss(model, guide, *args) for _ in range(5)]))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_epochs_improve_the_bound(objective, data_root, tmp_path):
    trainer = Trainer(_config(objective, data_root, tmp_path, batch_size=10), progress=False)
    before = _bound(trainer)
    log = trainer.run()
    after = _bound(trainer)
    assert after < before - 0.1 * abs(before), (before, after)
    assert list(log.epoch) == [1, 2]
    assert np.isfinite(log[["train_objective", "test_log_lik", "test_log_lik_se"]]).all().all()
    if objective != "fdiv":  # (fdiv fits a Gaussian decoder; its Bernoulli reading may not)
        # better than every pixel a fair coin, 16 log ½: the model learned the prototypes
        assert log.test_log_lik.iloc[-1] > 16 * np.log(0.5) + 1


def _params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _assert_same(left, right, where="state") -> None:
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right), where
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            _assert_same(left[key], right[key], f"{where}[{key!r}]")
    elif isinstance(left, list | tuple):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert left == right, where


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_continues_exactly(objective, data_root, tmp_path):
    straight = Trainer(_config(objective, data_root, tmp_path / "a", epochs=3), progress=False)
    log = straight.run()
    expected = _params()

    Trainer(_config(objective, data_root, tmp_path / "b", epochs=1), progress=False).run()
    resumed = Trainer(_config(objective, data_root, tmp_path / "b", epochs=3), resume=True)
    assert resumed.epoch == 1
    again = resumed.run()
    columns = ["epoch", "train_objective", "test_log_lik", "test_log_lik_se"]
    pd.testing.assert_frame_equal(again[columns], log[columns], check_exact=True)
    params = _params()
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(params[name], value), name
    if hasattr(straight.objective, "state_dict"):  # AVB's discriminator, JSA's chains, schedule
        left, right = straight.objective.state_dict(), resumed.objective.state_dict()
        _assert_same(left, right)


@pytest.mark.parametrize("objective", ["iwae", "fdiv"])
def test_compiled_training_resumes_exactly_and_agrees_with_eager(objective, data_root, tmp_path):
    """The default, compiled steps: a resumed run captures its program before its first step,
    so it takes the uninterrupted run's steps (the same graph; Inductor's kernels, compiled
    again in the resumed run, may round differently in the last bit, so: to 1e-12); and
    compiled training takes the eager steps' draws, so its log agrees with an eager run's to
    float rounding."""
    config = functools.partial(_config, objective, data_root, compile=True)
    straight = Trainer(config(tmp_path / "a", epochs=2), progress=False)
    log = straight.run()
    assert straight.step.programs or straight.objective._compiled.programs
    expected = _params()
    Trainer(config(tmp_path / "b", epochs=1), progress=False).run()
    again = Trainer(config(tmp_path / "b", epochs=2), resume=True, progress=False).run()
    columns = ["epoch", "train_objective", "test_log_lik", "test_log_lik_se"]
    pd.testing.assert_frame_equal(again[columns], log[columns], rtol=1e-12)
    for name, value in expected.items():
        torch.testing.assert_close(_params()[name], value, rtol=1e-12, atol=1e-12, msg=name)
    eager = Trainer(_config(objective, data_root, tmp_path / "c", epochs=2), progress=False).run()
    pd.testing.assert_frame_equal(eager[columns], log[columns], rtol=1e-4)


def test_resume_refuses_other_settings(data_root, tmp_path):
    Trainer(_config("iwae", data_root, tmp_path, epochs=1), progress=False).run()
    match = r"'num_importance_samples': \(4, 7\).*is num_particles, -k, for iwae"
    with pytest.raises(ValueError, match=match):
        Trainer(_config("iwae", data_root, tmp_path, num_importance_samples=7), resume=True)


def test_num_particles_sets_the_count_of_the_objective():
    for objective, count in COUNTS.items():
        config = TrainConfig(objective=objective, num_particles=3)
        assert getattr(config, count) == 3 and config.num_particles == 3
        others = set(COUNTS.values()) - {count}
        assert all(getattr(config, name) == 1 for name in others)
        assert "num_particles" not in config.comparable()
    assert TrainConfig(objective="jsa", num_proposals=5).num_particles == 5
    assert TrainConfig(objective="jsa", num_proposals=5, num_particles=5).num_proposals == 5
    with pytest.raises(ValueError, match=r"num_particles=3 sets num_proposals.*which is 5"):
        TrainConfig(objective="jsa", num_proposals=5, num_particles=3)
    assert set(COUNTS) == set(OBJECTIVES) == set(RECIPES)


#: What a format-2 checkpoint's digest covers.
checkpoint_entries = ("param_store", "optim", "objective", "objective_type", "rng", "extra")


def test_a_checkpoint_that_saved_num_particles_resumes(data_root, tmp_path):
    # settings saved before each count had its own name: num_particles was the objective's
    config = _config("jsa", data_root, tmp_path, epochs=1)
    Trainer(config, progress=False).run()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved = payload["extra"]["config"]
    saved["num_particles"] = saved.pop("num_proposals")
    payload["digest"] = content_digest(payload, checkpoint_entries)
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert Trainer(_config("jsa", data_root, tmp_path, epochs=2), resume=True).epoch == 1
    with pytest.raises(ValueError, match=r"'num_proposals': \(3, 2\)"):
        Trainer(_config("jsa", data_root, tmp_path, num_proposals=2), resume=True)


def test_cli_train_writes_log_checkpoint_and_images(data_root, tmp_path, capsys):
    argv = ["train", "--objective", "iwae", "-k", "3", "--epochs", "1", "--architecture", "small"]
    argv += [
        "--data",
        str(data_root),
        "--out",
        str(tmp_path),
        "--eval-samples",
        "5",
        "--no-compile",
    ]
    main(argv)
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log.columns) == [
        "epoch",
        "train_objective",
        "test_log_lik",
        "test_log_lik_se",
        "seconds",
    ]
    assert len(log) == 1
    for name in ("checkpoint.pt", "samples.png", "reconstructions.png"):
        assert (tmp_path / name).stat().st_size > 0
    main([*argv[:6], "2", *argv[7:], "--resume"])
    assert list(pd.read_csv(tmp_path / "log.csv").epoch) == [1, 2]
    assert "epoch" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "vimco"}, "objective"),
        ({"dataset": "cifar"}, "dataset"),
        ({"architecture": "huge"}, "architecture"),
        ({"num_particles": 0}, "num_particles"),
        ({"num_proposals": 0}, "num_proposals"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_missing_data_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="binarized_mnist"):
        Trainer(TrainConfig(data_root=str(tmp_path), out=str(tmp_path / "out")))


def _write_idx(path, array) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_is_binarized_afresh_each_epoch_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "mnist").mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(
            tmp_path / "mnist" / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 4, 4))
        )
        _write_idx(tmp_path / "mnist" / f"{split}-labels-idx1-ubyte.gz", np.zeros(n))
    config = {"dataset": "mnist", "num_importance_samples": 2, "batch_size": 10, "eval_samples": 5}
    trainer = Trainer(_config("iwae", tmp_path, tmp_path / "a", epochs=2, **config), progress=False)
    assert trainer.gray is not None and ((trainer.gray > 0) & (trainer.gray < 1)).any()
    first, second = trainer._epoch_data(), trainer._epoch_data()
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    # the test set is binarized once, with a fixed seed: the same in every run
    again = Trainer(_config("iwae", tmp_path, tmp_path / "b", **config), progress=False)
    assert torch.equal(trainer.test_x, again.test_x)
    assert set(trainer.test_x.unique().tolist()) == {0.0, 1.0}
    log = Trainer(
        _config("iwae", tmp_path, tmp_path / "c", epochs=2, **config), progress=False
    ).run()
    Trainer(_config("iwae", tmp_path, tmp_path / "d", epochs=1, **config), progress=False).run()
    resumed = Trainer(
        _config("iwae", tmp_path, tmp_path / "d", epochs=2, **config), resume=True
    ).run()
    assert resumed.train_objective.tolist() == log.train_objective.tolist()


def test_finished_run_resumes_with_its_trained_networks_and_is_not_overwritten(data_root, tmp_path):
    config = _config("avb", data_root, tmp_path, epochs=1)
    trainer = Trainer(config, progress=False)
    trainer.run()
    expected = trainer.test_log_likelihood(20)
    again = Trainer(config, resume=True, progress=False)
    assert len(again.run()) == 1  # nothing left to train
    # the restored networks, not freshly initialized ones, feed the implicit encoder's proposal
    torch.testing.assert_close(again.test_log_likelihood(20), expected, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(config, progress=False)
