"""A small character-level language model trained sparse, with Sup-tickets, on the CPU.

    python examples/lm.py                  # RigL at 90%, 300 steps (a minute or two)
    python examples/lm.py --quick          # 30 steps, seconds

The text is Python source: a few standard-library files of the running interpreter, read as
bytes (a vocabulary of 256), so nothing is downloaded; a file the model never sees is the
validation text. ``sparseopt.integrations.hf.param_groups`` makes the attention and MLP weights
sparse and keeps the embeddings (tied to the output layer), the norms and the biases dense. Phase 1
is a linear warm-up and a cosine decay that ends at ``lr_low``; the scheduler gives the factory
passed as ``base=`` the length of phase 1. ``examples/research/demo_lm.py`` is the grid behind
the numbers in docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.integrations.hf import param_groups

TRAIN_FILES = ("argparse.py", "difflib.py", "functools.py", "textwrap.py")
VAL_FILES = ("contextlib.py",)


def read_bytes(files: tuple[str, ...]) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"\n".join((root / name).read_bytes() for name in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class CharLM(nn.Module):
    """Token and position embeddings, pre-norm transformer blocks, the output layer tied."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, width), nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context))
        for embedding in (self.tok, self.pos):  # small, as GPT-2: the output layer is tok
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.ln(x) @ self.tok.weight.T


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()])


@torch.no_grad()
def bits_per_byte(model: nn.Module, chunks: torch.Tensor) -> float:
    model.eval()
    logits = model(chunks[:, :-1])
    model.train()
    return F.cross_entropy(logits.reshape(-1, 256), chunks[:, 1:].reshape(-1)).item() / math.log(2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cycle-steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="30 steps, 3-step cycles, width 32")
    args = p.parse_args(argv)
    width, context, lr, lr_low, warmup = 64, 64, 3e-3, 3e-4, 15
    if args.quick:
        args.steps, args.cycle_steps, args.batch_size, width, warmup = 30, 3, 8, 32, 3
    train, val = read_bytes(TRAIN_FILES), read_bytes(VAL_FILES)
    val_chunks = windows(val, torch.linspace(0, len(val) - context - 1, 64).long(), context)

    torch.manual_seed(0)
    model = CharLM(width=width, context=context)
    inner = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=lr, betas=(0.9, 0.95))
    opt = SparseOptimizer(inner, args.method, args.sparsity, update_every=max(5, args.steps // 12),
                          model=model, seed=0)  # fmt: skip

    def base(opt: SparseOptimizer, phase1: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up, then cosine from ``lr`` to ``lr_low`` at the end of phase 1."""
        floor = lr_low / lr

        def factor(step: int) -> float:
            t = min(1.0, max(0, step - warmup) / max(1, phase1 - warmup))
            cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
            return min(1.0, (step + 1) / warmup) * cosine

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    sched = SupTicketsScheduler(opt, args.steps, args.cycle_steps, base=base,
                                superpose_fraction=0.2, lr_low=lr_low, lr_high=1e-3,
                                explore_rate=0.1)  # fmt: skip
    before = bits_per_byte(model, val_chunks)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        starts = torch.randint(0, len(train) - context - 1, (args.batch_size,), generator=g)
        chunk = windows(train, starts, context)
        loss = F.cross_entropy(model(chunk[:, :-1]).reshape(-1, 256), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()  # after the last step the model holds the ultimate ticket
    after = bits_per_byte(model, val_chunks)
    print(opt.report())
    print(
        f"validation bits per byte: {before:.3f} untrained, {after:.3f} after {args.steps} "
        f"steps; {opt.tickets} tickets, density of the sparse weights {opt.density:.3f}"
    )
    return {"before": before, "after": after, "opt": opt, "sched": sched, "model": model}


if __name__ == "__main__":
    main()
