"""Reweighted wake-sleep with per-data-point self-normalized importance weights."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_fdiv.inference.importance import (
    PARTICLE_PLATE,
    LogWeights,
    guide_messenger,
    log_mean_exp,
    sample_sites,
    site_log_prob,
    trace_signature,
)
from pyro_fdiv.inference.objective import ImportanceObjective, nested_log_weights
from pyro_fdiv.util import check_flag, check_integer

__all__ = ["ReweightedWakeSleep", "detach_samples"]


class _DetachSamples(Messenger):
    r"""Draw every latent sample site of the wrapped guide without a gradient: the guide's
    later sites and the replayed model see :math:`\bar z = \mathrm{sg}(z)`, and
    ``log q_\phi(\bar z)`` keeps only its direct (score) dependence on :math:`\phi`.
    The same random numbers as an ordinary draw are used."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        with torch.no_grad():
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])


def detach_samples(fn: Callable) -> Callable:
    """A Pyro handler: ``fn`` with its latent sample values drawn without gradients (RWS's
    guide: no reparameterization through the samples)."""
    return _DetachSamples()(fn)


class ReweightedWakeSleep(ImportanceObjective):
    r"""
    Reweighted wake-sleep (RWS) of Bornschein & Bengio [1], as revisited by Le et al. [2],
    with self-normalized importance weights **per data point**. For each data point
    :math:`x_i` of the batch, ``K`` draws :math:`z_{k,i} \sim q_\phi(z \mid x_i)` (detached:
    no gradient flows through them) give

    .. math::

        \log w_{k,i} = \log p_\theta(x_i, z_{k,i}) - \log q_\phi(z_{k,i} \mid x_i),
        \qquad \tilde w_{k,i} = \frac{w_{k,i}}{\sum_{l=1}^K w_{l,i}}

    (a softmax over the particle dim only, never over the batch). The updates, summed over
    the batch and scaled by the subsample scale :math:`N/B`:

    - **wake-θ**, the gradient of the IWAE bound in :math:`\theta`,
      :math:`\nabla_\theta \log \frac{1}{K}\sum_k w_{k,i}
      = \sum_k \tilde w_{k,i} \nabla_\theta \log p_\theta(x_i, z_{k,i})`;
    - **wake-φ**, :math:`\sum_k \tilde w_{k,i} \nabla_\phi \log q_\phi(z_{k,i} \mid x_i)`
      with the weights held fixed: a self-normalized estimate of
      :math:`-\nabla_\phi \mathrm{KL}\big(p_\theta(z \mid x_i) \,\|\, q_\phi(z \mid x_i)\big)`,
      which needs no reparameterization (discrete guides, stochastic control flow [2]);
    - **sleep-φ** (``insomnia < 1``): :math:`(z, x) \sim p_\theta` drawn from the model with
      its observations unconditioned, :math:`\nabla_\phi \log q_\phi(z \mid x)` averaged over
      ``num_sleep_particles`` draws (the data points the model's plates hold, each with its
      site's scale, :math:`N/B` under subsampling);

    the guide's update is ``insomnia * wake_phi + (1 - insomnia) * sleep_phi``.
    :meth:`loss` is the negated IWAE bound :math:`-\frac{N}{B}\sum_i \log \frac{1}{K}
    \sum_k w_{k,i}` (as :class:`~pyro_fdiv.inference.IWAE`'s, on the same draws);
    :meth:`differentiable_loss` has that value and the negated updates above as its
    gradient, so ``SVI`` (which minimizes) ascends all of them with one backward pass.

    **Differences from Pyro's** ``pyro.infer.ReweightedWakeSleep``: Pyro sums the log weights
    of the whole batch into one weight per particle (with the subsample scale inside, so a
    minibatch tempers them by :math:`N/B`) and normalizes those; here each data point has its
    own :math:`\tilde w_{k,i}`, so a minibatch estimate is :math:`N/B` times a sum of
    per-data-point terms, unbiased for the full-data per-data-point update (the two agree for
    one data point). Pyro returns two losses (wake-θ and φ); here :meth:`loss` is one float,
    the IWAE bound, so it drops into ``SVI`` and the package's training loop. The guide's
    later sites see the detached earlier draws (Pyro detaches the trace after the guide ran,
    so a hierarchical guide's later densities still depend on :math:`\phi` through earlier
    draws). ``model_has_params=False`` drops the wake-θ gradient (the draw is still made:
    the loss reports the bound). As in Pyro, for sleep-φ the guide must accept a keyword
    ``observations``: the dict of the model's observed sites' sampled values, e.g.
    ``def guide(x, observations=None): x = x if observations is None else
    observations["x"]``.

    **Global latents under subsampling**: with ``global_latents="nested"`` (the default) the
    weights are those of :class:`~pyro_fdiv.inference.ImportanceObjective`'s nested bound,
    one per particle of the global latents :math:`\theta_k` (necessarily pooled over the
    batch, its local log weights scaled by :math:`N/B`, a consistent but biased estimate; one
    warning), and wake-φ weights :math:`\log q(\theta_k) + \frac{N}{B}\sum_i \log
    q(z_{i,k})`; ``global_latents="error"`` refuses such models with a ``ValueError`` naming
    the plate.

    Example::

        def model(x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Bernoulli(0.4))
                pyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)

        def guide(x):
            a = pyro.param("a", torch.tensor(0.0))
            b = pyro.param("b", torch.tensor(0.0))
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Bernoulli(logits=a + b * x))

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}),
                  loss=ReweightedWakeSleep(num_particles=5))

    :param int num_particles: ``K >= 2`` draws per data point (with one, the normalized
        weight is 1 and wake-φ has no signal).
    :param float insomnia: in :math:`[0, 1]`: the weight of wake-φ against sleep-φ in the
        guide's update (1: wake-φ only, the default; 0: sleep-φ only).
    :param bool model_has_params: ``False`` drops the wake-θ gradient (the model is fixed).
    :param int num_sleep_particles: draws from the model for sleep-φ (default
        ``num_particles``), vectorized in the particle plate.
    :param elbo_kwargs: ``max_plate_nesting``, ``vectorize_particles``, ``global_latents``,
        ``validation``, ``check_finite`` ... as for
        :class:`~pyro_fdiv.inference.ImportanceObjective` (``num_local_particles`` must be 1).

    **References**

    [1] J. Bornschein, Y. Bengio. *Reweighted Wake-Sleep*. ICLR 2015.

    [2] T. A. Le, A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood. *Revisiting Reweighted
    Wake-Sleep for Models with Stochastic Control Flow*. UAI 2019.
    """

    insomnia: float
    model_has_params: bool
    num_sleep_particles: int

    def __init__(
        self,
        num_particles: int = 2,
        insomnia: float = 1.0,
        model_has_params: bool = True,
        num_sleep_particles: int | None = None,
        **elbo_kwargs: Any,
    ):
        num_particles = check_integer("num_particles", num_particles, 1)
        if num_particles < 2:
            raise ValueError(
                f"Expected num_particles >= 2 for ReweightedWakeSleep (self-normalized weights "
                f"of one particle are 1: wake-phi has no signal), actual {num_particles!r}"
            )
        if (
            isinstance(insomnia, bool)
            or not isinstance(insomnia, numbers.Real)
            or not 0.0 <= insomnia <= 1.0
        ):
            raise ValueError(
                f"Expected insomnia in [0, 1] (the weight of wake-phi against sleep-phi), "
                f"actual {insomnia!r}"
            )
        if elbo_kwargs.get("num_local_particles", 1) != 1:
            raise ValueError(
                "Expected num_local_particles=1 for ReweightedWakeSleep (its weights are "
                f"normalized per particle), actual {elbo_kwargs['num_local_particles']!r}"
            )
        self.insomnia = float(insomnia)
        self.model_has_params = check_flag("model_has_params", model_has_params)
        if num_sleep_particles is None:
            num_sleep_particles = num_particles
        self.num_sleep_particles = check_integer("num_sleep_particles", num_sleep_particles, 1)
        super().__init__(num_particles=num_particles, **elbo_kwargs)

    def bound(self, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
        r""":math:`\log \frac{1}{K}\sum_k w_k` along ``dim`` (the IWAE bound)."""
        return log_mean_exp(log_w, dim)

    def _trace_options(self, differentiable: bool) -> dict:
        return {"guide_handler": detach_samples}

    def _log_weights(self, model, guide, args, kwargs, differentiable: bool = False) -> LogWeights:
        if guide_messenger(guide) is not None:
            raise ValueError(
                f"ReweightedWakeSleep needs the guide's draws detached, but "
                f"{type(guide_messenger(guide)).__name__} is a GuideMessenger, which runs the "
                "model inside itself. Use a callable guide (e.g. AutoNormal for "
                "AutoNormalMessenger)."
            )
        return super()._log_weights(model, guide, args, kwargs, differentiable)

    def _wake(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Per particle and element of the kept plates: :math:`\log w` and
        :math:`\log q` (the nested ones with global latents under subsampling)."""
        glob = weights.global_sites

        def log_q(is_global: bool, like: torch.Tensor) -> torch.Tensor:
            terms = [
                t
                for n, t in weights.guide_terms.items()
                if (f"guide site '{n}'" in glob) == is_global
            ]
            return sum(terms, torch.zeros_like(like))

        local_q = log_q(False, weights.log_w)
        if weights.global_log_w is None:
            return weights.log_w, local_q
        global_q = log_q(True, weights.global_log_w)
        nested_q = nested_log_weights(weights._replace(log_w=local_q, global_log_w=global_q))
        return nested_log_weights(weights), nested_q

    def _total(self, weights: LogWeights, differentiable: bool) -> torch.Tensor:
        if not differentiable:
            return super()._total(weights, differentiable)  # the IWAE bound
        if weights.global_log_w is not None:
            self._warn_global(weights)
        log_w, log_q = self._wake(weights)
        if self.model_has_params:  # wake-θ: Σ w̃ ∇θ log p, the guide's log q held fixed
            theta = self.bound(log_w + (log_q - log_q.detach()))
        else:
            theta = self.bound(log_w.detach())
        w_tilde = torch.softmax(log_w.detach(), dim=0)  # per data point: over particles only
        phi = (w_tilde * log_q).sum(0)
        surrogate = theta + self.insomnia * (phi - phi.detach())
        return surrogate.sum() * weights.scale

    def _sleep(self, model, guide, args, kwargs) -> torch.Tensor:
        r""":math:`\frac{1}{S}\sum_s \log q_\phi(z_s \mid x_s)` at :math:`(z_s, x_s) \sim
        p_\theta`, detached, each site with its scale (zero-valued surrogate left to the
        caller)."""
        num = self.num_sleep_particles
        dim = -int(self.max_plate_nesting) - 1

        def plated(fn: Callable) -> Callable:
            return fn if num == 1 else pyro.plate(PARTICLE_PLATE, num, dim=dim)(fn)

        model_trace = poutine.trace(plated(poutine.uncondition(model))).get_trace(*args, **kwargs)
        model_trace.detach_()
        observations = {
            name: site["value"]
            for name, site in sample_sites(model_trace).items()
            if site["infer"].get("was_observed")
        }
        try:
            guide_trace = poutine.trace(poutine.replay(plated(guide), trace=model_trace)).get_trace(
                *args, **{**kwargs, "observations": observations}
            )
        except TypeError as error:
            if "observations" not in str(error):
                raise
            raise ValueError(
                f"ReweightedWakeSleep(insomnia={self.insomnia}) runs the guide on the model's "
                "samples of its observed sites, passed as the keyword argument observations= "
                f"(a dict {sorted(observations)}), but the guide does not accept it ({error}). "
                "Add observations=None to the guide's signature and use it when given, or "
                "set insomnia=1."
            ) from error
        terms = [
            site_log_prob(site).sum()
            for site in sample_sites(guide_trace).values()
            if not site["is_observed"]
        ]
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum() / num

    def _loss(self, model, guide, args, kwargs) -> tuple[torch.Tensor, LogWeights]:
        weights = self._log_weights(model, guide, args, kwargs, differentiable=True)
        loss = -self._total(weights, differentiable=True)
        if self.insomnia < 1.0:
            sleep = self._sleep(model, guide, args, kwargs)
            loss = loss - (1.0 - self.insomnia) * (sleep - sleep.detach())
        return loss, weights

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: a scalar tensor equal to :meth:`loss` (the negated IWAE bound) whose
            gradient is the negated wake-θ, wake-φ and sleep-φ updates.
        """
        loss, weights = self._loss(model, guide, args, kwargs)
        if self.check_finite:
            self._checked(loss.detach(), weights)
        return loss

    def _traced_loss(self, model, guide, args, kwargs, part=""):
        loss, weights = self._loss(model, guide, args, kwargs)
        return loss, trace_signature(weights)

    def _compile_refusal(self, part: str = "") -> str | None:
        if self.insomnia < 1.0:
            return "the sleep phase runs the model unconditioned (insomnia < 1)"
        return super()._compile_refusal(part)

    def _eager_loss_and_grads(self, model, guide, args, kwargs) -> float:
        loss, weights = self._loss(model, guide, args, kwargs)
        value = self._checked(loss, weights)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return value
