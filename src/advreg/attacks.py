"""Adversarial inputs: FGSM (Goodfellow et al., ICLR 2015), PGD (Madry et al., ICLR 2018) and batched DeepFool
(Moosavi-Dezfooli et al., CVPR 2016, Algorithm 2). Inputs and ε are in the data's own units; ``box`` is its valid range.

Every attack runs in eval mode, restores the caller's mode, and never changes the model's parameters, buffers or .grad.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Box = tuple[float, float] | None


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, box: Box = None) -> Tensor:
    """x' = clip_box(x + ε·sign(∇ₓ CE(f(x), y))): one signed-gradient step of size ε (L∞)."""
    _check_eps(eps)
    with eval_mode(model):
        grad = _input_grad(model, x.detach(), y)
    return _clip(x.detach() + eps * grad.sign(), box)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, norm: str = "linf",
        random_start: bool = True, box: Box = None, generator: torch.Generator | None = None) -> Tensor:
    """``steps`` ascent steps of size α on CE, each projected on the ε-ball around x (L∞ or L2) and on the box."""
    _check_eps(eps)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if alpha <= 0 or not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"alpha must be > 0 and steps an integer >= 0, got alpha={alpha!r}, steps={steps!r}")
    x = x.detach()
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    x_adv = _clip(x + delta, box)
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y)
            step = grad.sign() if norm == "linf" else grad / _norms(grad).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            x_adv = _clip(x + _project(x_adv + alpha * step - x, eps, norm), box)
    return x_adv


def deepfool(model: nn.Module, x: Tensor, steps: int = 50, overshoot: float = 0.02,
             create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Minimal L2 perturbations that change each sample's predicted class, all samples at once.

    Returns ``(perturbation, norms, success)``: r with x + r past the nearest boundary (scaled by
    1 + overshoot), its per-sample L2 norms (B,), and whether the prediction changed (B,). The source class
    is the prediction at x, so misclassified inputs are handled like any other. Each iteration takes one
    autograd call for all classes of all samples; ``create_graph=True`` keeps r differentiable (AMM).
    """
    if steps < 1 or overshoot < 0:
        raise ValueError(f"steps must be >= 1 and overshoot >= 0, got steps={steps!r}, overshoot={overshoot!r}")
    with eval_mode(model):
        x0 = x if create_graph else x.detach()
        with torch.no_grad():
            clean = model(x0)  # (B, K)
        source, num_classes = clean.argmax(dim=1), clean.shape[1]
        r_total = torch.zeros_like(x0)
        active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        for _ in range(steps):
            r_step, still = _deepfool_step(model, x0 + (1 + overshoot) * r_total, source, num_classes, create_graph)
            active = active & still
            if not bool(active.any()):  # one host synchronisation per iteration
                break
            r_total = r_total + r_step * active.view(-1, *[1] * (x0.dim() - 1))
        perturbation = (1 + overshoot) * r_total
        with torch.no_grad():
            success = model(x0 + perturbation).argmax(dim=1) != source
    return perturbation, _norms(perturbation), success


def _deepfool_step(model: nn.Module, x: Tensor, source: Tensor, k: int,
                   create_graph: bool) -> tuple[Tensor, Tensor]:
    """The linearized step toward the nearest boundary, and whether each sample still has its source class."""
    batch, shape = len(x), x.shape[1:]
    x_in = x if create_graph else x.detach()
    x_in = x_in.requires_grad_(True) if not x_in.requires_grad else x_in
    with torch.enable_grad():
        replicated = x_in.unsqueeze(0).expand(k, *x_in.shape).reshape(k * batch, *shape)  # (K·B, ...)
        rep_logits = model(replicated).view(k, batch, k)  # (K, B, K)
        logits = rep_logits[0]  # (B, K): every replica holds the same x
        chosen = rep_logits.diagonal(dim1=0, dim2=2).sum()  # Σ_k Σ_b f_k(x_b) with replica k holding class k
        (grads,) = torch.autograd.grad(chosen, replicated, create_graph=create_graph)  # one call, all classes
    grads = grads.view(k, batch, -1).transpose(0, 1)  # (B, K, D): ∇f_k(x_b)
    still = logits.argmax(dim=1) == source
    idx = torch.arange(batch, device=x.device)
    f_diff = logits - logits[idx, source].unsqueeze(1)  # (B, K): f_k - f_source
    w_diff = grads - grads[idx, source].unsqueeze(1)  # (B, K, D)
    w_norm = w_diff.norm(dim=2)  # (B, K)
    distance = f_diff.abs() / w_norm.clamp_min(1e-12)
    distance[idx, source] = float("inf")  # the source class is no boundary
    nearest = distance.argmin(dim=1)  # (B,)
    w = w_diff[idx, nearest]  # (B, D)
    scale = f_diff[idx, nearest].abs() / w_norm[idx, nearest].pow(2).clamp_min(1e-24)  # |f'| / ‖w‖²
    return (scale.unsqueeze(1) * w).view_as(x), still


# -- shared pieces ----------------------------------------------------------------------------------
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)  # ∇ₓ only: the weights' .grad are untouched
    return grad


def _norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)  # (B,)


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)  # (B,)
    return delta * factor.view(-1, *[1] * (delta.dim() - 1))


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    d = x[0].numel()
    radius = eps * torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype).pow(1.0 / d)
    return direction / _norms(direction).view(-1, *[1] * (x.dim() - 1)) * radius.view(-1, *[1] * (x.dim() - 1))


def _clip(x: Tensor, box: Box) -> Tensor:
    return x.clamp(*box) if box is not None else x


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (in the data's units; 4/255 for '4 per pixel' on [0, 1] images), "
                         f"got {eps!r}")
