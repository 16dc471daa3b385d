"""The weight-perturbation engine: one optimizer step = clean pass, perturb, gradient at θ+Δ, restore, base step.

Shared by AMP, SAM, RMP, AWP and RWP: a subclass decides Δ (``_perturb``) and, through one hook (``_plan``), what
a step does; ``PerturbedOptimizer``'s docstring lists the subclass interface.
"""

from __future__ import annotations

import abc
import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_forward_pre_hook

Closure = Callable[[], Tensor]
BN_STATS = ("clean", "all")
PERTURB_ON = ("local", "global")  # under DDP: Δ from each replica's batch, or from the all-reduced gradient


class PerturbedOptimizer(torch.optim.Optimizer, abc.ABC):
    """Wraps a base optimizer so that its gradient is taken at perturbed weights θ+Δ and applied at θ.

    The param_groups and the state are the base optimizer's own objects, so LR schedulers,
    ``zero_grad`` and ``state_dict`` (momentum included) see one optimizer.
    A perturbation that needs no gradient at θ (``uses_clean_gradient = False``, e.g. random
    perturbation) skips the clean pass: one pass per step, and ``step`` returns the loss at θ+Δ.

    Mixed precision: with ``grad_scaler`` (a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the closure
    calls), the gradients of the passes that build Δ are unscaled as they come; if any pass overflowed, θ is
    restored and the base step is skipped (the scaler sees the overflow, so its ``update()`` lowers the scale). Call
    ``grad_scaler.update()`` after each ``step``.

    BatchNorm: with ``bn_stats="clean"`` only the clean pass updates the running statistics, in every normalization
    layer in training mode, its weights trained or frozen. Give ``model`` (the module being trained) to have all of
    its normalization layers' statistics copied and restored directly, as ``torch.compile`` requires (another
    module's keep moving); without it, every such layer that runs in a perturbed pass, of any module, is found by a
    forward pre-hook (eager only).

    Distributed data parallel: with ``no_sync`` (the ``DistributedDataParallel`` model's ``no_sync`` method), the
    passes that build Δ run inside it (forward included), so only the final gradient at θ+Δ is all-reduced; each
    replica perturbs by its own batch's gradient (the paper's per-batch Δ). ``local_pass`` is True while the
    closure runs such a pass (a closure that weights its loss by the replica's share of the batch leaves these
    passes at weight 1: :class:`advreg.Step` does). ``perturb_on="global"`` all-reduces
    those passes too, so that Δ comes from the global batch's gradient, the same on every replica.

    Hyperparameters: those named in ``group_keys`` (ε, ζ, N, ρ, γ, ...) live in each param group, as ``lr`` does:
    a group may set its own, a scheduler may change them, ``state_dict`` carries them; the attribute of the same name
    reads (and sets) the value all groups share. Where a perturbation has a ball over several tensors, the groups
    that agree on its settings share one ball (AMP: ε, ζ, N; SAM: ρ; RMP: ε), so that a model in one group, or in
    groups that differ only in ``lr`` or ``weight_decay``, has the paper's single ball.

    The two-call form (``first_step`` after the first backward, ``ascent_step`` after each further one of a
    multi-pass Δ, ``second_step`` after the last) takes the same step as ``step(closure)`` bit for bit, with the
    same restore, BatchNorm policy and grad scaler; see ``first_step`` for what it refuses.

    Writing a perturbation (AMP, SAM, RMP, AWP and RWP are written so): a subclass defines these methods.

    - ``_perturb(params, theta)``, required: move ``params`` from θ to θ+Δ. Called once per perturbed step with
      ``params`` at θ (a copy in ``theta``) and, after a clean pass, ``.grad`` = ∇J(θ) unscaled. As a generator,
      each ``yield`` asks for one more pass at the current ``params`` and resumes with its gradient in ``.grad``.
      The engine restores θ after the step's last pass.
    - ``_is_active()``, required: whether the perturbation is on; False makes the step the base optimizer's.
    - ``group_keys`` with ``_validate_group(group)`` (called at construction, on loading and at each step), and
      ``_validate()`` with ``_hyperparameters()`` (saved in ``state_dict``): the per-group and the common settings,
      a ValueError for a bad one.
    - ``uses_clean_gradient = False``: Δ needs no gradient at θ (one pass per step, at θ+Δ).
    - ``_end_step()``: called after each base step (a failed step never reaches it), e.g. to count steps.
    - ``_plan()``: called as each step starts (``step`` or ``first_step``, after the groups are checked), it returns
      the step's :class:`StepPlan`; by default ``StepPlan(perturb=self._is_active(), clean=self.uses_clean_gradient)``.
      A perturbation whose steps differ in shape overrides it (AMP's ``every``: a fresh Δ, or a reused one).

    A step, in order: the plan; without ``perturb``, one pass at θ; with it, the pass at θ (``clean``), ``_perturb``
    and its passes, the pass at θ+Δ, θ restored; then the plan's ``before_base_step``, the base step, ``_end_step``.
    """

    uses_clean_gradient = True
    group_keys: tuple[str, ...] = ()  # the per-group hyperparameters; a subclass declares its own

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        *,
        bn_stats: str = "clean",
        grad_scaler: torch.amp.GradScaler | None = None,
        no_sync: Callable[[], Any] | None = None,
        perturb_on: str = "local",
        model: torch.nn.Module | None = None,
        group_defaults: dict[str, Any] | None = None,
        **base_kwargs: Any,
    ):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}; "
                "pass the class itself and its arguments as keywords (lr=0.1, momentum=0.9)"
            )
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        if perturb_on not in PERTURB_ON:
            raise ValueError(f"perturb_on must be one of {PERTURB_ON}, got {perturb_on!r}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be the torch.nn.Module being trained, got {type(model).__name__}")
        if no_sync is not None and not callable(no_sync):
            raise ValueError("no_sync must be the DistributedDataParallel model's no_sync method (model.no_sync)")
        group_defaults = dict(group_defaults or {})
        super().__init__(params, {**base_kwargs, **group_defaults})  # a group's own values win, as for lr
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.base_optimizer.defaults.update(group_defaults)  # a group added later gets them as it gets lr
        self._share_base()
        self._validate_groups()
        self.bn_stats = bn_stats
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.no_sync, self.perturb_on = no_sync, perturb_on
        self.local_pass = False  # True during a pass under no_sync: its gradient stays on this replica
        self._theta: dict[Tensor, Tensor] = {}  # scratch: θ during a step, never part of the state
        self._norm_stats: dict[torch.nn.Module, list[Tensor]] = {}  # scratch: running statistics during a step
        self._norm_layers = None if model is None else [m for m in model.modules() if isinstance(m, _NormBase)]
        self._pending: _PendingStep | None = None  # the two-call form between first_step and second_step

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    # -- what a subclass provides -------------------------------------------------------------
    @abc.abstractmethod
    def _is_active(self) -> bool:
        """Whether the perturbation is on; False: one pass at θ, then the base step (the base optimizer's step, bit
        for bit, when Δ ≡ 0). The default ``_plan`` perturbs exactly when it is on."""

    def _plan(self) -> "StepPlan":
        """What this step does, asked as it starts (``step`` or ``first_step``, after the groups are checked)."""
        return StepPlan(perturb=self._is_active(), clean=self.uses_clean_gradient)

    @abc.abstractmethod
    def _perturb(self, params: list[Tensor], theta: list[Tensor]) -> Iterator[None] | None:
        """Move ``params`` from θ to θ+Δ. On entry they hold θ (also in ``theta``) and, after a clean pass,
        ``.grad`` = ∇J(θ) (unscaled). A Δ that needs more gradients is a generator: each ``yield`` asks for one more
        pass at the
        current ``params`` (its gradient unscaled, not all-reduced under ``no_sync``) and resumes with it in
        ``.grad``. ``.grad`` may be overwritten: the final pass replaces it."""

    def _hyperparameters(self) -> dict[str, Any]:
        """The perturbation's settings common to all groups, saved in ``state_dict`` beside the base optimizer's."""
        return {}

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError on a group's bad ``group_keys`` values (at construction, on loading, at each step)."""

    def _end_step(self) -> None:
        """Called after a step's base step (``step`` or ``second_step``)."""

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One training step; returns the loss at the unperturbed weights θ (at θ+Δ without a clean pass)."""
        losses: list[Tensor] = []  # every pass of this step, checked once at the end
        run = _checked(closure, type(self).__name__, losses)
        self._refuse_pending("step(closure)")
        self._validate_groups()
        plan = self._plan()
        if not plan.perturb:
            loss = run()
            _require_finite(losses, "at the weights θ", self._agreement())
            self._finish(plan)
            return loss
        overflow = _Overflow(self.grad_scaler)
        ascent = self._ascent_pass(run, overflow)
        clean = plan.clean
        if clean:
            loss = ascent()
        params = self._step_params(clean)
        with self._frozen_running_stats(clean), self._restoring(params) as theta:
            for _ in self._perturb(params, theta) or ():
                ascent()
            perturbed_loss = run()  # ∇J(θ+Δ) now in .grad (scaled, and all-reduced under DDP)
            self._check_passes(losses, clean, overflow, params)
        self._finish(plan)  # at θ, with the gradient taken at θ+Δ
        return loss if clean else perturbed_loss

    def _finish(self, plan: "StepPlan") -> None:
        """The plan's ``before_base_step``, the base step, ``_end_step``: θ restored, the passes checked."""
        if plan.before_base_step is not None:
            plan.before_base_step()
        self._base_step()
        self._end_step()

    def _step_params(self, clean: bool) -> list[Tensor]:
        """The tensors Δ moves: those with a gradient at θ, or (no clean pass) every trainable one."""
        if clean:
            return [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    # -- the two-call form ----------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """After the first backward (at θ): move the weights to θ+Δ and freeze the normalization layers' running
        statistics (``bn_stats="clean"``) until ``second_step``.

        Refused (ValueError) where ``step(closure)`` alone can do it: a perturbation with no clean pass (RMP, RWP),
        a local Δ under DDP (``no_sync`` with ``perturb_on="local"``), AMP's ``every > 1``. Supported: the grad
        scaler (the user scales both backwards; this unscales the first), DDP with ``perturb_on="global"``,
        N > 1 (one ``ascent_step`` after each of the N-1 extra backwards)."""
        if self._pending is not None:
            self._pending.undo()
            self._pending = None
            raise ValueError(
                "first_step was called twice without second_step; the pending step was undone "
                "(weights back at θ): after first_step, run the backward at θ+Δ, then call second_step"
            )
        self._validate_groups()
        plan = self._plan()
        refusal = self._two_call_refusal(plan)
        if refusal is not None:
            raise ValueError(f"the two-call form cannot run here: {refusal}")
        self._pending = self._start_pending(plan)
        if zero_grad:
            self.zero_grad()

    def _two_call_refusal(self, plan: "StepPlan") -> str | None:
        """Why the two-call form cannot take the step ``plan`` describes (None: it can)."""
        if plan.two_call_refusal is not None:
            return plan.two_call_refusal
        if not plan.clean:
            return f"{type(self).__name__} takes one pass per step, at θ+Δ: call step(closure)"
        if self.no_sync is not None and self.perturb_on == "local":
            return (
                "under DDP a local Δ needs its first pass under no_sync, which the two-call form cannot enter: "
                "use step(closure), or perturb_on='global' (Δ from the all-reduced gradient)"
            )
        return None

    def _start_pending(self, plan: "StepPlan") -> "_PendingStep":
        overflow, stack = _Overflow(self.grad_scaler), ExitStack()
        params = self._step_params(clean=True)  # plan.clean: the two-call form refuses a step without it
        pending = _PendingStep(stack, overflow, params, iter(()), more=False, plan=plan)
        stack.enter_context(self._frozen_running_stats(clean=True))  # the passes until second_step do not count
        if not plan.perturb:  # the second pass is at θ too, and the base step takes its gradient
            return pending
        overflow.unscale([p.grad for p in params])
        theta = stack.enter_context(self._restoring(params))
        try:
            pending.passes = iter(self._perturb(params, theta) or ())
            pending.advance()
        except BaseException:
            stack.close()
            raise
        return pending

    @torch.no_grad()
    def ascent_step(self, zero_grad: bool = False) -> None:
        """After each extra backward of a multi-pass Δ (AMP with N > 1: N-1 calls between first_step and
        second_step): take the next ascent step from the gradient just computed."""
        pending = self._pending
        if pending is None or not pending.more:
            raise ValueError(
                "ascent_step takes the extra passes of a multi-pass Δ, after first_step and before "
                "the final backward; this step needs no more of them: call second_step"
            )
        pending.overflow.unscale([p.grad for p in pending.params if p.grad is not None])
        pending.advance()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """After the backward at θ+Δ: restore θ and the running statistics, then the base step at θ with ∇J(θ+Δ)."""
        pending = self._pending
        if pending is None:
            raise ValueError(
                "second_step needs first_step: after the first backward call first_step, then run "
                "the backward at θ+Δ and call second_step"
            )
        if pending.more:
            raise ValueError(
                "this Δ needs more passes: after each extra backward call ascent_step "
                "(N-1 times for inner_steps=N), then run the last backward and call second_step"
            )
        self._pending = None
        with pending.stack:  # back to θ, and the running statistics as the clean pass left them
            self._check_gradients(pending)
        self._finish(pending.plan)
        if zero_grad:
            self.zero_grad()

    def _check_gradients(self, pending: "_PendingStep") -> None:
        """The two-call form sees no loss: raise on a non-finite final gradient (a NaN or inf in any pass ends
        there), or under a grad scaler mark an overflow of a pass that built Δ so that the scaler skips the step."""
        if self.grad_scaler is None:
            grads = [p.grad for p in pending.params if p.grad is not None]
            _require_finite([global_norm(grads)] if grads else [], "in the gradient of this step", self._agreement())
            return
        for found in pending.overflow.found.values():
            self._agree(found)
        pending.overflow.poison(pending.params)

    def _refuse_pending(self, what: str) -> None:
        if self._pending is not None:
            raise ValueError(
                f"{what} was called between first_step and second_step; finish the two-call step with second_step first"
            )

    def _check_passes(self, losses: list[Tensor], clean: bool, overflow: "_Overflow", params: list[Tensor]) -> None:
        """Raise on a non-finite loss (every replica alike); under a grad scaler, an overflow at θ+Δ (or in any
        pass that built Δ) marks the final gradient instead, so that the scaler skips the step."""
        if self.grad_scaler is None:
            _require_finite(losses, "at θ or at perturbed weights θ+Δ", self._agreement(), clean_first=clean)
            return
        _require_finite(losses[:1] if clean else [], "at the weights θ", self._agreement())
        overflow.check_loss(losses[-1])
        for found in overflow.found.values():
            self._agree(found)
        overflow.poison(params)

    def _base_step(self) -> None:
        if self.grad_scaler is None:
            self.base_optimizer.step()
        else:  # unscales the final gradient; skips the step if it (or a poisoned pass) is not finite
            self.grad_scaler.step(self.base_optimizer)

    def _replicated(self) -> bool:
        return self.no_sync is not None and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _agreement(self) -> Callable[[Tensor], Tensor] | None:
        """``_agree`` under DDP, None otherwise (a single process has nothing to agree on)."""
        return self._agree if self._replicated() else None

    def _agree(self, flag: Tensor) -> Tensor:
        """Under DDP (``no_sync`` given): the maximum of ``flag`` over the replicas, in place, so that a failure or an
        overflow on one replica (its local loss, its local Δ) skips the step on every replica alike."""
        if self._replicated():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._process_group())
        return flag

    def _process_group(self) -> Any:
        """The process group of the DDP model whose ``no_sync`` was given (None: the default group)."""
        return getattr(getattr(self.no_sync, "__self__", None), "process_group", None)

    def _ascent_pass(self, run: Closure, overflow: "_Overflow") -> Closure:
        """A pass whose gradient builds Δ: local to the replica under ``no_sync``, unscaled under a grad scaler."""
        local = self.no_sync if self.perturb_on == "local" else None
        if local is None and self.grad_scaler is None:
            return run

        def ascent() -> Tensor:
            with local() if local is not None else nullcontext():
                self.local_pass = local is not None
                try:
                    loss = run()
                finally:
                    self.local_pass = False
            overflow.unscale([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])
            return loss

        return ascent

    @contextmanager
    def _restoring(self, params: list[Tensor]) -> Iterator[list[Tensor]]:
        """Snapshot θ; put it back bit for bit on exit, also when the step fails."""
        theta = scratch(self._theta, params)
        torch._foreach_copy_(theta, params)
        try:
            yield theta
        finally:
            with torch.no_grad():  # also when an abandoned two-call step is closed outside the optimizer
                torch._foreach_copy_(params, theta)  # back to θ

    def _frozen_running_stats(self, clean: bool):
        if self.bn_stats == "all" or not clean or self._norm_layers == []:  # no clean pass: this one counts;
            return nullcontext()  # model= has no normalization layer: nothing to freeze
        return frozen_running_stats(self._norm_stats, self._norm_layers)

    # -- per-group settings --------------------------------------------------------------------
    def _validate_groups(self) -> None:
        for group in self.param_groups:
            self._validate_group(group)

    def _balls(self, params: list[Tensor], keys: tuple[str, ...]) -> list[tuple[tuple, list[int]]]:
        """The positions in ``params`` grouped by their param group's values of ``keys``, in order of first
        appearance: the groups that agree on them share one ball (all of them when no group sets its own)."""
        if len(self.param_groups) == 1:  # the usual case, without a lookup per tensor
            return [(tuple(self.param_groups[0][k] for k in keys), list(range(len(params))))]
        balls: dict[tuple, list[int]] = {}
        for i, values in enumerate(self._settings(params, keys)):
            balls.setdefault(values, []).append(i)
        return list(balls.items())

    def _settings(self, params: list[Tensor], keys: tuple[str, ...]) -> list[tuple]:
        """Each tensor's param-group values of ``keys``."""
        setting = {p: tuple(group[k] for k in keys) for group in self.param_groups for p in group["params"]}
        return [setting[p] for p in params]

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum, the param groups with their hyperparameters) and, under
        ``perturbation``, the settings common to all groups."""
        state = self.base_optimizer.state_dict()  # its param_groups carry the group_keys, as they carry lr
        state["perturbation"] = self._hyperparameters()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of ``state_dict``'s form; ValueError for one saved by another kind of perturbation."""
        state_dict = dict(state_dict)
        saved = dict(state_dict.pop("perturbation", {}))
        legacy = {k: saved.pop(k) for k in self.group_keys if k in saved}  # saved before they lived in the groups
        groups = [dict(group) for group in state_dict.get("param_groups", [])]
        self._refuse_foreign(saved, groups)
        for group, mine in zip(groups, self.param_groups):  # a group without a key: the old global, else ours
            for key in self.group_keys:
                group.setdefault(key, legacy.get(key, mine[key]))
            self._validate_group(group)
        for key, value in saved.items():
            setattr(self, key, value)
        self._validate()
        self.base_optimizer.load_state_dict({**state_dict, "param_groups": groups})
        self._share_base()  # load_state_dict replaced the base's containers

    def _refuse_foreign(self, saved: dict[str, Any], groups: list[dict[str, Any]]) -> None:
        """A state saved by another perturbation has settings (common or per group) that this one lacks."""
        others = set().union(*(kind.group_keys for kind in _perturbations())) - set(self.group_keys)
        foreign = set(saved) - set(self._hyperparameters())
        foreign |= {key for group in groups for key in group if key in others}
        if foreign:
            raise ValueError(
                f"this state_dict was saved by another optimizer (it has {', '.join(sorted(foreign))}); "
                f"load it into the kind of optimizer that saved it, not {type(self).__name__}"
            )

    def _validate(self) -> None:
        """Raise ValueError on bad common hyperparameters (called at construction and after loading)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (it gets the defaults, the hyperparameters included), checked."""
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
            self._validate_group(self.param_groups[-1])
        else:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        per_group = {k: [g[k] for g in self.param_groups] for k in self.group_keys}
        shared = {k: v[0] if all(x == v[0] for x in v) else v for k, v in per_group.items()}
        settings = ", ".join(f"{k}={v!r}" for k, v in {**shared, **self._hyperparameters()}.items())
        return f"{type(self).__name__}({settings}, base={self.base_optimizer!r})"


