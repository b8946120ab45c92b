r"""Csiszár f-divergences, evaluated from the log density ratio ``log u = log p - log q``.

A convex :math:`f` with :math:`f(1) = 0` defines the f-divergence [1, 2]

.. math::

    D_f(P \| Q) = \mathbb{E}_Q\left[f\left(\frac{p}{q}\right)\right]
    \ \ge\ \sup_V\ \mathbb{E}_P[g_f(V)] - \mathbb{E}_Q[f^*(g_f(V))],

where :math:`f^*(t) = \sup_{u > 0} (u t - f(u))` is the convex conjugate and :math:`g_f` an output
activation mapping a real-valued critic :math:`V` into the domain of :math:`f^*` (the f-GAN lower
bound [3]; it is attained where :math:`g_f(V) = f'(p/q)`). The dual
:math:`\tilde f(u) = u f(1/u)` gives :math:`D_f(P \| Q) = D_{\tilde f}(Q \| P)`, so either side
may be sampled (the upper bound of [4] samples the model). Each :class:`Divergence` takes
:math:`x = \log u`, never :math:`u`, as in TensorFlow Probability's ``tfp.vi`` [5].

**Numerics.** For every built-in divergence and every finite ``x`` (tested on
``x ∈ [-1000, 1000]`` in float32 and float64):

* :meth:`~Divergence.f`, :meth:`~Divergence.f_prime` and their autograd gradients with respect to
  ``x`` are never NaN;
* they are finite and accurate wherever the exact value is representable in the dtype (tested
  up to half the largest float; for Amari α with :math:`|\alpha| \gtrsim 30` only up to a
  factor :math:`|\alpha|` below it) and the correctly signed infinity where it is not: Pearson's
  :math:`(u - 1)^2` at ``x = 1000`` is :math:`e^{2000}`, so its value and gradient are ``+inf``;
* in particular, a value or derivative that grows at most linearly in :math:`|x|` is finite on
  the whole range: e.g. :math:`f` of reverse KL and GAN in both directions, and of all but
  Neyman χ² and Amari α < 0 as :math:`u \to 0`; :math:`f'` of forward KL, Jensen-Shannon and GAN.

Relative accuracy is a few ulps except near :math:`u = 1`, where :math:`f(u) = O((u - 1)^2)` and
the error is a few ulps of the neighbouring terms (absolute error ``O(eps · |log u|)``; ``O(eps)``
for Jensen-Shannon). This needs ``expm1``, ``softplus`` and ``log1p`` instead of :math:`u - 1` and
:math:`\log(1 + u)`, and formulas that never multiply an overflowing :math:`e^x` by a factor
whose derivative underflows to 0 (autograd would form ``inf * 0 = NaN``): such factors are
replaced by their asymptotic value where they are constant to working precision.
:class:`DualDivergence`, the generic dual of a user-defined :math:`f`, only has :math:`f`'s
values to work with: where :math:`f(1/u)` under- or overflows it returns 0 or ±inf.

**References**

1. I. Csiszár (1967), "Information-type measures of difference of probability distributions and
   indirect observations", *Studia Sci. Math. Hungarica* 2, 299–318.
2. S. M. Ali, S. D. Silvey (1966), "A general class of coefficients of divergence of one
   distribution from another", *JRSS B* 28(1), 131–142.
3. S. Nowozin, B. Cseke, R. Tomioka (2016), "f-GAN: Training generative neural samplers using
   variational divergence minimization", *NeurIPS* (Table 2: conjugates and activations).
4. M. Zhang, T. Bird, R. Habib, T. Xu, D. Barber (2019), "Variational f-divergence
   minimization", arXiv:1907.11891.
5. TensorFlow Probability, ``tfp.vi`` Csiszár functions
   (``tensorflow_probability/python/vi/csiszar_divergence.py``).
6. S. Amari (2009), "α-divergence is unique, belonging to both f-divergence and Bregman
   divergence classes", *IEEE Trans. Inf. Theory* 55(11), 4925–4931.
7. R. M. Corless, G. H. Gonnet, D. E. G. Hare, D. J. Jeffrey, D. E. Knuth (1996), "On the
   Lambert W function", *Adv. Comput. Math.* 5, 329–359.

Example::

    import torch
    from pyro_fdiv.divergences import get_divergence

    js = get_divergence("js")
    q = torch.distributions.Normal(0.0, 1.0)
    p = torch.distributions.Normal(1.0, 1.0)
    z = q.sample((10000,))
    estimate = js.divergence(p.log_prob(z), q.log_prob(z))  # Monte Carlo JS(P || Q)
"""

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GAN",
    "AmariAlpha",
    "Divergence",
    "DualDivergence",
    "ForwardKL",
    "Jeffreys",
    "JensenShannon",
    "NeymanChi2",
    "PearsonChi2",
    "ReverseKL",
    "SquaredHellinger",
    "TotalVariation",
    "as_divergence",
    "available_divergences",
    "forward_kl",
    "gan",
    "get_divergence",
    "jeffreys",
    "jensen_shannon",
    "js",
    "kl_forward",
    "kl_reverse",
    "neyman_chi2",
    "pearson_chi2",
    "register_divergence",
    "reverse_kl",
    "squared_hellinger",
    "total_variation",
]

_LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Numerical helpers
# ------------------------------------------------------------------------------------------------


def _as_float(x: Tensor | float) -> Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _saturation(x: Tensor) -> float:
    """``s`` with ``e^{-s} = e · eps``: past it, ``1 - e^{-s}`` is 1 to working precision but
    its derivative (``expm1``'s backward uses ``result + 1``) is still nonzero."""
    return -math.log(torch.finfo(x.dtype).eps) - 1.0


def _piecewise(x: Tensor, breaks: list[float], fns: list[Callable]) -> Tensor:
    """``fns[i](x)`` on the i-th of the intervals ``(-inf, breaks[0]], (breaks[0], breaks[1]], ...,
    (breaks[-1], inf)``.

    Each function only sees ``x`` clamped into its own interval, so an overflow or a NaN that it
    would produce outside reaches neither the value nor the gradient.
    """
    edges = [-math.inf, *breaks, math.inf]
    out = fns[0](x.clamp(max=edges[1]))
    for lo, hi, fn in zip(edges[1:-1], edges[2:], fns[1:], strict=True):
        out = torch.where(x > lo, fn(x.clamp(min=lo, max=hi)), out)
    return out


def _limit_at(x: Tensor, at: float, limit: float, fn: Callable) -> Tensor:
    """``fn(x)``, and its limit ``limit`` where ``x`` equals ``at`` (``-inf`` or ``inf``), where
    ``fn`` would form ``0 · inf``. ``fn`` sees 0 there instead, so neither the value nor the
    gradient is NaN (the gradient there is 0, the limit of a derivative that vanishes with a
    bounded function)."""
    edge = x == at
    return torch.where(edge, limit, fn(torch.where(edge, 0.0, x)))


def _restrict(t: Tensor, inside: Tensor, fn: Callable, safe: float = 0.0) -> Tensor:
    """``fn(t)`` where ``inside``, ``+inf`` elsewhere; ``fn`` only sees points inside."""
    return torch.where(inside, fn(torch.where(inside, t, safe)), math.inf)


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)``; torch's default threshold (20) would cost 2e-9 absolute accuracy."""
    return F.softplus(x, threshold=40.0)


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - e^a)`` for ``a < 0`` (Mächler 2012: ``log1p`` below ``-log 2``, else ``expm1``)."""
    return _piecewise(
        a, [-_LOG2], [lambda a: torch.log1p(-torch.exp(a)), lambda a: torch.log(-torch.expm1(a))]
    )


class _ScaledExpm1(torch.autograd.Function):
    """``c expm1(a x)``, finite wherever the exact value is, with derivative ``c a e^{a x}``.

    The derivative is formed in one step: autograd would multiply by ``e^{a x}``, ``a`` and ``c``
    one after the other, which overflows early when ``|a| < 1`` or ``|c| < 1`` (e.g. ``c = 1/a``
    for small ``a``) under a large incoming gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, a: float, c: float) -> Tensor:
        y = a * x
        large = math.copysign(1.0, c) * torch.exp(y + math.log(abs(c))) - c
        return torch.where(y <= 1, c * torch.expm1(y), large)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, ctx.a, ctx.c = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        a, c = ctx.a, ctx.c
        slope = math.copysign(1.0, a * c) * torch.exp(a * x + math.log(abs(a * c)))
        return grad * slope, None, None


def _expm1(x: Tensor, a: float, c: float = 1.0) -> Tensor:
    """``c expm1(a x)`` (see :class:`_ScaledExpm1`)."""
    return _ScaledExpm1.apply(x, a, c)


def _expm1_over(a: float, x: Tensor) -> Tensor:
    """``E_a(x) = expm1(a x) / a``, and ``x`` at ``a = 0``."""
    return x if a == 0 else _expm1(x, a, 1 / a)


def _u_softplus_neg(x: Tensor) -> Tensor:
    """``u log(1 + 1/u) = e^x softplus(-x)``, in [0, 1); for ``x > 10`` its series in ``e^{-x}``
    (error < 1e-18), which never forms ``e^x = inf`` times ``softplus(-x) = 0``."""

    def series(x: Tensor) -> Tensor:
        y = torch.exp(-x)
        return 1 - y * (1 / 2 - y * (1 / 3 - y / 4))

    def product(x: Tensor) -> Tensor:  # 0 at u = 0 (x = -inf), not 0 * inf
        return _limit_at(x, -math.inf, 0.0, lambda x: torch.exp(x) * _softplus(-x))

    return _piecewise(x, [10.0], [product, series])


def _gan_f(x: Tensor) -> Tensor:
    """``u log u - (1 + u) log(1 + u) = -u softplus(-x) - softplus(x)``."""
    return -_u_softplus_neg(x) - _softplus(x)


def _mul_exp(x: Tensor, y: Tensor) -> Tensor:
    """``e^x y`` as ``sign(y) e^{x + log|y|}``, which never forms ``0 · inf``; where ``y`` is 0 or
    infinite the result is ``y`` itself."""
    regular = torch.isfinite(y) & (y != 0)
    y_safe = torch.where(regular, y, 1.0)
    return torch.where(regular, y_safe.sign() * torch.exp(x + y_safe.abs().log()), y)


