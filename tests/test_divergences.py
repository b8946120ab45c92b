"""Csiszár f-functions: closed forms, duals, conjugates, f-GAN bound, numerics and the registry."""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_fdiv import divergences
from pyro_fdiv.divergences import (
    AmariAlpha,
    Divergence,
    DualDivergence,
    available_divergences,
    forward_kl,
    gan,
    get_divergence,
    jensen_shannon,
    neyman_chi2,
    pearson_chi2,
    register_divergence,
    reverse_kl,
    squared_hellinger,
    total_variation,
)

ALPHAS = [0.0, 1.0, 0.5, 2.0, -1.0]
#: Every registered divergence (aliases once) and Amari α at the required values.
DIVERGENCES = list(
    dict.fromkeys(get_divergence(n) for n in available_divergences() if n != "amari_alpha")
) + [AmariAlpha(a) for a in ALPHAS]
#: Amari α next to its limits and far from them, for the numerics.
EXTRA_AMARI = [AmariAlpha(a) for a in (1e-12, -1e-12, 1 - 1e-12, 1 + 1e-12, 0.3, 0.9, 3.0, -4.0)]
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def ids(d):
    return repr(d)


@pytest.fixture(scope="module", autouse=True)
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def naive(d, u, m=torch):
    """``(f(u), f'(u), f''(u))`` straight from the formula table, with ``m`` torch or mpmath."""
    log, sqrt, one = m.log, m.sqrt, u / u
    table = {
        "forward_kl": (u * log(u), 1 + log(u), 1 / u),
        "reverse_kl": (-log(u), -1 / u, 1 / u**2),
        "jensen_shannon": (
            (u * log(u) - (1 + u) * log((1 + u) / 2)) / 2,
            log(2 * u / (1 + u)) / 2,
            1 / (2 * u * (1 + u)),
        ),
        "gan": (u * log(u) - (1 + u) * log(1 + u), log(u / (1 + u)), 1 / (u * (1 + u))),
        "pearson_chi2": ((u - 1) ** 2, 2 * (u - 1), 2 * one),
        "neyman_chi2": ((1 - u) ** 2 / u, 1 - 1 / u**2, 2 / u**3),
        "squared_hellinger": ((sqrt(u) - 1) ** 2, 1 - 1 / sqrt(u), u**-1.5 / 2),
        "total_variation": (abs(u - 1) / 2, m.sign(u - 1) / 2, 0 * one),
        "jeffreys": ((u - 1) * log(u), log(u) + 1 - 1 / u, 1 / u + 1 / u**2),
    }
    if d.name in table:
        return table[d.name]
    a = d.alpha
    if a == 1:
        return u * log(u) - u + 1, log(u), 1 / u
    if a == 0:
        return u - 1 - log(u), 1 - 1 / u, 1 / u**2
    return (u**a - 1 - a * (u - 1)) / (a * (a - 1)), (u ** (a - 1) - 1) / (a - 1), u ** (a - 2)


def grid(lo, hi, n, avoid_one=True):
    x = torch.linspace(lo, hi, n)
    return x[x != 0] if avoid_one else x


