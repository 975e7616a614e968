"""Data for the examples: UCI digits, MNIST-1D, Fashion-MNIST, random tensors, CIFAR, ImageNet.

Nothing here downloads anything unless asked to (``download=True``):

- scikit-learn provides the digits (1,797 8x8 images, bundled with the package);
- the ``mnist1d`` package generates MNIST-1D (Greydanus 2020) offline with ``make_dataset``; its
  ``get_dataset`` downloads a pickle, so it is never called;
- Debian's ``dataset-fashion-mnist`` package ships the real Fashion-MNIST (Xiao et al. 2017) as IDX
  files, read here with numpy (no torchvision);
- torchvision, which is optional, provides CIFAR and ImageNet and is imported only inside those
  loaders, with a clear message when it is missing.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "DigitsSplit",
    "Split",
    "cifar",
    "digits_split",
    "fashion_mnist_split",
    "imagenet",
    "mnist1d_split",
    "require_torchvision",
    "synthetic",
]

# name -> (input shape of one example, number of classes)
DATASETS: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist1d": ((1, 40), 10),
    "fashion": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagenet": ((3, 224, 224), 1000),
}


@dataclass
class DigitsSplit:
    """Tensors of the digits: images ``(N, 1, 8, 8)`` in [0, 1], labels ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None


def digits_split(
    seed: int = 0, test_fraction: float = 0.25, val_fraction: float = 0.0
) -> DigitsSplit:
    """scikit-learn's bundled digits, split train/test (and val, carved from train) by class.

    The split is stratified and fixed by ``seed`` (not by the training seed), so every run of a
    grid sees the same test set. ``val_fraction`` is a fraction of the *training* part; the test
    part does not change with it, so tuning on val never touches test.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit(
            f"the digits need scikit-learn ({e}): pip install 'sparseopt[examples]'"
        ) from e
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_va = y_va = None
    if val_fraction > 0:
        x_tr, x_va, y_tr, y_va = train_test_split(
            x_tr, y_tr, test_size=val_fraction, random_state=seed, stratify=y_tr
        )

    def images(a: Any) -> Tensor:
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    def labels(a: Any) -> Tensor:
        return torch.tensor(a, dtype=torch.long)

    return DigitsSplit(
        images(x_tr),
        labels(y_tr),
        images(x_te),
        labels(y_te),
        None if x_va is None else images(x_va),
        None if y_va is None else labels(y_va),
    )


@dataclass
class Split:
    """A fixed train/val/test split of one dataset, as tensors (inputs float32, labels int64)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def sizes(self) -> tuple[int, int, int]:
        """``(train, val, test)`` example counts."""
        return len(self.y_train), len(self.y_val), len(self.y_test)


def _carve_val(x: Tensor, y: Tensor, n_val: int, seed: int) -> tuple[Tensor, ...]:
    """``(x_train, y_train, x_val, y_val)``: a fixed random ``n_val`` of ``(x, y)`` held out."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return x[train], y[train], x[val], y[val]


def mnist1d_split(
    num_samples: int = 5000,
    *,
    val_fraction: float = 0.2,
    seed: int = 42,
    split_seed: int = 0,
    **noise: Any,
) -> Split:
    """MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package.

    ``make_dataset`` draws ``num_samples`` signals of length 40 (10 classes, balanced) from its
    templates with the package's default transformations and noise, seeded by ``seed`` (the
    package's own default, 42), and splits them 80/20 into train and test, as the package does.
    The validation split is a fixed random ``val_fraction`` of the training part (by
    ``split_seed``), so the test part never changes with it. With the defaults: 3,200 train,
    800 val, 1,000 test.

    ``noise`` overrides the package's generation arguments to make the task harder or easier:
    ``corr_noise_scale`` (0.25), ``iid_noise_scale`` (0.02), ``shear_scale`` (0.75),
    ``scale_coeff`` (0.4), ``max_translation`` (48), ``shuffle_seq`` (False), ...

    The package seeds numpy's and Python's global generators; their states are restored here,
    so loading the data changes no other random stream. Its ``get_dataset``, which downloads a
    pickle, is never called.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise SystemExit(
            f"MNIST-1D needs the mnist1d package ({e}): pip install 'sparseopt[examples]'"
        ) from e
    import numpy as np

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"Expected val_fraction in [0, 1), but got {val_fraction!r}")
    args = get_dataset_args()
    unknown = sorted(set(noise) - set(vars(args)) | ({"url", "num_samples", "seed"} & set(noise)))
    if unknown:
        raise ValueError(f"Expected mnist1d generation arguments, but got {unknown}")
    args.num_samples, args.seed = int(num_samples), int(seed)
    for key, value in noise.items():
        setattr(args, key, value)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.long)
    n_val = round(val_fraction * len(y))
    x_tr, y_tr, x_va, y_va = _carve_val(x, y, n_val, split_seed)
    x_te = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    y_te = torch.tensor(data["y_test"], dtype=torch.long)
    return Split(x_tr, y_tr, x_va, y_va, x_te, y_te)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", 2051, 60000),
    "y_train": ("train-labels-idx1-ubyte.gz", 2049, 60000),
    "x_test": ("t10k-images-idx3-ubyte.gz", 2051, 10000),
    "y_test": ("t10k-labels-idx1-ubyte.gz", 2049, 10000),
}


