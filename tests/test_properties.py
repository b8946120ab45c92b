"""Property tests over hyperparameters and small random model structures (plate sizes, nesting,
event shapes, local or global latents, subsampling): every objective either returns a finite
loss and finite gradients or raises the error docs/supports.md documents for that structure."""

import math
from contextlib import ExitStack
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from torch import nn

from pyro_fdiv.divergences import available_divergences, get_divergence
from pyro_fdiv.inference import AVB, IWAE, JSA, BlackBoxAlpha, FDivergenceBound, FGANBound

SETTINGS = {"deadline": None, "derandomize": True}
NAMES = available_divergences()


class Structure(NamedTuple):
    """A model's shape: plate sizes outermost first, the event shape of the latent and of the
    observation, where the latent sits, and the outermost plate's subsample size (or None)."""

    plates: tuple[int, ...]
    event: tuple[int, ...]
    latent: str  # "local" (inside every plate), "outer" (outermost plate only), "global"
    subsample: int | None

    @property
    def subsampled(self) -> bool:
        return self.subsample is not None and self.subsample < self.plates[0]


@st.composite
def structures(draw) -> Structure:
    plates = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    event = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    places = ["local", "outer", "global"] if len(plates) == 2 else ["local", "global"]
    latent = draw(st.sampled_from(places))
    subsample = draw(st.none() | st.integers(1, plates[0]))
    return Structure(plates, event, latent, subsample)


def build(s: Structure):
    """Model, guide and data of a structure: ``z ~ N(0, I)`` over the event shape,
    ``x ~ N(w z, I)`` inside every plate; a mean-field guide with ``pyro.param`` locs and scales
    of the event shape, amortized (``+ a x``) for latents inside the data plate."""
    nplates, event_dim = len(s.plates), len(s.event)
    pyro.set_rng_seed(0)  # each example on its own: shrinking replays it exactly
    x = torch.randn(s.plates + s.event)

    def plates(stack: ExitStack, size: int, inner: bool = True) -> torch.Tensor:
        sizes = (size, *s.plates[1:]) if inner else (size,)
        idx = None
        for i, n in enumerate(sizes):
            kwargs = {"subsample_size": s.subsample} if i == 0 and s.subsample else {}
            got = stack.enter_context(pyro.plate(f"plate_{i}", n, dim=i - nplates, **kwargs))
            idx = got if i == 0 else idx
        return idx

    def prior():
        return dist.Normal(torch.zeros(s.event), 1.0).to_event(event_dim)

    def model(x):
        w = pyro.param("w", torch.tensor(0.5))
        z = pyro.sample("z", prior()) if s.latent == "global" else None
        with ExitStack() as stack:
            idx = plates(stack, len(x), inner=s.latent != "outer")
            if s.latent != "global":
                z = pyro.sample("z", prior())
            if s.latent == "outer":  # the inner plate only around the observation
                for i, n in enumerate(s.plates[1:], start=1):
                    stack.enter_context(pyro.plate(f"plate_{i}", n, dim=i - nplates))
            pyro.sample("x", dist.Normal(w * z, 1.0).to_event(event_dim), obs=x[idx])

    def guide(x):
        loc = pyro.param("loc", torch.zeros(s.event))
        scale = pyro.param("scale", torch.ones(s.event), constraint=dist.constraints.positive)
        if s.latent == "global":
            pyro.sample("z", dist.Normal(loc, scale).to_event(event_dim))
            return
        a = pyro.param("a", torch.tensor(0.3))
        with ExitStack() as stack:
            idx = plates(stack, len(x), inner=s.latent == "local")
            features = x[idx]
            if s.latent == "outer":  # one latent per row: summarize the inner plate
                features = features.mean(1, keepdim=True)
            pyro.sample("z", dist.Normal(loc + a * features, scale).to_event(event_dim))

    return model, guide, x


