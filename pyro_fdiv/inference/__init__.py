"""Variational objectives that drop into ``pyro.infer.SVI(..., loss=...)``."""

from pyro_fdiv.inference.black_box_alpha import BlackBoxAlpha
from pyro_fdiv.inference.importance import LogWeights, get_log_weights
from pyro_fdiv.inference.iwae import IWAE
from pyro_fdiv.inference.objective import ImportanceObjective

__all__ = ["IWAE", "BlackBoxAlpha", "ImportanceObjective", "LogWeights", "get_log_weights"]
