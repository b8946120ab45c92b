"""Datasets of the deep generative model papers: MNIST, binarized MNIST, Omniglot.

Files are read from a directory given by argument or by the ``PYRO_FDIV_DATA`` environment
variable, in the layout of the original distributions (each dataset in its own sub-folder, or
all files directly in the directory)::

    DATA/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz     (LeCun et al.)
    DATA/binarized_mnist/binarized_mnist.npz                         (keys train/valid/test)
        or binarized_mnist_{train,valid,test}.amat                   (Larochelle & Murray text)
    DATA/omniglot/chardata.mat                                       (Burda et al.'s 28x28 set)
        or omniglot_28x28.npz                                        (an area-downsampled stand-in)

Malformed files (a wrong magic number, a header whose sizes do not match the bytes present, a
truncated or empty file, an array of the wrong shape, dtype or range, pickled objects in an
``.npz``) raise a :class:`ValueError` naming the file; sizes announced by a header are checked
before anything is allocated. Nothing here needs torchvision; :func:`load_mnist` can download
through it with ``download=True`` where it is installed and the network is reachable. A missing
file raises a :class:`FileNotFoundError` listing the file names expected and the directories
searched.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATA_ENV",
    "dynamic_binarize",
    "fixed_subset",
    "load_binarized_mnist",
    "load_dataset",
    "load_mnist",
    "load_omniglot",
]

#: Environment variable naming the data directory.
DATA_ENV = "PYRO_FDIV_DATA"

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _roots(root: str | os.PathLike | None, sub: str) -> list[Path]:
    if root is None:
        root = os.environ.get(DATA_ENV)
    if root is None:
        raise FileNotFoundError(
            f"No data directory: pass root=... or set ${DATA_ENV} to a directory holding "
            f"'{sub}/' (see pyro_fdiv.data for the expected files)"
        )
    root = Path(root).expanduser()
    return [root / sub, root]


def _find(root, sub: str, names: list[str]) -> Path:
    """The first of ``names`` present in ``root/sub`` or ``root``."""
    dirs = _roots(root, sub)
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"None of {names} found in {[str(d) for d in dirs]}; download them there or point "
        f"root=/${DATA_ENV} at the directory that holds them"
    )


#: Largest decompressed IDX payload read (MNIST's training images are 47 MB).
MAX_IDX_BYTES = 1 << 32


class _Malformed(ValueError):
    """A data file that is not what its loader expects (the message names the file)."""


def _malformed(path: Path, what: str) -> ValueError:
    return _Malformed(f"{path} is not a valid data file: {what}")


def _read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array. The header's sizes are checked against the bytes present
    (for a ``.gz`` file, against at most :data:`MAX_IDX_BYTES`, read in a bounded stream)
    before the array is allocated."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08" or not 1 <= head[3] <= 4:
                raise _malformed(
                    path, f"magic {head.hex() or '(empty)'}, expected 000008 then 1-4 dims"
                )
            dims = f.read(4 * head[3])
            if len(dims) < 4 * head[3]:
                raise _malformed(path, "the header is truncated")
            shape = tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))
            size = math.prod(shape)
            if size > MAX_IDX_BYTES or (path.suffix != ".gz" and size > path.stat().st_size):
                raise _malformed(path, f"the header announces {shape}, more than the file holds")
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise _malformed(path, f"it cannot be read ({type(error).__name__}: {error})") from None
    if len(data) != size:
        raise _malformed(path, f"the header announces {shape} = {size} bytes, {len(data)} follow")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _checked_images(path: Path, images: object, shape: tuple, binary: bool = False) -> np.ndarray:
    """``images`` if it is a uint8 array of ``shape`` (``-1``: any size) with values in
    {0, 1} when ``binary``; else a ValueError naming the file."""
    if not (
        isinstance(images, np.ndarray)
        and images.ndim == len(shape)
        and all(s in (-1, n) for s, n in zip(shape, images.shape, strict=True))
        and images.dtype.kind in "uib"
    ):
        got = (images.dtype, images.shape) if isinstance(images, np.ndarray) else type(images)
        raise _malformed(path, f"expected an integer array of shape {shape}, got {got}")
    if binary and images.size and (images.min() < 0 or images.max() > 1):
        raise _malformed(path, "expected binary pixels in {0, 1}")
    if not binary and images.size and (images.min() < 0 or images.max() > 255):
        raise _malformed(path, "expected pixel values in [0, 255]")
    return images.astype(np.uint8)


def _npz_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` archive (no pickled objects: ``allow_pickle=False``)."""
    try:
        with open(path, "rb") as stream, np.load(stream, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise _malformed(path, f"no arrays {missing}; it holds {sorted(archive.files)}")
            return {k: archive[k] for k in keys}
    except _Malformed:
        raise
    except Exception as error:  # a damaged archive fails in many ways (zip, zlib, npy header)
        raise _malformed(path, f"it cannot be read ({type(error).__name__}: {error})") from None


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"Expected split in {allowed}, actual {split!r}")


