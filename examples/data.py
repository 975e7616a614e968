"""Data for the examples: the bundled UCI digits, random tensors for ``--smoke``, CIFAR, ImageNet.

Nothing here downloads anything unless asked to (``download=True``). scikit-learn provides the
digits (1,797 8x8 images, bundled with the package); torchvision, which is optional, provides CIFAR
and ImageNet and is imported only inside those loaders, with a clear message when it is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "DATASETS",
    "DigitsSplit",
    "cifar",
    "digits_split",
    "imagenet",
    "require_torchvision",
    "synthetic",
]

# name -> (input shape of one example, number of classes)
DATASETS: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
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
