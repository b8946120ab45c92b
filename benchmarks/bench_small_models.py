"""Time one training step on small models: hand-written PyTorch (eager and compiled), pyro_fdiv
eager and compiled (through SVI and make_step), Pyro's ELBOs; with the first-step (compile)
time and the peak memory of a step.

Run ``python benchmarks/bench_small_models.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_feasible
from torch._dynamo.utils import counters
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vae_step  # the VAE, its data, its hand-written step and memory measure

from pyro_fdiv.inference import IWAE, make_step
from pyro_fdiv.models import eight_schools

__all__ = [
    "METHODS",
    "MODELS",
    "Bench",
    "build_bench",
    "handwritten_step",
    "main",
    "make_method",
    "run_block",
]

METHODS = (
    "handwritten",
    "handwritten-compiled",
    "iwae",
    "iwae-compile-svi",
    "iwae-make-step",
    "trace_elbo",
    "renyi",
    "jit_trace_elbo",
    "numpyro",
)
MODELS = ("eight_schools", "logistic", "hierarchical", "vae")
REFERENCE = "handwritten"
Step = Callable[[], float]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_INV_SOFTPLUS_01 = math.log(math.expm1(0.1))  # AutoNormal's and AutoMVN's init_scale=0.1


def _normal_log_prob(x, loc, scale):
    if isinstance(scale, torch.Tensor):
        return -((x - loc) ** 2) / (2 * scale**2) - scale.log() - _LOG_SQRT_2PI
    return -((x - loc) ** 2) / (2 * scale**2) - math.log(scale) - _LOG_SQRT_2PI


def _half_cauchy_log_prob(x, scale: float):
    return math.log(2 / (math.pi * scale)) - torch.log1p((x / scale) ** 2)


def _neg_iwae(log_w: torch.Tensor) -> torch.Tensor:
    """The negated IWAE bound ``-(logsumexp_k log w_k - log K)`` over dim 0."""
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))


@dataclass
class Bench:
    """
    One benchmark model: its Pyro model and guide and the same model, guide and IWAE bound as
    plain tensor math.

    ``loss(params, K)`` draws its noise in the order and shapes that the guide (and the
    subsampling plate) draw theirs, so after the same seed it sees the same draws as
    ``IWAE(num_particles=K, vectorize_particles=True)`` on ``pyro_pair``.
    """

    name: str
    particles: tuple[int, ...]
    #: ``name -> (model, guide)``, with the guide's (or networks') parameters under ``name``
    pyro_pair: Callable[[str], tuple[Callable, Callable]]
    args: tuple
    #: the hand-written step's unconstrained parameters, equal to the guide's initial ones
    init_params: Callable[[], list[torch.Tensor]]
    loss: Callable[[Sequence[torch.Tensor], int], torch.Tensor]
    lr: float
    #: an eager reference step other than the generic one (the VAE's, from bench_vae_step)
    handwritten_eager: Callable[[int], Step] | None = None


# ----------------------------------------------------------------------------------------------
# Eight Schools, non-centered, AutoNormal


def _eight_schools_loss(params, num_particles, y, sigma):
    r"""
    The negated IWAE bound of AutoNormal on non-centered Eight Schools, as plain tensor math.
    ``params`` are AutoNormal's unconstrained locs and scales (softplus) of ``mu``, ``tau`` and
    ``theta_tilde``; ``tau = exp(log_tau)`` adds its Jacobian to :math:`\log q`.
    """
    loc_mu, scale_mu, loc_tau, scale_tau, loc_th, scale_th = params
    k = num_particles
    scales = F.softplus(torch.stack([scale_mu, scale_tau]))
    scale_th = F.softplus(scale_th)
    eps_mu, eps_tau, eps_th = torch.randn(k), torch.randn(k), torch.randn(k, 8)
    mu = loc_mu + scales[0] * eps_mu
    log_tau = loc_tau + scales[1] * eps_tau
    theta_tilde = loc_th + scale_th * eps_th
    tau = log_tau.exp()
    log_q = (
        -0.5 * (eps_mu.pow(2) + eps_tau.pow(2) + eps_th.pow(2).sum(-1))
        - scales.log().sum()
        - scale_th.log().sum()
        - 10 * _LOG_SQRT_2PI
        - log_tau  # the Jacobian of tau = exp(log_tau)
    )
    log_p = (
        _normal_log_prob(mu, 0.0, 5.0)
        + _half_cauchy_log_prob(tau, 5.0)
        + (-0.5 * theta_tilde.pow(2) - _LOG_SQRT_2PI).sum(-1)
        + _normal_log_prob(y, mu[:, None] + tau[:, None] * theta_tilde, sigma).sum(-1)
    )
    return _neg_iwae(log_p - log_q)


def eight_schools_bench() -> Bench:
    dtype = torch.get_default_dtype()
    y, sigma = eight_schools.Y.to(dtype), eight_schools.SIGMA.to(dtype)

    def pyro_pair(name):
        guide = AutoNormal(eight_schools.model)
        guide._pyro_name = name  # its own parameters in the shared param store
        return eight_schools.model, guide

    def init_params():
        return [
            torch.zeros(()),
            torch.full((), _INV_SOFTPLUS_01),
            torch.zeros(()),
            torch.full((), _INV_SOFTPLUS_01),
            torch.zeros(8),
            torch.full((8,), _INV_SOFTPLUS_01),
        ]

    return Bench(
        "eight_schools",
        (1, 64),
        pyro_pair,
        (),
        init_params,
        lambda ps, k: _eight_schools_loss(ps, k, y, sigma),
        lr=0.01,
    )


# ----------------------------------------------------------------------------------------------
# Bayesian logistic regression, 10,000 x 20, 256-point subsampling, AutoNormal

LOGISTIC_N, LOGISTIC_D, LOGISTIC_B = 10_000, 20, 256


def logistic_model(x: torch.Tensor, y: torch.Tensor) -> None:
    r"""
    :math:`w \sim \mathcal{N}(0, I_{20})`, :math:`b \sim \mathcal{N}(0, 1)`,
    :math:`y_i \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(x_i^\top w + b))`, with a 256-point
    subsample of the ``len(x)`` points per step (scaled by ``N / 256``).
    """
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=LOGISTIC_B, dim=-1) as idx:
        # w @ x^T as the reference computes it; under a particle plate w is (K, 1, D): its
        # plate dim (size 1) becomes the data dim
        logits = w @ x[idx].T
        logits = (logits.squeeze(-2) if w.dim() > 1 else logits) + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])


def _logistic_loss(params, num_particles, x, y):
    r"""
    The nested IWAE bound of AutoNormal on :func:`logistic_model` (global latents under a
    subsampled plate), negated:
    :math:`-\log \frac1K \sum_k \exp[\log p(w_k) - \log q(w_k)
    + \frac{N}{B}\sum_{i \in S} \log p(y_i \mid x_i, w_k)]`.
    """
    loc_w, scale_w, loc_b, scale_b = params
    k, n = num_particles, x.shape[0]
    scale_w, scale_b = F.softplus(scale_w), F.softplus(scale_b)
    eps_w, eps_b = torch.randn(k, x.shape[1]), torch.randn(k)
    idx = torch.randperm(n)[:LOGISTIC_B]  # the plate's subsample, drawn after the guide's noise
    w = loc_w + scale_w * eps_w
    b = loc_b + scale_b * eps_b
    log_q = (
        (-0.5 * eps_w.pow(2) - scale_w.log() - _LOG_SQRT_2PI).sum(-1)
        - 0.5 * eps_b.pow(2)
        - scale_b.log()
        - _LOG_SQRT_2PI
    )
    log_prior = (-0.5 * w.pow(2) - _LOG_SQRT_2PI).sum(-1) - 0.5 * b.pow(2) - _LOG_SQRT_2PI
    logits = w @ x[idx].T + b[:, None]  # (K, B)
    y_sub = y[idx].expand_as(logits)
    log_lik = -F.binary_cross_entropy_with_logits(logits, y_sub, reduction="none").sum(-1)
    return _neg_iwae(log_prior - log_q + n / LOGISTIC_B * log_lik)


def logistic_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 10,000 x 20 standard-normal features and labels from a fixed true weight."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    x = torch.randn(LOGISTIC_N, LOGISTIC_D, generator=generator, dtype=dtype)
    w_true = torch.randn(LOGISTIC_D, generator=generator, dtype=dtype) / 2
    p = torch.sigmoid(x @ w_true + 0.5)
    y = torch.bernoulli(p, generator=generator)
    return x, y


def logistic_bench() -> Bench:
    x, y = logistic_data()

    def pyro_pair(name):
        guide = AutoNormal(logistic_model)
        guide._pyro_name = name
        return logistic_model, guide

    def init_params():
        return [
            torch.zeros(LOGISTIC_D),
            torch.full((LOGISTIC_D,), _INV_SOFTPLUS_01),
            torch.zeros(()),
            torch.full((), _INV_SOFTPLUS_01),
        ]

    return Bench(
        "logistic",
        (1, 64),
        pyro_pair,
        (x, y),
        init_params,
        lambda ps, k: _logistic_loss(ps, k, x, y),
        lr=0.01,
    )


# ----------------------------------------------------------------------------------------------
# Hierarchical normal model (10 groups, 300 points), AutoMultivariateNormal

HIER_GROUPS, HIER_N = 10, 300
HIER_LATENT = 3 + HIER_GROUPS  # mu, log tau, log sigma, theta


def hierarchical_model(group: torch.Tensor, y: torch.Tensor) -> None:
    r"""
    :math:`\mu \sim \mathcal{N}(0, 5^2)`, :math:`\tau \sim \mathrm{HalfCauchy}(5)`,
    :math:`\sigma \sim \mathrm{HalfNormal}(1)`,
    :math:`\theta_g \sim \mathcal{N}(\mu, \tau^2)` for 10 groups,
    :math:`y_i \sim \mathcal{N}(\theta_{g_i}, \sigma^2)` (centered; a radon-style model).
    """
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(y.new_tensor(1.0)))
    with pyro.plate("groups", HIER_GROUPS, dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("data", y.shape[0], dim=-1):
        pyro.sample("y", dist.Normal(theta[..., group], sigma), obs=y)


def _hierarchical_loss(params, num_particles, group, y):
    r"""
    The negated IWAE bound of AutoMultivariateNormal on :func:`hierarchical_model`:
    :math:`z = \mathrm{loc} + L\epsilon`, :math:`L = \mathrm{diag}(s)\,(\mathrm{tril}(R, -1) + I)`
    with :math:`s = \mathrm{softplus}`, the latent order ``mu, log tau, log sigma, theta``, and
    the Jacobians of ``tau = exp(.)`` and ``sigma = exp(.)`` in :math:`\log q`.
    """
    loc, scale, raw_tril = params
    scale = F.softplus(scale)
    scale_tril = scale[:, None] * (raw_tril.tril(-1) + torch.eye(HIER_LATENT))
    eps = torch.randn(num_particles, HIER_LATENT)
    z = loc + eps @ scale_tril.T
    mu, log_tau, log_sigma, theta = z[:, 0], z[:, 1], z[:, 2], z[:, 3:]
    tau, sigma = log_tau.exp(), log_sigma.exp()
    log_q = (
        -0.5 * eps.pow(2).sum(-1)
        - scale.log().sum()
        - HIER_LATENT * _LOG_SQRT_2PI
        - log_tau
        - log_sigma
    )
    log_p = (
        _normal_log_prob(mu, 0.0, 5.0)
        + _half_cauchy_log_prob(tau, 5.0)
        + math.log(2.0)
        + _normal_log_prob(sigma, 0.0, 1.0)
        + _normal_log_prob(theta, mu[:, None], tau[:, None]).sum(-1)
        + _normal_log_prob(y, theta[:, group], sigma[:, None]).sum(-1)
    )
    return _neg_iwae(log_p - log_q)


def hierarchical_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """300 points in 10 groups (``i mod 10``), group means ~ N(0.5, 1), noise sd 0.8."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    group = torch.arange(HIER_N) % HIER_GROUPS
    theta = 0.5 + torch.randn(HIER_GROUPS, generator=generator, dtype=dtype)
    y = theta[group] + 0.8 * torch.randn(HIER_N, generator=generator, dtype=dtype)
    return group, y


