"""RMP: random model perturbation, the AMP paper's baseline (Zheng et al., CVPR 2021, Sec. 5, radius 0.1).

Δ is drawn uniformly from the L2 ball of radius ε over all weights (direction uniform on the sphere, norm ε·U^(1/d)); one pass at θ+Δ, the step applied at θ.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from advreg.perturb.engine import Closure, PerturbedOptimizer, check_nonnegative, global_norm


class RMP(PerturbedOptimizer):
    """Gradient at a uniformly random point of the ε-ball around θ; ``step`` returns the loss there.

    Uses the global torch RNG (seed it for reproducibility); unlike the authors' code, whose per-tensor
    uniform noise does not have the stated radius, ‖Δ‖ ≤ ε holds and Δ is uniform in the ball.
    """

    uses_clean_gradient = False

    def __init__(self, params: Iterable, base_optimizer: type, *, epsilon: float = 0.1, bn_stats: str = "clean",
                 **base_kwargs: Any):
        self.epsilon = epsilon
        self._validate()
        super().__init__(params, base_optimizer, bn_stats=bn_stats, **base_kwargs)

    def _validate(self) -> None:
        check_nonnegative("epsilon", self.epsilon, "it is the radius of the ball (the AMP paper uses 0.1)")

    def _is_active(self) -> bool:
        return self.epsilon > 0

    def _hyperparameters(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def _perturb(self, params: list[Tensor], theta: list[Tensor], closure: Closure) -> None:
        delta = sample_ball(params, self.epsilon)
        torch._foreach_add_(params, delta)  # θ+Δ


def sample_ball(like: list[Tensor], radius: float) -> list[Tensor]:
    """A point uniform in the L2 ball of ``radius`` in the space of all tensors ``like`` (d = total size)."""
    direction = [torch.randn_like(t) for t in like]  # isotropic: uniform direction once normalized
    d = sum(t.numel() for t in like)
    u = torch.rand((), device=like[0].device, dtype=like[0].dtype)
    scale = radius * u.pow(1.0 / d) / global_norm(direction)  # ‖Δ‖ = ε·U^(1/d)
    torch._foreach_mul_(direction, scale)
    return direction