# ------------------------------------------------------------------------------------------------
# f itself: normalization, derivative, convexity, agreement with the table
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_f_at_one(d):
    expected = -math.log(4) if d == gan else 0.0
    assert d.f(0.0).item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_f_prime_is_derivative_in_u(d):
    u = torch.exp(grid(-6, 6, 241)).requires_grad_()
    (df_du,) = torch.autograd.grad(d.f(torch.log(u)).sum(), u)
    assert torch.allclose(d.f_prime(torch.log(u)), df_du, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_convex_second_differences(d):
    u = torch.linspace(1e-3, 20, 4001)
    fu = d.f(torch.log(u))
    second = fu[:-2] - 2 * fu[1:-1] + fu[2:]
    assert (second >= -1e-12 * fu.abs()[1:-1].clamp(min=1)).all()


@HYPOTHESIS
@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
@given(
    x1=st.floats(-8, 8),
    x2=st.floats(-8, 8),
    lam=st.floats(0, 1),
)
def test_convex_and_fenchel_young(d, x1, x2, lam):
    u1, u2 = math.exp(x1), math.exp(x2)
    mix = torch.tensor(lam * u1 + (1 - lam) * u2).log()
    f1, f2, f_mix = d.f(x1).item(), d.f(x2).item(), d.f(mix).item()
    assert f_mix <= lam * f1 + (1 - lam) * f2 + 1e-9 * (1 + abs(f1) + abs(f2))
    # Fenchel-Young inequality f(u) + f*(t) >= u t, with equality at t = f'(u).
    t = d.f_prime(x2).item()
    assert f1 + d.conjugate(t).item() >= u1 * t - 1e-9 * (1 + abs(f1) + abs(u1 * t))


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_agrees_with_naive_formulas(d):
    x = grid(-5, 5, 1001)
    f, f_prime, _ = naive(d, torch.exp(x))
    assert torch.allclose(d.f(x), f, rtol=1e-10, atol=1e-10)
    assert torch.allclose(d.f_prime(x), f_prime, rtol=1e-10, atol=1e-10)


def test_amari_special_cases():
    x = grid(-5, 5, 101, avoid_one=False)
    assert torch.allclose(AmariAlpha(2).f(x), pearson_chi2.f(x) / 2, rtol=1e-12)
    assert torch.allclose(AmariAlpha(-1).f(x), neyman_chi2.f(x) / 2, rtol=1e-12)
    assert torch.allclose(AmariAlpha(0.5).f(x), 2 * squared_hellinger.f(x), rtol=1e-12)
    # Up to the linear term u - 1, α = 1 and α = 0 are forward and reverse KL.
    assert torch.allclose(AmariAlpha(1).f(x), forward_kl.f(x) - torch.expm1(x), atol=1e-12)
    assert torch.allclose(AmariAlpha(0).f(x), reverse_kl.f(x) + torch.expm1(x), atol=1e-12)


@pytest.mark.parametrize("limit", [0.0, 1.0])
@pytest.mark.parametrize("offset", [1e-12, -1e-12, 1e-7])
def test_amari_continuous_at_limits(limit, offset):
    """The naive formula loses ~eps/|α - limit| relative accuracy here; ours is exact."""
    x = grid(-5, 5, 101, avoid_one=False)
    near, at = AmariAlpha(limit + offset), AmariAlpha(limit)
    tol = 100 * abs(offset)  # the exact change is O(offset)
    assert torch.allclose(near.f(x), at.f(x), rtol=tol, atol=1e-15)
    assert torch.allclose(near.f_prime(x), at.f_prime(x), rtol=tol, atol=1e-15)
    assert torch.allclose(near.conjugate(at.f_prime(x)), at.conjugate(at.f_prime(x)), rtol=tol)


# ------------------------------------------------------------------------------------------------
# Duals
# ------------------------------------------------------------------------------------------------


def test_closed_form_duals():
    assert forward_kl.dual() == reverse_kl
    assert reverse_kl.dual() == forward_kl
    assert pearson_chi2.dual() == neyman_chi2
    assert neyman_chi2.dual() == pearson_chi2
    assert AmariAlpha(0.25).dual() == AmariAlpha(0.75)
    assert AmariAlpha(-1).dual() == AmariAlpha(2)
    assert forward_kl.dual() != forward_kl


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_dual_is_an_involution(d):
    x = grid(-20, 20, 401, avoid_one=False)
    assert d.dual().dual() == d
    assert torch.allclose(d.dual().dual().f(x), d.f(x), rtol=1e-12)
    twice = DualDivergence(DualDivergence(d))
    assert torch.allclose(twice.f(x), d.f(x), rtol=1e-12, atol=1e-14)
    assert DualDivergence(d).dual() is d


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_generic_dual_matches_closed_form(d):
    x = grid(-20, 20, 401)
    generic, closed = DualDivergence(d), d.dual()
    assert torch.allclose(generic.f(x), closed.f(x), rtol=1e-12, atol=1e-14)
    # u f(1/u) by definition, in the moderate range where the naive product is fine.
    assert torch.allclose(closed.f(x), torch.exp(x) * d.f(-x), rtol=1e-12, atol=1e-14)
    # f(1/u) - f'(1/u) / u cancels terms of size e^|x|: compare where that costs < 1e-12.
    x = grid(-5, 5, 101)
    assert torch.allclose(generic.f_prime(x), closed.f_prime(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_dual_swaps_arguments(d):
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.25, 0.25, 0.1])
    forward = (q * d.f(p.log() - q.log())).sum()
    swapped = (p * d.dual().f(q.log() - p.log())).sum()
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-12)


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_symmetric_flag(d):
    x = grid(-5, 5, 101)
    assert d.symmetric == torch.allclose(d.dual().f(x), d.f(x), rtol=1e-12)


