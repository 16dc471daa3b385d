"""advreg's optimizers with Hugging Face Accelerate (``pip install "advreg[accelerate]"``).

Accelerate's ``AcceleratedOptimizer.step`` hands a closure to ``GradScaler.step``, which refuses it under
``mixed_precision="fp16"``; and its ``no_sync`` is a context that the optimizer must enter around the passes that
build Δ. Two helpers close the gap:

```python
model = accelerator.prepare(model)
opt = accelerator.prepare(perturbed_optimizer(accelerator, model, advreg.SAM, torch.optim.SGD, rho=0.05, lr=0.1))


def closure():
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    accelerator.backward(loss)
    return loss


loss = step(accelerator, opt, closure)
```
"""

from __future__ import annotations

from typing import Any, Callable

import accelerate
import torch
from torch.nn.parallel import DistributedDataParallel

from advreg.integrations import clip_before_base_step, clip_grad_norm
from advreg.perturb.engine import PerturbedOptimizer


def perturbed_optimizer(
    accelerator: accelerate.Accelerator,
    model: torch.nn.Module,
    kind: type[PerturbedOptimizer],
    base_optimizer: type,
    params: Any = None,
    *,
    max_grad_norm: float | None = None,
    **kwargs: Any,
) -> PerturbedOptimizer:
    """``kind(params, base_optimizer, **kwargs)`` wired to ``accelerator``: its grad scaler (fp16), the prepared DDP
    model's ``no_sync`` (the passes that build Δ are not all-reduced), ``model=`` the unwrapped model (BatchNorm
    statistics as after the clean pass), and ``max_grad_norm`` clipping the final gradient before the base step.

    ``model`` is the module returned by ``accelerator.prepare``; ``params`` defaults to its parameters. Pass the
    result to ``accelerator.prepare`` as any optimizer, and step it with ``step``."""
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            "Accelerator(gradient_accumulation_steps > 1) cannot step an advreg optimizer (each pass "
            "would add to the accumulated gradient): leave it at 1 and let the closure loop over the "
            "micro-batches, so that Δ is taken on all of them"
        )
    no_sync = model.no_sync if isinstance(model, DistributedDataParallel) else None
    optimizer = kind(
        model.parameters() if params is None else params,
        base_optimizer,
        model=accelerator.unwrap_model(model),
        grad_scaler=accelerator.scaler,
        no_sync=no_sync,
        **kwargs,
    )
    if max_grad_norm is not None:
        clip_before_base_step(optimizer, clip_grad_norm(optimizer, max_grad_norm))
    return optimizer


def step(accelerator: accelerate.Accelerator, optimizer: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One step of the advreg optimizer (prepared or not): ``step(closure)``, then the grad scaler's ``update``.

    The closure calls ``accelerator.backward(loss)``, which scales the loss under fp16; the optimizer unscales each
    pass and skips the step (restoring θ) when one overflowed. Returns the loss at θ."""
    inner = getattr(optimizer, "optimizer", optimizer)  # an AcceleratedOptimizer wraps it
    if not isinstance(inner, PerturbedOptimizer):
        raise ValueError(f"step takes an advreg optimizer made by perturbed_optimizer, got {type(inner).__name__}")
    loss = inner.step(closure)
    if accelerator.scaler is not None:
        accelerator.scaler.update()
    return loss
