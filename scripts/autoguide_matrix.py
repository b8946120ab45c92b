"""Print the "Autoguides × objectives" table of docs/supports.md: every Pyro autoguide fitted
by every posterior-inference objective on the conjugate model of
``tests/autoguide_matrix_cases.py`` (the same cases that ``tests/test_autoguide_matrix.py``
checks).

Usage: ``python scripts/autoguide_matrix.py`` (about a minute on two cores).
"""

import sys
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import autoguide_matrix_cases as cases


def main() -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for guide_name in cases.GUIDES:
            for objective_name in cases.OBJECTIVES:
                results[guide_name, objective_name] = cases.fit(guide_name, objective_name)
    print(cases.table(results))
    notes = {note for _, note in cases.KNOWN_ISSUES.values()}
    if notes:
        print()
        for note in sorted(notes):
            print(f"- ⚠ {note}.")


if __name__ == "__main__":
    main()
