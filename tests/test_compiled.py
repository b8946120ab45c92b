"""Compiled objectives (``compile=True``) and ``make_step``: the same numbers as the eager step
on the same draws, one compilation in steady state, a new one when the arguments' shapes
change, eager fallbacks with a warning, exact resumes, finite checks that name the sites."""

import copy
import math
import warnings
from unittest.mock import ANY

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, config_enumerate
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, AutoNormalMessenger
from torch._dynamo.utils import counters

from pyro_fdiv import checkpoint
from pyro_fdiv.inference import (
    AVB,
    IWAE,
    JSA,
    BlackBoxAlpha,
    FDivergenceBound,
    FGANBound,
    ReweightedWakeSleep,
    SpreadSchedule,
    make_step,
)
from pyro_fdiv.models import eight_schools
from pyro_fdiv.models.ppca import PPCA
from pyro_fdiv.models.sbn import SBN
from pyro_fdiv.models.toy import LatentGenerator
from pyro_fdiv.models.vae import VAE

X = torch.tensor([0.3, -1.1, 2.0, 0.4])
OBJECTIVES = {
    "iwae": lambda **kw: IWAE(num_particles=4, **kw),
    "iwae-dreg": lambda **kw: IWAE(num_particles=4, gradient_estimator="dreg", **kw),
    "bbalpha": lambda **kw: BlackBoxAlpha(0.5, num_particles=4, **kw),
}


def conjugate_model(x):
    loc = pyro.param("prior_loc", x.new_tensor(0.2))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def conjugate_guide(x):
    a = pyro.param("a", x.new_tensor(0.3))
    b = pyro.param("b", x.new_tensor(0.1))
    s = pyro.param("s", x.new_tensor(0.8), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * x + b, s))


def conjugate(dtype=torch.float64):
    return conjugate_model, conjugate_guide, X.to(dtype)


def small_vae(dtype=torch.float64):
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5).to(dtype)
    x = torch.bernoulli(torch.full((5, 6), 0.4, dtype=dtype))
    return vae.model, vae.guide, x


MODELS = {"conjugate": conjugate, "vae": small_vae}

#: The backend of tests about the mechanism rather than Inductor's numbers (seconds faster).
AOT_EAGER = {"backend": "aot_eager"}


def compile_count() -> int:
    """Programs the backend compiled (AOT Autograd's count, under Inductor's compile_fx)."""
    return counters["aot_autograd"]["total"]


def train(setup, make_objective, steps, *, compile=False, dtype=torch.float64, seed=0):
    """Losses, gradients of the last step and final parameters of ``steps`` SVI steps."""
    pyro.clear_param_store()
    model, guide, x = setup(dtype)
    objective = make_objective(compile=compile)
    optim = pyro.optim.Adam({"lr": 0.05})
    pyro.set_rng_seed(seed)
    losses = [SVI(model, guide, optim, objective).step(x) for _ in range(steps - 1)]
    store = pyro.get_param_store()
    losses.append(objective.loss_and_grads(model, guide, x))  # the last step: its gradients
    grads = {name: p.grad.clone() for name, p in store._params.items()}
    return losses, grads, {name: p.detach().clone() for name, p in store._params.items()}


def assert_same(eager, compiled, tol):
    assert compiled[0] == pytest.approx(eager[0], abs=tol, rel=tol)
    for want, got in zip(eager[1:], compiled[1:], strict=True):
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", OBJECTIVES)
def test_compiled_loss_and_gradients_equal_eager(name, model):
    eager = train(MODELS[model], OBJECTIVES[name], 4)
    before = compile_count()
    compiled = train(MODELS[model], OBJECTIVES[name], 4, compile=True)
    assert compile_count() == before + 1  # one program, compiled once
    assert_same(eager, compiled, 1e-10)


def test_float32_equal_eager():
    eager = train(conjugate, OBJECTIVES["iwae"], 4, dtype=torch.float32)
    compiled = train(conjugate, OBJECTIVES["iwae"], 4, compile=True, dtype=torch.float32)
    assert_same(eager, compiled, 1e-5)


def run_steps(setup, steps, *, compiled, seed=0, dtype=torch.float64):
    pyro.clear_param_store()
    model, guide, x = setup(dtype)
    optim = pyro.optim.Adam({"lr": 0.05})
    objective = IWAE(num_particles=4)
    step = (
        make_step(model, guide, optim, objective)
        if compiled
        else SVI(model, guide, optim, objective).step
    )
    pyro.set_rng_seed(seed)
    losses = [step(x) for _ in range(steps)]
    params = {name: p.detach().clone() for name, p in pyro.get_param_store()._params.items()}
    return losses, params, step, copy.deepcopy(optim.get_state())


