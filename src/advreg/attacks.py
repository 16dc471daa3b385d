"""Adversarial inputs: FGSM (Goodfellow et al., ICLR 2015, Eq. 3), x' = clip(x + ε·sign(∇ₓℓ(f(x), y))).

Attacks run in eval mode, restore the model's previous mode, and never leave gradients on the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float,
         clamp: tuple[float, float] | None = None) -> Tensor:
    """One signed-gradient step of size ``eps`` (L∞) from ``x``, clipped to the input box ``clamp``."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    was_training = model.training
    model.eval()
    try:
        x_adv = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)  # ∇ₓ only: the weights' .grad are untouched
    finally:
        model.train(was_training)
    x_adv = x.detach() + eps * grad.sign()
    return x_adv.clamp(*clamp) if clamp is not None else x_adv
