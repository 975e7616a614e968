"""The mask engine: sparse layers, their masks and generator, masking inside a step, topology
updates.

``SparseOptimizer`` owns one :class:`MaskEngine` and calls it around the inner optimizer's step:
:meth:`MaskEngine.begin_step` before (apply the masks on the first step, read a due update's
growth scores from the dense gradients, mask the gradients) and :meth:`MaskEngine.end_step` after
(re-mask where the inner optimizer may not keep zeros, apply the update). The method
(:mod:`sparseopt.methods`) decides the masks; the engine applies them, zeroes weights and inner
state wherever a mask changed, and keeps the counts and :class:`~sparseopt.report.UpdateStats`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _dtensor, _premasked, _validate
from .distributions import exact_counts, layer_densities
from .masks import apply_masks_, count_active, random_mask
from .methods import MethodContext, SparseLayer, SparsityMethod
from .report import SparsityReport, UpdateStats
from .schedules import PRUNE_SCHEDULES, TopologySchedule
from .structure import (
    Structure,
    check_structured,
    fits,
    gemm_shape,
    parse_structure,
    random_structured,
    row_count,
)

__all__ = ["MaskEngine", "PendingUpdate", "keeps_zeros"]

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


def keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` provably keeps a zero weight with zero gradient and state at 0."""
    kind = type(optimizer)
    if kind in _ZERO_PRESERVING:
        return True
    if kind is torch.optim.Adagrad:  # a nonzero initial accumulator is nonzero state
        return all(g.get("initial_accumulator_value", 0) == 0 for g in optimizer.param_groups)
    return False


class PendingUpdate(NamedTuple):
    """What :meth:`MaskEngine.begin_step` hands to :meth:`MaskEngine.end_step` within one step."""

    step: int  # the optimizer step that is running, from 1
    rate: float | None  # the drop fraction of a due update; None when none is due
    scheduled: int | None  # the step of a scheduled update; None for an exploration
    scores: list[Tensor] | None  # the growth scores; None when no update is left to apply