def hierarchical_bench() -> Bench:
    group, y = hierarchical_data()

    def pyro_pair(name):
        guide = AutoMultivariateNormal(hierarchical_model, init_loc_fn=init_to_feasible)
        guide._pyro_name = name
        return hierarchical_model, guide

    def init_params():
        return [
            torch.zeros(HIER_LATENT),
            torch.full((HIER_LATENT,), _INV_SOFTPLUS_01),
            torch.zeros(HIER_LATENT, HIER_LATENT),  # unit_lower_cholesky's inverse of the eye
        ]

    return Bench(
        "hierarchical",
        (1, 64),
        pyro_pair,
        (group, y),
        init_params,
        lambda ps, k: _hierarchical_loss(ps, k, group, y),
        lr=0.01,
    )


# ----------------------------------------------------------------------------------------------
# The VAE of bench_vae_step.py (batch 128 binarized MNIST)


def vae_bench(data: Path | None = bench_vae_step.DEFAULT_DATA) -> Bench:
    x = torch.from_numpy(bench_vae_step.load_batch(data)).to(torch.get_default_dtype())
    init = bench_vae_step._initial_vae(0).to(torch.get_default_dtype())
    names = [name for name, _ in init.named_parameters()]

    def pyro_pair(name):
        vae = bench_vae_step._copy_vae(init, name=name, device=x.device)
        return vae.model, vae.guide

    def loss(params, k):  # bench_vae_step's loss, the networks run on ``params``
        values = dict(zip(names, params, strict=True))
        parts = {
            part: {n.removeprefix(f"{part}."): v for n, v in values.items() if n.startswith(part)}
            for part in ("encoder", "decoder")
        }

        def encoder(inputs):
            return torch.func.functional_call(init.encoder, parts["encoder"], (inputs,))

        def decoder(z):
            return torch.func.functional_call(init.decoder, parts["decoder"], (z,))

        return _neg_iwae(bench_vae_step.iwae_log_weights(encoder, decoder, x, k)).sum()

    def eager(k):
        vae = bench_vae_step._copy_vae(init, name="handwritten", device=x.device)
        return bench_vae_step.make_handwritten_step(vae, x, k, lr=bench_vae_step.LR)

    return Bench(
        "vae",
        (1, 8, 64),
        pyro_pair,
        (x,),
        lambda: [p.detach().clone() for p in init.parameters()],
        loss,
        lr=bench_vae_step.LR,
        handwritten_eager=eager,
    )


