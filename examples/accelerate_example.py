"""Sparse training with Sup-tickets under Hugging Face Accelerate, on the bundled digits (CPU).

    python examples/accelerate_example.py                         # RigL 90%, 600 steps, fp32
    python examples/accelerate_example.py --mixed-precision bf16 --accumulate 2
    python examples/accelerate_example.py --quick                 # 40 steps, a few seconds
    torchrun --standalone --nproc_per_node 2 examples/accelerate_example.py --cpu  # 2 processes

``accelerator.prepare`` wraps the ``SparseOptimizer`` in an ``AcceleratedOptimizer`` and the
``SupTicketsScheduler`` in an ``AcceleratedScheduler``, which steps the scheduler only when the
optimizer stepped (the last micro-batch under ``accumulate()``; not after a step a ``GradScaler``
skipped). The loop therefore runs until the optimizer has taken ``total_steps`` steps: then the
scheduler's last step has called ``finalize()``. With several processes the wrapper steps the
scheduler once per process per optimizer step; ``SupTicketsScheduler`` ignores a call that
repeats the last one within an iteration, so ``total_steps`` stays the optimizer steps of each
process. Needs ``pip install accelerate scikit-learn``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, TensorDataset

from sparseopt import SparseOptimizer, SupTicketsScheduler

try:
    from accelerate import Accelerator
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit(f"this example needs Accelerate ({e}): pip install accelerate") from e


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits in [0, 1]: train and test images and labels (75/25)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    images = [torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16 for a in (x_tr, x_te)]
    return images[0], torch.tensor(y_tr), images[1], torch.tensor(y_te)


def digits_cnn(width: int = 16) -> nn.Sequential:
    """Three 3x3 convolutions with BatchNorm (8x8, 4x4, 2x2 maps), global pooling, a classifier."""

    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *conv(1, width), nn.MaxPool2d(2), *conv(width, 2 * width), nn.MaxPool2d(2),
        *conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * width, 10),
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--cycle-steps", type=int, default=30)
    p.add_argument("--superpose-fraction", type=float, default=0.2)
    p.add_argument("--update-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lr-low", type=float, default=0.01)
    p.add_argument("--lr-high", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64, help="per process and micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--mixed-precision", default="no", help="no, bf16 (CPU or GPU), fp16 (GPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="40 steps, 4-step cycles")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.cycle_steps, args.update_every = 40, 4, 10
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.accumulate,
    )
    x_train, y_train, x_test, y_test = digits()
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    torch.manual_seed(args.seed)
    model = digits_cnn()
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # the same seed on every process: the same masks everywhere, no broadcast
    opt = SparseOptimizer(inner, args.method, args.sparsity, update_every=args.update_every,
                          model=model, seed=args.seed)  # fmt: skip
    sched = SupTicketsScheduler(
        opt, args.steps, args.cycle_steps, superpose_fraction=args.superpose_fraction,
        # phase 1 anneals to lr_low, where the cycles start; the scheduler knows its length
        base=lambda opt, phase1: CosineAnnealingLR(opt, T_max=phase1, eta_min=args.lr_low),
        lr_low=args.lr_low, lr_high=args.lr_high, explore_rate=0.1,
    )  # fmt: skip
    model, acc_opt, acc_sched, loader = accelerator.prepare(model, opt, sched, loader)

    model.train()
    while opt.step_count < args.steps:  # optimizer steps, skipped ones not counted
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                acc_opt.step()  # steps the SparseOptimizer on the last micro-batch only
                acc_sched.step()  # steps Sup-tickets once after each optimizer step
                acc_opt.zero_grad()
            if opt.step_count == args.steps:
                break

    model.eval()
    net = accelerator.unwrap_model(model)
    with torch.no_grad():
        pred = net(x_test.to(next(net.parameters()).device)).argmax(1).cpu()
    accuracy = (pred == y_test).float().mean().item()
    if accelerator.is_main_process:
        print(opt.report())
        print(
            f"optimizer steps {opt.step_count}, tickets {opt.tickets}, density "
            f"{opt.density:.4f}, test accuracy of the ultimate ticket {accuracy:.4f}"
        )
    return {"model": net, "optimizer": opt, "scheduler": sched, "accuracy": accuracy}


if __name__ == "__main__":
    main()
