"""Checkpoints that cannot run code: crafted files are refused before anything of them runs,
every malformed file is a ValueError naming it, a failed resume changes nothing, and checkpoints
written before loading was made safe (format 1) still resume exactly."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.util
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resume_worker import build, snapshot, train

from pyro_fdiv import checkpoint
from pyro_fdiv.cli import main
from pyro_fdiv.inference import AVB, IWAE, JSA
from pyro_fdiv.models.vae import VAE
from pyro_fdiv.serialization import content_digest
from pyro_fdiv.train import TrainConfig, Trainer

STATEFUL = ("avb", "jsa", "fdiv_bound", "fgan")
#: The entries a format-2 digest covers (everything but the format and the digest).
ENTRIES_DIGESTED = ("param_store", "optim", "objective", "objective_type", "rng", "extra")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _equal_trees(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal_trees(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        same = type(a) is type(b) and len(a) == len(b)
        return same and all(_equal_trees(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _state(run) -> dict:
    """Everything a restore may change: parameters, the optimizer's and the objective's state
    and the RNGs (Python's, NumPy's and PyTorch's)."""
    rng = pyro.util.get_rng_state()
    return {
        "run": snapshot(run),
        "pending": copy.deepcopy(run.optim._state_waiting_to_be_consumed),
        "torch": rng["torch"],
        "random": rng["random"],
        "numpy": (rng["numpy"][0], torch.as_tensor(rng["numpy"][1]), *rng["numpy"][2:]),
    }


class _WritesAFile:
    """Unpickling this calls ``open(marker, "w")``: a file appears if any code of it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------
# Crafted files run no code


@pytest.mark.parametrize("payload", [_WritesAFile, _RunsAShellCommand])
@pytest.mark.parametrize("where", ["top", "inside"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, payload, where):
    marker = tmp_path / "written_by_the_checkpoint"
    evil = payload(marker)
    content = evil if where == "top" else {"format": 2, "extra": {"x": [1, evil]}}
    path = tmp_path / "checkpoint.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*refers to code.*refused"):
        checkpoint.load(path)
    assert not marker.exists()


def test_train_resume_refuses_crafted_checkpoint(data_root, tmp_path, capsys):
    """``pyro-fdiv train --resume`` on a crafted ``OUT/checkpoint.pt``: a one-line error, no
    file written, and the output directory as it was."""
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "written_by_the_checkpoint"
    torch.save({"format": 2, "x": _WritesAFile(marker)}, out / "checkpoint.pt")
    (out / "log.csv").write_text("epoch\n1\n")
    before = _files(out)
    argv = ["train", "--data", str(data_root), "--out", str(out), "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    assert "refers to code" in capsys.readouterr().err
    assert not marker.exists()
    assert _files(out) == before


def test_package_never_loads_with_weights_only_false():
    root = Path(checkpoint.__file__).parent
    offenders = [
        str(p) for p in root.rglob("*.py") if "weights_only=False" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# Malformed checkpoints: a ValueError naming the file and what is wrong


def _payload(name: str, tmp_path: Path) -> tuple[dict, object]:
    run = build(name)
    train(run, 2)
    path = checkpoint.save(tmp_path / "good.pt", optim=run.optim, objective=run.objective)
    return torch.load(path, weights_only=True), run


def _write(payload: dict, path: Path, *, redigest: bool) -> Path:
    """``payload`` written as a checkpoint; with ``redigest`` its digest is made to match (a
    file that is consistent but wrong), else the old digest stays (a damaged file)."""
    if redigest:
        payload = {**payload, "digest": content_digest(payload, ENTRIES_DIGESTED)}
    torch.save(payload, path)
    return path


def _delete(tree: dict, keys: tuple) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    del tree[keys[-1]]


def _retype(tree: dict, keys: tuple) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = "a string" if not isinstance(tree[keys[-1]], str) else 7


ENTRIES = [
    ("param_store",),
    ("param_store", "params"),
    ("param_store", "constraints"),
    ("optim",),
    ("objective",),
    ("objective_type",),
    ("rng",),
    ("rng", "torch"),
    ("rng", "random"),
    ("rng", "random", "state"),
    ("rng", "numpy"),
    ("rng", "numpy", "state"),
    ("rng", "numpy", "pos"),
    ("extra",),
    ("digest",),
]


@pytest.mark.parametrize("keys", ENTRIES, ids=[".".join(k) for k in ENTRIES])
@pytest.mark.parametrize("change", [_delete, _retype], ids=["deleted", "retyped"])
def test_missing_or_mistyped_entry_is_named(tmp_path, keys, change):
    payload, _ = _payload("avb", tmp_path)
    change(payload, keys)
    path = _write(payload, tmp_path / "bad.pt", redigest="digest" not in keys)
    name = ".".join(keys)
    reason = "digest" if keys == ("digest",) else rf"'{name}'"
    with pytest.raises(ValueError, match=rf"bad\.pt.*{reason}"):
        checkpoint.load(path)


def test_optimizer_state_of_another_shape_is_named(tmp_path):
    payload, _ = _payload("iwae_dreg", tmp_path)
    name, state = next(iter(payload["optim"].items()))
    moments = state["state"][0]
    moments["exp_avg"] = torch.zeros((*tuple(moments["exp_avg"].shape), 2))
    path = _write(payload, tmp_path / "bad.pt", redigest=True)
    with pytest.raises(ValueError, match=rf"bad\.pt.*optim\.{re.escape(name)}.*exp_avg.*shape"):
        checkpoint.load(path)


def test_changed_contents_fail_the_digest(tmp_path):
    payload, _ = _payload("jsa", tmp_path)
    params = payload["param_store"]["params"]
    name = next(iter(params))
    params[name] = params[name].detach() + 1e-9
    path = _write(payload, tmp_path / "bad.pt", redigest=False)
    with pytest.raises(ValueError, match=r"bad\.pt.*do not match its digest"):
        checkpoint.load(path)


@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_unknown_format_names_the_readable_ones(tmp_path, version):
    payload, _ = _payload("iwae_dreg", tmp_path)
    payload["format"] = version
    path = _write(payload, tmp_path / "bad.pt", redigest=True)
    with pytest.raises(ValueError, match=r"bad\.pt.*format .* not readable.*formats 1, 2"):
        checkpoint.load(path)


def test_unknown_constraint_class_is_named(tmp_path):
    payload, _ = _payload("iwae_dreg", tmp_path)
    name = next(iter(payload["param_store"]["constraints"]))
    payload["param_store"]["constraints"][name] = {"class": "os.system", "state": {}}
    path = _write(payload, tmp_path / "bad.pt", redigest=True)
    with pytest.raises(ValueError, match=r"unknown constraint class 'os.system'"):
        checkpoint.load(path)


# ------------------------------------------------------------------------------------------------
# Property tests: damaged bytes either resume exactly or raise, and then nothing changed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """For each stateful objective: the bytes of a real checkpoint after 2 steps, and the loss
    and full state after one more step (what an exact resume must reproduce)."""
    root = tmp_path_factory.mktemp("saved")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    out = {}
    try:
        for name in STATEFUL:
            run = build(name)
            train(run, 2)
            path = checkpoint.save(root / f"{name}.pt", optim=run.optim, objective=run.objective)
            out[name] = (path.read_bytes(), (train(run, 1), snapshot(run)))
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.clear_param_store()
    return _Saved(out)


class _Saved(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<checkpoints of {sorted(self)}>"


def _try_resume(name: str, data: bytes, expected: tuple, directory: Path) -> bool:
    """Load ``data`` into a run that has state of its own: a ValueError naming the file with
    nothing changed, or an exact resume (the next step's loss and state as saved). Returns
    whether it resumed."""
    run = build(name)
    train(run, 1)
    before = _state(run)
    path = directory / "damaged.pt"
    path.write_bytes(data)
    try:
        checkpoint.load(path, optim=run.optim, objective=run.objective)
    except ValueError as error:
        assert str(path) in str(error)
        assert _equal_trees(_state(run), before)
        return False
    losses, state = expected
    assert train(run, 1) == losses
    assert _equal_trees(snapshot(run), state)
    return True


def _settings(max_examples: int) -> settings:
    health = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=health, derandomize=True
    )


@_settings(25)
@given(name=st.sampled_from(STATEFUL), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_checkpoint(saved, tmp_path, name, cut):
    data, expected = saved[name]
    assert not _try_resume(name, data[: int(cut * len(data))], expected, tmp_path)


@_settings(60)
@given(
    name=st.sampled_from(STATEFUL),
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3
    ),
)
def test_flipped_bytes(saved, tmp_path, name, flips):
    """A flipped bit either leaves the contents intact (zip and pickle framing that torch
    ignores, e.g. a timestamp) and resumes exactly, or is refused."""
    data, expected = saved[name]
    damaged = bytearray(data)
    for where, bit in flips:
        damaged[int(where * len(data))] ^= 1 << bit
    _try_resume(name, bytes(damaged), expected, tmp_path)


@_settings(30)
@given(name=st.sampled_from(STATEFUL), data=st.data(), redigest=st.booleans())
def test_deleted_or_retyped_entries(saved, tmp_path, name, data, redigest):
    """Any entry of the nested contents deleted or replaced by a value of another type, with
    the digest left as it was (a damaged file) or, outside the objective's own state, made to
    match (a consistent, wrong file: every entry the checkpoint itself defines is checked; the
    objective's state is checked by its ``load_state_dict`` and, against damage, the digest)."""
    raw, expected = saved[name]
    path = tmp_path / "source.pt"
    path.write_bytes(raw)
    payload = torch.load(path, weights_only=True)
    paths = sorted(_entry_paths(payload), key=repr)
    keys = paths[data.draw(st.integers(0, len(paths) - 1), label="entry")]
    parent = payload
    for key in keys[:-1]:
        parent = parent[key]
    original = parent[keys[-1]]
    kinds = [None, "text", 3, 2.5, [1], {"k": 1}, torch.zeros(2, 3)]
    new = kinds[data.draw(st.integers(0, len(kinds) - 1), label="new value")]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
        if (
            redigest
            and keys[0] == "optim"
            and (len(keys) == 2 or (len(keys) == 4 and keys[2] == "state"))
        ):
            return  # valid: a run whose optimizer has not stepped that parameter yet
        del parent[keys[-1]]
    elif _equal_trees(new, original) or (redigest and _numbers(new, original)):
        return  # not a change of type: a consistent file with other numbers is a valid one
    else:
        parent[keys[-1]] = new
    damaged = tmp_path / "damaged_source.pt"
    _write(payload, damaged, redigest=redigest and keys[0] != "objective")
    _try_resume(name, damaged.read_bytes(), expected, tmp_path)


def _numbers(*values) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _entry_paths(tree, prefix=()):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        if (*prefix, key) != ("format",):
            yield (*prefix, key)
        if isinstance(value, dict | list):  # tuples are replaced whole
            yield from _entry_paths(value, (*prefix, key))


@pytest.mark.parametrize("name", STATEFUL)
def test_untouched_checkpoint_resumes_exactly(saved, tmp_path, name):
    data, expected = saved[name]
    assert _try_resume(name, data, expected, tmp_path)


# ------------------------------------------------------------------------------------------------
# Restoring into the wrong run


def test_another_objectives_state_is_refused_and_nothing_changes(tmp_path):
    run = build("jsa")
    train(run, 2)
    path = checkpoint.save(tmp_path / "jsa.pt", optim=run.optim, objective=run.objective)
    other = build("avb")
    train(other, 1)
    before = _state(other)
    with pytest.raises(ValueError, match=r"jsa\.pt.*Expected an AVB state_dict.*JSA"):
        checkpoint.load(path, optim=other.optim, objective=other.objective)
    assert _equal_trees(_state(other), before)


def test_failed_objective_load_rolls_everything_back(tmp_path, monkeypatch):
    """An objective whose load_state_dict fails after it has applied part of the state (here:
    all of it, then an error): the param store, objective and RNGs are put back."""
    run = build("jsa")
    train(run, 2)
    path = checkpoint.save(tmp_path / "jsa.pt", optim=run.optim, objective=run.objective)
    other = build("jsa")
    train(other, 1)
    before = _state(other)
    load, calls = other.objective.load_state_dict, []

    def half_load(state, *args, **kwargs):
        load(state, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the checkpoint's state; the roll back's load succeeds
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(other.objective, "load_state_dict", half_load)
    with pytest.raises(ValueError, match=r"Cannot resume from .*jsa\.pt.*disk on fire.*nothing"):
        checkpoint.load(path, optim=other.optim, objective=other.objective)
    monkeypatch.undo()
    assert _equal_trees(_state(other), before)


def test_parameters_of_another_shape_are_named(tmp_path):
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5, name="m")
    vae.sync_params()
    path = checkpoint.save(tmp_path / "small.pt")
    wider = VAE(x_dim=6, z_dim=2, hidden_dim=7, name="m")
    with pytest.raises(ValueError, match=r"small\.pt.*'m_encoder\$\$\$.*' has shape"):
        checkpoint.load(path, modules=wider.pyro_modules())
    renamed = VAE(x_dim=6, z_dim=2, hidden_dim=5, name="other")
    with pytest.raises(ValueError, match=r"no parameter 'other_encoder"):
        checkpoint.load(path, modules=renamed.pyro_modules())


def test_modules_receive_the_restored_parameters(tmp_path):
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=5, name="m")
    vae.sync_params()
    expected = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    path = checkpoint.save(tmp_path / "ckpt.pt")
    pyro.clear_param_store()
    fresh = VAE(x_dim=6, z_dim=2, hidden_dim=5, name="m")
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in expected.items())
    checkpoint.load(path, modules=fresh.pyro_modules())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in expected.items())


