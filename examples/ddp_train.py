r"""
Data-parallel training of a VAE with PyTorch's own ``torch.distributed``: one process per CPU
group or GPU, launched by ``torchrun``, each taking its shard of every global minibatch, its
gradients averaged across processes by :class:`~torch.nn.parallel.DistributedDataParallel`
(DDP). Objectives: ``iwae`` (:class:`~pyro_fdiv.inference.IWAE`), ``bbalpha``
(:class:`~pyro_fdiv.inference.BlackBoxAlpha`), ``jsa`` (:class:`~pyro_fdiv.inference.JSA`) and
``avb`` (:class:`~pyro_fdiv.inference.AVB`, implicit encoder); each trains a fresh VAE.

**Scaling the shard losses.** With :math:`W` processes, a global minibatch of :math:`B` rows
of an :math:`N`-row data set and :math:`b = B/W` rows per process, the single-process loss of a
per-data-point objective (IWAE's :math:`-\log\frac1K\sum_k w_{k,i}`, BB-α's energy, AVB's
negative ELBO, JSA's surrogate: each a sum over data points) is

.. math::

    L = \frac{N}{B} \sum_{i \in \text{batch}} \ell_i, \qquad
    \nabla L = \frac{N}{B} \sum_{i \in \text{batch}} \nabla \ell_i .

DDP *averages* the gradients of the process losses :math:`L_r`, so
:math:`\frac1W \sum_r \nabla L_r = \nabla L` requires
:math:`L_r = W \frac{N}{B} \sum_{i \in \text{shard } r} \ell_i = \frac{N}{b}
\sum_{i \in \text{shard } r} \ell_i`: the subsample scale computed from the process's own
batch size. That is what Pyro's plate gives when each process passes the data set's size
``num_data=N`` with its ``b`` rows (``iwae``, ``bbalpha``, ``avb``). JSA's plate is instead the
process's own rows (:math:`S = N/W` chains per process), whose scale is :math:`S/b = N/B`, so
its loss is multiplied by :math:`W` explicitly. The reported loss is the mean of the
:math:`L_r`, i.e. :math:`L`, printed per data point (:math:`L/N`).

**Particles.** By default each process draws its particles from its own random stream (seed
``seed + 1 + rank``). With ``--global-noise`` (``iwae``, ``bbalpha`` and ``avb``'s model
step) every process draws the standard-normal reparameterization noise of the whole global
batch, :math:`\epsilon \in \mathbb{R}^{K \times B \times d}`, from a generator seeded by
``(seed, step)`` and keeps its rows, so each data point gets the same particles whatever
:math:`W`: training does not depend on the number of processes (up to the order of
floating-point sums; ``tests/test_distributed.py`` checks it against one process). It costs
:math:`W` times the noise draws, which are small next to the networks.

**Pyro and DDP.** DDP averages gradients during the backward pass of a loss returned by its
``forward``, so the objective is wrapped as a module, :class:`ObjectiveLoss`, whose
``forward`` returns ``objective.differentiable_loss(vae.model, vae.guide, ...)``. The VAE's
networks enter Pyro's param store through ``pyro.module`` as the very ``Parameter`` objects
DDP holds (real-valued parameters are stored as given), and the optimizer is plain
:class:`torch.optim.Adam`; no ``SVI``. The objective is kept out of the module's children:
JSA is an ``nn.Module`` whose buffers (the chains) DDP would otherwise broadcast from rank 0.

**JSA** keeps one chain per data point. The data set is split once into :math:`W` contiguous
shards of :math:`S` rows; process :math:`r` owns rows :math:`[rS, (r+1)S)`, draws its
minibatches within them and holds ``JSA(num_data=S)``, addressed by shard-local indices:
the chains are never communicated, only the gradients are.

**AVB** keeps the discriminator replicated: built from the same seed on every process (and
broadcast from rank 0), trained by :class:`GradientAveragingAdam`, which averages its
gradients across processes before each step, so the replicas stay identical. It is not wrapped
in DDP because AVB also evaluates it at detached parameters (``torch.func.functional_call``)
inside the model's loss, a forward pass whose parameters get no gradient, which DDP's reducer
would wait for.

The data are binarized MNIST (``pyro_fdiv.data.load_binarized_mnist``, from ``--data``,
``$PYRO_FDIV_DATA`` or ``../shared/data``), or synthetic binary images (``--synthetic``, or
when the files are missing). ``num_data`` is cut to a multiple of the batch size, and the
global batch size must be a multiple of :math:`W`.

Usage::

    # one process, no torch.distributed
    python examples/ddp_train.py --smoke
    # two CPU processes (gloo)
    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --backend gloo \
        --objectives iwae bbalpha jsa avb --smoke
    # every GPU of one machine, one process per GPU (nccl)
    torchrun --standalone --nproc_per_node=<num GPUs> examples/ddp_train.py --backend nccl \
        --objectives iwae --steps 20000 --batch-size 100 --out ddp_out
    # several machines: on each, with the same --rdzv-endpoint
    torchrun --nnodes=<machines> --nproc_per_node=<GPUs each> --rdzv-backend=c10d \
        --rdzv-endpoint=<host>:29500 --rdzv-id=<job id> examples/ddp_train.py --backend nccl ...

With ``--out DIR`` every process writes ``DIR/rank<r>.pt`` (per objective: the losses, the
VAE's initial and final parameters, JSA's shard rows, visited rows and chains, AVB's
discriminator) and rank 0 writes ``DIR/losses.csv``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pyro_fdiv.data import DATA_ENV, load_binarized_mnist
from pyro_fdiv.inference import AVB, IWAE, JSA, BlackBoxAlpha, Discriminator
from pyro_fdiv.models.vae import VAE

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = ("iwae", "bbalpha", "jsa", "avb")
#: ``--smoke``: a few seconds on a CPU.
SMOKE = {
    "steps": 6,
    "batch_size": 32,
    "z_dim": 8,
    "hidden_dim": [32],
    "num_data": 256,
    "log_every": 2,
    "num_particles": 3,
}


@dataclass(frozen=True)
class Context:
    """Where this process sits: rank, number of processes, device."""

    rank: int
    world_size: int
    device: torch.device
    distributed: bool  # inside a process group (launched by torchrun)


def init_distributed(backend: str, device: str | None) -> Context:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it, one process."""
    if "WORLD_SIZE" not in os.environ:
        return Context(0, 1, torch.device(device or "cpu"), False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend=backend)
    return Context(
        torch_dist.get_rank(), torch_dist.get_world_size(), torch.device(device or "cpu"), True
    )