def _log_lambertw_exp(y: Tensor, iterations: int = 6) -> Tensor:
    r"""``log W(e^y)``: the root :math:`\ell` of :math:`\ell + e^\ell = y`, by Newton's method in
    log space [7] (no overflow for any finite ``y``).

    Started from :math:`y - \sigma(y)` for :math:`y \le 1` and from the asymptotic expansion
    :math:`\log(y - \log y + \log(y) / y)` above, it reaches working precision within the given
    iterations. Only a last step is differentiated: at the root it gives the exact implicit
    gradient :math:`d\ell/dy = 1 / (1 + e^\ell)`.
    """

    def newton(ell: Tensor) -> Tensor:
        return ell - (ell + torch.exp(ell) - y) / (1 + torch.exp(ell))

    with torch.no_grad():
        large = torch.where(y > 1, y, 2.0)
        log_large = torch.log(large)
        ell = torch.where(
            y > 1, torch.log(large - log_large + log_large / large), y - torch.sigmoid(y)
        )
        for _ in range(iterations):
            ell = newton(ell)
    return newton(ell)


# ------------------------------------------------------------------------------------------------
# Base class
# ------------------------------------------------------------------------------------------------


class Divergence:
    r"""A Csiszár f-divergence :math:`D_f(P \| Q) = \mathbb{E}_Q[f(p/q)]`, with :math:`f`
    evaluated from :math:`x = \log u`.

    Subclasses implement ``_f(x)`` and ``_f_prime(x)`` (:math:`f(e^x)` and :math:`f'(e^x)` on
    floating tensors) and, where they have closed forms, ``_conjugate(t)``,
    ``_critic_activation(v)`` and :meth:`dual` (optionally a fused ``_critic_conjugate(v)``).
    Divergences compare equal when they have the same class and parameters. A user-defined
    :math:`f`, here the triangular discrimination, gets the generic :class:`DualDivergence`::

        class Triangular(Divergence):
            name = "triangular"  # f(u) = (u - 1)^2 / (u + 1)

            def _f(self, x):
                return torch.expm1(x) ** 2 / (1 + torch.exp(x))

            def _f_prime(self, x):
                u = torch.exp(x)
                return torch.expm1(x) * (u + 3) / (u + 1) ** 2

        register_divergence("triangular", Triangular)
        get_divergence("triangular").dual()  # DualDivergence(Triangular())
    """

    #: Registry name.
    name: str = "divergence"
    #: Whether :math:`D_f(P \| Q) = D_f(Q \| P)`, i.e. :math:`f` equals its dual.
    symmetric: bool = False

    def f(self, log_u: Tensor | float) -> Tensor:
        r""":math:`f(u)` at :math:`u = e^{\log u}`."""
        return self._f(_as_float(log_u))

    def __call__(self, log_u: Tensor | float) -> Tensor:
        return self.f(log_u)

    def f_prime(self, log_u: Tensor | float) -> Tensor:
        r""":math:`f'(u)` at :math:`u = e^{\log u}` (so ``d f / d log_u = u f'(u)``)."""
        return self._f_prime(_as_float(log_u))

    def conjugate(self, t: Tensor | float) -> Tensor:
        r"""The convex conjugate :math:`f^*(t) = \sup_{u > 0} (u t - f(u))`, ``+inf`` outside its
        domain; by Fenchel-Young, :math:`f^*(f'(u)) = u f'(u) - f(u)`."""
        return self._conjugate(_as_float(t))

    def critic_activation(self, v: Tensor | float) -> Tensor:
        r"""The f-GAN output activation :math:`g_f`, mapping a real critic output into the domain of
        :math:`f^*` [3]."""
        return self._critic_activation(_as_float(v))

    def critic_conjugate(self, v: Tensor | float) -> Tensor:
        r""":math:`f^*(g_f(v))`, the f-GAN term under :math:`Q`, fused where composing the two
        would lose precision or saturate (e.g. :math:`g_f(v) = 1 - e^{-v}` rounds to 1 in float32
        for :math:`v > 17`)."""
        return self._critic_conjugate(_as_float(v))

    def dual(self) -> "Divergence":
        r"""The divergence of :math:`\tilde f(u) = u f(1/u)`, for which
        :math:`D_f(P \| Q) = D_{\tilde f}(Q \| P)`."""
        return DualDivergence(self)

    def divergence(self, log_p: Tensor, log_q: Tensor, dim: int = 0) -> Tensor:
        r"""Monte Carlo estimate of :math:`D_f(P \| Q) = \mathbb{E}_Q[f(p/q)]` from samples of
        :math:`Q`: the mean over ``dim`` of :math:`f(\log p - \log q)`."""
        return self.f(_as_float(log_p) - _as_float(log_q)).mean(dim)

    def _f(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _f")

    def _f_prime(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _f_prime")

    def _conjugate(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{self!r} has no closed-form convex conjugate")

    def _critic_activation(self, v: Tensor) -> Tensor:
        raise NotImplementedError(f"{self!r} has no f-GAN critic activation")

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return self._conjugate(self._critic_activation(v))

    @property
    def _params(self) -> tuple:
        return ()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._params == other._params

    def __hash__(self) -> int:
        return hash((type(self), self._params))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self._params))})"


