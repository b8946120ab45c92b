"""Time one training step on small models: hand-written PyTorch (eager and compiled), pyro_fdiv
eager and compiled (through SVI and make_step), Pyro's ELBOs, and NumPyro's jitted SVI step
(when jax and numpyro are installed); with the first-step (compile) time and the peak memory
of a step.

Run ``python benchmarks/bench_small_models.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
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

import numpy as np
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

import pyro_fdiv
from pyro_fdiv.inference import IWAE, make_step
from pyro_fdiv.models import eight_schools

__all__ = [
    "METHODS",
    "MODELS",
    "Bench",
    "build_bench",
    "handwritten_step",
    "import_jax",
    "main",
    "make_method",
    "numpyro_initial_losses",
    "numpyro_step",
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
    #: the same model and guide in NumPyro: ``() -> (model, guide, args)``, importing numpyro
    numpyro_problem: Callable[[], tuple[Callable, Callable, tuple]] | None = None


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
        numpyro_problem=lambda: _numpyro_eight_schools(y, sigma),
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
        numpyro_problem=lambda: _numpyro_logistic(x, y),
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
        numpyro_problem=lambda: _numpyro_hierarchical(group, y),
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
        numpyro_problem=lambda: _numpyro_vae(
            dict(zip(names, init.parameters(), strict=True)), x, init.encoder.min_scale
        ),
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
# The same models and guides in NumPyro (the ``bench`` extra). jax and numpyro are imported
# here only, on the first NumPyro step: CI does not install them, and XLA reads its flags and
# sizes its thread pool when its CPU client is created.

#: set before jax creates its CPU client when the script runs torch on one thread
JAX_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
#: why the NumPyro rows have no peak memory
NUMPYRO_PEAK_NOTE = (
    "numpyro peak memory: n/a (XLA's buffers are not torch allocations, so torch.profiler does "
    "not see them; jax's CPU device keeps no memory statistics, memory_stats() is None; and "
    "Compiled.memory_analysis() reports 0 temporary bytes on CPU)"
)


_JAX_CLIENT: list[str] = []  # who created jax's CPU client: "ours" (import_jax) or "theirs"


def _numpyro_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("jax", "numpyro"))


def _numpyro_versions() -> str:
    """The installed numpyro and jax versions, without importing them."""
    if not _numpyro_available():
        return "numpyro not installed"
    version = importlib.metadata.version
    return f"numpyro {version('numpyro')}, jax {version('jax')}, jaxlib {version('jaxlib')}"


def _jax_backend_ready() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: True)())


def _threads() -> set[int]:
    return {int(task) for task in os.listdir(f"/proc/{os.getpid()}/task")}


def import_jax(single_thread: bool):
    """
    Import jax on the CPU and create its client; with ``single_thread`` (the script's
    ``--threads 1``, as torch runs) so that its programs run on one core.

    :data:`JAX_XLA_FLAGS` go into ``XLA_FLAGS`` first, as issue 18 asks, but in jax 0.10 they do
    not make XLA's CPU runtime single-threaded: ``--xla_cpu_multi_thread_eigen=false`` is
    accepted and no longer limits it, and XLA ignores the bare ``intra_op_parallelism_threads=1``
    (not a ``--`` flag); a jitted 1500² matmul still kept four threads busy on two cores. So the
    client is created while this thread may run on one core only: XLA sizes its intra-op pool
    by the cores the process may use (one thread), and the threads the client starts (that pool
    and the thread that runs the programs) inherit that core and keep it, while the threads that
    existed before (this one, torch's) get their affinity back. Where jax's client already
    exists nothing changes (a printed note says so).
    """
    if _jax_backend_ready():
        import jax

        if not _JAX_CLIENT:  # created before this function ran
            _JAX_CLIENT.append("theirs")
            print("numpyro: jax's CPU client already exists; its threads are as it was created")
        return jax
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    pin = single_thread and hasattr(os, "sched_setaffinity")
    if single_thread and JAX_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {JAX_XLA_FLAGS}".strip()
    import jax

    allowed = os.sched_getaffinity(0) if pin else set()
    ours = _threads() if pin else set()
    if pin:
        os.sched_setaffinity(0, {min(allowed)})
    try:
        platform = jax.devices("cpu")[0].platform
    finally:
        for task in ours:  # the client's threads keep the one core
            with contextlib.suppress(OSError):  # a thread that has exited since
                os.sched_setaffinity(task, allowed)
    _JAX_CLIENT.append("ours")
    pool = f"its threads on CPU {min(allowed)} only" if pin else "XLA's default threads"
    print(
        f"numpyro: jax {jax.__version__} on {platform}, {pool}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    return jax


def _numpyro_eight_schools(y: torch.Tensor, sigma: torch.Tensor):
    """Non-centered Eight Schools, :func:`pyro_fdiv.models.eight_schools.model` in NumPyro."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_feasible

    def model(y, sigma):
        mu = numpyro.sample("mu", nd.Normal(0.0, eight_schools.MU_SCALE))
        tau = numpyro.sample("tau", nd.HalfCauchy(eight_schools.TAU_SCALE))
        with numpyro.plate("schools", eight_schools.NUM_SCHOOLS):
            theta_tilde = numpyro.sample("theta_tilde", nd.Normal(0.0, 1.0))
            theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
            numpyro.sample("obs", nd.Normal(theta, sigma), obs=y)

    guide = AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=0.1)
    return model, guide, (jnp.array(y.numpy()), jnp.array(sigma.numpy()))


