"""The mask engine: sparse layers, their masks and generator, masking inside a step, topology
updates, and the engine's own state dict.

``SparseOptimizer`` builds one :class:`MaskEngine` from its inner optimizer, its frozen
:class:`~sparseopt.settings.SparseSettings`, the method and the model, and calls it around the
inner optimizer's step: :meth:`MaskEngine.begin_step` before (apply the masks on the first step,
read a due update's growth scores from the dense gradients, mask the gradients) and
:meth:`MaskEngine.end_step` after (re-mask where the inner optimizer may not keep zeros, apply the
update). The method (:mod:`sparseopt.methods`) decides the masks; the engine is the only writer
of the masks, of the weights at inactive positions and of the inner optimizer's state (also when a
checkpoint is loaded: :meth:`MaskEngine.load_state_dict`), and it keeps the counts and
:class:`~sparseopt.report.UpdateStats`.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _compat, _dtensor, _premasked, _validate, _warnings
from ._warnings import Once
from .context import MethodContext, SparseLayer
from .distributions import exact_counts, layer_densities
from .masks import apply_masks_, count_active, random_mask
from .methods import SparsityMethod
from .report import SparsityReport, UpdateStats
from .settings import SparseSettings
from .update_schedule import TopologySchedule

__all__ = ["MaskEngine", "PendingUpdate", "keeps_zeros"]

# Optimizers that, given a zero gradient and zero state at a position where the weight is 0, keep
# weight and state exactly 0 there (checked line by line against torch 2.13's update rules;
# tests/test_contract.py runs every one of them against remask="always", bit for bit), as long as
# their ``eps`` is not 0 in the parameter's dtype (below). For these the steady-state step only
# masks gradients.
_ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.Adagrad,
)


def _zero_eps(optimizer: torch.optim.Optimizer) -> tuple[float, torch.dtype] | None:
    """``(eps, dtype)`` where some group's ``eps`` rounds to 0 in a parameter's dtype, or None.

    Adam's, RMSprop's or Adagrad's update divides by ``sqrt(state) + eps``: at a position with zero
    gradient and zero state that is ``0 / eps``, exactly 0, unless ``eps`` itself is 0 in the
    parameter's dtype (AdamW's default 1e-8 in float16), where it becomes ``0 / 0 = nan``.
    """
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not _validate.is_real(eps) or eps <= 0:
            continue
        for dtype in {p.dtype for p in group["params"] if p.is_floating_point()}:
            if torch.tensor(eps, dtype=dtype, device="cpu").item() == 0:
                return eps, dtype
    return None


def keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` provably keeps a zero weight with zero gradient and state at 0.

    It depends on the optimizer's type, its settings (Adagrad's initial accumulator) and its
    parameters' dtypes: AdamW's default ``eps=1e-8`` is 0 in float16, so a zero-gradient position
    computes ``0 / 0`` there.

    Args:
        optimizer (torch.optim.Optimizer): the inner optimizer.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2, 2))
        >>> keeps_zeros(torch.optim.AdamW([w])), keeps_zeros(torch.optim.Adamax([w]))
        (True, False)
        >>> keeps_zeros(torch.optim.AdamW([torch.nn.Parameter(w.detach().half())]))
        False
    """
    if type(optimizer) not in _ZERO_PRESERVING:
        return False
    if type(optimizer) is torch.optim.Adagrad and any(  # a nonzero accumulator is nonzero state
        g.get("initial_accumulator_value", 0) != 0 for g in optimizer.param_groups
    ):
        return False
    return _zero_eps(optimizer) is None


# parameter -> the engine that masks it: one SparseOptimizer per parameter. Weak both ways: a
# parameter that dies leaves, and so does an engine (its optimizer garbage-collected).
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class PendingUpdate(NamedTuple):
    """What :meth:`MaskEngine.begin_step` hands to :meth:`MaskEngine.end_step` within one step."""

    step: int  # the optimizer step that is running, from 1
    rate: float | None  # the drop fraction of a due update; None when none is due
    scheduled: int | None  # the step of a scheduled update; None for an exploration
    scores: list[Tensor | None] | None  # growth scores (None per gradless layer); None: no update


