"""RMP: random model perturbation, the AMP paper's baseline (Zheng et al., CVPR 2021, Sec. 5, radius 0.1).

Δ is drawn uniformly from the L2 ball of radius ε over all weights (direction uniform on the sphere, norm ε·U^(1/d));
one pass at θ+Δ, the step applied at θ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from advreg.perturb.engine import GroupSetting, PerturbedOptimizer, check_nonnegative, global_norm
from advreg.registry import Member, register


class RMP(PerturbedOptimizer):
    """Gradient at a uniformly random point of the ε-ball around θ; ``step`` returns the loss there.

    Uses the global torch RNG (seed it for reproducibility); unlike the authors' code, whose per-tensor
    uniform noise does not have the stated radius, ‖Δ‖ ≤ ε holds and Δ is uniform in the ball.
    ``epsilon`` is a param-group setting: the groups that share ε share one ball, each drawn on its own.
    """

    uses_clean_gradient = False
    group_keys = ("epsilon",)
    epsilon = GroupSetting()

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        *,
        epsilon: float = 0.1,
        bn_stats: str = "clean",
        **base_kwargs: Any,
    ):
        super().__init__(params, base_optimizer, bn_stats=bn_stats, group_defaults={"epsilon": epsilon}, **base_kwargs)

    @staticmethod
    def check_settings(epsilon: float) -> None:
        """Raise ValueError on settings the constructor refuses, without parameters (a run's config is checked so)."""
        check_nonnegative("epsilon", epsilon, "it is the radius of the ball (the AMP paper uses 0.1)")

    def _validate_group(self, group: dict[str, Any]) -> None:
        self.check_settings(group["epsilon"])

    def _is_active(self) -> bool:
        return any(group["epsilon"] > 0 for group in self.param_groups)

    def _perturb(self, params: list[Tensor], theta: list[Tensor]) -> None:
        for (epsilon,), where in self._balls(params, self.group_keys):
            if epsilon > 0:
                part = [params[i] for i in where]
                torch._foreach_add_(part, sample_ball(part, epsilon))  # θ+Δ


def sample_ball(like: list[Tensor], radius: float) -> list[Tensor]:
    """A point uniform in the L2 ball of ``radius`` in the space of all tensors ``like`` (d = total size)."""
    direction = [torch.randn_like(t) for t in like]  # isotropic: uniform direction once normalized
    d = sum(t.numel() for t in like)
    u = torch.rand((), device=like[0].device, dtype=like[0].dtype)
    scale = radius * u.pow(1.0 / d) / global_norm(direction)  # ‖Δ‖ = ε·U^(1/d)
    torch._foreach_mul_(direction, scale)
    return direction


@dataclass(frozen=True)
class RMPConfig:
    """The ``rmp`` perturbation: AMP's random baseline, Δ uniform in an L2 ball."""

    epsilon: float = 0.1  # radius of the L2 ball Δ is drawn from


register(
    Member(
        "perturbation",
        "rmp",
        lambda c, params, steps_per_epoch, sgd, engine: RMP(
            params, torch.optim.SGD, epsilon=c.epsilon, **sgd, **engine
        ),
        RMPConfig,
        check=lambda c: RMP.check_settings(c.epsilon),
    )
)
