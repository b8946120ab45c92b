"""Compiled against eager steps for the objectives with steps of their own (issue 18, item 5).

Each case is an objective on the model of its own example, stepped by ``SVI.step`` (eager) and by
``make_step`` (the objective's gradient steps compiled: both players of the f-divergence bound,
AVB's ELBO step, the f-GAN model step, JSA's chain moves and gradient; the whole step for IWAE
and BB-α), alternated within rounds in one
process; the ratio is the median of the per-round ratios compiled / eager. ``first_s`` is the
compiled method's first steps (eager step, capture and Inductor compilation of every program:
two steps, three for JSA, whose first step creates the chains). The settings are the examples'
(``examples/gaussian_fit.py``, ``examples/ring.py``, ``examples/avb_synthetic.py``), the Eight
Schools job's (``avb``, ``bbalpha-0.5``, ``jsa``) and the SBN benchmark's (``benchmarks/sbn.py``:
one layer of 200 Bernoulli latents, binarized MNIST, batch 50, K = 10).

    python benchmarks/bench_objectives.py --threads 1
    python benchmarks/bench_objectives.py --smoke
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pyro
import torch
from pyro.infer import SVI
from torch import nn

from pyro_fdiv.compare.methods import get_method
from pyro_fdiv.data import load_binarized_mnist
from pyro_fdiv.inference import IWAE, JSA, FDivergenceBound, FGANBound, make_step
from pyro_fdiv.models import eight_schools as es
from pyro_fdiv.models.sbn import SBN
from pyro_fdiv.models.toy import BivariateGaussian, LatentGenerator, mlp, ring_data, two_gaussians


@dataclass
class Case:
    """One objective on one model: ``build() -> (model, guide, objective, optim, args)``."""

    name: str
    build: Callable[[], tuple]
    first_steps: int = 2  # steps until every program is compiled


SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


class _Critic(nn.Module):
    """gaussian_fit.py's critic: two hidden layers of 64."""

    def __init__(self):
        super().__init__()
        self.net = mlp([1, 64, 64, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, None])


def gaussian_upper(f: str, batch: int = 1000):
    net = BivariateGaussian()
    objective = FDivergenceBound(f, data=two_gaussians())
    return (
        net.model,
        net.guide,
        objective,
        pyro.optim.ClippedAdam({"lr": 0.01}),
        (torch.zeros(batch),),
    )


def gaussian_lower(batch: int = 1000):
    net = BivariateGaussian()
    critic = _Critic()
    objective = FGANBound(
        "js",
        critic=critic,
        data=two_gaussians(),
        critic_optim=torch.optim.Adam(critic.parameters()),
    )
    return (
        net.model,
        lambda x: None,
        objective,
        pyro.optim.ClippedAdam({"lr": 0.01}),
        (torch.zeros(batch),),
    )


def ring(guide_steps: int):
    data = ring_data(1000, sd=0.1).to(torch.get_default_dtype())
    net = LatentGenerator(data.shape[1], 2, [256, 256, 256, 256], encoder="gaussian")
    objective = FDivergenceBound(
        "reverse_kl", data=data, spread=0.3, num_particles=10, guide_steps=guide_steps
    )
    batch = data[torch.randint(len(data), (100,))]
    return net.model, net.guide, objective, pyro.optim.ClippedAdam({"lr": 1e-3}), (batch,)


def eight_schools(method: str):
    m = get_method(method)
    model = functools.partial(es.model, parameterization="noncentered")
    optim = pyro.optim.ClippedAdam({"lr": m.lr, "lrd": 0.1 ** (1 / 5000)})
    return model, m.guide(model), m.objective(), optim, ()


