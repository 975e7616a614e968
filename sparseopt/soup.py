"""A validated ultimate ticket: the tickets kept whole, scored by ``select=``, and a greedy soup.

With ``select=fn`` (``fn(model) -> float``, higher is better) ``finalize()`` does not simply write
the superposed copy. The candidates are every kept ticket (the phase-1 model, and each live
ticket at its cycle end) and the configured superposition. Each is written into the model in
turn and scored. Then a greedy soup over the tickets, as in model soups (Wortsman et al. 2022)
and Lottery Pools (Yin et al. 2023): the tickets sorted by score (ties keep their order), the
soup starts from the best, and the next ticket joins only if the average of the soup with it,
magnitude-pruned back to the target counts (as the superposition is) and with its BatchNorm
statistics recomputed from ``bn_update`` (averaged without it), scores at least as high. The
ultimate ticket is the best-scoring of the superposition, the soup (when it holds two tickets or
more) and every single ticket, first in that order on a tie. So its score is never below any
candidate's.

Cost, with ``K`` kept tickets (``K = M + 1`` under ``SupTicketsScheduler``: the phase-1 model and
the ``M`` cycle ends):

- calls to ``fn``: ``K`` single tickets, the superposition, at most ``K - 1`` soups: ``2K``;
- memory, per kept ticket: its active values (``count`` elements of the weight dtype per sparse
  layer), its masks as bits (``numel / 8`` bytes per sparse layer), every dense parameter and
  the BatchNorm buffers; scoring needs one more copy of the live parameters and buffers (the
  live ticket is restored bit-exactly afterwards).

Under ``torch.distributed`` every rank calls ``fn`` the same number of times in the same order
(so ``fn`` may run collectives), and rank 0's score decides, so ranks never diverge. An ``fn``
that raises, or returns anything but a finite real number, stops ``finalize()`` with an error
and leaves the model holding the last live ticket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _dtensor, _validate
from .methods import SparseLayer
from .superposition import (
    Candidate,
    Superposition,
    bn_buffers,
    preserved,
    recompute_bn,
    support_masks,
    write_buffers,
    write_superposed,
)

__all__ = ["Choice", "choose", "greedy_soup", "write_choice"]

SUPERPOSITION, SOUP = "superposition", "soup"


# --- writing a candidate into the live model ----------------------------------------------------
class _Writer:
    """Writes the candidates (a kept ticket, the superposition, an average of tickets) into the
    live parameters and buffers, and returns the masks of what it wrote."""

    def __init__(
        self,
        sup: Superposition,
        params: Sequence[Tensor],
        layers: Sequence[SparseLayer],
        model: nn.Module | None,
    ) -> None:
        self.sup, self.params, self.layers, self.model = sup, params, layers, model
        self.buffers = bn_buffers(model)

    def _as_masks(self, c: Candidate) -> list[Tensor]:
        out = []
        for layer in self.layers:
            mask = layer.mask.clone()
            _dtensor.local(mask).copy_(c.local_mask(layer.index, layer.param))
            out.append(mask)
        return out

    @torch.no_grad()
    def ticket(self, c: Candidate) -> list[Tensor]:
        for j, p in enumerate(self.params):
            _dtensor.local(p.detach()).copy_(c.local_tensor(j, p))
        write_buffers(self.buffers, c.buffers)
        _dtensor.reshard(self.model)
        return self._as_masks(c)

    @torch.no_grad()
    def superposition(self) -> list[Tensor]:
        write_superposed(self.sup, self.params, self.model)
        return self.sup.masks(self.layers)

    @torch.no_grad()
    def soup(self, members: Sequence[Candidate]) -> list[Tensor]:
        """The mean of ``members`` (float64 sums in their order), re-pruned; BatchNorm statistics
        recomputed with ``bn_update``, else averaged."""
        n = len(members)
        for j, p in enumerate(self.params):
            total = members[0].local_tensor(j, p).double()
            for c in members[1:]:
                total.add_(c.local_tensor(j, p))
            _dtensor.local(p.detach()).copy_(total.div_(n))
        values = [self.params[layer.index].detach() for layer in self.layers]
        masks = support_masks(
            values,
            [layer.count for layer in self.layers],
            self.sup.settings.reprune,
            self.sup.structure,
        )
        for v, keep in zip(values, masks, strict=True):
            v.mul_(keep)
        mean = {}
        for k in self.buffers:
            total = members[0].buffers[k].double()
            for c in members[1:]:
                total = total + c.buffers[k].double()
            mean[k] = total / n
        write_buffers(self.buffers, mean)
        _dtensor.reshard(self.model)
        if self.sup.settings.bn_update is not None:
            recompute_bn(self.model, self.sup.settings.bn_update)
            _dtensor.reshard(self.model)
        return masks


# --- scoring --------------------------------------------------------------------------------------
def _agreed(score: float | None, error: str | None) -> float:
    """Rank 0's score on every rank (and any rank's error everywhere); the value itself alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (score, error))
        failed = [(rank, e) for rank, (_, e) in enumerate(gathered) if e is not None]
        if failed:
            rank, error = failed[0]
            raise RuntimeError(f"on rank {rank}: {error}")
        return float(gathered[0][0])
    if error is not None:
        raise RuntimeError(error)
    return float(score)  # type: ignore[arg-type]


