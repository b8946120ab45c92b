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
import hashlib
import numbers
import os
import pickle
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions.constraints as pyro_constraints
import pyro.util
import torch
import torch.distributions.constraints as torch_constraints
from pyro.params.param_store import normalize_param_name
from torch import nn
from torch.distributions.constraints import Constraint

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
#: The plain types a checkpoint holds besides tensors (exactly: NumPy scalars pickle as code).
_PLAIN = (str, bool, int, float, type(None))


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


# ------------------------------------------------------------------------------------------------
# Plain forms: constraints and RNG states as tensors, numbers and strings


def _constraint_registry() -> tuple[dict[str, Constraint], dict[str, type]]:
    """The named constraint instances (``"positive"``) and the constraint classes by
    qualified name, of torch's and Pyro's constraint modules."""
    named, classes = {}, {}
    for module in (torch_constraints, pyro_constraints):
        for name, value in vars(module).items():
            if isinstance(value, Constraint) and not name.startswith("_"):
                named.setdefault(name, value)
                value = type(value)
            if isinstance(value, type) and issubclass(value, Constraint):
                classes[f"{value.__module__}.{value.__qualname__}"] = value
    return named, classes


_NAMED, _CLASSES = _constraint_registry()


def register_constraint(cls: type) -> type:
    """Allow instances of the constraint class ``cls`` (a subclass of
    :class:`torch.distributions.constraints.Constraint` whose state is its ``__dict__`` of
    tensors, numbers and constraints) in checkpoints; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise TypeError(f"Expected a Constraint subclass, actual {cls!r}")
    _CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _encode_constraint(constraint: Constraint, where: str) -> dict:
    for name, named in _NAMED.items():
        if constraint is named:
            return {"name": name}
    key = f"{type(constraint).__module__}.{type(constraint).__qualname__}"
    if _CLASSES.get(key) is not type(constraint):
        raise TypeError(
            f"{where} has constraint {constraint!r} of class {key}, which checkpoints cannot "
            "store; register it with pyro_fdiv.checkpoint.register_constraint(cls)"
        )
    state = {k: _encode_argument(v, f"{where}.{k}") for k, v in vars(constraint).items()}
    return {"class": key, "state": state}


def _encode_argument(value: Any, where: str) -> Any:
    if isinstance(value, Constraint):
        return {"constraint": _encode_constraint(value, where)}
    if isinstance(value, list | tuple):
        return type(value)(_encode_argument(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return value
    raise TypeError(f"{where} = {value!r}: a constraint argument checkpoints cannot store")


def _decode_constraint(code: Any, where: str) -> Constraint:
    if isinstance(code, Constraint):  # format 1 stored the objects themselves
        return code
    if isinstance(code, dict) and set(code) == {"name"} and code["name"] in _NAMED:
        return _NAMED[code["name"]]
    if not (isinstance(code, dict) and set(code) == {"class", "state"}):
        raise _Malformed(f"entry '{where}' is not a constraint: {code!r}")
    cls = _CLASSES.get(code["class"]) if isinstance(code["class"], str) else None
    if cls is None or not isinstance(code["state"], dict):
        raise _Malformed(f"entry '{where}' names an unknown constraint class {code['class']!r}")
    constraint = cls.__new__(cls)  # the state is plain data: no constructor code runs
    constraint.__dict__.update(
        {k: _decode_argument(v, f"{where}.{k}") for k, v in code["state"].items()}
    )
    return constraint


def _decode_argument(value: Any, where: str) -> Any:
    if isinstance(value, dict) and set(value) == {"constraint"}:
        return _decode_constraint(value["constraint"], where)
    if isinstance(value, list | tuple):
        return type(value)(_decode_argument(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _encode_rng(state: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = state["random"]
    key, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "torch": state["torch"],
        "random": {"version": version, "state": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "key": key,
            "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _decode_rng(code: dict[str, Any]) -> dict[str, Any]:
    if isinstance(code.get("numpy"), tuple):  # format 1: Pyro's own form
        return code
    numpy = code["numpy"]
    state = {
        "torch": code["torch"],
        "random": (
            code["random"]["version"],
            tuple(code["random"]["state"].tolist()),
            code["random"]["gauss"],
        ),
        "numpy": (
            numpy["key"],
            numpy["state"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        ),
    }
    if "cuda" in code:
        state["cuda"] = code["cuda"]
    return state


# ------------------------------------------------------------------------------------------------
# Contents: plain types only, with a digest


def _check_plain(value: Any, where: str) -> None:
    """``TypeError`` naming the entry unless ``value`` is made of tensors, numbers, strings,
    ``None``, lists, tuples and dicts with string or integer keys."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where} is a {value.layout} tensor; checkpoints store dense ones")
    elif isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has key {key!r}; checkpoint keys are str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) not in _PLAIN:
        raise TypeError(
            f"{where} has type {type(value).__name__}; a checkpoint holds only tensors, "
            "numbers, strings, None, and lists, tuples and dicts of them (convert it, e.g. "
            "a NumPy array with torch.as_tensor, a path with str)"
        )


