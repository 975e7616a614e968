"""The sparseopt demo: sparse training with and without Sup-tickets on MNIST-1D, on CPU.

A small 1-D CNN with BatchNorm (``models.py: SignalCNN``) trains on MNIST-1D (Greydanus
2020; 5,000 signals generated offline by the ``mnist1d`` package, split 3,200 train / 800 val /
1,000 test) as a grid: dense, and each of SET, RigL and GraNet with and without Sup-tickets, at
90% and 95% sparsity, over 3 seeds. Every run takes the same number of optimizer steps. The test
split is held out; no run selects anything on it (there is no early stopping and no best-epoch
pick: the last model is the result). ``--data digits`` (and ``--quick``) runs the UCI digits,
``--data fashion`` the real Fashion-MNIST (``make demo-fashion``).

It prints one table (mean ± std over seeds of test accuracy, NLL and ECE; the final density; the
training and inference FLOPs relative to dense), the paired per-seed differences of Sup-tickets
minus the same method without it, and writes ``results.json``, ``results.csv``, ``runs.csv`` and
four plots into ``--out``:

- ``lr.png``: the learning rate over steps, with and without Sup-tickets, with the ticket points;
- ``accuracy.png``: test accuracy over steps: the live ticket, the superposed ticket (evaluated
  with ``opt.superposed()`` in phase 2), and the run without Sup-tickets;
- ``paired.png``: Sup-tickets minus base, per seed and mean ± std, per configuration;
- ``density.png``: the per-layer density of the final models.

    python examples/research/demo.py                  # the full grid (make demo)
    python examples/research/demo.py --methods dense rigl --sparsities 0.9 --seeds 0 --out runs/one
    python examples/research/demo.py --quick          # a reduced digits grid, for tests
    python examples/research/demo.py --eval-on val    # tune on the validation split

Hyper-parameters (defaults, MNIST-1D): 3,000 SGD steps of batch 128 (120 epochs) at lr 0.1
(momentum 0.9, weight decay 5e-4), x0.1 at 1/2 and 3/4 of training (of phase 1 with
Sup-tickets, as in the paper); ERK; topology updates every 50 steps, drop fraction 0.5 decayed by
cosine to 0 at 75% of training, the same for both arms; GraNet starts at density 0.5 and reaches
the target at 50% of training. Sup-tickets: 3 cycles of 100 steps in the last 10%, CIA averaging,
layer-wise re-pruning, and the setting that ``study.py`` chose on the validation split
(never on test): no exploration at the cycle starts, a peak rate of 0.05 (half the phase-1 peak)
instead of the paper's 0.005, and the BatchNorm statistics of the superposed ticket recomputed over
the training data. The paper's setting (``--explore-rate 0.5 --lr-high 0.005 --bn average``) cost
about 10 points of validation accuracy there; see docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch
import torch.nn.functional as F
from common import deploy, format_deploy, mean_std, metrics_from_logits, predict
from data import DATASETS, digits_split, fashion_mnist_split, mnist1d_split
from models import DigitsCNN, SignalCNN

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.distributions import exact_counts, layer_densities
from sparseopt.flops import TrainingFlops
from sparseopt.metrics import (
    InTimeOverParameterization,
    prediction_disagreement,
    prediction_kl,
)

METHODS = ("dense", "static", "set", "rigl", "granet", "gmp", "snip")
NAMES = {
    "dense": "Dense",
    "static": "Static",
    "set": "SET",
    "rigl": "RigL",
    "granet": "GraNet",
    "gmp": "GMP",
    "snip": "SNIP",
}
NUM_CLASSES = 10
# Per dataset: the defaults of the flags left out. MNIST-1D: 120 epochs of 25 steps (3,200
# training signals at batch 128), 4-epoch cycles. Fashion-MNIST: 10 epochs of 390 steps, 1-epoch
# cycles in the last 20% (two tickets of 390 steps), as in study.py's fashion regime.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {
        "steps": 3000, "batch_size": 128, "update_every": 50, "cycle_steps": 100,
        "eval_every": 100, "width": 32, "superpose_fraction": 0.1,
    },
    "digits": {
        "steps": 600, "batch_size": 64, "update_every": 50, "cycle_steps": 20, "eval_every": 25,
        "width": 16, "superpose_fraction": 0.1,
    },
    "fashion": {
        "steps": 3900, "batch_size": 128, "update_every": 780, "cycle_steps": 390,
        "eval_every": 390, "width": 8, "superpose_fraction": 0.2,
    },
}  # fmt: skip
QUICK = {"steps": 120, "update_every": 20, "cycle_steps": 6, "eval_every": 20}
FULL = DATA_DEFAULTS["digits"]


# --- one run --------------------------------------------------------------------------------------
def label(job: dict[str, Any]) -> str:
    """``"RigL 90% + Sup-tickets"``, ``"Dense"``."""
    if job["method"] == "dense":
        return NAMES["dense"]
    name = NAMES.get(job["method"], job["method"])
    if job.get("structure"):
        name += f" {job['structure']}"
    name += f" {100 * job['sparsity']:g}%"
    return name + (" + Sup-tickets" if job["sup"] else "")


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits, labels = predict(model, [(x, y)])
    return (logits.argmax(-1) == labels).double().mean().item()


def load_data(job: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The split of ``job``: train, and the held-out part it reports on (test or val)."""
    if job["data"] in ("mnist1d", "fashion"):
        split = mnist1d_split() if job["data"] == "mnist1d" else fashion_mnist_split()
        if job["eval_on"] == "val":
            return {"x": split.x_train, "y": split.y_train, "x_eval": split.x_val,
                    "y_eval": split.y_val}  # fmt: skip
        return {"x": split.x_train, "y": split.y_train, "x_eval": split.x_test,
                "y_eval": split.y_test}  # fmt: skip
    data = digits_split(
        seed=job["split_seed"],
        test_fraction=job["test_fraction"],
        val_fraction=job["val_fraction"] if job["eval_on"] == "val" else 0.0,
    )
    if job["eval_on"] == "val":
        return {"x": data.x_train, "y": data.y_train, "x_eval": data.x_val, "y_eval": data.y_val}
    return {"x": data.x_train, "y": data.y_train, "x_eval": data.x_test, "y_eval": data.y_test}


