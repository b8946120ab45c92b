r"""Sample quality of MNIST-like image generators, measured with a small CNN classifier.

A generative model's log-likelihood says little about how its samples look: a model can spread
its mass thinly over blurry images (mass-covering, forward KL) or put sharp images on a few
digits (mode-seeking, reverse KL). The numbers here separate the two, all computed from a
classifier trained once on MNIST's training set (:func:`load_or_train_classifier`):

* **variety**: the histogram of predicted classes over the samples (:func:`class_histogram`):
  fractions, entropy (:math:`\log 10` for a uniform histogram, 0 for one class), the number of
  classes covered and the smallest fraction;
* **sharpness**: the mean classifier confidence :math:`\frac1N\sum_i \max_y p(y\mid x_i)`, and the
  classifier score :math:`\exp\big(\mathbb E_x \mathrm{KL}(p(y\mid x)\,\|\,p(y))\big)` (the
  Inception score of Salimans et al. 2016 with this classifier), between 1 and 10;
* **distance to the data**: the Fréchet distance between Gaussians fitted to the classifier's
  penultimate features of samples and of test images (:func:`frechet_distance`, the FID of
  Heusel et al. 2017 with this classifier in place of Inception);
* **precision and recall** in that feature space (:func:`precision_recall`, Kynkäänniemi et al.
  2019): the fraction of samples inside the k-nearest-neighbour manifold of the test images
  (fidelity), and of test images inside the manifold of the samples (coverage).

:func:`sample_quality` returns them all in one dict; :func:`save_sample_grid` draws samples.
The metrics themselves take features or labels and are independent of the classifier.

**References**

1. M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter (2017), "GANs trained by a
   two time-scale update rule converge to a local Nash equilibrium", *NeurIPS* (the Fréchet
   distance of feature Gaussians).
2. T. Kynkäänniemi, T. Karras, S. Laine, J. Lehtinen, T. Aila (2019), "Improved precision and
   recall metric for assessing generative models", *NeurIPS*.
3. T. Salimans, I. Goodfellow, W. Zaremba, V. Cheung, A. Radford, X. Chen (2016), "Improved
   techniques for training GANs", *NeurIPS* (the Inception score).
4. D. C. Dowson, B. V. Landau (1982), "The Fréchet distance between multivariate normal
   distributions", *J. Multivariate Anal.* 12(3), 450–455.

Example::

    from pyro_fdiv.compare.sample_quality import (
        load_or_train_classifier, sample_quality, save_sample_grid)
    from pyro_fdiv.data import load_mnist

    classifier = load_or_train_classifier(data_dir="../shared/data")  # trains once, then cached
    test_images, _ = load_mnist("../shared/data", "test")
    samples = decoder_means_of_prior_draws  # (10000, 784), values in [0, 1]
    quality = sample_quality(samples, classifier, test_images)
    save_sample_grid(samples, "samples.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

__all__ = [
    "CACHE_ENV",
    "MNISTClassifier",
    "class_histogram",
    "classifier_outputs",
    "default_cache_path",
    "frechet_distance",
    "gaussian_frechet_distance",
    "load_or_train_classifier",
    "precision_recall",
    "quality_table",
    "sample_quality",
    "save_sample_grid",
    "train_classifier",
]

#: Environment variable naming the cache directory (default ``$XDG_CACHE_HOME/pyro_fdiv`` or
#: ``~/.cache/pyro_fdiv``).
CACHE_ENV = "PYRO_FDIV_CACHE"

#: Tag of the cached classifier file, checked on loading.
_FORMAT = "pyro_fdiv.MNISTClassifier/1"

#: MNIST's pixel mean and standard deviation (training set), for input standardization.
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


class MNISTClassifier(nn.Module):
    """
    A small CNN for 28×28 digits: two 3×3 convolutions (32 and 64 channels, each followed by
    ReLU and 2×2 max pooling), a 128-unit dense ReLU layer (the features), dropout, and a
    linear layer to the 10 class logits.

    Inputs are images with pixel values in [0, 1], of shape ``(N, 784)``, ``(N, 28, 28)`` or
    ``(N, 1, 28, 28)``; they are standardized inside. :meth:`forward` returns
    ``(logits (N, 10), features (N, 128))``.

    :param int num_features: width of the penultimate (feature) layer.
    :param float dropout: dropout probability before the output layer (training only).
    """

    def __init__(self, num_features: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"Expected num_features >= 1, actual {num_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected dropout in [0, 1), actual {dropout}")
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.dense = nn.Linear(64 * 7 * 7, num_features)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(num_features, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _as_images(x, "x").to(self.conv1.weight.dtype)
        h = (x - _MNIST_MEAN) / _MNIST_STD
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        features = F.relu(self.dense(h.flatten(1)))
        return self.out(self.dropout(features)), features


def _as_images(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as ``(N, 1, 28, 28)``, from ``(N, 784)``, ``(N, 28, 28)`` or ``(N, 1, 28, 28)``."""
    if x.dim() >= 2 and x.shape[1:] in ((784,), (28, 28), (1, 28, 28)):
        return x.reshape(-1, 1, 28, 28)
    raise ValueError(
        f"Expected {name} of shape (N, 784), (N, 28, 28) or (N, 1, 28, 28), actual {tuple(x.shape)}"
    )


