"""Tests of the Bernoulli VAE's model/guide pair in ``pyro_fdiv.models.vae``."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.poutine.util import site_is_subsample

from pyro_fdiv.models.vae import VAE, Decoder, Encoder

X_DIM, Z_DIM, HIDDEN_DIM, BATCH = 12, 3, 5, 4


@pytest.fixture(autouse=True)
def _reset_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


def _vae(name: str = "vae") -> VAE:
    return VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dim=HIDDEN_DIM, name=name).double()


def _data(batch: int = BATCH) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, X_DIM), 0.3, dtype=torch.float64))


def _traces(vae: VAE, x: torch.Tensor, num_data: int | None = None):
    guide_trace = poutine.trace(vae.guide).get_trace(x, num_data=num_data)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(
        x, num_data=num_data
    )
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return model_trace, guide_trace


def _sample_sites(trace) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def test_networks_shapes():
    encoder, decoder = Encoder(X_DIM, HIDDEN_DIM, Z_DIM), Decoder(Z_DIM, HIDDEN_DIM, X_DIM)
    loc, scale = encoder(torch.rand(7, BATCH, X_DIM))
    assert loc.shape == scale.shape == (7, BATCH, Z_DIM)
    assert (scale > 0).all()
    assert decoder(loc).shape == (7, BATCH, X_DIM)


def test_model_guide_sites_and_shapes():
    vae = _vae()
    x = _data()
    model_trace, guide_trace = _traces(vae, x)

    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    assert set(model_sites) == {"z", "x"}
    assert set(guide_sites) == {"z"}
    assert model_sites["x"]["is_observed"] and not model_sites["z"]["is_observed"]
    assert model_sites["x"]["value"] is x
    assert model_sites["z"]["value"].shape == (BATCH, Z_DIM)
    for site in (model_sites["z"], model_sites["x"], guide_sites["z"]):
        assert site["log_prob"].shape == (BATCH,)
        assert site["log_prob"].dtype == torch.float64
        assert site["scale"] == 1.0
        assert [frame.name for frame in site["cond_indep_stack"]] == ["data"]
    assert model_sites["z"]["fn"].event_shape == (Z_DIM,)
    assert model_sites["x"]["fn"].event_shape == (X_DIM,)


def test_param_store_names():
    x = _data()
    for name in ("vae", "other"):
        vae = _vae(name)
        _traces(vae, x)
        assert {f"{name}_encoder$$$hidden.0.weight", f"{name}_decoder$$$fc_logits.bias"} <= set(
            pyro.get_param_store().keys()
        )
    assert len(pyro.get_param_store()) == 2 * len(list(vae.parameters()))


def test_vectorized_particles_shapes():
    vae = _vae()
    x = _data()
    num_particles = 6

    def vectorize(fn):
        def wrapped(*args, **kwargs):
            with pyro.plate("particles", num_particles, dim=-2):
                return fn(*args, **kwargs)

        return wrapped

    guide_trace = poutine.trace(vectorize(vae.guide)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vectorize(vae.model), guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    assert model_trace.nodes["z"]["value"].shape == (num_particles, BATCH, Z_DIM)
    assert model_trace.nodes["z"]["log_prob"].shape == (num_particles, BATCH)
    assert model_trace.nodes["x"]["log_prob"].shape == (num_particles, BATCH)


@pytest.mark.parametrize("num_data", [BATCH, 10, 1000])
def test_subsample_scale(num_data):
    vae = _vae()
    x = _data()
    model_trace, guide_trace = _traces(vae, x, num_data=num_data)
    for trace in (model_trace, guide_trace):
        subsample = trace.nodes["data"]
        assert subsample["fn"].size == num_data
        assert torch.equal(subsample["value"], torch.arange(BATCH))
    for site in [*_sample_sites(model_trace).values(), *_sample_sites(guide_trace).values()]:
        assert site["scale"] == pytest.approx(num_data / BATCH)


def test_bad_arguments():
    vae = _vae()
    with pytest.raises(ValueError, match="num_data"):
        vae.model(_data(), num_data=BATCH - 1)
    with pytest.raises(ValueError, match="name"):
        VAE(name="a$$$b")
    with pytest.raises(ValueError, match="z_dim"):
        Encoder(z_dim=0)
    with pytest.raises(TypeError, match="hidden_dim"):
        Decoder(hidden_dim=2.5)


def test_log_weight_matches_hand_computation():
    vae = _vae()
    x = _data()

    # By hand, from the networks, with K = 1 particle drawn as in the benchmark.
    pyro.set_rng_seed(1)
    loc, scale = vae.encoder(x)
    z = loc + scale * torch.randn((1, *loc.shape), dtype=loc.dtype)
    log_2pi = math.log(2 * math.pi)
    log_pz = (-0.5 * z.square() - 0.5 * log_2pi).sum(-1)
    logits = vae.decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )
    log_qz = (-0.5 * ((z - loc) / scale).square() - scale.log() - 0.5 * log_2pi).sum(-1)
    expected = (log_pz + log_px - log_qz)[0]

    # From Pyro traces: the guide's sample replayed into the model.
    pyro.set_rng_seed(1)
    model_trace, guide_trace = _traces(vae, x)
    assert torch.allclose(guide_trace.nodes["z"]["value"], z[0], atol=1e-12)
    actual = (
        model_trace.nodes["z"]["log_prob"]
        + model_trace.nodes["x"]["log_prob"]
        - guide_trace.nodes["z"]["log_prob"]
    )
    assert actual.shape == (BATCH,)
    assert torch.allclose(actual, expected, rtol=0, atol=1e-6)


def test_svi_step_trains():
    vae = _vae()
    x = _data(16)
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), loss=pyro.infer.Trace_ELBO()
    )
    before = [p.detach().clone() for p in vae.parameters()]
    losses = [svi.step(x, num_data=100) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters(), strict=True))
