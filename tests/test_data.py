"""Dataset loaders: shapes, binarization and errors; files from ../shared/data or written here."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_fdiv import data

SHARED = Path(os.environ.get(data.DATA_ENV, Path(__file__).resolve().parents[2] / "shared/data"))
needs_shared = pytest.mark.skipif(
    not (SHARED / "binarized_mnist" / "binarized_mnist.npz").is_file(),
    reason=f"the offline datasets are not in {SHARED} (set ${data.DATA_ENV})",
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_round_trip_and_binarization(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = np.arange(5)
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = data.load_mnist(tmp_path, "test")
    assert x.shape == (5, 784) and x.dtype == torch.get_default_dtype()
    assert torch.equal(x, torch.tensor(images.reshape(5, 784) / 255.0))
    assert y.tolist() == [0, 1, 2, 3, 4]
    thresholded, _ = data.load_mnist(tmp_path, "test", binarize="threshold")
    assert torch.equal(thresholded, (x > 0.5).double())
    a, _ = data.load_mnist(tmp_path, "test", binarize="dynamic", seed=3)
    b, _ = data.load_mnist(tmp_path, "test", binarize="dynamic", seed=3)
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    # dynamic binarization is a Bernoulli draw with the grey level as probability
    grey = torch.full((200_000,), 0.3)
    draws = data.dynamic_binarize(grey, torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 0.3) < 4 * (0.3 * 0.7 / 200_000) ** 0.5


def test_environment_variable_and_amat(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    valid = rng.integers(0, 2, size=(3, 784))
    np.savetxt(tmp_path / "binarized_mnist_valid.amat", valid, fmt="%d")
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    x = data.load_binarized_mnist(split="valid")
    assert torch.equal(x, torch.tensor(valid, dtype=x.dtype))


def test_missing_files_name_what_was_expected(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz.*" + tmp_path.name):
        data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"chardata.mat', 'omniglot_28x28.npz'"):
        data.load_omniglot(tmp_path)
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=data.DATA_ENV):
        data.load_binarized_mnist()
    with pytest.raises(ValueError, match="split"):
        data.load_binarized_mnist(tmp_path, "validation")
    with pytest.raises(ValueError, match="binarize"):
        data.load_mnist(tmp_path, binarize="otsu")
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.load_dataset("cifar10", tmp_path)


@needs_shared
def test_shared_datasets_shapes_and_statistics():
    x, y = data.load_mnist(SHARED, "test", dtype=torch.float32)
    assert x.shape == (10_000, 784) and y.shape == (10_000,)
    assert torch.bincount(y).tolist()[:3] == [980, 1135, 1032]  # the official label counts
    for split, n, mean in (("train", 50_000, 0.13056), ("valid", 10_000, 0.13113)):
        b = data.load_binarized_mnist(SHARED, split, dtype=torch.float32)
        assert b.shape == (n, 784) and set(b.unique().tolist()) == {0.0, 1.0}
        assert b.mean().item() == pytest.approx(mean, abs=5e-5)
    train = data.load_omniglot(SHARED, "train", dtype=torch.float32)
    test = data.load_omniglot(SHARED, "test", dtype=torch.float32)
    assert train.shape == (24_345, 784) and test.shape == (8_115, 784)
    assert 0.0 <= train.min() and train.max() <= 1.0
