"""Adversarial batches: FGSM training, the AMP paper's baseline (Sec. 5.1: x + ε·sign(∇ₓℓ), one step), and PGD
examples for adversarial training (Madry et al.; AWP paper Sec. 4.4: PGD-10, L∞ 8/255 step 2/255 or L2 128/255 step
15/255).

Sizes are given in 8-bit pixel levels of the dataset's input range: ε = pixels·(hi - lo)/255, which is the papers'
x/255 on [0, 1] images and the same share of the range for any other data.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from advreg.attacks import fgsm, pgd, pixel_level
from advreg.batch import Batch
from advreg.registry import Member, register


class FGSMExamples:
    """x' = x + ε·sign(∇ₓℓ) in the input box, on the unperturbed model in eval mode, once per step (the AMP paper's
    FGSM training); ε is ``pixels`` levels of ``input_range``."""

    def __init__(self, pixels: float, input_range: tuple[float, float]):
        if pixels < 0:
            raise ValueError(f"pixels must be >= 0, got {pixels!r} (the AMP paper uses 1)")
        self.box = input_range
        self.eps = pixels * pixel_level(input_range)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Batch:
        return Batch(fgsm(model, x, y, self.eps, box=self.box), y)


class PGDExamples:
    """x' by PGD on the unperturbed model in eval mode (AWP's Algorithm 2, line 6-9), once per step.

    ``objective`` is the loss the examples maximize: ``ce`` for AT and MART (AWP paper Eq. 9, 17), ``kl`` for
    TRADES (Eq. 16). The batch keeps x as its clean inputs, for the losses that also need f(x) (TRADES, MART).
    """

    def __init__(
        self,
        pixels: float,
        step_pixels: float,
        steps: int,
        norm: str,
        input_range: tuple[float, float],
        objective: str = "ce",
    ):
        if pixels < 0 or step_pixels <= 0 or not (isinstance(steps, int) and steps >= 1):
            raise ValueError(
                f"pixels must be >= 0, step_pixels > 0 and steps an integer >= 1, got "
                f"{pixels!r}, {step_pixels!r}, {steps!r} (the AWP paper: 8, 2, 10 for L∞)"
            )
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be linf or l2, got {norm!r}")
        self.eps, self.alpha = pixels * pixel_level(input_range), step_pixels * pixel_level(input_range)
        self.steps, self.norm, self.box = steps, norm, input_range
        self.objective = objective

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Batch:
        x_adv = pgd(
            model, x, y, self.eps, self.alpha, self.steps, norm=self.norm, box=self.box, objective=self.objective
        )  # the global RNG draws the random start: seeded, resumable
        return Batch(x_adv, y, clean=x)


@dataclass(frozen=True)
class FGSMConfig:
    """FGSM examples of the AMP paper's adversarial-training baseline (Sec. 5.1), the ``fgsm`` transform."""

    pixels: float = 1.0  # FGSM step in 8-bit levels of the input range: ε = pixels·(hi - lo)/255


@dataclass(frozen=True)
class PGDConfig:
    """The ``pgd`` transform: PGD examples of adversarial training (AWP paper, Sec. 4.4: PGD-10, L∞ 8/255 step 2/255;
    L2: 128 and 15),
    in pixel levels of the input range (ε = pixels·(hi - lo)/255)."""

    pixels: float = 8.0
    step_pixels: float = 2.0
    steps: int = 10
    norm: str = "linf"  # linf | l2


register(Member("transform", "fgsm", lambda c, box, loss: FGSMExamples(c.pixels, box), FGSMConfig, formerly="adv"))
register(
    Member(
        "transform",
        "pgd",
        lambda c, box, loss: PGDExamples(  # the examples maximize the loss's objective
            c.pixels, c.step_pixels, c.steps, c.norm, box, objective=loss.objective
        ),
        PGDConfig,
        gives_clean=True,
        formerly="at",
    )
)
