"""
A sigmoid belief network (binary latent units) trained with joint stochastic approximation on
binarized MNIST: a model whose latents cannot be reparameterized.

Model and guide are ``pyro_fdiv.models.SBN``: 200 Bernoulli latents with a learned prior, a
linear (or, with ``--hidden-dim``, one-hidden-layer ``tanh``) decoder to 784 Bernoulli pixels,
and an amortized Bernoulli guide. ``pyro_fdiv.inference.JSA`` keeps one cached latent state
per training image (50,000 chains), moves the minibatch's chains with a Metropolis
independence sampler whose proposal is the guide (``--num-particles`` proposals per step), and
takes one Adam step on ``-log p(x, z) - log q(z | x)`` at the accepted states. Reparameterized
objectives cannot run here (``IWAE(gradient_estimator="dreg")`` raises a ``ValueError``, which
the script shows); score-function estimators can (``--methods jsa vimco`` also trains IWAE with
VIMCO baselines, ``num_particles + 1`` samples, on the same budget for context).

Reported in ``results.csv``: the test log-likelihood per image, estimated by importance
sampling with the guide as proposal (``--eval-samples`` samples per image, default 1,000, on
``--num-test`` test images, default all 10,000), with its standard error over images; the
same on 1,000 training images; the final acceptance rate of the chains; wall time.
``curve.csv`` and ``curve.png`` follow the test log-likelihood (500 images, 100 samples) and
the acceptance rate per epoch; ``samples.png`` shows images drawn from the model. Subsets are
a fixed random choice: the files are not shuffled (the first test images are bolder).

The data are read with NumPy from ``--data`` (default ``../shared/data/binarized_mnist/
binarized_mnist.npz`` next to the repository: keys ``train``, ``valid``, ``test``, uint8
arrays of shape ``(n, 784)``).

Usage::

    python examples/jsa_digits.py --out jsa_digits_out               # full run
    python examples/jsa_digits.py --out /tmp/jsa_smoke --smoke       # a few seconds
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from pyro_fdiv.data import fixed_subset
from pyro_fdiv.inference import IWAE, JSA
from pyro_fdiv.models.sbn import SBN

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "binarized_mnist" / "binarized_mnist.npz"


def load(path: Path, smoke: bool) -> dict[str, torch.Tensor]:
    """Binarized MNIST as tensors of the default dtype; the smoke run takes a small slice."""
    with np.load(path) as data:
        arrays = {split: data[split] for split in ("train", "valid", "test")}
    if smoke:
        arrays = {"train": arrays["train"][:300], "valid": arrays["valid"][:100],
                  "test": arrays["test"][:100]}  # fmt: skip
    dtype = torch.get_default_dtype()
    return {split: torch.from_numpy(a).to(dtype) for split, a in arrays.items()}


def evaluate(sbn: SBN, x: torch.Tensor, num_samples: int, batch: int = 100) -> tuple[float, float]:
    """Mean importance-sampling log-likelihood per image and its standard error."""
    values = torch.cat(
        [sbn.log_likelihood(x[i : i + batch], num_samples) for i in range(0, len(x), batch)]
    )
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def show_reparameterized_objective_fails(sbn: SBN, x: torch.Tensor) -> str:
    try:
        IWAE(num_particles=2, gradient_estimator="dreg").differentiable_loss(
            sbn.model, sbn.guide, x[:4]
        )
    except ValueError as error:
        return str(error).split(".")[0]
    return "no error"


def train(args, data: dict[str, torch.Tensor], method: str) -> tuple[SBN, dict, pd.DataFrame]:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    train_x = data["train"]
    num_data = len(train_x)
    sbn = SBN(784, args.z_dim, args.hidden_dim, name=method)
    with torch.no_grad():  # start the decoder bias at the pixels' log-odds
        mean = train_x.mean(0).clamp(1e-3, 1 - 1e-3)
        (sbn.decoder if args.hidden_dim is None else sbn.decoder[-1]).bias.copy_(
            mean.log() - (-mean).log1p()
        )
    if method == "jsa":
        loss = JSA(num_data=num_data, num_particles=args.num_particles)
    else:
        loss = IWAE(num_particles=args.num_particles + 1)  # the same number of model passes
    svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": args.lr}), loss=loss)
    curve_x = fixed_subset(data["test"], 500)
    rows = []
    seconds = 0.0  # training time, evaluations excluded
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(num_data)
        losses = []
        batches = range(0, num_data, args.batch_size)
        for i in tqdm(batches, desc=f"{method} epoch {epoch}", leave=False):
            idx = order[i : i + args.batch_size]
            losses.append(svi.step(train_x[idx], idx, num_data))
        seconds += time.perf_counter() - start
        test_ll, _ = evaluate(sbn, curve_x, 100)
        row = {
            "method": method,
            "epoch": epoch,
            "seconds": seconds,
            "loss_per_image": float(np.mean(losses)) / num_data,
            "test_ll_500x100": test_ll,
        }
        if method == "jsa":
            row["acceptance_rate"] = loss.acceptance_rate["local"]
        rows.append(row)
        print(
            f"{method} epoch {epoch}: test log-lik (500 images, K=100) {test_ll:.2f}"
            + (f", acceptance {row['acceptance_rate']:.3f}" if method == "jsa" else "")
            + f", {seconds:.0f} s",
            flush=True,
        )
    return sbn, {"seconds": rows[-1]["seconds"], "loss": loss}, pd.DataFrame(rows)


def plot(curve: pd.DataFrame, sbn: SBN, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for method, part in curve.groupby("method"):
        axes[0].plot(part.epoch, part.test_ll_500x100, marker="o", label=method)
    axes[0].set(xlabel="epoch", ylabel="test log-likelihood (nats)", title="500 images, K=100")
    axes[0].legend()
    jsa = curve[curve.method == "jsa"]
    if len(jsa):
        axes[1].plot(jsa.epoch, jsa.acceptance_rate, marker="o")
    axes[1].set(xlabel="epoch", ylabel="acceptance rate", title="JSA chains", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    with torch.no_grad():
        z = torch.bernoulli(torch.sigmoid(sbn.prior_logits).expand(64, -1))
        images = torch.sigmoid(sbn.decoder(z)).reshape(8, 8, 28, 28)
    grid = images.permute(0, 2, 1, 3).reshape(8 * 28, 8 * 28).numpy()
    plt.imsave(out / "samples.png", grid, cmap="gray")


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("jsa_digits_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny data and model: seconds")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--z-dim", type=int, default=200)
    parser.add_argument("--hidden-dim", type=int, default=None)
    parser.add_argument("--num-particles", type=int, default=4, help="JSA proposals per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=10_000)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["jsa", "vimco"],
        default=["jsa"],
        help="vimco: IWAE with VIMCO score-function baselines, for context",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.z_dim, args.eval_samples, args.num_test = 2, 20, 50, 100
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load(args.data, args.smoke)
    print(f"train {tuple(data['train'].shape)}, test {tuple(data['test'].shape)}; {args}")

    methods = list(dict.fromkeys(args.methods))
    results, curves, models = [], [], {}
    for method in methods:
        sbn, info, curve = train(args, data, method)
        models[method] = sbn
        curves.append(curve)
        start = time.perf_counter()
        test = fixed_subset(data["test"], args.num_test)
        test_ll, test_se = evaluate(sbn, test, args.eval_samples)
        train_subset = fixed_subset(data["train"], 1000)
        train_ll, train_se = evaluate(sbn, train_subset, args.eval_samples)
        row = {
            "method": method,
            "epochs": args.epochs,
            "train_seconds": info["seconds"],
            "test_ll": test_ll,
            "test_ll_se": test_se,
            "num_test": len(test),
            "eval_samples": args.eval_samples,
            "train_ll": train_ll,
            "train_ll_se": train_se,
            "num_train_eval": len(train_subset),
            "eval_seconds": time.perf_counter() - start,
        }
        if method == "jsa":
            row["acceptance_rate"] = info["loss"].acceptance_rate["local"]
            row["reparameterized_objective"] = show_reparameterized_objective_fails(
                sbn, data["train"]
            )
        results.append(row)
        print(
            f"{method}: test log-likelihood {test_ll:.2f} ± {test_se:.2f} nats "
            f"({len(test)} images, K={args.eval_samples}), train ({len(train_subset)} images) "
            f"{train_ll:.2f}"
        )
    table = pd.DataFrame(results)
    curve = pd.concat(curves, ignore_index=True)
    table.to_csv(args.out / "results.csv", index=False)
    curve.to_csv(args.out / "curve.csv", index=False)
    plot(curve, models[methods[0]], args.out)
    if "reparameterized_objective" in table:
        message = table.reparameterized_objective[0]
        print(f"IWAE(gradient_estimator='dreg') on this model: {message}")
    print(table.drop(columns=["reparameterized_objective"], errors="ignore").to_string(index=False))
    print(f"written: {args.out / 'results.csv'}, curve.csv, curve.png, samples.png")
    return table


if __name__ == "__main__":
    main()