# ------------------------------------------------------------------------------------------------
# Built-in divergences
# ------------------------------------------------------------------------------------------------


class ForwardKL(Divergence):
    r"""Forward Kullback-Leibler: :math:`D_f(P \| Q) = \mathrm{KL}(P \| Q)`.

    .. math::

        f(u) = u \log u, \quad f'(u) = 1 + \log u, \quad f^*(t) = e^{t - 1}, \quad g_f(v) = v.

    Not symmetric; the dual is :class:`ReverseKL`. ``x * exp(x)`` tends to 0 as :math:`u \to 0`,
    and is 0 (with gradient 0) at ``x = -inf``.
    """

    name = "forward_kl"

    def _f(self, x: Tensor) -> Tensor:
        return _limit_at(x, -math.inf, 0.0, lambda x: x * torch.exp(x))

    def _f_prime(self, x: Tensor) -> Tensor:
        return 1 + x

    def _conjugate(self, t: Tensor) -> Tensor:
        return torch.exp(t - 1)

    def _critic_activation(self, v: Tensor) -> Tensor:
        return v

    def dual(self) -> Divergence:
        return ReverseKL()


class ReverseKL(Divergence):
    r"""Reverse Kullback-Leibler: :math:`D_f(P \| Q) = \mathrm{KL}(Q \| P)`.

    .. math::

        f(u) = -\log u, \quad f'(u) = -\frac{1}{u}, \quad
        f^*(t) = -1 - \log(-t) \ (t < 0), \quad g_f(v) = -e^{-v}.

    Not symmetric; the dual is :class:`ForwardKL`. :math:`f = -x` is exact on the whole range.
    """

    name = "reverse_kl"

    def _f(self, x: Tensor) -> Tensor:
        return -x

    def _f_prime(self, x: Tensor) -> Tensor:
        return -torch.exp(-x)

    def _conjugate(self, t: Tensor) -> Tensor:
        return _restrict(t, t < 0, lambda t: -1 - torch.log(-t), safe=-1.0)

    def _critic_activation(self, v: Tensor) -> Tensor:
        return -torch.exp(-v)

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return v - 1

    def dual(self) -> Divergence:
        return ForwardKL()


class GAN(Divergence):
    r"""The divergence of the GAN discriminator (Goodfellow et al. 2014):
    :math:`D_f = 2\,\mathrm{JS} - \log 4`.

    .. math::

        f(u) = u \log u - (1 + u) \log(1 + u), \quad f'(u) = \log \frac{u}{1 + u}, \quad
        f^*(t) = -\log(1 - e^t) \ (t < 0), \quad g_f(v) = -\mathrm{softplus}(-v).

    Note :math:`f(1) = -\log 4 \ne 0`. Symmetric (self-dual). Computed as
    :math:`-u\,\mathrm{softplus}(-x) - \mathrm{softplus}(x)`: finite for every finite ``x``
    (linear growth), with :math:`u\,\mathrm{softplus}(-x) \in [0, 1)` from its series for large
    ``x``; its limits :math:`f(0) = 0` and :math:`-\infty` at ``x = -inf, inf``.
    :math:`g_f(v) = f'(e^v)`, so the optimal critic is :math:`V = \log(p/q)`.
    """

    name = "gan"
    symmetric = True

    def _f(self, x: Tensor) -> Tensor:
        return _gan_f(x)

    def _f_prime(self, x: Tensor) -> Tensor:
        return -_softplus(-x)

    def _conjugate(self, t: Tensor) -> Tensor:
        return _restrict(t, t < 0, lambda t: -_log1mexp(t), safe=-1.0)

    def _critic_activation(self, v: Tensor) -> Tensor:
        return -_softplus(-v)

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return _softplus(v)

    def dual(self) -> Divergence:
        return self


class JensenShannon(Divergence):
    r"""Jensen-Shannon, :math:`\tfrac12 \mathrm{KL}(P \| M) + \tfrac12 \mathrm{KL}(Q \| M)` with
    :math:`M = (P + Q) / 2`, in :math:`[0, \log 2]`.

    .. math::

        f(u) = \tfrac12 \left[u \log u - (1 + u) \log \tfrac{1 + u}{2}\right], \quad
        f'(u) = \tfrac12 \log \tfrac{2u}{1 + u},

        f^*(t) = -\tfrac12 \log(2 - e^{2t}) \ (t < \tfrac12 \log 2), \quad
        g_f(v) = \tfrac12 (\log 2 - \mathrm{softplus}(-v)).

    :math:`f` is half the generator in the f-GAN table [3], hence
    :math:`f^*(t) = \tfrac12 f^*_{[3]}(2t)`. Symmetric (self-dual). Computed as
    :math:`\tfrac12[f_{\mathrm{GAN}}(u) + (1 + u)\log 2]` with
    :math:`\tfrac12 u \log 2 = e^{x + \log(\log(2)/2)}`, so it overflows only where the exact
    value does; absolute error ``O(eps)`` near :math:`u = 1`. Where
    :math:`\tfrac12 u \log 2` exceeds the rest, :math:`\tfrac12(\log 2 - 1 - x)`, by a factor
    of :math:`1/\epsilon` the rest is dropped, so ``x = inf`` gives ``inf``, not ``inf - inf``;
    ``x = -inf`` gives the limit :math:`f(0) = \tfrac12 \log 2`. :math:`g_f(v) = f'(e^v)`.
    """

    name = "jensen_shannon"
    symmetric = True

    def _f(self, x: Tensor) -> Tensor:
        def full(x: Tensor) -> Tensor:
            return torch.exp(x + math.log(_LOG2 / 2)) + (_LOG2 + _gan_f(x)) / 2

        s = _saturation(x) + 1.0  # -log(eps)
        tail = s + 2 * math.log(s)  # (x + 1) / (u log 2) < eps / 2 beyond
        return _piecewise(x, [tail], [full, lambda x: torch.exp(x + math.log(_LOG2 / 2))])

    def _f_prime(self, x: Tensor) -> Tensor:
        return (_LOG2 - _softplus(-x)) / 2

    def _conjugate(self, t: Tensor) -> Tensor:
        return _restrict(t, t < _LOG2 / 2, lambda t: -(_LOG2 + _log1mexp(2 * t - _LOG2)) / 2)

    def _critic_activation(self, v: Tensor) -> Tensor:
        return (_LOG2 - _softplus(-v)) / 2

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return (_softplus(v) - _LOG2) / 2

    def dual(self) -> Divergence:
        return self


