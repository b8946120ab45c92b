"""HMC reference posterior for Eight Schools: Pyro's NUTS, shipped draws and an on-disk cache.

The reference draws that every approximation is judged against come from Pyro's own
:class:`~pyro.infer.mcmc.NUTS` run with :class:`NUTSSettings` (4 chains × (1000 warm-up +
2500 draws) by default). Two independent runs of the non-centered model with the default settings
(seeds 0 and 1) ship with the package, so :func:`load_reference` costs no sampling; the second run
gives the Monte Carlo noise floor of a divergence estimated between two exact sample sets. Any
other settings are run once and cached on disk under :meth:`NUTSSettings.key`.

Speed, measured on this project's 2-core CPU machine (torch 2.13, pyro 1.9.2, float64, one
thread per chain; ``scripts/make_eight_schools_reference.py``), other jobs sharing the machine:

* ``jit_compile=True`` against ``False``, 1 chain × (300 warm-up + 300 draws), the one-off trace
  included (``--jit-benchmark``): 5.9 s and 6.8 s against 11.9 s and 10.9 s in two repeats, a
  1.6–2.0× speed-up (8.9 s and 9.3 s against 16.8 s and 14.0 s under a load average of ~2.7).
* The default 4 chains × (1000 + 2500): 140 s one after another in one process, 78 s in 2
  spawned worker processes (:func:`run_nuts`'s default here; each worker takes a few seconds to
  start), with bit-for-bit identical draws, since each chain has its own seed. Pyro's own
  ``MCMC(num_chains=4)`` would draw its chains one after another on this machine anyway (it
  keeps a core for the main process and warns), so :func:`run_nuts` runs single-chain MCMCs
  itself. The shipped runs took 173 s and 199 s with other jobs competing for the cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import MCMC, NUTS
from tqdm.auto import tqdm

from pyro_fdiv.models import eight_schools
from pyro_fdiv.models.eight_schools import NUM_SCHOOLS, PARAMETERIZATIONS, SIGMA, Y

__all__ = [
    "NUTSSettings",
    "ReferenceCacheWarning",
    "ReferenceQualityWarning",
    "diagnostics",
    "load_reference",
    "reference_draws",
    "run_nuts",
    "save_reference",
]

#: Bump when the content of a run changes for the same settings; invalidates every cache entry.
FORMAT_VERSION = 1
MODEL_NAME = "eight_schools"
VAR_NAMES = ("mu", "tau", "theta_tilde", "theta")
R_HAT_MAX = 1.01
#: Iterations per chain below which spawning worker processes costs more than it saves.
_MIN_ITERATIONS_FOR_WORKERS = 1000


class ReferenceQualityWarning(UserWarning):
    """An HMC reference has a split R-hat above 1.01 or divergent transitions."""


class ReferenceCacheWarning(UserWarning):
    """A cached reference file could not be read or does not match its settings; rerunning."""


@dataclasses.dataclass(frozen=True)
class NUTSSettings:
    """
    Everything that determines an HMC reference run (not how it is scheduled).

    :param int num_chains: independent chains, each started from Pyro's default
        ``init_to_uniform`` in the unconstrained space.
    :param int warmup_steps: warm-up (step size and diagonal mass matrix adaptation) per chain.
    :param int num_samples: kept draws per chain.
    :param int seed: root seed; chain ``c`` is seeded from ``numpy.random.SeedSequence(seed)``.
    :param str parameterization: ``"noncentered"`` or ``"centered"``.
    :param bool jit_compile: trace the potential energy with :func:`torch.jit.trace`.
    :param float target_accept_prob: NUTS's dual-averaging target. 0.95 rather than Pyro's 0.8:
        with 0.9, seed 0 had 1 divergent transition in 10,000 draws; with 0.95 both shipped
        runs have none.
    :param int max_tree_depth: NUTS's maximum tree depth.
    """

    num_chains: int = 4
    warmup_steps: int = 1000
    num_samples: int = 2500
    seed: int = 0
    parameterization: str = "noncentered"
    jit_compile: bool = True
    target_accept_prob: float = 0.95
    max_tree_depth: int = 10

    def __post_init__(self) -> None:
        for name in ("num_chains", "num_samples", "max_tree_depth"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"Expected {name} >= 1, actual {getattr(self, name)!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"Expected warmup_steps >= 0, actual {self.warmup_steps!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"Expected a non-negative int seed, actual {self.seed!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"Expected parameterization in {PARAMETERIZATIONS}, "
                f"actual {self.parameterization!r}"
            )
        if not 0.0 < self.target_accept_prob < 1.0:
            raise ValueError(
                f"Expected target_accept_prob in (0, 1), actual {self.target_accept_prob!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """
        A stable file-name key: model, parameterization, seed and the first 12 hex digits of the
        SHA-256 of the settings' sorted JSON (plus :data:`FORMAT_VERSION`), e.g.
        ``eight_schools_noncentered_seed0_<hash>``.
        """
        payload = json.dumps(
            {"model": MODEL_NAME, "format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
        return f"{MODEL_NAME}_{self.parameterization}_seed{self.seed}_{digest}"

    def chain_seeds(self) -> list[int]:
        """Independent 32-bit seeds for the chains, from ``SeedSequence(seed).spawn``."""
        children = np.random.SeedSequence(self.seed).spawn(self.num_chains)
        return [int(child.generate_state(1)[0]) for child in children]


# ---------------------------------------------------------------------------------------------
# Running NUTS


@contextmanager
def _numerics(seed: int) -> Iterator[None]:
    """float64, one thread, a fixed seed, torch.jit.trace allowed; the caller's state restored."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    rng = pyro.util.get_rng_state()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.set_rng_seed(seed)
    try:
        with warnings.catch_warnings():
            # jit_compile uses torch.jit.trace, deprecated since torch 2.9 yet still the fast path
            warnings.filterwarnings(
                "ignore", r"`torch\.jit\.trace` is deprecated", DeprecationWarning
            )
            yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.util.set_rng_state(rng)


