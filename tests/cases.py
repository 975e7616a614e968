"""Shared test tables and helpers, modelled on torch's ``common_optimizers.OptimizerInfo``.

``CASES`` lists inner optimizers as ``OptimCase`` entries: an id, a factory ``make(params)`` and
flags that tests use to pick sensible companions (a momentum-cycling scheduler only where the
optimizer has a momentum or betas to cycle, GradScaler comparisons, the re-mask fallback).

Besides: small models and batches from a seed, and ``assert_exactly_equal``, the one exact
comparison of nested state (state dicts, checkpoints, snapshots) that the tests share.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

__all__ = [
    "CASES",
    "FUSED_CASES",
    "OptimCase",
    "assert_exactly_equal",
    "batches",
    "case_params",
    "erk_densities",
    "first_difference",
    "get_case",
    "inner_state_tensors",
    "make_convnet",
    "make_mlp",
    "make_model",
    "mlp",
    "train_step",
]


@dataclass(frozen=True)
class OptimCase:
    """One inner-optimizer configuration.

    Attributes:
        id: pytest id.
        make: ``make(params) -> torch.optim.Optimizer``.
        keeps_zeros: the optimizer keeps weight and state exactly 0 where both are 0 and the
            gradient is 0 (``SparseOptimizer``'s zero-preserving list); ``False`` exercises the
            re-mask-after-every-step fallback.
        cycles_momentum: ``defaults`` has a ``momentum`` (> 0) or ``betas`` that ``CyclicLR`` and
            ``OneCycleLR`` may cycle.
        foreach: built with ``foreach=True``.
        fused: built with ``fused=True``.
    """

    id: str
    make: Callable[[Iterable], torch.optim.Optimizer]
    keeps_zeros: bool = True
    cycles_momentum: bool = False
    foreach: bool = False
    fused: bool = False

    def __repr__(self) -> str:
        return self.id


def _variants(
    name: str,
    cls: type[torch.optim.Optimizer],
    kwargs: dict,
    *,
    fused: bool,
    keeps_zeros: bool = True,
    cycles_momentum: bool = False,
) -> list[OptimCase]:
    """The ``foreach=False``, ``foreach=True`` (and ``fused=True``) variants of one config."""
    impls = [("forloop", {"foreach": False}), ("foreach", {"foreach": True})]
    if fused:
        impls.append(("fused", {"fused": True}))
    out = []
    for impl, extra in impls:
        kw = {**kwargs, **extra}
        out.append(
            OptimCase(
                id=f"{name}-{impl}",
                make=lambda params, cls=cls, kw=kw: cls(params, **kw),
                keeps_zeros=keeps_zeros,
                cycles_momentum=cycles_momentum,
                foreach=impl == "foreach",
                fused=impl == "fused",
            )
        )
    return out


_O = torch.optim
CASES: list[OptimCase] = [
    *_variants("sgd", _O.SGD, {"lr": 0.05}, fused=True),
    *_variants("sgd_momentum", _O.SGD, {"lr": 0.05, "momentum": 0.9}, fused=True,
               cycles_momentum=True),
    *_variants("sgd_nesterov", _O.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True},
               fused=True, cycles_momentum=True),
    *_variants("sgd_wd", _O.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
               fused=True, cycles_momentum=True),
    *_variants("adam", _O.Adam, {"lr": 1e-2}, fused=True, cycles_momentum=True),
    *_variants("adam_amsgrad_wd", _O.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2},
               fused=False, cycles_momentum=True),
    *_variants("adamw", _O.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, fused=True,
               cycles_momentum=True),
    *_variants("rmsprop", _O.RMSprop, {"lr": 1e-2}, fused=False),
    *_variants("rmsprop_centered_momentum", _O.RMSprop,
               {"lr": 1e-2, "centered": True, "momentum": 0.9}, fused=False,
               cycles_momentum=True),
    *_variants("adagrad", _O.Adagrad, {"lr": 0.1}, fused=True),
    *_variants("nadam_wd", _O.NAdam, {"lr": 1e-2, "weight_decay": 1e-2}, fused=False,
               cycles_momentum=True),
    *_variants("nadam_decoupled", _O.NAdam,
               {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}, fused=False,
               cycles_momentum=True),
    *_variants("radam", _O.RAdam, {"lr": 1e-2, "weight_decay": 1e-2}, fused=False,
               cycles_momentum=True),
    *_variants("radam_decoupled", _O.RAdam,
               {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}, fused=False,
               cycles_momentum=True),
    *_variants("adadelta", _O.Adadelta, {"lr": 1.0, "weight_decay": 1e-2}, fused=False),
    # Not zero-preserving: Adamax's infinity norm becomes ``eps`` at a zero gradient, and a
    # nonzero initial accumulator is nonzero Adagrad state. Both need the re-mask fallback.
    *_variants("adamax", _O.Adamax, {"lr": 1e-2}, fused=False, keeps_zeros=False,
               cycles_momentum=True),
    *_variants("adagrad_init_acc", _O.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1},
               fused=False, keeps_zeros=False),
]  # fmt: skip

FUSED_CASES = [c for c in CASES if c.fused]


def get_case(case_id: str) -> OptimCase:
    return next(c for c in CASES if c.id == case_id)


def case_params(cases: Sequence[OptimCase] = CASES) -> list:
    """``pytest.param`` per case, with the case id as the test id."""
    return [pytest.param(c, id=c.id) for c in cases]


# --- models and data --------------------------------------------------------------------------
def mlp(
    *widths: int,
    bias: bool = True,
    batchnorm: bool = False,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """``nn.Sequential`` of ``Linear`` layers ``widths[0] -> widths[1] -> ... -> widths[-1]``;
    every layer but the last is followed by ``BatchNorm1d`` (with ``batchnorm``) and ``ReLU``.

    ``mlp(8, 16, 4)`` is ``nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))``, built
    in that order, so it draws the same weights from the same generator state. With ``seed``
    they are drawn after ``torch.manual_seed(seed)`` inside ``fork_rng`` (the global CPU
    generator is left as it was); without, from the global generator. They are drawn in float32
    on the CPU and then moved to ``dtype`` and ``device`` (like ``.double()`` or ``.to(device)``
    after building), so a seed gives the same numbers everywhere.
    """
    if len(widths) < 2:
        raise ValueError(f"Expected at least two widths, but got {widths}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return mlp(*widths, bias=bias, batchnorm=batchnorm, dtype=dtype, device=device)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(widths) - 2:  # not the last layer
            if batchnorm:
                layers.append(nn.BatchNorm1d(n_out))
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def make_mlp(seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """A three-layer MLP 8 -> 16 -> 16 -> 4, initialised from ``seed`` on the CPU, on ``device``."""
    return mlp(8, 16, 16, 4, seed=seed, device=device)


def make_convnet(seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Two 3x3 convs with BatchNorm and a linear head, on 3x6x6 inputs, from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 4),
        ).to(device)


def make_model(kind: str, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    return {"mlp": make_mlp, "convnet": make_convnet}[kind](seed, device)


def batches(
    kind: str, n: int, seed: int = 0, batch_size: int = 8, device: torch.device | str = "cpu"
) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed (input, label) batches for a ``make_model(kind)`` model, drawn on the CPU."""
    g = torch.Generator().manual_seed(1000 + seed)
    shape = (batch_size, 8) if kind == "mlp" else (batch_size, 3, 6, 6)
    return [
        (
            torch.randn(shape, generator=g).to(device),
            torch.randint(0, 4, (batch_size,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch, scaler=None) -> Tensor:
    """One ``zero_grad / forward / backward / step`` (through ``scaler`` when given)."""
    x, y = batch
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.detach()


# --- references ---------------------------------------------------------------------------------
def inner_state_tensors(inner: torch.optim.Optimizer, p: Tensor) -> dict[str, Tensor]:
    """The inner optimizer's state tensors of ``p``'s shape (momentum, exp_avg, sum, ...)."""
    return {
        k: v
        for k, v in inner.state.get(p, {}).items()
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape == p.shape
    }


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Independent Erdős–Rényi-Kernel densities (Evci et al. 2020), dense layers capped at 1.

    Density of layer ``l`` is ``eps * sum(shape_l) / prod(shape_l)`` with ``eps`` chosen so that
    the total active count is ``density * N``; a layer that would exceed 1 becomes dense and the
    budget is re-solved.
    """
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        if not free:
            return [1.0] * len(shapes)
        budget = density * sum(numels) - sum(numels[i] for i in dense)
        eps = budget / sum(raw[i] * numels[i] for i in free)
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        top = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == top)


# --- exact comparison ---------------------------------------------------------------------------
def first_difference(a: Any, b: Any, path: str = "value", *, strict: bool = False) -> str | None:
    """Where nested ``a`` and ``b`` first differ, as a message that names the path; ``None`` if
    they are exactly equal.

    Walks dicts, lists and tuples; tensors must match in dtype, shape and device type and be
    ``torch.equal`` (so a NaN never equals a NaN); anything else by ``==``. A tensor never
    equals a non-tensor. By default dict keys compare as sets and a list may equal a tuple;
    ``strict=True`` also wants the same types (``type(a) is type(b)``) and the same key order.
    """
    if strict and type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype:
            return f"{path}: dtype {a.dtype} vs {b.dtype}"
        if a.shape != b.shape:
            return f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.device.type != b.device.type:
            return f"{path}: device {a.device} vs {b.device}"
        return None if torch.equal(a, b) else f"{path}: values differ"
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if (list(a) != list(b)) if strict else (a.keys() != b.keys()):
            return f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            if (diff := first_difference(a[k], b[k], f"{path}[{k!r}]", strict=strict)) is not None:
                return diff
        return None
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        if not (isinstance(a, list | tuple) and isinstance(b, list | tuple)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (diff := first_difference(x, y, f"{path}[{i}]", strict=strict)) is not None:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def assert_exactly_equal(a: Any, b: Any, path: str = "value", *, strict: bool = False) -> None:
    """Assert that nested ``a`` and ``b`` are exactly equal (see ``first_difference``)."""
    diff = first_difference(a, b, path, strict=strict)
    assert diff is None, diff