@pytest.mark.parametrize("model", MODELS)
def test_make_step_equals_svi(model):
    eager = run_steps(MODELS[model], 6, compiled=False)
    compiled = run_steps(MODELS[model], 6, compiled=True)
    assert_same(eager[:2], compiled[:2], 1e-10)
    # the Adam state lives in the PyroOptim's per-parameter optimizers
    want, got = eager[3], compiled[3]
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(
            got[name]["state"][0]["exp_avg"], want[name]["state"][0]["exp_avg"]
        )
        assert got[name]["state"][0]["step"] == want[name]["state"][0]["step"] == 6


def test_no_recompilation_in_steady_state_and_retrace_on_a_shape_change():
    model, guide, x = conjugate()
    step = make_step(model, guide, pyro.optim.Adam({"lr": 0.05}), IWAE(num_particles=4))
    before = compile_count()
    step(x)  # eager, then the program is captured and compiled
    for _ in range(10):
        step(x)
    assert compile_count() == before + 1
    assert len(step.programs) == 1
    longer = torch.cat([x, x])
    pyro.set_rng_seed(3)
    value = step(longer)  # a new shape: an eager, validated step, then a new program
    for _ in range(3):
        step(longer)
        step(x)  # the first program still serves the first shape
    assert compile_count() == before + 2
    assert len(step.programs) == 2
    pyro.set_rng_seed(3)
    assert IWAE(num_particles=4).loss(model, guide, longer) == pytest.approx(value, rel=0.5)


def dynamic_model(x):
    z = pyro.sample("z", dist.Normal(x.new_tensor(0.0), 1.0))
    if z.item() > 0:  # the structure depends on the sampled value
        pyro.sample("w", dist.Normal(z, 1.0), obs=x.new_tensor(0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def dynamic_guide(x):
    loc = pyro.param("loc", x.new_tensor(0.0))
    pyro.sample("z", dist.Normal(loc, 1.0))


def test_dynamic_structure_falls_back_with_one_warning():
    objective = IWAE(compile=True)
    svi = SVI(dynamic_model, dynamic_guide, pyro.optim.Adam({"lr": 0.05}), objective)
    with pytest.warns(UserWarning, match="cannot be traced once.*data-dependent|cannot be traced"):
        svi.step(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step(X) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert not objective._compiled.programs


def test_sequential_particles_fall_back_with_one_warning():
    model, guide, x = conjugate()
    objective = IWAE(num_particles=2, vectorize_particles=False, compile=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
    with pytest.warns(UserWarning, match="one after another"):
        svi.step(x)
    svi.step(x)


def test_checkpoint_resume_is_exact(tmp_path):
    model, guide, x = conjugate()
    optim, objective = pyro.optim.Adam({"lr": 0.05}), IWAE(num_particles=4)
    step = make_step(model, guide, optim, objective, compile_options=AOT_EAGER)
    for _ in range(3):
        step(x)
    path = checkpoint.save(tmp_path / "ckpt.pt", optim=optim, objective=objective)
    straight = [step(x) for _ in range(3)]

    pyro.clear_param_store()
    optim, objective = pyro.optim.Adam({"lr": 0.05}), IWAE(num_particles=4)
    checkpoint.load(path, optim=optim, objective=objective)
    step = make_step(model, guide, optim, objective, compile_options=AOT_EAGER)
    resumed = [step(x) for _ in range(3)]
    assert resumed == pytest.approx(straight, rel=1e-12, abs=1e-12)


def test_a_new_autoguide_beside_other_parameters_equals_svi():
    """With other parameters in the store (another guide trained in this process),
    make_step's first step must not dry-run an autoguide that has not run yet: stopped at
    its first new parameter it was left half set up ("'PyroModule' object has no attribute
    'mu_unconstrained'"). It steps as SVI does."""
    runs = []
    for compiled in (False, True):
        pyro.clear_param_store()
        pyro.param("other_guide.loc", torch.zeros(3))
        guide = AutoNormal(eight_schools.model)
        optim = pyro.optim.Adam({"lr": 0.05})
        objective = IWAE(num_particles=2, max_plate_nesting=1)  # no guess: a first guide run
        step = make_step(eight_schools.model, guide, optim, objective,
                         compile=compiled, compile_options=AOT_EAGER)  # fmt: skip
        pyro.set_rng_seed(0)
        losses = [step() for _ in range(3)]
        params = {n: p.detach().clone() for n, p in pyro.get_param_store()._params.items()}
        runs.append((losses, params))
    assert_same(runs[0], runs[1], 1e-10)


def test_guide_median_and_a_later_svi_see_the_parameters():
    def model():
        pyro.sample("m", dist.Normal(torch.tensor(1.0), 1.0))

    guide = AutoNormal(model)
    optim = pyro.optim.Adam({"lr": 0.1})
    step = make_step(model, guide, optim, IWAE(num_particles=2))
    for _ in range(5):
        step()
    loc = pyro.param("AutoNormal.locs.m").item()
    assert loc != 0.0
    assert guide.median()["m"].item() == loc
    SVI(model, guide, optim, IWAE(num_particles=2)).step()
    assert optim.get_state()["AutoNormal.locs.m"]["state"][0]["step"] == 6


def test_non_finite_loss_names_the_site_and_leaves_the_parameters():
    def guide(x):
        scale = pyro.param("scale", x.new_tensor(0.8))  # unconstrained: may turn negative
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, scale.abs() * 0 + scale))

    model, _, x = conjugate()
    step = make_step(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.05}),
        IWAE(num_particles=2),
        compile_options=AOT_EAGER,
    )
    step(x)
    step(x)
    store = pyro.get_param_store()
    with torch.no_grad():
        store._params["scale"].fill_(-1.0)
    before = {name: p.detach().clone() for name, p in store._params.items()}
    with pytest.raises(ValueError, match="guide site 'z'"):
        step(x)
    for name, p in store._params.items():
        assert torch.equal(p, before[name])


