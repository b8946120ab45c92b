r"""Joint stochastic approximation: model and guide trained at the states of persistent
Metropolis independence chains that use the guide as their proposal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match
from torch import nn

from pyro_fdiv.inference import mis
from pyro_fdiv.inference.importance import (
    PARTICLE_PLATE,
    _check_sites,
    check_flag,
    checked_value,
    site_log_prob,
)
from pyro_fdiv.inference.objective import check_integer, check_num_particles, rng_preserved

__all__ = ["JSA"]

LOCAL, GLOBAL = "local", "global"
_BLOCKS = (LOCAL, GLOBAL)
#: Decay of the running average of the acceptance rate (about the last 100 steps).
ACCEPTANCE_DECAY = 0.99


def _is_delta(fn: Any) -> bool:
    """Whether a site's distribution is a (masked, expanded, independent) ``Delta``."""
    while True:
        if isinstance(fn, Delta):
            return True
        inner = getattr(fn, "base_dist", None)
        if inner is None:
            return False
        fn = inner


def _vectorized_frames(site: dict) -> list[CondIndepStackFrame]:
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]


def _in_plate(site: dict, name: str) -> bool:
    # by name: a frame also records the (sub)sample size, which may change between steps
    return any(f.name == name for f in _vectorized_frames(site))


def _delta_message(name: str) -> str:
    return (
        f"JSA: guide site '{name}' is a Delta whose value depends on parameters; the guide "
        "cannot score the chains' states. Use a guide with a density (e.g. AutoNormal, "
        "AutoMultivariateNormal, an amortized distribution); Delta sites may only be "
        "functions of other guide samples."
    )


