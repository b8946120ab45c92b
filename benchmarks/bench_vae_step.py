"""Time (and measure the memory of) one VAE training step: hand-written PyTorch vs Pyro SVI.

Run ``python benchmarks/bench_vae_step.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.infer
import pyro.optim
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pyro_fdiv.models.vae import VAE, Decoder, Encoder

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "is_available",
    "iwae_log_weights",
    "load_batch",
    "machine_description",
    "main",
    "make_handwritten_step",
    "make_step",
    "make_svi_step",
    "measure_step_memory",
    "run_memory",
    "run_timing",
    "summarize_timing",
    "time_step",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "binarized_mnist" / "binarized_mnist.npz"
METHODS = (
    "handwritten",
    "trace_elbo",
    "renyi",
    "iwae",
    "iwae-stl",
    "iwae-dreg",
    "bbalpha",
    "iwae-compiled",
    "iwae-make-step",
)
DEFAULT_METHODS = ("handwritten", "trace_elbo", "renyi", "iwae", "iwae-dreg", "bbalpha")
REFERENCE = "handwritten"
BATCH_SIZE = 128
LR = 1e-3
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_PYRO_FDIV_METHODS = ("iwae", "iwae-stl", "iwae-dreg", "bbalpha", "iwae-compiled", "iwae-make-step")

Step = Callable[[], float]
_IMPORT_NOTES: set[str] = set()
_MEASURED = "bench_vae_step.measured"
_MMAP_THRESHOLD = 128 * 1024


# ----------------------------------------------------------------------------------------------
# Data and networks


def load_batch(path: Path | str | None, batch_size: int = BATCH_SIZE, seed: int = 0) -> np.ndarray:
    """
    A fixed batch of binarized MNIST training images, as a float32 array of shape
    ``(batch_size, 784)``; random Bernoulli(0.13) pixels if ``path`` does not exist.
    """
    rng = np.random.default_rng(seed)
    if path is not None and Path(path).is_file():
        with np.load(path) as data:
            train = data["train"]
        index = np.sort(rng.choice(train.shape[0], size=batch_size, replace=False))
        return train[index].astype(np.float32)
    print(f"note: {path} not found; using random Bernoulli(0.13) pixels instead of MNIST")
    return (rng.random((batch_size, 784)) < 0.13).astype(np.float32)


def _initial_vae(seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE(x_dim=784, z_dim=20, hidden_dim=400, name="init")


def _copy_vae(init: VAE, name: str, device: torch.device) -> VAE:
    vae = VAE(init.x_dim, init.z_dim, init.hidden_dim, name=name)
    vae.load_state_dict(init.state_dict())
    return vae.to(device)


# ----------------------------------------------------------------------------------------------
# One training step per method


def iwae_log_weights(
    encoder: Encoder, decoder: Decoder, x: torch.Tensor, num_particles: int
) -> torch.Tensor:
    """
    Per-data-point log importance weights ``log p(x, z) - log q(z | x)`` of shape
    ``(num_particles, batch)``, written with plain tensor operations.
    """
    loc, scale = encoder(x)
    eps = torch.randn((num_particles, *loc.shape), dtype=loc.dtype, device=loc.device)
    z = loc + scale * eps
    log_pz = (-0.5 * z.square() - _LOG_SQRT_2PI).sum(-1)
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )
    log_qz = (-0.5 * ((z - loc) / scale).square() - scale.log() - _LOG_SQRT_2PI).sum(-1)
    return log_pz + log_px - log_qz


def make_handwritten_step(vae: VAE, x: torch.Tensor, num_particles: int, lr: float = LR) -> Step:
    """The reference: a per-data-point IWAE step in pure PyTorch with ``torch.optim.Adam``."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    log_k = math.log(num_particles)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        log_w = iwae_log_weights(vae.encoder, vae.decoder, x, num_particles)
        loss = -(torch.logsumexp(log_w, dim=0) - log_k).sum()
        loss.backward()
        optimizer.step()
        return loss.item()  # SVI.step returns a float too

    return step


