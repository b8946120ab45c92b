"""Data-parallel training (examples/ddp_train.py): two gloo processes under torchrun against one
process on the same global batches; JSA's per-process chains; AVB's replicated discriminator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ddp_train.py"
sys.path.insert(0, str(EXAMPLE.parent))

import ddp_train  # noqa: E402

WORLD = 2
NUM_DATA, BATCH, STEPS = 40, 8, 4  # JSA: 20 rows per process, 4 per step: 16 rows visited
ARGS = [
    "--synthetic", "--num-data", str(NUM_DATA), "--x-dim", "12", "--z-dim", "3",
    "--hidden-dim", "8", "--batch-size", str(BATCH), "--num-particles", "3",
    "--steps", str(STEPS), "--lr", "0.01", "--global-noise", "--dtype", "float64",
    "--threads", "1", "--log-every", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"ddp": [rank 0 record, rank 1 record], "single": record}``: the example under
    ``torchrun --nproc_per_node=2`` (gloo, CPU) and in this process without torch.distributed."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", str(EXAMPLE), "--backend", "gloo",
        "--objectives", "iwae", "bbalpha", "jsa", "avb", "--out", str(out), *ARGS,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ddp = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("WORLD_SIZE", raising=False)
            single = ddp_train.main(["--objectives", "iwae", "bbalpha", *ARGS])
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.clear_param_store()
    return {"ddp": ddp, "single": single}


def _assert_replicas_equal(records: list[dict], key: str = "final") -> None:
    for name, value in records[0][key].items():
        for other in records[1:]:
            assert torch.equal(value, other[key][name]), name


@pytest.mark.parametrize("objective", ["iwae", "bbalpha"])
def test_two_processes_match_one_process(runs, objective):
    single = runs["single"][objective]
    ddp = [record[objective] for record in runs["ddp"]]
    _assert_replicas_equal(ddp)
    moved = max((single["final"][k] - single["initial"][k]).abs().max() for k in single["final"])
    assert moved > 1e-2  # the parameters did train
    for name, expected in single["final"].items():
        torch.testing.assert_close(ddp[0]["final"][name], expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        torch.tensor(ddp[0]["losses"]), torch.tensor(single["losses"]), rtol=1e-10, atol=0
    )


def test_jsa_each_process_owns_the_chains_of_its_shard(runs):
    records = [record["jsa"] for record in runs["ddp"]]
    size = NUM_DATA // WORLD
    shards = [record["shard"] for record in records]
    assert torch.equal(torch.cat(shards), torch.arange(NUM_DATA))  # disjoint, covering
    for rank, record in enumerate(records):
        assert torch.equal(record["shard"], torch.arange(rank * size, (rank + 1) * size))
        (chains,) = record["chains"].values()
        assert chains.shape == (size, 3)  # one chain per owned row, none for the others
        visited = torch.zeros(size, dtype=torch.bool)
        visited[record["visited"]] = True
        assert 0 < int(visited.sum()) < size
        assert torch.equal(record["initialized"], visited)
        assert torch.all(chains[~visited] == 0) and torch.all(chains[visited].abs().sum(-1) > 0)
    assert not torch.equal(records[0]["chains"]["z"], records[1]["chains"]["z"])
    _assert_replicas_equal(records)  # the shared networks still agree


def test_avb_discriminator_stays_replicated(runs):
    records = [record["avb"] for record in runs["ddp"]]
    _assert_replicas_equal(records, "discriminator")
    _assert_replicas_equal(records, "discriminator_initial")
    _assert_replicas_equal(records)
    trained = records[0]["discriminator"]
    initial = records[0]["discriminator_initial"]
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


@pytest.mark.parametrize("world", [2, 4])
def test_shard_gradients_average_to_global_gradient(world):
    """The scaling of the example's docstring, in one process: with ``num_data=N`` each shard
    of ``B / W`` rows gets Pyro's scale ``N W / B``, and the mean of the shards' gradients is
    the global batch's gradient (the particles' noise shared through ``SharedNoise``)."""
    num_data, batch, k, z_dim = 50, 8, 3, 2
    data = ddp_train.synthetic_binary(num_data, 5)
    x = data[:batch]
    vae = ddp_train.VAE(5, z_dim, 4, name="scaling")
    loss = ddp_train.ObjectiveLoss(vae, ddp_train.IWAE(k, "dreg", max_plate_nesting=1))
    eps = torch.randn(k, batch, z_dim)

    def grads(rows: slice) -> list[torch.Tensor]:
        value = loss(x[rows], num_data=num_data, noise={"z": eps[:, rows]})
        return torch.autograd.grad(value, list(vae.parameters()))

    expected = grads(slice(None))
    step = batch // world
    shards = [grads(slice(r * step, (r + 1) * step)) for r in range(world)]
    for i, g in enumerate(expected):
        torch.testing.assert_close(sum(s[i] for s in shards) / world, g, rtol=1e-10, atol=1e-12)


def test_smoke_single_process(capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WORLD_SIZE", raising=False)
        results = ddp_train.main(
            ["--smoke", "--synthetic", "--objectives", *ddp_train.OBJECTIVES, "--steps", "2"]
        )
    assert set(results) == set(ddp_train.OBJECTIVES)
    assert all(len(r["losses"]) == 2 for r in results.values())
    assert "loss per data point" in capsys.readouterr().out