class PearsonChi2(Divergence):
    r"""Pearson χ²: :math:`D_f(P \| Q) = \int (p - q)^2 / q`.

    .. math::

        f(u) = (u - 1)^2, \quad f'(u) = 2 (u - 1), \quad
        f^*(t) = \tfrac14 s^2 + s,\ s = \max(t, -2), \quad g_f(v) = v.

    The conjugate is over :math:`u > 0`: below :math:`t = f'(0) = -2` it is :math:`-f(0) = -1`
    (the f-GAN table's :math:`t^2/4 + t` extends :math:`f` to :math:`u < 0`; ours is smaller, so
    the lower bound is tighter). Not symmetric; the dual is :class:`NeymanChi2`.
    """

    name = "pearson_chi2"

    def _f(self, x: Tensor) -> Tensor:
        return torch.expm1(x) ** 2

    def _f_prime(self, x: Tensor) -> Tensor:
        return 2 * torch.expm1(x)

    def _conjugate(self, t: Tensor) -> Tensor:
        s = t.clamp(min=-2)
        return s * (s / 4 + 1)

    def _critic_activation(self, v: Tensor) -> Tensor:
        return v

    def dual(self) -> Divergence:
        return NeymanChi2()


class NeymanChi2(Divergence):
    r"""Neyman χ²: :math:`D_f(P \| Q) = \int (p - q)^2 / p`.

    .. math::

        f(u) = \frac{(1 - u)^2}{u} = 4 \sinh^2 \tfrac{x}{2}, \quad f'(u) = 1 - \frac{1}{u^2},
        \quad f^*(t) = 2 - 2\sqrt{1 - t} \ (t \le 1), \quad g_f(v) = 1 - e^{-v}.

    Not symmetric; the dual is :class:`PearsonChi2`. :math:`f` is :math:`4 \sinh^2(x/2)` for
    :math:`|x| \le 2` and :math:`2 (\cosh x - 1)` beyond, whose autograd derivative
    :math:`2 \sinh x` overflows only where the exact one does; the conjugate is evaluated as
    :math:`2t / (1 + \sqrt{1 - t})` (no cancellation near 0).
    """

    name = "neyman_chi2"

    def _f(self, x: Tensor) -> Tensor:
        def center(x: Tensor) -> Tensor:
            return 4 * torch.sinh(x / 2) ** 2

        def tail(x: Tensor) -> Tensor:
            return 2 * (torch.cosh(x) - 1)

        return _piecewise(x, [-2.0, 2.0], [tail, center, tail])

    def _f_prime(self, x: Tensor) -> Tensor:
        return -torch.expm1(-2 * x)

    def _conjugate(self, t: Tensor) -> Tensor:
        return _restrict(t, t <= 1, lambda t: 2 * t / (1 + torch.sqrt(1 - t)))

    def _critic_activation(self, v: Tensor) -> Tensor:
        return -torch.expm1(-v)

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return -2 * torch.expm1(-v / 2)

    def dual(self) -> Divergence:
        return PearsonChi2()


class SquaredHellinger(Divergence):
    r"""Squared Hellinger, :math:`\int (\sqrt p - \sqrt q)^2 = 2 (1 - \int \sqrt{p q})` (twice the
    convention with a factor :math:`\tfrac12`).

    .. math::

        f(u) = (\sqrt u - 1)^2, \quad f'(u) = 1 - u^{-1/2}, \quad
        f^*(t) = \frac{t}{1 - t} \ (t < 1), \quad g_f(v) = 1 - e^{-v}.

    Symmetric (self-dual). :math:`f = \mathrm{expm1}(x/2)^2` and
    :math:`f' = -\mathrm{expm1}(-x/2)`, with the derivative :math:`\pm\frac12 e^{\pm x/2}` of
    ``expm1`` formed in one step, so gradients overflow only where the exact ones do.
    """

    name = "squared_hellinger"
    symmetric = True

    def _f(self, x: Tensor) -> Tensor:
        return _expm1(x, 0.5) ** 2

    def _f_prime(self, x: Tensor) -> Tensor:
        return _expm1(x, -0.5, -1.0)

    def _conjugate(self, t: Tensor) -> Tensor:
        return _restrict(t, t < 1, lambda t: t / (1 - t))

    def _critic_activation(self, v: Tensor) -> Tensor:
        return -torch.expm1(-v)

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return torch.expm1(v)

    def dual(self) -> Divergence:
        return self