def expected_error(kind: str, s: Structure, num_particles: int = 1) -> str | None:
    """The documented error (a regex) of objective ``kind`` on structure ``s``, or None."""
    if kind == "avb" and s.subsampled and s.latent == "global":
        return r"plate 'plate_0' is subsampled \(\d of \d\) but sites .*'z'.* are outside it"
    if kind == "importance-dreg" and s.subsampled and s.latent == "global":
        return r"gradient_estimator='dreg' needs untempered log weights"
    if kind == "jsa-one-chain" and s.subsampled:
        return r"plate 'plate_0' is subsampled \(\d of \d\) but num_data=None"
    if kind == "fdiv":
        subsampled = r"plate 'plate_0' is subsampled \(subsample_size=\d+ of \d+\)\. The batch is"
        if s.subsampled:  # a plate that subsamples the batch is refused by name, first
            return subsampled
        # one term per row: a global latent is refused by name (checked on the batch as
        # given); plates nested in the data plate (around the latent or the observation only)
        # are summed into the row's term
        if s.latent == "global":
            return (
                r"needs every latent site and the observation 'x' inside one data plate over "
                r"the batch \(plate 'plate_0', size \d\), but the latent model site 'z' is outside"
            )
        if s.subsample is not None and num_particles > 1:
            # a fixed subsample_size of the batch's size subsamples the stacked copies
            return subsampled
    return None


def check(
    objective,
    model,
    guide,
    x,
    error: str | None,
    compare_loss: bool = False,
    warning: str | None = None,
) -> None:
    """Finite loss and finite gradients for every parameter (after the documented ``warning``,
    if any), or the documented error."""
    event("documented error" if error is not None else "runs")  # --hypothesis-show-statistics
    if error is not None:
        with pytest.raises((ValueError, NotImplementedError), match=error):
            objective.loss_and_grads(model, guide, x)
        return
    pyro.set_rng_seed(1)
    with ExitStack() as stack:
        if warning is not None:
            stack.enter_context(pytest.warns(UserWarning, match=warning))
        value = objective.loss_and_grads(model, guide, x)
    assert isinstance(value, float) and math.isfinite(value)
    params = dict(pyro.get_param_store().named_parameters())
    assert "w" in params  # the model's parameter
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if compare_loss:  # the same draw: the loss equals the surrogate's value
        pyro.set_rng_seed(1)
        assert objective.loss(model, guide, x) == pytest.approx(value, rel=1e-9, abs=1e-9)


ALPHAS = st.sampled_from([0.0, 1.0, -1.0, 2.0, 50.0, -50.0, 1e3, -1e3]) | st.floats(-5.0, 5.0)


@st.composite
def importance_objectives(draw):
    k = draw(st.integers(1, 8))
    if draw(st.booleans()):
        estimator = draw(st.sampled_from(["reparam", "stl", "dreg"]))
        return IWAE(num_particles=k, gradient_estimator=estimator)
    return BlackBoxAlpha(draw(ALPHAS), num_particles=k)


@settings(max_examples=200, **SETTINGS)
@given(structures(), importance_objectives())
def test_iwae_and_bbalpha_over_structures(s, objective):
    pyro.clear_param_store()
    model, guide, x = build(s)
    dreg = getattr(objective, "gradient_estimator", None) == "dreg"
    error = expected_error("importance-dreg" if dreg else "importance", s)
    warning = None
    nested = isinstance(objective, IWAE) and objective.num_particles > 1  # biased: warns
    if s.subsampled and s.latent == "global" and error is None and nested:
        warning = "global latent sites sit outside the subsampled plate 'plate_0'"
    check(objective, model, guide, x, error, compare_loss=True, warning=warning)


@st.composite
def divergences(draw):
    name = draw(st.sampled_from(NAMES))
    if name == "amari_alpha":
        return get_divergence(name, alpha=draw(st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0])))
    return name


@settings(max_examples=150, **SETTINGS)
@given(
    structures(),
    divergences(),
    st.sampled_from(["model", "data", "auto"]),
    st.booleans(),
    st.integers(1, 8),
)
def test_fdiv_bound_over_structures_and_divergences(s, f, side, training_set, k):
    pyro.clear_param_store()
    model, guide, x = build(s)
    if training_set:
        objective = FDivergenceBound(
            f, data=torch.randn(6, *x.shape[1:]), spread=0.5, sample_from=side, num_particles=k
        )
    else:
        target = dist.Normal(torch.zeros(x.shape[1:]), 1.5).to_event(x.dim() - 1)
        objective = FDivergenceBound(f, data=target, sample_from=side, num_particles=k)
    check(objective, model, guide, x, expected_error("fdiv", s, k))


