"""The importance weighted autoencoder bound, with reparameterized, STL and DReG gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions import Delta

from pyro_fdiv.inference.importance import (
    LogWeights,
    log_mean_exp,
    non_reparam_sites,
    reparam_roots,
    sample_sites,
)
from pyro_fdiv.inference.objective import ImportanceObjective

__all__ = ["IWAE"]

GRADIENT_ESTIMATORS = ("reparam", "stl", "dreg")


class IWAE(ImportanceObjective):
    r"""
    The importance weighted bound of Burda et al. [1], one bound per data point:

    .. math::

        \mathcal{L}_K(x_i) = \mathbb{E}_{z_{1:K} \sim q(z \mid x_i)}
            \Big[\log \frac{1}{K} \sum_{k=1}^K w_{k,i}\Big],
        \qquad w_{k,i} = \frac{p(x_i, z_{k,i})}{q(z_{k,i} \mid x_i)},

    summed over the data points of the batch (and scaled by :math:`N/B` under subsampling).
    :math:`\mathcal{L}_1` is the ELBO, :math:`\mathcal{L}_K \le \mathcal{L}_{K+1} \le \log p(x)`.
    The loss is :math:`-\sum_i \mathcal{L}_K(x_i)`.

    Gradient estimators for the guide parameters :math:`\phi`:

    - ``"reparam"``: plain reparameterization, :math:`\sum_k \tilde w_k \nabla \log w_k`, plus
      score-function terms with VIMCO's leave-one-out baseline [4] for guide sites that cannot
      be reparameterized (e.g. Bernoulli latents).
    - ``"stl"``: "sticking the landing" [2]: the guide's direct dependence on :math:`\phi` in
      :math:`\log q_\phi(z)` is dropped (evaluated at stopped parameters), keeping only the
      path through :math:`z`. Biased for :math:`K > 1`; zero variance at the exact posterior.
    - ``"dreg"``: the doubly reparameterized estimator of Tucker et al. [3],
      :math:`\sum_k \tilde w_k^2\, \partial \log w_k / \partial z_k\, \partial z_k / \partial \phi`
      with normalized weights :math:`\tilde w_k`: unbiased, and its signal-to-noise ratio does
      not vanish as :math:`K` grows. Model parameters keep the usual
      :math:`\sum_k \tilde w_k \nabla_\theta \log w_k`. The guide's reparameterized sites must be
      conditionally independent given the data (every autoguide and amortized encoder is);
      ``Delta`` sites (e.g. the constrained values of ``AutoNormal``) pass their gradient on to
      the site they are computed from.

    ``"stl"`` and ``"dreg"`` need every guide site to be reparameterizable and cost one extra
    guide pass.

    Example::

        def model(x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

        def guide(x):
            a = pyro.param("a", torch.tensor(0.0))
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Normal(a * x, 0.7))

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=IWAE(num_particles=8))

    :param int num_particles: number of importance samples :math:`K` per data point.
    :param str gradient_estimator: ``"reparam"`` (default), ``"stl"`` or ``"dreg"``.
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads` and
        :meth:`differentiable_loss` raise a ``ValueError`` naming the model and guide sites whose
        log-densities are not finite whenever the loss is not finite; ``False`` skips the check
        (no device synchronization in :meth:`differentiable_loss`).
    :param elbo_kwargs: ``max_plate_nesting``, ``retain_graph``, ``validation``, ... as for
        :class:`~pyro_fdiv.inference.ImportanceObjective`.

    **References**

    [1] Y. Burda, R. Grosse, R. Salakhutdinov. *Importance Weighted Autoencoders*. ICLR 2016.

    [2] G. Roeder, Y. Wu, D. Duvenaud. *Sticking the Landing: Simple, Lower-Variance Gradient
    Estimators for Variational Inference*. NeurIPS 2017.

    [3] G. Tucker, D. Lawson, S. Gu, C. Maddison. *Doubly Reparameterized Gradient Estimators
    for Monte Carlo Objectives*. ICLR 2019.

    [4] A. Mnih, D. Rezende. *Variational Inference for Monte Carlo Objectives*. ICML 2016.
    """

    def __init__(
        self,
        num_particles: int = 1,
        gradient_estimator: str = "reparam",
        *,
        check_finite: bool = True,
        **elbo_kwargs: Any,
    ):
        if gradient_estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(
                f"Expected gradient_estimator in {GRADIENT_ESTIMATORS}, "
                f"actual {gradient_estimator!r}"
            )
        self.gradient_estimator = gradient_estimator
        self._checked_roots: set[tuple[str, ...]] = set()
        super().__init__(num_particles=num_particles, check_finite=check_finite, **elbo_kwargs)

    def bound(self, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
        r""":math:`\log \frac{1}{K}\sum_k w_k` along ``dim``."""
        return log_mean_exp(log_w, dim)

    def _trace_options(self, differentiable: bool) -> dict:
        # STL and DReG: log_w without the guide's direct dependence on its parameters
        return {"detach_guide": differentiable and self.gradient_estimator != "reparam"}

    def _surrogate(self, weights: LogWeights) -> torch.Tensor:
        if self.gradient_estimator == "reparam":
            return super()._surrogate(weights)
        if weights.score is not None:
            raise ValueError(
                f"gradient_estimator={self.gradient_estimator!r} needs reparameterized guide "
                f"sites, but {non_reparam_sites(weights.guide_trace)} cannot be reparameterized. "
                "Use gradient_estimator='reparam' (score-function terms with a VIMCO baseline)."
            )
        self._check_guide(weights.guide_trace)  # the first particle's on the sequential path
        if self.gradient_estimator == "stl":
            return self.bound(weights.log_w)
        w_tilde = torch.softmax(weights.log_w.detach(), dim=0)
        self._square_guide_weights(weights, w_tilde)
        surrogate = (w_tilde * weights.log_w).sum(0)
        return self.bound(weights.log_w.detach()) + (surrogate - surrogate.detach())

    def _global_total(self, weights: LogWeights, differentiable: bool) -> torch.Tensor:
        if differentiable and self.gradient_estimator == "dreg":
            raise ValueError(
                "gradient_estimator='dreg' needs untempered log weights, but the global latents "
                "sit outside a subsampled plate, whose N/B scale tempers the local weights in "
                "the nested bound. Use gradient_estimator='reparam' or 'stl' there."
            )
        return super()._global_total(weights, differentiable)

    def _square_guide_weights(self, weights: LogWeights, w_tilde: torch.Tensor) -> None:
        """Scale the gradient reaching each guide sample by its particle's weight once more
        (on the sequential path, each particle's samples by its own weight)."""
        if weights.vectorized:
            self._square(weights.guide_trace, w_tilde, weights.plates)
            return
        for k, (_, guide_trace) in enumerate(weights.particle_traces):
            self._square(guide_trace, w_tilde[k : k + 1], weights.plates)

    def _check_guide(self, guide_trace) -> None:
        """Once per set of sampled sites: the guide suits the estimator."""
        roots = reparam_roots(guide_trace)
        key = tuple(roots)
        if key not in self._checked_roots:
            if self.gradient_estimator == "dreg":
                _check_independent(roots)
            _check_pathwise(roots, guide_trace, self.gradient_estimator == "dreg")
            self._checked_roots.add(key)

    def _square(self, guide_trace, w_tilde: torch.Tensor, plates) -> None:
        roots = reparam_roots(guide_trace)
        keep_dims = {f.dim for f in plates}
        for name, value in roots.items():
            event_dim = guide_trace.nodes[name]["fn"].event_dim
            shape = [w_tilde.shape[0]]
            shape += [1] * max(0, value.dim() - event_dim - 1 - self.max_plate_nesting)
            position = 1
            for dim in range(-int(self.max_plate_nesting), 0):
                shape.append(w_tilde.shape[position] if dim in keep_dims else 1)
                position += dim in keep_dims
            factor = w_tilde.reshape(shape + [1] * event_dim)
            if factor.dim() > value.dim():  # one particle: no particle dim in the value
                factor = factor.reshape(factor.shape[factor.dim() - value.dim() :])
            value.register_hook(lambda grad, factor=factor: grad * factor)


def _check_independent(roots: dict[str, torch.Tensor]) -> None:
    names, values = list(roots), list(roots.values())
    for i in range(1, len(values)):
        grads = torch.autograd.grad(
            values[i].sum(), values[:i], allow_unused=True, retain_graph=True
        )
        parents = [names[j] for j, g in enumerate(grads) if g is not None]
        if parents:
            raise ValueError(
                f"gradient_estimator='dreg' needs guide sites that are conditionally independent "
                f"given the data, but guide site '{names[i]}' depends on {parents}. "
                "Use gradient_estimator='stl' or 'reparam' for hierarchical guides."
            )


def _check_pathwise(roots: dict[str, torch.Tensor], guide_trace, dreg: bool) -> None:
    """STL and DReG treat the sampled (root) values as the latents. STL removes the guide's
    direct dependence on its parameters at those values, which has mean zero only when every
    parameter enters ``log q`` through the sampling distributions: a ``Delta`` site whose
    ``log_density`` depends on a parameter directly (``AutoStructured``'s affine sites over
    auxiliary noise: ``-log scale``) would bias it at any ``K``. DReG also squares the weights
    where the gradient reaches the samples, so the ``Delta`` sites' values (the model's
    latents) must depend on the parameters only through them. Point masses (``Delta`` sites
    that depend on no sample, e.g. ``AutoDelta``) are fine. Refused otherwise."""
    params = [
        site["value"].unconstrained()
        for site in guide_trace.nodes.values()
        if site["type"] == "param" and site["value"].unconstrained().requires_grad
    ]
    values = list(roots.values())
    if not params:
        return
    for name, site in sample_sites(guide_trace).items():
        if not isinstance(site["fn"], Delta):
            continue
        log_density, value = site["fn"].log_density, site["value"]
        suspect = _grad_tensor(log_density) and _enters_after(log_density, values, params)
        if dreg and not suspect and _grad_tensor(value) and not _point_mass(value, values):
            suspect = _enters_after(value, values, params)
        if suspect:
            sampled = f"the sampled sites {list(roots)}" if roots else "its samples"
            raise ValueError(
                f"gradient_estimator='stl'/'dreg' need the guide's site '{name}' to depend on "
                f"its parameters only through {sampled}, but parameters also enter after "
                "them (a Delta site computed from auxiliary noise, as in AutoStructured): the "
                "estimator would be biased. Use gradient_estimator='reparam' for this guide."
            )


def _grad_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _depends_on(tensor: torch.Tensor, inputs: list) -> list:
    """``d tensor.sum() / d input`` for each input (``None`` where it does not depend)."""
    if not inputs:
        return []
    return list(torch.autograd.grad(tensor.sum(), inputs, allow_unused=True, retain_graph=True))


def _point_mass(value: torch.Tensor, roots: list) -> bool:
    """A value that depends on no sample and is equal across the particle dim (a parameter,
    ``AutoDelta``): it has no density to misplace."""
    if any(g is not None for g in _depends_on(value, roots)):
        return False
    return value.dim() == 0 or torch.equal(value, value[:1].expand_as(value))


def _enters_after(tensor: torch.Tensor, roots: list, params: list) -> bool:
    """``tensor`` depends on a parameter other than through ``roots``."""
    at_roots = _depends_on(tensor, roots)
    pairs = [(v, g) for v, g in zip(roots, at_roots, strict=True) if g is not None]
    total = _depends_on(tensor, params)
    through: Sequence[torch.Tensor | None] = [None] * len(params)
    if pairs:
        through = torch.autograd.grad(
            [v for v, _ in pairs],
            params,
            grad_outputs=[g for _, g in pairs],
            allow_unused=True,
            retain_graph=True,
        )
    for direct, via in zip(total, through, strict=True):
        direct = torch.zeros(()) if direct is None else direct
        via = torch.zeros(()) if via is None else via
        if not torch.allclose(direct, via, rtol=1e-6, atol=1e-10):
            return True
    return False
