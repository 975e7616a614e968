"""The superposed ticket of Sup-tickets (Yin et al., UAI 2022): one running copy of the weights.

Each call to :meth:`Superposition.add` folds one cheap ticket ``T_t`` (the live weights at the end
of a cycle) into the superposed copy ``S`` and magnitude-prunes ``S`` back to the target count, as
Algorithm 1 of the paper does (average, then prune, every cycle)::

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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from . import _compat, _dtensor, _validate
from ._dtensor import load_like
from .masks import select_largest_across, select_largest_within
from .structure import Structure

__all__ = [
    "AVERAGING_RULES",
    "REPRUNE_MODES",
    "BNUpdate",
    "Superposition",
    "bn_buffers",
    "consolidate",
    "recompute_bn",
    "swapped_in",
    "write_superposed",
]

#: What ``bn_update=`` takes: an iterable of input batches (a ``DataLoader``, a list; a batch may
#: be ``(inputs, targets)``, of which the inputs are used), or a callable that runs the forward
#: passes itself on the model it is given.
BNUpdate = Iterable[Any] | Callable[[nn.Module], Any]

AVERAGING_RULES = ("cia", "caa", "cima")
REPRUNE_MODES = ("layer", "global")


def check_superposition_args(
    averaging: Any, beta: Any, reprune: Any, structure: Structure | None = None
) -> None:
    """Validate the three knobs, naming the argument in the error."""
    _validate.choice("averaging", averaging, AVERAGING_RULES)
    _validate.real("beta", beta, 0, 1, high_open=True)
    _validate.choice("reprune", reprune, REPRUNE_MODES)
    if structure is not None and reprune == "global":
        raise ValueError(
            f"Expected reprune='layer' with structure='{structure}', but got 'global': a global "
            "top-K over all layers cannot keep N active per group or k per row"
        )


def check_bn_update(bn_update: Any) -> None:
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


class Superposition:
    """One superposed copy of the parameters (and BatchNorm buffers), updated ticket by ticket.

    Args:
        averaging (str): ``"cia"``, ``"caa"`` or ``"cima"``.
        beta (float): the CIMA decay, in [0, 1).
        reprune (str): ``"layer"`` or ``"global"``.
    """

    def __init__(
        self, averaging: str, beta: float, reprune: str, structure: Structure | None = None
    ) -> None:
        check_superposition_args(averaging, beta, reprune, structure)
        self.structure = structure
        self.averaging = averaging
        self.beta = float(beta)
        self.reprune = reprune
        self.tickets = 0
        self.params: list[Tensor] = []
        self.buffers: dict[str, Tensor] = {}
        self.active: list[
            Tensor
        ] = []  # CAA: per sparse layer, tickets in which a weight was active

    def _fold(self, s: Tensor, t: Tensor) -> None:
        """``s <- rule(s, t)`` for a dense tensor (CAA is CIA there)."""
        if self.averaging == "cima":
            s.lerp_(t.to(s.dtype), 1.0 - self.beta)
        else:
            s.lerp_(t.to(s.dtype), 1.0 / self.tickets)

    @torch.no_grad()
    def add(
        self,
        params: Sequence[Tensor],
        sparse: Sequence[int],
        masks: Sequence[Tensor],
        counts: Sequence[int],
        buffers: dict[str, Tensor],
    ) -> None:
        """Fold one ticket in and re-prune.

        Args:
            params: every parameter, in the optimizer's packing order.
            sparse: positions in ``params`` of the sparse tensors.
            masks: the live masks of those sparse tensors (for CAA).
            counts: their target active counts (the re-prune keeps these, or their sum).
            buffers: BatchNorm buffers by name.
        """
        first = self.tickets == 0
        if self.averaging == "caa" and self.tickets == 255:
            raise ValueError("averaging='caa' counts activations in uint8: at most 255 tickets")
        if not first and buffers.keys() != self.buffers.keys():
            raise ValueError(
                "the model's BatchNorm buffers changed between tickets: "
                f"{sorted(self.buffers)} vs {sorted(buffers)}"
            )
        self.tickets += 1
        if first:
            self.params = [p.detach().clone() for p in params]
            self.buffers = {k: b.detach().to(torch.float64, copy=True) for k, b in buffers.items()}
            if self.averaging == "caa":
                self.active = [m.to(torch.uint8) for m in masks]
        else:
            sparse_pos = {j: i for i, j in enumerate(sparse)}
            for j, (s, p) in enumerate(zip(self.params, params, strict=True)):
                if self.averaging == "caa" and j in sparse_pos:
                    n = self.active[sparse_pos[j]]
                    n_new = n + masks[sparse_pos[j]]
                    s.mul_(n).add_(p.detach()).div_(n_new.clamp(min=1))
                    self.active[sparse_pos[j]] = n_new
                else:
                    self._fold(s, p.detach())
            for k, b in buffers.items():
                self._fold(self.buffers[k], b.detach())
        values = [self.params[j] for j in sparse]
        for v, keep in zip(
            values, support_masks(values, counts, self.reprune, self.structure), strict=True
        ):
            v.mul_(keep)

    def masks(self, sparse: Sequence[int], counts: Sequence[int]) -> list[Tensor]:
        """The support of the pruned copy (exactly what the last re-prune kept)."""
        return support_masks([self.params[j] for j in sparse], counts, self.reprune, self.structure)

    def state_dict(self) -> dict[str, Any]:
        return {
            "averaging": self.averaging,
            "beta": self.beta,
            "reprune": self.reprune,
            "tickets": self.tickets,
            "params": {i: p.clone() for i, p in enumerate(self.params)},
            "buffers": {k: b.clone() for k, b in self.buffers.items()},
            "active": {i: a.clone() for i, a in enumerate(self.active)},
        }

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        params: Sequence[Tensor],
        sparse: Sequence[int],
        buffers: dict[str, Tensor],
        structure: Structure | None = None,
    ) -> Superposition:
        """Rebuild from :meth:`state_dict` on the devices (and shards) of the live params."""
        sup = cls(state["averaging"], state["beta"], state["reprune"], structure)
        sup.tickets = int(state["tickets"])
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
        return sup


# --- the superposed copy and the live model -------------------------------------------------------
def write_superposed(sup: Superposition, params: Sequence[Tensor], model: nn.Module | None) -> None:
    """Copy the superposed parameters and BatchNorm buffers into the live ones, in place."""
    with torch.no_grad():
        for p, s in zip(params, sup.params, strict=True):
            p.detach().copy_(s)
        buffers = bn_buffers(model)
        for key, s in sup.buffers.items():
            buf = buffers[key]
            buf.copy_(s.round() if not buf.is_floating_point() else s)
    _dtensor.reshard(model)


@contextmanager
def swapped_in(
    sup: Superposition, params: Sequence[Tensor], model: nn.Module | None
) -> Iterator[None]:
    """Hold the superposed copy in the live tensors inside the block; restore them bit-exactly
    on exit, also when the body raises (``torch.optim.swa_utils`` style: the model is the
    container, the copy comes and goes)."""
    buffers = bn_buffers(model)
    with torch.no_grad():
        saved_params = [p.detach().clone() for p in params]
        saved_buffers = {k: buffers[k].clone() for k in sup.buffers}
    try:
        write_superposed(sup, params, model)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params, strict=True):
                p.detach().copy_(s)
            for k, s in saved_buffers.items():
                buffers[k].copy_(s)
        _dtensor.reshard(model)


def consolidate(
    sup: Superposition | None,
    params: Sequence[Tensor],
    sparse: Sequence[int],
    masks: Sequence[Tensor],
    counts: Sequence[int],
    model: nn.Module | None,
    *,
    averaging: str,
    beta: float,
    reprune: str,
    bn_update: BNUpdate | None,
    structure: Structure | None = None,
) -> Superposition:
    """Fold the live ticket into ``sup`` (a new copy when ``None``) and return it.

    With ``bn_update`` the BatchNorm statistics of the copy are recomputed on ``model``; if that
    fails, ``sup`` is restored to what it held before and the error propagates (a new copy is
    simply dropped), so a failed ticket leaves no trace.

    Raises:
        TypeError: for a ``bn_update`` that is neither callable nor re-iterable.
        ValueError: for bad knobs, knobs that differ from the first ticket's, ``bn_update``
            without a model, or a ``bn_update`` that cannot run.
    """
    check_superposition_args(averaging, beta, reprune, structure)
    check_bn_update(bn_update)
    if bn_update is not None and model is None:
        raise ValueError(
            "consolidate(bn_update=...) recomputes the BatchNorm statistics of the model; "
            "pass model= to SparseOptimizer"
        )
    buffers = bn_buffers(model)
    if sup is None:
        if model is None:
            warnings.warn(
                "consolidate() without model=: BatchNorm running statistics are not "
                "superposed; pass model= to SparseOptimizer to superpose them",
                UserWarning,
                stacklevel=3,
            )
        sup, backup = Superposition(averaging, beta, reprune, structure), None
    elif (sup.averaging, sup.beta, sup.reprune) != (averaging, float(beta), reprune):
        raise ValueError(
            f"consolidate(averaging={averaging!r}, beta={beta}, reprune={reprune!r}) differs "
            f"from the first ticket's (averaging={sup.averaging!r}, beta={sup.beta}, "
            f"reprune={sup.reprune!r})"
        )
    else:
        backup = None if bn_update is None else sup.state_dict()
    sup.add(params, sparse, masks, counts, buffers)
    if bn_update is None:
        return sup
    try:
        with swapped_in(sup, params, model):
            recompute_bn(model, bn_update)
            with torch.no_grad():
                for key, buf in bn_buffers(model).items():
                    sup.buffers[key].copy_(buf.detach())
    except BaseException:
        if backup is not None:
            restored = Superposition.from_state_dict(backup, params, sparse, buffers, structure)
            vars(sup).update(vars(restored))
        raise
    return sup
