"""The ``pyro-fdiv`` command."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from tqdm.auto import tqdm

from pyro_fdiv.inference import IWAE, BlackBoxAlpha
from pyro_fdiv.models.ppca import PPCA, ppca_max_log_likelihood, simulate_ppca

__all__ = ["demo", "main"]

DEMO_OBJECTIVES = {
    "elbo": lambda k: Trace_ELBO(),
    "iwae": lambda k: IWAE(num_particles=k),
    "iwae-dreg": lambda k: IWAE(num_particles=k, gradient_estimator="dreg"),
    "bbalpha-0.5": lambda k: BlackBoxAlpha(0.5, num_particles=k),
}


def _fit(objective, data: torch.Tensor, z_dim: int, steps: int, batch: int, seed: int):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = PPCA(data.shape[1], z_dim)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=type(objective).__name__, leave=False):
        idx = torch.randint(len(data), (batch,))
        svi.step(data[idx], num_data=len(data))
    return net, time.perf_counter() - start


def demo(
    steps: int = 2000,
    num_particles: int = 8,
    num_data: int = 1000,
    batch: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """
    Fit probabilistic PCA with a mean-field amortized guide by each objective and report the
    exact log-likelihood of the fitted model against its closed-form maximum.
    """
    data = simulate_ppca(num_data, x_dim=12, z_dim=3, seed=seed)
    best = ppca_max_log_likelihood(data, 3)
    rows = []
    for name, make in DEMO_OBJECTIVES.items():
        net, seconds = _fit(make(num_particles), data, 3, steps, batch, seed)
        with torch.no_grad():
            exact = net.log_likelihood(data).mean().item()
            bound = -IWAE(num_particles=1000).loss(net.model, net.guide, data) / num_data
        rows.append(
            {
                "objective": name,
                "log_lik": exact,
                "gap_to_max": best - exact,
                "iwae_1000_bound": bound,
                "seconds": seconds,
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["max_log_lik"] = best
    return table


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line on stderr and exit status 2, no usage dump or traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _writable_dir(text: str) -> Path:
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".pyro_fdiv_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write to {text!r}: {e.strerror}") from None
    return path


def _run_demo(args: argparse.Namespace) -> None:
    steps = 20 if args.smoke else args.steps
    table = demo(steps=steps, num_particles=args.num_particles, seed=args.seed)
    print(
        f"PPCA, 1000 points, D=12, d=3; closed-form maximum log-likelihood per point: "
        f"{table.attrs['max_log_lik']:.4f}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, index=False)


def _run_eight_schools(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from pyro_fdiv.compare import eight_schools
    from pyro_fdiv.compare.methods import available_methods

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    unknown = [m for m in methods or [] if m not in available_methods()]
    if unknown:
        parser.error(
            f"unknown method(s) {', '.join(unknown)}; known: {', '.join(available_methods())}"
        )
    steps = args.steps or (300 if args.quick else 5000)
    table = eight_schools.run(
        args.out,
        methods,
        steps=steps,
        num_draws=2000 if args.quick else 10_000,
        seed=args.seed,
        parameterization=args.parameterization,
        reference=args.reference,
        compile=False if args.no_compile else None,
    )
    print(eight_schools.format_summary(table))
    print(
        f"written: {args.out / 'summary.csv'}, {args.out / 'samples'}, {args.out / 'marginals.png'}"
    )


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from pyro_fdiv.train import COUNTS, TrainConfig, train

    # every setting has the option of its name, except these three and the per-objective counts,
    # which -k/--num-particles sets (the count of the chosen objective)
    special = {"spread": tuple(args.spread), "data_root": args.data, "out": str(args.out)}
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in COUNTS.values()]
    options = {name: special[name] if name in special else getattr(args, name) for name in names}
    options["num_particles"] = args.num_particles
    try:
        config = TrainConfig(**options)
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        log = train(config, resume=args.resume)
    # no data; a run already there; a checkpoint that cannot be resumed
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(log.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"written: {args.out / 'log.csv'}, checkpoint.pt, samples.png, reconstructions.png")


def _add_train_parser(sub) -> argparse.ArgumentParser:
    from pyro_fdiv.divergences import available_divergences
    from pyro_fdiv.models.vae import ARCHITECTURES
    from pyro_fdiv.train import DATASETS, OBJECTIVES

    t = sub.add_parser("train", help="train a VAE on digits/characters with any objective")
    t.add_argument("--dataset", choices=DATASETS, default="binarized-mnist")
    t.add_argument("--objective", choices=OBJECTIVES, default="elbo")
    t.add_argument(
        "--num-particles",
        "-k",
        type=_positive_int,
        default=1,
        help="guide samples averaged (elbo, avb), importance samples (iwae, bbalpha), "
        "proposals per step (jsa), draws per image of the batch (fdiv)",
    )
    t.add_argument("--alpha", type=float, default=0.5, help="BB-α's alpha")
    t.add_argument("--gradient-estimator", choices=("reparam", "stl", "dreg"), default="reparam")
    t.add_argument("--f", choices=available_divergences(), default="reverse_kl", help="for fdiv")
    t.add_argument("--log-density", choices=("exact", "pca"), default="exact", help="for fdiv")
    t.add_argument(
        "--spread",
        type=float,
        nargs=3,
        default=(0.5, 0.1, 5),
        metavar=("START", "END", "EPOCHS"),
        help="fdiv's spread width, annealed from START to END over EPOCHS",
    )
    t.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="iwae")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--batch-size", type=_positive_int, default=100)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", help="data directory (default: $PYRO_FDIV_DATA)")
    t.add_argument("--num-train", type=_positive_int, help="use the first N training images")
    t.add_argument("--num-test", type=_positive_int, default=1000, help="test images per epoch")
    t.add_argument("--eval-samples", type=_positive_int, default=500, help="IS samples per image")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    t.add_argument("--out", type=_writable_dir, default=Path("train_out"))
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="train with eager SVI steps (default: compiled steps, the same draws)",
    )
    return t


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="pyro-fdiv", description="pyro_fdiv's jobs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="fit PPCA with every objective; compare with the exact MLE")
    p.add_argument("--steps", type=_positive_int, default=2000)
    p.add_argument("--num-particles", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    p.add_argument("--out", help="write the table as CSV here")

    e = sub.add_parser(
        "eight-schools", help="compare every method's Eight Schools posterior with NUTS"
    )
    e.add_argument("--out", type=_writable_dir, default=Path("eight_schools_out"))
    e.add_argument("--methods", help="comma-separated method names (default: all registered)")
    e.add_argument("--steps", type=_positive_int, help="SVI steps per method (default 5000)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--parameterization", choices=("noncentered", "centered"), default="noncentered")
    e.add_argument(
        "--reference",
        choices=("cached", "recompute"),
        default="cached",
        help="NUTS reference: shipped/cached draws, or rerun NUTS",
    )
    e.add_argument("--quick", action="store_true", help="300 steps, 2,000 draws: a smoke run")
    e.add_argument(
        "--no-compile",
        action="store_true",
        help="train with eager SVI steps (default: compiled steps from 2,000 steps per method)",
    )

    t = _add_train_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "demo":
        _run_demo(args)
    elif args.command == "train":
        _run_train(args, t)
    else:
        _run_eight_schools(args, e)


if __name__ == "__main__":
    main()