class MaskEngine:
    """Masks of the sparse tensors of one inner optimizer, and the topology updates that move them.

    It checks its arguments (the one rule of ``_validate``); the owner sets ``method`` before
    registering the first param groups.

    Args:
        optimizer: the inner optimizer (its param groups and state are read live).
        sparsity: the target sparsity, in [0, 1).
        distribution: how the sparsity spreads over the layers.
        update_every, prune_rate, prune_schedule, stop_fraction, total_steps: the periodic
            schedule.
        seed: seeds the engine's own CPU generator; ``None`` takes ``torch.initial_seed()``.
        remask: ``"auto"`` or ``"always"``.
        model: names the layers; its FSDP2 modules are resharded after the masks are written.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sparsity: float | None,
        distribution: str | Mapping[str, float],
        *,
        structure: str | Structure | None = None,
        update_every: int,
        prune_rate: float,
        prune_schedule: str | None,
        stop_fraction: float,
        total_steps: int | None,
        seed: int | None,
        remask: str,
        model: torch.nn.Module | None,
    ) -> None:
        self.optimizer = optimizer
        self.model = model
        self.method: SparsityMethod  # set by the owner before register()
        self.structure = parse_structure(structure)
        self.sparsity = self._resolve_sparsity(sparsity)
        self.excluded: list[
            dict[str, Any]
        ] = []  # sparse-eligible layers the structure leaves dense
        if not isinstance(distribution, (str, Mapping)):
            raise TypeError(
                "Expected distribution to be 'erk', 'er', 'uniform' or a mapping name -> density, "
                f"but got {_validate.type_of(distribution)}"
            )
        self.distribution = (
            dict(distribution) if isinstance(distribution, Mapping) else distribution
        )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Expected model to be an nn.Module or None, but got {_validate.type_of(model)}"
            )
        self.update_every = _validate.integer("update_every", update_every, 1)
        self.prune_rate = _validate.real("prune_rate", prune_rate, 0, 1)
        if prune_schedule is not None:
            _validate.choice("prune_schedule", prune_schedule, PRUNE_SCHEDULES)
        self.prune_schedule = prune_schedule
        self.stop_fraction = _validate.real("stop_fraction", stop_fraction, 0, 1, low_open=True)
        self.remask = _validate.choice("remask", remask, ("auto", "always"))
        self.seed = (  # what torch.Generator.manual_seed takes
            torch.initial_seed()
            if seed is None
            else _validate.integer("seed", seed, -(2**63), 2**64 - 1)
        )
        if total_steps is not None:
            total_steps = _validate.integer("total_steps", total_steps, 1)
        self.total_steps = total_steps
        self.schedule = self.make_schedule(total_steps)
        # a CPU generator whatever the parameters' device: the same seed, the same masks
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.layers: list[SparseLayer] = []
        self.num_params = 0
        self.step = 0
        self.masks_applied = False
        self.periodic_updates = True
        self.pending_exploration: float | None = None
        self.stats = UpdateStats()
        self.keeps_zeros = self.remask == "auto" and keeps_zeros(optimizer)
        self._unmaskable: set[tuple[str, str]] = set()
        self._pending: PendingUpdate | None = None
        self.context = self._make_context()

    # --- settings ---------------------------------------------------------------------------
    def _resolve_sparsity(self, sparsity: float | None) -> float:
        """``sparsity`` checked; left out, 0.9, or under ``N:M`` the structure's ``1 - N/M``."""
        s = self.structure
        if s is None or s.kind != "nm":
            return (
                0.9
                if sparsity is None
                else _validate.real("sparsity", sparsity, 0, 1, high_open=True)
            )
        implied = 1.0 - s.n / s.m
        if sparsity is None:
            return implied
        value = _validate.real("sparsity", sparsity, 0, 1, high_open=True)
        if abs(value - implied) > 1e-9:
            raise ValueError(
                f"Expected sparsity to be left out or {implied:g} with structure='{s}', but got "
                f"{sparsity!r}: every sparse layer of a {s} structure has density {s.n}/{s.m}"
            )
        return implied

    def _make_context(self) -> MethodContext:
        return MethodContext(
            tuple(self.layers), self.schedule, self.total_steps, self.sparsity, self.structure
        )

    def check_method(self) -> None:
        """Refuse a method that cannot keep the structure, then let it check the settings."""
        s = self.structure
        if s is not None and s.kind not in self.method.structures:
            raise ValueError(
                f"Expected a method that keeps structure='{s}', but got method "
                f"{self.method.name!r}, which changes the density as it prunes; use 'static', "
                "'set', 'rigl' or 'snip' with a structure"
            )
        self.method.check(self.context)

    def make_schedule(self, total_steps: int | None) -> TopologySchedule:
        """The periodic schedule for a training of ``total_steps`` (``None``: unknown)."""
        decay = self.prune_schedule or ("cosine" if total_steps is not None else "constant")
        end = None if total_steps is None else math.floor(self.stop_fraction * total_steps)
        if decay == "cosine" and total_steps is None:
            raise ValueError("prune_schedule='cosine' needs total_steps to know where it ends")
        return TopologySchedule(self.update_every, self.prune_rate, decay, end)

    def set_total_steps(self, total_steps: int | None) -> None:
        """Rebuild the schedule for ``total_steps``; nothing changes if the method refuses it."""
        if total_steps is not None:
            total_steps = _validate.integer("total_steps", total_steps, 1)
        schedule = self.make_schedule(total_steps)
        before = (self.schedule, self.total_steps, self.context)
        self.schedule, self.total_steps = schedule, total_steps
        self.context = self._make_context()
        try:
            self.check_method()
        except ValueError:
            self.schedule, self.total_steps, self.context = before
            raise

    # --- layers -----------------------------------------------------------------------------
    def _param_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for group in self.optimizer.param_groups:
            for p, name in zip(group["params"], group.get("param_names", ()), strict=False):
                names[id(p)] = name
        if self.model is not None:
            names.update({id(p): n for n, p in self.model.named_parameters()})
        return names

    def register(self, groups: Iterable[dict[str, Any]]) -> None:
        """Give the sparse tensors of ``groups`` masks at the distribution's counts."""
        names = self._param_names()
        new: list[tuple[Tensor, str, int]] = []
        # a tensor listed twice (a tied weight listed by hand; torch only warns) is one parameter
        # and gets one mask: its first position is its layer
        seen = {id(layer.param) for layer in self.layers}
        for group in groups:
            sparse = self.sparse_flag(group)
            for p in group["params"]:
                index = self.num_params
                self.num_params += 1
                if sparse and p.ndim >= 2 and id(p) not in seen:
                    seen.add(id(p))
                    new.append((p, names.get(id(p), f"param{index}"), index))
        new = self._structurable(new)
        if not new:
            return
        shapes = [tuple(p.shape) for p, _, _ in new]
        layer_names = [n for _, n, _ in new]
        numels = [p.numel() for p, _, _ in new]
        target = 1.0 - self.sparsity

        def counts_at(density: float) -> list[int]:
            if self.structure is not None and self.structure.kind == "nm" and density == target:
                return [n // self.structure.m * self.structure.n for n in numels]
            densities = layer_densities(self.distribution, shapes, density, layer_names)
            if self.structure is not None and density == target:  # fan-in: k per row
                return [
                    gemm_shape(shape)[0] * row_count(shape, d)
                    for shape, d in zip(shapes, densities, strict=True)
                ]
            return exact_counts(densities, numels, density)

        targets = counts_at(target)
        start = self.method.start_density(target)
        counts = targets if start == target else counts_at(start)
        for (p, name, index), count, goal in zip(new, counts, targets, strict=True):
            _dtensor.check_placements(p, name)
            if self.structure is not None and count == goal:
                rows = gemm_shape(p.shape)[0]
                k = None if self.structure.kind == "nm" else count // rows
                mask = random_structured(p.shape, self.structure, self.generator, k)
            else:  # no structure, or a dense start (SNIP) that the first update structures
                mask = random_mask(p.shape, count, self.generator)
            mask = _dtensor.shard_like(mask, p)
            self.layers.append(SparseLayer(p, name, index, mask, count, goal))
        self.context = self._make_context()
        if self.masks_applied:
            self.mask_weights_and_state(self.layers[-len(new) :])

    @staticmethod
    def sparse_flag(group: Any) -> bool:
        """A param group's ``"sparse"`` flag (default True); a ``TypeError`` unless a bool."""
        if not isinstance(group, Mapping):
            return True  # not a param group: torch's add_param_group refuses it
        return _validate.boolean('param group "sparse"', group.get("sparse", True))

    def _structurable(self, new: list[tuple[Tensor, str, int]]) -> list[tuple[Tensor, str, int]]:
        """The layers the structure can hold; the others stay dense, listed in ``excluded``."""
        s = self.structure
        if s is None:
            return new
        kept = []
        for p, name, index in new:
            if _dtensor.is_dtensor(p):
                raise ValueError(
                    f"Expected plain tensors with structure='{s}', but {name} is a DTensor: "
                    "structured masks under FSDP2 are not supported; leave structure out"
                )
            if fits(p.shape, s):
                kept.append((p, name, index))
            else:
                fan_in = gemm_shape(p.shape)[1]
                reason = f"input dimension {fan_in} is not a multiple of {s.m}"
                self.excluded.append({"name": name, "shape": tuple(p.shape), "reason": reason})
        return kept

    def state_tensors(self, layer: SparseLayer) -> list[Tensor]:
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

    def mask_weights_and_state(self, layers: Iterable[SparseLayer] | None = None) -> None:
        """Zero the weights and their inner state at the inactive positions of ``layers``."""
        tensors, masks = [], []
        for layer in self.layers if layers is None else layers:
            for t in (layer.param.detach(), *self.state_tensors(layer)):
                tensors.append(t)
                masks.append(layer.mask)
        with torch.no_grad():
            apply_masks_(tensors, masks, nan_safe=self.remask == "always")

    def apply_masks(self) -> None:
        """Zero weights and state at inactive positions, and remember that the masks are on."""
        self.mask_weights_and_state()
        self.masks_applied = True
        _dtensor.reshard(self.model)

    def set_masks(self, masks: list[Tensor]) -> None:
        """Replace every layer's mask (its support and count), then zero what became inactive."""
        for layer, mask, count in zip(self.layers, masks, count_active(masks), strict=True):
            layer.mask.copy_(mask)
            layer.count = count
        self.mask_weights_and_state()

    # --- inside a step ------------------------------------------------------------------------
    def explore(self, rate: float) -> None:
        """Ask for one drop-and-grow at drop fraction ``rate`` inside the next step."""
        self.pending_exploration = rate

    def _due_update(self, step: int) -> tuple[float, int | None] | None:
        """``(rate, step)`` of the update due at ``step`` (step ``None`` for an exploration)."""
        if self.pending_exploration is not None:
            return self.pending_exploration, None
        if self.periodic_updates and self.method.is_update_step(step, self.context):
            return self.schedule.rate(step), step
        return None

    def next_step_reads_gradient(self) -> bool:
        """Whether the next step reads the dense gradient of the sparse layers: a due update or
        pending exploration that grows by gradient, or SNIP's first step."""
        due = self._due_update(self.step + 1)
        return due is not None and self.method.reads_gradient(due[1], self.context)

    def grads_finite(self) -> bool:
        """Whether every gradient of every sparse layer is finite (on every shard)."""
        grads = [layer.param.grad for layer in self.layers if layer.param.grad is not None]
        return _dtensor.all_finite(grads)

    def check_dense_grads(self) -> None:
        """A clear error for a sparse-layout gradient (``nn.Embedding(sparse=True)``)."""
        for layer in self.layers:
            grad = layer.param.grad
            if grad is not None and grad.layout != torch.strided:
                raise TypeError(
                    f"Expected a dense (strided) gradient for the sparse parameter {layer.name!r}, "
                    f"but got a {grad.layout} gradient: a sparse-gradient layer such as "
                    "nn.Embedding(sparse=True) cannot be masked; put it in a param group with "
                    '"sparse": False, or build it with sparse=False'
                )

    def grow_scores(self) -> list[Tensor]:
        """The method's growth scores of every layer, from the current dense gradients."""
        return [
            self.method.grow_scores(layer, layer.param.grad, self.generator)
            for layer in self.layers
        ]

    @torch.compiler.disable
    def begin_step(self) -> None:
        """Before the inner step: on the first one apply the masks; read the scores of a due
        update; mask the gradients.

        It runs eagerly under ``torch.compile``: eager, the mask multiply is one foreach kernel
        over a uint8 view of the masks; inductor's CPU code for the same multiply runs several
        times slower (``benchmarks/compiled_step.py``), and a graph break in torch's own
        ``Optimizer.step`` keeps it from fusing into the update anyway.
        """
        if not self.masks_applied:
            self.check_dense_grads()
            self.apply_masks()
        step = self.step + 1
        due = self._due_update(step)
        scores = None
        finite = True
        if due is not None:
            finite = self.grads_finite()
            if finite:
                scores = self.grow_scores()
            else:
                warnings.warn(
                    f"non-finite gradients at step {step}: the topology update was skipped "
                    "and the masks are unchanged",
                    UserWarning,
                    stacklevel=6,
                )
                self.stats.skipped += 1
        rate, scheduled = due if due is not None else (None, None)
        if scores is not None and scheduled is not None and self.method.updates_before_step(step):
            self.update_topology(step, rate, scheduled, scores)
            scores = None
        self._pending = PendingUpdate(step, rate, scheduled, scores)
        premasked = _premasked.check(self.optimizer)  # sparse kernels: born 0 where inactive
        grads, masks = [], []
        for layer in self.layers:
            grad = layer.param.grad
            if grad is not None and not (premasked and premasked(layer.param, layer.mask)):
                grads.append(grad)
                masks.append(layer.mask)
        apply_masks_(grads, masks, nan_safe=not finite or self.remask == "always")

    @torch.compiler.disable
    def end_step(self) -> None:
        """After the inner step: re-mask where the inner step may not keep zeros, update, count."""
        pending, self._pending = self._pending, None
        if not self.keeps_zeros:
            self.mask_weights_and_state()
        if pending.scores is not None:
            self.update_topology(pending.step, pending.rate, pending.scheduled, pending.scores)
        self.step = pending.step

    def update_topology(
        self, step: int, rate: float, scheduled: int | None, scores: list[Tensor]
    ) -> None:
        """Apply the method's new masks; zero weights and inner state wherever a mask changed."""
        read_gradient = self.method.reads_gradient(scheduled, self.context)
        new_masks = self.method.new_masks(self.context, rate, scores, scheduled)
        if self.structure is not None:
            self._check_structure(new_masks)
        grown = []
        for layer, new in zip(self.layers, new_masks, strict=True):
            changed = layer.mask ^ new
            # on the local shards: mask, weight and state share one layout (check_placements)
            for t in (layer.param.detach(), *self.state_tensors(layer)):
                _dtensor.local(t).masked_fill_(_dtensor.local(changed), 0)
            grown.append(new & ~layer.mask)
            layer.mask.copy_(new)
        counts = count_active([layer.mask for layer in self.layers] + grown)
        for layer, count in zip(self.layers, counts, strict=False):
            layer.count = count
        if scheduled is None:
            self.pending_exploration = None
        self.stats.record(step, rate, sum(counts[len(self.layers) :]), read_gradient)

    # --- pickling (a torch.Generator does not pickle; its state does) ---------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "generator": self.generator.get_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator(device="cpu")
        generator.set_state(state.pop("generator"))
        self.__dict__.update(state, generator=generator)

    def _check_structure(self, masks: list[Tensor]) -> None:
        """A method that returns masks outside the structure is a bug: fail loudly, change none."""
        for layer, mask in zip(self.layers, masks, strict=True):
            k = None if self.structure.kind == "nm" else layer.target // gemm_shape(mask.shape)[0]
            try:
                check_structured(mask, self.structure, k)
            except ValueError as e:
                raise RuntimeError(
                    f"method {self.method.name!r} returned a mask for {layer.name} that breaks "
                    f"structure='{self.structure}': {e}"
                ) from e

    # --- reading ------------------------------------------------------------------------------
    @property
    def density(self) -> float:
        """The current fraction of active weights over all sparse parameters."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.count for layer in self.layers) / total if total else 1.0

    def report(self) -> SparsityReport:
        """Per-layer counts and densities, totals, and the update statistics."""
        rows = [
            {
                "name": layer.name,
                "shape": tuple(layer.param.shape),
                "numel": layer.numel,
                "nnz": layer.count,
                "density": layer.count / layer.numel,
            }
            for layer in self.layers
        ]
        updates = {**self.stats.as_dict(), "step": self.step}
        if self.structure is None:
            return SparsityReport(rows, updates)
        return SparsityReport(rows, updates, structure=str(self.structure), dense=self.excluded)
