"""AMP: adversarial model perturbation (Zheng, Zhang & Mao, CVPR 2021, Eq. 4-5 and Algorithm 1).

Minimize the worst batch loss in the L2 ball ‖Δ‖ ≤ ε around θ: N projected ascent steps Δ ← Π_ε(Δ + ζ∇J(θ+Δ)), then
the outer step at θ with ∇J(θ+Δ).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from advreg.perturb.engine import (
    Closure,
    GroupSetting,
    PerturbedOptimizer,
    StepPlan,
    check_nonnegative,
    global_norm,
    grads_of,
    is_int,
    is_number,
    scratch,
    set_to_sum,
    stack_scalars,
    tensor_norms,
)
from advreg.registry import Member, register

NORMS = ("global", "per_tensor")
REUSE = ("delta", "gradient")  # what the steps between two fresh Δ reuse (every > 1)


class AMP(PerturbedOptimizer):
    """Algorithm 1 of the AMP paper as a ``torch.optim`` optimizer wrapping ``base_optimizer``.

    ``norm="global"`` projects the whole Δ on the ball, as the paper defines it; ``norm="per_tensor"``
    projects each tensor on its own, as the authors' released code does (its ε means that).
    The closure is called N+1 times per step; ``step`` returns the loss at θ.

    ``every=k`` (beyond the paper, an efficient mode): steps 0, k, 2k, … are Algorithm 1's; the k-1 steps in
    between call the closure once and reuse what the last of them found, as ``reuse`` says:

    - ``"delta"``: the pass is at θ+Δ_kept (the kept Δ added to the current θ, restored to that θ); the step
      returns the loss at θ+Δ_kept. A parameter without a gradient at the last fresh Δ has Δ = 0.
    - ``"gradient"``: LookSAM's gradient reuse (Liu et al., CVPR 2022), with AMP's Δ in place of SAM's. A fresh
      step keeps v̂, the unit vector along the part of its gradient ∇J(θ+Δ) orthogonal to its clean gradient
      ∇J(θ); a step in between makes one pass at θ, adds α‖g‖·v̂ to its gradient g and returns the loss at θ.
      Norms and the decomposition are over the whole model or per tensor, as ``norm`` says. Tune α: LookSAM's
      0.7 is the default, and on MNIST-1D it hurt from k = 4 on (the docs' study of amp.every).

    ``every=1`` is Algorithm 1, bit for bit. The kept tensor (Δ or v̂) is in ``state_dict`` (exact resume
    mid-cycle).

    Per group: ``epsilon``, ``inner_lr`` and ``inner_steps`` are param-group settings (a group may set its own, a
    scheduler may change them). With ``norm="global"`` the groups that agree on all three share one ball
    ‖Δ_B‖ ≤ ε_B, Δ_B being the part of Δ over ball B's tensors, projected on its own: one group, or groups that set
    none of them, is the paper's single ball. A ball takes its own N_B ascent steps, the passes of a step being
    max N_B (a ball with fewer steps keeps its Δ through the extra passes); a group with ε = 0 or N = 0 is not
    perturbed, and its gradient is still taken at θ+Δ. With ``norm="per_tensor"`` each tensor's ball has its
    group's ε. The gradient reuse of ``every > 1`` normalizes over the whole model (or per tensor).
    """

    group_keys = ("epsilon", "inner_lr", "inner_steps")
    epsilon, inner_lr, inner_steps = GroupSetting(), GroupSetting(), GroupSetting()

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        *,
        epsilon: float,
        inner_lr: float,
        inner_steps: int = 1,
        norm: str = "global",
        every: int = 1,
        reuse: str = "delta",
        alpha: float = 0.7,
        bn_stats: str = "clean",
        **base_kwargs: Any,
    ):
        self.norm, self.every, self.reuse, self.alpha = norm, every, reuse, alpha
        self.steps_taken = 0  # completed steps; saved in the state_dict (the refresh schedule)
        self._validate()
        super().__init__(
            params,
            base_optimizer,
            bn_stats=bn_stats,
            **base_kwargs,
            group_defaults={"epsilon": epsilon, "inner_lr": inner_lr, "inner_steps": inner_steps},
        )
        self._delta: dict[Tensor, Tensor] = {}  # scratch: Δ during a step
        self._kept: dict[Tensor, Tensor] = {}  # every > 1: Δ or v̂ of the last fresh step, one per parameter (state)
        self._has_kept = False

    @staticmethod
    def check_settings(
        *, epsilon: float, inner_lr: float, inner_steps: int, norm: str, every: int, reuse: str, alpha: float
    ) -> None:
        """Raise ValueError on settings the constructor refuses, without parameters (a run's config is checked so)."""
        AMP.check_ball(epsilon, inner_lr, inner_steps)
        AMP.check_schedule(norm, every, reuse, alpha)

    @staticmethod
    def check_ball(epsilon: float, inner_lr: float, inner_steps: int) -> None:
        """The per-group settings: ε, ζ and N."""
        check_nonnegative("epsilon", epsilon, "it is the radius of the L2 ball (0 turns AMP off)")
        if not is_int(inner_steps) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0 (the paper uses N = 1), got {inner_steps!r}")
        if inner_steps > 0 and not (is_number(inner_lr) and inner_lr > 0):
            raise ValueError(
                f"inner_lr (ζ) must be > 0 when inner_steps > 0, got {inner_lr!r}; "
                "the paper uses ζ = 1 with ε = 0.5 for PreActResNet18"
            )

    @staticmethod
    def check_schedule(norm: str, every: int, reuse: str, alpha: float) -> None:
        """The common settings: the ball's norm and the efficient mode's period, reuse and α."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not is_int(every) or every < 1:
            raise ValueError(
                f"every must be an integer >= 1, got {every!r}: a fresh Δ every k steps and the "
                "last one reused in between (1 is the paper's AMP, a fresh Δ every step)"
            )
        if reuse not in REUSE:
            raise ValueError(
                f"reuse must be one of {REUSE}, got {reuse!r}: between two fresh Δ, 'delta' takes "
                "the pass at θ + the last Δ, 'gradient' the pass at θ plus LookSAM's reused gradient"
            )
        check_nonnegative(
            "alpha", alpha, "it weighs the reused orthogonal gradient of reuse='gradient' (LookSAM uses 0.7)"
        )
        if math.isinf(alpha):
            raise ValueError("alpha must be finite: it weighs the reused orthogonal gradient (LookSAM uses 0.7)")

    def _validate_group(self, group: dict[str, Any]) -> None:
        self.check_ball(group["epsilon"], group["inner_lr"], group["inner_steps"])

    def _validate(self) -> None:
        self.check_schedule(self.norm, self.every, self.reuse, self.alpha)
        if not is_int(self.steps_taken) or self.steps_taken < 0:
            raise ValueError(
                f"steps_taken must be an integer >= 0, got {self.steps_taken!r}; load a state_dict saved by AMP"
            )

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One training step; a failed step is not counted, and a failed fresh-Δ step leaves nothing kept."""
        fresh = self._fresh()
        try:
            return super().step(closure)
        except BaseException:
            self._has_kept = self._has_kept and not fresh  # its Δ is half-built: the next step builds one afresh
            raise

    def _end_step(self) -> None:
        self.steps_taken += 1

    def _is_active(self) -> bool:
        """Whether AMP is on at all (ε = 0 or N = 0 in every group is the base optimizer)."""
        return any(g["epsilon"] > 0 and g["inner_steps"] > 0 for g in self.param_groups)

    def _plan(self) -> StepPlan:
        """A fresh step is Algorithm 1 (with reuse="gradient" and ``every > 1`` it then keeps v̂); a step in between
        makes one pass: at θ+Δ_kept (reuse="delta", no clean pass), or at θ and adds the reused gradient."""
        refusal = "every > 1 takes one pass on the steps in between: call step(closure)" if self.every > 1 else None
        fresh = self._fresh()
        if not self._is_active():
            return StepPlan(perturb=False, two_call_refusal=refusal)
        if self.reuse == "delta" or self.every == 1:
            return StepPlan(perturb=True, clean=fresh, two_call_refusal=refusal)
        reuse = self._keep_orthogonal_gradient if fresh else self._add_reused_gradient
        return StepPlan(perturb=fresh, before_base_step=reuse, two_call_refusal=refusal)

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "norm": self.norm,
            "every": self.every,
            "reuse": self.reuse,
            "alpha": self.alpha,
            "steps_taken": self.steps_taken,
        }

    def _fresh(self) -> bool:
        """Whether this step builds a fresh Δ (Algorithm 1) rather than reusing the kept one."""
        return self.every == 1 or self.steps_taken % self.every == 0 or not self._has_kept

    def _perturb(self, params: list[Tensor], theta: list[Tensor]) -> Iterator[None]:
        if not self._fresh():  # params: every trainable tensor, at the current θ
            pairs = [(p, self._kept[p]) for p in params if p in self._kept]
            if pairs:
                torch._foreach_add_([p for p, _ in pairs], [d for _, d in pairs])  # θ + Δ_kept
            return
        if self.reuse == "gradient":
            self._keep(params, grads_of(params))  # LookSAM decomposes against the clean gradient ∇J(θ)
        balls = self._balls(params, self.group_keys)  # ((ε, ζ, N), positions in params) each
        if max(steps for (_, _, steps), _ in balls) == 1:  # Δ = Π(ζ∇J(θ)) = min(ζ, ε/‖∇J(θ)‖)·∇J(θ): in .grad
            grads = grads_of(params)
            for (epsilon, inner_lr, steps), where in balls:
                part = [grads[i] for i in where]
                if steps == 1 and epsilon > 0:
                    torch._foreach_mul_(part, self._scales(part, epsilon, inner_lr))
                else:  # ε = 0 or N = 0: this ball is not perturbed
                    torch._foreach_zero_(part)
            if self.reuse == "delta":
                self._keep(params, grads)
            torch._foreach_add_(params, grads)  # θ+Δ
            return
        yield from self._ascend(params, theta, balls)

    def _ascend(
        self, params: list[Tensor], theta: list[Tensor], balls: list[tuple[tuple, list[int]]]
    ) -> Iterator[None]:
        """Algorithm 1's inner loop in each ball; a ``yield`` is a pass at θ+Δ (∇J(θ+Δ) in .grad after it)."""
        delta = scratch(self._delta, params)
        torch._foreach_zero_(delta)  # Δ ← 0
        for n in range(max(steps for (_, _, steps), _ in balls)):
            if n > 0:
                yield  # ∇J(θ+Δ); the first ascent step reuses the clean gradient ∇J(θ)
            grads = grads_of(params)
            for (epsilon, inner_lr, steps), where in balls:
                if n >= steps or epsilon == 0:  # this ball's Δ is final (0 with ε = 0 or N = 0)
                    continue
                part = [delta[i] for i in where]
                torch._foreach_add_(part, [grads[i] for i in where], alpha=inner_lr)  # Δ ← Δ + ζ∇J(θ+Δ)
                torch._foreach_mul_(part, self._scales(part, epsilon, 1.0))  # Π_ε: Δ ← εΔ/‖Δ‖ where ‖Δ‖ > ε
            set_to_sum(params, theta, delta)  # θ+Δ
        if self.reuse == "delta":
            self._keep(params, delta)

    def _scales(self, tensors: list[Tensor], epsilon: float, cap: float) -> Tensor | list[Tensor]:
        """min(cap, ε/‖t‖) for the whole list (global ball) or per tensor; ε/0 = inf gives cap."""
        if self.norm == "global":
            return (epsilon / global_norm(tensors)).clamp(max=cap)
        return list((epsilon / stack_scalars(tensor_norms(tensors))).clamp(max=cap).unbind())

    # -- the kept Δ (every > 1) -------------------------------------------------------------------
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _keep(self, params: list[Tensor], values: list[Tensor]) -> None:
        """kept ← ``values`` (Δ, or ∇J(θ) for reuse="gradient") for ``params`` (those with a gradient), 0 for the
        other parameters. Under a grad scaler, a Δ from an overflowed pass (the step is skipped) is dropped on every
        replica alike, so that the next step starts afresh (reuse="gradient" checks v̂ at the end instead)."""
        if self.every == 1:
            return
        kept = scratch(self._kept, self._all_params())
        torch._foreach_zero_(kept)
        torch._foreach_copy_([self._kept[p] for p in params], values)
        self._has_kept = True
        if self.grad_scaler is not None and self.reuse == "delta":
            self._has_kept = not bool(self._agree((~torch.isfinite(global_norm(kept))).to(torch.int32)))

    def _keep_orthogonal_gradient(self) -> None:
        """At a fresh step with reuse="gradient": the kept clean gradient g = ∇J(θ) becomes v̂ = g_v/‖g_v‖ with
        g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g and g_s = ∇J(θ+Δ), the gradient the base step takes (its scale under a grad
        scaler drops out). Under DDP with local Δ, g is first summed over the replicas: the global batch's clean
        gradient, to which v̂ is orthogonal and which the steps in between correct. Half precision computes in
        float32. A v̂ that is not finite (an overflowed pass) is dropped: the next step builds a fresh Δ."""
        kept = [self._kept[p] for p in self._all_params()]
        if self._replicated() and self.perturb_on == "local":
            self._sum_over_replicas(kept)  # the direction of the replicas' mean
        clean, perturbed = _widened(kept), _widened(grads_of(self._all_params()))  # half precision: a float32 copy
        dots = self._spread(stack_scalars([(a * b).sum() for a, b in zip(perturbed, clean)]))
        squares = self._spread(_squared_norms(clean))
        along = torch.where(squares > 0, dots / squares, 0.0)  # g = 0 (no gradient): nothing to take off
        torch._foreach_mul_(clean, list(along.neg().unbind()))
        torch._foreach_add_(clean, perturbed)  # g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g
        norms = self._spread(_squared_norms(clean)).sqrt()
        torch._foreach_div_(clean, list(torch.where(norms > 0, norms, 1.0).unbind()))  # v̂; g_v = 0 stays 0
        if any(c is not k for c, k in zip(clean, kept)):
            torch._foreach_copy_(kept, clean)
        self._has_kept = not bool(self._agree((~torch.isfinite(norms).all()).to(torch.int32)))

    def _spread(self, per_tensor: Tensor) -> Tensor:
        """Per-tensor sums, or (norm="global") their total for every tensor."""
        return per_tensor if self.norm == "per_tensor" else per_tensor.sum().expand_as(per_tensor)

    def _sum_over_replicas(self, tensors: list[Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=self._process_group())
        torch._foreach_copy_(
            tensors, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        )

    def _add_reused_gradient(self) -> None:
        """A step between refreshes with reuse="gradient", before the base step: g ← g + α‖g‖·v̂ (scale-free, so a
        grad scaler's scaled g is corrected alike)."""
        pairs = [(p.grad, self._kept[p]) for p in self._all_params() if p.grad is not None]
        if not pairs:
            return
        grads, units = [g for g, _ in pairs], [u for _, u in pairs]
        norms = global_norm(grads) if self.norm == "global" else tensor_norms(grads)  # few ops: every step
        torch._foreach_add_(grads, torch._foreach_mul(units, norms), alpha=self.alpha)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as ``torch.optim.Optimizer`` does; with ``every > 1`` the next step builds a fresh Δ."""
        super().add_param_group(param_group)
        self._has_kept = False  # the kept tensors cover the old parameters: the next step builds a fresh Δ

    def state_dict(self) -> dict[str, Any]:
        """The engine's state; with ``every > 1``, also the kept Δ (or gradient) that the next steps reuse."""
        state = super().state_dict()
        if self.every > 1 and self._has_kept:  # in parameter order, like the base state
            state["perturbation"]["kept"] = [self._kept[p].detach().clone() for p in self._all_params()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of ``state_dict``'s form, the kept Δ included (a state saved without one refreshes Δ)."""
        state_dict = dict(state_dict)
        saved = dict(state_dict.get("perturbation", {}))
        kept, legacy = saved.pop("kept", None), saved.pop("delta", None)  # "delta": saved before reuse existed
        if kept is None and legacy is not None:
            kept = legacy
            saved.setdefault("reuse", "delta")
        state_dict["perturbation"] = saved
        everything = self._all_params()
        if kept is not None and (
            not isinstance(kept, (list, tuple))
            or len(kept) != len(everything)
            or any(not isinstance(k, Tensor) or k.shape != p.shape for k, p in zip(kept, everything))
        ):
            raise ValueError(
                "the state_dict's kept tensors do not match this optimizer's parameters; load it into "
                "an AMP over the same parameters, in the same order"
            )
        super().load_state_dict(state_dict)
        self._has_kept = kept is not None and self.every > 1
        if self._has_kept:
            for buffer, saved in zip(scratch(self._kept, everything), kept):
                buffer.copy_(saved)  # to the parameter's device and dtype


def _squared_norms(tensors: list[Tensor]) -> Tensor:
    """‖t‖² of each tensor, one vector (half precision in float32)."""
    return stack_scalars(tensor_norms(tensors)).square()


def _widened(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors themselves in float32 or float64; float32 copies of half-precision ones (whose products and
    differences of nearby gradients underflow)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


@dataclass(frozen=True)
class AMPConfig:
    """The ``amp`` perturbation (Zheng et al., Algorithm 1): ball radius ε, inner step ζ and steps N, the ball's norm,
    and the efficient mode's refresh period and reuse."""

    epsilon: float = 0.5
    inner_lr: float = 1.0
    inner_steps: int = 1
    norm: str = "global"
    every: int = 1  # the efficient mode: a fresh Δ every k steps, the last one reused in between (1 is AMP)
    reuse: str = "delta"  # what the steps in between reuse: delta (θ + the kept Δ) | gradient (LookSAM's)
    alpha: float = 0.7  # reuse=gradient: the weight of the reused orthogonal gradient (LookSAM's α)


register(
    Member(
        "perturbation",
        "amp",
        lambda c, params, steps_per_epoch, sgd, engine: AMP(
            params, torch.optim.SGD, **dataclasses.asdict(c), **sgd, **engine
        ),
        AMPConfig,  # the section's keys are AMP's
        check=lambda c: AMP.check_settings(**dataclasses.asdict(c)),
    )
)
