"""The superposed ticket of Sup-tickets (Yin et al., UAI 2022): one running copy of the weights.

Shaped like ``torch.optim.swa_utils``: the settings are fixed once, when the superposition is
configured (:class:`SuperpositionSettings`, validated in one place), and each call to
:meth:`Superposition.add` folds one cheap ticket ``T_t`` (the live weights at the end of a cycle)
into the superposed copy ``S`` and magnitude-prunes ``S`` back to the target count, as Algorithm 1
of the paper does (average, then prune, every cycle)::

    S_1 = prune(T_1)
    S_t = prune(rule(S_{t-1}, T_t))

with the rules of §3.2.2 and Eq. 4:

- ``"cia"`` (connection-independent): ``rule = ((t - 1) * S_{t-1} + T_t) / t``, Eq. 4.
- ``"caa"`` (connection-aware): ``rule = (N_{t-1} * S_{t-1} + T_t) / N_t`` per weight, where
  ``N_t`` counts the tickets in which that weight was active (0 stays 0). Dense tensors and
  BatchNorm buffers are always "active", so for them CAA equals CIA.
- ``"cima"`` (moving average): ``rule = beta * S_{t-1} + (1 - beta) * T_t``.

Every parameter the optimizer holds is superposed (biases and norm affines too, which are never
pruned), and so are the BatchNorm running statistics of ``model=``. ``prune`` keeps, per layer,
the distribution's count of largest ``|S|`` (``reprune="layer"``, the default: per-layer counts
and FLOPs stay those of the base method) or the global top ``K`` over all sparse layers
(``reprune="global"``, what the official code does). Ties go to the lowest index, so the support
of the pruned copy can be recomputed from its values exactly, and no mask is stored for it.

With ``keep_tickets`` (implied by ``select``) each ticket is also kept whole, in compact form
(:class:`Candidate`), for the validated choice of ``sparseopt.soup``.

``SparseOptimizer`` owns one :class:`Superposition` and is the only writer of it; its public
read-only face is :class:`SuperpositionView` (``opt.superposition``).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from . import _compat, _dtensor, _validate
from ._dtensor import load_like
from .masks import select_largest_across, select_largest_within
from .methods import SparseLayer
from .structure import Structure

__all__ = [
    "AVERAGING_RULES",
    "REPRUNE_MODES",
    "BNUpdate",
    "Candidate",
    "Select",
    "Superposition",
    "SuperpositionSettings",
    "SuperpositionView",
    "bn_buffers",
    "recompute_bn",
    "support_masks",
    "swapped_in",
    "write_superposed",
]

#: What ``bn_update=`` takes: an iterable of input batches (a ``DataLoader``, a list; a batch may
#: be ``(inputs, targets)``, of which the inputs are used), or a callable that runs the forward
#: passes itself on the model it is given.
BNUpdate = Iterable[Any] | Callable[[nn.Module], Any]

#: What ``select=`` takes: ``fn(model) -> float``, higher is better (validation accuracy, minus a
#: validation loss).
Select = Callable[[nn.Module], float]

AVERAGING_RULES = ("cia", "caa", "cima")
REPRUNE_MODES = ("layer", "global")


# --- the settings: validated once ---------------------------------------------------------------
def _check_bn_update(bn_update: Any) -> None:
    """A ``TypeError`` unless ``bn_update`` is ``None``, callable, or a re-iterable of batches."""
    if bn_update is None or callable(bn_update):
        return
    if isinstance(bn_update, Iterable) and iter(bn_update) is not bn_update:
        return
    kind = (
        "an iterator (it would be used up by the first ticket)"
        if isinstance(bn_update, Iterable)
        else type(bn_update).__name__
    )
    raise TypeError(
        "Expected bn_update to be an iterable of input batches that can be iterated again "
        f"(a DataLoader, a list) or a callable that runs the forward passes, but got {kind}"
    )


def _short(value: Any) -> str:
    """How a callable or a batch iterable shows in a settings description."""
    if value is None:
        return "None"
    name = getattr(value, "__qualname__", None) or type(value).__name__
    return f"<{name}>"


@dataclass(frozen=True, eq=False)
class SuperpositionSettings:
    """The superposition's settings: fixed once, by ``opt.configure_superposition(...)``.

    Build it with ``SuperpositionSettings.build(...)``, which checks every field;
    ``SparseOptimizer.configure_superposition`` does that for you.
    Two settings are equal when their numbers and names are, and ``bn_update`` and ``select``
    are the same objects.

    Attributes:
        averaging (str): ``"cia"``, ``"caa"`` or ``"cima"``.
        beta (float): the CIMA decay, in [0, 1).
        reprune (str): ``"layer"`` or ``"global"``.
        bn_update (Iterable | Callable | None): recompute the BatchNorm statistics of the
            superposed copy after every ticket from these batches (or this callable), instead
            of averaging them.
        keep_tickets (bool): keep every ticket in compact form (for ``select``, or to inspect).
        select (Callable | None): ``fn(model) -> float``: at ``finalize()`` the best-scoring of
            the kept tickets, their greedy soup and the superposition becomes the ultimate
            ticket (``sparseopt.soup``).
    """

    averaging: str = "cia"
    beta: float = 0.8
    reprune: str = "layer"
    bn_update: BNUpdate | None = field(default=None, repr=False)
    keep_tickets: bool = False
    select: Select | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        *,
        averaging: Any = "cia",
        beta: Any = 0.8,
        reprune: Any = "layer",
        bn_update: Any = None,
        keep_tickets: Any = False,
        select: Any = None,
        structure: Structure | None = None,
        model: nn.Module | None = None,
    ) -> SuperpositionSettings:
        """Check every setting (the one place they are checked) and return them, frozen.

        ``keep_tickets`` is turned on by ``select`` (the choice needs the tickets).

        Raises:
            TypeError: for a setting of the wrong type, a ``bn_update`` that is neither
                callable nor re-iterable, or a ``select`` that is not callable.
            ValueError: for an unknown name or a value out of range, ``reprune="global"``
                under a structure, or ``bn_update``/``select`` without ``model``.
        """
        averaging = _validate.choice("averaging", averaging, AVERAGING_RULES)
        beta = _validate.real("beta", beta, 0, 1, high_open=True)
        reprune = _validate.choice("reprune", reprune, REPRUNE_MODES)
        if structure is not None and reprune == "global":
            raise ValueError(
                f"Expected reprune='layer' with structure='{structure}', but got 'global': a "
                "global top-K over all layers cannot keep N active per group or k per row"
            )
        _check_bn_update(bn_update)
        keep_tickets = _validate.boolean("keep_tickets", keep_tickets)
        if select is not None and not callable(select):
            raise TypeError(
                "Expected select to be a callable fn(model) -> float (higher is better), but "
                f"got {_validate.type_of(select)}"
            )
        for name, value, needs in (
            ("bn_update", bn_update, "recomputes the BatchNorm statistics of the superposed copy"),
            ("select", select, "scores the candidates on the model"),
        ):
            if value is not None and model is None:
                raise ValueError(
                    f"{name} {needs}, which needs the model: pass model= to SparseOptimizer"
                )
        return cls(averaging, beta, reprune, bn_update, keep_tickets or select is not None, select)

    def saved(self) -> dict[str, Any]:
        """The fields a state dict carries (``bn_update`` and ``select`` are the user's objects,
        passed again when the scheduler or the configuration is rebuilt)."""
        return {
            "averaging": self.averaging,
            "beta": self.beta,
            "reprune": self.reprune,
            "keep_tickets": self.keep_tickets,
        }

    def same_saved(self, other: SuperpositionSettings) -> bool:
        """Whether the fields a state dict carries are equal."""
        return self.saved() == other.saved()

    def describe(self) -> str:
        """``averaging='cia', beta=0.8, ...``: every field, callables by name."""
        return (
            f"averaging={self.averaging!r}, beta={self.beta}, reprune={self.reprune!r}, "
            f"bn_update={_short(self.bn_update)}, keep_tickets={self.keep_tickets}, "
            f"select={_short(self.select)}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SuperpositionSettings):
            return NotImplemented
        return (
            self.same_saved(other)
            and self.bn_update is other.bn_update
            and self.select is other.select
        )

    def __hash__(self) -> int:
        return hash((*self.saved().values(), id(self.bn_update), id(self.select)))


# --- BatchNorm buffers ----------------------------------------------------------------------------
def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _compat.BATCHNORM_TYPES)]


def bn_buffers(model: nn.Module | None) -> dict[str, Tensor]:
    """The running statistics of the model's norm layers (those that track them), by name."""
    if model is None:
        return {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, _compat.NORM_WITH_RUNNING_STATS) and module.track_running_stats:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, key, None)
                if buf is not None:
                    out[f"{name}.{key}" if name else key] = buf
    return out