def _numpyro_logistic(x: torch.Tensor, y: torch.Tensor):
    r"""
    :func:`logistic_model` in NumPyro. The subsample is drawn by ``numpyro.plate("data", N,
    subsample_size=256)`` (NumPyro's own draw, shared by all particles) and the likelihood sits
    in a plate of size 256 scaled by ``N / 256``: ``RenyiELBO`` refuses a subsampled plate that
    does not enclose every sample site ("RenyiELBO only supports subsampling in plates that are
    common to all sample sites"), while the bound is the same nested one that ``IWAE`` and the
    reference compute.
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro import handlers
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_feasible

    def model(x, y):
        n, d = x.shape
        w = numpyro.sample("w", nd.Normal(jnp.zeros(d), 1.0).to_event(1))
        b = numpyro.sample("b", nd.Normal(0.0, 1.0))
        with numpyro.plate("data", n, subsample_size=LOGISTIC_B) as idx:
            pass  # only draws the subsample: no site sits in this plate
        with numpyro.plate("batch", LOGISTIC_B), handlers.scale(scale=n / LOGISTIC_B):
            numpyro.sample("y", nd.Bernoulli(logits=x[idx] @ w + b), obs=y[idx])

    guide = AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=0.1)
    return model, guide, (jnp.array(x.numpy()), jnp.array(y.numpy()))


def _numpyro_hierarchical(group: torch.Tensor, y: torch.Tensor):
    """:func:`hierarchical_model` in NumPyro, with ``AutoMultivariateNormal``."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.infer.autoguide import AutoMultivariateNormal
    from numpyro.infer.initialization import init_to_feasible

    def model(group, y):
        mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
        sigma = numpyro.sample("sigma", nd.HalfNormal(1.0))
        with numpyro.plate("groups", HIER_GROUPS):
            theta = numpyro.sample("theta", nd.Normal(mu, tau))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", nd.Normal(theta[group], sigma), obs=y)

    guide = AutoMultivariateNormal(model, init_loc_fn=init_to_feasible, init_scale=0.1)
    return model, guide, (jnp.array(group.numpy()), jnp.array(y.numpy()))