def test_failed_train_resume_leaves_the_output_directory(data_root, tmp_path):
    config = TrainConfig(
        objective="jsa",
        architecture="small",
        batch_size=40,
        epochs=1,
        num_test=20,
        eval_samples=10,
        data_root=str(data_root),
        out=str(tmp_path / "run"),
    )
    Trainer(config, progress=False).run()
    out = Path(config.out)
    good = (out / "checkpoint.pt").read_bytes()
    for damaged in (good[: len(good) // 3], b"not a checkpoint", b""):
        (out / "checkpoint.pt").write_bytes(damaged)
        before = _files(out)
        with pytest.raises(ValueError, match=r"checkpoint\.pt"):
            Trainer(config, resume=True, progress=False)
        assert _files(out) == before
    (out / "checkpoint.pt").write_bytes(good)
    parsed = torch.load(out / "checkpoint.pt", weights_only=True)
    del parsed["extra"]["rows"]
    _write(parsed, out / "checkpoint.pt", redigest=True)
    before = _files(out)
    with pytest.raises(ValueError, match=r"extra entries \['rows'\]"):
        Trainer(config, resume=True, progress=False)
    assert _files(out) == before


# ------------------------------------------------------------------------------------------------
# What a checkpoint may hold


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"array": np.zeros(3)}, r"extra\['array'\] has type ndarray"),
        ({"rows": [{"loss": np.float64(1.0)}]}, r"extra\['rows'\]\[0\]\['loss'\] has type float64"),
        ({"path": Path("run")}, r"extra\['path'\] has type PosixPath|WindowsPath"),
        ({"fn": len}, r"extra\['fn'\]"),
        ({1.5: "x"}, "has key 1.5"),
        ([1, 2], "Expected extra to be a dict"),
    ],
)
def test_extra_accepts_only_plain_values(tmp_path, extra, where):
    with pytest.raises(TypeError, match=where):
        checkpoint.save(tmp_path / "ckpt.pt", extra=extra)
    assert not (tmp_path / "ckpt.pt").exists()


