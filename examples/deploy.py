"""Deploy a trained sparse model: the compact file, and dense vs sparse latency at batch 1.

``deploy(model, path, example_input)`` writes ``sparseopt.save_sparse``'s compact checkpoint,
reads it back into a copy to check that the round trip is exact, converts a copy with
``sparseopt.to_sparse_inference`` and times both at batch 1, interleaved. ``examples/train.py
--export PATH`` calls it after training; any other script can::

    from deploy import deploy, format_deploy
    print(format_deploy(deploy(model, "runs/model.sparse", example_input, masks=opt.masks)))
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sparseopt import load_sparse, save_sparse, to_sparse_inference

__all__ = ["deploy", "format_deploy"]


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
