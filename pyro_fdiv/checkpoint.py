"""Checkpoints that let training resume exactly, written atomically.

A checkpoint holds Pyro's param store, the optimizer's state, the objective's state (AVB's
discriminator, JSA's chains, a spread schedule) and every RNG.

A checkpoint is one :func:`torch.save` file written atomically: the bytes go to a temporary
file in the same directory, are flushed to disk, and then replace the old file with
:func:`os.replace`. A run killed during a save leaves the previous checkpoint intact.

**Example**::

    svi = SVI(model, guide, optim, loss=objective)
    for epoch in range(epochs):
        ...
        checkpoint.save("run/checkpoint.pt", optim=optim, objective=objective,
                        extra={"epoch": epoch})
    # later, in a fresh process, after building model, guide, optim and objective alike:
    extra = checkpoint.load("run/checkpoint.pt", optim=optim, objective=objective)
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pyro
import pyro.util
import torch

__all__ = ["get_rng_state", "load", "read", "restore", "save", "set_rng_state"]

FORMAT_VERSION = 1


def get_rng_state() -> dict[str, Any]:
    """Pyro's RNG state (Python's, NumPy's and PyTorch's CPU generators) and, once CUDA is
    initialized, every CUDA device's."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`get_rng_state` (generator states are CPU byte
    tensors, also after a ``map_location`` moved the checkpoint)."""
    state = {**state, "torch": state["torch"].cpu()}
    if "python" in state:  # checkpoints of 0.1.0.dev0 named Python's generator "python"
        state["random"] = state["python"]
    pyro.util.set_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _objective_state(objective: Any) -> dict | None:
    if objective is None:
        return None
    if not hasattr(objective, "state_dict"):
        return None  # stateless objectives (Trace_ELBO, IWAE, BlackBoxAlpha)
    return objective.state_dict()


def save(
    path: str | os.PathLike,
    *,
    optim: pyro.optim.PyroOptim | None = None,
    objective: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """
    Write a checkpoint of the current training state to ``path`` atomically.

    :param path: the checkpoint file; its directory is created if missing.
    :param optim: the :class:`pyro.optim.PyroOptim` that SVI steps with (its per-parameter
        states, e.g. Adam's moments and step counts).
    :param objective: the loss given to SVI; saved with its ``state_dict()`` when it has one.
    :param dict extra: anything else picklable by :func:`torch.save` (epoch, step, a log).
    :returns: the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "param_store": pyro.get_param_store().get_state(),
        "optim": None if optim is None else optim.get_state(),
        "objective": _objective_state(objective),
        "rng": get_rng_state(),
        "extra": extra or {},
    }
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp's 0600 → what open() would have made
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """
    The contents of a checkpoint written by :func:`save`, without applying them: a dict with
    ``param_store``, ``optim``, ``objective``, ``rng`` and ``extra`` (e.g. to compare settings
    saved in ``extra`` before :func:`restore` changes any global state).

    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: when the file is not a pyro_fdiv checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError) as error:
        raise ValueError(f"{path} is not a pyro_fdiv checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a pyro_fdiv checkpoint (format {FORMAT_VERSION})")
    payload["path"] = str(path)
    return payload


def restore(
    payload: dict,
    *,
    optim: pyro.optim.PyroOptim | None = None,
    objective: Any = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """
    Apply a checkpoint read by :func:`read`: Pyro's param store is cleared and refilled (its
    tensors moved to ``device`` when given), the optimizer's and the objective's states are
    loaded, and the RNGs are set.

    The optimizer's per-parameter states are applied when SVI next sees each parameter (Pyro's
    :meth:`~pyro.optim.PyroOptim.set_state`) and follow the parameter's device; the objective's
    state is copied into its existing parameters and buffers. Modules registered with
    :func:`pyro.module` receive the restored tensors at their next ``pyro.module(...,
    update_module_params=True)`` call (or :meth:`pyro_fdiv.models.vae.VAE.sync_params`).

    :returns: the ``extra`` dict given to :func:`save`.
    :raises ValueError: when the optimizer's or the objective's state is missing or cannot be
        loaded into ``objective``.
    """
    path = payload.get("path", "the checkpoint")
    store = payload["param_store"]
    if device is not None:
        store = {**store, "params": {k: v.to(device) for k, v in store["params"].items()}}
    pyro.clear_param_store()
    pyro.get_param_store().set_state(store)
    if optim is not None:
        if payload["optim"] is None:
            raise ValueError(f"{path} holds no optimizer state; pass optim=None to skip it")
        optim.set_state(payload["optim"])
    state = payload["objective"]
    if objective is not None and hasattr(objective, "load_state_dict"):
        if state is None:
            raise ValueError(
                f"{path} holds no state for {type(objective).__name__}; it was saved without "
                "objective= or with a stateless objective"
            )
        objective.load_state_dict(state)
    set_rng_state(payload["rng"])
    return payload["extra"]


def load(
    path: str | os.PathLike,
    *,
    optim: pyro.optim.PyroOptim | None = None,
    objective: Any = None,
    map_location: str | torch.device | None = None,
) -> dict[str, Any]:
    """
    Restore a checkpoint written by :func:`save` into the running process: :func:`read` then
    :func:`restore` (see there). Build the model, guide, optimizer and objective exactly as for
    the saved run first.

    :returns: the ``extra`` dict given to :func:`save`.
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: when the file is not a pyro_fdiv checkpoint, or the optimizer's or the
        objective's state is missing or cannot be loaded into ``objective``.
    """
    return restore(read(path, map_location), optim=optim, objective=objective)
