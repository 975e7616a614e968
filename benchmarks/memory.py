"""Bytes of ``SparseOptimizer``'s own state per sparse weight, in each phase of training.

Measured from the tensors, not from a formula: every tensor reachable from the optimizer object
(attributes, dicts, lists, dataclasses, the superposed copy, the method's state), not descending
into the inner optimizer or the model, minus the storages of the parameters, their gradients and
the inner optimizer's state; distinct storages summed by ``untyped_storage().nbytes()``. The
inner optimizer's state (SGD momentum or AdamW moments) is reported next to it for scale.

Phases: ``built`` (masks drawn), ``phase 1`` (after training steps and one SET update),
``phase 2 cia`` / ``caa`` / ``cima`` (after two ``consolidate()`` calls with that averaging),
``finalized``. ``superposed()`` clones the live weights while the superposed ones are swapped
in; that transient copy lives in the context manager's frame, so it is measured by walking the
frame's locals inside the ``with`` block (the row ``inside superposed()``, column "transient
copies of params": the saved live parameters and BatchNorm buffers, over one copy of the
parameters). "other bytes" is whatever the total holds beyond the labelled parts (0 expected).

    .venv/bin/python benchmarks/memory.py --json runs/memory.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt import SparseOptimizer


def own_bytes(opt: SparseOptimizer) -> dict[str, int]:
    """``{"own": bytes of the wrapper's tensors, "inner": bytes of the inner state}``."""
    params = [p for g in opt.param_groups for p in g["params"]]
    inner = [t for st in opt.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    excluded = C.storages([*params, *(p.grad for p in params if p.grad is not None), *inner])
    mine = C.storages(C.reachable_tensors(opt, skip=[opt.optimizer, opt.model]))
    own = sum(b for k, b in mine.items() if k not in excluded)
    return {"own": own, "inner": sum(C.storages(inner).values())}


def transient_superposed_bytes(opt: SparseOptimizer) -> int:
    """Bytes held by the ``superposed()`` context manager's own locals while it is entered.

    The context manager is a generator; its frame's locals (the saved live weights and buffers)
    are walked like the optimizer, minus every storage that exists outside the block.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    inner = [t for st in opt.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    grads = [p.grad for p in params if p.grad is not None]
    own = C.reachable_tensors(opt, skip=[opt.optimizer, opt.model])
    buffers = list(opt.model.buffers()) if opt.model is not None else []
    outside = C.storages([*params, *grads, *inner, *own, *buffers])
    cm = opt.superposed()
    cm.__enter__()
    try:
        local = C.reachable_tensors(dict(cm.gen.gi_frame.f_locals), skip=[opt])
        held = C.storages(local)
    finally:
        cm.__exit__(None, None, None)
    return sum(b for k, b in held.items() if k not in outside)


def _fill_grads(model: torch.nn.Module, g: torch.Generator) -> None:
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.normal_(0, 1e-3, generator=g)


def run_phases(model_name: str, optimizer: str, steps: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for averaging in ("cia", "caa", "cima"):
        model = {"tiny": lambda: C.SmallCNN(8), "cnn": C.SmallCNN, "resnet50": C.resnet50}[
            model_name
        ]()
        params = list(model.parameters())
        if optimizer == "sgd":
            inner: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        else:
            inner = torch.optim.AdamW(params, lr=1e-3)
        opt = SparseOptimizer(inner, "set", 0.9, update_every=steps, model=model, seed=0)
        n_sparse = sum(layer.numel for layer in opt.layers)
        n_all = sum(p.numel() for p in params)
        param_bytes = sum(C.storages(params).values())
        g = torch.Generator().manual_seed(0)

        def record(
            phase: str,
            opt: SparseOptimizer = opt,
            n_sparse: int = n_sparse,
            param_bytes: int = param_bytes,
        ) -> None:
            b = own_bytes(opt)
            parts = breakdown(opt)
            rows.append(
                {
                    "model": model_name,
                    "optimizer": optimizer,
                    "phase": phase,
                    "sparse weights (M)": n_sparse / 1e6,
                    "wrapper bytes": b["own"],
                    "wrapper B/sparse weight": b["own"] / n_sparse,
                    "inner state B/sparse weight": b["inner"] / n_sparse,
                    "masks B/w": parts["masks"] / n_sparse,
                    "superposed copies of params": parts["sup params"] / param_bytes,
                    "superposed BN buffers bytes": parts["sup buffers"],
                    "CAA counters B/w": parts["caa"] / n_sparse,
                    "other bytes": b["own"] - sum(parts.values()),
                }
            )

        if averaging == "cia":
            record("built")
        for _ in range(steps):  # the last step runs one SET update (update_every=steps)
            _fill_grads(model, g)
            opt.step()
        assert opt.last_update_step == steps
        if averaging == "cia":
            record("phase 1 (steady state)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                _fill_grads(model, g)
                opt.step()
                opt.consolidate(averaging=averaging)
        record(f"phase 2 {averaging} (2 tickets)")
        b_sup = own_bytes(opt)["own"]
        if averaging == "cia":
            extra = transient_superposed_bytes(opt)
            rows.append(
                {
                    "model": model_name,
                    "optimizer": optimizer,
                    "phase": "inside superposed() (transient)",
                    "sparse weights (M)": n_sparse / 1e6,
                    "wrapper bytes": b_sup + extra,
                    "wrapper B/sparse weight": (b_sup + extra) / n_sparse,
                    "superposed copies of params": rows[-1]["superposed copies of params"],
                    "transient copies of params": extra / param_bytes,
                    "other bytes": 0,
                }
            )
            opt.finalize()
            record("finalized")
        del opt, inner, model, params
        gc.collect()
    for r in rows:
        r["all params (M)"] = n_all / 1e6
    return rows


def breakdown(opt: SparseOptimizer) -> dict[str, int]:
    """The known parts of the wrapper's state (the total above is measured independently)."""
    sup = opt._suptickets.superposition  # private, read only to label the bytes
    size = lambda ts: sum(C.storages(ts).values())  # noqa: E731
    return {
        "masks": size(opt.masks.values()),
        "sup params": 0 if sup is None else size(sup.params),
        "sup buffers": 0 if sup is None else size(sup.buffers.values()),
        "caa": 0 if sup is None else size(sup.active),
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="cnn,resnet50", help="models: cnn, resnet50")
    ap.add_argument("--optimizers", default="sgd,adamw")
    ap.add_argument("--steps", type=int, default=3, help="phase-1 steps (the last one updates)")
    ap.add_argument("--quick", action="store_true", help="a tiny CNN (smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.optimizers, args.steps = "tiny", "sgd", 2
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cmd = "benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for model in args.sizes.split(","):
        for o in args.optimizers.split(","):
            rows += run_phases(model.strip(), o.strip(), args.steps)
    text = C.header("Wrapper memory per sparse weight", cmd.split(), torch.get_num_threads())
    text += "\n" + C.markdown_table(
        rows,
        [
            "model",
            "optimizer",
            "phase",
            "sparse weights (M)",
            "all params (M)",
            "wrapper bytes",
            "wrapper B/sparse weight",
            "masks B/w",
            "superposed copies of params",
            "superposed BN buffers bytes",
            "CAA counters B/w",
            "transient copies of params",
            "other bytes",
            "inner state B/sparse weight",
        ],
    )
    return C.publish(text, cmd, args.json, rows=rows)


if __name__ == "__main__":
    main()
