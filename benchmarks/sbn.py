"""
JSA against VIMCO and RWS on sigmoid belief networks (binarized MNIST), the comparison of Ou &
Song (2020) at a budget a small CPU machine can run.

Architectures (``--archs``, default all): ``linear`` (200 Bernoulli latents, linear decoder
and guide: ``SBN(784, 200)``), ``two-layer`` (200 + 200 latents, z2 -> z1 -> x, every layer
linear: ``TwoLayerSBN(784, 200, 200)``) and ``nonlinear`` (200 latents, one tanh hidden layer
of 200 units in decoder and guide: ``SBN(784, 200, hidden_dim=200)``).

Methods (``--methods``, default all), with the same settings (batch 50, Adam lr 3e-4, the same
epochs and so the same gradient steps, ``--num-particles`` K = 10 fresh guide draws per image
and step):

- ``jsa``: :class:`~pyro_fdiv.inference.JSA`, one cached chain per training image, K
  Metropolis independence proposals per step from the guide; the cache is switched on after
  60% of the steps (``warmup_without_cache``: before that, every chain restarts from a guide
  draw), as in the JSA paper.
- ``vimco``: :class:`~pyro_fdiv.inference.IWAE` with K particles: the guide's Bernoulli sites
  cannot be reparameterized, so its gradient is the score-function estimator with VIMCO's
  leave-one-out baselines (Mnih & Rezende 2016).
- ``rws``: :class:`~pyro_fdiv.inference.ReweightedWakeSleep` with K particles, wake-θ and
  wake-φ with per-image self-normalized weights.

Every run lives in ``OUT/runs/<arch>/<method>/``: ``log.csv`` (one row per epoch: steps,
training seconds, the objective's loss per image, the test log-likelihood on ``--num-curve``
images with ``--curve-samples`` importance samples, JSA's acceptance rate), ``checkpoint.pt``
(param store, Adam, JSA's chains, RNGs; written after every epoch, so running the script
again resumes each run where it stopped, and a run with more ``--epochs`` extends it) and
``test_log_lik.csv`` (the final per-image test log-likelihood, importance sampling with the
guide as proposal, ``--eval-samples`` samples on ``--num-test`` fixed test images, the same
images for every run). Tables: ``OUT/results.csv`` (mean and standard error per method and
architecture, training and evaluation seconds), ``OUT/paired.csv`` (JSA − VIMCO and JSA − RWS
per image on the same images: mean, standard error, fraction of images where JSA is ahead),
``OUT/tables.md`` (both, as Markdown), ``OUT/curves.png``.

``--budget`` caps each run's training seconds (checked after each epoch; a capped run stops
with fewer steps than the others, which ``results.csv`` shows in ``steps``).

Usage::

    python benchmarks/sbn.py --out docs/experiments/sbn --num-train 10000 --epochs 30
    python benchmarks/sbn.py --out /tmp/sbn_smoke --smoke        # seconds
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
import pyro
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from pyro_fdiv import checkpoint
from pyro_fdiv.data import fixed_subset, load_binarized_mnist
from pyro_fdiv.inference import IWAE, JSA, ReweightedWakeSleep
from pyro_fdiv.models.sbn import SBN, TwoLayerSBN

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

METHODS = ("jsa", "vimco", "rws")
ARCHS = ("linear", "two-layer", "nonlinear")
#: JSA's cache is switched on after this fraction of the steps (the JSA paper's 60%).
CACHE_AFTER = 0.6
#: seeds of the fixed test subsets (final evaluation, curves) and of the training subset
TEST_SEED, CURVE_SEED, TRAIN_SEED = 4321, 1234, 99


def build_model(arch: str, x_dim: int, z_dim: int) -> SBN | TwoLayerSBN:
    """The SBN of ``arch`` with ``z_dim`` units per stochastic (and hidden) layer."""
    if arch == "linear":
        return SBN(x_dim, z_dim, name=arch)
    if arch == "two-layer":
        return TwoLayerSBN(x_dim, z_dim, z_dim, name=arch)
    if arch == "nonlinear":
        return SBN(x_dim, z_dim, hidden_dim=z_dim, name=arch)
    raise ValueError(f"Expected arch in {ARCHS}, actual {arch!r}")


def output_bias(sbn: SBN | TwoLayerSBN) -> torch.Tensor:
    """The bias of the layer that gives the pixels' logits."""
    if isinstance(sbn, TwoLayerSBN):
        return sbn.decoder["x"].bias
    layer = sbn.decoder if sbn.hidden_dim is None else sbn.decoder[-1]
    return layer.bias


