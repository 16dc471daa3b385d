"""advreg's optimizers inside training frameworks: PyTorch Lightning (``advreg.integrations.lightning``), Hugging Face
Accelerate (``advreg.integrations.accelerate``) and the Transformers ``Trainer`` (``advreg.integrations.transformers``).

Each module imports its framework, installed with the extra of the same name (``pip install "advreg[lightning]"``,
``[accelerate]``, ``[transformers]``, or ``[integrations]`` for all three); ``import advreg`` never imports them.
What the three share is here: where a framework clips gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from advreg.perturb.engine import PerturbedOptimizer


def clip_before_base_step(optimizer: PerturbedOptimizer, clip: Callable[[], object]) -> None:
    """Run ``clip()`` right before the base optimizer's update, on the gradient that update applies (∇J(θ+Δ)).

    The gradients of the passes that build Δ are never clipped: Δ has its own bound (AMP's ε-ball, SAM's ρ), and a
    clipped ∇J(θ) would shrink AMP's Δ = min(ζ, ε/‖g‖)·g. Under a grad scaler the hook runs inside
    ``GradScaler.step``, after the unscale and only when no pass overflowed, so ``clip`` sees true, finite gradients.
    """
    if not isinstance(optimizer, PerturbedOptimizer):
        raise ValueError(
            f"expected an advreg optimizer (advreg.AMP, advreg.SAM, advreg.AWP, ...), got {type(optimizer).__name__}"
        )

    def hook(_base: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:  # None: the step's arguments stay
        clip()

    optimizer.base_optimizer.register_step_pre_hook(hook)


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> Callable[[], object]:
    """A ``clip`` for ``clip_before_base_step``: the global L2 norm of ``optimizer``'s gradients clipped to
    ``max_norm``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)
