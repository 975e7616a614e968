"""``SparseOptimizer``: sparse training as a wrapper around any ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from . import _compat, _dtensor
from .distributions import exact_counts, layer_densities
from .masks import apply_masks_, count_active, random_mask
from .methods import SparseLayer, SparsityMethod, get_method
from .metrics import SparsityReport
from .schedules import PRUNE_SCHEDULES, TopologySchedule
from .superposition import (
    BNUpdate,
    Superposition,
    check_bn_update,
    check_superposition_args,
    recompute_bn,
)

__all__ = ["SparseOptimizer"]

_FORMAT = 1

# Optimizers that, given a zero gradient and zero state at a position where the weight is 0, keep
# weight and state exactly 0 there (checked line by line against torch 2.13's update rules;
# tests/test_contract.py runs every one of them against remask="always", bit for bit). For these
# the steady-state step only masks gradients.
_ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
)


def _keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    kind = type(optimizer)
    if kind in _ZERO_PRESERVING:
        return True
    if kind is torch.optim.Adagrad:  # a nonzero initial accumulator is nonzero state
        return all(g.get("initial_accumulator_value", 0) == 0 for g in optimizer.param_groups)
    return False


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


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
        sparsity (float): target fraction of zeros over all sparse parameters, in [0, 1).
            Default: 0.9.
        distribution (str | Mapping[str, float]): ``"erk"``, ``"er"``, ``"uniform"``, or a mapping
            parameter name -> density (unnamed layers share the rest uniformly). Default: ``"erk"``.
        update_every (int): optimizer steps between topology updates (ΔT). Default: 100.
        prune_rate (float): drop fraction of the first update. Default: 0.3 (RigL, SET).
        prune_schedule (str | None): ``"cosine"`` (decays to 0 at the stop step, as RigL) or
            ``"constant"``. Default: ``"cosine"`` when ``total_steps`` is known, else constant.
        stop_fraction (float): periodic updates stop after ``stop_fraction * total_steps`` steps.
            Default: 0.75 (RigL). Ignored without ``total_steps``.
        total_steps (int | None): the length of training in optimizer steps. A
            [`SupTicketsScheduler`][sparseopt.SupTicketsScheduler] fills it in when it is
            ``None``. Default: None.
        model (nn.Module | None): gives layer names (reports, a distribution mapping) and the
            BatchNorm buffers that Sup-tickets superposes. Default: None.
        seed (int | None): seeds the optimizer's own ``torch.Generator`` (initial masks, random
            growth). ``None`` takes ``torch.initial_seed()``, which follows ``torch.manual_seed``.
            Give the same value on every rank. Default: None.
        remask (str): ``"auto"`` masks only gradients on steady-state steps when the inner
            optimizer provably keeps zeros (SGD, Adam, AdamW, NAdam, RAdam, RMSprop, Adadelta,
            Adagrad without initial accumulator) and re-masks weights and state after every step
            otherwise; ``"always"`` always re-masks, with ``torch.where``, so that even a NaN or
            inf gradient at an inactive position leaves 0 there. ``"auto"`` masks by a product,
            and ``0 * inf`` is NaN: without a ``GradScaler``, a non-finite gradient on a step
            with no topology update reaches inactive weights as it reaches active ones.
            Default: ``"auto"``.
        **method_options: passed to the method's constructor.

    Raises:
        TypeError: if ``optimizer`` is not a ``torch.optim.Optimizer`` or already a
            ``SparseOptimizer``; for a ``sparsity``, ``prune_rate``, ``distribution``,
            ``model``, ``seed`` or ``method`` of the wrong type; for method options the method
            does not take.
        ValueError: for a value out of range (``sparsity``, ``update_every``, ``prune_rate``,
            ``stop_fraction``, ``total_steps``), an unknown ``prune_schedule``, ``remask``,
            ``distribution`` or ``method``, ``prune_schedule="cosine"`` without
            ``total_steps``, or settings the method cannot run with.

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
        [`step`][] (or by [`apply_masks`][]).
        Building the optimizer never changes the model, so a checkpoint can be loaded into the
        model before or after the optimizer is built.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str | SparsityMethod = "set",
        sparsity: float = 0.9,
        *,
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
        if not _is_number(sparsity):
            raise TypeError(f"Expected sparsity to be a float, but got {sparsity!r}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"Expected sparsity in [0, 1), but got {sparsity}")
        if not isinstance(distribution, (str, Mapping)):
            raise TypeError(
                "Expected distribution to be 'erk', 'er', 'uniform' or a mapping name -> density, "
                f"but got {distribution!r}"
            )
        if not _is_number(stop_fraction) or not 0.0 < stop_fraction <= 1.0:
            raise ValueError(f"Expected stop_fraction in (0, 1], but got {stop_fraction!r}")
        if prune_schedule is not None and prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(
                f"Expected prune_schedule in {PRUNE_SCHEDULES} or None, but got {prune_schedule!r}"
            )
        if remask not in ("auto", "always"):
            raise ValueError(f"Expected remask to be 'auto' or 'always', but got {remask!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"Expected model to be an nn.Module or None, but got {model!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Expected seed to be an int or None, but got {seed!r}")

        _compat.init_optimizer_hooks(self)
        self.optimizer = optimizer
        self.method = get_method(method, **method_options)
        self.sparsity = float(sparsity)
        self.distribution = (
            dict(distribution) if isinstance(distribution, Mapping) else distribution
        )
        self.model = model
        self.remask = remask
        self._update_every = update_every
        self._prune_rate = prune_rate
        self._prune_schedule = prune_schedule
        self._stop_fraction = float(stop_fraction)
        self._total_steps: int | None = None
        self._schedule = self._make_schedule(total_steps)
        self._total_steps = total_steps

        self.seed = torch.initial_seed() if seed is None else seed
        # a CPU generator whatever the parameters' device: the same seed, the same masks
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._layers: list[SparseLayer] = []
        self._num_params = 0
        self._step = 0
        self._masks_applied = False
        self._pending_exploration: float | None = None
        self._in_step: tuple[int, Any, list[Tensor] | None] | None = None
        self.periodic_updates = True
        self._stats: dict[str, Any] = {
            "updates": 0,
            "skipped": 0,
            "last_update_step": None,
            "last_rate": None,
            "last_exchanged": 0,
            "exchanged": 0,
        }
        self._keeps_zeros = remask == "auto" and _keeps_zeros(optimizer)
        self._unmaskable: set[tuple[str, str]] = set()
        self._superposition: Superposition | None = None
        self._register_groups(self.optimizer.param_groups)
        self.method.check(self)

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

    # --- public read-only views -----------------------------------------------------------------
    @property
    def masks(self) -> Mapping[Tensor, Tensor]:
        """Read-only mapping parameter -> bool mask (``True`` = active). Do not modify the masks.

        The mask of a DTensor parameter (FSDP2) is a bool DTensor with the parameter's mesh and
        placements: ``mask.to_local()`` is this rank's shard, ``mask.full_tensor()`` gathers it.
        """
        return MappingProxyType({layer.param: layer.mask for layer in self._layers})

    @property
    def density(self) -> float:
        """The current fraction of active weights over all sparse parameters."""
        total = sum(layer.numel for layer in self._layers)
        return sum(layer.count for layer in self._layers) / total if total else 1.0

    @property
    def layers(self) -> tuple[SparseLayer, ...]:
        """The sparse layers, in the optimizer's packing order."""
        return tuple(self._layers)

    @property
    def step_count(self) -> int:
        """The number of optimizer steps taken (steps a ``GradScaler`` skipped are not counted)."""
        return self._step

    @property
    def last_update_step(self) -> int | None:
        """The optimizer step of the last topology update, or ``None`` before the first."""
        return self._stats["last_update_step"]

    @property
    def total_steps(self) -> int | None:
        """Length of training in optimizer steps; setting it rebuilds the update schedule."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        schedule, before = self._make_schedule(value), (self._schedule, self._total_steps)
        self._schedule, self._total_steps = schedule, value
        try:
            self.method.check(self)
        except ValueError:
            self._schedule, self._total_steps = before
            raise

    @property
    def schedule(self) -> TopologySchedule:
        """The periodic topology-update schedule."""
        return self._schedule

    def _make_schedule(self, total_steps: int | None) -> TopologySchedule:
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"Expected total_steps to be a positive int, but got {total_steps!r}")
        decay = self._prune_schedule or ("cosine" if total_steps is not None else "constant")
        end = None if total_steps is None else math.floor(self._stop_fraction * total_steps)
        if decay == "cosine" and total_steps is None:
            raise ValueError("prune_schedule='cosine' needs total_steps to know where it ends")
        return TopologySchedule(self._update_every, self._prune_rate, decay, end)

    # --- parameters and masks -------------------------------------------------------------------
    def _param_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for group in self.optimizer.param_groups:
            for p, name in zip(group["params"], group.get("param_names", ()), strict=False):
                names[id(p)] = name
        if self.model is not None:
            names.update({id(p): n for n, p in self.model.named_parameters()})
        return names

    def _register_groups(self, groups: Iterable[dict[str, Any]]) -> None:
        names = self._param_names()
        new: list[tuple[Tensor, str, int]] = []
        # a tensor listed twice (a tied weight listed by hand; torch only warns) is one parameter
        # and gets one mask: its first position is its layer
        seen = {id(layer.param) for layer in self._layers}
        for group in groups:
            for p in group["params"]:
                index = self._num_params
                self._num_params += 1
                if group.get("sparse", True) and p.ndim >= 2 and id(p) not in seen:
                    seen.add(id(p))
                    new.append((p, names.get(id(p), f"param{index}"), index))
        if not new:
            return
        shapes = [tuple(p.shape) for p, _, _ in new]
        names = [n for _, n, _ in new]
        numels = [p.numel() for p, _, _ in new]
        target = 1.0 - self.sparsity
        targets = exact_counts(
            layer_densities(self.distribution, shapes, target, names), numels, target
        )
        start = self.method.start_density(target)
        counts = (
            targets
            if start == target
            else exact_counts(
                layer_densities(self.distribution, shapes, start, names), numels, start
            )
        )
        for (p, name, index), count, goal in zip(new, counts, targets, strict=True):
            _dtensor.check_placements(p, name)
            mask = _dtensor.shard_like(random_mask(p.shape, count, self._generator), p)
            self._layers.append(SparseLayer(p, name, index, mask, count, goal))
        if self._masks_applied:
            self._mask_weights_and_state(self._layers[-len(new) :])

    def _state_tensors(self, layer: SparseLayer) -> list[Tensor]:
        """The inner state tensors of the layer's shape (momentum, exp_avg, ...)."""
        state = self.optimizer.state.get(layer.param)
        if not state:
            return []
        out = []
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.ndim == 0:
                continue
            if value.shape != layer.param.shape:
                if (layer.name, key) not in self._unmaskable:
                    self._unmaskable.add((layer.name, key))
                    warnings.warn(
                        f"inner optimizer state {key!r} of {layer.name} has shape "
                        f"{tuple(value.shape)}, not the parameter's {tuple(layer.param.shape)}: "
                        "it cannot be masked elementwise and is left as it is (a grown weight "
                        "inherits it); the weights themselves are still masked every step",
                        UserWarning,
                        stacklevel=4,
                    )
                continue
            out.append(value)
        return out

    def _mask_weights_and_state(self, layers: Iterable[SparseLayer]) -> None:
        tensors, masks = [], []
        for layer in layers:
            for t in (layer.param.detach(), *self._state_tensors(layer)):
                tensors.append(t)
                masks.append(layer.mask)
        with torch.no_grad():
            apply_masks_(tensors, masks, nan_safe=self.remask == "always")

    def apply_masks(self) -> None:
        """Zero the weights (and any existing inner state) at inactive positions now.

        [`step`][] does this on its first call; call it earlier to evaluate or count the
        sparse model before training starts.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16, bias=False)
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9)
            >>> int((model.weight != 0).sum())  # building the optimizer changes nothing
            256
            >>> opt.apply_masks()
            >>> int((model.weight != 0).sum()) <= opt.layers[0].count == 26
            True
        """
        self._mask_weights_and_state(self._layers)
        self._masks_applied = True
        _dtensor.reshard(self.model)

    # --- the step -------------------------------------------------------------------------------
    def explore(self, rate: float) -> None:
        """Ask for one drop-and-grow exploration at drop fraction ``rate`` inside the next step.

        It runs inside the next [`step`][], where the method's growth criterion sees the
        dense gradient of that step's batch. Sup-tickets calls it at the start of each cycle. If
        that step's gradients are not finite, it waits for the next step whose gradients are.

        Args:
            rate (float): the drop fraction, in [0, 1]: each layer drops ``floor(rate * count)``
                connections and grows as many.

        Raises:
            ValueError: if ``rate`` is outside [0, 1].

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16, bias=False)
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.9)
            >>> opt.explore(0.5)
            >>> model(torch.randn(4, 16)).square().sum().backward(); opt.step()
            >>> opt.report()["updates"]["updates"], opt.layers[0].count
            (1, 26)
        """
        if not _is_number(rate) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"Expected rate in [0, 1], but got {rate!r}")
        self._pending_exploration = float(rate)

    def _due_update(self, step: int) -> tuple[float, int | None] | None:
        """``(rate, step)`` of the update due at ``step`` (step ``None`` for an exploration)."""
        if self._pending_exploration is not None:
            return self._pending_exploration, None
        if self.periodic_updates and self.method.is_update_step(step, self):
            return self._schedule.rate(step), step
        return None

    def _grads_finite(self) -> bool:
        grads = [layer.param.grad for layer in self._layers if layer.param.grad is not None]
        return _dtensor.all_finite(grads)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Mask gradients, run the inner step, keep masked positions at 0, update the topology.

        In order: on the first call, apply the masks; on a step with a topology update (or an
        exploration) due, read the method's growth scores from the dense gradients, or skip the
        update with a warning if they are not finite; mask the gradients; run the inner step;
        re-mask weights and inner state unless the inner optimizer provably keeps zeros; apply
        the update, zeroing each newly grown weight and its state.

        With a ``GradScaler``, call ``scaler.step(opt)`` (it skips this call on steps with inf
        or NaN gradients), then ``scaler.update()``, then the schedulers' ``step()``.

        Under ``torch.compile`` only the inner optimizer's step is traced: the work before it
        (the update schedule, the scores, masking the gradients) and after it (re-masking, the
        topology update) runs eagerly (``torch.compiler.disable``), so Python counters never
        enter a graph, a topology update never causes a recompilation, and the gradients are
        masked by the fast eager kernel.

        Args:
            closure (Callable | None): re-evaluates the model and returns the loss.
                Default: None.

        Returns:
            The closure's loss, if a closure was given.

        Raises:
            ValueError: for SNIP, if no sparse parameter has a gradient on the first step.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16)
            >>> opt = SparseOptimizer(torch.optim.Adam(model.parameters()), "rigl", 0.9)
            >>> def closure():
            ...     opt.zero_grad()
            ...     loss = model(torch.randn(4, 16)).square().mean()
            ...     loss.backward()
            ...     return loss
            >>> loss = opt.step(closure)
            >>> bool((model.weight[~opt.masks[model.weight]] == 0).all()), opt.step_count
            (True, 1)
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin_step()
        self.optimizer.step()
        self._end_step()
        return loss

    @torch.compiler.disable
    def _begin_step(self) -> None:
        """Before the inner step: read the scores of a due update, then mask the gradients.

        It runs eagerly under ``torch.compile`` (see ``step``): eager, the mask multiply is one
        foreach kernel over a uint8 view of the masks; inductor's CPU code for the same multiply
        runs several times slower (``benchmarks/compiled_step.py``), and a graph break in torch's
        own ``Optimizer.step`` keeps it from fusing into the update anyway.
        """
        if not self._masks_applied:
            self._check_dense_grads()
            self.apply_masks()
        step = self._step + 1
        due = self._due_update(step)
        scores = None
        finite = True
        if due is not None:
            finite = self._grads_finite()
            if finite:
                scores = [
                    self.method.grow_scores(layer, layer.param.grad, self._generator)
                    for layer in self._layers
                ]
            else:
                warnings.warn(
                    f"non-finite gradients at step {step}: the topology update was skipped "
                    "and the masks are unchanged",
                    UserWarning,
                    stacklevel=6,
                )
                self._stats["skipped"] += 1
        if scores is not None and due[1] is not None and self.method.updates_before_step(step):
            self._update_topology(step, *due, scores)
            scores = None
        self._in_step = (step, due, scores)
        grads, masks = [], []
        for layer in self._layers:
            if layer.param.grad is not None:
                grads.append(layer.param.grad)
                masks.append(layer.mask)
        apply_masks_(grads, masks, nan_safe=not finite or self.remask == "always")

    def _check_dense_grads(self) -> None:
        """A clear error for a sparse-layout gradient (``nn.Embedding(sparse=True)``), once."""
        for layer in self._layers:
            grad = layer.param.grad
            if grad is not None and grad.layout != torch.strided:
                raise TypeError(
                    f"Expected a dense (strided) gradient for the sparse parameter {layer.name!r}, "
                    f"but got a {grad.layout} gradient: a sparse-gradient layer such as "
                    "nn.Embedding(sparse=True) cannot be masked; put it in a param group with "
                    '"sparse": False, or build it with sparse=False'
                )

    @torch.compiler.disable
    def _end_step(self) -> None:
        """After the inner step: re-mask where the inner step may not keep zeros, update, count."""
        step, due, scores = self._in_step
        self._in_step = None
        if not self._keeps_zeros:
            self._mask_weights_and_state(self._layers)
        if scores is not None:
            self._update_topology(step, *due, scores)
        self._step = step

    def _update_topology(
        self, step: int, rate: float, scheduled: int | None, scores: list[Tensor]
    ) -> None:
        """Apply the method's new masks; zero weights and inner state wherever a mask changed."""
        new_masks = self.method.new_masks(self, rate, scores, scheduled)
        grown = []
        for layer, new in zip(self._layers, new_masks, strict=True):
            changed = layer.mask ^ new
            for t in (layer.param.detach(), *self._state_tensors(layer)):
                t.masked_fill_(changed, 0)
            grown.append(new & ~layer.mask)
            layer.mask.copy_(new)
        counts = count_active([layer.mask for layer in self._layers] + grown)
        for layer, count in zip(self._layers, counts, strict=False):
            layer.count = count
        if scheduled is None:
            self._pending_exploration = None
        exchanged = sum(counts[len(self._layers) :])
        self._stats["updates"] += 1
        self._stats["last_update_step"] = step
        self._stats["last_rate"] = rate
        self._stats["last_exchanged"] = exchanged
        self._stats["exchanged"] += exchanged

    # --- Sup-tickets: the superposed ticket ------------------------------------------------------
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _bn_buffers(self) -> dict[str, Tensor]:
        """The running statistics of the model's BatchNorm layers, by qualified name."""
        if self.model is None:
            return {}
        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    buf = getattr(module, key, None)
                    if buf is not None:
                        out[f"{name}.{key}" if name else key] = buf
        return out

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

        The first call allocates ONE copy of every parameter (and of the BatchNorm running
        statistics of ``model=``); each call folds the live ticket ``T_t`` in with the averaging
        rule and magnitude-prunes the copy back to the target count::

            S_1 = prune(T_1)
            S_t = prune(rule(S_{t-1}, T_t))

        ``cia``: ``((t - 1) * S_{t-1} + T_t) / t`` (Eq. 4); ``caa``: the same per weight with
        ``t`` replaced by the number of tickets in which the weight was active; ``cima``:
        ``beta * S_{t-1} + (1 - beta) * T_t``. Training continues from the live ticket; the
        model is not changed. [`finalize`][] writes the copy
        into the model. ``SupTicketsScheduler`` calls this at the end of every cycle.

        Args:
            averaging (str): ``"cia"``, ``"caa"`` or ``"cima"``. Default: ``"cia"`` (the paper's
                best, §4.2).
            beta (float): the CIMA decay in [0, 1). Default: 0.8 (the paper's tuned value).
            reprune (str): ``"layer"`` keeps each layer's count (default); ``"global"`` keeps the
                global top ``K`` over all sparse layers, as the official code does.
            bn_update (Iterable | Callable | None): recompute the BatchNorm running statistics of
                the superposed copy after the average and re-prune, as the official code does,
                instead of keeping their average: an iterable of input batches goes to
                ``torch.optim.swa_utils.update_bn`` on the model holding the superposed copy; a
                callable is called with that model (in train mode, statistics reset, cumulative
                momentum) and runs the forward passes itself. The live weights and statistics
                are restored bit-exactly afterwards. Default: None (average them).

        Raises:
            TypeError: if ``bn_update`` is neither callable nor a re-iterable (an iterator
                would be used up by the first ticket).
            ValueError: for a bad argument, or one that differs from the first ticket's;
                ``bn_update`` without ``model=``; a ``bn_update`` that gives no batch or batches
                the model cannot take (the superposed copy is then left as it was).

        Warns:
            UserWarning: on the first ticket without ``model=``: BatchNorm running statistics
                are then not superposed.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> _ = torch.manual_seed(0)
            >>> nn = torch.nn
            >>> model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 2))
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.9,
            ...                       model=model, seed=0)
            >>> def train_step():
            ...     model(torch.randn(16, 8)).square().mean().backward()
            ...     opt.step(); opt.zero_grad()
            >>> for _ in range(3):
            ...     train_step()
            ...     opt.consolidate()
            >>> opt.tickets
            3
        """
        check_superposition_args(averaging, beta, reprune)
        check_bn_update(bn_update)
        if bn_update is not None and self.model is None:
            raise ValueError(
                "consolidate(bn_update=...) recomputes the BatchNorm statistics of the model; "
                "pass model= to SparseOptimizer"
            )
        sup = self._superposition
        backup = None if sup is None or bn_update is None else sup.state_dict()
        if sup is None:
            if self.model is None:
                warnings.warn(
                    "consolidate() without model=: BatchNorm running statistics are not "
                    "superposed; pass model= to SparseOptimizer to superpose them",
                    UserWarning,
                    stacklevel=2,
                )
            sup = Superposition(averaging, beta, reprune)
        elif (sup.averaging, sup.beta, sup.reprune) != (averaging, float(beta), reprune):
            raise ValueError(
                f"consolidate(averaging={averaging!r}, beta={beta}, reprune={reprune!r}) differs "
                f"from the first ticket's (averaging={sup.averaging!r}, beta={sup.beta}, "
                f"reprune={sup.reprune!r})"
            )
        if not self._masks_applied:
            self.apply_masks()
        with torch.no_grad():
            sup.add(
                self._all_params(),
                self._sparse_indices(),
                [layer.mask for layer in self._layers],
                [layer.count for layer in self._layers],
                self._bn_buffers(),
            )
        self._superposition = sup
        if bn_update is not None:
            try:
                self._recompute_superposed_bn(sup, bn_update)
            except BaseException:
                self._superposition = (
                    None
                    if backup is None
                    else Superposition.from_state_dict(
                        backup, self._all_params(), self._sparse_indices(), self._bn_buffers()
                    )
                )
                raise

    def _sparse_indices(self) -> list[int]:
        return [layer.index for layer in self._layers]

    def _recompute_superposed_bn(self, sup: Superposition, bn_update: BNUpdate) -> None:
        """Recompute the superposed copy's BatchNorm statistics on the model, live restored."""
        with self.superposed():
            recompute_bn(self.model, bn_update)
            for key, buf in self._bn_buffers().items():
                sup.buffers[key].copy_(buf.detach())

    def _require_tickets(self, what: str) -> Superposition:
        if self._superposition is None:
            raise ValueError(f"{what} needs at least one ticket: call consolidate() first")
        return self._superposition

    def _write_superposed(self, sup: Superposition) -> None:
        for p, s in zip(self._all_params(), sup.params, strict=True):
            p.detach().copy_(s)
        buffers = self._bn_buffers()
        for key, s in sup.buffers.items():
            buf = buffers[key]
            buf.copy_(s.round() if not buf.is_floating_point() else s)
        _dtensor.reshard(self.model)

    @torch.no_grad()
    def finalize(self) -> None:
        """Write the superposed ticket into the model: the "ultimate ticket".

        The parameters and BatchNorm buffers take the superposed values in place, and the masks
        become the superposed copy's support, so the model holds exactly the target count of
        active weights. Inner optimizer state at the now-inactive positions is zeroed, so training
        could go on from here with every invariant intact. ``SupTicketsScheduler`` calls it after
        the last step.

        Raises:
            ValueError: if no ticket was consolidated.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> _ = torch.manual_seed(0)
            >>> nn = torch.nn
            >>> model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 2))
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.9,
            ...                       model=model, seed=0)
            >>> def train_step():
            ...     model(torch.randn(16, 8)).square().mean().backward()
            ...     opt.step(); opt.zero_grad()
            >>> for _ in range(2):
            ...     train_step()
            ...     opt.consolidate()
            >>> opt.finalize()
            >>> [int(m.sum()) for m in opt.masks.values()] == [l.target for l in opt.layers]
            True
        """
        sup = self._require_tickets("finalize()")
        sparse = self._sparse_indices()
        masks = sup.masks(sparse, [layer.count for layer in self._layers])
        self._write_superposed(sup)
        for layer, mask, count in zip(self._layers, masks, count_active(masks), strict=True):
            layer.mask.copy_(mask)
            layer.count = count
        self._mask_weights_and_state(self._layers)

    @contextmanager
    def superposed(self) -> Iterator[None]:
        """Temporarily swap the superposed ticket into the model, e.g. to evaluate it.

        The live weights and BatchNorm buffers are restored bit-exactly on exit, also when the
        body raises.

        Yields:
            Nothing; the model holds the superposed ticket inside the ``with`` block.

        Raises:
            ValueError: if no ticket was consolidated.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> _ = torch.manual_seed(0)
            >>> nn = torch.nn
            >>> model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 2))
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.9,
            ...                       model=model, seed=0)
            >>> def train_step():
            ...     model(torch.randn(16, 8)).square().mean().backward()
            ...     opt.step(); opt.zero_grad()
            >>> train_step(); opt.consolidate(); train_step()
            >>> live = model[0].weight.detach().clone()
            >>> with opt.superposed():
            ...     in_block = model[0].weight.detach().clone()
            >>> torch.equal(in_block, live), torch.equal(model[0].weight, live)
            (False, True)
        """
        sup = self._require_tickets("superposed()")
        params = self._all_params()
        buffers = self._bn_buffers()
        with torch.no_grad():
            saved_params = [p.detach().clone() for p in params]
            saved_buffers = {k: buffers[k].clone() for k in sup.buffers}
            try:
                self._write_superposed(sup)
                yield
            finally:
                for p, s in zip(params, saved_params, strict=True):
                    p.detach().copy_(s)
                for k, s in saved_buffers.items():
                    buffers[k].copy_(s)
                _dtensor.reshard(self.model)

    # --- distributed --------------------------------------------------------------------------
    def _digests(self) -> list[tuple[str, tuple[int, int] | None, list[float], list[float]]]:
        """Cheap per-layer fingerprints ``(name, shard, agreed, local)``.

        ``agreed`` must be equal on every rank: for a plain tensor the count, the mask's count
        and index sums, and sums of the superposed copy; for a sharded one (FSDP2) only the
        global count. ``local`` holds the same sums over a shard (``shard`` = its coordinate and the
        number of shards), which must agree between replicas of that shard, and whose counts must
        add up to the global count.
        """
        out = []
        sup = self._superposition
        for layer in self._layers:
            mask = _dtensor.local(layer.mask)
            idx = mask.reshape(-1).nonzero().reshape(-1).to(torch.float64)
            digest = [float(mask.sum()), float(idx.sum()), float(idx.square().sum())]
            if sup is not None:
                v = _dtensor.local(sup.params[layer.index]).detach().reshape(-1).to(torch.float64)
                weights = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
                digest += [float(v.sum()), float((v * weights).sum())]
            shard = _dtensor.shard_of(layer.mask)
            if shard is None:
                out.append((layer.name, None, [float(layer.count), *digest], []))
            else:
                out.append((layer.name, shard, [float(layer.count)], digest))
        state = self._generator.get_state().to(torch.float64)  # a CPU generator: on the CPU
        weights = torch.arange(1, state.numel() + 1, dtype=torch.float64, device=state.device)
        weighted = float((state * weights).sum())
        out.append(("generator", None, [float(state.sum()), weighted], []))
        out.append(("step/tickets", None, [float(self._step), float(self.tickets)], []))
        return out

    def check_consistency(self, group: Any = None) -> None:
        """Check that the ranks hold consistent masks, superposed copy and generator; raise if not.

        Gathers one small fingerprint per layer (active count, index sums of the mask, sums of
        the superposed copy) and of the random generator from every rank of ``group`` with
        ``all_gather_object``. Under DDP every rank must hold the same of everything. Under FSDP2
        a sharded layer's masks legitimately differ per rank: there the global counts must agree,
        the shards' counts must add up to them, and replicas of one shard (HSDP) must agree.
        Meant for debugging and tests; without an initialized process group it does nothing.

        Args:
            group (ProcessGroup | None): the process group; ``None`` is the default group.
                Default: None.

        Raises:
            RuntimeError: naming the first layer and rank that differ.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16)
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9)
            >>> opt.check_consistency()  # no process group: nothing to compare
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = self._digests()
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        for rank, theirs in enumerate(gathered):
            for (name, _, ref, _), (_, _, other, _) in zip(gathered[0], theirs, strict=True):
                if ref != other:
                    raise RuntimeError(
                        f"SparseOptimizer state differs between rank 0 and rank {rank} at "
                        f"{name}: {ref} vs {other}"
                    )
        for i, (name, shard, agreed, _) in enumerate(gathered[0]):
            if shard is None:
                continue
            holders: dict[int, tuple[int, list[float]]] = {}
            for rank, theirs in enumerate(gathered):
                (coord, _), digest = theirs[i][1], theirs[i][3]
                first = holders.setdefault(coord, (rank, digest))
                if first[1] != digest:
                    raise RuntimeError(
                        f"SparseOptimizer state differs between rank {first[0]} and rank {rank}, "
                        f"replicas of shard {coord} of {name}: {first[1]} vs {digest}"
                    )
            total = sum(digest[0] for _, digest in holders.values())
            if len(holders) == shard[1] and total != agreed[0]:
                raise RuntimeError(
                    f"the {shard[1]} shards of {name} hold {int(total)} active weights, but the "
                    f"optimizer counts {int(agreed[0])}"
                )

    # --- the rest of the Optimizer API ----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the inner optimizer's ``zero_grad``.

        Args:
            set_to_none (bool): set the gradients to ``None`` instead of zeroing them.
                Default: True.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; its sparse tensors get masks.

        The new group's sparse tensors get their own distribution at the target sparsity.

        Args:
            param_group (dict): as for ``torch.optim.Optimizer.add_param_group``; ``"sparse":
                False`` keeps the whole group dense.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> body, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
            >>> opt = SparseOptimizer(torch.optim.SGD(body.parameters(), lr=0.1), "set", 0.5)
            >>> opt.add_param_group({"params": head.parameters(), "sparse": False})
            >>> len(opt.param_groups), [layer.count for layer in opt.layers]
            (2, [128])
        """
        self.optimizer.add_param_group(param_group)
        self._register_groups(self.optimizer.param_groups[-1:])

    def report(self) -> SparsityReport:
        """Per-layer name, shape, numel, nnz (active connections) and density; totals; updates.

        The counts are the ones recounted from the masks at every topology update, so no rank
        communicates: under FSDP2 any rank may call it alone and gets the global numbers.

        Returns:
            A [`SparsityReport`][sparseopt.metrics.SparsityReport]: a ``dict`` with ``layers``,
            ``total`` and ``updates``, which prints as a table.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16)
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9)
            >>> opt.report()["total"]["nnz"]
            26
        """
        rows = [
            {
                "name": layer.name,
                "shape": tuple(layer.param.shape),
                "numel": layer.numel,
                "nnz": layer.count,
                "density": layer.count / layer.numel,
            }
            for layer in self._layers
        ]
        return SparsityReport(rows, dict(self._stats, step=self._step))

    # --- checkpoints ----------------------------------------------------------------------------
    def _sparse_state(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "method": self.method.name,
            "method_options": self.method.options(),
            "method_state": self.method.state_dict(),
            "sparsity": self.sparsity,
            "step": self._step,
            "masks_applied": self._masks_applied,
            "periodic_updates": self.periodic_updates,
            "pending_exploration": self._pending_exploration,
            "generator": self._generator.get_state(),
            "num_params": self._num_params,
            "names": {layer.index: layer.name for layer in self._layers},
            "shapes": {layer.index: list(layer.param.shape) for layer in self._layers},
            "counts": {layer.index: layer.count for layer in self._layers},
            "targets": {layer.index: layer.target for layer in self._layers},
            "masks": {layer.index: layer.mask.clone() for layer in self._layers},
            "stats": dict(self._stats),
            "superposition": None
            if self._superposition is None
            else self._superposition.state_dict(),
        }

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus one ``"sparseopt"`` entry of plain data.

        It loads with ``torch.load(path, weights_only=True)``. Masks are bool tensors keyed by the
        parameter's index in packing order, as torch keys optimizer state. The entry also holds
        the step counters, the generator state, the method's state and the superposed copy.
        Under FSDP2 the masks and the superposed copy of DTensor parameters are DTensors like
        the parameters (each rank's entry holds its shard), as is the inner optimizer's state:
        save it with ``torch.save`` per rank and load it on the same rank and world size
        (``torch.distributed.checkpoint`` drops the ``"sparseopt"`` entry; see
        ``docs/distributed.md``).

        Returns:
            ``{"state": ..., "param_groups": ..., "sparseopt": {...}}``.

        Examples:
            >>> import io, torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16)
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9)
            >>> buffer = io.BytesIO()
            >>> torch.save(opt.state_dict(), buffer); _ = buffer.seek(0)
            >>> state = torch.load(buffer, weights_only=True)
            >>> sorted(state), state["sparseopt"]["masks"][0].dtype
            (['param_groups', 'sparseopt', 'state'], torch.bool)
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["sparseopt"] = self._sparse_state()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def _check_fits(self, saved: Mapping[str, Any]) -> None:
        problems = []
        if saved.get("format") != _FORMAT:
            problems.append(f"format {saved.get('format')!r} (expected {_FORMAT})")
        if saved.get("method") != self.method.name:
            problems.append(
                f"method {saved.get('method')!r} vs this optimizer's {self.method.name!r}"
            )
        elif saved.get("method_options") != self.method.options():
            problems.append(
                f"method options {saved.get('method_options')} vs this optimizer's "
                f"{self.method.options()}"
            )
        if saved.get("num_params") != self._num_params:
            problems.append(
                f"{saved.get('num_params')} parameters vs this optimizer's {self._num_params}"
            )
        if saved.get("sparsity") != self.sparsity:
            problems.append(f"sparsity {saved.get('sparsity')} vs this optimizer's {self.sparsity}")
        mine = {layer.index: list(layer.param.shape) for layer in self._layers}
        theirs = {int(k): list(v) for k, v in saved.get("shapes", {}).items()}
        if set(mine) != set(theirs):
            problems.append(
                f"sparse parameter indices {sorted(theirs)} vs this optimizer's {sorted(mine)}"
            )
        else:
            problems += [
                f"parameter {i} has shape {theirs[i]} vs this optimizer's {mine[i]}"
                for i in sorted(mine)
                if mine[i] != theirs[i]
            ]
        if problems:
            raise ValueError("state dict does not fit this SparseOptimizer: " + "; ".join(problems))

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by [`state_dict`][], inner
        optimizer state included.

        Build the optimizer exactly as before (same method, sparsity, model and parameter
        order), and any ``LRScheduler`` on it, then load: building a scheduler resets ``lr``.
        The masks are applied to the weights at once if they were in the saved run.

        Args:
            state_dict (dict): what ``state_dict()`` returned (or ``torch.load`` of it).

        Raises:
            ValueError: if the state dict has no ``"sparseopt"`` entry, or was made by an optimizer
                with another method, sparsity, number of parameters or sparse shapes; the message
                lists every difference.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer
            >>> model = torch.nn.Linear(16, 16)
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9,
            ...                       seed=0)
            >>> model(torch.randn(4, 16)).sum().backward(); opt.step()
            >>> saved = opt.state_dict()
            >>> resumed = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9,
            ...                           seed=1)
            >>> resumed.load_state_dict(saved)
            >>> torch.equal(resumed.masks[model.weight], opt.masks[model.weight])
            True
            >>> other = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.9)
            >>> other.load_state_dict(saved)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: state dict does not fit this SparseOptimizer: method 'set' vs ... 'rigl'
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        if "sparseopt" not in state_dict:
            raise ValueError(
                "state dict has no 'sparseopt' entry: it was not made by "
                "SparseOptimizer.state_dict(); load a plain optimizer's state with "
                "opt.optimizer.load_state_dict(...)"
            )
        saved = state_dict["sparseopt"]
        self._check_fits(saved)
        by_index = {layer.index: layer for layer in self._layers}
        masks = {  # first, so that a mask that does not fit raises before anything is loaded
            key: _dtensor.load_like(mask, by_index[int(key)].param, torch.bool)
            for key, mask in saved["masks"].items()
        }
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "sparseopt"})
        for key, mask in masks.items():
            layer = by_index[int(key)]
            layer.mask = mask
            layer.count = int(saved["counts"][key])
            layer.target = int(saved["targets"][key])
        self.method.load_state_dict(saved["method_state"])
        # the generator is a CPU one; a state dict moved to another device (Accelerate's
        # device placement moves every tensor) brings its state back
        self._generator.set_state(saved["generator"].cpu())
        self._step = int(saved["step"])
        self.periodic_updates = bool(saved["periodic_updates"])
        self._pending_exploration = saved["pending_exploration"]
        self._stats = dict(saved["stats"])
        self._masks_applied = bool(saved["masks_applied"])
        sup = saved.get("superposition")
        self._superposition = (
            None
            if sup is None
            else Superposition.from_state_dict(
                sup,
                self._all_params(),
                self._sparse_indices(),
                self._bn_buffers(),
            )
        )
        if self._masks_applied:
            self._mask_weights_and_state(self._layers)
            _dtensor.reshard(self.model)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # --- pickling and printing ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = _compat.drop_unpicklable(self.__dict__)
        state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator(device="cpu")
        generator.set_state(state.pop("_generator"))
        self.__dict__.update(state)
        self._generator = generator
        _compat.init_optimizer_hooks(self)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"SparseOptimizer(method={self.method!r}, sparsity={self.sparsity}, "
            f"density={self.density:.4f}, layers={len(self._layers)}, {self._schedule!r})\n{inner}"
        )
