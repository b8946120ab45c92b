r"""
Compiled steps: the model and guide traced once into one graph of tensor ops, compiled by
Inductor.

How a step is captured (:class:`CompiledLoss`, :func:`make_step`)::

    first step (and whenever the key changes) ─▶ eager, validated: creates lazy parameters,
        decides max_plate_nesting and the particle path, records the parameters it reads
    then once ─▶ make_fx(tracing_mode="fake") of loss(unconstrained params, tensor args):
        Pyro's handlers run once on fake tensors (validation off), pyro.param and the modules'
        parameters read the function's inputs, torch.autograd.grad adds the backward ops
        (and any gradient hooks, e.g. DReG's) to the same graph; make_step adds Adam
    then every step ─▶ that graph compiled by Inductor (``compile_fx``): no Pyro Python runs

The key of a program is the model and guide, the shapes, dtypes and devices of the tensor
arguments and the values of the others, and the parameters read (names, shapes, the tensors
themselves). A model that cannot be traced once (its structure depends on sampled values,
so tracing meets a data-dependent branch; the sequential-particle path; a parameter the
trace cannot reach) runs eagerly, with one warning naming the reason.
Tensors the model or guide reads from globals or closures (not arguments, not parameters)
are constants of the program, as in Pyro's ``JitTrace_ELBO``: pass data as arguments.

**Random numbers.** The graph draws its own noise on every call (traced random ops). With
Inductor's ``fallback_random`` (``compile_options={"options": {"fallback_random": True}}``,
the default here) it calls the same ATen random ops on the global generator, in the order the
eager run calls them, so a compiled step draws what the eager step draws after the same seed
(the equality tests rely on it; exact resumes from checkpoints do too);
``{"options": {"fallback_random": False}}`` uses Inductor's own generator (seeded from the
global one: reproducible under ``pyro.set_rng_seed``, but other draws). The capture records
every random op as an opaque, ordered call of the eager kernel
(:mod:`pyro_fdiv.inference.eager_random`): Inductor would otherwise rewrite some (Bernoulli as
``rand() < p``) and schedule independent draws in another order than the eager run's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide, AutoMessenger
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.util import warn_if_nan
from torch.distributions import transform_to
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree

from pyro_fdiv.checkpoint import get_rng_state, set_rng_state
from pyro_fdiv.inference.eager_random import recording

__all__ = ["Compilable", "CompiledLoss", "Step", "TraceFailure", "can_compile", "make_step"]

#: Options passed to ``torch.compile`` unless overridden by ``compile_options``.
DEFAULT_OPTIONS: dict[str, Any] = {"options": {"fallback_random": True}}


#: Inductor's options tried in turn when a program's first call disagrees with the eager step:
#: no SIMD (Inductor's vectorized CPU code gave NaN for ``AutoMultivariateNormal`` with DReG at
#: K >= 16 where eager is finite; without SIMD it agrees).
RECOMPILE_OPTIONS: tuple[dict[str, Any], ...] = ({"cpp.simdlen": 1},)


#: Most programs kept per objective or step (one per key: argument shapes, parameters, ...).
MAX_PROGRAMS = 8


class TraceFailure(Exception):
    """The loss cannot be captured as one graph; the message says why."""


class _Substitute(Messenger):
    """Answer ``pyro.param`` with the traced function's inputs (constrained as in the store)."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.store = pyro.get_param_store()

    def _pyro_param(self, msg: dict) -> None:
        value = self.values.get(msg["name"])
        if value is not None:
            constrained = transform_to(self.store._constraints[msg["name"]])(value)
            msg["value"], msg["done"] = constrained, True


def _modules(*fns: Any) -> list[torch.nn.Module]:
    """The ``nn.Module``\\ s a model or guide is, is a method or ``partial`` of, or names in
    its closure or among the globals its code reads (where Pyro's examples keep their
    networks). Parameters read through anything else are found frozen in the trace
    (:func:`_leaked_parameters`), and the step stays eager."""
    found = []
    for fn in fns:
        while isinstance(fn, functools.partial):
            fn = fn.func
        candidates = [fn, getattr(fn, "__self__", None)]
        code_fn = getattr(fn, "__func__", fn)
        code = getattr(code_fn, "__code__", None)
        if code is not None:
            candidates += [
                cell.cell_contents for cell in code_fn.__closure__ or () if _filled(cell)
            ]
            globals_ = getattr(code_fn, "__globals__", {})
            candidates += [globals_[name] for name in code.co_names if name in globals_]
        found += [c for c in candidates if isinstance(c, torch.nn.Module)]
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018  (an empty cell raises)
    except ValueError:
        return False
    return True


Slot = tuple[dict, str]  # a module's ``_parameters`` or ``_buffers`` and a key in it


@contextlib.contextmanager
def _swapped(slots: list[Slot], values: list[torch.Tensor]) -> Iterator:
    """Temporarily put ``values`` in the modules' parameter and buffer slots
    (``functional_call``'s mechanism)."""
    saved: list[Any] = [table[name] for table, name in slots]
    try:
        for (table, name), value in zip(slots, values, strict=True):
            table[name] = value
        yield
    finally:
        for (table, name), value in zip(slots, saved, strict=True):
            table[name] = value


def _module_slots(fns: tuple, params: list[torch.Tensor]) -> list[tuple[int, dict, str]]:
    """``(index in params, module._parameters, name)`` of every module slot holding one of
    ``params``."""
    index = {id(p): i for i, p in enumerate(params)}
    slots, seen = [], set()
    for root in _modules(*fns):
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, value in module._parameters.items():
                if value is not None and id(value) in index:
                    slots.append((index[id(value)], module._parameters, name))
    return slots


def tensor_slots(modules: Sequence[torch.nn.Module], exclude: list[torch.Tensor]) -> list[Slot]:
    """The parameter and buffer slots of ``modules`` (an objective's own networks and data,
    e.g. a critic, a discriminator, a training set), except those holding ``exclude``: inputs
    of the program, read afresh on every call, without gradient."""
    skip = {id(t) for t in exclude}
    slots: list[Slot] = []
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for table in (module._parameters, module._buffers):
                for name, value in table.items():
                    if value is not None and id(value) not in skip:
                        slots.append((table, name))
                        skip.add(id(value))
    return slots