def _checked_pixels(x: Any, name: str) -> torch.Tensor:
    """``x`` as a float tensor of 28×28 images with finite values in [0, 1]."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x / 255.0
    x = _as_images(x.float(), name)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one image")
    if not torch.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(
            f"Expected {name} with finite pixel values in [0, 1] (decoder means or probabilities, "
            f"not logits), actual range [{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    return x.clamp(0.0, 1.0)


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    shift: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> MNISTClassifier:
    """
    Train an :class:`MNISTClassifier` by Adam on the cross-entropy, with the learning rate
    decayed linearly to zero over the run, each image translated by a random whole number of
    pixels in ``[-shift, shift]`` along each axis (zero-filled) each time it is seen. For the
    accuracy reached on MNIST see ``docs/experiments/sample_quality/``.

    :param train_images: images with pixels in [0, 1] (or uint8), ``(N, 784)`` or ``(N, 28, 28)``.
    :param train_labels: integer labels in 0-9, shape ``(N,)``.
    :param int epochs: passes over the data.
    :param int shift: largest translation in pixels (0: none).
    :param int seed: seeds the initialization, the shuffling, the shifts and dropout.
    :param bool progress: show a tqdm bar over the steps.
    :returns: the classifier in evaluation mode, in float32 on the CPU.
    """
    images = _checked_pixels(train_images, "train_images")
    labels = torch.as_tensor(train_labels).long()
    if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"Expected train_labels of shape ({images.shape[0]},) with values in 0-9, "
            f"actual shape {tuple(labels.shape)}"
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"Expected {name} >= 1, actual {value}")
    if not 0 <= shift < 14:
        raise ValueError(f"Expected shift in [0, 14) pixels, actual {shift}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MNISTClassifier().float()
        steps_per_epoch = math.ceil(len(images) / batch_size)
        total = epochs * steps_per_epoch
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
        model.train()
        bar = tqdm(total=total, desc="classifier", disable=not progress, leave=False)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for idx in order.split(batch_size):
                logits, _ = model(_translate(images[idx], shift, generator))
                loss = F.cross_entropy(logits, labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    return model.eval()


def _translate(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, 1, 28, 28) moved by its own random offset in ``[-shift, shift]``
    pixels per axis, the uncovered border filled with zeros."""
    if shift == 0:
        return x
    n = len(x)
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (2, n, 1), generator=generator)
    rows = (offsets[0] + torch.arange(28))[:, :, None]
    cols = (offsets[1] + torch.arange(28))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def classifier_outputs(
    classifier: MNISTClassifier, images: Any, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's ``(logits, features)`` of ``images`` (pixels in [0, 1]) in evaluation
    mode, computed ``batch_size`` images at a time; float64 on the CPU."""
    x = _checked_pixels(images, "images")
    was_training = classifier.training
    classifier.eval()
    try:
        outputs = [classifier(chunk) for chunk in x.split(batch_size)]
    finally:
        classifier.train(was_training)
    logits = torch.cat([o[0] for o in outputs]).double().cpu()
    features = torch.cat([o[1] for o in outputs]).double().cpu()
    return logits, features


def default_cache_path() -> Path:
    """``$PYRO_FDIV_CACHE/mnist_classifier.pt``, else under ``$XDG_CACHE_HOME/pyro_fdiv`` or
    ``~/.cache/pyro_fdiv``."""
    root = os.environ.get(CACHE_ENV)
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = str(Path(xdg) / "pyro_fdiv")
    return Path(root).expanduser() / "mnist_classifier.pt"


def load_or_train_classifier(
    cache_path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    epochs: int = 4,
    seed: int = 0,
    retrain: bool = False,
    progress: bool = True,
) -> MNISTClassifier:
    """
    The MNIST classifier stored at ``cache_path`` (default :func:`default_cache_path`); when the
    file is missing (or ``retrain``), train one with :func:`train_classifier` on MNIST's
    training set from ``data_dir`` (see :func:`pyro_fdiv.data.load_mnist`) and store its
    ``state_dict`` there. The file is read with ``torch.load(..., weights_only=True)``, so a
    cache file cannot run code; one written by something else raises a :class:`ValueError`
    naming it.
    """
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    model = MNISTClassifier()
    if path.is_file() and not retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a cached MNISTClassifier (expected format {_FORMAT!r}); "
                "delete it or pass retrain=True"
            )
        model.load_state_dict(saved["state_dict"])
        return model.eval()
    from pyro_fdiv.data import load_mnist

    images, labels = load_mnist(data_dir, "train", dtype=torch.float32)
    model = train_classifier(images, labels, epochs=epochs, seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(
        {"format": _FORMAT, "epochs": epochs, "seed": seed, "state_dict": model.state_dict()},
        partial,
    )
    os.replace(partial, path)  # atomic: an interrupted save never leaves a broken cache
    return model


def class_histogram(
    labels: Any, num_classes: int = 10, min_fraction: float = 0.01
) -> dict[str, Any]:
    r"""
    The histogram of predicted classes.

    :param labels: integer class labels, shape ``(N,)``.
    :param float min_fraction: a class counts as covered when at least this fraction of the
        labels falls in it.
    :returns: ``fractions`` (array of ``num_classes``), ``entropy`` in nats
        (:math:`-\sum_y \hat p_y \log \hat p_y`: :math:`\log` ``num_classes`` when uniform, 0
        for one class), ``modes_covered`` (classes with at least ``min_fraction``) and
        ``min_fraction_observed`` (the smallest class's fraction).
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point():
        raise ValueError(
            f"Expected labels as a non-empty 1-D integer tensor, actual shape "
            f"{tuple(labels.shape)} dtype {labels.dtype}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Expected labels in [0, {num_classes}), actual range "
            f"[{labels.min().item()}, {labels.max().item()}]"
        )
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    fractions = counts / counts.sum()
    entropy = -torch.special.xlogy(fractions, fractions).sum()
    return {
        "fractions": fractions.numpy(),
        "entropy": entropy.item() + 0.0,  # + 0.0: no "-0.0" for one class
        "modes_covered": int((fractions >= min_fraction).sum()),
        "min_fraction_observed": fractions.min().item(),
    }


def _checked_features(x: Any, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"Expected {name} of shape (n >= 2, d), actual {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values")
    return x


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_frechet_distance(mean_a: Any, cov_a: Any, mean_b: Any, cov_b: Any) -> float:
    r"""
    The squared Fréchet (2-Wasserstein) distance between two Gaussians (Dowson and Landau, 1982):

    .. math::

        d^2 = \|\mu_a - \mu_b\|^2 + \mathrm{tr}\,\Sigma_a + \mathrm{tr}\,\Sigma_b
            - 2\,\mathrm{tr}\big(\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}\big)^{1/2}.

    The last trace equals :math:`\mathrm{tr}(\Sigma_a\Sigma_b)^{1/2}` (the two matrices are
    similar), but :math:`\Sigma_a^{1/2}\Sigma_b\Sigma_a^{1/2}` is symmetric PSD, so its root
    comes from a symmetric eigendecomposition in float64 rather than a general (complex) matrix
    square root. Rounding can leave a value of order :math:`10^{-12}\,\mathrm{tr}\,\Sigma` below
    zero; it is clipped to 0.
    """
    mean_a, mean_b = torch.as_tensor(mean_a).double(), torch.as_tensor(mean_b).double()
    cov_a, cov_b = torch.as_tensor(cov_a).double(), torch.as_tensor(cov_b).double()
    d = mean_a.shape[-1]
    for name, mean, cov in (("a", mean_a, cov_a), ("b", mean_b, cov_b)):
        if mean.shape != (d,) or cov.shape != (d, d):
            raise ValueError(
                f"Expected mean_{name} of shape ({d},) and cov_{name} of shape ({d}, {d}), "
                f"actual {tuple(mean.shape)} and {tuple(cov.shape)}"
            )
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(value.item(), 0.0)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """
    The squared Fréchet distance (:func:`gaussian_frechet_distance`) between the Gaussians
    fitted to two sets of features of shape ``(n, d)`` (sample means and unbiased covariances,
    in float64). With classifier features of samples and of test images, this is the FID of
    Heusel et al. (2017) with our classifier in place of Inception; it is 0 for a set against
    itself and is biased upwards for small ``n`` (compare values at the same ``n``).
    """
    a, b = _checked_features(feats_a, "feats_a"), _checked_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feats_a and feats_b have different dimensions: {a.shape[1]} and {b.shape[1]}"
        )
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(len(a), len(b))`` in float64, clipped at 0."""
    d2 = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T
    return d2.clamp(min=0)


def _knn_radii2(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """The squared distance of each row of ``x`` to its ``k``-th nearest other row."""
    radii = [
        _squared_distances(chunk, x).kthvalue(k + 1, dim=1).values  # k + 1: the row itself is 0
        for chunk in x.split(chunk_size)
    ]
    return torch.cat(radii)


def _inside(
    queries: torch.Tensor, centres: torch.Tensor, radii2: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Whether each query lies in at least one ball ``|q - c|^2 <= r^2`` (the tolerance,
    ``1e-10`` of the squared norms, absorbs the rounding of the Gram-matrix formula, so that a
    copy of a centre counts as inside even when its ball has radius 0)."""
    norms = centres.square().sum(1)
    found = []
    for chunk in queries.split(chunk_size):
        slack = 1e-10 * (chunk.square().sum(1, keepdim=True) + norms)
        found.append((_squared_distances(chunk, centres) <= radii2 + slack).any(1))
    return torch.cat(found)


def precision_recall(
    real_feats: Any, fake_feats: Any, k: int = 3, chunk_size: int = 1000
) -> tuple[float, float]:
    r"""
    Improved precision and recall (Kynkäänniemi et al., 2019). Each set's manifold is the union
    of balls around its points, each of radius the distance to the point's ``k``-th nearest
    neighbour in the same set:

    .. math::

        \mathrm{precision} = \frac1M \sum_{j} 1\big[\phi^g_j \in \mathrm{manifold}(\Phi_r)\big],
        \qquad
        \mathrm{recall} = \frac1N \sum_{i} 1\big[\phi^r_i \in \mathrm{manifold}(\Phi_g)\big].

    Precision measures fidelity (samples that look like data), recall measures coverage (data
    that the samples reach). A set against itself has precision = recall = 1; two far-apart
    sets have 0. Distances are computed in float64, ``chunk_size`` rows at a time, so memory is
    ``O(chunk_size · n)``.

    :param real_feats: features of real images, shape ``(N, d)`` with ``N > k``.
    :param fake_feats: features of samples, shape ``(M, d)`` with ``M > k``.
    :param int k: neighbour whose distance sets the radius (the paper uses 3).
    :returns: ``(precision, recall)``.
    """
    real = _checked_features(real_feats, "real_feats")
    fake = _checked_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real_feats and fake_feats have different dimensions: {real.shape[1]} and "
            f"{fake.shape[1]}"
        )
    if not isinstance(k, int) or k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(
            f"Expected k an integer in [1, {min(len(real), len(fake)) - 1}] (fewer than the "
            f"points in either set), actual {k}"
        )
    if chunk_size < 1:
        raise ValueError(f"Expected chunk_size >= 1, actual {chunk_size}")
    real_radii2 = _knn_radii2(real, k, chunk_size)
    fake_radii2 = _knn_radii2(fake, k, chunk_size)
    precision = _inside(fake, real, real_radii2, chunk_size).double().mean().item()
    recall = _inside(real, fake, fake_radii2, chunk_size).double().mean().item()
    return precision, recall


