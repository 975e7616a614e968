"""SET-MLP on Fashion-MNIST: the SET paper's own benchmark, as a check of our SET.

Mocanu et al., *Scalable training of artificial neural networks with adaptive sparse
connectivity inspired by network science* (Nature Communications 9:2383, 2018). The protocol is
the one of the official code's Fashion-MNIST script
(dcmocanu/sparse-evolutionary-artificial-neural-networks, ``set_mlp_keras_fashionmnist.py``; the
sources and the differences are in ``docs/study/set-mlp.md``):

- 784-1000-1000-1000-10, ReLU, dropout 0.3 after each hidden layer, softmax cross-entropy;
- the three hidden weight matrices sparse, Erdős–Rényi with ``epsilon = 20``: a layer
  ``n_in x n_out`` has density ``epsilon * (n_in + n_out) / (n_in * n_out)``; the classifier dense;
- after every epoch but the last, ``zeta = 0.3`` of each layer's connections closest to zero are
  removed and as many grown at random (at weight 0);
- SGD, learning rate 0.01, momentum 0.9, batch 100, no weight decay, pixels in [0, 1].

Our SET maps onto it exactly (``build``): the classifier in a ``"sparse": False`` param group,
``distribution="er"`` at the sparsity that ε gives (``epsilon_sparsity``; our ER loop then gives
each layer exactly the paper's density, checked in ``tests/test_wide.py``), ``prune_rate=zeta``,
``prune_schedule="constant"``, ``update_every`` one epoch, and updates stopped before the last
step (``stop_fraction``), so the last epoch ends without one.

    python examples/research/set_mlp.py --time                  # cost per epoch, 1 and 2 threads
    python examples/research/set_mlp.py --kernels --out runs/set_mlp  # the full protocol, 3 seeds
    python examples/research/set_mlp.py --epochs 5 --seeds 0 1 2 --out runs/set_mlp-pilot
    python examples/research/set_mlp.py --report runs/set_mlp-pilot/results.jsonl
    python examples/research/set_mlp.py --tiny --out /tmp/s          # seconds (tests)
    python examples/research/set_mlp.py --methods set-settle --kernels  # a diagnostic arm

``set-settle`` (not the paper's) is SET whose rewiring stops for the last 10% of the epochs.

``--kernels`` runs the sparse arms' hidden layers on ``sparseopt.sparse_kernels`` (the same
masks, 2.6 times faster an epoch here). Results are appended to ``OUT/results.jsonl``, one line
per run as it finishes; a run already in the file is skipped, so a stopped study resumes.
Validation (10,000 images carved from the training set) is recorded every epoch; the test set
once, at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from data import Split, fashion_mnist_split
from torch import Tensor, nn

from sparseopt import SparseOptimizer, sparse_kernels

HIDDEN = (1000, 1000, 1000)
# the official Fashion-MNIST script (its `fit` path, the one its __main__ runs)
PROTOCOL: dict[str, Any] = {
    "epsilon": 20,
    "zeta": 0.3,
    "epochs": 200,
    "batch": 100,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "dropout": 0.3,
    "kernels": False,  # the hidden layers on sparseopt.sparse_kernels (the same masks, faster)
}
# MLP, MLP-FixProb, SET-MLP in the paper's names; "set-settle" (a diagnostic, not the paper's) is
# SET whose rewiring stops for the last SETTLE of the epochs, so that no connection is only one
# epoch old when the model is evaluated
METHODS = ("dense", "static", "set", "set-settle")
PAPER_METHODS = METHODS[:3]
SETTLE = 0.1


class SetMLP(nn.Module):
    """The SET paper's MLP: ``in -> hidden... -> classes``, ReLU and dropout after hidden layers.

    Weights start as Keras' ``Dense`` default (Glorot uniform, biases 0), as in the official code.
    The hidden layers are ``hidden.0`` ... ``hidden.{n-1}``; the classifier is ``classifier``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = HIDDEN,
        num_classes: int = 10,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.classifier = nn.Linear(sizes[-1], num_classes)
        self.dropout = nn.Dropout(dropout)
        for layer in [*self.hidden, self.classifier]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.dropout(F.relu(layer(x)))
        return self.classifier(x)


