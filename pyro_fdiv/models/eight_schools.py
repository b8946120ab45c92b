"""Eight Schools: the hierarchical model, its unconstrained coordinates and its exact evidence."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from scipy import integrate

__all__ = [
    "NUM_SCHOOLS",
    "PARAMETERIZATIONS",
    "SIGMA",
    "UNCONSTRAINED_NAMES",
    "Y",
    "exact_posterior_summary",
    "from_unconstrained",
    "log_evidence",
    "log_joint",
    "model",
    "to_unconstrained",
]

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
NUM_SCHOOLS = 8
PARAMETERIZATIONS = ("noncentered", "centered")
MU_SCALE = 5.0
TAU_SCALE = 5.0
UNCONSTRAINED_NAMES = ("mu", "log_tau", *(f"theta_tilde[{j}]" for j in range(NUM_SCHOOLS)))


def _data(y: torch.Tensor | None, sigma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    y = Y.to(torch.get_default_dtype()) if y is None else torch.as_tensor(y)
    sigma = SIGMA.to(y) if sigma is None else torch.as_tensor(sigma).to(y)
    if y.shape[-1:] != (NUM_SCHOOLS,) or sigma.shape != (NUM_SCHOOLS,):
        raise ValueError(
            f"Expected y and sigma of shape (..., {NUM_SCHOOLS}) and ({NUM_SCHOOLS},), "
            f"actual {tuple(y.shape)} and {tuple(sigma.shape)}"
        )
    return y, sigma


def model(
    y: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    parameterization: str = "noncentered",
) -> torch.Tensor:
    r"""
    The Eight Schools model of Rubin [1] with the priors of Gelman et al. [2] and posteriordb:

    .. math::

        \mu \sim \mathcal{N}(0, 5^2), \qquad \tau \sim \mathrm{HalfCauchy}(5), \qquad
        \theta_j = \mu + \tau \tilde\theta_j, \quad \tilde\theta_j \sim \mathcal{N}(0, 1), \qquad
        y_j \sim \mathcal{N}(\theta_j, \sigma_j^2), \quad j = 1, \dots, 8.

    The non-centered form samples ``theta_tilde`` and records ``theta`` with
    :func:`pyro.deterministic`; the centered form samples ``theta ~ Normal(mu, tau)`` directly
    (a funnel that HMC finds hard). ``mu`` and ``tau`` sit outside the ``"schools"`` plate
    (``dim=-1``), so the model broadcasts under an outer particle plate at ``dim=-2``. All
    tensors take the dtype of ``y``.

    :param torch.Tensor y: observed effects, shape ``(8,)``; defaults to :data:`Y`. For the
        prior predictive wrap the model in :func:`pyro.poutine.uncondition`.
    :param torch.Tensor sigma: known standard errors, shape ``(8,)``; defaults to :data:`SIGMA`.
    :param str parameterization: ``"noncentered"`` (default) or ``"centered"``.
    :returns: the school effects ``theta``.

    Example::

        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal

        guide = AutoNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        svi.step()

    **References**

    [1] D. Rubin. *Estimation in parallel randomized experiments*. J. Educ. Stat., 1981.

    [2] A. Gelman, J. Carlin, H. Stern, D. Dunson, A. Vehtari, D. Rubin.
    *Bayesian Data Analysis*, 3rd ed., section 5.5. CRC Press, 2013.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"Expected parameterization in {PARAMETERIZATIONS}, actual {parameterization!r}"
        )
    y, sigma = _data(y, sigma)
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), MU_SCALE))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(TAU_SCALE)))
    with pyro.plate("schools", NUM_SCHOOLS, dim=-1):
        if parameterization == "noncentered":
            theta_tilde = pyro.sample("theta_tilde", dist.Normal(y.new_tensor(0.0), 1.0))
            theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        else:
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)
    return theta


def to_unconstrained(samples: Mapping[str, torch.Tensor | np.ndarray]) -> torch.Tensor:
    r"""
    Map draws to the non-centered unconstrained coordinates :data:`UNCONSTRAINED_NAMES`,
    :math:`z = (\mu, \log\tau, \tilde\theta_1, \dots, \tilde\theta_8)`.

    :param dict samples: ``mu`` and ``tau`` of shape ``(...)`` and either ``theta_tilde`` or
        (centered draws) ``theta`` of shape ``(..., 8)``; then
        :math:`\tilde\theta = (\theta - \mu) / \tau`.
    :returns: a tensor of shape ``(..., 10)``.
    """
    mu, tau = torch.as_tensor(samples["mu"]), torch.as_tensor(samples["tau"])
    if "theta_tilde" in samples:
        theta_tilde = torch.as_tensor(samples["theta_tilde"])
    elif "theta" in samples:
        theta_tilde = (torch.as_tensor(samples["theta"]) - mu[..., None]) / tau[..., None]
    else:
        raise ValueError(f"Expected 'theta_tilde' or 'theta' in samples, actual {list(samples)}")
    return torch.cat([mu[..., None], tau.log()[..., None], theta_tilde], dim=-1)