def paper_phase1(opt: Any, phase1_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The paper's phase 1 (Sup-tickets' ``base=``): x0.1 at 1/2 and 3/4 of it, 0.1 -> 0.001."""
    return torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[phase1_steps // 2, 3 * phase1_steps // 4], gamma=0.1
    )


def run_one(
    job: dict[str, Any],
    data: dict[str, torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one configuration for ``job["steps"]`` optimizer steps.

    Returns measurements and the held-out logits of the final model (and of the last live ticket
    with Sup-tickets); :func:`add_metrics` turns those into accuracy, NLL and ECE.
    """
    start = time.perf_counter()
    x_tr, y_tr, x_ev, y_ev = data["x"], data["y"], data["x_eval"], data["y_eval"]

    seed, total, method, sup = job["seed"], job["steps"], job["method"], job["sup"]
    torch.manual_seed(seed)  # the same initial weights for every method at a given seed
    model = (
        SignalCNN(width=job["width"]) if job["data"] == "mnist1d" else DigitsCNN(width=job["width"])
    )
    inner = torch.optim.SGD(
        model.parameters(), lr=job["lr"], momentum=0.9, weight_decay=job["weight_decay"]
    )
    sparse = method != "dense"
    opt: torch.optim.Optimizer = inner
    flops = itop = None
    if sparse:
        options: dict[str, Any] = {}
        if method in ("granet", "gmp"):
            options["prune_end"] = job["prune_end"]
        opt = SparseOptimizer(
            inner,
            method=method,
            sparsity=job["sparsity"],
            structure=job.get("structure"),
            distribution=job["distribution"],
            update_every=job["update_every"],
            prune_rate=job["prune_rate"],
            prune_schedule=job["prune_schedule"],
            stop_fraction=job["stop_fraction"],
            total_steps=total,
            model=model,
            seed=seed,
            **options,
        )
        flops = TrainingFlops(opt, model, x_tr[:1])
        itop = InTimeOverParameterization(opt)

    ticket_steps: list[int] = []
    phase1 = total
    if sup:
        sched = SupTicketsScheduler(
            opt,
            total_steps=total,
            cycle_steps=job["cycle_steps"],
            base=paper_phase1,
            superpose_fraction=job["superpose_fraction"],
            lr_low=job["lr_low"],
            lr_high=job["lr_high"],
            explore_rate=job["explore_rate"],
            averaging=job["averaging"],
            reprune=job["reprune"],
            include_phase1=job["include_phase1"],
            bn_update=[x_tr[i : i + 128] for i in range(0, len(x_tr), 128)]
            if job["bn"] == "recompute"
            else None,
        )
        phase1, ticket_steps = sched.phase1_steps, sched.ticket_steps
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[total // 2, 3 * total // 4], gamma=0.1
        )

    every = job["eval_every"]
    eval_steps = set(range(every, total + 1, every)) | set(ticket_steps) | {total}
    if sup:  # denser in phase 2, so that the superposed ticket has a curve
        eval_steps |= set(range(phase1, total + 1, max(1, job["cycle_steps"] // 2)))
    curve: dict[str, list] = {"step": [], "live": [], "superposed": []}
    tickets: list[dict[str, Any]] = []
    lrs: list[float] = []

    generator = torch.Generator().manual_seed(seed)
    batch = job["batch_size"]
    per_epoch = len(x_tr) // batch  # full batches only: BatchNorm never sees a batch of 1
    step = 0
    live_logits = None
    while step < total:
        order = torch.randperm(len(x_tr), generator=generator)
        for i in range(per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            lrs.append(opt.param_groups[0]["lr"])
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            live_acc = sup_acc = None
            if step == total:
                live_logits = predict(model, [(x_ev, y_ev)])[0]  # the last live ticket
                live_acc = (live_logits.argmax(-1) == y_ev).double().mean().item()
            elif step in eval_steps:
                live_acc = _accuracy(model, x_ev, y_ev)
            sched.step()  # Sup-tickets consolidates at cycle ends and finalizes after the last
            if sup and step in eval_steps and opt.tickets > 0:
                if step == total:  # the model now holds the ultimate ticket
                    sup_acc = _accuracy(model, x_ev, y_ev)
                else:
                    with opt.superposed():
                        sup_acc = _accuracy(model, x_ev, y_ev)
            if live_acc is not None:
                curve["step"].append(step)
                curve["live"].append(live_acc)
                curve["superposed"].append(sup_acc)
            if step in ticket_steps:
                tickets.append({"step": step, "live": live_acc, "superposed": sup_acc})
            if progress is not None and (step % 10 == 0 or step == total):
                progress(step)
            if step == total:
                break

    result: dict[str, Any] = {
        # a structured run is its own configuration: "rigl 2:4"
        "method": f"{method} {job['structure']}" if job.get("structure") else method,
        "structure": job.get("structure"),
        "sup_tickets": sup,
        "sparsity": job["sparsity"] if sparse else 0.0,
        "seed": seed,
        "label": label(job),
        "density": opt.density if sparse else 1.0,
        "train_flops": flops.ratio if flops is not None else 1.0,
        "inference_flops": flops.inference_ratio() if flops is not None else 1.0,
        "itop": itop.rate if itop is not None else 1.0,
        "steps": total,
        "phase1_steps": phase1,
        "ticket_steps": ticket_steps,
        "tickets": tickets,
        "curve": curve,
        "layers": (
            [
                {
                    "name": r["name"],
                    "shape": list(r["shape"]),
                    "numel": r["numel"],
                    "nnz": r["nnz"],
                    "density": r["density"],
                }
                for r in opt.report()["layers"]
            ]
            if sparse
            else [
                {
                    "name": n,
                    "shape": list(p.shape),
                    "numel": p.numel(),
                    "nnz": p.numel(),
                    "density": 1.0,
                }
                for n, p in model.named_parameters()
                if p.ndim >= 2
            ]
        ),
        "lr": lrs,
        "logits": predict(model, [(x_ev, y_ev)])[0],
        "live_logits": live_logits if sup else None,
        "seconds": time.perf_counter() - start,
        # the final weights of sparse runs, for the deployed ticket (dropped before writing)
        "state": {k: v.clone() for k, v in model.state_dict().items()} if sparse else None,
    }
    return result


def add_metrics(result: dict[str, Any], labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, NLL and ECE (torchmetrics) from the run's logits, which it then drops."""
    logits, live_logits = result.pop("logits"), result.pop("live_logits")
    final = metrics_from_logits(logits, labels, NUM_CLASSES)
    result.update(accuracy=final["accuracy"], nll=final["nll"], ece=final["ece"])
    if live_logits is not None:
        live = metrics_from_logits(live_logits, labels, NUM_CLASSES)
        result.update(
            live_accuracy=live["accuracy"],
            live_nll=live["nll"],
            live_ece=live["ece"],
            live_vs_ultimate_disagreement=prediction_disagreement(live_logits, logits),
            live_vs_ultimate_kl=prediction_kl(live_logits, logits),
        )
    return result


# --- workers --------------------------------------------------------------------------------------
_QUEUE: Any = None


def _worker_init(queue: Any, threads: int) -> None:
    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(threads)


_DATA: dict[str, Any] = {}


def _worker_run(job: dict[str, Any], data: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """One run in a worker; ``data`` None: the worker loads it once (Fashion-MNIST is large)."""
    if data is None:
        if job["data"] not in _DATA:
            _DATA[job["data"]] = load_data(job)
        data = _DATA[job["data"]]
    key = job["index"]
    _QUEUE.put((key, 0))
    return run_one(job, data, lambda n: _QUEUE.put((key, n)))


def _summary(done: int, total: int, r: dict[str, Any]) -> str:
    line = (
        f"[{done:>{len(str(total))}}/{total}] {r['label']:<24} seed {r['seed']}: "
        f"acc {100 * r['accuracy']:6.2f}%  NLL {r['nll']:.4f}  ECE {100 * r['ece']:5.2f}%  "
        f"density {r['density']:.4f}"
    )
    if r["sup_tickets"]:
        line += f"  (live ticket {100 * r['live_accuracy']:.2f}%)"
    return line + f"  {r['seconds']:.1f} s"


def run_grid(jobs: list[dict[str, Any]], workers: int, threads: int, bars: bool) -> list[dict]:
    """Run every job (in ``workers`` processes), with a progress bar per run and a summary line.

    The data are loaded once here and sent to the workers, and the metrics (torchmetrics' ECE)
    are computed here from the logits the workers return, so that the workers import only torch.
    """
    from tqdm.auto import tqdm

    data = load_data(jobs[0])
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    done = 0

    def finish(result: dict[str, Any], index: int) -> None:
        nonlocal done
        done += 1
        results[index] = add_metrics(result, data["y_eval"])
        tqdm.write(_summary(done, len(jobs), result))

    if workers <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for job in jobs:
                bar = tqdm(
                    total=job["steps"], desc=label(job), leave=False, disable=None if bars else True
                )
                r = run_one(job, data, lambda n, bar=bar: bar.update(n - bar.n))
                bar.close()
                finish(r, job["index"])
        finally:
            torch.set_num_threads(before)
        return results  # type: ignore[return-value]

    ctx = mp.get_context("spawn")  # no fork after torch is loaded
    progress_queue = ctx.Queue()
    open_bars: dict[int, Any] = {}
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(progress_queue, threads)
    ) as pool:
        shipped = None if jobs[0]["data"] == "fashion" else data
        pending = {pool.submit(_worker_run, job, shipped): job for job in jobs}
        while pending:
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    key, n = progress_queue.get_nowait()
                except queue_module.Empty:
                    break
                if key not in open_bars and results[key] is None:
                    job = jobs[key]
                    open_bars[key] = tqdm(
                        total=job["steps"],
                        desc=label(job),
                        leave=False,
                        disable=None if bars else True,
                    )
                if key in open_bars:
                    open_bars[key].update(n - open_bars[key].n)
            for future in finished:
                job = pending.pop(future)
                bar = open_bars.pop(job["index"], None)
                if bar is not None:
                    bar.close()
                finish(future.result(), job["index"])
    return results  # type: ignore[return-value]


# --- aggregation, table, files --------------------------------------------------------------------
METRICS = ("accuracy", "nll", "ece")


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean and std over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["sparsity"], r["sup_tickets"]), []).append(r)
    rows = []
    for (method, sparsity, sup), runs in groups.items():
        row: dict[str, Any] = {
            "label": runs[0]["label"],
            "method": method,
            "sparsity": sparsity,
            "sup_tickets": sup,
            "seeds": [r["seed"] for r in runs],
        }
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in runs])
        for key in ("density", "train_flops", "inference_flops", "itop", "seconds"):
            row[key] = mean_std([r[key] for r in runs])[0]
        if sup:
            row["live_accuracy_mean"], row["live_accuracy_std"] = mean_std(
                [r["live_accuracy"] for r in runs]
            )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], split: str = "test") -> str:
    head = (
        f"{'configuration':<24}  {split + ' accuracy (%)':>17}  {'NLL':>15}  {'ECE (%)':>13}  "
        f"{'density':>7}  {'train FLOPs':>11}  {'infer. FLOPs':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}"
        nll = f"{r['nll_mean']:.4f} ± {r['nll_std']:.4f}"
        ece = f"{100 * r['ece_mean']:.2f} ± {100 * r['ece_std']:.2f}"
        lines.append(
            f"{r['label']:<24}  {acc:>17}  {nll:>15}  {ece:>13}  {r['density']:7.4f}  "
            f"{r['train_flops']:10.3f}x  {r['inference_flops']:11.3f}x"
        )
    return "\n".join(lines)


CSV_COLUMNS = [
    "label",
    "method",
    "sparsity",
    "sup_tickets",
    "accuracy_mean",
    "accuracy_std",
    "nll_mean",
    "nll_std",
    "ece_mean",
    "ece_std",
    "density",
    "train_flops",
    "inference_flops",
    "itop",
    "live_accuracy_mean",
    "live_accuracy_std",
    "seconds",
]
RUN_COLUMNS = [
    "label",
    "method",
    "sparsity",
    "sup_tickets",
    "seed",
    "accuracy",
    "nll",
    "ece",
    "density",
    "train_flops",
    "inference_flops",
    "itop",
    "live_accuracy",
    "live_vs_ultimate_disagreement",
    "live_vs_ultimate_kl",
    "seconds",
]


def _name(method: str) -> str:
    """``"RigL"`` for ``"rigl"``, ``"RigL 2:4"`` for a structured ``"rigl 2:4"``."""
    head, _, rest = method.partition(" ")
    return f"{NAMES.get(head, head)} {rest}".strip()


def paired_differences(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparse configuration: Sup-tickets minus the same method without it, seed by seed.

    Both runs of a seed start from the same weights and see the same batches until phase 2, so
    the difference of a seed is a paired measurement. Also the superposed minus the last live
    ticket of the same run (what the averaging itself gives).
    """
    base = {(r["method"], r["sparsity"], r["seed"]): r for r in results if not r["sup_tickets"]}
    groups: dict[tuple, list[tuple[int, float, float]]] = {}
    for r in results:
        b = base.get((r["method"], r["sparsity"], r["seed"]))
        if r["sup_tickets"] and b is not None:
            diff = 100 * (r["accuracy"] - b["accuracy"])
            vs_live = 100 * (r["accuracy"] - r["live_accuracy"])
            groups.setdefault((r["method"], r["sparsity"]), []).append((r["seed"], diff, vs_live))
    rows = []
    for (method, sparsity), values in groups.items():
        diffs = [d for _, d, _ in values]
        mean, std = mean_std(diffs)
        rows.append(
            {
                "label": f"{_name(method)} {100 * sparsity:g}%",
                "seeds": [s for s, _, _ in values],
                "diffs": diffs,
                "mean": mean,
                "std": std,
                "wins": sum(d > 0 for d in diffs),
                "vs_live": mean_std([v for _, _, v in values])[0],
            }
        )
    return rows


def paired_structures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per structured configuration: its accuracy minus the unstructured run of the same method,
    sparsity, Sup-tickets arm and seed (same initial weights, same batches), in points."""
    plain = {
        (r["method"], r["sparsity"], r["sup_tickets"], r["seed"]): r
        for r in results
        if not r.get("structure")
    }
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for r in results:
        if not r.get("structure"):
            continue
        base_method = r["method"].split()[0]
        b = plain.get((base_method, r["sparsity"], r["sup_tickets"], r["seed"]))
        if b is not None:
            key = (r["label"], r["sparsity"])
            groups.setdefault(key, []).append((r["seed"], 100 * (r["accuracy"] - b["accuracy"])))
    rows = []
    for (name, _), values in groups.items():
        diffs = [d for _, d in values]
        mean, std = mean_std(diffs)
        rows.append({"label": name, "seeds": [s for s, _ in values], "diffs": diffs,
                     "mean": mean, "std": std, "wins": sum(d > 0 for d in diffs),
                     "vs_live": float("nan")})  # fmt: skip
    return rows


def format_paired(rows: list[dict[str, Any]]) -> str:
    w = max([14, *(len(r["label"]) for r in rows)])
    head = (
        f"{'configuration':<{w}}  {'Sup-tickets - base (points)':>28}  {'wins':>5}  "
        f"{'superposed - live':>17}  per-seed differences"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = f"{r['mean']:+.2f} ± {r['std']:.2f}"
        seeds = " ".join(f"{d:+.2f}" for d in r["diffs"])
        lines.append(
            f"{r['label']:<{w}}  {diff:>28}  {r['wins']}/{len(r['diffs']):<3}  "
            f"{r['vs_live']:>+17.2f}  {seeds}"
        )
    return "\n".join(lines)


def write_files(out: str, config: dict, rows: list[dict], results: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    schedules: dict[str, Any] = {}
    for r in results:
        kind = "sup_tickets" if r["sup_tickets"] else "standard"
        if r["method"] != "dense" and kind not in schedules:
            schedules[kind] = {
                "lr": r["lr"],
                "phase1_steps": r["phase1_steps"],
                "ticket_steps": r["ticket_steps"],
            }
    runs = [{k: v for k, v in r.items() if k != "lr"} for r in results]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "config": config,
                "rows": rows,
                "paired": paired_differences(results),
                "runs": runs,
                "schedules": schedules,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def plot(out: str, results: list[dict[str, Any]], split: str = "test") -> list[str]:
    """lr.png, accuracy.png, density.png; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plots: matplotlib is missing ({e}); pip install 'sparseopt[examples]'")
        return []
    written = []
    sparse = [r for r in results if r["method"] != "dense"]

    # 1. learning rate, with the ticket points
    fig, ax = plt.subplots(figsize=(7, 3.6))
    shown = set()
    for r in sparse:
        kind = r["sup_tickets"]
        if kind in shown:
            continue
        shown.add(kind)
        steps = range(1, len(r["lr"]) + 1)
        ax.plot(steps, r["lr"], label="with Sup-tickets" if kind else "without Sup-tickets")
        if kind:
            ax.plot(
                r["ticket_steps"],
                [r["lr"][s - 1] for s in r["ticket_steps"]],
                "o",
                color="C3",
                label="ticket (cycle end)",
            )
            ax.axvline(r["phase1_steps"], color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per step (phase 2 after the dotted line)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(os.path.join(out, "lr.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 2. test accuracy over steps: live vs superposed ticket, and the run without Sup-tickets
    configs = sorted({(r["method"], r["sparsity"]) for r in sparse}, key=lambda c: (c[1], c[0]))
    methods = sorted({m for m, _ in configs}, key=lambda m: (METHODS.index(m.split()[0]), m))
    sparsities = sorted({s for _, s in configs})
    fig, axes = plt.subplots(
        len(sparsities),
        len(methods),
        figsize=(3.6 * len(methods), 3.0 * len(sparsities)),
        squeeze=False,
    )
    dense = [r for r in results if r["method"] == "dense"]

    def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
        steps = runs[0]["curve"]["step"]
        values = []
        for i in range(len(steps)):
            vals = [r["curve"][key][i] for r in runs if r["curve"][key][i] is not None]
            values.append(100 * sum(vals) / len(vals) if vals else math.nan)
        return steps, values

    def runs_of(method: str, sparsity: float) -> list[dict]:
        return [r for r in sparse if (r["method"], r["sparsity"]) == (method, sparsity)]

    def phase2_tickets(runs: list[dict]) -> list[int]:
        return next((r["ticket_steps"] for r in runs if r["sup_tickets"]), [])

    for i, s in enumerate(sparsities):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            low = 100.0
            without = [
                r for r in sparse if (r["method"], r["sparsity"], r["sup_tickets"]) == (m, s, False)
            ]
            with_sup = [
                r for r in sparse if (r["method"], r["sparsity"], r["sup_tickets"]) == (m, s, True)
            ]
            lines = (
                (dense, "live", {"color": "grey", "ls": ":"}, "dense"),
                (without, "live", {"color": "C0"}, "without Sup-tickets"),
                (with_sup, "live", {"color": "C1"}, "live ticket"),
                (
                    with_sup,
                    "superposed",
                    {"color": "C3", "marker": "o", "ms": 3},
                    "superposed ticket",
                ),
            )
            # The inset zooms on the last 20% of the steps: phase 2, where the tickets are.
            zoom = ax.inset_axes([0.38, 0.08, 0.58, 0.5])
            zoom_low, zoom_high = 100.0, 0.0
            for runs, key, style, name in lines:
                if not runs:
                    continue
                steps, values = mean_curve(runs, key)
                ax.plot(steps, values, label=name, lw=1.2, **style)
                tail = [
                    (st, v)
                    for st, v in zip(steps, values, strict=True)
                    if st >= 0.8 * steps[-1] and v == v
                ]
                if tail and runs is not dense:  # the dense curve would stretch the zoom
                    zoom.plot([st for st, _ in tail], [v for _, v in tail], lw=1.2, **style)
                    zoom_low = min([zoom_low, *(v for _, v in tail)])
                    zoom_high = max([zoom_high, *(v for _, v in tail)])
                half = [
                    v for st, v in zip(steps, values, strict=True) if st > steps[-1] // 3 and v == v
                ]
                low = min([low, *half])
            if zoom_high >= zoom_low:
                pad = max(0.2, 0.15 * (zoom_high - zoom_low))
                zoom.set_ylim(zoom_low - pad, zoom_high + pad)
            for st in phase2_tickets(runs_of(m, s)):
                zoom.axvline(st, color="grey", lw=0.6, ls=":")
            zoom.tick_params(labelsize=6)
            zoom.grid(alpha=0.3)
            ax.set_ylim(max(0.0, low - 2.0), 100.0)
            ax.set_title(f"{_name(m)} {100 * s:g}%", fontsize=10)
            ax.set_xlabel("optimizer step")
            if j == 0:
                ax.set_ylabel(f"{split} accuracy (%), mean over seeds")
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    written.append(os.path.join(out, "accuracy.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 3. the paired per-seed differences, Sup-tickets minus base
    paired = paired_differences(results)
    if paired:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(paired), 3.4))
        for i, r in enumerate(paired):
            jitter = [i + 0.08 * (k - (len(r["diffs"]) - 1) / 2) for k in range(len(r["diffs"]))]
            ax.plot(jitter, r["diffs"], "o", color="C1", ms=4, alpha=0.8)
            ax.errorbar(i + 0.3, r["mean"], yerr=r["std"], fmt="s", color="C3", ms=5, capsize=3)
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(range(len(paired)), [r["label"] for r in paired], rotation=20, fontsize=8)
        ax.set_ylabel(f"{split} accuracy: Sup-tickets - base (points)")
        ax.set_title("Per seed (dots), mean ± std (squares)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        written.append(os.path.join(out, "paired.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # 4. per-layer density of the final models (first seed)
    seed0 = min(r["seed"] for r in results)
    fig, axes = plt.subplots(
        1, max(1, len(sparsities)), figsize=(5.2 * len(sparsities), 3.4), squeeze=False
    )
    for i, s in enumerate(sparsities or [0.0]):
        ax = axes[0][i]
        runs = [r for r in sparse if r["sparsity"] == s and r["seed"] == seed0]
        runs.sort(key=lambda r: (r["method"], r["sup_tickets"]))
        if not runs:
            continue
        # a structure may leave a layer dense (not a sparse layer then): it shows at 1.0
        names = [layer["name"] for layer in max((r["layers"] for r in runs), key=len)]
        width = 0.8 / len(runs)
        for k, r in enumerate(runs):
            xs = [x + (k - (len(runs) - 1) / 2) * width for x in range(len(names))]
            density = {layer["name"]: layer["density"] for layer in r["layers"]}
            heights = [density.get(name, 1.0) for name in names]
            ax.bar(xs, heights, width, label=r["label"])
        ax.axhline(1 - s, color="grey", ls=":", lw=1, label=f"overall {1 - s:.2f}")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel("density")
        ax.set_title(f"per-layer density at {100 * s:g}% sparsity (seed {seed0})", fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(os.path.join(out, "density.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "set", "rigl", "granet"],
        choices=METHODS,
        help="'dense' runs once, without sparsity or Sup-tickets",
    )
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    p.add_argument(
        "--structures",
        nargs="+",
        default=["none"],
        help="mask structures: none, fan_in, N:M (e.g. 2:4); an N:M runs only at its own "
        "sparsity 1 - N/M (make demo-structured)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--sup-tickets",
        choices=["both", "on", "off"],
        default="both",
        help="sparse runs with and/or without Sup-tickets (default: both)",
    )
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder")
    p.add_argument(
        "--data",
        choices=sorted(DATA_DEFAULTS),
        help="mnist1d (default; generated offline), digits (scikit-learn's, --quick's), or "
        "fashion (Debian's dataset-fashion-mnist; make demo-fashion)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a reduced configuration on the digits, for tests: {QUICK} (explicit flags win)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per --data)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, help="model base width (default: per --data)")
    p.add_argument("--distribution", default="erk", choices=["erk", "er", "uniform"])
    p.add_argument(
        "--update-every", type=int, help="ΔT, steps between topology updates (default: per --data)"
    )
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--prune-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--stop-fraction", type=float, default=0.75)
    p.add_argument("--prune-end", type=float, default=0.5, help="GraNet: target reached here")
    p.add_argument("--cycle-steps", type=int, help="Sup-tickets cycle length (default: per --data)")
    p.add_argument("--superpose-fraction", type=float, help="default: per --data")
    p.add_argument("--lr-low", type=float, default=0.001)
    p.add_argument("--lr-high", type=float, default=0.05, help="0.05, chosen on val (paper: 0.005)")
    p.add_argument("--explore-rate", type=float, default=0.0, help="0, chosen on val (paper: 0.5)")
    p.add_argument("--averaging", default="cia", choices=["cia", "caa", "cima"])
    p.add_argument("--reprune", default="layer", choices=["layer", "global"])
    p.add_argument(
        "--include-phase1",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the phase-1 model as ticket 0 (the official code)",
    )
    p.add_argument(
        "--bn",
        choices=["average", "recompute"],
        default="recompute",
        help="BatchNorm statistics of the superposed ticket: averaged, or recomputed over the "
        "training data after each consolidate (the official code)",
    )
    p.add_argument(
        "--eval-every", type=int, help="steps between curve points (default: per --data)"
    )
    p.add_argument(
        "--eval-on",
        choices=["test", "val"],
        default="test",
        help="'val' trains on train minus a val split and reports val: use it to tune",
    )
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--val-fraction", type=float, default=0.2, help="of train, for --eval-on val")
    p.add_argument("--split-seed", type=int, default=0, help="fixes the train/test split")
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (1 = in this process)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    args = p.parse_args(argv)
    if args.data is None:
        args.data = "digits" if args.quick else "mnist1d"
    if args.quick and args.data != "digits":
        p.error("--quick is the reduced digits grid; leave out --data or use --data digits")
    defaults = {**DATA_DEFAULTS[args.data], **(QUICK if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {
        k: getattr(args, k)
        for k in (
            "steps", "batch_size", "lr", "weight_decay", "width", "distribution", "update_every",
            "prune_rate", "prune_schedule", "stop_fraction", "prune_end", "cycle_steps",
            "superpose_fraction", "lr_low", "lr_high", "explore_rate", "averaging", "eval_every",
            "eval_on", "test_fraction", "val_fraction", "split_seed", "data", "reprune",
            "include_phase1", "bn",
        )
    }  # fmt: skip
    arms = {"both": [False, True], "on": [True], "off": [False]}[args.sup_tickets]
    configs = []
    if "dense" in args.methods:
        configs.append(("dense", 0.0, False))
    for s in args.sparsities:
        for structure in args.structures:
            if ":" in structure:  # N:M fixes the sparsity
                n, m_ = (int(v) for v in structure.split(":"))
                if abs(s - (1 - n / m_)) > 1e-9:
                    continue
            for m in args.methods:
                if m != "dense":
                    st = None if structure == "none" else structure
                    configs += [(m, s, sup, st) for sup in arms]
    jobs = []
    for method, sparsity, sup, *structure in configs:
        for seed in args.seeds:
            job = dict(common, method=method, sparsity=sparsity, sup=sup, seed=seed)
            job["structure"] = structure[0] if structure else None
            job["index"] = len(jobs)
            jobs.append(job)
    return jobs


def layer_report(results: list[dict[str, Any]], distribution: str) -> str:
    """The per-layer report of the first plain RigL run (else the first sparse run), next to each
    layer's count from the distribution, computed here independently of the optimizer's masks."""
    sparse = [r for r in results if r["method"] != "dense"]
    if not sparse:
        return ""
    run = next((r for r in sparse if r["method"] == "rigl" and not r["sup_tickets"]), sparse[0])
    layers = run["layers"]
    density = 1.0 - run["sparsity"]
    expected = exact_counts(
        layer_densities(
            distribution,
            [tuple(layer["shape"]) for layer in layers],
            density,
            [layer["name"] for layer in layers],
        ),
        [layer["numel"] for layer in layers],
        density,
    )
    shapes = ["x".join(map(str, layer["shape"])) for layer in layers]
    nw = max(len("layer"), *(len(layer["name"]) for layer in layers))
    sw = max(len("shape"), *(len(s) for s in shapes))
    dist = distribution.upper()
    head = f"{'layer':<{nw}}  {'shape':>{sw}}  {'numel':>7}  {'nnz':>6}  {dist:>6}  density"
    lines = [f"\nper-layer report of {run['label']}, seed {run['seed']}:", head, "-" * len(head)]
    for layer, shape, want in zip(layers, shapes, expected, strict=True):
        lines.append(
            f"{layer['name']:<{nw}}  {shape:>{sw}}  {layer['numel']:>7}  {layer['nnz']:>6}  "
            f"{want:>6}  {layer['density']:.4f}"
        )
    nnz = [layer["nnz"] for layer in layers]
    verdict = "equals" if nnz == expected else "DIFFERS FROM"
    lines.append(
        f"total nnz {sum(nnz)} of {sum(layer['numel'] for layer in layers)}: "
        f"every layer's nnz {verdict} its {dist} count"
    )
    return "\n".join(lines)


def deploy_best(
    args: argparse.Namespace, rows: list[dict[str, Any]], results: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Write the compact file of the best sparse configuration's first seed to ``ticket.sparse``.

    Best: the highest mean accuracy over seeds among the sparse rows. Also measures the dense and
    the sparse-inference latency at batch 1 (``common.deploy``).
    """
    sparse_rows = [r for r in rows if r["method"] != "dense"]
    if not sparse_rows:
        return None
    best = max(sparse_rows, key=lambda r: r["accuracy_mean"])
    run = next(
        r
        for r in results
        if (r["method"], r["sparsity"], r["sup_tickets"])
        == (best["method"], best["sparsity"], best["sup_tickets"])
    )
    model = SignalCNN(width=args.width) if args.data == "mnist1d" else DigitsCNN(width=args.width)
    model.load_state_dict(run["state"])
    path = os.path.join(args.out, "ticket.sparse")
    example = torch.randn(1, *DATASETS[args.data][0])
    info = deploy(model, path, example)
    return {"label": run["label"], "seed": run["seed"], "path": path, **info}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    jobs = make_jobs(args)
    what = "validation" if args.eval_on == "val" else "test"
    what_data = {
        "mnist1d": "SignalCNN on MNIST-1D (generated offline)",
        "digits": "DigitsCNN on the UCI digits",
        "fashion": "DigitsCNN on Fashion-MNIST",
    }[args.data]
    print(
        f"sparseopt demo: {what_data}, {len(jobs)} runs of {args.steps} steps "
        f"(batch {args.batch_size}), {what} split held out; {args.workers} worker(s)"
    )
    results = run_grid(jobs, args.workers, args.threads, args.progress)
    rows = aggregate(results)
    print()
    print(f"{what} metrics, mean ± std over seeds {args.seeds}; FLOPs relative to dense")
    print(format_table(rows, "val" if args.eval_on == "val" else "test"))
    by_structure = paired_structures(results)
    if by_structure:
        print(f"\npaired by seed: {what} accuracy of each structure minus unstructured")
        print(format_paired(by_structure))
    paired = paired_differences(results)
    if paired:
        print(f"\npaired by seed: {what} accuracy of Sup-tickets minus the same method without it")
        print(format_paired(paired))
    print(layer_report(results, args.distribution))
    os.makedirs(args.out, exist_ok=True)
    deployed = deploy_best(args, rows, results)
    if deployed is not None:
        print(f"\nthe deployed ticket: {deployed['label']}, seed {deployed['seed']}")
        print(format_deploy(deployed, deployed["path"]))
    for r in results:
        r.pop("state", None)
    config = {k: v for k, v in vars(args).items() if k not in ("progress", "plots")}
    write_files(args.out, config, rows, results)
    split = "val" if args.eval_on == "val" else "test"
    written = plot(args.out, results, split) if args.plots else []
    elapsed = time.perf_counter() - started
    print(
        "\nwrote results.json, results.csv, runs.csv"
        + (", " + ", ".join(os.path.basename(w) for w in written) if written else "")
        + f" to {args.out}/ in {elapsed:.1f} s"
    )
    return {
        "rows": rows,
        "runs": results,
        "paired": paired,
        "paired_structures": by_structure,
        "deployed": deployed,
        "out": args.out,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
