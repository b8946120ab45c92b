"""Malformed data files: a ValueError naming the file, never another exception, a huge
allocation or a silently wrong array; any damage either reads back the same well-formed array
(a changed pixel) or is refused."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_fdiv import data

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
LABELS = RNG.integers(0, 10, 5).astype(np.uint8)
BINARY = (RNG.random((6, 784)) < 0.3).astype(np.uint8)
NAMES = ["idx", "idx.gz", "npz", "omniglot"]


def _idx(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _raises_naming(path: Path, match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------
# IDX


def test_idx_valid_round_trip(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(_idx(IMAGES))
    assert np.array_equal(data._read_idx(path), IMAGES)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "magic"),
        (b"\x00\x00\x09\x03" + b"\x00" * 12, "magic"),  # int8, not unsigned byte
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "magic"),
        (b"\x00\x00\x08\x00", "magic"),  # zero dims
        (b"\x00\x00\x08\x03\x00\x00\x00\x05", "header is truncated"),
        (_idx(IMAGES)[:-1], "3919 follow"),
        (_idx(IMAGES) + b"\x00", r"more than the file holds|3921 follow"),
    ],
    ids=["empty", "signed", "magic", "no-dims", "short-header", "truncated", "trailing"],
)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_malformed(tmp_path, content, match, compress):
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(content) if compress else content)
    _raises_naming(path, match, data._read_idx, path)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_huge_header_is_refused_before_allocating(tmp_path, compress):
    """A 20-byte file announcing 2^32 x 2^32 x 2^32 bytes: refused at once."""
    header = b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3 + b"\x00" * 4
    path = tmp_path / ("huge.gz" if compress else "huge")
    path.write_bytes(gzip.compress(header) if compress else header)
    start = time.perf_counter()
    _raises_naming(path, "announces", data._read_idx, path)
    assert time.perf_counter() - start < 5  # nothing of that size was read or allocated


def test_corrupt_gzip_stream(tmp_path):
    path = tmp_path / "a.gz"
    good = gzip.compress(_idx(IMAGES))
    path.write_bytes(good[: len(good) // 2])
    _raises_naming(path, "cannot be read|follow", data._read_idx, path)
    path.write_bytes(b"not gzip at all")
    _raises_naming(path, "cannot be read", data._read_idx, path)


def test_mnist_labels_must_match_the_images(tmp_path):
    root = tmp_path
    (root / "mnist").mkdir()
    (root / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(IMAGES)))
    labels = root / "mnist" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx(LABELS[:3])))
    _raises_naming(labels, "expected 5 labels", data.load_mnist, root)
    labels.write_bytes(gzip.compress(_idx(np.full(5, 12, np.uint8))))
    _raises_naming(labels, "labels in 0-9", data.load_mnist, root)
    labels.write_bytes(gzip.compress(_idx(LABELS)))
    x, y = data.load_mnist(root)
    assert x.shape == (5, 784) and np.array_equal(y.numpy(), LABELS)


# ------------------------------------------------------------------------------------------------
# Binarized MNIST (.npz, .amat) and Omniglot (.npz, chardata.mat)


def _binarized(root: Path, **arrays) -> Path:
    (root / "binarized_mnist").mkdir(parents=True, exist_ok=True)
    path = root / "binarized_mnist" / "binarized_mnist.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"valid": BINARY}, r"no arrays \['train'\]; it holds \['valid'\]"),
        ({"train": BINARY.reshape(6, 28, 28)}, "shape"),
        ({"train": BINARY * 2}, "binary pixels"),
        ({"train": BINARY.astype(np.float32)}, "integer array"),
        ({"train": np.array([{"a": 1}], dtype=object)}, "cannot be read"),
    ],
    ids=["missing-split", "3d", "not-binary", "float", "pickled-object"],
)
def test_binarized_npz_malformed(tmp_path, arrays, match):
    path = _binarized(tmp_path, **arrays)
    _raises_naming(path, match, data.load_binarized_mnist, tmp_path)


def test_amat(tmp_path):
    (tmp_path / "binarized_mnist").mkdir()
    path = tmp_path / "binarized_mnist" / "binarized_mnist_train.amat"
    np.savetxt(path, BINARY, fmt="%d")
    assert np.array_equal(data.load_binarized_mnist(tmp_path).numpy(), BINARY)
    path.write_text("0 1 0\n1 1\n")
    _raises_naming(path, "0/1 integers", data.load_binarized_mnist, tmp_path)
    path.write_text("0 1 2\n1 1 0\n")
    _raises_naming(path, "binary pixels", data.load_binarized_mnist, tmp_path)


def _omniglot(root: Path, **arrays) -> Path:
    (root / "omniglot").mkdir(parents=True, exist_ok=True)
    path = root / "omniglot" / "omniglot_28x28.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": IMAGES}, r"no arrays \['drawer'\]"),
        ({"images": IMAGES.reshape(5, 784), "drawer": np.arange(5)}, "shape"),
        ({"images": IMAGES, "drawer": np.arange(4)}, "drawer"),
        ({"images": IMAGES, "drawer": np.linspace(0, 19, 5)}, "drawer"),
    ],
    ids=["no-drawer", "flat", "short-drawer", "float-drawer"],
)
def test_omniglot_npz_malformed(tmp_path, arrays, match):
    path = _omniglot(tmp_path, **arrays)
    _raises_naming(path, match, data.load_omniglot, tmp_path)


def test_chardata_mat(tmp_path):
    (tmp_path / "omniglot").mkdir()
    path = tmp_path / "omniglot" / "chardata.mat"
    pixels = RNG.random((784, 4))
    scipy.io.savemat(path, {"data": pixels, "testdata": pixels[:, :2]})
    x = data.load_omniglot(tmp_path).numpy()
    assert x.shape == (4, 784)
    assert np.allclose(x[0].reshape(28, 28), pixels[:, 0].reshape(28, 28).T)  # column-major
    scipy.io.savemat(path, {"data": pixels[:700]})
    _raises_naming(path, r"shape \(784, N\)", data.load_omniglot, tmp_path)
    scipy.io.savemat(path, {"data": pixels * 3})
    _raises_naming(path, r"pixels in \[0, 1\]", data.load_omniglot, tmp_path)
    scipy.io.savemat(path, {"other": pixels})
    _raises_naming(path, "no array 'data'", data.load_omniglot, tmp_path)
    path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 10)
    _raises_naming(path, "cannot be read", data.load_omniglot, tmp_path)


# ------------------------------------------------------------------------------------------------
# Property tests: damaged bytes read the same well-formed array or are refused


def _settings(n: int) -> settings:
    health = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    return settings(max_examples=n, deadline=None, suppress_health_check=health, derandomize=True)


def _formats(tmp: Path) -> dict[str, tuple[Path, bytes, object]]:
    """Each format's valid file, its bytes and the loader that reads it."""
    out = {}
    for name, compress in (("idx", False), ("idx.gz", True)):
        path = tmp / f"a.{name}"
        payload = _idx(IMAGES)
        path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
        out[name] = (path, path.read_bytes(), lambda p=path: data._read_idx(p))
    binarized = _binarized(tmp / "b", train=BINARY)
    out["npz"] = (
        binarized,
        binarized.read_bytes(),
        lambda r=tmp / "b": data.load_binarized_mnist(r),
    )
    omni = _omniglot(tmp / "o", images=IMAGES, drawer=np.arange(5) * 4)
    out["omniglot"] = (omni, omni.read_bytes(), lambda r=tmp / "o": data.load_omniglot(r))
    return out


