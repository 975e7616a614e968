"""``SparseOptimizer`` against the other ways of training with a fixed sparse mask in PyTorch.

Same model, same data, same inner optimizer (SGD, momentum 0.9, weight decay 5e-4, foreach),
same 90% sparsity over every conv/linear weight, in the same run, one iteration of each variant
per round (forward + cross-entropy + backward + step), after warm-up:

- ``dense``: no sparsity at all (the reference).
- ``sparseopt``: ``SparseOptimizer(sgd, "static", 0.9, distribution="uniform")``: masks the
  gradients inside ``step()``.
- ``prune``: ``torch.nn.utils.prune.custom_from_mask`` on every weight: a forward pre-hook
  computes ``weight = weight_orig * weight_mask`` every forward (float mask buffer).
- ``parametrize``: ``torch.nn.utils.parametrize.register_parametrization(m, "weight",
  FakeSparsity(mask))``, the mechanism of ``torch.ao.pruning`` (float mask, as its sparsifier
  makes it).
- ``research loop``: a re-implementation of the research code's per-step masking
  (sparse_learning / ITOP / GraNet / Sup-tickets ``Masking.step``, notes §1): after
  ``optimizer.step()``, for each name in a Python dict of float masks,
  ``weight.data *= mask`` and ``optimizer.state[weight]["momentum_buffer"] *= mask``.

Memory: the persistent bytes each variant adds per sparse weight, measured from the tensors
(all tensors reachable from the model, the optimizer and the masks dict, distinct storages)
minus the same for the dense variant.

Models: ``cnn`` (the small CNN, batch 64 of 32x32), ``resnet50`` (ResNet-50 at batch 8 of 64x64),
``resnet50-b2`` (ResNet-50 at batch 2 of 32x32: little compute per weight, so the per-weight work
of each variant, which is what differs between them, is a larger share of the iteration).

    .venv/bin/python benchmarks/peers.py --threads 1,2 --json runs/peers.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn.utils import parametrize, prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt import SparseOptimizer

VARIANTS = ("dense", "sparseopt", "prune", "parametrize", "research loop")


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)


def _weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module whose ``weight`` is sparse (``ndim >= 2``)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2
    ]


def _random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in _weights(model):
        w = m.weight
        mask = torch.zeros(w.numel())
        mask[torch.randperm(w.numel(), generator=g)[: round(density * w.numel())]] = 1.0
        out[name] = mask.view_as(w)
    return out


class ResearchMasking:
    """The research code's loop: optimizer.step(), then re-mask weights and momentum by name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: dict) -> None:
        self.model, self.optimizer = model, optimizer
        self.masks = {f"{n}.weight": m for n, m in masks.items()}
        self.apply_mask()

    def apply_mask(self) -> None:
        for name, tensor in self.model.named_parameters():
            if name in self.masks:
                tensor.data *= self.masks[name]
                state = self.optimizer.state.get(tensor, {})
                if "momentum_buffer" in state and state["momentum_buffer"] is not None:
                    state["momentum_buffer"] *= self.masks[name]

    def step(self) -> None:
        self.optimizer.step()
        self.apply_mask()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def build(variant: str, base: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, Any]:
    model = copy.deepcopy(base)
    if variant == "dense":
        return model, _sgd(model.parameters())
    if variant == "sparseopt":
        return model, SparseOptimizer(
            _sgd(model.parameters()), "static", 0.9, distribution="uniform", model=model, seed=0
        )
    if variant == "prune":
        for name, m in _weights(model):
            prune.custom_from_mask(m, "weight", masks[name].clone())
        return model, _sgd(model.parameters())
    if variant == "parametrize":
        for name, m in _weights(model):
            with torch.no_grad():
                m.weight.mul_(masks[name])
            parametrize.register_parametrization(m, "weight", FakeSparsity(masks[name].clone()))
        return model, _sgd(model.parameters())
    if variant == "research loop":
        masks_copy = {k: v.clone() for k, v in masks.items()}
        opt = _sgd(model.parameters())
        return model, ResearchMasking(model, opt, masks_copy)
    raise ValueError(variant)


def model_for(size: str) -> tuple[nn.Module, tuple[int, ...]]:
    if size == "tiny":
        return C.SmallCNN(8), (4, 3, 32, 32)
    if size == "cnn":
        return C.SmallCNN(), (64, 3, 32, 32)
    if size == "resnet50":
        return C.resnet50(), (8, 3, 64, 64)
    if size == "resnet50-b2":  # weight-bound: little compute per weight
        return C.resnet50(), (2, 3, 32, 32)
    raise ValueError(f"unknown model {size!r}")


def persistent_bytes(model: nn.Module, opt: Any) -> int:
    return sum(C.storages(C.reachable_tensors([model, opt])).values())


def bench(size: str, repeats: int, warmup: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    base, shape = model_for(size)
    masks = _random_masks(base, 0.1)
    n_sparse = sum(m.numel() for m in masks.values())
    x = torch.randn(shape)
    y = torch.randint(0, base.fc.out_features, (shape[0],))
    built = {v: build(v, base, masks) for v in VARIANTS}

    def iteration(model: nn.Module, opt: Any) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run

    times = C.time_interleaved({v: iteration(*built[v]) for v in VARIANTS}, repeats, warmup)
    for v in ("sparseopt", "research loop", "parametrize", "prune"):  # sanity: they are sparse
        nnz = sum(int((m.weight != 0).sum()) for _, m in _weights(built[v][0]))
        assert nnz <= 0.1 * n_sparse + len(masks), (v, nnz, n_sparse)
    dense_bytes = persistent_bytes(*built["dense"])
    t_dense = C.median(times["dense"])
    t_sparseopt = C.median(times["sparseopt"])
    rows = []
    for v in VARIANTS:
        t = C.median(times[v])
        rows.append(
            {
                "model": size,
                "batch": "x".join(map(str, shape)),
                "variant": v,
                "ms/iter": 1e3 * t,
                "vs dense": t / t_dense,
                "paired vs dense": C.median(
                    [a / b for a, b in zip(times[v], times["dense"], strict=True)]
                ),
                "vs sparseopt": t / t_sparseopt,
                "paired vs sparseopt [IQR]": _iqr(
                    [a / b for a, b in zip(times[v], times["sparseopt"], strict=True)]
                ),
                "extra B/sparse weight": (persistent_bytes(*built[v]) - dense_bytes) / n_sparse,
            }
        )
    del built
    gc.collect()
    return rows


def _iqr(xs: Sequence[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--sizes", default="cnn,resnet50,resnet50-b2", help="models: cnn, resnet50, resnet50-b2"
    )
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--big-repeats", type=int, default=20, help="repeats for resnet50")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--quick", action="store_true", help="a tiny CNN (smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.threads = "tiny", 2, 1, "1"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cmd = "benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    before = torch.get_num_threads()
    rows = []
    try:
        for nt in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(nt)
            for size in args.sizes.split(","):
                reps = args.big_repeats if size == "resnet50" else args.repeats
                for r in bench(size.strip(), reps, args.warmup):
                    r["threads"] = nt
                    rows.append(r)
    finally:
        torch.set_num_threads(before)
    text = C.header("Peers: time per training iteration and memory", cmd.split(), args.threads)
    text += "\n" + C.markdown_table(
        rows,
        [
            "threads",
            "model",
            "batch",
            "variant",
            "ms/iter",
            "vs dense",
            "paired vs dense",
            "vs sparseopt",
            "paired vs sparseopt [IQR]",
            "extra B/sparse weight",
        ],
    )
    return C.publish(text, cmd, args.json, rows=rows)


if __name__ == "__main__":
    main()
