"""TRADES (Zhang et al., ICML 2019; AWP paper Eq. 2): CE(f(x), y) + β·KL(p(x) ‖ p(x')) on clean and adversarial logits.

Both terms keep their gradient: as in the TRADES code, the KL differentiates through the clean p(x) too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from advreg.losses.stage import pair_builder
from advreg.registry import Member, register


def check_pair(logits: Tensor, logits_adv: Tensor, target: Tensor, beta: float) -> None:
    """Raise ValueError unless logits and logits_adv are both (B, K), target is (B,) class indices and beta >= 0."""
    if logits.dim() != 2 or logits.shape != logits_adv.shape:
        raise ValueError(
            f"clean and adversarial logits must both be (B, K), got {tuple(logits.shape)} and "
            f"{tuple(logits_adv.shape)}; pass the model's outputs on x and on x' for the same batch"
        )
    if target.dim() != 1 or target.shape[0] != logits.shape[0] or target.is_floating_point():
        raise ValueError(
            f"target must be (B,) = ({logits.shape[0]},) integer class indices, got "
            f"{tuple(target.shape)} {target.dtype}; soft targets are not supported here"
        )
    if beta < 0:
        raise ValueError(f"beta (the KL weight) must be >= 0, got {beta!r} (TRADES and MART use 6)")


def kl_rows(logits: Tensor, logits_adv: Tensor) -> Tensor:
    """Per-sample KL(p(x) ‖ p(x')) = Σ_k p_k (log p_k − log p'_k), from log_softmax; (B,)."""
    log_p = F.log_softmax(logits, dim=1)  # (B, K)
    log_q = F.log_softmax(logits_adv, dim=1)  # (B, K)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)  # (B,)


def trades_loss(logits: Tensor, logits_adv: Tensor, target: Tensor, beta: float = 6.0) -> Tensor:
    """Batch mean of CE(f(x), y) + β·KL(p(x) ‖ p(x')); logits, logits_adv (B, K), target (B,)."""
    check_pair(logits, logits_adv, target, beta)
    return F.cross_entropy(logits, target) + beta * kl_rows(logits, logits_adv).mean()


@dataclass(frozen=True)
class TRADESConfig:
    """The ``trades`` loss (Zhang et al., ICML 2019)."""

    beta: float = 6.0  # weight of KL(p(x) ‖ p(x')) (TRADES paper; AWP paper Eq. 2)


# the PGD examples maximize TRADES's own adversarial term, the KL
register(Member("loss", "trades", pair_builder("trades", trades_loss), TRADESConfig, needs_clean=True, objective="kl"))
