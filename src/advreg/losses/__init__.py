"""The loss stage: the objective on a transformed batch.

A loss stage is called as ``stage(model, inputs, target)`` and returns ``(loss, logits)``, the logits being the
model's outputs on ``inputs``: most objectives only need those logits (:class:`OnLogits`), TRADES and MART need
the clean and the adversarial logits (:class:`OnPair`), and AMM runs the model again (DeepFool) inside its regularizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor, nn

from advreg.losses.amm import AMMLoss
from advreg.losses.ce import cross_entropy
from advreg.losses.flooding import flood
from advreg.losses.mart import mart_loss
from advreg.losses.trades import trades_loss

LossFn = Callable[[Tensor, Tensor], Tensor]  # a criterion on (logits, target)
PairLossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # a criterion on (logits, adversarial logits, target)


class LossStage(Protocol):
    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class OnLogits:
    """The loss stage of a criterion on the logits: ``criterion(model(inputs), target)``."""
    criterion: LossFn

    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(inputs)
        return self.criterion(logits, target), logits


@dataclass(frozen=True)
class OnPair:
    """The loss stage of a criterion on clean and adversarial logits, for batches that stack x and x' (clean first,
    as :class:`advreg.transforms.PGDExamples` with ``keep_clean`` makes them). Two forward passes, as the TRADES
    and MART code does, so BatchNorm normalizes each half on its own statistics; the clean logits are returned."""
    criterion: PairLossFn

    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if len(inputs) != 2 * len(target):
            raise ValueError(f"TRADES and MART expect the clean and adversarial batches stacked ({2 * len(target)} "
                             f"rows for {len(target)} labels), got {len(inputs)}; use stages.transform=pgd")
        x, x_adv = inputs.chunk(2)
        logits = model(x)  # (B, K)
        return self.criterion(logits, model(x_adv), target), logits


def make_loss(smoothing: float = 0.0, flooding: float = 0.0) -> LossFn:
    """Cross-entropy (hard or soft targets) with optional label smoothing, then optional flooding."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"loss.smoothing must be in [0, 1), got {smoothing!r} (the AMP paper uses 0.2)")
    if flooding < 0:
        raise ValueError(f"loss.flooding (the flood level b) must be >= 0, got {flooding!r} (the AMP paper uses 0.02)")

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        return flood(cross_entropy(logits, target, smoothing), flooding)
    return loss_fn


__all__ = ["AMMLoss", "LossFn", "LossStage", "OnLogits", "OnPair", "PairLossFn", "cross_entropy", "flood", "make_loss",
           "mart_loss", "trades_loss"]