def test_plain_extra_round_trips(tmp_path):
    extra = {
        "epoch": 3,
        "rows": [{"loss": 1.5, "nan": math.nan, "ok": True, "note": None}],
        "pair": (1, "a"),
        "tensor": torch.arange(4),
        7: "int key",
    }
    path = checkpoint.save(tmp_path / "ckpt.pt", extra=extra)
    assert _equal_trees(checkpoint.load(path), extra)


def test_constraints_round_trip_by_name_or_class(tmp_path):
    c = dist.constraints
    made = {
        "positive": c.positive,
        "interval": c.interval(-1.0, 2.5),
        "greater": c.greater_than(torch.tensor([0.5, 1.0])),
        "simplex": c.simplex,
        "independent": c.independent(c.interval(0.0, 1.0), 1),
        "ordered": c.ordered_vector,
        "corr_cholesky": c.corr_cholesky,
    }
    shapes = {"greater": (2,), "simplex": (3,), "independent": (2,), "ordered": (3,)}
    for name, constraint in made.items():
        shape = shapes.get(name, (3, 3) if name == "corr_cholesky" else ())
        pyro.param(name, _inside(constraint, shape), constraint=constraint)
    expected = {name: pyro.param(name).detach().clone() for name in made}
    path = checkpoint.save(tmp_path / "ckpt.pt")
    pyro.clear_param_store()
    checkpoint.load(path)
    store = pyro.get_param_store()
    for name, constraint in made.items():
        restored = store._constraints[name]
        assert type(restored) is type(constraint)
        assert _equal_trees(_plain(vars(restored)), _plain(vars(constraint)))
        assert torch.allclose(store[name], expected[name])
    assert store._constraints["positive"] is c.positive  # named ones stay the singletons


