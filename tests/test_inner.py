"""The inner-training convention (pyro_fdiv.inference.inner): every objective with parts of its
own exposes, steps, moves and checkpoints them the same way."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_supports import Net
from torch import nn

from pyro_fdiv.inference import AVB, IWAE, JSA, FDivergenceBound, FGANBound, inner

TARGET = dist.Normal(torch.zeros(2), 1.5).to_event(1)


def make_net() -> Net:
    """test_supports' model with continuous local latents and an amortized guide, the same
    initial networks every call."""
    torch.manual_seed(0)
    return Net()


def critic():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def fdiv(**kwargs):
    return FDivergenceBound("js", data=TARGET, num_particles=2, guide_steps=2, **kwargs)


def fgan():
    return FGANBound("js", critic=critic(), data=TARGET, critic_steps=2)


OBJECTIVES = {
    "fdiv": fdiv,
    "fgan": fgan,
    "avb": lambda: AVB(num_particles=4, max_plate_nesting=1),
    "jsa": lambda: JSA(num_particles=2, max_plate_nesting=1),
}


def _guide(net, name):
    return None if name == "fgan" else net.guide


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objectives_follow_the_convention(name):
    objective = OBJECTIVES[name]()
    assert isinstance(objective, inner.InnerTrainingProtocol)
    net, x = make_net(), torch.randn(5, 2)
    assert objective.to(torch.float64) is objective
    objective.loss_and_grads(net.model, _guide(net, name), x)
    params = inner.inner_parameters(objective)
    expected = {  # JSA: none, SVI's optimizer steps its guide and its chains are buffers
        "fdiv": lambda: list(net.encoder.parameters()),
        "fgan": lambda: list(objective.critic.parameters()),
        "avb": lambda: list(objective.discriminator.parameters()),
        "jsa": list,
    }[name]()
    assert len(params) == len(expected) and (params or name == "jsa")
    assert all(any(p is q for q in expected) for p in params)
    if name != "avb":  # (AVB keeps its discriminator's last gradient until the next update)
        # a step leaves no gradient on the parts the objective steps itself
        assert all(p.grad is None or not p.grad.any() for p in params)


@pytest.mark.parametrize("name", ["fdiv", "fgan"])
def test_step_inner_is_the_inner_part_of_loss_and_grads(name):
    x = torch.randn(6, 2)
    results = []
    for method in ("step_inner", "loss_and_grads"):
        pyro.clear_param_store()
        net, objective = make_net(), OBJECTIVES[name]()
        decoder = copy.deepcopy(net.decoder.state_dict())
        pyro.set_rng_seed(3)
        value = getattr(objective, method)(net.model, _guide(net, name), x)
        parts = net.encoder if name == "fdiv" else objective.critic
        results.append([p.detach().clone() for p in parts.parameters()])
        if method == "step_inner":
            assert isinstance(value, float)
            # the model's parameters are neither changed nor given a gradient
            assert all(torch.equal(v, net.decoder.state_dict()[k]) for k, v in decoder.items())
            assert all(p.grad is None for p in net.decoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_avb_step_inner_updates_the_discriminator_only():
    net, objective, x = make_net(), OBJECTIVES["avb"](), torch.randn(5, 2)
    objective.loss_and_grads(net.model, net.guide, x)
    before = [p.detach().clone() for p in objective.inner_parameters()]
    updates = objective.num_adversary_updates
    assert isinstance(objective.step_inner(net.model, net.guide, x), float)
    assert objective.num_adversary_updates == updates + objective.num_adversary_steps
    after = objective.inner_parameters()
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_jsa_has_no_inner_updates():
    objective = OBJECTIVES["jsa"]()
    assert objective.inner_parameters() == [] and objective.step_inner(None, None) is None


@pytest.mark.parametrize("name", ["fgan", "avb"])
def test_to_moves_the_parts_and_their_optimizer_state(name):
    net, objective, x = make_net(), OBJECTIVES[name](), torch.randn(5, 2)
    objective.loss_and_grads(net.model, _guide(net, name), x)
    optim = objective.critic_optim if name == "fgan" else objective.adversary_optim
    objective.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in objective.inner_parameters())
    states = [v for s in optim.state.values() for k, v in s.items() if k != "step"]
    assert states and all(v.dtype == torch.float32 for v in states)
    if name == "fgan":
        assert objective.double() is objective
        assert all(p.dtype == torch.float64 for p in objective.inner_parameters())


def test_the_functions_treat_an_objective_without_parts_as_having_none():
    objective, net = IWAE(num_particles=2), make_net()
    assert inner.move(objective, torch.float32) is objective
    assert inner.inner_parameters(objective) == []
    assert inner.step_inner(objective, net.model, net.guide, torch.randn(3, 2)) is None
    fdiv_bound = fdiv()
    assert inner.move(fdiv_bound, "cpu") is fdiv_bound
    assert inner.inner_parameters(fdiv_bound) == []  # no guide step taken yet
