r"""Joint stochastic approximation: model and guide trained at the states of persistent
Metropolis independence chains that use the guide as their proposal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict, cast

import pyro
import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace
from torch.utils import _pytree

from pyro_fdiv.inference import mis
from pyro_fdiv.inference.chains import (
    BLOCKS,
    GLOBAL,
    LOCAL,
    ChainMessenger,
    ChainStore,
    ChainUpdate,
    ChainView,
    Layout,
    SiteSpec,
    from_slots,
    is_delta,
    site_layout,
)
from pyro_fdiv.inference.compiled import Compilable
from pyro_fdiv.inference.importance import (
    LogWeights,
    SiteError,
    check_flag,
    checked_value,
    guess_max_plate_nesting,
    importance_trace,
    sample_sites,
    vectorized_frames,
)
from pyro_fdiv.util import check_integer, check_num_particles, rng_preserved

__all__ = ["JSA"]


class _Prototype(TypedDict):
    """What :meth:`JSA._discover` derives from the model and guide."""

    frame: CondIndepStackFrame | None  # the data plate (None: global chains only)
    blocks: tuple[str, ...]  # the blocks of chains the guide has, from BLOCKS


def _in_plate(site: dict, name: str) -> bool:
    # by name: a frame also records the (sub)sample size, which may change between steps
    return any(f.name == name for f in vectorized_frames(site))


def _delta_message(name: str) -> str:
    return (
        f"JSA: guide site '{name}' is a Delta whose value depends on parameters; the guide "
        "cannot score the chains' states. Use a guide with a density (e.g. AutoNormal, "
        "AutoMultivariateNormal, an amortized distribution); Delta sites may only be "
        "functions of other guide samples."
    )


def _latent_sites(trace: Trace) -> dict[str, dict]:
    return {name: site for name, site in sample_sites(trace).items() if not site["is_observed"]}


class JSA(ELBO, ChainStore, Compilable):
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
    ``average_visited=False``: the final state only). Each pass is one
    :func:`~pyro_fdiv.inference.importance.importance_trace` with the data plate kept and a
    messenger setting the guide's values to the chains' states and the proposals.

    **State.** The cache, the initialization flags and the counters are buffers of this
    :class:`torch.nn.Module` (:class:`~pyro_fdiv.inference.chains.ChainStore`:
    ``state_dict``/``load_state_dict`` round-trip them exactly and ``.to(device)`` moves them),
    never in Pyro's param store. A chain starts from a draw of the
    guide the first time its data point is visited (and at every step during the first
    ``warmup_without_cache`` steps). :meth:`loss` and :meth:`differentiable_loss` never change
    the state; :meth:`loss_and_grads` writes the accepted states back after the backward pass,
    and :meth:`commit` does so for the last :meth:`differentiable_loss` (for plain PyTorch
    loops); :meth:`advance` moves the chains with :math:`\theta, \phi` fixed (a posterior
    sampler). :meth:`samples` returns the cached states, :meth:`history` the global chain's
    recorded states (``record_history=True``), :attr:`acceptance_rate` a running average of the
    acceptance probability per block.

    **Compiled** (``compile=True``; :func:`~pyro_fdiv.inference.make_step` turns it on): once
    the chains exist (after the first step), a step's moves, Metropolis transitions and
    gradient are one compiled program (:mod:`pyro_fdiv.inference.compiled`) whose inputs are
    the parameters, the arguments and the chains' buffers, and whose outputs are the loss, the
    gradients and the accepted states, written to the cache after it as in the eager step. It
    draws what the eager step draws after the same seed (Bernoulli latents included), so both
    paths take the same steps. One program per phase (``warmup_without_cache`` and after).

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
    :param bool compile: run :meth:`loss_and_grads` as a compiled program (see above).
    :param dict compile_options: keyword arguments of ``torch.compile``.

    **References**

    [1] H. Xu, Z. Ou. *Joint stochastic approximation learning of Helmholtz machines*. ICLR
    2016 workshop.

    [2] Z. Ou, Y. Song. *Joint stochastic approximation and its application to learning
    discrete latent variable models*. UAI 2020.

    [3] Z. Ou. *A review of learning with deep generative models from perspective of graphical
    modeling*. arXiv:1808.01630, section 3.2.3.
    """

    # Pyro's ELBO attributes, declared for the type checker (nn.Module's __getattr__ would
    # type them as Tensor | Module); max_plate_nesting is float("inf") until guessed
    num_particles: int
    max_plate_nesting: float

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
        compile: bool = False,
        compile_options: dict | None = None,
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
        ChainStore.__init__(self, num_data, {"num_data": num_data, "data_plate": data_plate})
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
        self._given_max_plate_nesting = max_plate_nesting
        self._prototype: _Prototype | None = None  # data plate frame and blocks (derived)
        self._init_compile(compile, compile_options)
        self._update: ChainUpdate | None = None  # the last eager step's, written after it
        self._phase_now: tuple[bool, bool] = (False, False)  # of the next compiled step
        self._aux_spec: _pytree.TreeSpec | None = None  # a compiled step's outputs' structure

    # ------------------------------------------------------------------------------------------
    # Pyro's ELBO interface

    @torch.no_grad()
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: the surrogate loss at the states one step would accept (the chains are not
            changed).
        :rtype: float
        """
        step = self._step(model, guide, args, kwargs, grad=False)
        return self._checked(step)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
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

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        Move the chains, back-propagate the surrogate loss at the accepted states into every
        parameter, then write the accepted states to the cache.

        :raises ValueError: naming the sites involved if the loss is not finite (with
            ``check_finite``).
        """
        self._update = None
        value, _ = self._grads(model, guide, args, kwargs)
        update, self._update = self._update, None
        self.write(update if update is not None else self._compiled_update(value))
        return value

    def commit(self) -> None:
        """Write the accepted states of the last :meth:`differentiable_loss` to the chains."""
        if self._pending is None:
            raise ValueError("nothing to commit: call differentiable_loss(...) first")
        step, self._pending = self._pending, None
        self.write(step)

    @torch.no_grad()
    def advance(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> dict[str, float]:
        r"""
        One step of the chains with :math:`\theta, \phi` fixed and no gradient: with this the
        chains are a posterior sampler. Returns the step's mean acceptance rate per block.
        """
        step = self._step(model, guide, args, kwargs, grad=False)
        self.write(step)
        return {block: float(rate) for block, rate in step.rates.items()}

    def _get_trace(self, model, guide, args, kwargs):
        """The model and guide traces of the last run of one step (Pyro's ``ELBO``
        interface): every latent site has ``1 + num_particles`` slots in an outer plate, the
        chains' current values in slot 0."""
        with torch.no_grad():
            return self._step(model, guide, args, kwargs, grad=False).traces

    # ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every chain, the counters and the history, and what was derived from the
        model and guide (the data plate, the blocks and a guessed ``max_plate_nesting``): the
        next step starts as a freshly constructed JSA with the same settings would."""
        ChainStore.reset(self)
        self._prototype = None
        self.max_plate_nesting = self._given_max_plate_nesting

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, num_moves={self.num_moves}, "
            f"num_particles={self.num_particles}, "
            f"warmup_without_cache={self.warmup_without_cache}"
        )

    # ------------------------------------------------------------------------------------------
    # Structure: data plate, blocks, site layouts

    def _discover(self, model, guide, args, kwargs) -> _Prototype:
        """Run model and guide once (random state restored) to find the plates and blocks."""
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        with rng_preserved(), poutine.block():
            weights = importance_trace(
                model,
                guide,
                args,
                kwargs,
                num_particles=1,
                max_plate_nesting=cast(int, self.max_plate_nesting),  # guessed above
                keep_plates=(),
                guide_density=False,
            )
        model_trace, guide_trace = weights.model_trace, weights.guide_trace
        sites = [s for t in (model_trace, guide_trace) for s in sample_sites(t).values()]
        frames = {f.name: f for s in sites for f in vectorized_frames(s)}
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
        latent = _latent_sites(guide_trace)
        kinds = {
            LOCAL if frame is not None and _in_plate(site, frame.name) else GLOBAL
            for site in latent.values()
            if not is_delta(site["fn"])
        }
        blocks = tuple(b for b in BLOCKS if b in kinds)
        deltas = [n for n, site in latent.items() if is_delta(site["fn"])]
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
        observed = [s for s in sample_sites(model_trace).values() if s["is_observed"]]
        if observed:
            for candidate in vectorized_frames(observed[0]):  # outermost first
                if all(_in_plate(site, candidate.name) for site in observed):
                    return candidate
        raise ValueError(
            f"JSA(num_data={self.num_data}) needs a data plate, but no vectorized plate "
            "encloses every observed site of the model. Put the observations in a "
            "pyro.plate of that size, or name it with data_plate=."
        )

    def _layout(self, name: str, site: dict, value: torch.Tensor | None = None) -> Layout:
        assert self._prototype is not None  # set by _step
        mpn = cast(int, self.max_plate_nesting)  # guessed by _discover
        return site_layout(name, site, self._prototype["frame"], mpn, value)

    # ------------------------------------------------------------------------------------------
    # One step

    def _run(self, model, guide, args, kwargs, view: ChainView, block: str, slots: int):
        """One vectorized pass: the guide at the chains' states (slot 0) and ``slots - 1``
        proposals, the model replaying it, the data plate kept."""
        assert self._prototype is not None  # set by _step
        frame = self._prototype["frame"]
        mpn = cast(int, self.max_plate_nesting)  # guessed by _discover
        try:
            return importance_trace(
                model,
                guide,
                args,
                kwargs,
                num_particles=slots,
                max_plate_nesting=mpn,
                keep_plates=() if frame is None else (frame.name,),
                guide_handler=ChainMessenger(view, block, mpn),
                model_handler=ChainMessenger(view, None, mpn),
            )
        except SiteError as error:
            if error.kind != "guide":
                raise
            raise ValueError(
                f"JSA: the guide cannot score its site '{error.name}' "
                f"({error.fn_name}) at the chains' values: {error}. JSA "
                "needs a guide density at every value the guide can propose (a fixed "
                "support, and log_prob implemented)."
            ) from error.__cause__

    def _step(self, model, guide, args, kwargs, grad: bool, traced: bool = False) -> ChainUpdate:
        """One step's moves, not written. ``traced``: the step a compiled program captures,
        which reads no value (its settings come from :meth:`_program_key`)."""
        if self._prototype is None:
            self._prototype = self._discover(model, guide, args, kwargs)
        validate = is_validation_enabled() and (self.validation == "always" or not self._specs)
        settings = self._phase_now if traced else self._phase()
        view = ChainView(self, self._prototype["frame"], *settings, traced=traced)
        with pyro.validation_enabled(validate):
            return self._moves(model, guide, args, kwargs, grad, view)

    def _phase(self) -> tuple[bool, bool]:
        """Whether the next step restarts the chains (``warmup_without_cache``), and whether
        the global chain continues from its state."""
        warm = int(self.num_steps) < self.warmup_without_cache
        return warm, bool(self.global_initialized) and not warm

    def _moves(self, model, guide, args, kwargs, grad: bool, view: ChainView) -> ChainUpdate:
        assert self._prototype is not None  # set by _step
        slots = 1 + self.num_particles
        blocks = self._prototype["blocks"]
        history: list[dict[str, torch.Tensor]] = []
        rates: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
        specs: dict[str, SiteSpec] | None = None
        loss: torch.Tensor | None = None
        for move in range(self.num_moves):
            for i, block in enumerate(blocks):
                last = move == self.num_moves - 1 and i == len(blocks) - 1
                with torch.set_grad_enabled(grad and last):
                    weights = self._run(model, guide, args, kwargs, view, block, slots)
                    if specs is None:
                        specs = self._check_structure(weights.guide_trace)
                    loss = self._transition(weights, view, block, slots, last, history, rates)
        # blocks is not empty (_discover), and the last transition returns the loss
        assert specs is not None and loss is not None
        return ChainUpdate(
            loss,
            view.indices,
            view.values,
            specs,
            {b: torch.stack(r).mean() for b, r in rates.items()},
            history,
            (weights.model_trace, weights.guide_trace),
        )

    def _check_structure(self, guide_trace: Trace) -> dict:
        """After the first run of a step: the chains' site specs."""
        specs = {}
        mpn = cast(int, self.max_plate_nesting)  # guessed by _discover
        for name, site in _latent_sites(guide_trace).items():
            if is_delta(site["fn"]) and site["value"].requires_grad:
                raise ValueError(_delta_message(name))
            layout = self._layout(name, site)
            specs[name] = self.spec(name, layout, site["value"], mpn)
        self.check_sites(specs)
        return specs

    def _terms(self, weights: LogWeights, slots: int, block: str, check: bool):
        """Per-slot log-densities of model (``"p"``) and guide (``"q"``): ``(local, global)``
        with local ``(slots, B)`` (subsample scale divided out) and global ``(slots,)``;
        ``check``: that the guide scores the chains' states."""
        terms = {}
        for role, trace, site_terms in (
            ("p", weights.model_trace, weights.model_terms),
            ("q", weights.guide_trace, weights.guide_terms),
        ):
            local = global_ = None
            sites = trace.nodes
            for name, log_p in site_terms.items():
                layout = self._layout(name, sites[name])
                log_p = log_p.expand((slots, *log_p.shape[1:]))
                if layout.kind == GLOBAL:
                    log_p = log_p.reshape(slots)
                scored = role == "q" and layout.kind == block and not is_delta(sites[name]["fn"])
                if check and scored:
                    self._check_scored(name, log_p[0])
                if layout.kind == LOCAL:
                    local = log_p if local is None else local + log_p
                else:
                    global_ = log_p if global_ is None else global_ + log_p
            terms[role] = (local, global_)
        return terms, weights.scale

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

    def _transition(self, weights: LogWeights, view, block, slots, last, history, rates):
        """Metropolis transitions of ``block`` from a run's per-slot log-densities; moves
        ``view`` to the final states and returns the surrogate loss at the visited states
        (``None`` unless ``last``)."""
        terms, scale = self._terms(weights, slots, block, check=not view.traced)
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
        rates[block].append(info.acceptance_rate.mean())
        # the state after transition k is the last proposal accepted up to k (0: the start)
        visited = torch.where(info.is_accepted, positions, 0).cummax(dim=0).values
        sites = _latent_sites(weights.guide_trace)
        mpn = cast(int, self.max_plate_nesting)  # guessed by _discover
        for name, site in sites.items():
            layout = self._layout(name, site)
            if block == LOCAL and layout.kind == GLOBAL:
                slot = torch.zeros((), dtype=torch.long, device=device)
            else:
                slot = final.position
            view.values[name] = from_slots(site["value"], layout, slot, mpn).detach()
            view.initialized[name] = (
                torch.ones(len(view.indices), dtype=torch.bool, device=device)
                if layout.kind == LOCAL
                else True
            )
        if block == GLOBAL and self.record_history:
            history.append(
                {
                    name: from_slots(site["value"], layout, visited, mpn).detach()
                    for name, site in sites.items()
                    if (layout := self._layout(name, site)).kind == GLOBAL
                }
            )
        if not last:
            return None
        if self.average_visited:
            mix = torch.nn.functional.one_hot(visited, slots).to(log_w.dtype).mean(0)
        else:
            mix = torch.nn.functional.one_hot(final.position, slots).to(log_w.dtype)
        mix = mix.movedim(-1, 0)  # (slots,) + batch_shape
        local = _add(p_local, q_local)
        glob = _add(p_global, q_global)
        if block == LOCAL:
            assert local is not None  # the local block has local sites
            value = scale * (mix * local).sum()
            if glob is not None:
                value = value + glob[0]
        else:
            per_slot = torch.zeros(slots, dtype=log_w.dtype, device=device)
            if glob is not None:
                per_slot = per_slot + glob
            if local is not None:
                per_slot = per_slot + scale * local.sum(-1)
            value = (mix * per_slot).sum()
        return -value

    def _checked(self, step: ChainUpdate) -> float:
        model_trace, guide_trace = step.traces
        return checked_value(
            step.loss.detach(),
            "JSA",
            traces={"model": model_trace, "guide": guide_trace},
            check_finite=self.check_finite,
        )

    # the compiled path's protocol (pyro_fdiv.inference.compiled.Compilable): one part, whose
    # program also returns the accepted states, written by loss_and_grads
    def _eager_grads(self, model, guide, args, kwargs, part=""):
        step = self._step(model, guide, args, kwargs, grad=True)
        value = self._checked(step)
        if step.loss.requires_grad:
            step.loss.backward(retain_graph=self.retain_graph)
        self._update = step
        return value, None

    def _traced_loss(self, model, guide, args, kwargs, part=""):
        step = self._step(model, guide, args, kwargs, grad=True, traced=True)
        indices = () if step.indices is None else (step.indices,)  # no data plate: none
        written = (indices, step.values, step.rates, step.history)
        leaves, self._aux_spec = _pytree.tree_flatten(written)
        return step.loss, None, tuple(leaves)

    def _compiled_update(self, value: float) -> ChainUpdate:
        """The accepted states of the compiled step that just ran (its auxiliary outputs)."""
        assert self._compiled is not None and self._compiled.aux is not None
        assert self._aux_spec is not None  # set when the program was traced
        indices, values, rates, history = _pytree.tree_unflatten(
            list(self._compiled.aux), self._aux_spec
        )
        index = indices[0] if indices else None
        return ChainUpdate(torch.tensor(value), index, values, self._specs, rates, history)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_update"] = None
        state["_aux_spec"] = None  # the compiled programs' (which are not pickled)
        return state

    def _program_key(self, part: str) -> tuple | None:
        if not self._specs:  # the first write creates the chains: until then, eager
            return None
        self._phase_now = self._phase()
        return (*self._phase_now, tuple(self._buffer_names.items()))

    def _program_modules(self) -> list[torch.nn.Module]:
        return [self]  # the chains: read afresh on every call

    def _raise_non_finite(self, value, model, guide, args, kwargs, part="") -> None:
        self.loss(model, guide, *args, **kwargs)  # the same draw, eagerly: names the sites
        raise ValueError(
            f"JSA: the compiled loss is {value}, but the same draw's loss is finite eagerly: "
            "the compiled program's arithmetic overflowed. Run with compile=False, or in float64."
        )

    # the inner-training convention (pyro_fdiv.inference.inner.InnerTraining); .to() is
    # nn.Module's and moves the chains
    def inner_parameters(self) -> list[torch.Tensor]:
        """None: SVI's optimizer steps the guide (through the surrogate loss) and the model;
        the chains are buffers."""
        return []

    def step_inner(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> None:
        """No inner updates: each step's chain moves belong to :meth:`loss_and_grads`."""
        return None


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
