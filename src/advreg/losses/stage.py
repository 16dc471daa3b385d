"""The loss stage's protocol, and the two ways a criterion becomes a stage: on the logits, on a clean/adversarial
pair."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from advreg.losses.ce import cross_entropy
from advreg.losses.flooding import flood

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


def pair_builder(name: str, criterion: Callable[..., Tensor]) -> Callable[..., OnPair]:
    """The ``build`` of a member whose criterion is ``criterion(logits, logits_adv, target, beta=...)``: its section
    holds β, and the cross-entropy's smoothing and flooding do not apply to it."""
    def build(section: Any, ce: LossFn, loss_config: Any) -> OnPair:
        if loss_config.smoothing or loss_config.flooding:
            raise ValueError(f"loss.smoothing and loss.flooding apply to the ce and amm losses, not to {name}; "
                             "leave them at 0")
        if section.beta < 0:
            raise ValueError(f"{name}.beta must be >= 0, got {section.beta!r} (the papers use 6)")
        return OnPair(functools.partial(criterion, beta=section.beta))
    return build
