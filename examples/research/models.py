"""The example architectures: a small digits CNN and the paper's CIFAR/ImageNet networks.

- :class:`DigitsCNN`: three 3x3 convolutions with BatchNorm and a linear classifier for the 8x8x1
  UCI digits; small enough that one training step takes a few milliseconds on one CPU core.
- :class:`SignalCNN`: three 1-D convolutions with BatchNorm and a linear classifier for the
  length-40 signals of MNIST-1D.
- :func:`vgg16`: VGG-16 with BatchNorm, CIFAR variant (13 convolutions, five max-pools down to
  1x1, one linear classifier 512 -> classes).
- :func:`resnet50`: ResNet-50 (bottleneck blocks 3-4-6-3), CIFAR variant: a 3x3 stride-1 stem and
  no max-pool, as in the sparse-training code bases (GraNet, ITOP, Sup-tickets).
- :func:`wrn28_10`: Wide ResNet 28-10 (Zagoruyko & Komodakis 2016), pre-activation basic blocks.
- :func:`imagenet_resnet50`: torchvision's ResNet-50, imported lazily; torchvision is optional.

:func:`build_model` maps the names used by ``train.py`` to these constructors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "MODELS",
    "DigitsCNN",
    "ResNet",
    "SignalCNN",
    "WideResNet",
    "build_model",
    "imagenet_resnet50",
    "resnet50",
    "vgg16",
    "wrn28_10",
]


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """A small CNN with BatchNorm for 8x8x1 images (the UCI digits).

    ``conv(1->w) -> maxpool -> conv(w->2w) -> maxpool -> conv(2w->4w) -> global average pool
    -> linear``, each convolution 3x3 (padding 1) and followed by BatchNorm and ReLU, on 8x8, 4x4
    and 2x2 maps. With ``width=16`` it has 24k weights in four sparse tensors and costs about
    0.35 MFLOPs per image: a training step of batch 64 takes a few milliseconds on one core.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width),
            nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SignalCNN(nn.Module):
    """A small 1-D CNN with BatchNorm for MNIST-1D (signals of shape ``(1, 40)``).

    ``conv5(1->w) -> conv3/2(w->w) -> conv3/2(w->w) -> flatten -> linear(10w -> classes)``, each
    convolution followed by BatchNorm and ReLU, on lengths 40, 20 and 10. The classifier sees
    positions (no global pooling), which MNIST-1D needs. With ``width=32`` it has 9.6k weights in
    four sparse tensors; a training step of batch 128 takes about a millisecond on one core.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, length: int = 40) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, k: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
                nn.BatchNorm1d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(1, width, 5, 1), *block(width, width, 3, 2), *block(width, width, 3, 2)
        )
        self.classifier = nn.Linear(width * ((length + 3) // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# --- VGG-16 ---------------------------------------------------------------------------------------
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: the configuration's convolutions, then one linear."""

    def __init__(self, config: list[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn(c_in, int(v))
                c_in = int(v)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm, CIFAR variant (32x32 in, 512 features, one linear classifier)."""
    return VGG(_VGG16, num_classes)


# --- ResNet-50 ------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """The ResNet bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand by 4, projection shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A bottleneck ResNet with a CIFAR stem (3x3, stride 1, no max-pool) or an ImageNet stem.

    The ImageNet stem (7x7 stride 2 and a 3x3 max-pool) makes the same layer structure as
    torchvision's ``resnet50``; it is used only by ``--smoke`` when torchvision is missing.
    """

    def __init__(
        self, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 10, stem: str = "cifar"
    ) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(*_conv_bn(3, 64))
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"Expected stem 'cifar' or 'imagenet', but got {stem!r}")
        stages, c_in = [], 64
        for i, n in enumerate(blocks):
            planes = 64 * 2**i
            stage = []
            for j in range(n):
                stage.append(Bottleneck(c_in, planes, stride=2 if i > 0 and j == 0 else 1))
                c_in = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))


def resnet50(num_classes: int = 10) -> ResNet:
    """ResNet-50, CIFAR variant: 3x3 stride-1 stem, no max-pool, bottlenecks 3-4-6-3."""
    return ResNet((3, 4, 6, 3), num_classes, stem="cifar")


# --- WRN-28-10 ------------------------------------------------------------------------------------
class WideBasic(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3 twice, optional dropout in between."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet ``depth``-``widen`` for 32x32 inputs (Zagoruyko & Komodakis 2016)."""

    def __init__(
        self, depth: int = 28, widen: int = 10, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Expected depth = 6n + 4, but got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        blocks, c_in = [], widths[0]
        for i, c_out in enumerate(widths[1:]):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBasic(c_in, c_out, stride, dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.Sequential(nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.bn(self.blocks(self.conv1(x)))))


def wrn28_10(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10: 4 wide basic blocks per stage, widths 160, 320, 640."""
    return WideResNet(28, 10, num_classes, dropout)


# --- ImageNet -------------------------------------------------------------------------------------
def imagenet_resnet50(num_classes: int = 1000, *, fallback: bool = False) -> nn.Module:
    """torchvision's ResNet-50 (random init), imported lazily.

    Args:
        num_classes: classifier outputs.
        fallback: without torchvision, return :class:`ResNet` with the ImageNet stem (the same
            layers) instead of exiting; ``--smoke`` uses it so that it needs no torchvision.
    """
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except ImportError as e:
        if fallback:
            return ResNet((3, 4, 6, 3), num_classes, stem="imagenet")
        raise SystemExit(
            "the ImageNet ResNet-50 comes from torchvision, which is not importable here "
            f"({e}); install the torchvision build that matches your torch "
            "(pip install torchvision), or use --smoke"
        ) from e
    return tv_resnet50(weights=None, num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "vgg16": vgg16,
    "resnet50": resnet50,
    "wrn-28-10": wrn28_10,
}


def build_model(
    name: str, dataset: str, num_classes: int, *, dropout: float = 0.0, fallback: bool = False
) -> nn.Module:
    """The model ``name`` for ``dataset``: ``resnet50`` on ImageNet is torchvision's."""
    if dataset == "imagenet":
        if name != "resnet50":
            raise SystemExit(f"--dataset imagenet supports --model resnet50, not {name!r}")
        return imagenet_resnet50(num_classes, fallback=fallback)
    if name == "digits-cnn":
        if dataset != "digits":
            raise SystemExit("--model digits-cnn is for --dataset digits (8x8x1 images)")
        return DigitsCNN(num_classes)
    if dataset == "digits":
        raise SystemExit(f"--dataset digits (8x8x1 images) needs --model digits-cnn, not {name!r}")
    if name == "wrn-28-10":
        return wrn28_10(num_classes, dropout)
    return MODELS[name](num_classes)
