"""The weight-perturbation engine: one optimizer step = clean pass, perturb, gradient at θ+Δ, restore, base step.

Shared by AMP, SAM (and every later weight perturbation); a subclass only decides Δ in ``_perturb``.
"""
from __future__ import annotations

import abc
import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_forward_pre_hook

Closure = Callable[[], Tensor]
BN_STATS = ("clean", "all")


class PerturbedOptimizer(torch.optim.Optimizer, abc.ABC):
    """Wraps a base optimizer so that its gradient is taken at perturbed weights θ+Δ and applied at θ.

    The param_groups and the state are the base optimizer's own objects, so LR schedulers,
    ``zero_grad`` and ``state_dict`` (momentum included) see one optimizer.
    A perturbation that needs no gradient at θ (``uses_clean_gradient = False``, e.g. random
    perturbation) skips the clean pass: one pass per step, and ``step`` returns the loss at θ+Δ.
    """

    uses_clean_gradient = True

    def __init__(self, params: Iterable, base_optimizer: type, *, bn_stats: str = "clean", **base_kwargs: Any):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}; "
                "pass the class itself and its arguments as keywords (lr=0.1, momentum=0.9)")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_base()
        self.bn_stats = bn_stats
        self._theta: dict[Tensor, Tensor] = {}  # scratch: θ during a step, never part of the state

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    # -- what a subclass provides -------------------------------------------------------------
    @abc.abstractmethod
    def _is_active(self) -> bool:
        """False when Δ ≡ 0: the step is the base optimizer's, bit for bit (one closure call)."""

    @abc.abstractmethod
    def _perturb(self, params: list[Tensor], theta: list[Tensor], closure: Closure) -> None:
        """Move ``params`` from θ to θ+Δ. On entry they hold θ (also in ``theta``) and ``.grad`` = ∇J(θ)."""

    def _hyperparameters(self) -> dict[str, Any]:
        """The perturbation's own settings, saved in ``state_dict`` beside the base optimizer's."""
        return {}

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One training step; returns the loss at the unperturbed weights θ."""
        losses: list[Tensor] = []  # every pass of this step, checked once at the end
        closure = _checked(closure, type(self).__name__, losses)
        if not self._is_active():
            loss = closure()
            _require_finite(losses, "at the weights θ")
            self.base_optimizer.step()
            return loss
        if self.uses_clean_gradient:
            loss = closure()
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        else:
            params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        with self._frozen_running_stats(params), self._restoring(params) as theta:
            self._perturb(params, theta, closure)
            perturbed_loss = closure()  # ∇J(θ+Δ) now in .grad
            _require_finite(losses, "at θ or at perturbed weights θ+Δ")
        self.base_optimizer.step()  # at θ, with the gradient taken at θ+Δ
        return loss if self.uses_clean_gradient else perturbed_loss

    @contextmanager
    def _restoring(self, params: list[Tensor]) -> Iterator[list[Tensor]]:
        """Snapshot θ; put it back bit for bit on exit, also when the step fails."""
        theta = [self._theta.setdefault(p, torch.empty_like(p)) for p in params]
        torch._foreach_copy_(theta, params)
        try:
            yield theta
        finally:
            torch._foreach_copy_(params, theta)  # back to θ

    def _frozen_running_stats(self, params: list[Tensor]):
        if self.bn_stats == "all" or not self.uses_clean_gradient:  # no clean pass: this one counts
            return nullcontext()
        return frozen_running_stats({id(p) for p in params})

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state["perturbation"] = self._hyperparameters()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("perturbation", {})
        foreign = sorted(set(saved) - set(self._hyperparameters()))
        if foreign:
            raise ValueError(f"this state_dict was saved by another optimizer (it has {', '.join(foreign)}); "
                             f"load it into the kind of optimizer that saved it, not {type(self).__name__}")
        for key, value in saved.items():
            setattr(self, key, value)
        self._validate()
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()  # load_state_dict replaced the base's containers

    def _validate(self) -> None:
        """Raise ValueError on bad hyperparameters (called at construction and after loading)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())
        return f"{type(self).__name__}({settings}, base={self.base_optimizer!r})"


# -- helpers shared by the perturbations ------------------------------------------------------
def global_norm(tensors: list[Tensor]) -> Tensor:
    """‖(t_1, …, t_k)‖₂ as a 0-d tensor, with no host synchronisation."""
    norms = torch._foreach_norm(tensors)
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))


def set_to_sum(params: list[Tensor], theta: list[Tensor], delta: list[Tensor]) -> None:
    """params ← θ + Δ."""
    torch._foreach_copy_(params, theta)
    torch._foreach_add_(params, delta)


def grads_of(params: list[Tensor]) -> list[Tensor]:
    """The gradients of ``params``; a parameter left without one this pass counts as zero."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def check_nonnegative(name: str, value: float, hint: str) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}; {hint}")


def _checked(closure: Closure | None, name: str, losses: list[Tensor]) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that clears the gradients, computes the loss, calls backward() "
            "and returns the loss: it is evaluated more than once per step")

    def run() -> Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise ValueError(f"the closure returned {type(loss).__name__}; it must return the loss tensor "
                             "(end it with `return loss`)")
        losses.append(loss.detach())
        return loss
    return run


class NonFiniteLossError(ValueError):
    """The loss of a step was NaN or inf; the weights were left at θ and no step was taken."""


def _require_finite(losses: list[Tensor], where: str) -> None:
    finite = torch.stack([torch.isfinite(loss).all() for loss in losses]).all()
    if not bool(finite):  # one host synchronisation per step
        raise NonFiniteLossError(f"the loss is not finite (NaN or inf) {where}; the weights were left at θ. "
                         "Lower the learning rate or the perturbation radius, or check the inputs")


@contextmanager
def frozen_running_stats(owned: set[int]) -> Iterator[None]:
    """Forward passes inside leave the running statistics of normalization layers as they were.

    Covers every BatchNorm/InstanceNorm that tracks running stats, is in training mode, and owns one
    of the parameters in ``owned`` (or has none, affine=False). The optimizer sees only parameters, so
    it finds the layers through a scoped global forward pre-hook instead of needing the model.
    """
    saved: dict[_NormBase, list[tuple[Tensor, Tensor]]] = {}

    def snapshot(module: torch.nn.Module, _args: Any) -> None:
        if module in saved or not _tracks_stats(module, owned):
            return
        buffers = [b for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                   if b is not None]
        saved[module] = [(b, b.clone()) for b in buffers]

    handle = register_module_forward_pre_hook(snapshot)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for pairs in saved.values():
                for buffer, copy in pairs:
                    buffer.copy_(copy)


def _tracks_stats(module: torch.nn.Module, owned: set[int]) -> bool:
    if not (isinstance(module, _NormBase) and module.training and module.track_running_stats):
        return False
    own = list(module.parameters(recurse=False))
    return not own or any(id(p) in owned for p in own)