def _latent_sites(trace: Trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _sample_sites(trace: Trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


class _Layout(NamedTuple):
    """Where a site's per-chain value lives in a vectorized value of shape
    ``(slots,) + batch_shape + event_shape`` (``len(batch_shape) == max_plate_nesting``)."""

    kind: str  # LOCAL (one chain per data point) or GLOBAL (one chain)
    depth: int  # number of rightmost batch dims kept (the site's plates); the rest are 1
    data_pos: int  # LOCAL: position of the data dim among the kept dims


class _SiteSpec(NamedTuple):
    """What the cache stores for a site: one value of ``shape`` per chain."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Step:
    """One step's transition, computed but not yet written to the chains."""

    loss: torch.Tensor
    indices: torch.Tensor | None
    values: dict[str, torch.Tensor]
    specs: dict[str, _SiteSpec]
    rates: dict[str, float]
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)
    traces: tuple = ()


class _Context:
    """One step's view of the chains: their current values in cache layout (read lazily from
    the cache, once the data plate's subsample is known) and the pinned subsamples."""

    def __init__(self, jsa: JSA) -> None:
        self.jsa = jsa
        self.subsamples: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.initialized: dict[str, torch.Tensor | bool] = {}
        self._indices: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor | None:
        if self._indices is None and self.jsa._prototype["frame"] is not None:
            self._indices = self.jsa._indices(self.subsamples)
        return self._indices

    def current(self, name: str, spec: _SiteSpec) -> tuple[torch.Tensor | None, Any]:
        """The chains' value of site ``name`` and which chains are initialized."""
        if name not in self.values:
            jsa = self.jsa
            if name not in jsa._buffer_names:
                return None, False
            buf = getattr(jsa, jsa._buffer_names[name])
            warm = int(jsa.num_steps) < jsa.warmup_without_cache
            if spec.kind == LOCAL:
                indices = self.indices.to(buf.device)
                self.values[name] = buf[indices]
                init = jsa.initialized[indices]
                self.initialized[name] = torch.zeros_like(init) if warm else init
            else:
                self.values[name] = buf
                self.initialized[name] = bool(jsa.global_initialized) and not warm
        return self.values[name], self.initialized[name]


class _ChainMessenger(Messenger):
    r"""
    Runs a guide with ``slots = 1 + K`` values per latent site in an outer plate: slot 0 holds
    the chains' current value (a fresh draw where a chain is not initialized), slots ``1..K``
    fresh proposals for the sites of the block being moved; the other block's sites hold their
    current value in every slot. Values are detached (no reparameterization). ``Delta`` sites
    are left alone: they follow the sites they are computed from. Subsample indices are
    recorded on the first run of a step and replayed on the later ones.
    """

    def __init__(self, context: _Context, block: str | None) -> None:
        super().__init__()
        self.context = context
        self.block = block  # None: only pin subsamples (the model)

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if site_is_subsample(msg):
            if name != PARTICLE_PLATE and name in self.context.subsamples:
                msg["value"] = self.context.subsamples[name]
            return
        if self.block is None or msg["is_observed"] or msg["value"] is not None:
            return
        if _is_delta(msg["fn"]):
            return
        jsa = self.context.jsa
        with torch.no_grad():
            fresh = msg["fn"](*msg["args"], **msg["kwargs"]).detach()
        layout = jsa._layout(name, msg, fresh)
        spec = jsa._spec(name, layout, fresh)
        current, init = self.context.current(name, spec)
        if current is None:
            slot0 = fresh[:1]
        else:
            slot0 = jsa._to_slots(current, layout, fresh.dim())
            if isinstance(init, torch.Tensor):
                mask = init.reshape(init.shape + (1,) * (current.dim() - 1))
                slot0 = torch.where(jsa._to_slots(mask, layout, fresh.dim()), slot0, fresh[:1])
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
            self.context.subsamples.setdefault(msg["name"], msg["value"])


class JSA(ELBO, nn.Module):
    r"""
    Joint stochastic approximation (JSA) of Xu and Ou [1, 2]: maximum likelihood for the model
    together with the *inclusive* KL for the guide,

    .. math::

        \min_\theta \mathrm{KL}\big(\tilde p(x) \,\|\, p_\theta(x)\big), \qquad
        \min_\phi \mathrm{KL}\big(\tilde p(x) p_\theta(z \mid x) \,\|\,
            \tilde p(x) q_\phi(z \mid x)\big),

    solved by stochastic approximation with the samples of a Markov chain whose stationary
    distribution is the posterior. Each data point :math:`x_n` keeps one cached latent state
    :math:`z_n`; a step moves the minibatch's chains with the Metropolis independence sampler
    (:mod:`pyro_fdiv.inference.mis`) whose proposal is the guide,

    .. math::

        z' \sim q_\phi(z \mid x_n), \qquad
        z_n \leftarrow z' \text{ with probability }
        \min\Big\{1, \frac{w_n(z')}{w_n(z_n)}\Big\}, \qquad
        w_n(z) = \frac{p_\theta(x_n, z)}{q_\phi(z \mid x_n)},

    (the intractable :math:`p_\theta(x_n)` cancels; the cached state is re-scored under the
    current :math:`\theta, \phi`), then takes one gradient step on the surrogate loss

    .. math::

        -\frac{N}{B}\sum_{n \in \text{batch}} \Big[\log p_\theta(x_n, z_n)
            + \log q_\phi(z_n \mid x_n)\Big]

    at the accepted states: :math:`\theta` ascends the complete-data log-likelihood (whose
    expectation under the posterior is :math:`\nabla_\theta \log p_\theta(x)` by Fisher's
    identity), :math:`\phi` the inclusive-KL gradient. No reparameterization is needed:
    discrete latents (Bernoulli, Categorical) work, and the values are detached.

    **Chains.** With ``num_data=N`` the *data plate* (``data_plate``, or the subsampled plate,
    or the outermost plate enclosing every observed site) must have size ``N``; every latent
    guide site inside it is *local*: one chain per data point, cached in a buffer of ``N`` rows
    addressed by the plate's subsample indices (those the guide's plate drew or was given,
    which the model replays). Latent sites outside it are *global*: one chain. With
    ``num_data=None`` every latent site is global (one chain, e.g. Eight Schools). Models with
    both alternate the two blocks (Metropolis-within-Gibbs): the local block moves each
    :math:`z_n` given the global :math:`g` with weights :math:`p(x_n, z_n \mid g) / q(z_n \mid
    x_n, g)`; the global block then moves :math:`g` given the :math:`z_n` with weights
    :math:`p(g)\prod_n p(x_n, z_n \mid g) / q(g)`. Under subsampling the global block sees the
    minibatch only (its likelihood scaled by :math:`N/B`), a stochastic approximation rather
    than an exact transition; without subsampling every block is an exact Metropolis-Hastings
    step, so with :math:`\theta, \phi` fixed the chains' stationary distribution is the exact
    posterior.

    **Proposals.** The proposals of an independence sampler do not depend on the state, so a
    *move* draws ``num_particles`` proposals per chain in one vectorized pass of guide and
    model (the current state rides along in the same pass, in slot 0 of an outer plate of size
    ``1 + num_particles``) and then applies ``num_particles`` Metropolis transitions in
    sequence, a cheap elementwise loop. ``num_moves`` repeats this (only the last move keeps an
    autograd graph). The loss averages the states the last move visited (one per transition;
    ``average_visited=False``: the final state only).

    **State.** The cache, the initialization flags and the counters are buffers of this
    :class:`torch.nn.Module` (``state_dict``/``load_state_dict`` round-trip them exactly and
    ``.to(device)`` moves them), never in Pyro's param store. A chain starts from a draw of the
    guide the first time its data point is visited (and at every step during the first
    ``warmup_without_cache`` steps). :meth:`loss` and :meth:`differentiable_loss` never change
    the state; :meth:`loss_and_grads` writes the accepted states back after the backward pass,
    and :meth:`commit` does so for the last :meth:`differentiable_loss` (for plain PyTorch
    loops); :meth:`advance` moves the chains with :math:`\theta, \phi` fixed (a posterior
    sampler). :meth:`samples` returns the cached states, :meth:`history` the global chain's
    recorded states (``record_history=True``), :attr:`acceptance_rate` a running average of the
    acceptance probability per block.

    The returned loss value is the surrogate :math:`-\frac{N}{B}\sum_n [\log p_\theta(x_n, z_n)
    + \log q_\phi(z_n \mid x_n)]` itself, not a bound on :math:`\log p_\theta(x)`; estimate
    that with :class:`~pyro_fdiv.inference.IWAE` (``num_particles`` large) for monitoring.

    Requirements: static model and guide structure; they must broadcast under an outer plate
    (as for vectorized particles); sites outside the data plate must not depend on sites inside
    it; the guide must have a density at every value it can propose (``Delta`` sites only as
    deterministic functions of other guide sites, as in autoguides); only the data plate may
    be subsampled.

    Example::

        def model(x, idx):
            pyro.module("decoder", decoder)
            with pyro.plate("data", 60000, subsample=idx):
                z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(200)).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

        def guide(x, idx):
            pyro.module("encoder", encoder)
            with pyro.plate("data", 60000, subsample=idx):
                pyro.sample("z", dist.Bernoulli(logits=encoder(x)).to_event(1))

        jsa = JSA(num_data=60000, num_particles=4)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=jsa)
        for idx in loader:  # minibatch indices
            svi.step(data[idx], idx)
        print(jsa.acceptance_rate)

    :param int num_data: size :math:`N` of the data plate, or ``None`` for one chain over all
        latent sites.
    :param int num_moves: moves per step (each ``num_particles`` transitions).
    :param int num_particles: proposals per move, i.e. Metropolis transitions per move.
    :param int warmup_without_cache: number of initial steps whose chains restart from a guide
        draw instead of the cache (useful while the guide is still poor); their accepted
        states are still written.
    :param str data_plate: name of the data plate, if it cannot be guessed.
    :param bool average_visited: average the loss over the states visited by the last move's
        transitions (default) rather than use the final state only.
    :param bool record_history: record the global chain's state after every transition, for
        :meth:`history`.
    :param int max_plate_nesting: bound on the number of nested plates; guessed if omitted.
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    :param str validation: with Pyro's validation on, ``"first"`` (default) validates
        distribution arguments and the model/guide match on the first step only (the
        structure is fixed: a change raises a ``ValueError`` anyway), ``"always"`` every step.
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads` and
        :meth:`differentiable_loss` raise a ``ValueError`` naming the model and guide sites whose
        log-densities are not finite whenever the loss is not finite; ``False`` skips the check
        (no device synchronization in :meth:`differentiable_loss`).

    **References**

    [1] H. Xu, Z. Ou. *Joint stochastic approximation learning of Helmholtz machines*. ICLR
    2016 workshop.

    [2] Z. Ou, Y. Song. *Joint stochastic approximation and its application to learning
    discrete latent variable models*. UAI 2020.

    [3] Z. Ou. *A review of learning with deep generative models from perspective of graphical
    modeling*. arXiv:1808.01630, section 3.2.3.
    """

    def __init__(
        self,
        num_data: int | None = None,
        num_moves: int = 1,
        num_particles: int = 1,
        warmup_without_cache: int = 0,
        *,
        data_plate: str | None = None,
        average_visited: bool = True,
        record_history: bool = False,
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
        validation: str = "first",
        check_finite: bool = True,
    ) -> None:
        check_finite = check_flag("check_finite", check_finite)
        if num_data is not None:
            num_data = check_integer("num_data", num_data, 1)
        num_moves = check_integer("num_moves", num_moves, 1)
        num_particles = check_num_particles(num_particles)
        warmup_without_cache = check_integer("warmup_without_cache", warmup_without_cache, 0)
        if data_plate is not None and (num_data is None or not isinstance(data_plate, str)):
            raise ValueError(
                f"Expected data_plate to be a plate name together with num_data, actual "
                f"data_plate={data_plate!r}, num_data={num_data!r}"
            )
        if validation not in ("first", "always"):
            raise ValueError(f"Expected validation in ('first', 'always'), actual {validation!r}")
        nn.Module.__init__(self)
        ELBO.__init__(
            self,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            retain_graph=retain_graph,
        )
        self.num_data = num_data
        self.num_moves = num_moves
        self.warmup_without_cache = warmup_without_cache
        self.data_plate = data_plate
        self.average_visited = bool(average_visited)
        self.record_history = bool(record_history)
        self.validation = validation
        self.check_finite = check_finite
        self._prototype: dict | None = None  # data plate frame and site layouts (derived)
        self._pending: _Step | None = None
        self._specs: dict[str, _SiteSpec] = {}
        self._buffer_names: dict[str, str] = {}
        self._history: list[dict[str, torch.Tensor]] = []
        if num_data is not None:
            self.register_buffer("initialized", torch.zeros(num_data, dtype=torch.bool))
        self.register_buffer("global_initialized", torch.tensor(False))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("_acceptance", torch.zeros(len(_BLOCKS), dtype=torch.float64))
        self.register_buffer("_acceptance_norm", torch.zeros(len(_BLOCKS), dtype=torch.float64))
        self.register_buffer("_last_acceptance", torch.zeros(len(_BLOCKS), dtype=torch.float64))

    # ------------------------------------------------------------------------------------------
    # Pyro's ELBO interface

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """
        :returns: the surrogate loss at the states one step would accept (the chains are not
            changed).
        :rtype: float
        """
        step = self._step(model, guide, args, kwargs, grad=False)
        return self._checked(step)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """
        :returns: a scalar tensor equal to :meth:`loss` whose gradient is the JSA update. The
            chains are not changed; :meth:`commit` writes this step's accepted states.
        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        step = self._step(model, guide, args, kwargs, grad=True)
        if self.check_finite:
            self._checked(step)
        self._pending = step
        return step.loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """
        Move the chains, back-propagate the surrogate loss at the accepted states into every
        parameter, then write the accepted states to the cache.

        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        step = self._step(model, guide, args, kwargs, grad=True)
        value = self._checked(step)
        if step.loss.requires_grad:
            step.loss.backward(retain_graph=self.retain_graph)
        self._commit(step)
        return value

    def commit(self) -> None:
        """Write the accepted states of the last :meth:`differentiable_loss` to the chains."""
        if self._pending is None:
            raise ValueError("nothing to commit: call differentiable_loss(...) first")
        step, self._pending = self._pending, None
        self._commit(step)

    @torch.no_grad()
    def advance(self, model, guide, *args, **kwargs) -> dict[str, float]:
        r"""
        One step of the chains with :math:`\theta, \phi` fixed and no gradient: with this the
        chains are a posterior sampler. Returns the step's mean acceptance rate per block.
        """
        step = self._step(model, guide, args, kwargs, grad=False)
        self._commit(step)
        return step.rates

    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of the last run of one step (Pyro's ``ELBO``
        interface): every latent site has ``1 + num_particles`` slots in an outer plate, the
        chains' current values in slot 0."""
        with torch.no_grad():
            return self._step(model, guide, args, kwargs, grad=False).traces

    # ------------------------------------------------------------------------------------------
    # Diagnostics and state

    @property
    def acceptance_rate(self) -> dict[str, float]:
        r"""
        Running average (over about the last 100 steps) of the mean acceptance probability
        :math:`\min\{1, w'/w\}` of a step's transitions, per block (``"local"``: the chains of
        the data points, ``"global"``: the single chain), for the blocks the model has.
        """
        out = {}
        for i, block in enumerate(_BLOCKS):
            if self._acceptance_norm[i] > 0:
                out[block] = float(self._acceptance[i] / self._acceptance_norm[i])
        return out

    @property
    def last_acceptance_rate(self) -> dict[str, float]:
        """The mean acceptance probability of the last committed step, per block."""
        return {
            block: float(self._last_acceptance[i])
            for i, block in enumerate(_BLOCKS)
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

    def reset(self) -> None:
        """Forget every chain, the counters and the history (keeps the settings)."""
        for buf in list(self._buffer_names.values()):
            delattr(self, buf)
        self._buffer_names, self._specs, self._history, self._pending = {}, {}, [], None
        if self.num_data is not None:
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
            "settings": self._settings(),
        }

    def set_extra_state(self, state: dict) -> None:
        if state["settings"] != self._settings():
            raise ValueError(
                f"Expected a state_dict of a JSA with settings {self._settings()}, actual "
                f"{state['settings']}"
            )
        self._specs = {
            n: _SiteSpec(kind, tuple(shape), getattr(torch, dtype.split(".")[-1]))
            for n, (kind, shape, dtype) in state["specs"].items()
        }
        self._buffer_names = dict(state["buffer_names"])
        self._history = [dict(h) for h in state["history"]]
        self._pending = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pending"] = None  # an uncommitted step holds traces: not part of the state
        return state

    def _settings(self) -> dict:
        return {"num_data": self.num_data, "data_plate": self.data_plate}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the cache buffers are created lazily: create those the state dict has
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if key.startswith(prefix) and name.startswith("cache_") and "." not in name:
                if name in self._buffers:
                    delattr(self, name)
                self.register_buffer(name, torch.empty_like(value))
        for name in [b for b in self._buffers if b.startswith("cache_")]:
            if prefix + name not in state_dict:
                delattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, num_moves={self.num_moves}, "
            f"num_particles={self.num_particles}, "
            f"warmup_without_cache={self.warmup_without_cache}"
        )

    # ------------------------------------------------------------------------------------------
    # Structure: data plate, site layouts, the cache's site specs

    def _discover(self, model, guide, args, kwargs) -> dict:
        """Run model and guide once (random state restored) to find the plates and blocks."""
        with rng_preserved(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        sites = [s for t in (model_trace, guide_trace) for s in _sample_sites(t).values()]
        if self.max_plate_nesting == float("inf"):
            dims = [f.dim for s in sites for f in _vectorized_frames(s)]
            self.max_plate_nesting = -min(dims) if dims else 0
        frames = {f.name: f for s in sites for f in _vectorized_frames(s)}
        subsampled = [f for f in frames.values() if f.full_size not in (None, f.size)]
        frame = None
        if self.num_data is None:
            if subsampled:
                raise ValueError(
                    f"plate '{subsampled[0].name}' is subsampled ({subsampled[0].size} of "
                    f"{subsampled[0].full_size}) but num_data=None, which keeps a single chain "
                    "over all latent sites. Pass JSA(num_data=...) with the data plate's size "
                    "for one chain per data point."
                )
        else:
            frame = self._data_frame(frames, model_trace)
            size = frame.full_size if frame.full_size is not None else frame.size
            if size != self.num_data:
                raise ValueError(
                    f"data plate '{frame.name}' has size {size} but JSA(num_data="
                    f"{self.num_data}). Pass num_data={size}, or name the right plate with "
                    "data_plate=."
                )
            others = [f.name for f in subsampled if f.name != frame.name]
            if others:
                raise ValueError(
                    f"plates {others} are subsampled besides the data plate '{frame.name}'; "
                    "JSA's acceptance ratios need exact per-data-point densities: subsample "
                    "only the data plate."
                )
        kinds = {
            LOCAL if frame is not None and _in_plate(site, frame.name) else GLOBAL
            for site in _latent_sites(guide_trace).values()
            if not _is_delta(site["fn"])
        }
        blocks = tuple(b for b in _BLOCKS if b in kinds)
        deltas = [n for n, site in _latent_sites(guide_trace).items() if _is_delta(site["fn"])]
        if not blocks and deltas:
            raise ValueError(_delta_message(deltas[0]))
        if not blocks:
            raise ValueError(
                "JSA: the guide has no latent sample sites (other than Delta): no chain to run."
            )
        return {"frame": frame, "blocks": blocks}

    def _data_frame(self, frames: dict, model_trace: Trace) -> CondIndepStackFrame:
        if self.data_plate is not None:
            if self.data_plate not in frames:
                raise ValueError(
                    f"data_plate '{self.data_plate}' is not a vectorized plate of the model or "
                    f"guide; plates: {sorted(frames)}"
                )
            return frames[self.data_plate]
        subsampled = [f for f in frames.values() if f.full_size not in (None, f.size)]
        if len(subsampled) == 1:
            return subsampled[0]
        observed = [s for s in _sample_sites(model_trace).values() if s["is_observed"]]
        if observed:
            for candidate in _vectorized_frames(observed[0]):  # outermost first
                if all(_in_plate(site, candidate.name) for site in observed):
                    return candidate
        raise ValueError(
            f"JSA(num_data={self.num_data}) needs a data plate, but no vectorized plate "
            "encloses every observed site of the model. Put the observations in a "
            "pyro.plate of that size, or name it with data_plate=."
        )

    def _layout(self, name: str, site: dict, value: torch.Tensor | None = None) -> _Layout:
        mpn = self.max_plate_nesting
        frames = _vectorized_frames(site)
        depth = max((-f.dim for f in frames), default=0)
        value = site.get("value") if value is None else value
        if value is not None and value.dim() - site["fn"].event_dim > mpn + 1:
            raise ValueError(
                f"Site '{name}' has batch dims outside the plates (max_plate_nesting={mpn}). "
                "Declare event dims with .to_event(...), put batch dims in a pyro.plate, or "
                "raise max_plate_nesting."
            )
        frame = self._prototype["frame"]
        if frame is not None and _in_plate(site, frame.name):
            return _Layout(LOCAL, depth, depth + frame.dim)
        return _Layout(GLOBAL, depth, 0)

    def _spec(self, name: str, layout: _Layout, value: torch.Tensor) -> _SiteSpec:
        """The cache spec of a latent site; ``ValueError`` if it differs from the chains'."""
        shape = self._from_slots(value, layout, torch.zeros((), dtype=torch.long)).shape
        spec = _SiteSpec(
            layout.kind, tuple(shape[1:] if layout.kind == LOCAL else shape), value.dtype
        )
        if self._specs and self._specs.get(name) != spec:
            raise ValueError(
                f"JSA's chains hold the latent sites {self._describe(self._specs)}, but this "
                f"step's guide has site '{name}' as {self._describe({name: spec})}. The chains "
                "need the same latent sites, shapes and dtypes at every step; call "
                "jsa.reset() to start new chains."
            )
        return spec

    @staticmethod
    def _describe(specs: dict[str, _SiteSpec]) -> str:
        return str({n: (s.kind, s.shape, str(s.dtype)) for n, s in sorted(specs.items())})

    def _indices(self, subsamples: dict[str, torch.Tensor]) -> torch.Tensor:
        frame = self._prototype["frame"]
        indices = subsamples.get(frame.name)
        if indices is None:
            raise ValueError(f"data plate '{frame.name}' was not entered by the guide or model")
        indices = torch.as_tensor(indices).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_data):
            raise ValueError(
                f"subsample indices of data plate '{frame.name}' must lie in "
                f"[0, {self.num_data}), actual range [{int(indices.min())}, {int(indices.max())}]"
            )
        return indices

    # cache layout <-> vectorized ("slots") layout

    def _to_slots(self, value: torch.Tensor, layout: _Layout, full_dim: int) -> torch.Tensor:
        """A cached value (``(B,) + shape`` local, ``shape`` global) as slot 0 of a vectorized
        value with ``full_dim`` dims."""
        if layout.kind == LOCAL:
            value = value.movedim(0, layout.data_pos)
        return value.reshape((1,) * (full_dim - value.dim()) + value.shape)

    def _from_slots(self, value: torch.Tensor, layout: _Layout, slot: torch.Tensor) -> torch.Tensor:
        """The values at ``slot`` (per data point ``(B,)`` local, a scalar global) in cache
        layout."""
        drop = self.max_plate_nesting - layout.depth
        if any(d != 1 for d in value.shape[1 : 1 + drop]):
            raise ValueError(
                f"a latent site has shape {tuple(value.shape)}: batch dims outside its plates "
                "must have size 1; declare them with pyro.plate or .to_event(...)."
            )
        value = value.reshape((value.shape[0], *value.shape[1 + drop :]))
        if layout.kind == LOCAL:
            value = value.movedim(1 + layout.data_pos, 1)
            return value[slot, torch.arange(value.shape[1], device=value.device)]
        return value[slot]

    # ------------------------------------------------------------------------------------------
    # One step

    def _run(self, model, guide, args, kwargs, context: _Context, block: str, slots: int):
        plate = pyro.plate(PARTICLE_PLATE, slots, dim=-self.max_plate_nesting - 1)
        guide_trace = poutine.trace(_ChainMessenger(context, block)(plate(guide))).get_trace(
            *args, **kwargs
        )
        model_trace = poutine.trace(
            _ChainMessenger(context, None)(poutine.replay(plate(model), trace=guide_trace))
        ).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def _step(self, model, guide, args, kwargs, grad: bool) -> _Step:
        if self._prototype is None:
            self._prototype = self._discover(model, guide, args, kwargs)
        validate = is_validation_enabled() and (self.validation == "always" or not self._specs)
        with pyro.validation_enabled(validate):
            return self._moves(model, guide, args, kwargs, grad, validate)

    def _moves(self, model, guide, args, kwargs, grad: bool, validate: bool) -> _Step:
        slots = 1 + self.num_particles
        blocks = self._prototype["blocks"]
        context = _Context(self)
        history, rates = [], {b: [] for b in blocks}
        specs = loss = None
        for move in range(self.num_moves):
            for i, block in enumerate(blocks):
                last = move == self.num_moves - 1 and i == len(blocks) - 1
                with torch.set_grad_enabled(grad and last):
                    model_trace, guide_trace = self._run(
                        model, guide, args, kwargs, context, block, slots
                    )
                    if specs is None:
                        specs = self._check_structure(model_trace, guide_trace, validate)
                    loss = self._transition(
                        model_trace, guide_trace, context, block, slots, last, history, rates
                    )
        step = _Step(
            loss,
            context.indices,
            context.values,
            specs,
            {b: sum(r) / len(r) for b, r in rates.items()},
            history,
            (model_trace, guide_trace),
        )
        return step

    def _check_structure(self, model_trace: Trace, guide_trace: Trace, validate: bool) -> dict:
        """After the first run of a step: the model/guide match and the chains' site specs."""
        _check_sites(_sample_sites(model_trace), _sample_sites(guide_trace))
        if validate:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting + 1)
        specs = {}
        for name, site in _latent_sites(guide_trace).items():
            if _is_delta(site["fn"]) and site["value"].requires_grad:
                raise ValueError(_delta_message(name))
            specs[name] = self._spec(name, self._layout(name, site), site["value"])
        if self._specs and set(specs) != set(self._specs):
            raise ValueError(
                f"JSA's chains hold the latent sites {sorted(self._specs)}, but this step's "
                f"guide has {sorted(specs)}. The chains need the same latent sites at every "
                "step; call jsa.reset() to start new chains."
            )
        return specs

    def _terms(self, model_trace: Trace, guide_trace: Trace, slots: int, block: str):
        """Per-slot log-densities of model (``"p"``) and guide (``"q"``): ``(local, global)``
        with local ``(slots, B)`` (subsample scale divided out) and global ``(slots,)``."""
        scale = self._data_scale(guide_trace, model_trace)
        terms = {}
        for role, trace in (("p", model_trace), ("q", guide_trace)):
            local = global_ = None
            for name, site in _sample_sites(trace).items():
                layout = self._layout(name, site)
                try:
                    log_p = site_log_prob(site, scale if layout.kind == LOCAL else 1.0)
                except (ValueError, NotImplementedError) as error:
                    if role == "p":
                        raise
                    raise ValueError(
                        f"JSA: the guide cannot score its site '{name}' "
                        f"({type(site['fn']).__name__}) at the chains' values: {error}. JSA "
                        "needs a guide density at every value the guide can propose (a fixed "
                        "support, and log_prob implemented)."
                    ) from error
                log_p = self._reduce(log_p, layout, slots)
                if role == "q" and layout.kind == block and not _is_delta(site["fn"]):
                    self._check_scored(name, log_p[0])
                if layout.kind == LOCAL:
                    local = log_p if local is None else local + log_p
                else:
                    global_ = log_p if global_ is None else global_ + log_p
            terms[role] = (local, global_)
        return terms, scale

    def _data_scale(self, *traces: Trace) -> float:
        """The subsample scale ``N / B`` of the data plate in this run."""
        frame = self._prototype["frame"]
        if frame is None:
            return 1.0
        for trace in traces:
            for site in _sample_sites(trace).values():
                for f in site["cond_indep_stack"]:
                    if f.name == frame.name and f.full_size is not None:
                        return f.full_size / f.size
        return 1.0

    def _check_scored(self, name: str, log_q: torch.Tensor) -> None:
        bad = ~torch.isfinite(log_q.detach())
        if bool(bad.any()):
            raise ValueError(
                f"JSA: the guide gives log q = {log_q.detach()[bad].reshape(-1)[0].item()} to "
                f"the chains' current value of site '{name}' ({int(bad.sum())} chain(s)): the "
                "guide cannot score the chains' states. JSA needs a guide whose support does "
                "not shrink while it trains (e.g. no learned bounds) and whose density is "
                "finite at every value it proposed."
            )

    def _reduce(self, log_p: torch.Tensor, layout: _Layout, slots: int) -> torch.Tensor:
        ndim = self.max_plate_nesting + 1
        if log_p.dim() < ndim:
            log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + log_p.shape)
        log_p = log_p.expand((slots, *log_p.shape[1:]))
        if layout.kind == LOCAL:
            log_p = log_p.movedim(self._prototype["frame"].dim, 1)
            return log_p.reshape(*log_p.shape[:2], -1).sum(-1)
        return log_p.reshape(slots, -1).sum(-1)

    def _transition(self, model_trace, guide_trace, context, block, slots, last, history, rates):
        """Metropolis transitions of ``block`` from a run's per-slot log-densities; moves
        ``context`` to the final states and returns the surrogate loss at the visited states
        (``None`` unless ``last``)."""
        terms, scale = self._terms(model_trace, guide_trace, slots, block)
        (p_local, p_global), (q_local, q_global) = terms["p"], terms["q"]
        if block == LOCAL:
            log_w = p_local.detach() - (0.0 if q_local is None else q_local.detach())
        else:
            log_w = 0.0
            if p_global is not None:
                log_w = log_w + p_global.detach()
            if q_global is not None:
                log_w = log_w - q_global.detach()
            if p_local is not None:
                log_w = log_w + scale * p_local.detach().sum(-1)
        batch_shape = log_w.shape[1:]
        device = log_w.device
        start = mis.init(torch.zeros(batch_shape, dtype=torch.long, device=device), log_w[0])
        positions = torch.arange(1, slots, device=device)
        positions = positions.reshape((-1,) + (1,) * len(batch_shape)).expand(log_w[1:].shape)
        final, info = mis.step_many(start, mis.MISState(positions, log_w[1:]))
        rates[block].append(float(info.acceptance_rate.float().mean()))
        # the state after transition k is the last proposal accepted up to k (0: the start)
        visited = torch.where(info.is_accepted, positions, 0).cummax(dim=0).values
        sites = _latent_sites(guide_trace)
        for name, site in sites.items():
            layout = self._layout(name, site)
            if block == LOCAL and layout.kind == GLOBAL:
                slot = torch.zeros((), dtype=torch.long, device=device)
            else:
                slot = final.position
            context.values[name] = self._from_slots(site["value"], layout, slot).detach()
            context.initialized[name] = (
                torch.ones(len(context.indices), dtype=torch.bool, device=device)
                if layout.kind == LOCAL
                else True
            )
        if block == GLOBAL and self.record_history:
            history.append(
                {
                    name: self._from_slots(site["value"], layout, visited).detach().cpu()
                    for name, site in sites.items()
                    if (layout := self._layout(name, site)).kind == GLOBAL
                }
            )
        if not last:
            return None
        if self.average_visited:
            weights = torch.nn.functional.one_hot(visited, slots).to(log_w.dtype).mean(0)
        else:
            weights = torch.nn.functional.one_hot(final.position, slots).to(log_w.dtype)
        weights = weights.movedim(-1, 0)  # (slots,) + batch_shape
        local = _add(p_local, q_local)
        glob = _add(p_global, q_global)
        if block == LOCAL:
            value = scale * (weights * local).sum()
            if glob is not None:
                value = value + glob[0]
        else:
            per_slot = torch.zeros(slots, dtype=log_w.dtype, device=device)
            if glob is not None:
                per_slot = per_slot + glob
            if local is not None:
                per_slot = per_slot + scale * local.sum(-1)
            value = (weights * per_slot).sum()
        return -value

    def _checked(self, step: _Step) -> float:
        model_trace, guide_trace = step.traces
        return checked_value(
            step.loss.detach(),
            "JSA",
            traces={"model": model_trace, "guide": guide_trace},
            check_finite=self.check_finite,
        )

    @torch.no_grad()
    def _commit(self, step: _Step) -> None:
        if not self._specs:
            self._specs = dict(step.specs)
        for name, value in step.values.items():
            spec = self._specs[name]
            if name not in self._buffer_names:
                buf_name = f"cache_{len(self._buffer_names)}"
                shape = (self.num_data, *spec.shape) if spec.kind == LOCAL else spec.shape
                self.register_buffer(
                    buf_name, torch.zeros(shape, dtype=spec.dtype, device=value.device)
                )
                self._buffer_names[name] = buf_name
            buf = getattr(self, self._buffer_names[name])
            if spec.kind == LOCAL:
                buf[step.indices.to(buf.device)] = value.to(buf)
            else:
                buf.copy_(value)
        if step.indices is not None and any(s.kind == LOCAL for s in self._specs.values()):
            self.initialized[step.indices.to(self.initialized.device)] = True
        if any(s.kind == GLOBAL for s in self._specs.values()):
            self.global_initialized.fill_(True)
        self.num_steps += 1
        for i, block in enumerate(_BLOCKS):
            if block in step.rates:
                rate = step.rates[block]
                self._last_acceptance[i] = rate
                self._acceptance[i] = ACCEPTANCE_DECAY * self._acceptance[i] + rate
                self._acceptance_norm[i] = ACCEPTANCE_DECAY * self._acceptance_norm[i] + 1.0
        self._history.extend(step.history)

    # the inner-training convention (pyro_fdiv.inference.inner.InnerTraining); .to() is
    # nn.Module's and moves the chains
    def inner_parameters(self) -> list[torch.Tensor]:
        """None: SVI's optimizer steps the guide (through the surrogate loss) and the model;
        the chains are buffers."""
        return []

    def step_inner(self, model, guide, *args, **kwargs) -> None:
        """No inner updates: each step's chain moves belong to :meth:`loss_and_grads`."""
        return None


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
