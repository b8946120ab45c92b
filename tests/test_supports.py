"""What each objective supports (docs/supports.md), cell by cell: every "yes" runs with a finite
loss and finite gradients, every "no" raises a ValueError/NotImplementedError naming the site and
the alternative, and a non-finite loss raises naming the sites whose log-densities are not
finite."""

import inspect
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_fdiv.inference import (
    AVB,
    IWAE,
    JSA,
    BlackBoxAlpha,
    FDivergenceBound,
    FGANBound,
    implicit_sample,
)

N = 4  # data points


def data() -> torch.Tensor:
    # built inside a test: float64 (conftest)
    return torch.tensor([[0.1, -1.2], [2.0, 0.3], [0.0, 0.9], [1.0, -0.4]])


def target():
    """A known data density for FDivergenceBound, rows of shape (2,)."""
    return dist.Normal(torch.zeros(2), 1.5).to_event(1)


class Net(nn.Module):
    """A two-dimensional latent-variable model in every variant the table's columns need."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 2)
        self.encoder = nn.Linear(2, 4)
        self.sampler = nn.Linear(2 + 3, 2)

    # continuous local latents, amortized guide (generative learning)
    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        out = self.encoder(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(out[..., :2], out[..., 2:].exp()).to_event(1))

    # discrete local latents
    def discrete_model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def discrete_guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x)[..., :2]).to_event(1))

    # a global latent shared by the data points
    def global_model(self, x):
        pyro.module("decoder", self.decoder)
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(self.decoder(w), 1.0).to_event(1), obs=x)

    def global_guide(self, x):
        loc = pyro.param("w_loc", torch.zeros(2))
        scale = pyro.param("w_scale", torch.ones(2), constraint=dist.constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    # data subsampling: minibatches of 2 of the N data points
    def sub_model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x[idx])

    def sub_guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            out = self.encoder(x[idx])
            pyro.sample("z", dist.Normal(out[..., :2], out[..., 2:].exp()).to_event(1))

    def global_sub_model(self, x):
        pyro.module("decoder", self.decoder)
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(self.decoder(w), 1.0).to_event(1), obs=x[idx])

    # an implicit guide: a noise-fed network, no density
    def implicit_guide(self, x):
        pyro.module("sampler", self.sampler)
        with pyro.plate("data", len(x)):
            eps = pyro.sample(
                "eps", dist.Normal(torch.zeros(3), 1.0).to_event(1), infer={"is_auxiliary": True}
            )
            h = torch.cat([x.expand((*eps.shape[:-1], 2)), eps], -1)
            implicit_sample("z", self.sampler(h), event_dim=1)


def school_model(y):
    """Posterior inference: a fixed hierarchical model (no parameters), Eight Schools' shape."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def school_guide(y):
    mu_loc = pyro.param("mu_loc", torch.tensor(0.0))
    mu_scale = pyro.param("mu_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    theta_loc = pyro.param("theta_loc", torch.zeros(len(y)))
    theta_scale = pyro.param(
        "theta_scale", torch.ones(len(y)), constraint=dist.constraints.positive
    )
    pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    with pyro.plate("data", len(y)):
        pyro.sample("theta", dist.Normal(theta_loc, theta_scale))


def school_data() -> torch.Tensor:
    return torch.tensor([2.0, -1.0, 0.5, 3.0])


OBJECTIVES = {
    "trace_elbo": lambda: Trace_ELBO(),
    "iwae": lambda: IWAE(num_particles=3),
    "iwae-stl": lambda: IWAE(num_particles=3, gradient_estimator="stl"),
    "iwae-dreg": lambda: IWAE(num_particles=3, gradient_estimator="dreg"),
    "bbalpha": lambda: BlackBoxAlpha(0.5, num_particles=3),
    "fdiv": lambda: FDivergenceBound("reverse_kl", data=target(), num_particles=3),
    "fgan": lambda: FGANBound("js", critic=nn.Linear(2, 1), num_particles=3),
    "avb": lambda: AVB(num_particles=3, discriminator_hidden=(8,)),
    "jsa": lambda: JSA(num_data=N, num_particles=3),
}
IMPORTANCE = ["iwae", "iwae-stl", "iwae-dreg", "bbalpha"]

#: column -> (model, guide, data) of the scenario, from a Net
SCENARIOS = {
    "continuous": lambda net: (net.model, net.guide, data()),
    "discrete": lambda net: (net.discrete_model, net.discrete_guide, data()),
    "amortized": lambda net: (net.model, net.guide, data()),
    "global": lambda net: (net.global_model, net.global_guide, data()),
    "subsampling": lambda net: (net.sub_model, net.sub_guide, data()),
    "implicit": lambda net: (net.model, net.implicit_guide, data()),
    "posterior": lambda net: (school_model, school_guide, school_data()),
    "generative": lambda net: (net.model, net.guide, data()),
}

#: the "yes" cells of docs/supports.md (and the qualified ones that run)
YES = {
    "trace_elbo": [
        "continuous",
        "discrete",
        "amortized",
        "global",
        "subsampling",
        "posterior",
        "generative",
    ],
    **{
        name: ["continuous", "amortized", "global", "subsampling", "posterior", "generative"]
        for name in IMPORTANCE
    },
    "fdiv": ["continuous", "amortized", "generative"],
    "fgan": ["continuous", "global", "subsampling", "generative"],
    "avb": [
        "continuous",
        "amortized",
        "global",
        "subsampling",
        "implicit",
        "posterior",
        "generative",
    ],
    "jsa": [
        "continuous",
        "discrete",
        "amortized",
        "global",
        "subsampling",
        "posterior",
        "generative",
    ],
}
YES["iwae"] = [*YES["iwae"], "discrete"]
YES["bbalpha"] = [*YES["bbalpha"], "discrete"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().double()


def _params() -> dict[str, torch.Tensor]:
    return dict(pyro.get_param_store().named_parameters())


@pytest.mark.parametrize(
    "name, column", [(name, column) for name, columns in YES.items() for column in columns]
)
def test_supported_combinations_give_finite_loss_and_gradients(name, column, net):
    model, guide, x = SCENARIOS[column](net)
    objective = OBJECTIVES[name]()
    value = objective.loss_and_grads(model, None if name == "fgan" else guide, x)
    assert isinstance(value, float) and math.isfinite(value)
    params = _params()
    assert params
    for pname, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if column == "generative":  # the model's own parameters learn
        for pname in ("decoder$$$weight", "decoder$$$bias"):
            assert params[pname].grad.abs().sum() > 0, pname
    if column == "posterior":  # a fixed model: the guide's parameters are what is fitted
        assert set(params) == {"mu_loc", "mu_scale", "theta_loc", "theta_scale"}
        for pname, p in params.items():
            assert p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------------------------------------
# The "no" cells: each raises, naming the site and the alternative

IMPLICIT = r"(?s)site 'z' is implicit.*no density.*pyro_fdiv\.inference\.AVB"


@pytest.mark.parametrize("name", ["trace_elbo", *IMPORTANCE, "fdiv"])
def test_implicit_guides_raise_naming_the_site_and_avb(name, net):
    with pytest.raises(ValueError, match=IMPLICIT):
        OBJECTIVES[name]().loss_and_grads(net.model, net.implicit_guide, data())


def test_jsa_implicit_guide_raises_naming_the_site_and_avb(net):
    with pytest.raises(ValueError, match=r"(?s)JSA: the guide cannot score its site 'z'.*AVB"):
        OBJECTIVES["jsa"]().loss_and_grads(net.model, net.implicit_guide, data())


@pytest.mark.parametrize("name", ["iwae-stl", "iwae-dreg"])
def test_stl_and_dreg_reject_discrete_latents_naming_reparam(name, net):
    match = r"'z'\] cannot be reparameterized\. Use gradient_estimator='reparam'"
    with pytest.raises(ValueError, match=match):
        OBJECTIVES[name]().loss_and_grads(net.discrete_model, net.discrete_guide, data())


@pytest.mark.parametrize("name", ["iwae-stl", "iwae-dreg"])
def test_stl_and_dreg_name_only_the_latent_sites(name, net):
    with pytest.raises(ValueError, match=r"needs reparameterized guide sites, but \['z'\] cannot"):
        OBJECTIVES[name]().loss_and_grads(net.discrete_model, net.discrete_guide, data())


def test_dreg_rejects_a_hierarchical_guide_naming_stl():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    def guide():
        a = pyro.sample("a", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    with pytest.raises(ValueError, match=r"guide site 'b' depends on \['a'\].*'stl' or 'reparam'"):
        IWAE(num_particles=2, gradient_estimator="dreg").loss_and_grads(model, guide)


@pytest.mark.parametrize("name", [*IMPORTANCE, "avb"])
def test_subsampling_around_global_latents_raises(name, net):
    match = (
        r"(?s)plate 'data' is subsampled \(2 of 4\) but sites .*'w'.* are outside it.*"
        r"subsample only such a plate, use a global-latent estimator.*"
        r"or move the global latents' inference"
    )
    objective = OBJECTIVES[name]()
    if name != "avb":  # IWAE and BB-α have global-latent estimators; "error" keeps the refusal
        objective.global_latents = "error"
    with pytest.raises(ValueError, match=match):
        objective.loss_and_grads(net.global_sub_model, net.global_guide, data())


def test_jsa_subsampling_needs_num_data(net):
    match = r"plate 'data' is subsampled \(2 of 4\) but num_data=None.*Pass JSA\(num_data=\.\.\.\)"
    with pytest.raises(ValueError, match=match):
        JSA(num_particles=3).loss_and_grads(net.sub_model, net.sub_guide, data())


@pytest.mark.parametrize(
    "name, side",
    [("fdiv", "model"), ("fdiv-data", "guide"), ("fgan", "model")],
)
def test_generative_objectives_reject_discrete_latents(name, side, net):
    objective = (
        FDivergenceBound("forward_kl", data=target(), num_particles=3)  # data side: the guide
        if name == "fdiv-data"
        else OBJECTIVES[name]()
    )
    guide = None if name == "fgan" else net.discrete_guide
    match = (
        rf"samples 'z' from the {side} and differentiates through the sample.*"
        r"score-function gradients \(IWAE, BlackBoxAlpha, JSA\)"
    )
    with pytest.raises(NotImplementedError, match=match):
        objective.loss_and_grads(net.discrete_model, guide, data())


def test_avb_rejects_discrete_latents(net):
    # Pyro's helpful_support_errors: names the site; its alternative is enumeration
    with pytest.raises(ValueError, match=r"(?s)discrete sample site 'z'.*enumerat"):
        OBJECTIVES["avb"]().loss_and_grads(net.discrete_model, net.discrete_guide, data())


GLOBAL_FDIV = (
    r"(?s)FDivergenceBound needs every latent site and the observation '{obs}' inside one data "
    r"plate.*Move global latents into pyro\.param, or use a posterior-inference objective "
    r"\(IWAE, BlackBoxAlpha\)"
)


def test_fdiv_rejects_global_latents(net):
    with pytest.raises(ValueError, match=GLOBAL_FDIV.format(obs="x")):
        OBJECTIVES["fdiv"]().loss_and_grads(net.global_model, net.global_guide, data())


def test_fdiv_global_latent_error_names_the_latent_site(net):
    with pytest.raises(ValueError, match=r"'w'"):
        OBJECTIVES["fdiv"]().loss_and_grads(net.global_model, net.global_guide, data())


def test_fdiv_rejects_posterior_inference_of_a_fixed_model():
    # one particle: with more, the per-school guide parameters fail first (next test)
    objective = FDivergenceBound(
        "reverse_kl", data=dist.Normal(torch.zeros(()), 3.0), num_particles=1
    )
    with pytest.raises(ValueError, match=GLOBAL_FDIV.format(obs="y")):
        objective.loss_and_grads(school_model, school_guide, school_data())


def test_fdiv_posterior_inference_error_comes_from_the_objective():
    objective = FDivergenceBound(
        "reverse_kl", data=dist.Normal(torch.zeros(()), 3.0), num_particles=3
    )
    with pytest.raises(ValueError, match=r"(?s)FDivergenceBound.*'(mu|theta)'"):
        objective.loss_and_grads(school_model, school_guide, school_data())


FDIV_SUBSAMPLED = (
    r"(?s)FDivergenceBound: plate 'data' is subsampled \({how}\)\. The batch is the sample of "
    r"p_hat: pass the minibatch itself as the data argument .* without subsample or "
    r"subsample_size"
)


def test_fdiv_rejects_subsample_size(net):
    # the minibatch is the data argument itself: a subsampled plate observes fewer rows
    match = FDIV_SUBSAMPLED.format(how="subsample_size=2 of 4")
    with pytest.raises(ValueError, match=match):
        OBJECTIVES["fdiv"]().loss_and_grads(net.sub_model, net.sub_guide, data())


@pytest.mark.parametrize("f", ["reverse_kl", "forward_kl"])  # model side, data side
def test_fdiv_rejects_a_subsampled_data_plate_by_name(f):
    def model(x, idx):
        with pyro.plate("data", 10, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, idx):
        with pyro.plate("data", 10, subsample=idx):
            pyro.sample("z", dist.Normal(0.5 * x, 1.0).to_event(1))

    objective = FDivergenceBound(f, data=target(), num_particles=3)
    with pytest.raises(ValueError, match=r"(?s)plate 'data'.*subsampl"):
        objective.loss(model, guide, data(), torch.tensor([0, 3, 5, 7]))


def test_fgan_rejects_a_guide_for_posterior_inference():
    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, y):
            return self.linear(y[:, None])

    objective = FGANBound("js", critic=Critic().double())
    with pytest.raises(ValueError, match=r"(?s)guide.*'(mu|theta)'"):
        objective.loss_and_grads(school_model, school_guide, school_data())


# ---------------------------------------------------------------------------------------------
# Non-finite losses name the sites


def _huge_obs_data() -> torch.Tensor:
    x = data()
    x[1, 0] = 1e200  # inside the support, but N(.; z, 1) underflows to log-density -inf there
    return x


def obs_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def shifted_guide(x):
    loc = pyro.param("loc", torch.zeros(2))
    shift = pyro.param("shift", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc + shift, 1.0).to_event(1))


NON_FINITE_OBS = {  # objectives that score the observed batch
    "iwae": lambda: IWAE(num_particles=3),
    "iwae-stl": lambda: IWAE(num_particles=3, gradient_estimator="stl"),
    "iwae-dreg": lambda: IWAE(num_particles=3, gradient_estimator="dreg"),
    "bbalpha": lambda: BlackBoxAlpha(0.5, num_particles=3),
    "bbalpha-0": lambda: BlackBoxAlpha(0.0, num_particles=3),
    "bbalpha-neg": lambda: BlackBoxAlpha(-1.0, num_particles=3),
    "avb": lambda: AVB(num_particles=3, discriminator_hidden=(8,)),
    "avb-prior-contrast": lambda: AVB(
        num_particles=3, adaptive_contrast=False, discriminator_hidden=(8,)
    ),
    "jsa": lambda: JSA(num_data=N, num_particles=3),
    "jsa-one-chain": lambda: JSA(num_particles=3),
}
NON_FINITE = r"loss is (nan|inf|-inf)\. Non-finite log-densities at: model site 'x'"


@pytest.mark.parametrize("method", ["loss", "loss_and_grads"])
@pytest.mark.parametrize("name", NON_FINITE_OBS)
def test_non_finite_observation_log_density_raises_naming_the_site(name, method):
    with pytest.raises(ValueError, match=NON_FINITE):
        getattr(NON_FINITE_OBS[name](), method)(obs_model, shifted_guide, _huge_obs_data())


@pytest.mark.parametrize("method", ["loss", "loss_and_grads"])
@pytest.mark.parametrize(
    "f, side, site",
    [
        # f(0) = inf: z from the prior, scored by the guide
        ("reverse_kl", "model", "guide site 'z'"),
        ("jeffreys", "model", "guide site 'z'"),
        # f~(0) = inf: z from the guide, scored by the prior
        ("forward_kl", "data", "model site 'z'"),
        ("pearson_chi2", "data", "model site 'z'"),
    ],
)
def test_fdiv_non_finite_log_density_raises_naming_the_site(f, side, site, method):
    # the batch's values are replaced (by model samples or data draws): a far-off guide is the
    # site whose log-density is -inf, and the density ratio u is 0 where f(0) is infinite
    pyro.param("shift", torch.tensor(1e200))
    objective = FDivergenceBound(f, data=target(), sample_from=side, num_particles=3)
    with pytest.raises(ValueError, match=rf"loss is .*Non-finite log-densities at: .*{site}"):
        getattr(objective, method)(obs_model, shifted_guide, data())


@pytest.mark.parametrize(
    "f, side, limit",
    [("js", "model", math.log(2) / 2), ("reverse_kl", "data", 0.0), ("gan", "model", 0.0)],
)
def test_fdiv_bounded_f_at_a_zero_density_ratio_is_its_limit(f, side, limit):
    # the same far-off guide, but f(0) (model side) or f~(0) (data side) is finite: the bound
    # is that limit, not NaN, and the gradients stay finite
    pyro.param("shift", torch.tensor(1e200))
    objective = FDivergenceBound(f, data=target(), sample_from=side, num_particles=3)
    assert objective.loss(obs_model, shifted_guide, data()) == pytest.approx(limit, abs=1e-15)
    loss = objective.differentiable_loss(obs_model, shifted_guide, data())
    assert loss.item() == pytest.approx(limit, abs=1e-15)
    loss.backward()
    for name, p in pyro.get_param_store().named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("data_kind", ["target", "training set"])
def test_fdiv_non_finite_data_density_is_named(data_kind):
    def far_model(x):
        far = pyro.param("far", torch.tensor(1e200))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + far, 1.0).to_event(1), obs=x)

    kwargs = {"data": target()} if data_kind == "target" else {"data": data(), "spread": 0.5}
    objective = FDivergenceBound("reverse_kl", sample_from="model", num_particles=3, **kwargs)
    with pytest.raises(ValueError, match=r"(?i)data density|p_hat|p̂"):
        objective.loss(far_model, shifted_guide, data())