def _score(select: Callable[[nn.Module], Any], model: nn.Module, name: str) -> float:
    """``select(model)`` as a finite float; a clear error (on every rank) otherwise."""
    score, error, cause = None, None, None
    try:
        value = select(model)
    except Exception as e:  # reported on every rank, raised below
        error = f"select raised {type(e).__name__}: {e} (scoring {name})"
        cause = e
    else:
        if not _validate.is_real(value):
            error = (
                f"Expected select(model) to return a real number (a float; call .item() on a "
                f"tensor), but got {_validate.type_of(value)} for {name}"
            )
            cause = TypeError(error)
        elif not math.isfinite(float(value)):
            error = (
                f"Expected select(model) to return a finite number, but got {value!r} for {name}"
            )
            cause = ValueError(error)
        else:
            score = float(value)
    try:
        return _agreed(score, error)
    except RuntimeError as e:
        kind = type(cause) if isinstance(cause, (TypeError, ValueError)) else RuntimeError
        raise kind(f"{e}; finalize() stopped, and the model holds the last live ticket") from cause


class Choice(NamedTuple):
    """What ``select=`` chose at ``finalize()``.

    Attributes:
        chosen (str): ``"superposition"``, ``"soup"`` or a kept ticket's name.
        scores (dict): every candidate's score by name (``"soup"`` when the soup holds two or
            more tickets).
        soup (tuple): the soup's tickets, best first.
    """

    chosen: str
    scores: dict[str, float]
    soup: tuple[str, ...]


def greedy_soup(
    ranked: Sequence[tuple[str, float]], score: Callable[[tuple[str, ...]], float]
) -> tuple[tuple[str, ...], float]:
    """The greedy soup over ``ranked`` (``(name, score)``, best first): start from the best, add
    the next one when ``score(soup + (next,))`` is at least the soup's score.

    Args:
        ranked (Sequence[tuple[str, float]]): the tickets and their own scores, best first.
        score (Callable): scores a soup, given its members' names.

    Returns:
        The soup's members and its score (the best ticket's own, if nothing joined).

    Examples:
        A scorer that likes ``a`` with ``c`` but not ``a`` with ``b``:

        >>> value = {("a",): 3.0, ("a", "b"): 2.0, ("a", "c"): 3.5}
        >>> greedy_soup([("a", 3.0), ("b", 2.5), ("c", 1.0)], lambda names: value[names])
        (('a', 'c'), 3.5)
    """
    members, best = (ranked[0][0],), float(ranked[0][1])
    for name, _ in ranked[1:]:
        trial = (*members, name)
        value = score(trial)
        if value >= best:
            members, best = trial, value
    return members, best


def choose(
    sup: Superposition,
    params: Sequence[Tensor],
    layers: Sequence[SparseLayer],
    model: nn.Module,
) -> Choice:
    """Score every candidate with ``sup.settings.select`` and run the greedy soup; the live
    parameters, buffers and training flags are restored bit-exactly afterwards (also on error).
    """
    select = sup.settings.select
    writer = _Writer(sup, params, layers, model)
    kept = {c.name: c for c in sup.candidates}
    scores: dict[str, float] = {}
    members: tuple[str, ...] = ()
    with preserved(params, model):
        for c in sup.candidates:
            writer.ticket(c)
            scores[c.name] = _score(select, model, c.name)
        writer.superposition()
        scores[SUPERPOSITION] = _score(select, model, SUPERPOSITION)
        ranked = sorted(((c.name, scores[c.name]) for c in sup.candidates), key=lambda t: -t[1])
        if ranked:

            def soup_score(names: tuple[str, ...]) -> float:
                writer.soup([kept[n] for n in names])
                return _score(select, model, "the soup of " + ", ".join(names))

            members, soup_value = greedy_soup(ranked, soup_score)
            if len(members) > 1:
                scores[SOUP] = soup_value
    options = [(SUPERPOSITION, scores[SUPERPOSITION])]
    if SOUP in scores:
        options.append((SOUP, scores[SOUP]))
    options += ranked
    chosen = max(options, key=lambda t: t[1])[0]  # the first of the best
    return Choice(chosen, scores, members)


def write_choice(
    choice: Choice,
    sup: Superposition,
    params: Sequence[Tensor],
    layers: Sequence[SparseLayer],
    model: nn.Module | None,
) -> list[Tensor]:
    """Write the chosen candidate into the live parameters and buffers; return its masks."""
    writer = _Writer(sup, params, layers, model)
    if choice.chosen == SUPERPOSITION:
        return writer.superposition()
    kept = {c.name: c for c in sup.candidates}
    if choice.chosen == SOUP:
        return writer.soup([kept[n] for n in choice.soup])
    return writer.ticket(kept[choice.chosen])
