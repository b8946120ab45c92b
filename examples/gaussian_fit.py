r"""
Fit a Gaussian to a mixture of two Gaussians by forward KL, reverse KL and Jensen-Shannon, with
the f-divergence upper bound (:class:`~pyro_fdiv.inference.FDivergenceBound`) and the f-GAN lower
bound (:class:`~pyro_fdiv.inference.FGANBound`), and compare both with the exact optimum found by
quadrature: section 4.4, Table 2 and Figure 8 of Zhang, Bird, Habib, Xu, Barber (2019).

The target :math:`0.3\,\mathcal{N}(1, 0.1^2) + 0.7\,\mathcal{N}(2, 0.5^2)` has a known density,
so the bound uses it directly (no spread noise). The upper bound's model is the bivariate
Gaussian :math:`z \sim \mathcal{N}(0, 1)`, :math:`x \mid z \sim \mathcal{N}(b + az, s^2)` with
an MLP encoder (two hidden layers of 50); the lower bound's critic has two hidden layers of 64.
Jensen-Shannon fits of both bounds start from a short forward-KL warm start: from the initial
:math:`\mathcal{N}(0, 1.41^2)` the JS bound saturates at :math:`\tfrac12\log 2` (almost no model
sample lands where the data are) and its gradient vanishes.

    python examples/gaussian_fit.py --out results/gaussian_fit
    python examples/gaussian_fit.py --out /tmp/gf --smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import torch
from scipy.optimize import minimize
from torch import nn
from tqdm import tqdm

from pyro_fdiv.divergences import get_divergence
from pyro_fdiv.inference import FDivergenceBound, FGANBound, make_step
from pyro_fdiv.models.toy import BivariateGaussian, mlp, two_gaussians

DIVERGENCES = ["forward_kl", "reverse_kl", "js"]
GRID = torch.linspace(-8.0, 12.0, 20001, dtype=torch.float64)


def true_divergence(f: str, mu: float, sigma: float) -> float:
    r""":math:`D_f(p \| \mathcal{N}(\mu, \sigma^2))` by the trapezoid rule on a fine grid."""
    log_p = two_gaussians().log_prob(GRID)
    log_q = torch.distributions.Normal(mu, sigma).log_prob(GRID)
    return torch.trapezoid(log_q.exp() * get_divergence(f).f(log_p - log_q), GRID).item()


def exact_optimum(f: str) -> tuple[float, float, float]:
    """``(mu*, sigma*, D_f at the optimum)`` by Nelder-Mead on the quadrature."""
    result = minimize(
        lambda p: true_divergence(f, p[0], float(np.exp(p[1]))),
        x0=[1.7, np.log(0.6)],
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-10},
    )
    return float(result.x[0]), float(np.exp(result.x[1])), float(result.fun)


class Critic(nn.Module):
    """The f-GAN critic V(x): two hidden layers of 64 ReLU units."""

    def __init__(self):
        super().__init__()
        self.net = mlp([1, 64, 64, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, None])


def train(net, objective, steps, lr, batch, desc, progress=True, compile=True) -> list[float]:
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / steps)})
    guide = net.guide if isinstance(objective, FDivergenceBound) else (lambda x: None)
    # compiled gradient steps of both bounds (benchmarks/bench_objectives.py: 0.3-0.5x)
    step = make_step(net.model, guide, optim, objective, compile=compile)
    shape = torch.zeros(batch)  # the target is a distribution: the batch only sets the size
    return [step(shape) for _ in tqdm(range(steps), desc=desc, disable=not progress)]


def fit(method: str, f: str, args) -> tuple[BivariateGaussian, list[float], float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    net = BivariateGaussian()
    start = time.perf_counter()
    if f == "js" and args.warm_start:
        warm = FDivergenceBound("forward_kl", data=two_gaussians())
        desc = f"{method} {f} warm start"
        train(net, warm, args.warm_start, args.lr, args.batch, desc, False, args.compile)
    if method == "upper":
        objective = FDivergenceBound(f, data=two_gaussians(), num_particles=1)
    else:
        critic = Critic()
        objective = FGANBound(
            f,
            critic=critic,
            data=two_gaussians(),
            critic_optim=torch.optim.Adam(critic.parameters(), lr=args.critic_lr),
        )
    desc = f"{method} {f}"
    trace = train(
        net, objective, args.steps, args.lr, args.batch, desc, args.progress, args.compile
    )
    return net, trace, time.perf_counter() - start


def plot_bounds(traces: dict, optima: dict, path: Path) -> None:
    """Bound against iteration, lower bound left and upper bound right (the paper's Figure 8)."""
    fig, axes = plt.subplots(len(DIVERGENCES), 2, figsize=(9, 2.6 * len(DIVERGENCES)))
    for row, f in enumerate(DIVERGENCES):
        for col, method in enumerate(("lower", "upper")):
            ax = axes[row, col]
            trace = np.asarray(traces[method, f])
            ax.plot(trace, lw=0.4, alpha=0.5, color="C0")
            window = max(1, len(trace) // 50)
            smooth = np.convolve(trace, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, color="C0", label="bound")
            ax.axhline(optima[f], color="k", ls="--", lw=1, label="min D_f (quadrature)")
            ax.set_title(f"{f}, {method} bound", fontsize=9)
            ax.set_xlabel("iteration")
            lo, hi = np.percentile(trace, [1, 99])
            ax.set_ylim(min(lo, optima[f]) - 0.05, hi + 0.05)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--warm-start", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1000, help="samples per step")
    parser.add_argument("--lr", type=float, default=0.01, help="model and encoder Adam lr")
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="eager SVI steps"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # seconds: compiling would cost more than it saves
        args.steps, args.warm_start, args.batch, args.compile = 20, 10, 64, False
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    rows, traces, optima = [], {}, {}
    for f in DIVERGENCES:
        mu_star, sigma_star, d_star = exact_optimum(f)
        optima[f] = d_star
        for method in ("upper", "lower"):
            net, trace, seconds = fit(method, f, args)
            traces[method, f] = trace
            rows.append(
                {
                    "method": method,
                    "divergence": f,
                    "mu": net.mu,
                    "sigma": net.sigma,
                    "true_divergence_at_fit": true_divergence(f, net.mu, net.sigma),
                    "mu_star": mu_star,
                    "sigma_star": sigma_star,
                    "divergence_at_optimum": d_star,
                    "final_bound": float(np.mean(trace[-100:])),
                    "abs_error_mu": abs(net.mu - mu_star),
                    "abs_error_sigma": abs(net.sigma - sigma_star),
                    "warm_start_steps": args.warm_start if f == "js" else 0,
                    "seconds": seconds,
                }
            )
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    plot_bounds(traces, optima, args.out / "bounds.png")
    with pd.option_context("display.width", 160, "display.precision", 4):
        print(table.drop(columns=["seconds"]))
    return table


if __name__ == "__main__":
    main()
