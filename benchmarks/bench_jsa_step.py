"""Time one JSA step against one single-particle Trace_ELBO step on the same model.

Run ``python benchmarks/bench_jsa_step.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pyro
import pyro.infer
import pyro.optim
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae_step import (
    BATCH_SIZE,
    DEFAULT_DATA,
    LR,
    _copy_vae,
    _initial_vae,
    _time_rounds,
    _validation,
    load_batch,
    machine_description,
)

from pyro_fdiv.inference import JSA
from pyro_fdiv.models.sbn import SBN

__all__ = ["METHODS", "MODELS", "main", "make_step", "run_timing", "summarize"]

MODELS = ("vae", "sbn")
METHODS = ("trace_elbo", "jsa", "jsa-k4")
REFERENCE = "trace_elbo"

Step = Callable[[], float]


def _objective(method: str, batch_size: int) -> pyro.infer.ELBO:
    if method == "trace_elbo":
        return pyro.infer.Trace_ELBO()
    num_particles = 4 if method == "jsa-k4" else 1
    # the whole batch is the data set: one chain per image, every step re-scores all of them
    return JSA(num_data=batch_size, num_particles=num_particles, max_plate_nesting=1)


def make_step(model: str, method: str, x: torch.Tensor, seed: int) -> Step:
    """An ``SVI`` step of ``method`` on a private copy of ``model``'s initial weights."""
    name = f"{model}_{method}"
    if model == "vae":
        net = _copy_vae(_initial_vae(seed), name=name, device=x.device)
    else:
        torch.manual_seed(seed)
        net = SBN(x.shape[-1], 200, name=name).to(x.device)
    svi = pyro.infer.SVI(
        net.model, net.guide, pyro.optim.Adam({"lr": LR}), loss=_objective(method, len(x))
    )
    return lambda: svi.step(x)


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: median and IQR of the step time (ms) and the median over rounds of
    the paired ratio to the ``Trace_ELBO`` step timed in the same round."""
    reference = records[records.method == REFERENCE][["model", "round", "seconds"]]
    records = records.merge(
        reference.rename(columns={"seconds": "reference"}), on=["model", "round"]
    )
    records["ratio"] = records.seconds / records.reference
    records["ms"] = 1e3 * records.seconds
    grouped = records.groupby(["model", "method"], sort=False)
    return pd.DataFrame(
        {
            "median_ms": grouped.ms.median(),
            "iqr_ms": grouped.ms.quantile(0.75) - grouped.ms.quantile(0.25),
            "ratio": grouped.ratio.median(),
            "ratio_q25": grouped.ratio.quantile(0.25),
            "ratio_q75": grouped.ratio.quantile(0.75),
        }
    ).reset_index()


def run_timing(
    x: torch.Tensor,
    models: Sequence[str],
    methods: Sequence[str],
    rounds: int,
    warmup: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Time every method on every model, interleaved per model."""
    rows = []
    for model in models:
        pyro.clear_param_store()
        steps = {m: make_step(model, m, x, seed) for m in dict.fromkeys((REFERENCE, *methods))}
        for i, times in enumerate(_time_rounds(steps, rounds, warmup, x.device, seed, model)):
            rows += [
                {"model": model, "method": m, "round": i, "seconds": t} for m, t in times.items()
            ]
    pyro.clear_param_store()
    return summarize(pd.DataFrame(rows))


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-validation", action="store_true", help="Pyro/torch validation off")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with _validation(not args.no_validation):
        x = torch.from_numpy(load_batch(args.data, BATCH_SIZE, args.seed)).to(args.device)
        print(machine_description())
        print(f"validation: {'off' if args.no_validation else 'on'}, device: {args.device}")
        table = run_timing(x, args.models, args.methods, args.rounds, args.warmup, args.seed)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
