"""Time one training step on small models: hand-written PyTorch (eager and compiled), pyro_fdiv
eager and compiled (through SVI and make_step), Pyro's ELBOs.

Run ``python benchmarks/bench_small_models.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_fdiv.inference import IWAE, make_step
from pyro_fdiv.models import eight_schools

__all__ = ["METHODS", "handwritten_step", "main", "make_method"]

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
REFERENCE = "handwritten"
LR = 0.01
Step = Callable[[], float]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(x, loc, scale):
    return -((x - loc) ** 2) / (2 * scale**2) - math.log(scale) - _LOG_SQRT_2PI


def _iwae_loss(params, eps, y, sigma):
    """The negated IWAE bound of AutoNormal on Eight Schools, as plain tensor math:
    ``params`` are AutoNormal's unconstrained locs and scales (softplus), ``eps`` the noise
    ``(K, 10)``."""
    loc_mu, scale_mu, loc_tau, scale_tau, loc_th, scale_th = params
    scales = F.softplus(torch.stack([scale_mu, scale_tau]))
    scale_th = F.softplus(scale_th)
    mu = loc_mu + scales[0] * eps[:, 0]
    log_tau = loc_tau + scales[1] * eps[:, 1]
    theta_tilde = loc_th + scale_th * eps[:, 2:]
    tau = log_tau.exp()
    log_q = (
        -0.5 * eps.pow(2).sum(-1)
        - scales.log().sum()
        - scale_th.log().sum()
        - 10 * _LOG_SQRT_2PI
        - log_tau  # the Jacobian of tau = exp(log_tau)
    )
    log_p = (
        _normal_log_prob(mu, 0.0, 5.0)
        + math.log(2 / (math.pi * 5.0))
        - torch.log1p((tau / 5.0) ** 2)
        + (-0.5 * theta_tilde.pow(2) - _LOG_SQRT_2PI).sum(-1)
        + (
            -0.5 * ((y - (mu[:, None] + tau[:, None] * theta_tilde)) / sigma) ** 2
            - sigma.log()
            - _LOG_SQRT_2PI
        ).sum(-1)
    )
    log_w = log_p - log_q
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))


def _init_params():
    inv_softplus = math.log(math.expm1(0.1))
    return [
        torch.zeros(()),
        torch.full((), inv_softplus),
        torch.zeros(()),
        torch.full((), inv_softplus),
        torch.zeros(8),
        torch.full((8,), inv_softplus),
    ]


def handwritten_step(num_particles: int, compiled: bool) -> Step:
    """The reference: the same model, guide and bound in plain PyTorch with
    ``torch.optim.Adam`` (eager), or loss, gradient (``torch.func.grad_and_value``) and a
    functional Adam as one ``torch.compile``\\ d program."""
    y, sigma = (
        eight_schools.Y.to(torch.get_default_dtype()),
        eight_schools.SIGMA.to(torch.get_default_dtype()),
    )
    params = [p.requires_grad_() for p in _init_params()]
    if not compiled:
        optim = torch.optim.Adam(params, lr=LR)

        def step() -> float:
            eps = torch.randn(num_particles, 10)
            loss = _iwae_loss(params, eps, y, sigma)
            optim.zero_grad()
            loss.backward()
            optim.step()
            return loss.item()

        return step

    state = [p.detach() for p in params]
    m = [torch.zeros_like(p) for p in state]
    v = [torch.zeros_like(p) for p in state]
    t = torch.zeros(())
    grad_and_value = torch.func.grad_and_value(lambda ps, eps: _iwae_loss(ps, eps, y, sigma))

    def whole(ps, m, v, t):
        eps = torch.randn(num_particles, 10)
        grads, loss = grad_and_value(ps, eps)
        t = t + 1
        new_ps, new_m, new_v = [], [], []
        for p, g, mi, vi in zip(ps, grads, m, v, strict=True):
            mi = mi.lerp(g, 0.1)
            vi = vi * 0.999 + 0.001 * g * g
            denom = (vi / (1 - 0.999**t)).sqrt() + 1e-8
            new_ps.append(p - LR / (1 - 0.9**t) * mi / denom)
            new_m.append(mi)
            new_v.append(vi)
        return loss, new_ps, new_m, new_v, t

    compiled_whole = torch.compile(whole)
    holder = [state, m, v, t]

    def step() -> float:
        loss, *holder[:] = compiled_whole(*holder)
        return loss.item()

    return step


def _svi_guide(name: str) -> AutoNormal:
    guide = AutoNormal(eight_schools.model)
    guide._pyro_name = name  # its own parameters in the shared param store
    return guide


def make_method(method: str, num_particles: int) -> Step | None:
    """One step of ``method`` at ``num_particles``, or ``None`` when it does not apply."""
    if method in ("handwritten", "handwritten-compiled"):
        return handwritten_step(num_particles, compiled=method == "handwritten-compiled")
    model, guide = eight_schools.model, _svi_guide(f"{method}_k{num_particles}")
    optim = pyro.optim.Adam({"lr": LR})
    vectorized = {"num_particles": num_particles, "max_plate_nesting": 1}
    vectorized["vectorize_particles"] = True
    if method == "iwae":
        return SVI(model, guide, optim, IWAE(**vectorized)).step
    if method == "iwae-compile-svi":
        return SVI(model, guide, optim, IWAE(**vectorized, compile=True)).step
    if method == "iwae-make-step":
        return make_step(model, guide, optim, IWAE(**vectorized))
    if method == "trace_elbo":
        return SVI(model, guide, optim, Trace_ELBO(**vectorized)).step
    if method == "renyi":
        return SVI(model, guide, optim, RenyiELBO(alpha=0.0, **vectorized)).step
    if method == "jit_trace_elbo":
        return SVI(model, guide, optim, JitTrace_ELBO(**vectorized)).step
    if method == "numpyro":
        try:
            import numpyro  # noqa: F401
        except ImportError:
            print(
                "numpyro: not installed (pip install '.[bench]'); column skipped", file=sys.stderr
            )
            return None
        print("numpyro: installed, but its step is not written here yet; skipped", file=sys.stderr)
        return None
    raise ValueError(f"Expected method in {METHODS}, actual {method!r}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50, help="steps per method per round")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # JitTrace_ELBO's TorchScript deprecation, tracer warnings
    pyro.set_rng_seed(0)
    print(
        f"load average {os.getloadavg()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"threads {args.threads}, {args.rounds} rounds x {args.steps} steps"
    )
    print("| K | method | first 2 steps (s) | step (ms) | ratio to handwritten |")
    print("|---|---|---|---|---|")
    for k in args.particles:
        steps, first = {}, {}
        for method in args.methods:
            step = make_method(method, k)
            if step is None:
                continue
            start = time.perf_counter()
            step()
            step()  # compiled methods compile on their second step
            first[method] = time.perf_counter() - start
            for _ in range(20):
                step()
            steps[method] = step
        times = {m: [] for m in steps}
        for _ in range(args.rounds):
            for method, step in steps.items():  # alternate methods within each round
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[method].append((time.perf_counter() - start) / args.steps)
        for method in steps:
            ratios = [a / b for a, b in zip(times[method], times[REFERENCE], strict=True)]
            print(
                f"| {k} | {method} | {first[method]:.2f} | "
                f"{1e3 * statistics.median(times[method]):.3f} | "
                f"{statistics.median(ratios):.2f} |"
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