def _inside(constraint, shape) -> torch.Tensor:
    return torch.distributions.biject_to(constraint)(torch.randn(_unconstrained(constraint, shape)))


def _unconstrained(constraint, shape) -> tuple:
    transform = torch.distributions.biject_to(constraint)
    return tuple(transform.inverse_shape(torch.Size(shape)))


def _plain(state: dict) -> dict:
    return {k: _plain(vars(v)) if hasattr(v, "check") else v for k, v in state.items()}


def test_unregistered_constraint_class_is_a_type_error(tmp_path):
    class Custom(dist.constraints.Constraint):
        def check(self, value):
            return value > 0

    pyro.get_param_store()._constraints["weird"] = Custom()
    pyro.get_param_store()._params["weird"] = torch.ones(())
    with pytest.raises(TypeError, match=r"parameter 'weird'.*register_constraint"):
        checkpoint.save(tmp_path / "ckpt.pt")
    checkpoint.register_constraint(Custom)
    path = checkpoint.save(tmp_path / "ckpt.pt")
    pyro.clear_param_store()
    checkpoint.load(path)
    assert type(pyro.get_param_store()._constraints["weird"]) is Custom


def test_map_location_moves_tensors_but_not_generator_states(tmp_path):
    run = build("jsa")
    train(run, 2)
    path = checkpoint.save(tmp_path / "ckpt.pt", optim=run.optim, objective=run.objective)
    payload = checkpoint.read(path, map_location="meta")
    params = payload["param_store"]["params"]
    assert all(p.device.type == "meta" and p.is_leaf for p in params.values())
    assert all(p.requires_grad for p in params.values())
    assert any(v.device.type == "meta" for v in payload["objective"].values() if torch.is_tensor(v))
    assert payload["rng"]["torch"].device.type == "cpu"


