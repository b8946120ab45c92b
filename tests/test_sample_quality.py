"""Sample-quality metrics: closed forms and known answers on synthetic features; the classifier
on a tiny subset (no cached classifier needed)."""

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pyro_fdiv import data
from pyro_fdiv.compare import sample_quality as sq

SHARED = Path(os.environ.get(data.DATA_ENV, Path(__file__).resolve().parents[2] / "shared/data"))
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_quality_classifier.py"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"MNIST is not in {SHARED} (set ${data.DATA_ENV})",
)


def _random_cov(d, generator):
    a = torch.randn(d, d, generator=generator)
    return a @ a.T / d + 0.1 * torch.eye(d)


# ---- Fréchet distance ---------------------------------------------------------------------


def test_gaussian_frechet_distance_diagonal_closed_form():
    """For diagonal covariances, (Σa Σb)^{1/2} = diag(σa σb): d² = |μa-μb|² + Σ (σa - σb)²."""
    g = torch.Generator().manual_seed(0)
    mean_a, mean_b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    sd_a, sd_b = torch.rand(6, generator=g) + 0.2, torch.rand(6, generator=g) + 0.2
    expected = ((mean_a - mean_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    got = sq.gaussian_frechet_distance(mean_a, torch.diag(sd_a**2), mean_b, torch.diag(sd_b**2))
    assert got == pytest.approx(expected.item(), rel=1e-12)


def test_gaussian_frechet_distance_full_covariances_against_scipy_sqrtm():
    """Non-commuting covariances: the trace term against scipy's general matrix square root
    of Σa Σb (an independent algorithm, Schur decomposition)."""
    g = torch.Generator().manual_seed(1)
    d = 8
    cov_a, cov_b = _random_cov(d, g), _random_cov(d, g)
    assert not torch.allclose(cov_a @ cov_b, cov_b @ cov_a)
    mean_a, mean_b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    cross = np.trace(scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())).real
    expected = ((mean_a - mean_b) ** 2).sum().item() + cov_a.trace() + cov_b.trace() - 2 * cross
    got = sq.gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b)
    assert got == pytest.approx(expected.item(), rel=1e-10)
    # symmetric in its two Gaussians, although the formula is not written symmetrically
    assert sq.gaussian_frechet_distance(mean_b, cov_b, mean_a, cov_a) == pytest.approx(got)


def test_frechet_distance_identical_sets_is_zero_and_rotation_invariant():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(500, 20, generator=g) * torch.linspace(0.01, 10, 20) + 3
    assert sq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    b = torch.randn(500, 20, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert sq.frechet_distance(a @ rotation, b @ rotation) == pytest.approx(
        sq.frechet_distance(a, b), rel=1e-9
    )


def test_frechet_distance_of_samples_approaches_closed_form():
    """Large samples of two known Gaussians: the plug-in distance is near the exact one (the
    estimator's bias, O(d/n), is well under the tolerance here)."""
    g = torch.Generator().manual_seed(3)
    d, n = 4, 40_000
    cov_a, cov_b = _random_cov(d, g), _random_cov(d, g)
    mean_a, mean_b = torch.zeros(d), torch.full((d,), 0.5)
    a = mean_a + torch.randn(n, d, generator=g) @ torch.linalg.cholesky(cov_a).T
    b = mean_b + torch.randn(n, d, generator=g) @ torch.linalg.cholesky(cov_b).T
    exact = sq.gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b)
    assert sq.frechet_distance(a, b) == pytest.approx(exact, rel=0.05)


def test_frechet_distance_bad_input_names_argument():
    with pytest.raises(ValueError, match="feats_b"):
        sq.frechet_distance(torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="different dimensions"):
        sq.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="non-finite"):
        sq.frechet_distance(torch.full((5, 3), float("nan")), torch.zeros(5, 3))


# ---- precision and recall -----------------------------------------------------------------


def _brute_force_precision_recall(real, fake, k):
    """Kynkäänniemi et al.'s definition written out with full distance matrices in NumPy."""
    real, fake = np.asarray(real), np.asarray(fake)

    def radii(x):
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(dist, axis=1)[:, k]

    def inside(queries, centres):
        dist = np.linalg.norm(queries[:, None] - centres[None], axis=-1)
        return (dist <= radii(centres)[None]).any(1).mean()

    return inside(fake, real), inside(real, fake)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    g = torch.Generator().manual_seed(4)
    real = torch.randn(150, 3, generator=g)
    fake = 0.8 * torch.randn(120, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])
    expected = _brute_force_precision_recall(real, fake, k)
    assert 0.1 < expected[0] < 0.99 and 0.1 < expected[1] < 0.99  # an informative case
    for chunk_size in (7, 1000):  # chunking must not change the answer
        got = sq.precision_recall(real, fake, k=k, chunk_size=chunk_size)
        assert got == pytest.approx(expected, abs=1e-12)


