"""Sparse training with Sup-tickets in the Hugging Face ``Trainer``: a tiny GPT-2, on the CPU.

    python examples/hf_trainer.py                  # RigL at 90%, 120 optimizer steps
    python examples/hf_trainer.py --quick          # 20 steps, seconds

The model is built from a ``GPT2Config`` (nothing is downloaded) and learns the bytes of a Python
standard-library file. Build the optimizer and the scheduler yourself and pass them as
``optimizers=(opt, sched)``: the ``Trainer`` clips the gradients before ``opt.step()``, steps the
scheduler once per optimizer step (not per micro-batch of ``gradient_accumulation_steps``), and
saves and reloads both state dicts in its checkpoints. ``max_steps`` equal to ``total_steps``
ends the run on the scheduler's ``finalize()``: the model then holds the ultimate ticket.
``SparseTrainerCallback`` logs the density and the ticket count and checks that the step counts
agree. Needs ``pip install transformers``.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.integrations.hf import SparseTrainerCallback, param_groups

try:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit(f"this example needs transformers ({e}): pip install transformers") from e


class Bytes(torch.utils.data.Dataset):
    """The first ``count`` windows of 64 bytes of a standard-library file; labels = inputs."""

    def __init__(self, name: str, count: int) -> None:
        data = (Path(sysconfig.get_paths()["stdlib"]) / name).read_bytes()[: 64 * count]
        self.x = torch.tensor(list(data)).view(-1, 64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}  # the model shifts the labels


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps: max_steps")
    p.add_argument("--cycle-steps", type=int, default=8)
    p.add_argument("--out", default="runs/hf_trainer", help="the Trainer's output_dir")
    p.add_argument("--quick", action="store_true", help="20 steps, 2-step cycles")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.cycle_steps = 20, 2

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    groups = param_groups(model, weight_decay=0.01)  # projections sparse, embeddings dense
    opt = SparseOptimizer(torch.optim.AdamW(groups, lr=3e-3), args.method, args.sparsity,
                          update_every=max(2, args.steps // 10), model=model, seed=0)  # fmt: skip
    sched = SupTicketsScheduler(
        opt, total_steps=args.steps, cycle_steps=args.cycle_steps, superpose_fraction=0.2,
        # phase 1 decays to lr_low, where the cycles start; the scheduler knows its length
        base=lambda opt, phase1: CosineAnnealingLR(opt, T_max=phase1, eta_min=3e-4),
        lr_low=3e-4, lr_high=1e-3, explore_rate=0.1,
    )  # fmt: skip
    training = TrainingArguments(
        args.out,
        max_steps=args.steps,  # = total_steps: the last optimizer step ends Sup-tickets
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        save_strategy="no",  # "steps" works too: the checkpoints resume bit-exactly
        use_cpu=True,  # float32 on the CPU; bf16=True on a GPU that has it
        report_to=[],
        logging_steps=max(1, args.steps // 4),
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Bytes("argparse.py", 1000),
        eval_dataset=Bytes("contextlib.py", 100),
        optimizers=(opt, sched),
        callbacks=[SparseTrainerCallback()],
    )
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    print(opt.report())
    print(f"optimizer steps {opt.step_count}, tickets {opt.tickets}, density {opt.density:.4f}, "
          f"validation loss of the ultimate ticket {loss:.4f}")  # fmt: skip
    return {"trainer": trainer, "opt": opt, "sched": sched, "model": model, "eval_loss": loss}


if __name__ == "__main__":
    main()