def test_bad_compile_options_raise():
    model, guide, x = conjugate()
    objective = IWAE(compile=True, compile_options={"fullgraf": True})
    with pytest.raises(TypeError, match="fullgraf"):
        SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective).step(x)
    with pytest.raises(TypeError, match="compile_options"):
        IWAE(compile=True, compile_options=["mode"])


def subsampled_model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_tensor(0.0), 1.0))
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def subsampled_guide(x):
    pyro.sample("mu", dist.Normal(pyro.param("a", x.new_tensor(0.0)), 1.0))
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        pyro.sample("z", dist.Normal(pyro.param("b", x.new_zeros(len(x)))[idx], 1.0))


@config_enumerate
def enumerated_model(x):
    p = pyro.param("p", x.new_tensor(0.3), constraint=dist.constraints.unit_interval)
    loc = pyro.sample("loc", dist.Normal(x.new_tensor(0.0), 1.0))
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(p))
        pyro.sample("x", dist.Normal(loc + c, 1.0), obs=x)


def global_model(x):
    loc = pyro.sample("loc", dist.Normal(x.new_tensor(0.0), 1.0))
    scale = pyro.sample("scale", dist.LogNormal(x.new_tensor(0.0), 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, scale), obs=x)


KINDS = {  # model, guide, objective: what the capture must reproduce
    "subsampled-nested": (subsampled_model, lambda m: subsampled_guide, IWAE),
    "subsampled-energy": (subsampled_model, lambda m: subsampled_guide, BlackBoxAlpha),
    "enumerated": (enumerated_model, lambda m: AutoNormal(poutine.block(m, hide=["c"])), IWAE),
    "guide-messenger": (global_model, AutoNormalMessenger, IWAE),
    "multivariate-normal": (global_model, AutoMultivariateNormal, BlackBoxAlpha),
}


@pytest.mark.parametrize("kind", KINDS)
def test_model_kinds_capture_equal_eager(kind):
    """Subsampling (random subsamples drawn in the program), enumeration, GuideMessenger guides
    and a dense guide: captured programs (run by ``aot_eager`` here, for speed) give the eager
    losses on the same draws."""
    model, make_guide, objective = KINDS[kind]
    runs = []
    for compile in (False, True):
        pyro.clear_param_store()
        kwargs = {"compile": compile, "compile_options": {"backend": "aot_eager"}}
        loss = (
            IWAE(num_particles=3, **kwargs)
            if objective is IWAE
            else BlackBoxAlpha(0.5, 3, **kwargs)
        )
        svi = SVI(model, make_guide(model), pyro.optim.Adam({"lr": 0.05}), loss)
        pyro.set_rng_seed(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "IWAE: global latent sites", UserWarning)
            runs.append([svi.step(X) for _ in range(4)])
        assert not compile or loss._compiled.programs
    assert runs[1] == pytest.approx(runs[0], rel=1e-10, abs=1e-10)


