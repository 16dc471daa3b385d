"""Evaluation metrics: error, negative log-likelihood, and the expected calibration error of the AMP paper (Appendix D).

ECE bins the top-label confidence into M equal bins I_m = ((m-1)/M, m/M], so a confidence of exactly 1.0 is counted
(in the last bin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def error_rate(logits: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose arg-max prediction is wrong."""
    return (logits.argmax(dim=1) != targets).double().mean().item()


def nll(logits: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood of the true class, in nats, from the logits."""
    return F.cross_entropy(logits.double(), targets).item()


def expected_calibration_error(logits: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE of the softmax of ``logits`` (B, K), as a fraction in [0, 1]."""
    probs = torch.softmax(logits.double(), dim=1)  # (B, K)
    confidence, predicted = probs.max(dim=1)  # top-label confidence and prediction, (B,)
    return calibration_error(confidence, predicted == targets, n_bins)


def calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_m |B_m|/n · |acc(B_m) - conf(B_m)| over the bins ((m-1)/M, m/M], m = 1..M."""
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins must be an integer >= 1 (the paper uses 15), got {n_bins!r}")
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(
            f"confidence and correct must be 1-D of equal length, got {tuple(confidence.shape)} "
            f"and {tuple(correct.shape)}"
        )
    confidence = confidence.double()
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64, device=confidence.device) / n_bins  # m/M
    bins = torch.bucketize(confidence, upper, right=False).clamp(max=n_bins - 1)  # upper[m-1] < c <= upper[m]
    gap = torch.bincount(bins, weights=correct.double() - confidence, minlength=n_bins)  # Σ (acc - conf) per bin
    return (gap.abs().sum() / len(confidence)).item()
