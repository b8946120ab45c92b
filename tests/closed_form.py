"""Small models with closed-form answers, shared by the tests."""

import math

import pyro
import pyro.distributions as dist
import torch

D = 2  # latent and observation dimension of the linear-Gaussian model


def linear_gaussian_model(x, subsample_size=None):
    """``z_i ~ N(0, I)``, ``x_i | z_i ~ N(z_i, I)``: ``p(x_i) = N(0, 2I)``, posterior
    ``N(x_i / 2, I / 2)``."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])


def exact_guide(x, subsample_size=None):
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2, math.sqrt(0.5)).to_event(1))


#: A deliberately poor Gaussian guide: shifted mean, wrong scale.
POOR_SHIFT, POOR_SCALE = 0.4, 1.1


def poor_guide(x, subsample_size=None):
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2 + POOR_SHIFT, POOR_SCALE).to_event(1))


def log_evidence(x):
    """``log p(x_i)`` for each data point of the linear-Gaussian model."""
    return dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)


def poor_log_weights(x, num_samples, num_particles):
    """Independent plain-torch log weights of the poor guide: shape ``(num_samples, K, N)``."""
    loc = x / 2 + POOR_SHIFT
    z = loc + POOR_SCALE * torch.randn(num_samples, num_particles, *x.shape)
    log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x)
    log_q = dist.Normal(loc, POOR_SCALE).log_prob(z)
    return (log_p - log_q).sum(-1)
