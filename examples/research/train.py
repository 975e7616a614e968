"""Train one model with sparseopt: every knob a flag, the paper's settings as presets.

    python examples/research/train.py                                # digits CNN, RigL 90%
    python examples/research/train.py --method granet --sparsity 0.95 --sup-tickets
    python examples/research/train.py --preset cifar-paper --dataset cifar100 --model resnet50 \\
        --method rigl --sparsity 0.95 --data-dir ~/data --checkpoint runs/r50.pt
    python examples/research/train.py --preset cifar-paper ... --resume runs/r50.pt  # continue
    torchrun --nproc_per_node 2 examples/research/train.py --dataset digits  # DDP (gloo on CPU)
    python examples/research/train.py --smoke --dataset imagenet --model resnet50  # 2 steps

Presets (``--preset``) fill in the paper's hyper-parameters; flags given explicitly win:

- ``cifar-paper``: CIFAR-100 (the official README command), 250 epochs, batch 128, SGD lr 0.1,
  momentum 0.9, weight decay 5e-4, x0.1 at 1/2 and 3/4 of phase 1, ΔT = 1000 steps, prune rate
  0.5 constant until the end of phase 1 (stop fraction 1.0), Sup-tickets with 8-epoch cycles in
  the last 10% (3 tickets), rate 0.001 <-> 0.005, exploration 0.5.
- ``imagenet-paper``: ImageNet ResNet-50, 100 epochs, batch 256, SGD lr 0.1, momentum 0.9,
  weight decay 1e-4, label smoothing 0.1, 5-epoch linear warm-up and x0.1 at epochs 30, 60, 85,
  Sup-tickets with 2-epoch cycles and superpose fraction 0.08 (4 tickets in the last 8 epochs),
  rate 0.0001 <-> 0.0005, exploration 0.5, ΔT = 1000, prune rate 0.5 constant.

CIFAR and ImageNet come through torchvision (optional; imported only for them). ``--smoke`` runs
the chosen architecture for two optimizer steps on random tensors of the dataset's shape (no
torchvision needed) and exercises the whole path: masks, a topology update, a Sup-tickets ticket
and ``finalize()`` when ``--sup-tickets`` is on, evaluation, FLOPs, the report, checkpoints.

Checkpoints (``--checkpoint PATH``, written after every epoch) hold the model, the optimizer (with
its masks and superposed copy), the scheduler, the epoch, the RNG state and the FLOPs counters;
they load with ``torch.load(weights_only=True)``. ``--resume PATH`` rebuilds everything (the
schedulers first) and loads them: the continued run is bit-identical to an uninterrupted one.
``--export PATH`` writes the trained model's compact sparse file (``sparseopt.save_sparse``, the
exact masks included) and prints its size against ``torch.save`` and the batch-1 latency of the
dense model and of its ``sparseopt.to_sparse_inference`` copy (``common.deploy``).
``--stop-after N`` ends the run after epoch N with the schedule of ``--epochs`` intact (a job
time limit), for a later ``--resume``.

Under ``torchrun`` (``WORLD_SIZE`` set) the script initializes the process group (nccl on CUDA,
gloo on CPU), shards the data with ``DistributedSampler``, wraps the model in DDP and gives every
rank the same ``seed=`` for ``SparseOptimizer``, so every rank draws the same masks; gradients are
all-reduced before ``step()``, so every topology update agrees too. ``--batch-size`` is per rank.
Rank 0 prints, evaluates and writes checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import StepDecay, deploy, evaluate, format_deploy
from data import DATASETS, cifar, digits_split, imagenet, synthetic
from models import ResNet, build_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.flops import TrainingFlops

MODEL_NAMES = ("digits-cnn", "vgg16", "resnet50", "wrn-28-10")
METHOD_NAMES = ("dense", "static", "set", "rigl", "granet", "gmp", "snip")

# Every preset-able setting with its default when no preset is given (tuned for the digits).
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "model": None,  # per dataset: digits-cnn for digits, resnet50 otherwise
    "epochs": 30,
    "batch_size": 64,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "label_smoothing": 0.0,
    "milestones": None,  # epochs; None: the fractions of phase 1 below
    "milestone_fractions": [0.5, 0.75],
    "gamma": 0.1,
    "warmup_epochs": 0.0,
    "update_every": 50,
    "prune_rate": 0.5,
    "prune_schedule": "cosine",
    "stop_fraction": 0.75,
    "sup_tickets": False,
    "cycle_epochs": 1.0,
    "superpose_fraction": 0.1,
    "lr_low": 0.001,
    "lr_high": 0.005,
    "explore_rate": 0.5,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Yin et al. 2022 §4 and the official CIFAR README command (ResNet-50, CIFAR-100).
    "cifar-paper": {
        "dataset": "cifar100",
        "model": "resnet50",
        "epochs": 250,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "label_smoothing": 0.0,
        "milestones": None,
        "milestone_fractions": [0.5, 0.75],
        "gamma": 0.1,
        "warmup_epochs": 0.0,
        "update_every": 1000,
        "prune_rate": 0.5,
        "prune_schedule": "constant",
        "stop_fraction": 1.0,
        "sup_tickets": True,
        "cycle_epochs": 8.0,
        "superpose_fraction": 0.1,
        "lr_low": 0.001,
        "lr_high": 0.005,
        "explore_rate": 0.5,
    },
    # Yin et al. 2022 §4 and the official ImageNet README command (--cycle 2 --cyclic_epochs 8).
    "imagenet-paper": {
        "dataset": "imagenet",
        "model": "resnet50",
        "epochs": 100,
        "batch_size": 256,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "label_smoothing": 0.1,
        "milestones": [30, 60, 85],
        "milestone_fractions": None,
        "gamma": 0.1,
        "warmup_epochs": 5.0,
        "update_every": 1000,
        "prune_rate": 0.5,
        "prune_schedule": "constant",
        "stop_fraction": 1.0,
        "sup_tickets": True,
        "cycle_epochs": 2.0,
        "superpose_fraction": 0.08,
        "lr_low": 0.0001,
        "lr_high": 0.0005,
        "explore_rate": 0.5,
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Preset-able options default to None; parse_args fills them from the preset, then DEFAULTS.
    d = DEFAULTS
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's hyper-parameters")
    g.add_argument("--dataset", choices=sorted(DATASETS), help=f"default {d['dataset']}")
    g.add_argument("--data-dir", default="data", help="CIFAR root / ImageNet train+val folder")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    g.add_argument(
        "--model",
        choices=MODEL_NAMES,
        help="default: digits-cnn for digits, resnet50 otherwise (torchvision's on ImageNet)",
    )
    g.add_argument("--dropout", type=float, default=0.0, help="WRN dropout")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="carve a validation split from train and report it every epoch",
    )
    g.add_argument("--seed", type=int, default=0, help="model init, data order, masks")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g.add_argument("--checkpoint", help="write a checkpoint here after every epoch")
    g.add_argument("--resume", help="continue from this checkpoint")
    g.add_argument("--stop-after", type=int, help="end after this epoch (schedule unchanged)")
    g.add_argument("--results", help="write the final metrics as JSON here")
    g.add_argument(
        "--export",
        metavar="PATH",
        help="after training, write the compact sparse file (sparseopt.save_sparse) here and "
        "print dense vs compact size and batch-1 latency (common.deploy)",
    )
    g.add_argument(
        "--smoke",
        action="store_true",
        help="two steps on random tensors of the dataset's shape, no torchvision",
    )
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help=f"default {d['epochs']}")
    g.add_argument("--batch-size", type=int, help=f"per rank; default {d['batch_size']}")
    g.add_argument("--lr", type=float, help=f"default {d['lr']}")
    g.add_argument("--momentum", type=float, help=f"default {d['momentum']}")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}")
    g.add_argument("--label-smoothing", type=float, help="default 0")
    g.add_argument(
        "--milestones",
        type=float,
        nargs="+",
        help="epochs of the x gamma decays (default: --milestone-fractions)",
    )
    g.add_argument(
        "--milestone-fractions",
        type=float,
        nargs="+",
        help="decays at these fractions of phase 1 (default 0.5 0.75)",
    )
    g.add_argument("--gamma", type=float, help="decay factor, default 0.1")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up, default 0")

    g = p.add_argument_group("sparsity")
    g.add_argument("--method", choices=METHOD_NAMES, default="rigl")
    g.add_argument("--sparsity", type=float, default=0.9)
    g.add_argument("--distribution", choices=["erk", "er", "uniform"], default="erk")
    g.add_argument("--update-every", type=int, help=f"ΔT in steps, default {d['update_every']}")
    g.add_argument("--prune-rate", type=float, help=f"default {d['prune_rate']}")
    g.add_argument(
        "--prune-schedule", choices=["cosine", "constant"], help=f"default {d['prune_schedule']}"
    )
    g.add_argument("--stop-fraction", type=float, help=f"default {d['stop_fraction']}")
    g.add_argument("--initial-density", type=float, help="GraNet/GMP start density")
    g.add_argument("--prune-start", type=float, help="GraNet/GMP pruning window start")
    g.add_argument("--prune-end", type=float, help="GraNet/GMP pruning window end")

    g = p.add_argument_group("Sup-tickets")
    g.add_argument(
        "--sup-tickets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Sup-tickets booster (default off; on in the presets)",
    )
    g.add_argument("--cycle-epochs", type=float, help=f"default {d['cycle_epochs']}")
    g.add_argument("--superpose-fraction", type=float, help="default 0.1")
    g.add_argument("--lr-low", type=float, help="default 0.001")
    g.add_argument("--lr-high", type=float, help="default 0.005")
    g.add_argument("--explore-rate", type=float, help="default 0.5")
    g.add_argument("--averaging", choices=["cia", "caa", "cima"], default="cia")
    g.add_argument("--beta", type=float, default=0.8, help="CIMA decay")
    g.add_argument("--reprune", choices=["layer", "global"], default="layer")
    g.add_argument(
        "--update-bn",
        action="store_true",
        help="recompute the ultimate ticket's BatchNorm statistics with one pass over "
        "the training data (torch.optim.swa_utils.update_bn), as the official "
        "code does",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; unset options take the preset's value, then the default."""
    args = build_parser().parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    if args.model is None:
        args.model = "digits-cnn" if args.dataset == "digits" else "resnet50"
    return args


