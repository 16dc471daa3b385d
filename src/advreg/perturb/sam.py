"""SAM: sharpness-aware minimization (Foret et al., ICLR 2021, Eq. 2), and ASAM (Kwon et al., ICML 2021, Eq. 9).

One normalized ascent step Δ = ρ·T²g/‖Tg‖ (T = I for SAM, T = |θ| + η for ASAM), then the outer step at θ with ∇J(θ+Δ).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from advreg.perturb.engine import Closure, PerturbedOptimizer, check_nonnegative, global_norm, grads_of


class SAM(PerturbedOptimizer):
    """SAM (``adaptive=False``) or ASAM (``adaptive=True``, η = ``eta``) wrapping ``base_optimizer``.

    AMP with N = 1 and ζ‖g‖ > ε is SAM with ρ = ε. The closure is called twice per step.
    """

    def __init__(self, params: Iterable, base_optimizer: type, *, rho: float, adaptive: bool = False,
                 eta: float = 0.01, bn_stats: str = "clean", **base_kwargs: Any):
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self._validate()
        super().__init__(params, base_optimizer, bn_stats=bn_stats, **base_kwargs)

    def _validate(self) -> None:
        check_nonnegative("rho", self.rho, "it is the radius of the ascent step (0 turns SAM off)")
        check_nonnegative("eta", self.eta, "ASAM adds it to |θ| so that zero weights are perturbed too")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be True (ASAM) or False (SAM), got {self.adaptive!r}")

    def _is_active(self) -> bool:
        return self.rho > 0

    def _hyperparameters(self) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive, "eta": self.eta}

    def _perturb(self, params: list[Tensor], theta: list[Tensor], closure: Closure) -> None:
        direction = grads_of(params)  # g = ∇J(θ)
        if self.adaptive:
            scale = torch._foreach_add(torch._foreach_abs(theta), self.eta)  # T = |θ| + η
            direction = torch._foreach_mul(direction, scale)  # Tg
        norm = global_norm(direction)
        step = torch.where(norm > 0, self.rho / norm, torch.zeros_like(norm))  # ρ/‖Tg‖, Δ = 0 if g = 0
        if self.adaptive:
            torch._foreach_mul_(direction, scale)  # T²g
        torch._foreach_mul_(direction, step)
        torch._foreach_add_(params, direction)  # θ+Δ