def build_objective(method: str, num_data: int, num_particles: int, total_steps: int):
    """The loss for ``SVI``: JSA with ``num_particles`` proposals (cache on after 60% of
    ``total_steps``), VIMCO (IWAE) or RWS with ``num_particles`` particles."""
    if method == "jsa":
        warmup = int(CACHE_AFTER * total_steps)
        return JSA(num_data=num_data, num_particles=num_particles, warmup_without_cache=warmup)
    if method == "vimco":
        return IWAE(num_particles=num_particles)
    if method == "rws":
        return ReweightedWakeSleep(num_particles=num_particles)
    raise ValueError(f"Expected method in {METHODS}, actual {method!r}")


def evaluate(sbn, x: torch.Tensor, num_samples: int, batch: int = 100, desc: str | None = None):
    """Per-image importance-sampling log-likelihood, ``num_samples`` guide draws each."""
    chunks = range(0, len(x), batch)
    bar = tqdm(chunks, desc=desc, leave=False, disable=desc is None)
    return torch.cat([sbn.log_likelihood(x[i : i + batch], num_samples) for i in bar])


def steps_per_epoch(num_data: int, batch_size: int) -> int:
    return math.ceil(num_data / batch_size)


def train(arch: str, method: str, data: dict, args: argparse.Namespace) -> tuple:
    """Train one run for ``args.epochs`` epochs, resuming from its checkpoint; returns the model,
    the objective and the per-epoch log."""
    out = args.out / "runs" / arch / method
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checkpoint.pt"
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    train_x = data["train"]
    num_data = len(train_x)
    per_epoch = steps_per_epoch(num_data, args.batch_size)
    sbn = build_model(arch, train_x.shape[1], args.z_dim)
    with torch.no_grad():  # start the pixels' logits at the training means' log-odds
        mean = train_x.mean(0).clamp(1e-3, 1 - 1e-3)
        output_bias(sbn).copy_(mean.log() - (-mean).log1p())
    loss = build_objective(method, num_data, args.num_particles, args.epochs * per_epoch)
    optim = pyro.optim.Adam({"lr": args.lr})
    svi = SVI(sbn.model, sbn.guide, optim, loss=loss)
    rows: list[dict] = []
    epoch, seconds = 0, 0.0
    if path.exists():
        extra = checkpoint.load(path, optim=optim, objective=loss if method == "jsa" else None,
                                modules=sbn.pyro_modules())  # fmt: skip
        sbn.sync_params()
        epoch, seconds, rows = int(extra["epoch"]), float(extra["seconds"]), list(extra["log"])
    curve_x = data["curve"]
    while epoch < args.epochs and not (args.budget and seconds >= args.budget):
        start = time.perf_counter()
        order = torch.randperm(num_data)
        losses = []
        bar = tqdm(range(per_epoch), desc=f"{arch}/{method} epoch {epoch + 1}", leave=False,
                   disable=args.quiet)  # fmt: skip
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            losses.append(svi.step(train_x[idx], idx, num_data))
        seconds += time.perf_counter() - start
        epoch += 1
        row = {
            "epoch": epoch,
            "step": epoch * per_epoch,
            "seconds": seconds,
            "loss_per_image": float(np.mean(losses)) / num_data,
            "curve_log_lik": float(evaluate(sbn, curve_x, args.curve_samples).mean()),
            "acceptance_rate": loss.acceptance_rate["local"] if method == "jsa" else math.nan,
        }
        rows.append(row)
        pd.DataFrame(rows).to_csv(out / "log.csv", index=False)
        extra = {"epoch": epoch, "seconds": seconds, "log": rows}
        checkpoint.save(path, optim=optim, objective=loss if method == "jsa" else None,
                        extra=extra)  # fmt: skip
        if not args.quiet:
            tqdm.write(
                f"{arch}/{method} epoch {epoch}: curve log-lik {row['curve_log_lik']:.2f}, "
                f"{seconds:.0f} s"
            )
    return sbn, rows


