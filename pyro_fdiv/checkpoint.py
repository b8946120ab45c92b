"""Checkpoints that let training resume exactly, written atomically and read without running code.

A checkpoint holds Pyro's param store, the optimizer's state, the objective's state (AVB's
discriminator, JSA's chains, a spread schedule) and every RNG.

**Writing.** A checkpoint is one :func:`torch.save` file written atomically: the bytes go to a
temporary file in the same directory, are flushed to disk, and then replace the old file with
:func:`os.replace`. A run killed during a save leaves the previous checkpoint intact.

**Reading runs no code.** A checkpoint holds only tensors, numbers, strings, ``None`` and lists,
tuples and dicts of them, and :func:`read` loads it with ``torch.load(weights_only=True)``, which
refuses any other object: a crafted file whose unpickling would call a function is a
``ValueError`` before anything of it runs. What is not a tensor by nature is stored in a form
that needs no code to rebuild: a parameter's constraint by its registered name (``"positive"``)
or by its class among the constraint classes of :mod:`torch.distributions.constraints` and
:mod:`pyro.distributions.constraints` with its arguments (:func:`register_constraint` adds
your own classes), the random generators' states as tensors and integers, and the objective's
state through its ``state_dict()``. A SHA-256 digest of the contents is stored beside them, so a
file damaged after it was written (a flipped byte, a retyped or deleted entry) is refused, not
half restored.

**Every malformed checkpoint is a ValueError** naming the file and what is wrong: empty,
truncated, not a checkpoint, an unknown format version, a missing or mistyped entry, a digest
that does not match, parameters whose shapes differ from the modules being resumed, or another
objective's state. :func:`restore` checks everything before it changes anything, and puts the
previous param store, optimizer, objective and RNG states back if applying the checkpoint
fails, so a failed resume leaves the process (and :mod:`pyro_fdiv.train`'s output directory) as
it was.

**Moving across devices.** ``load(path, map_location="cpu")`` (or ``"cuda"``) places every
tensor there when it is read; the RNG states always return to the CPU generator and the
parameters follow ``restore(..., device=...)``.

Checkpoints of format 1 (pyro_fdiv 0.1.0.dev0, written before loading was made safe) stored
constraints and NumPy's generator state as pickled Python objects; they are still read, with
exactly those classes allow-listed (NumPy's array reconstruction and the constraint classes),
and resume as before; the next :func:`save` writes format 2.

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

import copy
import numbers
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.util
import torch
from pyro.params.param_store import normalize_param_name
from torch import nn

from pyro_fdiv.serialization import (
    CONSTRAINT_CLASSES,
    MalformedEntry,
    check_plain,
    content_digest,
    decode_constraint,
    decode_rng_state,
    encode_constraint,
    encode_rng_state,
    register_constraint,
    to_device,
)

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "get_rng_state",
    "load",
    "read",
    "register_constraint",
    "restore",
    "save",
    "set_rng_state",
]

#: The format :func:`save` writes.
FORMAT_VERSION = 2
#: The formats :func:`read` accepts.
READABLE_VERSIONS = (1, 2)
_ENTRIES = ("param_store", "optim", "objective", "objective_type", "rng", "extra")


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


def _objective_state(objective: Any) -> dict | None:
    if objective is None:
        return None
    if not hasattr(objective, "state_dict"):
        return None  # stateless objectives (Trace_ELBO, IWAE, BlackBoxAlpha)
    return objective.state_dict()


def _contents(optim, objective, extra) -> dict[str, Any]:
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"Expected extra to be a dict, actual {type(extra).__name__}")
    check_plain(extra or {}, "extra")
    store = pyro.get_param_store().get_state()
    state = _objective_state(objective)
    contents = {
        "param_store": {
            "params": store["params"],
            "constraints": {
                name: encode_constraint(c, f"parameter '{name}'")
                for name, c in store["constraints"].items()
            },
        },
        "optim": None if optim is None else optim.get_state(),
        "objective": state,
        "objective_type": None if state is None else type(objective).__name__,
        "rng": encode_rng_state(get_rng_state()),
        "extra": extra or {},
    }
    for key in ("optim", "objective"):
        check_plain(contents[key], key)
    return contents


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


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
    :param dict extra: anything else the run needs (epoch, step, a log) made of tensors,
        numbers, strings, ``None``, and lists, tuples and dicts of them.
    :returns: the path written.
    :raises TypeError: naming the entry, for anything else in ``extra`` (or a constraint class
        that is not registered).
    """
    path = Path(path)
    contents = _contents(optim, objective, extra)
    payload = {"format": FORMAT_VERSION, "digest": content_digest(contents, _ENTRIES), **contents}
    path.parent.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------------------------------
# Reading: no code runs, every entry checked


#: What is wrong with a checkpoint; :func:`read` and :func:`restore` add the file.
_Malformed = MalformedEntry


