"""A new objective on pyro_fdiv's mechanism: the chi upper bound CUBO_n (Dieng et al. 2017)."""

import torch
from pyro.infer.elbo import ELBO

from pyro_fdiv.inference import guess_max_plate_nesting, importance_trace
from pyro_fdiv.inference.importance import checked_value, log_mean_exp


class ChiUpperBound(ELBO):
    r"""Per data point :math:`\frac{1}{n}\log\frac{1}{K}\sum_k w_k^n`, an upper bound on
    :math:`\log p(x)` as K grows (exact at the posterior); the guide minimizes it (rsample)."""

    n = 2.0

    def _weights_and_loss(self, model, guide, args, kwargs):
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        options = {"num_particles": self.num_particles, "max_plate_nesting": self.max_plate_nesting}
        weights = importance_trace(model, guide, args, kwargs, **options)
        bound = log_mean_exp(self.n * weights.log_w) / self.n  # one per data point
        return weights, bound.sum() * weights.scale

    def _get_trace(self, model, guide, args, kwargs):  # Pyro's ELBO interface
        weights = self._weights_and_loss(model, guide, args, kwargs)[0]
        return weights.model_trace, weights.guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self._weights_and_loss(model, guide, args, kwargs)[1]

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            weights, loss = self._weights_and_loss(model, guide, args, kwargs)
        return checked_value(loss, "ChiUpperBound", weights)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        weights, loss = self._weights_and_loss(model, guide, args, kwargs)
        loss.backward()
        return checked_value(loss.detach(), "ChiUpperBound", weights)