class NaivePearson(Divergence):
    """A user-defined f, with no care for overflow."""

    name = "naive_pearson"

    def _f(self, x):
        return (torch.exp(x) - 1) ** 2

    def _f_prime(self, x):
        return 2 * (torch.exp(x) - 1)


def test_generic_dual_of_user_divergence():
    dual = NaivePearson().dual()
    assert isinstance(dual, DualDivergence)
    assert dual.name == "dual_naive_pearson"
    x = grid(-10, 10, 201)
    assert torch.allclose(dual.f(x), neyman_chi2.f(x), rtol=1e-12)
    assert torch.allclose(dual.f_prime(x[x.abs() < 5]), neyman_chi2.f_prime(x[x.abs() < 5]))
    # u f(1/u) = u (1/u - 1)^2: 0 * inf at u = 0 and inf * 0 at u = inf in the naive product.
    x = torch.linspace(-1000, 1000, 2001)
    value, base = dual.f(x), NaivePearson().f(-x)
    assert not value.isnan().any()
    ok = torch.isfinite(base)  # where f(1/u) itself overflows, so does the dual
    assert torch.allclose(value[ok], neyman_chi2.f(x)[ok], rtol=1e-12)
    assert (value[~ok] == math.inf).all()
    with pytest.raises(NotImplementedError, match="conjugate"):
        dual.conjugate(0.0)


# ------------------------------------------------------------------------------------------------
# Closed-form divergences: Gaussians by quadrature, Bernoullis by enumeration
# ------------------------------------------------------------------------------------------------

MU_P, SIGMA_P, MU_Q, SIGMA_Q = 0.3, 1.0, -0.2, 1.2  # 2σ_q² > σ_p² and 2σ_p² > σ_q²


def gaussian_kl(m1, s1, m2, s2):
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def gaussian_power_integral(a):
    """``∫ p^a q^(1-a)`` for p = N(MU_P, SIGMA_P²), q = N(MU_Q, SIGMA_Q²)."""
    var = a * SIGMA_Q**2 + (1 - a) * SIGMA_P**2
    scale = (SIGMA_Q / SIGMA_P) ** (a - 1) * SIGMA_Q / math.sqrt(var)
    return scale * math.exp(a * (a - 1) * (MU_P - MU_Q) ** 2 / (2 * var))


def gaussian_closed_form(d):
    kl_pq = gaussian_kl(MU_P, SIGMA_P, MU_Q, SIGMA_Q)
    kl_qp = gaussian_kl(MU_Q, SIGMA_Q, MU_P, SIGMA_P)
    closed = {
        "forward_kl": kl_pq,
        "reverse_kl": kl_qp,
        "jeffreys": kl_pq + kl_qp,
        "pearson_chi2": gaussian_power_integral(2) - 1,
        "neyman_chi2": gaussian_power_integral(-1) - 1,
        "squared_hellinger": 2 - 2 * gaussian_power_integral(0.5),
    }
    if d.name in closed:
        return closed[d.name]
    a = d.alpha
    if a in (0, 1):
        return kl_qp if a == 0 else kl_pq
    return (gaussian_power_integral(a) - 1) / (a * (a - 1))