def norm_layer_holds(params: Sequence[Tensor]) -> bool:
    """Whether a norm layer with running statistics holds one of ``params`` (its affine weight
    or bias).

    Without ``model=`` the optimizer cannot name its model's modules; one scan of the live
    objects (``gc``) at the first ticket finds the norm layers that hold its parameters. A norm
    layer without an affine (``affine=False``) holds none, and is not found.
    """
    ids = {id(p) for p in params}
    for obj in gc.get_objects():
        # type(), not isinstance(): no __class__ lookup on lazy proxies (which may warn)
        norm = issubclass(type(obj), _compat.NORM_WITH_RUNNING_STATS) and obj.track_running_stats
        if norm and any(id(t) in ids for t in (obj.weight, obj.bias) if t is not None):
            return True
    return False


def write_buffers(live: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """Copy ``values`` into the live buffers: cast to their dtypes, counters rounded."""
    with torch.no_grad():
        for key, s in values.items():
            buf = live[key]
            buf.copy_(s.round() if not buf.is_floating_point() and s.is_floating_point() else s)


@torch.no_grad()
def recompute_bn(model: nn.Module, bn_update: BNUpdate) -> None:
    """Recompute the BatchNorm running statistics of ``model`` from ``bn_update``'s batches.

    An iterable goes to ``torch.optim.swa_utils.update_bn`` (reset, cumulative average over one
    pass in train mode, momenta and the training flag restored). A callable gets the same set-up
    (reset, ``momentum=None``, train mode) around its own forward passes.

    Raises:
        ValueError: if no batch reached the BatchNorm layers, or the model could not take one.
    """
    layers = _norm_layers(model)
    if not layers:
        return
    try:
        if callable(bn_update):
            momenta = {m: m.momentum for m in layers}
            training = model.training
            for m in layers:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            try:
                bn_update(model)
            finally:
                for m, momentum in momenta.items():
                    m.momentum = momentum
                model.train(training)
        else:
            update_bn(bn_update, model)
    except Exception as e:
        raise ValueError(
            f"bn_update could not run the model on its batches ({type(e).__name__}: {e}); "
            "the superposed copy is unchanged"
        ) from e
    if all(int(m.num_batches_tracked) == 0 for m in layers if m.num_batches_tracked is not None):
        raise ValueError(
            "bn_update gave no batch: the BatchNorm statistics of the superposed copy cannot be "
            "recomputed; pass a non-empty iterable of input batches (or a callable that runs "
            "forward passes); the superposed copy is unchanged"
        )


# --- the re-prune ---------------------------------------------------------------------------------
def support_masks(
    values: Sequence[Tensor],
    counts: Sequence[int],
    reprune: str,
    structure: Structure | None = None,
) -> list[Tensor]:
    """Bool masks of the largest ``|values|``: ``counts[l]`` per tensor, or their sum globally;
    under a structure the top ``N`` of each group or the top ``k`` of each row (per layer)."""
    if reprune == "layer":
        return [
            select_largest_within(v.abs(), c, structure)
            for v, c in zip(values, counts, strict=True)
        ]
    return select_largest_across([v.abs() for v in values], sum(counts))


# --- a ticket kept whole, compactly ---------------------------------------------------------------
def _pack(mask: Tensor) -> Tensor:
    """A bool tensor as bits, eight to a byte, the lowest bit first."""
    flat = mask.reshape(-1)
    bits = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    bits[: flat.numel()] = flat
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return torch.bitwise_left_shift(bits.view(-1, 8), shifts).sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, shape: Sequence[int]) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_right_shift(packed.unsqueeze(1), shifts).bitwise_and_(1)
    return bits.reshape(-1)[: math.prod(shape)].view(tuple(shape)).bool()


