"""The loss stage: the objective on a transformed batch."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from advreg.losses.ce import cross_entropy
from advreg.losses.flooding import flood

LossFn = Callable[[Tensor, Tensor], Tensor]


def make_loss(smoothing: float = 0.0, flooding: float = 0.0) -> LossFn:
    """Cross-entropy (hard or soft targets) with optional label smoothing, then optional flooding."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"loss.smoothing must be in [0, 1), got {smoothing!r} (the AMP paper uses 0.2)")
    if flooding < 0:
        raise ValueError(f"loss.flooding (the flood level b) must be >= 0, got {flooding!r} (the AMP paper uses 0.02)")

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        return flood(cross_entropy(logits, target, smoothing), flooding)
    return loss_fn


__all__ = ["LossFn", "cross_entropy", "flood", "make_loss"]
