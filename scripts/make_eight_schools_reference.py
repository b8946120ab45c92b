"""Regenerate the Eight Schools HMC reference draws shipped in ``pyro_fdiv/compare/data``.

Usage::

    python scripts/make_eight_schools_reference.py --seed 0
    python scripts/make_eight_schools_reference.py --seed 1
    python scripts/make_eight_schools_reference.py --jit-benchmark   # jit_compile True vs False

Each run writes ``eight_schools_<parameterization>_seed<seed>.nc`` and its ``.json`` sidecar,
prints the wall time and the diagnostics table, and fails (exit status 1) if any R-hat exceeds
1.01 or any transition diverged.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from pathlib import Path

import pandas as pd

from pyro_fdiv.compare.reference import (
    NUTSSettings,
    ReferenceQualityWarning,
    diagnostics,
    run_nuts,
    save_reference,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "pyro_fdiv" / "compare" / "data"


def jit_benchmark(num_steps: int, workers: int) -> None:
    """Time 1 chain × (num_steps warm-up + num_steps draws) with and without jit_compile."""
    for jit in (True, False):
        settings = NUTSSettings(
            num_chains=1, warmup_steps=num_steps, num_samples=num_steps, jit_compile=jit
        )
        start = time.perf_counter()
        run_nuts(settings, progress=False, num_workers=workers)
        print(f"jit_compile={jit}: {time.perf_counter() - start:.1f} s")


def make_reference(args: argparse.Namespace) -> int:
    settings = NUTSSettings(
        seed=args.seed, parameterization=args.parameterization, jit_compile=not args.no_jit
    )
    out = args.out or DATA_DIR / f"eight_schools_{settings.parameterization}_seed{args.seed}.nc"
    print(f"settings: {dataclasses.asdict(settings)}\nkey: {settings.key()}")
    idata = run_nuts(settings, progress=not args.quiet, num_workers=args.workers)
    save_reference(idata, out)
    print(f"wall time: {idata.attrs['wall_time_s']:.1f} s ({idata.attrs['num_workers']} workers)")
    print(f"wrote {out} ({Path(out).stat().st_size / 1024:.0f} KiB)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReferenceQualityWarning)
        table = diagnostics(idata)
    with pd.option_context("display.width", 120, "display.max_rows", 100):
        print(table.round(4))
    print(f"divergences: {table.attrs['divergences']}")
    for warning in caught:
        print(f"WARNING: {warning.message}")
    return 1 if caught else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parameterization", default="noncentered")
    parser.add_argument("--out", type=Path, default=None, help="default: the package data folder")
    parser.add_argument("--no-jit", action="store_true", help="jit_compile=False")
    parser.add_argument("--workers", type=int, default=None, help="default: one per chain/core")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--jit-benchmark",
        type=int,
        nargs="?",
        const=300,
        default=None,
        metavar="STEPS",
        help="only time 1 chain × (STEPS + STEPS) with and without jit (default 300)",
    )
    args = parser.parse_args(argv)
    if args.jit_benchmark is not None:
        jit_benchmark(args.jit_benchmark, args.workers or 1)
        return 0
    return make_reference(args)


if __name__ == "__main__":
    raise SystemExit(main())
