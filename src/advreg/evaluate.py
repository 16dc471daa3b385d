"""Evaluate a classifier on tensors: error and ECE in percent, NLL in nats; the model is left as it was given."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advreg.attacks import deepfool, pgd, pixel_level
from advreg.metrics import error_rate, expected_calibration_error, nll


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits (N, K) in eval mode; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> dict[str, float]:
    """``{"error", "nll", "ece"}`` on (x, y), and ``"top5_error"`` with more than 10 classes (ALPS Table 4); NaN for
    an empty split."""
    if len(y) == 0:
        return {"error": math.nan, "nll": math.nan, "ece": math.nan}
    logits = predict_logits(model, x, batch_size)
    out = {
        "error": 100.0 * error_rate(logits, y),
        "nll": nll(logits, y),
        "ece": 100.0 * expected_calibration_error(logits, y),
    }
    if logits.shape[1] > 10:
        top5 = logits.topk(5, dim=1).indices  # (N, 5)
        out["top5_error"] = 100.0 * (top5 != y.unsqueeze(1)).all(dim=1).double().mean().item()
    return out


def margin(
    model: nn.Module, x: Tensor, steps: int = 50, batch_size: int = 500, box: tuple[float, float] | None = None
) -> dict[str, float]:
    """``{"margin", "margin_success"}``: the mean L2 norm of DeepFool's perturbation (the AMM paper's test-set
    margin, Tables 3-4) and the percentage of samples it moved across a boundary within ``steps``. With the data's
    ``box`` every iterate is clipped into it (as torchattacks), the margin is the norm of the clipped perturbation;
    without, it is the unclipped DeepFool of the paper."""
    if len(x) == 0:
        return {"margin": math.nan, "margin_success": math.nan}
    total, reached = 0.0, 0
    for i in range(0, len(x), batch_size):
        _, norms, success = deepfool(model, x[i : i + batch_size], steps=steps, box=box)
        total += norms.double().sum().item()
        reached += int(success.sum().item())
    return {"margin": total / len(x), "margin_success": 100.0 * reached / len(x)}


@dataclass(frozen=True)
class AttackSettings:
    """A PGD threat model in the data's units: the ball's radius, the step, the steps, the norm and the input box."""

    eps: float
    alpha: float
    steps: int
    box: tuple[float, float]
    norm: str = "linf"

    @classmethod
    def in_levels(
        cls, pixels: float, step_pixels: float, steps: int, norm: str, box: tuple[float, float]
    ) -> "AttackSettings":
        """The settings of a threat model given in 8-bit pixel levels of ``box``: ε = pixels·(hi - lo)/255."""
        level = pixel_level(box)
        return cls(pixels * level, step_pixels * level, steps, box, norm)


def robust_error(
    model: nn.Module, x: Tensor, y: Tensor, s: AttackSettings, seed: int = 0, batch_size: int = 500
) -> float:
    """Error (%) on PGD examples of (x, y); the random starts come from a generator seeded with ``seed``, so every
    call draws the same ones and the global RNG (the training's) is left alone. NaN for an empty split."""
    if len(y) == 0:
        return math.nan
    generator = torch.Generator(device=x.device).manual_seed(seed)
    wrong = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        adv = pgd(model, xb, yb, s.eps, s.alpha, s.steps, norm=s.norm, box=s.box, generator=generator)
        wrong += int((predict_logits(model, adv).argmax(dim=1) != yb).sum().item())
    return 100.0 * wrong / len(y)