@pytest.mark.parametrize(
    "d",
    [d for d in DIVERGENCES if d.name not in ("jensen_shannon", "gan", "total_variation")],
    ids=ids,
)
def test_gaussian_divergences_by_quadrature(d):
    z = torch.linspace(-40, 40, 16001)
    log_p = torch.distributions.Normal(MU_P, SIGMA_P).log_prob(z)
    log_q = torch.distributions.Normal(MU_Q, SIGMA_Q).log_prob(z)
    integral = torch.trapezoid(log_q.exp() * d.f(log_p - log_q), z)
    assert integral.item() == pytest.approx(gaussian_closed_form(d), rel=1e-10)


def entropy(p):
    p = np.asarray(p)
    return -(p * np.log(p)).sum()


@pytest.mark.parametrize("p, q", [(0.3, 0.6), (0.02, 0.9), (0.5, 0.5), (0.7, 0.1)])
@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_bernoulli_divergences_by_enumeration(d, p, q):
    P, Q = np.array([p, 1 - p]), np.array([q, 1 - q])
    kl_pq, kl_qp = (P * np.log(P / Q)).sum(), (Q * np.log(Q / P)).sum()
    js = entropy((P + Q) / 2) - (entropy(P) + entropy(Q)) / 2
    expected = {
        "forward_kl": kl_pq,
        "reverse_kl": kl_qp,
        "jensen_shannon": js,
        "gan": 2 * js - math.log(4),
        "pearson_chi2": ((P - Q) ** 2 / Q).sum(),
        "neyman_chi2": ((P - Q) ** 2 / P).sum(),
        "squared_hellinger": ((np.sqrt(P) - np.sqrt(Q)) ** 2).sum(),
        "total_variation": abs(p - q),
        "jeffreys": kl_pq + kl_qp,
    }.get(d.name)
    if expected is None:
        a = d.alpha
        power = (P**a * Q ** (1 - a)).sum() if a not in (0, 1) else None
        expected = {0.0: kl_qp, 1.0: kl_pq}.get(a) if power is None else (power - 1) / (a * (a - 1))
    P_t, Q_t = torch.tensor(P), torch.tensor(Q)
    # Monte Carlo estimate with the exact "samples": every state weighted by q.
    estimate = d.divergence(P_t.log(), Q_t.log(), dim=0)
    enumerated = (Q_t * d.f(P_t.log() - Q_t.log())).sum()
    assert enumerated.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert estimate.item() == pytest.approx(d.f(P_t.log() - Q_t.log()).mean().item(), rel=1e-15)


def test_divergence_averages_over_dim():
    log_p, log_q = torch.randn(5, 3), torch.randn(5, 3)
    for dim in (0, 1, -1):
        expected = jensen_shannon.f(log_p - log_q).mean(dim)
        assert torch.equal(jensen_shannon.divergence(log_p, log_q, dim=dim), expected)
    assert forward_kl.f(0).dtype == torch.float64  # Python and integer inputs become floating


# ------------------------------------------------------------------------------------------------
# Numerics on log u in [-1000, 1000]
# ------------------------------------------------------------------------------------------------

NUMERIC = DIVERGENCES + EXTRA_AMARI
FULL_RANGE = sorted(
    set(
        np.round(
            np.concatenate(
                [
                    np.linspace(-1000, 1000, 81),
                    np.linspace(-750, -690, 13),
                    np.linspace(690, 750, 13),
                    np.linspace(-110, -80, 7),
                    np.linspace(80, 110, 7),
                    np.linspace(-40, 40, 33),
                    [-1e-6, 1e-6, 1e-3, -0.3, 2.7],
                ]
            ),
            6,
        ).tolist()
    )
    - {0.0}
)
_EXACT = {}


