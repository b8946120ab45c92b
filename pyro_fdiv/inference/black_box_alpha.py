"""Black-box alpha: the per-data-point variational Rényi energy."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from pyro_fdiv.inference.importance import LogWeights, log_mean_exp
from pyro_fdiv.inference.objective import (
    ImportanceObjective,
    joint_score,
    local_split,
    score_function_surrogate,
)

__all__ = ["BlackBoxAlpha", "renyi_log_mean_exp"]


def renyi_log_mean_exp(x: torch.Tensor, alpha: float, dim: int = 0) -> torch.Tensor:
    r"""
    :math:`\frac{1}{\alpha} \log \frac{1}{K} \sum_k e^{\alpha x_k}` along ``dim``, continuous
    in :math:`\alpha` with the mean of :math:`x` at :math:`\alpha = 0`.

    Written as :math:`m + \frac{1}{\alpha}\log \frac{1}{K}\sum_k e^{c_k}` with
    :math:`m = \bar x`, :math:`c_k = \alpha(x_k - m)`; where every :math:`|c_k| \le 1` the sum is
    evaluated as ``log1p(mean(expm1(c)))``, which keeps full precision as :math:`\alpha \to 0`,
    elsewhere with ``logsumexp``, which cannot overflow.
    """
    if alpha == 0 or x.shape[dim] == 1:  # the ELBO limit; or one particle: x itself
        return x.mean(dim)
    mean = x.mean(dim, keepdim=True)
    c = alpha * (x - mean)
    near = c.abs().amax(dim) <= 1.0
    via_expm1 = torch.log1p(torch.expm1(c.clamp(-1.0, 1.0)).mean(dim))
    via_lse = log_mean_exp(c, dim)
    return mean.squeeze(dim) + torch.where(near, via_expm1, via_lse) / alpha


class BlackBoxAlpha(ImportanceObjective):
    r"""
    Black-box alpha (BB-:math:`\alpha`) of Hernández-Lobato et al. [1] in its variational form
    [2]: per data point the energy

    .. math::

        E_\alpha(x_i) = -\frac{1}{\alpha}\,\log \frac{1}{K} \sum_{k=1}^K w_{k,i}^{\alpha},
        \qquad w_{k,i} = \frac{p(x_i, z_{k,i})}{q(z_{k,i} \mid x_i)},

    summed over the batch (and scaled by :math:`N/B` under subsampling); the loss is
    :math:`\sum_i E_\alpha(x_i)`. In the BB-:math:`\alpha` convention :math:`\alpha \to 0` is
    the negative ELBO (``alpha=0`` is treated exactly as that limit) and :math:`\alpha = 1` the
    negative IWAE bound. It is the variational Rényi bound of order :math:`1 - \alpha` [3]
    computed per data point, i.e. Pyro's ``RenyiELBO(alpha=1 - alpha)`` for a single data
    point; unlike Pyro's, the subsample scale multiplies the bound, not the log weights.
    Any real :math:`\alpha` is accepted: :math:`\alpha > 0` gives bounds between the ELBO and
    :math:`\log p(x)` (the paper found :math:`\alpha = 0.5` to :math:`2` useful), :math:`\alpha < 0`
    upper bounds on :math:`\log p(x)` in expectation only as :math:`K \to \infty`.

    Guide sites that cannot be reparameterized get score-function terms with VIMCO's
    leave-one-out baseline.

    **Global latents under subsampling** (``global_latents="energy"``, the default). With
    global latents :math:`\theta` outside a subsampled data plate, the energy is the
    black-box :math:`\alpha` energy with tied factors [1] in the form Li & Gal use for
    Bayesian neural networks [2]:

    .. math::

        E_\alpha = \mathrm{KL}\big(q(\theta)\,\|\,p(\theta)\big)
            - \frac{1}{\alpha} \sum_{n=1}^N \log \mathbb{E}_{q(\theta)}
            \big[p(x_n \mid \theta)^\alpha\big],

    a sum over data points, so a minibatch estimates it without bias (given the particles) with
    the ordinary :math:`N/B` scale outside the logs:
    :math:`\hat E_\alpha = \frac{1}{K}\sum_k \log\frac{q(\theta_k)}{p(\theta_k)}
    - \frac{N}{B}\sum_{n \in \text{batch}} \frac{1}{\alpha}
    \log\frac{1}{K}\sum_k w_{n,k}^\alpha`, where :math:`w_{n,k} = p(x_n \mid \theta_k)`,
    or :math:`p(x_n, z_{n,k} \mid \theta_k) / q(z_{n,k} \mid x_n, \theta_k)` with local
    latents (``num_local_particles`` draws per particle, averaged). The terms are kept per
    element of the plates every site shares, whose subsample scale multiplies the sum.
    :math:`\alpha \to 0` is the negative ELBO exactly. Guide sites that cannot be
    reparameterized get score-function terms with VIMCO's leave-one-out baseline over each
    particle's global and local draws. ``global_latents="nested"`` uses the nested bound of
    :class:`~pyro_fdiv.inference.ImportanceObjective` reduced by this energy instead (also
    where the subsampled plates cross), and ``"error"`` refuses such models.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                  loss=BlackBoxAlpha(alpha=0.5, num_particles=5))

    :param float alpha: the order :math:`\alpha`, any finite real number.
    :param int num_particles: number of importance samples :math:`K` per data point.
    :param bool check_finite: when ``True`` (default), :meth:`loss`, :meth:`loss_and_grads` and
        :meth:`differentiable_loss` raise a ``ValueError`` naming the model and guide sites whose
        log-densities are not finite whenever the loss is not finite; ``False`` skips the check
        (no device synchronization in :meth:`differentiable_loss`).
    :param elbo_kwargs: ``max_plate_nesting``, ``retain_graph``, ``validation``, ... as for
        :class:`~pyro_fdiv.inference.ImportanceObjective`.

    **References**

    [1] J. M. Hernández-Lobato, Y. Li, M. Rowland, D. Hernández-Lobato, T. Bui, R. E. Turner.
    *Black-Box Alpha Divergence Minimization*. ICML 2016.

    [2] Y. Li, Y. Gal. *Dropout Inference in Bayesian Neural Networks with Alpha-divergences*.
    ICML 2017.

    [3] Y. Li, R. E. Turner. *Rényi Divergence Variational Inference*. NeurIPS 2016.
    """

    def __init__(
        self, alpha: float, num_particles: int = 1, *, check_finite: bool = True, **elbo_kwargs: Any
    ):
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
        ):
            raise ValueError(f"Expected alpha to be a finite real number, actual {alpha!r}")
        self.alpha: float = float(alpha)
        super().__init__(num_particles=num_particles, check_finite=check_finite, **elbo_kwargs)

    GLOBAL_ESTIMATORS = ("energy", "nested", "error")

    def bound(self, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
        r""":math:`-E_\alpha = \frac{1}{\alpha}\log\frac{1}{K}\sum_k w_k^\alpha` along ``dim``."""
        return renyi_log_mean_exp(log_w, self.alpha, dim)

    def _global_total(self, weights: LogWeights, differentiable: bool) -> torch.Tensor:
        r""":math:`-\hat E_\alpha` with tied factors (see the class docstring); its
        non-reparameterized guide sites get score-function terms with VIMCO's leave-one-out
        baseline, each particle's global and local draws together."""
        dims, local_scale = local_split(weights)
        if self.global_latents != "energy" or not dims:
            # no data plate inside the subsampled plates (they cross): the nested bound
            return super()._global_total(weights, differentiable)
        global_log_w = weights.global_log_w
        assert global_log_w is not None  # _total calls this only then
        # per element of the shared plates: (K, *shared, 1 + local points): log p/q of the
        # global draw, then each local point's log weight
        local = weights.log_w.movedim(dims, tuple(range(-len(dims), 0)))
        local = local.reshape(*global_log_w.shape, -1)
        joint = torch.cat([global_log_w.unsqueeze(-1), local], -1)

        def energy(x: torch.Tensor, dim: int) -> torch.Tensor:
            per_point = renyi_log_mean_exp(x[..., 1:], self.alpha, dim).sum(-1)
            return x[..., 0].mean(dim) + local_scale * per_point

        bound = energy(joint, 0)
        score = joint_score(weights)
        if differentiable and score is not None:
            bound = bound + score_function_surrogate(energy, joint.detach(), score)
        return bound.sum() * weights.scale
