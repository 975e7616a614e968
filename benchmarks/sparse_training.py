"""Training on the sparse kernels (``sparseopt.sparse_kernels``) against dense, on the same weights.

Table 1, per layer: one ``nn.Linear`` at each shape, sparsity and batch, forward plus backward
(input and weight gradients, ``set_to_none`` between calls as ``zero_grad()`` does), dense
against the sparse kernels (``layout="csr"``, whatever the rule says), interleaved; the ratio is
the median of the per-round ratios dense/sparse, with the interquartile range of those ratios.
``rule`` is what ``training_min_sparsity_rule`` decides for that cell.

Table 2, the parts of one layer (the target cell, 4096x4096 at 95% and batch 64).

Table 3, whole training steps (forward, loss, backward, ``opt.step()``): plain dense SGD,
masked-dense ``SparseOptimizer``, and ``SparseOptimizer`` with ``sparse_kernels(model, opt)``
(``layout="auto"``: the rule decides per layer), on copies of the same model, interleaved.
Models: an MLP 784-2048-2048-10, the character-level GPT of ``examples/lm.py`` at width 512
(2 blocks, context 64; its output layer is the tied embedding, which stays dense) and the
SET-MLP 784-1000-1000-1000-10 (Mocanu et al. 2018). ``dense share`` is the share of the sparse
step's CPU time outside the sparse kernels (torch profiler, self time): the optimizer step with
its mask pass, and everything else (unconverted layers, activations, loss, autograd).

Table 5, the mask pass of masked-dense training on ResNet-50's weights: the steady-state step
against the inner SGD step (with and without weight decay), the mask pass on bool masks (as the
engine runs it) and on float masks, and its bandwidth floor.

Table 4, masks: RigL in float32 with and without the kernels from the same seed, over several
seeds; how often a topology update picks a different mask because the sparse kernels sum in
another order (a near-tie of two scores flips).

    .venv/bin/python benchmarks/sparse_training.py --threads 1,2 --json runs/sparse_training.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt import SparseOptimizer, sparse_kernels
from sparseopt.kernels import training_min_sparsity_rule
from sparseopt.kernels._structure import SparseStructure

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _paired(times: dict[str, list[float]], base: str, other: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``base / other`` (above 1: ``other`` wins)."""
    ratios = [b / o for b, o in zip(times[base], times[other], strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2]


def _repeats(seconds: float, repeats: int, budget: float) -> int:
    """Fewer rounds for slow cells: about ``budget`` seconds per cell, at least 3 rounds."""
    return max(3, min(repeats, int(budget / max(seconds, 1e-6))))


# --- table 1: one layer --------------------------------------------------------------------------
def _primed_layer(out_f: int, in_f: int, sparsity: float) -> tuple[nn.Linear, SparseOptimizer]:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    opt = SparseOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), "static", sparsity,
                          distribution="uniform", seed=0)  # fmt: skip
    layer(torch.randn(2, in_f)).sum().backward()
    opt.step()  # applies the masks: the kernels run from the second step
    opt.zero_grad()
    return layer, opt


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.weight.grad = layer.bias.grad = x.grad = None
        layer(x).backward(gy)

    return run


def bench_layer(
    shape: tuple[int, int], sparsity: float, batch: int, repeats: int, budget: float
) -> dict[str, Any]:
    out_f, in_f = shape
    sparse, opt = _primed_layer(out_f, in_f, sparsity)
    dense = copy.deepcopy(sparse)
    handle = sparse_kernels(sparse, opt, layout="csr")
    x = torch.randn(batch, in_f, requires_grad=True)
    gy = torch.randn(batch, out_f)
    fns = {"dense": _fwd_bwd(dense, x, gy), "sparse": _fwd_bwd(sparse, x, gy)}
    t0 = C.clock()
    fns["dense"]()
    n = _repeats(C.clock() - t0, repeats, budget)
    times = C.time_interleaved(fns, n, warmup=2)
    assert handle.report()[0]["sparse_calls"] > 0
    handle.remove()
    ratio, lo, hi = _paired(times, "dense", "sparse")
    rule = training_min_sparsity_rule(out_f * in_f, batch)
    return {
        "shape": f"{out_f}x{in_f}",
        "sparsity": sparsity,
        "batch": batch,
        "dense ms": 1e3 * C.median(times["dense"]),
        "sparse ms": 1e3 * C.median(times["sparse"]),
        "dense/sparse": ratio,
        "IQR": f"[{lo:.2f}, {hi:.2f}]",
        "rounds": n,
        "rule": "sparse" if sparsity >= rule else "dense",
    }