def from_unconstrained(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_unconstrained`: ``mu``, ``tau``, ``theta_tilde`` and ``theta``."""
    z = torch.as_tensor(z)
    if z.shape[-1:] != (len(UNCONSTRAINED_NAMES),):
        raise ValueError(
            f"Expected z of shape (..., {len(UNCONSTRAINED_NAMES)}), actual {tuple(z.shape)}"
        )
    mu, tau, theta_tilde = z[..., 0], z[..., 1].exp(), z[..., 2:]
    theta = mu[..., None] + tau[..., None] * theta_tilde
    return {"mu": mu, "tau": tau, "theta_tilde": theta_tilde, "theta": theta}


def log_joint(
    z: torch.Tensor, y: torch.Tensor | None = None, sigma: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Unnormalized log posterior density in the unconstrained coordinates
    :math:`z = (\mu, \log\tau, \tilde\theta)`, including the Jacobian of :math:`\tau = e^{z_2}`:

    .. math::

        \log p(y, \mu, \tau, \tilde\theta) + \log\tau.

    The half-Cauchy term is computed as
    :math:`\log\frac{2}{\pi s} - \operatorname{softplus}(2(\log\tau - \log s))`, finite for any
    :math:`\log\tau`. Vectorized over leading dimensions and differentiable.

    :param torch.Tensor z: shape ``(..., 10)``.
    :returns: shape ``(...)``.
    """
    parts = from_unconstrained(z)
    y, sigma = _data(Y.to(z) if y is None else y, sigma)
    mu, log_tau, theta_tilde = z[..., 0], z[..., 1], parts["theta_tilde"]
    log_p_mu = dist.Normal(z.new_tensor(0.0), MU_SCALE).log_prob(mu)
    log_p_tau = (
        math.log(2.0 / (math.pi * TAU_SCALE))
        - F.softplus(2.0 * (log_tau - math.log(TAU_SCALE)))
        + log_tau
    )
    log_p_theta = dist.Normal(z.new_tensor(0.0), 1.0).log_prob(theta_tilde).sum(-1)
    log_lik = dist.Normal(parts["theta"], sigma).log_prob(y).sum(-1)
    return log_p_mu + log_p_tau + log_p_theta + log_lik


# ---------------------------------------------------------------------------------------------
# Exact quantities by one-dimensional quadrature over tau = 5 tan(phi).


def _log_marginal_given_tau(tau: float) -> float:
    r""":math:`\log p(y \mid \tau) = \log\mathcal{N}(y; 0, 25\,\mathbf{1}\mathbf{1}^\top + D)`,
    :math:`D = \operatorname{diag}(\sigma^2 + \tau^2)`, by the matrix determinant lemma and
    Sherman-Morrison."""
    y, var = Y.numpy(), SIGMA.numpy() ** 2 + tau**2
    s = MU_SCALE**2
    a, b = np.sum(1.0 / var), np.sum(y / var)
    log_det = np.sum(np.log(var)) + math.log1p(s * a)
    quad = np.sum(y**2 / var) - s * b**2 / (1.0 + s * a)
    return -0.5 * (NUM_SCHOOLS * math.log(2 * math.pi) + log_det + quad)


_LOG_SHIFT = _log_marginal_given_tau(0.0)


def _tau(phi: float) -> float:
    return TAU_SCALE * math.tan(phi)


def _weight(phi: float) -> float:
    r"""The unnormalized posterior density of :math:`\phi = \arctan(\tau/5)`, divided by
    :math:`\tfrac{2}{\pi} p(y \mid \tau=0)`: the half-Cauchy prior is uniform in :math:`\phi`."""
    if phi >= math.pi / 2:
        return 0.0
    return math.exp(_log_marginal_given_tau(_tau(phi)) - _LOG_SHIFT)


def _quad(fn: Callable[[float], float]) -> tuple[float, float]:
    value, error = integrate.quad(fn, 0.0, math.pi / 2, epsabs=0.0, epsrel=1e-12, limit=200)
    return value, error


def log_evidence(return_error: bool = False) -> float | tuple[float, float]:
    r"""
    The log marginal likelihood :math:`\log p(y)` of Eight Schools, by one-dimensional
    quadrature. Integrating out :math:`\theta` and :math:`\mu` in closed form,

    .. math::

        y \mid \tau \sim \mathcal{N}\big(0,\; 5^2\,\mathbf{1}\mathbf{1}^\top
        + \operatorname{diag}(\sigma^2 + \tau^2)\big), \qquad
        p(y) = \int_0^\infty \mathrm{HalfCauchy}(\tau; 5)\, p(y \mid \tau)\, d\tau
        = \frac{2}{\pi} \int_0^{\pi/2} p(y \mid 5 \tan\phi)\, d\phi,

    the substitution :math:`\tau = 5\tan\phi` turning the half-Cauchy prior into a uniform one on
    a finite interval (:func:`scipy.integrate.quad`, float64, relative tolerance
    :math:`10^{-12}`). The value is about :math:`-31.31`.

    :param bool return_error: also return quad's absolute error estimate of :math:`\log p(y)`.
    """
    value, error = _quad(_weight)
    log_z = _LOG_SHIFT + math.log(2.0 / math.pi) + math.log(value)
    log_z = float(log_z)
    return (log_z, float(error / value)) if return_error else log_z


def _conditional_moments(tau: float) -> dict[str, np.ndarray]:
    r"""First and second moments given :math:`\tau` and :math:`y`: :math:`\mu \mid \tau, y` is
    Gaussian and :math:`\theta_j, \tilde\theta_j` are linear in :math:`\mu` plus Gaussian noise."""
    y, s2 = Y.numpy(), SIGMA.numpy() ** 2
    var = s2 + tau**2
    v = 1.0 / (1.0 / MU_SCALE**2 + np.sum(1.0 / var))
    m = v * np.sum(y / var)
    shrink = s2 / var  # theta_j = shrink_j mu + (1 - shrink_j) y_j + N(0, tau^2 s2_j / var_j)
    theta_mean = shrink * m + (1 - shrink) * y
    theta_var = shrink**2 * v + tau**2 * s2 / var
    tilde_mean = (1 - shrink) * (y - m) / tau if tau > 0 else np.zeros_like(y)
    tilde_var = ((1 - shrink) ** 2 * v + tau**2 * s2 / var) / tau**2 if tau > 0 else np.ones_like(y)
    return {
        "mu": np.array([m, v + m**2]),
        "tau": np.array([tau, tau**2]),
        "log_tau": np.array([math.log(tau), math.log(tau) ** 2]) if tau > 0 else np.zeros(2),
        "theta": np.stack([theta_mean, theta_var + theta_mean**2]),
        "theta_tilde": np.stack([tilde_mean, tilde_var + tilde_mean**2]),
    }


def exact_posterior_summary() -> pd.DataFrame:
    r"""
    Exact posterior means and standard deviations of ``mu``, ``tau``, ``log_tau``, ``theta[j]``
    and ``theta_tilde[j]``, by the quadrature of :func:`log_evidence` applied to the
    conditional moments given :math:`\tau` (:func:`scipy.integrate.quad_vec`):

    .. math::

        \mu \mid \tau, y \sim \mathcal{N}(m_\tau, v_\tau), \quad
        v_\tau^{-1} = \tfrac{1}{25} + \sum_j \tfrac{1}{\sigma_j^2 + \tau^2}, \quad
        m_\tau = v_\tau \sum_j \tfrac{y_j}{\sigma_j^2 + \tau^2},

    and :math:`\theta_j \mid \mu, \tau, y` is Gaussian with precision
    :math:`\sigma_j^{-2} + \tau^{-2}` [1, section 5.4].

    :returns: a :class:`pandas.DataFrame` indexed by name with columns ``mean`` and ``sd``.

    **References**

    [1] A. Gelman et al. *Bayesian Data Analysis*, 3rd ed. CRC Press, 2013.
    """
    keys = ["mu", "tau", "log_tau", "theta", "theta_tilde"]

    def integrand(phi: float) -> np.ndarray:
        w = _weight(phi)
        if w == 0.0:
            return np.zeros(4 + 2 * 2 * NUM_SCHOOLS + 2)
        moments = _conditional_moments(_tau(phi))
        return w * np.concatenate([moments[k].ravel() for k in keys] + [np.ones(1)])

    total, _ = integrate.quad_vec(integrand, 0.0, math.pi / 2, epsabs=0.0, epsrel=1e-12)
    total = total[:-1] / total[-1]
    rows, pos = {}, 0
    for key in keys:
        width = 2 * (NUM_SCHOOLS if key.startswith("theta") else 1)
        first, second = total[pos : pos + width].reshape(2, -1)
        pos += width
        names = [key] if width == 2 else [f"{key}[{j}]" for j in range(NUM_SCHOOLS)]
        for name, m1, m2 in zip(names, first, second, strict=True):
            rows[name] = {"mean": m1, "sd": math.sqrt(max(m2 - m1**2, 0.0))}
    return pd.DataFrame.from_dict(rows, orient="index")
