"""Builds, trains and resumes small runs of every objective, for tests/test_checkpoint.py.

Imported by the test (which trains ``N + M`` steps, saving after ``N``) and run as a script in a
fresh interpreter (which builds the same run, loads the checkpoint and trains ``M`` steps)::

    python tests/resume_worker.py SPEC.pt RESULT.pt

``SPEC.pt`` maps each case name to ``{"checkpoint": path, "start": N, "steps": M}``;
``RESULT.pt`` receives ``{case: {"losses": [...], "state": {name: tensor}}}``. Each case is
rebuilt from scratch (new modules, new objective, cleared param store) before its checkpoint is
loaded, so nothing of its first ``N`` steps lives in the worker's memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_fdiv import checkpoint
from pyro_fdiv.inference import (
    AVB,
    IWAE,
    JSA,
    BlackBoxAlpha,
    FDivergenceBound,
    FGANBound,
    SpreadSchedule,
)
from pyro_fdiv.models.vae import VAE

__all__ = ["CASES", "Run", "build", "configure", "snapshot", "train"]

#: Tiny sizes: the point is exactness, not learning.
X_DIM, Z_DIM, HIDDEN, NUM_DATA, BATCH = 6, 2, 5, 10, 5
SEED = 0


@dataclass
class Run:
    """One objective's training setup; ``batch(step)`` gives the SVI arguments of a step."""

    svi: SVI
    optim: pyro.optim.PyroOptim
    objective: Any
    batch: Callable[[], tuple[tuple, dict]]


def configure() -> None:
    """The test suite's settings (tests/conftest.py): float64, one thread, validation on."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((NUM_DATA, X_DIM), 0.4), generator=generator)


def _minibatch(data: torch.Tensor) -> Callable[[], tuple[tuple, dict]]:
    """Minibatches drawn from the global RNG, which the checkpoint restores."""

    def batch() -> tuple[tuple, dict]:
        idx = torch.randperm(NUM_DATA)[:BATCH]
        return (data[idx],), {}

    return batch


def _vae(**kwargs) -> VAE:
    return VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dim=HIDDEN, name="resume", **kwargs)


def _adam() -> pyro.optim.PyroOptim:
    return pyro.optim.Adam({"lr": 0.01})


def _importance(objective) -> Run:
    vae, optim = _vae(), _adam()
    svi = SVI(vae.model, vae.guide, optim, loss=objective)
    return Run(svi, optim, objective, _minibatch(_data()))


def _avb() -> Run:
    vae, optim = _vae(encoder="implicit"), _adam()
    objective = AVB(num_particles=4, num_adversary_steps=2, discriminator_hidden=(8,))
    svi = SVI(vae.model, vae.guide, optim, loss=objective)
    return Run(svi, optim, objective, _minibatch(_data()))


def _jsa() -> Run:
    vae, optim, data = _vae(), _adam(), _data()
    objective = JSA(num_data=NUM_DATA, num_particles=2)
    svi = SVI(vae.model, vae.guide, optim, loss=objective)

    def batch() -> tuple[tuple, dict]:
        idx = torch.randperm(NUM_DATA)[:BATCH]
        return (data[idx],), {"num_data": NUM_DATA, "idx": idx}

    return Run(svi, optim, objective, batch)


def _fdiv() -> Run:
    vae, optim, data = _vae(likelihood="normal"), _adam(), _data()
    objective = FDivergenceBound(
        "reverse_kl",
        data=data,
        spread=SpreadSchedule(1.0, 0.1, num_steps=8),
        num_particles=2,
        guide_steps=1,
        guide_optim=pyro.optim.Adam({"lr": 0.02}),
    )
    svi = SVI(vae.model, vae.guide, optim, loss=objective)
    return Run(svi, optim, objective, _minibatch(data))


def _no_guide(*args, **kwargs) -> None:
    pass


def _fgan() -> Run:
    vae, optim = _vae(likelihood="normal"), _adam()
    critic = nn.Sequential(nn.Linear(X_DIM, 8), nn.ELU(), nn.Linear(8, 1))
    objective = FGANBound("js", critic=critic, critic_steps=2)
    svi = SVI(vae.model, _no_guide, optim, loss=objective)
    return Run(svi, optim, objective, _minibatch(_data()))


#: Every objective with its run; ``Trace_ELBO`` is Pyro's, for reference (stateless).
CASES: dict[str, Callable[[], Run]] = {
    "trace_elbo": lambda: _importance(Trace_ELBO()),
    # Pyro's vectorized ELBOs guess max_plate_nesting on a process's first step by running model
    # and guide, which draws from the RNG: resuming is exact only with max_plate_nesting given.
    "trace_elbo_vectorized": lambda: _importance(
        Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    ),
    "iwae_dreg": lambda: _importance(IWAE(num_particles=3, gradient_estimator="dreg")),
    "bbalpha": lambda: _importance(BlackBoxAlpha(alpha=0.5, num_particles=3)),
    "avb": _avb,
    "jsa": _jsa,
    "fdiv_bound": _fdiv,
    "fgan": _fgan,
}


def build(name: str) -> Run:
    """A fresh run of case ``name``: modules and objective built from the same seed."""
    configure()
    return CASES[name]()


def train(run: Run, steps: int) -> list[float]:
    """``steps`` SVI steps; the losses."""
    losses = []
    for _ in range(steps):
        args, kwargs = run.batch()
        losses.append(run.svi.step(*args, **kwargs))
    return losses


def _tensors(prefix: str, value: Any, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors(f"{prefix}.{key}", item, out)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _tensors(f"{prefix}.{i}", item, out)
    elif isinstance(value, int | float | bool):
        out[prefix] = torch.tensor(value)


def snapshot(run: Run) -> dict[str, torch.Tensor]:
    """Every tensor of the training state: the param store, the SVI optimizer's moments and
    the objective's state (discriminator, critic, chains, schedule), flattened by name."""
    out: dict[str, torch.Tensor] = {}
    store = pyro.get_param_store()
    for name in sorted(store.keys()):
        out[f"param.{name}"] = store[name].detach().clone()
    _tensors("optim", run.optim.get_state(), out)
    if hasattr(run.objective, "state_dict"):
        _tensors("objective", dict(run.objective.state_dict()), out)
    return out


def resume(spec: dict[str, dict]) -> dict[str, dict]:
    """For each case of ``spec``: build, load its checkpoint, train, report."""
    results = {}
    for name, item in spec.items():
        run = build(name)
        extra = checkpoint.load(item["checkpoint"], optim=run.optim, objective=run.objective)
        if extra.get("step") != item["start"]:
            raise ValueError(f"{name}: checkpoint at step {extra.get('step')}, not {item['start']}")
        losses = train(run, item["steps"])
        results[name] = {"losses": losses, "state": snapshot(run)}
    return results


def main(argv: list[str]) -> None:
    spec_path, result_path = argv
    spec = torch.load(spec_path, weights_only=False)
    torch.save(resume(spec), result_path)


if __name__ == "__main__":
    main(sys.argv[1:])