def build_bench(name: str) -> Bench:
    """The benchmark model ``name`` (one of :data:`MODELS`), built in the default dtype."""
    builders = {
        "eight_schools": eight_schools_bench,
        "logistic": logistic_bench,
        "hierarchical": hierarchical_bench,
        "vae": vae_bench,
    }
    if name not in builders:
        raise ValueError(f"Expected model in {MODELS}, actual {name!r}")
    return builders[name]()


# ----------------------------------------------------------------------------------------------
# Steps


def handwritten_step(
    bench: Bench, num_particles: int, compiled: bool, compile_options: dict | None = None
) -> Step:
    """
    The reference: ``bench.loss`` with ``torch.optim.Adam`` (eager), or loss, gradient
    (``torch.func.grad_and_value``) and Adam updating the parameters and moments in place as
    one ``torch.compile``\\ d program (``compile_options`` are ``torch.compile``'s keywords).
    """
    if not compiled:
        if bench.handwritten_eager is not None:
            return bench.handwritten_eager(num_particles)
        params = [p.requires_grad_() for p in bench.init_params()]
        optim = torch.optim.Adam(params, lr=bench.lr)

        def step() -> float:
            loss = bench.loss(params, num_particles)
            optim.zero_grad()
            loss.backward()
            optim.step()
            return loss.item()

        return step

    params = bench.init_params()
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t = torch.zeros(())
    grad_and_value = torch.func.grad_and_value(lambda ps: bench.loss(ps, num_particles))
    lr = bench.lr

    def whole(ps, m, v, t):  # torch.optim.Adam's update (betas 0.9, 0.999; eps 1e-8)
        grads, loss = grad_and_value(ps)
        t.add_(1)
        for p, g, mi, vi in zip(ps, grads, m, v, strict=True):
            mi.lerp_(g, 0.1)
            vi.mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (vi / (1 - 0.999**t)).sqrt() + 1e-8
            p.sub_(lr / (1 - 0.9**t) * mi / denom)
        return loss

    compiled_whole = torch.compile(whole, **(compile_options or {}))
    return lambda: compiled_whole(params, m, v, t).item()