def sbn(method: str, num_data: int = 5000, batch: int = 50):
    """benchmarks/sbn.py's linear SBN (784-200) on binarized MNIST, one fixed minibatch."""
    x = load_binarized_mnist(os.environ.get("PYRO_FDIV_DATA", SHARED_DATA), "train")[:num_data]
    net = SBN(x.shape[1], 200, name="linear")
    objective = JSA(num_data=num_data, num_particles=10) if method == "jsa" else IWAE(10)
    idx = torch.randperm(num_data)[:batch]
    return net.model, net.guide, objective, pyro.optim.Adam({"lr": 3e-4}), (x[idx], idx, num_data)


CASES = [
    Case(
        "fdiv forward_kl, bivariate Gaussian (gaussian_fit.py)",
        lambda: gaussian_upper("forward_kl"),
    ),
    Case("fdiv js, bivariate Gaussian (gaussian_fit.py)", lambda: gaussian_upper("js")),
    Case("fgan js, bivariate Gaussian (gaussian_fit.py)", gaussian_lower),
    Case("fdiv reverse_kl, ring, training set (ring.py)", lambda: ring(0)),
    Case("fdiv reverse_kl + 1 guide step, ring (ring.py)", lambda: ring(1)),
    Case("avb, Eight Schools (the job's avb)", lambda: eight_schools("avb")),
    Case("bbalpha-0.5, Eight Schools (the job's)", lambda: eight_schools("bbalpha-0.5")),
    Case("elbo-fullrank, Eight Schools (Trace_ELBO)", lambda: eight_schools("elbo-fullrank")),
    Case("jsa, Eight Schools (the job's: K = 16, history)", lambda: eight_schools("jsa"), 3),
    Case("jsa, SBN 784-200 (sbn.py: batch 50, K = 10)", lambda: sbn("jsa"), 3),
    Case("vimco (IWAE), SBN 784-200 (sbn.py: batch 50, K = 10)", lambda: sbn("vimco")),
]


def _steppers(case: Case, seed: int) -> dict[str, Callable]:
    """The eager and compiled steps of ``case``, each on its own copy of the parameters (one
    param store per method, swapped in around each call)."""
    steppers = {}
    for method in ("eager", "compiled"):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, objective, optim, args = case.build()
        if method == "eager":
            step = SVI(model, guide, optim, objective).step
        else:
            step = make_step(model, guide, optim, objective)
        store_state = {}

        def run(step=step, args=args, store_state=store_state):
            store = pyro.get_param_store()
            if store_state:
                store._params, store._constraints, store._param_to_name = store_state["s"]
            try:
                return step(*args)
            finally:
                store_state["s"] = (store._params, store._constraints, store._param_to_name)

        steppers[method] = run
    return steppers


def bench(case: Case, rounds: int, steps: int, warmup: int, seed: int = 0) -> dict:
    store = pyro.get_param_store()
    fresh = lambda: (dict(), dict(), dict())  # noqa: E731
    steppers = _steppers(case, seed)
    first = {}
    for method, run in steppers.items():  # each its own store from its first call
        store._params, store._constraints, store._param_to_name = fresh()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(case.first_steps):
                run()
        first[method] = time.perf_counter() - start
        for _ in range(warmup):
            run()
    times = {m: [] for m in steppers}
    ratios = []
    for _ in range(rounds):
        for method, run in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[method].append((time.perf_counter() - start) / steps * 1e3)
        ratios.append(times["compiled"][-1] / times["eager"][-1])
    return {
        "case": case.name,
        "eager_ms": statistics.median(times["eager"]),
        "compiled_ms": statistics.median(times["compiled"]),
        "ratio": statistics.median(ratios),
        "first_s": first["compiled"],
    }


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", type=int, help="indices into CASES")
    parser.add_argument("--smoke", action="store_true", help="one round of one step per case")
    parser.add_argument("--out", help="write the table as CSV here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 1, 0
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), torch {torch.__version__}, pyro {pyro.__version__}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    chosen = [CASES[i] for i in args.cases] if args.cases else CASES
    rows = [bench(case, args.rounds, args.steps, args.warmup) for case in chosen]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