def final_log_lik(arch: str, method: str, sbn, data: dict, args: argparse.Namespace):
    """The per-image test log-likelihood of a trained run (cached in ``test_log_lik.csv``,
    recomputed when the run was trained further or the evaluation settings changed)."""
    out = args.out / "runs" / arch / method
    path = out / "test_log_lik.csv"
    epochs = int(pd.read_csv(out / "log.csv").epoch.iloc[-1])
    if path.exists():
        table = pd.read_csv(path)
        if (
            len(table) == len(data["test"])
            and int(table.epoch.iloc[0]) == epochs
            and int(table.eval_samples.iloc[0]) == args.eval_samples
        ):
            return torch.tensor(table.log_lik.to_numpy()), float(table.eval_seconds.iloc[0])
    torch.manual_seed(args.seed + 1)
    start = time.perf_counter()
    desc = None if args.quiet else f"{arch}/{method} test K={args.eval_samples}"
    values = evaluate(sbn, data["test"], args.eval_samples, desc=desc)
    spent = time.perf_counter() - start
    pd.DataFrame(
        {
            "image": data["test_index"].numpy(),
            "log_lik": values.numpy(),
            "epoch": epochs,
            "eval_samples": args.eval_samples,
            "eval_seconds": spent,
        }
    ).to_csv(path, index=False)
    return values, spent


def paired(values: dict, arch: str) -> list[dict]:
    """JSA − VIMCO and JSA − RWS per image: mean, standard error, fraction JSA ahead."""
    rows = []
    for other in ("vimco", "rws"):
        if (arch, "jsa") not in values or (arch, other) not in values:
            continue
        diff = values[arch, "jsa"] - values[arch, other]
        rows.append(
            {
                "arch": arch,
                "difference": f"jsa - {other}",
                "mean": float(diff.mean()),
                "se": float(diff.std() / math.sqrt(len(diff))),
                "jsa_ahead": float((diff > 0).double().mean()),
                "num_test": len(diff),
            }
        )
    return rows


