"""The sparseopt demo: sparse training with Sup-tickets on the real UCI digits, on CPU, in seconds.

It trains a small MLP with BatchNorm on scikit-learn's bundled digits (1,797 8x8 images, nothing
is downloaded) at 90% sparsity with RigL, with the Sup-tickets booster in the last 10% of training,
and prints the test accuracy of the last live ticket and of the superposed "ultimate ticket",
followed by the optimizer's per-layer report.

    python examples/demo.py                      # RigL, 90% sparsity, Sup-tickets
    python examples/demo.py --method set --sparsity 0.95 --seeds 0 1 2
    python examples/demo.py --no-sup-tickets     # the base method alone
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler


def load_digits_split(seed: int = 0, test_fraction: float = 0.3):
    """Train/test tensors of the digits; the split is stratified and fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the examples extra installs it
        raise SystemExit("the demo needs scikit-learn: pip install 'sparseopt[examples]'") from e
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te)


def make_mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test accuracy and negative log-likelihood, in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def run(args: argparse.Namespace, seed: int) -> dict:
    x_tr, y_tr, x_te, y_te = load_digits_split()
    torch.manual_seed(seed)
    model = make_mlp(args.width)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    total = args.epochs * steps_per_epoch
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = SparseOptimizer(
        inner,
        method=args.method,
        sparsity=args.sparsity,
        update_every=args.update_every,
        total_steps=total,
        model=model,
        seed=seed,
    )
    sched = None
    if args.sup_tickets:
        cycle = args.cycle_epochs * steps_per_epoch
        tickets = math.floor(0.1 * total / cycle)
        phase1 = total - tickets * cycle
        # The paper's phase-1 schedule: x0.1 at 1/2 and 3/4 of phase 1, ending at lr_low.
        base = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[phase1 // 2, 3 * phase1 // 4], gamma=0.1
        )
        sched = SupTicketsScheduler(
            opt,
            total_steps=total,
            cycle_steps=cycle,
            base=base,
            lr_low=args.lr / 100,
            lr_high=args.lr / 20,
        )
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[total // 2, 3 * total // 4], gamma=0.1
        )
    generator = torch.Generator().manual_seed(seed)
    live = None
    step = 0
    start = time.perf_counter()
    while step < total:
        order = torch.randperm(len(x_tr), generator=generator)
        for i in range(0, len(x_tr), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == total:
                live = evaluate(model, x_te, y_te)  # the last live ticket, before finalize()
            sched.step()
            if step == total:
                break
    return {
        "seed": seed,
        "live": live,
        "final": evaluate(model, x_te, y_te),
        "density": opt.density,
        "seconds": time.perf_counter() - start,
        "opt": opt,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rigl")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--update-every", type=int, default=50)
    parser.add_argument("--cycle-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-sup-tickets", dest="sup_tickets", action="store_false")
    args = parser.parse_args(argv)

    label = f"{args.method} at sparsity {args.sparsity}" + (
        " + Sup-tickets" if args.sup_tickets else ""
    )
    print(f"sparseopt demo: MLP on the UCI digits (scikit-learn), {label}")
    results = []
    for seed in args.seeds:
        r = run(args, seed)
        results.append(r)
        final = "ultimate ticket" if args.sup_tickets else "final model"
        (acc0, nll0), (acc1, nll1) = r["live"], r["final"]
        print(
            f"seed {seed}: last live ticket {100 * acc0:.2f}% (NLL {nll0:.4f})  {final} "
            f"{100 * acc1:.2f}% (NLL {nll1:.4f})  density {r['density']:.4f}  "
            f"({r['seconds']:.1f} s)"
        )
    if len(results) > 1:
        for key in ("live", "final"):
            acc = [100 * r[key][0] for r in results]
            nll = [r[key][1] for r in results]
            print(
                f"{key}: accuracy {statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f}%, "
                f"NLL {statistics.mean(nll):.4f} ± {statistics.stdev(nll):.4f}"
            )
    print()
    print(results[-1]["opt"].report())


if __name__ == "__main__":
    main()
