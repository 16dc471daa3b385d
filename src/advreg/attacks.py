"""Adversarial inputs: FGSM (Goodfellow et al., ICLR 2015), PGD (Madry et al., ICLR 2018) and batched DeepFool
(Moosavi-Dezfooli et al., CVPR 2016, Algorithm 2). Inputs and ε are in the data's own units; ``box`` is its valid range.

Every attack runs in eval mode, restores the caller's mode, and never changes the model's parameters, buffers or .grad.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Box = tuple[float, float] | None


def pixel_level(box: tuple[float, float]) -> float:
    """One 8-bit pixel level of the input range, (hi - lo)/255: the unit of the papers' ε = 8/255 on [0, 1] images,
    and the same share of any other range."""
    return (box[1] - box[0]) / 255


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, box: Box = None) -> Tensor:
    """x' = clip_box(x + ε·sign(∇ₓ CE(f(x), y))): one signed-gradient step of size ε (L∞)."""
    _check_eps(eps)
    with eval_mode(model):
        grad = _input_grad(model, x.detach(), y)
    return _clip(x.detach() + eps * grad.sign(), box)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    box: Box = None,
    generator: torch.Generator | None = None,
    objective: str = "ce",
    start: str = "ball",
) -> Tensor:
    """``steps`` ascent steps of size α, each projected on the ε-ball around x (L∞ or L2) and on the box.

    ``objective="ce"`` ascends CE(f(x'), y) from a uniform start in the ball (Madry et al.; AWP's Algorithm 2);
    ``"kl"`` ascends KL(p(x) ‖ p(x')), TRADES's inner maximization (AWP paper Eq. 16), from TRADES's start
    x + 0.001·N(0, I) (0.001 of the box's width when a box is given, the code's 0.001 on [0, 1] images).
    L2's CE start: ``start="ball"`` draws δ uniform in the d-dimensional ε-ball (‖δ‖/ε ~ U^(1/d), near the
    sphere for large d); ``"radius"`` is torchattacks' PGDL2, a uniform direction at the radius ε·U (‖δ‖/ε ~ U).
    """
    _check_eps(eps)
    if norm not in ("linf", "l2") or objective not in ("ce", "kl"):
        raise ValueError(f"norm must be 'linf' or 'l2' and objective 'ce' or 'kl', got {norm!r} and {objective!r}")
    if start not in ("ball", "radius") or (start == "radius" and norm != "l2"):
        raise ValueError(
            f"start must be 'ball' or, for norm='l2', 'radius' (torchattacks' L2 start); got "
            f"start={start!r} with norm={norm!r}"
        )
    if alpha <= 0 or not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"alpha must be > 0 and steps an integer >= 0, got alpha={alpha!r}, steps={steps!r}")
    x = x.detach()
    with eval_mode(model):
        target = y if objective == "ce" else _log_probs(model, x)  # labels (B,), or log p(x) (B, K)
        x_adv = _clip(x + _start(x, eps, norm, objective, random_start, box, generator, start), box)
        for _ in range(steps):
            grad = _input_grad(model, x_adv, target)
            step = grad.sign() if norm == "linf" else grad / _per_sample(sample_norms(grad).clamp_min(1e-12), x)
            x_adv = _clip(x + _project(x_adv + alpha * step - x, eps, norm), box)
    return x_adv