def _format1_globals() -> list:
    """Format 1 pickled NumPy's generator state and constraint objects: exactly these."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [
        _reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        *CONSTRAINT_CLASSES.values(),
    ]


def _unpickle(path: Path) -> Any:
    """The file's contents on the CPU, loaded by PyTorch's restricted unpickler."""
    map_location = "cpu"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        allowed = _format1_globals()
        if not needed <= {f"{g.__module__}.{g.__qualname__}" for g in allowed}:
            refused = sorted(needed - {f"{g.__module__}.{g.__qualname__}" for g in allowed})
            raise _Malformed(
                f"it refers to code ({', '.join(refused)}), which a checkpoint never holds; "
                "it was refused without running anything"
            ) from None
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)


def _expect(value: Any, kind: type | tuple, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Malformed(f"entry '{where}' has type {type(value).__name__}, expected {names}")
    return value


def _entry(mapping: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in mapping:
        raise _Malformed(f"entry '{where}.{key}' is missing" if where else f"no entry '{key}'")
    return _expect(mapping[key], kind, f"{where}.{key}" if where else key)


def _check_param_store(store: Any) -> dict:
    store = _expect(store, dict, "param_store")
    params = _entry(store, "params", dict, "param_store")
    codes = _entry(store, "constraints", dict, "param_store")
    if set(params) != set(codes):
        raise _Malformed("entries 'param_store.params' and 'param_store.constraints' differ")
    for name, value in params.items():
        _expect(value, torch.Tensor, f"param_store.params.{name}")
    constraints = {
        n: decode_constraint(c, f"param_store.constraints.{n}") for n, c in codes.items()
    }
    return {"params": params, "constraints": constraints}


def _check_optim(state: Any, params: dict[str, torch.Tensor]) -> None:
    """Each parameter's optimizer state: ``state`` and ``param_groups`` of the shapes torch's
    optimizers write, and non-scalar tensors shaped like the parameter."""
    for name, item in _expect(state, dict, "optim").items():
        where = f"optim.{name}"
        if name not in params:
            raise _Malformed(f"entry '{where}' is the state of a parameter the store lacks")
        inner = _entry(_expect(item, dict, where), "state", dict, where)
        ids = []
        for group in _entry(item, "param_groups", list, where):
            ids += _entry(_expect(group, dict, f"{where}.param_groups"), "params", list, where)
        if any(type(i) is not int for i in ids) or not set(inner) <= set(ids):
            raise _Malformed(
                f"entry '{where}': the states {list(inner)} and parameters {ids} differ"
            )
        for index, values in inner.items():
            for key, value in _expect(values, dict, f"{where}.state.{index}").items():
                _expect(value, (torch.Tensor, numbers.Number), f"{where}.state.{index}.{key}")
                shaped = isinstance(value, torch.Tensor) and value.dim() > 0
                if shaped and value.shape != params[name].shape:
                    raise _Malformed(
                        f"entry '{where}.state.{index}.{key}' has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(params[name].shape)}"
                    )


def _check_rng(rng: Any) -> None:
    rng = _expect(rng, dict, "rng")
    torch_state = _entry(rng, "torch", torch.Tensor, "rng")
    if torch_state.dtype != torch.uint8 or torch_state.dim() != 1:
        raise _Malformed("entry 'rng.torch' is not a generator state (a 1-D uint8 tensor)")
    if isinstance(rng.get("numpy"), tuple):  # format 1
        _entry(rng, "random", tuple, "rng")
        return
    random = _entry(rng, "random", dict, "rng")
    _entry(random, "version", int, "rng.random")
    _entry(random, "state", torch.Tensor, "rng.random")
    _entry(random, "gauss", (float, type(None)), "rng.random")
    numpy = _entry(rng, "numpy", dict, "rng")
    _entry(numpy, "key", str, "rng.numpy")
    keys = _entry(numpy, "state", torch.Tensor, "rng.numpy")
    if keys.shape != (624,):
        raise _Malformed(f"entry 'rng.numpy.state' has shape {tuple(keys.shape)}, expected (624,)")
    for key, kind in (("pos", int), ("has_gauss", int), ("cached_gaussian", float)):
        _entry(numpy, key, kind, "rng.numpy")
    for i, state in enumerate(_expect(rng.get("cuda", []), list, "rng.cuda")):
        _expect(state, torch.Tensor, f"rng.cuda[{i}]")


def _check(payload: Any) -> dict:
    if not isinstance(payload, dict) or "format" not in payload:
        raise _Malformed(f"it is not a pyro_fdiv checkpoint (format {FORMAT_VERSION})")
    version = payload["format"]
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise _Malformed(
            f"format {version!r} is not readable; this version reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))} (a newer pyro_fdiv wrote it?)"
        )
    if version == FORMAT_VERSION:
        digest = _entry(payload, "digest", str, "")
        for key in _ENTRIES:
            _entry(payload, key, object, "")
        if digest != content_digest(payload, _ENTRIES):
            raise _Malformed("its contents do not match its digest: the file was damaged")
    else:
        for key in ("param_store", "optim", "objective", "rng", "extra"):
            _entry(payload, key, object, "")
        payload = {**payload, "objective_type": None}
    store = _check_param_store(payload["param_store"])
    if payload["optim"] is not None:
        _check_optim(payload["optim"], store["params"])
    _expect(payload["objective"], (dict, type(None)), "objective")
    _expect(payload["objective_type"], (str, type(None)), "objective_type")
    _check_rng(payload["rng"])
    _expect(payload["extra"], dict, "extra")
    return {**payload, "param_store": store}


def read(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """
    The contents of a checkpoint written by :func:`save`, checked but not applied: a dict with
    ``param_store``, ``optim``, ``objective`` (its state), ``objective_type``, ``rng`` and
    ``extra`` (e.g. to compare settings saved in ``extra`` before :func:`restore` changes any
    global state). Loading runs no code from the file.

    :param map_location: where the tensors are placed (``torch.load``'s argument).
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: naming the file and what is wrong, for a file that is not a readable,
        intact pyro_fdiv checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        payload = _check(_unpickle(path))
    except _Malformed as error:
        raise ValueError(f"{path} is not a usable pyro_fdiv checkpoint: {error}") from None
    except Exception as error:  # torch.load's many ways to fail on a damaged file
        raise ValueError(
            f"{path} is not a pyro_fdiv checkpoint: it cannot be read "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    if map_location is not None:  # after the digest was checked on the CPU; RNGs stay there
        payload = {k: v if k == "rng" else to_device(v, map_location) for k, v in payload.items()}
    payload["path"] = str(path)
    return payload


# ------------------------------------------------------------------------------------------------
# Restoring: check, then apply, and roll back if applying fails


def _check_modules(payload: dict, modules: Mapping[str, nn.Module]) -> None:
    """Every parameter of each ``{name: module}`` given to :func:`pyro.module` is in the
    checkpoint with the module's shape."""
    params = payload["param_store"]["params"]
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            key = f"{module_name}$$${name}"
            if key not in params:
                raise _Malformed(
                    f"it has no parameter '{key}' of module '{module_name}' (is it another "
                    "model's checkpoint?)"
                )
            if params[key].shape != param.shape:
                raise _Malformed(
                    f"parameter '{key}' has shape {tuple(params[key].shape)}, the model's "
                    f"{tuple(param.shape)} (another model's checkpoint, or other settings?)"
                )


def _optim_args(optim: pyro.optim.PyroOptim, name: str) -> dict | None:
    """The optimizer arguments ``optim`` uses for parameter ``name`` (``None``: unknown)."""
    if not callable(optim.pt_optim_args):
        return optim.pt_optim_args
    if getattr(optim, "pt_optim_args_argc", None) == 1:
        return optim.pt_optim_args(normalize_param_name(name))
    return None


def _check_optim_fits(optim: pyro.optim.PyroOptim, payload: dict) -> None:
    """Each parameter's saved optimizer state drives one step of a fresh optimizer of
    ``optim``'s kind on a copy of the parameter: mistyped moments or hyperparameters are found
    here, not at the next training step."""
    if isinstance(optim, pyro.optim.PyroLRScheduler):
        return
    for name, state in payload["optim"].items():
        args = _optim_args(optim, name)
        if args is None:
            continue
        param = payload["param_store"]["params"][name].detach().clone().requires_grad_()
        try:
            trial = optim.pt_optim_constructor([param], **args)
            _check_groups(trial.param_groups, state["param_groups"], f"optim.{name}")
            trial.load_state_dict(copy.deepcopy(state))
            param.grad = torch.zeros_like(param)
            trial.step()
        except Exception as error:
            raise _Malformed(
                f"entry 'optim.{name}' is not a state of this optimizer "
                f"({type(error).__name__}: {error})"
            ) from None


def _check_groups(fresh: list[dict], saved: list[dict], where: str) -> None:
    """Hyperparameters of the types a fresh optimizer of the same kind has (a number for a
    number, a bool for a bool; ``None`` or a bool where the default is ``None``)."""
    if len(fresh) != len(saved):
        raise _Malformed(f"entry '{where}.param_groups' has {len(saved)} groups, expected 1")
    for key, default in fresh[0].items():
        value = saved[0].get(key, default)
        numbers_ = isinstance(default, numbers.Real) and not isinstance(default, bool)
        same = type(value) is type(default) or (
            numbers_ and isinstance(value, numbers.Real) and not isinstance(value, bool)
        )
        if default is None:  # torch's Optional[bool] flags (foreach, fused)
            same = value is None or isinstance(value, bool)
        if key != "params" and not same:
            raise _Malformed(
                f"entry '{where}.param_groups.0.{key}' is {value!r}, expected a "
                f"{'bool or None' if default is None else type(default).__name__}"
            )


def _check_objective(payload: dict, optim, objective) -> None:
    if optim is not None and payload["optim"] is None:
        raise _Malformed("it holds no optimizer state; pass optim=None to skip it")
    if optim is not None:
        _check_optim_fits(optim, payload)
    if objective is None or not hasattr(objective, "load_state_dict"):
        return
    saved, name = payload["objective_type"], type(objective).__name__
    if payload["objective"] is None:
        raise _Malformed(
            f"it holds no state for {name}; it was saved without objective= or with a "
            "stateless objective"
        )
    if saved is not None and saved != name:
        raise _Malformed(
            f"Expected an {name} state_dict, actual the state of a {saved}: resume with the "
            "objective the run was saved with"
        )


def _apply(payload: dict, objective, device, modules, optim) -> None:
    """Apply in an order that leaves only the param store, the objective and the RNGs to roll
    back: what can fail comes first, the optimizer's pending state (a dict update) last."""
    store = payload["param_store"]
    if device is not None:
        store = {**store, "params": {k: v.to(device) for k, v in store["params"].items()}}
    rng = decode_rng_state(payload["rng"])
    if objective is not None and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(payload["objective"])
    pyro.clear_param_store()
    pyro.get_param_store().set_state(store)
    for name, module in (modules or {}).items():
        pyro.module(name, module, update_module_params=True)
    set_rng_state(rng)
    if optim is not None:  # the optimizers of the replaced parameters go with them
        optim.optim_objs.clear()
        optim.grad_clip.clear()
        optim.set_state(payload["optim"])


def _roll_back(snapshot: dict[str, Any], objective) -> None:
    if snapshot["objective"] is not None:
        objective.load_state_dict(snapshot["objective"])
    pyro.clear_param_store()
    pyro.get_param_store().set_state(snapshot["store"])
    set_rng_state(snapshot["rng"])


def restore(
    payload: dict,
    *,
    optim: pyro.optim.PyroOptim | None = None,
    objective: Any = None,
    device: str | torch.device | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """
    Apply a checkpoint read by :func:`read`: Pyro's param store is cleared and refilled (its
    tensors moved to ``device`` when given), the optimizer's and the objective's states are
    loaded, and the RNGs are set.

    The optimizer's per-parameter states are applied when SVI next sees each parameter (Pyro's
    :meth:`~pyro.optim.PyroOptim.set_state`) and follow the parameter's device; the objective's
    state is copied into its existing parameters and buffers. Modules registered with
    :func:`pyro.module` receive the restored tensors at their next ``pyro.module(...,
    update_module_params=True)`` call, or at once when given in ``modules``.

    Everything is checked before anything is changed; if applying still fails, the param store,
    the optimizer's pending state, the objective and the RNGs are put back as they were.

    :param modules: ``{name: module}`` as given to :func:`pyro.module`: each module's
        parameters must be in the checkpoint with the module's shapes, and are loaded into it.
    :returns: the ``extra`` dict given to :func:`save`.
    :raises ValueError: naming the file, when the optimizer's or the objective's state is
        missing, belongs to another objective or cannot be loaded into ``objective``, or the
        parameters do not match ``modules``.
    """
    path = payload.get("path", "the checkpoint")
    try:
        _check_objective(payload, optim, objective)
        _check_modules(payload, modules or {})
    except _Malformed as error:
        raise ValueError(f"Cannot resume from {path}: {error}") from None
    snapshot = {
        "store": pyro.get_param_store().get_state(),
        "objective": copy.deepcopy(_objective_state(objective)),
        "rng": get_rng_state(),
    }
    try:
        _apply(payload, objective, device, modules, optim)
    except Exception as error:
        _roll_back(snapshot, objective)
        raise ValueError(
            f"Cannot resume from {path}: its state does not fit this run "
            f"({type(error).__name__}: {error}); nothing was changed"
        ) from error
    return payload["extra"]


def load(
    path: str | os.PathLike,
    *,
    optim: pyro.optim.PyroOptim | None = None,
    objective: Any = None,
    map_location: str | torch.device | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """
    Restore a checkpoint written by :func:`save` into the running process: :func:`read` then
    :func:`restore` (see there). Build the model, guide, optimizer and objective exactly as for
    the saved run first.

    :returns: the ``extra`` dict given to :func:`save`.
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: naming the file, when it is not a readable, intact pyro_fdiv checkpoint,
        or its optimizer or objective state is missing or does not fit.
    """
    return restore(read(path, map_location), optim=optim, objective=objective, modules=modules)
