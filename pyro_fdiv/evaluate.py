r"""
Test log-likelihood of a latent-variable model by importance sampling.

For each data point :math:`x_n` and a proposal :math:`q(z \mid x_n)` (the guide),

.. math::

    \log \hat p(x_n) = \log \frac{1}{S} \sum_{s=1}^{S}
        \frac{p_\theta(x_n, z_s)}{q(z_s \mid x_n)}, \qquad z_s \sim q(z \mid x_n),

the IWAE bound with :math:`K = S` (Burda et al. 2016, section 5: :math:`S = 5000`). It is a
stochastic lower bound, :math:`\mathbb{E} \log \hat p(x_n) \le \log p_\theta(x_n)`, whose gap
shrinks as :math:`S` grows (and vanishes when :math:`q` is the exact posterior).

The :math:`S` samples are drawn in chunks of particles and the data in batches, combined with a
streaming ``logsumexp``, so memory is bounded by ``batch_size × particle_chunk`` model
evaluations whatever :math:`S` and the data size. No gradients are kept.

**Annealed importance sampling** (:func:`ais_log_likelihood`; Neal [1], the decoder-based
evaluation of Wu et al. [2]) replaces the single proposal by a path of intermediate targets
from an initial density :math:`q_0` (the prior :math:`p(z)`, or a guide) to the posterior,

.. math::

    f_t(z) = q_0(z)^{1 - \beta_t}\, p_\theta(x_n, z)^{\beta_t}, \qquad
    0 = \beta_0 < \beta_1 < \dots < \beta_T = 1

(with the prior, :math:`f_t(z) = p(z)\, p_\theta(x_n \mid z)^{\beta_t}`). Each of :math:`M`
chains starts at :math:`z_0 \sim q_0`, moves by a Markov transition :math:`\mathcal{T}_t`
that leaves :math:`f_t` invariant (here one Hamiltonian Monte Carlo step: leapfrog plus
Metropolis, in the unconstrained space of :func:`torch.distributions.biject_to`), and collects

.. math::

    \log w^{(m)} = \sum_{t=1}^{T} (\beta_t - \beta_{t-1})
        \Big[\log p_\theta(x_n, z_{t-1}) - \log q_0(z_{t-1})\Big], \qquad
    z_t \sim \mathcal{T}_t(\cdot \mid z_{t-1}),

an unbiased estimate of :math:`p_\theta(x_n)`: :math:`\mathbb{E}\, w = p_\theta(x_n)`. The
estimate is :math:`\log \hat p(x_n) = \operatorname{logsumexp}_m \log w^{(m)} - \log M`,
again a stochastic lower bound on :math:`\log p_\theta(x_n)` (Jensen), but one that tends to
it as :math:`T \to \infty` even for a poor :math:`q_0`. With :math:`T = 1` it is importance
sampling with proposal :math:`q_0`, draw for draw.

**References**

1. R. M. Neal. *Annealed importance sampling*. Statistics and Computing 11(2), 125–139, 2001.
2. Y. Wu, Y. Burda, R. Salakhutdinov, R. Grosse. *On the quantitative analysis of
   decoder-based generative models*. ICLR 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform
from tqdm.auto import tqdm

from pyro_fdiv.inference.importance import (
    PARTICLE_PLATE,
    LogWeights,
    guess_max_plate_nesting,
    importance_trace,
    log_weights_from_traces,
    sample_sites,
)
from pyro_fdiv.util import check_flag, check_integer

__all__ = ["SCHEDULES", "AISResult", "ais_log_likelihood", "annealing_schedule", "log_likelihood"]


def _data_plate(
    weights: LogWeights, num_rows: int, name: str | None, caller: str = "log_likelihood"
) -> CondIndepStackFrame:
    """The plate over the data's rows: the one named ``name``, else the plate at the leading
    batch dim of an observed site holding the rows (a row's other dims are its event or inner
    plates), as JSA and the f-divergence bound find theirs; never one that only has the size."""
    frames = {
        f.name: f for s in sample_sites(weights.model_trace).values() for f in s["cond_indep_stack"]
    }
    if name is not None:
        if name not in frames or not frames[name].vectorized:
            raise ValueError(
                f"data_plate {name!r} is not a vectorized plate of the model; plates: "
                f"{sorted(n for n, f in frames.items() if f.vectorized)}"
            )
        return frames[name]
    for site in sample_sites(weights.model_trace).values():
        value = site["value"]
        if not site["is_observed"] or value.dim() <= site["fn"].event_dim:
            continue
        dim = site["fn"].event_dim - value.dim()  # the value's leading batch dim
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim == dim and value.shape[0] == num_rows:
                return frame
    raise ValueError(
        f"{caller} needs a plate over the data's first dimension (size {num_rows}) "
        "around an observed site whose leading batch dim holds the rows; none found. Observe "
        "the batch (obs=x) inside pyro.plate('data', len(x)), or name the plate with data_plate=."
    )


def _shared_data_plate(
    weights: LogWeights, num_rows: int, name: str | None, caller: str = "log_likelihood"
) -> str:
    """The data plate's name, checked to enclose every sample site (no global latents)."""
    frame = _data_plate(weights, num_rows, name, caller)
    if frame not in weights.plates:
        plates = [f"{f.name!r} (size {f.size})" for f in weights.plates]
        raise ValueError(
            f"{caller} needs the data plate {frame.name!r} (size {num_rows}) to enclose "
            f"every sample site; the shared plates are {plates or 'none'}. A latent outside it "
            "(a global latent) couples the data points, so there is no per-data-point "
            "likelihood: put the global latents in pyro.param, or estimate the joint "
            "log p(x_1..x_n) with batch_size=len(data) and a model without that plate."
        )
    return frame.name