def _numpyro_vae(params: dict[str, torch.Tensor], x: torch.Tensor, min_scale: float):
    """
    The VAE of ``bench_vae_step`` in NumPyro: the same 784-400-(20, 20) encoder and 20-400-784
    decoder as plain jax functions of a parameter dict per network (``numpyro.param``), from
    the same initial weights ``params`` (the torch names and ``(out, in)`` layouts).
    """
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    def network(prefix):
        return {
            name.removeprefix(prefix): jnp.array(value.detach().cpu().numpy())
            for name, value in params.items()
            if name.startswith(prefix)
        }

    encoder0, decoder0 = network("encoder."), network("decoder.")
    z_dim = encoder0["fc_loc.bias"].shape[0]

    def linear(p, name, inputs):
        return inputs @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def model(x):
        p = numpyro.param("decoder", decoder0)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", nd.Normal(jnp.zeros((x.shape[0], z_dim)), 1.0).to_event(1))
            logits = linear(p, "fc_logits", jax.nn.relu(linear(p, "hidden.0", z)))
            numpyro.sample("x", nd.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        p = numpyro.param("encoder", encoder0)
        with numpyro.plate("data", x.shape[0]):
            hidden = jax.nn.relu(linear(p, "hidden.0", x))
            scale = jax.nn.softplus(linear(p, "fc_scale", hidden)) + min_scale
            numpyro.sample("z", nd.Normal(linear(p, "fc_loc", hidden), scale).to_event(1))

    return model, guide, (jnp.array(x.numpy()),)


def _numpyro_svi(bench: Bench, num_particles: int):
    jax = import_jax(single_thread=torch.get_num_threads() == 1)
    import numpyro.infer
    import numpyro.optim

    if bench.numpyro_problem is None:
        raise ValueError(f"Expected a NumPyro version of {bench.name}")
    model, guide, args = bench.numpyro_problem()
    elbo = numpyro.infer.RenyiELBO(alpha=0.0, num_particles=num_particles)
    svi = numpyro.infer.SVI(model, guide, numpyro.optim.Adam(bench.lr), elbo)
    return jax, svi, args


def numpyro_step(bench: Bench, num_particles: int) -> Step:
    """
    NumPyro's training step on the same model and guide: ``numpyro.infer.SVI`` with
    ``RenyiELBO(alpha=0, num_particles=K)`` (the IWAE bound, per data point where a plate
    encloses every site as in the VAE; at K = 1 too, where it is the ELBO) and
    ``numpyro.optim.Adam(lr)``, the step ``jax.jit(svi.update)``. The step blocks on the loss
    and returns it as a float, as the torch steps return ``loss.item()``; its first call also
    runs ``svi.init`` (the autoguide's prototype trace) and the compilation.
    """
    jax, svi, args = _numpyro_svi(bench, num_particles)
    update = jax.jit(svi.update)
    state = None

    def step() -> float:
        nonlocal state
        if state is None:
            state = svi.init(jax.random.PRNGKey(0), *args)
        state, loss = update(state, *args)
        return float(loss.block_until_ready())

    return step


def numpyro_initial_losses(bench: Bench, num_particles: int, draws: int, seed: int = 0):
    """
    ``draws`` independent estimates of NumPyro's loss (the negated IWAE bound) at the guide's
    initial parameters, as a numpy array: the distribution that ``bench.loss`` draws from at
    ``bench.init_params()`` (the same model, guide and initial parameters).
    """
    jax, svi, args = _numpyro_svi(bench, num_particles)
    state = svi.init(jax.random.PRNGKey(seed), *args)
    params = svi.get_params(state)  # constrained, as SVI.update passes them to the loss

    def losses(keys, params, args):  # arguments, not constants that XLA would fold
        def one(key):
            return svi.loss.loss(key, params, svi.model, svi.guide, *args)

        return jax.lax.map(one, keys)

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), draws)
    return np.asarray(jax.jit(losses)(keys, params, args))


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
            return None
        return numpyro_step(bench, num_particles)
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
                if method != "numpyro":  # n/a: see NUMPYRO_PEAK_NOTE
                    peaks[method] = max(bench_vae_step._profiled_peak_mb(step) for _ in range(2))
    for method, row in rows.items():
        if method in steps:
            ratios = [a / b for a, b in zip(times[method], times[REFERENCE], strict=True)]
            row["step_ms"] = 1e3 * statistics.median(times[method])
            row["ratio"] = statistics.median(ratios)
            if memory:
                row["peak_mib"] = peaks.get(method, math.nan)
                row["peak_ratio"] = row["peak_mib"] / peaks[REFERENCE]
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
    print(f"pyro_fdiv: {Path(pyro_fdiv.__file__).parent}; {_numpyro_versions()}")
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
    if not args.no_memory and (table.method == "numpyro").any():
        print(f"note: {NUMPYRO_PEAK_NOTE}")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return table


if __name__ == "__main__":
    main()