def _read_idx(path: str, magic: int, count: int) -> Any:
    """The array of one IDX file (gzip-compressed or not), checked against its header."""
    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw[:4], dtype=">u4")[0]
    if header != magic:
        raise ValueError(
            f"{path} is not an IDX file of this kind: magic {header}, expected {magic}"
        )
    ndim = magic & 0xFF
    dims = [int(d) for d in np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4")]
    if dims[0] != count:
        raise ValueError(f"{path} holds {dims[0]} items, expected {count}")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {data.size} bytes of {int(np.prod(dims))}")
    return data.reshape(dims)


def fashion_mnist_split(
    data_dir: str | None = None, *, val_size: int = 10000, split_seed: int = 0
) -> Split:
    """The real Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images.

    Read with numpy from the four IDX files in ``data_dir`` (default: ``$FASHION_MNIST_DIR``, or
    ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts
    them). Images are ``(N, 1, 28, 28)`` float32 in [0, 1]. The validation split is a fixed random
    ``val_size`` of the training images (by ``split_seed``); the test set is the official one and
    is only for the final report. With the defaults: 50,000 train, 10,000 val, 10,000 test.

    Raises:
        FileNotFoundError: when a file is missing, saying how to get them.
    """
    folder = data_dir or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    arrays = {}
    for key, (name, magic, count) in _FASHION_FILES.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path) and os.path.exists(path[:-3]):
            path = path[:-3]  # the same files, uncompressed
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {name} not found in {folder!r}. On Debian or Ubuntu: "
                "apt-get install dataset-fashion-mnist (it installs the IDX files under "
                f"{FASHION_MNIST_DIR}); elsewhere, where the machine may download, "
                "torchvision.datasets.FashionMNIST(root, download=True) fetches the same files "
                "(into root/FashionMNIST/raw): pass that folder as data_dir or $FASHION_MNIST_DIR."
            )
        arrays[key] = _read_idx(path, magic, count)
    if not 0 <= val_size < 60000:
        raise ValueError(f"Expected val_size in [0, 60000), but got {val_size!r}")

    def images(a: Any) -> Tensor:
        return torch.from_numpy(a.astype("float32") / 255.0).unsqueeze(1)

    def labels(a: Any) -> Tensor:
        return torch.from_numpy(a.astype("int64"))

    x_tr, y_tr, x_va, y_va = _carve_val(
        images(arrays["x_train"]), labels(arrays["y_train"]), val_size, split_seed
    )
    return Split(x_tr, y_tr, x_va, y_va, images(arrays["x_test"]), labels(arrays["y_test"]))


def synthetic(dataset: str, n: int, seed: int = 0) -> TensorDataset:
    """``n`` random examples with ``dataset``'s input shape and label range (for ``--smoke``)."""
    shape, classes = DATASETS[dataset]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def require_torchvision(what: str) -> Any:
    """Import torchvision, or exit with a message that says what needs it and what to do."""
    try:
        import torchvision
    except ImportError as e:
        raise SystemExit(
            f"{what} needs torchvision, which is not importable here ({e}). Install the "
            "torchvision build that matches your torch (pip install torchvision), or run "
            "--dataset digits (bundled with scikit-learn), or --smoke (random tensors)."
        ) from e
    return torchvision


_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def cifar(
    name: str, data_dir: str, *, download: bool = False, val_fraction: float = 0.0, seed: int = 0
) -> tuple[Dataset, Dataset | None, Dataset]:
    """``(train, val, test)`` CIFAR-10/100 datasets through torchvision.

    Train has the usual augmentation (random crop 32 with padding 4, horizontal flip); val (a
    fixed random ``val_fraction`` of the 50,000 training images, without augmentation) and test
    are only normalized.
    """
    tv = require_torchvision(f"--dataset {name}")
    from torchvision import transforms as T

    mean, std = _CIFAR_STATS[name]
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    plain = T.Compose(normalize)
    cls = tv.datasets.CIFAR10 if name == "cifar10" else tv.datasets.CIFAR100
    try:
        train = cls(data_dir, train=True, transform=augment, download=download)
        test = cls(data_dir, train=False, transform=plain, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise SystemExit(
            f"{name} not found under --data-dir {data_dir!r} ({e}); put the python version "
            "there, or pass --download to let torchvision fetch it"
        ) from e
    val = None
    if val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = round(val_fraction * len(train))
        val = Subset(cls(data_dir, train=True, transform=plain), order[:n_val])
        train = Subset(train, order[n_val:])
    return train, val, test


def imagenet(
    data_dir: str, *, val_fraction: float = 0.0, seed: int = 0
) -> tuple[Dataset, Dataset | None, Dataset]:
    """``(train, val, test)`` from ``data_dir/train`` and ``data_dir/val`` (ImageFolder layout).

    The ILSVRC validation set is the test set, as in the papers; ``val_fraction`` carves a
    held-out part of the training images for monitoring.
    """
    tv = require_torchvision("--dataset imagenet")
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    augment = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *normalize])
    plain = T.Compose([T.Resize(256), T.CenterCrop(224), *normalize])
    folders = {part: os.path.join(data_dir, part) for part in ("train", "val")}
    for part, path in folders.items():
        if not os.path.isdir(path):
            raise SystemExit(
                f"--dataset imagenet reads ImageFolder directories; {path!r} ({part}) is missing "
                "(set --data-dir to the folder that holds train/ and val/)"
            )
    train = tv.datasets.ImageFolder(folders["train"], transform=augment)
    test = tv.datasets.ImageFolder(folders["val"], transform=plain)
    val = None
    if val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = round(val_fraction * len(train))
        val = Subset(tv.datasets.ImageFolder(folders["train"], transform=plain), order[:n_val])
        train = Subset(train, order[n_val:])
    return train, val, test