class Candidate:
    """One ticket, kept for ``select=``: active values and packed masks of the sparse layers, the
    dense parameters and the BatchNorm buffers (local shards under FSDP2).

    Args:
        name (str): how the report names it (``"phase 1"``, ``"ticket 2"``).
        sparse (dict): parameter index -> ``(packed mask, active values)``.
        dense (dict): parameter index -> a copy of the parameter.
        buffers (dict): BatchNorm buffer name -> a copy.
    """

    def __init__(
        self,
        name: str,
        sparse: dict[int, tuple[Tensor, Tensor]],
        dense: dict[int, Tensor],
        buffers: dict[str, Tensor],
    ) -> None:
        self.name, self.sparse, self.dense, self.buffers = name, sparse, dense, buffers

    @classmethod
    @torch.no_grad()
    def take(
        cls,
        name: str,
        params: Sequence[Tensor],
        layers: Sequence[SparseLayer],
        buffers: Mapping[str, Tensor],
    ) -> Candidate:
        """Keep the live weights and buffers as they are now."""
        sparse = {}
        for layer in layers:
            mask = _dtensor.local(layer.mask)
            values = _dtensor.local(layer.param.detach())[mask]
            sparse[layer.index] = (_pack(mask), values.clone())
        dense = {
            j: _dtensor.local(p.detach()).clone() for j, p in enumerate(params) if j not in sparse
        }
        return cls(name, sparse, dense, {k: b.detach().clone() for k, b in buffers.items()})

    def local_mask(self, j: int, like: Tensor) -> Tensor:
        """The bool mask of parameter ``j``, shaped like ``like``'s local shard."""
        return _unpack(self.sparse[j][0], _dtensor.local(like).shape)

    def local_tensor(self, j: int, like: Tensor) -> Tensor:
        """Parameter ``j`` as a dense local tensor (zeros off its mask)."""
        if j in self.dense:
            return self.dense[j]
        mask = self.local_mask(j, like)
        out = torch.zeros(mask.shape, dtype=self.sparse[j][1].dtype, device=mask.device)
        return out.masked_scatter_(mask, self.sparse[j][1])

    def nbytes(self) -> int:
        """The memory this candidate holds, in bytes."""
        tensors = [t for pair in self.sparse.values() for t in pair]
        tensors += [*self.dense.values(), *self.buffers.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "masks": {j: m.clone() for j, (m, _) in self.sparse.items()},
            "values": {j: v.clone() for j, (_, v) in self.sparse.items()},
            "dense": {j: t.clone() for j, t in self.dense.items()},
            "buffers": {k: b.clone() for k, b in self.buffers.items()},
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], params: Sequence[Tensor], buffers: Mapping[str, Tensor]
    ) -> Candidate:
        """Rebuild on the devices of the live parameters and buffers (this rank's shards)."""

        def place(t: Tensor, j: int) -> Tensor:
            return t.to(_dtensor.local(params[int(j)]).device, copy=True)

        sparse = {
            int(j): (place(m, j), place(state["values"][j], j)) for j, m in state["masks"].items()
        }
        for j, (packed, values) in sparse.items():
            local = _dtensor.local(params[j])
            if packed.numel() != -(-local.numel() // 8) or values.numel() > local.numel():
                raise ValueError(
                    f"the kept ticket {state['name']!r} does not fit parameter {j} of shape "
                    f"{tuple(local.shape)}"
                )
        dense = {int(j): place(t, j) for j, t in state["dense"].items()}
        for j, t in dense.items():
            if t.shape != _dtensor.local(params[j]).shape:
                raise ValueError(
                    f"the kept ticket {state['name']!r} holds parameter {j} of shape "
                    f"{tuple(t.shape)}, but it has shape {tuple(_dtensor.local(params[j]).shape)}"
                )
        kept = {k: b.to(buffers[k].device, copy=True) for k, b in state["buffers"].items()}
        return cls(str(state["name"]), sparse, dense, kept)


# --- the superposed copy --------------------------------------------------------------------------
class Superposition:
    """One superposed copy of the parameters (and BatchNorm buffers), updated ticket by ticket.

    It holds nothing before its first ticket. ``SparseOptimizer`` builds it when the settings are
    configured and is its only writer.

    Args:
        settings (SuperpositionSettings): the checked settings.
        structure (Structure | None): the optimizer's structure, kept by the re-prune.
    """

    def __init__(self, settings: SuperpositionSettings, structure: Structure | None = None) -> None:
        self.settings = settings
        self.structure = structure
        self.tickets = 0
        self.params: list[Tensor] = []
        self.buffers: dict[str, Tensor] = {}
        self.active: list[
            Tensor
        ] = []  # CAA: per sparse layer, tickets in which a weight was active
        self.candidates: list[Candidate] = []  # when settings.keep_tickets
        self.names: list[str] = []  # the folded tickets, in order
        self.finalized = False
        self.scores: dict[str, float] = {}  # the last validated choice (select)
        self.chosen: str | None = None
        self.soup: tuple[str, ...] = ()

    @property
    def averaging(self) -> str:
        return self.settings.averaging

    @property
    def beta(self) -> float:
        return self.settings.beta

    @property
    def reprune(self) -> str:
        return self.settings.reprune

    def _fold(self, s: Tensor, t: Tensor) -> None:
        """``s <- rule(s, t)`` for a dense tensor (CAA is CIA there)."""
        if self.settings.averaging == "cima":
            s.lerp_(t.to(s.dtype), 1.0 - self.settings.beta)
        else:
            s.lerp_(t.to(s.dtype), 1.0 / self.tickets)

    @torch.no_grad()
    def add(
        self,
        params: Sequence[Tensor],
        layers: Sequence[SparseLayer],
        buffers: Mapping[str, Tensor],
        name: str | None = None,
    ) -> None:
        """Fold one ticket in and re-prune.

        Args:
            params: every parameter, in the optimizer's packing order.
            layers: the sparse layers (their ``index`` in ``params``, live ``mask`` for CAA and
                ``count``, the count the re-prune keeps, or their sum globally).
            buffers: BatchNorm buffers by name.
            name: how the report names this ticket. Default: ``"ticket <n>"``.

        Raises:
            ValueError: if the BatchNorm buffers changed since the first ticket, or CAA would
                count past 255 tickets; the copy is then unchanged.
        """
        first = self.tickets == 0
        if self.settings.averaging == "caa" and self.tickets == 255:
            raise ValueError("averaging='caa' counts activations in uint8: at most 255 tickets")
        if not first and buffers.keys() != self.buffers.keys():
            raise ValueError(
                "the model's BatchNorm buffers changed between tickets: "
                f"{sorted(self.buffers)} vs {sorted(buffers)}"
            )
        self.tickets += 1
        self.names.append(name if name is not None else f"ticket {self.cycle_tickets() + 1}")
        if first:
            self.params = [p.detach().clone() for p in params]
            self.buffers = {k: b.detach().to(torch.float64, copy=True) for k, b in buffers.items()}
            if self.settings.averaging == "caa":
                self.active = [layer.mask.to(torch.uint8) for layer in layers]
        else:
            by_index = {layer.index: i for i, layer in enumerate(layers)}
            for j, (s, p) in enumerate(zip(self.params, params, strict=True)):
                i = by_index.get(j)
                if self.settings.averaging == "caa" and i is not None:
                    n = self.active[i]
                    n_new = n + layers[i].mask
                    s.mul_(n).add_(p.detach()).div_(n_new.clamp(min=1))
                    self.active[i] = n_new
                else:
                    self._fold(s, p.detach())
            for k, b in buffers.items():
                self._fold(self.buffers[k], b.detach())
        values = [self.params[layer.index] for layer in layers]
        for v, keep in zip(values, self.masks(layers), strict=True):
            v.mul_(keep)
        self.finalized = False

    def cycle_tickets(self) -> int:
        """Folded tickets other than the phase-1 model."""
        return sum(1 for n in self.names if n != "phase 1")

    def masks(self, layers: Sequence[SparseLayer]) -> list[Tensor]:
        """The support of the pruned copy (exactly what the last re-prune kept)."""
        return support_masks(
            [self.params[layer.index] for layer in layers],
            [layer.count for layer in layers],
            self.settings.reprune,
            self.structure,
        )

    # --- a failed ticket leaves no trace ----------------------------------------------------
    def snapshot(self) -> tuple[Any, ...]:
        """What :meth:`restore` needs to undo one :meth:`add` (copies)."""
        return (
            self.tickets,
            [p.clone() for p in self.params],
            {k: b.clone() for k, b in self.buffers.items()},
            [a.clone() for a in self.active],
            list(self.names),
            self.finalized,
        )

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        tickets, params, buffers, active, names, finalized = snapshot
        self.tickets, self.params, self.buffers, self.active = tickets, params, buffers, active
        self.names, self.finalized = names, finalized

    # --- state dict -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the settings that can be saved, the copy, the kept tickets, the choice."""
        return {
            **self.settings.saved(),
            "tickets": self.tickets,
            "params": {i: p.clone() for i, p in enumerate(self.params)},
            "buffers": {k: b.clone() for k, b in self.buffers.items()},
            "active": {i: a.clone() for i, a in enumerate(self.active)},
            "names": list(self.names),
            "candidates": [c.state_dict() for c in self.candidates],
            "finalized": self.finalized,
            "scores": dict(self.scores),
            "chosen": self.chosen,
            "soup": list(self.soup),
        }

    def is_empty(self) -> bool:
        """Nothing to save: no ticket, no kept candidate, no choice."""
        return not (self.tickets or self.candidates or self.finalized)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        params: Sequence[Tensor],
        sparse: Sequence[int],
        buffers: Mapping[str, Tensor],
        structure: Structure | None = None,
        settings: SuperpositionSettings | None = None,
    ) -> Superposition:
        """Rebuild from :meth:`state_dict` (or a sparseopt 0.1.0 one) on the devices (and shards)
        of the live params; ``settings`` (configured ones) replace the saved fields, which must
        agree with them (the caller checks)."""
        if settings is None:
            settings = SuperpositionSettings(
                state["averaging"],
                float(state["beta"]),
                state["reprune"],
                keep_tickets=bool(state.get("keep_tickets", False)),
            )
        sup = cls(settings, structure)
        sup.tickets = int(state["tickets"])
        if state["params"]:  # empty before the first ticket (a kept phase-1 model only)
            sup.params = [load_like(state["params"][i], p) for i, p in enumerate(params)]
        missing = set(state["buffers"]) - set(buffers)
        if missing:
            raise ValueError(f"the model has no BatchNorm buffers {sorted(missing)} to superpose")
        sup.buffers = {k: b.to(buffers[k].device, copy=True) for k, b in state["buffers"].items()}
        sup.active = [
            load_like(state["active"][i], params[j])
            for i, j in enumerate(sparse)
            if i in state["active"]
        ]
        sup.names = list(state.get("names", [f"ticket {k + 1}" for k in range(sup.tickets)]))
        sup.candidates = [
            Candidate.from_state_dict(c, params, buffers) for c in state.get("candidates", [])
        ]
        sup.finalized = bool(state.get("finalized", False))
        sup.scores = {str(k): float(v) for k, v in state.get("scores", {}).items()}
        sup.chosen = state.get("chosen")
        sup.soup = tuple(state.get("soup", ()))
        return sup