def _walk(value: Any) -> Iterator[bytes]:
    """A byte stream that identifies ``value``'s contents (types, keys, shapes and data)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        yield f"T{data.dtype}{tuple(value.shape)}{value.requires_grad}".encode()
        yield data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    elif isinstance(value, dict):
        yield f"D{len(value)}".encode()
        for key, item in value.items():
            yield from _walk(key)
            yield from _walk(item)
    elif isinstance(value, list | tuple):
        yield f"{type(value).__name__[0]}{len(value)}".encode()
        for item in value:
            yield from _walk(item)
    elif isinstance(value, float):
        yield b"F" + struct.pack("<d", value)
    else:
        text = repr(value).encode()
        yield f"{type(value).__name__}{len(text)}:".encode() + text


def _digest(contents: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for chunk in _walk({key: contents[key] for key in _ENTRIES if key in contents}):
        digest.update(chunk)
    return digest.hexdigest()


def _objective_state(objective: Any) -> dict | None:
    if objective is None:
        return None
    if not hasattr(objective, "state_dict"):
        return None  # stateless objectives (Trace_ELBO, IWAE, BlackBoxAlpha)
    return objective.state_dict()


def _contents(optim, objective, extra) -> dict[str, Any]:
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"Expected extra to be a dict, actual {type(extra).__name__}")
    _check_plain(extra or {}, "extra")
    store = pyro.get_param_store().get_state()
    state = _objective_state(objective)
    contents = {
        "param_store": {
            "params": store["params"],
            "constraints": {
                name: _encode_constraint(c, f"parameter '{name}'")
                for name, c in store["constraints"].items()
            },
        },
        "optim": None if optim is None else optim.get_state(),
        "objective": state,
        "objective_type": None if state is None else type(objective).__name__,
        "rng": _encode_rng(get_rng_state()),
        "extra": extra or {},
    }
    for key in ("optim", "objective"):
        _check_plain(contents[key], key)
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
    payload = {"format": FORMAT_VERSION, "digest": _digest(contents), **contents}
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


class _Malformed(Exception):
    """What is wrong with a checkpoint; :func:`read` and :func:`restore` add the file."""


def _format1_globals() -> list:
    """Format 1 pickled NumPy's generator state and constraint objects: exactly these."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *_CLASSES.values()]


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
        n: _decode_constraint(c, f"param_store.constraints.{n}") for n, c in codes.items()
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
        for group in _entry(item, "param_groups", list, where):
            _entry(_expect(group, dict, f"{where}.param_groups"), "params", list, where)
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
        if digest != _digest(payload):
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
        payload = {k: v if k == "rng" else _moved(v, map_location) for k, v in payload.items()}
    payload["path"] = str(path)
    return payload


def _moved(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device == torch.device(device):
            return value
        return value.detach().to(device).requires_grad_(value.requires_grad)  # a leaf again
    if isinstance(value, dict):
        moved = type(value)((k, _moved(v, device)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a module's state_dict
            moved._metadata = value._metadata
        return moved
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, device) for v in value)
    return value


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
    number, a bool for a bool; ``None`` only where the default is ``None``)."""
    if len(fresh) != len(saved):
        raise _Malformed(f"entry '{where}.param_groups' has {len(saved)} groups, expected 1")
    for key, default in fresh[0].items():
        value = saved[0].get(key, default)
        numbers_ = isinstance(default, numbers.Real) and not isinstance(default, bool)
        same = type(value) is type(default) or (
            numbers_ and isinstance(value, numbers.Real) and not isinstance(value, bool)
        )
        if key != "params" and default is not None and not same:
            raise _Malformed(
                f"entry '{where}.param_groups.0.{key}' is {value!r}, expected a "
                f"{type(default).__name__}"
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
    rng = _decode_rng(payload["rng"])
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
