"""ALPS: adversarial labelling of perturbed samples (Guo, Zhang, Zheng & Mao, IJCAI 2021, Eq. 12-18, Theorem 1, Alg. 1).

x̃ = λx + (1-λ)x' with λ ~ Beta(α, β) (mode in (0.75, 1)) and a partner x' from the batch; its label is the worst
in the L1 ball of radius ε around y, which Theorem 1 gives in closed form: ρ = (1 - ε/2)·y + (ε/2)·k*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advreg.attacks import eval_mode
from advreg.batch import Batch
from advreg.registry import Member, register


def alps_label(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """Theorem 1: argmax of CE(f(x̃), ỹ) over ‖ỹ - y‖₁ ≤ ε in the simplex, as soft targets (B, K).

    Moving mass δ from y to class k costs 2δ of the L1 budget and gains δ·(ℓ_k - ℓ_y), so all of ε/2 goes to
    the least likely class k* = argmin_k f_k(x̃); when that is y itself, nothing beats ρ = y, which the same
    formula gives. ``targets`` are class indices (B,).
    """
    if not 0 <= epsilon <= 2:
        raise ValueError(
            f"epsilon (the L1 radius of the label ball) must be in [0, 2], got {epsilon!r}; "
            "the ALPS paper uses (0, 0.5)"
        )
    k = logits.shape[1]
    least_likely = logits.argmin(dim=1)  # (B,): softmax is monotone in the logits
    onehot = F.one_hot(targets, k).to(logits.dtype)
    return (1 - epsilon / 2) * onehot + (epsilon / 2) * F.one_hot(least_likely, k).to(logits.dtype)


def beta_mode(alpha: float, beta: float) -> float:
    """Mode (α - 1)/(α + β - 2) of Beta(α, β), defined for α, β > 1."""
    return (alpha - 1) / (alpha + beta - 2)


class ALPS:
    """The batch transform: per-sample λ ~ Beta(α, β), partner from a random permutation of the batch.

    k* is computed with a forward pass of x̃ in eval mode and without gradients: the label is the constant
    target of the inner maximization (Theorem 1), it must not depend on a dropout mask, and the extra pass
    must not move BatchNorm statistics. With AMP, the label is fixed once per step, for all its passes.
    """

    def __init__(self, alpha: float = 9.0, beta: float = 2.0, epsilon: float = 0.2):
        if not (alpha > 1 and beta > 1 and 0.75 < beta_mode(alpha, beta) < 1):
            raise ValueError(
                f"alpha and beta must be > 1 with the mode (α-1)/(α+β-2) in (0.75, 1) as in "
                f"the ALPS paper, got α={alpha!r}, β={beta!r} (e.g. α=9, β=2: mode 0.89)"
            )
        if not 0 < epsilon < 0.5:
            raise ValueError(f"epsilon must be in (0, 0.5) as in the ALPS paper, got {epsilon!r}")
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(beta)))
        self.epsilon = epsilon

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Batch:
        lam = self.beta.sample((len(y),)).to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))  # (B, 1, ...)
        partner = torch.randperm(len(y)).to(x.device)
        mixed = lam * x + (1 - lam) * x[partner]
        with torch.no_grad(), eval_mode(model):
            logits = model(mixed)  # (B, K)
        return Batch(mixed, alps_label(logits, y, self.epsilon))


@dataclass(frozen=True)
class ALPSConfig:
    """The ``alps`` transform (Guo et al., Algorithm 1): the Beta(α, β) of λ and the label ball's radius ε."""

    alpha: float = 9.0  # λ ~ Beta(α, β), mode (α-1)/(α+β-2) = 0.89
    beta: float = 2.0
    epsilon: float = 0.2  # L1 radius of the label ball, in (0, 0.5)


register(Member("transform", "alps", lambda c, box, loss: ALPS(c.alpha, c.beta, c.epsilon), ALPSConfig))
