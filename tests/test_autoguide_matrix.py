"""Every Pyro autoguide × every posterior-inference objective on a conjugate Gaussian model
with a known posterior (``tests/autoguide_matrix_cases.py``, which also generates the table in
``docs/supports.md`` through ``scripts/autoguide_matrix.py``).

A cell either fits the exact posterior (the guide's posterior mean and sd, from 2000 draws,
within the objective's tolerance ``TOLERANCE``; point-estimate guides: the mean only) or raises
the error listed in ``RAISES``. Cells listed in ``KNOWN_ISSUES`` do neither today: they are
written as the intended behaviour and marked ``xfail(strict=True)``, so that fixing one makes
its test fail until the mark is removed.
"""

import re

import pytest
from autoguide_matrix_cases import GUIDES, OBJECTIVES, TOLERANCE, expected, fit


def _cells():
    for guide_name in GUIDES:
        for objective_name in OBJECTIVES:
            _, note = expected(guide_name, objective_name)
            marks = [pytest.mark.xfail(strict=True, reason=note)] if note else []
            yield pytest.param(
                guide_name, objective_name, marks=marks, id=f"{guide_name}-{objective_name}"
            )


@pytest.mark.parametrize("guide_name,objective_name", list(_cells()))
def test_autoguide_objective_cell(guide_name, objective_name):
    outcome, _ = expected(guide_name, objective_name)
    result = fit(guide_name, objective_name)
    if outcome == "fits":
        if result.error is not None:
            raise result.error
        tolerance = TOLERANCE[objective_name]
        assert result.mean_err <= tolerance, result
        if result.sd_err is not None:
            assert result.sd_err <= tolerance, result
    else:
        error_class, match = outcome
        assert result.error is not None, f"expected {error_class.__name__}, got {result}"
        assert isinstance(result.error, error_class), repr(result.error)
        assert re.search(match, str(result.error)), str(result.error)