def split_arguments(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any, tuple]:
    """The tensors among ``args`` and ``kwargs``, a function rebuilding them from new tensors,
    and the key of everything else (tensor shapes, dtypes and devices; other values, or their
    identity where they are not hashable)."""
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):  # the common case, fast
        fast = tuple((a.shape, a.stride(), a.dtype, a.device, a.requires_grad) for a in args)
        return list(args), lambda new: (tuple(new), {}), ("tensors", *fast)
    leaves, spec = _pytree.tree_flatten((args, kwargs))
    tensors: list[torch.Tensor] = []
    key: list[Any] = [spec]
    positions = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            positions.append(i)
            key.append((leaf.shape, leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            try:
                hash(leaf)
                key.append((type(leaf), leaf))
            except TypeError:
                key.append((type(leaf), id(leaf)))

    def rebuild(new: list[torch.Tensor]) -> tuple[tuple, dict]:
        out = list(leaves)
        for i, value in zip(positions, new, strict=True):
            out[i] = value
        return _pytree.tree_unflatten(out, spec)

    return tensors, rebuild, tuple(key)


def traced_loss(objective, model, guide, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """The differentiable loss and a signature of the sample sites, as the traced program
    computes them: the objective's own ``_traced_loss`` where it has one, else its
    ``differentiable_loss``."""
    own = getattr(objective, "_traced_loss", None)
    if own is not None:
        return own(model, guide, args, kwargs)[:2]
    return objective.differentiable_loss(model, guide, *args, **kwargs), None


#: Pyro's ELBO modules read the loss as a Python number (``torch_item``, ``warn_if_nan``): a
#: data-dependent read that a traced program cannot hold. While tracing ``torch_item`` returns
#: the tensor detached (a constant of the surrogate, as the number is) and ``warn_if_nan``
#: does nothing; the compiled step checks the loss it returns (and warns on NaN as Pyro does).
_PYRO_ELBO_MODULES = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)
_UNREAD = {
    "torch_item": lambda value: value.detach() if isinstance(value, torch.Tensor) else value,
    "warn_if_nan": lambda value, msg="", **kwargs: value,
}


@contextlib.contextmanager
def _tracing() -> Iterator:
    """Validation off (Pyro's and ``torch.distributions``' defaults) and Pyro's NaN warnings on
    the loss skipped, restored after; the random state is left untouched."""
    default = torch.distributions.Distribution._validate_args
    state = get_rng_state()
    outer = list(_PYRO_STACK)  # e.g. SVI's parameter capture: it must not record fake tensors
    del _PYRO_STACK[:]
    try:
        with pyro.validation_enabled(False), contextlib.ExitStack() as stack:
            for module in _PYRO_ELBO_MODULES:
                for name, stand_in in _UNREAD.items():
                    if hasattr(module, name):
                        stack.enter_context(_patched(module, name, stand_in))
            torch.distributions.Distribution.set_default_validate_args(False)
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)
        set_rng_state(state)
        _PYRO_STACK[:] = outer


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class Captured(NamedTuple):
    """A traced program and what running it needs."""

    graph: torch.fx.GraphModule
    inputs: list[torch.Tensor]  # example inputs: flat parameters and state, extras, arguments
    signature: Any  # what the loss function returned as the sample sites' signature
    used: list[int]  # indices of the parameters whose gradients the program returns
    extra_slots: list[Slot]  # the objective's own tensors, inputs after the state
    num_aux: int  # tensors the loss function returned besides the loss, output last
    differentiate: list[int]  # indices of the parameters differentiated
    accumulate: bool  # the gradients are added to buffers passed in, not returned


def capture(
    loss_fn: Callable,
    model: Callable,
    guide: Callable,
    names: list[str],
    args: tuple,
    kwargs: dict,
    update: Callable | None = None,
    state: Sequence[torch.Tensor] = (),
    wrt: Sequence[str] | None = None,
    modules: Sequence[torch.nn.Module] = (),
    accumulate: bool = False,
    guard: bool = False,
) -> Captured:
    """
    Trace ``loss_fn(model, guide, args, kwargs) -> (loss, signature[, aux])`` and its gradient
    in the unconstrained parameters ``names`` into one FX graph of ATen ops
    ``(params..., state..., extras..., tensor args...) -> (loss, grads of the used
    parameters..., aux...)``; with ``update``, ``update(params, grads, state, loss)`` runs after
    the gradient in the same graph (the optimizer step, writing into ``params`` and ``state``)
    and the graph returns ``(loss, aux...)``.

    :param wrt: the names to differentiate (default: all); the other parameters are inputs
        without gradient (e.g. the model's parameters in a step of the guide alone).
    :param modules: modules of the objective's own (a critic, a discriminator, the training
        set): their parameters and buffers are inputs without gradient (``extras``), read
        afresh on every call, so the objective may update them between steps.
    :param accumulate: without ``update``: the graph takes one flat gradient buffer per
        differentiated parameter after the state and adds the gradients to them in place (as
        ``backward`` accumulates into ``.grad``), returning ``(loss, aux...)``; the gradients
        are then never all alive at once besides ``.grad`` (peak memory as eager); with
        ``guard``, a loss that is not finite leaves the buffers as they were (as an eager step
        raises before its ``backward``).
    :returns: the graph and its example inputs, the signature ``loss_fn`` returned while
        tracing, the indices of the parameters the loss depends on (the others get no gradient:
        eager ``backward`` leaves their ``.grad`` as it was, so an optimizer skips or steps them
        as it would eagerly), the extras' slots and the number of auxiliary outputs.
    :raises TraceFailure: when the loss cannot be one graph (a data-dependent branch, a
        parameter read outside ``pyro.param`` and the modules of model, guide and objective).
    """
    store = pyro.get_param_store()
    params = [store._params[name] for name in names]
    slots = _module_slots((model, guide), params)
    extra_slots = tensor_slots(modules, params)
    tensors, rebuild, _ = split_arguments(args, kwargs)
    differentiate = [i for i, name in enumerate(names) if wrt is None or name in wrt]
    accumulate = accumulate and update is None
    num_params, num_state = len(params), len(state) + (len(differentiate) if accumulate else 0)
    num_extras = len(extra_slots)
    recorded: list[tuple] = []

    buffers = [torch.zeros(params[i].numel(), dtype=params[i].dtype) for i in differentiate]
    buffers = buffers if accumulate else []
    shapes = [p.shape for p in params] + [t.shape for t in state] + [b.shape for b in buffers]
    if not all(t.is_contiguous() for t in (*params, *state)):
        raise TraceFailure("a parameter or optimizer state tensor is not contiguous")

    def program(*inputs):
        # parameters and state arrive flat (Inductor drops in-place writes to 0-dim inputs)
        flat = inputs[: num_params + num_state]
        raw = [x.view(shape) for x, shape in zip(flat, shapes, strict=True)]
        # every parameter a leaf requiring grad, as in the store (pyro.module checks it); only
        # those in ``wrt`` are differentiated
        leaves = [p.detach().requires_grad_() for p in raw[:num_params]]
        extras = list(inputs[num_params + num_state : num_params + num_state + num_extras])
        new_args, new_kwargs = rebuild(list(inputs[num_params + num_state + num_extras :]))
        swap = _swapped(
            [(table, n) for _, table, n in slots] + extra_slots,
            [leaves[i] for i, _, _ in slots] + extras,
        )
        with _Substitute(dict(zip(names, leaves, strict=True))), swap:
            loss, sig, *rest = loss_fn(model, guide, new_args, new_kwargs)
        aux = tuple(a.detach() for a in (rest[0] if rest else ()))
        grads: list[torch.Tensor | None] = [None] * num_params
        if differentiate and loss.requires_grad:
            found = torch.autograd.grad(loss, [leaves[i] for i in differentiate], allow_unused=True)
            for i, g in zip(differentiate, found, strict=True):
                grads[i] = g
        recorded.append((sig, [i for i, g in enumerate(grads) if g is not None], len(aux)))
        if accumulate:  # into the gradient buffers, in place
            finite = torch.isfinite(loss.detach())
            for buffer, i in zip(flat[num_params:], differentiate, strict=True):
                if grads[i] is not None:
                    new = buffer + grads[i].reshape(-1)
                    buffer.copy_(torch.where(finite, new, buffer) if guard else new)
            return (loss.detach(), *aux)
        if update is None:  # the gradients of the parameters the loss depends on
            return (loss.detach(), *[g for g in grads if g is not None], *aux)
        filled = [
            torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)
        ]
        new = update(raw[:num_params], filled, raw[num_params:], loss.detach())
        for target, value in zip(flat, new, strict=True):
            target.copy_(value.reshape(-1))
        return (loss.detach(), *aux)

    extras = [table[name].detach() for table, name in extra_slots]
    inputs = [*flat_inputs(params), *flat_inputs(state), *buffers, *extras, *tensors]
    with _tracing(), quiet_compile(), recording() as eager_random:
        try:
            gm = make_fx(
                program,
                decomposition_table=eager_random,
                tracing_mode="fake",
                _allow_non_fake_inputs=True,
            )(*inputs)
        except Exception as error:  # any failure to trace means: run eagerly
            raise TraceFailure(f"{type(error).__name__}: {_first_line(error)}") from error
    leaked = _leaked_parameters(gm, store)
    if leaked:
        raise TraceFailure(
            f"the parameters {leaked} are read outside pyro.param and the modules of the model, "
            "guide and objective, so the trace would freeze them"
        )
    sig, used, num_aux = recorded[0]
    return Captured(gm, inputs, sig, used, extra_slots, num_aux, differentiate, accumulate)


