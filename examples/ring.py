r"""
Train a latent generative model on the ring of seven Gaussians embedded in 3-D (Roth et al.
2017) by forward KL, reverse KL and Jensen-Shannon with the f-divergence upper bound and
spread noise annealed from 1.0 to 0.1: section 4.1 and Figure 3 of Zhang, Bird, Habib, Xu,
Barber (2019).

The model is :math:`z \sim \mathcal{N}(0, I_2)`, :math:`x = \mu_\theta(z)` (a deterministic
ReLU MLP decoder, observed through spread noise of the same width), the guide a normalizing-flow
encoder :math:`q_\phi(z \mid y)` (:class:`~pyro_fdiv.models.toy.FlowEncoder`) and the bound
taken between importance-weighted joints with ``K = 10`` latents per ``y`` for forward KL and
Jensen-Shannon: both tighten the bound where the posterior of a decoder that maps regions of
``z`` onto separate modes is far from Gaussian. Reverse KL uses the paper's Gaussian encoder
and bound (``K = 1``). Jensen-Shannon's bound saturates where the encoder lags behind the
model, so its encoder takes one step per model step on the inclusive KL
(``guide_f="reverse_kl"``), and its learning rate decays tenfold. The settings are
:data:`RECIPES`; an option given on the command line overrides them for every divergence.

After training, 10,000 noise-free samples
:math:`x = \mu_\theta(z)` are assigned to the nearest mode; a mode is covered when it holds at
least 5% of them within three standard deviations (0.15), and at least 90% of all samples must
lie that close to some mode. ``results.csv`` has one row per divergence with the per-mode shares.

    python examples/ring.py --out results/ring
    python examples/ring.py --out /tmp/ring --smoke
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
from tqdm import tqdm

from pyro_fdiv.inference import FDivergenceBound, SpreadSchedule, make_step
from pyro_fdiv.models.toy import LatentGenerator, mode_shares, ring_data, ring_modes

DIVERGENCES = ["forward_kl", "reverse_kl", "js"]
MODE_SD = 0.05
_SHARED = {"encoder": "flow", "importance_samples": 10, "particles": 1}
_KL = {**_SHARED, "steps": 6000, "anneal_steps": 2000, "lr": 1e-3, "lr_final": 1.0}
#: Training settings per divergence; a command-line option overrides them for every divergence.
RECIPES = {
    "forward_kl": {**_KL, "guide_steps": 0, "guide_f": None},
    "reverse_kl": {  # the paper's Gaussian encoder and bound (K = 1)
        **_KL,
        "encoder": "gaussian",
        "importance_samples": 1,
        "particles": 10,
        "steps": 4000,
        "guide_steps": 0,
        "guide_f": None,
    },
    "js": {
        **_SHARED,
        "steps": 8000,
        "anneal_steps": 4000,
        "lr": 3e-4,
        "lr_final": 0.1,
        "guide_steps": 1,
        "guide_f": "reverse_kl",
    },
}


def recipe(f: str, args) -> dict:
    """:data:`RECIPES`'s settings for ``f`` with the options given on the command line."""
    settings = dict(RECIPES.get(f, RECIPES["reverse_kl"]))
    settings.update({k: getattr(args, k) for k in settings if getattr(args, k) is not None})
    return settings


