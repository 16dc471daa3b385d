"""AMP: adversarial model perturbation (Zheng, Zhang & Mao, CVPR 2021, Eq. 4-5 and Algorithm 1).

Minimize the worst batch loss in the L2 ball ‖Δ‖ ≤ ε around θ: N projected ascent steps Δ ← Π_ε(Δ + ζ∇J(θ+Δ)), then the outer step at θ with ∇J(θ+Δ).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from advreg.perturb.engine import (Closure, PerturbedOptimizer, check_nonnegative, global_norm, grads_of, is_int,
                                   is_number, scratch, set_to_sum)

NORMS = ("global", "per_tensor")


class AMP(PerturbedOptimizer):
    """Algorithm 1 of the AMP paper as a ``torch.optim`` optimizer wrapping ``base_optimizer``.

    ``norm="global"`` projects the whole Δ on the ball, as the paper defines it; ``norm="per_tensor"``
    projects each tensor on its own, as the authors' released code does (its ε means that).
    The closure is called N+1 times per step; ``step`` returns the loss at θ.

    ``every=k`` (beyond the paper, an efficient mode): steps 0, k, 2k, … are Algorithm 1's and keep their Δ; the
    k-1 steps in between make one pass at θ+Δ_kept (the kept Δ added to the current θ, restored to that θ),
    call the closure once and return the loss at θ+Δ_kept. ``every=1`` is Algorithm 1, bit for bit. A parameter
    without a gradient at the last fresh Δ has Δ = 0. The kept Δ is in ``state_dict`` (exact resume mid-cycle).
    """

    def __init__(self, params: Iterable, base_optimizer: type, *, epsilon: float, inner_lr: float,
                 inner_steps: int = 1, norm: str = "global", every: int = 1, bn_stats: str = "clean",
                 **base_kwargs: Any):
        self.epsilon, self.inner_lr, self.inner_steps, self.norm = epsilon, inner_lr, inner_steps, norm
        self.every = every
        self.steps_taken = 0  # completed calls of step(); saved in the state_dict (the refresh schedule)
        self._validate()
        super().__init__(params, base_optimizer, bn_stats=bn_stats, **base_kwargs)
        self._delta: dict[Tensor, Tensor] = {}  # scratch: Δ during a step
        self._kept: dict[Tensor, Tensor] = {}  # every > 1: the last fresh Δ, one tensor per parameter (state)
        self._has_kept = False

    def _validate(self) -> None:
        check_nonnegative("epsilon", self.epsilon, "it is the radius of the L2 ball (0 turns AMP off)")
        if not is_int(self.inner_steps) or self.inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0 (the paper uses N = 1), got {self.inner_steps!r}")
        if self.inner_steps > 0 and not (is_number(self.inner_lr) and self.inner_lr > 0):
            raise ValueError(f"inner_lr (ζ) must be > 0 when inner_steps > 0, got {self.inner_lr!r}; "
                             "the paper uses ζ = 1 with ε = 0.5 for PreActResNet18")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not is_int(self.every) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1, got {self.every!r}: a fresh Δ every k steps and the "
                             "last one reused in between (1 is the paper's AMP, a fresh Δ every step)")
        if not is_int(self.steps_taken) or self.steps_taken < 0:
            raise ValueError(f"steps_taken must be an integer >= 0, got {self.steps_taken!r}; "
                             "load a state_dict saved by AMP")

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One training step; a failed step is not counted, and a failed fresh-Δ step leaves no kept Δ."""
        fresh = self._fresh()
        try:
            loss = super().step(closure)
        except BaseException:
            self._has_kept = self._has_kept and not fresh  # its Δ is half-built: the next step builds one afresh
            raise
        self.steps_taken += 1
        return loss

    def _is_active(self) -> bool:
        return self.epsilon > 0 and self.inner_steps > 0

    def _hyperparameters(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
                "norm": self.norm, "every": self.every, "steps_taken": self.steps_taken}

    def _needs_clean_pass(self) -> bool:
        return self._fresh()

    def _fresh(self) -> bool:
        """Whether this step builds a fresh Δ (Algorithm 1) rather than reusing the kept one."""
        return self.every == 1 or self.steps_taken % self.every == 0 or not self._has_kept

    def _perturb(self, params: list[Tensor], theta: list[Tensor], closure: Closure) -> None:
        if not self._fresh():  # params: every trainable tensor, at the current θ
            pairs = [(p, self._kept[p]) for p in params if p in self._kept]
            if pairs:
                torch._foreach_add_([p for p, _ in pairs], [d for _, d in pairs])  # θ + Δ_kept
            return
        if self.inner_steps == 1:  # Δ = Π(ζ∇J(θ)) = min(ζ, ε/‖∇J(θ)‖)·∇J(θ): scale .grad in place, no Δ buffer
            grads = grads_of(params)
            torch._foreach_mul_(grads, self._scales(grads, self.inner_lr))
            self._keep(params, grads)
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
        self._keep(params, delta)

    def _scales(self, tensors: list[Tensor], cap: float) -> Tensor | list[Tensor]:
        """min(cap, ε/‖t‖) for the whole list (global ball) or per tensor; ε/0 = inf gives cap."""
        if self.norm == "global":
            return (self.epsilon / global_norm(tensors)).clamp(max=cap)
        return list((self.epsilon / torch.stack(torch._foreach_norm(tensors))).clamp(max=cap).unbind())

    # -- the kept Δ (every > 1) -------------------------------------------------------------------
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _keep(self, params: list[Tensor], delta: list[Tensor]) -> None:
        """Δ_kept ← Δ for ``params`` (those with a gradient), 0 for the other parameters."""
        if self.every == 1:
            return
        everything = self._all_params()
        kept = scratch(self._kept, everything)
        torch._foreach_zero_(kept)
        torch._foreach_copy_([self._kept[p] for p in params], delta)
        self._has_kept = True
        if self.grad_scaler is not None:  # an overflowed pass (the step is skipped): the next step builds Δ afresh
            overflowed = self._agree((~torch.isfinite(global_norm(kept))).to(torch.int32))  # on every replica alike
            self._has_kept = not bool(overflowed)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.every > 1 and self._has_kept:  # in parameter order, like the base state
            state["perturbation"]["delta"] = [self._kept[p].detach().clone() for p in self._all_params()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = dict(state_dict.get("perturbation", {}))
        delta = saved.pop("delta", None)
        state_dict["perturbation"] = saved
        everything = self._all_params()
        if delta is not None and (not isinstance(delta, (list, tuple)) or len(delta) != len(everything) or any(
                not isinstance(d, Tensor) or d.shape != p.shape for d, p in zip(delta, everything))):
            raise ValueError("the state_dict's kept Δ does not match this optimizer's parameters; load it into an "
                             "AMP over the same parameters, in the same order")
        super().load_state_dict(state_dict)
        self._has_kept = delta is not None and self.every > 1
        if self._has_kept:
            for buffer, saved_delta in zip(scratch(self._kept, everything), delta):
                buffer.copy_(saved_delta)  # to the parameter's device and dtype