def sample_quality(
    samples: Any,
    classifier: MNISTClassifier,
    test_images: Any,
    *,
    k: int = 3,
    min_fraction: float = 0.01,
    batch_size: int = 1000,
    test_features: torch.Tensor | None = None,
) -> dict[str, Any]:
    r"""
    All the numbers of this module for ``samples`` against ``test_images`` (both images with
    pixels in [0, 1], e.g. a model's decoder means of 10,000 prior draws and MNIST's 10,000 test
    images; compare models at the same number of samples, as the Fréchet distance and
    precision/recall depend on it).

    :param test_features: the classifier's features of ``test_images``
        (:func:`classifier_outputs`), when already computed (scoring several models against
        one test set); ``test_images`` is then not read.

    :returns: a dict with ``num_samples``; ``fractions``, ``entropy``, ``modes_covered``,
        ``min_fraction_observed`` (:func:`class_histogram` of the predicted classes);
        ``confidence`` (mean top-class probability); ``classifier_score``
        (:math:`\exp \mathbb E_x \mathrm{KL}(p(y|x) \| p(y))`); ``frechet_distance``;
        ``precision`` and ``recall`` (:func:`precision_recall` with ``k``).
    """
    logits, features = classifier_outputs(classifier, samples, batch_size)
    if test_features is None:
        _, test_features = classifier_outputs(classifier, test_images, batch_size)
    log_probs = logits.log_softmax(-1)
    histogram = class_histogram(log_probs.argmax(-1), min_fraction=min_fraction)
    log_marginal = log_probs.logsumexp(0) - math.log(len(log_probs))
    mean_kl = (log_probs.exp() * (log_probs - log_marginal)).sum(-1).mean()
    precision, recall = precision_recall(test_features, features, k=k, chunk_size=batch_size)
    return {
        "num_samples": len(logits),
        **histogram,
        "confidence": log_probs.max(-1).values.exp().mean().item(),
        "classifier_score": mean_kl.exp().item(),
        "frechet_distance": frechet_distance(features, test_features),
        "precision": precision,
        "recall": recall,
    }


