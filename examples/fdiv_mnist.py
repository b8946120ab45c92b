r"""
The MNIST experiment of the f-divergence paper (Zhang, Bird, Habib, Xu, Barber 2019, section 4.2
and appendix B): a latent generative model of continuous MNIST trained by forward KL, and by
forward KL then reverse KL, through the auxiliary f-divergence upper bound with spread noise
(:class:`~pyro_fdiv.inference.FDivergenceBound`).

**The recipe** (:data:`PAPER`; every number a command-line option):

- data: MNIST grey levels in [0, 1] (not binarized); the spread noise and the model's
  observation noise are :math:`\mathcal{N}(0, \sigma^2 I)` with variance :math:`\sigma^2 = 0.5`
  (``spread = sqrt(0.5)``), fixed;
- model :math:`z \sim \mathcal{N}(0, I_{20})`, :math:`y \sim \mathcal{N}(\mu_\theta(z),
  \sigma^2 I)`, the mean a 5-layer MLP of 400 leaky-ReLU units with a sigmoid output; encoder
  :math:`q_\phi(z \mid y) = \mathcal{N}(m_\phi(y), s_\phi(y)^2 I)` with *isotropic* covariance
  (one scale per image), 5 layers of 400 leaky-ReLU units (:class:`IsotropicEncoder`);
- **forward KL** (run ``forward_kl``): the bound (the negative ELBO on noisy images plus
  :math:`\mathbb{E} \log \hat p`), one joint Adam update of all parameters per batch, lr 1e-4,
  for 20 epochs;
- **reverse KL** (run ``reverse_kl``): the forward-KL run's parameters after 10 epochs, then
  10 epochs of the reverse-KL bound, each :math:`\theta` update (SGD, lr 1e-4) after 20
  :math:`\phi` updates (Adam, lr 1e-3) of the same bound (``guide_steps=20``, ``guide_f`` the
  same f: the paper's), the gradient of :math:`\log \hat p(y)` by the PCA-projected sampled
  estimator of appendix B (``log_density="pca"``, 50 dimensions, ``T = 10`` neighbours);
  the bound between plain joints (``num_importance_samples=1``), as in the paper.

The paper's gradient of :math:`\log \hat p` is scaled by 0.2 "in the image generation
experiments" (appendix B); ``--log-p-hat-scale`` sets that factor (default 1: the bound's own
gradient).

**Measurements**, after every epoch of each run (``log.csv``), on fixed rows: the forward-KL and
reverse-KL bounds with the exact :math:`\log \hat p` (over the whole training subset) at
``K = 1`` (the paper's bound) and with ``K = --eval-k`` importance samples (tighter; both from
one seed, so their difference, ``*_encoder_gap``, is a lower bound on how far the encoder is
from the model's posterior); the held-out log-likelihood :math:`\log p_{\theta,\sigma}(y)` of
noisy test images by importance sampling with the encoder as proposal (the quantity forward KL
maximizes), beside two references at the end: the training subset's own kernel density
:math:`\hat p_\sigma`, and the best linear decoder with the same noise
(:func:`linear_gaussian_log_lik`, 0 and 20 latents); the encoder's mean scale on noisy
training images (1 when it returns the prior: posterior collapse); the class histogram
of ``--track-samples`` decoder means under the cached MNIST classifier
(:mod:`pyro_fdiv.compare.sample_quality`); for reverse KL the relative distance of the decoder's
parameters from the forward-KL start. At the end, :func:`~pyro_fdiv.compare.sample_quality` on
10,000 decoder means :math:`\mu_\theta(z)` of each final model (and of the forward-KL model at
the reverse run's start) against the 10,000 MNIST test images (``quality.csv``), sample grids
(``samples_<run>.png``), ``curves.png`` and ``results.csv``.

**Resuming and budget.** Each run writes ``<run>/checkpoint.pt`` after every epoch (the param
store, both optimizers, the objective's state, RNGs and the log) and ``forward_kl`` keeps the
snapshot the reverse run starts from (``forward_kl/start_reverse.pt``); run the same command
again and it continues where it stopped. ``--budget-minutes`` stops training (after the epoch
in progress) when the wall time of this invocation passes it.

``--reverse-tag TAG`` trains another reverse run (e.g. ``--log-p-hat-scale 0.2``) from the
same forward-KL start into ``reverse_kl-TAG/``; the tables gather every run of the directory.

    # the paper's epochs and ratios on a 10,000-image subset (docs/experiments/fdiv_mnist/)
    python examples/fdiv_mnist.py --num-train 10000 --out docs/experiments/fdiv_mnist
    python examples/fdiv_mnist.py --smoke --out /tmp/fdiv_mnist        # seconds

**References**

[1] M. Zhang, T. Bird, R. Habib, T. Xu, D. Barber. *Variational f-divergence minimization*.
arXiv:1907.11891 (2019), section 4.2 and appendix B.
"""

