"""Weight-scale health of sparse training: per-output-channel norms over a run.

The study's phase-1 RigL models on MNIST-1D (SignalCNN with BatchNorm) showed convolution weights
of |w| = 30 up to 2e5 where healthy runs stay near 2, channel norms within a layer 1e5 apart, and
only 7 to 14 of 32 channels alive at 95%. This script measures that, finds the cause, and tries a
scale-aware drop criterion. The findings are in ``docs/study/weight-health.md``.

The diagnostic (used by the experiments and tested in ``tests/test_wide.py``):

- :func:`channel_norms`: the L2 norm of every output channel (row of ``weight.flatten(1)``),
  counting only active connections when a mask is given;
- :func:`layer_health`: per layer, the channel norms, the channels alive (at least one active
  connection with a nonzero weight), the largest ``|w|``, and the max/median norm ratio over the
  alive channels;
- :class:`HealthTrace`: the same, recorded every ``every`` steps over a run, plus what each
  topology update did to the channels (grown into dead channels, channels killed).

The experiments train the study's "short" regime (MNIST-1D, SignalCNN width 32, 3,000 steps of
batch 128, SGD 0.1 with x0.1 at 1/2 and 3/4, weight decay 5e-4, ΔT = 50), paired by seed:

    python examples/research/health.py --experiment cause --out runs/health    # the ablations
    python examples/research/health.py --experiment scale --out runs/health    # scale-aware RigL
    python examples/research/health.py --experiment tickets --out runs/health  # Sup-tickets
    python examples/research/health.py --report runs/health                    # the tables

Every run appends one JSON line to ``OUT/<experiment>.jsonl``; finished runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseopt import SparseOptimizer, available_methods, register_method
from sparseopt.methods import RigL

__all__ = [
    "HealthTrace",
    "ScaleAwareRigL",
    "channel_norms",
    "layer_health",
    "model_health",
    "register",
]


# --- the diagnostic -------------------------------------------------------------------------------
def channel_norms(weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """The L2 norm of each output channel: row ``i`` of ``weight.flatten(1)`` (only active ones)."""
    w = weight.detach().float()
    if mask is not None:
        w = w * mask
    return w.flatten(1).norm(dim=1)


def layer_health(weight: Tensor, mask: Tensor | None = None) -> dict[str, Any]:
    """Scale statistics of one weight: channel norms, alive channels, max ``|w|``, max/median.

    A channel is alive when it has at least one active connection with a nonzero weight; a dead
    channel's pre-activations are constant 0. The ratio is over the alive channels (``inf`` with
    a median of 0, ``nan`` with none alive).
    """
    w = weight.detach().float()
    if mask is not None:
        w = w * mask
    rows = w.flatten(1)
    norms = rows.norm(dim=1)
    alive = (rows != 0).any(dim=1)
    live = norms[alive]
    if live.numel():
        median = live.median().item()
        ratio = live.max().item() / median if median > 0 else float("inf")
    else:
        median, ratio = 0.0, float("nan")
    return {
        "channels": int(norms.numel()),
        "alive": int(alive.sum()),
        "max_abs": float(w.abs().max()),
        "median_norm": median,
        "max_norm": float(norms.max()),
        "ratio": ratio,
        "norms": norms.tolist(),
    }


def model_health(
    model: nn.Module, masks: Mapping[Tensor, Tensor] | None = None, min_dim: int = 2
) -> dict[str, dict[str, Any]]:
    """:func:`layer_health` of every weight with ``ndim >= min_dim``, by parameter name."""
    masks = masks or {}
    return {
        name: layer_health(p, masks.get(p))
        for name, p in model.named_parameters()
        if p.ndim >= min_dim
    }


class HealthTrace:
    """Records :func:`model_health` over a run and what each topology update did to the channels.

    Call :meth:`before_step` right before ``opt.step()`` and :meth:`after_step` right after it.
    When the masks changed in that step (a topology update), the trace records per layer how
    many connections were grown, how many of them into channels that were dead before (norm 0)
    or small (norm below a tenth of the median of the alive channels, dead ones included), and
    the channels alive after it. The snapshots show the jump in scale that follows.
    """

    def __init__(self, model: nn.Module, opt: SparseOptimizer | None, every: int = 50) -> None:
        self.model, self.opt, self.every = model, opt, every
        self.names = {p: n for n, p in model.named_parameters()}
        self.snapshots: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self._before: dict[Tensor, tuple[Tensor, Tensor]] = {}

    def _masks(self) -> Mapping[Tensor, Tensor]:
        return {} if self.opt is None else self.opt.masks

    def before_step(self) -> None:
        if self.opt is None:
            return
        self._before = {
            p: (m.clone(), channel_norms(p, m)) for p, m in self._masks().items() if p.ndim > 2
        }

    def after_step(self, step: int) -> None:
        masks = self._masks()
        for p, (old_mask, old_norms) in self._before.items():
            new = masks[p]
            if torch.equal(old_mask, new):
                continue
            grown = new & ~old_mask
            dead_before = old_norms == 0
            live = old_norms[~dead_before]
            small = old_norms < 0.1 * (live.median() if live.numel() else old_norms.new_tensor(0.0))
            rows_grown = grown.flatten(1).sum(dim=1)
            health = layer_health(p, new)
            self.updates.append(
                {
                    "step": step,
                    "layer": self.names[p],
                    "grown": int(grown.sum()),
                    "grown_into_dead": int(rows_grown[dead_before].sum()),
                    "grown_into_small": int(rows_grown[small].sum()),
                    "dead_before": int(dead_before.sum()),
                    "alive_after": health["alive"],
                    "norms_before": old_norms.tolist(),
                }
            )
        if step % self.every == 0:
            self.snapshots.append(
                {
                    "step": step,
                    "layers": {
                        n: {k: v for k, v in h.items() if k != "norms"}
                        for n, h in model_health(self.model, masks).items()
                    },
                }
            )

    def summary(self) -> dict[str, Any]:
        """Per layer over the run: largest ``|w|``, largest ratio, fewest alive channels."""
        out: dict[str, dict[str, float]] = {}
        for snap in self.snapshots:
            for name, h in snap["layers"].items():
                o = out.setdefault(name, {"max_abs": 0.0, "max_ratio": 0.0, "min_alive": 1e9})
                o["max_abs"] = max(o["max_abs"], h["max_abs"])
                if h["ratio"] == h["ratio"]:  # not nan
                    o["max_ratio"] = max(o["max_ratio"], h["ratio"])
                o["min_alive"] = min(o["min_alive"], h["alive"])
        return out


# --- the scale-aware criterion (a prototype outside the library) ---------------------------------
class ScaleAwareRigL(RigL):
    """RigL whose drop ranks each weight against its own output channel: ``|w| / rms(channel)``.

    Magnitude ranking across the channels of a layer assumes they share one scale. Behind a
    BatchNorm a channel's function does not depend on its scale, so channels of very different
    norms rank by an arbitrary number, and the small ones lose all their connections. Dividing
    by the root mean square of the channel's active weights ranks within each channel (every
    channel of a layer loses about the same fraction); ``grow="direction"`` also multiplies
    RigL's ``|grad|`` by the channel norm, the gradient of the weight's direction, which is what
    BatchNorm makes the channel's output depend on.

    Args:
        scope (str): ``"conv"`` (only weights with more than two dimensions, the convolutions
            that BatchNorm follows here) or ``"all"``. Default: ``"conv"``.
        grow (str): ``"gradient"`` (RigL's ``|grad|``) or ``"direction"``. Default:
            ``"gradient"``.
    """

    name = "rigl-scale"

    def __init__(self, *, scope: str = "conv", grow: str = "gradient", **options: Any) -> None:
        super().__init__(**options)
        if scope not in ("conv", "all"):
            raise ValueError(f"Expected scope 'conv' or 'all', but got {scope!r}")
        if grow not in ("gradient", "direction"):
            raise ValueError(f"Expected grow 'gradient' or 'direction', but got {grow!r}")
        self.scope, self.grow = scope, grow

    def options(self) -> dict[str, Any]:
        return {**super().options(), "scope": self.scope, "grow": self.grow}

    def _applies(self, p: Tensor) -> bool:
        return self.scope == "all" or p.ndim > 2

    @staticmethod
    def _rms(w: Tensor, mask: Tensor) -> Tensor:
        """Per output channel, the RMS of the active weights, shaped to broadcast against ``w``."""
        rows = (w * mask).flatten(1)
        count = mask.flatten(1).sum(dim=1).clamp(min=1)
        rms = (rows.square().sum(dim=1) / count).sqrt()
        return rms.view(-1, *([1] * (w.ndim - 1)))

    def drop_scores(self, layer) -> Tensor:
        w = layer.param.detach().abs()
        if not self._applies(layer.param):
            return w
        rms = self._rms(w, layer.mask)
        return torch.where(rms > 0, w / rms.clamp(min=1e-30), torch.zeros_like(w))

    def grow_scores(self, layer, grad, generator):
        scores = super().grow_scores(layer, grad, generator)
        if self.grow == "direction" and self._applies(layer.param) and grad is not None:
            scores = scores * self._rms(layer.param.detach(), layer.mask)
        return scores


def register() -> None:
    """Make ``method="rigl-scale"`` available (the experiments build optimizers by name)."""
    if "rigl-scale" not in available_methods():
        register_method("rigl-scale", ScaleAwareRigL)


# --- the experiments ------------------------------------------------------------------------------
SHORT = {"epochs": 120, "batch": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}

# arm -> (method, options for SparseOptimizer, model/optimizer changes)
ARMS: dict[str, dict[str, Any]] = {
    "dense": {"method": "dense"},
    "set": {"method": "set"},
    "rigl": {"method": "rigl"},
    # the cause: growth criterion, weight decay, BatchNorm, the kick of a regrown channel
    "rigl-random-growth": {"method": "rigl", "opt": {"growth": "random"}},
    "set-gradient-growth": {"method": "set", "opt": {"growth": "gradient"}},
    "rigl-wd0": {"method": "rigl", "weight_decay": 0.0},
    "rigl-bn-eps1e-1": {"method": "rigl", "bn_eps": 0.1},
    "rigl-no-bn": {"method": "rigl", "no_bn": True},
    "dense-no-bn": {"method": "dense", "no_bn": True},
    "rigl-no-momentum": {"method": "rigl", "momentum": 0.0},
    # the remedy
    "rigl-scale": {"method": "rigl-scale"},
    "rigl-scale-direction": {"method": "rigl-scale", "opt": {"grow": "direction"}},
    # no channel can die: every output channel keeps the same number of connections
    "rigl-fan-in": {"method": "rigl", "opt": {"structure": "fan_in"}},
    "set-fan-in": {"method": "set", "opt": {"structure": "fan_in"}},
    "set-bn-eps1e-1": {"method": "set", "bn_eps": 0.1},
    # the remedies together, and what the model-side one costs the dense model
    "set-scale": {"method": "rigl-scale", "opt": {"growth": "random"}},
    "rigl-scale-bn-eps1e-1": {"method": "rigl-scale", "bn_eps": 0.1},
    "dense-bn-eps1e-1": {"method": "dense", "bn_eps": 0.1},
}
EXPERIMENTS = {
    "cause": [
        "dense", "set", "rigl", "rigl-random-growth", "set-gradient-growth", "rigl-wd0",
        "rigl-bn-eps1e-1", "rigl-no-bn", "dense-no-bn", "rigl-no-momentum",
    ],
    "scale": [
        "dense", "rigl", "rigl-scale", "rigl-scale-direction", "rigl-fan-in", "rigl-bn-eps1e-1",
        "set", "set-fan-in", "set-bn-eps1e-1",
    ],
    "combo": ["dense-bn-eps1e-1", "set-scale", "rigl-scale-bn-eps1e-1"],
}  # fmt: skip


def _split(tiny: bool):
    from study import load

    return load("mnist1d", tiny=tiny)


def build_arm(arm: str, seed: int, sparsity: float, total: int, update_every: int):
    """The study's SignalCNN and optimizer, with the arm's changes."""
    from models import SignalCNN

    spec = ARMS[arm]
    register()
    torch.manual_seed(seed)
    model = SignalCNN(width=32)
    if spec.get("no_bn"):
        for i, m in enumerate(model.features):
            if isinstance(m, nn.BatchNorm1d):
                model.features[i] = nn.Identity()
            elif isinstance(m, nn.Conv1d):
                m.bias = nn.Parameter(torch.zeros(m.out_channels))
    if "bn_eps" in spec:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.eps = spec["bn_eps"]
    inner = torch.optim.SGD(
        model.parameters(),
        lr=SHORT["lr"],
        momentum=spec.get("momentum", SHORT["momentum"]),
        weight_decay=spec.get("weight_decay", SHORT["weight_decay"]),
    )
    if spec["method"] == "dense":
        return model, inner, None
    opt = SparseOptimizer(
        inner,
        spec["method"],
        sparsity,
        update_every=update_every,
        total_steps=total,
        model=model,
        seed=seed,
        **spec.get("opt", {}),
    )
    return model, opt, opt


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).double().mean().item()
    model.train(was)
    return acc


def run_arm(job: dict[str, Any], split=None) -> dict[str, Any]:
    """One training run of the short regime with a :class:`HealthTrace`; its JSON record."""
    torch.set_num_threads(1)
    split = split or _split(job["tiny"])
    batch = SHORT["batch"] if not job["tiny"] else 64
    per_epoch = len(split.y_train) // batch
    total = (SHORT["epochs"] if not job["tiny"] else 6) * per_epoch
    update_every = 2 * per_epoch
    model, opt, sparse = build_arm(job["arm"], job["seed"], job["sparsity"], total, update_every)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, 3 * total // 4], 0.1)
    trace = HealthTrace(model, sparse, every=update_every)
    gen = torch.Generator().manual_seed(1000 + job["seed"])  # the study's batch order
    t0 = time.perf_counter()
    step = 0
    while step < total:
        perm = torch.randperm(len(split.y_train), generator=gen)
        for i in range(per_epoch):
            step += 1
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad()
            loss.backward()
            trace.before_step()
            opt.step()
            trace.after_step(step)
            sched.step()
            if not torch.isfinite(loss):
                break
    final = model_health(model, None if sparse is None else sparse.masks)
    return {
        **{k: job[k] for k in ("experiment", "arm", "sparsity", "seed")},
        "val": _accuracy(model, split.x_val, split.y_val),
        "test": _accuracy(model, split.x_test, split.y_test),
        "final": final,
        "summary": trace.summary(),
        "updates": trace.updates,
        "snapshots": trace.snapshots,
        "seconds": time.perf_counter() - t0,
    }


def run_tickets(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's cell (base, phase 1, Sup-tickets variants) for ``rigl`` or ``rigl-scale``."""
    from study import run_cell

    register()
    records = run_cell(
        {
            "data": "mnist1d",
            "regime": "short",
            "method": job["arm"],
            "sparsity": job["sparsity"],
            "seed": job["seed"],
            "variants": ["default", "explore0", "official", "high0.05-explore0-bn"],
            "update_every": None,
            "line": True,
            "tiny": job["tiny"],
        }
    )
    return [{**r, "experiment": "tickets", "arm": job["arm"]} for r in records]


# --- report ---------------------------------------------------------------------------------------
def _ms(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    v = list(values)
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(v))} ± {fmt.format(std)}"


