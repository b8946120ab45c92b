"""Variational objectives that drop into ``pyro.infer.SVI(..., loss=...)``."""

from pyro_fdiv.inference.avb import AVB, Discriminator
from pyro_fdiv.inference.black_box_alpha import BlackBoxAlpha
from pyro_fdiv.inference.compiled import make_step
from pyro_fdiv.inference.fdiv_bound import FDivergenceBound
from pyro_fdiv.inference.fgan import FGANBound
from pyro_fdiv.inference.implicit import AutoImplicit, Implicit, implicit_sample
from pyro_fdiv.inference.importance import (
    LogWeights,
    get_log_weights,
    guess_max_plate_nesting,
    importance_trace,
)
from pyro_fdiv.inference.iwae import IWAE
from pyro_fdiv.inference.jsa import JSA
from pyro_fdiv.inference.objective import ImportanceObjective
from pyro_fdiv.inference.resample import ResampledPosterior, importance_resample
from pyro_fdiv.inference.rws import ReweightedWakeSleep
from pyro_fdiv.inference.spread import SpreadSchedule

__all__ = [
    "AVB",
    "IWAE",
    "JSA",
    "AutoImplicit",
    "BlackBoxAlpha",
    "Discriminator",
    "FDivergenceBound",
    "FGANBound",
    "Implicit",
    "ImportanceObjective",
    "LogWeights",
    "ResampledPosterior",
    "ReweightedWakeSleep",
    "SpreadSchedule",
    "get_log_weights",
    "guess_max_plate_nesting",
    "implicit_sample",
    "importance_resample",
    "importance_trace",
    "make_step",
]
