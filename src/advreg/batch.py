"""The batch that flows from the transform stage to the loss stage.

A transform returns a :class:`Batch`; a loss stage reads what it needs of it: the inputs and the target, and the
clean inputs where the transform replaced them by adversarial examples and the loss compares the two (TRADES, MART).
Neither stage knows the other's members: the loss declares ``needs_clean``, the transform ``gives_clean``
(:class:`advreg.registry.Member`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """``inputs`` (B, ...), the ``target`` hard (B,) or soft (B, K), and the ``clean`` inputs (B, ...) the inputs were
    made from, or None when the transform gives none."""

    inputs: Tensor
    target: Tensor
    clean: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.target):
            raise ValueError(
                f"a batch's inputs and target must have one row per sample, got {len(self.inputs)} "
                f"inputs and {len(self.target)} targets"
            )
        if self.clean is not None and self.clean.shape != self.inputs.shape:
            raise ValueError(
                f"the clean inputs must have the inputs' shape {tuple(self.inputs.shape)}, got "
                f"{tuple(self.clean.shape)}"
            )
