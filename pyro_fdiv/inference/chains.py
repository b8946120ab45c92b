r"""Persistent Markov chains stored per data point: JSA's cache of latent states.

The chains of :class:`~pyro_fdiv.inference.JSA` live in the buffers of a
:class:`torch.nn.Module` (:class:`ChainStore`), so that ``state_dict``/``load_state_dict``
round-trip them exactly and ``.to(...)`` moves them: one buffer ``cache_i`` per latent guide
site, of shape ``(num_data,) + site_shape`` for a *local* site (one chain per data point,
addressed by the data plate's subsample indices) or ``site_shape`` for a *global* one (one
chain). A step reads the chains through a :class:`ChainView`, computes a :class:`ChainUpdate`
and writes it with :meth:`ChainStore.write` (never in :meth:`~pyro_fdiv.inference.JSA.loss`).

A site's value in a vectorized run has shape ``(slots,) + batch_shape + event_shape``, slot 0
the chain's current state; :func:`to_slots` and :func:`from_slots` convert between that layout
and the cache's, as described by the site's :class:`Layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from pyro.distributions import Delta
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_fdiv.inference.importance import PARTICLE_PLATE, vectorized_frames
from pyro_fdiv.util import check_integer

__all__ = [
    "ACCEPTANCE_DECAY",
    "BLOCKS",
    "GLOBAL",
    "LOCAL",
    "ChainMessenger",
    "ChainStore",
    "ChainUpdate",
    "ChainView",
    "Layout",
    "SiteSpec",
    "from_slots",
    "is_delta",
    "site_layout",
    "to_slots",
]

#: The two blocks of chains: one per data point (``"local"``) and one for all (``"global"``).
LOCAL, GLOBAL = "local", "global"
BLOCKS = (LOCAL, GLOBAL)
#: Decay of the running average of the acceptance rate (about the last 100 steps).
ACCEPTANCE_DECAY = 0.99


class Layout(NamedTuple):
    """Where a site's per-chain value lives in a vectorized value of shape
    ``(slots,) + batch_shape + event_shape`` (``len(batch_shape) == max_plate_nesting``)."""

    kind: str  # LOCAL (one chain per data point) or GLOBAL (one chain)
    depth: int  # number of rightmost batch dims kept (the site's plates); the rest are 1
    data_pos: int  # LOCAL: position of the data dim among the kept dims


class SiteSpec(NamedTuple):
    """What the cache stores for a site: one value of ``shape`` per chain."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class ChainUpdate:
    """One step's transition, computed but not yet written to the chains."""

    loss: torch.Tensor
    indices: torch.Tensor | None
    values: dict[str, torch.Tensor]
    specs: dict[str, SiteSpec]
    rates: dict[str, torch.Tensor]  # mean acceptance probability per block (0-dim)
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)
    traces: tuple = ()


def to_slots(value: torch.Tensor, layout: Layout, full_dim: int) -> torch.Tensor:
    """A cached value (``(B,) + shape`` local, ``shape`` global) as slot 0 of a vectorized
    value with ``full_dim`` dims."""
    if layout.kind == LOCAL:
        value = value.movedim(0, layout.data_pos)
    return value.reshape((1,) * (full_dim - value.dim()) + value.shape)


def from_slots(
    value: torch.Tensor, layout: Layout, slot: torch.Tensor, max_plate_nesting: int
) -> torch.Tensor:
    """The values at ``slot`` (per data point ``(B,)`` local, a scalar global) in cache
    layout."""
    drop = max_plate_nesting - layout.depth
    if any(d != 1 for d in value.shape[1 : 1 + drop]):
        raise ValueError(
            f"a latent site has shape {tuple(value.shape)}: batch dims outside its plates "
            "must have size 1; declare them with pyro.plate or .to_event(...)."
        )
    value = value.reshape((value.shape[0], *value.shape[1 + drop :]))
    if layout.kind == LOCAL:
        value = value.movedim(1 + layout.data_pos, 1)
        if slot.dim() == 0:  # indexing by a 0-dim tensor reads its value: gather instead
            slot = slot.expand(value.shape[1])
        return value[slot, torch.arange(value.shape[1], device=value.device)]
    return value[slot.reshape(-1)].reshape(slot.shape + value.shape[1:])