# --- the public, read-only view -------------------------------------------------------------------
class SuperpositionView:
    """``opt.superposition``: what the superposed ticket holds, read-only.

    Tensors come back as copies (changing them changes nothing); the settings object is frozen.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.5,
        ...                       model=model, seed=0)
        >>> opt.superposition is None
        True
        >>> opt.configure_superposition(averaging="cima", beta=0.5)
        >>> model(torch.randn(2, 8)).sum().backward(); opt.step()
        >>> opt.consolidate()
        >>> view = opt.superposition
        >>> view.tickets, view.settings.averaging, [int(m.sum()) for m in view.masks]
        (1, 'cima', [16])
    """

    def __init__(self, sup: Superposition, layers: Sequence[SparseLayer]) -> None:
        self._sup = sup
        self._layers = tuple(layers)

    @property
    def settings(self) -> SuperpositionSettings:
        """The configured settings (frozen)."""
        return self._sup.settings

    @property
    def tickets(self) -> int:
        """The number of tickets folded into the copy so far."""
        return self._sup.tickets

    @property
    def ticket_names(self) -> tuple[str, ...]:
        """The folded tickets, in order (``"phase 1"`` for the phase-1 model)."""
        return tuple(self._sup.names)

    @property
    def params(self) -> tuple[Tensor, ...]:
        """Copies of the superposed parameters, in the optimizer's packing order; empty before
        the first ticket."""
        return tuple(p.detach().clone() for p in self._sup.params)

    @property
    def buffers(self) -> Mapping[str, Tensor]:
        """Copies of the superposed BatchNorm statistics (float64), by name."""
        return MappingProxyType({k: b.clone() for k, b in self._sup.buffers.items()})

    @property
    def masks(self) -> tuple[Tensor, ...]:
        """The support of the pruned copy, one bool mask per sparse layer; empty before the first
        ticket."""
        if not self._sup.tickets:
            return ()
        return tuple(self._sup.masks(self._layers))

    @property
    def candidates(self) -> tuple[str, ...]:
        """The names of the kept tickets (``keep_tickets`` or ``select``), in order."""
        return tuple(c.name for c in self._sup.candidates)

    @property
    def finalized(self) -> bool:
        """Whether ``finalize()`` wrote the ultimate ticket (since the last ticket)."""
        return self._sup.finalized

    @property
    def scores(self) -> Mapping[str, float]:
        """The last validated choice's score of every candidate, by name (empty without
        ``select``)."""
        return MappingProxyType(dict(self._sup.scores))

    @property
    def chosen(self) -> str | None:
        """The candidate ``finalize()`` wrote: ``"superposition"`` without ``select``, else the
        best-scoring one; ``None`` before ``finalize()``."""
        return self._sup.chosen

    def __repr__(self) -> str:
        done = f", finalized, chosen={self.chosen!r}" if self.finalized else ""
        return (
            f"SuperpositionView(tickets={self.tickets}, candidates={len(self._sup.candidates)}"
            f"{done}, {self.settings.describe()})"
        )


