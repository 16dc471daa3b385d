"""AWP: adversarial weight perturbation (Wu, Xia & Wang, NeurIPS 2020, Eq. 8, 10, 11, 15, Algorithm 2), and RWP (Sec.
5.3).

Per layer ‖v_l‖ ≤ γ‖w_l‖: K2 normalized ascent steps v_l ← Π_γ(v_l + η2‖w_l‖g_l/‖g_l‖), η2 = γ/K2, then the outer
step at w with ∇ρ(w+v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from advreg.perturb.engine import (
    GroupSetting,
    PerturbedOptimizer,
    check_nonnegative,
    grads_of,
    is_int,
    is_number,
    scratch,
    set_to_sum,
)
from advreg.registry import Member, register


class AWP(PerturbedOptimizer):
    """Algorithm 2 of the AWP paper (lines 11-15, A = 1) as a ``torch.optim`` optimizer wrapping ``base_optimizer``.

    How it differs from :class:`~advreg.perturb.AMP`: AMP bounds one global L2 ball ‖Δ‖ ≤ ε over all
    parameters and is meant for the clean loss. AWP bounds each layer on its own relative to that layer's
    weight norm, ‖v_l‖ ≤ γ‖w_l‖ (scale invariant: rescaling a layer rescales its ball), perturbs only the
    weights with dim > 1 (biases and normalization weights keep v = 0), takes steps normalized per layer,
    and is meant for the adversarial loss: the closure computes the AT/TRADES/MART loss on the examples
    the batch transform crafted. ``step_size`` is η2 (relative: a step moves v_l by η2‖w_l‖), by default
    γ/``steps`` (Appendix D). The first ``warmup_steps`` steps are the base optimizer's; after that the
    closure is called ``steps``+1 times per step and ``step`` returns the loss at w.

    Per group: ``gamma`` and ``step_size`` are param-group settings (each layer's ball is its own anyway);
    ``steps`` (K2) is common to all groups.
    """

    group_keys = ("gamma", "step_size")
    gamma, step_size = GroupSetting(), GroupSetting()

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        *,
        gamma: float = 0.01,
        steps: int = 1,
        step_size: float | None = None,
        warmup_steps: int = 0,
        bn_stats: str = "clean",
        **base_kwargs: Any,
    ):
        self.steps, self.warmup_steps = steps, warmup_steps
        self.steps_taken = 0  # completed steps, warm-up included; saved in the state_dict
        self._validate()
        super().__init__(
            params,
            base_optimizer,
            bn_stats=bn_stats,
            **base_kwargs,
            group_defaults={"gamma": gamma, "step_size": step_size},
        )
        self._delta: dict[Tensor, Tensor] = {}  # scratch: v during a step

    @staticmethod
    def check_ball(gamma: float, step_size: float | None) -> None:
        """The per-group settings: γ and the ascent's step η2."""
        check_nonnegative(
            "gamma", gamma, "it is the relative radius ‖v_l‖ ≤ γ‖w_l‖ (the paper uses 5e-3 to 1e-2; 0 turns AWP off)"
        )
        if step_size is not None and not (is_number(step_size) and step_size > 0):
            raise ValueError(
                f"step_size (η2) must be None (γ/steps, as in the paper) or a number > 0, got {step_size!r}"
            )

    @staticmethod
    def check_schedule(steps: int, warmup_steps: int) -> None:
        """The common settings: the ascent steps K2 and the warm-up."""
        if not is_int(steps) or steps < 1:
            raise ValueError(f"steps (K2) must be an integer >= 1 (the paper uses K2 = 1), got {steps!r}")
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(
                f"warmup_steps must be an integer >= 0 (0 perturbs from the first step), got {warmup_steps!r}"
            )

    def _validate_group(self, group: dict[str, Any]) -> None:
        self.check_ball(group["gamma"], group["step_size"])

    def _validate(self) -> None:
        self.check_schedule(self.steps, self.warmup_steps)
        if not is_int(self.steps_taken) or self.steps_taken < 0:
            raise ValueError(
                f"steps_taken must be an integer >= 0, got {self.steps_taken!r}; load a state_dict saved by AWP"
            )

    def _end_step(self) -> None:  # a failed step is not counted
        self.steps_taken += 1

    def _is_active(self) -> bool:
        return any(group["gamma"] > 0 for group in self.param_groups) and self.steps_taken >= self.warmup_steps

    def _hyperparameters(self) -> dict[str, Any]:
        return {"steps": self.steps, "warmup_steps": self.warmup_steps, "steps_taken": self.steps_taken}

    def _perturb(self, params: list[Tensor], theta: list[Tensor]) -> Iterator[None]:
        layers, layers_theta, weight_norms = weight_layers(params, theta)
        if not layers:
            return  # nothing with dim > 1: v = 0
        settings = self._settings(layers, self.group_keys)  # (γ, η2) of each layer's group
        step_lengths = [
            n * (size if size is not None else gamma / self.steps)  # η2‖w_l‖
            for n, (gamma, size) in zip(weight_norms, settings)
        ]
        radii = [n * gamma for n, (gamma, _) in zip(weight_norms, settings)]  # γ‖w_l‖
        delta = scratch(self._delta, layers)
        torch._foreach_zero_(delta)  # v ← 0
        for k in range(self.steps):
            if k > 0:
                yield  # ∇ρ(w+v); the first step reuses the gradient at w already in .grad
            torch._foreach_add_(delta, rescaled(grads_of(layers), step_lengths))  # v_l + η2‖w_l‖g_l/‖g_l‖
            _project(delta, radii)
            set_to_sum(layers, layers_theta, delta)  # w+v; the tensors with dim ≤ 1 stay at w


class RWP(PerturbedOptimizer):
    """Random weight perturbation, the AWP paper's baseline (Sec. 5.3): AWP's layer-relative size, random direction.

    v_l = γ‖w_l‖·d_l/‖d_l‖ with d_l ~ N(0, I), for each weight with dim > 1 (v = 0 for the others), drawn
    anew every step from the global torch RNG (seed it for reproducibility). One pass at w+v, the step
    applied at w; ``step`` returns the loss at w+v.
    """

    uses_clean_gradient = False
    group_keys = ("gamma",)
    gamma = GroupSetting()

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        *,
        gamma: float = 0.01,
        bn_stats: str = "clean",
        **base_kwargs: Any,
    ):
        super().__init__(params, base_optimizer, bn_stats=bn_stats, group_defaults={"gamma": gamma}, **base_kwargs)

    @staticmethod
    def check_settings(gamma: float) -> None:
        """Raise ValueError on settings the constructor refuses, without parameters (a run's config is checked so)."""
        check_nonnegative("gamma", gamma, "it is the relative size ‖v_l‖ = γ‖w_l‖ (0 turns RWP off)")

    def _validate_group(self, group: dict[str, Any]) -> None:
        self.check_settings(group["gamma"])

    def _is_active(self) -> bool:
        return any(group["gamma"] > 0 for group in self.param_groups)

    def _perturb(self, params: list[Tensor], theta: list[Tensor]) -> None:
        layers, _, weight_norms = weight_layers(params, theta)
        if not layers:
            return
        direction = [torch.randn_like(p) for p in layers]  # isotropic per layer
        sizes = [n * gamma for n, (gamma,) in zip(weight_norms, self._settings(layers, self.group_keys))]
        torch._foreach_add_(layers, rescaled(direction, sizes))  # w+v (γ‖w_l‖ each)