class ChainStore(nn.Module):
    r"""
    The chains' storage as module state: the cache buffers (created on the first write), the
    initialization flags, the step counter, the acceptance statistics and the global chain's
    history. Subclassed by :class:`~pyro_fdiv.inference.JSA`, whose ``state_dict`` it is.

    Buffers follow the module: ``.to(device)``/``.to(dtype)`` move and cast the cache, and
    :meth:`load_state_dict` creates missing cache buffers on the module's device (and in the
    floating dtype it was last cast to), never on the checkpoint's.

    :param int num_data: number of local chains (``None``: global chains only).
    :param dict settings: what a loaded state must match (e.g. ``num_data``).
    """

    # buffers (declared for the type checker; registered in __init__, ``initialized`` only
    # with local chains)
    initialized: torch.Tensor
    global_initialized: torch.Tensor
    num_steps: torch.Tensor
    _acceptance: torch.Tensor
    _acceptance_norm: torch.Tensor
    _last_acceptance: torch.Tensor

    def __init__(self, num_data: int | None, settings: dict[str, Any]) -> None:
        super().__init__()
        self._settings = dict(settings)
        self._specs: dict[str, SiteSpec] = {}
        self._buffer_names: dict[str, str] = {}
        self._history: list[dict[str, torch.Tensor]] = []
        self._pending: ChainUpdate | None = None
        self._float_dtype: torch.dtype | None = None  # set by .to(dtype), .float(), ...
        if num_data is not None:
            self.register_buffer("initialized", torch.zeros(num_data, dtype=torch.bool))
        self.register_buffer("global_initialized", torch.tensor(False))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("_acceptance", torch.zeros(len(BLOCKS), dtype=torch.float64))
        self.register_buffer("_acceptance_norm", torch.zeros(len(BLOCKS), dtype=torch.float64))
        self.register_buffer("_last_acceptance", torch.zeros(len(BLOCKS), dtype=torch.float64))

    # ------------------------------------------------------------------------------------------
    # Reading and writing

    def spec(
        self, name: str, layout: Layout, value: torch.Tensor, max_plate_nesting: int
    ) -> SiteSpec:
        """The cache spec of a latent site's vectorized ``value``; ``ValueError`` if it differs
        from the chains'."""
        slot = from_slots(value, layout, torch.zeros((), dtype=torch.long), max_plate_nesting)
        shape = tuple(slot.shape[1:] if layout.kind == LOCAL else slot.shape)
        spec = SiteSpec(layout.kind, shape, value.dtype)
        if self._specs and self._specs.get(name) != spec:
            raise ValueError(
                f"JSA's chains hold the latent sites {_describe(self._specs)}, but this "
                f"step's guide has site '{name}' as {_describe({name: spec})}. The chains "
                "need the same latent sites, shapes and dtypes at every step; call "
                "jsa.reset() to start new chains."
            )
        return spec

    def check_sites(self, specs: dict[str, SiteSpec]) -> None:
        """Raise unless a step's latent sites are the chains' (any, before the first write)."""
        if self._specs and set(specs) != set(self._specs):
            raise ValueError(
                f"JSA's chains hold the latent sites {sorted(self._specs)}, but this step's "
                f"guide has {sorted(specs)}. The chains need the same latent sites at every "
                "step; call jsa.reset() to start new chains."
            )

    def indices(
        self, subsamples: dict[str, torch.Tensor], frame: CondIndepStackFrame, check: bool = True
    ) -> torch.Tensor:
        """The local chains of this step: the data plate's subsample indices, checked (unless
        ``check=False``: a traced step, whose values are not known)."""
        indices = subsamples.get(frame.name)
        if indices is None:
            raise ValueError(f"data plate '{frame.name}' was not entered by the guide or model")
        indices = torch.as_tensor(indices).reshape(-1)
        num_data = len(self.initialized)
        if check and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_data):
            raise ValueError(
                f"subsample indices of data plate '{frame.name}' must lie in "
                f"[0, {num_data}), actual range [{int(indices.min())}, {int(indices.max())}]"
            )
        return indices

    @torch.no_grad()
    def write(self, update: ChainUpdate) -> None:
        """Write a step's accepted states, count the step, record its acceptance rates and
        history."""
        if not self._specs:
            self._specs = dict(update.specs)
        for name, value in update.values.items():
            spec = self._specs[name]
            if name not in self._buffer_names:
                buf_name = f"cache_{len(self._buffer_names)}"
                shape = (len(self.initialized), *spec.shape) if spec.kind == LOCAL else spec.shape
                self.register_buffer(
                    buf_name, torch.zeros(shape, dtype=spec.dtype, device=value.device)
                )
                self._buffer_names[name] = buf_name
            buf = getattr(self, self._buffer_names[name])
            if spec.kind == LOCAL:
                assert update.indices is not None  # local chains: a data plate was entered
                buf[update.indices.to(buf.device)] = value.to(buf)
            else:
                buf.copy_(value)
        if update.indices is not None and any(s.kind == LOCAL for s in self._specs.values()):
            self.initialized[update.indices.to(self.initialized.device)] = True
        if any(s.kind == GLOBAL for s in self._specs.values()):
            self.global_initialized.fill_(True)
        self.num_steps += 1
        for i, block in enumerate(BLOCKS):
            if block in update.rates:
                rate = update.rates[block]
                self._last_acceptance[i] = rate
                self._acceptance[i] = ACCEPTANCE_DECAY * self._acceptance[i] + rate
                self._acceptance_norm[i] = ACCEPTANCE_DECAY * self._acceptance_norm[i] + 1.0
        self._history.extend({n: v.cpu() for n, v in h.items()} for h in update.history)

    # ------------------------------------------------------------------------------------------
    # Diagnostics

    @property
    def acceptance_rate(self) -> dict[str, float]:
        r"""
        Running average (over about the last 100 steps) of the mean acceptance probability
        :math:`\min\{1, w'/w\}` of a step's transitions, per block (``"local"``: the chains of
        the data points, ``"global"``: the single chain), for the blocks the model has.
        """
        out = {}
        for i, block in enumerate(BLOCKS):
            if self._acceptance_norm[i] > 0:
                out[block] = float(self._acceptance[i] / self._acceptance_norm[i])
        return out

    @property
    def last_acceptance_rate(self) -> dict[str, float]:
        """The mean acceptance probability of the last committed step, per block."""
        return {
            block: float(self._last_acceptance[i])
            for i, block in enumerate(BLOCKS)
            if self._acceptance_norm[i] > 0
        }

    def samples(self) -> dict[str, torch.Tensor]:
        """
        The chains' current states: every latent guide site by name, local sites with a leading
        dimension ``num_data`` (rows not yet visited hold zeros: see ``self.initialized``),
        global sites with their own shape. Copies, on the buffers' device.
        """
        return {name: getattr(self, buf).clone() for name, buf in self._buffer_names.items()}

    def history(self, burn_in: int = 0) -> dict[str, torch.Tensor]:
        """
        The global chain's recorded states (``record_history=True``): one per Metropolis
        transition (repeated when a proposal is rejected), stacked along a leading dimension,
        the first ``burn_in`` dropped. For a model without a data plate this is a posterior
        sampler's output (autocorrelated; the proposal adapts while the guide trains).
        """
        burn_in = check_integer("burn_in", burn_in, 0)
        if not self._history:
            return {}
        return {
            name: torch.cat([h[name] for h in self._history])[burn_in:] for name in self._history[0]
        }

    @property
    def num_recorded(self) -> int:
        """The number of states :meth:`history` holds (before burn-in)."""
        if not self._history:
            return 0
        return sum(len(next(iter(h.values()))) for h in self._history)

    # ------------------------------------------------------------------------------------------
    # State

    def reset(self) -> None:
        """Forget every chain, the counters and the history."""
        for buf in list(self._buffer_names.values()):
            delattr(self, buf)
        self._buffer_names, self._specs, self._history, self._pending = {}, {}, [], None
        if "initialized" in self._buffers:
            self.initialized.zero_()
        self.global_initialized.fill_(False)
        self.num_steps.zero_()
        self._acceptance.zero_()
        self._acceptance_norm.zero_()
        self._last_acceptance.zero_()

    def get_extra_state(self) -> dict:
        return {
            "specs": {n: (s.kind, s.shape, str(s.dtype)) for n, s in self._specs.items()},
            "buffer_names": dict(self._buffer_names),
            "history": [dict(h) for h in self._history],
            "settings": dict(self._settings),
        }

    def set_extra_state(self, state: dict) -> None:
        if state["settings"] != self._settings:
            raise ValueError(
                f"Expected a state_dict of a JSA with settings {self._settings}, actual "
                f"{state['settings']}"
            )
        self._specs = {
            n: SiteSpec(kind, tuple(shape), getattr(torch, dtype.split(".")[-1]))
            for n, (kind, shape, dtype) in state["specs"].items()
        }
        self._buffer_names = dict(state["buffer_names"])
        self._history = [dict(h) for h in state["history"]]
        self._pending = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pending"] = None  # an uncommitted step holds traces: not part of the state
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the cache buffers are created lazily: create those the state dict has, on this
        # module's device and in its dtype (load_state_dict then copies the values into them)
        device = self.num_steps.device
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if key.startswith(prefix) and name.startswith("cache_") and "." not in name:
                old = self._buffers.pop(name, None)
                dtype = value.dtype
                if old is not None and old.dtype.is_floating_point == dtype.is_floating_point:
                    dtype = old.dtype
                elif dtype.is_floating_point and self._float_dtype is not None:
                    dtype = self._float_dtype
                self.register_buffer(name, torch.empty(value.shape, dtype=dtype, device=device))
        for name in [b for b in self._buffers if b.startswith("cache_")]:
            if prefix + name not in state_dict:
                delattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._match_specs()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        # remember a cast of floating tensors (to(dtype), float(), double()) for later loads
        cast = {fn(torch.zeros((), dtype=d)).dtype for d in (torch.float32, torch.float64)}
        if len(cast) == 1:
            self._float_dtype = cast.pop()
        self._match_specs()
        return module

    def _match_specs(self) -> None:
        """The specs' dtypes follow the buffers' (after a cast or a load)."""
        for name, buf_name in self._buffer_names.items():
            if name in self._specs and buf_name in self._buffers:
                buf = self._buffers[buf_name]
                assert buf is not None  # cache buffers are tensors
                dtype = buf.dtype
                self._specs[name] = self._specs[name]._replace(dtype=dtype)