def epsilon_density(epsilon: float, n_in: int, n_out: int) -> float:
    """The SET paper's Erdős–Rényi layer density ``ε (n_in + n_out) / (n_in n_out)``, at most 1."""
    return min(1.0, epsilon * (n_in + n_out) / (n_in * n_out))


def epsilon_sparsity(model: SetMLP, epsilon: float) -> float:
    """The overall sparsity of the hidden layers that ``epsilon`` gives (the classifier is dense).

    Our ``"er"`` distribution gives layer ``l`` a density ``c * (n_out + n_in) / (n_out * n_in)``
    with one constant ``c`` chosen so that the total matches the overall density (layers above 1
    made dense). At this sparsity ``c == epsilon``: every layer gets the paper's density.
    """
    active = total = 0.0
    for layer in model.hidden:
        n_out, n_in = layer.weight.shape
        active += epsilon_density(epsilon, n_in, n_out) * n_in * n_out
        total += n_in * n_out
    return 1.0 - active / total


def fashion_flat(tiny: bool = False) -> Split:
    """Fashion-MNIST as ``(N, 784)`` floats in [0, 1]: 50,000 train, 10,000 val (from train), test.

    ``data.fashion_mnist_split`` reads the IDX files offline; the test set is the official one.
    """
    split = fashion_mnist_split()
    parts = {k: v.flatten(1) if k.startswith("x") else v for k, v in vars(split).items()}
    if tiny:
        parts = {k: v[:600] if "train" in k else v[:300] for k, v in parts.items()}
    return Split(**parts)


def build(
    method: str, seed: int, config: dict[str, Any], steps_per_epoch: int, hidden=HIDDEN
) -> tuple[SetMLP, torch.optim.Optimizer]:
    """The model (the same initial weights for every method of a seed) and its optimizer."""
    torch.manual_seed(seed)
    model = SetMLP(hidden=hidden, dropout=config["dropout"])
    groups = [
        {"params": list(model.hidden.parameters())},
        {"params": list(model.classifier.parameters()), "sparse": False},  # dense, as the paper's
    ]
    inner = torch.optim.SGD(
        groups, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    if method == "dense":
        for g in inner.param_groups:
            g.pop("sparse", None)
        return model, inner
    epochs = config["epochs"]
    # the last update after epoch E - settle, none in the last `settle` epochs (SET: one epoch)
    settle = max(1, round(SETTLE * epochs)) if method == "set-settle" else 1
    opt = SparseOptimizer(
        inner,
        method.removesuffix("-settle"),
        epsilon_sparsity(model, config["epsilon"]),
        distribution="er",
        update_every=steps_per_epoch,
        prune_rate=config["zeta"],
        prune_schedule="constant",
        stop_fraction=(epochs - settle + 0.5) / epochs,
        total_steps=epochs * steps_per_epoch,
        model=model,
        seed=seed,
    )
    return model, opt


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2000) -> float:
    was = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + chunk]).argmax(-1) == y[i : i + chunk]).sum().item()
        for i in range(0, len(y), chunk)
    )
    model.train(was)
    return correct / len(y)