class MaskEngine:
    """Masks of the sparse tensors of one inner optimizer, and the topology updates that move them.

    Built whole: it registers the inner optimizer's param groups, checks the method against the
    settings, and claims its sparse parameters (a parameter belongs to one engine at a time). Its
    settings are already checked (``SparseSettings`` checks itself when it is built).

    Which tensors are sparse: every parameter with ``ndim >= 2`` of a param group that does not
    say ``"sparse": False``, except a parameter with ``requires_grad=False`` when it is registered
    (frozen: it stays dense and untouched; :attr:`frozen` lists it) and, under a structure, one the
    structure does not fit (:attr:`dense` lists it).

    Args:
        optimizer (torch.optim.Optimizer): the inner optimizer (its param groups and state are
            read live).
        settings (SparseSettings): the frozen settings.
        method (SparsityMethod): the method.
        model (nn.Module | None): names the layers; its FSDP2 modules are resharded after the
            masks are written. Default: None.

    Raises:
        TypeError: if ``settings`` is not a ``SparseSettings``.
        ValueError: if nothing would be sparse (naming why), or if the method cannot run with
            the settings.

    Warns:
        UserWarning: if another live engine masks some of the parameters: this one takes them
            over, and the other one refuses to step from then on.

    Examples:
        >>> import torch
        >>> from sparseopt.engine import MaskEngine
        >>> from sparseopt.methods import get_method
        >>> from sparseopt.settings import SparseSettings
        >>> lin = torch.nn.Linear(8, 8)
        >>> sgd = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> engine = MaskEngine(sgd, SparseSettings(sparsity=0.75, seed=0), get_method("set"), lin)
        >>> [(layer.name, layer.count) for layer in engine.layers]
        [('weight', 16)]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        settings: SparseSettings,
        method: SparsityMethod,
        model: torch.nn.Module | None = None,
    ) -> None:
        if not isinstance(settings, SparseSettings):
            raise TypeError(
                f"Expected settings to be a SparseSettings, but got {type(settings).__name__}"
            )
        self.optimizer = optimizer
        self.settings = settings
        self.method = method
        self.model = model
        # a CPU generator whatever the parameters' device: the same seed, the same masks
        self.generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.layers: tuple[SparseLayer, ...] = ()
        self.context = MethodContext((), settings)
        self.dense: list[dict[str, Any]] = []  # sparse-eligible layers the structure leaves dense
        self.frozen: list[dict[str, Any]] = []  # sparse-eligible layers frozen when registered
        self.num_params = 0
        self.step = 0
        self.masks_applied = False
        self.periodic_updates = True
        self.pending_exploration: float | None = None
        self.stats = UpdateStats()
        self.keeps_zeros = False
        self.nan_safe = self._always = settings.remask == "always"
        self._views: dict[Tensor, Tensor] = {}
        self._view_of: tuple[Tensor, ...] = ()  # the masks that _view_list views, in order
        self._view_list: tuple[Tensor, ...] = ()
        self._views_out = False
        self._once = Once()
        self.superseded = False  # a newer engine took over the parameters (_claim)
        self._pending: PendingUpdate | None = None
        self.register(optimizer.param_groups, claim=False)
        if not self.layers:
            raise ValueError(self._nothing_sparse())
        self.check_method()
        self._claim()

    # --- settings ---------------------------------------------------------------------------
    @property
    def schedule(self) -> TopologySchedule:
        """The periodic topology-update schedule (the settings')."""
        return self.settings.schedule

    def check_method(self) -> None:
        """Refuse a method that cannot keep the structure, then let it check the settings."""
        s = self.settings.structure
        if s is not None and not s.kept_by(self.method):
            raise ValueError(
                f"Expected a method that keeps structure='{s}', but got method "
                f"{self.method.name!r}, which changes the density as it prunes; use 'static', "
                "'set', 'rigl' or 'snip' with a structure"
            )
        self._hook("check", self.layers, self.context)

    def retime(self, settings: SparseSettings) -> None:
        """Adopt ``settings``, which differ from the engine's in ``total_steps`` at most; nothing
        changes if the method refuses them.

        Raises:
            ValueError: if another setting differs, or the method cannot run with them.
        """
        fixed = [f.name for f in dataclasses.fields(settings) if f.init and f.name != "total_steps"]
        changed = [k for k in fixed if getattr(settings, k) != getattr(self.settings, k)]
        if changed:
            raise ValueError(f"only total_steps may change after construction, not {changed}")
        before = self.settings
        self.settings = settings
        self._set_layers(self.layers)
        try:
            self.check_method()
        except ValueError:
            self.settings = before
            self._set_layers(self.layers)
            raise

    # --- layers -----------------------------------------------------------------------------
    def _set_layers(self, layers: tuple[SparseLayer, ...]) -> None:
        """The one place the layers change: the tuple, the method's context, the masks' views."""
        self.layers = layers
        self.context = MethodContext(layers, self.settings)
        # what ``opt.masks`` hands out: the masks' storage under a version counter of its own, so
        # a write through it is seen (and refused at the next step) apart from the engine's own;
        # a mask object that stays keeps its view
        masks = tuple(layer.mask for layer in layers)
        if len(masks) == len(self._view_of) and all(map(operator.is_, masks, self._view_of)):
            return  # the same mask objects (an update writes them in place): the same views
        views = {id(mask): view for mask, view in zip(self._view_of, self._view_list, strict=True)}
        self._view_list = tuple(views.get(id(m), m.data) for m in masks)
        self._view_of = masks
        self._views = dict(zip((layer.param for layer in layers), self._view_list, strict=True))

    @property
    def views(self) -> Mapping[Tensor, Tensor]:
        """Parameter -> mask, read-only: a write through one of these masks is refused (a
        ``RuntimeError``) at the next step, report or state dict."""
        self._views_out = True  # from now on every step looks (a loop that never asks pays 0)
        return MappingProxyType(self._views)

    def check_views(self) -> None:
        """Raise if a mask handed out by :attr:`views` was written.

        Raises:
            RuntimeError: naming the layer.
        """
        if not self._views_out or not _compat.any_written(self._view_list):
            return
        for layer in self.layers:
            if _compat.tensor_version(self._views[layer.param]):
                raise RuntimeError(
                    f"the mask of {layer.name} was written through SparseOptimizer.masks, which "
                    "is read-only: the optimizer's counts and weights no longer match it. Masks "
                    "change only through the optimizer (its topology updates, load_state_dict, "
                    "finalize)"
                )

    def _param_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for group in self.optimizer.param_groups:
            for p, name in zip(group["params"], group.get("param_names", ()), strict=False):
                names[id(p)] = name
        if self.model is not None:
            names.update({id(p): n for n, p in self.model.named_parameters()})
        return names

    @staticmethod
    def sparse_flag(group: Any) -> bool:
        """A param group's ``"sparse"`` flag (default True); a ``TypeError`` unless a bool."""
        if not isinstance(group, Mapping):
            return True  # not a param group: torch's add_param_group refuses it
        return _validate.boolean('param group "sparse"', group.get("sparse", True))

    def check_group(self, group: Any) -> None:
        """Check a param group before the inner optimizer takes it: its ``"sparse"`` flag."""
        self.sparse_flag(group)

    def register(self, groups: Iterable[dict[str, Any]], *, claim: bool = True) -> None:
        """Give the sparse tensors of ``groups`` masks at the distribution's counts.

        Everything is checked before anything changes.
        """
        names = self._param_names()
        new: list[tuple[Tensor, str, int]] = []
        frozen: list[dict[str, Any]] = []
        # a tensor listed twice (a tied weight listed by hand; torch only warns) is one parameter
        # and gets one mask: its first position is its layer
        seen = {id(layer.param) for layer in self.layers}
        index = self.num_params
        for group in groups:
            sparse = self.sparse_flag(group)
            for p in group["params"]:
                index += 1
                if not sparse or p.ndim < 2 or id(p) in seen:
                    continue
                seen.add(id(p))
                name = names.get(id(p), f"param{index - 1}")
                if not p.requires_grad:  # a frozen backbone stays dense and untouched
                    frozen.append({"name": name, "shape": tuple(p.shape)})
                else:
                    new.append((p, name, index - 1))
        new, dense = self._structurable(new)
        layers = self._new_layers(new)
        self.num_params = index
        self.frozen += frozen
        self.dense += dense
        self._set_layers(self.layers + layers)
        self._remask_policy()
        if claim:
            self._claim()
        if self.masks_applied and layers:
            self.mask_weights_and_state(layers)

    def _remask_policy(self) -> None:
        """Whether the step may skip the re-mask (the inner optimizer keeps zeros), and whether
        the re-mask must be NaN-safe (``remask="always"``, or an ``eps`` that is 0 in a
        parameter's dtype, which turns the zeros into ``0 / 0``)."""
        self._always = self.settings.remask == "always"
        self.keeps_zeros = not self._always and keeps_zeros(self.optimizer)
        zero_eps = _zero_eps(self.optimizer)
        self.nan_safe = self._always or zero_eps is not None
        if zero_eps is not None:
            eps, dtype = zero_eps
            self._once.warn(
                "zero-eps",
                f"eps={eps:g} of {type(self.optimizer).__name__} is 0 in {dtype}: its update "
                "divides by 0 wherever a squared gradient is 0 in that dtype. The inactive "
                "weights are kept at exactly 0 (a NaN-safe re-mask after every step), but active "
                "weights can still overflow: use an eps that the dtype holds (1e-4 for float16), "
                "float32 weights under torch.autocast, or bfloat16",
            )

    def _new_layers(self, new: list[tuple[Tensor, str, int]]) -> tuple[SparseLayer, ...]:
        """Masks at the distribution's counts (the method's start density) for ``new``."""
        if not new:
            return ()
        s = self.settings.structure
        shapes = [tuple(p.shape) for p, _, _ in new]
        layer_names = [n for _, n, _ in new]
        numels = [p.numel() for p, _, _ in new]
        target = 1.0 - self.settings.sparsity

        def counts_at(density: float) -> list[int]:
            fixed = None if s is None or density != target else s.fixed_density
            densities = (
                [fixed] * len(shapes)
                if fixed is not None
                else layer_densities(self.settings.distribution, shapes, density, layer_names)
            )
            if s is not None and density == target:  # whole units, by the structure's rule
                return [s.layer_count(sh, d) for sh, d in zip(shapes, densities, strict=True)]
            return exact_counts(densities, numels, density)

        targets = counts_at(target)
        start = self.method.start_density(target)
        counts = targets if start == target else counts_at(start)
        layers = []
        for (p, name, index), count, goal in zip(new, counts, targets, strict=True):
            _dtensor.check_placements(p, name)
            if s is not None and count == goal:
                mask = s.random(p.shape, count, self.generator)
            else:  # no structure, or a dense start (SNIP) that the first update structures
                mask = random_mask(p.shape, count, self.generator)
            mask = _dtensor.shard_like(mask, p)
            layers.append(SparseLayer(p, name, index, mask, count, goal))
        return tuple(layers)

    def _structurable(
        self, new: list[tuple[Tensor, str, int]]
    ) -> tuple[list[tuple[Tensor, str, int]], list[dict[str, Any]]]:
        """The layers the structure can hold, and the rows of those it leaves dense."""
        s = self.settings.structure
        if s is None:
            return new, []
        kept, dense = [], []
        for p, name, index in new:
            if _dtensor.is_dtensor(p):
                raise ValueError(
                    f"Expected plain tensors with structure='{s}', but {name} is a DTensor: "
                    "structured masks under FSDP2 are not supported; leave structure out"
                )
            reason = s.why_not(p.shape)
            if reason is None:
                kept.append((p, name, index))
            else:
                dense.append({"name": name, "shape": tuple(p.shape), "reason": reason})
        return kept, dense

    def _nothing_sparse(self) -> str:
        """Why no layer is sparse, for the error at construction."""
        if self.dense:
            reasons = "; ".join(f"{d['name']} {d['shape']}: {d['reason']}" for d in self.dense)
            return (
                f"Expected at least one sparse layer, but structure='{self.settings.structure}' "
                f"fits none of the weights ({reasons}): the model would train dense. Use another "
                "structure, or leave structure out"
            )
        if self.frozen:
            names = ", ".join(d["name"] for d in self.frozen)
            return (
                "Expected at least one sparse layer, but every weight with ndim >= 2 has "
                f"requires_grad=False ({names}): frozen parameters stay dense"
            )
        return (
            "Expected at least one sparse layer, but no parameter would be sparse: sparse "
            "layers are the parameters with ndim >= 2 (conv and linear weights) in param groups "
            'without "sparse": False, and the optimizer has none'
        )

    # --- one SparseOptimizer per parameter ----------------------------------------------------
    def _claim(self) -> None:
        """Become the engine of these layers' parameters. An older engine that still masks some
        of them (a notebook cell that built the optimizer again, two optimizers over one model)
        is superseded: it refuses to step from now on, since two engines stepping one weight
        would each keep a mask of their own."""
        ref = weakref.ref(self)
        taken: list[str] = []
        for layer in self.layers:
            old = _OWNERS.get(layer.param)
            owner = None if old is None else old()
            if owner is not None and owner is not self:
                owner.superseded = True
                taken.append(f"{layer.name} {tuple(layer.param.shape)}")
            _OWNERS[layer.param] = ref
        if taken:
            _warnings.warn(
                f"{', '.join(taken)} were masked by another SparseOptimizer that is still alive: "
                "this one takes them over, and the other one raises if it steps again (two "
                "optimizers stepping one weight would each keep a mask of their own). Expected "
                "when a notebook cell builds the optimizer again; otherwise delete the other one"
            )

    # --- the masks on the weights -------------------------------------------------------------
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
                self._once.warn(
                    f"state-shape/{layer.name}/{key}",
                    f"inner optimizer state {key!r} of {layer.name} has shape "
                    f"{tuple(value.shape)}, not the parameter's {tuple(layer.param.shape)}: "
                    "it cannot be masked elementwise and is left as it is (a grown weight "
                    "inherits it); the weights themselves are still masked every step",
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
            apply_masks_(tensors, masks, nan_safe=self.nan_safe)

    def apply_masks(self) -> None:
        """Zero weights and state at inactive positions, and remember that the masks are on."""
        self.mask_weights_and_state()
        self.masks_applied = True
        _dtensor.reshard(self.model)

    def set_masks(self, masks: list[Tensor]) -> None:
        """Replace every layer's mask (its support and count), then zero what became inactive."""
        for layer, mask in zip(self.layers, masks, strict=True):
            layer.mask.copy_(mask)
        counts = count_active(masks)
        self._set_layers(
            tuple(
                dataclasses.replace(layer, count=count)
                for layer, count in zip(self.layers, counts, strict=True)
            )
        )
        self.mask_weights_and_state()

    # --- the method's hooks -------------------------------------------------------------------
    def _hook(self, hook: str, layers: tuple[SparseLayer, ...], *args: Any) -> Any:
        """``method.<hook>(*args)``, refused if it wrote a mask or a weight of ``layers`` in place
        (the tensors' version counters move on every in-place write)."""
        with self._unwritten(hook, layers):
            return getattr(self.method, hook)(*args)

    @contextmanager
    def _unwritten(self, hook: str, layers: tuple[SparseLayer, ...]) -> Iterator[None]:
        """Refuse, naming the method and ``hook``, a mask or weight of ``layers`` written inside."""
        tensors = [t for layer in layers for t in (layer.mask, layer.param)]
        before = _compat.versions(tensors)
        yield
        after = _compat.versions(tensors)
        if after != before:
            k = next(i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a != b)
            what, layer = ("mask", "weights")[k % 2], layers[k // 2]
            raise RuntimeError(
                f"method {self.method.name!r} wrote the {what} of {layer.name} in place inside "
                f"{hook}(): a method reads the layers and returns masks or scores; only the "
                "optimizer writes masks and weights"
            )

    # --- inside a step ------------------------------------------------------------------------
    def explore(self, rate: float) -> None:
        """Ask for one drop-and-grow at drop fraction ``rate`` inside the next step."""
        self.pending_exploration = rate

    def _due_update(self, step: int) -> tuple[float, int | None] | None:
        """``(rate, step)`` of the update due at ``step`` (step ``None`` for an exploration)."""
        if self.pending_exploration is not None:
            return self.pending_exploration, None
        if self.periodic_updates and self.method.is_update_step(step, self.context):
            return self.settings.schedule.rate(step), step
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

    def grow_scores(self) -> list[Tensor | None]:
        """The method's growth scores of every layer, from the current dense gradients; ``None``
        for a layer without a gradient, which the update skips."""
        grow = self.method.grow_scores
        with self._unwritten("grow_scores", self.layers):
            return [
                None if layer.param.grad is None else grow(layer, layer.param.grad, self.generator)
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
        if self.superseded:
            raise RuntimeError(
                "this SparseOptimizer was superseded: a newer SparseOptimizer took over its "
                "parameters, and stepping both would keep two masks of one weight; step the newer "
                "one (or build this one again)"
            )
        self.check_views()
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
                self._once.warn(
                    "non-finite",
                    f"non-finite gradients at step {step}: the topology update was skipped and "
                    "the masks are unchanged (warned once; update_stats.skipped counts them)",
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
        apply_masks_(grads, masks, nan_safe=not finite or self._always)

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
        self, step: int, rate: float, scheduled: int | None, scores: list[Tensor | None]
    ) -> None:
        """Apply the method's new masks; zero weights and inner state wherever a mask changed.

        A layer without a gradient is skipped: the method sees a context of the other layers
        only, and its mask and weights stay as they are.
        """
        read_gradient = self._hook("reads_gradient", self.layers, scheduled, self.context)
        updating = [i for i, layer in enumerate(self.layers) if layer.param.grad is not None]
        layers = tuple(self.layers[i] for i in updating)
        ctx = (
            self.context
            if len(layers) == len(self.layers)
            else dataclasses.replace(self.context, layers=layers)
        )
        args = (ctx, rate, [scores[i] for i in updating], scheduled)
        new_masks = self._hook("new_masks", layers, *args)
        if self.settings.structure is not None:
            self._check_structure(layers, new_masks)
        grown = []
        for layer, new in zip(layers, new_masks, strict=True):
            changed = layer.mask ^ new
            # on the local shards: mask, weight and state share one layout (check_placements)
            for t in (layer.param.detach(), *self.state_tensors(layer)):
                _dtensor.local(t).masked_fill_(_dtensor.local(changed), 0)
            grown.append(new & ~layer.mask)
            layer.mask.copy_(new)
        counts = count_active([layer.mask for layer in layers] + grown)
        if any(count != layer.count for count, layer in zip(counts, layers, strict=False)):
            new = list(self.layers)
            for i, count in zip(updating, counts, strict=False):
                if count != new[i].count:
                    new[i] = dataclasses.replace(new[i], count=count)
            self._set_layers(tuple(new))
        if scheduled is None:
            self.pending_exploration = None
        self.stats.record(step, rate, sum(counts[len(layers) :]), read_gradient)

    def _check_structure(self, layers: tuple[SparseLayer, ...], masks: list[Tensor]) -> None:
        """A method that returns masks outside the structure is a bug: fail loudly, change none."""
        s = self.settings.structure
        for layer, mask in zip(layers, masks, strict=True):
            try:
                s.check(mask, layer.target)
            except ValueError as e:
                raise RuntimeError(
                    f"method {self.method.name!r} returned a mask for {layer.name} that breaks "
                    f"structure='{s}': {e}"
                ) from e

    # --- the engine's state dict --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What a checkpoint must agree on to load here: the method and its options, the
        sparsity and structure, the number of parameters and the sparse shapes by index."""
        s = self.settings.structure
        return {
            "method": self.method.name,
            "method_options": self.method.options(),
            "sparsity": self.settings.sparsity,
            "structure": None if s is None else str(s),
            "num_params": self.num_params,
            "shapes": {layer.index: list(layer.param.shape) for layer in self.layers},
        }

    def state_dict(self) -> dict[str, Any]:
        """The engine's state as plain data (masks cloned, keyed by packing index), in torch's
        style; :meth:`describe`'s entries included."""
        self.check_views()
        described = self.describe()
        layers = self.layers
        return {
            "method": described["method"],
            "method_options": described["method_options"],
            "method_state": self.method.state_dict(),
            "sparsity": described["sparsity"],
            "structure": described["structure"],
            "step": self.step,
            "masks_applied": self.masks_applied,
            "periodic_updates": self.periodic_updates,
            "pending_exploration": self.pending_exploration,
            "generator": self.generator.get_state(),
            "num_params": self.num_params,
            "names": {layer.index: layer.name for layer in layers},
            "shapes": described["shapes"],
            "counts": {layer.index: layer.count for layer in layers},
            "targets": {layer.index: layer.target for layer in layers},
            "masks": {layer.index: layer.mask.clone() for layer in layers},
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], inner_state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, and ``inner_state`` into the inner optimizer.

        All or nothing: every mask is checked against its parameter (and moved to its device and
        shards) and every field read before anything is written; if the inner optimizer or the
        method refuses its state, the method's state is put back and the error propagates.

        Args:
            state (Mapping): the engine's state dict.
            inner_state (Mapping): the inner optimizer's state dict.

        Raises:
            ValueError: if the masks are not those of this engine's sparse parameters, or a mask
                does not fit its parameter; whatever the inner optimizer raises.
            KeyError: for a missing field.
        """
        by_index = {layer.index: layer for layer in self.layers}
        keys = {int(k): k for k in state["masks"]}
        if set(keys) != set(by_index):
            raise ValueError(
                f"Expected masks of the sparse parameters {sorted(by_index)}, but the state "
                f"holds masks of {sorted(keys)}"
            )
        layers = []
        for layer in self.layers:
            key = keys[layer.index]
            mask = state["masks"][key]
            if tuple(mask.shape) != tuple(layer.param.shape):
                raise ValueError(
                    f"Expected the mask of {layer.name} to have the parameter's shape "
                    f"{tuple(layer.param.shape)}, but the state holds one of {tuple(mask.shape)}"
                )
            layers.append(
                dataclasses.replace(
                    layer,
                    mask=_dtensor.load_like(mask, layer.param, torch.bool),
                    count=int(state["counts"][key]),
                    target=int(state["targets"][key]),
                )
            )
        # the generator is a CPU one; a state dict moved to another device (Accelerate's device
        # placement moves every tensor) brings its state back
        generator = torch.Generator(device="cpu")
        generator.set_state(state["generator"].cpu())
        stats = UpdateStats.from_dict(state["stats"])
        step, applied = int(state["step"]), bool(state["masks_applied"])
        periodic, pending = bool(state["periodic_updates"]), state["pending_exploration"]
        method_before = self.method.state_dict()
        self.method.load_state_dict(state["method_state"])
        try:
            self.optimizer.load_state_dict(inner_state)
        except BaseException:
            self.method.load_state_dict(method_before)
            raise
        self.generator = generator
        self._set_layers(tuple(layers))
        self.stats, self.step, self.masks_applied = stats, step, applied
        self.periodic_updates, self.pending_exploration = periodic, pending
        if self.masks_applied:
            self.mask_weights_and_state()
            _dtensor.reshard(self.model)

    # --- pickling (a torch.Generator does not pickle; its state does) ---------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "generator": self.generator.get_state()}
        for key in ("_views", "_view_of", "_view_list"):  # rebuilt: aliases of the masks
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator(device="cpu")
        generator.set_state(state.pop("generator"))
        self.__dict__.update(state, generator=generator, _views={}, _view_of=(), _view_list=())
        self._set_layers(self.layers)
        self._claim()

    # --- reading ------------------------------------------------------------------------------
    @property
    def density(self) -> float:
        """The current fraction of active weights over all sparse parameters."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.count for layer in self.layers) / total if total else 1.0

    def report(self) -> SparsityReport:
        """Per-layer counts (active and actually nonzero) and densities, totals, the layers left
        dense or frozen, and the update statistics."""
        self.check_views()
        nonzero = count_active([layer.param.detach() != 0 for layer in self.layers])
        rows = [
            {
                "name": layer.name,
                "shape": tuple(layer.param.shape),
                "numel": layer.numel,
                "nnz": layer.count,
                "active": layer.count,
                "nonzero": nz,
                "density": layer.count / layer.numel,
            }
            for layer, nz in zip(self.layers, nonzero, strict=True)
        ]
        updates = {**self.stats.as_dict(), "step": self.step}
        s = self.settings.structure
        return SparsityReport(
            rows,
            updates,
            structure=None if s is None else str(s),
            dense=self.dense,
            frozen=self.frozen,
        )