def deepfool(
    model: nn.Module,
    x: Tensor,
    steps: int = 50,
    overshoot: float = 0.02,
    create_graph: bool = False,
    labels: Tensor | None = None,
    high_order: bool = True,
    candidates: int | None = None,
    box: Box = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Minimal L2 perturbations that change each sample's predicted class, all samples at once.

    Returns ``(perturbation, norms, success)``: r with x + r past the nearest boundary (each linearized step
    scaled by 1 + overshoot), its per-sample L2 norms (B,), and whether the attack reached its goal (B,).
    Without ``labels`` the source class is the prediction at x and success means it changed; the boundaries
    considered are those to the ``candidates`` classes with the largest logits at x (the source among them; None:
    all K; the AMM authors use 10). With ``labels`` (the AMM paper, Sec. 3.1.2), a correctly classified sample is
    attacked the same way, while a misclassified one is pushed toward its label: each step crosses the linearized
    boundary between its current prediction and the label (two classes, whatever ``candidates``), and success
    means it is classified as the label. Each iteration takes one forward and one autograd call for the classes
    of all samples not yet done, and one forward that checks them.

    ``box=(lo, hi)`` clips every iterate into the input range, as torchattacks does: r is then the clipped
    perturbation, the evaluation's test margin. ``box=None`` is the unclipped DeepFool of the paper, the form AMM's
    regularizer differentiates. ``create_graph=True`` keeps r differentiable in the weights (AMM): through ∇f too
    (high-order gradients; the exact derivative, x + r is not detached inside ∇f), or with ``high_order=False``
    through the logits only, ∇f held constant (AMM's ablation, Sec. 4.3.1).
    """
    perturbation, success, _ = deepfool_with_source(
        model, x, steps, overshoot, create_graph, labels, high_order, candidates, box
    )
    return perturbation, sample_norms(perturbation), success


Forward = Callable[[Tensor, Tensor], Tensor]


def deepfool_with_source(
    model: nn.Module,
    x: Tensor,
    steps: int = 50,
    overshoot: float = 0.02,
    create_graph: bool = False,
    labels: Tensor | None = None,
    high_order: bool = True,
    candidates: int | None = None,
    box: Box = None,
    forward: Forward | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`deepfool`'s perturbation and success, and the prediction at x (B,) that the attack started from.

    ``forward(inputs, rows)`` computes the logits of ``inputs``, whose row i is a point of sample ``rows[i]`` of x
    (default ``model(inputs)``); AMM passes one that keeps each sample's dropout masks.
    """
    _check_deepfool(x, steps, overshoot, labels, candidates)
    forward = forward or (lambda inputs, rows: model(inputs))
    with eval_mode(model):
        x0 = x.detach()
        active = torch.arange(len(x0), device=x0.device)  # the samples not yet done
        with torch.set_grad_enabled(create_graph):
            logits = forward(x0, active)  # (A, K) at the active samples' iterates
        top = logits.detach().topk(min(candidates or logits.shape[1], logits.shape[1]), dim=1).indices  # (B, C)
        source, prediction = top[:, 0], top[:, 0].clone()
        goal = _Goal(source, labels)
        r = torch.zeros_like(x0)  # the iterates are clip_box(x0 + r)
        for _ in range(steps):
            step = _deepfool_step(
                forward, _clip(x0[active] + r[active], box), logits, active, goal, top, create_graph, high_order
            )
            r_active = r[active] + (1 + overshoot) * step
            if box is not None:
                r_active = _clip(x0[active] + r_active, box) - x0[active]
            r = r.index_copy(0, active, r_active)
            with torch.set_grad_enabled(create_graph):
                logits = forward(_clip(x0[active] + r_active, box), active)  # the check, and the next step's f
            prediction[active] = logits.detach().argmax(dim=1)
            going = ~goal.reached(prediction)[active]
            if not bool(going.any()):  # every sample done: no pass of copies after the last step
                break
            active, logits = active[going], logits[going]
    return r, goal.reached(prediction), source


def _check_deepfool(x: Tensor, steps: int, overshoot: float, labels: Tensor | None, candidates: int | None) -> None:
    if not (isinstance(steps, int) and steps >= 1) or overshoot < 0:
        raise ValueError(
            f"steps must be an integer >= 1 and overshoot >= 0, got steps={steps!r}, overshoot={overshoot!r}"
        )
    if labels is not None and labels.shape != (len(x),):
        raise ValueError(f"labels must be class indices of shape ({len(x)},), got {tuple(labels.shape)}")
    if candidates is not None and not (isinstance(candidates, int) and candidates >= 2):
        raise ValueError(
            f"candidates (the top classes at x DeepFool considers) must be an integer >= 2, or None "
            f"for all classes, got {candidates!r}"
        )


class _Goal:
    """Per sample, what DeepFool moves toward: any other class than the source (untargeted), or the label."""

    def __init__(self, source: Tensor, labels: Tensor | None):
        self.source = source
        self.targeted = (source != labels) if labels is not None else torch.zeros_like(source, dtype=torch.bool)
        self.labels = labels if labels is not None else source

    def reached(self, prediction: Tensor) -> Tensor:
        return torch.where(self.targeted, prediction == self.labels, prediction != self.source)


def _deepfool_step(
    forward: Forward,
    point: Tensor,
    logits: Tensor,
    active: Tensor,
    goal: _Goal,
    top: Tensor,
    create_graph: bool,
    high_order: bool,
) -> Tensor:
    """The linearized step (A, ...) of the active samples from their iterates ``point`` (A, ...), logits (A, K).

    An untargeted sample considers its top classes at x (the source first, C copies of it); a targeted one its
    current prediction and its label (2 copies)."""
    targeted = goal.targeted[active]
    pair = torch.stack([logits.detach().argmax(dim=1), goal.labels[active]], dim=1)  # (A, 2)
    groups = [
        (g, classes[g])
        for g, classes in (((~targeted).nonzero().squeeze(1), top[active]), (targeted.nonzero().squeeze(1), pair))
        if len(g)
    ]
    rows = torch.cat([g.repeat_interleave(c.shape[1]) for g, c in groups])  # (R,) the sample of each copy
    grads = _class_gradients(
        forward, point, rows, active, torch.cat([c.flatten() for _, c in groups]), create_graph, high_order
    )  # (R, D)
    step = point.new_zeros(len(point), grads.shape[1])
    for (g, c), w in zip(groups, grads.split([c.numel() for _, c in groups])):
        step = step.index_copy(0, g, _boundary_step(logits[g].gather(1, c), w.view(*c.shape, -1)))
    return step.view_as(point)


def _class_gradients(
    forward: Forward, point: Tensor, rows: Tensor, active: Tensor, classes: Tensor, create_graph: bool, high_order: bool
) -> Tensor:
    """∇ₓ f_classes[i] at point[rows[i]] for every copy i (R, D): one forward and one autograd call."""
    x_in = point if (create_graph and point.requires_grad) else point.detach().requires_grad_(True)
    with torch.enable_grad():
        copies = x_in[rows]  # (R, ...)
        chosen = forward(copies, active[rows]).gather(1, classes.unsqueeze(1)).sum()  # Σ_i f_classes[i](copy i)
        (grads,) = torch.autograd.grad(chosen, copies, create_graph=create_graph and high_order)
    return grads.flatten(1)


def _boundary_step(f: Tensor, w: Tensor) -> Tensor:
    """The step (N, D) to the nearest linearized boundary between class 0 and another of each sample's classes,
    from their logits f (N, C) and input gradients w (N, C, D)."""
    f_diff, w_diff = f[:, 1:] - f[:, :1], w[:, 1:] - w[:, :1]  # (N, C-1), (N, C-1, D)
    w_norm = w_diff.norm(dim=2)  # (N, C-1)
    toward = (f_diff.abs() / w_norm.clamp_min(1e-12)).detach().argmin(dim=1)  # (N,)
    idx = torch.arange(len(f), device=f.device)
    scale = f_diff[idx, toward].abs() / w_norm[idx, toward].pow(2).clamp_min(1e-24)  # |f'| / ‖w‖²
    return scale.unsqueeze(1) * w_diff[idx, toward]


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


def _input_grad(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """∇ₓ of CE(f(x), target) for labels (B,), or of KL(p ‖ softmax f(x)) for clean log-probabilities (B, K)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if target.dim() == 1:
            loss = F.cross_entropy(logits, target)
        else:
            loss = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean", log_target=True)
        (grad,) = torch.autograd.grad(loss, x)  # ∇ₓ only: the weights' .grad are untouched
    return grad


@torch.no_grad()
def _log_probs(model: nn.Module, x: Tensor) -> Tensor:
    return F.log_softmax(model(x), dim=1)  # (B, K), held fixed during the attack


def _start(
    x: Tensor,
    eps: float,
    norm: str,
    objective: str,
    random_start: bool,
    box: Box,
    generator: torch.Generator | None,
    start: str,
) -> Tensor:
    if not random_start:
        return torch.zeros_like(x)
    if objective == "kl":  # KL's gradient vanishes at x' = x: TRADES starts a hair away
        width = box[1] - box[0] if box is not None else 1.0
        return 0.001 * width * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _random_start(x, eps, norm, generator, start)


def sample_norms(t: Tensor) -> Tensor:
    """Per-sample L2 norms (B,) of a batch of perturbations."""
    return t.flatten(1).norm(dim=1)  # (B,)


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / sample_norms(delta).clamp_min(1e-12)).clamp(max=1.0)  # (B,)
    return delta * _per_sample(factor, delta)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None, start: str) -> Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    u = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype)  # (B,)
    radius = eps * (u.pow(1.0 / x[0].numel()) if start == "ball" else u)  # uniform in the d-ball, or ε·U
    return direction / _per_sample(sample_norms(direction), x) * _per_sample(radius, x)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) values shaped to broadcast over a batch like ``like``."""
    return values.view(-1, *[1] * (like.dim() - 1))


def _clip(x: Tensor, box: Box) -> Tensor:
    return x.clamp(*box) if box is not None else x


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(
            f"eps must be >= 0 (in the data's units; 4/255 for '4 per pixel' on [0, 1] images), got {eps!r}"
        )
