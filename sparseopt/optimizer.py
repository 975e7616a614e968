"""``SparseOptimizer``: sparse training as a wrapper around any ``torch.optim.Optimizer``; a thin
coordinator over ``engine.py`` (masks), ``superposition.py``, ``checkpoint.py``, ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from . import _compat, _validate, checkpoint, distributed, superposition
from .engine import MaskEngine
from .methods import MethodContext, SparseLayer, SparsityMethod, get_method
from .report import SparsityReport, UpdateStats
from .schedules import TopologySchedule
from .superposition import BNUpdate, Superposition

__all__ = ["SparseOptimizer"]


class SparseOptimizer(torch.optim.Optimizer):
    r"""Sparse training around any optimizer: masks, exact counts, and topology updates.

    ``SparseOptimizer`` keeps a bool mask per sparse weight tensor in its own state. Inside
    [`step`][] it masks the gradients, runs the inner optimizer, keeps inactive weights and
    every inner state tensor of the weight's shape at exactly 0, and every ``update_every`` steps
    moves the topology with the chosen method (drop the smallest ``|w|``, grow by the method's
    criterion). Counts are exact: each layer holds the number of active weights its distribution
    assigns, and the total is ``round((1 - sparsity) * N)``.

    Which tensors are sparse: every parameter with ``ndim >= 2`` (conv and linear weights) in a
    param group that does not say ``"sparse": False``. Biases and norm parameters stay dense.

    Args:
        optimizer (torch.optim.Optimizer): the inner optimizer (any, foreach or fused).
        method (str | SparsityMethod): ``"static"``, ``"set"``, ``"rigl"``, ``"granet"``,
            ``"gmp"``, ``"snip"``, a name registered with
            [`register_method`][sparseopt.methods.register_method], or an instance.
            Default: ``"set"``.
        sparsity (float | None): target fraction of zeros over all sparse parameters, in
            [0, 1). Default: 0.9; under an ``N:M`` structure ``1 - N/M``, and no other value.
        structure (str | None): ``"N:M"`` (e.g. ``"2:4"``: N active in every group of M
            along the input dimension) or ``"fan_in"`` (the same count in every output row);
            see ``docs/structured.md``. Default: None (unstructured).
        distribution (str | Mapping[str, float]): ``"erk"``, ``"er"``, ``"uniform"``, or a mapping
            parameter name -> density (unnamed layers share the rest uniformly). Default: ``"erk"``.
        update_every (int): optimizer steps between topology updates (ΔT). Default: 100.
        prune_rate (float): drop fraction of the first update, in [0, 1]. Default: 0.3.
        prune_schedule (str | None): ``"cosine"`` (decays to 0 at the stop step, as RigL) or
            ``"constant"``. Default: ``"cosine"`` when ``total_steps`` is known, else constant.
        stop_fraction (float): periodic updates stop after ``stop_fraction * total_steps`` steps,
            in (0, 1]. Default: 0.75 (RigL). Ignored without ``total_steps``.
        total_steps (int | None): the length of training in optimizer steps. A
            [`SupTicketsScheduler`][sparseopt.SupTicketsScheduler] fills it in when it is
            ``None``. Default: None.
        model (nn.Module | None): gives layer names (reports, a distribution mapping) and the
            BatchNorm buffers that Sup-tickets superposes. Default: None.
        seed (int | None): seeds the optimizer's own CPU ``torch.Generator`` (initial masks,
            random growth). ``None`` takes ``torch.initial_seed()``, which follows
            ``torch.manual_seed``. Give the same value on every rank. Default: None.
        remask (str): ``"auto"`` masks only gradients on steady-state steps when the inner
            optimizer provably keeps zeros (SGD, Adam, AdamW, NAdam, RAdam, RMSprop, Adadelta,
            Adagrad without initial accumulator), by a product (``0 * inf`` is NaN), and
            re-masks weights and state after every step otherwise; ``"always"`` always re-masks,
            with ``torch.where``, NaN-safe. Default: ``"auto"``.
        **method_options: passed to the method's constructor (``growth="random"`` or
            ``"gradient"`` for every built-in method, and the method's own options).

    Raises:
        TypeError: for an argument of the wrong type (an ``optimizer`` that is not a plain
            ``torch.optim.Optimizer``, a string ``sparsity``, ...) or an unknown method option.
        ValueError: for a value out of range or an unknown name, ``prune_schedule="cosine"``
            without ``total_steps``, or settings the method cannot run with.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9, seed=0)
        >>> loss = model(torch.randn(8, 32)).square().mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> [int(m.sum()) for m in opt.masks.values()], round(opt.density, 4)
        ([152, 117], 0.1001)

    Note:
        The masks are drawn when the optimizer is built and applied to the weights at the first
        [`step`][] (or by [`apply_masks`][]). Building the optimizer never changes the model, so
        a checkpoint can be loaded into the model before or after the optimizer is built.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str | SparsityMethod = "set",
        sparsity: float | None = None,
        *,
        structure: str | None = None,
        distribution: str | Mapping[str, float] = "erk",
        update_every: int = 100,
        prune_rate: float = 0.3,
        prune_schedule: str | None = None,
        stop_fraction: float = 0.75,
        total_steps: int | None = None,
        model: nn.Module | None = None,
        seed: int | None = None,
        remask: str = "auto",
        **method_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "Expected optimizer to be a torch.optim.Optimizer, "
                f"but got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, SparseOptimizer):
            raise TypeError("optimizer is already a SparseOptimizer; wrap the inner optimizer once")
        _compat.init_optimizer_hooks(self)
        self.optimizer = optimizer
        self._engine = MaskEngine(  # checks the other arguments
            optimizer,
            sparsity,
            distribution,
            structure=structure,
            update_every=update_every,
            prune_rate=prune_rate,
            prune_schedule=prune_schedule,
            stop_fraction=stop_fraction,
            total_steps=total_steps,
            seed=seed,
            remask=remask,
            model=model,
        )
        self.method = self._engine.method = get_method(method, **method_options)
        self.sparsity, self.structure = self._engine.sparsity, self._engine.structure
        self.distribution, self.seed = self._engine.distribution, self._engine.seed
        self.model, self.remask = model, remask
        self._superposition: Superposition | None = None
        self._engine.register(self.optimizer.param_groups)
        self._engine.check_method()

    # --- views of the inner optimizer (live; never cached, see notes/style.md P3) -----------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's ``param_groups``: the same list, so schedulers reach it."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's per-parameter ``state`` (momentum, ``exp_avg``, ...), live."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``defaults``, live."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # --- read-only views of the masks -----------------------------------------------------------
    @property
    def masks(self) -> Mapping[Tensor, Tensor]:
        """Read-only mapping parameter -> bool mask (``True`` = active); under FSDP2 the mask is
        a bool DTensor laid out like the parameter. Do not modify the masks."""
        return MappingProxyType({layer.param: layer.mask for layer in self._engine.layers})

    @property
    def density(self) -> float:
        """The current fraction of active weights over all sparse parameters."""
        return self._engine.density

    @property
    def layers(self) -> tuple[SparseLayer, ...]:
        """The sparse layers, in the optimizer's packing order."""
        return tuple(self._engine.layers)

    @property
    def context(self) -> MethodContext:
        """What the method sees: the layers, the schedule, ``total_steps`` and the sparsity."""
        return self._engine.context

    @property
    def step_count(self) -> int:
        """The number of optimizer steps taken (steps a ``GradScaler`` skipped are not counted)."""
        return self._engine.step

    @property
    def last_update_step(self) -> int | None:
        """The optimizer step of the last topology update, or ``None`` before the first."""
        return self._engine.stats.last_update_step

    @property
    def update_stats(self) -> UpdateStats:
        """The topology-update counters (a copy): updates, skips, the last one's step and rate."""
        return dataclasses.replace(self._engine.stats)

    @property
    def schedule(self) -> TopologySchedule:
        """The periodic topology-update schedule."""
        return self._engine.schedule

    @property
    def total_steps(self) -> int | None:
        """Length of training in optimizer steps; setting it rebuilds the update schedule."""
        return self._engine.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._engine.set_total_steps(value)

    @property
    def periodic_updates(self) -> bool:
        """Whether scheduled topology updates run (Sup-tickets turns them off in phase 2)."""
        return self._engine.periodic_updates

    @periodic_updates.setter
    def periodic_updates(self, value: bool) -> None:
        self._engine.periodic_updates = _validate.boolean("periodic_updates", value)

    def report(self) -> SparsityReport:
        """Per-layer name, shape, numel, nnz (active connections) and density; totals; updates.

        Returns:
            A [`SparsityReport`][sparseopt.report.SparsityReport]: a ``dict`` with ``layers``,
            ``total`` and ``updates``, which prints as a table.
        """
        return self._engine.report()

    # --- the step -------------------------------------------------------------------------------
    def apply_masks(self) -> None:
        """Zero the weights (and any existing inner state) at inactive positions now.

        [`step`][] does this on its first call; call it earlier to evaluate the sparse model.
        """
        self._engine.apply_masks()

    def explore(self, rate: float) -> None:
        """Ask for one drop-and-grow exploration at drop fraction ``rate`` inside the next step.

        Growth then sees the dense gradient of that step's batch (or of the next step whose
        gradients are finite). Sup-tickets calls it at the start of each cycle.

        Args:
            rate (float): the drop fraction, in [0, 1]: each layer drops ``floor(rate * count)``
                connections and grows as many.

        Raises:
            TypeError: if ``rate`` is not a real number.
            ValueError: if ``rate`` is outside [0, 1].
        """
        self._engine.explore(_validate.real("rate", rate, 0, 1))

    def next_step_reads_gradient(self) -> bool:
        """Whether the next [`step`][] reads the dense gradient of the sparse layers (a due update
        or pending exploration that grows by gradient, SNIP's first step): the steps on which
        [`sparse_kernels`][sparseopt.kernels.sparse_kernels] computes the dense weight gradient."""
        return self._engine.next_step_reads_gradient()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Mask gradients, run the inner step, keep masked positions at 0, update the topology.

        The mask engine's ``begin_step`` (apply the masks on the first call; read a due update's
        growth scores from the dense gradients, or skip it with a warning if they are not
        finite; mask the gradients), the inner step, and ``end_step`` (re-mask unless the inner
        optimizer keeps zeros; apply the update, zeroing each grown weight and its state). With
        a ``GradScaler``, call ``scaler.step(opt)``. Under ``torch.compile`` only the inner step
        is traced; the engine runs eagerly, so an update never recompiles.

        Args:
            closure (Callable | None): re-evaluates the model and returns the loss.
                Default: None.

        Returns:
            The closure's loss, if a closure was given.

        Raises:
            TypeError: for a sparse-layout gradient (``nn.Embedding(sparse=True)``).
            ValueError: for SNIP, if no sparse parameter has a gradient on the first step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine.begin_step()
        self.optimizer.step()
        self._engine.end_step()
        return loss

    # --- Sup-tickets: the superposed ticket (superposition.py) ---------------------------------
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def tickets(self) -> int:
        """The number of cheap tickets superposed so far."""
        return 0 if self._superposition is None else self._superposition.tickets

    def consolidate(
        self,
        *,
        averaging: str = "cia",
        beta: float = 0.8,
        reprune: str = "layer",
        bn_update: BNUpdate | None = None,
    ) -> None:
        r"""Add the live weights as one cheap ticket to the superposed copy, then re-prune it.

        ``S_1 = prune(T_1)``, ``S_t = prune(rule(S_{t-1}, T_t))`` over ONE copy of every
        parameter and of the BatchNorm statistics of ``model=``; the rules and the re-prune are
        in ``superposition.py``. The model is not changed;
        [`finalize`][] writes the copy into it. ``SupTicketsScheduler`` calls this at the end of
        every cycle.

        Args:
            averaging (str): ``"cia"``, ``"caa"`` or ``"cima"``. Default: ``"cia"``.
            beta (float): the CIMA decay in [0, 1). Default: 0.8 (the paper's tuned value).
            reprune (str): ``"layer"`` keeps each layer's count (default); ``"global"`` keeps the
                global top ``K`` over all sparse layers, as the official code does.
            bn_update (Iterable | Callable | None): recompute the BatchNorm statistics of the
                copy instead of averaging them, as the official code does: batches for
                ``torch.optim.swa_utils.update_bn``, or a callable that runs the forward passes
                on the model (``superposition.recompute_bn``).
                Default: None.

        Raises:
            TypeError: for a bad argument type, or a ``bn_update`` that is neither callable nor
                re-iterable.
            ValueError: for a bad value or one that differs from the first ticket's, a
                ``bn_update`` without ``model=`` or that cannot run (the copy is then kept).

        Warns:
            UserWarning: on the first ticket without ``model=``: BatchNorm running statistics
                are then not superposed.
        """
        if not self._engine.masks_applied:
            self.apply_masks()
        layers = self._engine.layers
        self._superposition = superposition.consolidate(
            self._superposition,
            self._params(),
            [layer.index for layer in layers],
            [layer.mask for layer in layers],
            [layer.count for layer in layers],
            self.model,
            averaging=averaging,
            beta=beta,
            reprune=reprune,
            bn_update=bn_update,
            structure=self._engine.structure,
        )

    def _require_tickets(self, what: str) -> Superposition:
        if self._superposition is None:
            raise ValueError(f"{what} needs at least one ticket: call consolidate() first")
        return self._superposition

    @torch.no_grad()
    def finalize(self) -> None:
        """Write the superposed ticket into the model: the "ultimate ticket".

        Parameters and BatchNorm buffers take the superposed values in place, the masks become
        the copy's support (the target counts), and inner state at the now-inactive positions is
        zeroed, so every invariant holds. ``SupTicketsScheduler`` calls it after the last step.

        Raises:
            ValueError: if no ticket was consolidated.
        """
        sup = self._require_tickets("finalize()")
        layers = self._engine.layers
        masks = sup.masks([layer.index for layer in layers], [layer.count for layer in layers])
        superposition.write_superposed(sup, self._params(), self.model)
        self._engine.set_masks(masks)

    @contextmanager
    def superposed(self) -> Iterator[None]:
        """Temporarily swap the superposed ticket into the model, e.g. to evaluate it; the live
        weights and BatchNorm buffers are restored bit-exactly on exit, also on an error.

        Yields:
            Nothing; the model holds the superposed ticket inside the ``with`` block.

        Raises:
            ValueError: if no ticket was consolidated.
        """
        sup = self._require_tickets("superposed()")
        with superposition.swapped_in(sup, self._params(), self.model):
            yield

    # --- the rest of the Optimizer API ----------------------------------------------------------
    def check_consistency(self, group: Any = None) -> None:
        """Check that the ranks hold consistent masks, superposed copy and generator; raise if not.

        Compares one small fingerprint per layer and of the generator across ``group``
        (``distributed.py`` says what must agree under DDP and FSDP2). Without an initialized
        process group it does nothing.

        Args:
            group (ProcessGroup | None): the process group; ``None`` is the default group.
                Default: None.

        Raises:
            RuntimeError: naming the first layer and rank that differ.
        """
        distributed.check_consistency(self._engine, self._superposition, group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the inner optimizer's ``zero_grad``.

        Args:
            set_to_none (bool): set the gradients to ``None`` instead of zeroing them.
                Default: True.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; its sparse tensors get masks of their own
        distribution at the target sparsity.

        Args:
            param_group (dict): as for ``torch.optim.Optimizer.add_param_group``; ``"sparse":
                False`` keeps the whole group dense.
        """
        self._engine.sparse_flag(param_group)  # checked before the inner optimizer takes the group
        self.optimizer.add_param_group(param_group)
        self._engine.register(self.optimizer.param_groups[-1:])

    @_compat.disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus one ``"sparseopt"`` entry of plain data.

        It loads with ``torch.load(path, weights_only=True)``; ``checkpoint.py`` documents the
        entry, ``docs/distributed.md`` its FSDP2 form (DTensors, saved per rank).

        Returns:
            ``{"state": ..., "param_groups": ..., "sparseopt": {...}}``.
        """
        for hook in _compat.hooks(self, "state_dict_pre"):
            hook(self)
        sd = self.optimizer.state_dict()
        sd["sparseopt"] = checkpoint.pack(self._engine, self._superposition)
        for hook in _compat.hooks(self, "state_dict_post"):
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    @_compat.disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by [`state_dict`][], inner optimizer state included.

        Build the optimizer (and any ``LRScheduler`` on it) exactly as before, then load. The
        masks are applied to the weights at once if they were in the saved run.

        Args:
            state_dict (dict): what ``state_dict()`` returned (or ``torch.load`` of it).

        Raises:
            ValueError: if the state dict has no ``"sparseopt"`` entry, or was made by an optimizer
                with another method, sparsity, number of parameters or sparse shapes; the message
                lists every difference, and nothing is loaded.
        """
        for hook in _compat.hooks(self, "load_state_dict_pre"):
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        self._superposition = checkpoint.load(state_dict, self._engine, self._params())
        for hook in _compat.hooks(self, "load_state_dict_post"):
            hook(self)

    # --- pickling and printing ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return _compat.drop_unpicklable(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _compat.init_optimizer_hooks(self)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"SparseOptimizer(method={self.method!r}, sparsity={self.sparsity}, "
            f"density={self.density:.4f}, layers={len(self._engine.layers)}, "
            f"{self.schedule!r})\n{inner}"
        )
