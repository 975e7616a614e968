"""A prepared GPU study: the Sup-tickets comparison on one GPU, within 8 minutes.

Fashion-MNIST (50,000 train, 10,000 validation carved from train, the 10,000 test images), a
ResNet-18 (CIFAR layout, 11.2M weights, one input channel) at 95% sparsity (ERK), RigL, SGD 0.1
with momentum 0.9 and weight decay 5e-4, batch 128, x0.1 at 1/2 and 3/4 of the run. For each
seed (3, paired: the same initial weights, masks and batches in every arm):

1. phase 1 once, with the base run's own milestones ("shared"), so that it is the base run's
   first ``P`` steps bit for bit, and a checkpoint right after its last optimizer step;
2. from that checkpoint, the base run to the end, and every Sup-tickets variant (``VARIANTS``),
   each in fresh objects loaded from a deep copy, as ``study.py`` does.

The paired differences (variant minus base) then measure phase 2 alone. The length is chosen to
fit the budget: each worker times a few steps at the start, and the longest protocol of
``LADDER`` whose projected time fits ``--budget-s`` runs (the paper's cycles of 3,128 steps if
the GPU is fast enough, down to cycles of 1,170 steps). Seeds run concurrently, one process
each, when ``--workers`` says so (the default on CUDA: one per seed).

    make gpu-study                                      # = python examples/research/gpu_study.py
    python examples/research/gpu_study.py --quick       # CPU smoke run, seconds (tests)

Writes ``OUT/results.jsonl`` (one line per seed and arm), ``OUT/table.md`` and
``OUT/summary.json`` (the plan, the device, the timings, the means). Nothing is downloaded: the
data are Debian's Fashion-MNIST IDX files (``data.fashion_mnist_split``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseopt import SparseOptimizer, SupTicketsScheduler

LR, MOMENTUM, WEIGHT_DECAY, BATCH, SPARSITY = 0.1, 0.9, 5e-4, 128, 0.95
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training pixels

# protocols, longest first: (epochs, cycle epochs, tickets); fraction = tickets * cycle / epochs.
# At batch 128 an epoch is 390 steps: cycles of 8 epochs are the paper's 3,128 steps.
# Phase 2 is at most the last quarter, so that phase 1 holds both x0.1 milestones of the base
# (1/2, 3/4) and phase 2 starts at the paper's lr_low, 0.001.
LADDER: list[tuple[int, int, int]] = [
    (96, 8, 3),
    (64, 8, 2),
    (32, 4, 2),
    (24, 3, 2),
    (16, 2, 2),
]
QUICK = (8, 1, 2)  # --quick: 512 training images at 14x14, batch 32 (16 steps an epoch)

# phase-2 variants: options of SupTicketsScheduler; "bn" recomputes the BatchNorm statistics of
# the superposed copy from the training images; "official" and "recommended" build the presets;
# "select" validates the ultimate ticket on the validation split (the greedy soup).
VARIANTS: dict[str, dict[str, Any]] = {
    # the paper's: exploration 0.5, rates relative to the phase-1 peak (1/100 -> 1/20 -> 1/100,
    # for SGD at 0.1 the paper's 0.001 -> 0.005 -> 0.001)
    "default": {},
    "official": {"preset": "official", "bn": True},
    "explore0-high0.02-bn": {"explore_rate": 0.0, "lr_high": 0.02, "bn": True},
    # the same with select=: SupTicketsScheduler.recommended
    "recommended": {"preset": "recommended", "bn": True, "select": True},
}


# --- the model ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3, stride 1, no max-pool), 2-2-2-2 basic blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, c_in = [], width
        for i in range(4):
            c_out = width * 2**i
            for j in range(2):
                blocks.append(BasicBlock(c_in, c_out, 2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --- data -----------------------------------------------------------------------------------------
def load_data(device: torch.device, quick: bool) -> dict[str, Tensor]:
    """Fashion-MNIST on ``device``, standardized; ``quick``: 512 / 256 / 256 images at 14x14."""
    from data import fashion_mnist_split

    split = fashion_mnist_split()
    out = {}
    for key, value in vars(split).items():
        if quick:
            value = value[: 512 if "train" in key else 256]
        if key.startswith("x"):
            value = (value - MEAN) / STD
            if quick:
                value = F.avg_pool2d(value, 2)
        out[key] = value.to(device)
    return out


class Run:
    """What every run of a seed shares: data, protocol, batch order, the loop."""

    def __init__(self, data: dict[str, Tensor], protocol: tuple[int, int, int], args) -> None:
        self.data, self.args = data, args
        self.device = data["x_train"].device
        self.batch = 32 if args.quick else BATCH
        self.per_epoch = len(data["y_train"]) // self.batch
        epochs, cycle_epochs, tickets = protocol
        self.total = epochs * self.per_epoch
        self.cycle = cycle_epochs * self.per_epoch
        self.fraction = tickets * cycle_epochs / epochs
        self.width = 4 if args.quick else 64
        self.amp = self.device.type == "cuda"
        self.bn_batches = [
            data["x_train"][i : i + 512] for i in range(0, len(data["y_train"]), 512)
        ]

    def order(self, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(1000 + seed)
        epochs = -(-self.total // self.per_epoch)
        return torch.cat(
            [torch.randperm(len(self.data["y_train"]), generator=gen) for _ in range(epochs)]
        )

    def build(self, seed: int, options: dict[str, Any] | None):
        """Model, optimizer and scheduler: Sup-tickets with ``options``, the base with ``None``."""
        torch.manual_seed(seed)
        model = ResNet18(width=self.width).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        inner = torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        opt = SparseOptimizer(
            inner,
            self.args.method,
            SPARSITY,
            update_every=1000 if not self.args.quick else 20,
            total_steps=self.total,
            model=model,
            seed=seed,
        )
        # the base run's own milestones ("shared"), the second one step before phase 2 (which
        # starts at 3/4 or later), so that phase 1 ends at the paper's lr_low, 0.001
        milestones = [self.total // 2, 3 * self.total // 4 - 1]
        if options is None:
            return model, opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)

        def base(o, phase1: int) -> torch.optim.lr_scheduler.MultiStepLR:
            return torch.optim.lr_scheduler.MultiStepLR(o, milestones, 0.1)

        return model, opt, make_scheduler(opt, self, base, options)

    def train(self, model, opt, sched, order: Tensor, start: int, stop: int) -> None:
        """Optimizer steps ``start..stop`` (1-based), each followed by ``sched.step()``."""
        x_all, y_all = self.data["x_train"], self.data["y_train"]
        for step in range(start, stop + 1):
            idx = order[(step - 1) * self.batch : step * self.batch]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(idx), device=self.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str) -> float:
        was = model.training
        model.eval()
        x, y = self.data[f"x_{split}"], self.data[f"y_{split}"]
        correct = 0
        for i in range(0, len(y), 1000):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
                correct += (model(x[i : i + 1000]).argmax(-1) == y[i : i + 1000]).sum().item()
        model.train(was)
        return correct / len(y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val": self.accuracy(model, "val"), "test": self.accuracy(model, "test")}


def make_scheduler(opt: SparseOptimizer, run: Run, base, options: dict[str, Any]):
    """The Sup-tickets scheduler of one variant (the booster's API of issue 23).

    Rates left out are relative to each group's phase-1 peak (``lr_low=None``, ``lr_high=None``);
    ``select`` scores a candidate ultimate ticket by its validation accuracy (never the test's).
    Every variant gets the same phase-1 ``base`` (the base run's own milestones), the presets too.
    """
    o = dict(options)
    bn = run.bn_batches if o.pop("bn", False) else None
    if o.pop("select", False):
        o["select"] = lambda model: run.accuracy(model, "val")
    common = {"base": base, "superpose_fraction": run.fraction}
    preset = o.pop("preset", None)
    if preset == "official":
        return SupTicketsScheduler.official(opt, run.total, run.cycle, bn, **common, **o)
    if preset == "recommended":
        return SupTicketsScheduler.recommended(
            opt, run.total, run.cycle, bn_update=bn, **common, **o
        )
    return SupTicketsScheduler(opt, run.total, run.cycle, bn_update=bn, **common, **o)


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def time_steps(run: Run, seed: int, steps: int) -> float:
    """Seconds per training step of the base run (after a warm-up), on this worker."""
    model, opt, sched = run.build(seed, None)
    order = run.order(seed).to(run.device)
    run.train(model, opt, sched, order, 1, 5)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run.train(model, opt, sched, order, 6, 5 + steps)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def steps_per_seed(protocol: tuple[int, int, int], per_epoch: int, variants: int) -> int:
    """Optimizer steps one seed runs: phase 1, then the base and each variant over phase 2."""
    epochs, cycle_epochs, tickets = protocol
    phase2 = tickets * cycle_epochs * per_epoch
    return epochs * per_epoch - phase2 + (1 + variants) * phase2


def choose(step_s: float, budget_s: float, rounds: int, per_epoch: int, variants: int):
    """The longest protocol of ``LADDER`` whose projected time fits (the shortest otherwise)."""
    for protocol in LADDER:
        # phase 2 also evaluates and recomputes BatchNorm: 10% on top
        if 1.1 * rounds * steps_per_seed(protocol, per_epoch, variants) * step_s <= budget_s:
            return protocol
    return LADDER[-1]


def run_seed(seed: int, data: dict[str, Tensor], protocol, args) -> list[dict[str, Any]]:
    """Phase 1 once, then the base and every variant from its checkpoint; one record each."""
    from study import COUNTERS

    run = Run(data, protocol, args)
    order = run.order(seed).to(run.device)
    t0 = time.perf_counter()
    model, opt, sched = run.build(seed, {})
    phase1 = sched.phase1_steps
    run.train(model, opt, sched, order, 1, phase1 - 1)
    run.train(model, opt, None, order, phase1, phase1)  # the last phase-1 step, no sched.step()
    ckpt = {"model": state_of(model), "opt": opt.state_dict(), "sched": sched.state_dict()}
    phase1_acc = run.evaluate(model)
    key = {"seed": seed, "protocol": list(protocol), "method": args.method}
    records = [{**key, "arm": "phase1", "acc": phase1_acc, "seconds": time.perf_counter() - t0}]

    t1 = time.perf_counter()  # the base run: its MultiStepLR is the scheduler's base
    c = deepcopy(ckpt)
    model, opt, base = run.build(seed, None)
    model.load_state_dict(c["model"])
    opt.load_state_dict(c["opt"])
    base.load_state_dict(c["sched"]["base"])
    base.step()
    run.train(model, opt, base, order, phase1 + 1, run.total)
    base_acc = run.evaluate(model)
    records.append({**key, "arm": "base", "acc": base_acc, "seconds": time.perf_counter() - t1})

    for name in args.variants:
        t1 = time.perf_counter()
        c = deepcopy(ckpt)
        model, opt, sched = run.build(seed, VARIANTS[name])
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        counters = {k: v for k, v in c["sched"].items() if k in COUNTERS}
        sched.load_state_dict({**sched.state_dict(), **counters})
        sched.step()  # the end of phase 1: ticket 0 if asked, the first exploration
        run.train(model, opt, sched, order, phase1 + 1, run.total - 1)
        run.train(model, opt, None, order, run.total, run.total)
        live = run.evaluate(model)  # the last live ticket, before finalize()
        sched.step()  # the last ticket, then finalize(): the model holds the ultimate ticket
        final = run.evaluate(model)
        records.append(
            {
                **key,
                "arm": name,
                "acc": final,
                "live": live,
                "base": base_acc,
                "phase1": phase1_acc,
                "density": opt.density,
                "seconds": time.perf_counter() - t1,
            }
        )
    return records


# --- the report -----------------------------------------------------------------------------------
def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.2f} ± {std:.2f}"


def tables(records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The Markdown tables and the per-arm means: accuracy, and each arm minus the base, paired."""
    by = {(r["arm"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    arms = [a for a in ("phase1", "base", *VARIANTS) if any((a, s) in by for s in seeds)]
    lines = ["| arm | seeds | val | test |", "|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        val = [100 * r["acc"]["val"] for r in rs]
        test = [100 * r["acc"]["test"] for r in rs]
        lines.append(f"| {arm} | {len(rs)} | {_ms(val)[1:]} | {_ms(test)[1:]} |")
        summary[arm] = {"val": statistics.fmean(val), "test": statistics.fmean(test)}
    lines += [
        "",
        "| arm minus base | split | mean ± std | per-seed | superposed − live | live − phase 1 |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        if arm in ("phase1", "base"):
            continue
        pairs = [(by[(arm, s)], by[("base", s)]) for s in seeds if (arm, s) in by]
        for split in ("val", "test"):
            d = [100 * (a["acc"][split] - b["acc"][split]) for a, b in pairs]
            sup = [100 * (a["acc"][split] - a["live"][split]) for a, _ in pairs]
            cyc = [100 * (a["live"][split] - a["phase1"][split]) for a, _ in pairs]
            lines.append(
                f"| {arm} | {split} | {_ms(d)} | {' '.join(f'{x:+.2f}' for x in d)} "
                f"| {statistics.fmean(sup):+.2f} | {statistics.fmean(cyc):+.2f} |"
            )
            summary[arm][f"minus_base_{split}"] = statistics.fmean(d)
            summary[arm][f"minus_base_{split}_per_seed"] = d
    return "\n".join(lines), summary


# --- workers --------------------------------------------------------------------------------------
def _worker(seeds, args, to_parent, from_parent) -> None:
    """One process: calibrate, wait for the protocol, run its seeds, send the records."""
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, args.workers)))
        device = torch.device(args.device)
        data = load_data(device, args.quick)
        probe = Run(data, LADDER[0], args)
        to_parent.put(("step_s", time_steps(probe, seeds[0], args.calibrate_steps)))
        protocol = from_parent.get()
        for seed in seeds:
            to_parent.put(("records", run_seed(seed, data, protocol, args)))
        to_parent.put(("done", None))
    except BaseException as e:  # report, so the parent does not wait forever
        to_parent.put(("error", repr(e)))
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run on a few images (tests)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0 1)")
    p.add_argument("--method", default="rigl")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=None, help="default: one per seed on CUDA")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget, seconds")
    p.add_argument("--calibrate-steps", type=int, default=30)
    p.add_argument(
        "--protocol", type=int, nargs=3, metavar=("EPOCHS", "CYCLE_EPOCHS", "TICKETS"),
        help="skip the choice: run this protocol",
    )  # fmt: skip
    p.add_argument("--out", default="runs/gpu_study")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        args.device = args.device or "cpu"
        args.calibrate_steps = 3
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.workers is None:
        args.workers = len(args.seeds) if args.device.startswith("cuda") else 1
    args.workers = max(1, min(args.workers, len(args.seeds)))
    os.makedirs(args.out, exist_ok=True)
    groups = [args.seeds[i :: args.workers] for i in range(args.workers)]
    rounds = max(len(g) for g in groups)

    def pick(step_s: float) -> tuple[int, int, int]:
        if args.quick:
            return QUICK
        if args.protocol:
            return tuple(args.protocol)
        left = args.budget_s - (time.perf_counter() - start) - 20.0
        per_epoch = 50000 // BATCH
        return choose(step_s, left, rounds, per_epoch, len(args.variants))

    records: list[dict[str, Any]] = []
    if args.workers == 1:
        torch.set_num_threads(1 if args.quick else torch.get_num_threads())
        data = load_data(torch.device(args.device), args.quick)
        step_s = time_steps(Run(data, LADDER[0], args), args.seeds[0], args.calibrate_steps)
        protocol = pick(step_s)
        print(f"{1e3 * step_s:.1f} ms/step; protocol {protocol}", flush=True)
        for seed in args.seeds:
            records += run_seed(seed, data, protocol, args)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        to_parent = ctx.Queue()
        inboxes = [ctx.Queue() for _ in groups]
        procs = [
            ctx.Process(target=_worker, args=(g, args, to_parent, inbox))
            for g, inbox in zip(groups, inboxes, strict=True)
        ]
        for proc in procs:
            proc.start()
        times = []
        while len(times) < len(procs):
            kind, value = to_parent.get()
            if kind == "error":
                raise SystemExit(f"a worker failed: {value}")
            times.append(value)
        step_s = max(times)
        protocol = pick(step_s)
        print(
            f"{1e3 * step_s:.1f} ms/step per worker ({len(procs)} concurrent); protocol {protocol}",
            flush=True,
        )
        for inbox in inboxes:
            inbox.put(protocol)
        done = 0
        while done < len(procs):
            kind, value = to_parent.get()
            if kind == "error":
                raise SystemExit(f"a worker failed: {value}")
            if kind == "records":
                records += value
                print(
                    f"seed {value[0]['seed']} done ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            elif kind == "done":
                done += 1
        for proc in procs:
            proc.join()

    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    text, means = tables(records)
    epochs, cycle_epochs, tickets = protocol
    per_epoch = (512 // 32) if args.quick else 50000 // BATCH
    plan = SupTicketsScheduler.plan(
        epochs * per_epoch, cycle_epochs * per_epoch, tickets * cycle_epochs / epochs
    )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    header = (
        f"# GPU study: {args.method} at {100 * SPARSITY:g}%, ResNet-18, Fashion-MNIST\n\n"
        f"Device: {device}, torch {torch.__version__}. Protocol: {epochs} epochs of "
        f"{per_epoch} steps, {tickets} cycles of {cycle_epochs} epochs "
        f"({plan.cycle_steps} steps), phase 1 {plan.phase1_steps} steps (shared with the base). "
        f"{1e3 * step_s:.1f} ms per step and worker, {args.workers} worker(s), "
        f"{time.perf_counter() - start:.0f} s in all.\n\n"
    )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(header + text + "\n")
    summary = {
        "device": device,
        "torch": torch.__version__,
        "method": args.method,
        "sparsity": SPARSITY,
        "protocol": {"epochs": epochs, "cycle_epochs": cycle_epochs, "tickets": tickets},
        "plan": {
            "total_steps": plan.total_steps,
            "phase1_steps": plan.phase1_steps,
            "cycle_steps": plan.cycle_steps,
            "tickets": plan.tickets,
        },
        "seeds": args.seeds,
        "workers": args.workers,
        "step_seconds": step_s,
        "wall_seconds": time.perf_counter() - start,
        "arms": means,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(header + text)


if __name__ == "__main__":
    main()
