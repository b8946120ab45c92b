"""
AVB's log-likelihood gap on the digits model (issue 19, item 3): which of AVB's two numbers is
wrong, its discriminator-based ELBO estimate or the importance-sampling log-likelihood?

``measure`` loads trained runs of :mod:`pyro_fdiv.train` (``benchmarks/digits.py`` writes
them, or ``train`` below) and, on the first ``--num-images`` images of the digits script's
fixed test subset (``fixed_subset(test, ·, seed=4321)``), writes one CSV per stage and run
under ``OUT/per_image/`` (cached: an interrupted measurement resumes stage by stage, chunk by
chunk) and the tables ``OUT/summary.csv`` and ``OUT/paired.csv``:

``is``
    the digits script's estimate: importance sampling with ``--is-samples`` draws per image
    from :meth:`VAE.gaussian_proposal` (the encoder itself for the Gaussian encoder; for the
    implicit one a defensive mixture of a full-covariance Gaussian fitted to 2,000 encoder
    draws and a diagonal one twice as wide).
``ais``
    annealed importance sampling from the prior (:func:`~pyro_fdiv.evaluate.ais_log_likelihood`,
    ``--ais T:M:L``; the AVB paper's setting is 1000:5:10).
``aisq``
    the same AIS started from the digits proposal instead of the prior.
``elbo``
    the ELBO decomposition ``E_q[log p(x|z)] - KL``: for the Gaussian encoder the exact KL; for
    AVB the KL as the trained objective computes it (:class:`~pyro_fdiv.inference.AVB`'s own
    draw, standardization and discriminator, ``K`` particles per draw as in training):
    ``E[log r - log p(z)]`` (the adaptive contrast's diagonal Gaussian ``r``, analytic) plus
    ``E[T]`` (the discriminator, the rest); also with ``r`` from 256 particles.
``density``
    two estimates of ``log q(z|x)`` that need no discriminator: a full-covariance Gaussian
    fitted to ``--fit-draws`` encoder draws per image (and a diagonal one), scored on fresh
    draws, and the change of variables ``log q(z|x) = log N(eps) - log |det dz/deps|`` of the
    encoder ``z = g(x, eps)`` (50 noise dims onto 50 latents). Both can only overestimate the
    entropy of ``q`` (a fitted density's cross-entropy is at least the entropy; a map that is not
    injective has ``q(z)`` at least one branch's density), so each ``E[log p(x|z)] - KL`` is an
    *upper* bound on the true ELBO, in expectation. On the Gaussian encoder (``z = loc + scale
    * eps``) both must give its exact KL: the check of the method.
``fresh`` (AVB)
    a new discriminator, the same architecture, trained for ``--fresh-steps`` steps (Adam,
    ``--fresh-lr`` decayed linearly to 0) on the frozen encoder over the training images, then
    the objective's KL with it; its curve is ``OUT/fresh_<run>.csv``.
``quality``
    :func:`pyro_fdiv.compare.sample_quality` on 10,000 decoder means of prior draws against the
    MNIST test images (the cached classifier of ``benchmarks/sample_quality_classifier.py``),
    one row per run in ``OUT/quality.csv``.

``train`` trains the digits model (``benchmarks/digits.py``'s settings: the IWAE architecture,
binarized MNIST, Adam 1e-3, batch 100, seed 0) with AVB's discriminator schedule as options:
``--adversary-steps`` (discriminator steps per model step), ``--adversary-lr``,
``--adversary-beta1``, ``--warmup`` (discriminator steps before the first model step) and
``--num-particles``. The options are saved in ``OUT/avb_options.json``; ``measure`` rebuilds
the objective from them.

Usage::

    python benchmarks/digits.py --methods elbo --epochs 8 --out RUNS/digits_elbo --threads 1
    python benchmarks/digits.py --methods avb --epochs 8 --out RUNS/digits_avb --threads 1
    python benchmarks/avb_gap.py measure --run vae=RUNS/digits_elbo/elbo \\
        --run avb=RUNS/digits_avb/avb --out docs/experiments/avb_gap --threads 1
    python benchmarks/avb_gap.py train --out RUNS/avb_s5 --adversary-steps 5 --threads 1
    python benchmarks/avb_gap.py smoke --out /tmp/avb_gap_smoke --data DIR   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pyro
import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap
from tqdm.auto import tqdm

from pyro_fdiv import checkpoint
from pyro_fdiv import train as training
from pyro_fdiv.data import fixed_subset
from pyro_fdiv.evaluate import ais_log_likelihood
from pyro_fdiv.inference import AVB
from pyro_fdiv.train import TrainConfig, Trainer
from pyro_fdiv.util import rng_preserved

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
OPTIONS = "avb_options.json"
#: the digits script's AVB: one discriminator step per model step, Adam 1e-3, 256-256 ELU
DEFAULT_OPTIONS = {"adversary_steps": 1, "adversary_lr": 1e-3, "adversary_beta1": 0.9}
STAGES = ("is", "ais", "aisq", "elbo", "density", "fresh", "quality")
LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------
# Runs: AVB's schedule as options of pyro_fdiv.train


def make_avb(config: TrainConfig, options: dict[str, Any]) -> AVB:
    """The digits script's AVB (``pyro_fdiv.train``'s recipe) with the schedule ``options``."""
    k = config.num_elbo_samples
    adam = {"lr": options["adversary_lr"], "betas": (options["adversary_beta1"], 0.999)}
    return AVB(
        num_particles=k,
        adaptive_contrast=k > 1,
        num_adversary_steps=options["adversary_steps"],
        adversary_optim=adam,
        max_plate_nesting=training.NESTING,
    )


@contextlib.contextmanager
def avb_recipe(options: dict[str, Any]) -> Iterator[None]:
    """``pyro_fdiv.train`` builds AVB with ``options`` while the context is open."""
    saved = training.RECIPES["avb"]
    build = lambda config, train_x, steps: make_avb(config, options)  # noqa: E731
    training.RECIPES["avb"] = dataclasses.replace(saved, build=build)
    try:
        yield
    finally:
        training.RECIPES["avb"] = saved


def load_run(run: Path, data: str | None) -> Trainer:
    """The trained run in the directory ``run``, rebuilt from its checkpoint's settings (and
    ``avb_options.json``). Loading clears Pyro's param store: measure one run at a time."""
    extra = checkpoint.read(run / "checkpoint.pt")["extra"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in extra["config"].items() if k in fields}
    config = TrainConfig(**{**saved, "epochs": extra["epoch"], "out": str(run), "data_root": data})
    options = dict(DEFAULT_OPTIONS)
    if (run / OPTIONS).exists():
        options.update(json.loads((run / OPTIONS).read_text()))
    with avb_recipe(options):
        trainer = Trainer(config, resume=True, progress=False)
    trainer.vae.sync_params()
    return trainer