def dynamic_binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with the grey level as probability (a fresh binarization
    each call: "dynamic binarization", Burda et al. 2016)."""
    return torch.bernoulli(x, generator=generator)


def fixed_subset(x: torch.Tensor, size: int | None, seed: int = 1234) -> torch.Tensor:
    """``size`` rows of ``x`` chosen at random by a generator seeded with ``seed``, the same in
    every run (all of ``x`` when ``size`` is ``None`` or not smaller). For evaluation subsets:
    the files are not shuffled, and the first MNIST test images are bolder than the rest."""
    if size is None or size >= len(x):
        return x
    generator = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=generator)[:size]]


def _binarize(x: torch.Tensor, binarize: str | None, seed: int) -> torch.Tensor:
    if binarize is None:
        return x
    if binarize == "threshold":
        return (x > 0.5).to(x.dtype)
    if binarize == "dynamic":
        return dynamic_binarize(x, torch.Generator().manual_seed(seed))
    raise ValueError(f"Expected binarize in (None, 'dynamic', 'threshold'), actual {binarize!r}")


def _tensor(images: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    flat = images.reshape(images.shape[0], -1)
    return torch.tensor(flat, dtype=dtype or torch.get_default_dtype())


def load_mnist(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    binarize: str | None = None,
    seed: int = 0,
    download: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    MNIST from the four IDX files.

    :param str split: ``"train"`` (60,000) or ``"test"`` (10,000).
    :param binarize: ``None`` (grey levels in [0, 1]), ``"dynamic"`` (one Bernoulli draw per
        pixel with generator seed ``seed``; draw again per epoch with :func:`dynamic_binarize`)
        or ``"threshold"`` (pixel > 0.5).
    :param bool download: fetch the files with torchvision if they are missing.
    :returns: ``(images (N, 784), labels (N,))``.
    """
    _check_split(split, tuple(_MNIST_FILES))
    if binarize not in (None, "dynamic", "threshold"):
        raise ValueError(
            f"Expected binarize in (None, 'dynamic', 'threshold'), actual {binarize!r}"
        )
    image_file, label_file = _MNIST_FILES[split]
    try:
        images_path = _find(root, "mnist", [image_file])
    except FileNotFoundError:
        if not download:
            raise
        images_path = _download_mnist(root, image_file)
    label_path = images_path.parent / label_file
    labels = _read_idx(label_path)
    images = _read_idx(images_path)
    if images.ndim != 3:
        raise _malformed(images_path, f"expected images of shape (N, H, W), got {images.shape}")
    if labels.shape != images.shape[:1] or (labels.size and labels.max() > 9):
        raise _malformed(
            label_path, f"expected {images.shape[0]} labels in 0-9 for {images_path.name}"
        )
    label_tensor = torch.as_tensor(labels.astype(np.int64))
    x = _tensor(images, dtype) / 255.0
    return _binarize(x, binarize, seed), label_tensor


def _download_mnist(root, image_file: str) -> Path:
    try:
        from torchvision.datasets import MNIST  # lazily: never required
    except Exception as error:
        raise FileNotFoundError(
            f"{image_file} is missing and torchvision is unavailable to download it ({error})"
        ) from error
    target = _roots(root, "mnist")[1]
    MNIST(str(target), download=True)
    return _find(target / "MNIST" / "raw", ".", [image_file])


