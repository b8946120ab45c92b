"""
Adversarial variational Bayes against a VAE on the four 2x2 binary images of Mescheder et al.
(2017), section 5.2 (its Table 1 and Figure 6).

The data are the four one-hot 2x2 images, z in R^2 with a standard normal prior, and a
Bernoulli decoder; the best possible log-likelihood is -log 4 = -1.386 per image. The VAE's
encoder is a diagonal Gaussian; AVB's is a neural sampler z = g(x, eps) with no density,
trained with ``pyro_fdiv.inference.AVB``. Both use the same decoder architecture.

Reported per image (averaged over the four), in ``results.csv``:

* ``log_lik``: importance-sampling estimate of log p(x) with ``--eval-samples`` (default 10,000)
  samples per image from a defensive proposal 0.5 N(m, S) + 0.5 p(z), where (m, S) are the
  mean and covariance of 10,000 encoder samples for that image (AVB's encoder has no density;
  the same proposal is used for the VAE so both are measured alike); ``log_lik_se`` its
  standard error (delta method). ``log_lik_own_q`` uses the VAE's own encoder as proposal.
* ``recon_error``: mean binary cross-entropy per pixel between an image and its reconstruction
  (decoder logits at a sample from the encoder), the paper's "reconstruction error".
* ``elbo``: the VAE's exact-density ELBO (Monte Carlo); AVB's estimate from its discriminator.
* ``kl_agg``: k-nearest-neighbour estimate of KL(q(z) || p(z)) for the aggregated posterior.

``latent.png`` shows encoder samples coloured by image (the paper's Figure 6).

Settings (defaults): two hidden layers of 128 ReLU units in the encoders, the decoder and each
half of the paper's inner-product adversary ``T(x, z) = <f(x), g(z)>`` (the paper used 512;
128 reaches the target and runs four times faster), noise dimension 8, 16 samples of z per
image per step, Adam with learning rates 1e-3 (model and encoder) and 2e-3 (adversary) decaying
to 3 % of that over 16,000 steps, two adversary steps per step, no adaptive contrast (with
moments from 16 samples per image the adversary was outpaced: ELBO estimates above log p(x)).

Measured (seed 0, 7.5 minutes on two shared cores), against the paper's Table 1:

=================  ==========  ==========  ==========  ==========
per image          VAE         paper VAE   AVB         paper AVB
=================  ==========  ==========  ==========  ==========
log-likelihood     -1.567      -1.568      -1.400      -1.403
recon. error       0.0859      0.0885      0.0074      0.0058
ELBO               -1.700      -1.697      -1.437      -1.421
KL(q(z) || p(z))   0.141       0.165       0.020       0.026
=================  ==========  ==========  ==========  ==========

The AVB log-likelihood over seeds 0, 1, 2 (importance sampling with 4,000 samples): -1.405,
-1.410, -1.407. It wanders by a few hundredths during training as the regions of the four
images trade prior mass; the decaying learning rates settle it.

Usage::

    python examples/avb_synthetic.py --out avb_synthetic_out           # full run
    python examples/avb_synthetic.py --out /tmp/avb_smoke --smoke      # a few seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from torch import nn
from tqdm.auto import tqdm

from pyro_fdiv.compare.metrics import knn_kl
from pyro_fdiv.inference import AVB, implicit_sample, make_step

DATA = torch.eye(4, dtype=torch.float32)  # the four 2x2 images with one pixel on, flattened
Z_DIM = 2
OPTIMUM = -math.log(4.0)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class InnerProductDiscriminator(nn.Module):
    """The paper's adversary: ``T(x, z) = <f(x), g(z)>``, two MLPs with two hidden layers."""

    def __init__(self, x_dim: int, z_dim: int, hidden: int):
        super().__init__()
        self.f = mlp([x_dim, hidden, hidden, hidden])
        self.g = mlp([z_dim, hidden, hidden, hidden])

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return (self.f(x) * self.g(z)).sum(-1)


