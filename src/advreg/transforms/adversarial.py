"""FGSM adversarial training, the AMP paper's baseline (Sec. 5.1): train on x + ε·sign(∇ₓℓ), one step.

ε is given in 8-bit pixel levels of the dataset's input range (the paper: 1 level), ε = pixels·(hi - lo)/255.
"""
from __future__ import annotations

from torch import Tensor, nn

from advreg.attacks import fgsm


class FGSMExamples:
    def __init__(self, pixels: float, input_range: tuple[float, float]):
        if pixels < 0:
            raise ValueError(f"adv.pixels must be >= 0, got {pixels!r} (the AMP paper uses 1)")
        self.box = input_range
        self.eps = pixels * (input_range[1] - input_range[0]) / 255

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        return fgsm(model, x, y, self.eps, box=self.box), y
