"""Cost of one topology update (SET, RigL, a GraNet pruning event, a Sup-tickets consolidate) as
the number of sparse weights N grows, its amortized cost per step, and the growth exponent.

The parameters form a transformer-like stack: 12 blocks of (3d x d), (d x d), (4d x d), (d x 4d)
weights with their biases, d chosen so that the weights hold N parameters (N = 144 d^2). Sparsity
0.9 (ERK), inner optimizer SGD with momentum (its state exists: one step was taken).

What is timed (``torch.no_grad()``, gradients dense):

- ``set`` / ``rigl``: exactly the extra work a ``step()`` does on an update step: the finiteness
  check of the gradients (``engine.grads_finite()``, ``engine = opt._engine``), the growth scores
  of every layer (``engine.grow_scores()``: ``torch.rand`` for SET, ``|grad|`` for RigL), and
  ``engine.update_topology(step, rate, None, scores)`` (new masks by drop-and-grow, zeroing of the
  weights and momentum wherever a mask changed, counts). Drop fraction 0.3 (the first update's).
- ``granet``: the same for a scheduled GraNet pruning event (``initial_density=0.5``,
  ``total_steps=10000``, ``update_every=100``, events at steps 100, 200, ...): global magnitude
  pruning on the cubic schedule, then per-layer gradient regrowth.
- ``consolidate``: ``opt.consolidate()`` (CIA) from the second ticket on (fold the live weights
  into the superposed copy, re-prune it per layer). The first call, which allocates the copy, is
  reported separately as ``consolidate (first)``.

Between two timed updates (untimed) every active weight gets a small random change, as training
would give it, so that grown weights are not all exactly 0 at the next drop.
``--via-step`` cross-checks SET and RigL end to end: ``opt.explore(0.3)`` then ``opt.step()``, minus
the median of plain steps, on the same optimizer.

    .venv/bin/python benchmarks/update_cost.py --sizes 1,4,16,25,64,100 --json runs/update.json
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt import SparseOptimizer

METHODS = ("set", "rigl", "granet", "consolidate")


def stack_shapes(n_weights: float, blocks: int = 12) -> list[tuple[int, ...]]:
    d = max(4, round(math.sqrt(n_weights / (12 * blocks))))
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


def _perturb(opt: SparseOptimizer, g: torch.Generator) -> None:
    """Untimed: move every active weight a little (and keep inactive ones at exactly 0)."""
    with torch.no_grad():
        for layer in opt.layers:
            w = layer.param.detach()
            noise = torch.empty(w.shape).normal_(0, 1e-3, generator=g)  # the CPU generator
            w.add_(noise.to(w.device)).mul_(layer.mask)


def _refill_grads(params: Sequence[torch.Tensor], g: torch.Generator) -> None:
    for p in params:
        p.grad.copy_(torch.empty(p.shape).normal_(0, 1e-3, generator=g))


def _make(params: list[torch.nn.Parameter], method: str) -> SparseOptimizer:
    inner = torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    if method == "granet":
        opt = SparseOptimizer(
            inner, "granet", 0.9, update_every=100, total_steps=10000, seed=0, initial_density=0.5
        )
    else:
        opt = SparseOptimizer(inner, "set" if method == "consolidate" else method, 0.9, seed=0)
    opt.step()  # applies the masks, creates the momentum buffers
    return opt


def time_updates(
    params: list[torch.nn.Parameter], method: str, repeats: int, warmup: int
) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(1)
    opt = _make(params, method)
    _refill_grads(params, g)  # the first step masked them; an update reads dense gradients
    out: dict[str, list[float]] = {method: []}
    if method == "consolidate":
        out["consolidate (first)"] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "consolidate() without model=" (no BatchNorm here)
            t0 = C.clock()
            opt.consolidate()
            out["consolidate (first)"].append(C.clock() - t0)
        run: Callable[[int], None] = lambda i: opt.consolidate()  # noqa: E731
    else:

        def run(i: int) -> None:
            step = 100 * (i + 1)
            if method == "granet":
                scheduled: int | None = step
                rate = opt.schedule.rate(step)
                assert opt.method.is_pruning_step(step, opt.context)
            else:
                scheduled, rate = None, 0.3
            engine = opt._engine  # the mask engine (sparseopt/engine.py), private
            if not engine.grads_finite():
                raise RuntimeError("non-finite gradients")
            engine.update_topology(step, rate, scheduled, engine.grow_scores())

    with torch.no_grad():
        for i in range(warmup + repeats):
            _perturb(opt, g)
            t0 = C.clock()
            run(i)
            dt = C.clock() - t0
            if i >= warmup:
                out[method].append(dt)
    if method in ("set", "rigl", "granet"):
        assert opt.report()["updates"]["updates"] == warmup + repeats
    return out


def time_via_step(params: list[torch.nn.Parameter], method: str, repeats: int) -> float:
    """``explore`` + ``step`` minus a plain ``step`` (medians), gradients refilled untimed."""
    g = torch.Generator().manual_seed(2)
    opt = _make(params, method)
    plain, explored = [], []
    for i in range(repeats + 1):
        for kind in ("plain", "explore"):
            _refill_grads(params, g)
            _perturb(opt, g)
            if kind == "explore":
                opt.explore(0.3)
            t0 = C.clock()
            opt.step()
            dt = C.clock() - t0
            if i > 0:
                (explored if kind == "explore" else plain).append(dt)
    del opt
    gc.collect()
    return C.median(explored) - C.median(plain)


def inner_step_time(params: list[torch.nn.Parameter], repeats: int = 5) -> float:
    inner = torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    ts = []
    for i in range(repeats + 1):
        t0 = C.clock()
        inner.step()
        if i:
            ts.append(C.clock() - t0)
    del inner
    gc.collect()
    return C.median(ts)


def slope(ns: Sequence[float], ts: Sequence[float]) -> float:
    if len(ns) < 2:
        return math.nan
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16,25,64,100", help="sparse weights, in millions")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-repeats", type=int, default=3, help="repeats above 50M weights")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--via-step", default="25", help="sizes (M) to cross-check via step(); '' none")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    ap.add_argument("--json", default=None)
    C.add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.big_repeats, args.warmup = "0.02", 1, 1, 0
        args.via_step = "0.02"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    C.use_device(args.device)
    cmd = "benchmarks/update_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    via = {float(s) for s in args.via_step.split(",") if s.strip()}
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    try:
        for size in sizes:
            shapes = stack_shapes(size * 1e6)
            params = C.make_params(shapes)
            n = sum(p.numel() for p in params if p.ndim >= 2)
            reps = args.big_repeats if n > 50e6 else args.repeats
            t_inner = inner_step_time(params)
            for m in methods:
                for label, ts in time_updates(params, m, reps, args.warmup).items():
                    t = C.median(ts)
                    rows.append(
                        {
                            "update": label,
                            "N (M)": n / 1e6,
                            "d": shapes[2][0],
                            "s": t,
                            "min s": min(ts),
                            "ns/weight": 1e9 * t / n,
                            "ms/step @100": 1e3 * t / 100,
                            "% SGD step @100": 100 * t / 100 / t_inner,
                            "ms/step @1000": 1e3 * t / 1000,
                            "% SGD step @1000": 100 * t / 1000 / t_inner,
                            "SGD step ms": 1e3 * t_inner,
                            "repeats": len(ts),
                        }
                    )
                    print(f"  {label:20s} N={n / 1e6:7.2f}M  {t:8.4f} s", flush=True)
            if size in via:
                for m in ("set", "rigl"):
                    if m in methods:
                        direct = next(
                            r["s"] for r in rows if r["update"] == m and r["N (M)"] == n / 1e6
                        )
                        checks.append(
                            {
                                "update": m,
                                "N (M)": n / 1e6,
                                "direct s": direct,
                                "via step s": time_via_step(params, m, reps),
                            }
                        )
            del params
            gc.collect()
    finally:
        torch.set_num_threads(before)
    fits = []
    for label in dict.fromkeys(r["update"] for r in rows):
        pts = [(r["N (M)"], r["s"]) for r in rows if r["update"] == label]
        big = [(x, t) for x, t in pts if x >= 4]
        fits.append(
            {
                "update": label,
                "slope (all sizes)": slope([x for x, _ in pts], [t for _, t in pts]),
                "slope (N >= 4M)": slope([x for x, _ in big], [t for _, t in big]),
                "N log N local slope": 1 + 1 / math.log(1e6 * math.sqrt(pts[0][0] * pts[-1][0])),
            }
        )
    text = C.header("Topology-update cost", cmd.split(), args.threads)
    text += "\n" + C.markdown_table(
        rows,
        [
            "update",
            "N (M)",
            "s",
            "min s",
            "ns/weight",
            "ms/step @100",
            "% SGD step @100",
            "ms/step @1000",
            "% SGD step @1000",
            "SGD step ms",
        ],
    )
    text += "\n\nGrowth exponent (least-squares slope of log time on log N):\n\n"
    text += C.markdown_table(fits)
    if checks:
        text += "\n\nCross-check, end to end: explore(0.3) + step() minus a plain step():\n\n"
        text += C.markdown_table(checks)
    print(text, flush=True)
    out = {
        "machine": C.machine_info(),
        "command": cmd,
        "rows": rows,
        "fits": fits,
        "checks": checks,
        "markdown": text,
    }
    C.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