def load_binarized_mnist(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """
    The fixed binarization of Larochelle & Murray (2011): 50,000 / 10,000 / 10,000 images in
    ``{0, 1}``, from ``binarized_mnist.npz`` or the original ``.amat`` text files.

    :param str split: ``"train"``, ``"valid"`` or ``"test"``.
    :returns: images of shape ``(N, 784)``.
    """
    _check_split(split, ("train", "valid", "test"))
    path = _find(root, "binarized_mnist", ["binarized_mnist.npz", f"binarized_mnist_{split}.amat"])
    if path.suffix == ".npz":
        images = _npz_arrays(path, (split,))[split]
    else:
        try:
            images = np.loadtxt(path, dtype=np.int64, ndmin=2)
        except (ValueError, OSError) as error:
            raise _malformed(path, f"expected rows of 0/1 integers ({error})") from None
    return _tensor(_checked_images(path, images, (-1, -1), binary=True), dtype)


def load_omniglot(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    binarize: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """
    Omniglot at 28x28, the split of Burda et al. (2016) (24,345 train, 8,070 test) from their
    ``chardata.mat``; otherwise ``omniglot_28x28.npz`` (all 32,460 images area-downsampled from
    the 105x105 originals, split by drawer: the first 15 of 20 drawings of each character for
    training, 24,345 / 8,115; not verified to match chardata.mat, so likelihoods are not
    directly comparable with published ones).

    :param binarize: ``None``, ``"dynamic"`` or ``"threshold"``, as in :func:`load_mnist`.
    :returns: images of shape ``(N, 784)`` in [0, 1].
    """
    _check_split(split, ("train", "test"))
    path = _find(root, "omniglot", ["chardata.mat", "omniglot_28x28.npz"])
    if path.suffix == ".mat":
        x = _tensor(_chardata(path, "data" if split == "train" else "testdata"), dtype)
    else:
        arrays = _npz_arrays(path, ("images", "drawer"))
        images = _checked_images(path, arrays["images"], (-1, 28, 28))
        drawer = arrays["drawer"]
        if drawer.dtype.kind not in "iu" or drawer.shape != images.shape[:1]:
            raise _malformed(path, f"expected {len(images)} integer drawer indices")
        keep = drawer < 15 if split == "train" else drawer >= 15
        x = _tensor(images[keep], dtype) / 255.0
    return _binarize(x, binarize, seed)


def _chardata(path: Path, key: str) -> np.ndarray:
    """Burda et al.'s ``chardata.mat`` array ``key``: 784 rows of pixels in [0, 1], stored
    column-major, as ``(N, 28, 28)`` row-major floats."""
    from scipy.io import loadmat

    try:
        images = loadmat(path)[key]
    except KeyError:
        raise _malformed(path, f"no array '{key}'") from None
    except Exception as error:  # scipy's MAT parser fails in many ways on a damaged file
        raise _malformed(path, f"it cannot be read ({type(error).__name__}: {error})") from None
    if not (isinstance(images, np.ndarray) and images.ndim == 2 and images.shape[0] == 784):
        raise _malformed(path, f"expected '{key}' of shape (784, N), got {np.shape(images)}")
    if images.dtype.kind not in "fiub" or (
        images.size and not 0 <= images.min() <= images.max() <= 1
    ):
        raise _malformed(path, f"expected '{key}' pixels in [0, 1]")
    images = images.T.reshape(-1, 28, 28)
    return np.ascontiguousarray(images.transpose(0, 2, 1)).astype(np.float64)


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", **kwargs: Any
) -> torch.Tensor:
    """``"binarized-mnist"``, ``"mnist"`` (images only) or ``"omniglot"`` by name."""
    if name == "binarized-mnist":
        return load_binarized_mnist(root, split, **kwargs)
    if name == "mnist":
        return load_mnist(root, split, **kwargs)[0]
    if name == "omniglot":
        return load_omniglot(root, split, **kwargs)
    raise ValueError(f"Unknown dataset {name!r}; expected 'binarized-mnist', 'mnist' or 'omniglot'")