ENCODER = torch.nn.Linear(1, 2).double()
NETWORKS = {"encoder": ENCODER}


def closure_guide(x):  # the network is a global its code names: found and substituted
    pyro.module("encoder", ENCODER)
    out = ENCODER(x.unsqueeze(-1))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(out[..., 0], out[..., 1].exp()))


def hidden_guide(x):  # the network hides in a dict: its parameters would be frozen
    pyro.module("encoder", NETWORKS["encoder"])
    out = NETWORKS["encoder"](x.unsqueeze(-1))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(out[..., 0], out[..., 1].exp()))


def test_networks_named_by_the_guide_are_substituted_others_fall_back():
    runs = []
    for guide, compile in ((closure_guide, False), (closure_guide, True), (hidden_guide, True)):
        pyro.clear_param_store()
        state = {k: v.clone() for k, v in ENCODER.state_dict().items()}
        loss = IWAE(num_particles=3, compile=compile, compile_options={"backend": "aot_eager"})
        svi = SVI(conjugate_model, guide, pyro.optim.Adam({"lr": 0.05}), loss)
        pyro.set_rng_seed(0)
        if guide is hidden_guide:
            with pytest.warns(UserWarning, match="encoder.* read outside pyro.param"):
                runs.append([svi.step(X.double()) for _ in range(3)])
        else:
            runs.append([svi.step(X.double()) for _ in range(3)])
            assert not compile or loss._compiled.programs
        ENCODER.load_state_dict(state)
    assert runs[1] == pytest.approx(runs[0], rel=1e-10, abs=1e-10)
    assert runs[2] == pytest.approx(runs[0], rel=1e-10, abs=1e-10)


def guide_with_an_unused_parameter(x):
    pyro.param("unused", x.new_tensor(1.0))  # read, never in the loss: no gradient, no step
    conjugate_guide(x)


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_parameters_without_gradient_are_left_as_eager_leaves_them(optim):
    runs = []
    for compiled in (False, True):
        pyro.clear_param_store()
        make_optim = pyro.optim.Adam if optim == "adam" else pyro.optim.SGD
        args = (conjugate_model, guide_with_an_unused_parameter, make_optim({"lr": 0.05}))
        loss = IWAE(num_particles=3)
        if compiled:
            step = make_step(*args, loss, compile_options={"backend": "aot_eager"})
        else:
            step = SVI(*args, loss).step
        pyro.set_rng_seed(0)
        losses = [step(X.double()) for _ in range(4)]
        store = pyro.get_param_store()
        runs.append((losses, {k: v.detach().clone() for k, v in store._params.items()}))
        assert not compiled or step.programs
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-10, abs=1e-10)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=1e-10, atol=1e-10)
    assert runs[1][1]["unused"].item() == 1.0


# ------------------------------------------------------------------ every other objective
TRAIN = torch.linspace(-2.0, 2.5, 16, dtype=torch.float64)  # the f-bound's training set


def normal_vae(dtype=torch.float64):
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5, likelihood="normal").to(dtype)
    x = torch.rand(5, 6, dtype=dtype)
    return vae.model, vae.guide, x


def _fdiv(setup, **kw):
    """The f-bound on a training set with fixed spread (its buffer an input of the program):
    both players, two guide steps of their own Adam per model step."""
    data = TRAIN[:, None].expand(16, 6) * 0.2 + 0.5 if setup is normal_vae else TRAIN
    return FDivergenceBound(
        "reverse_kl",
        data=data.to(kw.pop("dtype")),
        spread=0.5,
        num_particles=3,
        guide_steps=2,
        guide_optim=pyro.optim.Adam({"lr": 0.05}),
        **kw,
    )


def _avb(setup, **kw):
    kw.pop("dtype")
    return AVB(num_particles=4, num_adversary_steps=2, discriminator_hidden=(8,), **kw)


def _fgan(setup, **kw):
    torch.manual_seed(1)
    critic = torch.nn.Linear(6, 1).to(kw.pop("dtype"))
    return FGANBound("js", critic=critic, num_particles=2, **kw)


def no_guide(x):
    """FGANBound trains the model only."""


OTHERS = {
    "fdiv": (_fdiv, ["conjugate", "vae"]),
    "avb": (_avb, ["conjugate", "vae"]),
    "fgan": (_fgan, ["vae"]),
}
OTHER_MODELS = {"conjugate": conjugate, "vae": normal_vae}