def train(f: str, data: torch.Tensor, args, settings: dict):
    """:returns: the trained model, the bound per step and the seconds it took."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    net = LatentGenerator(data.shape[1], 2, args.hidden, encoder=settings["encoder"])
    objective = FDivergenceBound(
        f,
        data=data,
        spread=SpreadSchedule(args.spread_start, args.spread_end, settings["anneal_steps"]),
        num_particles=settings["particles"],
        num_importance_samples=settings["importance_samples"],
        guide_steps=settings["guide_steps"],
        guide_f=settings["guide_f"],
    )
    steps = settings["steps"]
    decay = settings["lr_final"] ** (1 / steps)  # lr -> lr * lr_final over the run
    optim = pyro.optim.ClippedAdam({"lr": settings["lr"], "lrd": decay, "clip_norm": math.inf})
    # compiled gradient steps once the spread stops annealing (eager while it anneals)
    step = make_step(net.model, net.guide, optim, objective, compile=args.compile)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc=f, disable=not args.progress):
        batch = data[torch.randint(len(data), (args.batch,))]
        losses.append(step(batch))
    return net, losses, time.perf_counter() - start


def plot(results: dict, data: torch.Tensor, centres: torch.Tensor, path: Path) -> None:
    """Model samples in the ring's plane (top) and latent codes of the data (bottom)."""
    basis = torch.linalg.svd(centres - centres.mean(0), full_matrices=False)[2][:2].T
    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 8), squeeze=False)
    colours = plt.cm.tab10(np.arange(len(centres)))
    labels = torch.cdist(data, centres).argmin(-1)
    for col, (f, (net, samples)) in enumerate(results.items()):
        flat = (samples - centres.mean(0)) @ basis
        ax = axes[0, col]
        ax.scatter(*((data - centres.mean(0)) @ basis).T, s=2, c="lightgrey", label="data")
        ax.scatter(*flat.T, s=1, alpha=0.3, c="C3", label="model x = mu(z)")
        ax.set_title(f"{f}: samples of p(x)")
        ax.set_aspect("equal")
        with torch.no_grad():
            codes = net.encoder.q(data).sample()
        axes[1, col].scatter(*codes.T, s=2, c=colours[labels])
        axes[1, col].set_title(f"{f}: latent codes z ~ q(z | x) of the data")
        axes[1, col].set_aspect("equal")
    axes[0, 0].legend(markerscale=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--divergences", nargs="+", default=DIVERGENCES)
    parser.add_argument("--steps", type=int, help="default: RECIPES")
    parser.add_argument("--anneal-steps", type=int, help="default: RECIPES")
    parser.add_argument("--spread-start", type=float, default=1.0)
    parser.add_argument("--spread-end", type=float, default=0.1)
    parser.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",")],
                        default=[256, 256, 256, 256])  # fmt: skip
    parser.add_argument("--num-data", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--particles", type=int, help="default: RECIPES")
    parser.add_argument(
        "--importance-samples",
        type=int,
        help="latents per y in the importance-weighted joint (1: the paper's); default: RECIPES",
    )
    parser.add_argument("--encoder", choices=["flow", "gaussian"], help="default: RECIPES")
    parser.add_argument("--lr", type=float, help="default: RECIPES")
    parser.add_argument("--lr-final", type=float, help="final lr / lr; default: RECIPES")
    parser.add_argument("--guide-steps", type=int, help="default: RECIPES")
    parser.add_argument("--guide-f", help="default: RECIPES")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="eager SVI steps"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # seconds: compiling would cost more than it saves
        args.steps, args.anneal_steps, args.hidden, args.num_samples = 20, 10, [16, 16], 500
        args.compile = False
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    dtype = torch.get_default_dtype()
    data, centres = ring_data(args.num_data, sd=MODE_SD).to(dtype), ring_modes().to(dtype)
    rows, results, curves = [], {}, {}
    for f in args.divergences:
        settings = recipe(f, args)
        net, losses, seconds = train(f, data, args, settings)
        samples, _ = net.sample(args.num_samples)
        shares = mode_shares(samples, centres, 3 * MODE_SD)
        row = {"divergence": f, "near_any_mode": shares.sum().item()}
        row.update({f"mode_{k}": v for k, v in enumerate(shares.tolist())})
        row["min_mode_share"] = shares.min().item()
        row["all_modes_covered"] = bool(shares.min() >= 0.05 and shares.sum() >= 0.9)
        row.update({"final_bound": float(np.mean(losses[-100:])), "seconds": seconds})
        row.update(settings)
        rows.append(row)
        results[f], curves[f] = (net, samples), losses
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    bounds = pd.DataFrame({f: pd.Series(curve) for f, curve in curves.items()})
    bounds.to_csv(args.out / "bounds.csv", index_label="step")
    plot(results, data, centres, args.out / "samples.png")
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(table)
    return table


if __name__ == "__main__":
    main()