def outer_handlers() -> str | None:
    """Why the Pyro handlers around the step keep it eager (a compiled program runs none of
    them; only parameter-capturing traces such as ``SVI.step``'s are reproduced), or
    ``None``."""
    others = [
        type(m).__name__
        for m in _PYRO_STACK
        if not (isinstance(m, poutine.trace_messenger.TraceMessenger) and m.param_only)
    ]
    return f"it runs inside the Pyro handlers {others}" if others else None


def flat_inputs(tensors) -> list[torch.Tensor]:
    """Detached flat views (the same storage) of contiguous tensors: the compiled program's
    inputs that it writes in place."""
    return [t.detach().view(-1) for t in tensors]


def record_params(names: list[str]) -> None:
    """Record the parameter sites ``names`` in the parameter-only traces on Pyro's stack (what
    ``pyro.param`` would record, at a sixth of its cost: ``SVI.step`` reads them)."""
    store = pyro.get_param_store()
    for name in names:
        value = store[name]
        msg = {
            "type": "param",
            "name": name,
            "fn": store.get_param,
            "is_observed": False,
            "args": (name,),
            "kwargs": {"constraint": store._constraints[name], "event_dim": None},
            "value": value,
            "scale": 1.0,
            "mask": None,
            "cond_indep_stack": (),
            "done": True,
            "stop": False,
            "continuation": None,
            "infer": {},
        }
        for messenger in _PYRO_STACK:
            if isinstance(messenger, poutine.trace_messenger.TraceMessenger):
                messenger.trace.add_node(name, **msg)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _leaked_parameters(gm: torch.fx.GraphModule, store) -> list[str]:
    """Names of parameters the graph holds as constants (read around the substitution)."""
    params = {id(p): name for name, p in store._params.items()}
    leaked = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor) and (id(value) in params or value.requires_grad):
                leaked.append(params.get(id(value), node.target))
    return leaked


