"""Helpers shared by ``demo.py`` and ``train.py`` of ``examples/research/``.

- :func:`evaluate`: accuracy, NLL (``torch.nn.functional.cross_entropy``) and ECE (torchmetrics'
  ``MulticlassCalibrationError``, 15 bins, L1), in eval mode.
- :class:`StepDecay`: the paper's learning-rate factor per optimizer step (linear warm-up, then
  x ``gamma`` at each milestone), a picklable callable for ``LambdaLR`` whose state dict holds
  only plain data, so checkpoints load with ``weights_only=True``.
- :func:`mean_std`: the mean and the sample standard deviation (0 for one value).
- :func:`deploy` and :func:`format_deploy`: write the compact file of a trained model
  (``sparseopt.save_sparse``), check that it loads back exactly, and time the dense model against
  its ``sparseopt.to_sparse_inference`` copy at batch 1, interleaved.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseopt import load_sparse, save_sparse, to_sparse_inference

__all__ = [
    "StepDecay",
    "calibration_error",
    "deploy",
    "evaluate",
    "format_deploy",
    "mean_std",
    "predict",
]


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


def _median_ms(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():  # warm-up
        f()
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def deploy(
    model: nn.Module,
    path: str,
    example_input: Tensor,
    masks: Mapping[Any, Tensor] | None = None,
    repeats: int = 50,
) -> dict[str, Any]:
    """Write the compact file of ``model`` to ``path`` and measure what deploying it gains.

    Args:
        model: the trained model (its inactive weights exactly 0).
        path: where to write the compact checkpoint.
        example_input: one input of batch size 1, on the model's device.
        masks: ``opt.masks`` to keep the exact masks (active zeros included); ``None``: the
            nonzeros.
        repeats: timed calls of each model (interleaved).

    Returns:
        ``dense_bytes`` (``torch.save`` of the state_dict), ``compact_bytes``, ``size_ratio``,
        ``dense_ms`` and ``sparse_ms`` (median batch-1 latency), ``speedup``, ``converted`` (the
        layers that compute sparse) and ``format``.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    dense_bytes = buffer.getbuffer().nbytes
    info = save_sparse(model, path, masks=masks)
    check = copy.deepcopy(model)
    load_sparse(check, path)
    for (name, a), b in zip(check.state_dict().items(), model.state_dict().values(), strict=True):
        if not torch.equal(a, b):
            raise RuntimeError(f"the compact file does not reproduce {name!r}")
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fast = to_sparse_inference(model, batch_size=example_input.shape[0])
    with torch.inference_mode():
        ms = _median_ms(
            {"dense": lambda: model(example_input), "sparse": lambda: fast(example_input)}, repeats
        )
    model.train(was_training)
    return {
        "dense_bytes": dense_bytes,
        "compact_bytes": info["file_bytes"],
        "size_ratio": info["file_bytes"] / dense_bytes,
        "dense_ms": ms["dense"],
        "sparse_ms": ms["sparse"],
        "speedup": ms["dense"] / ms["sparse"],
        "converted": fast.sparse_inference_report.converted,
        "format": info["format"],
    }


def format_deploy(result: Mapping[str, Any], path: str = "") -> str:
    """Two lines: the sizes, and the batch-1 latencies with the converted layers."""
    where = f" ({path}, {result['format']})" if path else ""
    converted = ", ".join(result["converted"]) or "none: every layer stayed dense"
    return (
        f"compact file{where}: {result['compact_bytes'] / 1e6:.3f} MB vs dense torch.save "
        f"{result['dense_bytes'] / 1e6:.3f} MB ({result['size_ratio']:.3f}x)\n"
        f"batch-1 latency: dense {result['dense_ms']:.3f} ms, sparse inference "
        f"{result['sparse_ms']:.3f} ms ({result['speedup']:.2f}x); sparse layers: {converted}"
    )
