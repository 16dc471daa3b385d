"""The loss stage's protocol, and the two ways a criterion becomes a stage: on the logits, on a clean/adversarial
pair."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from advreg.batch import Batch
from advreg.losses.ce import cross_entropy
from advreg.losses.flooding import flood

LossFn = Callable[[Tensor, Tensor], Tensor]  # a criterion on (logits, target)
PairLossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # a criterion on (logits, adversarial logits, target)


class LossStage(Protocol):
    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class OnLogits:
    """The loss stage of a criterion on the logits: ``criterion(model(batch.inputs), batch.target)``."""

    criterion: LossFn

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        logits = model(batch.inputs)  # (B, K)
        return self.criterion(logits, batch.target), logits


@dataclass(frozen=True)
class OnPair:
    """The loss stage of a criterion on clean and adversarial logits: ``criterion(model(batch.clean),
    model(batch.inputs), batch.target)``, for a batch of adversarial examples that keeps its clean inputs (as
    :class:`advreg.transforms.PGDExamples` makes it). Two forward passes, as the TRADES and MART code does, so
    BatchNorm normalizes each on its own statistics; the clean logits are returned."""

    criterion: PairLossFn

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        if batch.clean is None:
            raise ValueError(
                "TRADES and MART compare the clean and the adversarial inputs, and this batch has no "
                "clean inputs; make it with a transform that keeps them (stages.transform=pgd)"
            )
        logits = model(batch.clean)  # (B, K)
        return self.criterion(logits, model(batch.inputs), batch.target), logits


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
            raise ValueError(
                f"loss.smoothing and loss.flooding apply to the ce and amm losses, not to {name}; leave them at 0"
            )
        if section.beta < 0:
            raise ValueError(f"{name}.beta must be >= 0, got {section.beta!r} (the papers use 6)")
        return OnPair(functools.partial(criterion, beta=section.beta))

    return build