def train_other(name, model_name, steps, *, compile=False, dtype=torch.float64):
    """Losses and final parameters (the store's and the objective's own) of ``steps`` SVI
    steps with the objective's own inner updates."""
    pyro.clear_param_store()
    make, _ = OTHERS[name]
    setup = OTHER_MODELS[model_name]
    model, guide, x = setup(dtype)
    guide = no_guide if name == "fgan" else guide
    objective = make(setup, dtype=dtype, compile=compile)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
    pyro.set_rng_seed(0)
    losses = [svi.step(x) for _ in range(steps)]
    params = {name: p.detach().clone() for name, p in pyro.get_param_store()._params.items()}
    own = {f"own.{i}": p.detach().clone() for i, p in enumerate(objective.inner_parameters())}
    return losses, {**params, **own}, objective


@pytest.mark.parametrize(
    "name,model", [(name, model) for name, (_, models) in OTHERS.items() for model in models]
)
def test_other_objectives_compiled_equal_eager(name, model):
    """Both players of the f-bound, AVB's ELBO step (its discriminator steps eager, the first on
    the program's draws) and the f-GAN model step: Inductor's programs give the eager losses and
    parameters on the same draws, float64 to 1e-10, each program compiled once."""
    eager = train_other(name, model, 4)
    before = compile_count()
    compiled = train_other(name, model, 4, compile=True)
    programs = {"fdiv": 2, "avb": 2, "fgan": 1}[
        name
    ]  # the f-bound: guide and model steps; AVB: ELBO step and fresh draw
    assert compile_count() == before + programs
    assert len(compiled[2]._compiled.programs) == programs
    assert_same(eager[:2], compiled[:2], 1e-10)


def test_other_objectives_float32_equal_eager():
    eager = train_other("fdiv", "vae", 3, dtype=torch.float32)
    compiled = train_other("fdiv", "vae", 3, compile=True, dtype=torch.float32)
    assert_same(eager[:2], compiled[:2], 1e-5)


def test_an_annealing_spread_is_eager_until_it_ends():
    """sigma is a constant of the program: while the schedule anneals the steps are eager
    (no warning), then one program serves the constant end width."""
    pyro.clear_param_store()
    model, guide, x = conjugate()
    objective = FDivergenceBound(
        "forward_kl",
        data=TRAIN,
        spread=SpreadSchedule(1.0, 0.5, 3),
        compile=True,
        compile_options=AOT_EAGER,
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
    for _ in range(3):
        svi.step(x)
        assert not objective._compiled.programs
    for _ in range(2):
        svi.step(x)
    assert list(objective._compiled.programs) == [("model", (0.5,), model, guide, ANY)]


def test_make_step_runs_svi_for_objectives_with_state_of_their_own():
    """The f-bound's schedule and guide steps live in its loss_and_grads: make_step runs
    SVI.step with the objective's own compiled path turned on (JSA's chains too)."""
    pyro.clear_param_store()
    model, guide, x = conjugate()
    objective = FDivergenceBound("forward_kl", data=TRAIN, spread=0.5)
    step = make_step(
        model, guide, pyro.optim.Adam({"lr": 0.05}), objective, compile_options=AOT_EAGER
    )
    for _ in range(3):
        step(x)
    assert objective.schedule.t == 3  # SVI.step ran the objective's loss_and_grads
    assert objective._compiled is not None and objective._compiled.programs
    pyro.clear_param_store()
    jsa = JSA()
    step = make_step(model, guide, pyro.optim.Adam({"lr": 0.05}), jsa, compile_options=AOT_EAGER)
    for _ in range(3):  # the first creates the chains, the second captures its program
        step(x)
    assert int(jsa.num_steps) == 3 and jsa._compiled is not None and jsa._compiled.programs


@pytest.mark.parametrize("centered", [False, True])
def test_make_step_with_clipped_adam_equals_svi(centered):
    """Pyro's ClippedAdam (clipping, learning-rate decay, centered variance) inside the
    compiled step: its Python state (lr, step) advances as the eager optimizer's does."""
    runs = []
    for compiled in (False, True):
        pyro.clear_param_store()
        model, guide, x = small_vae()
        options = {"lr": 0.05, "lrd": 0.9, "clip_norm": 0.5, "centered_variance": centered}
        optim = pyro.optim.ClippedAdam(options)
        objective = IWAE(num_particles=3)
        if compiled:
            step = make_step(model, guide, optim, objective)
        else:
            step = SVI(model, guide, optim, objective).step
        pyro.set_rng_seed(0)
        losses = [step(x) for _ in range(5)]
        if compiled:  # the update is inside the program
            assert [plan.kind for _, plan, _ in step.programs.values()] == ["clipped_adam"]
        params = {n: p.detach().clone() for n, p in pyro.get_param_store()._params.items()}
        runs.append((losses, params, copy.deepcopy(optim.get_state())))
    (eager, eager_params, eager_state), (got, got_params, got_state) = runs
    assert_same((eager, eager_params), (got, got_params), 1e-10)
    for name, state in eager_state.items():
        assert got_state[name]["param_groups"][0]["lr"] == state["param_groups"][0]["lr"]
        assert got_state[name]["state"][0]["step"] == state["state"][0]["step"] == 5
        torch.testing.assert_close(
            got_state[name]["state"][0]["exp_avg_sq"], state["state"][0]["exp_avg_sq"]
        )


def corrupting_backend(gm, example_inputs):
    """A backend whose programs return a loss off by one: a miscompiled program."""

    def run(*inputs):
        out = gm(*inputs)
        return (out[0] + 1.0, *out[1:])

    return run


def test_a_program_that_disagrees_with_eager_is_dropped():
    """The first call of each program is checked against the eager loss of the same draw: a
    wrong program is not used (one warning), and the steps equal the eager ones."""
    eager = run_steps(conjugate, 4, compiled=False)
    pyro.clear_param_store()
    model, guide, x = conjugate()
    optim = pyro.optim.Adam({"lr": 0.05})
    options = {"backend": corrupting_backend}
    step = make_step(model, guide, optim, IWAE(num_particles=4), compile_options=options)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="its compiled program gives the loss .* where the eager"):
        losses = [step(x) for _ in range(4)]
    assert not step.programs and step.eager_keys
    params = {name: p.detach().clone() for name, p in pyro.get_param_store()._params.items()}
    assert_same(eager[:2], (losses, params), 1e-10)


