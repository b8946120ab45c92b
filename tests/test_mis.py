"""The Metropolis independence sampler on its own: transitions, and exact stationarity."""

import math

import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyro_fdiv.inference import mis


def test_step_accepts_iff_log_uniform_below_log_ratio():
    state = mis.init(torch.zeros(4), torch.tensor([0.0, 0.0, -1.0, 2.0]))
    proposal = mis.MISState(torch.ones(4), torch.tensor([-1.0, 0.5, -1.0, 0.0]))
    uniform = torch.tensor([0.3, 0.99, 0.5, 0.2])
    new, info = mis.step(state, proposal, uniform)
    ratio = torch.tensor([math.exp(-1.0), 1.0, 1.0, math.exp(-2.0)])
    assert torch.allclose(info.acceptance_rate, ratio)
    assert info.is_accepted.tolist() == [True, True, True, False]  # 0.3 < e^-1 = 0.37
    assert new.position.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert new.log_weight.tolist() == [-1.0, 0.5, -1.0, 2.0]


def test_step_rejects_nan_and_leaves_zero_density_states():
    inf = math.inf
    state = mis.init(torch.zeros(3), torch.tensor([-inf, -inf, 0.0]))
    proposal = mis.MISState(torch.ones(3), torch.tensor([-5.0, -inf, math.nan]))
    new, info = mis.step(state, proposal, torch.full((3,), 0.999))
    assert info.is_accepted.tolist() == [True, False, False]
    assert info.acceptance_rate.tolist() == [1.0, 0.0, 0.0]
    assert new.position.tolist() == [1.0, 0.0, 0.0]


def test_dict_positions_select_whole_rows():
    state = mis.init({"a": torch.zeros(2, 3), "b": torch.zeros(2)}, torch.zeros(2))
    proposal = mis.MISState({"a": torch.ones(2, 3), "b": torch.ones(2)}, torch.tensor([1.0, -50]))
    new, _ = mis.step(state, proposal, torch.full((2,), 0.5))
    assert new.position["a"].tolist() == [[1.0] * 3, [0.0] * 3]
    assert new.position["b"].tolist() == [1.0, 0.0]


def test_step_many_equals_transitions_in_sequence():
    torch.manual_seed(0)
    state = mis.init(torch.zeros(5), torch.randn(5))
    proposals = mis.MISState(torch.randn(6, 5), torch.randn(6, 5))
    uniform = torch.rand(6, 5)
    final, info = mis.step_many(state, proposals, uniform)
    expected = state
    for k in range(6):
        expected, step_info = mis.step(
            expected, mis.MISState(proposals.position[k], proposals.log_weight[k]), uniform[k]
        )
        assert torch.equal(info.is_accepted[k], step_info.is_accepted)
    assert torch.equal(final.position, expected.position)
    assert torch.equal(final.log_weight, expected.log_weight)


def _run_chains(proposal, num_chains=4000, num_steps=100, ignore_q=False):
    """Final states of independent chains started from the proposal; target N(1, 0.5^2)."""
    target = dist.Normal(1.0, 0.5)
    q_log_prob = (lambda z: torch.zeros_like(z)) if ignore_q else proposal.log_prob
    init_fn, step_fn = mis.build_kernel(
        target.log_prob, lambda: proposal.sample((num_chains,)), q_log_prob
    )
    state = init_fn(proposal.sample((num_chains,)))
    rates = []
    for _ in range(num_steps):
        state, info = step_fn(state)
        rates.append(info.acceptance_rate.mean())
    return state.position, float(torch.stack(rates).mean())


@pytest.mark.parametrize(
    "loc, scale", [(-0.5, 2.0), (1.4, 0.45)], ids=["shifted-wide", "shifted-narrow"]
)
def test_chains_reach_the_target_from_a_poor_proposal(loc, scale):
    torch.manual_seed(1)
    proposal = dist.Normal(loc, scale)
    z, rate = _run_chains(proposal)
    assert rate < 0.6  # the proposal is poor: many rejections
    # the initial states come from the proposal, far from the target
    assert stats.kstest(proposal.sample((4000,)).numpy(), "norm", args=(1.0, 0.5)).pvalue < 1e-6
    assert stats.kstest(z.numpy(), "norm", args=(1.0, 0.5)).pvalue > 0.01


def test_wrong_acceptance_ratio_is_detected():
    """The test above has power: ignoring q in the ratio (random-walk style) is rejected."""
    torch.manual_seed(1)
    z, _ = _run_chains(dist.Normal(-0.5, 2.0), ignore_q=True)
    assert stats.kstest(z.numpy(), "norm", args=(1.0, 0.5)).pvalue < 1e-6


def test_discrete_target_matches_by_chi_square():
    torch.manual_seed(2)
    logits = torch.tensor([0.0, 1.5, -1.0, 0.7, 2.0])
    target = dist.Categorical(logits=logits)
    proposal = dist.Categorical(probs=torch.tensor([0.4, 0.05, 0.4, 0.1, 0.05]))  # poor
    init_fn, step_fn = mis.build_kernel(
        target.log_prob, lambda: proposal.sample((5000,)), proposal.log_prob
    )
    state = init_fn(proposal.sample((5000,)))
    for _ in range(40):
        state, _ = step_fn(state)
    counts = torch.bincount(state.position, minlength=5).numpy()
    expected = torch.softmax(logits, 0).numpy() * 5000
    assert stats.chisquare(counts, expected).pvalue > 0.01