def is_delta(fn: Any) -> bool:
    """Whether a site's distribution is a (masked, expanded, independent) ``Delta``."""
    while True:
        if isinstance(fn, Delta):
            return True
        inner = getattr(fn, "base_dist", None)
        if inner is None:
            return False
        fn = inner


def site_layout(
    name: str,
    site: dict,
    frame: CondIndepStackFrame | None,
    max_plate_nesting: int,
    value: torch.Tensor | None = None,
) -> Layout:
    """Where a site's chains live: local (one per data point) if it is in the data plate
    ``frame``, else global; ``value`` overrides the site's value (a fresh draw)."""
    mpn = max_plate_nesting
    frames = vectorized_frames(site)
    depth = max((-f.dim for f in frames), default=0)
    value = site.get("value") if value is None else value
    if value is not None and value.dim() - site["fn"].event_dim > mpn + 1:
        raise ValueError(
            f"Site '{name}' has batch dims outside the plates (max_plate_nesting={mpn}). "
            "Declare event dims with .to_event(...), put batch dims in a pyro.plate, or "
            "raise max_plate_nesting."
        )
    if frame is not None and any(f.name == frame.name for f in frames):
        return Layout(LOCAL, depth, depth + frame.dim)
    return Layout(GLOBAL, depth, 0)