def _rows(term: torch.Tensor, plates: tuple[CondIndepStackFrame, ...], name: str) -> torch.Tensor:
    """A ``(K,) + batch_shape`` term over the kept ``plates`` as ``(K, num_rows)``: the data
    plate ``name`` kept, other shared plates (e.g. pixels in a plate inside it) summed."""
    keep = 1 + [f.name for f in plates].index(name)
    others = [d for d in range(1, term.dim()) if d != keep]
    return term.sum(others) if others else term


def _per_data_point(weights: LogWeights, num_rows: int, name: str | None) -> torch.Tensor:
    """``(K, num_rows)`` log weights: the data plate kept, other shared plates summed."""
    return _rows(weights.log_w, weights.plates, _shared_data_plate(weights, num_rows, name))


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *args: Any,
    num_samples: int = 5000,
    batch_size: int = 100,
    particle_chunk: int | None = None,
    progress: bool = False,
    data_plate: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    r"""
    Importance-sampling estimate of :math:`\log p_\theta(x_n)` for every row of ``data``.

    ``model(x, *args, **kwargs)`` and ``guide(x, *args, **kwargs)`` are called on batches
    ``x = data[i : i + batch_size]`` without subsampling (no ``num_data``); every sample site
    must sit in the plates they share, as for :class:`~pyro_fdiv.inference.IWAE`, so there is one
    weight per data point and particle. The guide must have a density: for an implicit guide
    (AVB) pass a proposal with one, e.g. :meth:`pyro_fdiv.models.vae.VAE.gaussian_proposal`.

    :param model: the generative model.
    :param guide: the proposal :math:`q(z \mid x)`.
    :param torch.Tensor data: the data points, first dimension indexing them.
    :param int num_samples: importance samples :math:`S` per data point.
    :param int batch_size: data points per batch.
    :param int particle_chunk: particles per vectorized pass (default: as many as keep
        ``batch_size × particle_chunk ≤ 20,000``).
    :param bool progress: show a progress bar over the batches.
    :param str data_plate: the name of the plate over the data's rows; by default the plate at
        the leading batch dim of the observed site that holds the rows.
    :returns: a tensor of shape ``(len(data),)``.
    :raises ValueError: for bad sizes, an implicit guide (named by its site), or no plate over
        the data's first dimension shared by every site (global latents).
    """
    check_integer("num_samples", num_samples, 1)
    check_integer("batch_size", batch_size, 1)
    if particle_chunk is None:
        particle_chunk = max(1, 20_000 // batch_size)
    check_integer("particle_chunk", particle_chunk, 1)
    particle_chunk = min(particle_chunk, num_samples)
    max_plate_nesting = guess_max_plate_nesting(model, guide, (data[:batch_size], *args), kwargs)
    results = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="log-likelihood", disable=not progress, leave=False):
        batch_args = (data[start : start + batch_size], *args)
        total: torch.Tensor | None = None
        for done in range(0, num_samples, particle_chunk):
            size = min(particle_chunk, num_samples - done)
            weights = importance_trace(
                model,
                guide,
                batch_args,
                kwargs,
                num_particles=size,
                max_plate_nesting=max_plate_nesting,
            )
            log_w = _per_data_point(weights, len(batch_args[0]), data_plate)
            chunk = torch.logsumexp(log_w, dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        assert total is not None  # num_samples >= 1: the loop ran
        results.append(total - math.log(num_samples))
    return torch.cat(results)


#: The named annealing schedules of :func:`annealing_schedule`.
SCHEDULES = ("sigmoid", "geometric", "linear")

#: Step-size adaptation of Wu et al. [2] (their BDMC code): multiply by ``_STEP_UP`` after a
#: transition whose mean acceptance beats the target, by ``_STEP_DOWN`` otherwise, within
#: ``[_MIN_STEP, _MAX_STEP]``.
_STEP_UP, _STEP_DOWN, _MIN_STEP, _MAX_STEP = 1.02, 0.98, 1e-4, 0.5


def annealing_schedule(
    num_steps: int,
    kind: str = "sigmoid",
    *,
    delta: float = 4.0,
    beta_min: float = 1e-4,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""
    Inverse temperatures :math:`0 = \beta_0 < \beta_1 < \dots < \beta_T = 1`, ``T = num_steps``.

    - ``"sigmoid"`` (Grosse et al. 2015, Wu et al. 2017 [2]): :math:`\tilde\beta_t =
      \sigma(\delta (2t/T - 1))`, rescaled affinely so that :math:`\beta_0 = 0`,
      :math:`\beta_T = 1`; dense at both ends.
    - ``"geometric"``: :math:`\beta_t = \beta_{\min}^{1 - t/T}` for :math:`t \ge 1` (equal
      ratios, dense near 0, where the likelihood term changes the target most), :math:`\beta_0
      = 0`.
    - ``"linear"``: :math:`\beta_t = t / T`.

    :param int num_steps: the number :math:`T` of annealing steps (intermediate targets,
        counting the posterior).
    :param str kind: one of :data:`SCHEDULES`.
    :param float delta: the sigmoid schedule's steepness :math:`\delta > 0`.
    :param float beta_min: the geometric schedule's smallest scale, in :math:`(0, 1)`.
    :returns: a tensor of shape ``(num_steps + 1,)``.
    """
    check_integer("num_steps", num_steps, 1)
    if kind not in SCHEDULES:
        raise ValueError(f"Expected schedule in {SCHEDULES} or a tensor of betas, actual {kind!r}")
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    if kind == "sigmoid":
        if not delta > 0:
            raise ValueError(f"Expected delta > 0, actual {delta}")
        beta = torch.sigmoid(delta * (2 * t - 1))
        beta = (beta - beta[0]) / (beta[-1] - beta[0])
    elif kind == "geometric":
        if not 0 < beta_min < 1:
            raise ValueError(f"Expected beta_min in (0, 1), actual {beta_min}")
        beta = beta_min ** (1 - t)
        beta[0] = 0.0
    else:
        beta = t
    beta[0], beta[-1] = 0.0, 1.0  # exactly, whatever the rounding
    return beta.to(dtype or torch.get_default_dtype())


def _check_schedule(schedule: str | Sequence[float] | torch.Tensor, num_steps: int) -> torch.Tensor:
    if isinstance(schedule, str):
        return annealing_schedule(num_steps, schedule, dtype=torch.float64)
    beta = torch.as_tensor(schedule, dtype=torch.float64).detach().cpu()
    if beta.dim() != 1 or len(beta) != num_steps + 1:
        raise ValueError(
            f"Expected schedule to be a name in {SCHEDULES} or num_steps + 1 = {num_steps + 1} "
            f"inverse temperatures, actual shape {tuple(beta.shape)}; pass "
            "num_steps=len(schedule) - 1"
        )
    if beta[0] != 0 or beta[-1] != 1 or not (beta.diff() >= 0).all():
        raise ValueError(
            f"Expected schedule to increase from 0 to 1, actual {beta[0].item()} ... "
            f"{beta[-1].item()} (non-decreasing: {bool((beta.diff() >= 0).all())})"
        )
    return beta


class AISResult(NamedTuple):
    r"""
    What :func:`ais_log_likelihood` returns, one entry per data point (``N = len(data)``).

    :ivar torch.Tensor log_likelihood: :math:`\log \frac1M \sum_m w^{(m)}`, shape ``(N,)``.
    :ivar torch.Tensor stderr: its delta-method standard error
        :math:`\mathrm{sd}(w) / (\sqrt{M}\, \bar w)` from the spread of the chains' weights,
        ``(N,)`` (NaN with one chain). It measures the Monte Carlo error, not the bias of a
        too-short schedule (that shows as :attr:`log_weights` far below the estimate).
    :ivar torch.Tensor acceptance: the mean Metropolis acceptance probability over chains and
        transitions, ``(N,)`` (NaN when ``num_steps=1``: no transition).
    :ivar torch.Tensor step_size: the leapfrog step size each data point's chains ended with,
        ``(N,)``.
    :ivar torch.Tensor log_weights: the chains' :math:`\log w^{(m)}`, ``(num_chains, N)``; their
        mean is a lower bound on :math:`\log p(x_n)` in expectation (the AIS analogue of the
        ELBO), which tightens as the schedule lengthens.
    """

    log_likelihood: torch.Tensor
    stderr: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor
    log_weights: torch.Tensor


class _Latent(NamedTuple):
    """A latent site in unconstrained coordinates: ``z = transform(u)``; ``u`` has ``event_dim``
    event dims and the chains and data points at ``chain_dim`` and ``row_dim``."""

    name: str
    transform: Transform
    event_dim: int
    chain_dim: int
    row_dim: int


class _State(NamedTuple):
    r"""The chains at one point: unconstrained values, :math:`\log q_0` (with the Jacobian) and
    :math:`\Delta = \log p(x, z) - \log q_0(z)` per chain and data point ``(M, N)``, and the
    gradients of both with respect to each latent's ``u``."""

    u: tuple[torch.Tensor, ...]
    log_q0: torch.Tensor
    delta: torch.Tensor
    grad_q0: tuple[torch.Tensor, ...]
    grad_delta: tuple[torch.Tensor, ...]


def _at(values: Mapping[str, torch.Tensor]) -> Trace:
    """A trace to replay: the latent sites at ``values``."""
    trace = Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", name=name, value=value, is_observed=False, infer={})
    return trace


def _is_identity(transform: Transform) -> bool:
    """``biject_to`` of a real support: the empty composition, possibly made independent."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _latent_part(model_trace: Trace) -> Trace:
    """The model's latent sites as a guide trace: the prior as proposal."""
    trace = model_trace.copy()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            del trace.nodes[name]
    return trace


class _Annealed:
    r"""The annealing path of one batch: evaluates :class:`_State` at unconstrained values,
    all chains and data points in one model (and guide) run."""

    def __init__(
        self,
        model: Callable,
        guide: Callable | None,
        args: tuple,
        kwargs: dict,
        num_chains: int,
        max_plate_nesting: int,
        data_plate: str | None,
    ) -> None:
        plate = pyro.plate(PARTICLE_PLATE, num_chains, dim=-max_plate_nesting - 1)
        self.model, self.guide = plate(model), None if guide is None else plate(guide)
        self.args, self.kwargs = args, kwargs
        self.max_plate_nesting, self.num_chains = max_plate_nesting, num_chains
        self.num_rows = len(args[0])
        self.data_plate_arg = data_plate

    def initial(self) -> _State:
        r"""Draw :math:`z_0 \sim q_0` for every chain and data point and fix the latents'
        coordinates (checked: continuous, every one in the data plate)."""
        if self.guide is None:
            model_trace = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
            guide_trace = _latent_part(model_trace)
        else:
            guide_trace = poutine.trace(self.guide).get_trace(*self.args, **self.kwargs)
            replayed = poutine.replay(self.model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(*self.args, **self.kwargs)
        latents = {n: s for n, s in sample_sites(model_trace).items() if not s["is_observed"]}
        for name, site in sample_sites(guide_trace).items():
            if name not in latents or site["infer"].get("is_auxiliary"):
                raise ValueError(
                    f"initial guide site '{name}' is not a latent site of the model: AIS "
                    "starts from q0(z) and needs its density at any z, over the model's latents "
                    "only. Pass an explicit guide over the same sites (for an implicit encoder, "
                    "VAE.gaussian_proposal()), or initial='prior'."
                )
            if site["infer"].get("implicit"):
                raise ValueError(
                    f"initial guide site '{name}' is implicit (no density); AIS needs "
                    "log q0(z) at any z: use an explicit proposal (VAE.gaussian_proposal()) or "
                    "initial='prior'."
                )
        if not latents:
            raise ValueError(
                "ais_log_likelihood found no latent sample site in the model: there is nothing "
                "to anneal, and log p(x) is the observed sites' log-density."
            )
        for name, site in latents.items():
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"ais_log_likelihood needs continuous latents, but model site '{name}' "
                    f"({type(site['fn']).__name__}) is discrete: HMC moves by gradients. "
                    "Estimate log p(x) with log_likelihood (importance sampling), or sum the "
                    "site out (enumeration) in the model."
                )
            if name not in guide_trace.nodes:
                raise ValueError(
                    f"Model sample site '{name}' is neither observed nor sampled by the initial "
                    f"guide: add a site named '{name}' to the guide, or use initial='prior'."
                )
        weights = log_weights_from_traces(model_trace, guide_trace, self.max_plate_nesting)
        self.data_plate = _shared_data_plate(
            weights, self.num_rows, self.data_plate_arg, "ais_log_likelihood"
        )
        frame = next(f for f in weights.plates if f.name == self.data_plate)
        self.latents = []
        values = []
        for name, site in latents.items():
            transform = biject_to(site["fn"].support)
            u = transform.inv(site["value"]).detach()
            batch_dims = u.dim() - transform.domain.event_dim
            latent = _Latent(
                name,
                transform,
                transform.domain.event_dim,
                batch_dims - self.max_plate_nesting - 1,
                batch_dims + frame.dim,
            )
            if u.shape[latent.chain_dim] != self.num_chains or (
                u.shape[latent.row_dim] != self.num_rows
            ):
                raise ValueError(
                    f"model site '{name}' has shape {tuple(site['value'].shape)}: expected "
                    f"{self.num_chains} chains at dim {latent.chain_dim} and {self.num_rows} "
                    f"data points at dim {latent.row_dim} (its value must fill its plates)"
                )
            self.latents.append(latent)
            values.append(u)
        return self(tuple(values))

    def __call__(self, u: tuple[torch.Tensor, ...]) -> _State:
        u = tuple(value.detach().requires_grad_() for value in u)
        with torch.enable_grad(), pyro.validation_enabled(False):
            z = {lat.name: lat.transform(value) for lat, value in zip(self.latents, u, strict=True)}
            replayed = poutine.replay(self.model, trace=_at(z))
            model_trace = poutine.trace(replayed).get_trace(*self.args, **self.kwargs)
            if self.guide is None:
                guide_trace = _latent_part(model_trace)
            else:
                replayed = poutine.replay(self.guide, trace=_at(z))
                guide_trace = poutine.trace(replayed).get_trace(*self.args, **self.kwargs)
            weights = log_weights_from_traces(model_trace, guide_trace, self.max_plate_nesting)
            log_q0 = sum(weights.guide_terms.values(), torch.zeros_like(weights.log_w))
            for lat, value in zip(self.latents, u, strict=True):
                if _is_identity(lat.transform):
                    continue  # real support: no Jacobian
                site = model_trace.nodes[lat.name]
                log_det = lat.transform.log_abs_det_jacobian(value, z[lat.name])
                log_det = sum_rightmost(log_det, log_det.dim() - value.dim() + lat.event_dim)
                log_q0 = log_q0 + weights.reduce(log_det, site, lat.name)
            log_q0 = _rows(log_q0, weights.plates, self.data_plate)
            delta = _rows(weights.log_w, weights.plates, self.data_plate)
            grad_q0 = torch.autograd.grad(log_q0.sum(), u, retain_graph=True, allow_unused=True)
            grad_delta = torch.autograd.grad(delta.sum(), u, allow_unused=True)
        return _State(
            tuple(v.detach() for v in u),
            log_q0.detach(),
            delta.detach(),
            tuple(torch.zeros_like(v) if g is None else g for v, g in zip(u, grad_q0, strict=True)),
            tuple(
                torch.zeros_like(v) if g is None else g for v, g in zip(u, grad_delta, strict=True)
            ),
        )

    def spread(self, value: torch.Tensor, latent: _Latent, like: torch.Tensor) -> torch.Tensor:
        """A per-``(chain, data point)`` ``(M, N)`` or per-data-point ``(N,)`` tensor laid out
        to broadcast against the latent's ``u`` (``like``)."""
        shape = [1] * like.dim()
        if value.dim() == 2:
            shape[latent.chain_dim] = value.shape[0]
        shape[latent.row_dim] = value.shape[-1]
        return value.reshape(shape)

    def kinetic(self, momentum: tuple[torch.Tensor, ...]) -> torch.Tensor:
        r""":math:`\tfrac12 \lVert p \rVert^2` per chain and data point, ``(M, N)``."""
        terms = []
        for lat, p in zip(self.latents, momentum, strict=True):
            p = p.movedim((lat.chain_dim, lat.row_dim), (0, 1))
            terms.append(0.5 * p.pow(2).reshape(*p.shape[:2], -1).sum(-1))
        return torch.stack(terms).sum(0)

    def select(self, accept: torch.Tensor, new: _State, old: _State) -> _State:
        """Per chain and data point, ``new`` where ``accept``, else ``old``."""

        def pick(a: tuple, b: tuple) -> tuple:
            return tuple(
                torch.where(self.spread(accept, lat, x), x, y)
                for lat, x, y in zip(self.latents, a, b, strict=True)
            )

        return _State(
            pick(new.u, old.u),
            torch.where(accept, new.log_q0, old.log_q0),
            torch.where(accept, new.delta, old.delta),
            pick(new.grad_q0, old.grad_q0),
            pick(new.grad_delta, old.grad_delta),
        )


def _hmc_step(
    target: _Annealed, state: _State, beta: float, step_size: torch.Tensor, num_leapfrog: int
) -> tuple[_State, torch.Tensor]:
    r"""One HMC transition leaving :math:`f_\beta \propto q_0\, e^{\beta \Delta}` invariant:
    ``num_leapfrog`` leapfrog steps of size ``step_size`` (per data point) from fresh
    :math:`p \sim \mathcal{N}(0, I)`, then Metropolis per chain. Returns the new state and the
    acceptance probabilities ``(M, N)``."""

    def force(s: _State) -> list[torch.Tensor]:
        return [gq + beta * gd for gq, gd in zip(s.grad_q0, s.grad_delta, strict=True)]

    eps = [target.spread(step_size, lat, u) for lat, u in zip(target.latents, state.u, strict=True)]
    p0 = tuple(torch.randn_like(u) for u in state.u)
    p = [pi + 0.5 * e * g for pi, e, g in zip(p0, eps, force(state), strict=True)]
    proposal = state
    for step in range(num_leapfrog):
        u = tuple(ui + e * pi for ui, e, pi in zip(proposal.u, eps, p, strict=True))
        proposal = target(u)
        scale = 0.5 if step == num_leapfrog - 1 else 1.0
        p = [pi + scale * e * g for pi, e, g in zip(p, eps, force(proposal), strict=True)]
    energy_old = -(state.log_q0 + beta * state.delta) + target.kinetic(p0)
    energy_new = -(proposal.log_q0 + beta * proposal.delta) + target.kinetic(tuple(p))
    log_accept = (energy_old - energy_new).nan_to_num(nan=-math.inf).clamp(max=0.0)
    accept = torch.rand_like(log_accept).log() < log_accept
    return target.select(accept, proposal, state), log_accept.exp()


def _ais_batch(
    target: _Annealed,
    beta: torch.Tensor,
    step_size: float,
    num_leapfrog: int,
    target_accept: float,
    adapt_step_size: bool,
    bar: tqdm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, N)`` log weights, ``(N,)`` mean acceptance and final step sizes of one batch."""
    state = target.initial()
    log_w = torch.zeros_like(state.delta)
    eps = torch.full_like(state.delta[0], step_size)
    acceptance = torch.zeros_like(eps)
    num_steps = len(beta) - 1
    for t in range(1, num_steps + 1):
        log_w = log_w + (beta[t] - beta[t - 1]).item() * state.delta
        if t < num_steps:  # the last target's transition would not change the weights
            state, accept_prob = _hmc_step(target, state, beta[t].item(), eps, num_leapfrog)
            rate = accept_prob.mean(0)
            acceptance = acceptance + rate
            if adapt_step_size:
                factor = torch.where(rate > target_accept, _STEP_UP, _STEP_DOWN)
                eps = (eps * factor).clamp(_MIN_STEP, _MAX_STEP)
        bar.update()
    return log_w, acceptance / (num_steps - 1) if num_steps > 1 else acceptance * math.nan, eps


def _stderr(log_w: torch.Tensor) -> torch.Tensor:
    r"""Delta-method standard error of :math:`\log \bar w` over dim 0:
    :math:`\mathrm{sd}(w) / (\sqrt{M}\, \bar w)`, from weights relative to their maximum."""
    w = torch.exp(log_w - log_w.max(0).values)
    return w.std(0) / (w.mean(0) * math.sqrt(len(w)))


@torch.no_grad()
def ais_log_likelihood(
    model: Callable,
    data: torch.Tensor,
    *args: Any,
    initial: str | Callable = "prior",
    num_chains: int = 16,
    num_steps: int = 1000,
    schedule: str | Sequence[float] | torch.Tensor = "sigmoid",
    num_leapfrog: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    batch_size: int = 100,
    data_plate: str | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> AISResult:
    r"""
    Annealed-importance-sampling estimate of :math:`\log p_\theta(x_n)` for every row of
    ``data`` (Neal [1]; with HMC transitions and a sigmoid schedule as in Wu et al. [2]; see the
    module docstring for the estimator).

    ``model(x, *args, **kwargs)`` is called on batches ``x = data[i : i + batch_size]``, as by
    :func:`log_likelihood`: a plate over the rows must enclose every sample site, so each data
    point has its own latents. Every latent must be continuous (HMC moves along gradients, in
    the unconstrained coordinates of :func:`~torch.distributions.biject_to` of its support). All
    ``num_chains`` chains of all data points of a batch run as one tensor (the chains in a
    particle plate left of the model's plates); only the temperatures and leapfrog steps are
    Python loops: a batch costs ``(num_steps - 1) × num_leapfrog + 1`` model runs with
    gradients.

    Each temperature :math:`\beta_t` (:math:`t < T`) applies one HMC transition: fresh
    momentum :math:`p \sim \mathcal{N}(0, I)`, ``num_leapfrog`` leapfrog steps, and a
    Metropolis test per chain. The step size is one per data point, shared by its chains, and
    (``adapt_step_size``) multiplied by 1.02 after a transition whose mean acceptance
    probability over the chains beats ``target_accept``, by 0.98 otherwise, within
    :math:`[10^{-4}, 0.5]` (Wu et al.'s rule; the adaptation reads the chains' past, a small
    departure from exact AIS that they accept, and ``adapt_step_size=False`` avoids).

    **Example**::

        result = ais_log_likelihood(vae.model, x_test, num_chains=16, num_steps=1000)
        result.log_likelihood.mean(), result.stderr.pow(2).mean().sqrt() / len(x_test) ** 0.5

    :param model: the generative model :math:`p_\theta(x, z)`.
    :param torch.Tensor data: the data points, first dimension indexing them.
    :param initial: ``"prior"`` (:math:`q_0 = p(z)`, the decoder-based evaluation of [2]) or
        a guide ``guide(x, *args, **kwargs)`` with a density over the same latent sites (e.g.
        the trained encoder: shorter schedules suffice).
    :param int num_chains: independent chains :math:`M` per data point.
    :param int num_steps: annealing steps :math:`T` (1: importance sampling with :math:`q_0`).
    :param schedule: a name in :data:`SCHEDULES` (see :func:`annealing_schedule`) or the
        ``num_steps + 1`` inverse temperatures themselves, increasing from 0 to 1.
    :param int num_leapfrog: leapfrog steps per HMC transition.
    :param float step_size: the initial leapfrog step size.
    :param float target_accept: the acceptance probability the step size is adapted to.
    :param bool adapt_step_size: adapt the step size per temperature (else keep it fixed).
    :param int batch_size: data points per batch.
    :param str data_plate: the plate over the data's rows (default: found as by
        :func:`log_likelihood`).
    :param bool progress: show a progress bar over batches and temperatures.
    :returns: an :class:`AISResult` (estimates, standard errors, acceptance, step sizes,
        per-chain log weights).
    :raises ValueError: for bad arguments, a discrete latent or an initial guide without a
        density at any latent (each named by its site), or no plate over the data's rows that
        encloses every site.
    """
    check_integer("num_chains", num_chains, 1)
    check_integer("num_steps", num_steps, 1)
    check_integer("num_leapfrog", num_leapfrog, 1)
    check_integer("batch_size", batch_size, 1)
    check_flag("adapt_step_size", adapt_step_size)
    if not 0 < step_size <= _MAX_STEP or isinstance(step_size, bool):
        raise ValueError(f"Expected step_size in (0, {_MAX_STEP}], actual {step_size!r}")
    if not 0 < target_accept < 1:
        raise ValueError(f"Expected target_accept in (0, 1), actual {target_accept!r}")
    if isinstance(initial, str):
        if initial != "prior":
            raise ValueError(f"Expected initial='prior' or a guide, actual {initial!r}")
        guide = None
    elif callable(initial):
        guide = initial
    else:
        raise ValueError(f"Expected initial='prior' or a guide (callable), actual {initial!r}")
    beta = _check_schedule(schedule, num_steps)
    max_plate_nesting = guess_max_plate_nesting(model, guide, (data[:batch_size], *args), kwargs)
    starts = range(0, len(data), batch_size)
    results = []
    with tqdm(total=len(starts) * num_steps, desc="AIS", disable=not progress, leave=False) as bar:
        for start in starts:
            batch_args = (data[start : start + batch_size], *args)
            target = _Annealed(
                model, guide, batch_args, kwargs, num_chains, max_plate_nesting, data_plate
            )
            results.append(
                _ais_batch(
                    target, beta, step_size, num_leapfrog, target_accept, adapt_step_size, bar
                )
            )
    log_w, acceptance, eps = (torch.cat(parts, dim=-1) for parts in zip(*results, strict=True))
    return AISResult(
        torch.logsumexp(log_w, 0) - math.log(num_chains), _stderr(log_w), acceptance, eps, log_w
    )
