"""Cross-entropy with hard or soft targets, and label smoothing (Szegedy et al., CVPR 2016, Sec. 7).

Smoothing mixes the target with the uniform distribution: t ← (1-α)·t + α/K (AMP paper: α = 0.2).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Batch-mean cross-entropy; ``target`` is class indices (B,) or a distribution (B, K)."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if smoothing:
        target = (1 - smoothing) * target + smoothing / logits.shape[1]
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