def _inf_sample_model(x):
    shift = pyro.param("shift", torch.tensor(float("inf")))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("method", ["loss", "loss_and_grads"])
def test_fgan_non_finite_bound_raises(method):
    # FGANBound has no log-densities: its check is on the bound, whatever made it non-finite
    objective = FGANBound("js", critic=nn.Linear(2, 1).double())
    with pytest.raises(ValueError, match=r"FGANBound bound is (nan|-?inf): the critic"):
        getattr(objective, method)(_inf_sample_model, None, data())


def test_fgan_non_finite_model_samples_name_the_observation_site():
    objective = FGANBound("js", critic=nn.Linear(2, 1).double())
    with pytest.raises(ValueError, match=r"'x'"):
        objective.loss(_inf_sample_model, None, data())


def test_trace_elbo_has_no_non_finite_check():
    # the reference row: Pyro's Trace_ELBO returns the infinite loss (warn_if_nan: NaN only)
    loss = Trace_ELBO().loss_and_grads(obs_model, shifted_guide, _huge_obs_data())
    assert loss == math.inf


def test_jsa_differentiable_loss_checks_too():
    with pytest.raises(ValueError, match=NON_FINITE):
        JSA(num_data=N, num_particles=3).differentiable_loss(
            obs_model, shifted_guide, _huge_obs_data()
        )


