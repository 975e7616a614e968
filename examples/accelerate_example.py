"""Sparse training with Sup-tickets under Hugging Face Accelerate, on the bundled digits (CPU).

    python examples/accelerate_example.py                         # RigL 90%, 600 steps, fp32
    python examples/accelerate_example.py --mixed-precision bf16 --accumulate 2
    torchrun --standalone --nproc_per_node 2 examples/accelerate_example.py --cpu  # 2 processes

``accelerator.prepare(model, opt, sched, loader)`` wraps the ``SparseOptimizer`` in an
``AcceleratedOptimizer`` and the ``SupTicketsScheduler`` in an ``AcceleratedScheduler``. What
that wrapper does (accelerate 1.15, ``accelerate/scheduler.py``) and how this script keeps the
schedule right:

- under ``accumulate()`` it steps the scheduler only when the optimizer stepped (the last
  micro-batch), and not at all after a step that a ``GradScaler`` skipped (fp16 on a GPU). The
  loop therefore runs until the optimizer has taken ``total_steps`` steps, not for a fixed number
  of batches: then the scheduler has been stepped ``total_steps`` times as well and its last step
  called ``finalize()``.
- with more than one process and ``split_batches=False`` it steps the scheduler once per process
  on every optimizer step (it assumes a schedule written for one process). Sup-tickets counts
  optimizer steps: ``SupTicketsScheduler`` ignores a call that repeats the last one within the
  same iteration (no backward, ``zero_grad`` or optimizer step in between), so the repeats are
  harmless and ``total_steps`` stays the number of optimizer steps of each process.

Needs ``pip install accelerate scikit-learn`` (the ``test`` extra has both).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from data import digits_split
from models import DigitsCNN
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, TensorDataset

from sparseopt import SparseOptimizer, SupTicketsScheduler

try:
    from accelerate import Accelerator
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit(f"this example needs Accelerate ({e}): pip install accelerate") from e


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.accumulate,
    )
    data = digits_split(seed=0)
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # the same seed on every process: the same masks everywhere, no broadcast
    opt = SparseOptimizer(
        inner, args.method, args.sparsity, update_every=args.update_every, model=model,
        seed=args.seed,
    )  # fmt: skip
    tickets = math.floor(args.superpose_fraction * args.steps / args.cycle_steps + 1e-9)
    base = CosineAnnealingLR(opt, T_max=args.steps - tickets * args.cycle_steps,
                             eta_min=args.lr_low)  # fmt: skip
    sched = SupTicketsScheduler(
        opt, args.steps, args.cycle_steps, base=base, superpose_fraction=args.superpose_fraction,
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
    device = next(net.parameters()).device
    with torch.no_grad():
        pred = net(data.x_test.to(device)).argmax(1).cpu()
    accuracy = (pred == data.y_test).float().mean().item()
    if accelerator.is_main_process:
        print(opt.report())
        print(
            f"optimizer steps {opt.step_count}, tickets {opt.tickets}, density "
            f"{opt.density:.4f}, test accuracy of the ultimate ticket {accuracy:.4f}"
        )
    return {"model": net, "optimizer": opt, "scheduler": sched, "accuracy": accuracy}


if __name__ == "__main__":
    main()
