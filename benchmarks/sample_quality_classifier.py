"""
Train (once) and cache the MNIST classifier of :mod:`pyro_fdiv.compare.sample_quality`, report
its test accuracy, and measure the "ceiling" rows of the sample-quality table: real images
scored as if they were samples.

Rows of ``OUT/ceiling.csv`` (each with ``--num`` images scored against the ``--num`` first
test images of a fixed random order):

* ``test vs test``: the test images against themselves (Fréchet distance 0, precision and
  recall 1: a check of the code, not of the classifier);
* ``train vs test``: as many training images, a real sample of the same distribution: the
  best any model can do at this number of samples;
* ``one image``: one test image repeated (one class covered, entropy 0, recall near 0);
* ``noise``: uniform pixel noise (the floor);
* with ``--vae-epochs N``: a VAE (``pyro_fdiv.train``, Pyro's ELBO, the IWAE architecture,
  dynamically binarized MNIST, ``N`` epochs, resumed from ``OUT/vae_elbo/``): its decoder
  means of ``--num`` prior draws (``VAE means``) and one Bernoulli draw of each
  (``VAE draws``);
* with ``--runs DIR ...``: any run directories of ``pyro_fdiv.train`` (``pyro-fdiv train``,
  ``benchmarks/digits.py``: a ``checkpoint.pt`` with its settings), each scored on the decoder
  means of ``--num`` prior draws, one row per directory name (e.g. forward KL, reverse KL,
  the VAE and AVB of the issue's f-divergence MNIST runs).

The classifier is cached at ``--cache`` (default ``$PYRO_FDIV_CACHE`` or
``~/.cache/pyro_fdiv/mnist_classifier.pt``); a second run loads it, so the script resumes
after the (few-minute) training. ``--epochs`` is the training budget. Also writes
``OUT/classifier.csv`` (test accuracy and training wall time, when it trains) and sample grids
``OUT/grid_<row>.png``.

Usage::

    python benchmarks/sample_quality_classifier.py --vae-epochs 5   # docs/experiments/...
    python benchmarks/sample_quality_classifier.py --out /tmp/sq_smoke --smoke   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch

from pyro_fdiv import checkpoint
from pyro_fdiv.compare.sample_quality import (
    classifier_outputs,
    default_cache_path,
    load_or_train_classifier,
    quality_table,
    sample_quality,
    save_sample_grid,
    train_classifier,
)
from pyro_fdiv.data import fixed_subset, load_mnist
from pyro_fdiv.train import TrainConfig, Trainer
from pyro_fdiv.util import rng_preserved

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="holds mnist/")
    parser.add_argument("--out", type=Path, default=REPO / "docs/experiments/sample_quality")
    parser.add_argument("--cache", type=Path, default=None, help="classifier state_dict file")
    parser.add_argument("--epochs", type=int, default=4, help="training budget (passes)")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached classifier")
    parser.add_argument("--num", type=int, default=10_000, help="images per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-epochs", type=int, default=0, help="0: no VAE rows")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="train run dirs")
    parser.add_argument(
        "--smoke", action="store_true", help="1,000 training images, 1 epoch, 200 per row"
    )
    return parser.parse_args(argv)


def accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits, _ = classifier_outputs(classifier, images)
    return (logits.argmax(-1) == labels).double().mean().item()


def decoder_means(trainer: Trainer, num: int, seed: int) -> torch.Tensor:
    """Decoder means (pixel probabilities) of ``num`` prior draws of a trained VAE."""
    with rng_preserved():
        torch.manual_seed(seed)
        return trainer.vae.sample(num).float().clamp(0, 1)


def vae_samples(args: argparse.Namespace) -> torch.Tensor:
    """Decoder means of ``args.num`` prior draws of a VAE trained (or resumed) for
    ``args.vae_epochs`` epochs."""
    config = TrainConfig(
        dataset="mnist",
        objective="elbo",
        epochs=args.vae_epochs,
        seed=args.seed,
        data_root=str(args.data),
        num_train=500 if args.smoke else None,
        num_test=100 if args.smoke else 1000,
        eval_samples=10 if args.smoke else 100,
        out=str(args.out / "vae_elbo"),
    )
    trainer = Trainer(config, resume=True)
    start = time.perf_counter()
    log = trainer.run()
    print(f"VAE: {trainer.epoch} epochs ({time.perf_counter() - start:.0f} s this run)")
    print(log.tail(1).to_string(index=False))
    return decoder_means(trainer, args.num, args.seed)


def run_samples(run: Path, args: argparse.Namespace) -> torch.Tensor:
    """Decoder means of ``args.num`` prior draws of the model saved in the run directory
    ``run`` of :mod:`pyro_fdiv.train`, rebuilt from the settings in its checkpoint."""
    extra = checkpoint.read(run / "checkpoint.pt")["extra"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in extra["config"].items() if k in fields}
    config = TrainConfig(
        **{**saved, "epochs": max(1, extra["epoch"]), "out": str(run), "data_root": str(args.data)}
    )
    trainer = Trainer(config, resume=True, progress=False)
    print(f"{run}: {config.objective} on {config.dataset}, {trainer.epoch} epochs")
    return decoder_means(trainer, args.num, args.seed)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    test_x, test_y = load_mnist(args.data, "test", dtype=torch.float32)
    train_x, train_y = load_mnist(args.data, "train", dtype=torch.float32)
    start, cached = time.perf_counter(), False
    if args.smoke:  # never touches the real cache
        classifier = train_classifier(train_x[:1000], train_y[:1000], epochs=1, seed=args.seed)
        args.num = min(args.num, 200)
    else:
        cache = args.cache or default_cache_path()
        cached = cache.is_file() and not args.retrain
        classifier = load_or_train_classifier(
            cache, args.data, epochs=args.epochs, seed=args.seed, retrain=args.retrain
        )
        print(f"classifier {'loaded from' if cached else 'trained and cached at'} {cache}")
    seconds = time.perf_counter() - start
    scored = 1000 if args.smoke else len(test_x)
    test_accuracy = accuracy(classifier, test_x[:scored], test_y[:scored])
    print(f"test accuracy {100 * test_accuracy:.2f}% on {scored} images ({seconds:.1f} s)")
    epochs = 1 if args.smoke else args.epochs
    if args.smoke or not cached:  # the training run's record is kept when the cache is used
        pd.DataFrame(
            [{"test_accuracy": test_accuracy, "seconds": seconds, "epochs": epochs}]
        ).to_csv(args.out / "classifier.csv", index=False)

    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(args.seed))
    reference = test_x[order[: args.num]]
    generator = torch.Generator().manual_seed(args.seed)
    rows = {
        "test vs test": reference,
        "train vs test": fixed_subset(train_x, args.num, seed=args.seed),
        "one image": reference[:1].expand(args.num, -1),
        "noise": torch.rand(args.num, 784, generator=generator),
    }
    if args.vae_epochs:
        means = vae_samples(args)
        rows["VAE means"] = means
        rows["VAE draws"] = torch.bernoulli(means, generator=generator)
    for run in args.runs:
        rows[run.name] = run_samples(run, args)
    _, reference_features = classifier_outputs(classifier, reference)
    results = {}
    for name, samples in rows.items():
        t0 = time.perf_counter()
        results[name] = sample_quality(
            samples, classifier, reference, test_features=reference_features
        )
        results[name]["seconds"] = time.perf_counter() - t0
        save_sample_grid(samples, args.out / f"grid_{name.replace(' ', '_')}.png", title=name)
    table = quality_table(results)
    table.to_csv(args.out / "ceiling.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=[f"p{c}" for c in range(10)]).round(4))
    return table


if __name__ == "__main__":
    main()