def run(job: dict[str, Any], split: Split) -> dict[str, Any]:
    """One training run; returns its record (validation per epoch, test once at the end)."""
    config = job["config"]
    batch, epochs = config["batch"], config["epochs"]
    steps = len(split.y_train) // batch
    model, opt = build(job["method"], job["seed"], config, steps, tuple(job["hidden"]))
    handle = sparse_kernels(model, opt) if config["kernels"] and job["method"] != "dense" else None
    order = torch.Generator().manual_seed(1000 + job["seed"])  # the same batches for every method
    dropout = torch.Generator().manual_seed(2000 + job["seed"])
    val_curve, seconds = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(split.y_train), generator=order)
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=dropout)))  # dropout masks
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
        val_curve.append(accuracy(model, split.x_val, split.y_val))
        if len(val_curve) % 10 == 0 or len(val_curve) == epochs:  # progress of a long run
            print(
                f"  {job['method']} seed {job['seed']} epoch {len(val_curve)}/{epochs}: "
                f"val {100 * val_curve[-1]:.2f}, {seconds[-1]:.1f} s",
                flush=True,
            )
    record = {
        **{k: job[k] for k in ("method", "seed", "hidden", "threads")},
        "config": config,
        "val": val_curve[-1],
        "val_best": max(val_curve),
        "val_curve": val_curve,
        "test": accuracy(model, split.x_test, split.y_test),
        "seconds_per_epoch": statistics.median(seconds),
        "seconds": sum(seconds),
    }
    if handle is not None:
        record["kernels"] = [
            {k: row[k] for k in ("name", "layout", "reason", "sparse_calls", "dense_calls")}
            for row in handle.report()
        ]
        handle.remove()
    if isinstance(opt, SparseOptimizer):
        report = opt.report()
        record["density"] = opt.density
        record["active"] = {r["name"]: r.get("active", r["nnz"]) for r in report["layers"]}
        record["updates"] = report["updates"]["updates"]
    return record


def time_steps(threads: int, steps: int = 40, hidden=HIDDEN) -> dict[str, float]:
    """Median seconds per training step of batch 100: dense, masked-dense SET, SET on kernels."""
    torch.set_num_threads(threads)
    config = {**PROTOCOL, "epochs": 10}
    x, y = torch.rand(100, 784), torch.randint(0, 10, (100,))
    out = {}
    for method in ("dense", "set", "set-kernels"):
        model, opt = build(method.split("-")[0], 0, config, steps_per_epoch=10**6, hidden=hidden)
        if method == "set-kernels":
            sparse_kernels(model, opt)
        out[method] = median_step_seconds(model, opt, x, y, steps)
    return out


def median_step_seconds(model, opt, x: Tensor, y: Tensor, steps: int, warmup: int = 5) -> float:
    """Median seconds of one training step (forward, cross-entropy, backward, ``opt.step()``)
    over ``steps`` steps after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- report ---------------------------------------------------------------------------------------
def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


# the paired differences a report shows, where both methods ran a seed
PAIRS = (("set", "static"), ("set", "dense"), ("set-settle", "set"), ("set-settle", "static"))
CURVE_EPOCHS = (1, 5, 10, 25, 50, 100, 150, 200)
CURVE_WINDOW = 5


def report(path: str) -> str:
    """Accuracy per method (mean ± std over seeds), the paired differences of ``PAIRS`` at the end
    and over training."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    by: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in records:
        key = (r["config"]["epochs"], r["config"]["epsilon"], tuple(r["hidden"]))
        by.setdefault(key, {}).setdefault(r["method"], {})[r["seed"]] = r
    lines = []
    for (epochs, eps, hidden), methods in sorted(by.items()):
        lines.append(f"\n### {epochs} epochs, ε = {eps}, hidden {'-'.join(map(str, hidden))}\n")
        lines.append("| method | seeds | val (last) | val (best) | test | density | s/epoch |")
        lines.append("|---|---|---|---|---|---|---|")
        for m in METHODS:
            runs = methods.get(m, {})
            if not runs:
                continue
            rs = [runs[s] for s in sorted(runs)]
            density = f"{statistics.fmean(r.get('density', 1.0) for r in rs):.4f}"
            lines.append(
                f"| {m} | {len(rs)} | {_ms([100 * r['val'] for r in rs])} "
                f"| {_ms([100 * r['val_best'] for r in rs])} "
                f"| {_ms([100 * r['test'] for r in rs])} "
                f"| {density} | {statistics.fmean(r['seconds_per_epoch'] for r in rs):.1f} |"
            )
        pairs = {
            (a, b): sorted(set(methods.get(a, {})) & set(methods.get(b, {}))) for a, b in PAIRS
        }
        pairs = {pair: seeds for pair, seeds in pairs.items() if seeds}
        if pairs:
            lines.append("\n| difference | split | mean ± std | per-seed differences |")
            lines.append("|---|---|---|---|")
            for (a, b), seeds in pairs.items():
                for split in ("val", "test"):
                    d = [100 * (methods[a][s][split] - methods[b][s][split]) for s in seeds]
                    lines.append(
                        f"| {a} − {b} | {split} | {_ms(d)} | {' '.join(f'{x:+.2f}' for x in d)} |"
                    )
            lines.extend(curve_rows(methods, pairs, epochs))
    return "\n".join(lines)


