"""Wall time of annealed importance sampling on the digits VAE, against importance sampling.

Trains the package's small VAE (784-400-20, ReLU, Bernoulli decoder) for ``--train-steps``
Adam steps of ``Trace_ELBO`` on binarized MNIST (batch 100), then estimates the test
log-likelihood of ``--num-images`` test images with :func:`pyro_fdiv.evaluate.log_likelihood`
(importance sampling with the encoder, ``--is-samples``) and with
:func:`pyro_fdiv.evaluate.ais_log_likelihood` from the prior at each ``--settings`` entry
``T:M:L`` (annealing steps, chains, leapfrog steps), timing each. One row per estimator::

    python benchmarks/bench_ais.py --threads 1 --out results/ais.csv
    python benchmarks/bench_ais.py --settings 100:16:10 1000:5:10 --num-images 100
    python benchmarks/bench_ais.py --smoke      # seconds: what CI runs

The cost of AIS is ``(T - 1) * L + 1`` model evaluations with gradients over ``M`` chains
times the batch of images, so the wall time is close to linear in ``T * L`` and sublinear in
``M`` while the batch is small.

Measured (2 shared CPU cores, load average about 5.5 from other jobs, one thread, float32)::

    python benchmarks/bench_ais.py --train-steps 1000 --is-samples 5000 \
        --settings 100:16:10 300:16:10 1000:5:10 --out /tmp/aisbench/ais.csv

    VAE 400-20, 1000 training steps (100 test images)
                          estimator  wall_s  log_likelihood  stderr  acceptance
               IS (encoder, S=5000)    19.7        -118.807     NaN         NaN
     AIS (prior, T=100, M=16, L=10)    67.0        -118.276   0.061       0.854
     AIS (prior, T=300, M=16, L=10)   152.7        -117.823   0.042       0.737
     AIS (prior, T=1000, M=5, L=10)   155.4        -117.660   0.051       0.689

``T=1000, M=5, L=10`` is the AVB paper's setting (1000 intermediate distributions, 5 chains)
and the recommended one: about 1.5 s per test image on one loaded CPU thread, 1.15 nats above
the encoder's IS estimate. The stderr column is the Monte Carlo error of the mean over images
only; the schedule's bias (T=300 to T=1000 still gains 0.16 nats) is larger.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import pyro
import pyro.infer
import pyro.optim
import torch
from tqdm import tqdm

from pyro_fdiv.data import load_binarized_mnist
from pyro_fdiv.evaluate import ais_log_likelihood, log_likelihood
from pyro_fdiv.models.vae import VAE

__all__ = ["main", "parse_setting", "train_vae"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data"


def parse_setting(text: str) -> tuple[int, int, int]:
    """``"T:M:L"`` as ``(num_steps, num_chains, num_leapfrog)``."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"Expected T:M:L (positive integers), actual {text!r}")
    num_steps, num_chains, num_leapfrog = (int(p) for p in parts)
    return num_steps, num_chains, num_leapfrog


def train_vae(x: torch.Tensor, steps: int, hidden_dim: int, z_dim: int, seed: int) -> VAE:
    """The VAE after ``steps`` Adam (1e-3) steps of ``Trace_ELBO`` on batches of 100."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(x_dim=x.shape[1], z_dim=z_dim, hidden_dim=hidden_dim)
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO()
    )
    for _ in tqdm(range(steps), desc="train VAE", leave=False, disable=steps < 50):
        batch = x[torch.randint(len(x), (min(100, len(x)),))]
        svi.step(batch, num_data=len(x))
    return vae


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="data root")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--hidden-dim", type=int, default=400)
    parser.add_argument("--z-dim", type=int, default=20)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--is-samples", type=int, default=5000)
    parser.add_argument(
        "--settings", type=parse_setting, nargs="+", default=[parse_setting("100:16:10")]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="CSV file for the table")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: runs in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_steps, args.hidden_dim, args.z_dim = 3, 8, 2
        args.num_images, args.is_samples = 4, 10
        args.settings = [(3, 2, 2)]
    torch.set_num_threads(args.threads)
    x_train = load_binarized_mnist(args.root, "train")
    x_test = load_binarized_mnist(args.root, "test")[: args.num_images]
    vae = train_vae(x_train, args.train_steps, args.hidden_dim, args.z_dim, args.seed)
    rows = []
    pyro.set_rng_seed(args.seed + 1)
    start = time.perf_counter()
    estimate = log_likelihood(vae.model, vae.guide, x_test, num_samples=args.is_samples)
    rows.append(
        {
            "estimator": f"IS (encoder, S={args.is_samples})",
            "wall_s": time.perf_counter() - start,
            "log_likelihood": estimate.mean().item(),
            "stderr": float("nan"),
            "acceptance": float("nan"),
        }
    )
    for num_steps, num_chains, num_leapfrog in args.settings:
        pyro.set_rng_seed(args.seed + 1)
        start = time.perf_counter()
        result = ais_log_likelihood(
            vae.model,
            x_test,
            num_chains=num_chains,
            num_steps=num_steps,
            num_leapfrog=num_leapfrog,
            progress=True,
        )
        rows.append(
            {
                "estimator": f"AIS (prior, T={num_steps}, M={num_chains}, L={num_leapfrog})",
                "wall_s": time.perf_counter() - start,
                "log_likelihood": result.log_likelihood.mean().item(),
                # the mean's standard error, from the per-image ones
                "stderr": (result.stderr.pow(2).mean() / len(x_test)).sqrt().item(),
                "acceptance": result.acceptance.mean().item(),
            }
        )
    table = pd.DataFrame(rows)
    table.insert(0, "images", len(x_test))
    table.insert(1, "threads", args.threads)
    print(f"VAE {args.hidden_dim}-{args.z_dim}, {args.train_steps} training steps")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