def exact(d):
    """``f, u f'(u), f'(u), u f''(u)`` on FULL_RANGE from the table formulas in mpmath, with enough
    digits for their cancellations (up to e^1000 against e^1000)."""
    if d not in _EXACT:
        values = []
        for x in FULL_RANGE:
            with mpmath.workdps(40 + int(abs(x) / 2)):
                u = mpmath.exp(mpmath.mpf(x))
                f, f_prime, f_second = naive(d, u, mpmath)
                values.append([float(v) for v in (f, u * f_prime, f_prime, u * f_second)])
        _EXACT[d] = np.array(values).T
    return _EXACT[d]


def values_and_gradients(d, x):
    x = x.clone().requires_grad_()
    f, f_prime = d.f(x), d.f_prime(x)
    (grad_f,) = torch.autograd.grad(f.sum(), x)
    (grad_f_prime,) = torch.autograd.grad(f_prime.sum(), x)
    return [t.detach().double().numpy() for t in (f, grad_f, f_prime, grad_f_prime)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", NUMERIC, ids=ids)
def test_no_nan_on_full_range(d, dtype):
    x = torch.cat([torch.linspace(-1000, 1000, 4001), torch.tensor([1e-30, -1e-30])]).to(dtype)
    for name, value in zip(("f", "df", "f'", "df'"), values_and_gradients(d, x), strict=True):
        assert not np.isnan(value).any(), f"{name} is NaN at {x[np.isnan(value)][:5]}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", NUMERIC, ids=ids)
def test_finite_where_representable_and_accurate(d, dtype):
    """Against the table formulas in high precision: a few ulps where the exact value is
    representable (with a factor 2 of margin at the overflow threshold), ±inf where it is not."""
    big = torch.finfo(dtype).max
    rtol, atol = (1e-10, 1e-13) if dtype == torch.float64 else (1e-4, 1e-5)
    x = torch.tensor(FULL_RANGE, dtype=dtype)
    computed = values_and_gradients(d, x)
    names = ("f", "df", "f'", "df'")
    for name, value, reference in zip(names, computed, exact(d), strict=True):
        representable = np.abs(reference) < big / 2
        value_r, reference_r = value[representable], reference[representable]
        bad = ~(np.abs(value_r - reference_r) <= rtol * np.abs(reference_r) + atol)
        where = x[torch.from_numpy(representable)][torch.from_numpy(bad)]
        assert not bad.any(), f"{name} at {where[:4]}: {value_r[bad][:4]} vs {reference_r[bad][:4]}"
        overflow = np.abs(reference) > 2 * big
        assert (value[overflow] == np.sign(reference[overflow]) * np.inf).all(), name


def exact_at(d, x, quantity):
    """One of ``f, u f'(u), f'(u), u f''(u)`` at ``log u = x`` (enough digits at an overflow edge,
    where one term dominates)."""
    with mpmath.workdps(30):
        u = mpmath.exp(mpmath.mpf(x))
        f, f_prime, f_second = naive(d, u, mpmath)
        return (f, u * f_prime, f_prime, u * f_second)[quantity]


def crossing(d, quantity, side, level):
    """``x`` on the given side of 0 where ``|exact|`` crosses ``level`` (bisection)."""
    lo, hi = 0.0, 1000.0
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if abs(exact_at(d, side * mid, quantity)) < level else (lo, mid)
    return side * lo


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", NUMERIC, ids=ids)
def test_finite_up_to_the_overflow_edge(d, dtype):
    """Just inside the overflow threshold of each quantity (exact value max/2) the result is
    finite and accurate; just outside (2 max) it is ±inf: no intermediate overflows early."""
    big = torch.finfo(dtype).max
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for quantity, name in enumerate(("f", "df", "f'", "df'")):
        for side in (-1, 1):
            if abs(exact_at(d, side * 1000, quantity)) < 2 * big:
                continue
            for level, finite in ((big / 2, True), (2 * big, False)):
                x = torch.tensor([crossing(d, quantity, side, level)], dtype=dtype)
                value = values_and_gradients(d, x)[quantity].item()
                reference = float(exact_at(d, x.item(), quantity))
                if finite:
                    assert value == pytest.approx(reference, rel=rtol), (name, x)
                else:
                    assert value == math.copysign(math.inf, reference), (name, x)


