"""SAM: sharpness-aware minimization (Foret et al., ICLR 2021, Eq. 2), and ASAM (Kwon et al., ICML 2021, Eq. 9).

One normalized ascent step Δ = ρ·T²g/‖Tg‖ (T = I for SAM, T = |θ| + η for ASAM), then the outer step at θ with ∇J(θ+Δ).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from advreg.perturb.engine import GroupSetting, PerturbedOptimizer, check_nonnegative, global_norm, grads_of
from advreg.registry import Member, register

SCOPES = ("all", "weight")


class SAM(PerturbedOptimizer):
    """SAM (``adaptive=False``) or ASAM (``adaptive=True``, η = ``eta``) wrapping ``base_optimizer``.

    AMP with N = 1 and ζ‖g‖ > ε is SAM with ρ = ε. The closure is called twice per step.

    ASAM's T, three conventions: ``adaptive_scope="all"`` (the default) takes T = |θ| + η on every tensor;
    davda54/sam's ASAM is that with ``eta=0`` (T = |θ|); SamsungLabs/ASAM's is ``adaptive_scope="weight"``:
    T = |θ| + η on the tensors whose name contains "weight" and T = I on the others (biases), for which ``params``
    must be named (``model.named_parameters()``). The norm ‖Tg‖ is over all tensors in every case.

    Per group: ``rho`` and ``eta`` are param-group settings; the groups that share ρ share one normalized ball
    (all of them, the paper's step, when no group sets its own), and η is each tensor's group's.
    """

    group_keys = ("rho", "eta")
    rho, eta = GroupSetting(), GroupSetting()

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        *,
        rho: float,
        adaptive: bool = False,
        eta: float = 0.01,
        adaptive_scope: str = "all",
        bn_stats: str = "clean",
        **base_kwargs: Any,
    ):
        self.adaptive, self.adaptive_scope = adaptive, adaptive_scope
        self._validate()
        super().__init__(
            params, base_optimizer, bn_stats=bn_stats, group_defaults={"rho": rho, "eta": eta}, **base_kwargs
        )

    @staticmethod
    def check_settings(*, rho: float, adaptive: bool, eta: float, adaptive_scope: str = "all") -> None:
        """Raise ValueError on settings the constructor refuses, without parameters (a run's config is checked so)."""
        SAM.check_ball(rho, eta)
        SAM.check_adaptive(adaptive, adaptive_scope)

    @staticmethod
    def check_ball(rho: float, eta: float) -> None:
        """The per-group settings: ρ and ASAM's η."""
        check_nonnegative("rho", rho, "it is the radius of the ascent step (0 turns SAM off)")
        check_nonnegative("eta", eta, "ASAM adds it to |θ| so that zero weights are perturbed too")

    @staticmethod
    def check_adaptive(adaptive: bool, adaptive_scope: str) -> None:
        """The common settings: SAM or ASAM, and ASAM's scope."""
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True (ASAM) or False (SAM), got {adaptive!r}")
        if adaptive_scope not in SCOPES:
            raise ValueError(
                f"adaptive_scope must be one of {SCOPES}, got {adaptive_scope!r}: 'all' scales "
                "every tensor by |θ| + η, 'weight' only those named weight (SamsungLabs' ASAM)"
            )

    def _validate(self) -> None:
        self.check_adaptive(self.adaptive, self.adaptive_scope)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self.check_ball(group["rho"], group["eta"])
        if self.adaptive and self.adaptive_scope == "weight" and "param_names" not in group:
            raise ValueError(
                "adaptive_scope='weight' scales the tensors named weight: pass the parameters with "
                "their names, SAM(model.named_parameters(), ...)"
            )

    def _is_active(self) -> bool:
        return any(group["rho"] > 0 for group in self.param_groups)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"adaptive": self.adaptive, "adaptive_scope": self.adaptive_scope}

    def _perturb(self, params: list[Tensor], theta: list[Tensor]) -> None:
        direction = grads_of(params)  # g = ∇J(θ)
        scaled, scale = self._transform(params, theta) if self.adaptive else ([], [])
        if scaled:
            tg = torch._foreach_mul([direction[i] for i in scaled], scale)  # Tg
            for i, t in zip(scaled, tg):
                direction[i] = t
        steps = []
        for (rho,), where in self._balls(params, ("rho",)):
            norm = global_norm([direction[i] for i in where])
            steps.append((where, torch.where(norm > 0, rho / norm, torch.zeros_like(norm))))  # ρ/‖Tg‖, 0 if g = 0
        if scaled:
            torch._foreach_mul_([direction[i] for i in scaled], scale)  # T²g
        for where, step in steps:
            torch._foreach_mul_([direction[i] for i in where], step)
        torch._foreach_add_(params, direction)  # θ+Δ

    def _transform(self, params: list[Tensor], theta: list[Tensor]) -> tuple[list[int], list[Tensor]]:
        """ASAM's T = |θ| + η (η of the tensor's group): the positions it scales, and T there (I elsewhere)."""
        settings = self._settings(params, ("eta",))
        if self.adaptive_scope == "all":
            scaled = list(range(len(params)))
        else:
            name = {p: n for group in self.param_groups for p, n in zip(group["params"], group["param_names"])}
            scaled = [i for i, p in enumerate(params) if "weight" in name[p]]
        if not scaled:
            return [], []
        scale = torch._foreach_add(torch._foreach_abs([theta[i] for i in scaled]), [settings[i][0] for i in scaled])
        return scaled, scale


@dataclass(frozen=True)
class SAMConfig:
    """The ``sam`` perturbation (Foret et al.): radius ρ, and ASAM's adaptive ball (Kwon et al.) with its η."""

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01  # ASAM's T = |θ| + η on every tensor (0: davda54/sam's T = |θ|)


register(
    Member(
        "perturbation",
        "sam",
        lambda c, params, steps_per_epoch, sgd, engine: SAM(
            params, torch.optim.SGD, **dataclasses.asdict(c), **sgd, **engine
        ),
        SAMConfig,  # the section's keys are SAM's
        check=lambda c: SAM.check_settings(**dataclasses.asdict(c)),
    )
)