def _read_or_refuse(path: Path, loader, damaged: bytes, good: np.ndarray) -> bool:
    path.write_bytes(damaged)
    try:
        value = np.asarray(loader())
    except ValueError as error:
        assert str(path) in str(error)
        return False
    assert value.shape == good.shape
    return True


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    files = _formats(tmp)
    return {
        k: (path, raw, loader, np.asarray(loader())) for k, (path, raw, loader) in files.items()
    }


@_settings(60)
@given(
    name=st.sampled_from(NAMES),
    cut=st.floats(0, 1, exclude_max=True),
)
def test_truncated_data_file(formats, name, cut):
    path, raw, loader, good = formats[name]
    try:
        assert not _read_or_refuse(path, loader, raw[: int(cut * len(raw))], good)
    finally:
        path.write_bytes(raw)


@_settings(80)
@given(
    name=st.sampled_from(NAMES),
    where=st.floats(0, 1, exclude_max=True),
    bit=st.integers(0, 7),
)
def test_flipped_bit_in_data_file(formats, name, where, bit):
    path, raw, loader, good = formats[name]
    damaged = bytearray(raw)
    position = int(where * len(raw))
    damaged[position] ^= 1 << bit
    try:
        read = _read_or_refuse(path, loader, bytes(damaged), good)
        if read and name == "idx" and position >= 4 + 4 * IMAGES.ndim:  # a pixel byte
            value = data._read_idx(path)
            assert int((value != IMAGES).sum()) == 1
    finally:
        path.write_bytes(raw)


@_settings(30)
@given(
    name=st.sampled_from(NAMES),
    extra=st.binary(min_size=1, max_size=64),
)
def test_trailing_bytes_in_data_file(formats, name, extra):
    path, raw, loader, good = formats[name]
    try:
        read = _read_or_refuse(path, loader, raw + extra, good)
        if name == "idx":
            assert not read  # the header's size no longer matches
    finally:
        path.write_bytes(raw)
