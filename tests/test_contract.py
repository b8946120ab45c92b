"""One contract every objective of the package honours, JSA and FGANBound included: the entry
points agree, every parameter gets a gradient, SVI and ELBOModule work, the state round-trips,
the objective follows the model's dtype (and, for module objectives, ``.to(...)``), bad input
raises a clear error."""

import contextlib
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_fdiv.inference import (
    AVB,
    IWAE,
    JSA,
    BlackBoxAlpha,
    FDivergenceBound,
    FGANBound,
    ReweightedWakeSleep,
)
from pyro_fdiv.inference.compiled import Compilable, CompiledLoss


def target():
    """A known target density for the f-divergence bound (a training set would need spread
    noise, which replaces the model's observation scale, so `noise` would get no gradient)."""
    return dist.Normal(torch.zeros(3), 1.5).to_event(1)


def _fgan(k: int) -> FGANBound:
    # the critic does not learn (lr 0), so that loss_and_grads' value is a loss() after the
    # draws of its critic steps
    critic = nn.Linear(3, 1)
    return FGANBound(
        "js", critic=critic, critic_optim=lambda p: torch.optim.SGD(p, lr=0.0), num_particles=k
    )


MODEL_PARAMS = {"noise", "decoder$$$weight", "decoder$$$bias"}
GUIDE_PARAMS = {"shift", "encoder$$$weight", "encoder$$$bias"}


@dataclass
class Case:
    """How an objective is built and what the contract expects of it."""

    make: Callable[[int], object]
    guide: bool = True  # False: the objective trains the model only (no guide sites)
    adversary_draws: int = 0  # loss_and_grads' draws before the one it reports (critic steps)
    inner_guide: bool = False  # the objective's own optimizer steps the guide (no .grad left)
    compiles: bool = True  # compile=True captures a program (else: eager, with one warning)
    bad_guide: str = r"Model sample site 'z' is neither observed nor sampled by the guide"


CASES = {
    "iwae": Case(lambda k: IWAE(num_particles=k)),
    "iwae-stl": Case(lambda k: IWAE(num_particles=k, gradient_estimator="stl")),
    "iwae-dreg": Case(lambda k: IWAE(num_particles=k, gradient_estimator="dreg")),
    "bbalpha-0": Case(lambda k: BlackBoxAlpha(0.0, num_particles=k)),
    "bbalpha-0.5": Case(lambda k: BlackBoxAlpha(0.5, num_particles=k)),
    "bbalpha-2": Case(lambda k: BlackBoxAlpha(2.0, num_particles=k)),
    "bbalpha-neg": Case(lambda k: BlackBoxAlpha(-0.5, num_particles=k)),
    "fdiv-reverse-kl": Case(
        lambda k: FDivergenceBound("reverse_kl", data=target(), num_particles=k)
    ),
    "fdiv-forward-kl": Case(
        lambda k: FDivergenceBound("forward_kl", data=target(), num_particles=k)
    ),
    "fdiv-js": Case(lambda k: FDivergenceBound("js", data=target(), num_particles=k)),
    # both players: two guide steps of their own optimizer (lr 0 here, so that the reported
    # value is a loss() after the guide steps' draws), then the model step
    "fdiv-guide-steps": Case(
        lambda k: FDivergenceBound(
            "reverse_kl",
            data=target(),
            num_particles=k,
            guide_steps=2,
            guide_optim=pyro.optim.SGD({"lr": 0.0}),
        ),
        adversary_draws=2,
        inner_guide=True,
    ),
    # adaptive contrast estimates the guide's moments from the particles: K >= 2
    "avb": Case(lambda k: AVB(num_particles=max(k, 2))),
    "avb-prior-contrast": Case(
        lambda k: AVB(num_particles=k, adaptive_contrast=False), compiles=False
    ),
    # self-normalized weights need K >= 2
    "rws": Case(lambda k: ReweightedWakeSleep(num_particles=max(k, 2))),
    "jsa": Case(lambda k: JSA(num_data=3, num_particles=k)),
    "jsa-two-moves": Case(lambda k: JSA(num_data=3, num_particles=k, num_moves=2)),
    "fgan": Case(_fgan, guide=False, adversary_draws=1, bad_guide="trains the model only"),
}
OBJECTIVES = {name: case.make for name, case in CASES.items()}
CLASSES = {
    "iwae": IWAE,
    "bbalpha": lambda **kw: BlackBoxAlpha(0.5, **kw),
    "fdiv": lambda **kw: FDivergenceBound("js", data=target(), **kw),
    "avb": lambda **kw: AVB(adaptive_contrast=False, **kw),
    "jsa": JSA,
    "rws": ReweightedWakeSleep,
    "fgan": lambda **kw: FGANBound("js", critic=nn.Linear(3, 1), **kw),
}