# --- table 2: the parts of one layer -------------------------------------------------------------
def bench_parts(shape: tuple[int, int], sparsity: float, batch: int, repeats: int) -> list[dict]:
    out_f, in_f = shape
    layer, opt = _primed_layer(out_f, in_f, sparsity)
    w = layer.weight.detach()
    mask = opt.masks[layer.weight]
    struct = SparseStructure(mask, w.dtype)
    x = torch.randn(batch, in_f)
    cols = x.t().contiguous()
    g = torch.randn(out_f, batch)
    gy = g.t().contiguous()
    struct.load(w)
    buf = torch.zeros(w.numel())
    grad_vals = struct.sddmm(g, cols)
    flat = w.reshape(-1)
    parts: dict[str, tuple[Callable[[], Any] | None, Callable[[], Any]]] = {
        "forward": (lambda: F.linear(x, w), lambda: struct.matmul(cols)),
        "input gradient": (lambda: gy @ w, lambda: struct.matmul_t(g)),
        "weight gradient (a new tensor)": (
            lambda: gy.t() @ x,
            lambda: torch.zeros(w.numel()).index_copy_(0, struct.flat, struct.sddmm(g, cols)),
        ),
        "weight gradient (the reused buffer)": (
            lambda: gy.t() @ x,
            lambda: buf.index_copy_(0, struct.flat, struct.sddmm(g, cols)),
        ),
        "  of which SDDMM": (None, lambda: struct.sddmm(g, cols)),
        "  of which scatter into the buffer": (
            None,
            lambda: buf.index_copy_(0, struct.flat, grad_vals),
        ),
        "  of which a new zero tensor": (None, lambda: torch.zeros(w.numel())),
        "gather the active values (per step)": (
            None,
            lambda: torch.index_select(flat, 0, struct.flat, out=struct.values),
        ),
        "transposed values (per step)": (
            None,
            lambda: torch.index_select(struct.values, 0, struct.perm, out=struct.values_t),
        ),
        "build the structure (per mask change)": (None, lambda: SparseStructure(mask, w.dtype)),
    }
    rows = []
    for name, (dense_fn, sparse_fn) in parts.items():
        fns = (
            {"sparse": sparse_fn} if dense_fn is None else {"dense": dense_fn, "sparse": sparse_fn}
        )
        times = C.time_interleaved(fns, repeats, warmup=2)
        s = C.median(times["sparse"])
        d = C.median(times["dense"]) if dense_fn is not None else float("nan")
        rows.append(
            {"part": name, "dense ms": 1e3 * d, "sparse ms": 1e3 * s, "dense/sparse": d / s}
        )
    return rows


# --- table 3: whole training steps ---------------------------------------------------------------
def mlp(widths: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _lm(width: int, quick: bool) -> tuple[nn.Module, Callable[[int], tuple]]:
    """The character-level GPT of the LM demo (``CharGPT``, ``Config``): in
    ``examples/research/demo_lm.py`` since the examples moved, in ``examples/lm.py`` before."""
    research = os.path.join(EXAMPLES, "research")
    where, name = (
        (research, "demo_lm")
        if os.path.exists(os.path.join(research, "demo_lm.py"))
        else (EXAMPLES, "lm")
    )
    sys.path.insert(0, where)
    try:
        module = __import__(name)
    finally:
        sys.path.remove(where)
    VOCAB, CharGPT, Config = module.VOCAB, module.CharGPT, module.Config
    cfg = Config(width=width, heads=max(1, width // 64), layers=1 if quick else 2, context=64)
    model = CharGPT(cfg)

    def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch)
        idx = torch.randint(0, VOCAB, (batch, cfg.context + 1), generator=g)
        return idx[:, :-1], idx[:, 1:]

    return model, data


def _model(name: str, quick: bool) -> tuple[nn.Module, Callable[[int], tuple], Callable]:
    torch.manual_seed(0)
    if name.startswith("gpt"):
        model, data = _lm(32 if quick else 512, quick)
        return model, data, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    widths = {"mlp": [784, 2048, 2048, 10], "set-mlp": [784, 1000, 1000, 1000, 10]}[name]
    if quick:
        widths = [64, 128, 10]
    model = mlp(widths)

    def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch)
        return torch.randn(batch, widths[0], generator=g), torch.randint(
            0, 10, (batch,), generator=g
        )

    return model, data, F.cross_entropy


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)


