"""
The objective comparison on binarized MNIST: every objective trains the same VAE for the same
number of epochs, then each model's test log-likelihood is estimated with K = 5,000 importance
samples per image (Burda et al. 2016).

Methods (``--methods``, default all): ``elbo`` (Pyro's Trace_ELBO, K=1), ``iwae-5``,
``iwae-50`` (IWAE, reparameterization gradient as in the paper), ``bbalpha-0.5``,
``bbalpha-2`` (BB-α, K=50), ``avb`` (implicit encoder, adaptive contrast, K=8 guide samples),
``jsa`` (Metropolis independence chains cached per image, 5 proposals per step) and
``fdiv-rkl`` (the reverse-KL f-divergence upper bound, Gaussian decoder with spread noise
annealed 0.5 → 0.1 over the first two epochs; evaluated as a Bernoulli model of the
decoder's means).

Model: ``VAE(**ARCHITECTURES["iwae"])``, 784-200-200-50 with tanh (Burda et al.'s one-stochastic-
layer model); Adam, lr 1e-3, batch 100. Each run lives in ``OUT/<method>/`` (``log.csv`` per
epoch, ``checkpoint.pt``, ``samples.png``, ``reconstructions.png``) and resumes from its
checkpoint when the script is run again, so an interrupted comparison continues where it
stopped. Outputs: ``OUT/results.csv`` (one row per method: final test log-likelihood with its
standard error, the last epoch's training objective, training seconds) and
``OUT/curves.png`` (test log-likelihood per epoch with K=500 on 1,000 test images).

Usage::

    python benchmarks/digits.py --out digits_out --epochs 5            # about an hour, 2 cores
    python benchmarks/digits.py --out /tmp/digits_smoke --smoke        # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from pyro_fdiv.data import fixed_subset
from pyro_fdiv.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

METHODS = {
    "elbo": {"objective": "elbo", "num_particles": 1},
    "iwae-5": {"objective": "iwae", "num_particles": 5},
    "iwae-50": {"objective": "iwae", "num_particles": 50},
    "bbalpha-0.5": {"objective": "bbalpha", "num_particles": 50, "alpha": 0.5},
    "bbalpha-2": {"objective": "bbalpha", "num_particles": 50, "alpha": 2.0},
    "avb": {"objective": "avb", "num_particles": 8},
    "jsa": {"objective": "jsa", "num_particles": 5},
    "fdiv-rkl": {"objective": "fdiv", "num_particles": 1, "f": "reverse_kl"},
}


def config(method: str, args: argparse.Namespace) -> TrainConfig:
    options = dict(METHODS[method])
    if options["objective"] == "fdiv":
        options["spread"] = (0.5, 0.1, 2)  # fixed, so that a run can be extended by resuming
    return TrainConfig(
        dataset="binarized-mnist",
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        data_root=args.data,
        num_train=args.num_train,
        num_test=args.num_curve,
        eval_samples=args.curve_samples,
        out=str(args.out / method),
        **options,
    )


def run(method: str, args: argparse.Namespace) -> dict:
    trainer = Trainer(config(method, args), resume=True, progress=not args.quiet)
    log = trainer.run()
    trainer.save_images()
    name = f"final_epoch{trainer.epoch}_k{args.eval_samples}_n{args.num_test}.csv"
    final = Path(trainer.out) / name
    if final.exists():  # evaluated by an earlier invocation
        values = torch.tensor(pd.read_csv(final)["log_lik"].to_numpy())
    else:
        start = time.perf_counter()
        x = fixed_subset(trainer.test_x, args.num_test, seed=4321)  # not the curves' subset
        values = trainer.test_log_likelihood(args.eval_samples, x)
        pd.DataFrame({"log_lik": values.numpy()}).to_csv(final, index=False)
        print(f"{method}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    last = log.iloc[-1]
    return {
        "method": method,
        "objective": trainer.config.objective,
        "num_particles": trainer.config.num_particles,
        "epochs": int(last.epoch),
        "test_log_lik": float(values.mean()),
        "test_log_lik_se": float(values.std() / math.sqrt(len(values))),
        "num_test": len(values),
        "eval_samples": args.eval_samples,
        "train_objective": float(last.train_objective),
        "train_seconds": float(last.seconds),
    }


def plot(args: argparse.Namespace, methods: list[str]) -> None:
    logs = {method: pd.read_csv(args.out / method / "log.csv") for method in methods}
    finals = np.array([log.test_log_lik.iloc[-1] for log in logs.values()])
    # the axis spans the methods within 100 nats of the median; others are named as off scale
    inside = finals[finals > np.median(finals) - 100]
    low, high = inside.min() - 40, inside.max() + 10
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, log in logs.items():
        last = log.test_log_lik.iloc[-1]
        label = method if last >= low else f"{method} (off scale, last {last:.0f})"
        ax.plot(log.epoch, log.test_log_lik, marker="o", label=label)
    ax.set_ylim(low, high)
    ax.set(
        xlabel="epoch",
        ylabel="test log-likelihood (nats)",
        title=f"binarized MNIST, {args.num_curve} test images, K={args.curve_samples}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=os.environ.get("PYRO_FDIV_DATA", str(SHARED_DATA)))
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=2000, help="images for the final K")
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--num-curve", type=int, default=1000)
    parser.add_argument("--curve-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_train, args.num_test = 2, 200, 20
        args.eval_samples, args.num_curve, args.curve_samples = 50, 20, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        rows.append(run(method, args))
        table = pd.DataFrame(rows)
        table.to_csv(args.out / "results.csv", index=False)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"), flush=True)
    plot(args, methods)
    settings = {k: str(v) for k, v in vars(args).items()}
    pd.Series(settings).to_csv(args.out / "settings.csv", header=False)
    return table


if __name__ == "__main__":
    main()
