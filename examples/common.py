"""Helpers shared by ``examples/demo.py`` and ``examples/train.py``.

- :func:`evaluate`: accuracy, NLL (``torch.nn.functional.cross_entropy``) and ECE (torchmetrics'
  ``MulticlassCalibrationError``, 15 bins, L1), in eval mode.
- :class:`StepDecay`: the paper's learning-rate factor per optimizer step (linear warm-up, then
  x ``gamma`` at each milestone), a picklable callable for ``LambdaLR`` whose state dict holds
  only plain data, so checkpoints load with ``weights_only=True``.
- :func:`mean_std`: the mean and the sample standard deviation (0 for one value).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StepDecay", "calibration_error", "evaluate", "mean_std", "predict"]


def calibration_error(probs: Tensor, labels: Tensor, num_classes: int) -> float:
    """Expected calibration error (top-label, 15 equal-width bins, L1) with torchmetrics."""
    try:
        from torchmetrics.classification import MulticlassCalibrationError
    except ImportError as e:
        raise SystemExit(
            f"the examples compute ECE with torchmetrics ({e}): pip install 'sparseopt[examples]'"
        ) from e
    metric = MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")
    return float(metric(probs, labels))


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of every batch, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in batches:
            logits.append(model(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """``{"accuracy", "nll", "ece", "logits"}`` on ``batches``: accuracy and ECE as fractions."""
    logits, labels = predict(model, batches, device)
    return metrics_from_logits(logits, labels, num_classes)


def metrics_from_logits(logits: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, NLL and ECE of precomputed logits."""
    probs = logits.double().softmax(-1)
    return {
        "accuracy": (logits.argmax(-1) == labels).double().mean().item(),
        "nll": F.cross_entropy(logits.double(), labels).item(),
        "ece": calibration_error(probs.float(), labels, num_classes),
        "logits": logits,
    }


class StepDecay:
    """Learning-rate factor of optimizer step ``t`` (from 0): warm-up, then step decay.

    ``factor(t) = min(1, (t + 1) / warmup_steps) * gamma ** #{m in milestones : m <= t}``, so the
    rate drops right after optimizer step ``m``. Use it with ``LambdaLR``, stepped once per
    iteration.
    """

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1, warmup_steps: int = 0):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, t: int) -> float:
        warm = min(1.0, (t + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return warm * self.gamma ** sum(1 for m in self.milestones if m <= t)

    def __repr__(self) -> str:
        return (
            f"StepDecay(milestones={self.milestones}, gamma={self.gamma}, "
            f"warmup_steps={self.warmup_steps})"
        )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the deviation of one value is 0."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