def _step_fn(model, opt, x, y, loss_fn, parts: dict[str, list[float]] | None = None):
    def run() -> None:
        t0 = C.clock()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        t1 = C.clock()
        loss.backward()
        t2 = C.clock()
        opt.step()
        t3 = C.clock()
        if parts is not None:
            parts["forward"].append(t1 - t0)
            parts["backward"].append(t2 - t1)
            parts["step"].append(t3 - t2)

    return run


def _dense_share(model, opt, x, y, loss_fn) -> dict[str, float]:
    """Shares of the CPU self time of 3 steps: inside the sparse kernels, inside
    ``opt.step()``, and the rest."""
    run = _step_fn(model, opt, x, y, loss_fn)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run()
    totals = {"kernels": 0.0, "optimizer step": 0.0, "rest": 0.0}
    for ev in prof.events():
        names, parent = [], ev
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        if any("_SparseMatmul" in n for n in names):
            key = "kernels"
        elif any(n.startswith("Optimizer.step") for n in names):
            key = "optimizer step"
        else:
            key = "rest"
        totals[key] += ev.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    return {k: v / total for k, v in totals.items()}


def bench_model(
    name: str, sparsity: float, batch: int, repeats: int, quick: bool
) -> dict[str, Any]:
    base, data, loss_fn = _model(name, quick)
    x, y = data(batch)
    models = {k: copy.deepcopy(base) for k in ("dense", "masked", "kernels")}
    opts: dict[str, torch.optim.Optimizer] = {"dense": _sgd(models["dense"].parameters())}
    for k in ("masked", "kernels"):
        opts[k] = SparseOptimizer(_sgd(models[k].parameters()), "set", sparsity, seed=0,
                                  update_every=10**9, model=models[k])  # fmt: skip
    handle = sparse_kernels(models["kernels"], opts["kernels"])
    parts = {k: {"forward": [], "backward": [], "step": []} for k in models}
    fns = {k: _step_fn(models[k], opts[k], x, y, loss_fn, parts[k]) for k in models}
    times = C.time_interleaved(fns, repeats, warmup=3)
    share = _dense_share(models["kernels"], opts["kernels"], x, y, loss_fn)
    report = handle.report()
    handle.remove()
    vs_masked, lo, hi = _paired(times, "masked", "kernels")
    vs_dense, _, _ = _paired(times, "dense", "kernels")
    med = {k: {p: 1e3 * C.median(v[-repeats:]) for p, v in parts[k].items()} for k in parts}
    n_sparse = sum(r["layout"] is not None for r in report)
    return {
        "model": name,
        "sparsity": sparsity,
        "batch": batch,
        "dense ms": 1e3 * C.median(times["dense"]),
        "masked ms": 1e3 * C.median(times["masked"]),
        "kernels ms": 1e3 * C.median(times["kernels"]),
        "masked/kernels": vs_masked,
        "IQR": f"[{lo:.2f}, {hi:.2f}]",
        "dense/kernels": vs_dense,
        "masked fwd/bwd/step ms": "/".join(f"{med['masked'][p]:.1f}" for p in parts["masked"]),
        "kernels fwd/bwd/step ms": "/".join(f"{med['kernels'][p]:.1f}" for p in parts["kernels"]),
        "sparse layers": f"{n_sparse}/{len(report)}",
        "dense share": f"step {share['optimizer step']:.0%}, rest {share['rest']:.0%}",
    }


