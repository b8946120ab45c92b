"""Train a VAE on binarized MNIST, MNIST or Omniglot with any objective of the package.

Each run keeps a CSV log, an atomic checkpoint each epoch (exact resume), the test
log-likelihood and image grids.

This is what ``pyro-fdiv train`` runs; :func:`train` is the same from Python::

    from pyro_fdiv.train import TrainConfig, train
    log = train(TrainConfig(objective="iwae", num_importance_samples=5, epochs=10,
                            out="runs/iwae5"))

Each objective trains the same :class:`~pyro_fdiv.models.vae.VAE` (architecture ``"iwae"`` by
default: 784-200-200-50, tanh), except where the method needs a different part; the differences
are each objective's :class:`Recipe` in :data:`RECIPES`, and ``num_particles`` (``-k``) sets the
count that the objective has (:data:`COUNTS`):

- ``elbo``: Pyro's own :class:`~pyro.infer.Trace_ELBO` (``num_elbo_samples`` averaged).
- ``iwae``, ``bbalpha``: :class:`~pyro_fdiv.inference.IWAE`,
  :class:`~pyro_fdiv.inference.BlackBoxAlpha` with ``num_importance_samples`` per data point.
- ``avb``: the implicit encoder (:class:`~pyro_fdiv.models.vae.ImplicitEncoder`) and
  :class:`~pyro_fdiv.inference.AVB`'s discriminator ``T(x, z)`` (``num_elbo_samples`` guide
  samples, adaptive contrast from 2); the test log-likelihood uses a Gaussian proposal fitted to
  the encoder's draws (:meth:`VAE.gaussian_proposal`).
- ``jsa``: :class:`~pyro_fdiv.inference.JSA` with one cached chain per training image (the model
  receives the minibatch's rows ``idx``), ``num_proposals`` per step.
- ``fdiv``: :class:`~pyro_fdiv.inference.FDivergenceBound` with a Gaussian decoder whose scale
  is the spread width; the bound compares the model with the training set through spread noise
  (whole set, no minibatch scaling), ``num_bound_samples`` draws per image of the batch. The
  test log-likelihood then reads the decoder's mean as Bernoulli probabilities (the same
  network, evaluated as the other objectives' model).

Every objective is built, moved, stepped and checkpointed through one path
(:mod:`pyro_fdiv.inference.inner`): ``SVI.step`` takes an objective's own inner updates (AVB's
discriminator; the f-bound's guide steps when configured), :func:`~pyro_fdiv.inference.inner.move`
puts its own tensors on the device, and its ``state_dict`` (with its inner optimizer's state)
goes into the checkpoint.

The checkpoint (``checkpoint.pt``, :mod:`pyro_fdiv.checkpoint`) holds the param store, the Adam
state, the objective's state, every RNG and the log; ``resume=True`` continues after the last
completed epoch, bit for bit as if the run had not stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyro
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from pyro_fdiv import checkpoint
from pyro_fdiv.data import dynamic_binarize, fixed_subset, load_dataset
from pyro_fdiv.divergences import get_divergence
from pyro_fdiv.evaluate import log_likelihood
from pyro_fdiv.inference import (
    AVB,
    IWAE,
    JSA,
    BlackBoxAlpha,
    FDivergenceBound,
    SpreadSchedule,
    inner,
)
from pyro_fdiv.inference.compiled import can_compile, make_step
from pyro_fdiv.inference.data_density import EmpiricalData
from pyro_fdiv.inference.iwae import GRADIENT_ESTIMATORS
from pyro_fdiv.models.vae import ARCHITECTURES, VAE
from pyro_fdiv.util import check_flag, check_integer, rng_preserved

__all__ = [
    "COUNTS",
    "DATASETS",
    "OBJECTIVES",
    "RECIPES",
    "Recipe",
    "TrainConfig",
    "Trainer",
    "build_objective",
    "build_vae",
    "save_image_grid",
    "train",
]

DATASETS = ("binarized-mnist", "mnist", "omniglot")
CHECKPOINT = "checkpoint.pt"
#: settings a resumed run may change
FREE_SETTINGS = ("epochs", "out", "data_root", "device", "compile")
LOG = "log.csv"
#: the VAE has one plate, "data"
NESTING = 1


@dataclass
class TrainConfig:
    r"""
    Everything that defines a training run (saved in the checkpoint; a resumed run must match).

    The number of samples per step means something different for each objective, so each
    meaning has its own setting; ``num_particles`` (the CLI's ``-k/--num-particles``) sets the
    one the objective uses (:data:`COUNTS`) and reads it back.

    :param str dataset: ``"binarized-mnist"`` (fixed binarization), ``"mnist"`` or
        ``"omniglot"`` (dynamically binarized each epoch).
    :param str objective: one of :data:`OBJECTIVES`.
    :param int num_elbo_samples: guide samples per data point averaged in the ELBO estimate
        (``elbo``; ``avb``, whose adaptive contrast needs at least 2).
    :param int num_importance_samples: :math:`K`, importance samples per data point in the
        bound (``iwae``, ``bbalpha``).
    :param int num_proposals: Metropolis proposals per chain per step (``jsa``).
    :param int num_bound_samples: draws of :math:`(y, z)` per row of the batch in the bound's
        estimate (``fdiv``).
    :param float alpha: BB-α's :math:`\alpha`.
    :param str gradient_estimator: IWAE's ``"reparam"``, ``"stl"`` or ``"dreg"``.
    :param str f: the f-divergence of ``fdiv``.
    :param str log_density: ``fdiv``'s data density: ``"exact"`` (all training images per
        step) or ``"pca"`` (the paper's estimator, reverse KL only).
    :param tuple spread: ``fdiv``'s spread schedule ``(start, end, anneal_epochs)``.
    :param str architecture: a key of :data:`~pyro_fdiv.models.vae.ARCHITECTURES`.
    :param int epochs: passes over the training set.
    :param int batch_size: minibatch size.
    :param float lr: Adam's learning rate.
    :param int seed: the seed of everything.
    :param str data_root: the data directory (default ``$PYRO_FDIV_DATA``).
    :param int num_train: use the first ``num_train`` training images (``None``: all).
    :param int num_test: test images evaluated after each epoch (``None``: all).
    :param int eval_samples: importance samples per test image after each epoch.
    :param str out: output directory (log, checkpoint, images).
    :param str device: where data, networks and the objective's state live (``"cpu"``,
        ``"cuda"``, ``"cuda:1"``); a run may resume on another device.
    :param int num_particles: sets the count of :data:`COUNTS` that the objective uses (it must
        not contradict that setting when both are given).
    :param bool compile: train with :func:`~pyro_fdiv.inference.make_step` (the default): the
        model and guide traced once, the step compiled (loss, gradient and Adam in one program
        where the objective's step is only that; the objective's own gradient steps compiled
        where it has inner updates, ``jsa``'s chain moves included). The same draws as
        ``SVI.step``, so the numbers agree to float rounding; ``False`` runs ``SVI.step``. A
        resumed run may change it.
    """

    dataset: str = "binarized-mnist"
    objective: str = "elbo"
    num_elbo_samples: int = 1
    num_importance_samples: int = 1
    num_proposals: int = 1
    num_bound_samples: int = 1
    alpha: float = 0.5
    gradient_estimator: str = "reparam"
    f: str = "reverse_kl"
    log_density: str = "exact"
    spread: tuple[float, float, int] = (0.5, 0.1, 5)
    architecture: str = "iwae"
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    data_root: str | None = None
    num_train: int | None = None
    num_test: int | None = 1000
    eval_samples: int = 500
    out: str = "train_out"
    device: str = "cpu"
    compile: bool = True
    num_particles: InitVar[int | None] = None

    def __post_init__(self, num_particles: int | None) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"Expected dataset in {sorted(DATASETS)}, actual {self.dataset!r}")
        if self.objective not in RECIPES:
            raise ValueError(f"Expected objective in {OBJECTIVES}, actual {self.objective!r}")
        if num_particles is not None:
            self._set_count(check_integer("num_particles", num_particles, 1))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"Expected architecture in {sorted(ARCHITECTURES)}, actual {self.architecture!r}"
            )
        for name in (*COUNT_SETTINGS, "epochs", "batch_size", "eval_samples"):
            check_integer(name, getattr(self, name), 1)
        for name in ("num_train", "num_test"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), 1)
        if not self.lr > 0:
            raise ValueError(f"Expected lr > 0, actual {self.lr}")
        check_flag("compile", self.compile)
        if self.gradient_estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(
                f"Expected gradient_estimator in {GRADIENT_ESTIMATORS}, "
                f"actual {self.gradient_estimator!r}"
            )
        if not math.isfinite(self.alpha):
            raise ValueError(f"Expected a finite alpha, actual {self.alpha}")
        get_divergence(self.f)  # a ValueError naming the known ones
        if self.log_density not in ("exact", "pca"):
            raise ValueError(f"Expected log_density 'exact' or 'pca', actual {self.log_density!r}")
        self.spread = cast(tuple[float, float, int], tuple(self.spread))  # checked next
        if len(self.spread) != 3:
            raise ValueError(f"Expected spread (start, end, anneal_epochs), actual {self.spread}")
        SpreadSchedule(self.spread[0], self.spread[1], max(1, int(self.spread[2])))
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"Expected a torch device, actual {self.device!r}: {error}") from None

    def _set_count(self, k: int) -> None:
        name = COUNTS[self.objective]
        default = _DEFAULTS[name]
        if getattr(self, name) not in (default, k):
            raise ValueError(
                f"num_particles={k} sets {name} for objective {self.objective!r}, which is "
                f"{getattr(self, name)!r}: pass one of them"
            )
        setattr(self, name, k)

    def comparable(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one: all but the number of
        epochs and where the data, outputs and tensors are."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in FREE_SETTINGS}


def _read_count(config: TrainConfig) -> int:
    """What ``num_particles`` (``-k``) set: the count the objective uses."""
    return getattr(config, COUNTS[config.objective])


# the InitVar's class attribute (its default, None) becomes a read-only view of the count;
# the generated __init__ already holds the default (ignore: mypy models an InitVar as no
# attribute of the class, so it cannot see this one replaced)
TrainConfig.num_particles = property(_read_count, doc=_read_count.__doc__)  # type: ignore[attr-defined]


def _load(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(train, test, train_gray)``: binary images, and gray levels for dynamic binarization."""
    name = config.dataset
    dtype = torch.get_default_dtype()
    if name == "binarized-mnist":
        train_x = load_dataset(name, config.data_root, "train", dtype=dtype)
        test_x = load_dataset(name, config.data_root, "test", dtype=dtype)
        gray = None
    else:
        gray = load_dataset(name, config.data_root, "train", dtype=dtype)
        test_gray = load_dataset(name, config.data_root, "test", dtype=dtype)
        # a fixed binarization of the test set, so every epoch and objective sees the same one
        generator = torch.Generator().manual_seed(123)
        test_x = dynamic_binarize(test_gray, generator)
        train_x = dynamic_binarize(gray, generator)
    train_x, test_x = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
    if config.num_train is not None:
        train_x = train_x[: config.num_train]
        gray = None if gray is None else gray[: config.num_train]
    if gray is not None:
        gray = gray.reshape(len(gray), -1)
    return train_x, test_x, gray


def _minibatch(x: torch.Tensor, num_data: int, idx: torch.Tensor | None) -> tuple:
    return (x, num_data)  # a uniform minibatch: the bound summed over the batch, scaled to N


def _indexed(x: torch.Tensor, num_data: int, idx: torch.Tensor | None) -> tuple:
    idx = torch.arange(len(x), device=x.device) if idx is None else idx
    return (x, num_data, idx)  # the rows address the cached chains


def _batch_only(x: torch.Tensor, num_data: int, idx: torch.Tensor | None) -> tuple:
    return (x,)  # the bound's p_hat is the whole training set: no subsample scale


def _no_vae_options(config: TrainConfig) -> dict[str, Any]:
    return {}


def _keep_points(objective: Any, x: torch.Tensor) -> None:
    """Nothing to do: the objective does not hold the training set."""


@dataclass(frozen=True)
class Recipe:
    """
    How the trainer builds, calls and reports one objective: the one place where the objectives
    differ (everything else, including the inner optimizers of
    :mod:`pyro_fdiv.inference.inner`, goes through one path).

    :param str count: the :class:`TrainConfig` setting that ``num_particles`` (``-k``) sets.
    :param build: ``build(config, train_x, steps_per_epoch)``, the loss given to SVI.
    :param vae: ``vae(config)``, the :class:`~pyro_fdiv.models.vae.VAE` options beyond the
        architecture.
    :param call: ``call(x, num_data, idx)``, the model's and guide's arguments for a minibatch
        ``x`` (rows ``idx``) of the ``num_data`` training images.
    :param bool per_image: the step's loss is summed over the data set (reported per image);
        otherwise it is one number for the whole set (reported as is).
    :param new_points: ``new_points(objective, x)`` when an epoch binarizes the training set
        afresh: what the objective must learn of it.
    """

    count: str
    build: Callable[[TrainConfig, torch.Tensor, int], Any]
    vae: Callable[[TrainConfig], dict[str, Any]] = _no_vae_options
    call: Callable[[torch.Tensor, int, torch.Tensor | None], tuple] = _minibatch
    per_image: bool = True
    new_points: Callable[[Any, torch.Tensor], None] = _keep_points


def _elbo(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> Trace_ELBO:
    return Trace_ELBO(
        num_particles=config.num_elbo_samples, vectorize_particles=True, max_plate_nesting=NESTING
    )


def _iwae(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> IWAE:
    k = config.num_importance_samples
    return IWAE(k, config.gradient_estimator, max_plate_nesting=NESTING)


def _bbalpha(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> BlackBoxAlpha:
    k = config.num_importance_samples
    return BlackBoxAlpha(config.alpha, num_particles=k, max_plate_nesting=NESTING)


def _avb(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> AVB:
    k = config.num_elbo_samples
    return AVB(num_particles=k, adaptive_contrast=k > 1, max_plate_nesting=NESTING)


def _jsa(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> JSA:
    k = config.num_proposals
    return JSA(num_data=len(train_x), num_particles=k, max_plate_nesting=NESTING)


def _fdiv(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> FDivergenceBound:
    start, end, anneal_epochs = config.spread
    schedule = SpreadSchedule(start, end, max(1, int(anneal_epochs * steps_per_epoch)))
    return FDivergenceBound(
        config.f,
        data=train_x,
        spread=schedule,
        num_particles=config.num_bound_samples,
        log_density=config.log_density,
        max_plate_nesting=NESTING,
    )


def _gaussian_decoder(config: TrainConfig) -> dict[str, Any]:
    return {"likelihood": "normal", "obs_scale": config.spread[0]}


def _implicit_encoder(config: TrainConfig) -> dict[str, Any]:
    return {"encoder": "implicit"}


def _replace_points(objective: FDivergenceBound, x: torch.Tensor) -> None:
    cast(EmpiricalData, objective.data).replace_points(x)  # the bound of a training set


#: Each objective's :class:`Recipe` (see the module docstring).
RECIPES: dict[str, Recipe] = {
    "elbo": Recipe("num_elbo_samples", _elbo),
    "iwae": Recipe("num_importance_samples", _iwae),
    "bbalpha": Recipe("num_importance_samples", _bbalpha),
    "avb": Recipe("num_elbo_samples", _avb, vae=_implicit_encoder),
    "jsa": Recipe("num_proposals", _jsa, call=_indexed),
    "fdiv": Recipe(
        "num_bound_samples",
        _fdiv,
        vae=_gaussian_decoder,
        call=_batch_only,
        per_image=False,
        new_points=_replace_points,
    ),
}
OBJECTIVES = tuple(RECIPES)
#: What ``num_particles`` (``-k``) counts for each objective: the setting it sets.
COUNTS = {name: recipe.count for name, recipe in RECIPES.items()}
COUNT_SETTINGS = tuple(dict.fromkeys(COUNTS.values()))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings in today's names: one written before the counts had a setting
    each holds ``num_particles``, the count of its objective."""
    saved = dict(saved)
    if "num_particles" in saved:
        saved.setdefault(COUNTS[saved["objective"]], saved.pop("num_particles"))
    return saved


def build_vae(config: TrainConfig, x_dim: int) -> VAE:
    """The VAE an objective trains (see the module docstring)."""
    kwargs = {**ARCHITECTURES[config.architecture], **RECIPES[config.objective].vae(config)}
    return VAE(x_dim=x_dim, name=config.objective, **kwargs)


def build_objective(config: TrainConfig, train_x: torch.Tensor, steps_per_epoch: int) -> Any:
    """The loss given to SVI."""
    return RECIPES[config.objective].build(config, train_x, steps_per_epoch)


class Trainer:
    """
    One training run: data, model, objective, optimizer, log and checkpoint (see the module
    docstring). :meth:`run` trains the remaining epochs; :meth:`step_losses` is one epoch's
    per-step losses (the unit the resume tests compare).
    """

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.device = torch.device(config.device)
        train_x, test_x, gray = _load(config)
        self.train_x, self.test_x = train_x.to(self.device), test_x.to(self.device)
        self.gray = None if gray is None else gray.to(self.device)
        self.eval_x = fixed_subset(self.test_x, config.num_test)
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)
        self.num_data, self.x_dim = self.train_x.shape
        steps_per_epoch = math.ceil(self.num_data / config.batch_size)
        self.recipe = RECIPES[config.objective]
        self.vae = build_vae(config, self.x_dim).to(self.device)
        self.objective = build_objective(config, self.train_x, steps_per_epoch)
        # the objective's own tensors (JSA's chains, the bound's training set, AVB's
        # discriminator once built) follow the device; SVI.step takes its inner updates
        inner.move(self.objective, self.device)
        self.optim = pyro.optim.Adam({"lr": config.lr})
        compile = config.compile and can_compile(self.objective)
        #: one training step (``SVI.step``'s arguments and result), compiled or eager
        self.step = make_step(
            self.vae.model, self.vae.guide, self.optim, self.objective, compile=compile
        )
        self.svi = self.step.svi
        self.epoch = 0
        self.rows: list[dict[str, Any]] = []
        if (self.out / CHECKPOINT).exists():
            if not resume:
                raise FileExistsError(
                    f"{self.out} already holds a run ({CHECKPOINT}): resume it (resume=True, "
                    "--resume) or choose another output directory"
                )
            self._resume()

    def _resume(self) -> None:
        """Restore the checkpoint, or raise a ``ValueError`` and change nothing (the output
        directory is only written by :meth:`run`)."""
        path = self.out / CHECKPOINT
        payload = checkpoint.read(path)
        extra = payload["extra"]
        kinds = {"epoch": int, "rows": list, "config": dict}
        wrong = [k for k, kind in kinds.items() if not isinstance(extra.get(k), kind)]
        if wrong:
            raise ValueError(
                f"{path} is not a checkpoint of pyro_fdiv.train: its extra entries {wrong} are "
                f"missing or mistyped (expected {kinds})"
            )
        given = self.config.comparable()
        # settings added after the checkpoint was written count as their defaults
        saved = {k: _DEFAULTS[k] for k in given} | _saved_settings(extra["config"])
        saved = {k: v for k, v in saved.items() if k not in FREE_SETTINGS}
        if saved != given:
            changed = {
                k: (saved.get(k), given.get(k))
                for k in sorted(saved.keys() | given.keys())
                if saved.get(k) != given.get(k)
            }
            count = COUNTS[self.config.objective]
            hint = f" ({count} is num_particles, -k, for {self.config.objective})"
            raise ValueError(
                f"Cannot resume {self.out / CHECKPOINT}: settings differ (saved, given): "
                f"{changed}{hint if count in changed else ''}"
            )
        checkpoint.restore(
            payload,
            optim=self.optim,
            objective=self.objective,
            device=self.device,
            modules=self.vae.pyro_modules(),
        )
        self.epoch, self.rows = extra["epoch"], extra["rows"]

    def _args(self, x: torch.Tensor, idx: torch.Tensor | None) -> tuple:
        """The model's and guide's arguments for the minibatch ``x`` (rows ``idx``)."""
        return self.recipe.call(x, self.num_data, idx)

    def _epoch_data(self) -> torch.Tensor:
        if self.gray is None:
            return self.train_x
        return dynamic_binarize(self.gray)  # from the global RNG (checkpointed)

    def step_losses(self) -> list[float]:
        """Train one epoch; the per-step losses (per image, except fdiv's divergence bound)."""
        data = self._epoch_data()
        if self.gray is not None:  # a fresh binarization
            self.recipe.new_points(self.objective, data)
        order = torch.randperm(self.num_data).to(self.device)
        losses = []
        batches = range(0, self.num_data, self.config.batch_size)
        desc = f"{self.config.objective} epoch {self.epoch + 1}"
        # per image: the summed bounds are scaled to the data set; fdiv's bound is one number
        per = self.num_data if self.recipe.per_image else 1
        for start in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            idx = order[start : start + self.config.batch_size]
            losses.append(self.step(*self._args(data[idx], idx)) / per)
        return losses

    def test_log_likelihood(self, num_samples: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image importance-sampling log-likelihood under the Bernoulli reading of the model."""
        x = self.eval_x if x is None else x
        with rng_preserved():
            return log_likelihood(
                self.vae.as_bernoulli().model,
                self.vae.gaussian_proposal(),
                x,
                num_samples=num_samples,
                progress=self.progress,
            )

    def run(self) -> pd.DataFrame:
        """Train until ``config.epochs``, logging and checkpointing each epoch."""
        self.out.mkdir(parents=True, exist_ok=True)
        while self.epoch < self.config.epochs:
            start = time.perf_counter()
            losses = self.step_losses()
            seconds = time.perf_counter() - start
            self.epoch += 1
            test_ll = self.test_log_likelihood(self.config.eval_samples)
            previous = self.rows[-1]["seconds"] if self.rows else 0.0
            self.rows.append(
                {
                    "epoch": self.epoch,
                    "train_objective": -sum(losses) / len(losses),
                    "test_log_lik": float(test_ll.mean()),
                    "test_log_lik_se": float(test_ll.std() / math.sqrt(len(test_ll))),
                    "seconds": previous + seconds,
                }
            )
            self.save()
        return pd.DataFrame(self.rows)

    def save(self) -> None:
        """Write the log and the checkpoint (atomically)."""
        pd.DataFrame(self.rows).to_csv(self.out / LOG, index=False)
        extra = {"epoch": self.epoch, "rows": self.rows, "config": self.config.comparable()}
        checkpoint.save(
            self.out / CHECKPOINT, optim=self.optim, objective=self.objective, extra=extra
        )

    def save_images(self, num: int = 64) -> None:
        """``samples.png`` (decoder means of prior draws) and ``reconstructions.png``."""
        with rng_preserved():
            samples = self.vae.sample(num)
            x = self.eval_x[: num // 2]
            recon = self.vae.reconstruct(x)
        side = math.isqrt(self.x_dim)
        save_image_grid(samples.reshape(-1, side, side), self.out / "samples.png")
        pairs = torch.stack([x, recon], 1).reshape(-1, side, side)
        save_image_grid(pairs, self.out / "reconstructions.png")


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Gray images ``(n, h, w)`` with values in [0, 1] as one PNG grid (1-pixel white gaps)."""
    from matplotlib.image import imsave  # no pyplot: the user's backend is left alone

    n, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(rows * (h + 2), columns * (w + 2))
    for i, image in enumerate(images.detach().cpu().float()):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = image
    imsave(path, grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run :class:`Trainer` and save the image grids; returns the per-epoch log."""
    trainer = Trainer(config, resume=resume, progress=progress)
    log = trainer.run()
    trainer.save_images()
    return log