class TotalVariation(Divergence):
    r"""Total variation, :math:`\tfrac12 \int |p - q|`, in :math:`[0, 1]`.

    .. math::

        f(u) = \tfrac12 |u - 1|, \quad f'(u) = \tfrac12 \operatorname{sign}(u - 1), \quad
        f^*(t) = \max(t, -\tfrac12) \ (t \le \tfrac12), \quad g_f(v) = \tfrac12 \tanh v.

    :math:`f'(1) = 0` is a subgradient. Over :math:`u > 0` the conjugate is :math:`-f(0) = -1/2`
    below :math:`t = -1/2` (the f-GAN table only gives :math:`|t| \le 1/2`, the range of
    :math:`g_f`). Symmetric (self-dual). For :math:`u > e` it is
    :math:`e^{x - \log 2} - \tfrac12`, which overflows only where the exact value does.
    """

    name = "total_variation"
    symmetric = True

    def _f(self, x: Tensor) -> Tensor:
        return _piecewise(
            x, [1.0], [lambda x: torch.expm1(x).abs() / 2, lambda x: torch.exp(x - _LOG2) - 1 / 2]
        )

    def _f_prime(self, x: Tensor) -> Tensor:
        return torch.sign(x) / 2

    def _conjugate(self, t: Tensor) -> Tensor:
        return _restrict(t, t <= 1 / 2, lambda t: t.clamp(min=-1 / 2))

    def _critic_activation(self, v: Tensor) -> Tensor:
        return torch.tanh(v) / 2

    def dual(self) -> Divergence:
        return self


class Jeffreys(Divergence):
    r"""Jeffreys, :math:`\mathrm{KL}(P \| Q) + \mathrm{KL}(Q \| P)`.

    .. math::

        f(u) = (u - 1) \log u, \quad f'(u) = \log u + 1 - \frac1u, \quad g_f(v) = v,

        f^*(t) = W(e^{1 - t}) + \frac{1}{W(e^{1 - t})} + t - 2
               = \mathrm{expm1}(-\ell) - \ell, \quad \ell = \log W(e^{1 - t}),

    with the Lambert W function [7] computed in log space by Newton's method (no overflow for
    any finite :math:`t`). Symmetric (self-dual).
    """

    name = "jeffreys"
    symmetric = True

    def _f(self, x: Tensor) -> Tensor:
        # below log(eps) - 1, x e^x is below eps / e of -x: f = -x, also at x = -inf
        # (where x * expm1(x) has the gradient expm1(x) + x e^x = -1 + (-inf * 0))
        return _piecewise(x, [-_saturation(x) - 2.0], [torch.neg, lambda x: x * torch.expm1(x)])

    def _f_prime(self, x: Tensor) -> Tensor:
        return x - torch.expm1(-x)

    def _conjugate(self, t: Tensor) -> Tensor:
        ell = _log_lambertw_exp(1 - t)
        return torch.expm1(-ell) - ell

    def _critic_activation(self, v: Tensor) -> Tensor:
        return v

    def dual(self) -> Divergence:
        return self