def _pyro_fdiv_objective(method: str, num_particles: int) -> pyro.infer.ELBO:
    # Imported here: the harness must run while these objectives are still being written.
    from pyro_fdiv.inference import IWAE, BlackBoxAlpha

    if method == "bbalpha":
        return BlackBoxAlpha(alpha=0.5, num_particles=num_particles, max_plate_nesting=1)
    if method in ("iwae-compiled", "iwae-make-step"):  # compile=True through SVI, or make_step
        compile = method == "iwae-compiled"
        return IWAE(num_particles=num_particles, max_plate_nesting=1, compile=compile)
    estimator = {"iwae": "reparam", "iwae-stl": "stl", "iwae-dreg": "dreg"}[method]
    return IWAE(num_particles=num_particles, gradient_estimator=estimator, max_plate_nesting=1)


def _objective(method: str, num_particles: int) -> pyro.infer.ELBO:
    if method == "trace_elbo":
        return pyro.infer.Trace_ELBO()
    if method == "renyi":
        return pyro.infer.RenyiELBO(
            alpha=0, num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
        )
    return _pyro_fdiv_objective(method, num_particles)


def make_svi_step(
    method: str, vae: VAE, x: torch.Tensor, num_particles: int, lr: float = LR
) -> Step:
    """A :class:`pyro.infer.SVI` step of ``vae`` with Pyro's Adam and the objective ``method``."""
    optim = pyro.optim.Adam({"lr": lr})
    if method == "iwae-make-step":
        from pyro_fdiv.inference import make_step as make_compiled_step

        step = make_compiled_step(vae.model, vae.guide, optim, _objective(method, num_particles))
        return lambda: step(x)
    svi = pyro.infer.SVI(vae.model, vae.guide, optim, loss=_objective(method, num_particles))
    return lambda: svi.step(x)


def is_available(method: str, num_particles: int) -> bool:
    """
    Whether ``method`` applies at ``num_particles`` (``trace_elbo`` only at 1) and its objective
    can be imported; prints a note once when it cannot.
    """
    if method == "trace_elbo":
        return num_particles == 1
    if method in _PYRO_FDIV_METHODS:
        try:
            _pyro_fdiv_objective(method, num_particles)
        except ImportError as error:
            if method not in _IMPORT_NOTES:
                _IMPORT_NOTES.add(method)
                print(f"note: skipping {method}: {error}")
            return False
    return True


def make_step(
    method: str,
    init: VAE,
    x: torch.Tensor,
    num_particles: int,
    lr: float = LR,
    name: str | None = None,
) -> Step | None:
    """
    A step function for ``method`` on a private copy of ``init``, or ``None`` (with a printed
    note) where the method does not apply at this ``num_particles`` or cannot be imported.
    The copy enters Pyro's param store as ``name``, by default ``f"{method}_k{num_particles}"``;
    names must differ between the steps alive at the same time.
    """
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, actual {method!r}")
    if not is_available(method, num_particles):
        return None
    name = f"{method}_k{num_particles}" if name is None else name
    vae = _copy_vae(init, name=name, device=x.device)
    if method == REFERENCE:
        return make_handwritten_step(vae, x, num_particles, lr)
    return make_svi_step(method, vae, x, num_particles, lr)


# ----------------------------------------------------------------------------------------------
# Timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device) -> float:
    """Wall-clock seconds of one call of ``step``, synchronizing an accelerator around it."""
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def _time_rounds(
    steps: dict[str, Step], rounds: int, warmup: int, device: torch.device, seed: int, desc: str
) -> list[dict[str, float]]:
    """Round-robin timing in a shuffled order per round; one ``{method: seconds}`` per round."""
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(warmup):
        for method in order:
            steps[method]()
    results = []
    for _ in tqdm(range(rounds), desc=desc, leave=False):
        rng.shuffle(order)
        results.append({method: time_step(steps[method], device) for method in order})
    return results


