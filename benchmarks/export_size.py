"""File size of ``sparseopt.save_sparse`` against a dense ``torch.save(model.state_dict())``.

For each model (the digits CNN and the CIFAR ResNet-50 of ``examples/research/models.py``, and a
GPT-like stack of pre-norm transformer blocks of ``nn.Linear`` layers, width 512) and each sparsity,
the masks are those of a ``SparseOptimizer`` built on the model (method ``"static"``, ERK layer
densities, as training starts), applied to the weights by the optimizer's own masking, which
leaves ``-0.0`` where a negative weight was masked, as training does. The file is written with
``masks=opt.masks`` twice: by default, and with ``zero_signs=True``, which also stores where those
``-0.0`` are.

``floor`` is what no encoding of this content can beat: the active values (``nnz x 4`` bytes),
plus, per sparse tensor, the information in its positions, ``log2 C(numel, nnz)`` bits, plus the
dense rest (biases, norms, buffers) as it is. ``file / floor`` is the overhead of the bitmask or
byte-gap positions and of the header.

    .venv/bin/python benchmarks/export_size.py --json runs/export_size.json
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "research"
    ),
)
import _common as C
from inference import gpt_like
from models import DigitsCNN, resnet50

from sparseopt import SparseOptimizer, save_sparse

MODELS = {
    "digits-cnn": lambda: DigitsCNN(),
    "resnet50": lambda: resnet50(10),
    "gpt-like": lambda: gpt_like(width=512, blocks=4),
}


def _position_bits(numel: int, nnz: int) -> float:
    """log2 C(numel, nnz): the information in the positions of ``nnz`` of ``numel``."""
    return (
        math.lgamma(numel + 1) - math.lgamma(nnz + 1) - math.lgamma(numel - nnz + 1)
    ) / math.log(2)


def measure(name: str, model: nn.Module, sparsity: float, tmp: str) -> dict[str, Any]:
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "static", sparsity, model=model, seed=0
    )
    opt.apply_masks()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    dense = buffer.getbuffer().nbytes
    path = os.path.join(tmp, f"{name}.sparse")
    info = save_sparse(model, path, masks=opt.masks)
    exact = save_sparse(model, path, masks=opt.masks, zero_signs=True)["file_bytes"]
    names = {p: n for n, p in model.named_parameters()}
    sparse_names = {names[p] for p in opt.masks}
    floor = 0.0
    for n, t in model.state_dict().items():
        if n in sparse_names:
            nnz = info["tensors"][n]["nnz"]
            floor += nnz * t.element_size() + _position_bits(t.numel(), nnz) / 8
        else:
            floor += t.numel() * t.element_size()
    encodings = sorted(
        {e["encoding"] for n, e in info["tensors"].items() if n in sparse_names}, reverse=True
    )
    n_sparse = sum(p.numel() for p in opt.masks)
    nnz = sum(int(m.sum()) for m in opt.masks.values())
    return {
        "model": name,
        "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
        "sparsity": sparsity,
        "density x (4 B + 1 B)": f"{(1 - sparsity) * 5 / 4:.3f}",
        "dense MB": dense / 1e6,
        "sparse MB": info["file_bytes"] / 1e6,
        "sparse / dense": info["file_bytes"] / dense,
        "floor MB": floor / 1e6,
        "file / floor": info["file_bytes"] / floor,
        "zero_signs=True / dense": exact / dense,
        "positions": "+".join(encodings),
        "realized sparsity": 1 - nnz / n_sparse,
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=",".join(MODELS))
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--quick", action="store_true", help="the digits CNN at two sparsities")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.sparsities = "digits-cnn", "0.8,0.95"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cmd = "benchmarks/export_size.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in args.models.split(","):
            for s in (float(x) for x in args.sparsities.split(",")):
                torch.manual_seed(0)
                rows.append(measure(name, MODELS[name](), s, tmp))
    text = C.header("Compact checkpoint size", cmd.split(), "-")
    text += "\n" + C.markdown_table(rows)
    return C.publish(text, cmd, args.json, rows=rows)


if __name__ == "__main__":
    main()