def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(300, 10, generator=g)
    assert sq.precision_recall(real, real) == (1.0, 1.0)
    far = torch.randn(200, 10, generator=g) + 100.0
    assert sq.precision_recall(real, far) == (0.0, 0.0)
    # all the data plus as many far-away samples: precision 300/500, recall 1
    mixed = torch.cat([real, far])
    assert sq.precision_recall(real, mixed) == pytest.approx((0.6, 1.0))
    # one real point repeated (balls of radius 0): every sample on the manifold, one real
    # point covered
    repeated = real[:1].expand(50, -1)
    assert sq.precision_recall(real, repeated) == pytest.approx((1.0, 1 / 300))


def test_precision_recall_bad_k():
    with pytest.raises(ValueError, match="Expected k"):
        sq.precision_recall(torch.zeros(5, 2), torch.zeros(3, 2), k=3)


# ---- class histogram ----------------------------------------------------------------------


def test_class_histogram_one_class_and_uniform():
    one = sq.class_histogram(torch.full((1000,), 7))
    assert one["entropy"] == 0.0 and one["modes_covered"] == 1
    assert one["fractions"][7] == 1.0 and one["min_fraction_observed"] == 0.0
    uniform = sq.class_histogram(torch.arange(1000) % 10)
    assert uniform["entropy"] == pytest.approx(math.log(10), rel=1e-12)
    assert uniform["modes_covered"] == 10
    np.testing.assert_allclose(uniform["fractions"], 0.1)
    # 5% of class 3, the rest spread: covered at 1%, not at 10%
    labels = torch.cat([torch.full((50,), 3), torch.arange(950) % 9 + (torch.arange(950) % 9 >= 3)])
    assert sq.class_histogram(labels)["modes_covered"] == 10
    assert sq.class_histogram(labels, min_fraction=0.1)["modes_covered"] == 9
    assert sq.class_histogram(labels)["min_fraction_observed"] == pytest.approx(0.05)


def test_class_histogram_bad_labels():
    with pytest.raises(ValueError, match="labels in"):
        sq.class_histogram(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="integer"):
        sq.class_histogram(torch.tensor([0.0, 1.0]))


# ---- the classifier and sample_quality ----------------------------------------------------