def _run_chain(
    settings: NUTSSettings, seed: int, hook: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """One chain: draws of ``mu``, ``tau``, ``theta_tilde`` as float64 arrays, divergences."""
    start = time.perf_counter()
    with _numerics(seed):
        kernel = NUTS(
            eight_schools.model,
            jit_compile=settings.jit_compile,
            ignore_jit_warnings=True,
            target_accept_prob=settings.target_accept_prob,
            max_tree_depth=settings.max_tree_depth,
        )
        hook_fn = None if hook is None else (lambda kernel, params, stage, i: hook(1))
        mcmc = MCMC(
            kernel,
            num_samples=settings.num_samples,
            warmup_steps=settings.warmup_steps,
            disable_progbar=True,
            hook_fn=hook_fn,
        )
        mcmc.run(Y, SIGMA, parameterization=settings.parameterization)
        samples = {k: v[0].numpy() for k, v in mcmc.get_samples(group_by_chain=True).items()}
        stats = {k: v["chain 0"] for k, v in mcmc.diagnostics().items() if "chain 0" in v}
    diverging = np.zeros(settings.num_samples, dtype=bool)
    diverging[sorted(set(stats["divergences"]))] = True
    z = eight_schools.to_unconstrained(samples)
    return {
        **{k: v.numpy() for k, v in eight_schools.from_unconstrained(z).items()},
        "diverging": diverging,
        "step_size": float(kernel.step_size),
        "acceptance_rate": float(stats["acceptance rate"]),
        "wall_time_s": time.perf_counter() - start,
    }


_PROGRESS_QUEUE = None


def _init_worker(progress_queue) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = progress_queue


def _run_chain_in_worker(settings: NUTSSettings, seed: int, report: bool) -> dict[str, Any]:
    hook = _PROGRESS_QUEUE.put if report and _PROGRESS_QUEUE is not None else None
    return _run_chain(settings, seed, hook)


def _run_in_workers(
    settings: NUTSSettings, seeds: list[int], num_workers: int, bar: tqdm
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(
        num_workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue,)
    ) as pool:
        futures = [
            pool.submit(_run_chain_in_worker, settings, seed, not bar.disable) for seed in seeds
        ]
        while not all(f.done() for f in futures):
            try:
                bar.update(progress_queue.get(timeout=0.2))
            except queue.Empty:
                pass
        bar.update(bar.total - bar.n)
        return [f.result() for f in futures]


def _default_workers(settings: NUTSSettings) -> int:
    if settings.warmup_steps + settings.num_samples < _MIN_ITERATIONS_FOR_WORKERS:
        return 1
    return max(1, min(settings.num_chains, os.cpu_count() or 1))


def _to_inference_data(
    settings: NUTSSettings, chains: list[dict[str, Any]], wall_time: float, num_workers: int
) -> az.InferenceData:
    stacked = {k: np.stack([c[k] for c in chains]) for k in (*VAR_NAMES, "diverging")}
    attrs = {
        "key": settings.key(),
        "settings": json.dumps(settings.to_dict(), sort_keys=True),
        "seed": settings.seed,
        "chain_seeds": settings.chain_seeds(),
        "step_size": [c["step_size"] for c in chains],
        "acceptance_rate": [c["acceptance_rate"] for c in chains],
        "chain_wall_time_s": [c["wall_time_s"] for c in chains],
        "wall_time_s": wall_time,
        "num_workers": num_workers,
        "torch_version": str(torch.__version__),
        "pyro_version": str(pyro.__version__),
        "inference_library": "pyro",
    }
    return az.from_dict(
        posterior={k: stacked[k] for k in VAR_NAMES},
        sample_stats={"diverging": stacked["diverging"]},
        observed_data={"y": Y.numpy()},
        constant_data={"sigma": SIGMA.numpy()},
        coords={"school": np.arange(NUM_SCHOOLS)},
        dims={"theta": ["school"], "theta_tilde": ["school"], "y": ["school"], "sigma": ["school"]},
        attrs=attrs,
    )


def run_nuts(
    settings: NUTSSettings | None = None, progress: bool = True, num_workers: int | None = None
) -> az.InferenceData:
    """
    Draw the Eight Schools posterior with Pyro's :class:`~pyro.infer.mcmc.NUTS` (float64).

    Each chain is a single-chain :class:`~pyro.infer.mcmc.MCMC` seeded by
    :meth:`NUTSSettings.chain_seeds`, so the draws depend on the settings only, not on
    ``num_workers`` or on the caller's RNG state (which is restored).

    :param NUTSSettings settings: what to run; defaults to ``NUTSSettings()``.
    :param bool progress: show a tqdm bar over all chains' iterations.
    :param int num_workers: spawned worker processes; ``1`` runs the chains in this process.
        By default one per chain up to ``os.cpu_count()``, or ``1`` for runs shorter than 1000
        iterations per chain, where the start-up of a worker (seconds) is not repaid.
    :returns: :class:`arviz.InferenceData` with posterior ``mu``, ``tau``, ``theta_tilde``,
        ``theta`` (dims ``chain, draw[, school]``), sample stats ``diverging``, and in
        ``attrs`` the settings (JSON), :meth:`~NUTSSettings.key`, seeds, versions and wall time.
    """
    settings = NUTSSettings() if settings is None else settings
    num_workers = _default_workers(settings) if num_workers is None else num_workers
    if not (isinstance(num_workers, int) and num_workers >= 1):
        raise ValueError(f"Expected num_workers >= 1, actual {num_workers!r}")
    seeds = settings.chain_seeds()
    total = settings.num_chains * (settings.warmup_steps + settings.num_samples)
    start = time.perf_counter()
    with tqdm(total=total, disable=not progress, desc=f"NUTS {settings.key()}") as bar:
        if num_workers == 1:
            chains = [_run_chain(settings, seed, bar.update) for seed in seeds]
        else:
            chains = _run_in_workers(settings, seeds, num_workers, bar)
    return _to_inference_data(settings, chains, time.perf_counter() - start, num_workers)


# ---------------------------------------------------------------------------------------------
# Shipped draws and the on-disk cache


def save_reference(idata: az.InferenceData, path: str | os.PathLike) -> None:
    """
    Write a :func:`run_nuts` result as ArviZ NetCDF: posterior draws as float32, zlib-compressed,
    written atomically, with a JSON sidecar (``path`` with suffix ``.json``) holding the settings,
    key, versions, wall time and number of divergences.
    """
    path = Path(path)
    small = idata.map(lambda ds: ds.astype("float32"), groups="posterior", inplace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        small.to_netcdf(str(tmp), compress=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = {
        k: (json.loads(v) if k == "settings" else v)
        for k, v in idata.attrs.items()
        if k not in ("chain_wall_time_s",)
    }
    sidecar["file"] = path.name
    sidecar["num_divergences"] = int(_group(idata, "sample_stats")["diverging"].sum())
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=_jsonable) + "\n")


def _group(idata: az.InferenceData, name: str) -> Any:
    """The group ``name`` of ``idata`` (an :class:`xarray.Dataset` that arviz sets as an
    attribute at run time, which its annotations do not declare)."""
    return getattr(idata, name)


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)