@pytest.mark.parametrize("name", ["iwae", "iwae-dreg", "bbalpha", "avb"])
def test_differentiable_loss_non_finite_raises_naming_the_site(name):
    with pytest.raises(ValueError, match=NON_FINITE):
        NON_FINITE_OBS[name]().differentiable_loss(obs_model, shifted_guide, _huge_obs_data())


def test_fdiv_differentiable_loss_non_finite_raises_naming_the_site():
    pyro.param("shift", torch.tensor(1e200))
    objective = FDivergenceBound("forward_kl", data=target(), sample_from="data", num_particles=3)
    with pytest.raises(ValueError, match=r"Non-finite log-densities at: model site 'z'"):
        objective.differentiable_loss(obs_model, shifted_guide, data())


# ---------------------------------------------------------------------------------------------
# The check_finite option: every objective, both settings, every entry point


def _far_guide_problem():
    pyro.param("shift", torch.tensor(1e200))  # the guide's density at the model's z is 0
    return obs_model, shifted_guide, data()


#: name -> (objective given check_finite, its non-finite problem, the sites its message names)
CHECK_FINITE = {
    "iwae": (
        lambda c: IWAE(num_particles=3, check_finite=c),
        lambda: (obs_model, shifted_guide, _huge_obs_data()),
        "model site 'x'",
    ),
    "iwae-dreg": (
        lambda c: IWAE(num_particles=3, gradient_estimator="dreg", check_finite=c),
        lambda: (obs_model, shifted_guide, _huge_obs_data()),
        "model site 'x'",
    ),
    "bbalpha": (
        lambda c: BlackBoxAlpha(0.5, num_particles=3, check_finite=c),
        lambda: (obs_model, shifted_guide, _huge_obs_data()),
        "model site 'x'",
    ),
    "avb": (
        lambda c: AVB(num_particles=3, discriminator_hidden=(8,), check_finite=c),
        lambda: (obs_model, shifted_guide, _huge_obs_data()),
        "model site 'x'",
    ),
    "jsa": (
        lambda c: JSA(num_data=N, num_particles=3, check_finite=c),
        lambda: (obs_model, shifted_guide, _huge_obs_data()),
        "model site 'x'",
    ),
    "fdiv": (
        lambda c: FDivergenceBound("reverse_kl", data=target(), num_particles=3, check_finite=c),
        _far_guide_problem,
        "guide site 'z'",
    ),
    "fdiv-data": (
        lambda c: FDivergenceBound(
            "forward_kl", data=target(), sample_from="data", num_particles=3, check_finite=c
        ),
        _far_guide_problem,
        "model site 'z'",
    ),
    "fgan": (
        lambda c: FGANBound("js", critic=nn.Linear(2, 1), check_finite=c),
        lambda: (_inf_sample_model, None, data()),
        "model site 'x'",
    ),
}
METHODS = ["loss", "loss_and_grads", "differentiable_loss"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CHECK_FINITE)
def test_check_finite_on_raises_naming_the_sites_in_every_entry_point(name, method):
    make, problem, site = CHECK_FINITE[name]
    objective = make(True)
    with pytest.raises(
        ValueError, match=rf"is (nan|-?inf)\b.*Non-finite log-densities at: .*{site}"
    ):
        getattr(objective, method)(*problem())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CHECK_FINITE)