@pytest.mark.parametrize("d", NUMERIC, ids=ids)
def test_accuracy_near_one(d):
    """Where f = O(log(u)^2), the error is a few ulps of log u (of 1 for Jensen-Shannon), not of
    1 as in the naive ``e^x - 2 + e^-x`` for Neyman χ²."""
    xs = [sign * scale for scale in (1e-9, 1e-6, 1e-3) for sign in (1, -1)]
    eps = torch.finfo(torch.float64).eps
    values, f_primes = d.f(torch.tensor(xs)), d.f_prime(torch.tensor(xs))
    for x, value, f_prime in zip(xs, values.tolist(), f_primes.tolist(), strict=True):
        with mpmath.workdps(50):
            exact_f, exact_f_prime, _ = naive(d, mpmath.exp(mpmath.mpf(x)), mpmath)
        atol = 4 * eps * (1 if d == jensen_shannon else abs(x))
        assert value == pytest.approx(float(exact_f), rel=1e-12, abs=atol)
        assert f_prime == pytest.approx(float(exact_f_prime), rel=1e-12, abs=atol)


LINEAR = {  # f grows at most linearly in |log u| there: value and gradient finite on the range
    "reverse_kl": (-1000, 1000),
    "gan": (-1000, 1000),
    "forward_kl": (-1000, 0),
    "jensen_shannon": (-1000, 0),
    "jeffreys": (-1000, 0),
    "pearson_chi2": (-1000, 0),
    "squared_hellinger": (-1000, 0),
    "total_variation": (-1000, 0),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, interval", LINEAR.items())
def test_finite_where_growth_is_linear(name, interval, dtype):
    x = torch.linspace(*interval, 2001, dtype=dtype)
    for value in values_and_gradients(get_divergence(name), x)[:2]:
        assert np.isfinite(value).all()


def test_overflow_is_inf_not_nan():
    x = torch.tensor([1000.0], requires_grad=True)
    value = pearson_chi2.f(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert value.item() == math.inf and grad.item() == math.inf


# ------------------------------------------------------------------------------------------------
# Conjugates, critic activations and the f-GAN bound
# ------------------------------------------------------------------------------------------------

CONJUGATE_EXTRA_T = {  # suprema at u -> 0 or values not attained as f'(u)
    "pearson_chi2": [-3.0, -2.0],
    "total_variation": [-0.7, -0.2, 0.0, 0.3],
    "amari_alpha": [-1.5, -0.3],
}
OUTSIDE_DOMAIN = {
    "reverse_kl": [0.01, 0.1],
    "gan": [0.01, 0.1],
    "jensen_shannon": [0.35, 1.0],
    "neyman_chi2": [1.01, 2.0],
    "squared_hellinger": [1.0, 1.5],
    "total_variation": [0.51, 1.0],
}


def numerical_sup(d, t):
    """``sup_u (u t - f(u))`` over ``log u`` in [-40, 40]: a dense grid, zoomed in around its
    maximum until the spacing is 4e-11."""
    lo, hi = -40.0, 40.0
    for _ in range(4):
        x = torch.linspace(lo, hi, 2001)
        objective = torch.exp(x) * t - d.f(x)
        best, step = x[objective.argmax()].item(), (hi - lo) / 2000
        lo, hi = max(best - step, -40.0), min(best + step, 40.0)
    return objective.max().item()


def amari_outside(d):
    if d.alpha < 1:  # s = 1 + (α - 1) t < 0
        return [1 / (1 - d.alpha) + 0.1, 1 / (1 - d.alpha) + 1]
    return []


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_conjugate_matches_numerical_sup(d):
    ts = [] if d == total_variation else d.f_prime(torch.linspace(-4, 4, 9)).tolist()
    ts += CONJUGATE_EXTRA_T.get(d.name, [])
    for t in ts:
        assert d.conjugate(t).item() == pytest.approx(numerical_sup(d, t), rel=1e-9, abs=1e-9)
    outside = amari_outside(d) if d.name == "amari_alpha" else OUTSIDE_DOMAIN.get(d.name, [])
    for t in outside:
        assert d.conjugate(t).item() == math.inf
        assert numerical_sup(d, t) > 1e6


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_conjugate_of_derivative_is_legendre_transform(d):
    x = torch.linspace(-10, 10, 201)
    u, f_prime = torch.exp(x), d.f_prime(x)
    expected = u * f_prime - d.f(x)
    assert torch.allclose(d.conjugate(f_prime), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", [d for d in DIVERGENCES if d != total_variation], ids=ids)
def test_conjugate_gradient_is_argmax(d):
    """``d f*/dt = u`` at ``t = f'(u)`` (TV's f' is not invertible)."""
    x = torch.linspace(-5, 5, 21)
    t = d.f_prime(x).requires_grad_()
    (grad,) = torch.autograd.grad(d.conjugate(t).sum(), t)
    assert torch.allclose(grad, torch.exp(x), rtol=1e-8)


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_critic_activation_maps_into_domain(d):
    v = torch.linspace(-30, 30, 601).requires_grad_()
    composed = d.conjugate(d.critic_activation(v))
    (grad,) = torch.autograd.grad(composed.sum(), v)
    assert torch.isfinite(composed).all() and torch.isfinite(grad).all()
    moderate = v.detach().abs() <= 10
    fused = d.critic_conjugate(v.detach())
    assert torch.allclose(fused[moderate], composed.detach()[moderate], rtol=1e-9, atol=1e-12)
    # The activation is increasing, as a critic "V ≈ log(p/q)" expects.
    assert (d.critic_activation(v.detach()).diff() >= 0).all()


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_fused_critic_conjugate_in_float32(d):
    v = torch.linspace(-30, 30, 601)
    reference = d.critic_conjugate(v)
    single = d.critic_conjugate(v.float()).double()
    representable = reference.abs() < torch.finfo(torch.float32).max / 2
    assert torch.isfinite(single[representable]).all()
    assert torch.allclose(single[representable], reference[representable], rtol=1e-5, atol=1e-5)


def invert_increasing(g, target, lo=-60.0, hi=60.0, steps=200):
    lo, hi = torch.full_like(target, lo), torch.full_like(target, hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        below = g(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("d", DIVERGENCES, ids=ids)
def test_fgan_bound_is_tight_at_the_optimal_critic(d):
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.25, 0.25, 0.1])
    log_ratio = p.log() - q.log()
    exact = (q * d.f(log_ratio)).sum()

    def bound(v):
        return (p * d.critic_activation(v)).sum() - (q * d.critic_conjugate(v)).sum()

    optimal = invert_increasing(d.critic_activation, d.f_prime(log_ratio))  # g(V*) = f'(p/q)
    assert bound(optimal).item() == pytest.approx(exact.item(), rel=1e-9, abs=1e-12)
    t = d.f_prime(log_ratio)
    assert ((p * t).sum() - (q * d.conjugate(t)).sum()).item() == pytest.approx(exact.item())
    for seed in range(5):  # any other critic gives a lower bound
        v = optimal + torch.randn(4, generator=torch.Generator().manual_seed(seed))
        assert bound(v).item() <= exact.item() + 1e-12


@pytest.mark.parametrize(
    "d", [jensen_shannon, gan, reverse_kl] + [AmariAlpha(a) for a in ALPHAS], ids=ids
)
def test_optimal_critic_is_the_log_ratio(d):
    x = torch.linspace(-10, 10, 101)
    assert torch.allclose(d.critic_activation(x), d.f_prime(x), rtol=1e-12)


def test_lambert_w():
    from scipy.special import lambertw

    y = torch.linspace(-700, 700, 2801)
    w = divergences._log_lambertw_exp(y).exp().numpy()
    assert np.allclose(w, lambertw(np.exp(y.numpy())).real, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------------------
# Registry and arguments
# ------------------------------------------------------------------------------------------------


def test_get_divergence_by_name_and_alias():
    assert get_divergence("forward_kl") == forward_kl == get_divergence("kl_forward")
    assert get_divergence("reverse_kl") == reverse_kl == get_divergence("kl_reverse")
    assert get_divergence("js") == jensen_shannon == divergences.js
    assert divergences.kl_forward is forward_kl and divergences.kl_reverse is reverse_kl
    assert get_divergence("amari_alpha", alpha=0.5) == AmariAlpha(0.5)
    assert get_divergence(AmariAlpha(2)) == AmariAlpha(2)
    assert get_divergence(gan) is gan
    assert {d.name for d in DIVERGENCES} <= set(available_divergences())


def test_as_divergence_takes_a_name_or_an_instance_and_names_the_argument():
    assert divergences.as_divergence("js") == jensen_shannon
    assert divergences.as_divergence(gan) is gan
    with pytest.raises(ValueError, match=r"'amari_alpha' needs parameters.*as guide_f, e\.g\."):
        divergences.as_divergence("amari_alpha", "guide_f")
    with pytest.raises(ValueError, match="Unknown divergence 'renyi'"):
        divergences.as_divergence("renyi")
    with pytest.raises(ValueError, match=r"Expected f to be a divergence name.*actual 1\.0"):
        divergences.as_divergence(1.0)


def test_available_divergences_is_sorted():
    names = available_divergences()
    assert names == sorted(names)
    assert {"js", "kl_forward", "kl_reverse", "amari_alpha"} <= set(names)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"known names.*forward_kl"):
        get_divergence("kl_sideways")
    with pytest.raises(ValueError, match="kwargs"):
        get_divergence(forward_kl, alpha=1)


def test_register_divergence(monkeypatch):
    monkeypatch.setattr(divergences, "_REGISTRY", dict(divergences._REGISTRY))
    register_divergence("naive_pearson", NaivePearson)
    assert get_divergence("naive_pearson") == NaivePearson()
    assert "naive_pearson" in available_divergences()
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("naive_pearson", lambda: NaivePearson())
    register_divergence("half_pearson", lambda: AmariAlpha(2))
    assert get_divergence("half_pearson") == AmariAlpha(2)
    with pytest.raises(ValueError, match="name"):
        register_divergence("", NaivePearson)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_amari_rejects_non_finite_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha.*finite"):
        AmariAlpha(alpha)
    with pytest.raises(ValueError, match="alpha"):
        get_divergence("amari_alpha", alpha=alpha)


def test_amari_rejects_non_numbers():
    with pytest.raises(TypeError, match="alpha"):
        AmariAlpha("0.5")


def test_equality_hash_repr():
    assert AmariAlpha(0.5) == AmariAlpha(0.5) and AmariAlpha(0.5) != AmariAlpha(0.25)
    assert len({AmariAlpha(2), AmariAlpha(2.0), pearson_chi2, divergences.PearsonChi2()}) == 2
    assert repr(AmariAlpha(0.5)) == "AmariAlpha(0.5)"
    assert repr(DualDivergence(forward_kl)) == "DualDivergence(ForwardKL())"
    assert AmariAlpha(0.5).symmetric and not AmariAlpha(0.4).symmetric