class AmariAlpha(Divergence):
    r"""Amari's α-divergence [6], the f-divergence of

    .. math::

        f_\alpha(u) = \frac{u^\alpha - 1 - \alpha (u - 1)}{\alpha (\alpha - 1)}, \quad
        f_\alpha'(u) = \frac{u^{\alpha - 1} - 1}{\alpha - 1}, \quad
        g_f(v) = f_\alpha'(e^v) = \frac{\mathrm{expm1}((\alpha - 1) v)}{\alpha - 1},

        f_\alpha^*(t) = \frac{s^{\alpha / (\alpha - 1)} - 1}{\alpha}, \quad
        s = 1 + (\alpha - 1) t > 0

    (from :math:`t = f'(u) \Rightarrow u^{\alpha - 1} = s` and
    :math:`f^*(t) = (u^\alpha - 1)/\alpha`). Where :math:`s \le 0` the conjugate is ``+inf`` for
    :math:`0 \le \alpha < 1` and :math:`-f(0) = -1/\alpha` for :math:`\alpha > 1`; for
    :math:`\alpha < 0` it is :math:`-1/\alpha` at :math:`s = 0` and ``+inf`` for :math:`s < 0`.

    :math:`\alpha = 1` is :math:`u \log u - u + 1` and :math:`\alpha = 0` is
    :math:`u - 1 - \log u`: forward and reverse KL plus a linear term that leaves :math:`D_f`
    unchanged for normalized densities.
    :math:`\alpha = 2` is half Pearson χ², :math:`\alpha = -1` half Neyman χ²,
    :math:`\alpha = 1/2` twice the squared Hellinger. The dual is ``AmariAlpha(1 - alpha)``;
    symmetric only for :math:`\alpha = 1/2`. Since :math:`g_f(v) = f'(e^v)`, the optimal critic
    is :math:`V = \log(p/q)`.

    With :math:`E_a(x) = \mathrm{expm1}(a x)/a` (:math:`E_0(x) = x`), :math:`f_\alpha` is
    :math:`[\mathrm{expm1}(x) - E_\alpha(x)]/(1 - \alpha)` for :math:`\alpha < 1/2` and
    :math:`[u E_{\alpha - 1}(x) - \mathrm{expm1}(x)]/\alpha` otherwise, which are continuous in
    α through the limits 0 and 1 and accurate near them. Where :math:`e^x` or
    :math:`e^{\alpha x}` dominates the others below working precision, its leading term is used.

    :param float alpha: any finite real number.
    """

    name = "amari_alpha"

    def __init__(self, alpha: float) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"Expected alpha to be a real number, actual {alpha!r}")
        if not math.isfinite(alpha):
            raise ValueError(f"Expected alpha to be a finite real number, actual {alpha!r}")
        self.alpha: float = float(alpha)
        self.symmetric = self.alpha == 0.5

    @property
    def _params(self) -> tuple:
        return (self.alpha,)

    def _f(self, x: Tensor) -> Tensor:
        a, s = self.alpha, _saturation(x)
        breaks: list[float]
        fns: list[Callable[[Tensor], Tensor]]
        if a >= 0.5:  # accurate near α = 1
            breaks, fns = [0.0], [self._f_upper_below, self._f_upper_above]
        else:  # accurate near α = 0
            breaks, fns = [], [self._f_lower]
        if a < 0:  # e^{αx} / (α(α - 1)) dominates as x -> -inf
            breaks.insert(0, -(s + math.log1p(-2 * a)) / -a)
            fns.insert(0, lambda x: torch.exp(a * x - math.log(a * (a - 1))))
        if a < 1 and a != 0:  # u / (1 - α) dominates as x -> +inf
            breaks.append(
                s / (1 - a) if a >= 0.5 else (s + math.log(2 + 2 / abs(a))) / (1 - max(a, 0))
            )
            fns.append(lambda x: torch.exp(x - math.log1p(-a)))
        elif a == 0:  # u - 1 - x: u dominates by 1 / eps beyond (and x = inf is not inf - inf)
            breaks.append(s + 1 + 2 * math.log(s + 1))
            fns.append(torch.exp)
        return _piecewise(x, breaks, fns)

    def _f_lower(self, x: Tensor) -> Tensor:
        """``[expm1(x) - E_α(x)] / (1 - α)``, for α < 1/2."""
        return (torch.expm1(x) - _expm1_over(self.alpha, x)) / (1 - self.alpha)

    def _f_upper_below(self, x: Tensor) -> Tensor:
        """``[u E_{α-1}(x) - expm1(x)] / α`` for α >= 1/2 and x <= 0, with the product taken as
        ``u^α E_{1-α}(x)`` for α < 1 so that neither factor overflows."""
        a = self.alpha
        if a < 1:
            return (torch.exp(a * x) * _expm1_over(1 - a, x) - torch.expm1(x)) / a

        def product(x: Tensor) -> Tensor:  # 0 at x = -inf (for α = 1, x e^x: not -inf * 0)
            return torch.exp(x) * _expm1_over(a - 1, x)

        return (_limit_at(x, -math.inf, 0.0, product) - torch.expm1(x)) / a

    def _f_upper_above(self, x: Tensor) -> Tensor:
        """The same, as ``u [E_{α-1}(x) + expm1(-x)] / α`` for x >= 0, with ``expm1(-x)`` frozen
        where it is -1 to working precision (its derivative would underflow to 0 under an infinite
        ``u``, and autograd would form ``inf * 0``)."""
        a, s = self.alpha, _saturation(x)
        bracket = _expm1_over(a - 1, x) + torch.expm1(-x.clamp(max=s))
        return torch.exp(x - math.log(a)) * bracket

    def _f_prime(self, x: Tensor) -> Tensor:
        return _expm1_over(self.alpha - 1, x)

    def _conjugate(self, t: Tensor) -> Tensor:
        a = self.alpha
        if a == 1:
            return torch.expm1(t)
        if a == 0:
            return _restrict(t, t < 1, lambda t: -torch.log1p(-t))
        s = 1 + (a - 1) * t
        power = a / (a - 1)
        value = _restrict(t, s > 0, lambda t: torch.expm1(power * torch.log1p((a - 1) * t)) / a)
        if a > 1:
            return torch.where(s > 0, value, -1 / a)
        if a < 0:
            return torch.where(s == 0, -1 / a, value)
        return value

    def _critic_activation(self, v: Tensor) -> Tensor:
        return _expm1_over(self.alpha - 1, v)

    def _critic_conjugate(self, v: Tensor) -> Tensor:
        return _expm1_over(self.alpha, v)

    def dual(self) -> Divergence:
        return AmariAlpha(1 - self.alpha)


