"""The loss stage: the objective on a transformed batch.

A loss stage is called as ``stage(model, inputs, target)`` and returns ``(loss, logits)``, the logits being the
model's outputs on ``inputs``: most objectives only need those logits (:class:`OnLogits`), while AMM runs the
model again (DeepFool) inside its regularizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor, nn

from advreg.losses.amm import AMMLoss
from advreg.losses.ce import cross_entropy
from advreg.losses.flooding import flood

LossFn = Callable[[Tensor, Tensor], Tensor]  # a criterion on (logits, target)


class LossStage(Protocol):
    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class OnLogits:
    """The loss stage of a criterion on the logits: ``criterion(model(inputs), target)``."""
    criterion: LossFn

    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(inputs)
        return self.criterion(logits, target), logits


def make_loss(smoothing: float = 0.0, flooding: float = 0.0) -> LossFn:
    """Cross-entropy (hard or soft targets) with optional label smoothing, then optional flooding."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"loss.smoothing must be in [0, 1), got {smoothing!r} (the AMP paper uses 0.2)")
    if flooding < 0:
        raise ValueError(f"loss.flooding (the flood level b) must be >= 0, got {flooding!r} (the AMP paper uses 0.02)")

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        return flood(cross_entropy(logits, target, smoothing), flooding)
    return loss_fn


__all__ = ["AMMLoss", "LossFn", "LossStage", "OnLogits", "cross_entropy", "flood", "make_loss"]
