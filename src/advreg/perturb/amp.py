"""AMP: adversarial model perturbation (Zheng, Zhang & Mao, CVPR 2021, Eq. 4-5 and Algorithm 1).

Minimize the worst batch loss in the L2 ball ‖Δ‖ ≤ ε around θ: N projected ascent steps Δ ← Π_ε(Δ + ζ∇J(θ+Δ)), then the outer step at θ with ∇J(θ+Δ).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from advreg.perturb.engine import (Closure, PerturbedOptimizer, check_nonnegative, global_norm, grads_of, scratch,
                                   set_to_sum)

NORMS = ("global", "per_tensor")


class AMP(PerturbedOptimizer):
    """Algorithm 1 of the AMP paper as a ``torch.optim`` optimizer wrapping ``base_optimizer``.

    ``norm="global"`` projects the whole Δ on the ball, as the paper defines it; ``norm="per_tensor"``
    projects each tensor on its own, as the authors' released code does (its ε means that).
    The closure is called N+1 times per step; ``step`` returns the loss at θ.
    """

    def __init__(self, params: Iterable, base_optimizer: type, *, epsilon: float, inner_lr: float,
                 inner_steps: int = 1, norm: str = "global", bn_stats: str = "clean", **base_kwargs: Any):
        self.epsilon, self.inner_lr, self.inner_steps, self.norm = epsilon, inner_lr, inner_steps, norm
        self._validate()
        super().__init__(params, base_optimizer, bn_stats=bn_stats, **base_kwargs)
        self._delta: dict[Tensor, Tensor] = {}  # scratch: Δ during a step

    def _validate(self) -> None:
        check_nonnegative("epsilon", self.epsilon, "it is the radius of the L2 ball (0 turns AMP off)")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0 (the paper uses N = 1), got {self.inner_steps!r}")
        if self.inner_steps > 0 and not (isinstance(self.inner_lr, (int, float)) and self.inner_lr > 0):
            raise ValueError(f"inner_lr (ζ) must be > 0 when inner_steps > 0, got {self.inner_lr!r}; "
                             "the paper uses ζ = 1 with ε = 0.5 for PreActResNet18")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    def _is_active(self) -> bool:
        return self.epsilon > 0 and self.inner_steps > 0

    def _hyperparameters(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
                "norm": self.norm}

    def _perturb(self, params: list[Tensor], theta: list[Tensor], closure: Closure) -> None:
        if self.inner_steps == 1:  # Δ = Π(ζ∇J(θ)) = min(ζ, ε/‖∇J(θ)‖)·∇J(θ): scale .grad in place, no Δ buffer
            grads = grads_of(params)
            torch._foreach_mul_(grads, self._scales(grads, self.inner_lr))
            torch._foreach_add_(params, grads)  # θ+Δ
            return
        delta = scratch(self._delta, params)
        torch._foreach_zero_(delta)  # Δ ← 0
        for n in range(self.inner_steps):
            if n > 0:
                closure()  # ∇J(θ+Δ); the first ascent step reuses the clean gradient ∇J(θ)
            torch._foreach_add_(delta, grads_of(params), alpha=self.inner_lr)  # Δ ← Δ + ζ∇J(θ+Δ)
            torch._foreach_mul_(delta, self._scales(delta, 1.0))  # Π_ε: Δ ← εΔ/‖Δ‖ where ‖Δ‖ > ε
            set_to_sum(params, theta, delta)  # θ+Δ

    def _scales(self, tensors: list[Tensor], cap: float) -> Tensor | list[Tensor]:
        """min(cap, ε/‖t‖) for the whole list (global ball) or per tensor; ε/0 = inf gives cap."""
        if self.norm == "global":
            return (self.epsilon / global_norm(tensors)).clamp(max=cap)
        return list((self.epsilon / torch.stack(torch._foreach_norm(tensors))).clamp(max=cap).unbind())