from __future__ import annotations

import argparse
import functools
import math
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyro_fdiv import checkpoint
from pyro_fdiv.compare.sample_quality import (
    class_histogram,
    classifier_outputs,
    default_cache_path,
    load_or_train_classifier,
    quality_table,
    sample_quality,
    save_sample_grid,
    train_classifier,
)
from pyro_fdiv.data import fixed_subset, load_mnist
from pyro_fdiv.evaluate import log_likelihood
from pyro_fdiv.inference import FDivergenceBound
from pyro_fdiv.inference.compiled import make_step
from pyro_fdiv.inference.spread import spread_log_density
from pyro_fdiv.models.toy import mlp
from pyro_fdiv.util import rng_preserved

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RUNS = ("forward_kl", "reverse_kl")
CHECKPOINT = "checkpoint.pt"
START = "start_reverse.pt"

#: The paper's settings (section 4.2, appendix B).
PAPER = {
    "z_dim": 20,
    "hidden": 400,
    "layers": 5,
    "spread_variance": 0.5,
    "forward_epochs": 20,
    "init_epochs": 10,
    "reverse_epochs": 10,
    "forward_lr": 1e-4,  # Adam, all parameters
    "theta_lr": 1e-4,  # SGD, the decoder, reverse KL
    "phi_lr": 1e-3,  # Adam, the encoder, reverse KL
    "guide_steps": 20,
    "pca_dim": 50,
    "num_pca_samples": 10,
}


