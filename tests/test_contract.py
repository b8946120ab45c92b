"""One contract every objective of the package honours (grows as objectives land)."""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_fdiv.inference import AVB, IWAE, BlackBoxAlpha, FDivergenceBound

#: A known target density for the f-divergence bound (a training set would need spread noise,
#: which replaces the model's observation scale, so `noise` would get no gradient).
TARGET = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.5).to_event(1)

OBJECTIVES = {
    "iwae": lambda k: IWAE(num_particles=k),
    "iwae-stl": lambda k: IWAE(num_particles=k, gradient_estimator="stl"),
    "iwae-dreg": lambda k: IWAE(num_particles=k, gradient_estimator="dreg"),
    "bbalpha-0": lambda k: BlackBoxAlpha(0.0, num_particles=k),
    "bbalpha-0.5": lambda k: BlackBoxAlpha(0.5, num_particles=k),
    "bbalpha-2": lambda k: BlackBoxAlpha(2.0, num_particles=k),
    "bbalpha-neg": lambda k: BlackBoxAlpha(-0.5, num_particles=k),
    "fdiv-reverse-kl": lambda k: FDivergenceBound("reverse_kl", data=TARGET, num_particles=k),
    "fdiv-forward-kl": lambda k: FDivergenceBound("forward_kl", data=TARGET, num_particles=k),
    "fdiv-js": lambda k: FDivergenceBound("js", data=TARGET, num_particles=k),
    # adaptive contrast estimates the guide's moments from the particles: K >= 2
    "avb": lambda k: AVB(num_particles=max(k, 2)),
    "avb-prior-contrast": lambda k: AVB(num_particles=k, adaptive_contrast=False),
}
CLASSES = {
    "iwae": IWAE,
    "bbalpha": lambda **kw: BlackBoxAlpha(0.5, **kw),
    "fdiv": lambda **kw: FDivergenceBound("js", data=TARGET, **kw),
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


X = torch.tensor([[0.1, -1.2, 0.4], [2.0, 0.3, -0.5], [0.0, 0.9, 1.1]], dtype=torch.float64)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Model().double()


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("k", [1, 5])
def test_loss_entry_points_agree(name, k, net):
    objective = OBJECTIVES[name](k)
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(7)
        out = getattr(objective, method)(net.model, net.guide, X)
        values.append(out.item() if isinstance(out, torch.Tensor) else out)
    assert all(isinstance(v, float) and v == v for v in values)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert values[0] == pytest.approx(values[2], rel=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_parameter_gets_a_gradient(name, net):
    objective = OBJECTIVES[name](4)
    objective.loss_and_grads(net.model, net.guide, X)
    params = dict(pyro.get_param_store().named_parameters())
    assert set(params) == {
        "noise",
        "shift",
        "decoder$$$weight",
        "decoder$$$bias",
        "encoder$$$weight",
        "encoder$$$bias",
    }
    for pname, value in params.items():
        assert value.grad is not None, pname
        assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", OBJECTIVES)
def test_svi_and_elbo_module(name, net):
    objective = OBJECTIVES[name](3)
    svi = pyro.infer.SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
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

    loss_module = objective(M(net.model, net), M(net.guide, net))
    loss = loss_module(X)
    loss.backward()
    assert net.encoder.weight.grad is not None and net.decoder.weight.grad is not None


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_pickles_and_is_stateless(name, net):
    objective = OBJECTIVES[name](3)
    pyro.set_rng_seed(2)
    before = objective.loss(net.model, net.guide, X)
    copy = pickle.loads(pickle.dumps(objective))
    pyro.set_rng_seed(2)
    assert copy.loss(net.model, net.guide, X) == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bad", [0, -3, 1.5, None])
def test_bad_num_particles_raise(cls, bad):
    with pytest.raises(ValueError, match=r"num_particles to be an integer >= 1"):
        CLASSES[cls](num_particles=bad)
