"""MART (Wang et al., ICLR 2020; AWP paper Eq. 3): BCE(p(x'), y) + β·KL(p(x) ‖ p(x'))·(1 − p_y(x)).

BCE(p', y) = −log p'_y − log(1 − max_{k≠y} p'_k) is MART's boosted cross-entropy on the adversarial example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from advreg.losses.stage import pair_builder
from advreg.losses.trades import check_pair
from advreg.registry import Member, register


def top_wrong_prob(probs: Tensor, target: Tensor) -> Tensor:
    """max_{k≠y} p_k for probs (B, K) and target (B,): the largest wrong-class probability; (B,)."""
    others = probs.masked_fill(F.one_hot(target, probs.shape[1]).bool(), float("-inf"))  # (B, K), label masked
    return probs.gather(1, others.argmax(dim=1, keepdim=True)).squeeze(1)  # (B,)


def mart_loss(logits: Tensor, logits_adv: Tensor, target: Tensor, beta: float = 6.0) -> Tensor:
    """Batch mean of BCE(p(x'), y) + β·KL(p(x) ‖ p(x'))·(1 − p_y(x)); logits, logits_adv (B, K), target (B,).

    The constants are the MART reference code's: −log(1.0001 − max_{k≠y} p'_k + 1e-12) keeps the log finite
    when p' puts all its mass on a wrong class, the KL uses log(p' + 1e-12), and the weight is
    (1.0000001 − p_y(x)). Nothing is detached: the weight (1 − p_y(x)) is differentiated, as in the reference.
    """
    check_pair(logits, logits_adv, target, beta)
    p = F.softmax(logits, dim=1)  # (B, K)
    p_adv = F.softmax(logits_adv, dim=1)  # (B, K)
    bce = F.cross_entropy(logits_adv, target, reduction="none") - torch.log(
        1.0001 - top_wrong_prob(p_adv, target) + 1e-12
    )  # (B,)
    kl = (p * (F.log_softmax(logits, dim=1) - torch.log(p_adv + 1e-12))).sum(dim=1)  # (B,)
    weight = 1.0000001 - p.gather(1, target[:, None]).squeeze(1)  # (B,): 1 − p_y(x)
    return (bce + beta * kl * weight).mean()


@dataclass(frozen=True)
class MARTConfig:
    """The ``mart`` loss (Wang et al., ICLR 2020)."""

    beta: float = 6.0  # λ of the misclassification-weighted KL (AWP paper Eq. 3; the MART code's beta)


register(Member("loss", "mart", pair_builder("mart", mart_loss), MARTConfig, needs_clean=True))