def _package_model(name):
    """(model, guide, objective, args) of a model of ``pyro_fdiv.models`` with an objective it
    is trained with."""
    torch.manual_seed(0)
    if name == "eight_schools-bbalpha":
        return eight_schools.model, AutoNormal(eight_schools.model), BlackBoxAlpha(0.5, 4), ()
    if name == "ppca-iwae":
        net = PPCA(x_dim=4, z_dim=2)
        return net.model, net.guide, IWAE(num_particles=3), (torch.randn(6, 4),)
    if name in ("sbn-vimco", "sbn-rws"):
        net = SBN(x_dim=6, z_dim=3)
        x = torch.bernoulli(torch.full((5, 6), 0.3))
        objective = IWAE(num_particles=3) if name == "sbn-vimco" else ReweightedWakeSleep(3)
        return net.model, net.guide, objective, (x,)
    net = LatentGenerator(2, 2, [8, 8], encoder="gaussian")
    data = torch.randn(12, 2)
    objective = FDivergenceBound("reverse_kl", data=data, spread=0.5, num_particles=2)
    return net.model, net.guide, objective, (data[:4],)


@pytest.mark.parametrize(
    "name", ["eight_schools-bbalpha", "ppca-iwae", "sbn-vimco", "sbn-rws", "toy-fdiv"]
)
def test_the_package_models_compile_equal_to_eager(name):
    """The models of ``pyro_fdiv.models`` under ``make_step``: the eager steps' losses and
    parameters, float64 to 1e-10, from a compiled program. The SBN's Bernoulli latents included:
    the capture keeps ``aten.bernoulli`` as an opaque op on the eager kernel (Inductor would
    rewrite it as ``rand() < p``, other draws), so the first-call check passes."""
    runs = []
    for compiled in (False, True):
        pyro.clear_param_store()
        model, guide, objective, args = _package_model(name)
        optim = pyro.optim.Adam({"lr": 0.05})
        step = make_step(model, guide, optim, objective, compile=compiled)
        pyro.set_rng_seed(0)
        losses = [step(*args) for _ in range(4)]
        if compiled:
            own = getattr(objective, "_compiled", None)
            assert step.programs or (own is not None and own.programs)
        params = {n: p.detach().clone() for n, p in pyro.get_param_store()._params.items()}
        runs.append((losses, params))
    assert_same(runs[0], runs[1], 1e-10)