# --- table 5: the mask pass of masked-dense training -------------------------------------------
def bench_mask_pass(set_name: str, repeats: int) -> list[dict[str, Any]]:
    """The steady-state step (``"set"``, no update due) against the inner SGD step on the same
    tensors, with the mask pass on bool masks (``uint8`` views, as the engine runs it) and on
    float masks of the gradients' dtype, and the mask pass's bandwidth floor (9 bytes a weight
    at the bandwidth of a large in-place ``torch.add``)."""
    from sparseopt.masks import apply_masks_

    params = C.make_params(C.param_set(set_name))
    bw = C.bandwidth(1 << 22 if set_name == "tiny" else 1 << 25)
    rows = []
    for name, wd in (("sgd-foreach", 5e-4), ("sgd-foreach-nowd", 0.0)):
        kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": wd, "foreach": True}
        inner = torch.optim.SGD(params, **kw)
        wrapped = SparseOptimizer(torch.optim.SGD(params, **kw), "set", 0.9, update_every=10**9,
                                  seed=0)  # fmt: skip
        grads = [p.grad for p in params if p.ndim >= 2]
        masks = list(wrapped.masks.values())
        floats = [m.to(g.dtype) for g, m in zip(grads, masks, strict=True)]
        times = C.time_interleaved(
            {
                "inner": inner.step,
                "wrapped": wrapped.step,
                "bool": lambda g=grads, m=masks: apply_masks_(g, m),
                "float": lambda g=grads, m=floats: apply_masks_(g, m),
            },
            repeats,
            warmup=3,
        )
        t = {k: C.median(v) for k, v in times.items()}
        n = sum(g.numel() for g in grads)
        floor = 9 * n / bw
        rows.append(
            {
                "params": set_name,
                "optimizer": name,
                "inner ms": 1e3 * t["inner"],
                "wrapped ms": 1e3 * t["wrapped"],
                "ratio": _paired(times, "wrapped", "inner")[0],
                "mask (bool) ms": 1e3 * t["bool"],
                "mask (float) ms": 1e3 * t["float"],
                "floor ms": 1e3 * floor,
                "bool/floor": t["bool"] / floor,
                "float/floor": t["float"] / floor,
                "ratio with float masks": (t["wrapped"] - t["bool"] + t["float"]) / t["inner"],
            }
        )
    return rows


