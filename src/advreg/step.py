"""One training step: batch transform → loss → weight perturbation → optimizer, in the run's precision, clipped.

:class:`Step` is the trainer's step and anyone's: build it from a model, the three stages and an optimizer (a
:class:`~advreg.perturb.PerturbedOptimizer` or any ``torch.optim`` optimizer) and call it on a batch::

    step = advreg.Step(model, transform, loss_fn, optimizer, num_classes=10)
    out = step(x, y)  # out.loss, out.logits: of the pass whose loss the optimizer's step returns

The loss and the logits it returns are those of the pass that the optimizer's ``step`` reports (its returned loss
is the closure's own tensor): the pass at θ where there is one, at θ+Δ for a perturbation without a clean pass
(RMP, RWP, AMP's steps between refreshes with ``every``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from advreg.losses import LossStage
from advreg.perturb import PerturbedOptimizer
from advreg.transforms import Transform

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class StepOutput:
    """What a step reports: the mean loss of the reported pass (0-d) and that pass's logits (B, K), detached."""

    loss: Tensor
    logits: Tensor


@dataclass
class Step:
    """One optimizer step on a batch ``(x, y)``: ``transform`` once (every pass sees the same batch), then
    ``optimizer.step`` with a closure that computes ``loss_fn`` in ``precision``, backpropagates it (through
    ``scaler`` under float16) and clips the gradient's global L2 norm to ``clip_grad`` (0: off) after each pass.

    ``transform_model`` is the module the transform may run (adversarial examples); by default ``model``. Under
    DDP, give the bare module there (input gradients need no all-reduce) and the wrapper as ``model``.
    """

    model: nn.Module
    transform: Transform
    loss_fn: LossStage
    optimizer: torch.optim.Optimizer
    num_classes: int
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float = 0.0
    transform_model: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 is off), got {self.clip_grad!r}")

    def __call__(self, x: Tensor, y: Tensor, weight: float = 1.0) -> StepOutput:
        """The step on ``(x, y)``. ``weight`` scales the mean loss of each pass whose gradient is all-reduced (under
        DDP, this replica's share of the global batch, so that the replicas' average is the whole batch's); a pass
        that the engine runs locally (:attr:`~advreg.perturb.PerturbedOptimizer.local_pass`, building this
        replica's own Δ) keeps weight 1."""
        batch = self.transform(self.transform_model or self.model, x, y, self.num_classes)
        passes: dict[int, Tensor] = {}  # id of each pass's loss tensor -> its logits

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast(x.device.type):
                loss, logits = self.loss_fn(self.model, batch)  # logits (B, K)
            w = 1.0 if getattr(self.optimizer, "local_pass", False) else weight
            scaled = loss if w == 1.0 else loss * w
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            if self.clip_grad > 0:  # every pass's gradient, the one the base step takes included
                nn.utils.clip_grad_norm_(self.optimizer_params(), self.clip_grad)
            passes[id(loss)] = logits.detach()
            return loss

        loss = self.optimizer_step(closure)
        return StepOutput(loss, passes[id(loss)])

    def optimizer_step(self, closure: Callable[[], Tensor]) -> Tensor:
        """``optimizer.step(closure)``, through the grad scaler under float16 (torch's GradScaler takes no closure;
        a perturbed optimizer unscales and skips itself); the loss it returns."""
        scaler = self.scaler
        if scaler is None or isinstance(self.optimizer, PerturbedOptimizer):
            loss = self.optimizer.step(closure)
        else:
            loss = closure()
            scaler.step(self.optimizer)
        if scaler is not None:
            scaler.update()
        return loss

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Mixed precision for the loss passes; the batch transform (and evaluation) stay in float32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def optimizer_params(self) -> list[Tensor]:
        """The tensors the optimizer trains (what clipping clips)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]
