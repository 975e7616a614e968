"""Shared helpers of the benchmarks: parameter sets shaped like real models, timing, tables.

Nothing here is part of the library. Every benchmark script imports this module by path
(``benchmarks/`` is not a package), prints markdown tables and can write JSON.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SmallCNN",
    "bandwidth",
    "machine_info",
    "make_params",
    "markdown_table",
    "median",
    "param_set",
    "publish",
    "reachable_tensors",
    "resnet50",
    "storage_bytes",
    "storages",
    "time_interleaved",
    "transformer_shapes",
    "write_json",
]

# --- models and parameter sets -------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN: 4 conv+BN+ReLU blocks, 2 max-pools, global pool, one Linear (0.29M)."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50`` layout (ImageNet stem, [3, 4, 6, 3] bottlenecks): 25,557,032
    parameters, 161 tensors (54 of them ``ndim >= 2``). Written here: torchvision is optional."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for b in range(blocks):
                stage.append(_Bottleneck(cin, width, stride if b == 0 else 1))
                cin = 4 * width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50() -> ResNet50:
    return ResNet50()


def transformer_shapes(
    d_model: int = 768, layers: int = 12, vocab: int = 20000, mlp: int = 4
) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-like stack of Linear layers (no attention math is needed here).

    Per block: fused QKV (3d x d) + bias, output (d x d) + bias, MLP (4d x d, d x 4d) + biases, two
    LayerNorms; plus a token embedding (vocab x d) and a final LayerNorm. The default is 100.3M
    parameters, 85.0M of them in the blocks' weight matrices.
    """
    d = d_model
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (mlp * d, d), (mlp * d,), (d, mlp * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def param_set(name: str) -> list[tuple[int, ...]]:
    """Shapes of a named parameter set: ``cnn``, ``resnet50``, ``transformer`` or ``tiny``."""
    if name == "cnn":
        return [tuple(p.shape) for p in SmallCNN().parameters()]
    if name == "resnet50":
        return [tuple(p.shape) for p in ResNet50().parameters()]
    if name == "transformer":
        return transformer_shapes()
    if name == "tiny":  # for the smoke tests
        return [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,)]
    raise ValueError(f"unknown parameter set {name!r}")


def make_params(shapes: Iterable[Sequence[int]], seed: int = 0) -> list[nn.Parameter]:
    """Parameters of the given shapes with N(0, 0.02) values and N(0, 1e-3) gradients.

    Drawn on the CPU (the same numbers on every device), then moved to :data:`DEVICE`.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = nn.Parameter(torch.empty(shape).normal_(0, 0.02, generator=g).to(DEVICE))
        p.grad = torch.empty(shape).normal_(0, 1e-3, generator=g).to(DEVICE)
        out.append(p)
    return out


# --- device --------------------------------------------------------------------------------------
DEVICE = torch.device("cpu")
"""Where the benchmarks put parameters, models and data: ``--device`` (:func:`use_device`)."""


def add_device_arg(ap: Any) -> None:
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")


def use_device(name: str) -> torch.device:
    """Set :data:`DEVICE`; exit with a clear message if it is not available."""
    global DEVICE
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"Expected --device {name} to be available, but it is not")
    DEVICE = device
    return device


def clock() -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


# --- timing --------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``repeats`` rounds of one call each.

    The order inside a round rotates from round to round, so that no variant always runs after
    the same neighbour (cache state, frequency). Returns the per-call times in seconds.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def bandwidth(numel: int = 1 << 25, repeats: int = 10) -> float:
    """Memory bandwidth in bytes/s from an in-place ``a.add_(b)`` on float32: 12 bytes per
    element (read ``a`` and ``b``, write ``a``), the median of ``repeats`` calls.

    In place, like the masking it is the floor of (``grad.mul_(mask)``): an out-of-place
    ``torch.add(a, b, out=c)`` also reads ``c`` into the cache before writing it (write-allocate),
    so counting 12 bytes for it understates the bandwidth by about a quarter.
    """
    a = torch.zeros(numel, device=DEVICE)
    b = torch.full((numel,), 1e-3, device=DEVICE)
    a.add_(b)
    ts = []
    for _ in range(repeats):
        t0 = clock()
        a.add_(b)
        ts.append(clock() - t0)
    return 12 * numel / median(ts)


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    return sum(storages(tensors).values())


def reachable_tensors(root: Any, skip: Iterable[Any] = ()) -> list[Tensor]:
    """Every tensor reachable from ``root`` through attributes, dicts, lists, tuples and sets,
    not descending into the objects in ``skip`` (compared by identity)."""
    seen = {id(s) for s in skip}
    out: list[Tensor] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            out.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return out


def storages(tensors: Iterable[Tensor]) -> dict[tuple[int, str], int]:
    """``{(data_ptr, device): nbytes}`` of the distinct storages behind ``tensors``."""
    return {
        (t.untyped_storage().data_ptr(), str(t.device)): t.untyped_storage().nbytes()
        for t in tensors
    }


# --- reporting -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(DEVICE)
        + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""),
        "python": platform.python_version(),
        "loadavg_1min": round(load, 2),
    }


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v == 0 or math.isnan(v):
                return f"{v:g}"
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 1:
                return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)


def publish(text: str, cmd: str, json_path: str | None, **results: Any) -> dict[str, Any]:
    """Print a benchmark's markdown, write it with ``results`` and the machine to ``json_path``
    (if given), and return that payload."""
    print(text, flush=True)
    out = {"machine": machine_info(), "command": cmd, **results, "markdown": text}
    write_json(json_path, out)
    return out


def header(title: str, argv: Sequence[str] | None, threads: int | str) -> str:
    info = machine_info()
    cmd = " ".join(argv) if argv is not None else ""
    return (
        f"## {title}\n\n"
        f"- command: `.venv/bin/python {cmd}`\n"
        f"- machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"threads {threads}, 1-min load {info['loadavg_1min']}, {info['date']}\n"
        f"- device: {info['device']}\n"
    )