def _blobs(n, generator):
    """Synthetic 28×28 images in [0, 1]: a bright square at one of ten positions (the class)."""
    labels = torch.arange(n) % 10
    x = 0.1 * torch.rand(n, 28, 28, generator=generator)
    for i, c in enumerate(labels.tolist()):
        r, col = 2 + 12 * (c // 5), 2 + 5 * (c % 5)
        x[i, r : r + 10, col : col + 5] += 0.8
    return x.clamp(0, 1), labels


def test_sample_quality_known_answers_with_any_classifier():
    """The real-data identities hold for any feature map, so an untrained classifier will do:
    images against themselves (distance 0, precision = recall = 1) and one repeated image (one
    class, entropy 0, recall 1/N)."""
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    classifier = sq.MNISTClassifier()
    images, _ = _blobs(200, g)
    same = sq.sample_quality(images, classifier, images, batch_size=64)
    assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert same["num_samples"] == 200 and len(same["fractions"]) == 10
    assert 1.0 <= same["classifier_score"] <= 10.0 and 0.1 <= same["confidence"] <= 1.0
    one = sq.sample_quality(images[:1].expand(100, -1, -1), classifier, images)
    assert one["modes_covered"] == 1 and one["entropy"] == 0.0
    assert one["classifier_score"] == pytest.approx(1.0)
    assert one["precision"] == 1.0 and one["recall"] == pytest.approx(1 / 200)
    assert one["frechet_distance"] > 0.01
    _, features = sq.classifier_outputs(classifier, images)
    reused = sq.sample_quality(
        images[:1].expand(100, -1, -1), classifier, None, test_features=features
    )
    for key, value in one.items():
        np.testing.assert_allclose(reused[key], value, rtol=1e-12)


def test_sample_quality_rejects_logits():
    classifier = sq.MNISTClassifier()
    with pytest.raises(ValueError, match=r"samples|images.*\[0, 1\]"):
        sq.sample_quality(torch.randn(10, 784) * 5, classifier, torch.rand(10, 784))
    with pytest.raises(ValueError, match="shape"):
        sq.sample_quality(torch.rand(10, 100), classifier, torch.rand(10, 784))


def test_classifier_learns_synthetic_classes():
    """The training path end to end on images no data directory is needed for."""
    g = torch.Generator().manual_seed(7)
    x, y = _blobs(600, g)
    classifier = sq.train_classifier(x[:500], y[:500], epochs=2, batch_size=50, progress=False)
    logits, features = sq.classifier_outputs(classifier, x[500:])
    assert features.shape == (100, 128) and not classifier.training
    assert (logits.argmax(-1) == y[500:]).double().mean() > 0.9


def test_training_shifts_move_each_image_within_range():
    """The augmentation moves each image as a whole by at most ``shift`` pixels per axis."""
    g = torch.Generator().manual_seed(8)
    x = torch.zeros(200, 1, 28, 28)
    x[:, 0, 10:13, 14:16] = 0.8 * torch.rand(200, 3, 2, generator=g) + 0.1
    moved = sq._translate(x, 2, g)
    assert torch.equal(sq._translate(x, 0, g), x)
    torch.testing.assert_close(moved.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing cut off
    rows = moved.sum((1, 3)).nonzero()[:, 1].view(200, 3)[:, 0] - 10
    cols = moved.sum((1, 2)).nonzero()[:, 1].view(200, 2)[:, 0] - 14
    assert set(rows.tolist()) == set(cols.tolist()) == {-2, -1, 0, 1, 2}
    for i in range(0, 200, 37):  # the content is translated, not changed
        torch.testing.assert_close(
            moved[i, 0, 10 + rows[i] : 13 + rows[i], 14 + cols[i] : 16 + cols[i]],
            x[i, 0, 10:13, 14:16],
        )
    with pytest.raises(ValueError, match="shift"):
        sq.train_classifier(x[:, 0], torch.zeros(200, dtype=torch.long), shift=20)
    with pytest.raises(ValueError, match="train_labels"):
        sq.train_classifier(x[:, 0], torch.full((200,), 10))


@needs_mnist
def test_classifier_on_mnist_subset_beats_chance():
    """1,000 training digits, 40 steps: well above chance (10%) on 500 held-out digits."""
    x, y = data.load_mnist(SHARED, "test", dtype=torch.float32)
    classifier = sq.train_classifier(
        x[:1000], y[:1000], epochs=2, batch_size=50, shift=0, progress=False
    )
    logits, _ = sq.classifier_outputs(classifier, x[-500:])
    assert (logits.argmax(-1) == y[-500:]).double().mean() > 0.7


def test_cache_round_trip_and_foreign_file(tmp_path):
    torch.manual_seed(0)
    model = sq.MNISTClassifier()
    path = tmp_path / "classifier.pt"
    torch.save({"format": sq._FORMAT, "state_dict": model.state_dict()}, path)
    loaded = sq.load_or_train_classifier(path)
    x = torch.rand(4, 784)
    torch.testing.assert_close(
        sq.classifier_outputs(loaded, x), sq.classifier_outputs(model, x), rtol=0, atol=0
    )
    torch.save({"weights": model.state_dict()}, path)
    with pytest.raises(ValueError, match="not a cached MNISTClassifier"):
        sq.load_or_train_classifier(path)


def test_save_sample_grid_writes_png(tmp_path):
    import matplotlib.image

    path = sq.save_sample_grid(torch.rand(30, 784), tmp_path / "grid.png", nrow=10, title="t")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 29  # 3 rows of 10


@needs_mnist
def test_benchmark_script_smoke(tmp_path):
    """``benchmarks/sample_quality_classifier.py --smoke`` runs (a tiny classifier, never the
    cache; a one-epoch VAE on 500 images) and writes its table with the known rows."""
    spec = importlib.util.spec_from_file_location("sample_quality_classifier", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--smoke", "--out", str(tmp_path), "--data", str(SHARED), "--vae-epochs", "1"]
    # the VAE's run directory, written first, is also scored as a run of pyro_fdiv.train
    args += ["--runs", str(tmp_path / "vae_elbo"), "--threads", "1"]
    table = script.main(args)
    assert list(table.index) == [
        "test vs test",
        "train vs test",
        "one image",
        "noise",
        "VAE means",
        "VAE draws",
        "vae_elbo",
    ]
    # the same model, the same seed: the same draws, scored the same
    scores = table.drop(columns="seconds")
    np.testing.assert_allclose(scores.loc["vae_elbo"], scores.loc["VAE means"])
    assert table.loc["test vs test", "frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["test vs test", ["precision", "recall"]].tolist() == [1.0, 1.0]
    assert table.loc["one image", "modes_covered"] == 1
    assert (tmp_path / "ceiling.csv").is_file() and (tmp_path / "grid_VAE_means.png").is_file()
