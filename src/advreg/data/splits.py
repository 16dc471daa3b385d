"""Dataset splits: the :class:`DataSplits` record and the stratified carve that every dataset shares.

A carve takes round(fraction·n) rows, apportioned over the classes by largest remainder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train/validation/test tensors of one dataset; x float32 ``(N, *input_shape)``, y int64 ``(N,)``.

    ``eq=False``: comparing tensors field by field has no single truth value, so splits compare by identity.
    """

    name: str
    train: Pair
    val: Pair
    test: Pair
    num_classes: int
    input_shape: tuple[int, ...]

    def box(self) -> tuple[float, float]:
        """The input box (lo, hi): the training inputs' range, which attacks clip to and whose 8-bit levels size
        them; a host synchronisation, so a run computes it once."""
        return self.train[0].min().item(), self.train[0].max().item()


def carve_counts(counts: Tensor, fraction: float) -> Tensor:
    """How many rows of each class to carve: they sum to round(fraction·n), each within 1 of fraction·n_c.

    Largest-remainder apportionment: every class gets floor(fraction·n_c), and the classes with the
    largest remainders (ties: lower class first) get one more until the total is reached.
    """
    exact = counts.double() * fraction
    take = exact.floor().long()
    total = math.floor(fraction * int(counts.sum()) + 0.5)  # round half up, not to even
    order = torch.argsort(exact - take, descending=True, stable=True)
    take[order[: total - int(take.sum())]] += 1  # never above n_c: fraction < 1 (see module doc)
    return take


def stratified_split(y: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, carved)``, each sorted, with ``carved`` a class-stratified random ``fraction`` of ``y``."""
    classes, counts = torch.unique(y, return_counts=True)  # classes sorted: a fixed draw order
    carved = [_draw(y, c, int(k), generator) for c, k in zip(classes, carve_counts(counts, fraction))]
    carved_idx = torch.cat(carved).sort().values if carved else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[carved_idx] = False
    return mask.nonzero().squeeze(1), carved_idx


def _draw(y: Tensor, label: Tensor, k: int, generator: torch.Generator) -> Tensor:
    rows = (y == label).nonzero().squeeze(1)
    return rows[torch.randperm(len(rows), generator=generator)[:k]]


def take(pair: Pair, idx: Tensor) -> Pair:
    """Rows ``idx`` of ``(x, y)``; an empty ``idx`` keeps the sample shape, ``(0, *input_shape)``."""
    x, y = pair
    return x[idx], y[idx]
