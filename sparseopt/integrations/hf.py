"""Hugging Face ``transformers``: param groups for language models and a ``Trainer`` callback.

The ``Trainer`` needs no glue to train with a ``SparseOptimizer`` and a ``SupTicketsScheduler``:
pass them as ``optimizers=(opt, sched)``. It clips the gradients before ``step()``, steps the
scheduler once per optimizer step (not per accumulation micro-batch; a step a ``GradScaler``
skipped is a step for the ``Trainer``, the optimizer and the scheduler alike), and saves and
loads both state dicts with ``torch.load(..., weights_only=True)``. This module adds two
conveniences:

- [`param_groups`][sparseopt.integrations.hf.param_groups]: attention and MLP weights sparse;
  embeddings (and an output layer tied to one), biases and norms dense; weight decay as the
  ``Trainer`` applies it. Plain PyTorch: it needs no ``transformers``.
- [`SparseTrainerCallback`][sparseopt.integrations.hf.SparseTrainerCallback]: checks that the
  ``Trainer``'s step count and the optimizer's agree, logs the density and the ticket count, and
  warns when a run ends before the Sup-tickets schedule called ``finalize()``.

Importing this module does not import ``transformers``; the callback is a
``transformers.TrainerCallback`` when ``transformers`` is installed.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .. import _validate, _warnings
from ..optimizer import SparseOptimizer
from ..scheduler import SupTicketsScheduler

try:  # the callback subclasses TrainerCallback when it can; the Trainer only needs the methods
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - depends on the environment
    _CallbackBase = object  # type: ignore[assignment,misc]

__all__ = ["SparseTrainerCallback", "param_groups"]


def param_groups(
    model: nn.Module, weight_decay: float = 0.0, *, sparse_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Param groups for a transformer: projections sparse, embeddings and norms dense.

    Every parameter appears once, however many modules share it: a weight tied between the
    input embedding and the output layer (GPT-2's ``wte`` and ``lm_head``) is one tensor and gets
    at most one mask. Groups, in this order (empty ones left out):

    1. ``"sparse"``: every parameter with ``ndim >= 2`` that is not an embedding's weight, such as
       the attention projections and the MLP weights (``nn.Linear``, GPT-2's ``Conv1D``), with
       ``weight_decay``.
    2. ``"embeddings"``: the weights of every ``nn.Embedding`` (and what is tied to them),
       ``"sparse": False`` and ``weight_decay``; with ``sparse_embeddings=True`` they join
       group 1 instead.
    3. ``"no_decay"``: every 1-D parameter (biases, norm weights; never sparse), weight
       decay 0, as the ``Trainer`` does by default.

    Each group carries a ``"name"`` key (ignored by torch's optimizers) and, for the dense ones,
    ``"sparse": False``. Pass the list to any torch optimizer, then to ``SparseOptimizer``.

    Args:
        model (nn.Module): the model; needs no ``transformers``.
        weight_decay (float): weight decay of groups 1 and 2. Default: 0.0.
        sparse_embeddings (bool): put embedding weights into the sparse group. Default: False.

    Returns:
        list[dict]: the param groups.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``weight_decay`` not a real number or
            ``sparse_embeddings`` not a bool.
        ValueError: if ``weight_decay`` is negative or NaN, or ``sparse_embeddings=True`` while an
            embedding produces sparse gradients (``nn.Embedding(..., sparse=True)``), whose
            gradients a ``SparseOptimizer`` cannot mask.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from sparseopt import SparseOptimizer
        >>> from sparseopt.integrations.hf import param_groups
        >>> class TinyLM(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.wte = nn.Embedding(50, 16)
        ...         self.mlp = nn.Linear(16, 16)
        ...         self.ln = nn.LayerNorm(16)
        ...         self.head = nn.Linear(16, 50, bias=False)
        ...         self.head.weight = self.wte.weight  # tied: one parameter
        >>> model = TinyLM()
        >>> groups = param_groups(model, weight_decay=0.01)
        >>> [(g["name"], len(g["params"]), g.get("sparse", True)) for g in groups]
        [('sparse', 1, True), ('embeddings', 1, False), ('no_decay', 3, True)]
        >>> opt = SparseOptimizer(torch.optim.AdamW(groups, lr=1e-3), "rigl", 0.9, model=model)
        >>> [layer.name for layer in opt.layers]
        ['mlp.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if not _validate.is_real(weight_decay):
        raise TypeError(
            f"Expected weight_decay to be a float, but got {_validate.type_of(weight_decay)}"
        )
    if not weight_decay >= 0:  # NaN too
        raise ValueError(f"Expected weight_decay to be >= 0, but got {weight_decay!r}")
    weight_decay = float(weight_decay)
    sparse_embeddings = _validate.boolean("sparse_embeddings", sparse_embeddings)
    embeddings: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if sparse_embeddings and module.sparse:
                raise ValueError(
                    f"Expected the embeddings in the sparse group to have dense gradients, but "
                    f"got {name or 'the model'} = nn.Embedding(..., sparse=True): a "
                    f"SparseOptimizer cannot mask a sparse gradient; keep it dense "
                    f"(sparse_embeddings=False) or build it with sparse=False"
                )
            embeddings.add(id(module.weight))
    sparse, dense, flat = [], [], []
    seen: set[int] = set()
    for p in model.parameters():  # deduplicated: a tied weight appears once
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if p.ndim < 2:
            flat.append(p)
        elif id(p) in embeddings and not sparse_embeddings:
            dense.append(p)
        else:
            sparse.append(p)
    groups = [
        {"params": sparse, "weight_decay": weight_decay, "name": "sparse"},
        {"params": dense, "weight_decay": weight_decay, "sparse": False, "name": "embeddings"},
        {"params": flat, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _unwrap(obj: Any, cls: type, attr: str) -> Any:
    """The ``cls`` inside wrappers that hold it as ``attr`` (Accelerate's ``AcceleratedOptimizer``
    and ``AcceleratedScheduler``), or what is left when the chain ends."""
    while obj is not None and not isinstance(obj, cls):
        inner = getattr(obj, attr, None)
        if inner is obj:
            break
        obj = inner
    return obj


class SparseTrainerCallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """A ``transformers.TrainerCallback`` that keeps a sparse ``Trainer`` run honest.

    Add it with ``Trainer(..., optimizers=(opt, sched), callbacks=[SparseTrainerCallback()])``.
    It finds the ``SparseOptimizer`` and the ``SupTicketsScheduler`` the ``Trainer`` holds
    (through Accelerate's wrappers) and

    - at the start of training (after a checkpoint is loaded), checks that the scheduler's
      ``total_steps`` equals ``max_steps`` (otherwise the run would not end on the ultimate
      ticket) and that a resumed optimizer has loaded its state;
    - at the start and after every ``check_every`` steps, compares the optimizer's training
      iterations (``step_count + skipped_steps``: a step a ``GradScaler`` skipped counts, as it
      does for the ``Trainer``) with the ``Trainer``'s ``global_step``: more is an error, fewer
      (optimizer steps that never reached the ``SparseOptimizer``) a warning;
    - adds ``sparsity/density`` and ``sparsity/tickets`` to every log;
    - at the end, warns if the scheduler has not reached ``total_steps`` (``finalize()`` never
      ran).

    Args:
        check_every (int): check the step counts every this many optimizer steps; 0 checks only
            at the start. Default: 1.

    Raises:
        ValueError: if ``check_every`` is negative; at the start of training, if the scheduler's
            ``total_steps`` differs from ``max_steps``.
        TypeError: if ``check_every`` is not an int.
        RuntimeError: during training, if the optimizer made more steps than the ``Trainer``,
            or none after resuming from a checkpoint.

    Examples:
        >>> from sparseopt.integrations.hf import SparseTrainerCallback
        >>> callback = SparseTrainerCallback()
        >>> logs = {"loss": 1.0}
        >>> callback.on_log(None, None, None, logs=logs)  # no optimizer yet: nothing added
        >>> logs
        {'loss': 1.0}
    """

    def __init__(self, check_every: int = 1) -> None:
        check_every = _validate.integer("check_every", check_every)
        if check_every < 0:
            raise ValueError(f"Expected check_every to be >= 0, but got {check_every}")
        self.check_every = check_every
        self.optimizer: SparseOptimizer | None = None
        self.scheduler: SupTicketsScheduler | None = None
        self._warned = False

    def _bind(self, kwargs: dict[str, Any]) -> None:
        opt = _unwrap(kwargs.get("optimizer"), SparseOptimizer, "optimizer")
        if isinstance(opt, SparseOptimizer):
            self.optimizer = opt
        sched = _unwrap(kwargs.get("lr_scheduler"), SupTicketsScheduler, "scheduler")
        if isinstance(sched, SupTicketsScheduler):
            self.scheduler = sched

    def _check_steps(self, state: Any, *, start: bool = False) -> None:
        """More optimizer iterations than ``Trainer`` steps, or none after a resume: an error.
        Fewer (steps that never reached the ``SparseOptimizer``): a warning, once."""
        opt = self.optimizer
        if opt is None:
            return
        steps, trainer_steps = opt.step_count + opt.skipped_steps, state.global_step
        if steps > trainer_steps or (start and steps == 0 < trainer_steps):
            raise RuntimeError(
                f"Expected the SparseOptimizer's step_count + skipped_steps to equal the "
                f"Trainer's global_step {trainer_steps}, but got {steps}: was the optimizer state "
                f"loaded from the checkpoint (optimizer.pt), and is the optimizer stepped only by "
                f"the Trainer?"
            )
        if steps < trainer_steps and not self._warned:
            self._warned = True
            _warnings.warn(
                f"the SparseOptimizer made {steps} steps in the Trainer's {trainer_steps}: "
                f"optimizer steps that never reached the SparseOptimizer (a wrapper that skips "
                f"its step()) count for the Trainer, not for the SupTicketsScheduler, so "
                f"max_steps ends the run before finalize()"
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Binds the optimizer and scheduler and checks the step counts and ``max_steps``.

        Args:
            args (TrainingArguments): the ``Trainer``'s arguments (unused).
            state (TrainerState): the ``Trainer``'s state (``global_step``, ``max_steps``).
            control (TrainerControl): the ``Trainer``'s control flags (unused).
            **kwargs: the ``Trainer``'s objects (``optimizer``, ``lr_scheduler``, ...).
        """
        self._bind(kwargs)
        if self.optimizer is None:
            warnings.warn(
                "SparseTrainerCallback: the Trainer holds no SparseOptimizer; it does nothing",
                UserWarning,
                stacklevel=2,
            )
            return
        self._check_steps(state, start=True)
        if self.scheduler is not None and self.scheduler.total_steps != state.max_steps:
            raise ValueError(
                f"Expected the SupTicketsScheduler's total_steps to equal the Trainer's "
                f"max_steps {state.max_steps} (optimizer steps, after gradient accumulation), "
                f"but got {self.scheduler.total_steps}"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Checks that the optimizer stepped exactly once per ``Trainer`` step.

        Args:
            args (TrainingArguments): the ``Trainer``'s arguments (unused).
            state (TrainerState): the ``Trainer``'s state (``global_step``, ``max_steps``).
            control (TrainerControl): the ``Trainer``'s control flags (unused).
            **kwargs: the ``Trainer``'s objects (``optimizer``, ``lr_scheduler``, ...).
        """
        if self.check_every and state.global_step % self.check_every == 0:
            self._check_steps(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Adds ``sparsity/density`` and ``sparsity/tickets`` to ``logs``.

        Args:
            args (TrainingArguments): the ``Trainer``'s arguments (unused).
            state (TrainerState): the ``Trainer``'s state (``global_step``, ``max_steps``).
            control (TrainerControl): the ``Trainer``'s control flags (unused).
            logs (dict | None): the values to log, updated in place.
            **kwargs: the ``Trainer``'s objects (``optimizer``, ``lr_scheduler``, ...).
        """
        if self.optimizer is not None and logs is not None:
            logs["sparsity/density"] = round(self.optimizer.density, 6)
            logs["sparsity/tickets"] = self.optimizer.tickets

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Warns when the Sup-tickets schedule did not reach its last step.

        Args:
            args (TrainingArguments): the ``Trainer``'s arguments (unused).
            state (TrainerState): the ``Trainer``'s state (``global_step``, ``max_steps``).
            control (TrainerControl): the ``Trainer``'s control flags (unused).
            **kwargs: the ``Trainer``'s objects (``optimizer``, ``lr_scheduler``, ...).
        """
        sched = self.scheduler
        if sched is not None and sched.last_epoch < sched.total_steps:
            warnings.warn(
                f"training ended after {sched.last_epoch} of the SupTicketsScheduler's "
                f"{sched.total_steps} steps: finalize() did not run and the model holds the "
                f"live ticket, not the ultimate one",
                UserWarning,
                stacklevel=2,
            )