def curve_rows(
    methods: dict[str, dict[int, dict]], pairs: dict[tuple[str, str], list[int]], epochs: int
) -> list[str]:
    """Validation accuracy over training: each pair's difference over its paired seeds, at the
    epochs of ``CURVE_EPOCHS`` (and the last one) that the runs reached; each entry is the mean
    over the ``CURVE_WINDOW`` epochs ending there (one epoch's accuracy moves by a few tenths)."""
    marks = sorted({e for e in CURVE_EPOCHS if e <= epochs} | {epochs})
    lines = [
        "\nValidation over training, paired by seed (mean ± std over seeds of the mean over the "
        f"{CURVE_WINDOW} epochs ending at each mark; in brackets the number of seeds):\n",
        "| epoch | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for e in marks:
        window = slice(max(0, e - CURVE_WINDOW), e)
        cells = []
        for (a, b), seeds in pairs.items():
            d = [
                100 * statistics.fmean(methods[a][s]["val_curve"][window])
                - 100 * statistics.fmean(methods[b][s]["val_curve"][window])
                for s in seeds
            ]
            cells.append(f"{_ms(d)} ({len(d)})")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(PAPER_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=PROTOCOL["epochs"])
    p.add_argument("--epsilon", type=float, default=PROTOCOL["epsilon"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernels", action="store_true", help="sparse arms on sparse_kernels")
    p.add_argument("--tiny", action="store_true", help="a few hundred images, hidden 64 (tests)")
    p.add_argument("--time", action="store_true", help="time a training step, 1 and 2 threads")
    p.add_argument("--out", default="runs/set_mlp")
    p.add_argument("--report", metavar="JSONL", help="print the tables of finished runs")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    hidden = (64, 64, 64) if args.tiny else HIDDEN
    if args.time:
        steps = 500  # 50,000 training images at batch 100
        for threads in (1, 2):
            t = time_steps(threads, hidden=hidden)
            cost = [f"{k} {1e3 * v:.1f} ms/step ({steps * v:.1f} s/epoch)" for k, v in t.items()]
            print(f"{threads} thread(s): " + ", ".join(cost), flush=True)
        return
    torch.set_num_threads(args.threads)
    config = {**PROTOCOL, "epochs": args.epochs, "epsilon": args.epsilon, "kernels": args.kernels}
    if args.tiny:
        config["epsilon"] = min(args.epsilon, 5)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done.add((r["method"], r["seed"], json.dumps(r["config"], sort_keys=True)))
    split = fashion_flat(args.tiny)
    key = json.dumps(config, sort_keys=True)
    jobs = [
        {"method": m, "seed": s, "config": config, "hidden": list(hidden), "threads": args.threads}
        for s in args.seeds
        for m in args.methods
        if (m, s, key) not in done
    ]
    print(f"{len(jobs)} runs to go ({len(done)} in {path})", flush=True)
    for n, job in enumerate(jobs, 1):
        record = run(job, split)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"[{n}/{len(jobs)}] {job['method']} seed {job['seed']}: val {100 * record['val']:.2f}, "
            f"test {100 * record['test']:.2f}, {record['seconds_per_epoch']:.1f} s/epoch",
            flush=True,
        )
    print(report(path))


if __name__ == "__main__":
    main()