def plot(args: argparse.Namespace, archs: list[str], methods: list[str]) -> None:
    """Curves per architecture (top) and JSA's lead over the others on the same images
    (bottom, when JSA ran)."""
    rows = 2 if "jsa" in methods and len(methods) > 1 else 1
    fig, axes = plt.subplots(
        rows, len(archs), figsize=(4.2 * len(archs), 3.2 * rows), squeeze=False
    )
    cache_on = CACHE_AFTER * args.epochs * steps_per_epoch(args.num_data, args.batch_size)
    for col, arch in enumerate(archs):
        logs = {m: pd.read_csv(args.out / "runs" / arch / m / "log.csv") for m in methods}
        ax = axes[0, col]
        for method, log in logs.items():
            ax.plot(log.step, log.curve_log_lik, marker=".", label=method)
        ax.set(xlabel="gradient steps", ylabel="test log-likelihood (nats)", title=arch)
        if rows == 2:
            ax = axes[1, col]
            for method, log in logs.items():
                if method != "jsa":
                    lead = logs["jsa"].curve_log_lik - log.curve_log_lik
                    ax.plot(log.step, lead, marker=".", label=f"jsa - {method}")
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set(xlabel="gradient steps", ylabel="JSA's lead (nats)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if "jsa" in methods:
                ax.axvline(cache_on, color="gray", ls=":", lw=1)
    fig.suptitle(
        f"binarized MNIST SBNs: {args.num_curve} test images, K={args.curve_samples} "
        "(dotted: JSA's cache on)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    plt.close(fig)


def tightness(sbn, x: torch.Tensor, sizes: list[int], seed: int) -> list[dict]:
    """Mean IS estimate on ``x`` for each number of samples in ``sizes``: how much the
    estimate still rises with K, i.e. how loose the guide leaves it."""
    rows = []
    for k in sizes:
        torch.manual_seed(seed)
        rows.append({"eval_samples": k, "log_lik": float(evaluate(sbn, x, k).mean())})
    return rows


def markdown(results: pd.DataFrame, pairs: pd.DataFrame) -> str:
    order = {"index": [a for a in ARCHS if a in set(results.arch)]}
    order["columns"] = [m for m in METHODS if m in set(results.method)]
    wide = results.assign(
        cell=[f"{m:.2f} ± {s:.2f}" for m, s in zip(results.test_log_lik, results.se, strict=True)]
    ).pivot(index="arch", columns="method", values="cell")
    wide = wide.reindex(**order)
    times = results.assign(cell=[f"{t:.0f}" for t in results.train_seconds]).pivot(
        index="arch", columns="method", values="cell"
    )
    times = times.reindex(**order)
    lines = ["Test log-likelihood (nats, mean ± standard error over images):", ""]
    lines += [wide.to_markdown(), "", "Training seconds:", "", times.to_markdown(), ""]
    if len(pairs):
        table = pairs.assign(
            **{
                "mean ± se": [
                    f"{m:+.2f} ± {s:.2f}" for m, s in zip(pairs["mean"], pairs.se, strict=True)
                ],
                "JSA ahead on": [f"{f:.0%}" for f in pairs.jsa_ahead],
            }
        )[["arch", "difference", "mean ± se", "JSA ahead on", "num_test"]]
        lines += ["Paired differences on the same test images (nats):", ""]
        lines += [table.to_markdown(index=False), ""]
    return "\n".join(lines)


def load_data(args: argparse.Namespace) -> dict:
    train = load_binarized_mnist(args.data, "train")
    test = load_binarized_mnist(args.data, "test")
    generator = torch.Generator().manual_seed(TEST_SEED)
    test_index = torch.randperm(len(test), generator=generator)[: args.num_test]
    return {
        "train": fixed_subset(train, args.num_train, seed=TRAIN_SEED),
        "test": test[test_index],
        "test_index": test_index,
        "curve": fixed_subset(test, args.num_curve, seed=CURVE_SEED),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "experiments" / "sbn")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--budget", type=float, default=None, help="training seconds per run")
    parser.add_argument("--num-train", type=int, default=10_000, help="training subset size")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num-particles", type=int, default=10)
    parser.add_argument("--z-dim", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--num-curve", type=int, default=200)
    parser.add_argument("--curve-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=os.environ.get("PYRO_FDIV_DATA", str(SHARED_DATA)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--tightness",
        type=int,
        default=0,
        help="also estimate on this many test images with K = 100, 1,000 and 5,000 (tightness.csv)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.num_train, args.z_dim, args.num_particles = 2, 200, 8, 3
        args.num_test, args.eval_samples, args.num_curve, args.curve_samples = 20, 50, 20, 10
    for name in ("epochs", "batch_size", "num_particles", "z_dim", "num_test", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_particles < 2:
        parser.error("--num-particles must be >= 2 (RWS's and VIMCO's weights need two)")
    args.method_list = args.methods.split(",")
    args.arch_list = args.archs.split(",")
    for kind, given, allowed in (
        ("methods", args.method_list, METHODS),
        ("archs", args.arch_list, ARCHS),
    ):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            parser.error(f"unknown {kind} {unknown}; choose from {list(allowed)}")
    return args


def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args)
    args.num_data = len(data["train"])
    values, rows, pairs, tight = {}, [], [], []
    for arch in args.arch_list:
        for method in args.method_list:
            sbn, log = train(arch, method, data, args)
            values[arch, method], eval_seconds = final_log_lik(arch, method, sbn, data, args)
            v = values[arch, method]
            rows.append(
                {
                    "arch": arch,
                    "method": method,
                    "epochs": log[-1]["epoch"],
                    "steps": log[-1]["step"],
                    "test_log_lik": float(v.mean()),
                    "se": float(v.std() / math.sqrt(len(v))),
                    "num_test": len(v),
                    "eval_samples": args.eval_samples,
                    "train_seconds": log[-1]["seconds"],
                    "eval_seconds": eval_seconds,
                    "acceptance_rate": log[-1]["acceptance_rate"],
                }
            )
            pd.DataFrame(rows).to_csv(args.out / "results.csv", index=False)
            if args.tightness:
                x = data["test"][: args.tightness]
                for row in tightness(sbn, x, [100, 1000, 5000], args.seed + 2):
                    tight.append({"arch": arch, "method": method, "num_test": len(x), **row})
                pd.DataFrame(tight).to_csv(args.out / "tightness.csv", index=False)
        pairs += paired(values, arch)
    results, pair_table = pd.DataFrame(rows), pd.DataFrame(pairs)
    pair_table.to_csv(args.out / "paired.csv", index=False)
    (args.out / "tables.md").write_text(markdown(results, pair_table))
    plot(args, args.arch_list, args.method_list)
    settings = {k: str(v) for k, v in vars(args).items() if not k.endswith("_list")}
    pd.Series(settings).to_csv(args.out / "settings.csv", header=False)
    print(results.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if len(pair_table):
        print(pair_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return results, pair_table


if __name__ == "__main__":
    main()
