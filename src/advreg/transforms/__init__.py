"""The batch-transform stage: what a batch becomes before the loss; it may use the model.

A transform maps ``(model, x, y, num_classes)`` to a :class:`~advreg.batch.Batch`: the inputs x', the target, hard
(B,) or soft (B, K), and the clean inputs x where x' replaced them (adversarial examples).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from advreg.batch import Batch
from advreg.registry import Member, members, register
from advreg.transforms.adversarial import FGSMExamples, PGDExamples
from advreg.transforms.alps import ALPS, alps_label
from advreg.transforms.mixup import MixUp

Transform = Callable[[nn.Module, Tensor, Tensor, int], Batch]


def identity(model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Batch:
    """The batch as it is."""
    return Batch(x, y)


register(Member("transform", "identity", lambda c, box, loss: identity))
TRANSFORMS = tuple(members("transform"))  # every declared transform's name


__all__ = ["ALPS", "Batch", "FGSMExamples", "PGDExamples", "MixUp", "alps_label", "TRANSFORMS", "Transform", "identity"]
