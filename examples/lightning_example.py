"""Sparse training with Sup-tickets in PyTorch Lightning, on the bundled digits (CPU is enough).

    python examples/lightning_example.py                          # RigL 90%, 600 steps, fp32
    python examples/lightning_example.py --precision bf16-mixed --accumulate 2
    python examples/lightning_example.py --quick                  # 40 steps, a few seconds

``configure_optimizers`` returns the ``SparseOptimizer`` and the ``SupTicketsScheduler`` with
``"interval": "step"``. Lightning calls ``SparseOptimizer.step(closure)`` and steps the scheduler
once after every optimizer step, not per micro-batch under ``accumulate_grad_batches``. So
``max_steps == total_steps`` ends the run on the scheduler's ``finalize()``: the model then holds
the ultimate ticket. Needs ``pip install lightning scikit-learn``.
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
    import lightning as L
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit(f"this example needs Lightning ({e}): pip install lightning") from e


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


class SparseDigits(L.LightningModule):
    """A digits CNN trained sparse: ``--method`` at ``--sparsity`` with the Sup-tickets booster."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        torch.manual_seed(args.seed)
        self.net = digits_cnn()
        self.sparse: SparseOptimizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        a = self.args
        inner = torch.optim.SGD(self.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
        self.sparse = SparseOptimizer(
            inner, a.method, a.sparsity, update_every=a.update_every, model=self, seed=a.seed
        )
        sched = SupTicketsScheduler(
            self.sparse,
            total_steps=a.steps,  # optimizer steps, as Lightning's max_steps
            cycle_steps=a.cycle_steps,
            superpose_fraction=a.superpose_fraction,
            # phase 1 anneals to lr_low, where the cycles start; the scheduler knows its length
            base=lambda opt, phase1: CosineAnnealingLR(opt, T_max=phase1, eta_min=a.lr_low),
            lr_low=a.lr_low,
            lr_high=a.lr_high,
            explore_rate=0.1,
        )
        return {"optimizer": self.sparse, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (Trainer max_steps)")
    p.add_argument("--cycle-steps", type=int, default=30)
    p.add_argument("--superpose-fraction", type=float, default=0.2)
    p.add_argument("--update-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lr-low", type=float, default=0.01)
    p.add_argument("--lr-high", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="40 steps, 4-step cycles")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.cycle_steps, args.update_every = 40, 4, 10
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    x_train, y_train, x_test, y_test = digits()
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    module = SparseDigits(args)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        precision=args.precision,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    opt = module.sparse
    module.eval()
    with torch.no_grad():
        accuracy = (module(x_test).argmax(1) == y_test).float().mean().item()
    print(opt.report())
    print(
        f"optimizer steps {opt.step_count}, tickets {opt.tickets}, density {opt.density:.4f}, "
        f"test accuracy of the ultimate ticket {accuracy:.4f}"
    )
    return {"module": module, "optimizer": opt, "trainer": trainer, "accuracy": accuracy}


if __name__ == "__main__":
    main()