def _perturbations() -> list[type]:
    """Every subclass of PerturbedOptimizer, at any depth."""
    found, todo = [], list(PerturbedOptimizer.__subclasses__())
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo.extend(kind.__subclasses__())
    return found


# -- helpers shared by the perturbations ------------------------------------------------------
def global_norm(tensors: list[Tensor]) -> Tensor:
    """‖(t_1, …, t_k)‖₂ as a 0-d tensor, with no host synchronisation."""
    return torch.linalg.vector_norm(stack_scalars(tensor_norms(tensors)))


def tensor_norms(tensors: list[Tensor]) -> list[Tensor]:
    """‖t‖₂ of each tensor (0-d tensors); those of half-precision tensors in float32, which neither overflows nor
    underflows (nor does ε/‖t‖)."""
    if not any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        return torch._foreach_norm(tensors)
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch._foreach_norm(tensors, 2, dtype=wide)


def stack_scalars(values: list[Tensor]) -> Tensor:
    """0-d tensors (one per parameter) stacked into one vector, on the first one's device, in their promoted dtype."""
    first = values[0]
    if any(v.dtype != first.dtype or v.device != first.device for v in values):
        dtype = first.dtype
        for v in values[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        values = [v.to(first.device, dtype) for v in values]
    return torch.stack(values)


def set_to_sum(params: list[Tensor], theta: list[Tensor], delta: list[Tensor]) -> None:
    """params ← θ + Δ."""
    torch._foreach_copy_(params, theta)
    torch._foreach_add_(params, delta)


def grads_of(params: list[Tensor]) -> list[Tensor]:
    """The gradients of ``params``; a parameter left without one this pass counts as zero."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_nonnegative(name: str, value: float, hint: str) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}; {hint}")


def _checked(closure: Closure | None, name: str, losses: list[Tensor]) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that clears the gradients, computes the loss, calls backward() "
            "and returns the loss: it is evaluated more than once per step"
        )

    def run() -> Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise ValueError(
                f"the closure returned {type(loss).__name__}; it must return the loss tensor "
                "(end it with `return loss`)"
            )
        losses.append(loss.detach())
        return loss

    return run


class NonFiniteLossError(ValueError):
    """The loss of a step was NaN or inf; the weights were left at θ and no step was taken. ``perturbed``: the
    pass at θ was finite and a pass at perturbed weights θ+Δ was not (the perturbation's size is at fault)."""

    def __init__(self, message: str, perturbed: bool = False):
        super().__init__(message)
        self.perturbed = perturbed


def _require_finite(
    losses: list[Tensor], where: str, agree: Callable[[Tensor], Tensor] | None = None, clean_first: bool = False
) -> None:
    """Raise NonFiniteLossError if a loss is NaN or inf (on any replica, given ``agree``); ``clean_first``: the
    first loss is the pass at θ, the others at perturbed weights."""
    if not losses:
        return
    total = losses[0] if losses[0].ndim == 0 else losses[0].sum()
    for loss in losses[1:]:
        total = total + (loss if loss.ndim == 0 else loss.sum())  # NaN or inf anywhere makes the sum non-finite
    if agree is None:  # one host synchronisation per step (torch.isfinite alone is 4 kernels on CPU)
        finite = math.isfinite(total.item())
    else:
        finite = not bool(agree((~torch.isfinite(total)).to(torch.int32)))
    if finite:
        return
    perturbed = clean_first and len(losses) > 1 and math.isfinite(losses[0].sum().item())  # this replica's θ pass
    if clean_first:
        where = "at perturbed weights θ+Δ, though finite at θ" if perturbed else "at the weights θ"
    raise NonFiniteLossError(
        f"the loss is not finite (NaN or inf) {where}; the weights were left at θ. "
        "Lower the learning rate or the perturbation radius, or check the inputs",
        perturbed,
    )


class _Overflow:
    """Under a grad scaler: unscale the gradients of the passes that build Δ and remember any inf or NaN, so that
    the base step is skipped (GradScaler's own check sees it through a poisoned final gradient)."""

    def __init__(self, scaler: torch.amp.GradScaler | None):
        self.scaler = scaler
        self.found: dict[torch.device, Tensor] = {}
        self.inv_scale: float | None = None

    def unscale(self, grads: list[Tensor]) -> None:
        if self.scaler is None:
            return
        if self.inv_scale is None:
            self.inv_scale = 1.0 / self.scaler.get_scale()  # one host synchronisation per step
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in groups.items():
            found = self._found(device)
            inv = torch.full((), self.inv_scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)

    def check_loss(self, loss: Tensor) -> None:
        found = self._found(loss.device)
        found.add_((~torch.isfinite(loss.detach().float())).any().float())

    def poison(self, params: list[Tensor]) -> None:
        """Make the final gradient non-finite on each device where a pass overflowed."""
        for device, found in self.found.items():
            grad = next(
                (p.grad for p in params if p.grad is not None and p.grad.device == device and p.grad.numel() > 0), None
            )
            if grad is not None:  # one element, whatever the layout (a channels_last gradient has no view(-1))
                grad[(0,) * grad.dim()].add_(torch.where(found > 0, float("inf"), 0.0).to(grad.dtype))

    def _found(self, device: torch.device) -> Tensor:
        if device not in self.found:
            self.found[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self.found[device]


def scratch(store: dict[Tensor, Tensor], like: list[Tensor]) -> list[Tensor]:
    """One persistent buffer per tensor of ``like`` (made on first use): no allocation per step."""
    out = []
    for t in like:
        buffer = store.get(t)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.device != t.device:
            buffer = store[t] = torch.empty_like(t)
        out.append(buffer)
    return out


@contextmanager
def frozen_running_stats(store: dict | None = None, layers: list[torch.nn.Module] | None = None) -> Iterator[None]:
    """Forward passes inside leave the running statistics of normalization layers as they were.

    Covers every BatchNorm/InstanceNorm that tracks running stats and is in training mode, trained or frozen
    (``requires_grad=False`` weights still move their statistics in train mode). Given the model's normalization
    ``layers``, it copies their statistics directly (works under ``torch.compile``); otherwise it finds every such
    layer that runs inside, through a scoped global forward pre-hook, since the optimizer sees only parameters (eager
    mode only). The copies live in ``store`` (module -> buffers) when given, so that a step allocates nothing.
    """
    store = {} if store is None else store
    saved: list[tuple[list[Tensor], list[Tensor]]] = []
    seen: set[int] = set()

    def snapshot(module: torch.nn.Module, _args: Any = None) -> None:
        if id(module) in seen or not _tracks_stats(module):
            return
        seen.add(id(module))
        buffers = [b for b in (module.running_mean, module.running_var, module.num_batches_tracked) if b is not None]
        copies = store.get(module)
        if copies is None or any(c.shape != b.shape or c.device != b.device for c, b in zip(copies, buffers)):
            copies = store[module] = [torch.empty_like(b) for b in buffers]
        torch._foreach_copy_(copies, buffers)
        saved.append((buffers, copies))

    handle = None
    if layers is None:
        handle = register_module_forward_pre_hook(snapshot)
    else:
        for layer in layers:
            snapshot(layer)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            for buffers, copies in saved:
                torch._foreach_copy_(buffers, copies)


def _tracks_stats(module: torch.nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.training and module.track_running_stats


@dataclass(frozen=True)
class StepPlan:
    """What one step does: a subclass's ``_plan`` says it as the step starts (see :class:`PerturbedOptimizer`).

    - ``perturb``: take the passes at perturbed weights; False: one pass at θ, whose gradient the base step takes.
    - ``clean``: with ``perturb``, the first pass is at θ and ``_perturb`` starts with its gradient ∇J(θ) in
      ``.grad`` (and moves the tensors that have one); False: Δ needs no gradient, the pass at θ+Δ is the step's
      only one (``_perturb`` gets every trainable tensor, ``step`` returns the loss at θ+Δ), and the two-call form
      is refused.
    - ``before_base_step``: called right before the base step, with θ restored and ``.grad`` the gradient that the
      base step takes (scaled under a grad scaler, all-reduced under DDP); it may read or change ``.grad``.
    - ``two_call_refusal``: why the two-call form cannot take this step, said by ``first_step``'s ValueError
      (None: the engine's own checks decide).
    """

    perturb: bool
    clean: bool = True
    before_base_step: Callable[[], None] | None = None
    two_call_refusal: str | None = None


@dataclass
class _PendingStep:
    """A two-call step between first_step and second_step: what restores θ and the statistics (``stack``), the
    grad scaler's overflow record, the tensors Δ moves, the rest of a multi-pass Δ (``more``: it awaits a pass), and
    the step's plan."""

    stack: ExitStack
    overflow: _Overflow
    params: list[Tensor]
    passes: Iterator[None]
    more: bool
    plan: StepPlan

    def advance(self) -> None:
        """Run Δ's construction up to its next pass (or to its end)."""
        self.more = next(self.passes, _DONE) is not _DONE

    def undo(self) -> None:
        """Abandon the step: back to θ and to the clean pass's statistics."""
        self.stack.close()


_DONE = object()


class GroupSetting:
    """A per-group hyperparameter read and set as an attribute (``opt.epsilon``): the value every param group shares;
    setting it sets every group's. Reading it when the groups differ raises (read ``param_groups`` instead)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, opt: Any, owner: type | None = None) -> Any:
        if opt is None:
            return self
        values = [group[self.name] for group in opt.param_groups]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(
                f"the param groups have different {self.name} values ({values}); "
                f"read each group's param_groups[i][{self.name!r}]"
            )
        return values[0]

    def __set__(self, opt: Any, value: Any) -> None:
        for group in opt.param_groups:
            group[self.name] = value
        opt._validate_groups()