def _conv_summary(r: dict[str, Any]) -> tuple[float, float, float]:
    """Over the conv layers and the run: max |w|, max ratio, fewest alive channels."""
    conv = [v for k, v in r["summary"].items() if k.startswith("features")] or [
        {"max_abs": 0.0, "max_ratio": 0.0, "min_alive": 0}
    ]
    return (
        max(v["max_abs"] for v in conv),
        max(v["max_ratio"] for v in conv),
        min(v["min_alive"] for v in conv),
    )


def report(out: str) -> str:
    lines = []
    for experiment in ("cause", "scale", "combo"):
        path = os.path.join(out, f"{experiment}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        lines.append(f"\n## {experiment} ({len(records)} runs)\n")
        lines.append(
            "| arm | sparsity | seeds | val | test | max \\|w\\| (conv, median over seeds) "
            "| runs with \\|w\\| > 10 | max/median channel norm (median) | fewest alive "
            "channels (median) | grown into dead / small channels |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in records:
            groups[(r["arm"], r["sparsity"])].append(r)
        order = {a: i for i, a in enumerate(ARMS)}
        ranked = sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0][0]]))
        for (arm, sparsity), rs in ranked:
            stats = [_conv_summary(r) for r in rs]
            grown = sum(u["grown"] for r in rs for u in r["updates"])
            into_dead = sum(u["grown_into_dead"] for r in rs for u in r["updates"])
            into_small = sum(u.get("grown_into_small", 0) for r in rs for u in r["updates"])
            dead_share = "–"
            if grown:
                dead_share = f"{100 * into_dead / grown:.1f}% / {100 * into_small / grown:.1f}%"
            lines.append(
                f"| {arm} | {100 * sparsity:g}% | {len(rs)} | {_ms(100 * r['val'] for r in rs)} "
                f"| {_ms(100 * r['test'] for r in rs)} "
                f"| {statistics.median(s[0] for s in stats):.3g} "
                f"| {sum(s[0] > 10 for s in stats)}/{len(rs)} "
                f"| {statistics.median(s[1] for s in stats):.3g} "
                f"| {statistics.median(s[2] for s in stats):g} | {dead_share} |"
            )
        # paired differences against rigl, per sparsity
        by_seed = {(r["arm"], r["sparsity"], r["seed"]): r for r in records}
        lines.append("\n| arm minus rigl | sparsity | val diff | test diff | per-seed (val) |")
        lines.append("|---|---|---|---|---|")
        for (arm, sparsity), rs in ranked:
            if arm == "rigl":
                continue
            pairs = [(r, by_seed.get(("rigl", sparsity, r["seed"]))) for r in rs]
            pairs = [(a, b) for a, b in pairs if b is not None]
            if not pairs:
                continue
            dv = [100 * (a["val"] - b["val"]) for a, b in pairs]
            dt = [100 * (a["test"] - b["test"]) for a, b in pairs]
            lines.append(
                f"| {arm} | {100 * sparsity:g}% | {_ms(dv)} | {_ms(dt)} "
                f"| {' '.join(f'{x:+.1f}' for x in dv)} |"
            )
    path = os.path.join(out, "tickets.jsonl")
    if os.path.exists(path):
        from study import print_report

        lines.append("\n## tickets (the study's report, rigl and rigl-scale as methods)\n")
        lines.append(print_report(path))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiment", choices=[*EXPERIMENTS, "tickets"])
    p.add_argument("--arms", nargs="+", help="default: the experiment's arms")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.95])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--tiny", action="store_true", help="a few hundred steps, for tests")
    p.add_argument("--out", default="runs/health")
    p.add_argument("--report", metavar="OUT", help="print the tables of finished experiments")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    if not args.experiment:
        p.error("--experiment or --report is required")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.experiment}.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done.add((r["arm"], r["sparsity"], r["seed"]))
    arms = args.arms or EXPERIMENTS.get(args.experiment, ["rigl", "rigl-scale"])
    split = None if args.experiment == "tickets" else _split(args.tiny)
    jobs = [
        {"experiment": args.experiment, "arm": a, "sparsity": s, "seed": seed, "tiny": args.tiny}
        for s in args.sparsities
        for seed in args.seeds
        for a in arms
        if (a, s, seed) not in done
    ]
    print(f"{len(jobs)} runs to go into {path}", flush=True)
    for n, job in enumerate(jobs, 1):
        records = run_tickets(job) if args.experiment == "tickets" else [run_arm(job, split)]
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        r = records[0]
        acc = r["val"] if "val" in r else r["acc"]["val"]
        print(f"[{n}/{len(jobs)}] {job['arm']} seed {job['seed']}: val {100 * acc:.2f}", flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