class FlatCritic(nn.Module):
    """V(x) for observations of any shape: a linear map of the flattened row."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


@settings(max_examples=60, **SETTINGS)
@given(structures(), divergences(), st.integers(1, 8), st.integers(1, 2))
def test_fgan_bound_over_structures_and_divergences(s, f, k, critic_steps):
    pyro.clear_param_store()
    model, _, x = build(s)
    critic = FlatCritic(x[0].numel())
    objective = FGANBound(f, critic=critic, num_particles=k, critic_steps=critic_steps)
    check(objective, model, None, x, expected_error("fgan", s))


@settings(max_examples=80, **SETTINGS)
@given(structures(), st.booleans(), st.integers(1, 8), st.integers(0, 2))
def test_avb_over_structures(s, adaptive_contrast, k, adversary_steps):
    pyro.clear_param_store()
    model, guide, x = build(s)
    objective = AVB(
        adaptive_contrast=adaptive_contrast,
        num_adversary_steps=adversary_steps,
        num_particles=max(k, 2) if adaptive_contrast else k,
        discriminator_hidden=(8,),
    )
    check(objective, model, guide, x, expected_error("avb", s))


@settings(max_examples=80, **SETTINGS)
@given(structures(), st.booleans(), st.integers(1, 8), st.integers(1, 2))
def test_jsa_over_structures(s, chain_per_data_point, k, moves):
    pyro.clear_param_store()
    model, guide, x = build(s)
    num_data = s.plates[0] if chain_per_data_point else None
    objective = JSA(num_data=num_data, num_particles=k, num_moves=moves)
    kind = "jsa" if chain_per_data_point else "jsa-one-chain"
    check(objective, model, guide, x, expected_error(kind, s))


# ---------------------------------------------------------------------------------------------
# The f-functions at the ends of the extended real line (log p_hat(y) = -inf, log w = +inf)

#: Every divergence, with Amari's alpha at the KL limits (0, 1) and beyond
F_CASES = [(name, {}) for name in NAMES if name != "amari_alpha"]
F_CASES += [("amari_alpha", {"alpha": a}) for a in (0.5, 0.0, 1.0, -1.0, 2.0, 0.3)]


@pytest.mark.parametrize(
    "name, kwargs", F_CASES, ids=[f"{n}{k.get('alpha', '')}" for n, k in F_CASES]
)
def test_f_is_never_nan_on_the_extended_real_line(name, kwargs):
    divergence = get_divergence(name, **kwargs)

    @settings(max_examples=40, **SETTINGS)
    @given(st.floats(allow_nan=False, allow_infinity=True))
    @example(-math.inf)
    @example(math.inf)
    def f_is_not_nan(log_u):
        for fn in (
            divergence.f,
            divergence.dual().f,
            divergence.f_prime,
            divergence.dual().f_prime,
        ):
            t = torch.tensor(log_u, requires_grad=True)
            value = fn(t)
            (grad,) = torch.autograd.grad(value, t)
            assert not torch.isnan(value) and not torch.isnan(grad), (fn, log_u, value, grad)
            if math.isinf(log_u):  # the limit, seen at +-1e300
                near = fn(torch.tensor(math.copysign(1e300, log_u)))
                if near.abs() < 1e6:  # a bounded limit, and a finite gradient
                    assert value.item() == pytest.approx(near.item(), rel=1e-6, abs=1e-12)
                    assert torch.isfinite(grad), (fn, log_u, grad)
                else:  # an unbounded one: an infinity of the same sign
                    assert torch.isinf(value) and value.sign() == near.sign()

    f_is_not_nan()


def test_js_at_the_ends_of_the_extended_real_line():
    js = get_divergence("js")
    assert js.f(torch.tensor(-math.inf)) == pytest.approx(math.log(2) / 2, abs=1e-15)
    assert js.f(torch.tensor(math.inf)) == math.inf
    for name in ("forward_kl", "gan"):
        t = torch.tensor(-math.inf, requires_grad=True)
        value = get_divergence(name).f(t)
        (grad,) = torch.autograd.grad(value, t)
        assert value == 0 and grad == 0