# --- table 4: do the masks flip? -----------------------------------------------------------------
def bench_flips(seeds: int, steps: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    widths = [64, 128, 10] if quick else [784, 300, 100, 10]
    for seed in range(seeds):
        runs = []
        for kernels in (False, True):
            torch.manual_seed(seed)
            model = mlp(widths)
            opt = SparseOptimizer(_sgd(model.parameters()), "rigl", 0.9, seed=seed,
                                  update_every=max(2, steps // 8), total_steps=steps)  # fmt: skip
            handle = sparse_kernels(model, opt, layout="csr") if kernels else None
            g = torch.Generator().manual_seed(seed)
            masks = []
            for step in range(steps):
                x = torch.randn(64, widths[0], generator=g)
                y = torch.randint(0, 10, (64,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if opt.last_update_step == step + 1:
                    masks.append([m.clone() for m in opt.masks.values()])
            if handle is not None:
                handle.remove()
            runs.append((masks, [p.detach().clone() for p in model.parameters()]))
        (masks_a, params_a), (masks_b, params_b) = runs
        first = next(
            (
                i
                for i, (ma, mb) in enumerate(zip(masks_a, masks_b, strict=True))
                if any(not torch.equal(a, b) for a, b in zip(ma, mb, strict=True))
            ),
            None,
        )
        flipped = (
            sum(int((a ^ b).sum()) for a, b in zip(masks_a[-1], masks_b[-1], strict=True))
            if masks_a
            else 0
        )
        rows.append(
            {
                "seed": seed,
                "updates": len(masks_a),
                "first differing update": "none" if first is None else first + 1,
                "mask entries differing at the end": flipped,
                "max |w| difference": max(
                    float((p - q).abs().max()) for p, q in zip(params_a, params_b, strict=True)
                ),
            }
        )
    return rows


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="1024x1024,4096x4096,4096x16384", help="out x in")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per cell (at most)")
    ap.add_argument("--budget", type=float, default=4.0, help="about this many seconds per cell")
    ap.add_argument("--models", default="mlp,gpt-512,set-mlp")
    ap.add_argument("--model-sparsities", default="0.9,0.95,0.98")
    ap.add_argument(
        "--model-batch",
        default="mlp:64,gpt-512:8,set-mlp:128",
        help="model:batch (the GPT's batch is in sequences of 64 tokens)",
    )
    ap.add_argument("--model-repeats", type=int, default=15)
    ap.add_argument("--flip-seeds", type=int, default=5)
    ap.add_argument("--flip-steps", type=int, default=60)
    ap.add_argument("--skip", default="", help="tables to skip: layers,parts,models,mask,flips")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    C.add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.sparsities, args.batches, args.threads = "64x64", "0.9", "1,8", "1"
        args.repeats, args.budget, args.model_sparsities, args.model_batch = (
            3,
            0.5,
            "0.9",
            "mlp:8,gpt-512:2,set-mlp:8",
        )
        args.model_repeats, args.flip_seeds, args.flip_steps = 3, 1, 12
    return args


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    C.use_device(args.device)
    cmd = "benchmarks/sparse_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    skip = set(args.skip.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s.strip()]
    before = torch.get_num_threads()
    out: dict[str, Any] = {"layers": [], "parts": [], "models": [], "flips": [], "mask": []}
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            if "layers" not in skip:
                for shape in shapes:
                    for sparsity in _floats(args.sparsities):
                        for batch in (int(b) for b in args.batches.split(",")):
                            row = bench_layer(shape, sparsity, batch, args.repeats, args.budget)
                            row["threads"] = nt
                            out["layers"].append(row)
                            print(row, file=sys.stderr, flush=True)
                            gc.collect()
            if "parts" not in skip:
                target = (64, 64) if args.quick else (4096, 4096)
                for row in bench_parts(target, 0.95, 8 if args.quick else 64, args.repeats):
                    row["threads"] = nt
                    out["parts"].append(row)
            if "models" not in skip:
                batches = dict(kv.split(":") for kv in args.model_batch.split(","))
                for name in args.models.split(","):
                    for sparsity in _floats(args.model_sparsities):
                        row = bench_model(name, sparsity, int(batches.get(name, 64)),
                                          args.model_repeats, args.quick)  # fmt: skip
                        row["threads"] = nt
                        out["models"].append(row)
                        print(row, file=sys.stderr, flush=True)
                        gc.collect()
            if "mask" not in skip:
                for row in bench_mask_pass("tiny" if args.quick else "resnet50", args.repeats):
                    row["threads"] = nt
                    out["mask"].append(row)
        torch.set_num_threads(threads[0])
        if "flips" not in skip:
            out["flips"] = bench_flips(args.flip_seeds, args.flip_steps, args.quick)
    finally:
        torch.set_num_threads(before)
    text = C.header("Training on the sparse kernels", cmd.split(), args.threads)
    if out["layers"]:
        text += "\n### One layer, forward + backward\n\n" + C.markdown_table(
            out["layers"],
            ["threads", "shape", "sparsity", "batch", "dense ms", "sparse ms", "dense/sparse",
             "IQR", "rounds", "rule"],
        )  # fmt: skip
    if out["parts"]:
        text += "\n\n### The parts of one layer (95%)\n\n" + C.markdown_table(
            out["parts"], ["threads", "part", "dense ms", "sparse ms", "dense/sparse"]
        )
    if out["models"]:
        text += "\n\n### Whole training steps\n\n" + C.markdown_table(
            out["models"],
            ["threads", "model", "sparsity", "batch", "dense ms", "masked ms", "kernels ms",
             "masked/kernels", "IQR", "dense/kernels", "masked fwd/bwd/step ms",
             "kernels fwd/bwd/step ms", "sparse layers", "dense share"],
        )  # fmt: skip
    if out["mask"]:
        text += "\n\n### The mask pass of masked-dense training\n\n" + C.markdown_table(
            out["mask"],
            ["threads", "params", "optimizer", "inner ms", "wrapped ms", "ratio",
             "mask (bool) ms", "mask (float) ms", "floor ms", "bool/floor", "float/floor",
             "ratio with float masks"],
        )  # fmt: skip
    if out["flips"]:
        text += "\n\n### Masks with and without the kernels (RigL, float32)\n\n"
        text += C.markdown_table(out["flips"])
    return C.publish(text, cmd, args.json, **out)


if __name__ == "__main__":
    main()
