"""Checkpoints: atomic writes, exact resumption in a fresh process for every objective, errors."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro
import pytest
import torch
from resume_worker import CASES, build, snapshot, train

from pyro_fdiv import checkpoint
from pyro_fdiv.inference import AVB, IWAE, JSA

WORKER = Path(__file__).with_name("resume_worker.py")
REPO = Path(__file__).resolve().parent.parent
N, M = 3, 3  # steps before and after the checkpoint


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN equal to NaN (e.g. a loss not yet computed)."""
    if a.is_floating_point() and a.numel() == 1 and math.isnan(a.item()):
        return b.numel() == 1 and math.isnan(b.item())
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Atomic writes


def _half_writer(real_save):
    """A ``torch.save`` that writes half of the real bytes and is then interrupted."""

    def save(obj, stream, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        stream.write(data[: len(data) // 2])
        stream.flush()
        raise KeyboardInterrupt

    return save


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = build("iwae_dreg")
    train(run, 2)
    path = checkpoint.save(
        tmp_path / "ckpt.pt", optim=run.optim, objective=run.objective, extra={"step": 2}
    )
    before = path.read_bytes()
    train(run, 1)
    monkeypatch.setattr(torch, "save", _half_writer(torch.save))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, optim=run.optim, objective=run.objective, extra={"step": 3})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, "ckpt.pt") == []  # the temporary file was removed
    assert checkpoint.load(path, optim=run.optim, objective=run.objective) == {"step": 2}


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_killed_save_leaves_previous_checkpoint(tmp_path):
    """A process killed (SIGKILL: no cleanup runs) halfway through writing a checkpoint leaves
    the previous one intact; only a stale temporary file remains, which ``load`` ignores."""
    path = tmp_path / "ckpt.pt"
    script = textwrap.dedent(
        f"""
        import io, os, signal, torch
        from pyro_fdiv import checkpoint
        path = {str(path)!r}
        checkpoint.save(path, extra={{"step": 1, "payload": torch.arange(100000)}})
        real_save = torch.save
        def save(obj, stream, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        checkpoint.save(path, extra={{"step": 2, "payload": torch.zeros(100000)}})
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    extra = checkpoint.load(path)
    assert extra["step"] == 1
    assert torch.equal(extra["payload"], torch.arange(100000))
    stale = _leftovers(tmp_path, "ckpt.pt")
    assert len(stale) == 1 and stale[0].startswith(".ckpt.pt.") and stale[0].endswith(".tmp")
    checkpoint.save(path, extra={"step": 3})  # the next save still replaces the checkpoint
    assert checkpoint.load(path) == {"step": 3}


# ------------------------------------------------------------------------------------------------
# Exact resumption


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """For every case: ``N`` steps, save, ``M`` more steps here; then one fresh interpreter
    rebuilds each case, loads its checkpoint and trains ``M`` steps."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    root = tmp_path_factory.mktemp("resume")
    spec, expected = {}, {}
    try:
        for name in CASES:
            run = build(name)
            train(run, N)
            path = checkpoint.save(
                root / f"{name}.pt", optim=run.optim, objective=run.objective, extra={"step": N}
            )
            expected[name] = {"losses": train(run, M), "state": snapshot(run)}
            spec[name] = {"checkpoint": str(path), "start": N, "steps": M}
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.clear_param_store()
    torch.save(spec, root / "spec.pt")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(root / "spec.pt"), str(root / "result.pt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return expected, torch.load(root / "result.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_resume_in_fresh_process_is_exact(resumed, name):
    expected, actual = resumed[0][name], resumed[1][name]
    assert actual["losses"] == expected["losses"]  # float equality, not approximate
    assert sorted(actual["state"]) == sorted(expected["state"])
    assert any(key.startswith("param.") for key in expected["state"])
    different = [
        key for key in expected["state"] if not _equal(expected["state"][key], actual["state"][key])
    ]
    assert different == []


def test_resume_covers_objective_state(resumed):
    """The snapshots compared above include each objective's own state."""
    expected = resumed[0]
    keys = {name: " ".join(expected[name]["state"]) for name in expected}
    assert "objective.discriminator." in keys["avb"] and "objective.adversary_optim." in keys["avb"]
    assert "objective.cache_0" in keys["jsa"] and "objective.initialized" in keys["jsa"]
    assert "objective.schedule.t" in keys["fdiv_bound"]
    assert "objective.guide_optim." in keys["fdiv_bound"]
    assert "objective.critic." in keys["fgan"] and "objective.critic_optim." in keys["fgan"]
    assert int(expected["fdiv_bound"]["state"]["objective.schedule.t"]) == N + M


# ------------------------------------------------------------------------------------------------
# Errors


def test_load_rejects_torch_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="is not a pyro_fdiv checkpoint"):
        checkpoint.load(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="is not a pyro_fdiv checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint\n", "truncated"], ids=["empty", "text", "truncated"]
)
def test_load_rejects_unreadable_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        good = checkpoint.save(tmp_path / "good.pt", extra={"step": 1}).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="checkpoint"):
        checkpoint.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpoint.load(tmp_path / "absent.pt")


@pytest.mark.parametrize("saved", [None, IWAE(num_particles=2)], ids=["no_objective", "stateless"])
@pytest.mark.parametrize("make", [AVB, lambda: JSA(num_data=4)], ids=["avb", "jsa"])
def test_load_missing_objective_state(tmp_path, saved, make):
    path = checkpoint.save(tmp_path / "ckpt.pt", objective=saved)
    objective = make()
    with pytest.raises(ValueError, match=f"holds no state for {type(objective).__name__}"):
        checkpoint.load(path, objective=objective)


def test_load_missing_optimizer_state(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="holds no optimizer state"):
        checkpoint.load(path, optim=pyro.optim.Adam({"lr": 0.1}))


def test_load_objective_state_of_another_objective(tmp_path):
    jsa = JSA(num_data=4)
    path = checkpoint.save(tmp_path / "ckpt.pt", objective=jsa)
    with pytest.raises(ValueError, match="Expected an AVB state_dict"):
        checkpoint.load(path, objective=AVB())