def _describe(specs: dict[str, SiteSpec]) -> str:
    return str({n: (s.kind, s.shape, str(s.dtype)) for n, s in sorted(specs.items())})


class ChainView:
    """One step's view of the chains: their current values in cache layout (read lazily from
    the store, once the data plate's subsample is known) and the pinned subsamples.

    :param ChainStore store: the chains.
    :param frame: the data plate (``None``: global chains only).
    :param bool warm: whether this step restarts every chain from a fresh draw.
    :param bool global_ready: whether the global chain continues from its state (it has one
        and ``warm`` is false).
    :param bool traced: a traced step: the values are not known, so nothing is read from
        them (the subsample indices are not checked).
    """

    def __init__(
        self,
        store: ChainStore,
        frame: CondIndepStackFrame | None,
        warm: bool,
        global_ready: bool,
        traced: bool = False,
    ) -> None:
        self.store, self.frame, self.warm = store, frame, warm
        self.global_ready, self.traced = global_ready, traced
        self.subsamples: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.initialized: dict[str, torch.Tensor | bool] = {}
        self._indices: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor | None:
        """The data plate's subsample indices in this step (``None`` without a data plate)."""
        if self._indices is None and self.frame is not None:
            self._indices = self.store.indices(self.subsamples, self.frame, not self.traced)
        return self._indices

    def current(self, name: str, spec: SiteSpec) -> tuple[torch.Tensor | None, Any]:
        """The chains' value of site ``name`` and which chains are initialized."""
        if name not in self.values:
            store = self.store
            if name not in store._buffer_names:
                return None, False
            buf = getattr(store, store._buffer_names[name])
            if spec.kind == LOCAL:
                assert self.indices is not None  # a local site: the data plate was entered
                indices = self.indices.to(buf.device)
                self.values[name] = buf[indices]
                init = store.initialized[indices]
                self.initialized[name] = torch.zeros_like(init) if self.warm else init
            else:
                self.values[name] = buf
                self.initialized[name] = self.global_ready
        return self.values[name], self.initialized[name]