def train_main(args: argparse.Namespace) -> pd.DataFrame:
    """Train (or resume) one run of the digits model with AVB's schedule options."""
    options = {
        "adversary_steps": args.adversary_steps,
        "adversary_lr": args.adversary_lr,
        "adversary_beta1": args.adversary_beta1,
        "warmup": args.warmup,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / OPTIONS
    if path.exists() and json.loads(path.read_text()) != options:
        raise ValueError(f"{path} holds other options: {path.read_text()} (given {options})")
    path.write_text(json.dumps(options))
    config = TrainConfig(
        dataset="binarized-mnist",
        objective=args.objective,
        num_particles=args.num_particles,
        epochs=args.epochs,
        batch_size=100,
        seed=0,
        data_root=args.data,
        num_train=args.num_train,
        num_test=args.num_curve,
        eval_samples=args.curve_samples,
        out=str(args.out),
        compile=not args.no_compile,
    )
    with avb_recipe(options):
        trainer = Trainer(config, resume=True, progress=not args.quiet)
    if trainer.epoch == 0 and args.warmup and args.objective == "avb":
        start = time.perf_counter()
        order = torch.randint(len(trainer.train_x), (args.warmup, config.batch_size))
        for idx in tqdm(order, desc="discriminator warm-up", disable=args.quiet):
            trainer.objective.adversary_step(
                trainer.vae.model, trainer.vae.guide, trainer.train_x[idx], trainer.num_data
            )
        print(f"warm-up: {args.warmup} steps in {time.perf_counter() - start:.0f} s")
    log = trainer.run()
    trainer.save_images()
    print(log.to_string(index=False))
    return log


# ------------------------------------------------------------------------------------------
# The stages: each maps (trainer, images) to one row per image


def _bernoulli_loglik(trainer: Trainer, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    logits = trainer.vae.decoder(z)
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )


def _std_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def stage_is(trainer: Trainer, x: torch.Tensor, args: argparse.Namespace) -> pd.DataFrame:
    values = trainer.test_log_likelihood(args.is_samples, x)
    return pd.DataFrame({"is_log_lik": values.numpy()})


def stage_ais(
    trainer: Trainer, x: torch.Tensor, args: argparse.Namespace, initial: Any = "prior"
) -> pd.DataFrame:
    steps, chains, leapfrog = (int(v) for v in args.ais.split(":"))
    result = ais_log_likelihood(
        trainer.vae.as_bernoulli().model,
        x,
        initial=initial,
        num_chains=chains,
        num_steps=steps,
        num_leapfrog=leapfrog,
        batch_size=len(x),
        progress=not args.quiet,
    )
    return pd.DataFrame(
        {
            "ais_log_lik": result.log_likelihood.numpy(),
            "ais_stderr": result.stderr.numpy(),
            "ais_acceptance": result.acceptance.numpy(),
            "ais_mean_log_w": result.log_weights.mean(0).numpy(),
        }
    )


def stage_aisq(trainer: Trainer, x: torch.Tensor, args: argparse.Namespace) -> pd.DataFrame:
    """AIS started from the digits proposal (:meth:`VAE.gaussian_proposal`) instead of the
    prior: another stochastic lower bound, the same settings."""
    table = stage_ais(trainer, x, args, initial=trainer.vae.gaussian_proposal())
    return table.rename(columns=lambda c: c.replace("ais_", "aisq_"))


@torch.no_grad()
def avb_kl_terms(avb: AVB, trainer: Trainer, x: torch.Tensor, repeats: int) -> pd.DataFrame:
    """Per image, the objective's own terms averaged over ``repeats`` draws of its
    ``num_particles`` particles: ``E[log p(x|z)]``, the analytic part ``E[log r - log p(z)]``
    and the discriminator's part ``E[T]`` of its KL estimate, and its ELBO estimate."""
    vae = trainer.vae
    sums: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        # the objective's draw, standardization and discriminator (its private steps, read here
        # so that this measures exactly what the loss computes)
        draw = avb._prepare(vae.model, vae.guide, (x,), {})
        elbo = avb._elbo(draw)
        z_bar, log_r = avb._standardize(draw.z)
        t = avb._logits(z_bar, draw.x, detach=True)
        log_prior = draw.log_joint - draw.log_lik
        terms = {
            "loglik": draw.log_lik,
            "kl_gauss_part": log_r - log_prior,
            "kl_t_part": t,
            "elbo": elbo,
        }
        assert torch.allclose(elbo, draw.log_lik - terms["kl_gauss_part"] - t, atol=1e-3)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.mean(0) / repeats
    return pd.DataFrame({name: value.numpy() for name, value in sums.items()})


def stage_elbo(trainer: Trainer, x: torch.Tensor, args: argparse.Namespace) -> pd.DataFrame:
    vae = trainer.vae
    if vae.encoder_type == "gaussian":
        loc, scale = vae.encoder(x)
        z = loc + scale * torch.randn((args.elbo_draws, *loc.shape), dtype=loc.dtype)
        loglik = _bernoulli_loglik(trainer, z, x).mean(0)
        kl = (-scale.log() + 0.5 * (scale**2 + loc**2) - 0.5).sum(-1)
        return pd.DataFrame({"loglik": loglik.numpy(), "kl_exact": kl.numpy()})
    avb = trainer.objective
    k = avb.num_particles
    table = avb_kl_terms(avb, trainer, x, max(1, args.elbo_draws // k))
    table = table.rename(columns={c: f"{c}_T" for c in ("kl_gauss_part", "kl_t_part", "elbo")})
    try:  # the adaptive contrast's moments from 256 particles instead of K
        avb.num_particles = 256
        big = avb_kl_terms(avb, trainer, x, 1)
    finally:
        avb.num_particles = k
    table["kl_gauss_part_T256"] = big["kl_gauss_part"]
    table["kl_t_part_T256"] = big["kl_t_part"]
    return table


def _encode(trainer: Trainer, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The encoder's ``z`` for noise ``eps``: ``g(x, eps)``, or ``loc + scale * eps``."""
    vae = trainer.vae
    if vae.encoder_type == "gaussian":
        loc, scale = vae.encoder(x)
        return loc + scale * eps
    return vae.encoder(x, eps)


def _encoder_draws(trainer: Trainer, x: torch.Tensor, num: int, chunk: int = 500):
    """``num`` draws ``(eps, z)`` of the encoder for each image, ``(num, B, ·)``."""
    dim = getattr(trainer.vae.encoder, "noise_dim", trainer.vae.z_dim)
    eps, z = [], []
    for done in range(0, num, chunk):
        e = torch.randn((min(chunk, num - done), len(x), dim), dtype=x.dtype)
        eps.append(e)
        z.append(_encode(trainer, x, e))
    return torch.cat(eps), torch.cat(z)


def log_abs_det_jacobian(trainer: Trainer, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``log |det dz/deps|`` of the encoder at each ``(eps[s, n], x[n])``."""
    jac = vmap(jacrev(lambda e, xi: _encode(trainer, xi, e)))
    s, b, d = eps.shape
    flat_eps, flat_x = eps.reshape(s * b, d), x.expand(s, *x.shape).reshape(s * b, -1)
    out = [
        torch.linalg.slogdet(jac(flat_eps[i : i + 2000], flat_x[i : i + 2000])).logabsdet
        for i in range(0, s * b, 2000)
    ]
    return torch.cat(out).reshape(s, b)


def stage_density(trainer: Trainer, x: torch.Tensor, args: argparse.Namespace) -> pd.DataFrame:
    """Estimates of ``log q(z|x)`` without a discriminator (see the module docstring)."""
    _, z_fit = _encoder_draws(trainer, x, args.fit_draws)
    loc = z_fit.mean(0)
    centred = z_fit - loc
    cov = torch.einsum("sbi,sbj->bij", centred, centred) / (len(z_fit) - 1)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    full = torch.distributions.MultivariateNormal(loc, cov + 1e-6 * eye)
    sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
    eps, z = _encoder_draws(trainer, x, args.test_draws)  # fresh draws: held-out scores
    log_full, log_diag = full.log_prob(z), torch.distributions.Normal(loc, sd).log_prob(z).sum(-1)
    log_prior, loglik = _std_normal(z), _bernoulli_loglik(trainer, z, x)
    j = args.jacobian_draws
    log_det = log_abs_det_jacobian(trainer, x, eps[:j])
    log_q_jac = _std_normal(eps[:j]) - log_det
    log_w_jac = loglik[:j] + log_prior[:j] - log_q_jac
    kl_jac = log_q_jac - log_prior[:j]
    return pd.DataFrame(
        {
            "loglik": loglik.mean(0).numpy(),
            "heldout_log_q_full": log_full.mean(0).numpy(),
            "heldout_log_q_diag": log_diag.mean(0).numpy(),
            "log_q_jac": log_q_jac.mean(0).numpy(),
            "kl_full": (log_full - log_prior).mean(0).numpy(),
            "kl_diag": (log_diag - log_prior).mean(0).numpy(),
            "kl_jac": kl_jac.mean(0).numpy(),
            "kl_jac_se": (kl_jac.std(0) / math.sqrt(j)).numpy(),
            "log_det_sd": log_det.std(0).numpy(),
            "is_jac": (torch.logsumexp(log_w_jac, 0) - math.log(j)).numpy(),
            "eig_min_full": torch.linalg.eigvalsh(cov)[..., 0].numpy(),
            "log_det_cov_full": torch.linalg.slogdet(cov).logabsdet.numpy(),
        }
    )


def fresh_discriminator(
    trainer: Trainer, x_eval: torch.Tensor, args: argparse.Namespace, work: Path
) -> tuple[AVB, pd.DataFrame]:
    """A new discriminator trained on the frozen encoder; resumes from ``work`` every
    ``--fresh-every`` steps (from the saved state, not bit for bit)."""
    trained: AVB = trainer.objective
    fresh = AVB(
        num_particles=trained.num_particles,
        adaptive_contrast=trained.adaptive_contrast,
        adversary_optim={"lr": args.fresh_lr},
        max_plate_nesting=training.NESTING,
    )
    vae = trainer.vae
    state_path, curve_path = work / "state.pt", work / "curve.csv"
    step, rows = 0, []
    if state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        step, rows = saved["step"], saved["rows"]
        fresh.discriminator_loss(vae.model, vae.guide, x_eval[:2])  # builds it
        fresh.load_state_dict(saved["objective"])
        torch.set_rng_state(saved["rng"])
    else:
        torch.manual_seed(args.seed + 1)
    n = len(trainer.train_x)
    bar = tqdm(total=args.fresh_steps, initial=step, desc="fresh discriminator", disable=args.quiet)
    losses: list[float] = []
    while True:
        if step % args.fresh_every == 0 or step == args.fresh_steps:
            kl = avb_kl_terms(fresh, trainer, x_eval[: args.fresh_eval_images], 2)
            rows.append(
                {
                    "step": step,
                    "adversary_loss": sum(losses) / len(losses) if losses else math.nan,
                    "kl_T": float((kl.loglik - kl.elbo).mean()),
                    "kl_t_part": float(kl.kl_t_part.mean()),
                }
            )
            losses = []
            work.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(curve_path, index=False)
            torch.save(
                {
                    "step": step,
                    "rows": rows,
                    "objective": fresh.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                state_path,
            )
        if step >= args.fresh_steps:
            break
        idx = torch.randint(n, (100,))
        for group in fresh.adversary_optim.param_groups if fresh.adversary_optim else []:
            group["lr"] = args.fresh_lr * (1 - step / args.fresh_steps)
        losses.append(fresh.adversary_step(vae.model, vae.guide, trainer.train_x[idx]))
        step += 1
        bar.update()
    bar.close()
    return fresh, pd.DataFrame(rows)


def stage_fresh(
    trainer: Trainer, x: torch.Tensor, args: argparse.Namespace, fresh: AVB
) -> pd.DataFrame:
    table = avb_kl_terms(fresh, trainer, x, max(1, args.elbo_draws // fresh.num_particles))
    return pd.DataFrame(
        {
            "kl_gauss_part_fresh": table.kl_gauss_part,
            "kl_t_part_fresh": table.kl_t_part,
            "elbo_fresh": table.elbo,
        }
    )


# ------------------------------------------------------------------------------------------
# Measurement driver


def cached_chunks(
    path: Path, x: torch.Tensor, chunk: int, fn: Callable[[torch.Tensor], pd.DataFrame]
) -> pd.DataFrame:
    """``fn`` over ``x`` in chunks of ``chunk`` images, each chunk cached at
    ``path.<start>.csv`` until all are done, then joined in ``path``."""
    if path.exists():
        return pd.read_csv(path)
    parts = []
    for start in range(0, len(x), chunk):
        part = path.with_suffix(f".{start}.csv")
        if not part.exists():
            t0 = time.perf_counter()
            with torch.no_grad() if not path.name.startswith("ais") else contextlib.nullcontext():
                table = fn(x[start : start + chunk])
            table.insert(0, "image", range(start, start + len(table)))
            table["seconds"] = time.perf_counter() - t0
            table.to_csv(part, index=False)
        parts.append(pd.read_csv(part))
    table = pd.concat(parts, ignore_index=True)
    table.to_csv(path, index=False)
    for start in range(0, len(x), chunk):
        path.with_suffix(f".{start}.csv").unlink()
    return table


def quality_row(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    from pyro_fdiv.compare.sample_quality import (
        classifier_outputs,
        default_cache_path,
        load_or_train_classifier,
        sample_quality,
    )
    from pyro_fdiv.data import load_mnist

    cache = default_cache_path()
    if not cache.is_file():
        raise FileNotFoundError(
            f"no cached classifier at {cache}: run benchmarks/sample_quality_classifier.py first"
        )
    classifier = load_or_train_classifier(cache, args.mnist_data)
    test_x, _ = load_mnist(args.mnist_data, "test", dtype=torch.float32)
    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    reference = test_x[order[:10_000]]
    with rng_preserved():
        torch.manual_seed(0)  # sample_quality_classifier.py's decoder_means, seed 0
        samples = trainer.vae.sample(10_000).float().clamp(0, 1)
    _, features = classifier_outputs(classifier, reference)
    return dict(sample_quality(samples, classifier, reference, test_features=features))


def measure_main(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {list(STAGES)}")
    per_image = args.out / "per_image"
    per_image.mkdir(parents=True, exist_ok=True)
    runs = dict(item.split("=", 1) for item in args.run)
    for name, run in runs.items():
        trainer = load_run(Path(run), args.data)
        x = fixed_subset(trainer.test_x, args.num_images, seed=4321)
        implicit = trainer.vae.encoder_type == "implicit"
        print(f"{name}: {trainer.config.objective}, {trainer.epoch} epochs, {len(x)} images")
        for stage in stages:
            if (stage == "fresh" and not implicit) or stage == "quality":
                continue
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            path = per_image / f"{stage}_{name}.csv"
            if stage == "fresh":
                if path.exists():
                    continue
                fresh, curve = fresh_discriminator(trainer, x, args, args.work / f"fresh_{name}")
                curve.to_csv(args.out / f"fresh_{name}.csv", index=False)
                fn = functools.partial(stage_fresh, trainer, args=args, fresh=fresh)
            else:
                fn = functools.partial(globals()[f"stage_{stage}"], trainer, args=args)
            cached_chunks(path, x, args.chunk, fn)
            print(f"  {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
        if "quality" in stages:
            path = per_image.parent / "quality.csv"
            table = pd.read_csv(path, index_col=0) if path.exists() else None
            if table is None or name not in table.index:
                from pyro_fdiv.compare.sample_quality import quality_table

                t0 = time.perf_counter()
                row = quality_table({name: quality_row(trainer, args)})
                table = row if table is None else pd.concat([table, row])
                table.to_csv(path)
                print(f"  quality: {time.perf_counter() - t0:.0f} s", flush=True)
    summary, paired = summarize(args.out, list(runs))
    return summary, paired


# ------------------------------------------------------------------------------------------
# Tables and figure


def _mean_se(values: pd.Series) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def per_image_table(out: Path, name: str) -> pd.DataFrame:
    """All stages' per-image columns of one run, with the derived ELBOs and KLs."""
    tables = []
    for stage in STAGES:
        path = out / "per_image" / f"{stage}_{name}.csv"
        if path.exists():
            t = pd.read_csv(path).set_index("image").drop(columns="seconds")
            if stage == "density":
                t = t.rename(columns={"loglik": "loglik_density"})
            tables.append(t)
    if not tables:
        return pd.DataFrame()
    t = pd.concat(tables, axis=1)
    if "kl_exact" in t:
        t["elbo_exact"] = t.loglik - t.kl_exact
    if "elbo_T" in t:
        t["kl_T"] = t.loglik - t.elbo_T
        t["kl_T256"] = t.kl_gauss_part_T256 + t.kl_t_part_T256
        t["elbo_T256"] = t.loglik - t.kl_T256
    if "elbo_fresh" in t:
        t["kl_fresh"] = t.kl_gauss_part_fresh + t.kl_t_part_fresh
    if "kl_full" in t:
        for kind in ("full", "diag", "jac"):
            t[f"elbo_{kind}"] = t.loglik_density - t[f"kl_{kind}"]
    return t


#: the summary's rows: (column, meaning)
SUMMARY_ROWS = [
    ("is_log_lik", "log p(x): IS, digits proposal, K=5000"),
    ("ais_log_lik", "log p(x): AIS from the prior"),
    ("ais_acceptance", "AIS mean HMC acceptance"),
    ("aisq_log_lik", "log p(x): AIS from the digits proposal"),
    ("loglik", "E_q log p(x|z)"),
    ("kl_exact", "KL(q||p), exact (Gaussian encoder)"),
    ("elbo_exact", "ELBO, exact KL"),
    ("kl_T", "KL: trained discriminator (objective, K=8)"),
    ("kl_gauss_part_T", "  of which E[log r - log p(z)], analytic"),
    ("kl_t_part_T", "  of which E[T]"),
    ("elbo_T", "ELBO: trained discriminator (objective)"),
    ("kl_T256", "KL: trained discriminator, r from 256 draws"),
    ("kl_fresh", "KL: fresh discriminator trained long"),
    ("kl_t_part_fresh", "  of which E[T]"),
    ("elbo_fresh", "ELBO: fresh discriminator"),
    ("kl_diag", "KL: diagonal Gaussian fit (lower bound on KL)"),
    ("kl_full", "KL: full-covariance Gaussian fit (lower bound on KL)"),
    ("kl_jac", "KL: change of variables (lower bound, exact if injective)"),
    ("elbo_full", "ELBO upper bound: full Gaussian fit"),
    ("elbo_jac", "ELBO upper bound: change of variables"),
    ("heldout_log_q_full", "held-out E log q_fit(z): full Gaussian"),
    ("heldout_log_q_diag", "held-out E log q_fit(z): diagonal Gaussian"),
    ("log_q_jac", "E log q(z) by change of variables"),
    ("is_jac", "IS with q by change of variables (S=jacobian draws)"),
    ("log_det_cov_full", "log det Cov_q(z)"),
    ("eig_min_full", "smallest eigenvalue of Cov_q(z)"),
]

#: paired differences: (name, run a, column a, run b, column b); run None: every run
PAIRS = [
    ("AIS - IS", None, "ais_log_lik", None, "is_log_lik"),
    ("AIS(proposal) - AIS(prior)", None, "aisq_log_lik", None, "ais_log_lik"),
    ("ELBO_T - AIS", None, "elbo_T", None, "ais_log_lik"),
    ("ELBO_T - ELBO_jac", None, "elbo_T", None, "elbo_jac"),
    ("ELBO_T - ELBO_full", None, "elbo_T", None, "elbo_full"),
    ("KL_jac - KL_T", None, "kl_jac", None, "kl_T"),
    ("KL_jac - KL_fresh", None, "kl_jac", None, "kl_fresh"),
    ("KL_jac - KL_full", None, "kl_jac", None, "kl_full"),
    ("AIS - ELBO_jac", None, "ais_log_lik", None, "elbo_jac"),
    ("AIS - ELBO_exact", None, "ais_log_lik", None, "elbo_exact"),
]


def summarize(out: Path, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    tables = {name: per_image_table(out, name) for name in names}
    rows = []
    for column, meaning in SUMMARY_ROWS:
        row: dict[str, Any] = {"quantity": meaning, "column": column}
        for name, t in tables.items():
            if column in t:
                row[name], row[f"{name}_se"] = _mean_se(t[column])
        if len(row) > 2:
            rows.append(row)
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)
    pairs = []
    for label, _, col_a, _, col_b in PAIRS:
        for name, t in tables.items():
            if col_a in t and col_b in t:
                diff = t[col_a] - t[col_b]
                mean, se = _mean_se(diff)
                pairs.append(
                    {"difference": label, "run": name, "mean": mean, "se": se, "n": len(diff)}
                )
    base = names[0]
    for name in names[1:]:  # every other run against the first, same images
        for col in ("is_log_lik", "ais_log_lik", "aisq_log_lik"):
            if col in tables[name] and col in tables[base]:
                diff = tables[name][col] - tables[base][col]
                mean, se = _mean_se(diff)
                frac = float((diff > 0).mean())
                pairs.append(
                    {
                        "difference": f"{col}: {name} - {base}",
                        "run": name,
                        "mean": mean,
                        "se": se,
                        "n": len(diff),
                        "fraction_positive": frac,
                    }
                )
    paired = pd.DataFrame(pairs)
    paired.to_csv(out / "paired.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.round(3).to_string(index=False))
        print(paired.round(3).to_string(index=False))
    plot(out, tables)
    return summary, paired


def plot(out: Path, tables: dict[str, pd.DataFrame]) -> None:
    """``kl_estimates.png``: per image, the discriminators' KL against the change of variables;
    and each fresh discriminator's KL estimate over its training steps."""
    implicit = {n: t for n, t in tables.items() if "kl_jac" in t and "kl_T" in t}
    if not implicit:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for name, t in implicit.items():
        ax.scatter(t.kl_jac, t.kl_T, s=6, label=f"{name}: trained T")
        if "kl_fresh" in t:
            ax.scatter(t.kl_jac, t.kl_fresh, s=6, marker="x", label=f"{name}: fresh T")
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xlabel="KL(q||p) by change of variables (nats)", ylabel="discriminator's KL (nats)")
    ax.set_title("per test image", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    for name, t in implicit.items():
        curve_path = out / f"fresh_{name}.csv"
        if curve_path.exists():
            curve = pd.read_csv(curve_path)
            (line,) = ax.plot(curve.step, curve.kl_T, marker=".", label=f"{name}: fresh T")
            ax.axhline(t.kl_T.mean(), color=line.get_color(), ls=":", label=f"{name}: trained T")
            ax.axhline(t.kl_jac.mean(), color=line.get_color(), ls="--", label=f"{name}: jac")
            ax.axhline(
                t.kl_full.mean(), color=line.get_color(), ls="-.", label=f"{name}: Gaussian fit"
            )
    ax.set(xlabel="discriminator steps on the frozen encoder", ylabel="mean KL estimate (nats)")
    ax.set_title("lines: means over the test images (the curve: its first 100)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kl_estimates.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True)
    common.add_argument("--data", default=os.environ.get("PYRO_FDIV_DATA", str(SHARED_DATA)))
    common.add_argument("--threads", type=int, default=1)
    common.add_argument("--quiet", action="store_true")
    common.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", parents=[common], help="train the digits model")
    t.add_argument("--objective", default="avb", choices=["avb", "elbo"])
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--num-particles", type=int, default=8)
    t.add_argument("--adversary-steps", type=int, default=1)
    t.add_argument("--adversary-lr", type=float, default=1e-3)
    t.add_argument("--adversary-beta1", type=float, default=0.9)
    t.add_argument("--warmup", type=int, default=0, help="discriminator steps before training")
    t.add_argument("--num-train", type=int, default=None)
    t.add_argument("--num-curve", type=int, default=200)
    t.add_argument("--curve-samples", type=int, default=200)
    t.add_argument("--no-compile", action="store_true")

    m = sub.add_parser("measure", parents=[common], help="measure trained runs")
    m.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR, repeated")
    m.add_argument("--stages", default=",".join(STAGES))
    m.add_argument("--num-images", type=int, default=200)
    m.add_argument("--chunk", type=int, default=100, help="images per cached chunk")
    m.add_argument("--is-samples", type=int, default=5000)
    m.add_argument("--ais", default="1000:5:10", help="T:M:L")
    m.add_argument("--elbo-draws", type=int, default=256)
    m.add_argument("--fit-draws", type=int, default=5000)
    m.add_argument("--test-draws", type=int, default=2000)
    m.add_argument("--jacobian-draws", type=int, default=200)
    m.add_argument("--fresh-steps", type=int, default=10_000)
    m.add_argument("--fresh-lr", type=float, default=1e-3)
    m.add_argument("--fresh-every", type=int, default=1000)
    m.add_argument("--fresh-eval-images", type=int, default=100)
    m.add_argument("--work", type=Path, default=None, help="fresh discriminators' states")
    m.add_argument("--mnist-data", default=None, help="holds mnist/ (default: --data)")

    sub.add_parser("smoke", parents=[common], help="tiny runs and measurements (seconds)")
    args = parser.parse_args(argv)
    if args.command == "measure":
        args.work = args.work or args.out / "work"
        args.mnist_data = args.mnist_data or args.data
    return args


def smoke_main(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train a VAE and AVB for one epoch on ``--data`` (any binarized-MNIST-like file) and run
    every stage but ``quality`` with tiny sizes."""
    base = ["--out", "", "--data", args.data, "--quiet", "--threads", str(args.threads)]
    tiny = ["--epochs", "1", "--num-curve", "4", "--curve-samples", "4", "--no-compile"]
    for objective in ("elbo", "avb"):
        base[1] = str(args.out / objective)
        train_main(parse_args(["train", *base, "--objective", objective, *tiny, "--warmup", "2"]))
    base[1] = str(args.out / "measure")
    measure = ["measure", *base, "--run", f"vae={args.out / 'elbo'}"]
    measure += ["--run", f"avb={args.out / 'avb'}", "--stages", "is,ais,aisq,elbo,density,fresh"]
    measure += ["--num-images", "6", "--chunk", "4", "--is-samples", "20", "--ais", "4:2:2"]
    measure += ["--elbo-draws", "16", "--fit-draws", "60", "--test-draws", "30"]
    measure += ["--jacobian-draws", "5", "--fresh-steps", "4", "--fresh-every", "2"]
    measure += ["--fresh-eval-images", "3"]
    return measure_main(parse_args(measure))


def main(argv: list[str] | None = None) -> Any:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    if args.command == "train":
        return train_main(args)
    if args.command == "measure":
        return measure_main(args)
    return smoke_main(args)


if __name__ == "__main__":
    main()