def summarize_timing(records: pd.DataFrame) -> pd.DataFrame:
    """
    Per ``(K, method)``: median and interquartile range of the step time in milliseconds, and
    the median over rounds of the paired ratio to the reference step timed in the same round.
    """
    reference = records[records.method == REFERENCE][["K", "round", "seconds"]]
    records = records.merge(reference.rename(columns={"seconds": "reference"}), on=["K", "round"])
    records["ratio"] = records.seconds / records.reference
    records["ms"] = 1e3 * records.seconds
    grouped = records.groupby(["K", "method"], sort=False)
    table = pd.DataFrame(
        {
            "median_ms": grouped.ms.median(),
            "iqr_ms": grouped.ms.quantile(0.75) - grouped.ms.quantile(0.25),
            "ratio": grouped.ratio.median(),
        }
    )
    table = table.reset_index()
    table["method"] = pd.Categorical(table.method, categories=METHODS, ordered=True)
    return table.sort_values(["K", "method"], ignore_index=True)


def run_timing(
    x: torch.Tensor,
    particles: Sequence[int],
    methods: Sequence[str],
    rounds: int,
    warmup: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Time every method at every ``K`` in ``particles``; see :func:`summarize_timing`."""
    init = _initial_vae(seed)
    rows = []
    for k in particles:
        pyro.clear_param_store()
        steps = {}
        for method in dict.fromkeys((REFERENCE, *methods)):
            if (step := make_step(method, init, x, k)) is not None:
                steps[method] = step
        per_round = _time_rounds(steps, rounds, warmup, x.device, seed, desc=f"K={k}")
        for i, times in enumerate(per_round):
            rows += [{"K": k, "method": m, "round": i, "seconds": t} for m, t in times.items()]
    pyro.clear_param_store()
    return summarize_timing(pd.DataFrame(rows))


# ----------------------------------------------------------------------------------------------
# Memory (each (method, K) in a fresh subprocess)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _profiled_peak_mb(step: Step) -> float:
    """
    Peak of live CPU tensor bytes during a call of ``step`` above the level at its start.

    The profiler sees only the frees of blocks allocated while it runs, so one unmeasured call
    runs first under it: then every buffer the measured call frees (old gradients, the previous
    step's leftovers) was allocated in view.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
        with torch.profiler.record_function(_MEASURED):
            step()
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == _MEASURED)
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    times = np.array([t for t, _ in deltas], dtype=np.int64)
    live = np.cumsum([nbytes for _, nbytes in deltas])
    before = live[times < window.start_ns()]
    start_level = before[-1] if before.size else 0
    inside = live[(times >= window.start_ns()) & (times <= window.end_ns())]
    return float(inside.max(initial=start_level) - start_level) / 2**20


def _cuda_peak_mb(step: Step, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_step_memory(
    method: str, num_particles: int, x: torch.Tensor, warmup: int = 3, repeats: int = 3
) -> dict[str, float] | None:
    """
    Memory of one training step, in MiB, for one method in this process:

    - ``first_step_mb``: memory growth over the first full-size step, from a baseline taken
      right before it; on CPU the growth of the resident-set high-water mark (``ru_maxrss``,
      meaningful with a fixed glibc mmap threshold, as :func:`run_memory` sets), on CUDA that
      of ``torch.cuda.max_memory_allocated``. One-time costs (lazy imports, Pyro's first
      trace, allocator and kernel set-up) are paid beforehand by a throwaway step of the same
      method on another copy of the networks with ``B=2, K=1``; the measured step still
      allocates its gradients and its Adam state.
    - ``step_peak_mb``: peak of live tensor memory during a steady-state step (after ``warmup``
      steps) above its level at the start of that step, the largest over ``repeats`` steps;
      from the profiler's allocation events on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
    """
    if not is_available(method, num_particles):
        return None
    init = _initial_vae(0)
    make_step(method, init, x[:2], 1, name=f"{method}_throwaway")()
    step = make_step(method, init, x, num_particles)
    device = x.device
    if device.type == "cuda":
        first_step = _cuda_peak_mb(step, device)
    else:
        baseline = _max_rss_mb()
        step()
        first_step = _max_rss_mb() - baseline
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        peaks = [_cuda_peak_mb(step, device) for _ in range(repeats)]
    else:
        peaks = [_profiled_peak_mb(step) for _ in range(repeats)]
    return {"first_step_mb": first_step, "step_peak_mb": max(peaks)}


def _memory_worker(args: argparse.Namespace) -> None:
    x = torch.from_numpy(np.load(args.worker_batch)).to(args.device)
    result = measure_step_memory(args.worker_method, args.worker_k, x)
    print("RESULT " + json.dumps(result))


def _run_worker(method: str, k: int, batch_file: str, args: argparse.Namespace) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device]
    command += ["--worker-method", method, "--worker-k", str(k), "--worker-batch", batch_file]
    command += ["--threads", str(torch.get_num_threads())]
    if args.no_validation:
        command.append("--no-validation")
    # A fixed glibc mmap threshold: large blocks are mmap'ed and unmapped on free, so the
    # resident set follows live tensor memory instead of glibc's growing heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    print(f"note: memory worker for {method} at K={k} failed:\n{done.stdout}{done.stderr}")
    return None


def run_memory(
    x: np.ndarray, particles: Sequence[int], methods: Sequence[str], args: argparse.Namespace
) -> pd.DataFrame:
    """Memory of one step of every method at every ``K``, each in a fresh subprocess."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(Path(tmp) / "batch.npy")
        np.save(batch_file, x)
        methods = list(dict.fromkeys((REFERENCE, *methods)))
        jobs = [(k, m) for k in particles for m in methods if is_available(m, k)]
        for k, method in tqdm(jobs, desc="memory", leave=False):
            result = _run_worker(method, k, batch_file, args)
            if result is not None:
                rows.append({"K": k, "method": method, **result})
    table = pd.DataFrame(rows)
    for column in ("first_step_mb", "step_peak_mb"):
        reference = table[table.method == REFERENCE].set_index("K")[column]
        table[column.replace("_mb", "_ratio")] = table[column] / table.K.map(reference).to_numpy()
    return table


# ----------------------------------------------------------------------------------------------
# Command line


def machine_description() -> str:
    """CPU (or GPU) model, thread count and library versions, one per line."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} logical cores)"
    lines = [
        f"cpu: {cpu}",
        f"torch threads: {torch.get_num_threads()}, "
        f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-validation", action="store_true", help="Pyro/torch validation off")
    parser.add_argument("--memory", action="store_true", help="measure memory, not time")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV")
    for hidden in ("--worker-method", "--worker-k", "--worker-batch"):
        kind = int if hidden == "--worker-k" else str
        parser.add_argument(hidden, type=kind, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def _validation(enabled: bool) -> Iterator[None]:
    # pyro.enable_validation also sets torch.distributions' default validate_args.
    old = pyro.infer.util.is_validation_enabled()
    pyro.enable_validation(enabled)
    try:
        yield
    finally:
        pyro.enable_validation(old)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with _validation(not args.no_validation):
        if args.worker_method is not None:
            _memory_worker(args)
            return
        batch = load_batch(args.data, BATCH_SIZE, args.seed)
        print(machine_description())
        print(f"validation: {'off' if args.no_validation else 'on'}, device: {args.device}")
        if args.memory:
            table = run_memory(batch, args.particles, args.methods, args)
        else:
            x = torch.from_numpy(batch).to(args.device)
            table = run_timing(x, args.particles, args.methods, args.rounds, args.warmup, args.seed)
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
