"""Evaluate a classifier on tensors: error and ECE in percent, NLL in nats; the model is left as it was given."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from advreg.attacks import deepfool
from advreg.metrics import error_rate, expected_calibration_error, nll


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits (N, K) in eval mode; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> dict[str, float]:
    """``{"error", "nll", "ece"}`` on (x, y); NaN for an empty split."""
    if len(y) == 0:
        return {"error": math.nan, "nll": math.nan, "ece": math.nan}
    logits = predict_logits(model, x, batch_size)
    return {"error": 100.0 * error_rate(logits, y), "nll": nll(logits, y),
            "ece": 100.0 * expected_calibration_error(logits, y)}


def margin(model: nn.Module, x: Tensor, steps: int = 50, batch_size: int = 500) -> dict[str, float]:
    """``{"margin", "margin_success"}``: the mean L2 norm of DeepFool's perturbation (the AMM paper's test-set
    margin, Tables 3-4) and the percentage of samples it moved across a boundary within ``steps``."""
    if len(x) == 0:
        return {"margin": math.nan, "margin_success": math.nan}
    total, reached = 0.0, 0
    for i in range(0, len(x), batch_size):
        _, norms, success = deepfool(model, x[i:i + batch_size], steps=steps)
        total += norms.double().sum().item()
        reached += int(success.sum().item())
    return {"margin": total / len(x), "margin_success": 100.0 * reached / len(x)}