def _numpyro_available() -> bool:
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError:
        return False
    return True


def make_method(bench: Bench, method: str, num_particles: int) -> Step | None:
    """One step of ``method`` on ``bench`` at ``num_particles``, or ``None`` (with a printed
    message) when it does not apply."""
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, actual {method!r}")
    if method in ("handwritten", "handwritten-compiled"):
        return handwritten_step(bench, num_particles, compiled=method == "handwritten-compiled")
    if method == "numpyro":
        if not _numpyro_available():
            print("numpyro: not installed (pip install '.[bench]'); column skipped")
        else:
            print("numpyro: installed, but its steps are not written here yet; column skipped")
        return None
    model, guide = bench.pyro_pair(f"{bench.name}_{method}_k{num_particles}")
    optim = pyro.optim.Adam({"lr": bench.lr})
    vectorized = {"num_particles": num_particles, "max_plate_nesting": 1}
    vectorized["vectorize_particles"] = True
    args = bench.args
    if method == "iwae-make-step":
        step = make_step(model, guide, optim, IWAE(**vectorized))
        return lambda: step(*args)
    loss = {
        "iwae": lambda: IWAE(**vectorized),
        "iwae-compile-svi": lambda: IWAE(**vectorized, compile=True),
        "trace_elbo": lambda: Trace_ELBO(**vectorized),
        "renyi": lambda: RenyiELBO(alpha=0.0, **vectorized),
        "jit_trace_elbo": lambda: JitTrace_ELBO(**vectorized),
    }[method]()
    svi = SVI(model, guide, optim, loss)
    return lambda: svi.step(*args)