# --- distributed ----------------------------------------------------------------------------------
def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; initializes the process group under torchrun."""
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, dev
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu")


# --- data -----------------------------------------------------------------------------------------
def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset | None, Dataset]:
    """``(train, val, test)`` for ``args.dataset``; random tensors with ``--smoke``."""
    if args.smoke:
        return (
            synthetic(args.dataset, 2 * args.batch_size, seed=args.seed),
            None,
            synthetic(args.dataset, args.batch_size, seed=args.seed + 1),
        )
    if args.dataset == "digits":
        split = digits_split(seed=0, val_fraction=args.val_fraction)
        val = None
        if split.x_val is not None:
            val = TensorDataset(split.x_val, split.y_val)
        return (
            TensorDataset(split.x_train, split.y_train),
            val,
            TensorDataset(split.x_test, split.y_test),
        )
    if args.dataset in ("cifar10", "cifar100"):
        return cifar(
            args.dataset,
            args.data_dir,
            download=args.download,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    return imagenet(args.data_dir, val_fraction=args.val_fraction, seed=args.seed)


# --- schedule -------------------------------------------------------------------------------------
def lr_schedule(
    args: argparse.Namespace, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[Any, dict[str, Any]]:
    """The per-iteration scheduler (Sup-tickets around the phase-1 schedule) and its plan."""
    total = args.epochs * steps_per_epoch
    plan: dict[str, Any] = {"total_steps": total, "steps_per_epoch": steps_per_epoch}
    phase1 = total
    cycle = None
    if args.sup_tickets:  # the phase-1 milestones need the split before the scheduler exists
        cycle = max(1, round(args.cycle_epochs * steps_per_epoch))
        phase1 = SupTicketsScheduler.plan(total, cycle, args.superpose_fraction).phase1_steps
    if args.milestones is not None:
        milestones = [round(m * steps_per_epoch) for m in args.milestones]
    else:
        milestones = [math.floor(f * phase1) for f in args.milestone_fractions or []]
    decay = StepDecay(milestones, args.gamma, round(args.warmup_epochs * steps_per_epoch))
    base = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    plan.update(phase1_steps=phase1, milestones=decay.milestones, warmup_steps=decay.warmup_steps)
    if not args.sup_tickets:
        return base, plan
    sched = SupTicketsScheduler(
        opt,
        total_steps=total,
        cycle_steps=cycle,
        base=base,
        superpose_fraction=args.superpose_fraction,
        lr_low=args.lr_low,
        lr_high=args.lr_high,
        explore_rate=args.explore_rate,
        averaging=args.averaging,
        beta=args.beta,
        reprune=args.reprune,
    )
    plan.update(cycle_steps=cycle, tickets=sched.num_tickets, ticket_steps=sched.ticket_steps)
    return sched, plan


def smoke_adjust(args: argparse.Namespace) -> None:
    """Two optimizer steps that still reach every code path."""
    args.epochs = 1
    args.batch_size = min(args.batch_size, 2)
    args.update_every = 1  # a topology update at step 1
    args.milestones, args.milestone_fractions, args.warmup_epochs = None, [0.5], 0.0
    args.cycle_epochs, args.superpose_fraction = 0.5, 0.5  # one 1-step cycle: a ticket at step 2
    args.lr_low = args.lr * args.gamma  # phase 1 ends there
    args.lr_high = 2 * args.lr_low
    if args.method in ("granet", "gmp"):
        args.prune_start, args.prune_end = 0.0, 0.5
    args.workers = 0
    args.val_fraction = 0.0


# --- the run --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train as ``argv`` says; returns the final metrics (rank 0) as a dict."""
    args = parse_args(argv)
    if args.smoke:
        smoke_adjust(args)
    if args.method == "dense" and args.sup_tickets:
        raise SystemExit(
            "--sup-tickets needs a sparse --method (SupTicketsScheduler wraps a "
            "SparseOptimizer); use --no-sup-tickets with --method dense"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    shape, num_classes = DATASETS[args.dataset]

    train_set, val_set, test_set = datasets(args)  # first: a missing torchvision fails fast
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(
        args.model, args.dataset, num_classes, dropout=args.dropout, fallback=args.smoke
    ).to(device)
    if args.dataset == "imagenet" and isinstance(model, ResNet):
        log(
            "torchvision is missing: the smoke run uses models.py's ResNet-50 with the "
            "ImageNet stem (the same layers as torchvision's)"
        )
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed
    )  # also without torchrun: a deterministic shuffle per (seed, epoch), which --resume needs
    per_rank = math.ceil(len(train_set) / world)
    workers = args.workers if args.workers is not None else (0 if args.dataset == "digits" else 4)
    loader_kw = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=per_rank % args.batch_size == 1,  # BatchNorm cannot train on a batch of 1
        **loader_kw,
    )
    eval_loaders = {
        name: DataLoader(ds, batch_size=max(args.batch_size, 256), **loader_kw)
        for name, ds in (("val", val_set), ("test", test_set))
        if ds is not None
    }
    steps_per_epoch = len(train_loader)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    inner = torch.optim.SGD(
        net.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
    )
    opt: torch.optim.Optimizer = inner
    flops = None
    if args.method != "dense":
        options = {
            k: getattr(args, k)
            for k in ("initial_density", "prune_start", "prune_end")
            if getattr(args, k) is not None and args.method in ("granet", "gmp")
        }
        opt = SparseOptimizer(
            inner,
            method=args.method,
            sparsity=args.sparsity,
            distribution=args.distribution,
            update_every=args.update_every,
            prune_rate=args.prune_rate,
            prune_schedule=args.prune_schedule,
            stop_fraction=args.stop_fraction,
            total_steps=args.epochs * steps_per_epoch,
            model=model,  # the unwrapped module: layer names and BatchNorm buffers
            seed=args.seed,  # the same on every rank: the same masks everywhere
            **options,
        )
        flops = TrainingFlops(opt, model, torch.zeros(1, *shape, device=device))
    sched, plan = lr_schedule(args, opt, steps_per_epoch)  # built before any state is loaded

    start_epoch = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        saved_plan = ckpt.get("plan")
        if saved_plan is not None and saved_plan != plan:
            diff = {k: (saved_plan.get(k), v) for k, v in plan.items() if saved_plan.get(k) != v}
            raise SystemExit(
                f"--resume {args.resume}: the checkpoint was made with another schedule "
                f"(saved vs now: {diff}); resume with the same --epochs, --batch-size and "
                "Sup-tickets settings"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"])
        if flops is not None and ckpt.get("flops") is not None:
            flops.steps, flops.sparse_total, flops.dense_total = ckpt["flops"]
        start_epoch = int(ckpt["epoch"])
        log(f"resumed from {args.resume} after epoch {start_epoch}")

    desc = "dense" if args.method == "dense" else f"{args.method} at sparsity {args.sparsity}"
    if args.sup_tickets:
        desc += (
            f" + Sup-tickets ({plan['tickets']} tickets of {plan['cycle_steps']} steps after "
            f"step {plan['phase1_steps']})"
        )
    log(
        f"{args.model} on {args.dataset}{' (smoke: random tensors)' if args.smoke else ''}, "
        f"{desc}; {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}"
        f"{f' x {world} ranks' if world > 1 else ''}, device {device}"
    )

    last = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    started = time.perf_counter()
    for epoch in range(start_epoch, last):
        sampler.set_epoch(epoch)
        net.train()
        seen, loss_sum, correct, tick = 0, 0.0, 0, time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = net(x)
            loss = F.cross_entropy(out, y, label_smoothing=args.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
        line = (
            f"epoch {epoch + 1:>3}/{args.epochs}  loss {loss_sum / seen:.4f}  "
            f"train acc {100 * correct / seen:6.2f}%  lr {opt.param_groups[0]['lr']:.2e}"
        )
        if args.method != "dense":
            line += f"  density {opt.density:.4f}"
        if "val" in eval_loaders and rank == 0 and not args.quiet:
            v = evaluate(model, eval_loaders["val"], num_classes, device)
            line += f"  val acc {100 * v['accuracy']:.2f}%"
        if not args.quiet:
            log(line + f"  ({time.perf_counter() - tick:.1f} s)")
        if args.checkpoint and rank == 0:
            save_checkpoint(args.checkpoint, model, opt, sched, epoch + 1, flops, plan)

    if last < args.epochs:
        log(f"stopped after epoch {last} of {args.epochs} (--stop-after); continue with --resume")
        del net  # the DDP wrapper holds the process group (see cleanup_distributed)
        cleanup_distributed(world)
        return {"epoch": last, "stopped": True}

    if world > 1 and args.method != "dense":
        check_masks_agree(opt)

    if args.update_bn and args.method != "dense" and args.sup_tickets and rank == 0:
        from torch.optim.swa_utils import update_bn

        update_bn(((x.to(device), y) for x, y in train_loader), model, device)
        log("recomputed the BatchNorm statistics of the ultimate ticket (update_bn)")

    result: dict[str, Any] = {"epoch": args.epochs, "stopped": False, "plan": plan}
    if rank == 0:
        test = evaluate(model, eval_loaders["test"], num_classes, device)
        result.update(accuracy=test["accuracy"], nll=test["nll"], ece=test["ece"])
        what = "ultimate ticket" if args.sup_tickets else "final model"
        log(
            f"\ntest ({what}): accuracy {100 * test['accuracy']:.2f}%  NLL {test['nll']:.4f}  "
            f"ECE {100 * test['ece']:.2f}%   ({time.perf_counter() - started:.1f} s)"
        )
        if args.method != "dense":
            result.update(
                density=opt.density,
                train_flops=flops.ratio,
                inference_flops=flops.inference_ratio(),
            )
            log(
                f"FLOPs relative to dense: training {flops.ratio:.3f}x, "
                f"inference {flops.inference_ratio():.3f}x\n"
            )
            log(opt.report())
        if args.export:
            masks = opt.masks if args.method != "dense" else None
            example = torch.zeros(1, *shape, device=device)
            deployed = deploy(model, args.export, example, masks=masks)
            result["export"] = deployed
            log(format_deploy(deployed, args.export))
        if args.results:
            with open(args.results, "w") as f:
                json.dump(result, f, indent=1)
    del net  # the DDP wrapper holds the process group (see cleanup_distributed)
    cleanup_distributed(world)
    return result


def save_checkpoint(
    path: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    epoch: int,
    flops: TrainingFlops | None,
    plan: dict[str, Any],
) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "epoch": epoch,
        "rng": torch.get_rng_state(),
        "plan": plan,
        "flops": None if flops is None else [flops.steps, flops.sparse_total, flops.dense_total],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_masks_agree(opt: SparseOptimizer) -> None:
    """Under DDP: every rank must hold the same masks (same seed, all-reduced gradients)."""
    import torch.distributed as dist

    fingerprint = torch.tensor(
        [
            float(layer.mask.flatten().nonzero().double().sum()) + layer.count
            for layer in opt.layers
        ],
        dtype=torch.float64,
        device=opt.layers[0].mask.device,
    )
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks hold different masks; give every rank the same --seed")


def cleanup_distributed(world: int) -> None:
    """Leave the process group together, after the DDP wrapper has been freed.

    A rank that still holds a ``DistributedDataParallel`` wrapper, and so the group, while its
    peer exits can hang in the group's destructor (gloo, seen in this project's tests); the
    barrier keeps one rank from tearing down alone.
    """
    if world > 1:
        import gc

        import torch.distributed as dist

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