# -- the layers of the AWP paper, shared by AWP and RWP ------------------------------------------
def weight_layers(params: list[Tensor], theta: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The paper's "layers": the tensors with dim > 1 (Linear/Conv weights), their θ and ‖w_l‖ (0-d each).

    Biases and normalization weights (dim ≤ 1) are left out, so their v is 0. ‖w_l‖ is taken at θ, the
    unperturbed weights, so the ball does not move during the ascent.
    """
    keep = [i for i, p in enumerate(params) if p.dim() > 1]
    layers, layers_theta = [params[i] for i in keep], [theta[i] for i in keep]
    norms = list(torch._foreach_norm(layers_theta)) if keep else []  # (_foreach ops reject empty lists)
    return layers, layers_theta, norms


def rescaled(tensors: list[Tensor], lengths: list[Tensor]) -> list[Tensor]:
    """t_l·length_l/‖t_l‖ (new tensors), 0 where t_l = 0: a zero gradient gives no move, not NaN."""
    norms = torch._foreach_norm(tensors)
    scales = [torch.where(n > 0, r / n, torch.zeros_like(n)) for r, n in zip(lengths, norms)]
    return torch._foreach_mul(tensors, scales)


def _project(delta: list[Tensor], radii: list[Tensor]) -> None:
    """Eq. 15, per layer: v_l ← γ‖w_l‖·v_l/‖v_l‖ where ‖v_l‖ > γ‖w_l‖ (that branch has ‖v_l‖ > 0)."""
    norms = torch._foreach_norm(delta)
    scales = [torch.where(n > r, r / n, torch.ones_like(n)) for r, n in zip(radii, norms)]
    torch._foreach_mul_(delta, scales)


def _check_awp(c: AWPConfig) -> None:
    if not (isinstance(c.warmup, int) and c.warmup >= 0):
        raise ValueError(f"warmup is a number of epochs >= 0, got {c.warmup!r}")
    AWP.check_ball(c.gamma, step_size=None)  # the section has no step size: γ/K2, the paper's
    AWP.check_schedule(c.steps, warmup_steps=0)  # the warm-up is checked above, in epochs


def _build_awp(c: AWPConfig, params: Iterable, steps_per_epoch: int, sgd: dict, engine: dict) -> AWP:
    _check_awp(c)
    return AWP(
        params, torch.optim.SGD, gamma=c.gamma, steps=c.steps, warmup_steps=c.warmup * steps_per_epoch, **sgd, **engine
    )


@dataclass(frozen=True)
class AWPConfig:
    """The ``awp`` perturbation (Wu, Xia & Wang, Algorithm 2): the per-layer radius γ, ascent steps, warm-up."""

    gamma: float = 0.01  # ‖v_l‖ ≤ γ‖w_l‖ per layer (AWP paper: 0.01 for AT, 0.005 for TRADES and MART)
    steps: int = 1  # K2 ascent steps of size γ/K2 (Appendix D)
    warmup: int = 0  # epochs of plain adversarial training before AWP starts


@dataclass(frozen=True)
class RWPConfig:
    """The ``rwp`` perturbation: AWP's random baseline, a random direction at the per-layer radius γ."""

    gamma: float = 0.01  # ‖v_l‖ = γ‖w_l‖, random direction (AWP paper, Sec. 5.3)


register(Member("perturbation", "awp", _build_awp, AWPConfig, check=_check_awp))
register(
    Member(
        "perturbation",
        "rwp",
        lambda c, params, steps_per_epoch, sgd, engine: RWP(params, torch.optim.SGD, gamma=c.gamma, **sgd, **engine),
        RWPConfig,
        check=lambda c: RWP.check_settings(c.gamma),
    )
)