def quality_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per name of :func:`sample_quality` results, the class fractions spread over
    columns ``p0`` ... ``p9``."""
    rows = []
    for name, result in results.items():
        row: dict[str, Any] = {"name": name}
        for key, value in result.items():
            if key == "fractions":
                row.update({f"p{c}": float(f) for c, f in enumerate(value)})
            else:
                row[key] = value
        rows.append(row)
    return pd.DataFrame(rows).set_index("name")


def save_sample_grid(
    samples: Any, path: str | os.PathLike, nrow: int = 10, num: int = 100, title: str | None = None
) -> Path:
    """A PNG of the first ``num`` samples (pixels in [0, 1]) in rows of ``nrow``, white digits
    on black as in MNIST, with a one-pixel gap between images."""
    x = _checked_pixels(samples, "samples")[:num, 0].numpy()
    if nrow < 1:
        raise ValueError(f"Expected nrow >= 1, actual {nrow}")
    rows = math.ceil(len(x) / nrow)
    grid = np.full((rows * 29 + 1, nrow * 29 + 1), 0.5)
    for i, image in enumerate(x):
        r, c = divmod(i, nrow)
        grid[1 + 29 * r : 29 * (r + 1), 1 + 29 * c : 29 * (c + 1)] = image
    fig, ax = plt.subplots(figsize=(nrow * 0.45, rows * 0.45 + (0.3 if title else 0)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
