"""Argument checks and random-state helpers shared by every layer of the package.

This module sits below :mod:`pyro_fdiv.inference` and :mod:`pyro_fdiv.models`: it imports
nothing from them, so a model can validate its constructor arguments without importing the
inference layer.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

from pyro_fdiv.checkpoint import get_rng_state, set_rng_state

__all__ = ["check_flag", "check_integer", "check_num_particles", "rng_preserved"]


def check_integer(name: str, value: object, minimum: int) -> int:
    """Validate a count argument ``name``: an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Expected {name} to be an integer >= {minimum}, actual {value!r}")
    return int(value)


def check_num_particles(num_particles: object) -> int:
    """Validate ``num_particles``: a positive integer."""
    return check_integer("num_particles", num_particles, 1)


def check_flag(name: str, value: object) -> bool:
    """Validate a boolean option ``name`` (e.g. ``check_finite``)."""
    if not isinstance(value, bool):
        raise ValueError(f"Expected {name} to be a bool, actual {value!r}")
    return value


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore Pyro's random state (torch, numpy, random) after the block, so that running model
    and guide to inspect them (e.g. to guess ``max_plate_nesting``) leaves the caller's random
    stream untouched."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