class ChainMessenger(Messenger):
    r"""
    Runs a guide with ``slots = 1 + K`` values per latent site in an outer plate: slot 0 holds
    the chains' current value (a fresh draw where a chain is not initialized), slots ``1..K``
    fresh proposals for the sites of the block being moved; the other block's sites hold their
    current value in every slot. Values are detached (no reparameterization). ``Delta`` sites
    are left alone: they follow the sites they are computed from. Subsample indices are
    recorded on the first run of a step and replayed on the later ones.

    :param ChainView view: the step's chains.
    :param str block: the block whose proposals fill slots ``1..K``; ``None`` for the model,
        whose latent sites are replayed: only its subsamples are pinned.
    :param int max_plate_nesting: the plates' bound of the run.
    """

    def __init__(self, view: ChainView, block: str | None, max_plate_nesting: int) -> None:
        super().__init__()
        self.view, self.block, self.max_plate_nesting = view, block, max_plate_nesting

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if site_is_subsample(msg):
            if name != PARTICLE_PLATE and name in self.view.subsamples:
                msg["value"] = self.view.subsamples[name]
            return
        if self.block is None or msg["is_observed"] or msg["value"] is not None:
            return
        if is_delta(msg["fn"]):
            return
        with torch.no_grad():
            fresh = msg["fn"](*msg["args"], **msg["kwargs"]).detach()
        mpn = self.max_plate_nesting
        layout = site_layout(name, msg, self.view.frame, mpn, fresh)
        spec = self.view.store.spec(name, layout, fresh, mpn)
        current, init = self.view.current(name, spec)
        if current is None:
            slot0 = fresh[:1]
        else:
            slot0 = to_slots(current, layout, fresh.dim())
            if isinstance(init, torch.Tensor):
                mask = init.reshape(init.shape + (1,) * (current.dim() - 1))
                slot0 = torch.where(to_slots(mask, layout, fresh.dim()), slot0, fresh[:1])
            elif not init:
                slot0 = fresh[:1]
        if layout.kind == self.block:
            value = torch.cat([slot0.expand((1, *fresh.shape[1:])), fresh[1:]], dim=0)
        else:
            value = slot0.expand(fresh.shape)
        msg["value"] = value
        msg["done"] = True

    def _pyro_post_sample(self, msg: dict) -> None:
        if site_is_subsample(msg) and msg["name"] != PARTICLE_PLATE:
            self.view.subsamples.setdefault(msg["name"], msg["value"])
