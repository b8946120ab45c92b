r"""
Random draws of a captured program, kept as the eager step makes them.

A compiled step must draw what the eager step draws after the same seed (the equality tests
and exact resumes rely on it). Inductor's ``fallback_random`` calls ATen's random kernels on
the global generator, but that is not enough:

- Inductor decomposes some random ops into others (``aten.bernoulli`` into ``rand() < p``),
  which draw other values;
- draws that do not depend on each other (the proposals of two sample sites) may be
  scheduled in another order than the eager run's, which gives each site the other's
  numbers.

So :func:`capture <pyro_fdiv.inference.compiled.capture>` records every random ATen op of the
model, guide and objective as one opaque op, ``pyro_fdiv::draw``, that runs the ATen kernel
eagerly and is registered as an *ordered effect* (``torch.library._register_effectful_op``):
AOTAutograd threads a token through these calls, so Inductor keeps them in program order, and
never removes one whose value is unused (the eager run draws it too). The call is described
by a JSON string (op, overload, non-tensor arguments), so a program cached on disk by Inductor
runs in another process too.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import torch
from torch._library.effects import EffectType

__all__ = ["EAGER_RANDOM"]

#: ATen random ops recorded as ``pyro_fdiv::draw`` (their overloads without ``out=`` or an
#: explicit generator, returning one tensor).
_RANDOM_OPS = (
    "normal",
    "normal_",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "bernoulli",
    "bernoulli_",
    "multinomial",
    "uniform_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "random_",
    "poisson",
    "_standard_gamma",
    "_sample_dirichlet",
    "binomial",
)


class _Unencodable(Exception):
    """An argument the JSON description cannot hold: the op is recorded as it is."""


def _encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"tensor": len(tensors) - 1}
    if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
        return {"torch": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, list | tuple):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise _Unencodable(type(value).__name__)


def _decode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, dict):
        ((kind, item),) = value.items()
        if kind == "tensor":
            return tensors[item]
        if kind == "device":
            return torch.device(item)
        return getattr(torch, item)
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _plan(call: str) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The function of a call's description: the op with its arguments, the tensors passed
    in. An in-place op fills a new tensor like its input (these ops do not read its
    values), so the inputs are never written."""
    name, overload, args, kwargs = json.loads(call)
    op = getattr(getattr(torch.ops.aten, name), overload)
    inplace = name.endswith("_")
    top = [(i, a["tensor"]) for i, a in enumerate(args) if isinstance(a, dict) and "tensor" in a]
    rest = [a for i, a in enumerate(args) if i not in dict(top)]
    if '"tensor"' in json.dumps([rest, kwargs]):  # tensors in lists or keywords: decode each call
        return functools.partial(_generic, op, args, kwargs, inplace)
    template: list[Any] = [
        None if isinstance(a, dict) and "tensor" in a else _decode(a, []) for a in args
    ]
    options = {key: _decode(value, []) for key, value in kwargs.items()}

    def run(tensors: list[torch.Tensor]) -> torch.Tensor:
        values = list(template)
        for i, j in top:
            values[i] = tensors[j]
        if inplace:
            values[0] = torch.empty_like(values[0])
        return op(*values, **options)

    return run


def _generic(op, args, kwargs, inplace: bool, tensors: list[torch.Tensor]) -> torch.Tensor:
    args = _decode(args, tensors)
    kwargs = {key: _decode(value, tensors) for key, value in kwargs.items()}
    if inplace:
        args[0] = torch.empty_like(args[0])
    return op(*args, **kwargs)


def _run(tensors: list[torch.Tensor], call: str) -> torch.Tensor:
    """The ATen random op ``call`` describes, on ``tensors``, run eagerly."""
    return _plan(call)(tensors)


# defined with torch.library.Library rather than custom_op: a call costs half as much
_LIB = torch.library.Library("pyro_fdiv", "DEF")
_LIB.define("draw(Tensor[] tensors, str call) -> Tensor")
_LIB.impl("draw", _run, "CompositeExplicitAutograd")
torch.library.register_fake("pyro_fdiv::draw", _run, lib=_LIB)  # the op's own meta function
torch.library._register_effectful_op("pyro_fdiv::draw", EffectType.ORDERED, lib=_LIB)
_draw = torch.ops.pyro_fdiv.draw.default


def _recorded(op: torch._ops.OpOverload) -> Callable:
    """A decomposition of ``op`` for ``make_fx``: the call as ``pyro_fdiv::draw``."""
    name, overload = op._schema.name.removeprefix("aten::"), op._overloadname
    inplace = name.endswith("_")

    def record(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("generator") is not None:
            return NotImplemented  # an explicit generator: recorded as it is
        tensors: list[torch.Tensor] = []
        try:
            encoded = {key: _encode(value, tensors) for key, value in kwargs.items()}
            call = json.dumps([name, overload, _encode(args, tensors), encoded])
        except _Unencodable:
            return NotImplemented
        out = _draw(tensors, call)
        return args[0].copy_(out) if inplace else out

    return record


def _table() -> dict[torch._ops.OpOverload, Callable]:
    table = {}
    for name in _RANDOM_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            returns = op._schema.returns
            if (
                torch.Tag.nondeterministic_seeded in op.tags
                and "out" not in overload
                and "generator" not in overload
                and len(returns) == 1
                and str(returns[0].type) == "Tensor"
            ):
                table[op] = _recorded(op)
    return table


#: ``make_fx``'s decomposition table of the capture: every random ATen op as ``pyro_fdiv::draw``.
EAGER_RANDOM = _table()
