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

So the capture (``pyro_fdiv.inference.compiled.capture``) records every random ATen op of the
model, guide and objective as one opaque op, ``pyro_fdiv::draw``, that runs the ATen kernel
eagerly. Each call takes the previous call's output as an input it does not read: a data
dependency, so no compiler pass can run them in another order (Inductor was seen to reorder
them even when registered as an ordered effect). The op is also registered as an effect
(``torch.library._register_effectful_op``), so a draw whose value is unused is never removed
(the eager run draws it too). The call is described
by a JSON string (op, overload, non-tensor arguments), so a program cached on disk by Inductor
runs in another process too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._library.effects import EffectType
from torch._prims_common import is_non_overlapping_and_dense_or_false

__all__ = ["EAGER_RANDOM", "recording"]

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
    """An argument the JSON description cannot hold (a tensor anywhere but as a positional
    argument, an object): the op is recorded as it is."""


def _encode(value: Any) -> Any:
    """A non-tensor argument as JSON."""
    if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
        return {"torch": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise _Unencodable(type(value).__name__)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        ((kind, item),) = value.items()
        return torch.device(item) if kind == "device" else getattr(torch, item)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _plan(call: str) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The function of a call's description: the op with its arguments, the tensors passed
    in, laid out as in the eager run (:func:`_as_traced`). An in-place op fills a new tensor
    with its input's eager layout (these ops do not read its values), so the inputs are
    never written."""
    name, overload, args, kwargs, slots, strides = json.loads(call)
    op = getattr(getattr(torch.ops.aten, name), overload)
    inplace = name.endswith("_")
    template, options = _decode(args), {key: _decode(value) for key, value in kwargs.items()}

    def run(tensors: list[torch.Tensor]) -> torch.Tensor:
        values = list(template)
        for j, (i, stride) in enumerate(zip(slots, strides, strict=True)):
            values[i] = _as_traced(tensors[j], stride, inplace and i == 0)
        return op(*values, **options)

    return run


def _as_traced(t: torch.Tensor, stride: list[int] | None, fresh: bool = False) -> torch.Tensor:
    """``t`` with the strides it had in the eager run (``None``: it was not dense, e.g.
    expanded, and the op's output is then contiguous): a random kernel fills its output in
    memory order, and the output follows the input's layout, which a compiled program may
    choose otherwise. ``fresh``: a new tensor of that layout (an in-place op's target)."""
    if stride is None:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if fresh else t.contiguous()
    if fresh:
        return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    if list(t.stride()) == stride:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _run(tensors: list[torch.Tensor], after: torch.Tensor, call: str) -> torch.Tensor:
    """The ATen random op ``call`` describes, on ``tensors``, run eagerly; ``after`` (the
    previous draw's output, not read) orders the calls."""
    return _plan(call)(tensors)


# defined with torch.library.Library rather than custom_op: a call costs half as much
_LIB = torch.library.Library("pyro_fdiv", "DEF")
_LIB.define("draw(Tensor[] tensors, Tensor after, str call) -> Tensor")
_LIB.impl("draw", _run, "CompositeExplicitAutograd")
torch.library.register_fake("pyro_fdiv::draw", _run, lib=_LIB)  # the op's own meta function
torch.library._register_effectful_op("pyro_fdiv::draw", EffectType.ORDERED, lib=_LIB)
_draw = torch.ops.pyro_fdiv.draw.default


class _Chain(threading.local):
    """The last draw of the capture in progress on this thread (``None``: none yet)."""

    last: torch.Tensor | None = None


_CHAIN = _Chain()


@contextlib.contextmanager
def recording() -> Iterator[dict[torch._ops.OpOverload, Callable]]:
    """The decomposition table of one capture: each draw takes the previous one's output as
    an input it does not read, a data dependency no compiler pass reorders."""
    saved, _CHAIN.last = _CHAIN.last, None
    try:
        yield EAGER_RANDOM
    finally:
        _CHAIN.last = saved


def _recorded(op: torch._ops.OpOverload) -> Callable:
    """A decomposition of ``op`` for ``make_fx``: the call as ``pyro_fdiv::draw``."""
    name, overload = op._schema.name.removeprefix("aten::"), op._overloadname
    inplace = name.endswith("_")

    def record(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("generator") is not None:
            return NotImplemented  # an explicit generator: recorded as it is
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tensors = [args[i] for i in slots]
        try:
            positional = [None if i in slots else _encode(a) for i, a in enumerate(args)]
            encoded = {key: _encode(value) for key, value in kwargs.items()}
        except _Unencodable:
            return NotImplemented
        strides = [list(t.stride()) if _dense(t) else None for t in tensors]
        call = json.dumps([name, overload, positional, encoded, slots, strides])
        after = _CHAIN.last if _CHAIN.last is not None else torch.empty(0)
        out = _CHAIN.last = _draw(tensors, after, call)
        if inplace:  # the input holds the draw too (in-place semantics); its users read out
            args[0].copy_(out)
        return out

    return record


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory once each (no expanded dims, no gaps)."""
    return is_non_overlapping_and_dense_or_false(t) if t.numel() > 1 else True


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