# ------------------------------------------------------------------------------------------------
# Format 1 (written before loading was made safe) still resumes exactly


def _save_format1(path: Path, run) -> None:
    """What ``checkpoint.save`` of 0.1.0.dev0 wrote: Pyro's states pickled as objects."""
    torch.save(
        {
            "format": 1,
            "param_store": pyro.get_param_store().get_state(),
            "optim": run.optim.get_state(),
            "objective": run.objective.state_dict()
            if hasattr(run.objective, "state_dict")
            else None,
            "rng": pyro.util.get_rng_state(),
            "extra": {"step": 2},
        },
        path,
    )


@pytest.mark.parametrize("name", ["iwae_dreg", *STATEFUL])
def test_format1_checkpoint_resumes_exactly(tmp_path, name):
    run = build(name)
    train(run, 2)
    _save_format1(tmp_path / "v1.pt", run)
    expected = train(run, 2), snapshot(run)
    resumed = build(name)
    assert checkpoint.load(
        tmp_path / "v1.pt", optim=resumed.optim, objective=resumed.objective
    ) == {"step": 2}
    assert train(resumed, 2) == expected[0]
    assert _equal_trees(snapshot(resumed), expected[1])


def test_stateless_objective_state_matches_iwae(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt.pt", objective=IWAE(num_particles=2))
    payload = checkpoint.read(path)
    assert payload["objective"] is None and payload["objective_type"] is None
    with pytest.raises(ValueError, match="holds no state for AVB"):
        checkpoint.load(path, objective=AVB())
    with pytest.raises(ValueError, match="holds no state for JSA"):
        checkpoint.load(path, objective=JSA(num_data=4))