class Synthetic(nn.Module):
    """Decoder, Gaussian encoder (VAE) and implicit encoder (AVB), with Pyro model/guides."""

    def __init__(self, hidden: int, noise_dim: int):
        super().__init__()
        self.noise_dim = noise_dim
        self.decoder = mlp([Z_DIM, hidden, hidden, 4])
        self.gaussian_encoder = mlp([4, hidden, hidden, 2 * Z_DIM])
        self.implicit_encoder = mlp([4 + noise_dim, hidden, hidden, Z_DIM])

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def gaussian(self, x: torch.Tensor) -> dist.Distribution:
        out = self.gaussian_encoder(x)
        return dist.Normal(out[..., :Z_DIM], F.softplus(out[..., Z_DIM:]) + 1e-4).to_event(1)

    def vae_guide(self, x: torch.Tensor) -> None:
        pyro.module("gaussian_encoder", self.gaussian_encoder)
        with pyro.plate("data", len(x)):
            pyro.sample("z", self.gaussian(x))

    def encode(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x = x.expand(eps.shape[:-1] + x.shape[-1:])
        return self.implicit_encoder(torch.cat([x, eps], dim=-1))

    def avb_guide(self, x: torch.Tensor) -> None:
        pyro.module("implicit_encoder", self.implicit_encoder)
        with pyro.plate("data", len(x)):
            eps = pyro.sample(
                "eps",
                dist.Normal(x.new_zeros(self.noise_dim), 1.0).to_event(1),
                infer={"is_auxiliary": True},
            )
            implicit_sample("z", self.encode(x, eps), event_dim=1)

    @torch.no_grad()
    def encoder_samples(self, method: str, n: int) -> torch.Tensor:
        """``(n, 4, 2)`` samples of z for each image."""
        if method == "vae":
            return self.gaussian(DATA).sample((n,))
        return self.encode(DATA, torch.randn(n, 4, self.noise_dim))


@torch.no_grad()
def log_likelihood(net: Synthetic, z_q: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image importance-sampling estimate of ``log p(x)`` and its standard error, with the
    defensive proposal ``0.5 N(m, S) + 0.5 p(z)`` fitted to the encoder samples ``z_q``."""
    prior = dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1)
    loc = z_q.mean(0)
    centred = z_q - loc
    cov = torch.einsum("nbi,nbj->bij", centred, centred) / (len(z_q) - 1)
    fitted = dist.MultivariateNormal(loc, cov + 1e-6 * torch.eye(Z_DIM))
    pick = torch.rand(n, 4) < 0.5
    z = torch.where(pick[..., None], fitted.sample((n,)), prior.sample((n, 4)))
    log_proposal = torch.logaddexp(fitted.log_prob(z), prior.log_prob(z)) - math.log(2.0)
    log_lik = dist.Bernoulli(logits=net.decoder(z)).to_event(1).log_prob(DATA)
    log_w = log_lik + prior.log_prob(z) - log_proposal
    estimate = torch.logsumexp(log_w, 0) - math.log(n)
    w = (log_w - estimate).exp()  # normalized so that mean(w) = 1
    return estimate.numpy(), (w.std(0) / math.sqrt(n)).numpy()


@torch.no_grad()
def own_proposal_log_likelihood(net: Synthetic, n: int) -> np.ndarray:
    """``log p(x)`` by importance sampling with the VAE's own Gaussian encoder."""
    q = net.gaussian(DATA)
    z = q.sample((n,))
    log_w = (
        dist.Bernoulli(logits=net.decoder(z)).to_event(1).log_prob(DATA)
        + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        - q.log_prob(z)
    )
    return (torch.logsumexp(log_w, 0) - math.log(n)).numpy()


@torch.no_grad()
def reconstruction_error(net: Synthetic, z_q: torch.Tensor) -> float:
    """Mean per-pixel binary cross-entropy of the reconstructions ``decoder(z)``, ``z ~ q``."""
    logits = net.decoder(z_q)
    return F.binary_cross_entropy_with_logits(logits, DATA.expand_as(logits)).item()


def train(method: str, args: argparse.Namespace) -> tuple[Synthetic, object, float, list]:
    """Fit the decoder with the VAE's Gaussian encoder (``Trace_ELBO``) or with the implicit
    encoder and the inner-product discriminator (``AVB`` with the prior as contrast, as in the
    paper's synthetic experiment). Both learning rates decay by ``--lr-decay`` over the run."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    net = Synthetic(args.hidden, args.noise_dim)
    gamma = args.lr_decay ** (1 / args.steps)
    if method == "vae":
        guide = net.vae_guide
        loss = Trace_ELBO(
            num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1
        )
    else:
        guide = net.avb_guide
        loss = AVB(
            InnerProductDiscriminator(4, Z_DIM, args.hidden),
            adaptive_contrast=args.adaptive_contrast,
            num_adversary_steps=args.adversary_steps,
            adversary_optim={"lr": args.adversary_lr},
            num_particles=args.particles,
            max_plate_nesting=1,
        )
        schedule = torch.optim.lr_scheduler.ExponentialLR(loss.adversary_optim, gamma)
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": gamma})
    # compiled steps where the objective has them: the VAE's whole step, AVB's ELBO step with
    # adaptive contrast (the prior contrast's discriminator samples come from the step's trace)
    compile = args.compile and (method != "avb" or args.adaptive_contrast)
    step = make_step(net.model, guide, optim, loss, compile=compile)
    start, history = time.perf_counter(), []
    for _ in tqdm(range(args.steps), desc=method, disable=args.smoke, leave=False):
        history.append(step(DATA) / len(DATA))
        if method == "avb":
            schedule.step()
    return net, loss, time.perf_counter() - start, history


def evaluate(method: str, net: Synthetic, loss, seconds: float, args) -> tuple[dict, torch.Tensor]:
    z_q = net.encoder_samples(method, args.eval_samples)
    log_lik, se = log_likelihood(net, z_q, args.eval_samples)
    if method == "vae":
        elbo_fn = Trace_ELBO(num_particles=args.eval_samples, vectorize_particles=True)
        elbo = -elbo_fn.loss(net.model, net.vae_guide, DATA) / len(DATA)
        own = float(own_proposal_log_likelihood(net, args.eval_samples).mean())
    else:
        big = AVB(loss.discriminator, loss.adaptive_contrast, num_particles=args.eval_samples)
        elbo = -big.loss(net.model, net.avb_guide, DATA) / len(DATA)
        own = math.nan
    prior = torch.randn(len(z_q) * 4, Z_DIM)
    row = {
        "method": method,
        "log_lik": float(log_lik.mean()),
        "log_lik_se": float(np.sqrt((se**2).sum()) / 4),
        "log_lik_own_q": own,
        "gap_to_optimum": float(OPTIMUM - log_lik.mean()),
        "recon_error": reconstruction_error(net, z_q),
        "elbo": elbo,
        "kl_agg": knn_kl(z_q.reshape(-1, Z_DIM).numpy(), prior.numpy()),
        "steps": args.steps,
        "seconds": seconds,
    }
    for i, value in enumerate(log_lik):
        row[f"log_lik_x{i}"] = float(value)
    return row, z_q


def plot_latents(samples: dict[str, torch.Tensor], path: Path) -> None:
    """Encoder samples coloured by image: the paper's Figure 6."""
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.2), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, (method, z) in zip(axes[0], samples.items(), strict=True):
        z = z[:2000]
        for i in range(4):
            ax.scatter(z[:, i, 0], z[:, i, 1], s=2, alpha=0.4, color=colors[i], label=f"x{i}")
        circle = plt.Circle((0, 0), 2.0, fill=False, ls="--", lw=0.8, color="gray")
        ax.add_patch(circle)
        ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", title=method.upper())
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
    axes[0, 0].legend(markerscale=5, loc="upper right", fontsize=8)
    fig.suptitle("Latent codes of the four images (dashed: radius 2 of the prior)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("avb_synthetic_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny networks, a few steps")
    parser.add_argument("--steps", type=int, default=16_000)
    parser.add_argument("--hidden", type=int, default=128, help="width of every hidden layer")
    parser.add_argument("--noise-dim", type=int, default=8)
    parser.add_argument("--particles", type=int, default=16, help="z samples per image per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="model and encoder (Adam)")
    parser.add_argument("--adversary-lr", type=float, default=2e-3, help="discriminator (Adam)")
    parser.add_argument("--lr-decay", type=float, default=0.03, help="total decay of both rates")
    parser.add_argument("--adversary-steps", type=int, default=2, help="per model step")
    parser.add_argument("--adaptive-contrast", action="store_true")
    parser.add_argument("--methods", default="vae,avb", help="comma-separated: vae, avb")
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="eager SVI steps"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # seconds: compiling would cost more than it saves
        args.steps, args.hidden, args.eval_samples, args.compile = 30, 32, 1000, False
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)

    rows, samples = [], {}
    for method in args.methods.split(","):
        net, loss, seconds, history = train(method, args)
        row, samples[method] = evaluate(method, net, loss, seconds, args)
        rows.append(row)
        pd.DataFrame({"step": range(len(history)), "loss": history}).to_csv(
            args.out / f"loss_{method}.csv", index=False
        )
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    plot_latents(samples, args.out / "latent.png")
    columns = ["method", "log_lik", "log_lik_se", "recon_error", "elbo", "kl_agg", "seconds"]
    print(f"optimum log-likelihood -log 4 = {OPTIMUM:.4f}")
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {args.out / 'results.csv'}, {args.out / 'latent.png'}")
    return table


if __name__ == "__main__":
    main()
