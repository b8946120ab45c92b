"""Plain forms of what checkpoints hold: data a restricted unpickler can read back without
running code.

:mod:`pyro_fdiv.checkpoint` stores everything as tensors, numbers, strings, ``None`` and lists,
tuples and dicts of them (:func:`check_plain`); this module turns the rest into such data and
back: constraints by registered name or by class and arguments (:func:`encode_constraint`,
:func:`decode_constraint`, :func:`register_constraint`), Python's, NumPy's and PyTorch's RNG
states (:func:`encode_rng_state`, :func:`decode_rng_state`), and a digest of the contents
(:func:`content_digest`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import pyro.distributions.constraints as pyro_constraints
import torch
import torch.distributions.constraints as torch_constraints
from torch.distributions.constraints import Constraint

__all__ = [
    "CONSTRAINT_CLASSES",
    "PLAIN_TYPES",
    "MalformedEntry",
    "check_plain",
    "content_digest",
    "decode_constraint",
    "decode_rng_state",
    "encode_constraint",
    "encode_rng_state",
    "register_constraint",
    "to_device",
]

#: The plain types besides tensors (exactly these: NumPy scalars pickle as code).
PLAIN_TYPES = (str, bool, int, float, type(None))

_ClassT = TypeVar("_ClassT", bound=type)


class MalformedEntry(Exception):
    """An entry that is not what its plain form should be (the caller names the file)."""


def _constraint_registry() -> tuple[dict[str, Constraint], dict[str, type[Constraint]]]:
    """The named constraint instances (``"positive"``) and the constraint classes by
    qualified name, of torch's and Pyro's constraint modules."""
    named: dict[str, Constraint] = {}
    classes: dict[str, type[Constraint]] = {}
    for module in (torch_constraints, pyro_constraints):
        for name, value in vars(module).items():
            if isinstance(value, Constraint) and not name.startswith("_"):
                named.setdefault(name, value)
                value = type(value)
            if isinstance(value, type) and issubclass(value, Constraint):
                classes[f"{value.__module__}.{value.__qualname__}"] = value
    return named, classes


_NAMED, _CLASSES = _constraint_registry()
#: The constraint classes a checkpoint may name, by ``"module.QualName"`` (torch's and Pyro's,
#: and those added by :func:`register_constraint`).
CONSTRAINT_CLASSES: dict[str, type[Constraint]] = _CLASSES


def register_constraint(cls: _ClassT) -> _ClassT:
    """Allow instances of the constraint class ``cls`` (a subclass of
    :class:`torch.distributions.constraints.Constraint` whose state is its ``__dict__`` of
    tensors, numbers and constraints) in checkpoints; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise TypeError(f"Expected a Constraint subclass, actual {cls!r}")
    CONSTRAINT_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def encode_constraint(constraint: Constraint, where: str) -> dict:
    for name, named in _NAMED.items():
        if constraint is named:
            return {"name": name}
    key = f"{type(constraint).__module__}.{type(constraint).__qualname__}"
    if CONSTRAINT_CLASSES.get(key) is not type(constraint):
        raise TypeError(
            f"{where} has constraint {constraint!r} of class {key}, which checkpoints cannot "
            "store; register it with pyro_fdiv.checkpoint.register_constraint(cls)"
        )
    state = {k: _encode_argument(v, f"{where}.{k}") for k, v in vars(constraint).items()}
    return {"class": key, "state": state}


def _encode_argument(value: Any, where: str) -> Any:
    if isinstance(value, Constraint):
        return {"constraint": encode_constraint(value, where)}
    if isinstance(value, list | tuple):
        return type(value)(_encode_argument(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_TYPES:
        return value
    raise TypeError(f"{where} = {value!r}: a constraint argument checkpoints cannot store")


def decode_constraint(code: Any, where: str) -> Constraint:
    if isinstance(code, Constraint):  # format 1 stored the objects themselves
        return code
    if isinstance(code, dict) and set(code) == {"name"} and code["name"] in _NAMED:
        return _NAMED[code["name"]]
    if not (isinstance(code, dict) and set(code) == {"class", "state"}):
        raise MalformedEntry(f"entry '{where}' is not a constraint: {code!r}")
    cls = CONSTRAINT_CLASSES.get(code["class"]) if isinstance(code["class"], str) else None
    if cls is None or not isinstance(code["state"], dict):
        raise MalformedEntry(f"entry '{where}' names an unknown constraint class {code['class']!r}")
    constraint = cls.__new__(cls)  # the state is plain data: no constructor code runs
    constraint.__dict__.update(
        {k: _decode_argument(v, f"{where}.{k}") for k, v in code["state"].items()}
    )
    return constraint


def _decode_argument(value: Any, where: str) -> Any:
    if isinstance(value, dict) and set(value) == {"constraint"}:
        return decode_constraint(value["constraint"], where)
    if isinstance(value, list | tuple):
        return type(value)(_decode_argument(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def encode_rng_state(state: dict[str, Any]) -> dict[str, Any]:
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


def decode_rng_state(code: dict[str, Any]) -> dict[str, Any]:
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


def check_plain(value: Any, where: str) -> None:
    """``TypeError`` naming the entry unless ``value`` is made of tensors, numbers, strings,
    ``None``, lists, tuples and dicts with string or integer keys."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where} is a {value.layout} tensor; checkpoints store dense ones")
    elif isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has key {key!r}; checkpoint keys are str or int")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif type(value) not in PLAIN_TYPES:
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


def content_digest(contents: Mapping[str, Any], keys: Iterable[str]) -> str:
    """SHA-256 of the entries ``keys`` of ``contents`` (those present): their types, keys,
    shapes and data, independent of how a file lays them out."""
    digest = hashlib.sha256()
    for chunk in _walk({key: contents[key] for key in keys if key in contents}):
        digest.update(chunk)
    return digest.hexdigest()


def to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` with its tensors on ``device`` (leaves stay leaves, with their
    ``requires_grad``; a module state_dict keeps its ``_metadata``)."""
    if isinstance(value, torch.Tensor):
        if value.device == torch.device(device):
            return value
        return value.detach().to(device).requires_grad_(value.requires_grad)  # a leaf again
    if isinstance(value, dict):
        # Any: a module state_dict is an OrderedDict that carries a ``_metadata`` attribute
        moved: Any = type(value)((k, to_device(v, device)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a module's state_dict
            moved._metadata = value._metadata
        return moved
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value
