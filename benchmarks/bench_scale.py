"""
How a training step scales with the batch and the latent size at K = 64 particles.

For each batch size B (32 → 1024, latent 20) and each latent size d (10 → 100, batch 128) the
VAE of ``bench_vae_step.py`` (784-400-2×d encoder, d-400-784 Bernoulli decoder; d varies) takes
IWAE steps (``pyro_fdiv.inference.IWAE``, reparameterized) and hand-written PyTorch steps of the
same estimator (the reference), timed round-robin in the same process (median of ``--rounds``).

Memory is the autograd graph of one step: the bytes of every tensor saved for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once), which is what grows
with B·K and what a GPU must hold; it is deterministic, unlike the process's resident set. The
dominant term is the decoder's ``K × B × 784`` logits and hidden units, so it is linear in
``B·K``: where ``K × B × 784 × 4`` bytes (float32) no longer fits, split the particle dimension
into chunks (``pyro_fdiv.evaluate.log_likelihood`` does so for evaluation, where no graph is
kept; for training, lower K or B, since the log-sum-exp needs every particle's graph).

Usage::

    python benchmarks/bench_scale.py --out scale.csv              # a few minutes on 2 cores
    python benchmarks/bench_scale.py --out /tmp/scale.csv --smoke
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import pyro
import torch
from bench_vae_step import DEFAULT_DATA, _time_rounds, load_batch, make_step

from pyro_fdiv.models.vae import VAE

K = 64


def saved_tensor_mib(step) -> float:
    """MiB of the tensors autograd saves during one call of ``step`` (each storage once)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values()) / 2**20


def measure(batch: int, z_dim: int, x: torch.Tensor, rounds: int) -> list[dict]:
    pyro.clear_param_store()
    torch.manual_seed(0)
    init = VAE(x_dim=784, z_dim=z_dim, hidden_dim=400, name="init")
    data = x[:batch]
    steps = {
        method: make_step(method, init, data, K, name=f"{method}_{batch}_{z_dim}")
        for method in ("handwritten", "iwae")
    }
    times = _time_rounds(steps, rounds, warmup=2, device=torch.device("cpu"), seed=0, desc="")
    rows = []
    for method, step in steps.items():
        rows.append(
            {
                "batch": batch,
                "z_dim": z_dim,
                "method": method,
                "median_ms": 1000 * statistics.median(r[method] for r in times),
                "graph_mib": saved_tensor_mib(step),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches, latents = (32, 128, 256, 512, 1024), (10, 20, 50, 100)
    if args.smoke:
        batches, latents, args.rounds = (8, 16), (4, 8), 2
    x = torch.from_numpy(load_batch(DEFAULT_DATA, max(batches)))
    base_batch, base_z = (8, 4) if args.smoke else (128, 20)
    # the batch sweep at the base latent size, then the latent sweep at the base batch size;
    # dict.fromkeys drops the point the two sweeps share
    sizes = dict.fromkeys([(b, base_z) for b in batches] + [(base_batch, z) for z in latents])
    rows = [row for batch, z_dim in sizes for row in measure(batch, z_dim, x, args.rounds)]
    table = pd.DataFrame(rows)
    wide = table.pivot_table(
        index=["batch", "z_dim"], columns="method", values=["median_ms", "graph_mib"]
    )
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    wide["time_ratio"] = wide.median_ms_iwae / wide.median_ms_handwritten
    wide["ms_per_point"] = wide.median_ms_iwae / wide.index.get_level_values("batch")
    wide = wide.reset_index()
    wide.to_csv(args.out, index=False)
    print(f"K={K}, threads={args.threads}")
    print(wide.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return wide


if __name__ == "__main__":
    main()