def all_mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of ``value`` over the processes."""
    if not ctx.distributed:
        return value
    value = value.clone()
    torch_dist.all_reduce(value)
    return value / ctx.world_size


class ObjectiveLoss(nn.Module):
    """
    ``forward(x, ...)`` is ``objective.differentiable_loss(vae.model, guide, x, ...)``: the loss
    as a module, for :class:`~torch.nn.parallel.DistributedDataParallel`. Its parameters are the
    VAE's; the objective is held as a bound method, not a child module (JSA's buffers are its
    chains, private to each process).

    :param VAE vae: model and guide.
    :param objective: a pyro_fdiv objective with ``differentiable_loss``.
    :param float factor: constant multiplying the loss (JSA's :math:`W`).
    """

    def __init__(self, vae: VAE, objective: Any, factor: float = 1.0):
        super().__init__()
        self.vae = vae
        self.differentiable_loss = objective.differentiable_loss
        self.factor = factor

    def forward(
        self,
        x: torch.Tensor,
        num_data: int | None = None,
        idx: torch.Tensor | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        guide = self.vae.guide if noise is None else SharedNoise(noise)(self.vae.guide)
        loss = self.differentiable_loss(self.vae.model, guide, x, num_data=num_data, idx=idx)
        return self.factor * loss


class SharedNoise(Messenger):
    r"""
    Draws the named Gaussian guide sites as :math:`z = \mu + \sigma \epsilon` with the given
    standard-normal noise :math:`\epsilon` instead of from the random stream: a reparameterized
    sample (gradients reach :math:`\mu, \sigma`) whose randomness the caller controls. The
    site's distribution is kept, so its density is scored as usual.

    :param dict noise: site name to :math:`\epsilon`, of the shape of the site's value
        (``(K,) + batch_shape + event_shape`` under ``K`` vectorized particles).
    """

    def __init__(self, noise: dict[str, torch.Tensor]):
        super().__init__()
        self.noise = noise

    def _pyro_sample(self, msg: dict) -> None:
        eps = self.noise.get(msg["name"])
        if eps is None or msg["is_observed"] or msg["value"] is not None:
            return
        base = msg["fn"]
        while isinstance(base, dist.Independent | torch.distributions.Independent):
            base = base.base_dist
        if not isinstance(base, torch.distributions.Normal):
            raise ValueError(
                f"SharedNoise: site '{msg['name']}' has distribution {type(base).__name__}, "
                "expected a (to_event) Normal"
            )
        msg["value"] = base.loc + base.scale * eps


class GradientAveragingAdam(torch.optim.Adam):
    """:class:`torch.optim.Adam` whose :meth:`step` first replaces every gradient by its mean
    over the processes (one ``all_reduce`` of the flattened gradients, DDP's reduction), so
    replicas that start equal stay equal. Every process must step together."""

    def step(self, closure=None):
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            grads = [
                p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
            ]
            with torch.no_grad():
                flat = torch.cat([g.reshape(-1) for g in grads])
                torch_dist.all_reduce(flat)
                flat /= torch_dist.get_world_size()
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        return super().step(closure)


def broadcast_module(module: nn.Module, ctx: Context) -> None:
    """Copy rank 0's parameters and buffers to every process."""
    if ctx.distributed:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                torch_dist.broadcast(tensor, src=0)


# ------------------------------------------------------------------------------------------------
# Data


def synthetic_binary(num_data: int, x_dim: int, seed: int = 0, prototypes: int = 10):
    """Binary images: one of ``prototypes`` random patterns per row, 5% of pixels flipped."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(prototypes, x_dim, generator=generator) < 0.5
    which = torch.randint(prototypes, (num_data,), generator=generator)
    flips = torch.rand(num_data, x_dim, generator=generator) < 0.05
    return (patterns[which] ^ flips).to(torch.get_default_dtype())


def load_data(args: argparse.Namespace, ctx: Context) -> torch.Tensor:
    """Binarized MNIST's training split, or synthetic data; ``num_data`` rows at most."""
    if not args.synthetic:
        root = args.data or os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data"
        try:
            data = load_binarized_mnist(root, "train")
            return data[: args.num_data] if args.num_data else data
        except FileNotFoundError as error:
            if ctx.rank == 0:
                warnings.warn(f"{error}; training on synthetic data", stacklevel=1)
    return synthetic_binary(args.num_data or 10000, args.x_dim, args.seed)


def _generator(*seeds: int) -> torch.Generator:
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + s) % (2**63)
    return torch.Generator().manual_seed(value)


def global_batch(num_data: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of the global minibatch of ``step``: epochs of a permutation seeded by
    ``(seed, epoch)``, the same on every process."""
    per_epoch = num_data // batch_size
    epoch, position = divmod(step, per_epoch)
    perm = torch.randperm(num_data, generator=_generator(seed, epoch))
    return perm[position * batch_size : (position + 1) * batch_size]


def shard_rows(num_data: int, rank: int, world_size: int) -> torch.Tensor:
    """The data set rows owned by process ``rank`` (JSA's chains): a contiguous block."""
    size = num_data // world_size
    return torch.arange(rank * size, (rank + 1) * size)


def global_noise(
    shape: tuple[int, ...], step: int, seed: int, rows: slice, dtype: torch.dtype
) -> torch.Tensor:
    """Standard-normal noise of the whole global batch (``shape``, batch at dim -2), seeded by
    ``(seed, step)``, restricted to this process's ``rows``."""
    eps = torch.randn(shape, generator=_generator(seed, 7919, step), dtype=dtype)
    return eps[..., rows, :]


# ------------------------------------------------------------------------------------------------
# Training


def build(name: str, args: argparse.Namespace, ctx: Context, x_dim: int, shard: int):
    """The VAE and objective of ``name``, the same initial parameters on every process."""
    torch.manual_seed(args.seed)
    encoder = "implicit" if name == "avb" else "gaussian"
    vae = VAE(x_dim, args.z_dim, args.hidden_dim, name=f"ddp_{name}", encoder=encoder)
    vae.to(ctx.device)
    broadcast_module(vae, ctx)
    k = args.num_particles
    if name == "iwae":
        objective = IWAE(k, gradient_estimator=args.gradient_estimator, max_plate_nesting=1)
    elif name == "bbalpha":
        objective = BlackBoxAlpha(args.alpha, k, max_plate_nesting=1)
    elif name == "jsa":
        objective = JSA(num_data=shard, num_particles=k, max_plate_nesting=1)
    else:
        disc = Discriminator(args.z_dim, x_dim, (args.hidden_dim[-1],) * 2).to(ctx.device)
        broadcast_module(disc, ctx)
        objective = AVB(
            disc,
            num_particles=max(k, 2),
            adversary_optim=functools.partial(GradientAveragingAdam, lr=args.adversary_lr),
            max_plate_nesting=1,
        )
    pyro.set_rng_seed(args.seed + 1 + ctx.rank)  # each process its own particles
    return vae, objective


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def train(name: str, args: argparse.Namespace, ctx: Context, data: torch.Tensor) -> dict:
    """Train one objective; this process's record of it."""
    pyro.clear_param_store()
    num_data, batch = len(data), args.batch_size // ctx.world_size
    rows = slice(ctx.rank * batch, (ctx.rank + 1) * batch)
    own = shard_rows(num_data, ctx.rank, ctx.world_size)
    vae, objective = build(name, args, ctx, data.shape[1], len(own))
    initial = _cpu(vae.state_dict())
    initial_disc = _cpu(objective.discriminator.state_dict()) if name == "avb" else None
    loss_module = ObjectiveLoss(vae, objective, ctx.world_size if name == "jsa" else 1.0)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        loss_module = DistributedDataParallel(loss_module, device_ids=device_ids)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.lr)
    k = objective.num_particles
    noise_site, noise_dim = ("eps", vae.encoder.noise_dim) if name == "avb" else ("z", args.z_dim)
    noise_shape = ((k,) if k > 1 else ()) + (args.batch_size, noise_dim)
    losses, visited = [], []
    for step in range(args.steps):
        if name == "jsa":  # minibatches within this process's rows
            per_epoch = len(own) // batch
            epoch, position = divmod(step, per_epoch)
            perm = torch.randperm(len(own), generator=_generator(args.seed, epoch, ctx.rank))
            idx = perm[position * batch : (position + 1) * batch]
            x, kwargs = data[own[idx]], {"num_data": len(own), "idx": idx.to(ctx.device)}
            visited.append(idx)
        else:
            x = data[global_batch(num_data, args.batch_size, step, args.seed)[rows]]
            kwargs = {"num_data": num_data}
            if args.global_noise:
                eps = global_noise(noise_shape, step, args.seed, rows, data.dtype)
                kwargs["noise"] = {noise_site: eps.to(ctx.device)}
        x = x.to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_module(x, **kwargs)
        loss.backward()
        optimizer.step()
        if name == "jsa":
            objective.commit()
        if name == "avb":
            for _ in range(args.adversary_steps):
                objective.adversary_step(vae.model, vae.guide, x, num_data=num_data)
        losses.append(all_mean(loss.detach(), ctx).item() / num_data)
        if ctx.rank == 0 and args.log_every and (step + 1) % args.log_every == 0:
            print(f"{name:8s} step {step + 1:6d}  loss per data point {losses[-1]:.4f}", flush=True)
    record = {
        "losses": losses,
        "initial": initial,
        "final": _cpu(vae.state_dict()),
    }
    if name == "jsa":
        record.update(
            shard=own,
            visited=torch.cat(visited) if visited else torch.zeros(0, dtype=torch.long),
            chains={n: v.cpu() for n, v in objective.samples().items()},
            initialized=objective.initialized.cpu().clone(),
            acceptance_rate=objective.acceptance_rate,
        )
    if name == "avb":
        record["discriminator_initial"] = initial_disc
        record["discriminator"] = _cpu(objective.discriminator.state_dict())
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default=None,
        help="process group backend (default: nccl with CUDA, else gloo)",
    )
    parser.add_argument("--device", default=None, help="single process only: cpu or cuda")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=["iwae"])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100, help="global minibatch size")
    parser.add_argument("--num-particles", type=int, default=5)
    parser.add_argument(
        "--gradient-estimator",
        choices=("reparam", "stl", "dreg"),
        default="dreg",
        help="IWAE's gradient estimator",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="BB-alpha's alpha")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adversary-lr", type=float, default=1e-3)
    parser.add_argument("--adversary-steps", type=int, default=1)
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--hidden-dim", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--num-data", type=int, default=None, help="use the first rows only")
    parser.add_argument("--data", type=Path, default=None, help="data directory")
    parser.add_argument("--synthetic", action="store_true", help="synthetic binary data")
    parser.add_argument("--x-dim", type=int, default=784, help="synthetic data's dimension")
    parser.add_argument(
        "--global-noise",
        action="store_true",
        help="particles independent of the number of processes",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny data and model: seconds")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train every objective of ``--objectives``; this process's records, by objective."""
    args = parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_default_dtype(getattr(torch, args.dtype))
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(backend, args.device)
    try:
        if args.batch_size % ctx.world_size:
            raise ValueError(
                f"Expected --batch-size to be a multiple of the {ctx.world_size} processes, "
                f"actual {args.batch_size}"
            )
        data = load_data(args, ctx)
        data = data[: len(data) // args.batch_size * args.batch_size]
        if len(data) == 0:
            raise ValueError(
                f"Expected at least --batch-size={args.batch_size} rows of data, actual "
                f"{args.num_data}"
            )
        if ctx.rank == 0:
            print(
                f"{ctx.world_size} process(es), {backend if ctx.distributed else 'no'} "
                f"backend, device {ctx.device}, data {tuple(data.shape)}",
                flush=True,
            )
        results = {}
        for name in args.objectives:
            start = time.perf_counter()
            results[name] = train(name, args, ctx, data)
            results[name]["seconds"] = time.perf_counter() - start
            if ctx.rank == 0:
                losses = results[name]["losses"]
                print(
                    f"{name}: loss per data point {losses[0]:.4f} -> {losses[-1]:.4f} "
                    f"({results[name]['seconds']:.1f} s)",
                    flush=True,
                )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(results, args.out / f"rank{ctx.rank}.pt")
            if ctx.rank == 0:
                with open(args.out / "losses.csv", "w", newline="") as stream:
                    writer = csv.writer(stream)
                    writer.writerow(["objective", "step", "loss_per_data_point"])
                    for name, record in results.items():
                        for step, value in enumerate(record["losses"], 1):
                            writer.writerow([name, step, value])
        return results
    finally:
        if ctx.distributed:
            torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