#: Warnings that tracing, importing and running Inductor raise and that are understood: torch's
#: own modules still define TorchScript classes (``torch.utils.mkldnn``) at import, and some
#: of its meta kernels (e.g. of ``AutoMultivariateNormal``'s triangular ops) still call the
#: deprecated ``torch._prims_common.check``.
COMPILE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.script` is deprecated"),
    (FutureWarning, r"`torch\._prims_common\.check` is deprecated"),
)


@contextlib.contextmanager
def quiet_compile() -> Iterator:
    """Silence :data:`COMPILE_WARNINGS` (only those) while Inductor is imported or compiles."""
    with warnings.catch_warnings():
        for category, message in COMPILE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def compile_graph(
    gm: torch.fx.GraphModule, inputs: list[torch.Tensor], compile_options: dict | None
) -> Callable:
    """
    Compile a captured graph for ``inputs``' shapes, dtypes and strides.

    With Inductor (the default backend) the graph goes to Inductor's ``compile_fx`` directly,
    without Dynamo: the program's key already fixes what Dynamo's guards would check, and
    skipping them halves a small step (Dynamo's guards and frame handling cost ≈ 75 µs per
    call on a 36-input step of Eight Schools). ``compile_options`` take ``torch.compile``'s
    keywords: ``options`` (Inductor's configuration, over :data:`DEFAULT_OPTIONS`), ``mode``,
    and ``backend``; another backend goes through ``torch.compile(gm, dynamic=False, ...)``.
    Inductor compiles here, before the first call.
    """
    options = dict(compile_options or {})
    backend = options.pop("backend", "inductor")
    if backend != "inductor":
        with quiet_compile():
            return torch.compile(gm, backend=backend, **{"dynamic": False, **options})
    patches = dict(DEFAULT_OPTIONS["options"])
    mode = options.pop("mode", None)
    if mode is not None:
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(options.pop("options", None) or {})
    options.pop("dynamic", None)
    options.pop("fullgraph", None)  # the captured graph is always one graph
    if options:
        raise TypeError(
            f"Expected compile_options among backend, mode, options, dynamic, fullgraph; "
            f"actual {sorted(options)}"
        )
    with quiet_compile():
        from torch._inductor.compile_fx import compile_fx  # its import defines TorchScript

        return compile_fx(gm, inputs, config_patches=patches)  # type: ignore[return-value]


def _warn_eager(owner: str, reason: str, fallback: bool = True) -> None:
    what = "falls back to the eager step for these arguments" if fallback else "compiled again"
    warnings.warn(f"{owner}: compile=True {what}: {reason}.", UserWarning, stacklevel=4)


class _Program:
    """One compiled graph and what it was captured with."""

    def __init__(
        self,
        fn: Callable,
        captured: Captured,
        names: list[str],
        loss_fn: Callable,
        writes: Sequence[torch.Tensor] = (),
    ):
        store = pyro.get_param_store()
        self.compiled, self.names, self.store = fn, names, store
        self.captured, self.loss_fn, self.writes = captured, loss_fn, list(writes)
        self.checked = False  # the first call is checked against the eager loss
        self.used, self.num_aux = captured.used, captured.num_aux
        self.params = [store._params[name] for name in names]
        self.flat = flat_inputs(self.params)  # the same storage, written in place
        self.extra_slots = captured.extra_slots
        self.extra_meta = [_meta(table[name]) for table, name in self.extra_slots]
        self.accumulate, self.differentiate = captured.accumulate, captured.differentiate
        used = set(self.used)
        #: gradient buffers of differentiated parameters the loss does not reach (not written)
        self.spare = {
            j: torch.zeros(self.params[i].numel(), dtype=self.params[i].dtype)
            for j, i in enumerate(self.differentiate)
            if i not in used
        }
        self.fn = self._first_call

    def _first_call(self, *inputs):
        with quiet_compile():  # Inductor compiles on the first call
            out = self.compiled(*inputs)
        self.fn = self.compiled
        return out

    def current(self) -> list[torch.Tensor] | None:
        """The parameters to pass, or ``None`` when the store holds other tensors now."""
        params = self.store._params
        try:
            current = [params[name] for name in self.names]
        except KeyError:
            return None
        if any(p is not q for p, q in zip(current, self.params, strict=True)):
            return None
        return current

    def grad_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The flat ``.grad`` of each differentiated parameter the loss reaches (created as
        zeros where ``backward`` would create it), to accumulate into; a spare buffer for the
        others, whose ``.grad`` eager ``backward`` leaves alone."""
        buffers = []
        for j, i in enumerate(self.differentiate):
            if j in self.spare:
                buffers.append(self.spare[j])
                continue
            p = params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            buffers.append(p.grad.view(-1))
        return buffers

    def extras(self) -> list[torch.Tensor] | None:
        """The objective's own tensors as they are now, or ``None`` when one changed its shape,
        dtype or device (the program must be captured again)."""
        values = [table[name] for table, name in self.extra_slots]
        if any(_meta(v) != m for v, m in zip(values, self.extra_meta, strict=True)):
            return None
        return [v.detach() for v in values]


@torch.no_grad()
def _restore(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for target, value in zip(targets, values, strict=True):
        target.copy_(value)


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


class _NewParameter(Exception):
    """A parameter the run would create."""


class _ExistingParamsOnly(Messenger):
    """Stop a run at the first ``pyro.param`` not yet in the store (before it is created)."""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def _pyro_param(self, msg: dict) -> None:
        if msg["name"] not in self.store._params:
            raise _NewParameter(msg["name"])


class _ProgramCache:
    """Programs by key, the keys that run eagerly, and the one warning: what
    :class:`CompiledLoss` and :class:`Step` share."""

    def __init__(self, owner: str, compile_options: dict | None):
        self.owner, self.compile_options = owner, compile_options
        self.programs: dict[tuple, Any] = {}
        self.eager_keys: set[tuple] = set()
        self.warned = False
        options = compile_options or {}
        self.inductor = options.get("backend", "inductor") == "inductor"
        #: the program draws what the eager step draws (see the module docstring)
        self.same_draws = not self.inductor or (options.get("options") or {}).get(
            "fallback_random", True
        )

    def _call(self, key, program: _Program, inputs: list, model, guide, args, kwargs, writes=None):
        """
        Run ``program``. Its first call is checked against the eager loss of the same draw
        (with the same random numbers, else only whether both are finite): a backend that
        miscompiles must not return a wrong number. On a mismatch the writes are undone and
        Inductor compiles the graph again with each of :data:`RECOMPILE_OPTIONS` in turn; if
        every one disagrees the program is dropped: returns ``None``, and the caller runs the
        step eagerly, as for every later call with this key. Each outcome warns once.
        """
        if program.checked:
            return program.fn(*inputs)
        writes = program.writes if writes is None else writes
        with _tracing(), torch.enable_grad():  # validation off, the random state restored
            want = float(program.loss_fn(model, guide, args, kwargs)[0].detach())
        rng = torch.get_rng_state()
        saved = [t.detach().clone() for t in writes]
        got = got_first = math.nan
        for retry in (None, *RECOMPILE_OPTIONS):
            if retry is not None:
                _restore(writes, saved)
                torch.set_rng_state(rng)
                options = dict(self.compile_options or {})
                options["options"] = {**(options.get("options") or {}), **retry}
                program.fn = compile_graph(program.captured.graph, program.captured.inputs, options)
            out = program.fn(*inputs)
            got = out[0].item()
            if self._agree(got, want):
                program.checked = True
                if retry is not None:
                    _warn_eager(
                        self.owner,
                        f"its program gave the loss {got_first} where the eager step gives "
                        f"{want}; compiled again with Inductor's options {retry}, it agrees",
                        fallback=False,
                    )
                return out
            if retry is None:
                got_first = got
            if not self.inductor:
                break
        _restore(writes, saved)
        torch.set_rng_state(rng)
        del self.programs[key]
        self.eager_keys.add(key)
        if not self.warned:
            self.warned = True
            _warn_eager(
                self.owner,
                f"its compiled program gives the loss {got} where the eager step gives {want} "
                "on the same draw",
            )
        return None

    def _agree(self, got: float, want: float) -> bool:
        if not math.isfinite(want) or not self.same_draws:
            return math.isfinite(got) == math.isfinite(want)
        return math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4)

    def _compile(
        self, key, reason, loss_fn, model, guide, names, args, kwargs, validated, **options
    ) -> tuple[Callable, Captured] | None:
        """Capture and compile the program of ``key`` (``options`` go to :func:`capture`): the
        compiled function and its capture; ``None`` (with the one warning, and ``key`` run
        eagerly from then on) when ``reason`` or the capture refuses it."""
        if reason is None:
            try:
                captured = capture(loss_fn, model, guide, names, args, kwargs, **options)
                if validated is not None and captured.signature != validated:
                    reason = "the traced sample sites differ from the eager run's"
            except TraceFailure as error:
                reason = f"it cannot be traced once ({error})"
        if reason is not None:
            if not self.warned:
                self.warned = True
                _warn_eager(self.owner, reason)
            self.eager_keys.add(key)
            return None
        if len(self.programs) >= MAX_PROGRAMS:
            self.programs.pop(next(iter(self.programs)))
        return compile_graph(captured.graph, captured.inputs, self.compile_options), captured


class CompiledLoss(_ProgramCache):
    """
    The compiled gradient steps of an objective (``compile=True``): loss and gradient of the
    unconstrained parameters from one compiled graph per key; see the module docstring.

    An objective may have several programs, its *parts* (the f-divergence bound's guide step
    and model step): :meth:`grads` runs one. What the objective provides, for a part
    (``""``, the objective's one loss, unless it has several):

    - ``_eager_grads(model, guide, args, kwargs, part) -> (value, params)``: the eager step:
      the loss, its gradient written into the parameters' ``.grad``, and the parameters written
      (``None``: all that the loss reaches);
    - ``_traced_loss(model, guide, args, kwargs, part) -> (loss, signature[, aux])``: the
      differentiable loss without its finite check, the sample sites' signature (or ``None``),
      and optionally a tuple of tensors the step needs afterwards (returned detached);
    - ``_program_key(part)``: a hashable of the settings the program bakes in (``()``), or
      ``None`` to run this step eagerly (e.g. while a schedule changes them every step);
    - ``_program_wrt(part)``: the parameter names to differentiate, or ``None`` for all;
    - ``_program_modules()``: the objective's own modules, whose tensors are program inputs;
    - ``_compile_refusal(part)``: why the part cannot be one traced program (after an eager
      step), or ``None``;
    - ``_raise_non_finite(value, model, guide, args, kwargs, part)``: re-run the draw eagerly
      and raise the error naming the sites;
    - ``check_finite`` and ``_validated`` (the eager run's signature of the sample sites, or
      ``None``).

    :param objective: the objective.
    :param dict compile_options: keyword arguments of ``torch.compile``.
    """

    def __init__(self, objective, compile_options: dict | None = None):
        super().__init__(type(objective).__name__, compile_options)
        self.objective = objective
        #: The auxiliary tensors of the last :meth:`grads` (``None`` after an eager step).
        self.aux: tuple[torch.Tensor, ...] | None = None

    def __getstate__(self) -> dict:
        # compiled programs are not pickled (nor checkpointed): a copy captures its own
        return {**self.__dict__, "programs": {}, "eager_keys": set(), "warned": False, "aux": None}

    def grads(
        self, model, guide, args: tuple, kwargs: dict, part: str = ""
    ) -> tuple[float, list[torch.Tensor] | None]:
        """The loss of ``part`` and its gradient added to the parameters' ``.grad``, compiled
        where it can be; returns the value and the parameters written (``None``: whatever an
        eager ``backward`` reached)."""
        objective = self.objective
        self.aux = None
        settings = objective._program_key(part)
        if settings is None or (_PYRO_STACK and outer_handlers() is not None):
            return objective._eager_grads(model, guide, args, kwargs, part)
        tensors, _, arg_key = split_arguments(args, kwargs)
        key = (part, settings, model, guide, arg_key)
        program = self.programs.get(key)
        if program is not None:
            params, extras = program.current(), program.extras()
            if params is not None and extras is not None:
                grads = program.grad_buffers(params)
                inputs = [*program.flat, *grads, *extras, *tensors]
                return self._run(
                    key, program, params, inputs, grads, model, guide, args, kwargs, part
                )
            del self.programs[key]  # other parameter tensors: capture again
        elif key in self.eager_keys:
            return objective._eager_grads(model, guide, args, kwargs, part)
        return self._first(key, model, guide, args, kwargs, part)

    def _first(self, key, model, guide, args, kwargs, part):
        objective = self.objective
        objective._validated = None  # a new program: validate its first step
        with poutine.trace(param_only=True) as capture_params:
            out = objective._eager_grads(model, guide, args, kwargs, part)
        names = list(capture_params.trace.nodes)
        reason = objective._compile_refusal(part) or outer_handlers()
        loss_fn = functools.partial(objective._traced_loss, part=part)
        compiled = self._compile(
            key,
            reason,
            loss_fn,
            model,
            guide,
            names,
            args,
            kwargs,
            objective._validated,
            wrt=objective._program_wrt(part),
            modules=objective._program_modules(),
            accumulate=True,
            guard=objective.check_finite,
        )
        if compiled is not None:
            self.programs[key] = _Program(*compiled, names, loss_fn)
        return out

    def _run(self, key, program, params, inputs, grads, model, guide, args, kwargs, part):
        state = torch.get_rng_state()
        out = self._call(key, program, inputs, model, guide, args, kwargs, writes=grads)
        if out is None:
            return self.objective._eager_grads(model, guide, args, kwargs, part)
        value = out[0].item()
        if self.objective.check_finite and not math.isfinite(value):  # .grad left as it was
            torch.set_rng_state(state)
            self.objective._raise_non_finite(value, model, guide, args, kwargs, part)
        if program.num_aux:
            self.aux = tuple(out[len(out) - program.num_aux :])
        if _PYRO_STACK:  # SVI's parameter capture: record the parameters read
            record_params(program.names)
        return value, [params[i] for i in program.used]


class Compilable:
    """
    The ``compile=`` and ``compile_options=`` keywords of every objective, and the defaults of
    :class:`CompiledLoss`'s protocol: a subclass calls :meth:`_init_compile` and runs each of
    its gradient steps through :meth:`_grads`, defines ``_eager_grads`` and ``_traced_loss``,
    and overrides the other members where its step needs them.
    """

    _compiled: CompiledLoss | None = None
    _validated: Any = None
    check_finite: bool = True

    def _init_compile(self, compile: bool, compile_options: dict | None) -> None:
        if not isinstance(compile, bool):
            raise ValueError(f"Expected compile to be a bool, actual {compile!r}")
        if compile_options is not None and not isinstance(compile_options, dict):
            raise TypeError(f"Expected compile_options to be a dict, actual {compile_options!r}")
        self._compiled = CompiledLoss(self, compile_options) if compile else None

    def _grads(
        self, model, guide, args: tuple, kwargs: dict, part: str = ""
    ) -> tuple[float, list[torch.Tensor] | None]:
        """The gradient step ``part``: compiled with ``compile=True``, else eager."""
        if self._compiled is not None:
            return self._compiled.grads(model, guide, args, kwargs, part)
        return self._eager_grads(model, guide, args, kwargs, part)

    def _eager_grads(self, model, guide, args, kwargs, part: str) -> tuple[float, Any]:
        raise NotImplementedError

    def _program_key(self, part: str) -> tuple | None:
        return ()

    def _program_wrt(self, part: str) -> list[str] | None:
        return None

    def _program_modules(self) -> list[torch.nn.Module]:
        return []

    def _compile_refusal(self, part: str = "") -> str | None:
        return None


@contextlib.contextmanager
def eager(objective) -> Iterator:
    """Run ``objective`` without its own compiled path (``compile=True``) for a while."""
    compiled = getattr(objective, "_compiled", None)
    if compiled is None:
        yield
        return
    objective._compiled = None
    try:
        yield
    finally:
        objective._compiled = compiled


ADAM_DEFAULTS = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}


def _adam_settings(optimizer: torch.optim.Optimizer) -> tuple | None:
    """``(lr, beta1, beta2, eps, weight_decay)`` of a one-parameter ``torch.optim.Adam`` whose
    update the compiled step reproduces, else ``None``."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    for option, value in ADAM_DEFAULTS.items():
        if group.get(option, value) != value:
            return None
    if any(isinstance(group[k], torch.Tensor) for k in ("lr", "betas", "eps", "weight_decay")):
        return None
    beta1, beta2 = group["betas"]
    return (
        float(group["lr"]),
        float(beta1),
        float(beta2),
        float(group["eps"]),
        float(group["weight_decay"]),
    )


def adam_update(settings: list[tuple], guard: bool) -> Callable:
    """The functional update of :class:`torch.optim.Adam` (its single-tensor path, the same
    operations in the same order) over ``params`` and the flat ``state``
    ``[step, exp_avg, exp_avg_sq] * len(params)``, writing in place; with ``guard``, nothing
    changes when the loss is not finite (as an eager step raises before its update)."""

    def update(params, grads, state, loss):
        finite = torch.isfinite(loss) if guard else None
        new_params, new_state = [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            lr, beta1, beta2, eps, weight_decay = settings[i]
            step, exp_avg, exp_avg_sq = state[3 * i : 3 * i + 3]
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            new_step = step + 1
            new_avg = exp_avg.lerp(g, 1 - beta1)
            new_sq = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
            t = new_step.to(torch.float64)
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t).sqrt()
            step_size = (lr / bias_correction1).to(p.dtype)
            denom = (new_sq.sqrt() / bias_correction2_sqrt.to(p.dtype)).add(eps)
            new_p = p - step_size * new_avg / denom
            new = [new_p, new_step, new_avg, new_sq]
            if guard:
                old = [p, step, exp_avg, exp_avg_sq]
                new = [torch.where(finite, a, b) for a, b in zip(new, old, strict=True)]
            new_params.append(new[0])
            new_state += new[1:]
        return new_params + new_state

    return update


def _clipped_adam_settings(optimizer: torch.optim.Optimizer) -> tuple | None:
    """``(beta1, beta2, eps, weight_decay, clip_norm, centered_variance)`` of a one-parameter
    :class:`pyro.optim.clipped_adam.ClippedAdam`, else ``None``."""
    if type(optimizer) is not ClippedAdam or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    return (
        float(beta1),
        float(beta2),
        float(group["eps"]),
        float(group["weight_decay"]),
        float(group["clip_norm"]),
        bool(group["centered_variance"]),
    )


def clipped_adam_update(settings: list[tuple], guard: bool) -> Callable:
    """The functional update of Pyro's ``ClippedAdam`` (the same operations in the same order)
    over the flat state ``[exp_avg, exp_avg_sq, step_size] * len(params)``: the learning rate's
    decay and the bias corrections are Python numbers in the eager optimizer, so the step size
    ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` is an input, computed before each call
    (:class:`_OptimizerPlan`). With ``guard``, nothing changes when the loss is not finite."""

    def update(params, grads, state, loss):
        finite = torch.isfinite(loss) if guard else None
        new_params, new_state = [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            beta1, beta2, eps, weight_decay, clip_norm, centered = settings[i]
            exp_avg, exp_avg_sq, step_size = state[3 * i : 3 * i + 3]
            g = g.clamp(-clip_norm, clip_norm)
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            new_avg = exp_avg.mul(beta1).add(g, alpha=1 - beta1)
            g_var = g - new_avg if centered else g
            new_sq = exp_avg_sq.mul(beta2).addcmul(g_var, g_var, value=1 - beta2)
            denom = new_sq.sqrt().add(eps)
            new_p = p + (-step_size.to(p.dtype)) * (new_avg / denom)
            new = [new_p, new_avg, new_sq]
            if guard:
                old = [p, exp_avg, exp_avg_sq]
                new = [torch.where(finite, a, b) for a, b in zip(new, old, strict=True)]
            new_params.append(new[0])
            new_state += [new[1], new[2], step_size]
        return new_params + new_state

    return update


class _OptimizerPlan:
    """The optimizer update inside a compiled step: ``pyro.optim.Adam``'s or ``ClippedAdam``'s
    per-parameter optimizers, their state tensors (written in place by the program), and the
    Python bookkeeping before and after each call (``ClippedAdam``'s learning-rate decay and
    step count)."""

    def __init__(self, optim: PyroOptim, params: list[torch.Tensor], guard: bool):
        self.optimizers = [optim.optim_objs[p] for p in params]
        self.params = params
        self.slots = [opt.state[p] for opt, p in zip(self.optimizers, params, strict=True)]
        if all(_adam_settings(opt) is not None for opt in self.optimizers):
            self.kind = "adam"
            settings = [_adam_settings(opt) for opt in self.optimizers]
            self.state = [t for slot in self.slots for t in _adam_state(slot)]
            self.update = adam_update(settings, guard)  # type: ignore[arg-type]
        else:
            self.kind = "clipped_adam"
            settings = [_clipped_adam_settings(opt) for opt in self.optimizers]
            like = [slot["exp_avg"] for slot in self.slots]
            self.sizes = [torch.zeros((), dtype=torch.float64, device=t.device) for t in like]
            self.state = [
                t
                for slot, size in zip(self.slots, self.sizes, strict=True)
                for t in (slot["exp_avg"], slot["exp_avg_sq"], size)
            ]
            self.update = clipped_adam_update(settings, guard)  # type: ignore[arg-type]
        self.exp_avg = [slot["exp_avg"] for slot in self.slots]

    @staticmethod
    def of(optim: PyroOptim, params: list[torch.Tensor], guard: bool) -> _OptimizerPlan | None:
        """The plan for ``optim``'s optimizers of ``params``, or ``None`` where the update is
        not reproduced (another optimizer, or one without state yet)."""
        if optim.pt_clip_args or not params:
            return None
        for p in params:
            opt = optim.optim_objs.get(p)
            if opt is None or p not in opt.state:
                return None
        kinds = {
            _adam_settings(optim.optim_objs[p]) is not None
            or _clipped_adam_settings(optim.optim_objs[p]) is not None
            for p in params
        }
        if kinds != {True}:
            return None
        types = {type(optim.optim_objs[p]) for p in params}
        return _OptimizerPlan(optim, params, guard) if len(types) == 1 else None

    def current(self) -> bool:
        """The optimizers still hold the state the program writes (``optim.set_state``
        replaces it)."""
        return all(
            opt.state.get(p, {}).get("exp_avg") is t
            for opt, p, t in zip(self.optimizers, self.params, self.exp_avg, strict=True)
        )

    def before(self) -> Callable[[], None] | None:
        """Set the call's inputs (``ClippedAdam``'s step sizes); returns what commits the
        Python state after a finite step."""
        if self.kind == "adam":
            return None
        rates = []
        for opt, slot, size in zip(self.optimizers, self.slots, self.sizes, strict=True):
            group = opt.param_groups[0]
            lr, t = group["lr"] * group["lrd"], slot["step"] + 1
            beta1, beta2 = group["betas"]
            rates.append(lr)
            size.fill_(lr * math.sqrt(1 - beta2**t) / (1 - beta1**t))

        def commit() -> None:
            for opt, slot, lr in zip(self.optimizers, self.slots, rates, strict=True):
                opt.param_groups[0]["lr"] = lr
                slot["step"] += 1

        return commit


def _adam_state(slot: dict) -> tuple[torch.Tensor, ...]:
    return slot["step"], slot["exp_avg"], slot["exp_avg_sq"]


class Step(_ProgramCache):
    """
    A training step with :class:`~pyro.infer.SVI`'s arguments whose loss, gradient and Adam
    update are one compiled program; made by :func:`make_step`.

    ``step(*args, **kwargs)`` returns the loss as a float, as ``SVI.step`` does. The
    parameters stay in Pyro's param store and the Adam state in ``optim``'s per-parameter
    ``torch.optim.Adam`` objects (the compiled program updates their ``step``, ``exp_avg``
    and ``exp_avg_sq`` tensors in place), so ``optim.get_state()``, checkpoints, ``Predictive``
    and a later ``SVI`` see both. The first step for each key (see the module docstring) is an
    eager ``SVI.step``, which creates the parameters and the optimizer state; the program is
    captured after it and compiled on the next call.

    :ivar svi: the :class:`~pyro.infer.SVI` behind the eager steps.
    """

    def __init__(
        self,
        model,
        guide,
        optim: PyroOptim,
        loss,
        compile: bool = True,
        compile_options: dict | None = None,
    ):
        if not isinstance(optim, PyroOptim):
            raise TypeError(f"Expected optim to be a pyro.optim.PyroOptim, actual {type(optim)}")
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.svi = SVI(model, guide, optim, loss)
        self.compile = compile
        super().__init__("make_step", compile_options)
        #: Why the whole step cannot be one program (``None`` when it can).
        self.whole_step_refusal = _whole_step_refusal(loss)
        if compile and self.whole_step_refusal is not None and isinstance(loss, Compilable):
            if loss._compiled is None:  # its gradient steps, as its own compile=True would
                loss._init_compile(True, compile_options)

    def __call__(self, *args, **kwargs) -> float:
        if not self.compile:
            return self.svi.step(*args, **kwargs)
        if self.whole_step_refusal is not None:
            if not self.warned and getattr(self.loss, "_compiled", None) is None:
                self.warned = True
                _warn_eager(self.owner, self.whole_step_refusal)
            return self.svi.step(*args, **kwargs)  # the objective's own compile=True applies
        tensors, _, key = split_arguments(args, kwargs)
        entry = self.programs.get(key)
        if entry is not None:
            program, plan, state_flat = entry
            params = program.current()
            if params is not None and (plan is None or plan.current()):
                return self._run(key, program, params, plan, state_flat, tensors, args, kwargs)
            del self.programs[key]
        elif key in self.eager_keys:
            return self.svi.step(*args, **kwargs)
        return self._first(key, args, kwargs)

    def _first(self, key, args, kwargs) -> float:
        """The first step of ``key``: where the parameters and the optimizer's state exist
        already (a resumed run, new argument shapes) the program is captured first and runs
        this step, so that a resumed run takes the steps the uninterrupted one takes; else
        one eager ``SVI.step`` creates them, and the program is captured after it."""
        loss = self.loss
        if hasattr(loss, "_validated"):
            loss._validated = None
        if hasattr(loss, "_traced_loss"):
            loss_fn = functools.partial(loss._traced_loss, part="")
        else:
            loss_fn = functools.partial(traced_loss, loss)
        names = self._existing_names(loss_fn, args, kwargs)
        value = None
        if names is None:
            with eager(loss), poutine.trace(param_only=True) as capture_params:
                value = self.svi.step(*args, **kwargs)
            names = list(capture_params.trace.nodes)
        store = pyro.get_param_store()
        params = [store._params[n] for n in names]
        refusal = getattr(loss, "_compile_refusal", None)
        reason = (refusal("") if refusal is not None else None) or outer_handlers()
        plan = _OptimizerPlan.of(self.optim, params, guard=getattr(loss, "check_finite", True))
        compiled = self._compile(
            key,
            reason,
            loss_fn,
            self.model,
            self.guide,
            names,
            args,
            kwargs,
            getattr(loss, "_validated", None),
            update=None if plan is None else plan.update,
            state=() if plan is None else plan.state,
        )
        if compiled is not None:
            flat = None if plan is None else flat_inputs(plan.state)
            writes = [] if plan is None else [*params, *plan.state]  # written in place
            self.programs[key] = (_Program(*compiled, names, loss_fn, writes), plan, flat)
        if value is not None:
            return value
        return self(*args, **kwargs)  # the program runs this step (or the eager step runs)

    def _existing_names(self, loss_fn, args, kwargs) -> list[str] | None:
        """The parameters the loss reads, from a run of it that changes nothing (the random
        state restored, validation as configured), when each exists in the store and has its
        optimizer; ``None`` when a parameter or an optimizer would be created (then the first
        step is eager)."""
        store = pyro.get_param_store()
        if not store._params or _unprepared(self.model, self.guide):
            return None
        outer = list(_PYRO_STACK)
        del _PYRO_STACK[:]
        state = get_rng_state()
        try:
            with _ExistingParamsOnly(store), poutine.trace(param_only=True) as reads:
                loss_fn(self.model, self.guide, args, kwargs)
        except _NewParameter:
            return None
        finally:
            set_rng_state(state)
            _PYRO_STACK[:] = outer
        names = list(reads.trace.nodes)
        if not all(store._params[n] in self.optim.optim_objs for n in names):
            return None
        return names

    def _run(self, key, program, params, plan, state, tensors, args, kwargs) -> float:
        rng = torch.get_rng_state()
        commit = plan.before() if plan is not None else None
        inputs = [*program.flat, *(state or ()), *tensors]
        out = self._call(key, program, inputs, self.model, self.guide, args, kwargs)
        if out is None:
            return self.svi.step(*args, **kwargs)
        value = out[0].item()
        if not math.isfinite(value):
            if getattr(self.loss, "check_finite", False):
                torch.set_rng_state(rng)
                self.loss._raise_non_finite(value, self.model, self.guide, args, kwargs, "")
            warn_if_nan(value, "loss")  # what Pyro's ELBOs do eagerly
        if commit is not None:
            commit()
        if plan is None:  # compiled loss and gradient, the optimizer's own step
            for i, g in zip(program.used, out[1 : len(out) - program.num_aux], strict=True):
                params[i].grad = g
            self.optim(params)
            pyro.infer.util.zero_grads(set(params))
        return value


def _unprepared(*fns: Any) -> bool:
    """Whether an autoguide among ``fns`` has not run yet. Its first call creates its
    parameters inside ``PyroModule`` attribute assignments: a dry run stopped at the first new
    parameter would leave it half set up (a ``PyroParam`` registered without its value)."""
    for fn in fns:
        while isinstance(fn, functools.partial):
            fn = fn.func
        owner = getattr(fn, "__self__", fn)
        if isinstance(owner, AutoGuide) and getattr(owner, "prototype_trace", None) is None:
            return True
        if isinstance(owner, AutoMessenger) and next(owner.parameters(), None) is None:
            return True
    return False


def _whole_step_refusal(loss) -> str | None:
    """Why ``loss``'s step is more than its loss's gradient and the optimizer update (inner
    optimizers, chains, schedules: state updated outside the gradient), so the whole step
    cannot be one program; ``None`` for the objectives whose step is only that."""
    if getattr(loss, "_whole_step", False) or type(loss) in (Trace_ELBO, TraceMeanField_ELBO):
        return None
    return (
        f"{type(loss).__name__}'s step updates state of its own besides the gradient (inner "
        "optimizers, chains or schedules), so make_step runs SVI.step; the objective's own "
        "compile=True compiles its gradient steps"
    )


def can_compile(loss) -> bool:
    """Whether :func:`make_step` compiles anything of ``loss``'s step: the whole step, or the
    objective's own gradient steps (:class:`Compilable`)."""
    return _whole_step_refusal(loss) is None or isinstance(loss, Compilable)


