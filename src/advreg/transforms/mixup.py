"""MixUp (Zhang et al., ICLR 2018, Eq. 1): x̃ = λx_i + (1-λ)x_j, ỹ = λy_i + (1-λ)y_j, λ ~ Beta(α, α) (AMP paper: α = 1).

One λ per batch, partners j from a random permutation of the batch; the targets become distributions (B, K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advreg.batch import Batch
from advreg.registry import Member, register


class MixUp:
    """The batch transform: one λ ~ Beta(α, α) per batch, partners from a random permutation; soft targets (B, K)."""

    def __init__(self, alpha: float = 1.0):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r} (the AMP paper uses 1, i.e. λ ~ U(0, 1))")
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Batch:
        lam = self.beta.sample().to(x.device, x.dtype)  # global RNG: seeded and checkpointed by the trainer
        partner = torch.randperm(len(y)).to(x.device)
        onehot = F.one_hot(y, num_classes).to(x.dtype)  # (B, K)
        return Batch(lam * x + (1 - lam) * x[partner], lam * onehot + (1 - lam) * onehot[partner])


@dataclass(frozen=True)
class MixupConfig:
    """The ``mixup`` transform (Zhang et al.): the Beta(α, α) that draws λ."""

    alpha: float = 1.0  # λ ~ Beta(α, α)


register(Member("transform", "mixup", lambda c, box, loss: MixUp(c.alpha), MixupConfig))
