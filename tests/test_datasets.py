"""The example loaders of MNIST-1D and Fashion-MNIST: offline, deterministic, disjoint splits."""

from __future__ import annotations

import gzip
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "research"))

from data import FASHION_MNIST_DIR, fashion_mnist_split, mnist1d_split

pytest.importorskip("mnist1d")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"the loader tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_mnist1d_is_generated_offline(no_network):
    split = mnist1d_split(500)
    assert split.sizes() == (320, 80, 100)
    assert not no_network


def test_the_network_guard_catches_a_download(no_network, tmp_path):
    """Negative control: mnist1d's own get_dataset downloads when its file is missing.

    It swallows the error and generates the data instead, so the guard's record is checked.
    """
    from mnist1d.data import get_dataset, get_dataset_args

    args = get_dataset_args()
    args.num_samples = 100
    get_dataset(args, path=str(tmp_path / "mnist1d_data.pkl"), download=True, verbose=False)
    assert no_network


def test_mnist1d_is_deterministic_and_leaves_global_rngs_alone():
    state = np.random.get_state()[1].copy()
    a, b = mnist1d_split(500), mnist1d_split(500)
    for name, t in vars(a).items():
        assert torch.equal(t, getattr(b, name)), name
    assert np.array_equal(np.random.get_state()[1], state)
    c = mnist1d_split(500, seed=43)
    assert not torch.equal(a.x_test, c.x_test)


def test_mnist1d_splits_are_disjoint_and_shaped():
    s = mnist1d_split(1000)
    assert s.x_train.shape[1:] == (1, 40)
    assert s.x_train.dtype == torch.float32
    assert s.y_train.dtype == torch.int64
    train, val, test = rows(s.x_train), rows(s.x_val), rows(s.x_test)
    assert len(train) == len(s.x_train)
    assert not train & val
    assert not train & test
    assert not val & test
    assert set(s.y_test.tolist()) == set(range(10))


def test_mnist1d_noise_is_configurable():
    plain, noisy = mnist1d_split(500), mnist1d_split(500, iid_noise_scale=0.5)
    assert not torch.equal(plain.x_train, noisy.x_train)
    with pytest.raises(ValueError, match="generation arguments"):
        mnist1d_split(500, bogus=1)
    with pytest.raises(ValueError, match="val_fraction"):
        mnist1d_split(500, val_fraction=1.0)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


FILES = [
    ("train-images-idx3-ubyte.gz", 2051, (60000, 28, 28)),
    ("train-labels-idx1-ubyte.gz", 2049, (60000,)),
    ("t10k-images-idx3-ubyte.gz", 2051, (10000, 28, 28)),
    ("t10k-labels-idx1-ubyte.gz", 2049, (10000,)),
]


def test_fashion_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_split(str(tmp_path))


def test_fashion_reads_idx_files_and_refuses_a_truncated_one(tmp_path):
    rng = np.random.default_rng(0)
    for name, magic, shape in FILES:  # random labels and test images; training images are 0
        if magic == 2049 or name.startswith("t10k"):
            array = rng.integers(0, 10 if magic == 2049 else 256, shape)
        else:
            array = np.zeros(shape)
        write_idx(tmp_path / name, array, magic)
    s = fashion_mnist_split(str(tmp_path), val_size=5000)
    assert s.sizes() == (55000, 5000, 10000)
    assert s.x_train.shape[1:] == (1, 28, 28)
    assert float(s.x_train.max()) <= 1.0
    with gzip.open(tmp_path / FILES[2][0]) as f:
        raw = np.frombuffer(f.read()[16:], np.uint8)
    assert torch.equal(s.x_test.reshape(-1), torch.from_numpy(raw / np.float32(255.0)).float())
    with gzip.open(tmp_path / FILES[3][0], "wb") as f:  # a labels file cut short
        f.write(np.array([2049, 10000], dtype=">u4").tobytes() + bytes(100))
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist_split(str(tmp_path))
    write_idx(tmp_path / FILES[3][0], np.zeros((10000, 2)), 2051)  # the wrong kind of file
    with pytest.raises(ValueError, match="magic"):
        fashion_mnist_split(str(tmp_path))


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason="Debian's dataset-fashion-mnist is not installed (make test installs it where apt is)",
)
def test_fashion_the_real_files():
    s = fashion_mnist_split()
    assert s.sizes() == (50000, 10000, 10000)
    # the known class counts: 6,000 per class in train, 1,000 in test
    train_labels = torch.cat([s.y_train, s.y_val])
    assert train_labels.bincount().tolist() == [6000] * 10
    assert s.y_test.bincount().tolist() == [1000] * 10
    assert not rows(s.x_val[:500]) & rows(s.x_test)
    again = fashion_mnist_split()
    assert torch.equal(s.y_val, again.y_val)