def _load(path: Path, settings: NUTSSettings) -> az.InferenceData:
    """Read a reference eagerly (no file left open) and check it matches ``settings``."""
    with az.rc_context(rc={"data.load": "eager"}):
        idata = az.from_netcdf(str(path))
    posterior = _group(idata, "posterior")
    expected = {"chain": settings.num_chains, "draw": settings.num_samples}
    if idata.attrs.get("key") != settings.key() or any(
        posterior.sizes.get(dim) != size for dim, size in expected.items()
    ):
        raise ValueError(f"{path} does not hold the run {settings.key()}")
    missing = set(VAR_NAMES) - set(posterior.data_vars)
    if missing:
        raise ValueError(f"{path} lacks the posterior variables {sorted(missing)}")
    return idata


def _shipped_path(settings: NUTSSettings) -> Path | None:
    data = resources.files("pyro_fdiv.compare") / "data"
    if not data.is_dir():
        return None
    for entry in data.iterdir():
        if entry.name.endswith(".json"):
            meta = json.loads(entry.read_text())
            if meta.get("key") == settings.key():
                return Path(str(data / meta["file"]))
    return None


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("PYRO_FDIV_CACHE") or Path.home() / ".cache" / "pyro_fdiv"
    return Path(cache_dir)


def load_reference(
    parameterization: str | None = None,
    *,
    seed: int | None = None,
    recompute: bool = False,
    settings: NUTSSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> az.InferenceData:
    """
    The HMC reference for Eight Schools: shipped with the package, cached, or run now.

    Lookup order, unless ``recompute``: the files shipped in ``pyro_fdiv/compare/data`` (matched
    by :meth:`NUTSSettings.key`: the non-centered default settings with seeds 0 and 1); then
    ``<cache_dir>/<key>.nc``. On a miss, or with ``recompute=True``, :func:`run_nuts` runs and the
    result is written to the cache (posterior as float32) and returned as read back from it. An
    unreadable or mismatched cache file is rerun with a :class:`ReferenceCacheWarning`.

    :param str parameterization: overrides ``settings.parameterization``.
    :param int seed: overrides ``settings.seed``.
    :param bool recompute: ignore shipped and cached draws; rerun and refresh the cache.
    :param NUTSSettings settings: defaults to ``NUTSSettings()``.
    :param cache_dir: defaults to ``$PYRO_FDIV_CACHE`` or ``~/.cache/pyro_fdiv``.
    :param bool progress: progress bar if NUTS runs.
    """
    settings = NUTSSettings() if settings is None else settings
    overrides: dict[str, Any] = {"parameterization": parameterization, "seed": seed}
    settings = dataclasses.replace(
        settings,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    path = _cache_dir(cache_dir) / f"{settings.key()}.nc"
    if not recompute:
        shipped = _shipped_path(settings)
        if shipped is not None:
            return _load(shipped, settings)
        if path.exists():
            try:
                return _load(path, settings)
            except Exception as e:  # any unreadable file: h5py's OSError, xarray's ValueError, ...
                warnings.warn(
                    f"Rerunning NUTS: cannot use the cached reference {path}: {e!r}",
                    ReferenceCacheWarning,
                )
    save_reference(run_nuts(settings, progress=progress), path)
    return _load(path, settings)


# ---------------------------------------------------------------------------------------------
# Checking and using a reference


def diagnostics(idata: az.InferenceData, warn: bool = True) -> pd.DataFrame:
    """
    Per-variable ``mean``, ``sd``, ``mcse_mean``, ``mcse_sd``, ``ess_bulk``, ``ess_tail``, split
    ``r_hat`` (:func:`arviz.summary`) of ``mu``, ``tau``, ``theta_tilde[j]``, ``theta[j]``.
    The number of divergent transitions is ``df.attrs["divergences"]``.

    :param bool warn: emit a :class:`ReferenceQualityWarning` if any R-hat exceeds 1.01 or any
        transition diverged.
    """
    table = az.summary(idata, var_names=list(VAR_NAMES), round_to="none")
    table = table[["mean", "sd", "mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat"]]
    divergences = int(_group(idata, "sample_stats")["diverging"].sum())
    table.attrs["divergences"] = divergences
    worst = table["r_hat"].max()
    if warn and (not worst <= R_HAT_MAX or divergences > 0):
        warnings.warn(
            f"Unreliable HMC reference: max R-hat {worst:.4f} (limit {R_HAT_MAX}), "
            f"{divergences} divergent transitions",
            ReferenceQualityWarning,
        )
    return table


def reference_draws(idata: az.InferenceData) -> np.ndarray:
    """
    The draws in the unconstrained coordinates
    :data:`~pyro_fdiv.models.eight_schools.UNCONSTRAINED_NAMES`, as a float64 array of shape
    ``(chain, draw, 10)``. Flatten with ``.reshape(-1, 10)``.
    """
    posterior = _group(idata, "posterior")
    samples = {k: posterior[k].values.astype(np.float64) for k in ("mu", "tau", "theta_tilde")}
    return eight_schools.to_unconstrained(samples).numpy()
