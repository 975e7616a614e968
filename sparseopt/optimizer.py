"""``SparseOptimizer``: sparse training as a wrapper around any ``torch.optim.Optimizer``; a thin
coordinator over ``settings.py`` (its arguments), ``engine.py`` (masks), ``superposition.py``,
``checkpoint.py`` (the file format) and ``consistency.py`` (across ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import _compat, _prologue, _validate, checkpoint, consistency
from .context import MethodContext, SparseLayer
from .engine import MaskEngine
from .methods import SparsityMethod, get_method
from .report import SparsityReport, UpdateStats
from .settings import SparseSettings
from .structure import Structure
from .superposition import BNUpdate, Select, SuperpositionView
from .suptickets import NOT_GIVEN, SupTickets
from .update_schedule import TopologySchedule

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
    param group that does not say ``"sparse": False``. Biases and norm parameters stay dense, and
    so does a parameter with ``requires_grad=False`` when the optimizer is built (a frozen
    backbone is left untouched; ``report()["frozen"]`` lists it). A parameter without a gradient
    at a topology update (or exploration) is skipped by it: its mask and weights stay as they are.
    A parameter is sparsified by one ``SparseOptimizer`` at a time.

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
            without ``total_steps``, settings the method cannot run with, no parameter that
            would be sparse (naming why), or a parameter that another live ``SparseOptimizer``
            already sparsifies.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9, seed=0)
        >>> loss = model(torch.randn(8, 32)).square().mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> [(name, int(m.sum())) for name, m in opt.named_masks()], round(opt.density, 4)
        ([('param0', 152), ('param2', 117)], 0.1001)

    Note:
        The masks are drawn when the optimizer is built and applied to the weights at the first
        [`step`][] (or by [`apply_masks`][]). Building the optimizer never changes the model, so
        a checkpoint can be loaded into the model before or after the optimizer is built.

        A weight is sparsified by one ``SparseOptimizer`` at a time (two would keep two masks
        of it): to rebuild one over the same model, let the first go (``del opt``) before.
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
        settings = SparseSettings(  # the one check of these arguments
            sparsity,
            structure,
            distribution,
            update_every,
            prune_rate,
            prune_schedule,
            stop_fraction,
            total_steps,
            seed,
            remask,
        )
        if model is not None and not isinstance(model, nn.Module):
            hint = " (a state dict? pass the module itself)" if isinstance(model, Mapping) else ""
            raise TypeError(
                f"Expected model to be an nn.Module or None, but got {type(model).__name__}{hint}"
            )
        _compat.init_optimizer_hooks(self)
        self.optimizer = optimizer
        self._engine = MaskEngine(optimizer, settings, get_method(method, **method_options), model)
        self._suptickets = SupTickets(self._engine)

    # --- the settings, read-only ----------------------------------------------------------------
    @property
    def settings(self) -> SparseSettings:
        """The frozen, checked settings (``SparseSettings``); ``total_steps`` may change."""
        return self._engine.settings

    @property
    def sparsity(self) -> float:
        """The target sparsity over all sparse parameters (resolved: 0.9 or ``1 - N/M`` when
        left out)."""
        return self._engine.settings.sparsity  # type: ignore[return-value]

    @property
    def structure(self) -> Structure | None:
        """The mask structure, parsed, or ``None``."""
        return self._engine.settings.structure  # type: ignore[return-value]

    @property
    def distribution(self) -> str | Mapping[str, float]:
        """The layer distribution: a name, or a read-only mapping name -> density."""
        return self._engine.settings.distribution

    @property
    def seed(self) -> int:
        """The seed of the optimizer's own generator (``torch.initial_seed()`` when left out)."""
        return self._engine.settings.seed  # type: ignore[return-value]

    @property
    def remask(self) -> str:
        """``"auto"`` or ``"always"``."""
        return self._engine.settings.remask

    @property
    def model(self) -> nn.Module | None:
        """The ``model=`` given at construction, or ``None``."""
        return self._engine.model

    @property
    def method(self) -> SparsityMethod:
        """The method instance."""
        return self._engine.method

    # --- views of the inner optimizer (live, never cached: torch's load_state_dict and user code
    # --- may replace the inner optimizer's lists, and schedulers must reach the live ones) -------
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
        """Read-only mapping parameter -> bool mask (``True`` = active), keyed as torch keys
        optimizer state; under FSDP2 the mask is a bool DTensor laid out like the parameter.

        The masks share the optimizer's storage: a write through one of them is refused with a
        ``RuntimeError`` at the next ``step()``, ``report()`` or ``state_dict()``.
        [`named_masks`][] gives the same masks by name.
        """
        return self._engine.views

    def named_masks(self) -> Iterator[tuple[str, Tensor]]:
        """Iterate over ``(name, mask)`` of the sparse layers, like ``named_parameters()``.

        Names come from ``model=`` (or the param groups' ``param_names``), else ``"param{i}"``
        with ``i`` the packing index. The masks are those of [`masks`][] (read-only).

        Yields:
            ``(name, mask)`` per sparse layer, in packing order.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
            >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> opt = SparseOptimizer(sgd, "set", 0.5, model=net, seed=0)
            >>> {name: int(mask.sum()) for name, mask in opt.named_masks()}
            {'0.weight': 25, '1.weight': 15}
        """
        views = self._engine.views
        for layer in self._engine.layers:
            yield layer.name, views[layer.param]

    @property
    def density(self) -> float:
        """The current fraction of active weights over all sparse parameters."""
        return self._engine.density

    @property
    def layers(self) -> tuple[SparseLayer, ...]:
        """The sparse layers (frozen ``SparseLayer``s), in the optimizer's packing order."""
        return self._engine.layers

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
        """The periodic topology-update schedule (frozen; ``settings.schedule``)."""
        return self._engine.settings.schedule

    @property
    def total_steps(self) -> int | None:
        """Length of training in optimizer steps; setting it rebuilds the settings and the update
        schedule (checked, and refused as a whole if the method cannot run with it)."""
        return self._engine.settings.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._engine.retime(dataclasses.replace(self._engine.settings, total_steps=value))

    @property
    def periodic_updates(self) -> bool:
        """Whether scheduled topology updates run (Sup-tickets turns them off in phase 2)."""
        return self._engine.periodic_updates

    @periodic_updates.setter
    def periodic_updates(self, value: bool) -> None:
        self._engine.periodic_updates = _validate.boolean("periodic_updates", value)

    def report(self) -> SparsityReport:
        """Per-layer name, shape, numel, active connections, nonzero weights and density; totals;
        the layers left dense or frozen; updates.

        Returns:
            A [`SparsityReport`][sparseopt.report.SparsityReport]: a ``dict`` with ``layers``,
            ``total``, ``updates``, ``structure``, ``dense``, ``frozen`` and ``suptickets``
            (tickets so far, finalized or not, the kept tickets, each candidate's score and the
            chosen one under ``select``), which prints as a table.
        """
        report = self._engine.report()
        report["suptickets"] = self._suptickets.report()
        return report

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
            RuntimeError: if a mask was written through [`masks`][], or the method wrote a mask
                or a weight in place.
        """
        if _prologue.before_step(self):  # a GradScaler found inf/NaN: skipped, and counted
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine.begin_step()
        self.optimizer.step()
        self._engine.end_step()
        return loss

    # --- Sup-tickets: the superposed ticket (suptickets.py, superposition.py, soup.py) ---------
    _step_supports_amp_scaling = True  # GradScaler calls step() with found_inf: see _prologue.py

    @property
    def skipped_steps(self) -> int:
        """Steps a ``GradScaler`` skipped (inf or NaN gradients). ``step_count + skipped_steps``
        counts the training iterations, which ``SupTicketsScheduler`` follows."""
        return self._suptickets.skipped_steps

    @property
    def tickets(self) -> int:
        """The number of cheap tickets superposed so far."""
        return self._suptickets.tickets

    @property
    def superposition(self) -> SuperpositionView | None:
        """A read-only view of the superposed ticket (settings, tickets, the copy and its masks,
        the kept tickets, the last choice), or ``None`` before it is configured."""
        return self._suptickets.view()

    def configure_superposition(
        self,
        *,
        averaging: str = "cia",
        beta: float = 0.8,
        reprune: str = "layer",
        bn_update: BNUpdate | None = None,
        keep_tickets: bool = False,
        select: Select | None = None,
    ) -> None:
        """Fix the settings of the superposed ticket, once (as ``torch.optim.swa_utils`` does).

        ``SupTicketsScheduler`` calls it; without a call the first ``consolidate()`` takes the
        defaults. Equal settings again do nothing; others replace them before the first ticket
        and are a ``ValueError`` after it, but for ``select`` (used only by ``finalize()``).

        Args:
            averaging (str): ``"cia"`` (Eq. 4, the running mean), ``"caa"`` (per weight, over
                the tickets in which it was active) or ``"cima"`` (moving average).
                Default: ``"cia"``.
            beta (float): the CIMA decay in [0, 1). Default: 0.8 (the paper's tuned value).
            reprune (str): ``"layer"`` keeps each layer's count; ``"global"`` the global top
                ``K``, as the official code does. Default: ``"layer"``.
            bn_update (Iterable | Callable | None): recompute the copy's BatchNorm statistics
                after every ticket (batches for ``swa_utils.update_bn``, iterable again each
                time, or a callable running the forward passes) instead of averaging them.
                Needs ``model=``. Default: None.
            keep_tickets (bool): keep every ticket in compact form (active values, bit masks,
                dense parameters, BatchNorm buffers). Default: False.
            select (Callable | None): ``fn(model) -> float``, higher is better: ``finalize()``
                writes the best-scoring of the kept tickets, their greedy soup and the copy
                (``sparseopt.soup``). Turns ``keep_tickets`` on; needs ``model=``. Default: None.

        Raises:
            TypeError: for a setting of the wrong type.
            ValueError: for a bad value, ``reprune="global"`` under a structure,
                ``bn_update``/``select`` without ``model=``, or other settings after a ticket.
        """
        settings = self._suptickets.build(
            averaging=averaging, beta=beta, reprune=reprune, bn_update=bn_update,
            keep_tickets=keep_tickets, select=select,
        )  # fmt: skip
        self._suptickets.configure(settings, "configure_superposition")

    def consolidate(
        self,
        *,
        averaging: str = NOT_GIVEN,
        beta: float = NOT_GIVEN,
        reprune: str = NOT_GIVEN,
        bn_update: BNUpdate | None = NOT_GIVEN,
    ) -> None:
        r"""Add the live weights as one cheap ticket to the superposed copy, then re-prune it.

        ``S_1 = prune(T_1)``, ``S_t = prune(rule(S_{t-1}, T_t))`` over one copy of every
        parameter and of ``model=``'s BatchNorm statistics, with the settings of
        [`configure_superposition`][]; with ``keep_tickets`` the ticket is also kept whole. The
        model is not changed. ``SupTicketsScheduler`` calls this at the end of every cycle.

        Args:
            averaging (str): deprecated, as ``beta``, ``reprune`` and ``bn_update``: they
                configure the superposition if nothing is configured, and must equal the
                configured settings otherwise (``bn_update`` applies to this call).

        Raises:
            ValueError: if ``bn_update`` cannot run (the copy is kept as it was) or the
                BatchNorm buffers changed; deprecated arguments as ``configure_superposition``.
            TypeError: deprecated arguments as ``configure_superposition``.

        Warns:
            DeprecationWarning: for the deprecated arguments.
            UserWarning: on the first ticket without ``model=``, if a BatchNorm layer holds one
                of the parameters (its running statistics are then not superposed).
        """
        self._suptickets.consolidate(averaging, beta, reprune, bn_update)

    def finalize(self) -> None:
        """Write the ultimate ticket into the model: the superposed copy, or with ``select`` the
        best-scoring of the kept tickets, their greedy soup and the copy (``sparseopt.soup``).

        Weights and BatchNorm buffers take its values, the masks its support (the target
        counts); inner state at inactive positions is zeroed. The scheduler calls it at the end.

        Raises:
            ValueError: if no ticket was consolidated, or ``select`` returned a non-finite number.
            TypeError: if ``select`` returned something other than a real number.
            RuntimeError: if ``select`` raised (its error is the cause). The model then holds
                the last live ticket, unchanged.
        """
        self._suptickets.finalize()

    @contextmanager
    def superposed(self) -> Iterator[None]:
        """Swap the superposed ticket into the model for the ``with`` block (to evaluate it); the
        live weights and BatchNorm buffers come back bit-exactly, also on an error.

        Raises:
            ValueError: if no ticket was consolidated.
        """
        with self._suptickets.superposed():
            yield

    # --- the rest of the Optimizer API ----------------------------------------------------------
    def check_consistency(self, group: Any = None) -> None:
        """Check that the ranks hold consistent masks, superposed copy and generator; raise if not.

        Compares one small fingerprint per layer and of the generator across ``group``
        (``consistency.py`` says what must agree under DDP and FSDP2). Without an initialized
        process group it does nothing.

        Args:
            group (ProcessGroup | None): the process group; ``None`` is the default group.
                Default: None.

        Raises:
            RuntimeError: naming the first layer and rank that differ.
        """
        consistency.check_consistency(self._engine, self._suptickets.to_save(), group)

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

        Raises:
            TypeError: if ``"sparse"`` is not a bool.
            ValueError: if another live ``SparseOptimizer`` sparsifies a parameter of the group.
        """
        self._engine.check_group(param_group)  # before the inner optimizer takes the group
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
        sup = self._suptickets.to_save()
        sd["sparseopt"] = checkpoint.pack(self._engine, None if sup is None else sup.state_dict())
        sd["sparseopt"]["skipped_steps"] = self._suptickets.skipped_steps
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
        self._suptickets.check_state(state_dict)
        self._suptickets.load(checkpoint.load(state_dict, self._engine), state_dict)
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
            f"density={self.density:.4f}, layers={len(self.layers)}, "
            f"{self.schedule!r})\n{inner}"
        )
