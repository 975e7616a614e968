"""The optimizer's Sup-tickets state: the superposed ticket's lifecycle behind ``SparseOptimizer``.

``SparseOptimizer`` holds one :class:`SupTickets` and forwards its public Sup-tickets methods
(``configure_superposition``, ``consolidate``, ``finalize``, ``superposed``, the
``superposition`` view) to it. It owns the :class:`~sparseopt.superposition.Superposition` (the
only writer of the copy), knows when the settings were fixed, and counts the loop's iterations
for ``SupTicketsScheduler``: the optimizer's ``step()`` calls in this process and the steps a
``GradScaler`` skipped (``_prologue``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from . import _warnings, soup, superposition
from .engine import MaskEngine
from .superposition import Candidate, Superposition, SuperpositionSettings, SuperpositionView

__all__ = ["NOT_GIVEN", "SupTickets"]


class _NotGiven:
    """The default of ``consolidate``'s deprecated keyword arguments."""

    def __repr__(self) -> str:
        return "<deprecated>"


NOT_GIVEN: Any = _NotGiven()


class SupTickets:
    """The Sup-tickets side of one ``SparseOptimizer``.

    Args:
        engine (MaskEngine): the optimizer's mask engine (layers, masks, model, structure).
    """

    def __init__(self, engine: MaskEngine) -> None:
        self.engine = engine
        self.superposition: Superposition | None = None
        self.restored = False  # settings read from a state dict: bn_update and select unknown
        self.skipped_steps = 0  # steps a GradScaler skipped (saved)
        self.step_calls = 0  # step() calls in this process, skipped included: the loop's clock
        self.once = _warnings.Once()

    def params(self) -> list[Tensor]:
        return [p for group in self.engine.optimizer.param_groups for p in group["params"]]

    @property
    def tickets(self) -> int:
        return 0 if self.superposition is None else self.superposition.tickets

    def view(self) -> SuperpositionView | None:
        sup = self.superposition
        return None if sup is None else SuperpositionView(sup, self.engine.layers)

    # --- the settings, fixed once -----------------------------------------------------------
    def build(self, **settings: Any) -> SuperpositionSettings:
        return SuperpositionSettings.build(
            **settings, structure=self.engine.settings.structure, model=self.engine.model
        )

    def configure(self, settings: SuperpositionSettings, caller: str) -> None:
        """Equal settings: nothing; other settings: replace them before the first ticket, a
        ``ValueError`` after it (but for another ``select``, used only by ``finalize()``).
        Settings restored from a state dict take ``bn_update`` and ``select`` from the first
        configuration that agrees with them."""
        sup = self.superposition
        if sup is not None and sup.settings == settings:
            return
        if sup is not None and self.restored and sup.settings.same_saved(settings):
            sup.settings, self.restored = settings, False
            return
        if (
            sup is not None
            and sup.settings.same_saved(settings)
            and sup.settings.bn_update is settings.bn_update
            and settings.select is not None
        ):
            sup.settings = settings  # select acts only at finalize(): it may change until then
            return
        if sup is not None and not sup.is_empty():
            raise ValueError(
                f"{caller}({settings.describe()}) differs from the superposition's settings "
                f"({sup.settings.describe()}), fixed at its first ticket"
            )
        self.superposition = Superposition(settings, self.engine.settings.structure)
        self.restored = False

    def consolidate(self, averaging: Any, beta: Any, reprune: Any, bn_update: Any) -> None:
        """``opt.consolidate(...)``: one folded ticket; deprecated settings first, if given."""
        given = {
            k: v
            for k, v in (("averaging", averaging), ("beta", beta), ("reprune", reprune),
                         ("bn_update", bn_update))
            if v is not NOT_GIVEN
        }  # fmt: skip
        if given:
            self.configure_deprecated(given)
        self.take_ticket(fold=True)

    def configure_deprecated(self, given: dict[str, Any]) -> None:
        """``consolidate(averaging=..., ...)``: configures if nothing is; must agree otherwise
        (``bn_update`` applies per call, as before the deprecation)."""
        _warnings.warn(
            "consolidate(averaging=..., beta=..., reprune=..., bn_update=...) is deprecated: fix "
            "the settings once with opt.configure_superposition(...) (SupTicketsScheduler does "
            "it), then call opt.consolidate() without arguments",
            DeprecationWarning,
        )
        settings = self.build(**given)
        sup = self.superposition
        if sup is None or (sup.is_empty() and not self.restored):
            self.configure(settings, "consolidate")
            return
        if not sup.settings.same_saved(settings):
            what = "the first ticket's" if sup.tickets else "the configured settings"
            raise ValueError(
                f"consolidate({settings.describe()}) differs from {what} "
                f"({sup.settings.describe()})"
            )
        sup.settings = dataclasses.replace(sup.settings, bn_update=settings.bn_update)

    # --- tickets ----------------------------------------------------------------------------
    def take_ticket(self, *, fold: bool, name: str | None = None) -> None:
        """The live weights as one ticket: folded into the copy (``fold``) and, with
        ``keep_tickets``, kept whole (the scheduler keeps the phase-1 model, ``"phase 1"``, this
        way for ``select`` even when it is not folded)."""
        engine = self.engine
        if not engine.masks_applied:
            engine.apply_masks()
        if self.superposition is None:
            self.configure(self.build(), "consolidate")
        sup = self.superposition
        layers, params, model = engine.layers, self.params(), engine.model
        buffers = superposition.bn_buffers(model)
        settings = sup.settings
        if fold:
            if sup.tickets == 0 and model is None and superposition.norm_layer_holds(params):
                self.once.warn(
                    "bn-without-model",
                    "consolidate() without model=: a BatchNorm layer holds some of the "
                    "optimizer's parameters, and its running statistics are not superposed; "
                    "pass model= to SparseOptimizer to superpose them",
                )
            backup = None if settings.bn_update is None else sup.snapshot()
            sup.add(params, layers, buffers, name)
            if backup is not None:
                try:
                    with superposition.swapped_in(sup, params, model):
                        superposition.recompute_bn(model, settings.bn_update)
                        for key, buf in superposition.bn_buffers(model).items():
                            sup.buffers[key].copy_(buf.detach())
                except BaseException:
                    sup.restore(backup)
                    raise
            name = sup.names[-1]
        if settings.keep_tickets:
            sup.candidates.append(Candidate.take(name or "phase 1", params, layers, buffers))

    def require_tickets(self, what: str) -> Superposition:
        if self.superposition is None or self.superposition.tickets == 0:
            raise ValueError(f"{what} needs at least one ticket: call consolidate() first")
        return self.superposition

    @torch.no_grad()
    def finalize(self) -> None:
        sup = self.require_tickets("finalize()")
        engine, params = self.engine, self.params()
        layers, model = engine.layers, engine.model
        if sup.settings.select is None:
            choice = soup.Choice(soup.SUPERPOSITION, {}, ())
            masks = sup.masks(layers)
            superposition.write_superposed(sup, params, model)
        else:
            choice = soup.choose(sup, params, layers, model)  # the live ticket back on error
            masks = soup.write_choice(choice, sup, params, layers, model)
        engine.set_masks(masks)
        sup.finalized, sup.chosen, sup.scores = True, choice.chosen, dict(choice.scores)
        sup.soup = choice.soup

    @contextmanager
    def superposed(self) -> Iterator[None]:
        sup = self.require_tickets("superposed()")
        with superposition.swapped_in(sup, self.params(), self.engine.model):
            yield

    # --- report, checkpoints ----------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The ``"suptickets"`` entry of ``report()``."""
        sup = self.superposition
        return {
            "configured": sup is not None,
            "tickets": self.tickets,
            "finalized": sup is not None and sup.finalized,
            "candidates": [] if sup is None else [c.name for c in sup.candidates],
            "scores": {} if sup is None else dict(sup.scores),
            "chosen": None if sup is None else sup.chosen,
            "soup": [] if sup is None else list(sup.soup),
            "skipped_steps": self.skipped_steps,
        }

    def to_save(self) -> Superposition | None:
        """What the checkpoint carries: the superposition, unless it holds nothing yet."""
        sup = self.superposition
        return None if sup is None or sup.is_empty() else sup

    def check_state(self, state_dict: Any) -> None:
        """Before anything loads: a saved superposition must fit the configured settings."""
        saved = state_dict.get("sparseopt") if isinstance(state_dict, Mapping) else None
        sup_state = saved.get("superposition") if isinstance(saved, Mapping) else None
        sup = self.superposition
        if sup_state is None or sup is None:
            return
        mine = sup.settings.saved()
        theirs = {k: sup_state.get(k, False) for k in mine}
        differ = [
            f"{k}={theirs[k]!r} vs configured {mine[k]!r}" for k in mine if theirs[k] != mine[k]
        ]
        if differ:
            raise ValueError(
                "state dict does not fit this SparseOptimizer: its superposition was saved with "
                "other settings: " + "; ".join(differ)
            )

    def load(self, loaded: Any, state_dict: Mapping[str, Any]) -> None:
        """After the engine loaded: the saved superposition (a ``Superposition`` or its plain
        data, or ``None``) under the configured settings, and the skipped-step count."""
        sup = self.superposition
        if isinstance(loaded, Mapping):
            loaded = Superposition.from_state_dict(
                loaded, self.params(), [layer.index for layer in self.engine.layers],
                superposition.bn_buffers(self.engine.model), self.engine.settings.structure,
            )  # fmt: skip
        if loaded is None:
            self.superposition = None if sup is None else Superposition(sup.settings, sup.structure)
        elif sup is None:
            self.superposition, self.restored = loaded, True
        else:
            loaded.settings = sup.settings
            self.superposition = loaded
        self.skipped_steps = int(state_dict["sparseopt"].get("skipped_steps", 0))