class Model(nn.Module):
    """A tiny amortized latent-variable model with pyro.module and pyro.param parameters."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 3)
        self.encoder = nn.Linear(3, 4)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        noise = pyro.param("noise", torch.tensor(0.7), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), noise).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        shift = pyro.param("shift", torch.zeros(2))
        out = self.encoder(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(out[..., :2] + shift, out[..., 2:].exp()).to_event(1))


def no_guide(x):
    """The guide of objectives that train the model only."""


X = torch.tensor([[0.1, -1.2, 0.4], [2.0, 0.3, -0.5], [0.0, 0.9, 1.1]], dtype=torch.float64)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Model().double()


def _guide(name, net):
    return net.guide if CASES[name].guide else no_guide


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("k", [1, 5])
def test_loss_entry_points_agree(name, k, net):
    objective, guide = OBJECTIVES[name](k), _guide(name, net)
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(7)
        out = getattr(objective, method)(net.model, guide, X)
        values.append(out.item() if isinstance(out, torch.Tensor) else out)
    assert all(isinstance(v, float) and v == v for v in values)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    if CASES[name].adversary_draws:  # loss_and_grads reports the loss after its critic steps
        pyro.set_rng_seed(7)
        for _ in range(CASES[name].adversary_draws):
            objective.loss(net.model, guide, X)
        values[0] = objective.loss(net.model, guide, X)
    assert values[0] == pytest.approx(values[2], rel=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_parameter_gets_a_gradient(name, net):
    objective = OBJECTIVES[name](4)
    objective.loss_and_grads(net.model, _guide(name, net), X)
    params = dict(pyro.get_param_store().named_parameters())
    assert set(params) == (MODEL_PARAMS | GUIDE_PARAMS if CASES[name].guide else MODEL_PARAMS)
    if CASES[name].inner_guide:  # stepped by the objective's guide optimizer, grads cleared
        assert all(params[p].grad is None for p in GUIDE_PARAMS)
        params = {p: params[p] for p in MODEL_PARAMS}
    for pname, value in params.items():
        assert value.grad is not None, pname
        assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", OBJECTIVES)
def test_svi_and_elbo_module(name, net):
    objective, guide = OBJECTIVES[name](3), _guide(name, net)
    svi = pyro.infer.SVI(net.model, guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
    losses = [svi.step(X) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert math.isfinite(svi.evaluate_loss(X))

    # PyTorch-style: ELBO.__call__ returns an nn.Module over (model, guide) modules
    class M(nn.Module):
        def __init__(self, fn, owner):
            super().__init__()
            self.owner, self.fn = owner, fn

        def forward(self, x):
            return self.fn(x)

    loss_module = objective(M(net.model, net), M(guide, net))
    loss = loss_module(X)
    loss.backward()
    assert net.decoder.weight.grad is not None
    assert (net.encoder.weight.grad is not None) == CASES[name].guide


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_pickles_and_is_stateless(name, net):
    objective, guide = OBJECTIVES[name](3), _guide(name, net)
    pyro.set_rng_seed(2)
    before = objective.loss(net.model, guide, X)
    copy = pickle.loads(pickle.dumps(objective))
    pyro.set_rng_seed(2)
    assert copy.loss(net.model, guide, X) == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_state_round_trips(name, net):
    """A fresh objective loaded with another's state_dict (a checkpoint's) computes the same
    loss; stateless objectives (Pyro's ELBO contract) have no state_dict."""
    objective, guide = OBJECTIVES[name](3), _guide(name, net)
    svi = pyro.infer.SVI(net.model, guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
    for _ in range(2):
        svi.step(X)
    if not hasattr(objective, "state_dict"):
        assert isinstance(objective, IWAE | BlackBoxAlpha | ReweightedWakeSleep)
        return
    restored = OBJECTIVES[name](3)
    restored.load_state_dict(pickle.loads(pickle.dumps(objective.state_dict())))
    losses = []
    for obj in (objective, restored):
        pyro.set_rng_seed(3)
        losses.append(obj.loss(net.model, guide, X))
    assert losses[0] == losses[1]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_follows_the_models_dtype(name):
    """In float32 the objective's numbers and state are float32; an objective that is a
    torch.nn.Module (JSA) also follows .to(dtype) and .to(device)."""
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores float64
    torch.manual_seed(0)
    net, x = Model(), X.float()
    objective, guide = OBJECTIVES[name](3), _guide(name, net)
    for _ in range(2):
        loss = objective.differentiable_loss(net.model, guide, x)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        objective.loss_and_grads(net.model, guide, x)
    if not isinstance(objective, nn.Module):  # a discriminator's or critic's parameters
        state = objective.state_dict() if hasattr(objective, "state_dict") else {}
        assert all(t.dtype == torch.float32 for t in _tensors(state) if t.is_floating_point())
        return
    # the chains (the acceptance statistics are float64 by design)
    assert {v.dtype for v in objective.samples().values()} == {torch.float32}
    state = objective.state_dict()
    objective.double()
    assert {v.dtype for v in objective.samples().values()} == {torch.float64}
    restored = OBJECTIVES[name](3).to("meta")
    with pytest.warns(UserWarning, match="to a meta parameter"):  # torch: no-op copies
        restored.load_state_dict(state)
    assert {t.device.type for t in restored.buffers()} == {"meta"}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_bad_guide_raises_naming_the_problem(name, net):
    """A guide that leaves the model's latent 'z' out (or, for an objective without a guide,
    one that has sites) raises a ValueError that says so."""

    def guide_without_z(x):
        pyro.module("encoder", net.encoder)

    bad = guide_without_z if CASES[name].guide else net.guide
    with pytest.raises(ValueError, match=CASES[name].bad_guide):
        OBJECTIVES[name](3).loss_and_grads(net.model, bad, X)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bad", [0, -3, 1.5, None])
def test_bad_num_particles_raise(cls, bad):
    with pytest.raises(ValueError, match=r"num_particles to be an integer >= 1"):
        CLASSES[cls](num_particles=bad)


COMPILED = [name for name in OBJECTIVES if isinstance(OBJECTIVES[name](2), Compilable)]


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_step_equals_eager(name, net):
    """``compile=True`` (the shared mechanism, :class:`Compilable`): SVI steps equal the eager
    ones on the same draws, every parameter moves, the objective still pickles. Each program is
    compiled by ``aot_eager`` here (the capture is what this contract is about; Inductor's
    numbers are tested in test_compiled.py)."""
    runs = []
    for compile in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = Model().double()
        objective = OBJECTIVES[name](3)
        if compile:  # what compile=True, compile_options={"backend": "aot_eager"} builds
            objective._compiled = CompiledLoss(objective, {"backend": "aot_eager"})
        guide = _guide(name, model)
        svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.01}), objective)
        pyro.set_rng_seed(1)
        with contextlib.ExitStack() as stack:
            if compile and not CASES[name].compiles:
                stack.enter_context(pytest.warns(UserWarning, match="falls back to the eager"))
            losses = [svi.step(X) for _ in range(3)]
        store = pyro.get_param_store()
        runs.append((losses, {k: v.detach().clone() for k, v in store._params.items()}))
    (eager, eager_params), (compiled, compiled_params) = runs
    assert compiled == pytest.approx(eager, rel=1e-10, abs=1e-10)
    for key, value in eager_params.items():
        torch.testing.assert_close(compiled_params[key], value, rtol=1e-10, atol=1e-10)
    assert bool(objective._compiled.programs) == CASES[name].compiles
    if CASES[name].inner_guide:
        return  # its guide optimizer holds the store's tensors, which Pyro marks with weakrefs:
        # not picklable, eager or compiled (checkpoints save its state_dict)
    copy = pickle.loads(pickle.dumps(objective))
    assert copy._compiled is not None and not copy._compiled.programs