def test_check_finite_off_returns_the_non_finite_loss(name, method):
    make, problem, _ = CHECK_FINITE[name]
    value = getattr(make(False), method)(*problem())
    if method == "differentiable_loss":
        assert isinstance(value, torch.Tensor) and value.requires_grad
        value = value.item()
    assert isinstance(value, float) and not math.isfinite(value)


@pytest.mark.parametrize("name", CHECK_FINITE)
def test_check_finite_is_a_keyword_on_by_default(name):
    cls = type(CHECK_FINITE[name][0](True))
    parameter = inspect.signature(cls.__init__).parameters["check_finite"]
    assert parameter.default is True and parameter.kind is not parameter.VAR_KEYWORD


@pytest.mark.parametrize("name", CHECK_FINITE)
def test_check_finite_off_never_runs_the_check(name, monkeypatch):
    # the check is the only host-device synchronization of differentiable_loss: off, the shared
    # checked_value is never called (on, it is called once per evaluation)
    from pyro_fdiv.inference import avb, fdiv_bound, fgan, jsa, objective

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return 0.0

    for module in (objective, fdiv_bound, fgan, avb, jsa):
        monkeypatch.setattr(module, "checked_value", spy)
    make, problem, _ = CHECK_FINITE[name]
    make(False).differentiable_loss(*problem())
    assert calls == []
    make(True).differentiable_loss(*problem())
    assert len(calls) == 1


@pytest.mark.parametrize("name", CHECK_FINITE)
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_check_finite_must_be_a_bool(name, bad):
    with pytest.raises(ValueError, match=rf"Expected check_finite to be a bool, actual {bad!r}"):
        CHECK_FINITE[name][0](bad)