# --- the superposed copy and the live model -------------------------------------------------------
def write_superposed(sup: Superposition, params: Sequence[Tensor], model: nn.Module | None) -> None:
    """Copy the superposed parameters and BatchNorm buffers into the live ones, in place."""
    with torch.no_grad():
        for p, s in zip(params, sup.params, strict=True):
            p.detach().copy_(s)
        write_buffers(bn_buffers(model), sup.buffers)
    _dtensor.reshard(model)


@contextmanager
def preserved(params: Sequence[Tensor], model: nn.Module | None) -> Iterator[None]:
    """Inside the block the live parameters, BatchNorm buffers and training flags may change;
    on exit they are restored bit-exactly, also when the body raises."""
    buffers = bn_buffers(model)
    modes = {} if model is None else {m: m.training for m in model.modules()}
    with torch.no_grad():
        saved_params = [p.detach().clone() for p in params]
        saved_buffers = {k: b.clone() for k, b in buffers.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params, strict=True):
                p.detach().copy_(s)
            for k, s in saved_buffers.items():
                buffers[k].copy_(s)
        for m, training in modes.items():
            m.training = training
        _dtensor.reshard(model)


@contextmanager
def swapped_in(
    sup: Superposition, params: Sequence[Tensor], model: nn.Module | None
) -> Iterator[None]:
    """Hold the superposed copy in the live tensors inside the block; restore them bit-exactly
    on exit, also when the body raises (``torch.optim.swa_utils`` style: the model is the
    container, the copy comes and goes)."""
    with preserved(params, model):
        write_superposed(sup, params, model)
        yield


def nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes held by ``tensors`` (their local shards)."""
    return sum(math.prod(_dtensor.local(t).shape) * t.element_size() for t in tensors)