def leaky_trunk(n_in: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` linear layers of ``hidden`` units, each followed by a leaky ReLU."""
    return nn.Sequential(*mlp([n_in, *[hidden] * layers], nn.LeakyReLU), nn.LeakyReLU())


class IsotropicEncoder(nn.Module):
    r""":math:`q_\phi(z \mid y) = \mathcal{N}(m_\phi(y), s_\phi(y)^2 I)`: one scale per image
    (the paper's isotropic covariance), :math:`s = \mathrm{softplus}(\cdot) + 10^{-4}`."""

    def __init__(self, x_dim: int, hidden: int, layers: int, z_dim: int):
        super().__init__()
        self.hidden = leaky_trunk(x_dim, hidden, layers)
        self.fc_loc = nn.Linear(hidden, z_dim)
        self.fc_scale = nn.Linear(hidden, 1)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(y)
        loc = self.fc_loc(h)
        return loc, (F.softplus(self.fc_scale(h)) + 1e-4).expand_as(loc)


class MeanDecoder(nn.Module):
    r""":math:`\mu_\theta(z)`: leaky-ReLU MLP, sigmoid output (pixel means in (0, 1))."""

    def __init__(self, z_dim: int, hidden: int, layers: int, x_dim: int):
        super().__init__()
        self.hidden = leaky_trunk(z_dim, hidden, layers)
        self.fc_mean = nn.Linear(hidden, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc_mean(self.hidden(z)))


class SpreadVAE(nn.Module):
    r"""
    The paper's model and encoder as a Pyro ``model``/``guide`` pair: :math:`z \sim
    \mathcal{N}(0, I)`, :math:`y \sim \mathcal{N}(\mu_\theta(z), \sigma^2 I)` (the bound
    replaces the observation scale by its spread width, the same :math:`\sigma`), and
    :math:`q_\phi(z \mid y)` (:class:`IsotropicEncoder`), both in a plate ``"data"``.
    """

    def __init__(self, sigma: float, z_dim=20, hidden=400, layers=5, x_dim=784):
        super().__init__()
        self.sigma, self.z_dim = sigma, z_dim
        self.encoder = IsotropicEncoder(x_dim, hidden, layers, z_dim)
        self.decoder = MeanDecoder(z_dim, hidden, layers, x_dim)

    def model(self, y: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder, update_module_params=True)
        with pyro.plate("data", y.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(y.new_zeros(y.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(self.decoder(z), self.sigma).to_event(1), obs=y)

    def guide(self, y: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder, update_module_params=True)
        with pyro.plate("data", y.shape[0], dim=-1):
            loc, scale = self.encoder(y)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def modules_by_name(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def sync(self) -> None:
        for name, module in self.modules_by_name().items():
            pyro.module(name, module, update_module_params=True)

    @torch.no_grad()
    def sample_means(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Decoder means :math:`\mu_\theta(z)` of ``num`` prior draws (the model's samples
        without the spread noise, as in the paper's figure 4)."""
        self.sync()
        weight = self.decoder.fc_mean.weight
        z = torch.randn(num, self.z_dim, generator=generator, dtype=weight.dtype)
        return torch.cat([self.decoder(chunk) for chunk in z.split(1000)])


# ------------------------------------------------------------------------------------- settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="holds mnist/*.gz")
    p.add_argument("--out", type=Path, default=REPO / "docs/experiments/fdiv_mnist")
    p.add_argument("--num-train", type=int, default=10_000, help="training subset (paper 60000)")
    p.add_argument("--forward-epochs", type=int, default=PAPER["forward_epochs"])
    p.add_argument("--init-epochs", type=int, default=PAPER["init_epochs"])
    p.add_argument("--reverse-epochs", type=int, default=PAPER["reverse_epochs"])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--guide-steps", type=int, default=PAPER["guide_steps"])
    p.add_argument("--forward-lr", type=float, default=PAPER["forward_lr"])
    p.add_argument("--theta-lr", type=float, default=PAPER["theta_lr"])
    p.add_argument("--phi-lr", type=float, default=PAPER["phi_lr"])
    p.add_argument("--pca-dim", type=int, default=PAPER["pca_dim"])
    p.add_argument("--num-pca-samples", type=int, default=PAPER["num_pca_samples"])
    p.add_argument("--spread-variance", type=float, default=PAPER["spread_variance"])
    p.add_argument("--log-p-hat-scale", type=float, default=1.0)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument(
        "--references",
        action="store_true",
        help="only write references.csv: the reverse KL of one-image models and of real digits",
    )
    p.add_argument("--reverse-tag", default="", help="reverse run in reverse_kl-TAG (a variant)")
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=10_000, help="samples scored at the end")
    p.add_argument(
        "--quality-test", type=int, default=10_000, help="test images samples are scored against"
    )
    p.add_argument("--track-samples", type=int, default=1000, help="samples scored per epoch")
    p.add_argument("--eval-rows", type=int, default=200, help="rows of the per-epoch bounds")
    p.add_argument("--eval-k", type=int, default=20, help="importance samples of tight bounds")
    p.add_argument("--num-test", type=int, default=500, help="test images of the log-lik")
    p.add_argument("--ll-samples", type=int, default=100, help="importance samples per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--classifier", type=Path, default=None, help="cached classifier file")
    p.add_argument(
        "--smoke", action="store_true", help="500 images, 1+1 epochs, 2 guide steps: seconds"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.num_train, args.batch_size = 500, 100
        args.forward_epochs, args.init_epochs, args.reverse_epochs = 2, 1, 1
        args.guide_steps, args.num_samples, args.track_samples = 2, 300, 200
        args.quality_test = 300
        args.eval_rows, args.eval_k, args.num_test, args.ll_samples = 50, 4, 50, 10
        args.compile = False
    if not 0 < args.init_epochs <= args.forward_epochs:
        raise ValueError(
            f"Expected 0 < --init-epochs <= --forward-epochs, actual {args.init_epochs} and "
            f"{args.forward_epochs}: the reverse run starts from the forward run's epoch "
            "--init-epochs"
        )
    if not args.spread_variance > 0:
        raise ValueError(f"Expected --spread-variance > 0, actual {args.spread_variance}")
    return args


def run_settings(args: argparse.Namespace, kind: str) -> dict:
    """What a resumed run of ``kind`` (``forward_kl``, ``reverse_kl``) must share with the saved
    one (the reverse run's start checkpoint is checked against the forward settings)."""
    keys = ("num_train", "batch_size", "seed", "spread_variance", "init_epochs", "forward_lr")
    keys += ("eval_rows", "eval_k", "num_test", "ll_samples", "track_samples")
    if kind == "reverse_kl":
        keys += ("theta_lr", "phi_lr", "guide_steps", "pca_dim", "num_pca_samples")
        keys += ("log_p_hat_scale",)
    return {k: getattr(args, k) for k in keys}


def run_dir_name(kind: str, args: argparse.Namespace) -> str:
    """``forward_kl``, or ``reverse_kl`` with ``--reverse-tag`` (a variant from the same start)."""
    return f"{kind}-{args.reverse_tag}" if kind == "reverse_kl" and args.reverse_tag else kind


# ------------------------------------------------------------------------------------- training
class Run:
    """One run (``forward_kl`` or ``reverse_kl``): model, objective, optimizers, log,
    checkpoint."""

    def __init__(self, name: str, args: argparse.Namespace, data: dict, classifier):
        self.name, self.args, self.data, self.classifier = name, args, data, classifier
        self.dir = args.out / run_dir_name(name, args)
        self.label = self.dir.name
        self.sigma = math.sqrt(args.spread_variance)
        self.epochs = args.forward_epochs if name == "forward_kl" else args.reverse_epochs
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        self.vae = SpreadVAE(self.sigma).float()  # the data are float32 whatever the default
        train = data["train"]
        if name == "forward_kl":
            self.objective = FDivergenceBound(
                "forward_kl", data=train, spread=self.sigma, max_plate_nesting=1
            )
            self.optim = pyro.optim.Adam({"lr": args.forward_lr})
        else:
            self.objective = PaperReverseKL(
                "reverse_kl",
                data=train,
                spread=self.sigma,
                log_density="pca",
                pca_dim=args.pca_dim,
                num_pca_samples=args.num_pca_samples,
                guide_steps=args.guide_steps,
                guide_optim=pyro.optim.Adam({"lr": args.phi_lr}),
                max_plate_nesting=1,
                log_p_hat_scale=args.log_p_hat_scale,
            )
            self.optim = pyro.optim.SGD({"lr": args.theta_lr})
        self.step = make_step(
            self.vae.model, self.vae.guide, self.optim, self.objective, compile=args.compile
        )
        self.epoch, self.rows, self.start_params = 0, [], None
        if (self.dir / CHECKPOINT).exists():
            self._restore(self.dir / CHECKPOINT, optim=True)
        elif name == "reverse_kl":
            start = args.out / "forward_kl" / START
            if not start.exists():
                raise FileNotFoundError(f"{start} is missing: run the forward_kl run first")
            self._restore(start, optim=False)
            self.epoch, self.rows = 0, []
        if name == "reverse_kl":
            self.start_params = self._decoder_vector(args.out / "forward_kl" / START)

    def _restore(self, path: Path, optim: bool) -> None:
        payload = checkpoint.read(path)
        saved = payload["extra"]["settings"]
        expected = run_settings(self.args, self.name if optim else "forward_kl")
        if saved != expected:
            changed = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
            raise ValueError(f"Cannot resume {path}: settings differ (saved, given): {changed}")
        if optim:
            checkpoint.restore(
                payload,
                optim=self.optim,
                objective=self.objective,
                modules=self.vae.modules_by_name(),
            )
        else:  # the reverse run's start: the forward run's parameters, fresh optimizers
            checkpoint.restore(payload, modules=self.vae.modules_by_name())
        self.epoch, self.rows = payload["extra"]["epoch"], payload["extra"]["rows"]

    def _decoder_vector(self, path: Path) -> torch.Tensor:
        store = checkpoint.read(path)["param_store"]["params"]
        return torch.cat([v.reshape(-1) for k, v in sorted(store.items()) if "decoder" in k])

    def save(self, path: Path) -> None:
        extra = {
            "epoch": self.epoch,
            "rows": self.rows,
            "settings": run_settings(self.args, self.name),
        }
        checkpoint.save(path, optim=self.optim, objective=self.objective, extra=extra)

    def train_epoch(self) -> float:
        train = self.data["train"]
        order = torch.randperm(len(train))
        losses = []
        batches = order.split(self.args.batch_size)
        desc = f"{self.label} epoch {self.epoch + 1}/{self.epochs}"
        for idx in tqdm(batches, desc=desc, disable=not self.args.progress, leave=False):
            losses.append(self.step(train[idx]))
        return sum(losses) / len(losses)

    def run(self, deadline: float | None) -> bool:
        """Train the remaining epochs; ``False`` if stopped by the budget."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.rows:  # the run's start, epoch 0
            self.rows.append(
                {"epoch": 0, "train_objective": float("nan"), "seconds": 0.0, **self.measure()}
            )
            pd.DataFrame(self.rows).to_csv(self.dir / "log.csv", index=False)
            self.save(self.dir / CHECKPOINT)
        while self.epoch < self.epochs:
            if deadline is not None and time.perf_counter() > deadline:
                return False
            start = time.perf_counter()
            loss = self.train_epoch()
            seconds = time.perf_counter() - start
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "train_objective": loss,
                "seconds": self.rows[-1]["seconds"] + seconds,
                **self.measure(),
            }
            self.rows.append(row)
            pd.DataFrame(self.rows).to_csv(self.dir / "log.csv", index=False)
            self.save(self.dir / CHECKPOINT)
            if self.name == "forward_kl" and self.epoch == self.args.init_epochs:
                shutil.copyfile(self.dir / CHECKPOINT, self.dir / START)
        pd.DataFrame(self.rows).to_csv(self.dir / "log.csv", index=False)
        return True

    # ----------------------------------------------------------------------------- measuring
    @torch.no_grad()
    def measure(self) -> dict:
        """The per-epoch numbers (see the module docstring); draws from their own seed."""
        with rng_preserved():
            pyro.set_rng_seed(self.args.seed + 1000)
            return self._measure()

    def _measure(self) -> dict:
        args, train = self.args, self.data["train"]
        rows = self.data["eval_rows"]
        out = {}
        for f in ("forward_kl", "reverse_kl"):
            for k in (1, args.eval_k):
                # the same seed for both K: the same y (and first latent), so the difference is
                # the encoder's looseness, not the noise of the draw of y
                pyro.set_rng_seed(args.seed + 1000)
                bound = FDivergenceBound(
                    f,
                    data=train,
                    spread=self.sigma,
                    num_importance_samples=k,
                    max_plate_nesting=1,
                    check_finite=False,
                )
                out[f"{f}_bound_k{k}" if k > 1 else f"{f}_bound"] = bound.loss(
                    self.vae.model, self.vae.guide, rows
                )
            out[f"{f}_encoder_gap"] = out[f"{f}_bound"] - out[f"{f}_bound_k{args.eval_k}"]
        test_ll = log_likelihood(
            self.vae.model, self.vae.guide, self.data["noisy_test"], num_samples=args.ll_samples
        )
        out["test_log_lik"] = float(test_ll.mean())
        out["test_log_lik_se"] = float(test_ll.std() / math.sqrt(len(test_ll)))
        means = self.vae.sample_means(args.track_samples)
        logits, _ = classifier_outputs(self.classifier, means.float())
        hist = class_histogram(logits.argmax(-1))
        out.update({f"p{c}": float(v) for c, v in enumerate(hist["fractions"])})
        out["entropy"], out["min_fraction"] = hist["entropy"], hist["min_fraction_observed"]
        out["max_fraction"] = float(hist["fractions"].max())
        out["confidence"] = float(logits.softmax(-1).max(-1).values.mean())
        out["encoder_scale"] = float(self.vae.encoder(self.data["noisy_rows"])[1][:, 0].mean())
        if self.start_params is not None:
            now = torch.cat(
                [
                    p.detach().reshape(-1)
                    for _, p in sorted((n, p) for n, p in self.vae.decoder.named_parameters())
                ]
            )
            out["decoder_change"] = float(
                (now - self.start_params).norm() / self.start_params.norm()
            )
        return out


class PaperReverseKL(FDivergenceBound):
    r"""
    The reverse-KL :class:`~pyro_fdiv.inference.FDivergenceBound` as the paper trains it, with
    two changes to :math:`\log \hat p(y)` that leave the bound's value alone:

    - the guide steps skip it. The bound is :math:`\mathbb{E}_{p_\theta(y, z)}[\log
      p_\theta(y, z) - \log q_\phi(z \mid y) - \log \hat p(y)]`, whose last term does not
      depend on :math:`\phi` (``y`` is drawn from the model), so the guide's gradient is the
      same without it (only the value the guide steps see changes, which nothing uses). With
      ``log_density="pca"`` that term's sampled estimator is most of the cost of an evaluation
      (the neighbour sampling over the training set), and the paper's schedule evaluates the
      bound 20 times for the guide per model update;
    - its gradient is multiplied by ``log_p_hat_scale`` in the model step (appendix B: "scaling
      the contribution from this term to the gradient can sometimes improve optimization (we
      use 0.2 as the scaling factor in the image generation experiments)").

    :param float log_p_hat_scale: the factor (1: the bound's own gradient).
    """

    _guide_phase = False

    def __init__(self, *args, log_p_hat_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not log_p_hat_scale > 0:
            raise ValueError(f"Expected log_p_hat_scale > 0, actual {log_p_hat_scale!r}")
        self.log_p_hat_scale = float(log_p_hat_scale)

    def step_inner(self, model, guide, *args, **kwargs) -> float | None:
        self._guide_phase = True
        try:
            return super().step_inner(model, guide, *args, **kwargs)
        finally:
            self._guide_phase = False

    def log_data_density(self, y: torch.Tensor) -> torch.Tensor:
        if self._guide_phase:
            return y.new_zeros(y.shape[: y.dim() - 1])
        value = super().log_data_density(y)
        if self.log_p_hat_scale == 1.0:
            return value
        return value.detach() + self.log_p_hat_scale * (value - value.detach())


# ------------------------------------------------------------------------------------ reporting
def final_quality(run: Run, args, test_x, test_features, label: str, grid: Path) -> dict:
    generator = torch.Generator().manual_seed(args.seed + 7)
    means = run.vae.sample_means(args.num_samples, generator).float()
    save_sample_grid(means, grid, title=label)
    return sample_quality(means, run.classifier, test_x, test_features=test_features)


def merged(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """``table``'s rows replace those of the same name in the CSV at ``path`` (written by
    earlier calls, e.g. for other variants); the union is written back and returned."""
    if path.exists():
        old = pd.read_csv(path, index_col=0)
        table = pd.concat([old.drop(index=table.index, errors="ignore"), table])
    table.index.name = table.index.name or "name"
    table.to_csv(path)
    return table


def plot_curves(logs: dict[str, pd.DataFrame], path: Path) -> None:
    columns = [
        ("forward_kl_bound", "forward-KL bound (K=1), nats"),
        ("reverse_kl_bound", "reverse-KL bound (K=1), nats"),
        ("test_log_lik", "log p(noisy test image), nats"),
        ("min_fraction", "smallest class fraction"),
        ("entropy", "class entropy (max 2.303)"),
        ("confidence", "classifier confidence"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (column, title) in zip(axes.flat, columns, strict=True):
        for name, log in logs.items():
            x = log["epoch"] + (log.attrs.get("offset", 0))
            ax.plot(x, log[column], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def linear_gaussian_log_lik(
    train: torch.Tensor, y: torch.Tensor, sigma: float, z_dim: int
) -> torch.Tensor:
    r"""
    :math:`\log p(y)` of the best *linear* decoder with ``z_dim`` latents and the same fixed
    noise, :math:`p(y) = \mathcal{N}(\bar x, U \,\mathrm{diag}(\lambda + \sigma^2) U^\top +
    \sigma^2 (I - U U^\top))` with :math:`(\lambda, U)` the top ``z_dim`` eigenpairs of the
    training images' covariance (probabilistic PCA with the noise fixed: the maximum-likelihood
    fit of :math:`\mu(z) = \bar x + W z` to the spread data), in float64. ``z_dim=0`` is the
    mean image alone, what a decoder that ignores :math:`z` can reach at best.
    """
    x, y = train.double(), y.double()
    mean = x.mean(0)
    eigenvalues, vectors = torch.linalg.eigh(torch.cov((x - mean).T))
    lam, basis = eigenvalues.flip(0)[:z_dim].clamp_min(0), vectors.flip(1)[:, :z_dim]
    centred = y - mean
    projected = centred @ basis
    quad = (projected**2 / (lam + sigma**2)).sum(1)
    quad = quad + (centred.square().sum(1) - projected.square().sum(1)) / sigma**2
    dim = x.shape[1]
    logdet = torch.log(lam + sigma**2).sum() + (dim - z_dim) * math.log(sigma**2)
    return -0.5 * (dim * math.log(2 * math.pi) + logdet + quad)


def one_image_reverse_kl(
    images: torch.Tensor, train: torch.Tensor, sigma: float, num_draws: int = 4
) -> torch.Tensor:
    r"""
    :math:`\mathrm{KL}(\mathcal{N}(x, \sigma^2 I) \,\|\, \hat p_\sigma)` for each image
    :math:`x` of ``images``: the reverse KL of a model that emits that one image, against the
    spread training set, by Monte Carlo (``num_draws`` per image), in float64.
    """
    x, train = images.double(), train.double()
    total = torch.zeros(len(x), dtype=x.dtype)
    for _ in range(num_draws):
        noise = sigma * torch.randn_like(x)
        log_model = -0.5 * x.shape[1] * math.log(2 * math.pi * sigma**2)
        log_model = log_model - noise.square().sum(1) / (2 * sigma**2)
        total += log_model - spread_log_density(x + noise, train, sigma)
    return total / num_draws


def reverse_kl_references(data: dict, sigma: float, per_class: int = 100, num_draws: int = 1000):
    r"""
    What the reverse KL prefers at this spread: ``(by_class, ideal)``. ``by_class``: the reverse
    KL of one-image models, for ``per_class`` *test* images of each class (unseen by
    :math:`\hat p_\sigma`), median and minimum. ``ideal``: the reverse KL of the real digit
    distribution, represented by all test images under the same spread, against
    :math:`\hat p_\sigma` of the training subset (``"subset"``) and of all training images
    (``"all"``), ``(mean, standard error)`` over ``num_draws`` draws; the training subset
    itself scores 0.
    """
    test, labels, train = data["test_x"].double(), data["test_y"], data["train"].double()
    rows = []
    for c in range(10):
        kl = one_image_reverse_kl(test[labels == c][:per_class], train, sigma)
        rows.append({"class": c, "median": kl.median().item(), "min": kl.min().item()})
    idx = torch.randint(len(test), (num_draws,))
    y = test[idx] + sigma * torch.randn(num_draws, test.shape[1], dtype=test.dtype)
    log_model = spread_log_density(y, test, sigma)
    ideal = {}
    for name, points in (("subset", train), ("all", data["train_all"].double())):
        terms = log_model - spread_log_density(y, points, sigma)
        ideal[name] = (terms.mean().item(), (terms.std() / math.sqrt(num_draws)).item())
    return pd.DataFrame(rows), ideal


def load_data(args: argparse.Namespace) -> dict:
    train_all, _ = load_mnist(args.data, "train", dtype=torch.float32)
    test_x, test_y = load_mnist(args.data, "test", dtype=torch.float32)
    train = fixed_subset(train_all, args.num_train, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed + 99)
    sigma = math.sqrt(args.spread_variance)
    test_rows = fixed_subset(test_x, args.num_test, seed=args.seed)
    noisy_test = test_rows + sigma * torch.randn(test_rows.shape, generator=generator)
    eval_rows = fixed_subset(train, args.eval_rows, seed=args.seed + 1)
    noisy_rows = eval_rows + sigma * torch.randn(eval_rows.shape, generator=generator)
    return {
        "train": train,
        "train_all": train_all,
        "test_x": test_x,
        "test_y": test_y,
        "noisy_test": noisy_test,
        "eval_rows": eval_rows,
        "noisy_rows": noisy_rows,
    }


@functools.cache
def smoke_classifier(data_dir: str, progress: bool):
    """A tiny classifier (500 images, one epoch) for smoke runs, never the cache; trained once
    per process."""
    images, labels = load_mnist(data_dir, "train", dtype=torch.float32)
    return train_classifier(images[:500], labels[:500], epochs=1, progress=progress)


def get_classifier(args: argparse.Namespace):
    if args.smoke:
        return smoke_classifier(str(args.data), args.progress)
    return load_or_train_classifier(
        args.classifier or default_cache_path(), args.data, progress=args.progress
    )


def write_references(args: argparse.Namespace, data: dict) -> pd.DataFrame:
    """``references.csv``: :func:`reverse_kl_references`, and the test log-likelihoods of the
    kernel density and of :func:`linear_gaussian_log_lik`."""
    sigma = math.sqrt(args.spread_variance)
    with rng_preserved():
        torch.manual_seed(args.seed)
        by_class, ideal = reverse_kl_references(data, sigma)
    rows = [
        {
            "reference": f"one test image of class {int(r['class'])} (median; min)",
            "value": r["median"],
            "extra": r["min"],
        }
        for _, r in by_class.iterrows()
    ]
    for name, (mean, se) in ideal.items():
        against = "the training subset" if name == "subset" else "all training images"
        reference = f"the test set as the model, against {against} (mean; se)"
        rows.append({"reference": reference, "value": mean, "extra": se})
    noisy, train = data["noisy_test"], data["train"]
    rows.append(
        {
            "reference": "test log-lik: the training subset's kernel density p_hat",
            "value": float(spread_log_density(noisy.double(), train.double(), sigma).mean()),
        }
    )
    for z_dim in (0, PAPER["z_dim"]):
        value = float(linear_gaussian_log_lik(train, noisy, sigma, z_dim).mean())
        rows.append(
            {"reference": f"test log-lik: best linear decoder, {z_dim} latents", "value": value}
        )
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "references.csv", index=False)
    print(table.round(3).to_string(index=False))
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)  # the run's tensors, whatever the caller's default
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def _main(args: argparse.Namespace) -> pd.DataFrame:
    began = time.perf_counter()
    deadline = None if args.budget_minutes is None else began + 60 * args.budget_minutes
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args)
    if args.references:
        return write_references(args, data)
    classifier = get_classifier(args)
    sigma = math.sqrt(args.spread_variance)
    # the reference: the training subset's own spread density at the noisy test images
    reference_ll = spread_log_density(data["noisy_test"].double(), data["train"].double(), sigma)
    finished = {}
    for name in args.runs:
        run = Run(name, args, data, classifier)
        finished[name] = run.run(deadline)
        if not finished[name]:
            print(
                f"{run.label}: budget reached after epoch {run.epoch}; run the same command again"
            )
            return pd.DataFrame()
    quality_test = fixed_subset(data["test_x"], args.quality_test, seed=args.seed)
    _, test_features = classifier_outputs(classifier, quality_test)
    results, quality, logs = [], {}, {}
    for name in args.runs:
        run = Run(name, args, data, classifier)
        log = logs[run.label] = pd.read_csv(run.dir / "log.csv")
        if name == "reverse_kl":
            log.attrs["offset"] = args.init_epochs
        title = f"{run.label}, {args.init_epochs}+{run.epoch}" if name == "reverse_kl" else name
        quality[run.label] = final_quality(
            run, args, quality_test, test_features, title, args.out / f"samples_{run.label}.png"
        )
        results.append({"run": run.label, "epochs": run.epoch, **log.iloc[-1].to_dict()})
    if "reverse_kl" in args.runs:  # the forward-KL model the reverse run starts from
        start = Run("reverse_kl", args, data, classifier)
        start._restore(args.out / "forward_kl" / START, optim=False)
        quality[f"forward_kl@{args.init_epochs}"] = final_quality(
            start,
            args,
            quality_test,
            test_features,
            f"forward_kl@{args.init_epochs}",
            args.out / "samples_forward_kl_start.png",
        )
    table = merged(args.out / "quality.csv", quality_table(quality))
    summary = pd.DataFrame(results).set_index("run")
    summary["reference_test_log_lik"] = float(reference_ll.mean())
    for z_dim in (0, PAPER["z_dim"]):
        linear = linear_gaussian_log_lik(data["train"], data["noisy_test"], sigma, z_dim)
        summary[f"linear_{z_dim}_test_log_lik"] = float(linear.mean())
    summary = merged(args.out / "results.csv", summary)
    for path in sorted(args.out.glob("reverse_kl*/log.csv")):  # variants from earlier calls
        if path.parent.name not in logs:
            logs[path.parent.name] = pd.read_csv(path)
            logs[path.parent.name].attrs["offset"] = args.init_epochs
    plot_curves(logs, args.out / "curves.png")
    pd.set_option("display.width", 200)
    print(summary.T.to_string())
    print(table.T.to_string())
    return table


if __name__ == "__main__":
    main()