def make_step(
    model: Callable,
    guide: Callable,
    optim: PyroOptim,
    loss,
    compile: bool = True,
    compile_options: dict | None = None,
) -> Step:
    r"""
    A training step with :class:`~pyro.infer.SVI`'s arguments, compiled whole: loss, gradient
    and the Adam update in one program (see :class:`Step`).

    Example::

        step = make_step(model, guide, pyro.optim.Adam({"lr": 0.01}), IWAE(num_particles=8))
        for _ in range(1000):
            loss = step(data)

    With ``pyro.optim.Adam`` (any per-parameter arguments; no ``amsgrad``, ``maximize`` or
    ``clip_args``) the update is compiled; with another optimizer the loss and gradient are
    compiled and ``optim`` steps eagerly. ``compile=False`` is ``SVI(...).step``.

    :param model: the model.
    :param guide: the guide.
    :param optim: a ``pyro.optim`` optimizer, as ``SVI`` takes.
    :param loss: the objective: one of :class:`~pyro_fdiv.inference.ImportanceObjective`'s
        (traced without its finite check, which runs on the compiled loss instead), or Pyro's
        ``Trace_ELBO`` or ``TraceMeanField_ELBO`` (traced through ``differentiable_loss``).
        An objective whose step updates state of its own besides the gradient (the
        f-divergence bound's guide steps and spread schedule, the critics of
        :class:`~pyro_fdiv.inference.FGANBound` and :class:`~pyro_fdiv.inference.AVB`, the
        chains of :class:`~pyro_fdiv.inference.JSA`) runs ``SVI.step``, its gradient steps
        compiled as by its own ``compile=True`` (which this turns on).
    :param bool compile: compile the step (default) or run ``SVI.step``.
    :param dict compile_options: keyword arguments of ``torch.compile``; by default
        ``{"options": {"fallback_random": True}}`` (draws equal to eager ones; see the module
        docstring).
    """
    return Step(model, guide, optim, loss, compile=compile, compile_options=compile_options)