class DualDivergence(Divergence):
    r"""The dual :math:`\tilde f(u) = u f(1/u)` of any divergence, so that
    :math:`D_{\tilde f}(P \| Q) = D_f(Q \| P)`; for a user-defined :math:`f`.

    .. math::

        \tilde f(u) = u f(1/u), \quad \tilde f'(u) = f(1/u) - \frac{f'(1/u)}{u}.

    The product :math:`u f(1/u)` is taken in log space, never as ``0 * inf``; where
    :math:`f(1/u)` itself under- or overflows, the result is 0 or ±inf. :math:`\tilde f'` is a
    difference of terms of size :math:`f(1/u)` and loses absolute precision
    :math:`\epsilon |f(1/u)|` (and may be NaN where both overflow). Built-in divergences have exact
    closed-form duals (see their :meth:`dual`); ``DualDivergence(d).dual()`` is ``d``. Symmetric
    when the base is. No closed-form conjugate or critic activation.

    :param Divergence base: the divergence whose dual this is.
    """

    def __init__(self, base: Divergence) -> None:
        if not isinstance(base, Divergence):
            raise TypeError(f"Expected base to be a Divergence, actual {base!r}")
        self.base = base
        self.name = f"dual_{base.name}"
        self.symmetric = base.symmetric

    @property
    def _params(self) -> tuple:
        return (self.base,)

    def _f(self, x: Tensor) -> Tensor:
        return _mul_exp(x, self.base.f(-x))

    def _f_prime(self, x: Tensor) -> Tensor:
        return self.base.f(-x) - _mul_exp(-x, self.base.f_prime(-x))

    def dual(self) -> Divergence:
        return self.base


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Divergence]] = {}


def register_divergence(
    name: str, cls_or_factory: Callable[..., Divergence], *, overwrite: bool = False
) -> None:
    """Make ``get_divergence(name, **kwargs)`` return ``cls_or_factory(**kwargs)``.

    :param str name: the registry name.
    :param callable cls_or_factory: a :class:`Divergence` subclass or any callable returning one.
    :param bool overwrite: replace an existing registration of ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected name to be a non-empty string, actual {name!r}")
    if not callable(cls_or_factory):
        raise TypeError(f"Expected cls_or_factory to be callable, actual {cls_or_factory!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls_or_factory and not overwrite:
        raise ValueError(
            f"Divergence name {name!r} is already registered to {_REGISTRY[name]!r}; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[name] = cls_or_factory


def available_divergences() -> list[str]:
    """The registered names (aliases included), sorted."""
    return sorted(_REGISTRY)


def get_divergence(name: str | Divergence, **kwargs: Any) -> Divergence:
    """Look up a divergence by registry name, e.g. ``get_divergence("amari_alpha", alpha=0.5)``.

    :param name: a registered name (see :func:`available_divergences`), or a :class:`Divergence`
        instance, which is returned as is.
    :param kwargs: constructor arguments.
    :raises ValueError: for an unknown name.
    """
    if isinstance(name, Divergence):
        if kwargs:
            raise ValueError(f"Expected no kwargs with a Divergence instance, actual {kwargs}")
        return name
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown divergence {name!r}; expected one of the known names "
            f"{available_divergences()} or a Divergence instance"
        )
    divergence = _REGISTRY[name](**kwargs)
    if not isinstance(divergence, Divergence):
        raise TypeError(f"Factory for {name!r} returned {divergence!r}, not a Divergence")
    return divergence


def as_divergence(f: str | Divergence, argument: str = "f") -> Divergence:
    """The divergence an objective's argument names: a :class:`Divergence` instance as is, or
    a registry name without parameters (see :func:`available_divergences`).

    Unlike :func:`get_divergence`, a family whose constructor needs parameters (Amari's
    ``alpha``) is refused with the instance to pass instead.

    :param f: a registered name or a :class:`Divergence`.
    :param str argument: the argument's name in error messages (e.g. ``"guide_f"``).
    :raises ValueError: for an unknown name, a name that needs parameters, or another type.
    """
    if isinstance(f, Divergence):
        return f
    if isinstance(f, str):
        try:
            return get_divergence(f)
        except TypeError as err:  # a family that needs its parameters, e.g. Amari's alpha
            raise ValueError(
                f"Divergence {f!r} needs parameters ({err}): pass an instance as {argument}, "
                f"e.g. {argument}=get_divergence({f!r}, alpha=0.5) for the order alpha of "
                "'amari_alpha'"
            ) from err
    raise ValueError(f"Expected {argument} to be a divergence name or a Divergence, actual {f!r}")


for _cls in (
    ForwardKL,
    ReverseKL,
    JensenShannon,
    GAN,
    PearsonChi2,
    NeymanChi2,
    SquaredHellinger,
    TotalVariation,
    Jeffreys,
    AmariAlpha,
):
    register_divergence(_cls.name, _cls)
register_divergence("kl_forward", ForwardKL)
register_divergence("kl_reverse", ReverseKL)
register_divergence("js", JensenShannon)
del _cls

forward_kl = kl_forward = ForwardKL()
reverse_kl = kl_reverse = ReverseKL()
jensen_shannon = js = JensenShannon()
gan = GAN()
pearson_chi2 = PearsonChi2()
neyman_chi2 = NeymanChi2()
squared_hellinger = SquaredHellinger()
total_variation = TotalVariation()
jeffreys = Jeffreys()