# ----------------------------------------------------------------------------------------------
# One (model, K) block: every method in one process, alternated within rounds


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else repr(text)


def _start(bench: Bench, method: str, k: int) -> tuple[Step | None, float, str]:
    """Build ``method``'s step and run its first two calls (the second compiles); returns the
    step (``None`` where it cannot run), their seconds, and the warnings or error seen."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step = make_method(bench, method, k)
            start = time.perf_counter()
            if step is not None:
                step()
                step()  # compiled methods compile on their second step
            first = time.perf_counter() - start
        except Exception as error:  # a Pyro objective that cannot run this model
            step, first = None, math.nan
            notes.append(f"error: {type(error).__name__}: {_first_line(error)}")
    for w in caught:
        if issubclass(w.category, UserWarning) and "torch/jit" not in w.filename:
            text = _first_line(w.message)
            if f"warning: {text}" not in notes and "TorchScript" not in text:
                notes.append(f"warning: {text}")
    return step, first, "; ".join(notes)


def run_block(
    bench: Bench,
    k: int,
    methods: Sequence[str],
    rounds: int,
    steps_per_round: int,
    warmup: int,
    memory: bool = True,
) -> pd.DataFrame:
    """
    Time every method at ``k``: the first two calls, ``warmup`` untimed steps, then ``rounds``
    rounds of ``steps_per_round`` steps of every method in turn; the peak memory of a
    steady-state step (``bench_vae_step``'s profiler measure, the largest of two).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch._dynamo.reset()  # the compiled reference compiles afresh, with static shapes
    steps, rows = {}, {}
    for method in dict.fromkeys((REFERENCE, *methods)):
        counters["graph_break"].clear()
        step, first, note = _start(bench, method, k)
        if breaks := sum(counters["graph_break"].values()):  # torch.compile'd methods
            note = "; ".join(filter(None, [note, f"{breaks} Dynamo graph breaks"]))
        if note:
            print(f"{bench.name} K={k} {method}: {note}")
        if step is None and method == "numpyro":
            continue
        rows[method] = {"model": bench.name, "K": k, "method": method, "first_s": first}
        rows[method]["note"] = note
        if step is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(warmup):
                    step()
            steps[method] = step
    if REFERENCE not in steps:
        raise RuntimeError(f"{bench.name} K={k}: the hand-written step failed: {rows[REFERENCE]}")
    times: dict[str, list[float]] = {m: [] for m in steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in tqdm(range(rounds), desc=f"{bench.name} K={k}", leave=False):
            for method, step in steps.items():  # alternate methods within each round
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    step()
                times[method].append((time.perf_counter() - start) / steps_per_round)
        peaks = {}
        if memory:
            for method, step in steps.items():
                peaks[method] = max(bench_vae_step._profiled_peak_mb(step) for _ in range(2))
    for method, row in rows.items():
        if method in steps:
            ratios = [a / b for a, b in zip(times[method], times[REFERENCE], strict=True)]
            row["step_ms"] = 1e3 * statistics.median(times[method])
            row["ratio"] = statistics.median(ratios)
            if memory:
                row["peak_mib"] = peaks[method]
                row["peak_ratio"] = peaks[method] / peaks[REFERENCE]
    table = pd.DataFrame(list(rows.values()))
    columns = ["model", "K", "method", "first_s", "step_ms", "ratio", "peak_mib", "peak_ratio"]
    return table.reindex(columns=[*columns, "note"])


# ----------------------------------------------------------------------------------------------
# Command line


def _markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns="note").copy()
    formats = {"first_s": "{:.2f}", "step_ms": "{:.3f}", "ratio": "{:.2f}"}
    formats |= {"peak_mib": "{:.4g}", "peak_ratio": "{:.2f}"}
    for column, fmt in formats.items():
        shown[column] = [fmt.format(v) if pd.notna(v) else "" for v in shown[column]]
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.to_numpy()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--particles", type=int, nargs="+", default=None, help="default per model")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps after the first 2")
    parser.add_argument("--vae-rounds", type=int, default=10, help="--rounds for the VAE")
    parser.add_argument("--vae-steps", type=int, default=2, help="--steps for the VAE")
    parser.add_argument("--vae-warmup", type=int, default=3, help="--warmup for the VAE")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep Inductor's on-disk cache (default: a fresh one, so first_s is a cold compile)",
    )
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 step, no warm-up")
    parser.add_argument(
        "--out", type=Path, default=None, help="write OUT.csv and OUT.md (after every block)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the (model, K) blocks already in OUT.csv"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    if args.smoke:
        args.rounds = args.vae_rounds = args.steps = args.vae_steps = 1
        args.warmup = args.vae_warmup = 0
    if args.resume and args.out is None:
        raise ValueError("Expected --out with --resume (the CSV to resume from)")
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    if args.warm_cache:
        return _run(args)
    # a fresh Inductor cache: compiled code of earlier runs (or other users) is not reused
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="bench_small_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            return _run(args)
        finally:
            if old_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache


def _run(args: argparse.Namespace) -> pd.DataFrame:
    print(bench_vae_step.machine_description())
    print(f"inductor cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}")
    print(
        f"{args.rounds} rounds x {args.steps} steps ({args.warmup} warm-up); VAE "
        f"{args.vae_rounds} rounds x {args.vae_steps} steps ({args.vae_warmup} warm-up)"
    )
    csv = None if args.out is None else args.out.with_suffix(".csv")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(csv) if args.resume and csv is not None and csv.exists() else None
    tables = [] if done is None else [done]
    for name in args.models:
        bench = build_bench(name)
        is_vae = name == "vae"
        for k in args.particles or bench.particles:
            if done is not None and ((done.model == name) & (done.K == k)).any():
                print(f"{name} K={k}: in {csv}, kept")
                continue
            block = run_block(
                bench,
                k,
                args.methods,
                args.vae_rounds if is_vae else args.rounds,
                args.vae_steps if is_vae else args.steps,
                args.vae_warmup if is_vae else args.warmup,
                memory=not args.no_memory,
            )
            print(_markdown(block), flush=True)
            tables.append(block)
            if args.out is not None:
                table = pd.concat(tables, ignore_index=True)
                table.to_csv(csv, index=False)
                args.out.with_suffix(".md").write_text(_markdown(table) + "\n")
    pyro.clear_param_store()
    table = pd.concat(tables, ignore_index=True)
    print(_markdown(table))
    notes = table[table.note.astype("string").fillna("") != ""]
    for row in notes.itertuples():
        print(f"note: {row.model} K={row.K} {row.method}: {row.note}")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return table


if __name__ == "__main__":
    main()
