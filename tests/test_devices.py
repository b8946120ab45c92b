"""Device and dtype independence: every objective trains on every available device (CUDA is
skipped where absent) and in float32, with no float64 or CPU tensor leaking into the step."""

import numpy as np
import pytest
import torch

from pyro_fdiv.train import OBJECTIVES, TrainConfig, Trainer

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]
PARTICLES = {"elbo": 1, "iwae": 3, "bbalpha": 3, "avb": 3, "jsa": 2, "fdiv": 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_trains_in_float32_on_device(objective, device, data_root, tmp_path):
    torch.set_default_dtype(torch.float32)  # conftest restores float64 afterwards
    config = TrainConfig(
        objective=objective,
        num_particles=PARTICLES[objective],
        architecture="small",
        epochs=1,
        batch_size=10,
        num_test=10,
        eval_samples=5,
        data_root=str(data_root),
        out=str(tmp_path),
        device=device,
    )
    trainer = Trainer(config, progress=False)
    losses = trainer.step_losses()
    assert np.isfinite(losses).all()
    expected = torch.device(device)
    for name, param in trainer.vae.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.device.type == expected.type, name
        assert param.grad is None or param.grad.dtype == torch.float32, name
    state = getattr(trainer.objective, "state_dict", dict)()
    tensors = [v for v in _leaves(state) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for tensor in tensors:  # JSA's chains, AVB's discriminator
        assert tensor.device.type == expected.type
    log_lik = trainer.test_log_likelihood(5)
    assert log_lik.dtype == torch.float32 and log_lik.device.type == expected.type
    assert torch.isfinite(log_lik).all()


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree
